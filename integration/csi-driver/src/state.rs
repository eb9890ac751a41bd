//! The driver's memory of its volumes: one JSON file per volume under
//! `<state>/volumes/`, each written atomically (temp file, fsync, rename),
//! so a restarted driver knows what it created, attached, staged and
//! published.
//!
//! Side effects: reads and writes files under the state dir.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file operation on `path` failed.
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A state file holds something else than a volume.
    #[error("state file {path} is corrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// One volume, as the driver knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    /// CreateVolume's name; empty for an inline ephemeral volume.
    #[serde(default)]
    pub name: String,
    pub capacity_bytes: u64,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// An inline ephemeral volume: made by NodePublishVolume, gone with its
    /// last NodeUnpublishVolume.
    #[serde(default)]
    pub ephemeral: bool,
    /// The sparse file backing it.
    pub disk: PathBuf,
    /// ControllerPublishVolume: node id → the publish_context returned.
    #[serde(default)]
    pub attachments: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub stage: Option<Stage>,
    /// NodePublishVolume: target path → how.
    #[serde(default)]
    pub publishes: BTreeMap<PathBuf, Publish>,
}

/// Where and how a volume is staged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    pub staging_path: PathBuf,
    pub device: PathBuf,
    pub fs_type: String,
    #[serde(default)]
    pub mount_flags: Vec<String>,
}

/// How a volume is published at one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    pub read_only: bool,
}

/// A file name for any id: safe characters kept, the others %-escaped.
pub fn file_key(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.starts_with('.') {
        out.replace_range(0..1, "%2E");
    }
    out
}

/// Write `bytes` to `path` atomically: a reader sees the old or the new
/// content, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let io = |op: &'static str, p: &Path| {
        let path = p.to_path_buf();
        move |source| StateError::Io { op, path, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("create dir", dir))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename into", path))?;
    // The rename itself is durable once the directory is.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The volume files under one state dir.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(state_dir: &Path) -> Store {
        Store {
            dir: state_dir.join("volumes"),
        }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{}.json", file_key(id)))
    }

    pub fn load(&self, id: &str) -> Result<Option<Volume>, StateError> {
        let path = self.path(id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    op: "read",
                    path,
                    source,
                });
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Corrupt { path, source })
    }

    pub fn save(&self, volume: &Volume) -> Result<(), StateError> {
        // Serialising these plain types cannot fail.
        let bytes = serde_json::to_vec_pretty(volume).unwrap_or_default();
        write_atomic(&self.path(&volume.id), &bytes)
    }

    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StateError::Io {
                op: "remove",
                path,
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_are_safe_and_distinct() {
        assert_eq!(file_key("vol-1_a.b"), "vol-1_a.b");
        assert_eq!(file_key("a/b"), "a%2Fb");
        assert_eq!(file_key(".."), "%2E.");
        assert_ne!(file_key("a/b"), file_key("a%2Fb"));
    }

    #[test]
    fn volumes_round_trip_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let v = Volume {
            id: "a/b".into(),
            name: "n".into(),
            capacity_bytes: 5,
            parameters: BTreeMap::new(),
            ephemeral: false,
            disk: "/d".into(),
            attachments: BTreeMap::new(),
            stage: Some(Stage {
                staging_path: "/s".into(),
                device: "/dev/loop0".into(),
                fs_type: "ext4".into(),
                mount_flags: vec![],
            }),
            publishes: BTreeMap::from([("/t".into(), Publish { read_only: true })]),
        };
        assert_eq!(store.load("a/b").unwrap(), None);
        store.save(&v).unwrap();
        assert_eq!(store.load("a/b").unwrap(), Some(v));
        store.remove("a/b").unwrap();
        store.remove("a/b").unwrap();
        assert_eq!(store.load("a/b").unwrap(), None);
    }
}
