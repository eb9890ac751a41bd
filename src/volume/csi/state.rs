//! What the CSI volume plugin keeps on disk, in kubelet's layout, so a
//! restarted agent knows what it staged and published with no pod spec:
//!
//! - staging (global) path per volume per node:
//!   `<root>/plugins/kubernetes.io/csi/<driver>/<sha256(volumeHandle)>/globalmount`,
//!   with `vol_data.json` beside it (`StageData`);
//! - publish target per pod:
//!   `<root>/pods/<uid>/volumes/kubernetes.io~csi/<specVolID>/mount`, with
//!   `vol_data.json` in `<specVolID>/` (`PublishData`).
//!
//! The files hold kubelet's keys (a JSON object of strings), plus the few
//! minilet needs to tear down alone.
//!
//! Side effects: reads and atomic writes (temp file + rename) of those
//! files, directory listing of `<root>/pods`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// kubelet's plugin dir name under `pods/<uid>/volumes/`.
pub const PLUGIN_DIR: &str = "kubernetes.io~csi";
/// The record next to each mount (kubelet's name).
pub const VOL_DATA: &str = "vol_data.json";
/// The pod's mount dir under `<specVolID>/`.
pub const MOUNT: &str = "mount";

/// Lower-case hex SHA-256, as kubelet's `%x` of `sha256.Sum256`.
pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// kubelet's volume handle of an inline ephemeral volume:
/// `csi-<sha256(podUID + volumeName)>`.
pub fn ephemeral_handle(pod_uid: &str, volume: &str) -> String {
    format!(
        "csi-{}",
        sha256_hex(format!("{pod_uid}{volume}").as_bytes())
    )
}

/// kubelet's VolumeAttachment name: `csi-<sha256(handle + driver + node)>`.
pub fn attachment_id(handle: &str, driver: &str, node: &str) -> String {
    format!(
        "csi-{}",
        sha256_hex(format!("{handle}{driver}{node}").as_bytes())
    )
}

/// `<root>/plugins/kubernetes.io/csi/<driver>/<sha256(handle)>`: holds the
/// staging path `globalmount` and its `vol_data.json`.
pub fn global_dir(root: &Path, driver: &str, handle: &str) -> PathBuf {
    root.join("plugins/kubernetes.io/csi")
        .join(driver)
        .join(sha256_hex(handle.as_bytes()))
}

/// The staging target path of a volume.
pub fn staging_path(root: &Path, driver: &str, handle: &str) -> PathBuf {
    global_dir(root, driver, handle).join("globalmount")
}

/// `volumeLifecycleMode` (kubelet's storage.VolumeLifecycleMode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lifecycle {
    Persistent,
    Ephemeral,
}

/// `"true"` / `"false"`: kubelet's vol_data.json is a map of strings.
mod string_bool {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &bool, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if *v { "true" } else { "false" })
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        Ok(String::deserialize(d)? == "true")
    }
}

/// The pod side record (`<specVolID>/vol_data.json`), written before
/// NodePublishVolume (and before staging), removed last on teardown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishData {
    #[serde(rename = "specVolID")]
    pub spec_vol_id: String,
    #[serde(rename = "volumeHandle")]
    pub volume_handle: String,
    #[serde(rename = "driverName")]
    pub driver_name: String,
    #[serde(rename = "nodeName")]
    pub node_name: String,
    #[serde(rename = "attachmentID")]
    pub attachment_id: String,
    #[serde(rename = "volumeLifecycleMode")]
    pub lifecycle: Lifecycle,
    /// minilet: the staging path this publish uses; empty when the driver
    /// does not stage (so teardown knows whether to unstage).
    #[serde(
        rename = "stagingTargetPath",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub staging_target_path: String,
    /// minilet: NodePublishVolume and the fsGroup change both succeeded.
    #[serde(rename = "published", default, with = "string_bool")]
    pub published: bool,
}

/// The global record (`<sha256>/vol_data.json`), written before
/// NodeStageVolume, removed after NodeUnstageVolume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageData {
    #[serde(rename = "volumeHandle")]
    pub volume_handle: String,
    #[serde(rename = "driverName")]
    pub driver_name: String,
    /// minilet: NodeStageVolume succeeded.
    #[serde(rename = "staged", default, with = "string_bool")]
    pub staged: bool,
}

/// Errors reading or writing the records.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file system operation on a record or its dir failed.
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A record that is not kubelet's JSON of strings.
    #[error("parse {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io {
        action,
        path,
        source,
    }
}

/// Read `dir/vol_data.json`; `None` when there is none.
pub fn read<T: for<'de> Deserialize<'de>>(dir: &Path) -> Result<Option<T>, StateError> {
    let path = dir.join(VOL_DATA);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Parse { path, source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

/// Write `dir/vol_data.json` atomically (a crash leaves the old or the new
/// record, never half of one), creating `dir`.
pub fn write<T: Serialize>(dir: &Path, data: &T) -> Result<(), StateError> {
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let path = dir.join(VOL_DATA);
    let tmp = dir.join(format!(".{VOL_DATA}.tmp"));
    let bytes = serde_json::to_vec(data).map_err(|source| StateError::Parse {
        path: path.clone(),
        source,
    })?;
    fs::write(&tmp, bytes).map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))
}

