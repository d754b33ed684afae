#!/bin/bash
# boot-ns.sh SCRATCH: boot real systemd as PID 1 in private pid/mount/uts/
# ipc/net/cgroup namespaces over overlays of the host (see ns-init.sh).
# Prints the host PID of the namespace's systemd once it reports
# running/degraded. SCRATCH must not be under /tmp.
set -euo pipefail
S=$(realpath "$1")
case "$S" in /tmp/*|/var/tmp/*|/run/*) echo "boot-ns: scratch must not be under /tmp, /var/tmp or /run" >&2; exit 2 ;; esac
for d in usr etc var; do mkdir -p "$S/$d/up" "$S/$d/work"; done
here=$(dirname "$(realpath "$0")")
unshare --pid --fork --mount --mount-proc --uts --ipc --net --cgroup --propagation private \
  "$here/ns-init.sh" "$S" >"$S/boot.log" 2>&1 &
echo $! >"$S/unshare.pid"
pid=""
for _ in $(seq 100); do
  pid=$(pgrep -P "$(cat "$S/unshare.pid")" 2>/dev/null | sed -n 1p || true)
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = systemd ] && break
  sleep 0.1
done
[ -n "$pid" ] || { echo "boot-ns: systemd did not start: $(cat "$S/boot.log")" >&2; exit 1; }
echo "$pid" >"$S/systemd.pid"
for _ in $(seq 300); do
  nsenter -t "$pid" -a test -S /run/systemd/private 2>/dev/null && break
  sleep 0.1
done
state=$(timeout 120 nsenter -t "$pid" -a systemctl is-system-running --wait 2>/dev/null || true)
case "$state" in
  running|degraded) echo "$pid" ;;
  *) echo "boot-ns: systemd state '$state'" >&2
     nsenter -t "$pid" -a systemctl --failed --no-legend >&2 || true
     exit 1 ;;
esac
