#!/bin/bash
# Build the real Debian 12 test guest: a GPT disk image that boots through
# OVMF and systemd-boot into Debian bookworm with systemd, qemu-guest-agent,
# a static address on a virtio-net NIC and a TCP stream service.
#
# usage: tests/guest/debian/build.sh OUTDIR
#
# Outputs (tests/guest/debian/README.md has the details):
#   OUTDIR/disk.raw    the raw GPT disk (sparse): ESP (FAT32) + root (ext4)
#   OUTDIR/disk.json   metadata: partition offsets and sizes, UUIDs, kernel,
#                      command line, addresses, ports, markers, firmware paths
#   OUTDIR/disk.env    the same as shell assignments (for scripts)
#
# No loop device and no mount of the image: debootstrap into a staging
# directory (in a private mount namespace), `mke2fs -d` for the root file
# system, mtools for the ESP, sgdisk for the GPT, dd for the assembly.
#
# Cached: does nothing when the outputs are newer than this script, the
# stream service's source and everything under rootfs/. The downloaded .debs
# stay in OUTDIR/cache (debootstrap --cache-dir). Concurrent builds into one
# OUTDIR are serialized with flock. Needs root (debootstrap, chroot).
#
# Environment: QLIVE_DEBIAN_MIRROR overrides the mirror taken from the host's
# apt sources.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)

log() { echo "debian-guest: $*" >&2; }
die() {
    log "$*"
    exit 1
}

SUITE=bookworm
DISK_MIB=2048 # sparse; about 300 MiB of it is used
ESP_START_MIB=1
ESP_MIB=64
ROOT_START_MIB=$((ESP_START_MIB + ESP_MIB))
ROOT_MIB=$((DISK_MIB - ROOT_START_MIB - 1)) # 1 MiB at the end for the backup GPT

# Fixed identities: the image is the same for every build, and tests may
# match them (they are in disk.json too).
DISK_GUID=b8215ace-0755-499a-8841-c47788aa7aa7
ESP_PARTUUID=665cefe7-92fa-45e1-ac78-07a60b4a8d79
ROOT_PARTUUID=0ff35ed8-ba8d-40e1-985c-facc3e2745c6
ROOT_FS_UUID=8c7473ce-3fc9-4518-8567-9d84d8cb3696
ESP_VOLID=514C4956
MACHINE_ID=5a1e0c3d9b7f4e21a6c8d0f2b4e6a8c1
EFIVAR_NAME=QliveTest
EFIVAR_GUID=668dd849-5bf0-47b1-8e0b-ae666abb5940
HOSTNAME_GUEST=qlive-guest

GUEST_IP=10.0.0.2/24
HOST_IP=10.0.0.1
STREAM_PORT=7778
STREAM_RATE=102400

PACKAGES=(
    systemd systemd-sysv udev dbus kmod
    linux-image-amd64 initramfs-tools zstd
    qemu-guest-agent iproute2 iputils-ping procps
    systemd-boot-efi
)
CMDLINE="root=PARTUUID=$ROOT_PARTUUID ro console=ttyS0,115200 quiet no_timer_check"

OVMF_CODE=/usr/share/OVMF/OVMF_CODE_4M.fd
OVMF_VARS=/usr/share/OVMF/OVMF_VARS_4M.fd

INPUTS=("$HERE/build.sh" "$HERE/qlive-stream.c" "$HERE/rootfs")
OUTPUTS=(disk.raw disk.env disk.json)

fresh() {
    local f newer
    for f in "${OUTPUTS[@]}"; do
        [[ -s $OUT/$f ]] || return 1
        newer=$(find "${INPUTS[@]}" -newer "$OUT/$f" -print)
        [[ -z $newer ]] || return 1
    done
}

fresh && exit 0

# Serialize concurrent builds into the same OUTDIR.
exec 9>"$OUT/.build.lock"
flock 9
fresh && exit 0

[[ $(id -u) -eq 0 ]] || die "needs root (debootstrap, chroot)"
T0=$SECONDS

# ---- tools (scripts/deps.sh installs them too) ----
export PATH="$PATH:/sbin:/usr/sbin"
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v sgdisk >/dev/null || need+=(gdisk)
command -v mcopy >/dev/null || need+=(mtools)
command -v mkfs.vfat >/dev/null || need+=(dosfstools)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
command -v gcc >/dev/null || need+=(gcc)
[[ -e /usr/lib/x86_64-linux-gnu/libc.a ]] || need+=(libc6-dev)
command -v unshare >/dev/null || need+=(util-linux)
command -v systemctl >/dev/null || need+=(systemd)
[[ -e $OVMF_CODE && -e $OVMF_VARS ]] || need+=(ovmf)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y --no-install-recommends "${need[@]}" >&2
fi
[[ -e $OVMF_CODE && -e $OVMF_VARS ]] || die "OVMF firmware not found at $OVMF_CODE / $OVMF_VARS"

