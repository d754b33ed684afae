//! The agent's configuration and its defaults: shared by the agent, which
//! runs with it, and the CLI, which builds it from flags and environment.

use std::path::PathBuf;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/qlive";
pub const DEFAULT_RUN_DIR: &str = "/run/qlive";
pub const DEFAULT_SOCKET: &str = "/run/qlive/qlive.sock";
pub const DEFAULT_HOOKS_DIR: &str = "/etc/qlive/hooks.d";

#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub socket: PathBuf,
    /// Required-feature hooks run on the migration destination.
    pub hooks_dir: PathBuf,
    /// Group whose members may use the API (besides root).
    pub api_group: String,
    /// Open API connections at most; more are refused with `busy`.
    pub max_connections: usize,
    /// A connection that sends no request for this long is closed.
    pub idle_timeout: std::time::Duration,
    /// Run QEMU instances as this user (None: as root).
    pub qemu_user: Option<String>,
}

pub const DEFAULT_API_GROUP: &str = "qlive";
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
pub const DEFAULT_IDLE_TIMEOUT_S: u64 = 60;
