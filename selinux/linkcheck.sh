#!/usr/bin/env bash
# Link the built qlive.pp with the distribution's whole reference policy
# and expand the result, as semodule would when installing it:
#
#   selinux/linkcheck.sh [OUTDIR]       default: target/selinux
#
# build.sh only compiles the module against the interface headers, which
# cannot tell whether every type, attribute and role the module requires
# exists in the real policy, nor whether a rule breaks one of the
# policy's neverallow assertions. This does: semodule_link fails on an
# unsatisfied require, semodule_expand on a broken assertion.
#
# The policy modules come from /usr/share/selinux/default when
# selinux-policy-default is installed; otherwise the package is fetched
# with `apt-get download` and unpacked under OUTDIR (nothing installed).
# Runs build.sh first. Needs semodule-utils (semodule_link,
# semodule_expand) and bzip2. Takes about 30 s of CPU.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out="${1:-$repo/target/selinux}"

die() { echo "selinux/linkcheck.sh: $*" >&2; exit 1; }
for tool in semodule_link semodule_expand bunzip2 dpkg-deb; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (Debian: apt-get install semodule-utils bzip2)"
done

pp="$("$here/build.sh" "$out" | tail -n 1)"
[ -s "$pp" ] || die "build.sh did not produce qlive.pp"
out="$(dirname "$pp")"
work="$out/linkcheck"
rm -rf "$work"
mkdir -p "$work/modules"

src=/usr/share/selinux/default
if ! ls "$src"/base.pp* >/dev/null 2>&1; then
  echo "linkcheck: $src has no base policy; fetching selinux-policy-default"
  mkdir -p "$work/deb"
  (cd "$work/deb" && apt-get download -q -o APT::Sandbox::User=root selinux-policy-default) \
    || die "apt-get download selinux-policy-default failed (run apt-get update?)"
  dpkg-deb -x "$work"/deb/selinux-policy-default_*.deb "$work/root"
  src="$work/root/usr/share/selinux/default"
  ls "$src"/base.pp* >/dev/null 2>&1 || die "no base.pp in the selinux-policy-default package"
fi

for m in "$src"/*.pp "$src"/*.pp.bz2; do
  [ -e "$m" ] || continue
  name="$(basename "$m" .bz2)"
  [ "$name" = qlive.pp ] && continue
  case "$m" in
    *.bz2) bunzip2 -c "$m" >"$work/modules/$name" ;;
    *) cp "$m" "$work/modules/$name" ;;
  esac
done
[ -s "$work/modules/base.pp" ] || die "no base.pp among the modules of $src"
n="$(find "$work/modules" -name '*.pp' | wc -l)"

echo "linkcheck: linking qlive.pp with $n modules from $src"
others=()
while IFS= read -r f; do others+=("$f"); done \
  < <(find "$work/modules" -name '*.pp' ! -name base.pp | LC_ALL=C sort)
semodule_link -o "$work/linked.pp" "$work/modules/base.pp" "${others[@]}" "$pp" \
  >"$work/link.log" 2>&1 || { grep -v 'loading package' "$work/link.log" >&2; die "semodule_link failed"; }
echo "linkcheck: expanding (checks every neverallow)"
semodule_expand "$work/linked.pp" "$work/policy.bin" >"$work/expand.log" 2>&1 \
  || { cat "$work/expand.log" >&2; die "semodule_expand failed"; }
rm -rf "$work/modules" "$work/linked.pp" "$work/root" "$work/deb"
echo "linkcheck: ok ($work/policy.bin)"
