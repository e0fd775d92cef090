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
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
