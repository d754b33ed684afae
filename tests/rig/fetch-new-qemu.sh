#!/usr/bin/env bash
# fetch-new-qemu.sh OUTDIR
#
# Provides the "new" hypervisor for qlive's upgrade tests: QEMU 10.x from Debian's
# bookworm-backports suite, unpacked under OUTDIR without installing it system-wide
# (the system's qemu-system-x86 7.2 stays /usr/bin/qemu-system-x86_64).
#
#   OUTDIR/root/...                    the unpacked packages (dpkg-deb -x)
#   OUTDIR/bin/qemu-system-x86_64      wrapper that runs it with its own firmware and modules
#   OUTDIR/VERSION                     the Debian version that was unpacked
#   OUTDIR/debs/*.deb                  the packages themselves (the systemd end-to-end
#                                      test installs them as a real QEMU upgrade)
#
# Steps: enable bookworm-backports (a sources.list.d entry on the same mirror as the
# machine's existing Debian sources) if no source has it yet; apt-get update;
# apt-get download qemu-system-x86, qemu-system-common, qemu-system-data and the
# firmware (seabios from backports, qemu 10 requires >= 1.16.3; ipxe-qemu); install from
# plain bookworm any shared library the binary needs that the machine lacks; unpack;
# write the wrapper; check that it prints a 10.x version, knows pc-q35-7.2 and answers QMP.
#
# Idempotent: exits 0 at once when OUTDIR/bin/qemu-system-x86_64 already runs and
# reports a matching version. Needs root (apt). Environment:
#   QEMU_NEW_PREFIX   Debian version prefix to accept (default "1:10.")
#   QLIVE_APT_LOCK_TIMEOUT  seconds to wait for the dpkg lock (default 900)
set -euo pipefail

die() { echo "fetch-new-qemu: $*" >&2; exit 1; }
log() { echo "fetch-new-qemu: $*" >&2; }

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
OUTDIR=$(realpath -m -- "$1")
PREFIX=${QEMU_NEW_PREFIX:-1:10.}
LOCK_TIMEOUT=${QLIVE_APT_LOCK_TIMEOUT:-900}
APT=(apt-get -o "DPkg::Lock::Timeout=$LOCK_TIMEOUT" -o "Acquire::Retries=3")
WRAPPER=$OUTDIR/bin/qemu-system-x86_64
UPSTREAM_MAJOR=$(printf '%s' "${PREFIX#*:}" | cut -d. -f1)

# ---- already there? -------------------------------------------------------------
works() {
    [ -x "$WRAPPER" ] || return 1
    ls "$OUTDIR"/debs/qemu-system-x86_*.deb >/dev/null 2>&1 || return 1
    local v
    v=$(timeout 30 "$WRAPPER" -version 2>/dev/null) || return 1
    v=${v%%$'\n'*}
    case "$v" in
        "QEMU emulator version $UPSTREAM_MAJOR."*) v_ok=$v; return 0 ;;
        *) return 1 ;;
    esac
}
if works; then
    log "already present: $v_ok"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "needs root (apt-get update, apt-get install of missing libraries)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (Debian only)"

# ---- enable bookworm-backports --------------------------------------------------
# shellcheck source=/dev/null  # the host's file, not part of the repository
. /etc/os-release
CODENAME=${VERSION_CODENAME:-bookworm}
BPO_SUITE=$CODENAME-backports

# shellcheck source=tests/rig/apt-mirror.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt-mirror.sh"

has_backports() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        grep -Eq "^[^#]*(^|[[:space:]])$BPO_SUITE([[:space:]]|$)" "$f" && return 0
    done
    return 1
}

if has_backports; then
    log "$BPO_SUITE already enabled"
