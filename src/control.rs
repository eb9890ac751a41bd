//! The local control socket: `minilet get pods`, `get pv,pvc` and
//! `minilet logs` ask the running agent for the status board (or the
//! claim controller's view) over a root-only unix socket. One
//! JSON request line, one JSON response line; the agent never trusts the
//! request beyond picking an operation.
//!
//! Side effects: binds and serves `<stateDir>/minilet.sock` (mode 0600).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::status::{Board, BoardView};
use crate::volume::provision::VolumesView;

/// Errors of the control socket, on either side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens: the agent is not running (or uses another stateDir).
    #[error("cannot reach the minilet agent at {path} (is it running, with the same --root-dir?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("binding {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {path} sent a reply that is not valid JSON")]
    BadReply {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the agent at {path} did not answer within {secs}s")]
    Timeout { path: PathBuf, secs: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
enum Request {
    Pods,
    /// The PersistentVolumes and claims (standalone: the claim
    /// controller's; empty in API server mode).
    Volumes,
}

/// Bind the control socket: root-only, like the CNI socket.
pub use crate::socket::bind_private;

/// Serve the board (and the volumes' view) until cancelled.
pub async fn serve(
    listener: UnixListener,
    board: Board,
    volumes: watch::Receiver<VolumesView>,
    pod_logs_dir: String,
    cancel: CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            _ = cancel.cancelled() => return,
            c = listener.accept() => c,
        };
        let (stream, _) = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "control socket accept failed");
                continue;
            }
        };
        let (board, dir) = (board.clone(), pod_logs_dir.clone());
        let volumes = volumes.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &board, &volumes, &dir).await {
                debug!(error = %e, "control request failed");
            }
        });
    }
}

async fn answer(
    stream: UnixStream,
    board: &Board,
    volumes: &watch::Receiver<VolumesView>,
    pod_logs_dir: &str,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(64 * 1024));
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))??;
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Ok(Request::Pods) => serde_json::to_vec(&board.view(pod_logs_dir))?,
        Ok(Request::Volumes) => {
            let view = volumes.borrow().clone();
            serde_json::to_vec(&view)?
        }
        Err(e) => serde_json::to_vec(&serde_json::json!({ "error": e.to_string() }))?,
    };
    write.write_all(&reply).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await
}

/// Ask the agent at `path` for its board.
pub async fn fetch(path: &Path) -> Result<BoardView, ControlError> {
    ask(path, Request::Pods).await
}

/// Ask the agent at `path` for its PersistentVolumes and claims.
pub async fn fetch_volumes(path: &Path) -> Result<VolumesView, ControlError> {
    ask(path, Request::Volumes).await
}

async fn ask<T: serde::de::DeserializeOwned>(
    path: &Path,
    request: Request,
) -> Result<T, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let work = async {
        let mut stream =
            UnixStream::connect(path)
                .await
                .map_err(|source| ControlError::Connect {
                    path: path.to_path_buf(),
                    source,
                })?;
        let req = serde_json::to_string(&request).expect("request serialises");
        stream
            .write_all(format!("{req}\n").as_bytes())
            .await
            .map_err(io)?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.map_err(io)?;
        serde_json::from_slice(&buf).map_err(|source| ControlError::BadReply {
            path: path.to_path_buf(),
            source,
        })
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| ControlError::Timeout {
            path: path.to_path_buf(),
            secs: 10,
        })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceError;

    #[tokio::test]
    async fn round_trip_and_missing_agent() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.sock");
        let err = fetch(&path).await.unwrap_err();
        assert!(
            err.to_string().contains("cannot reach the minilet agent"),
            "{err}"
        );

        let board = Board::default();
        board.set_errors(vec![SourceError {
            file: "/m/bad.yaml".into(),
            message: "line 1".into(),
        }]);
        let listener = bind_private(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let cancel = CancellationToken::new();
        let volumes = VolumesView {
            waiting: [("default/data".to_string(), "waiting".to_string())].into(),
            ..Default::default()
        };
        let (_tx, rx) = watch::channel(volumes.clone());
        tokio::spawn(serve(
            listener,
            board,
            rx,
            "/var/log/pods".into(),
            cancel.clone(),
        ));
        let view = fetch(&path).await.unwrap();
        assert_eq!(view.errors.len(), 1);
        assert_eq!(view.pod_logs_dir, "/var/log/pods");
        assert_eq!(fetch_volumes(&path).await.unwrap(), volumes);
        cancel.cancel();
    }
}
