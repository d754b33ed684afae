#!/usr/bin/env bash
# Build the qlive SELinux policy module (qlive.pp) against the reference
# policy headers of the host (Debian: selinux-policy-dev).
#
#   selinux/build.sh [OUTDIR]      default: target/selinux (in the repository)
#
# The three sources are copied to OUTDIR and built there with
#   make -f /usr/share/selinux/devel/Makefile qlive.pp
# so the source tree stays clean. Prints the path of qlive.pp on success.
# Fails on any build error, and on the m4 warnings of the reference policy
# (deprecated or misused interfaces), which make the build succeed but
# the module wrong.
#
# Needs: selinux-policy-dev (which brings make, m4, gawk, checkpolicy,
# policycoreutils-dev, ...) and semodule-utils (semodule_package).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out="${1:-$repo/target/selinux}"
devel_makefile="${QLIVE_SELINUX_DEVEL_MAKEFILE:-/usr/share/selinux/devel/Makefile}"

die() { echo "selinux/build.sh: $*" >&2; exit 1; }

[ -r "$devel_makefile" ] \
  || die "$devel_makefile not found (Debian: apt-get install selinux-policy-dev)"
for tool in make m4 gawk checkmodule semodule_package; do
  command -v "$tool" >/dev/null 2>&1 \
    || die "$tool not found (Debian: apt-get install selinux-policy-dev checkpolicy semodule-utils)"
done

mkdir -p "$out"
out="$(cd "$out" && pwd)"
case "$out" in
  "$here") die "refusing to build in the source directory $here" ;;
esac

# A clean build every time: no stale tmp/ or package from an earlier run.
rm -rf "$out/tmp" "$out/qlive.pp" "$out/build.log" "$out/build.err"
for f in qlive.te qlive.fc qlive.if; do
  cp "$here/$f" "$out/$f"
done

log="$out/build.log"
err="$out/build.err"
# NAME only names the policy in messages; set it so that the Makefile
# does not read /etc/selinux/config, which a host without SELinux lacks.
set +e
(cd "$out" && make -f "$devel_makefile" NAME=qlive qlive.pp) >"$log" 2>"$err"
rc=$?
set -e
cat "$log"

if [ "$rc" != 0 ]; then
  cat "$err" >&2
  die "policy build failed (exit $rc); logs: $log $err"
fi
# A successful build prints nothing on stderr. The reference policy
# reports deprecated or misused interfaces with m4 errprint
# ("qlive.te:NN: Warning: ...") and goes on, and so do m4 and checkmodule
# for some mistakes: any diagnostic fails the build.
if [ -s "$err" ]; then
  cat "$err" >&2
  die "policy build printed diagnostics (above), treated as errors; log: $err"
fi
[ -s "$out/qlive.pp" ] || die "no $out/qlive.pp after the build"

echo "$out/qlive.pp"