# ---- mirror: the host's own Debian source for $SUITE ----
# shellcheck source=tests/rig/apt-mirror.sh
. "$HERE/../../rig/apt-mirror.sh"
line=$(find_mirror "$SUITE")
MIRROR=${QLIVE_DEBIAN_MIRROR:-${line%%$'\t'*}}
[[ -n $MIRROR ]] || MIRROR=http://deb.debian.org/debian
KEYRING=${line#*$'\t'}
[[ -n $KEYRING && -f $KEYRING ]] || KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
KEYOPT=()
[[ -f $KEYRING ]] && KEYOPT=(--keyring="$KEYRING")
log "mirror $MIRROR ($SUITE), keyring ${KEYRING}"

# ---- staging ----
CACHE=$OUT/cache
mkdir -p "$CACHE"
# Remove staging dir $1. Everything that mounted ran in a private mount
# namespace, so nothing is mounted below it; refuse if something is anyway.
remove_stage() {
    local mounts
    mounts=$(awk -v w="$1/" 'index($5, w) == 1 {print $5}' /proc/self/mountinfo)
    if [[ -n $mounts ]]; then
        log "not removing $1: mounts below it: $mounts"
        return
    fi
    rm -rf "$1"
}
# Leftovers of a build that was killed (we hold the lock: none is running).
for old in "$OUT"/.stage.*; do
    [[ ! -d $old ]] || remove_stage "$old"
done
WORK=$(mktemp -d "$OUT/.stage.XXXXXX")
trap 'remove_stage "$WORK"' EXIT
ROOT=$WORK/root
# In a private mount namespace: debootstrap's /proc and /sys mounts in the
# chroot vanish with it, also when the build is killed.
inns() { unshare --mount --propagation private "$@"; }

include=$(
    IFS=,
    echo "${PACKAGES[*]}"
)
log "debootstrap (first stage): minbase + ${include}"
t=$SECONDS
inns debootstrap --variant=minbase --foreign --merged-usr --cache-dir="$CACHE" \
    "${KEYOPT[@]}" --include="$include" "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap1.log" 2>&1 ||
    {
        tail -n 30 "$WORK/debootstrap1.log" >&2
        die "debootstrap first stage failed"
    }
log "  $((SECONDS - t)) s"

# The overlay goes in before the second stage: the dpkg excludes then apply
# to the packages it installs, and the kernel's postinst builds the small
# initramfs (MODULES=list) at once.
# (Owned by root whoever owns the checkout: ownership is not preserved.)
cp -R --preserve=mode,timestamps "$HERE/rootfs/." "$ROOT/"

log "debootstrap (second stage)"
t=$SECONDS
inns chroot "$ROOT" /debootstrap/debootstrap --second-stage >"$WORK/debootstrap2.log" 2>&1 ||
    {
        tail -n 30 "$WORK/debootstrap2.log" >&2
        tail -n 30 "$ROOT/debootstrap/debootstrap.log" >&2 || true
        die "debootstrap second stage failed"
    }
log "  $((SECONDS - t)) s"

# ---- the guest's own files ----
gcc -static -O2 -pthread -Wall -Wextra -o "$ROOT/usr/local/sbin/qlive-stream" "$HERE/qlive-stream.c"
strip "$ROOT/usr/local/sbin/qlive-stream"

echo "$HOSTNAME_GUEST" >"$ROOT/etc/hostname"
cat >"$ROOT/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	$HOSTNAME_GUEST
::1		localhost ip6-localhost ip6-loopback
EOF
echo "$MACHINE_ID" >"$ROOT/etc/machine-id"
rm -f "$ROOT/etc/resolv.conf"
cat >"$ROOT/etc/fstab" <<EOF
# qlive Debian test guest (tests/guest/debian/build.sh)
PARTUUID=$ROOT_PARTUUID	/	ext4	errors=remount-ro	0	0
PARTUUID=$ESP_PARTUUID	/boot/efi	vfat	umask=0077,noauto,nofail	0	0
EOF
mkdir -p "$ROOT/boot/efi"

# Units: ours on, networkd on. Off: the gettys (root is locked), the timers
# and e2scrub (nothing runs in the background that the tests did not ask
# for), and pstore: efi_pstore would save kernel crash logs in EFI variables,
# i.e. in the tests' NVRAM file. (D-Bus and logind stay: qemu-ga's
# guest-shutdown runs `shutdown +0`, which schedules through logind.)
systemctl --root="$ROOT" --quiet enable systemd-networkd.service \
    qlive-config.service qlive-efivar.service qlive-stream.service qlive-ready.service
systemctl --root="$ROOT" --quiet disable getty@tty1.service e2scrub_reap.service systemd-pstore.service \
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer
systemctl --root="$ROOT" --quiet mask serial-getty@ttyS0.service systemd-firstboot.service \
    modprobe@efi_pstore.service
# Early-boot units that only preload modules the kernel loads on demand anyway,
# or mount debug file systems: each costs a process start, slow under TCG.
systemctl --root="$ROOT" --quiet mask modprobe@drm.service modprobe@fuse.service \
    modprobe@loop.service modprobe@dm_mod.service modprobe@configfs.service \
    sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount \
    sys-fs-fuse-connections.mount systemd-network-generator.service
# Generators for what this guest has not (LUKS, verity, integrity, hibernation,
# SysV scripts, rc.local, offline updates, a GPT-discovered root, gettys): each
# is a process at every boot and reload. Kept: fstab and debug (systemd.mask=,
# systemd.wants= on the kernel command line).
mkdir -p "$ROOT/etc/systemd/system-generators"
for g in cryptsetup getty gpt-auto hibernate-resume integritysetup rc-local run system-update sysv veritysetup; do
    ln -sf /dev/null "$ROOT/etc/systemd/system-generators/systemd-$g-generator"
done

# ---- slimming: docs, translations, package caches, drivers no VM has ----
kver=$(find "$ROOT/usr/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n1)
[[ -n $kver && -e $ROOT/boot/vmlinuz-$kver && -e $ROOT/boot/initrd.img-$kver ]] ||
    die "no kernel or initramfs in the staging tree"
find "$ROOT/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$ROOT"/usr/share/{man,info,lintian,linda}
find "$ROOT/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/lib/apt/lists/*
rm -f "$ROOT"/var/log/{bootstrap.log,alternatives.log,dpkg.log} "$ROOT"/var/log/apt/*
# Kernel modules (390 MiB): drop hardware a QEMU guest never has and rarely
# used file systems; keep virtio, intel/realtek NICs, USB/HID, SCSI, DRM core.
M=$ROOT/usr/lib/modules/$kver/kernel
DROP=(
    sound drivers/{media,infiniband,staging,iio,comedi,isdn,bluetooth,hwmon,mtd,target,mmc,watchdog}
    drivers/net/{wireless,can,wan,ieee802154,hamradio,usb,arcnet,fddi,plip}
    drivers/gpu/drm/{amd,radeon,nouveau,i915}
    drivers/scsi/{lpfc,qla2xxx,qla4xxx,mpt3sas,megaraid,be2iscsi,bfa,csiostor,aic7xxx,smartpqi,hisi_sas,aacraid,fnic,qedf,qedi,mpi3mr}
    drivers/platform/{chrome,surface,mellanox}
    net/{wireless,mac80211,bluetooth,can,ieee802154,mac802154,6lowpan}
    fs/{ocfs2,gfs2,f2fs,nilfs2,jfs,reiserfs,ubifs,orangefs,afs,coda,ceph,smb,dlm,hfs,hfsplus,ufs}
)
while IFS= read -r d; do
    DROP+=("drivers/net/ethernet/$d")
done < <(find "$M/drivers/net/ethernet" -mindepth 1 -maxdepth 1 -type d ! -name intel ! -name realtek -printf '%f\n')
TRASH=$WORK/modules-dropped
for d in "${DROP[@]}" lib/test_bpf.ko; do
    [[ -e $M/$d ]] || continue
    mkdir -p "$(dirname "$TRASH/$d")"
    mv "$M/$d" "$TRASH/$d"
done
# Put back what a kept module needs: modules.dep lists every module's whole
# dependency closure (e.g. the DRM display helper needs media's cec).
restored=0
while read -r mod deps; do
    [[ -e $M/../${mod%:} ]] || continue
    for dep in $deps; do
        dep=${dep#kernel/}
        [[ ! -e $M/$dep && -e $TRASH/$dep ]] || continue
        mkdir -p "$(dirname "$M/$dep")"
        mv "$TRASH/$dep" "$M/$dep"
        restored=$((restored + 1))
    done
done <"$M/../modules.dep"
log "modules: dropped $(du -sm "$TRASH" | awk '{print $1}') MiB, put back $restored that kept modules need"
chroot "$ROOT" depmod -a "$kver"

echo "qlive Debian test guest, built $(date -u +%Y-%m-%dT%H:%M:%SZ) by tests/guest/debian/build.sh" \
    >"$ROOT/etc/qlive-image"
# shellcheck disable=SC2016  # a dpkg-query format, not a shell expansion
npkg=$(chroot "$ROOT" dpkg-query -W -f '${db:Status-Status}\n' | grep -c '^installed$' || true)

# /etc and /var are up to date with /usr: no ConditionNeedsUpdate= units
# (hwdb rebuild, ldconfig, sysusers, catalog) at the first boot of every copy.
stamp=$(($(stat -c %Y "$ROOT/usr") + 1))
for d in etc var; do
    printf '%s\n' "# This file was created by systemd-update-done. Its only" \
        "# purpose is to hold a timestamp of the time this directory" \
        "# was updated. See man:systemd-update-done.service(8)." \
        "TIMESTAMP_NSEC=${stamp}000000000" >"$ROOT/$d/.updated"
    touch -d "@$stamp" "$ROOT/$d/.updated"
done

# ---- ESP: systemd-boot as the removable-media loader, one entry ----
SDBOOT=$ROOT/usr/lib/systemd/boot/efi/systemd-bootx64.efi
[[ -f $SDBOOT ]] || die "no $SDBOOT in the staging tree"
cat >"$WORK/loader.conf" <<EOF
timeout 0
default qlive.conf
EOF
cat >"$WORK/qlive.conf" <<EOF
title   Debian 12 (qlive test guest)
version $kver
linux   /qlive/vmlinuz
initrd  /qlive/initrd.img
options $CMDLINE
EOF
ESP=$WORK/esp.img
mkfs.vfat -C -F 32 -n QLIVE-ESP -i "$ESP_VOLID" "$ESP" $((ESP_MIB * 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$ESP" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries ::/qlive
mcopy -i "$ESP" "$SDBOOT" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$ESP" "$WORK/loader.conf" ::/loader/loader.conf
mcopy -i "$ESP" "$WORK/qlive.conf" ::/loader/entries/qlive.conf
mcopy -i "$ESP" "$ROOT/boot/vmlinuz-$kver" ::/qlive/vmlinuz
mcopy -i "$ESP" "$ROOT/boot/initrd.img-$kver" ::/qlive/initrd.img

# ---- root file system, from the staging tree ----
# lazy init off: the guest's kernel must not zero inode tables in the
# background (writes nobody asked for).
log "mke2fs -d (root, $ROOT_MIB MiB)"
t=$SECONDS
RFS=$WORK/root.img
truncate -s "${ROOT_MIB}M" "$RFS"
mke2fs -q -F -t ext4 -L qlive-root -U "$ROOT_FS_UUID" -m 1 \
    -E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0 -d "$ROOT" "$RFS"
e2fsck -fn "$RFS" >"$WORK/e2fsck.log" 2>&1 || {
    cat "$WORK/e2fsck.log" >&2
    die "the new root file system does not pass e2fsck"
}
log "  $((SECONDS - t)) s"

# ---- the disk: GPT, then the two partitions dd-ed in at their offsets ----
DISK=$WORK/disk.raw
truncate -s "${DISK_MIB}M" "$DISK"
sgdisk --clear --disk-guid="$DISK_GUID" \
    --new=1:$((ESP_START_MIB * 2048)):+${ESP_MIB}M --typecode=1:ef00 --change-name=1:ESP --partition-guid=1:"$ESP_PARTUUID" \
    --new=2:$((ROOT_START_MIB * 2048)):+${ROOT_MIB}M --typecode=2:8304 --change-name=2:root --partition-guid=2:"$ROOT_PARTUUID" \
    "$DISK" >/dev/null
dd if="$ESP" of="$DISK" bs=1M seek="$ESP_START_MIB" conv=notrunc,sparse status=none
dd if="$RFS" of="$DISK" bs=1M seek="$ROOT_START_MIB" conv=notrunc,sparse status=none
sgdisk --verify "$DISK" >"$WORK/sgdisk.log" 2>&1 || {
    cat "$WORK/sgdisk.log" >&2
    die "sgdisk --verify failed"
}

# ---- metadata ----
ESP_OFFSET=$((ESP_START_MIB * 1048576))
ESP_SIZE=$((ESP_MIB * 1048576))
ROOT_OFFSET=$((ROOT_START_MIB * 1048576))
ROOT_SIZE=$((ROOT_MIB * 1048576))
cat >"$WORK/disk.env" <<EOF
# tests/guest/debian/build.sh: the Debian test guest's disk (shell syntax)
QLIVE_DEBIAN_IMAGE=disk.raw
QLIVE_DEBIAN_FORMAT=raw
QLIVE_DEBIAN_DISK_SIZE=$((DISK_MIB * 1048576))
QLIVE_DEBIAN_ESP_OFFSET=$ESP_OFFSET
QLIVE_DEBIAN_ESP_SIZE=$ESP_SIZE
QLIVE_DEBIAN_ROOT_OFFSET=$ROOT_OFFSET
QLIVE_DEBIAN_ROOT_SIZE=$ROOT_SIZE
QLIVE_DEBIAN_ROOT_PARTUUID=$ROOT_PARTUUID
QLIVE_DEBIAN_ROOT_FS_UUID=$ROOT_FS_UUID
QLIVE_DEBIAN_KERNEL=$kver
QLIVE_DEBIAN_OVMF_CODE=$OVMF_CODE
QLIVE_DEBIAN_OVMF_VARS=$OVMF_VARS
QLIVE_DEBIAN_GUEST_IP=$GUEST_IP
QLIVE_DEBIAN_HOST_IP=$HOST_IP
QLIVE_DEBIAN_STREAM_PORT=$STREAM_PORT
QLIVE_DEBIAN_STREAM_RATE=$STREAM_RATE
QLIVE_DEBIAN_EFIVAR=$EFIVAR_NAME-$EFIVAR_GUID
EOF
cat >"$WORK/disk.json" <<EOF
{
  "image": "disk.raw",
  "format": "raw",
  "size": $((DISK_MIB * 1048576)),
  "sector_size": 512,
  "disk_guid": "$DISK_GUID",
  "partitions": {
    "esp": {"number": 1, "offset": $ESP_OFFSET, "size": $ESP_SIZE, "partuuid": "$ESP_PARTUUID",
            "fs": "vfat", "label": "QLIVE-ESP", "volume_id": "$ESP_VOLID"},
    "root": {"number": 2, "offset": $ROOT_OFFSET, "size": $ROOT_SIZE, "partuuid": "$ROOT_PARTUUID",
             "fs": "ext4", "fs_uuid": "$ROOT_FS_UUID", "label": "qlive-root"}
  },
  "suite": "$SUITE",
  "kernel": "$kver",
  "cmdline": "$CMDLINE",
  "packages_installed": $npkg,
  "firmware": {"code": "$OVMF_CODE", "vars_template": "$OVMF_VARS"},
  "network": {"guest_ip": "$GUEST_IP", "host_ip": "$HOST_IP"},
  "stream": {"port": $STREAM_PORT, "rate": $STREAM_RATE,
             "pattern": "u64 little-endian counter: byte n = byte (n % 8) of LE64(n / 8)"},
  "guest_agent": {"port_name": "org.qemu.guest_agent.0"},
  "efivar": {"name": "$EFIVAR_NAME", "guid": "$EFIVAR_GUID", "attributes": 7},
  "fw_cfg": ["opt/qlive/ip", "opt/qlive/gateway", "opt/qlive/mac", "opt/qlive/stream-port",
             "opt/qlive/stream-rate", "opt/qlive/efivar"],
  "markers": {
    "ready": "QLIVE-GUEST-READY",
    "error": "QLIVE-GUEST-ERROR",
    "efivar": "QLIVE-EFIVAR",
    "efivar_written": "QLIVE-EFIVAR-WRITTEN",
    "stopping": "QLIVE-GUEST-STOPPING",
    "poweroff": "QLIVE-GUEST-POWEROFF",
    "reboot": "QLIVE-GUEST-REBOOT"
  }
}
EOF

# ---- outputs (atomic renames; disk.json last: it marks a complete build) ----
mv -f "$DISK" "$OUT/disk.raw"
mv -f "$WORK/disk.env" "$OUT/disk.env"
mv -f "$WORK/disk.json" "$OUT/disk.json"
used=$(du -k "$OUT/disk.raw" | awk '{print $1}')
log "built $OUT/disk.raw: kernel $kver, $npkg packages, $((used / 1024)) MiB used of $DISK_MIB MiB, $((SECONDS - T0)) s"
