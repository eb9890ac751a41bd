//! kubelet's plugin registration, for CSI: a plugin (node-driver-registrar
//! beside the driver) puts a socket serving `pluginregistration.Registration`
//! in `<root>/plugins_registry/`; we call GetInfo, check the plugin type
//! (CSIPlugin) and that it speaks a CSI version we do (1.x), register the
//! driver at the endpoint it names (which runs the discovery calls), and
//! answer NotifyRegistrationStatus(true), or (false, why) when any of that
//! failed. A registration socket that goes away deregisters its driver.
//!
//! Level-triggered: every inotify event, and a periodic tick, rescans the
//! directory and compares the sockets there with the ones handled, so a
//! missed event or an agent restart changes nothing; a socket replaced
//! under the same name (registrar restarted) is handled again; a failed
//! handshake is retried on the next tick. Side effects: creates the
//! directory, watches it, dials the sockets in it.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::client::{Timeouts, run_call, socket_path, unix_channel, with_deadline};
use super::drivers::{Origin, Registry, is_driver_name};
use super::error::{Call, CsiError};
use super::proto::registration as reg;
use super::proto::registration::registration_client::RegistrationClient;

/// The plugin type of CSI drivers in PluginInfo.
pub const CSI_PLUGIN_TYPE: &str = "CSIPlugin";

/// kubelet's registration directory under its root dir.
pub fn registry_dir(root: &Path) -> PathBuf {
    root.join("plugins_registry")
}

/// Why a registration socket was not (or could not be) handled.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The registration directory could not be created or read.
    #[error("plugin registration directory {}", .dir.display())]
    Dir { dir: PathBuf, source: io::Error },
    /// inotify could not watch the directory.
    #[error("cannot watch plugin registration directory {}", .dir.display())]
    Watch { dir: PathBuf, source: notify::Error },
    /// GetInfo (or NotifyRegistrationStatus) failed.
    #[error("plugin registration socket {}", .socket.display())]
    Call { socket: PathBuf, source: CsiError },
    /// Not a CSI plugin (a device plugin, say): not ours to register.
    #[error("plugin registration socket {}: plugin type {kind:?} is not {CSI_PLUGIN_TYPE}", .socket.display())]
    NotCsi { socket: PathBuf, kind: String },
    /// The plugin speaks no CSI version we do.
    #[error("plugin registration socket {}: CSI driver {driver} supports versions {versions:?}, minilet speaks 1.x", .socket.display())]
    Version {
        socket: PathBuf,
        driver: String,
        versions: Vec<String>,
    },
    /// The name is not a valid CSI driver name.
    #[error("plugin registration socket {}: invalid CSI driver name {name:?}", .socket.display())]
    Name { socket: PathBuf, name: String },
    /// The driver's endpoint is not an absolute unix socket path.
    #[error("plugin registration socket {}: CSI driver {driver}: endpoint {endpoint:?} is not an absolute unix socket path", .socket.display())]
    Endpoint {
        socket: PathBuf,
        driver: String,
        endpoint: String,
    },
    /// The driver itself could not be discovered (or may not register).
    #[error("plugin registration socket {}", .socket.display())]
    Register { socket: PathBuf, source: CsiError },
}

/// The CSI version (of the plugin's list) we talk to it with: the highest
/// 1.x, written "1.2.0" or "v1.2.0"; `None` when there is none.
pub fn supported_version(versions: &[String]) -> Option<&str> {
    let parse = |v: &str| -> Option<(u64, u64, u64)> {
        let v = v.strip_prefix('v').unwrap_or(v);
        let mut parts = v.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next().map_or(Some(0), |p| p.parse().ok())?;
        let patch = parts.next().map_or(Some(0), |p| p.parse().ok())?;
        (parts.next().is_none() && major == 1).then_some((major, minor, patch))
    };
    versions
        .iter()
        .filter_map(|v| parse(v).map(|key| (key, v.as_str())))
        .max_by_key(|(key, _)| *key)
        .map(|(_, v)| v)
}

