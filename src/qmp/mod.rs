//! QMP client: the `qapi` crate's generated command and event types over a
//! transport of our own that tolerates a QEMU newer than the crate's schema.
//!
//! Why not `qapi::futures::QmpStreamTokio` as is: it decodes every line into
//! the crate's `Event` enum, so one event it does not know (QEMU 10 has
//! several) is a decode error that ends the stream. Here each line is first
//! read as plain JSON and dispatched by shape:
//! - `{"return"|"error", "id"}` completes the pending command with that id;
//!   the result is decoded into the command's typed `Ok` only then, so a
//!   response with an unknown enum value fails *that command* with
//!   [`QmpError::Decode`] and the connection lives on;
//! - `{"event"}` becomes a [`QmpEvent`] carrying the raw name and data, plus
//!   the typed `qapi::qmp::Event` when the schema knows it. An unknown event
//!   is logged once per name and still delivered.
//!
//! Commands or fields the crate lacks: [`Qmp::execute_raw`] sends any command
//! name with any JSON arguments and returns the raw JSON result. See
//! `docs/architecture.md` ("QMP").

use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, oneshot};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

/// Longest line accepted from QEMU (query-qmp-schema is the largest reply).
pub const MAX_LINE: usize = 64 * 1024 * 1024;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("QMP greeting: {0}")]
    Greeting(String),
    #[error("QMP connection closed")]
    Disconnected,
    #[error("writing QMP command {command}")]
    Write {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("decoding the reply to QMP command {command}")]
    Decode {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("QMP command {command} timed out after {secs} s")]
    Timeout { command: String, secs: u64 },
}

impl QmpError {
    /// The QMP error class (`GenericError`, `CommandNotFound`, ...) if QEMU
    /// answered with an error.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// An event as QEMU sent it; `typed` is set when the crate's schema knows it.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    /// (seconds, microseconds) as stamped by QEMU.
    pub timestamp: (i64, i64),
    pub typed: Option<qapi::qmp::Event>,
}

/// QEMU version from the greeting.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct QemuVersion {
    pub major: i64,
    pub minor: i64,
    pub micro: i64,
    pub package: String,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>>>;

struct Shared {
    pending: Pending,
    closed: std::sync::atomic::AtomicBool,
}

