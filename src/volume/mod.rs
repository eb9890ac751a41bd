//! Pod volumes on the host: emptyDir (a directory under the pod dir, or a
//! tmpfs for `medium: Memory`), hostPath (with kubelet's type checks), and
//! the API data volumes secret, configMap, downwardAPI and projected
//! (their files computed in `payload`, written by `atomic`; secret and
//! projected volumes on a tmpfs, as kubelet keeps secrets off disk).
//! Paths follow kubelet's layout:
//! `<stateDir>/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>`
//! (`kubernetes.io~secret`, `~configmap`, `~downward-api`, `~projected`).
//!
//! Side effects: mkdir, tmpfs mount/unmount, file writes, removal of the
//! pod dir. Every step is idempotent (an existing dir or mount is kept, an
//! unchanged payload is not rewritten), so a restarted agent can run it
//! again, and running it again picks up changed objects.

pub mod atomic;
pub mod csi;
pub mod payload;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Pod, Volume};

pub use payload::{Allocatable, PayloadError};

/// What API data volumes are made of: the objects the pod's volumes
/// reference (`pod::objects::resolve_volumes`), node allocatable, "now"
/// (the atomic writer's directory name).
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    pub objects: &'a crate::pod::objects::Resolved,
    pub node: Allocatable,
    pub now: jiff::Timestamp,
}

/// Errors preparing or removing a pod's volumes.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A volume kind minilet does not support yet.
    #[error("volume {volume:?}: kind {kind} is not supported yet (emptyDir and hostPath are)")]
    Unsupported { volume: String, kind: String },
    /// A hostPath that does not match its declared type.
    #[error("volume {volume:?}: hostPath {path} is not a {expected}")]
    HostPathType {
        volume: String,
        path: PathBuf,
        expected: String,
    },
    /// kubelet's FailedMount message (`MountVolume.SetUp failed for volume
    /// "x" : secret "y" not found`).
    #[error("MountVolume.SetUp failed for volume {volume:?} : {reason}")]
    SetUp { volume: String, reason: String },
    /// An external plugin could not take a volume down (kubelet's words).
    #[error("UnmountVolume.TearDown failed for volume {volume:?} : {reason}")]
    TearDown { volume: String, reason: String },
    /// kubelet's message for the device steps of a CSI volume
    /// (`MountVolume.MountDevice failed for volume "x" : …`, `UnmountDevice`).
    #[error("{op} failed for volume {volume:?} : {reason}")]
    Operation {
        op: &'static str,
        volume: String,
        reason: String,
    },
    /// A file system operation failed.
    #[error("volume {volume:?}: {action} {path}")]
    Io {
        volume: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

const EMPTY_DIR: &str = "kubernetes.io~empty-dir";
const SECRET: &str = "kubernetes.io~secret";
const CONFIG_MAP: &str = "kubernetes.io~configmap";
const DOWNWARD_API: &str = "kubernetes.io~downward-api";
const PROJECTED: &str = "kubernetes.io~projected";

/// The volume kinds `prepare` sets up, as the API names them; the static
/// pod source refuses pods with any other kind.
pub const SUPPORTED_KINDS: &[&str] = &[
    "emptyDir",
    "hostPath",
    "secret",
    "configMap",
    "downwardAPI",
    "projected",
];

/// The plugin dir of an API data volume, and whether it lives on a tmpfs.
fn api_data_dir(v: &Volume) -> Option<(&'static str, bool)> {
    if v.secret.is_some() {
        Some((SECRET, true))
    } else if v.config_map.is_some() {
        Some((CONFIG_MAP, false))
    } else if v.downward_api.is_some() {
        Some((DOWNWARD_API, false))
    } else if v.projected.is_some() {
        Some((PROJECTED, true))
    } else {
        None
    }
}

fn mount_tmpfs(volume: &str, dir: &Path, opts: &str) -> Result<(), VolumeError> {
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some(opts),
    )
    .map_err(|e| io_err(volume, "mount tmpfs on", dir)(io::Error::from(e)))
}

/// Set up one API data volume: its dir (a tmpfs for secrets), then its
/// files through the atomic writer.
fn prepare_api_data(
    pod_dir: &Path,
    pod: &Pod,
    v: &Volume,
    plugin: &str,
    tmpfs: bool,
    inputs: &Inputs<'_>,
) -> Result<PathBuf, VolumeError> {
    // Compute first: a missing object leaves nothing half made.
    let files = payload::payload(pod, v, inputs.objects, &inputs.node)
        .map_err(|e| VolumeError::SetUp {
            volume: v.name.clone(),
            reason: e.to_string(),
        })?
        .unwrap_or_default();
    let dir = pod_dir.join("volumes").join(plugin).join(&v.name);
    fs::create_dir_all(&dir).map_err(io_err(&v.name, "create", &dir))?;
    if tmpfs && !is_mount_point(&dir) {
        mount_tmpfs(&v.name, &dir, "mode=0755")?;
    }
    atomic::write(&dir, &files, inputs.now).map_err(|e| VolumeError::SetUp {
        volume: v.name.clone(),
        reason: crate::error_chain(&e),
    })?;
    Ok(dir)
}