/// One registration handshake with the plugin at `socket`; returns the
/// registered driver's name. After GetInfo worked the plugin is always told
/// the outcome; a failure to tell it is logged, not fatal (kubelet's way).
pub async fn handshake(socket: &Path, registry: &Registry) -> Result<String, RegistrationError> {
    let timeouts = registry.timeouts();
    let who = socket.display().to_string();
    let mut client = RegistrationClient::new(unix_channel(socket, timeouts.connect));
    let info = get_info(&mut client, socket, timeouts).await?;
    let outcome = register(socket, &info, registry).await;
    let status = reg::RegistrationStatus {
        plugin_registered: outcome.is_ok(),
        error: match &outcome {
            Ok(_) => String::new(),
            Err(e) => crate::error_chain(e),
        },
    };
    let deadline = timeouts.for_call(Call::NotifyRegistrationStatus);
    if let Err(e) = run_call(
        &who,
        Call::NotifyRegistrationStatus,
        deadline,
        client.notify_registration_status(with_deadline(status, deadline)),
    )
    .await
    {
        tracing::warn!(error = %e, "cannot tell the plugin its registration status");
    }
    outcome
}

async fn get_info(
    client: &mut RegistrationClient<tonic::transport::Channel>,
    socket: &Path,
    timeouts: Timeouts,
) -> Result<reg::PluginInfo, RegistrationError> {
    let deadline = timeouts.for_call(Call::GetInfo);
    run_call(
        &socket.display().to_string(),
        Call::GetInfo,
        deadline,
        client.get_info(with_deadline(reg::InfoRequest {}, deadline)),
    )
    .await
    .map_err(|source| RegistrationError::Call {
        socket: socket.to_path_buf(),
        source,
    })
}

/// GetInfo of every registration socket in `dir`, without registering
/// anything or notifying the plugins (for `minilet doctor`, which runs
/// beside the agent and must not disturb its registrations).
pub async fn peek(
    dir: &Path,
    timeouts: Timeouts,
) -> Result<Vec<(PathBuf, Result<reg::PluginInfo, RegistrationError>)>, RegistrationError> {
    let sockets = list_sockets(dir).map_err(|source| RegistrationError::Dir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::with_capacity(sockets.len());
    for socket in sockets.into_keys() {
        let mut client = RegistrationClient::new(unix_channel(&socket, timeouts.connect));
        let info = get_info(&mut client, &socket, timeouts).await;
        out.push((socket, info));
    }
    Ok(out)
}

async fn register(
    socket: &Path,
    info: &reg::PluginInfo,
    registry: &Registry,
) -> Result<String, RegistrationError> {
    let socket_buf = || socket.to_path_buf();
    if info.r#type != CSI_PLUGIN_TYPE {
        return Err(RegistrationError::NotCsi {
            socket: socket_buf(),
            kind: info.r#type.clone(),
        });
    }
    if !is_driver_name(&info.name) {
        return Err(RegistrationError::Name {
            socket: socket_buf(),
            name: info.name.clone(),
        });
    }
    if supported_version(&info.supported_versions).is_none() {
        return Err(RegistrationError::Version {
            socket: socket_buf(),
            driver: info.name.clone(),
            versions: info.supported_versions.clone(),
        });
    }
    if socket_path(&info.endpoint).is_none() {
        return Err(RegistrationError::Endpoint {
            socket: socket_buf(),
            driver: info.name.clone(),
            endpoint: info.endpoint.clone(),
        });
    }
    let origin = Origin::Registration {
        socket: socket_buf(),
    };
    registry
        .register(&info.name, &info.endpoint, origin)
        .await
        .map_err(|source| RegistrationError::Register {
            socket: socket_buf(),
            source,
        })?;
    Ok(info.name.clone())
}

/// Which file a socket is: its inode and change time. A restarted
/// registrar binds a new file, but the file system may hand it the inode
/// number the old one had, so the inode alone does not tell them apart
/// (kubelet's plugin watcher keys on the event's timestamp likewise).
type FileId = (u64, i64, i64);

/// A registration socket as last handled: which file it was, and the
/// driver it registered.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Handled {
    ino: FileId,
    /// `None`: the handshake failed; retried on the next tick.
    driver: Option<String>,
}

/// The sockets in the registry dir, by path, with their file id. Dot
/// files are skipped, as kubelet does.
fn list_sockets(dir: &Path) -> io::Result<BTreeMap<PathBuf, FileId>> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let Ok(meta) = entry.metadata() else {
            continue; // gone between readdir and stat
        };
        if meta.file_type().is_socket() {
            out.insert(entry.path(), (meta.ino(), meta.ctime(), meta.ctime_nsec()));
        }
    }
    Ok(out)
}

