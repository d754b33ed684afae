//! qlive: live-upgrade the hypervisor under running QEMU guests.
//!
//! The crate is one library and one binary (`qlive`). The binary's `agent`
//! subcommand runs the daemon; every other subcommand is a client of the
//! daemon's API socket. See `docs/architecture.md` for the big picture.
//!
//! Module map (one job each, one error enum each):
//! - [`domain`]: the validated definition, the on-disk store, the domain table.
//! - [`instance`]: one QEMU process: paths, command line, spawn/adopt/kill, owned fds.
//! - [`qmp`]: QMP client on top of the `qapi` crate, tolerant of newer QEMUs.
//! - [`qga`]: a client of the guest agent, over the domain's stable socket.
//! - [`console`]: the per-domain console log and its live follower.
//! - [`adopt`]: learning a QEMU qlive did not start, refusing what it cannot reproduce.
//! - [`migration`]: phases, job, capability table, hooks, recovery rules.
//! - [`metrics`]: the migration tally and the Prometheus text format.
//! - [`upgrade`]: stale detection and batch upgrade runs.
//! - [`api`]: the request/response protocol and the client.
//! - [`agent`]: the daemon: config, socket server, startup re-adoption and
//!   recovery, request handling, the migration driver, systemd glue.
//! - [`cli`]: client subcommands and their output.

pub mod adopt;
pub mod agent;
pub mod api;
pub mod cli;
pub mod config;
pub mod console;
pub mod domain;
pub mod error;
pub mod fsutil;
pub mod instance;
pub mod metrics;
pub mod migration;
pub mod qga;
pub mod qmp;
pub mod upgrade;
