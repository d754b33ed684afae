#!/bin/bash
# Smoke check of the Debian test guest built by tests/guest/debian/build.sh:
# boot it with plain QEMU (TCG, q35, OVMF from pflash with a private copy of
# the VARS template) and check what the tests rely on.
#
# usage: tests/guest/debian/smoke.sh OUTDIR
#
# Run 1, Debian's QEMU 7.2 ($QEMU), with -fw_cfg opt/qlive/ip=10.0.0.7/24 and
# opt/qlive/efivar=<value>:
#   - QLIVE-GUEST-READY boot=1 with that address, guest agent up, no error line
#   - guest-ping and guest-get-osinfo on the guest-agent socket (round trip)
#   - the TCP stream service (user-mode hostfwd): correct bytes, ~100 KB/s
#   - the EFI variable: none at first, then written
#   - guest reboot (guest-shutdown mode=reboot): boot 2 reads the variable back
#   - clean poweroff (guest-shutdown): QLIVE-GUEST-POWEROFF, QEMU exits
#   - the VARS copy holds the variable; e2fsck -fn of the root partition clean
# Run 2, QEMU 10.0 ($QEMU_NEW, skipped if absent), same disk and VARS copy,
# no fw_cfg: the default address 10.0.0.2/24, the variable still there (a new
# QEMU process, another version), agent, stream, poweroff, e2fsck.
#
# Environment: QEMU (default /usr/bin/qemu-system-x86_64), QEMU_NEW (default
# target/qemu-new/bin/qemu-system-x86_64 of this checkout), SMOKE_SMP (vCPUs,
# default 1), SMOKE_MEM (MiB, default 1024), SMOKE_TIMEOUT (seconds to wait for
# each boot, default 300), SMOKE_KEEP=1 keeps the scratch directory.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
OUT=$(cd "$1" && pwd)
QEMU=${QEMU:-/usr/bin/qemu-system-x86_64}
QEMU_NEW=${QEMU_NEW:-$REPO/target/qemu-new/bin/qemu-system-x86_64}
SMP=${SMOKE_SMP:-1}
MEM=${SMOKE_MEM:-1024}
TIMEOUT=${SMOKE_TIMEOUT:-300}

log() { echo "smoke: $*" >&2; }
die() {
    log "FAIL: $*"
    if [[ -n ${CONSOLE:-} && -f $CONSOLE ]]; then
        log "console tail:"
        tail -n 25 "$CONSOLE" | tr -d '\r' >&2
    fi
    exit 1
}

[[ -f $OUT/disk.env && -f $OUT/disk.raw ]] || die "no image in $OUT: run tests/guest/debian/build.sh $OUT"
# shellcheck source=/dev/null  # written by build.sh
. "$OUT/disk.env"
[[ -x $QEMU ]] || die "no QEMU at $QEMU"

S=$(mktemp -d /tmp/qlive-smoke.XXXXXX)
QPID=""
cleanup() {
    if [[ -n $QPID ]] && kill -0 "$QPID" 2>/dev/null; then
        kill "$QPID" 2>/dev/null || true
        wait "$QPID" 2>/dev/null || true
    fi
    if [[ ${SMOKE_KEEP:-0} == 1 ]]; then
        log "scratch kept: $S"
    else
        rm -rf "$S"
    fi
}
trap cleanup EXIT

# ---- helpers in Python (guest agent protocol, stream check, VARS check) ----
cat >"$S/helper.py" <<'EOF'
import base64, json, socket, statistics, struct, sys, time

