//! Pod volumes on the host, and the volume stage's two steps: `set_up`
//! (before the sandbox, `lifecycle::Action::SetUpVolumes`) and `tear_down`
//! (after the sandbox is removed, `Action::TearDownVolumes`).
//!
//! Built-in kinds are made here: emptyDir (a directory under the pod dir,
//! or a tmpfs for `medium: Memory`), hostPath (with kubelet's type checks),
//! and the API data volumes secret, configMap, downwardAPI and projected
//! (their files computed in `payload`, written by `atomic`; secret and
//! projected volumes on a tmpfs, as kubelet keeps secrets off disk). Other
//! kinds (CSI) are set up by an `External` plugin that handles them.
//! Paths follow kubelet's layout:
//! `<stateDir>/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>`
//! (`kubernetes.io~secret`, `~configmap`, `~downward-api`, `~projected`,
//! and each external plugin's own dir).
//!
//! Side effects: mkdir, file writes, mounts through the `mount::Mounter`
//! seam, the external plugins' calls, removal of the pod dir. Every step
//! is idempotent (an existing dir or mount is kept, an unchanged payload is
//! not rewritten), so a restarted agent can run it again, and running it
//! again picks up changed objects. Removal never crosses a mount point:
//! a pod dir that still holds a mount (or a volume dir no plugin here can
//! take down) is left in place, with kubelet's "orphaned pod" error.

pub mod atomic;
pub mod claims;
pub mod csi;
#[cfg(test)]
pub mod fake;
pub mod mount;
pub mod payload;
pub mod provision;
pub mod resolve;
pub mod stats;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Pod, Volume};

pub use mount::{HostMounter, Mounter};
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

/// A volume kind set up outside this module (CSI), asynchronously. The
/// volume stage calls `set_up` for each volume of a pod the plugin
/// `handles`, before the pod's sandbox is made, and `tear_down` for each
/// dir it finds under `pods/<uid>/volumes/<plugin_dir>/` once the pod's
/// sandbox is removed.
pub trait External: Send + Sync {
    /// kubelet's plugin dir name under pods/<uid>/volumes/ ("kubernetes.io~csi").
    fn plugin_dir(&self) -> &'static str;
    /// Whether this volume of the pod is this plugin's (inline `csi`, or a
    /// `persistentVolumeClaim` whose PV is CSI).
    fn handles(&self, pod: &Pod, volume: &Volume) -> bool;
    /// Make the volume available at (and return) the host path containers
    /// mount. Idempotent: called again after an agent restart and after a
    /// failed attempt (not on the periodic refresh). A failure should be
    /// `VolumeError::SetUp` (kubelet's FailedMount text, naming the driver
    /// and the call); it is retried with backoff.
    fn set_up<'a>(
        &'a self,
        pod: &'a Pod,
        volume: &'a Volume,
        pod_dir: &'a Path,
    ) -> BoxFuture<'a, Result<PathBuf, VolumeError>>;
    /// Undo set_up for a volume dir found on disk
    /// (pods/<uid>/volumes/<plugin_dir>/<name>), with no pod spec (the
    /// agent may have restarted). Idempotent. A failure should be
    /// `VolumeError::TearDown`; it is retried with backoff and the pod dir
    /// stays until it succeeds.
    fn tear_down<'a>(
        &'a self,
        pod_uid: &'a str,
        volume_dir: &'a Path,
    ) -> BoxFuture<'a, Result<(), VolumeError>>;
}

/// The external plugins of a node (`worker::Shared::external_volumes`).
pub type Externals = [Arc<dyn External>];

