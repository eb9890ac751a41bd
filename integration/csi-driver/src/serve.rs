//! Serving: the CSI socket and the registration socket, until shutdown.
//!
//! Side effects: binds (and on exit removes) the two unix sockets; a stale
//! socket file nobody listens on is replaced.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;

use crate::backend::Backend;
use crate::driver::Driver;
use crate::proto::csi::{
    controller_server::ControllerServer, identity_server::IdentityServer, node_server::NodeServer,
};
use crate::proto::registration::registration_server::RegistrationServer;
use crate::record::Recorder;
use crate::service::{Csi, Registration};

/// Serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A socket could not be bound.
    #[error("bind {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The gRPC server stopped with an error.
    #[error("serve {path}")]
    Serve {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// The connections a listener accepts, as the stream tonic serves.
fn incoming(
    listener: UnixListener,
) -> impl futures::Stream<Item = io::Result<tokio::net::UnixStream>> {
    futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| s);
        Some((next, l))
    })
}

/// Bind a unix socket, replacing a stale socket file (nobody listening).
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another server listens there",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    UnixListener::bind(path).map_err(err)
}

/// The registration socket's path in `dir`, as node-driver-registrar names it.
pub fn registration_socket(dir: &Path, driver: &str) -> PathBuf {
    dir.join(format!("{driver}-reg.sock"))
}

/// Serve the driver on `endpoint` (and the registration service in
/// `registration_dir`, if given) until `shutdown` resolves. The sockets are
/// removed on the way out; the state and the mounts stay.
pub async fn serve<B: Backend>(
    driver: Driver<B>,
    endpoint: &Path,
    registration_dir: Option<&Path>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let recorder = Arc::new(Recorder::new(&driver.config.state_dir));
    let name = driver.config.name.clone();
    let csi = Arc::new(Csi::new(Arc::new(driver), recorder.clone()));
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    // The CSI socket first: a registrar advertises a driver that is up.
    let listener = bind(endpoint)?;
    let mut sockets = vec![endpoint.to_path_buf()];
    let registration = match registration_dir {
        Some(dir) => {
            let path = registration_socket(dir, &name);
            match bind(&path) {
                Ok(l) => {
                    sockets.push(path.clone());
                    Some((path, l))
                }
                Err(e) => {
                    let _ = std::fs::remove_file(endpoint);
                    return Err(e);
                }
            }
        }
        None => None,
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut rx = stop.subscribe();
    let csi_server = tonic::transport::Server::builder()
        .add_service(IdentityServer::from_arc(csi.clone()))
        .add_service(ControllerServer::from_arc(csi.clone()))
        .add_service(NodeServer::from_arc(csi))
        .serve_with_incoming_shutdown(incoming(listener), async move {
            let _ = rx.recv().await;
        });
    let path = endpoint.to_path_buf();
    tasks.spawn(async move {
        csi_server
            .await
            .map_err(|source| ServeError::Serve { path, source })
    });
    if let Some((path, listener)) = registration {
        let service = Registration {
            name,
            endpoint: endpoint.display().to_string(),
            recorder,
        };
        let mut rx = stop.subscribe();
        let server = tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(service))
            .serve_with_incoming_shutdown(incoming(listener), async move {
                let _ = rx.recv().await;
            });
        tasks.spawn(async move {
            server
                .await
                .map_err(|source| ServeError::Serve { path, source })
        });
    }
    tracing::info!(endpoint = %endpoint.display(), "serving");
    let mut result = Ok(());
    tokio::select! {
        () = shutdown => tracing::info!("shutting down"),
        Some(Ok(Err(e))) = tasks.join_next() => result = Err(e),
    }
    let _ = stop.send(());
    while let Some(joined) = tasks.join_next().await {
        if let Ok(Err(e)) = joined
            && result.is_ok()
        {
            result = Err(e);
        }
    }
    for s in sockets {
        let _ = std::fs::remove_file(s);
    }
    result
}
