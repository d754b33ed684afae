#!/usr/bin/env bash
# Build the qlive RPM from packaging/rpm/qlive.spec with Debian's rpmbuild
# (package rpm): `make rpm`.
#
#   packaging/rpm/build.sh [OUTDIR]      default: target/rpm (in the repository)
#
# Source0 is a tarball of the files git tracks, as they are in the work
# tree (git ls-files). In CI's clean clone that is exactly HEAD; during
# development it carries uncommitted edits of tracked files, so the RPM is
# built from the same sources as the .deb next to it (a new file must be
# `git add`ed, or `git add -N`, to be included).
#
# Where this differs from a distribution build, and why:
#  - Debian's rpm has no systemd-rpm-macros and an empty rpmdb: rpmbuild
#    runs with --nodeps (BuildRequires are not checked) and --load
#    debian-build.macros, which defines the systemd and sysusers macros as
#    Fedora's expand them. Only for this build: nothing is installed.
#  - cargo builds into the repository's target/ (CARGO_TARGET_DIR) and
#    offline (CARGO_NET_OFFLINE), so the dependencies `make build` and
#    `make deb` compiled are reused, not compiled again from scratch.
#
# Writes OUTDIR/qlive-VERSION-RELEASE.ARCH.rpm, the only .rpm there, and
# OUTDIR/build.log, and prints the package's path. The rpmbuild tree is a
# temporary directory outside target/, removed at exit: cargo records the
# sources of a build under its target dir by their path there, and the
# next build from the repository would find them gone and compile qlive
# again (outside, it records them relative to the package, the same paths
# as the repository's).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-$repo/target/rpm}"
spec="$here/qlive.spec"

die() { echo "packaging/rpm/build.sh: $*" >&2; exit 1; }

command -v rpmbuild >/dev/null 2>&1 || die "rpmbuild not found (Debian: apt-get install rpm)"
command -v git >/dev/null 2>&1 || die "git not found"

version=$(sed -n 's/^Version:[[:space:]]*//p' "$spec")
crate_version=$(sed -n '/^\[package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml")
[ -n "$version" ] || die "no Version: in $spec"
[ "$version" = "$crate_version" ] || die "$spec has Version $version, Cargo.toml $crate_version"

mkdir -p "$out"
out="$(cd "$out" && pwd)"
rm -f "$out"/*.rpm "$out/build.log"
top=$(mktemp -d "${TMPDIR:-/tmp}/qlive-rpmbuild.XXXXXX")
trap 'rm -rf "$top"' EXIT
mkdir -p "$top/SOURCES"

# Source0: the tracked files that exist (a deleted one is left out), under
# qlive-VERSION/. flags=rh: rename members and hard-link targets, never
# the targets of symlinks.
tarball="$top/SOURCES/qlive-$version.tar.gz"
(
  cd "$repo"
  git ls-files -z | while IFS= read -r -d '' f; do
    if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
  done | tar --create --gzip --file "$tarball" --owner=0 --group=0 --numeric-owner \
    --transform "flags=rh;s,^,qlive-$version/," --no-recursion --null --files-from=-
)
# Source1, read while the spec is parsed (%sysusers_create_compat in %pre).
# rpm ignores a failure of the generator that macro runs: run it here first.
cp "$repo/systemd/qlive.sysusers" "$top/SOURCES/qlive.sysusers"
"$here/sysusers-pre.sh" "$top/SOURCES/qlive.sysusers" >/dev/null ||
  die "systemd/qlive.sysusers: see above"

# Passed through rpm's %build preamble, which changes PKG_CONFIG_PATH
# (debian-build.macros restores it; cargo would rebuild otherwise).
if [ -n "${PKG_CONFIG_PATH+set}" ]; then
  export QLIVE_PKG_CONFIG_PATH="$PKG_CONFIG_PATH" QLIVE_PKG_CONFIG_PATH_SET=1
fi

log="$out/build.log"
set +e
CARGO_TARGET_DIR="$repo/target" CARGO_NET_OFFLINE=true \
  rpmbuild -bb --nodeps \
  --load "$here/debian-build.macros" \
  --define "_qlive_rpm_dir $here" \
  --define "_topdir $top" \
  --define "_rpmdir $out" \
  --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
  "$spec" >"$log" 2>&1
rc=$?
set -e
if [ "$rc" != 0 ]; then
  tail -n 40 "$log" >&2
  die "rpmbuild failed (exit $rc); log: $log"
fi

rpms=("$out"/*.rpm)
if [ "${#rpms[@]}" != 1 ] || [ ! -f "${rpms[0]}" ]; then
  die "expected one .rpm in $out, found: ${rpms[*]}"
fi
echo "${rpms[0]}"
