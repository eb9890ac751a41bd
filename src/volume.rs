//! Pod volumes on the host: emptyDir (a directory under the pod dir, or a
//! tmpfs for `medium: Memory`) and hostPath (with kubelet's type checks).
//! Paths follow kubelet's layout:
//! `<stateDir>/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>`.
//!
//! Side effects: mkdir, tmpfs mount/unmount, removal of the pod dir. Every
//! step is idempotent (an existing dir or mount is kept), so a restarted
//! agent can run it again.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Pod, Volume};

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

/// The volume kinds `prepare` sets up, as the API names them; the static
/// pod source refuses pods with any other kind.
pub const SUPPORTED_KINDS: &[&str] = &["emptyDir", "hostPath"];

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
pub fn prepare(pod_dir: &Path, pod: &Pod) -> Result<HashMap<String, PathBuf>, VolumeError> {
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
                nix::mount::mount(
                    Some("tmpfs"),
                    &dir,
                    Some("tmpfs"),
                    nix::mount::MsFlags::empty(),
                    Some(opts.as_str()),
                )
                .map_err(|e| io_err(&v.name, "mount tmpfs on", &dir)(io::Error::from(e)))?;
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

/// Unmount what `prepare` mounted and remove the pod dir. Idempotent.
pub fn cleanup(pod_dir: &Path) -> Result<(), VolumeError> {
    let empty_dirs = pod_dir.join("volumes").join(EMPTY_DIR);
    if let Ok(entries) = fs::read_dir(&empty_dirs) {
        for e in entries.flatten() {
            let dir = e.path();
            if is_mount_point(&dir) {
                nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH)
                    .map_err(|err| io_err("emptyDir", "unmount", &dir)(io::Error::from(err)))?;
            }
        }
    }
    match fs::remove_dir_all(pod_dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("pod", "remove", pod_dir)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(volumes: &str) -> Pod {
        crate::yaml::from_str(&format!("spec:\n  containers: []\n  volumes: {volumes}\n")).unwrap()
    }

    #[test]
    fn empty_dir_and_host_path() {
        let tmp = tempfile::tempdir().unwrap();
        let host = tmp.path().join("host");
        let p = pod(&format!(
            "[{{name: scratch, emptyDir: {{}}}}, {{name: h, hostPath: {{path: {}, type: DirectoryOrCreate}}}}]",
            host.display()
        ));
        let pod_dir = tmp.path().join("pods/u1");
        let paths = prepare(&pod_dir, &p).unwrap();
        assert!(paths["scratch"].ends_with("volumes/kubernetes.io~empty-dir/scratch"));
        assert!(paths["scratch"].is_dir());
        assert!(host.is_dir());
        // Idempotent.
        assert_eq!(prepare(&pod_dir, &p).unwrap(), paths);
        cleanup(&pod_dir).unwrap();
        assert!(!pod_dir.exists());
        cleanup(&pod_dir).unwrap();
    }

    #[test]
    fn host_path_type_mismatch_and_unsupported_kind() {
        let tmp = tempfile::tempdir().unwrap();
        let p = pod("[{name: h, hostPath: {path: /nonexistent/x, type: Directory}}]");
        let e = prepare(tmp.path(), &p).unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
        let p = pod("[{name: c, configMap: {name: x}}]");
        let e = prepare(tmp.path(), &p).unwrap_err();
        assert!(e.to_string().contains("configMap is not supported"), "{e}");
    }

    #[test]
    fn memory_empty_dir_is_a_tmpfs() {
        let tmp = tempfile::tempdir().unwrap();
        let p = pod("[{name: m, emptyDir: {medium: Memory, sizeLimit: 1Mi}}]");
        let pod_dir = tmp.path().join("pods/u2");
        let paths = prepare(&pod_dir, &p).unwrap();
        assert!(
            is_mount_point(&paths["m"]),
            "needs root: tests run as root in CI"
        );
        prepare(&pod_dir, &p).unwrap();
        cleanup(&pod_dir).unwrap();
        assert!(!pod_dir.exists());
    }
}
