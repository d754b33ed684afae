#!/bin/bash
# End-to-end under real systemd (booted in namespaces over overlays of this
# host, see boot-ns.sh): install the qlive .deb, start a guest through socket
# activation, restart qlive.service under it, then upgrade QEMU 7.2 -> 10.0
# with dpkg as a package upgrade does. qlive's dpkg trigger must start
# qlive-upgrade.service, which moves the guest to the new QEMU with its
# heartbeat unbroken. Nothing on the host is changed: every write goes to
# the overlays in SCRATCH, which is removed at the end.
#
# usage: e2e.sh QLIVE_DEB QEMU_NEW_DEBS_DIR GUEST_DIR SCRATCH
set -euo pipefail
DEB=$(realpath "$1"); NEWDEBS=$(realpath "$2"); GUEST=$(realpath "$3"); S=$4
here=$(dirname "$(realpath "$0")")
mkdir -p "$S"; S=$(realpath "$S")
pid=""
fail() { echo "e2e: FAIL: $*" >&2; exit 1; }
step() { echo "e2e: $*"; }
# output_has PATTERN CMD...: CMD's output matches PATTERN. Capture first, then
# match: `CMD | grep -q` under pipefail fails at random (grep exits at the
# first match and CMD dies of SIGPIPE).
output_has() {
  local pat=$1 out
  shift
  out=$("$@") || return 1
  grep -q -- "$pat" <<<"$out"
}
cleanup() {
  set +e
  if [ -n "$pid" ] && [ -d "/proc/$pid" ]; then
    timeout 20 nsenter -t "$pid" -a systemctl poweroff >/dev/null 2>&1
    for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    # PID 1 of a pid namespace takes every process in it along
    [ -d "/proc/$pid" ] && kill -9 "$pid"
  fi
  [ -f "$S/unshare.pid" ] && kill -9 "$(cat "$S/unshare.pid")" 2>/dev/null
  rm -rf "$S"
}
trap cleanup EXIT

pid=$("$here/boot-ns.sh" "$S")
NS=(nsenter -t "$pid" -a)
step "systemd booted in a namespace (host pid $pid)"

"${NS[@]}" dpkg -i "$DEB" >"$S/dpkg-qlive.log" 2>&1 || fail "dpkg -i qlive: $(tail -5 "$S/dpkg-qlive.log")"
"${NS[@]}" systemctl is-active --quiet qlive.socket || fail "qlive.socket not active after install"
"${NS[@]}" systemctl is-enabled --quiet qlive.socket || fail "qlive.socket not enabled"
mode=$("${NS[@]}" stat -c '%a %U:%G' /run/qlive/qlive.sock)
[ "$mode" = "660 root:qlive" ] || fail "API socket is $mode, want 660 root:qlive"
"${NS[@]}" systemd-analyze verify /lib/systemd/system/qlive.service /lib/systemd/system/qlive.socket \
  /lib/systemd/system/qlive-upgrade.service /lib/systemd/system/qlive-metrics.service \
  /lib/systemd/system/qlive-metrics.timer || fail "systemd-analyze verify"
[ "$("${NS[@]}" dpkg-query -W -f="\${Status}" qlive)" = "install ok installed" ] || fail "qlive not installed"
"${NS[@]}" systemctl is-enabled --quiet qlive-metrics.timer || fail "qlive-metrics.timer not enabled"
"${NS[@]}" systemctl is-active --quiet qlive-metrics.timer || fail "qlive-metrics.timer not active"
step "package installed; units verified; socket 660 root:qlive; qlive-metrics.timer enabled and active"

cat >"$S/vm.json" <<JSON
{"name": "vm", "emulator": "/usr/bin/qemu-system-x86_64", "accel": "tcg", "memory_mib": 256,
 "kernel": "$GUEST/vmlinux", "initrd": "$GUEST/initrd.img",
 "cmdline": "console=ttyS0 quiet panic=-1 no_timer_check qlive.pattern_mib=16"}