/// A QMP connection. Cheap to share behind an `Arc`; commands may be issued
/// concurrently (each carries its own id).
pub struct Qmp {
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    /// The connection's socket itself, for commands that pass an fd along
    /// (`getfd`, SCM_RIGHTS); None over other transports (the probe's
    /// stdio, tests).
    socket: Option<std::os::fd::OwnedFd>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    /// The reader task holds the only strong sender: when the connection
    /// ends, every subscriber sees `Closed` (a QEMU that went away is
    /// noticed at once, not after a timeout).
    events: broadcast::WeakSender<QmpEvent>,
    version: QemuVersion,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connect to a unix socket and negotiate capabilities.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let s = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        use std::os::fd::AsFd;
        let socket = s
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (r, w) = s.into_split();
        let mut qmp = Qmp::handshake(r, w).await?;
        qmp.socket = Some(socket);
        Ok(qmp)
    }

    /// Read the greeting from `r`, start the reader task, negotiate.
    pub async fn handshake<R, W>(r: R, w: W) -> Result<Qmp, QmpError>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let mut lines = FramedRead::new(r, LinesCodec::new_with_max_length(MAX_LINE));
        let greeting = tokio::time::timeout(DEFAULT_TIMEOUT, lines.next())
            .await
            .map_err(|_| QmpError::Greeting("no greeting within 30 s".into()))?
            .ok_or(QmpError::Disconnected)?
            .map_err(|e| QmpError::Greeting(e.to_string()))?;
        let g: Value =
            serde_json::from_str(&greeting).map_err(|e| QmpError::Greeting(e.to_string()))?;
        let v = &g["QMP"]["version"];
        let version = QemuVersion {
            major: v["qemu"]["major"].as_i64().ok_or_else(|| {
                QmpError::Greeting(format!("not a QMP greeting: {greeting:.200}"))
            })?,
            minor: v["qemu"]["minor"].as_i64().unwrap_or(0),
            micro: v["qemu"]["micro"].as_i64().unwrap_or(0),
            package: v["package"].as_str().unwrap_or("").trim().to_string(),
        };
        let shared = Arc::new(Shared {
            pending: Arc::default(),
            closed: Default::default(),
        });
        let (events, _) = broadcast::channel(1024);
        let weak = events.downgrade();
        let reader = tokio::spawn(read_loop(lines, shared.clone(), events));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(Box::new(w)),
            socket: None,
            shared,
            next_id: AtomicU64::new(1),
            events: weak,
            version,
            reader,
        };
        qmp.execute(qapi::qmp::qmp_capabilities { enable: None })
            .await?;
        Ok(qmp)
    }

    pub fn version(&self) -> &QemuVersion {
        &self.version
    }

    /// Subscribe to events from now on. After the connection ended, the
    /// receiver reports `Closed` at once.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        match self.events.upgrade() {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// Execute a command from the `qapi` crate's schema.
    pub async fn execute<C: qapi::Command>(&self, cmd: C) -> Result<C::Ok, QmpError> {
        self.execute_timeout(cmd, DEFAULT_TIMEOUT).await
    }

    pub async fn execute_timeout<C: qapi::Command>(
        &self,
        cmd: C,
        timeout: Duration,
    ) -> Result<C::Ok, QmpError> {
        let args = serde_json::to_value(&cmd).map_err(|e| QmpError::Write {
            command: C::NAME.into(),
            source: io::Error::other(e),
        })?;
        let args = match args {
            Value::Object(m) if m.is_empty() => None,
            Value::Null => None,
            v => Some(v),
        };
        let v = self.execute_raw_timeout(C::NAME, args, timeout).await?;
        serde_json::from_value(v).map_err(|source| QmpError::Decode {
            command: C::NAME.into(),
            source,
        })
    }

    /// Execute any command by name with raw JSON arguments: the way to use
    /// commands or arguments newer than the `qapi` crate's schema.
    pub async fn execute_raw(&self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.execute_raw_timeout(command, args, DEFAULT_TIMEOUT)
            .await
    }

    pub async fn execute_raw_timeout(
        &self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.execute_with_fd(command, args, timeout, None).await
    }

    /// `getfd`: give QEMU `fd` under `name` (sent with the command, as
    /// SCM_RIGHTS on the QMP socket), for a later command that names it
    /// (`add_client`).
    pub async fn getfd(&self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), QmpError> {
        self.execute_with_fd(
            "getfd",
            Some(json!({ "fdname": name })),
            DEFAULT_TIMEOUT,
            Some(fd),
        )
        .await
        .map(|_| ())
    }

    async fn execute_with_fd(
        &self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        if self.is_closed() {
            return Err(QmpError::Disconnected);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&msg).map_err(|e| QmpError::Write {
            command: command.into(),
            source: io::Error::other(e),
        })?;
        line.push(b'\n');
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.pending).insert(id, tx);
        tracing::trace!(command, id, "qmp ->");
        let write = async {
            let mut w = self.writer.lock().await;
            let mut sent = 0;
            if let Some(fd) = fd {
                // Under the writer lock: nothing else is between the bytes
                // written so far and these. The fd rides on the first byte.
                w.flush().await?;
                let sock = self.socket.as_ref().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::Unsupported,
                        "this QMP transport passes no fds",
                    )
                })?;
                sent = send_with_fd(sock, &line, fd).await?;
            }
            w.write_all(&line[sent..]).await?;
            w.flush().await
        };
        if let Err(source) = write.await {
            lock(&self.shared.pending).remove(&id);
            return Err(QmpError::Write {
                command: command.into(),
                source,
            });
        }
        let res = tokio::time::timeout(timeout, rx).await;
        match res {
            Err(_) => {
                lock(&self.shared.pending).remove(&id);
                Err(QmpError::Timeout {
                    command: command.into(),
                    secs: timeout.as_secs(),
                })
            }
            Ok(Err(_)) => Err(QmpError::Disconnected),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                command: command.into(),
                class,
                desc,
            }),
        }
    }
}