/// Errors setting up or tearing down a pod's volumes. Set-up errors read
/// as kubelet's FailedMount messages.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A volume kind neither this module nor any external plugin handles.
    #[error(
        "MountVolume.SetUp failed for volume {volume:?} : kind {kind} is not supported (no volume plugin handles it)"
    )]
    Unsupported { volume: String, kind: String },
    /// A hostPath that does not match its declared type.
    #[error(
        "MountVolume.SetUp failed for volume {volume:?} : hostPath type check failed: {path} is not a {expected}"
    )]
    HostPathType {
        volume: String,
        path: PathBuf,
        expected: String,
    },
    /// kubelet's FailedMount message (`MountVolume.SetUp failed for volume
    /// "x" : secret "y" not found`).
    #[error("MountVolume.SetUp failed for volume {volume:?} : {reason}")]
    SetUp { volume: String, reason: String },
    /// kubelet's message for the device steps of a CSI volume
    /// (`MountVolume.MountDevice failed for volume "x" : …`, `UnmountDevice`).
    #[error("{op} failed for volume {volume:?} : {reason}")]
    Operation {
        op: &'static str,
        volume: String,
        reason: String,
    },
    /// A file system or mount operation of a volume's set-up failed.
    #[error("MountVolume.SetUp failed for volume {volume:?} : {action} {path}")]
    Io {
        volume: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An external plugin could not take a volume down (kubelet's words).
    #[error("UnmountVolume.TearDown failed for volume {volume:?} : {reason}")]
    TearDown { volume: String, reason: String },
    /// A file system or mount operation of the pod dir's cleanup failed.
    #[error("pod volumes cleanup: {action} {path}")]
    Cleanup {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Mounts (or volume dirs no plugin here can take down) remain under
    /// the pod dir after everything ours was undone: it is left in place.
    #[error(
        "orphaned pod {uid:?} found, but volume paths are still present on disk: {}",
        paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    StillPresent { uid: String, paths: Vec<PathBuf> },
    /// A removal reached a mount point (one that appeared after the check).
    #[error("refusing to remove {path}: it is a mount point")]
    MountPoint { path: PathBuf },
}

const EMPTY_DIR: &str = "kubernetes.io~empty-dir";
const SECRET: &str = "kubernetes.io~secret";
const CONFIG_MAP: &str = "kubernetes.io~configmap";
const DOWNWARD_API: &str = "kubernetes.io~downward-api";
const PROJECTED: &str = "kubernetes.io~projected";
/// The plugin dirs of the built-in kinds: ours to unmount and remove.
const BUILT_IN_DIRS: &[&str] = &[EMPTY_DIR, SECRET, CONFIG_MAP, DOWNWARD_API, PROJECTED];

/// The volume kinds a pod may use, as the API names them: those this
/// module sets up, and `csi` and `persistentVolumeClaim`, which the CSI
/// plugin (`csi`, an `External` the agent always has) sets up. The static
/// pod source and the API source refuse pods with any other kind.
pub const SUPPORTED_KINDS: &[&str] = &[
    "emptyDir",
    "hostPath",
    "secret",
    "configMap",
    "downwardAPI",
    "projected",
    "csi",
    "persistentVolumeClaim",
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

/// A tmpfs on `dir` unless one is there already.
fn ensure_tmpfs(m: &dyn Mounter, volume: &str, dir: &Path, opts: &str) -> Result<(), VolumeError> {
    let mounted = m
        .is_mount_point(dir)
        .map_err(io_err(volume, "read the mount table for", dir))?;
    if !mounted {
        m.mount_tmpfs(dir, opts)
            .map_err(io_err(volume, "mount tmpfs on", dir))?;
    }
    Ok(())
}

/// Set up one API data volume: its dir (a tmpfs for secrets), then its
/// files through the atomic writer.
fn prepare_api_data(
    pod_dir: &Path,
    pod: &Pod,
    v: &Volume,
    (plugin, tmpfs): (&str, bool),
    inputs: &Inputs<'_>,
    m: &dyn Mounter,
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
    if tmpfs {
        ensure_tmpfs(m, &v.name, &dir, "mode=0755")?;
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

fn cleanup_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> VolumeError {
    let path = path.to_path_buf();
    move |source| VolumeError::Cleanup {
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

/// Set up one built-in volume; `None` when its kind is not built in.
fn set_up_built_in(
    pod_dir: &Path,
    pod: &Pod,
    v: &Volume,
    inputs: &Inputs<'_>,
    m: &dyn Mounter,
) -> Result<Option<PathBuf>, VolumeError> {
    Ok(Some(if let Some(ed) = &v.empty_dir {
        let dir = pod_dir.join("volumes").join(EMPTY_DIR).join(&v.name);
        fs::create_dir_all(&dir).map_err(io_err(&v.name, "create", &dir))?;
        if ed.medium.as_deref() == Some("Memory") {
            let mut opts = String::from("mode=0777");
            if let Some(limit) = ed
                .size_limit
                .as_ref()
                .and_then(|q| crate::pod::spec::parse_bytes(&q.0))
            {
                opts.push_str(&format!(",size={limit}"));
            }
            ensure_tmpfs(m, &v.name, &dir, &opts)?;
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
    } else if let Some(plugin) = api_data_dir(v) {
        prepare_api_data(pod_dir, pod, v, plugin, inputs, m)?
    } else {
        return Ok(None);
    }))
}

/// The volumes of the pod's spec.
pub fn volumes_of(pod: &Pod) -> &[Volume] {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or_default()
}

/// The volume stage's set-up: make every volume of the pod exist on the
/// host, built-in kinds here, the others through the external plugin
/// that handles them (those in parallel). Returns volume name → host
/// path, for the container mounts. The first failure is returned (as
/// kubelet's FailedMount text); what was set up stays (idempotent).
pub async fn set_up(
    pod_dir: &Path,
    pod: &Pod,
    inputs: &Inputs<'_>,
    mounter: &dyn Mounter,
    externals: &Externals,
) -> Result<HashMap<String, PathBuf>, VolumeError> {
    let mut paths = HashMap::new();
    let mut external = Vec::new();
    for v in volumes_of(pod) {
        if let Some(path) = set_up_built_in(pod_dir, pod, v, inputs, mounter)? {
            paths.insert(v.name.clone(), path);
            continue;
        }
        let Some(plugin) = externals.iter().find(|e| e.handles(pod, v)) else {
            return Err(VolumeError::Unsupported {
                volume: v.name.clone(),
                kind: kind_of(v),
            });
        };
        external.push(async move {
            let path = plugin.set_up(pod, v, pod_dir).await?;
            Ok::<_, VolumeError>((v.name.clone(), path))
        });
    }
    // Every call runs to its end (none is dropped halfway when another
    // fails); the first failure is the one reported.
    for r in futures::future::join_all(external).await {
        let (name, path) = r?;
        paths.insert(name, path);
    }
    Ok(paths)
}

/// kubelet's periodic volume sync for a running pod: rewrite its API data
/// volumes (an unchanged one is left as is, a changed object is written
/// anew, atomically), so ConfigMap and Secret updates reach it.
pub fn refresh(
    pod_dir: &Path,
    pod: &Pod,
    inputs: &Inputs<'_>,
    mounter: &dyn Mounter,
) -> Result<(), VolumeError> {
    for v in volumes_of(pod) {
        if let Some(plugin) = api_data_dir(v) {
            prepare_api_data(pod_dir, pod, v, plugin, inputs, mounter)?;
        }
    }
    Ok(())
}

/// The entries of a dir; none when it does not exist.
fn entries(dir: &Path) -> Result<Vec<PathBuf>, VolumeError> {
    match fs::read_dir(dir) {
        Ok(rd) => {
            let mut all: Vec<PathBuf> = rd
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()
                .map_err(cleanup_err("read", dir))?;
            all.sort();
            Ok(all)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(cleanup_err("read", dir)(e)),
    }
}

/// Detach every mount stacked on `dir` (two set-ups that raced may have
/// mounted twice).
fn unmount_all(m: &dyn Mounter, dir: &Path) -> Result<(), VolumeError> {
    for _ in 0..16 {
        if !m
            .is_mount_point(dir)
            .map_err(cleanup_err("read the mount table for", dir))?
        {
            return Ok(());
        }
        m.unmount(dir).map_err(cleanup_err("unmount", dir))?;
    }
    Ok(())
}

/// The volume stage's tear-down, for a pod whose sandbox is gone: unmount
/// what is ours (the tmpfs of emptyDir Memory, secret and projected
/// volumes), ask each external plugin to tear down the dirs it has under
/// the pod dir (found on disk: no pod spec needed), then remove the pod
/// dir, unless anything is still mounted under it or a volume dir is left
/// that no plugin here knows: then the dir stays, `StillPresent`. An
/// external plugin's failure is returned (to retry) after all were asked.
/// Idempotent; a pod dir that is gone is done.
pub async fn tear_down(
    pod_dir: &Path,
    uid: &str,
    mounter: &dyn Mounter,
    externals: &Externals,
) -> Result<(), VolumeError> {
    let volumes = pod_dir.join("volumes");
    for plugin in BUILT_IN_DIRS {
        for dir in entries(&volumes.join(plugin))? {
            unmount_all(mounter, &dir)?;
        }
    }
    let mut calls = Vec::new();
    for plugin in externals {
        for dir in entries(&volumes.join(plugin.plugin_dir()))? {
            calls.push(async move { plugin.tear_down(uid, &dir).await });
        }
    }
    let results = futures::future::join_all(calls).await;
    if let Some(e) = results.into_iter().find_map(Result::err) {
        return Err(e);
    }
    let mut left = mounter
        .mounts_under(pod_dir)
        .map_err(cleanup_err("read the mount table for", pod_dir))?;
    let known: HashSet<&str> = BUILT_IN_DIRS
        .iter()
        .copied()
        .chain(externals.iter().map(|e| e.plugin_dir()))
        .collect();
    for plugin in entries(&volumes)? {
        let name = plugin.file_name().unwrap_or_default().to_string_lossy();
        if !known.contains(name.as_ref()) {
            left.extend(entries(&plugin)?);
        }
    }
    if !left.is_empty() {
        left.sort();
        left.dedup();
        return Err(VolumeError::StillPresent {
            uid: uid.to_string(),
            paths: left,
        });
    }
    remove_tree(pod_dir, mounter)
}

/// Remove `root` and everything under it, bottom-up, never crossing into
/// a mount: a dir that is a mount point (in the mount table, or on another
/// device than `root`) stops the removal with `MountPoint`. Symlinks are
/// removed, not followed. Iterative, so a deep tree cannot exhaust the stack.
fn remove_tree(root: &Path, m: &dyn Mounter) -> Result<(), VolumeError> {
    use std::os::unix::fs::MetadataExt;
    let root = mount::canonical(root);
    let dev = match fs::symlink_metadata(&root) {
        Ok(meta) => meta.dev(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(cleanup_err("stat", &root)(e)),
    };
    let mounts: HashSet<PathBuf> = m
        .mounts_under(&root)
        .map_err(cleanup_err("read the mount table for", &root))?
        .into_iter()
        .collect();
    let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
    let mut stack = vec![(root, false)];
    while let Some((path, emptied)) = stack.pop() {
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(cleanup_err("stat", &path)(e)),
        };
        if !meta.is_dir() {
            match fs::remove_file(&path) {
                Err(e) if !gone(&e) => return Err(cleanup_err("remove", &path)(e)),
                _ => continue,
            }
        }
        if mounts.contains(&path) || meta.dev() != dev {
            return Err(VolumeError::MountPoint { path });
        }
        if emptied {
            match fs::remove_dir(&path) {
                Err(e) if !gone(&e) => return Err(cleanup_err("remove", &path)(e)),
                _ => continue,
            }
        }
        let children = entries(&path)?;
        stack.push((path, true));
        stack.extend(children.into_iter().map(|c| (c, false)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::pod::objects::Resolved;
    use fake::FakeExternal;
    use mount::fake::FakeMounter;

    fn pod(volumes: &str) -> Pod {
        crate::yaml::from_str(&format!(
            "metadata: {{uid: u1}}\nspec:\n  containers: []\n  volumes: {volumes}\n"
        ))
        .unwrap()
    }

    fn inputs(objects: &Resolved) -> Inputs<'_> {
        Inputs {
            objects,
            node: Allocatable::default(),
            now: jiff::Timestamp::UNIX_EPOCH,
        }
    }

    async fn prepare(
        pod_dir: &Path,
        p: &Pod,
        inputs: &Inputs<'_>,
        m: &dyn Mounter,
    ) -> Result<HashMap<String, PathBuf>, VolumeError> {
        set_up(pod_dir, p, inputs, m, &[]).await
    }

    #[tokio::test]
    async fn empty_dir_and_host_path() {
        let none = Resolved::default();
        let m = FakeMounter::default();
        let tmp = tempfile::tempdir().unwrap();
        let host = tmp.path().join("host");
        let p = pod(&format!(
            "[{{name: scratch, emptyDir: {{}}}}, {{name: h, hostPath: {{path: {}, type: DirectoryOrCreate}}}}]",
            host.display()
        ));
        let pod_dir = tmp.path().join("pods/u1");
        let paths = prepare(&pod_dir, &p, &inputs(&none), &m).await.unwrap();
        assert!(paths["scratch"].ends_with("volumes/kubernetes.io~empty-dir/scratch"));
        assert!(paths["scratch"].is_dir());
        assert!(host.is_dir());
        // Idempotent.
        assert_eq!(
            prepare(&pod_dir, &p, &inputs(&none), &m).await.unwrap(),
            paths
        );
        assert!(m.calls().is_empty(), "nothing to mount: {:?}", m.calls());
        tear_down(&pod_dir, "u1", &m, &[]).await.unwrap();
        assert!(!pod_dir.exists());
        assert!(host.is_dir(), "a hostPath is not the pod's to remove");
        tear_down(&pod_dir, "u1", &m, &[]).await.unwrap();
    }

    #[tokio::test]
    async fn host_path_type_mismatch_and_unsupported_kind() {
        let none = Resolved::default();
        let m = FakeMounter::default();
        let tmp = tempfile::tempdir().unwrap();
        let p = pod("[{name: h, hostPath: {path: /nonexistent/x, type: Directory}}]");
        let e = prepare(tmp.path(), &p, &inputs(&none), &m)
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "MountVolume.SetUp failed for volume \"h\" : hostPath type check failed: /nonexistent/x is not a directory"
        );
        let p = pod("[{name: c, nfs: {server: x, path: /}}]");
        let e = prepare(tmp.path(), &p, &inputs(&none), &m)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("nfs is not supported"), "{e}");
    }

    #[tokio::test]
    async fn tmpfs_volumes_are_mounted_once_and_unmounted_before_removal() {
        let mut objects = Resolved::default();
        let s: k8s_openapi::api::core::v1::Secret =
            crate::yaml::from_str("data: {token: c2VjcmV0}\n").unwrap();
        objects
            .secrets
            .insert("pw".into(), Some(std::sync::Arc::new(s)));
        let m = FakeMounter::default();
        let tmp = tempfile::tempdir().unwrap();
        let p =
            pod("[{name: m, emptyDir: {medium: Memory}}, {name: tok, secret: {secretName: pw}}]");
        let pod_dir = tmp.path().join("pods/u1");
        let paths = prepare(&pod_dir, &p, &inputs(&objects), &m).await.unwrap();
        prepare(&pod_dir, &p, &inputs(&objects), &m).await.unwrap();
        let mut mounted = m.mounts();
        mounted.sort();
        assert_eq!(mounted, [paths["m"].clone(), paths["tok"].clone()]);
        assert_eq!(m.calls().len(), 2, "mounted once each: {:?}", m.calls());
        tear_down(&pod_dir, "u1", &m, &[]).await.unwrap();
        assert!(m.mounts().is_empty());
        assert!(!pod_dir.exists());
    }

    #[tokio::test]
    async fn a_pod_dir_holding_a_foreign_mount_is_left_in_place() {
        let none = Resolved::default();
        let m = FakeMounter::default();
        let tmp = tempfile::tempdir().unwrap();
        let p = pod("[{name: m, emptyDir: {medium: Memory}}]");
        let pod_dir = tmp.path().join("pods/u1");
        prepare(&pod_dir, &p, &inputs(&none), &m).await.unwrap();
        // A CSI volume no plugin here knows, still mounted, with data.
        let data = pod_dir.join("volumes/kubernetes.io~csi/pv1/mount");
        fs::create_dir_all(&data).unwrap();
        fs::write(data.join("user-data"), "precious").unwrap();
        m.add_mount(&data);
        let e = tear_down(&pod_dir, "u1", &m, &[]).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "orphaned pod \"u1\" found, but volume paths are still present on disk: {}, {}",
                pod_dir.join("volumes/kubernetes.io~csi/pv1").display(),
                data.display()
            )
        );
        assert_eq!(
            fs::read_to_string(data.join("user-data")).unwrap(),
            "precious"
        );
        assert_eq!(m.mounts(), [data.as_path()], "ours unmounted, theirs kept");
        // Unmounted by its owner, the dir of an unknown plugin still stays.
        m.unmount(&data).unwrap();
        let e = tear_down(&pod_dir, "u1", &m, &[]).await.unwrap_err();
        assert!(matches!(e, VolumeError::StillPresent { .. }), "{e}");
        assert!(data.join("user-data").exists());
    }

    #[test]
    fn removal_refuses_to_cross_a_mount_point() {
        let m = FakeMounter::default();
        let tmp = tempfile::tempdir().unwrap();
        let inner = tmp.path().join("pod/a/b");
        fs::create_dir_all(&inner).unwrap();
        fs::write(inner.join("f"), "x").unwrap();
        m.add_mount(&inner);
        let e = remove_tree(&tmp.path().join("pod"), &m).unwrap_err();
        assert!(matches!(e, VolumeError::MountPoint { .. }), "{e}");
        assert!(inner.join("f").exists());
    }

    #[tokio::test]
    async fn external_volumes_are_set_up_and_torn_down_by_their_plugin() {
        let none = Resolved::default();
        let m = FakeMounter::default();
        let csi = Arc::new(FakeExternal::default());
        let externals: Vec<Arc<dyn External>> = vec![csi.clone()];
        let tmp = tempfile::tempdir().unwrap();
        let p = pod(
            "[{name: scratch, emptyDir: {}}, {name: a, csi: {driver: d}}, {name: b, csi: {driver: d}}]",
        );
        let pod_dir = tmp.path().join("pods/u1");
        let paths = set_up(&pod_dir, &p, &inputs(&none), &m, &externals)
            .await
            .unwrap();
        assert_eq!(paths["a"], pod_dir.join("volumes/fake~csi/a/mount"));
        let mut calls = csi.calls();
        calls.sort();
        assert_eq!(calls, ["set_up a", "set_up b"]);
        // Torn down from what is on disk: the uid is all it takes.
        csi.fail_tear_down("driver unavailable");
        let e = tear_down(&pod_dir, "u1", &m, &externals).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "UnmountVolume.TearDown failed for volume \"a\" : driver unavailable"
        );
        assert!(pod_dir.join("volumes/fake~csi/b").exists(), "kept to retry");
        csi.fail_tear_down("");
        tear_down(&pod_dir, "u1", &m, &externals).await.unwrap();
        assert!(!pod_dir.exists());
        assert!(
            csi.calls()
                .ends_with(&["tear_down u1 a".into(), "tear_down u1 b".into()])
        );
        // Without a plugin for them, csi volumes are refused at set-up.
        let e = set_up(&pod_dir, &p, &inputs(&none), &m, &[])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("kind csi is not supported"), "{e}");
    }

    #[tokio::test]
    async fn memory_empty_dir_is_a_tmpfs() {
        let none = Resolved::default();
        let m = HostMounter;
        let tmp = tempfile::tempdir().unwrap();
        let p = pod("[{name: m, emptyDir: {medium: Memory, sizeLimit: 1Mi}}]");
        let pod_dir = tmp.path().join("pods/u2");
        let paths = prepare(&pod_dir, &p, &inputs(&none), &m).await.unwrap();
        assert!(
            m.is_mount_point(&paths["m"]).unwrap(),
            "needs root: tests run as root in CI"
        );
        prepare(&pod_dir, &p, &inputs(&none), &m).await.unwrap();
        tear_down(&pod_dir, "u2", &m, &[]).await.unwrap();
        assert!(!pod_dir.exists());
    }

    /// Real mounts: a bind mount under the pod dir (a CSI publish, say)
    /// keeps the whole pod dir; the data behind it is untouched.
    #[tokio::test]
    async fn a_real_bind_mount_under_the_pod_dir_is_never_deleted() {
        let none = Resolved::default();
        let m = HostMounter;
        let tmp = tempfile::tempdir().unwrap();
        let p = pod("[{name: m, emptyDir: {}}]");
        let pod_dir = tmp.path().join("pods/u4");
        prepare(&pod_dir, &p, &inputs(&none), &m).await.unwrap();
        let disk = tmp.path().join("disk");
        fs::create_dir_all(&disk).unwrap();
        fs::write(disk.join("user-data"), "precious").unwrap();
        let target = pod_dir.join("volumes/kubernetes.io~empty-dir/m/inner");
        fs::create_dir_all(&target).unwrap();
        m.bind(&disk, &target)
            .expect("needs root: tests run as root in CI");
        let e = tear_down(&pod_dir, "u4", &m, &[]).await.unwrap_err();
        assert!(matches!(e, VolumeError::StillPresent { .. }), "{e}");
        assert_eq!(
            fs::read_to_string(disk.join("user-data")).unwrap(),
            "precious"
        );
        // The removal itself refuses to cross it, too.
        let bound = pod_dir.join("volumes/kubernetes.io~empty-dir/b");
        fs::create_dir_all(&bound).unwrap();
        m.bind(&disk, &bound).unwrap();
        let e = remove_tree(&pod_dir, &m).unwrap_err();
        assert!(matches!(e, VolumeError::MountPoint { .. }), "{e}");
        assert_eq!(
            fs::read_to_string(disk.join("user-data")).unwrap(),
            "precious"
        );
        for t in [&bound, &target] {
            let _ = m.unmount(t);
        }
        tear_down(&pod_dir, "u4", &m, &[]).await.unwrap();
        assert!(!pod_dir.exists());
        assert_eq!(
            fs::read_to_string(disk.join("user-data")).unwrap(),
            "precious"
        );
    }

    #[tokio::test]
    async fn secret_volume_on_tmpfs_with_kubelet_layout() {
        let m = HostMounter;
        let tmp = tempfile::tempdir().unwrap();
        let p = pod("[{name: tok, secret: {secretName: pw}}, {name: cfg, configMap: {name: cm}}]");
        let pod_dir = tmp.path().join("pods/u3");
        // Missing: kubelet's FailedMount text, nothing mounted.
        let e = prepare(&pod_dir, &p, &inputs(&Resolved::default()), &m)
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "MountVolume.SetUp failed for volume \"tok\" : secret \"pw\" not found"
        );
        assert!(m.mounts_under(&pod_dir).unwrap().is_empty());
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
        let paths = prepare(&pod_dir, &p, &inputs(&objects), &m).await.unwrap();
        assert!(paths["tok"].ends_with("volumes/kubernetes.io~secret/tok"));
        assert!(paths["cfg"].ends_with("volumes/kubernetes.io~configmap/cfg"));
        assert!(
            m.is_mount_point(&paths["tok"]).unwrap(),
            "needs root: tests run as root in CI"
        );
        assert!(!m.is_mount_point(&paths["cfg"]).unwrap());
        assert_eq!(
            fs::read_to_string(paths["tok"].join("token")).unwrap(),
            "secret"
        );
        assert_eq!(fs::read_to_string(paths["cfg"].join("x")).unwrap(), "hello");
        assert!(paths["tok"].join("..data").is_symlink());
        refresh(&pod_dir, &p, &inputs(&objects), &m).unwrap();
        tear_down(&pod_dir, "u3", &m, &[]).await.unwrap();
        assert!(!pod_dir.exists());
    }
}
