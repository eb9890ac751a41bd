//! kubelet's atomic writer: the files of an API data volume (secret,
//! configMap, downwardAPI, projected) are written into a fresh timestamped
//! directory `..<ts>`, a `..data` symlink to it is swapped in with one
//! rename, and each top-level name is a symlink `name -> ..data/name`. A
//! container reading the volume sees the old files or the new ones, never a
//! half-written mix.
//!
//! Side effects: file writes, symlinks and removals under the volume dir.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

/// One file of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct File {
    pub data: Vec<u8>,
    pub mode: u32,
}

/// A volume's files: path relative to the volume dir → file.
pub type Payload = BTreeMap<String, File>;

const DATA: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

/// Why a payload could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// kubelet's path rules: relative, no `..` element, not starting `..`.
    #[error("invalid path {path:?}: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> WriteError {
    let path = path.to_path_buf();
    move |source| WriteError::Io {
        action,
        path,
        source,
    }
}

/// kubelet's `validatePath`.
pub fn validate_path(path: &str) -> Result<(), WriteError> {
    let bad = |why| {
        Err(WriteError::BadPath {
            path: path.to_string(),
            why,
        })
    };
    if path.is_empty() {
        return bad("must not be empty");
    }
    if path.len() > 4096 {
        return bad("must be less than or equal to 4096 characters");
    }
    let p = Path::new(path);
    if p.is_absolute() {
        return bad("must be relative");
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return bad("must not contain '..'");
    }
    if path.starts_with("..") {
        return bad("must not start with '..'");
    }
    Ok(())
}

/// The files under `dir`, recursively, as a payload (paths relative to `dir`).
fn read_tree(dir: &Path) -> io::Result<Payload> {
    let mut out = Payload::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(dir.join(&rel))? {
            let e = e?;
            let rel = rel.join(e.file_name());
            let meta = fs::symlink_metadata(e.path())?;
            if meta.is_dir() {
                stack.push(rel);
            } else {
                out.insert(
                    rel.to_string_lossy().into_owned(),
                    File {
                        data: fs::read(e.path())?,
                        mode: meta.permissions().mode() & 0o7777,
                    },
                );
            }
        }
    }
    Ok(out)
}

fn first_component(path: &str) -> &str {
    path.split('/').find(|s| !s.is_empty()).unwrap_or(path)
}

/// Make `dir` hold exactly `payload`, atomically. Returns whether anything
/// changed (false when the current `..data` already holds the payload).
pub fn write(dir: &Path, payload: &Payload, now: jiff::Timestamp) -> Result<bool, WriteError> {
    for path in payload.keys() {
        validate_path(path)?;
    }
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let data_link = dir.join(DATA);
    let old = fs::read_link(&data_link).ok();
    if let Some(old) = &old
        && read_tree(&dir.join(old)).ok().as_ref() == Some(payload)
    {
        return Ok(false);
    }
    // kubelet's `..2006_01_02_15_04_05.<random>`; nanoseconds keep it unique.
    let ts_name = format!(
        "..{}.{:09}",
        now.strftime("%Y_%m_%d_%H_%M_%S"),
        now.subsec_nanosecond()
    );
    let ts_dir = dir.join(&ts_name);
    if ts_dir.exists() {
        fs::remove_dir_all(&ts_dir).map_err(io_err("remove", &ts_dir))?;
    }
    fs::create_dir(&ts_dir).map_err(io_err("create", &ts_dir))?;
    fs::set_permissions(&ts_dir, fs::Permissions::from_mode(0o755))
        .map_err(io_err("chmod", &ts_dir))?;
    for (rel, file) in payload {
        let path = ts_dir.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        fs::write(&path, &file.data).map_err(io_err("write", &path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(file.mode))
            .map_err(io_err("chmod", &path))?;
    }
    // Swap `..data` in one rename.
    let tmp = dir.join(DATA_TMP);
    let _ = fs::remove_file(&tmp);
    symlink(&ts_name, &tmp).map_err(io_err("symlink", &tmp))?;
    fs::rename(&tmp, &data_link).map_err(io_err("rename", &tmp))?;
    // The user-visible names.
    let wanted: BTreeSet<&str> = payload.keys().map(|p| first_component(p)).collect();
    for name in &wanted {
        let link = dir.join(name);
        if fs::symlink_metadata(&link).is_err() {
            symlink(Path::new(DATA).join(name), &link).map_err(io_err("symlink", &link))?;
        }
    }
    // What the old payload had and the new one lacks, then the old files.
    for e in fs::read_dir(dir).map_err(io_err("list", dir))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("..") || wanted.contains(name.as_str()) {
            continue;
        }
        if e.file_type().is_ok_and(|t| t.is_symlink()) {
            fs::remove_file(e.path()).map_err(io_err("remove", &e.path()))?;
        }
    }
    if let Some(old) = old.filter(|o| *o != Path::new(&ts_name)) {
        let old = dir.join(old);
        fs::remove_dir_all(&old).map_err(io_err("remove", &old))?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(files: &[(&str, &str, u32)]) -> Payload {
        files
            .iter()
            .map(|(p, d, m)| {
                (
                    p.to_string(),
                    File {
                        data: d.as_bytes().to_vec(),
                        mode: *m,
                    },
                )
            })
            .collect()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn kubelet_layout_and_atomic_update() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vol");
        let t1: jiff::Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
        let p1 = payload(&[("a", "1", 0o644), ("sub/b", "2", 0o400)]);
        assert!(write(&dir, &p1, t1).unwrap());
        let got = names(&dir);
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got[0].starts_with("..2026_12_01_10_00_00."), "{got:?}");
        assert_eq!(&got[1..], ["..data", "a", "sub"]);
        assert_eq!(fs::read_link(dir.join("a")).unwrap(), Path::new("..data/a"));
        assert_eq!(fs::read_to_string(dir.join("sub/b")).unwrap(), "2");
        let mode = fs::metadata(dir.join("sub/b"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);
        // Same payload: nothing changes.
        let t2: jiff::Timestamp = "2026-12-01T10:01:00Z".parse().unwrap();
        assert!(!write(&dir, &p1, t2).unwrap());
        assert_eq!(names(&dir), got);
        // New payload: a new ts dir, `b`'s tree gone, `c` new.
        let p2 = payload(&[("a", "changed", 0o644), ("c", "3", 0o644)]);
        assert!(write(&dir, &p2, t2).unwrap());
        let got = names(&dir);
        assert!(got[0].starts_with("..2026_12_01_10_01_00."), "{got:?}");
        assert_eq!(&got[1..], ["..data", "a", "c"]);
        assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "changed");
    }

    #[test]
    fn bad_paths_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let now = jiff::Timestamp::UNIX_EPOCH;
        for bad in ["/abs", "../x", "a/../b", "..hidden", ""] {
            let e = write(tmp.path(), &payload(&[(bad, "x", 0o644)]), now).unwrap_err();
            assert!(matches!(e, WriteError::BadPath { .. }), "{bad}: {e}");
        }
    }
}
