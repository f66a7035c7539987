#!/usr/bin/env bash
# Mount a dandiset version for a batch job or a container, run a command, always unmount.
#
#   scripts/mount.sh SOURCE MOUNTPOINT [ZARRFS MOUNT OPTIONS...] [-- COMMAND ARGS...]
#
# Mounts SOURCE (e.g. 000123@0.251101.1200) at MOUNTPOINT and returns control only once the mount is
# live. With a COMMAND, runs it and exits with its exit code; without one, keeps the mount until
# SIGINT/SIGTERM. Either way the mount is removed on exit (trap). The zarrfs executable is $ZARRFS,
# else `zarrfs` on PATH, else this checkout's .venv/bin/zarrfs.
set -uo pipefail

usage() { echo "usage: $0 SOURCE MOUNTPOINT [zarrfs mount options...] [-- COMMAND ARGS...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
source_spec=$1; mountpoint=$2; shift 2
opts=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do opts+=("$1"); shift; done
[ $# -gt 0 ] && shift  # drop "--"

zarrfs=${ZARRFS:-}
if [ -z "$zarrfs" ]; then
  if command -v zarrfs >/dev/null 2>&1; then zarrfs=zarrfs
  else zarrfs="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/zarrfs"; fi
fi

mkdir -p "$mountpoint" || exit 4
# As /proc/mounts names the mount: the real path (resolved now, before anything is mounted on it),
# a space escaped as \040.
real=$(realpath -- "$mountpoint") || exit 4
real=${real// /\\040}

child=""
is_mounted() { grep -qsF " $real fuse" /proc/mounts; }
cleanup() {
  if [ -n "$child" ]; then kill "$child" 2>/dev/null; wait "$child" 2>/dev/null; fi
  if is_mounted; then "$zarrfs" unmount "$mountpoint" 2>/dev/null || fusermount3 -u -z "$mountpoint"; fi
}
# Traps first: a signal that arrives while mounting still unmounts.
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

"$zarrfs" mount "${opts[@]}" "$source_spec" "$mountpoint" || exit $?

if [ $# -eq 0 ]; then
  echo "mounted $source_spec at $mountpoint; Ctrl-C or SIGTERM unmounts" >&2
  sleep infinity & child=$!
  wait "$child"
  exit 0
fi
"$@" <&0 & child=$!  # <&0: a background job would otherwise read /dev/null
wait "$child"; rc=$?
child=""
exit "$rc"