JSON
"${NS[@]}" qlive define "$S/vm.json" >/dev/null
"${NS[@]}" qlive start vm >/dev/null
"${NS[@]}" systemctl is-active --quiet qlive.service || fail "socket activation did not start qlive.service"
info() { "${NS[@]}" qlive info vm --json | python3 -c "import json,sys; d=json.load(sys.stdin); print(d['$1'])"; }
# shellcheck disable=SC2016  # $2 is awk's field, not the shell's
hb() { "${NS[@]}" awk '/^HB [0-9]+$/{n=$2} END{print n+0}' /var/lib/qlive/console/vm.log; }
wait_hb_past() {
  for _ in $(seq 600); do [ "$(hb)" -gt "$1" ] && return 0; sleep 0.1; done
  fail "heartbeat did not pass $1 (at $(hb))"
}
wait_hb_past 100
pid1=$(info pid)
quser=$("${NS[@]}" ps -o user= -p "$pid1" | tr -d ' ')
[ "$quser" = qlive-qemu ] || fail "QEMU runs as $quser, want qlive-qemu"
step "guest running on QEMU $(info qemu_version), pid $pid1, heartbeat $(hb)"

"${NS[@]}" systemctl restart qlive.service
"${NS[@]}" systemctl is-active --quiet qlive.service || fail "qlive.service not active after restart"
[ "$(info pid)" = "$pid1" ] || fail "guest QEMU changed across an agent restart"
[ "$(info state)" = running ] || fail "guest not running after agent restart"
output_has "re-adopted running instance" "${NS[@]}" journalctl -u qlive.service --no-pager ||
  fail "journal lacks the re-adoption"
h=$(hb); wait_hb_past "$((h + 300))"
step "systemctl restart qlive.service: guest kept running (pid $pid1), re-adopted"

output_has "vm: current" "${NS[@]}" qlive stale || fail "guest stale before any upgrade"
step "upgrading QEMU with dpkg: $(cd "$NEWDEBS" && echo *.deb)"
"${NS[@]}" dpkg -i "$NEWDEBS"/*.deb >"$S/dpkg-qemu.log" 2>&1 || fail "dpkg -i qemu 10: $(tail -5 "$S/dpkg-qemu.log")"
grep -q "Processing triggers for qlive" "$S/dpkg-qemu.log" || fail "qlive's dpkg trigger did not fire"
for _ in $(seq 600); do
  case "$(info qemu_version)" in 10.*) break ;; esac
  sleep 0.1
done
v=$(info qemu_version)
case "$v" in 10.*) ;; *) fail "guest still on QEMU $v after the upgrade (journal: $("${NS[@]}" journalctl -u qlive-upgrade.service --no-pager | tail -5))" ;; esac
for _ in $(seq 100); do
  "${NS[@]}" systemctl is-active --quiet qlive-upgrade.service || break; sleep 0.1
done
res=$("${NS[@]}" systemctl show -p Result --value qlive-upgrade.service)
[ "$res" = success ] || fail "qlive-upgrade.service result $res"
output_has '"summary":{' "${NS[@]}" journalctl -u qlive-upgrade.service --no-pager || fail "no JSON summary in the journal"
[ "$(info pid)" != "$pid1" ] || fail "guest pid unchanged after upgrade"
output_has "vm: current (QEMU 10." "${NS[@]}" qlive stale || fail "guest still stale after upgrade"
n=$("${NS[@]}" pgrep -c qemu-system || true)
[ "$n" = 1 ] || fail "$n QEMU processes in the namespace, want 1"
h=$(hb); wait_hb_past "$((h + 300))"
"${NS[@]}" cat /var/lib/qlive/console/vm.log > "$S/console.log"
step "dpkg trigger -> qlive-upgrade.service: guest now on QEMU $v, pid $(info pid)"
echo "$S/console.log" > /dev/null
# The heartbeat check (every line HB n+1, no CORRUPT) is done by the Rust
# test on the copy printed here.
echo "CONSOLE_LOG_BEGIN"
cat "$S/console.log"
echo "CONSOLE_LOG_END"
"${NS[@]}" qlive destroy vm >/dev/null
step "PASS"