else
    line=$(find_mirror "$CODENAME")
    MIRROR=${line%%$'\t'*}
    SIGNED_BY=${line#*$'\t'}
    [ -n "$line" ] || { MIRROR=http://deb.debian.org/debian; SIGNED_BY=; }
    [ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
    SRC=/etc/apt/sources.list.d/qlive-test-backports.sources
    log "enabling $BPO_SUITE from $MIRROR in $SRC"
    {
        echo "# Added by qlive tests/rig/fetch-new-qemu.sh: source of the newer QEMU for upgrade tests."
        echo "# Backports are pinned at priority 100, so nothing is upgraded from here unless asked."
        echo "Types: deb"
        echo "URIs: $MIRROR"
        echo "Suites: $BPO_SUITE"
        echo "Components: main"
        [ -z "$SIGNED_BY" ] || echo "Signed-By: $SIGNED_BY"
    } > "$SRC.tmp"
    mv "$SRC.tmp" "$SRC"
fi

apt_update() {
    local i
    for i in 1 2 3 4 5; do
        "${APT[@]}" -q update >&2 && return 0
        log "apt-get update failed (try $i), retrying in 20s"
        sleep 20
    done
    die "apt-get update failed"
}
apt_update

# Version of PACKAGE in the backports suite ("" if none). (No early exit in a
# pipeline: with pipefail a SIGPIPE in the writer would abort the script.)
bpo_version() {
    local m
    m=$(apt-cache madison "$1" 2>/dev/null) || true
    awk -F'|' -v s="$BPO_SUITE/" '
        !done && index($3, s) { gsub(/[[:space:]]/, "", $2); print $2; done = 1 }' <<<"$m"
}

VERSION=$(bpo_version qemu-system-x86)
[ -n "$VERSION" ] || die "no qemu-system-x86 in $BPO_SUITE"
case "$VERSION" in
    "$PREFIX"*) ;;
    *) die "$BPO_SUITE has qemu-system-x86 $VERSION, wanted $PREFIX* (set QEMU_NEW_PREFIX)" ;;
esac
log "backports QEMU version: $VERSION"

# ---- download ---------------------------------------------------------------------
DL=$(mktemp -d /tmp/qlive-fetch-qemu.XXXXXX)
trap 'rm -rf "$DL"' EXIT
chmod 755 "$DL"
id _apt >/dev/null 2>&1 && chown _apt "$DL"   # lets apt download sandboxed (no warning)

PKGS=("qemu-system-x86=$VERSION" "qemu-system-common=$VERSION" "qemu-system-data=$VERSION")
# Firmware: prefer the backports build (qemu 10 Depends: seabios (>> 1.16.3-1~), bookworm has 1.16.2).
for fw in seabios ipxe-qemu; do
    v=$(bpo_version "$fw")
    if [ -n "$v" ]; then PKGS+=("$fw=$v"); else PKGS+=("$fw"); fi
done
log "downloading: ${PKGS[*]}"
(cd "$DL" && "${APT[@]}" -q download "${PKGS[@]}" >&2) || die "apt-get download failed"

# ---- shared libraries from plain bookworm ---------------------------------------------
# The backports build links against bookworm's libraries; install those that are missing.
deps_of() {
    local info
    info=$(apt-cache show "$1=$VERSION") || die "apt-cache show $1=$VERSION failed"
    awk '/^Depends:/ && !done { sub(/^Depends:[[:space:]]*/, ""); print; done = 1 }' <<<"$info" |
        tr ',' '\n' | sed -E 's/\(.*\)//; s/\|.*//; s/:any//; s/[[:space:]]//g' | { grep -v '^$' || true; }
}
missing=()
for p in $( (deps_of qemu-system-x86; deps_of qemu-system-common) | sort -u); do
    case "$p" in qemu-*|seabios|ipxe-qemu) continue ;; esac
    st=$(dpkg-query -W -f '${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$st" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing missing libraries from $CODENAME: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive "${APT[@]}" -q install -y --no-install-recommends "${missing[@]}" >&2 ||
        die "apt-get install of libraries failed"
fi

# ---- unpack -------------------------------------------------------------------------
mkdir -p "$OUTDIR"
rm -rf "$OUTDIR/root.new"
mkdir -p "$OUTDIR/root.new"
for deb in "$DL"/*.deb; do
    dpkg-deb -x "$deb" "$OUTDIR/root.new"
done
R=$OUTDIR/root
BINARY=$R/usr/bin/qemu-system-x86_64
libs=$(ldd "$OUTDIR/root.new/usr/bin/qemu-system-x86_64") || die "ldd failed"
if grep -q 'not found' <<<"$libs"; then
    grep 'not found' <<<"$libs" >&2
    die "unresolved shared libraries (see above)"
fi
rm -rf "$OUTDIR/root.old"
[ ! -e "$R" ] || mv "$R" "$OUTDIR/root.old"
mv "$OUTDIR/root.new" "$R"
rm -rf "$OUTDIR/root.old"
rm -rf "$OUTDIR/debs"
mkdir -p "$OUTDIR/debs"
cp "$DL"/*.deb "$OUTDIR/debs/"

# ---- wrapper -------------------------------------------------------------------------
# -L order = search order: the unpacked data, then backports SeaBIOS, then iPXE ROMs.
# QEMU_MODULE_DIR keeps it from loading the system 7.2's modules (a version mismatch).
mkdir -p "$OUTDIR/bin"
cat > "$WRAPPER.tmp" <<EOF
#!/bin/sh
# Generated by qlive tests/rig/fetch-new-qemu.sh: QEMU $VERSION from $BPO_SUITE,
# unpacked (not installed) under $R. exec keeps the PID: it is QEMU's own.
QEMU_MODULE_DIR='$R/usr/lib/x86_64-linux-gnu/qemu'
export QEMU_MODULE_DIR
exec '$BINARY' -L '$R/usr/share/qemu' -L '$R/usr/share/seabios' -L '$R/usr/lib/ipxe/qemu' "\$@"
EOF
chmod 755 "$WRAPPER.tmp"
mv "$WRAPPER.tmp" "$WRAPPER"
echo "$VERSION" > "$OUTDIR/VERSION"

# ---- verify ----------------------------------------------------------------------------
ver=$("$WRAPPER" -version) || die "$WRAPPER -version failed"
ver=${ver%%$'\n'*}
log "$ver"
case "$ver" in "QEMU emulator version $UPSTREAM_MAJOR."*) ;; *) die "unexpected version: $ver" ;; esac
machines=$("$WRAPPER" -machine help) || die "$WRAPPER -machine help failed"
grep -q '^pc-q35-7\.2 ' <<<"$machines" || die "pc-q35-7.2 missing from -machine help"

qmp_out=$(printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"query-version"}' '{"execute":"quit"}' |
    timeout 60 "$WRAPPER" -machine pc-q35-7.2 -accel tcg -m 128M -S -nodefaults -display none -qmp stdio 2>&1) ||
    die "QMP smoke test failed: $qmp_out"
grep -q '"QMP"' <<<"$qmp_out" || die "no QMP greeting: $qmp_out"
grep -q "\"major\": $UPSTREAM_MAJOR" <<<"$qmp_out" || die "query-version did not answer $UPSTREAM_MAJOR.x: $qmp_out"
log "ok: $WRAPPER (Debian $VERSION)"
