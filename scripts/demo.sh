#!/usr/bin/env bash
# The demo: a private qlive agent boots the demo guest (1 GiB, the project's
# test guest with its millisecond heartbeat) on Debian's QEMU 7.2, then
# live-upgrades it to QEMU 10.0 and prints the pause the guest showed.
# Run through `make demo`, which builds qlive, the guest and fetches the
# newer QEMU first.
set -euo pipefail
cd "$(dirname "$0")/.."

QLIVE=${QLIVE:-target/release/qlive}
HBGAP=${HBGAP:-target/release/examples/hbgap}
NEW_QEMU=${NEW_QEMU:-$PWD/target/qemu-new/bin/qemu-system-x86_64}
GUEST=${GUEST_DIR:-target/guest}
base=$(mktemp -d /tmp/qlive-demo.XXXXXX)
export QLIVE_STATE_DIR=$base/state QLIVE_RUN_DIR=$base/run QLIVE_SOCKET=$base/run/qlive.sock
export QLIVE_HOOKS_DIR=$base/hooks
agent_pid=""

cleanup() {
  set +e
  "$QLIVE" destroy demo >/dev/null 2>&1
  [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
  rm -rf "$base"
}
trap cleanup EXIT

"$QLIVE" agent >"$base/agent.log" 2>&1 &
agent_pid=$!
for _ in $(seq 100); do "$QLIVE" list >/dev/null 2>&1 && break; sleep 0.1; done

cat >"$base/demo.json" <<JSON
{
  "name": "demo",
  "emulator": "/usr/bin/qemu-system-x86_64",
  "accel": "auto",
  "memory_mib": 1024,
  "kernel": "$PWD/$GUEST/vmlinux",
  "initrd": "$PWD/$GUEST/initrd.img",
  "cmdline": "console=ttyS0 quiet panic=-1 no_timer_check qlive.pattern_mib=64"
}
JSON

echo "== qlive define + start"
"$QLIVE" define "$base/demo.json"
t0=$(date +%s%N)
"$QLIVE" start demo
log=$QLIVE_STATE_DIR/console/demo.log
until grep -q '^HB ' "$log" 2>/dev/null; do
  sleep 0.05
  if (( ($(date +%s%N) - t0) > 120000000000 )); then echo "no heartbeat after 120 s" >&2; exit 1; fi
done
t1=$(date +%s%N)
echo "first heartbeat $(( (t1 - t0) / 1000000 )) ms after 'qlive start'"
sleep 2
"$QLIVE" info demo | sed -n '1,9p'

echo
echo "== live upgrade: $("$QLIVE" info demo --json | grep -o '"qemu_version": *"[^"]*"') -> $("$NEW_QEMU" -version | sed -n 1p)"
"$HBGAP" "$log" -- "$QLIVE" migrate demo --emulator "$NEW_QEMU"
sleep 1
"$QLIVE" info demo | sed -n '1,9p'
echo "== console (last lines)"
tail -n 3 "$log"
if grep -q CORRUPT "$log"; then echo "guest reported CORRUPT memory" >&2; exit 1; fi
if awk '/^HB [0-9]+$/{ if (p && $2 != p + 1) bad = 1; p = $2 } END { exit !bad }' "$log"; then
  echo "heartbeat sequence broken" >&2; exit 1
fi
echo "== done: the guest kept running across the hypervisor upgrade; cleaning up"