fn io_err(
    volume: &str,
    action: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> VolumeError {
    let (volume, path) = (volume.to_string(), path.to_path_buf());
    move |source| VolumeError::Io {
        volume,
        action,
        path,
        source,
    }
}

/// The volume's kind as written in the manifest (`configMap`, `nfs`, …).
fn kind_of(v: &Volume) -> String {
    let json = serde_json::to_value(v).unwrap_or_default();
    json.as_object()
        .and_then(|o| o.keys().find(|k| *k != "name").cloned())
        .unwrap_or_else(|| "unknown".into())
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_ref()))
}

fn check_host_path(volume: &str, path: &Path, kind: &str) -> Result<(), VolumeError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = fs::metadata(path);
    let mismatch = |expected: &str| VolumeError::HostPathType {
        volume: volume.into(),
        path: path.into(),
        expected: expected.into(),
    };
    match kind {
        "" => Ok(()),
        "DirectoryOrCreate" => {
            if meta.is_err() {
                fs::create_dir_all(path).map_err(io_err(volume, "create", path))?;
            }
            Ok(())
        }
        "FileOrCreate" => {
            if meta.is_err() {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(io_err(volume, "create", parent))?;
                }
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(io_err(volume, "create", path))?;
            }
            Ok(())
        }
        "Directory" => meta
            .ok()
            .filter(|m| m.is_dir())
            .map(|_| ())
            .ok_or_else(|| mismatch("directory")),
        "File" => meta
            .ok()
            .filter(|m| m.is_file())
            .map(|_| ())
            .ok_or_else(|| mismatch("file")),
        "Socket" => meta
            .ok()
            .filter(|m| m.file_type().is_socket())
            .map(|_| ())
            .ok_or_else(|| mismatch("socket")),
        "CharDevice" => meta
            .ok()
            .filter(|m| m.file_type().is_char_device())
            .map(|_| ())
            .ok_or_else(|| mismatch("character device")),
        "BlockDevice" => meta
            .ok()
            .filter(|m| m.file_type().is_block_device())
            .map(|_| ())
            .ok_or_else(|| mismatch("block device")),
        other => Err(mismatch(&format!("known hostPath type (got {other:?})"))),
    }
}

/// Make every volume of the pod exist on the host; returns volume name →
/// host path, for the container mounts.
pub fn prepare(
    pod_dir: &Path,
    pod: &Pod,
    inputs: &Inputs<'_>,
) -> Result<HashMap<String, PathBuf>, VolumeError> {
    let mut paths = HashMap::new();
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for v in &volumes {
        let path = if let Some(ed) = &v.empty_dir {
            let dir = pod_dir.join("volumes").join(EMPTY_DIR).join(&v.name);
            fs::create_dir_all(&dir).map_err(io_err(&v.name, "create", &dir))?;
            if ed.medium.as_deref() == Some("Memory") && !is_mount_point(&dir) {
                let mut opts = String::from("mode=0777");
                if let Some(limit) = ed
                    .size_limit
                    .as_ref()
                    .and_then(|q| crate::pod::spec::parse_bytes(&q.0))
                {
                    opts.push_str(&format!(",size={limit}"));
                }
                mount_tmpfs(&v.name, &dir, &opts)?;
            } else {
                // Containers may run as any user: kubelet makes emptyDir 0777.
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))
                    .map_err(io_err(&v.name, "chmod", &dir))?;
            }
            dir
        } else if let Some(hp) = &v.host_path {
            let path = PathBuf::from(&hp.path);
            check_host_path(&v.name, &path, hp.type_.as_deref().unwrap_or(""))?;
            path
        } else if let Some((plugin, tmpfs)) = api_data_dir(v) {
            prepare_api_data(pod_dir, pod, v, plugin, tmpfs, inputs)?
        } else {
            return Err(VolumeError::Unsupported {
                volume: v.name.clone(),
                kind: kind_of(v),
            });
        };
        paths.insert(v.name.clone(), path);
    }
    Ok(paths)
}