/// Brings the registry in line with the sockets in `dir`.
async fn sync(dir: &Path, registry: &Registry, handled: &mut BTreeMap<PathBuf, Handled>) {
    let present = match list_sockets(dir) {
        Ok(p) => p,
        Err(source) => {
            let e = RegistrationError::Dir {
                dir: dir.to_path_buf(),
                source,
            };
            tracing::warn!(error = %crate::error_chain(&e), "cannot list plugin registrations");
            return;
        }
    };
    // Gone, or replaced by a new socket: deregister what it registered.
    let stale: Vec<PathBuf> = handled
        .iter()
        .filter(|(path, h)| present.get(*path) != Some(&h.ino))
        .map(|(path, _)| path.clone())
        .collect();
    for path in stale {
        if let Some(Handled {
            driver: Some(name), ..
        }) = handled.remove(&path)
            && registry.deregister(&name, &path)
        {
            tracing::info!(driver = %name, socket = %path.display(), "CSI driver deregistered");
        }
    }
    for (path, ino) in present {
        if handled.get(&path).is_some_and(|h| h.driver.is_some()) {
            continue;
        }
        let driver = match handshake(&path, registry).await {
            Ok(name) => {
                tracing::info!(driver = %name, socket = %path.display(), "CSI driver registered");
                Some(name)
            }
            Err(e) => {
                let retrying = handled.contains_key(&path);
                // Log a failing socket once, not on every retry.
                if !retrying {
                    tracing::warn!(error = %crate::error_chain(&e), "plugin registration failed");
                }
                None
            }
        };
        handled.insert(path, Handled { ino, driver });
    }
}

