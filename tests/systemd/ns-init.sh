#!/bin/sh
# PID 1 of the test namespace (run by boot-ns.sh under unshare): overlay the
# host's /usr, /etc and /var so package installs stay in the scratch dir,
# give the namespace its own /run, /tmp and /var/tmp (systemd-tmpfiles
# empties /tmp at boot: it must never be the host's), its own cgroup view,
# then become systemd.
set -eu
S=$1
for d in usr etc var; do
  mount -t overlay "ovl-$d" -o "lowerdir=/$d,upperdir=$S/$d/up,workdir=$S/$d/work" "/$d"
done
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
umount -l /sys/fs/cgroup 2>/dev/null || true
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo qlive-test > /etc/hostname
# no consoles or network setup to wait for in a namespace
for u in getty@.service serial-getty@.service console-getty.service systemd-networkd-wait-online.service \
         apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer man-db.timer; do
  ln -sf /dev/null "/etc/systemd/system/$u"
done
exec env container=qlive-test /lib/systemd/systemd --log-level=warning
