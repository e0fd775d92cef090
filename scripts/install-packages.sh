#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages the tests and the backends need (as root), running
# `apt-get update` once and only when something is missing. Used by scripts/test.sh and .ci/run.
set -euo pipefail

# docker.io: the Docker backend; qemu-system-x86, busybox-static, cpio, dpkg, xz-utils,
# binutils: QEMU guests; make gcc flex bison bc perl libelf-dev libssl-dev: building the
# nouserns kernel from linux-source; debootstrap: root filesystems for images; librsvg2-bin,
# python3, python3-venv: the heat map to PNG and a real JUnit parser in the regression tests;
# jq, nodejs, rsync: the GitLab CI recipe run by gitlab-ci-local (rsync: its shell isolation).
packages=(docker.io qemu-system-x86 bubblewrap busybox-static cpio e2fsprogs debootstrap
          util-linux procps ca-certificates dpkg xz-utils binutils
          make gcc flex bison bc perl libelf-dev libssl-dev
          librsvg2-bin python3 python3-venv jq nodejs rsync)
# npm: gitlab-ci-local (tests/gitlab_ci_local.rs) comes from the npm registry. A nodejs
# package that carries npm itself (NodeSource's) needs no separate one.
command -v npm >/dev/null 2>&1 || packages+=(npm)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# QEMU: Debian 12's own (7.2) is slow to start a dynamically linked program in a guest under
# TCG, measured to depend on address-space randomisation (new library addresses at every exec).
# Measured in a debian-6.1 guest: `bwrap --version` took 79 ms
# per start with 7.2 and 19 ms with 10.0 (17 ms with 7.2 and randomisation off), and every guest
# cell starts bwrap. On Debian 12 a newer QEMU comes from bookworm-backports.
codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
backports=()
if [ "$codename" = bookworm ]; then
  # (dpkg-query fails when the package is not installed: `|| true` keeps set -e/pipefail quiet)
  qemu_version=$( (dpkg-query -W -f='${Status} ${Version}' qemu-system-x86 2>/dev/null || true) \
                 | sed -n 's/^install ok installed //p')
  if [ -z "$qemu_version" ] || dpkg --compare-versions "$qemu_version" lt 1:8; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" \
      > /etc/apt/sources.list.d/nsmatrix-bookworm-backports.list
    others=()
    for p in "${missing[@]}"; do [ "$p" = qemu-system-x86 ] || others+=("$p"); done
    missing=("${others[@]}")
    # Installed on its own with -t: its dependencies (qemu-system-common, qemu-system-data,
    # seabios) must come from backports too, and nothing else should.
    backports=(qemu-system-x86)
  fi
fi
if [ "${#missing[@]}" -gt 0 ] || [ "${#backports[@]}" -gt 0 ]; then
  apt-get update -q
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ "${#backports[@]}" -gt 0 ]; then
  echo "== installing ${backports[*]} from bookworm-backports"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -t bookworm-backports "${backports[@]}"
fi