/// Watches `dir` (kubelet's `<root>/plugins_registry`) until `cancel`,
/// registering and deregistering drivers as their registration sockets
/// come and go; `rescan_every` also retries failed handshakes. Returns an
/// error only when the directory cannot be created or watched at start.
pub async fn watch(
    dir: PathBuf,
    registry: Arc<Registry>,
    rescan_every: Duration,
    cancel: CancellationToken,
) -> Result<(), RegistrationError> {
    std::fs::create_dir_all(&dir).map_err(|source| RegistrationError::Dir {
        dir: dir.clone(),
        source,
    })?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // The receiver goes away only when `watch` returns.
        let _ = tx.send(ev.is_ok());
    })
    .map_err(|source| RegistrationError::Watch {
        dir: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .map_err(|source| RegistrationError::Watch {
            dir: dir.clone(),
            source,
        })?;
    let mut handled = BTreeMap::new();
    let mut tick = tokio::time::interval(rescan_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        sync(&dir, &registry, &mut handled).await;
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            _ = tick.tick() => {}
            Some(_) = rx.recv() => {
                // A burst of events (bind, chmod) is one rescan.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{FakeDriver, FakeRegistrar, serve_driver, serve_registrar};
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn the_highest_1x_version_is_picked() {
        assert_eq!(supported_version(&strings(&["1.0.0"])), Some("1.0.0"));
        assert_eq!(
            supported_version(&strings(&["0.3.0", "v1.2.0", "1.10.0", "2.0.0"])),
            Some("1.10.0")
        );
        assert_eq!(supported_version(&strings(&["1"])), Some("1"));
        assert_eq!(supported_version(&strings(&["0.3.0", "2.0.0", "x"])), None);
        assert_eq!(supported_version(&[]), None);
    }

    fn quick() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(1),
            info: Duration::from_secs(2),
            operation: Duration::from_secs(2),
        }
    }

    #[tokio::test]
    async fn handshake_registers_and_notifies() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = serve_driver(dir.path(), FakeDriver::block_storage("a.csi")).await;
        let registrar = FakeRegistrar::csi("a.csi", &endpoint);
        let reg_sock = dir.path().join("a.csi-reg.sock");
        let _server = serve_registrar(&reg_sock, registrar.clone());
        let registry = Registry::new(quick());
        assert_eq!(handshake(&reg_sock, &registry).await.unwrap(), "a.csi");
        assert_eq!(
            registrar.statuses(),
            [reg::RegistrationStatus {
                plugin_registered: true,
                error: String::new(),
            }]
        );
        let (client, info) = registry.driver("a.csi").await.unwrap();
        assert_eq!(client.endpoint(), endpoint.display().to_string());
        assert!(info.node.stage_unstage_volume);
    }

    #[tokio::test]
    async fn a_refused_plugin_is_told_why() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = serve_driver(dir.path(), FakeDriver::block_storage("a.csi")).await;
        type Edit = Box<dyn Fn(&mut reg::PluginInfo)>;
        let cases: Vec<(&str, Edit, &str)> = vec![
            (
                "device plugin",
                Box::new(|i| i.r#type = "DevicePlugin".into()),
                "plugin type \"DevicePlugin\" is not CSIPlugin",
            ),
            (
                "CSI 0.x only",
                Box::new(|i| i.supported_versions = strings(&["0.3.0"])),
                "supports versions [\"0.3.0\"], minilet speaks 1.x",
            ),
            (
                "name differs from the driver's",
                Box::new(|i| i.name = "b.csi".into()),
                "GetPluginInfo: the driver calls itself \"a.csi\"",
            ),
            (
                "relative endpoint",
                Box::new(|i| i.endpoint = "csi.sock".into()),
                "endpoint \"csi.sock\" is not an absolute unix socket path",
            ),
        ];
        for (i, (name, edit, want)) in cases.into_iter().enumerate() {
            let mut registrar = FakeRegistrar::csi("a.csi", &endpoint);
            edit(&mut registrar.info);
            let reg_sock = dir.path().join(format!("r{i}.sock"));
            let _server = serve_registrar(&reg_sock, registrar.clone());
            let registry = Registry::new(quick());
            let err = handshake(&reg_sock, &registry).await.unwrap_err();
            let statuses = registrar.statuses();
            assert_eq!(statuses.len(), 1, "{name}");
            assert!(!statuses[0].plugin_registered, "{name}");
            assert!(
                statuses[0].error.contains(want),
                "{name}: {}",
                statuses[0].error
            );
            assert!(crate::error_chain(&err).contains(want), "{name}");
            assert!(registry.list().is_empty(), "{name}");
        }
    }

    #[tokio::test]
    async fn a_hung_registrar_times_out() {
        let dir = tempfile::tempdir().unwrap();
        // Bound but never accepted: the connection opens, no answer comes.
        let reg_sock = dir.path().join("hung.sock");
        let _listener = tokio::net::UnixListener::bind(&reg_sock).unwrap();
        let registry = Registry::new(Timeouts {
            info: Duration::from_millis(300),
            ..quick()
        });
        let started = std::time::Instant::now();
        let err = handshake(&reg_sock, &registry).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        match err {
            RegistrationError::Call { source, .. } => {
                assert!(
                    matches!(
                        source,
                        CsiError::Timeout {
                            call: Call::GetInfo,
                            ..
                        }
                    ),
                    "{source}"
                );
            }
            e => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn the_watcher_follows_sockets_coming_and_going() {
        let root = tempfile::tempdir().unwrap();
        let drv_dir = root.path().join("plugins/a.csi");
        std::fs::create_dir_all(&drv_dir).unwrap();
        let endpoint = serve_driver(&drv_dir, FakeDriver::block_storage("a.csi")).await;
        let dir = registry_dir(root.path());
        let registry = Arc::new(Registry::new(quick()));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(watch(
            dir.clone(),
            registry.clone(),
            Duration::from_secs(30),
            cancel.clone(),
        ));
        let wait_for = |want: bool| {
            let registry = registry.clone();
            async move {
                for _ in 0..100 {
                    if registry.client("a.csi").is_ok() == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("driver registered: never {want}");
            }
        };
        // The directory is made by the watcher.
        for _ in 0..100 {
            if dir.is_dir() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let registrar = FakeRegistrar::csi("a.csi", &endpoint);
        let reg_sock = dir.join("a.csi-reg.sock");
        let server = serve_registrar(&reg_sock, registrar.clone());
        wait_for(true).await;
        // The driver is in the registry before the plugin is told so.
        for _ in 0..100 {
            if !registrar.statuses().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(registrar.statuses()[0].plugin_registered);
        // The registrar stops and removes its socket: the driver goes.
        server.abort();
        std::fs::remove_file(&reg_sock).unwrap();
        wait_for(false).await;
        cancel.cancel();
        task.await.unwrap().unwrap();
    }
}
