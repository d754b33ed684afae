#!/bin/bash
# End-to-end under real systemd (booted in namespaces over overlays of this
# host, see boot-ns.sh): install the qlive .deb, start a guest through socket
# activation, restart qlive.service under it, install a newer qlive .deb
# under it (a self-upgrade), then upgrade QEMU 7.2 -> 10.0 with dpkg as a
# package upgrade does. qlive's dpkg trigger must start
# qlive-upgrade.service, which moves the guest to the new QEMU with its
# heartbeat unbroken. Nothing on the host is changed: every write goes to
# the overlays in SCRATCH, which is removed at the end.
#
# usage: e2e.sh QLIVE_DEB QLIVE_NEXT_DEB QEMU_NEW_DEBS_DIR GUEST_DIR SCRATCH
# (QLIVE_NEXT_DEB: the same package with a higher version, make deb's
# target/debian-next/)
set -euo pipefail
DEB=$(realpath "$1"); NEXTDEB=$(realpath "$2"); NEWDEBS=$(realpath "$3"); GUEST=$(realpath "$4"); S=$5
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

# man finds the pages the package installed (man-db, the namespace's /usr),
# and renders them; bash loads the completion.
page=$("${NS[@]}" man -w qlive-upgrade) || fail "man -w qlive-upgrade"
[ "$page" = /usr/share/man/man1/qlive-upgrade.1.gz ] || fail "man -w qlive-upgrade: $page"
output_has "qlive(1)" "${NS[@]}" env MANPAGER=cat MANWIDTH=80 man qlive-upgrade ||
  fail "man qlive-upgrade renders no SEE ALSO qlive(1)"
output_has "qlive-upgrade(1)" "${NS[@]}" env MANPAGER=cat MANWIDTH=80 man qlive ||
  fail "man qlive does not list qlive-upgrade(1)"
"${NS[@]}" test -f /usr/share/bash-completion/completions/qlive || fail "no bash completion"
output_has "_qlive qlive" "${NS[@]}" bash -c '. /usr/share/bash-completion/completions/qlive && complete -p qlive' ||
  fail "the bash completion does not define completion for qlive"
step "man qlive-upgrade: $page; bash completion loads"

cat >"$S/vm.json" <<JSON
{"name": "vm", "emulator": "/usr/bin/qemu-system-x86_64", "accel": "tcg", "memory_mib": 256,
 "kernel": "$GUEST/vmlinux", "initrd": "$GUEST/initrd.img",
 "cmdline": "console=ttyS0 quiet panic=-1 no_timer_check qlive.pattern_mib=16",
 "nics": [{}]}
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
# The NIC's tap: multi-queue, steered by the agent's program (CAP_BPF and
# AF_PACKET under the unit's sandbox), set 0 receiving.
steering() { "${NS[@]}" cat /run/qlive/domains/vm/nic0.steering; }
grep -q '"set":0' <<<"$(steering)" || fail "nic0.steering at boot: $(steering)"
output_has "multi_queue" "${NS[@]}" ip -d link show || fail "no multi-queue tap: $("${NS[@]}" ip -d link show)"
step "guest running on QEMU $(info qemu_version), pid $pid1, heartbeat $(hb), tap steered to set 0"

# The metrics file for node_exporter's textfile collector: the service is
# skipped until its directory exists (ConditionPathIsDirectory=), then
# writes it under its sandbox; promtool checks it.
PROM=/var/lib/prometheus/node-exporter/qlive.prom
metrics_run() {
  "${NS[@]}" systemctl start qlive-metrics.service || fail "qlive-metrics.service failed"
  [ "$("${NS[@]}" systemctl show -p Result --value qlive-metrics.service)" = success ] ||
    fail "qlive-metrics.service result $("${NS[@]}" systemctl show -p Result --value qlive-metrics.service)"
  "${NS[@]}" cat "$PROM" >"$S/prom.txt" || fail "no $PROM"
  promtool check metrics <"$S/prom.txt" >"$S/promtool.log" 2>&1 ||
    fail "promtool check metrics: $(cat "$S/promtool.log")"
}
"${NS[@]}" mkdir -p /var/lib/prometheus/node-exporter
metrics_run
grep -qx 'qlive_domains{state="running"} 1' "$S/prom.txt" || fail "metrics: no running domain in $(cat "$S/prom.txt")"
grep -qx 'qlive_agent_up 1' "$S/prom.txt" || fail "metrics: agent not up"
step "qlive-metrics.service wrote $PROM (promtool check metrics clean)"

