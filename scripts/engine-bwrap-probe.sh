#!/usr/bin/env bash
# What bwrap prints inside containers of an engine guest: Codex's current argv (with
# --unshare-user) and its legacy argv (without), for each image x uid x profile given. Lines
# `codex rc=` and `legacy rc=` are those argvs; `codex-cli rc=` is the real Codex CLI.
# Start an engine first, e.g.
#   nsmatrix vm engine --kernel synology-like-5.10 --image bookworm --image bookworm-suid --keep
# and run this with the DOCKER_HOST it prints and the image references `nsmatrix images list` shows:
#   DOCKER_HOST=tcp://127.0.0.1:PORT scripts/engine-bwrap-probe.sh nsmatrix/bookworm:TAG nsmatrix/bookworm-suid:TAG
# With CODEX_MOUNT=1 (engine started with --codex VERSION) each container also runs Codex's own
# sandbox (`codex sandbox -c sandbox_mode=workspace-write`) on an apply_patch that adds a file.
set -euo pipefail
: "${DOCKER_HOST:?set DOCKER_HOST to the endpoint of the engine guest}"
[ $# -gt 0 ] || { echo "usage: DOCKER_HOST=... $0 IMAGE..." >&2; exit 2; }
probe='
W=/tmp/ws; mkdir -p $W; cd $W
ls -l /usr/bin/bwrap | cut -c1-10 | sed "s/^/mode=/"
printf "ns_user=%s\n" "$(test -e /proc/self/ns/user && echo present || echo absent)"
for argv in codex legacy; do
  if [ $argv = codex ]; then
    set -- --new-session --die-with-parent --ro-bind / / --dev /dev --bind $W $W --unshare-user --unshare-pid --unshare-net --proc /proc --chdir $W -- /bin/true
  else
    set -- --new-session --die-with-parent --ro-bind / / --dev-bind /dev/null /dev/null --bind $W $W --unshare-pid --unshare-net --proc /proc --chdir $W -- /bin/true
  fi
  out=$(bwrap "$@" 2>&1); rc=$?
  printf "%s rc=%s %s\n" "$argv" "$rc" "$(printf %s "$out" | tr "\n" " ")"
done
if [ -x /opt/codex/bin/codex ]; then
  H=/var/tmp/codex-home-$(id -u); mkdir -p $H; chmod 700 $H
  P="*** Begin Patch
*** Add File: hello.txt
+hi
*** End Patch"
  out=$(cd $W && CODEX_HOME=$H HOME=$H /opt/codex/bin/codex sandbox -c sandbox_mode=workspace-write -- /opt/codex/bin/codex --codex-run-as-apply-patch "$P" 2>&1); rc=$?
  printf "codex-cli rc=%s wrote=%s %s\n" "$rc" "$(cat $W/hello.txt 2>/dev/null || echo nothing)" "$(printf %s "$out" | tr "\n" " " | cut -c1-400)"
fi'
profile_args() {
  case $1 in
    default) ;;
    holyclaude) echo "--cap-add SYS_ADMIN --cap-add SYS_PTRACE --security-opt seccomp=unconfined" ;;
    holyclaude+net-admin) echo "--cap-add SYS_ADMIN --cap-add SYS_PTRACE --cap-add NET_ADMIN --security-opt seccomp=unconfined" ;;
  esac
}
echo "kernel: $(docker info --format '{{.KernelVersion}}')"
for image in "$@"; do
  for uid in 0 1000; do
    for profile in default holyclaude holyclaude+net-admin; do
      start=$(date +%s.%N)
      # shellcheck disable=SC2046
      res=$(docker run --rm --network none --user $uid ${CODEX_MOUNT:+-v /opt/codex:/opt/codex:ro} $(profile_args $profile) "$image" sh -c "$probe" 2>&1 || true)
      took=$(echo "$(date +%s.%N) - $start" | bc)
      echo "$res" | sed "s|^|$image uid=$uid $profile: |"
      printf "%s uid=%s %s: docker run took %.1f s\n" "$image" "$uid" "$profile" "$took"
    done
  done
done
