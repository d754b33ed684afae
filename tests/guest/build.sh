#!/bin/bash
# Build the qlive test guest: OUTDIR/vmlinuz, OUTDIR/initrd.img, OUTDIR/modules.txt.
#
# usage: tests/guest/build.sh OUTDIR
#
# Cached: does nothing when the outputs exist and are newer than init.c and
# this script. The Debian kernel .deb is kept in OUTDIR/cache/.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)

# Modules the guest may need; dependencies are added automatically.
WANT_MODULES=(virtio_pci virtio_blk virtio_net)

log() { echo "guest-build: $*" >&2; }

fresh() {
    local f
    for f in vmlinuz initrd.img modules.txt; do
        [[ -s $OUT/$f && $OUT/$f -nt $HERE/init.c && $OUT/$f -nt $HERE/build.sh ]] || return 1
    done
}

fresh && exit 0

# Serialize concurrent builds into the same OUTDIR.
exec 9>"$OUT/.build.lock"
flock 9
fresh && exit 0

APT=(apt-get -o DPkg::Lock::Timeout=900)

# ---- tools ----
need=()
command -v gcc >/dev/null || need+=(gcc)
[[ -e /usr/lib/x86_64-linux-gnu/libc.a ]] || need+=(libc6-dev)
command -v cpio >/dev/null || need+=(cpio)
command -v xz >/dev/null || need+=(xz-utils)
command -v modinfo >/dev/null || [[ -x /sbin/modinfo ]] || need+=(kmod)
command -v gzip >/dev/null || need+=(gzip)
command -v dpkg-deb >/dev/null || need+=(dpkg)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive "${APT[@]}" install -y --no-install-recommends "${need[@]}" >&2
fi
export PATH="$PATH:/sbin:/usr/sbin"

# ---- kernel package ----
CACHE=$OUT/cache
mkdir -p "$CACHE"

candidate() { apt-cache policy linux-image-amd64 2>/dev/null | awk '/Candidate:/ {print $2}'; }
cand=$(candidate)
if [[ -z $cand || $cand == "(none)" ]]; then
    log "no candidate for linux-image-amd64, running apt-get update"
    "${APT[@]}" update >&2 || true
    cand=$(candidate)
fi
pkg=""
if [[ -n $cand && $cand != "(none)" ]]; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9].*-amd64$/ {print $2; exit}')
fi

# The highest version (sort -V) among the files that exist of those named.
newest() {
    local f
    for f in "$@"; do
        if [[ -e $f ]]; then printf '%s\n' "$f"; fi
    done | sort -V | tail -n1
}

deb=""
if [[ -n $pkg ]]; then
    deb=$(newest "$CACHE/${pkg}"_*.deb)
    if [[ -z $deb ]]; then
        log "downloading $pkg"
        (cd "$CACHE" && "${APT[@]}" -o APT::Sandbox::User=root download "$pkg" >&2)
        deb=$(newest "$CACHE/${pkg}"_*.deb)
    fi
else
    # offline fallback: whatever was downloaded before
    deb=$(newest "$CACHE"/linux-image-[0-9]*-amd64_*.deb)
fi
if [[ -z $deb ]]; then
    log "cannot resolve or download the Debian kernel package"
    exit 1
fi
log "kernel package: $(basename "$deb")"

