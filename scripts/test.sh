#!/usr/bin/env bash
# The test command of the README: installs the system packages the tests need (Debian/Ubuntu,
# as root), starts a Docker engine if none is running (and stops it again at the end), then
# checks formatting and lints and runs every test against the real backends.
#
# Downloads and builds (kernels, root filesystems, images, Codex) are cached under
# $NSMATRIX_CACHE (default ~/.cache/nsmatrix), so a rerun is fast; nothing depends on the
# cache being there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: run as root (sudo): the tests install packages, start dockerd and create setuid copies" >&2
  exit 2
fi

# docker.io: the Docker backend; qemu-system-x86, busybox-static, cpio, dpkg, xz-utils,
# binutils: QEMU guests; make gcc flex bison bc perl libelf-dev libssl-dev: building the
# nouserns kernel from linux-source; debootstrap: root filesystems for images; librsvg2-bin,
# python3, python3-venv: the heat map to PNG and a real JUnit parser in the regression tests.
packages=(docker.io qemu-system-x86 bubblewrap busybox-static cpio e2fsprogs debootstrap
          util-linux procps ca-certificates dpkg xz-utils binutils
          make gcc flex bison bc perl libelf-dev libssl-dev
          librsvg2-bin python3 python3-venv)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

dockerd_pid=""
stop_dockerd() {
  if [ -n "$dockerd_pid" ]; then
    echo "== stopping the dockerd this script started"
    kill "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
  fi
}
trap stop_dockerd EXIT
if ! docker info >/dev/null 2>&1; then
  echo "== starting dockerd"
  mkdir -p target
  dockerd >target/dockerd.log 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see target/dockerd.log" >&2; exit 1; }
fi

# A real JUnit consumer's parser (junitparser) and the CI engines' schemas (check-jsonschema
# vendors GitHub's and GitLab's) for the regression tests, in a venv of their own.
venv=target/pyvenv
if ! "$venv/bin/python3" -c "import junitparser" 2>/dev/null || [ ! -x "$venv/bin/check-jsonschema" ]; then
  echo "== installing junitparser and check-jsonschema into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q junitparser check-jsonschema
fi
export PATH="$PWD/$venv/bin:$PATH"

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --no-fail-fast 2>&1