/// Mount points at or under `dir` (per /proc/self/mountinfo).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Unmount what `prepare` mounted and remove the pod dir. Idempotent.
/// Nothing is removed while anything is still mounted under the pod dir
/// (a removal must never cross into a mount).
pub fn cleanup(pod_dir: &Path) -> Result<(), VolumeError> {
    for plugin in [EMPTY_DIR, SECRET, PROJECTED, CONFIG_MAP, DOWNWARD_API] {
        let Ok(entries) = fs::read_dir(pod_dir.join("volumes").join(plugin)) else {
            continue;
        };
        for e in entries.flatten() {
            let dir = e.path();
            if is_mount_point(&dir) {
                nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH)
                    .map_err(|err| io_err(plugin, "unmount", &dir)(io::Error::from(err)))?;
            }
        }
    }
    if let Some(left) = mounts_under(pod_dir).into_iter().next() {
        return Err(io_err("pod", "refuse to remove (still mounted)", &left)(
            io::Error::from(io::ErrorKind::ResourceBusy),
        ));
    }
    match fs::remove_dir_all(pod_dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("pod", "remove", pod_dir)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::pod::objects::Resolved;

    fn pod(volumes: &str) -> Pod {
        crate::yaml::from_str(&format!("spec:\n  containers: []\n  volumes: {volumes}\n")).unwrap()
    }

    fn inputs(objects: &Resolved) -> Inputs<'_> {
        Inputs {
            objects,
            node: Allocatable::default(),
            now: jiff::Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn empty_dir_and_host_path() {
        let none = Resolved::default();
        let tmp = tempfile::tempdir().unwrap();
        let host = tmp.path().join("host");
        let p = pod(&format!(
            "[{{name: scratch, emptyDir: {{}}}}, {{name: h, hostPath: {{path: {}, type: DirectoryOrCreate}}}}]",
            host.display()
        ));
        let pod_dir = tmp.path().join("pods/u1");
        let paths = prepare(&pod_dir, &p, &inputs(&none)).unwrap();
        assert!(paths["scratch"].ends_with("volumes/kubernetes.io~empty-dir/scratch"));
        assert!(paths["scratch"].is_dir());
        assert!(host.is_dir());
        // Idempotent.
        assert_eq!(prepare(&pod_dir, &p, &inputs(&none)).unwrap(), paths);
        cleanup(&pod_dir).unwrap();
        assert!(!pod_dir.exists());
        cleanup(&pod_dir).unwrap();
    }

    #[test]
    fn host_path_type_mismatch_and_unsupported_kind() {
        let none = Resolved::default();
        let tmp = tempfile::tempdir().unwrap();
        let p = pod("[{name: h, hostPath: {path: /nonexistent/x, type: Directory}}]");
        let e = prepare(tmp.path(), &p, &inputs(&none)).unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
        let p = pod("[{name: c, nfs: {server: x, path: /}}]");
        let e = prepare(tmp.path(), &p, &inputs(&none)).unwrap_err();
        assert!(e.to_string().contains("nfs is not supported"), "{e}");
    }

    #[test]
    fn memory_empty_dir_is_a_tmpfs() {
        let none = Resolved::default();
        let tmp = tempfile::tempdir().unwrap();
        let p = pod("[{name: m, emptyDir: {medium: Memory, sizeLimit: 1Mi}}]");
        let pod_dir = tmp.path().join("pods/u2");
        let paths = prepare(&pod_dir, &p, &inputs(&none)).unwrap();
        assert!(
            is_mount_point(&paths["m"]),
            "needs root: tests run as root in CI"
        );
        prepare(&pod_dir, &p, &inputs(&none)).unwrap();
        cleanup(&pod_dir).unwrap();
        assert!(!pod_dir.exists());
    }

    #[test]
    fn secret_volume_on_tmpfs_with_kubelet_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let p = pod("[{name: tok, secret: {secretName: pw}}, {name: cfg, configMap: {name: cm}}]");
        let pod_dir = tmp.path().join("pods/u3");
        // Missing: kubelet's FailedMount text, nothing mounted.
        let e = prepare(&pod_dir, &p, &inputs(&Resolved::default())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "MountVolume.SetUp failed for volume \"tok\" : secret \"pw\" not found"
        );
        assert!(mounts_under(&pod_dir).is_empty());
        let mut objects = Resolved::default();
        let s: k8s_openapi::api::core::v1::Secret =
            crate::yaml::from_str("data: {token: c2VjcmV0}\n").unwrap();
        let cm: k8s_openapi::api::core::v1::ConfigMap =
            crate::yaml::from_str("data: {x: hello}\n").unwrap();
        objects
            .secrets
            .insert("pw".into(), Some(std::sync::Arc::new(s)));
        objects
            .config_maps
            .insert("cm".into(), Some(std::sync::Arc::new(cm)));
        let paths = prepare(&pod_dir, &p, &inputs(&objects)).unwrap();
        assert!(paths["tok"].ends_with("volumes/kubernetes.io~secret/tok"));
        assert!(paths["cfg"].ends_with("volumes/kubernetes.io~configmap/cfg"));
        assert!(
            is_mount_point(&paths["tok"]),
            "needs root: tests run as root in CI"
        );
        assert!(!is_mount_point(&paths["cfg"]));
        assert_eq!(
            fs::read_to_string(paths["tok"].join("token")).unwrap(),
            "secret"
        );
        assert_eq!(fs::read_to_string(paths["cfg"].join("x")).unwrap(), "hello");
        assert!(paths["tok"].join("..data").is_symlink());
        prepare(&pod_dir, &p, &inputs(&objects)).unwrap();
        cleanup(&pod_dir).unwrap();
        assert!(!pod_dir.exists());
    }
}