/// Remove a file or an empty dir; already gone counts as done.
pub fn remove(path: &Path) -> Result<(), StateError> {
    let r = if path.is_dir() {
        fs::remove_dir(path)
    } else {
        fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", path)(e)),
        _ => Ok(()),
    }
}

/// The pod volume dirs (`<root>/pods/*/volumes/kubernetes.io~csi/*`) whose
/// record names this driver and handle: the publishes that still use a
/// staged volume. Unreadable records count as users (never unstage under
/// a pod we cannot read).
pub fn publishers(root: &Path, driver: &str, handle: &str) -> Vec<PathBuf> {
    let Ok(pods) = fs::read_dir(root.join("pods")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for pod in pods.flatten() {
        let Ok(vols) = fs::read_dir(pod.path().join("volumes").join(PLUGIN_DIR)) else {
            continue;
        };
        for vol in vols.flatten() {
            let dir = vol.path();
            match read::<PublishData>(&dir) {
                Ok(Some(d)) if d.driver_name != driver || d.volume_handle != handle => {}
                Ok(None) => {}
                _ => out.push(dir),
            }
        }
    }
    out.sort();
    out
}

/// The (driver, handle) of every global record under
/// `<root>/plugins/kubernetes.io/csi/*/*/`; unreadable ones are skipped
/// (without a handle there is nothing to ask a driver).
pub fn staged_volumes(root: &Path) -> Vec<(String, String)> {
    let Ok(drivers) = fs::read_dir(root.join("plugins/kubernetes.io/csi")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for driver in drivers.flatten() {
        let Ok(vols) = fs::read_dir(driver.path()) else {
            continue;
        };
        for vol in vols.flatten() {
            if let Ok(Some(d)) = read::<StageData>(&vol.path()) {
                out.push((d.driver_name, d.volume_handle));
            }
        }
    }
    out.sort();
    out
}

/// The node's `status.volumesInUse`: kubelet's unique names
/// (`kubernetes.io/csi/<driver>^<handle>`) of the persistent volumes with
/// a record on disk, staged or published to a pod, sorted. The
/// attach/detach controller does not detach a volume the node still lists.
/// Inline ephemeral volumes are never attached: not listed.
pub fn volumes_in_use(root: &Path) -> Vec<String> {
    let mut out: std::collections::BTreeSet<String> = staged_volumes(root)
        .into_iter()
        .map(|(d, h)| unique_name(&d, &h))
        .collect();
    if let Ok(pods) = fs::read_dir(root.join("pods")) {
        for pod in pods.flatten() {
            let Ok(vols) = fs::read_dir(pod.path().join("volumes").join(PLUGIN_DIR)) else {
                continue;
            };
            for vol in vols.flatten() {
                if let Ok(Some(d)) = read::<PublishData>(&vol.path())
                    && d.lifecycle == Lifecycle::Persistent
                {
                    out.insert(unique_name(&d.driver_name, &d.volume_handle));
                }
            }
        }
    }
    out.into_iter().collect()
}

/// kubelet's unique volume name of a CSI volume.
pub fn unique_name(driver: &str, handle: &str) -> String {
    format!("kubernetes.io/csi/{driver}^{handle}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_names_follow_kubelet() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            ephemeral_handle("uid", "vol"),
            format!("csi-{}", sha256_hex(b"uidvol"))
        );
        let p = staging_path(Path::new("/var/lib/minilet"), "d.example", "abc");
        assert_eq!(
            p,
            Path::new(
                "/var/lib/minilet/plugins/kubernetes.io/csi/d.example/ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad/globalmount"
            )
        );
    }

    #[test]
    fn records_hold_kubelet_keys_as_strings() {
        let tmp = tempfile::tempdir().unwrap();
        let d = PublishData {
            spec_vol_id: "pv1".into(),
            volume_handle: "h".into(),
            driver_name: "d".into(),
            node_name: "n".into(),
            attachment_id: attachment_id("h", "d", "n"),
            lifecycle: Lifecycle::Persistent,
            staging_target_path: String::new(),
            published: false,
        };
        write(tmp.path(), &d).unwrap();
        let json: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&fs::read(tmp.path().join(VOL_DATA)).unwrap()).unwrap();
        let mut keys: Vec<_> = json.keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "attachmentID",
                "driverName",
                "nodeName",
                "published",
                "specVolID",
                "volumeHandle",
                "volumeLifecycleMode"
            ]
        );
        assert!(json.values().all(|v| v.is_string()), "{json:?}");
        assert_eq!(json["volumeLifecycleMode"], "Persistent");
        assert_eq!(read::<PublishData>(tmp.path()).unwrap(), Some(d));
        // A record kubelet wrote (no minilet keys) reads too.
        fs::write(
            tmp.path().join(VOL_DATA),
            r#"{"specVolID":"v","volumeHandle":"h","driverName":"d","nodeName":"n","attachmentID":"a","volumeLifecycleMode":"Ephemeral"}"#,
        )
        .unwrap();
        let k = read::<PublishData>(tmp.path()).unwrap().unwrap();
        assert_eq!(k.lifecycle, Lifecycle::Ephemeral);
        assert!(!k.published);
        assert!(
            read::<StageData>(&tmp.path().join("none"))
                .unwrap()
                .is_none()
        );
    }
}