def qga_conn(path, timeout=30):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    f = s.makefile("rwb")
    # guest-sync-delimited: flush stale input; the reply follows a 0xFF byte.
    sid = int(time.time() * 1000) % 100000000
    f.write(json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": sid}}).encode() + b"\n")
    f.flush()
    while f.read(1) != b"\xff":
        pass
    while json.loads(f.readline()).get("return") != sid:
        pass
    return s, f

def call(f, cmd, args=None):
    m = {"execute": cmd}
    if args is not None:
        m["arguments"] = args
    f.write(json.dumps(m).encode() + b"\n")
    f.flush()
    r = json.loads(f.readline())
    if "error" in r:
        raise SystemExit(f"{cmd}: {r['error']}")
    return r["return"]

def main():
    op, args = sys.argv[1], sys.argv[2:]
    if op == "free-port":
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])
    elif op == "qga":                      # SOCK CMD [JSON-ARGS]
        s, f = qga_conn(args[0])
        print(json.dumps(call(f, args[1], json.loads(args[2]) if len(args) > 2 else None)))
    elif op == "osinfo":                   # SOCK: guest-get-osinfo must say Debian 12
        s, f = qga_conn(args[0])
        os = call(f, "guest-get-osinfo")
        if os.get("id") != "debian" or os.get("version-id") != "12":
            raise SystemExit(f"guest-get-osinfo: not Debian 12: {os}")
        print(f"{os.get('pretty-name')}, kernel {os.get('kernel-release')}")
    elif op == "qga-rtt":                  # SOCK N: guest-ping round trips, ms
        s, f = qga_conn(args[0])
        rtt = []
        for _ in range(int(args[1])):
            t = time.monotonic()
            call(f, "guest-ping")
            rtt.append((time.monotonic() - t) * 1000)
        print(f"median {statistics.median(rtt):.1f} ms, max {max(rtt):.1f} ms over {len(rtt)}")
    elif op == "qga-send":                 # SOCK CMD JSON-ARGS: no reply expected
        s, f = qga_conn(args[0])
        f.write(json.dumps({"execute": args[1], "arguments": json.loads(args[2])}).encode() + b"\n")
        f.flush()
    elif op == "qga-exec":                 # SOCK PROG ARGS...: print its stdout
        s, f = qga_conn(args[0])
        pid = call(f, "guest-exec", {"path": args[1], "arg": args[2:], "capture-output": True})["pid"]
        while True:
            st = call(f, "guest-exec-status", {"pid": pid})
            if st["exited"]:
                break
            time.sleep(0.2)
        sys.stdout.write(base64.b64decode(st.get("out-data", "")).decode(errors="replace"))
        sys.exit(st.get("exitcode", 1))
    elif op == "stream":                   # PORT SECONDS RATE
        port, secs, rate = int(args[0]), float(args[1]), int(args[2])
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        got = bytearray()
        t0 = None
        end = None
        while end is None or time.monotonic() < end:
            b = s.recv(65536)
            if not b:
                raise SystemExit(f"stream closed by the guest after {len(got)} bytes")
            if t0 is None:
                t0 = time.monotonic()
                end = t0 + secs
            got += b
        el = time.monotonic() - t0
        s.close()
        n = len(got)
        want = b"".join(struct.pack("<Q", i) for i in range(n // 8 + 1))[:n]
        if got != want:
            bad = next(i for i in range(n) if got[i] != want[i])
            raise SystemExit(f"stream: wrong byte at offset {bad}: {got[bad]:#x}, want {want[bad]:#x}")
        # the first chunk arrives at t0; the others pace the rest
        per_s = (n - rate / 100) / el
        print(f"{n} bytes in {el:.2f} s, {per_s / 1000:.1f} KB/s, pattern ok")
        if not 0.8 * rate <= per_s <= 1.2 * rate:
            raise SystemExit(f"stream: rate {per_s:.0f} B/s, want {rate} +-20%")
    elif op == "vars-has":                 # FILE NAME VALUE
        data = open(args[0], "rb").read()
        name, value = args[1].encode("utf-16-le"), args[2].encode()
        i = data.find(name)
        if i < 0 or data.find(value, i) < 0:
            raise SystemExit(f"{args[0]}: no variable {args[1]} = {args[2]}")
        print(f"{args[1]} = {args[2]} at offset {i:#x}")
    else:
        raise SystemExit(f"unknown op {op}")

main()
EOF
py() { python3 "$S/helper.py" "$@"; }

# ---- one QEMU run ----
CONSOLE=""
QGA=""
PORT=""
T0=0
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }

# start_qemu NAME BINARY GUEST_IP [QEMU ARGS...]
start_qemu() {
    local name=$1 bin=$2 ip=$3
    shift 3
    CONSOLE=$S/$name.console.log
    QGA=$S/$name.qga.sock
    PORT=$(py free-port)
    : >"$CONSOLE"
    T0=$(now)
    "$bin" -accel tcg -machine q35 -smp "$SMP" -m "$MEM" -nodefaults -display none -no-user-config \
        -drive if=pflash,format=raw,unit=0,readonly=on,file="$QLIVE_DEBIAN_OVMF_CODE" \
        -drive if=pflash,format=raw,unit=1,file="$S/vars.fd" \
        -drive file="$S/disk.raw",format=raw,if=none,id=d0 \
        -device virtio-blk-pci,drive=d0,bootindex=0 \
        -netdev "user,id=n0,net=10.0.0.0/24,host=$QLIVE_DEBIAN_HOST_IP,restrict=on,hostfwd=tcp:127.0.0.1:$PORT-${ip%/*}:$QLIVE_DEBIAN_STREAM_PORT" \
        -device virtio-net-pci,netdev=n0,romfile= \
        -chardev socket,id=qga0,path="$QGA",server=on,wait=off \
        -device virtio-serial-pci -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \
        -serial file:"$CONSOLE" "$@" >"$S/$name.qemu.log" 2>&1 &
    QPID=$!
}

# Count console lines starting with $1.
count() {
    local text
    text=$(tr -d '\r' <"$CONSOLE")
    grep -c -- "^$1" <<<"$text" || true
}

# wait_line PREFIX N: wait until N lines start with PREFIX; print the last.
wait_line() {
    local prefix=$1 n=$2 deadline text
    deadline=$((SECONDS + TIMEOUT))
    while (($(count "$prefix") < n)); do
        kill -0 "$QPID" 2>/dev/null || die "QEMU exited waiting for '$prefix' #$n: $(tail -n 5 "${CONSOLE%.console.log}.qemu.log")"
        ((SECONDS < deadline)) || die "no '$prefix' #$n within $TIMEOUT s"
        sleep 0.1
    done
    text=$(tr -d '\r' <"$CONSOLE")
    grep -- "^$prefix" <<<"$text" | tail -n 1
}

no_errors() {
    local n
    n=$(count QLIVE-GUEST-ERROR)
    ((n == 0)) || die "error lines on the console: $(tr -d '\r' <"$CONSOLE" | grep '^QLIVE-GUEST-ERROR')"
}

wait_exit() {
    local deadline=$((SECONDS + 120))
    while kill -0 "$QPID" 2>/dev/null; do
        ((SECONDS < deadline)) || die "QEMU still running 120 s after the poweroff request"
        sleep 0.2
    done
    wait "$QPID" || die "QEMU exited with status $?"
    QPID=""
}

field() { # field LINE KEY
    local w
    for w in $1; do
        if [[ $w == "$2="* ]]; then
            printf '%s' "${w#*=}"
            return
        fi
    done
}

check_agent() {
    local os
    py qga "$QGA" guest-ping >/dev/null || die "guest-ping"
    os=$(py osinfo "$QGA") || die "guest-get-osinfo"
    log "  guest-get-osinfo: $os"
    RTT=$(py qga-rtt "$QGA" 20) || die "guest-ping round trips"
    log "  guest-agent round trip (guest-ping): $RTT"
}

check_fsck() {
    local out
    out=$(e2fsck -fn "$S/disk.raw?offset=$QLIVE_DEBIAN_ROOT_OFFSET" 2>&1) || die "e2fsck -fn on the root partition: $out"
    log "  e2fsck -fn root partition: clean ($(tail -n 1 <<<"$out"))"
}

cp --sparse=always "$OUT/disk.raw" "$S/disk.raw"
cp "$QLIVE_DEBIAN_OVMF_VARS" "$S/vars.fd"
VALUE=smoke-$(date +%s)
SUMMARY=()

# ---- run 1: QEMU 7.2 ----
ver=$("$QEMU" -version)
ver=${ver%%$'\n'*}
log "run 1: $ver, $SMP vCPU, $MEM MiB, fw_cfg ip=10.0.0.7/24 efivar=$VALUE"
start_qemu run1 "$QEMU" 10.0.0.7/24 \
    -fw_cfg name=opt/qlive/ip,string=10.0.0.7/24 -fw_cfg name=opt/qlive/efivar,string="$VALUE"
wait_line "BdsDxe: starting" 1 >/dev/null
t_fw=$(since "$T0")
ready=$(wait_line QLIVE-GUEST-READY 1)
t_ready=$(since "$T0")
log "  $ready"
log "  boot to ready: $t_ready s (firmware to the loader: $t_fw s)"
SUMMARY+=("QEMU 7.2, $SMP vCPU: boot to QLIVE-GUEST-READY $t_ready s (OVMF to the loader $t_fw s)")
no_errors
[[ $(field "$ready" boot) == 1 && $(field "$ready" ip) == 10.0.0.7/24 && $(field "$ready" qga) == 1 ]] ||
    die "unexpected ready line: $ready"
[[ $(count "QLIVE-EFIVAR none") == 1 && $(count "QLIVE-EFIVAR-WRITTEN value=$VALUE") == 1 ]] ||
    die "EFI variable not reported absent, then written"
check_agent
SUMMARY+=("QEMU 7.2: guest agent round trip $RTT")
analyze=$(py qga-exec "$QGA" /usr/bin/systemd-analyze) || die "guest-exec systemd-analyze"
log "  in the guest: ${analyze%%$'\n'*}"
st=$(py stream "$PORT" 5 "$QLIVE_DEBIAN_STREAM_RATE") || die "stream check"
log "  stream: $st"

log "  reboot (guest-shutdown mode=reboot)"
t=$(now)
py qga-send "$QGA" guest-shutdown '{"mode": "reboot"}'
wait_line QLIVE-GUEST-REBOOT 1 >/dev/null
t_down=$(since "$t")
ready=$(wait_line QLIVE-GUEST-READY 2)
log "  $ready"
log "  reboot request to ready: $(since "$t") s (shutdown $t_down s)"
no_errors
[[ $(field "$ready" boot) == 2 ]] || die "unexpected ready line after reboot: $ready"
[[ $(count "QLIVE-EFIVAR value=$VALUE") == 1 && $(count "QLIVE-EFIVAR-WRITTEN") == 1 ]] ||
    die "the EFI variable did not survive the guest reboot"
log "  EFI variable $QLIVE_DEBIAN_EFIVAR = $VALUE survived the reboot"

log "  poweroff (guest-shutdown)"
t=$(now)
py qga-send "$QGA" guest-shutdown '{"mode": "powerdown"}'
wait_exit
log "  QEMU exited $(since "$t") s after the request"
[[ $(count QLIVE-GUEST-POWEROFF) == 1 ]] || die "no QLIVE-GUEST-POWEROFF: not a clean shutdown"
py vars-has "$S/vars.fd" QliveTest "$VALUE" >/dev/null || die "the VARS copy does not hold QliveTest=$VALUE"
log "  VARS copy holds QliveTest = $VALUE"
check_fsck

# ---- run 2: QEMU 10.0, same disk and VARS ----
if [[ -x $QEMU_NEW ]]; then
    ver=$("$QEMU_NEW" -version)
    ver=${ver%%$'\n'*}
    log "run 2: $ver, same disk and VARS, no fw_cfg (default address)"
    start_qemu run2 "$QEMU_NEW" "$QLIVE_DEBIAN_GUEST_IP"
    wait_line "BdsDxe: starting" 1 >/dev/null
    t_fw=$(since "$T0")
    ready=$(wait_line QLIVE-GUEST-READY 1)
    t_ready=$(since "$T0")
    log "  $ready"
    log "  boot to ready: $t_ready s (firmware to the loader: $t_fw s)"
    SUMMARY+=("QEMU 10.0, $SMP vCPU: boot to QLIVE-GUEST-READY $t_ready s (OVMF to the loader $t_fw s)")
    no_errors
    [[ $(field "$ready" boot) == 3 && $(field "$ready" ip) == "$QLIVE_DEBIAN_GUEST_IP" && $(field "$ready" qga) == 1 ]] ||
        die "unexpected ready line: $ready"
    [[ $(count "QLIVE-EFIVAR value=$VALUE") == 1 && $(count "QLIVE-EFIVAR-WRITTEN") == 0 ]] ||
        die "the EFI variable did not survive into a new QEMU process"
    log "  EFI variable still $VALUE in a new QEMU process"
    check_agent
    SUMMARY+=("QEMU 10.0: guest agent round trip $RTT")
    st=$(py stream "$PORT" 3 "$QLIVE_DEBIAN_STREAM_RATE") || die "stream check"
    log "  stream: $st"
    py qga-send "$QGA" guest-shutdown '{"mode": "powerdown"}'
    wait_exit
    [[ $(count QLIVE-GUEST-POWEROFF) == 1 ]] || die "no QLIVE-GUEST-POWEROFF: not a clean shutdown"
    log "  clean poweroff"
    check_fsck
else
    log "run 2: SKIPPED, no QEMU 10.0 at $QEMU_NEW (make qemu-new, or set QEMU_NEW)"
    SUMMARY+=("QEMU 10.0: skipped (not found)")
fi

log "PASS"
for l in "${SUMMARY[@]}"; do
    log "  $l"
done
