# qlive: the two commands that matter are `make demo` and `make test`.
# Both work on a fresh Debian 12 machine (they install what they need).

CARGO ?= cargo
GUEST_DIR := target/guest

.PHONY: all build deps guest qemu-new assets deb rpm selinux selinux-check demo test lint fuzz ansible-venv ansible-sanity bench bench-core bench-migration bench-upgrade bench-chaos bench-network bench-adopt clean

all: build

deps:
	scripts/deps.sh

build: deps
	$(CARGO) build --release --locked --bin qlive --example hbgap

# The test guest: Debian kernel + static C /init (tests/guest/).
guest: deps
	tests/guest/build.sh $(GUEST_DIR)

# The real Debian 12 guest (tests/guest/debian/): a UEFI disk image with
# systemd, qemu-guest-agent and a TCP stream service, which `make test`
# needs (tests/debian_guest.rs); and its smoke check on QEMU 7.2 and 10.0
# with plain QEMU (not part of `make test`).
.PHONY: debian-guest debian-guest-smoke
debian-guest: deps
	tests/guest/debian/build.sh target/debian-guest

debian-guest-smoke: debian-guest qemu-new
	tests/guest/debian/smoke.sh target/debian-guest

# The newer QEMU (bookworm-backports 10.0) unpacked under target/, not installed.
qemu-new: deps
	tests/rig/fetch-new-qemu.sh target/qemu-new

# The SELinux policy module (selinux/, docs/selinux.md): target/selinux/qlive.pp.
selinux: deps
	selinux/build.sh target/selinux

# Link it with Debian's whole reference policy and check every neverallow.
selinux-check: deps selinux
	selinux/linkcheck.sh target/selinux

# Man pages (qlive.1 and qlive-SUB.1 for every subcommand, gzipped) and
# bash, zsh and fish completions in target/assets, generated from the clap
# CLI by examples/gen-assets.rs (clap_mangen and clap_complete are
# dev-dependencies: the shipped binary does not link them).
assets: deps
	rm -rf target/assets
	$(CARGO) run --release --locked --example gen-assets -- target/assets

# The Debian package (cargo-deb; metadata in Cargo.toml, scripts in packaging/debian)
# in target/debian/, and the same package under a higher version in
# target/debian-next/, which tests/systemd/e2e.sh installs over it while a
# guest runs (a self-upgrade of qlive). In this order: cargo deb removes the
# package's .deb files in target/debian/, whatever its --output.
VERSION := $(shell sed -n '/^\[package\]/,/^\[/s/^version = "\(.*\)"$$/\1/p' Cargo.toml)
deb: deps selinux assets
	rm -rf target/debian-next
	$(CARGO) deb --locked --deb-version $(VERSION)+selftest1 --output target/debian-next/
	$(CARGO) deb --locked --no-build

# The RPM (packaging/rpm/qlive.spec) built with Debian's rpmbuild into
# target/rpm/, from a tarball of the tracked files, reusing target/'s
# compiled dependencies, offline (packaging/rpm/build.sh).
rpm: deps
	packaging/rpm/build.sh target/rpm

# Boot the demo guest under a private agent and show it running.
demo: build guest qemu-new
	scripts/demo.sh

# Rust formatting and clippy, and every shell script (shellcheck, no
# early-exiting reader in a pipefail pipeline): scripts/lint-shell.sh.
lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	scripts/lint-shell.sh

# Fuzz the API request parser and the definition validator, FUZZ_SECONDS
# (default 60) each, from the seed corpus in fuzz/corpus (docs/fuzzing.md).
fuzz: deps
	scripts/fuzz.sh

# The pinned ansible-core (ansible/test/requirements.txt) in target/ansible-venv,
# from PyPI; tests/ansible.rs runs its ansible-playbook (docs/fleet.md).
ansible-venv: deps
	ansible/test/setup.sh target/ansible-venv

# ansible-test sanity on the collection qlive.fleet (ansible/ansible_collections/qlive/fleet).
ansible-sanity: ansible-venv
	cd ansible/ansible_collections/qlive/fleet && \
	  ../../../../target/ansible-venv/bin/ansible-test sanity --python 3.11

# Everything: lint, fuzzing, the Ansible collection's sanity tests, unit and
# integration tests (real QEMU under TCG, with the test guest and the Debian
# guest; the .deb under systemd, the .deb's and the .rpm's contents).
test: deps guest debian-guest qemu-new deb rpm selinux-check lint fuzz ansible-sanity
	$(CARGO) nextest run --locked --profile ci

# Benchmarks print their figures (docs/benchmarks.md); not part of `make test`.
bench: bench-core bench-migration bench-upgrade bench-chaos bench-network bench-adopt

bench-core: build guest
	$(CARGO) bench --locked --bench core

bench-migration: build guest
	$(CARGO) bench --locked --bench migration

bench-upgrade: build guest
	$(CARGO) bench --locked --bench upgrade

# SIGKILL the agent (and now and then a QEMU) during migrations; fails on any
# violation of "one instance per domain, nothing left behind" (CHAOS_KILLS,
# CHAOS_SEED: docs/benchmarks.md).
bench-chaos: build guest qemu-new
	$(CARGO) bench --locked --bench chaos

# Host <-> guest TCP throughput through qlive's tap, a plain QEMU tap with
# vnet header (the floor) and one without; then the TCP stall and
# retransmits of streaming connections across migrations 7.2 <-> 10.0
# (QLIVE_BENCH_*: docs/benchmarks.md).
bench-network: build guest qemu-new
	$(CARGO) bench --locked --bench network

# qlive adopt of QEMUs started by hand (an idle 512 MiB guest, a busy 2 GiB
# one), a copy migration into qlive's memfd: pre-copy only, post-copy after
# one pass, post-copy immediately, auto; total time, pause, bytes, passes
# (QLIVE_BENCH_ADOPT_*: docs/benchmarks.md).
bench-adopt: build guest qemu-new
	$(CARGO) bench --locked --bench adopt

clean:
	$(CARGO) clean