"${NS[@]}" systemctl restart qlive.service
"${NS[@]}" systemctl is-active --quiet qlive.service || fail "qlive.service not active after restart"
[ "$(info pid)" = "$pid1" ] || fail "guest QEMU changed across an agent restart"
[ "$(info state)" = running ] || fail "guest not running after agent restart"
output_has "re-adopted running instance" "${NS[@]}" journalctl -u qlive.service --no-pager ||
  fail "journal lacks the re-adoption"
h=$(hb); wait_hb_past "$((h + 300))"
step "systemctl restart qlive.service: guest kept running (pid $pid1), re-adopted"

# A self-upgrade: dpkg -i of a newer qlive under the running guest.
# postinst's `systemctl try-restart qlive.service` starts the new agent
# (KillMode=process: QEMU stays), which re-adopts the guest.
agent1=$("${NS[@]}" systemctl show -p MainPID --value qlive.service)
next_version=$(dpkg-deb -f "$NEXTDEB" Version)
[ "$next_version" != "$(dpkg-deb -f "$DEB" Version)" ] || fail "$NEXTDEB has the installed version"
"${NS[@]}" dpkg -i "$NEXTDEB" >"$S/dpkg-qlive-next.log" 2>&1 ||
  fail "dpkg -i qlive $next_version: $(tail -5 "$S/dpkg-qlive-next.log")"
[ "$("${NS[@]}" dpkg-query -W -f="\${Version}" qlive)" = "$next_version" ] ||
  fail "qlive $next_version not installed"
"${NS[@]}" systemctl is-active --quiet qlive.service || fail "qlive.service not active after the upgrade"
agent2=$("${NS[@]}" systemctl show -p MainPID --value qlive.service)
if [ "$agent2" = 0 ] || [ "$agent2" = "$agent1" ]; then
  fail "qlive.service not restarted by the upgrade (MainPID $agent1, now $agent2)"
fi
[ "$(info pid)" = "$pid1" ] || fail "guest QEMU changed across the qlive upgrade"
[ "$(info state)" = running ] || fail "guest not running after the qlive upgrade"
# the new agent's own journal (its pid), not the earlier agents'
readopted=""
for _ in $(seq 50); do
  if output_has "re-adopted running instance" "${NS[@]}" journalctl _PID="$agent2" --no-pager; then
    readopted=1; break
  fi
  sleep 0.1
done
[ -n "$readopted" ] || fail "the journal of the new agent (pid $agent2) lacks the re-adoption"
n=$("${NS[@]}" pgrep -c qemu-system || true)
[ "$n" = 1 ] || fail "$n QEMU processes after the qlive upgrade, want 1"
h=$(hb); wait_hb_past "$((h + 300))"
step "dpkg -i qlive $next_version: agent restarted (pid $agent1 -> $agent2), guest kept running (pid $pid1), re-adopted"

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
# The migration steered the tap to the destination's queues.
grep -q '"set":1' <<<"$(steering)" || fail "nic0.steering after the upgrade: $(steering)"
# The binary, its modules and libraries are the new ones now. The firmware
# (SeaBIOS, the option ROMs of qemu-system-data) came with the migration
# from the old QEMU: the guest runs it until a cold restart, so the domain
# is restart-required, and no longer stale.
stale_out=$("${NS[@]}" qlive stale)
grep -q "vm: RESTART REQUIRED (QEMU 10." <<<"$stale_out" || fail "after the upgrade, want restart required only: $stale_out"
grep -q "firmware replaced: .*(restart required)" <<<"$stale_out" || fail "no replaced firmware listed: $stale_out"
metrics_run
grep -qx 'qlive_upgrade_last_run_success 1' "$S/prom.txt" || fail "metrics: last upgrade run not a success"
grep -qx 'qlive_migrations_total{result="succeeded"} 1' "$S/prom.txt" || fail "metrics: the migration not counted"
grep -qx 'qlive_domain_stale{domain="vm"} 0' "$S/prom.txt" || fail "metrics: vm still stale"
grep -qx 'qlive_domain_restart_required{domain="vm"} 1' "$S/prom.txt" || fail "metrics: vm not restart-required"
step "metrics after the upgrade run: last run succeeded, 1 migration counted; vm restart-required (firmware), not stale"
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
# A cold restart loads the new firmware (after the console copy above: the
# guest's heartbeat starts again from 1).
"${NS[@]}" qlive destroy vm >/dev/null
"${NS[@]}" qlive start vm >/dev/null
output_has "vm: current (QEMU 10." "${NS[@]}" qlive stale || fail "still restart-required after a cold restart: $("${NS[@]}" qlive stale)"
step "cold restart (destroy, start): vm current on QEMU 10"
"${NS[@]}" qlive destroy vm >/dev/null
step "PASS"