/// `sendmsg` of (the start of) `line` with `fd` as SCM_RIGHTS on the QMP
/// socket, which is non-blocking: retried briefly while the buffer is full.
/// Returns how many bytes went out.
async fn send_with_fd(
    sock: &std::os::fd::OwnedFd,
    line: &[u8],
    fd: std::os::fd::BorrowedFd<'_>,
) -> io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let fds = [fd.as_raw_fd()];
    for _ in 0..200 {
        let iov = [io::IoSlice::new(line)];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        match sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        "the QMP socket stayed full for 1 s",
    ))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut lines: FramedRead<R, LinesCodec>,
    shared: Arc<Shared>,
    events: broadcast::Sender<QmpEvent>,
) {
    let mut unknown_logged: HashSet<String> = HashSet::new();
    loop {
        let line = match lines.next().await {
            None => break,
            Some(Ok(l)) => l,
            Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                tracing::warn!("QMP line over {MAX_LINE} bytes skipped");
                continue;
            }
            Some(Err(LinesCodecError::Io(e))) => {
                tracing::debug!(error = %e, "QMP read error");
                break;
            }
        };
        dispatch(&line, &shared, &events, &mut unknown_logged);
    }
    shared.closed.store(true, Ordering::SeqCst);
    // Dropping the senders fails every pending command with Disconnected.
    lock(&shared.pending).clear();
}

fn dispatch(
    line: &str,
    shared: &Shared,
    events: &broadcast::Sender<QmpEvent>,
    unknown_logged: &mut HashSet<String>,
) {
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, line = %truncate(line), "QMP: unparsable line skipped");
            return;
        }
    };
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        let typed = match serde_json::from_value::<qapi::qmp::Event>(v.clone()) {
            Ok(t) => Some(t),
            Err(e) => {
                if unknown_logged.insert(name.to_string()) {
                    tracing::info!(event = name, error = %e,
                        "QMP event not in the qapi schema (newer QEMU?); delivered untyped");
                }
                None
            }
        };
        let ts = &v["timestamp"];
        let ev = QmpEvent {
            name: name.to_string(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
            timestamp: (
                ts["seconds"].as_i64().unwrap_or(0),
                ts["microseconds"].as_i64().unwrap_or(0),
            ),
            typed,
        };
        tracing::trace!(event = name, "qmp <- event");
        let _ = events.send(ev);
        return;
    }
    let id = v.get("id").and_then(Value::as_u64);
    let result = if let Some(r) = v.get("return") {
        Ok(r.clone())
    } else if let Some(e) = v.get("error") {
        Err((
            e["class"].as_str().unwrap_or("GenericError").to_string(),
            e["desc"].as_str().unwrap_or("").to_string(),
        ))
    } else {
        tracing::warn!(line = %truncate(line), "QMP: message of unknown shape skipped");
        return;
    };
    match id.and_then(|id| lock(&shared.pending).remove(&id)) {
        Some(tx) => {
            let _ = tx.send(result);
        }
        None => tracing::warn!(line = %truncate(line), "QMP: reply to no pending command"),
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Helpers for the commands qlive uses most, raw where the crate's typed
/// reply would be brittle across QEMU versions.
impl Qmp {
    /// `query-status`: (running, status string).
    pub async fn status(&self) -> Result<(bool, String), QmpError> {
        let v = self.execute_raw("query-status", None).await?;
        Ok((
            v["running"].as_bool().unwrap_or(false),
            v["status"].as_str().unwrap_or("unknown").to_string(),
        ))
    }

    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute(qapi::qmp::cont {}).await.map(|_| ())
    }

    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute(qapi::qmp::stop {}).await.map(|_| ())
    }

    /// `quit`; QEMU may close the socket before answering, which counts as
    /// success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute(qapi::qmp::quit {}).await {
            Ok(_) | Err(QmpError::Disconnected) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A fake QMP peer for unit tests of error paths a real QEMU cannot be made
