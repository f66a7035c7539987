#!/usr/bin/env bash
# Install everything zarrfs needs on a fresh Debian machine: FUSE 3 (apt), a virtualenv at .venv built
# on the system Python (so other users can execute it), and the package with its demo and test extras.
# Idempotent. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
dpkg -s libfuse3-dev >/dev/null 2>&1 || need_apt+=(libfuse3-dev)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
dpkg -s python3-venv >/dev/null 2>&1 || need_apt+=(python3-venv)
dpkg -s python3-dev >/dev/null 2>&1 || need_apt+=(python3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

python=${ZARRFS_PYTHON:-}
if [ -z "$python" ]; then
  for candidate in /usr/bin/python3.11 /usr/bin/python3.12 /usr/bin/python3.13 /usr/bin/python3; do
    if [ -x "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      python=$candidate; break
    fi
  done
fi
[ -n "$python" ] || { echo "setup: no Python >= 3.11 found (set ZARRFS_PYTHON)" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
echo "setup: ready (.venv/bin/zarrfs)"
