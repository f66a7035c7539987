#!/usr/bin/env bash
# Install everything zarrfs needs on a fresh Debian machine: FUSE 3 (apt), a virtualenv at .venv built
# on the system Python (so other users can execute it), pyfuse3 built from its sdist with the patch in
# patches/ (kernel caching of directory listings; see patches/README.md), and the package with its
# demo and test extras. Idempotent. Usage: scripts/setup.sh
# ZARRFS_EXTRAS selects the extras (default: test; empty: the package alone, as the container images
# install it); ZARRFS_PYTHON the interpreter the virtualenv is built on.
set -euo pipefail
cd "$(dirname "$0")/.."

#: The pyfuse3 release the patch applies to, and the Cython that regenerates its C source.
PYFUSE3_VERSION=3.5.0
PYFUSE3_PATCH=patches/pyfuse3-$PYFUSE3_VERSION-cache-readdir.patch
CYTHON_REQUIREMENT='Cython>=3.1,<3.3'

need_apt=()
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
dpkg -s libfuse3-dev >/dev/null 2>&1 || need_apt+=(libfuse3-dev)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
command -v patch >/dev/null 2>&1 || need_apt+=(patch)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)  # pyfuse3 is built from source
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

# True when the venv's pyfuse3 has every part of the patch: opendir may ask for kernel caching, and
# may reply ENOSYS so that readdir receives the inode (what zarrfs.fuse_ops detects), open may reply
# ENOSYS so that read receives the inode, and the request loop keeps its reader lock through
# handlers that do not wait (pyfuse3._pyfuse3.Drive).
has_readdir_cache() {
  .venv/bin/python -c 'import sys, pyfuse3, pyfuse3._pyfuse3 as p
sys.exit(not (hasattr(pyfuse3.FileInfo, "cache_readdir") and hasattr(pyfuse3, "no_opendir_support")
              and hasattr(pyfuse3, "no_open_support") and hasattr(p, "Drive")))' \
    >/dev/null 2>&1
}

# Build pyfuse3 from its sdist with the patch, in a throwaway build venv (pinned Cython, no build
# isolation), and install the wheel into .venv without touching its dependencies. Runs in a subshell
# (its own errexit and EXIT trap).
build_patched_pyfuse3() (
  set -euo pipefail
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  .venv/bin/python -m venv "$work/build-venv"
  pip="$work/build-venv/bin/pip"
  "$pip" install -q "$CYTHON_REQUIREMENT" 'setuptools>=78.1.1' 'setuptools_scm>=8'
  "$pip" download -q --no-deps --no-binary pyfuse3 --no-build-isolation -d "$work" \
    "pyfuse3==$PYFUSE3_VERSION"
  tar -xzf "$work/pyfuse3-$PYFUSE3_VERSION.tar.gz" -C "$work"
  src="$work/pyfuse3-$PYFUSE3_VERSION"
  patch -s -p1 -d "$src" <"$PYFUSE3_PATCH"
  rm "$src/src/pyfuse3/__init__.c"  # generated from the unpatched sources: Cython makes it anew
  "$pip" wheel -q --no-deps --no-build-isolation -w "$work/wheel" "$src"
  .venv/bin/pip install -q --no-deps --force-reinstall "$work"/wheel/pyfuse3-*.whl
)

if has_readdir_cache; then
  echo "setup: pyfuse3 already has the cache_readdir patch"
else
  echo "setup: building pyfuse3 $PYFUSE3_VERSION with $PYFUSE3_PATCH"
  # Not called as a condition, so that `set -e` stops the build at its first failure.
  set +e
  build_patched_pyfuse3
  built=$?
  set -e
  [ "$built" -eq 0 ] || echo "setup: building the patched pyfuse3 failed (exit $built)" >&2
fi

extras=${ZARRFS_EXTRAS-test}
.venv/bin/pip install -q -e ".${extras:+[$extras]}"
# Byte-compile the sources, as pip does for a package it installs (an editable install does not):
# where PYTHONDONTWRITEBYTECODE is set, every daemon would otherwise compile them anew at start
# (some 0.08 s of CPU, measured in benchmarks/RESULTS.md).
.venv/bin/python -m compileall -q src

if ! has_readdir_cache; then
  echo "setup: WARNING: using stock pyfuse3: the kernel will not cache directory listings" \
    "(slower find/ls over big Zarrs; everything else works). See patches/README.md." >&2
fi
echo "setup: ready (.venv/bin/zarrfs)"