/// to produce on demand (a newer QEMU's unknown events, a connection lost
/// between a command and its reply, a burst of events that overruns a
/// subscriber). Never a stand-in for QEMU in integration tests.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::{AsyncBufReadExt, BufReader};

    pub const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2"}, "capabilities": ["oob"]}}"#;

    /// What the fake does with one command.
    pub enum Reply {
        /// Send these lines (replies, events), in order.
        Lines(Vec<String>),
        /// Close the connection without answering.
        Close,
    }

    /// The command names the fake received, in order.
    pub type Received = Arc<Mutex<Vec<String>>>;

    /// A successful reply to `cmd`.
    pub fn ok(cmd: &Value, ret: Value) -> String {
        serde_json::json!({"return": ret, "id": cmd["id"]}).to_string()
    }

    /// An error reply to `cmd`.
    pub fn error(cmd: &Value, class: &str, desc: &str) -> String {
        serde_json::json!({"error": {"class": class, "desc": desc}, "id": cmd["id"]}).to_string()
    }

    /// An event line.
    pub fn event(name: &str, data: Value) -> String {
        serde_json::json!({"event": name, "data": data,
            "timestamp": {"seconds": 1, "microseconds": 0}})
        .to_string()
    }

    /// Greet, answer each command with `respond(cmd)`; after the first
    /// (the handshake's `qmp_capabilities`) and a pause for the client to
    /// subscribe, send `initial` (a `None` entry closes the connection
    /// there).
    pub async fn start<F>(initial: Vec<Option<String>>, respond: F) -> (Qmp, Received)
    where
        F: Fn(&Value) -> Reply + Send + 'static,
    {
        let received: Received = Arc::default();
        let log = received.clone();
        let (a, b) = tokio::net::UnixStream::pair().expect("socketpair");
        tokio::spawn(async move {
            let (r, mut w) = b.into_split();
            if w.write_all(format!("{GREETING}\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            let mut lines = BufReader::new(r).lines();
            let mut initial = Some(initial);
            while let Ok(Some(l)) = lines.next_line().await {
                let Ok(cmd) = serde_json::from_str::<Value>(&l) else {
                    return;
                };
                let name = cmd["execute"].as_str().unwrap_or("").to_string();
                log.lock().unwrap_or_else(|e| e.into_inner()).push(name);
                match respond(&cmd) {
                    Reply::Close => return,
                    Reply::Lines(out) => {
                        for o in out {
                            if w.write_all(format!("{o}\n").as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                // After the handshake's reply, and once the client has had
                // time to subscribe: the initial lines.
                if let Some(init) = initial.take().filter(|i| !i.is_empty()) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    for line in init {
                        let Some(line) = line else { return };
                        if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let (r, w) = a.into_split();
        let qmp = Qmp::handshake(r, w).await.expect("fake QMP handshake");
        (qmp, received)
    }
}

#[cfg(test)]
mod tests {
    //! Error paths a real QEMU cannot be made to produce on demand: a newer
    //! QEMU's unknown event and enum value, garbage lines, a dropped socket.
    //! A fake QMP peer on a socketpair stands in for QEMU here only.
    use super::fake::GREETING;
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};

    async fn fake_qemu<F>(respond: F) -> Qmp
    where
        F: Fn(&Value) -> Vec<String> + Send + 'static,
    {
        super::fake::start(vec![], move |c| super::fake::Reply::Lines(respond(c)))
            .await
            .0
    }

    fn ok(cmd: &Value, ret: Value) -> String {
        json!({"return": ret, "id": cmd["id"]}).to_string()
    }

    #[tokio::test]
    async fn unknown_event_is_delivered_untyped_and_connection_survives() {
        let qmp = fake_qemu(|cmd| {
            let mut out = vec![];
            if cmd["execute"] == "query-status" {
                out.push(r#"{"event": "FROM_THE_FUTURE", "data": {"x": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}"#.to_string());
                out.push(r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 3}}"#.to_string());
                out.push("this is not json".to_string());
                out.push(ok(cmd, json!({"running": false, "status": "paused"})));
            } else {
                out.push(ok(cmd, json!({})));
            }
            out
        })
        .await;
        assert_eq!(qmp.version().major, 10);
        let mut ev = qmp.subscribe();
        let (running, status) = qmp.status().await.unwrap();
        assert!(!running);
        assert_eq!(status, "paused");
        let e1 = ev.recv().await.unwrap();
        assert_eq!(e1.name, "FROM_THE_FUTURE");
        assert!(e1.typed.is_none());
        assert_eq!(e1.data["x"], 1);
        let e2 = ev.recv().await.unwrap();
        assert_eq!(e2.name, "STOP");
        assert!(matches!(e2.typed, Some(qapi::qmp::Event::STOP { .. })));
        // still usable after all that
        qmp.status().await.unwrap();
    }

    #[tokio::test]
    async fn unknown_enum_value_fails_only_that_command() {
        let qmp = fake_qemu(|cmd| {
            if cmd["execute"] == "query-migrate" {
                vec![ok(cmd, json!({"status": "status-from-the-future"}))]
            } else {
                vec![ok(cmd, json!({"running": true, "status": "running"}))]
            }
        })
        .await;
        let e = qmp.execute(qapi::qmp::query_migrate {}).await.unwrap_err();
        assert!(matches!(e, QmpError::Decode { .. }), "{e}");
        // the raw path reads it fine
        let raw = qmp.execute_raw("query-migrate", None).await.unwrap();
        assert_eq!(raw["status"], "status-from-the-future");
        assert!(qmp.status().await.unwrap().0);
    }

    #[tokio::test]
    async fn qmp_error_reply_and_disconnect() {
        let qmp = fake_qemu(|cmd| match cmd["execute"].as_str() {
            Some("no-such") => vec![json!({"error": {"class": "CommandNotFound", "desc": "The command no-such has not been found"}, "id": cmd["id"]}).to_string()],
            Some("die") => vec![],
            _ => vec![ok(cmd, json!({}))],
        })
        .await;
        let e = qmp.execute_raw("no-such", None).await.unwrap_err();
        assert_eq!(e.class(), Some("CommandNotFound"));
        // a command whose reply never comes times out instead of hanging
        let e = qmp
            .execute_raw_timeout("die", None, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
    }

    #[tokio::test]
    async fn peer_closing_fails_pending_commands() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let peer = tokio::spawn(async move {
            let (r, mut w) = b.into_split();
            w.write_all(format!("{GREETING}\n").as_bytes())
                .await
                .unwrap();
            let mut lines = BufReader::new(r).lines();
            let l = lines.next_line().await.unwrap().unwrap();
            let cmd: Value = serde_json::from_str(&l).unwrap();
            w.write_all(format!("{}\n", ok(&cmd, json!({}))).as_bytes())
                .await
                .unwrap();
            // read one more command, then hang up without answering
            let _ = lines.next_line().await;
        });
        let (r, w) = a.into_split();
        let qmp = Qmp::handshake(r, w).await.unwrap();
        let e = qmp.execute_raw("query-status", None).await.unwrap_err();
        assert!(matches!(e, QmpError::Disconnected), "{e}");
        peer.await.unwrap();
        assert!(qmp.is_closed());
    }
}
