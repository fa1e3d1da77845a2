#!/usr/bin/env bash
# An aarch64 Debian root in which the fast path's tests run under qemu-user (BlueField runs
# aarch64; CI's machines do not).  Used by tools/portability.sh.
#
#   tools/arm64-root.sh ensure        make sure the root exists and is current; print its path
#   tools/arm64-root.sh run CMD...    run CMD inside the root (chroot, under qemu-aarch64)
#
#   host (x86-64)                                  /var/cache/hypernat/arm64-root
#   ─────────────                                  ──────────────────────────────
#   debootstrap --arch=arm64 bookworm ───────────► Debian arm64: python3, numpy, pytest,
#   binfmt_misc: qemu-aarch64 (F: the host's            hypothesis, scapy, yaml, the Python,
#     interpreter, nothing copied into the root)        numpy and libc headers, libxdp/libbpf
#   unshare -m: private /proc and /dev mounts ───► chroot ROOT CMD   (mounts vanish with the
#                                                                     namespace, even on failure)
#
# The root is built once and cached; it is rebuilt when PACKAGES, the suite or the mirror
# change (the stamp file inside it records them).  A build goes to a temporary directory
# renamed into place when complete, so an interrupted build leaves nothing half made.  An
# exclusive lock guards the build, a shared one every run (a rebuild never pulls the root
# from under a running test).  Every failure says what is missing and exits non-zero: the
# portability check fails loudly, it never skips.
#
# Environment: HYPERNAT_ARM64_ROOT (the root's path), HYPERNAT_DEBIAN_MIRROR,
# HYPERNAT_ARM64_LOCK_WAIT (seconds to wait for another build, default 3600).
set -euo pipefail

ROOT=${HYPERNAT_ARM64_ROOT:-/var/cache/hypernat/arm64-root}
SUITE=bookworm
MIRROR=${HYPERNAT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOCK_WAIT=${HYPERNAT_ARM64_LOCK_WAIT:-3600}
# What the fast-path tests import (python3 + the test tools), what their conftest and the
# golden-file tool import (yaml, scapy), and what the cross build compiles and links against
# (--sysroot=ROOT): the Python headers, numpy's (python3-numpy ships them), libc's, and
# libxdp/libbpf for the modules a "# hypernat: requires=libxdp,libbpf" line names.
PACKAGES=(python3 python3-numpy python3-pytest python3-pytest-timeout python3-hypothesis
          python3-scapy python3-yaml libpython3-dev libc6-dev libxdp-dev libbpf-dev)
STAMP=.hypernat-root
LOCK=$ROOT.lock

die() { echo "arm64-root: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, mounts)"

stamp_text() { printf 'suite %s\nmirror %s\npackages %s\n' "$SUITE" "$MIRROR" "${PACKAGES[*]}"; }

binfmt() {  # qemu-aarch64 registered with binfmt_misc, with the F flag
  local entry=/proc/sys/fs/binfmt_misc/qemu-aarch64
  command -v update-binfmts >/dev/null || die "update-binfmts not found (apt-get install binfmt-support)"
  [ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || [ -e /usr/bin/qemu-aarch64-static ] \
    || die "qemu-aarch64-static not found (apt-get install qemu-user-static)"
  if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
      || die "cannot mount binfmt_misc on /proc/sys/fs/binfmt_misc"
  fi
  if [ ! -e "$entry" ] || ! grep -qx enabled "$entry"; then
    update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
  fi
  grep -qx enabled "$entry" || die "qemu-aarch64 is not enabled in binfmt_misc ($entry)"
  # F (fix binary): the kernel opened the interpreter at registration, so it need not exist
  # inside the chroot.  Without F the root would need its own copy.
  grep -q '^flags: .*F' "$entry" || die "qemu-aarch64 is registered without the F flag ($entry)"
}

current() { [ -f "$ROOT/$STAMP" ] && [ "$(cat "$ROOT/$STAMP")" = "$(stamp_text)" ]; }

build() {
  command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
  local new="$ROOT.new" t0=$SECONDS
  rm -rf "$new"
  mkdir -p "$(dirname "$ROOT")"
  echo "arm64-root: building $ROOT (debootstrap --arch=arm64 $SUITE, ${#PACKAGES[@]} packages; minutes)" >&2
  local inc
  inc=$(IFS=,; echo "${PACKAGES[*]}")
  if ! timeout 3000 debootstrap --arch=arm64 --variant=minbase --include="$inc" \
        "$SUITE" "$new" "$MIRROR" >"$new.log" 2>&1; then
    tail -n 30 "$new.log" >&2
    die "debootstrap failed (log: $new.log)"
  fi
  rm -rf "$new"/var/cache/apt/archives/*.deb "$new"/var/lib/apt/lists/*
  stamp_text >"$new/$STAMP"
  rm -rf "$ROOT" && mv "$new" "$ROOT" && rm -f "$new.log"
  echo "arm64-root: built in $((SECONDS - t0)) s" >&2
}

ensure() {
  binfmt
  mkdir -p "$(dirname "$LOCK")"
  exec 9>"$LOCK"
  if ! current; then
    flock -w "$LOCK_WAIT" 9 || die "timed out waiting for another build of $ROOT"
    current || build
  fi
  flock -u 9
  # trees left by runs that were killed (a finished run removes its own)
  find "$ROOT/tmp" -maxdepth 1 -name 'hypernat-portability.*' -mmin +1440 -exec rm -rf {} + 2>/dev/null || true
  echo "$ROOT"
}

run() {
  [ $# -gt 0 ] || die "run: no command"
  binfmt
  current || die "$ROOT is missing or stale: run '$0 ensure' first"
  exec 9>"$LOCK"
  flock -s -w "$LOCK_WAIT" 9 || die "timed out waiting for a build of $ROOT to finish"
  # A private mount namespace: /proc and /dev are mounted for this command only, and are
  # gone when it ends, however it ends.
  unshare --mount --propagation private -- bash -euc '
    root=$1; shift
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp LANG=C.UTF-8 "$@"
  ' arm64-root "$ROOT" "$@"
}

case "${1:-}" in
  ensure) ensure ;;
  run) shift; run "$@" ;;
  *) die "usage: $0 ensure | run CMD..." ;;
esac
