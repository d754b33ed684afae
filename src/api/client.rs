//! Client side of the API socket, used by the CLI and by tests.

use super::{ApiError, ErrorKind, Request, Response};
use serde::de::DeserializeOwned;
use std::io;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("permission denied connecting to the qlive agent at {path}: use root or a member of the agent's API group (qlive unless the agent's --api-group says otherwise)")]
    ConnectDenied { path: std::path::PathBuf },
    #[error("cannot connect to the qlive agent at {path} (is it running?)")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("talking to the qlive agent")]
    Io(#[from] io::Error),
    #[error("the agent closed the connection without answering")]
    NoAnswer,
    #[error("unreadable answer from the agent: {0}")]
    BadAnswer(String),
    #[error("{0}")]
    Api(#[from] ApiError),
}

impl ClientError {
    pub fn api_kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Api(e) => Some(e.kind),
            _ => None,
        }
    }
}

pub struct Client {
    stream: BufReader<UnixStream>,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|source| match source.kind() {
                io::ErrorKind::PermissionDenied => ClientError::ConnectDenied {
                    path: path.to_path_buf(),
                },
                _ => ClientError::Connect {
                    path: path.display().to_string(),
                    source,
                },
            })?;
        Ok(Client {
            stream: BufReader::new(s),
        })
    }

    pub async fn call(&mut self, req: &Request) -> Result<serde_json::Value, ClientError> {
        let mut line =
            serde_json::to_vec(req).map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        line.push(b'\n');
        self.stream.get_mut().write_all(&line).await?;
        let mut answer = String::new();
        if self.stream.read_line(&mut answer).await? == 0 {
            return Err(ClientError::NoAnswer);
        }
        let resp: Response =
            serde_json::from_str(&answer).map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        Ok(resp.into_result()?)
    }

    /// [`call`](Self::call), its result decoded into `T` (the request's
    /// result type in [`super::types`]).
    pub async fn call_as<T: DeserializeOwned>(&mut self, req: &Request) -> Result<T, ClientError> {
        let v = self.call(req).await?;
        decode_result(req, v)
    }

    /// After a successful `console` call: the raw stream.
    pub fn into_stream(self) -> BufReader<UnixStream> {
        self.stream
    }
}

/// One-shot call on a fresh connection.
pub async fn call(path: &Path, req: &Request) -> Result<serde_json::Value, ClientError> {
    Client::connect(path).await?.call(req).await
}

/// One-shot call on a fresh connection, its result decoded into `T`.
pub async fn call_as<T: DeserializeOwned>(path: &Path, req: &Request) -> Result<T, ClientError> {
    Client::connect(path).await?.call_as(req).await
}

/// The result of `req` read into its type; a result of another shape is
/// [`ClientError::BadAnswer`].
pub fn decode_result<T: DeserializeOwned>(
    req: &Request,
    result: serde_json::Value,
) -> Result<T, ClientError> {
    super::types::decode(result)
        .map_err(|e| ClientError::BadAnswer(format!("{} result: {e}", req.op())))
}