# ---- staging (the extracted kernel is ~400 MB: extract into a temp dir) ----
WORK=$(mktemp -d "$OUT/.stage.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
KROOT=$WORK/kernel
mkdir -p "$KROOT"
dpkg-deb -x "$deb" "$KROOT"

vmlinuz=$(newest "$KROOT"/boot/vmlinuz-*)
[[ -n $vmlinuz ]] || { log "no /boot/vmlinuz-* in $(basename "$deb")"; exit 1; }
kver=${vmlinuz##*/vmlinuz-}
config=$KROOT/boot/config-$kver
moddir=$KROOT/lib/modules/$kver
[[ -d $moddir ]] || moddir=$KROOT/usr/lib/modules/$kver
[[ -f $config && -d $moddir ]] || { log "unexpected layout in $deb"; exit 1; }

ROOT=$WORK/root
mkdir -p "$ROOT"/{proc,sys,dev,lib/modules,tmp}
mknod -m 600 "$ROOT/dev/console" c 5 1 2>/dev/null || true
mknod -m 666 "$ROOT/dev/null" c 1 3 2>/dev/null || true

# module name -> file (names treat '-' and '_' alike)
declare -A MODFILE=()
while IFS= read -r f; do
    b=${f##*/}
    b=${b%%.ko*}
    MODFILE[${b//-/_}]=$f
done < <(find "$moddir/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')

builtin() {
    local m=$1
    [[ -f $moddir/modules.builtin ]] &&
        sed 's#.*/##; s#\.ko$##; s#-#_#g' "$moddir/modules.builtin" | grep -cx "$m" >/dev/null
}

decompress_to() { # src dst
    case $1 in
    *.ko.xz) xz -dc "$1" >"$2" ;;
    *.ko.zst) zstd -qdc "$1" >"$2" ;;
    *.ko.gz) gzip -dc "$1" >"$2" ;;
    *) cp "$1" "$2" ;;
    esac
}

ORDER=()
declare -A STATE=()
visit() { # depth-first, dependencies first
    local m=${1//-/_} d deps
    [[ -n ${STATE[$m]:-} ]] && return 0
    STATE[$m]=visiting
    if [[ -z ${MODFILE[$m]:-} ]]; then
        if builtin "$m"; then
            STATE[$m]=builtin
            return 0
        fi
        log "module $m not found in $kver"
        exit 1
    fi
    local tmp=$WORK/$m.ko
    decompress_to "${MODFILE[$m]}" "$tmp"
    deps=$(modinfo -F depends "$tmp" | tr ',' ' ')
    for d in $deps; do
        visit "$d"
    done
    mv "$tmp" "$ROOT/lib/modules/$m.ko"
    ORDER+=("$m")
    STATE[$m]="done"
}
for m in "${WANT_MODULES[@]}"; do
    visit "$m"
done
modules=$(IFS=,; echo "${ORDER[*]}")
log "modules: $modules"
for opt in CONFIG_VIRTIO CONFIG_VIRTIO_PCI CONFIG_VIRTIO_NET CONFIG_VIRTIO_BLK CONFIG_SERIAL_8250 CONFIG_DEVTMPFS; do
    log "  $(grep -E "^(# )?${opt}[= ]" "$config" || echo "$opt unknown")"
done

# ---- init ----
gcc -static -O2 -pthread -Wall -o "$ROOT/init" "$HERE/init.c"
strip "$ROOT/init" 2>/dev/null || true

# ---- outputs (atomic renames) ----
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0) |
    gzip -6 >"$WORK/initrd.img"
cp "$vmlinuz" "$WORK/vmlinuz"
# Also the uncompressed ELF kernel: QEMU boots it through its PVH entry point
# (CONFIG_PVH=y), which skips the in-guest decompression (~3.5 s under TCG).
off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | awk -F: 'NR == 1 {print $1}' || true)
if [[ -n $off ]] && grep -q '^CONFIG_PVH=y' "$config" &&
    tail -c +$((off + 1)) "$vmlinuz" >"$WORK/payload.xz" &&
    xz -dc --single-stream "$WORK/payload.xz" >"$WORK/vmlinux" 2>/dev/null &&
    [[ $(head -c 4 "$WORK/vmlinux" | od -An -tx1 | tr -d ' ') == 7f454c46 ]]; then
    mv -f "$WORK/vmlinux" "$OUT/vmlinux"
else
    log "no PVH vmlinux (not an xz bzImage or no CONFIG_PVH); use vmlinuz"
    rm -f "$WORK/vmlinux" "$OUT/vmlinux"
fi
echo "$modules" >"$WORK/modules.txt"
echo "$(basename "$deb" .deb) $kver" >"$WORK/kernel.txt"
mv -f "$WORK/vmlinuz" "$OUT/vmlinuz"
mv -f "$WORK/kernel.txt" "$OUT/kernel.txt"
mv -f "$WORK/initrd.img" "$OUT/initrd.img"
mv -f "$WORK/modules.txt" "$OUT/modules.txt"
log "built $OUT/vmlinuz $OUT/initrd.img (kernel $kver)"
