#!/usr/bin/env bash
# Install what qlive's build, demo and test suite need on Debian 12.
# Idempotent: does nothing (and no `apt-get update`) when all is present.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
apt_get() { apt-get -o DPkg::Lock::Timeout=900 -q "$@"; }
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

missing=0
# qemu-system-x86 7.2 is Debian 12's own QEMU: the "old" hypervisor.
for cmd in qemu-system-x86_64 qemu-img cpio gcc ip unshare nsenter pkg-config systemctl python3 pgrep \
  checkmodule semodule_package semodule_link semodule_expand m4 shellcheck promtool; do
  command -v "$cmd" >/dev/null 2>&1 || missing=1
done
[ -e /usr/share/seabios/bios-256k.bin ] || missing=1
[ -r /usr/share/selinux/devel/Makefile ] || missing=1
pkg-config --exists libsystemd 2>/dev/null || missing=1
command -v rpmbuild >/dev/null 2>&1 || missing=1 # make rpm (Debian's rpm package)
# ansible/test/setup.sh makes a venv (Debian's python3 needs python3-venv for it)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing=1
[ "$(dpkg-query -W -f='${Status}' qemu-system-x86 2>/dev/null || true)" = "install ok installed" ] || missing=1

if [ "$missing" = 1 ]; then
  echo "deps: installing Debian packages"
  $SUDO apt-get -o DPkg::Lock::Timeout=900 -q update
  # Some images carry qemu-utils from bookworm-backports, whose version
  # Breaks qemu-system-common 7.2: take qemu-utils from bookworm too.
  utils="qemu-utils"
  # Capture, then match: `apt-cache policy | grep -q` under pipefail fails
  # at random (grep exits at the first match, apt-cache dies of SIGPIPE).
  policy=$(apt-cache policy qemu-utils)
  if grep -q '~bpo12' <<<"$policy"; then
    utils="qemu-utils/bookworm"
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 -q install -y \
    --no-install-recommends --allow-downgrades \
    rpm \
    qemu-system-x86 "$utils" seabios ipxe-qemu cpio gcc libc6-dev iproute2 util-linux kmod xz-utils \
    libsystemd-dev pkg-config systemd python3 python3-venv procps \
    selinux-policy-dev checkpolicy semodule-utils policycoreutils bzip2 shellcheck prometheus
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "deps: cargo is required (install Rust with rustup)" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "deps: installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
if ! cargo deb --version >/dev/null 2>&1; then
  echo "deps: installing cargo-deb"
  cargo install cargo-deb --locked
fi
# The Debian test guest (tests/guest/debian/build.sh, make debian-guest):
# debootstrap, sgdisk, mtools and mkfs.vfat build the disk; OVMF boots it.
if [ ! -x /usr/sbin/debootstrap ] || [ ! -x /sbin/sgdisk ] || [ ! -x /usr/bin/mcopy ] ||
  [ ! -x /sbin/mkfs.vfat ] || [ ! -e /usr/share/OVMF/OVMF_CODE_4M.fd ]; then
  echo "deps: installing the Debian test guest's tools"
  [ "$missing" = 1 ] || $SUDO apt-get -o DPkg::Lock::Timeout=900 -q update
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 -q install -y \
    --no-install-recommends debootstrap gdisk mtools dosfstools ovmf e2fsprogs
fi
