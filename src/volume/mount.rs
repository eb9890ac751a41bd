//! The mount side effects of pod volumes behind one narrow trait, so the
//! volume code can be tested without root and without touching the host's
//! mount table: tmpfs mounts (emptyDir `medium: Memory`, secret and
//! projected volumes), bind mounts, unmounts, and questions about the
//! mount table (is this a mount point, which mounts lie under a dir).
//!
//! `HostMounter` does it for real (mount(2)/umount2(2) via nix, the table
//! from /proc/self/mountinfo); `fake::FakeMounter` (tests only) keeps a
//! mount table in memory and records every call.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The mount operations the volume code needs. Errors are plain
/// `io::Error`s; callers add which volume and path they were about.
pub trait Mounter: Send + Sync {
    /// Mount a fresh tmpfs on `target` with these options (`mode=0755,size=…`).
    fn mount_tmpfs(&self, target: &Path, options: &str) -> io::Result<()>;
    /// Bind-mount `source` on `target`.
    fn bind(&self, source: &Path, target: &Path) -> io::Result<()>;
    /// Detach the mount on `target` (lazily: a busy mount goes at once from
    /// the tree and is freed when its last user leaves).
    fn unmount(&self, target: &Path) -> io::Result<()>;
    /// Every mount point at or under `dir`.
    fn mounts_under(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Whether `path` is a mount point.
    fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
        let path = canonical(path);
        Ok(self.mounts_under(&path)?.contains(&path))
    }
}

/// `path` with symlinks resolved, as the mount table names it; as given
/// when it cannot be resolved (it does not exist).
pub fn canonical(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The host's mount table and mount calls.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostMounter;

impl Mounter for HostMounter {
    fn mount_tmpfs(&self, target: &Path, options: &str) -> io::Result<()> {
        nix::mount::mount(
            Some("tmpfs"),
            target,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(options),
        )
        .map_err(io::Error::from)
    }

    fn bind(&self, source: &Path, target: &Path) -> io::Result<()> {
        nix::mount::mount(
            Some(source),
            target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(io::Error::from)
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH).map_err(io::Error::from)
    }

    fn mounts_under(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let info = fs::read_to_string("/proc/self/mountinfo")?;
        let dir = canonical(dir);
        Ok(mount_points(&info)
            .filter(|p| p.starts_with(&dir))
            .collect())
    }
}

/// The mount points of a mountinfo table (field 5, octal escapes decoded).
pub fn mount_points(mountinfo: &str) -> impl Iterator<Item = PathBuf> + '_ {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
pub mod fake {
    //! A mount table in memory: mounts are paths in a set, every call is
    //! recorded, and any call can be told to fail.

    use std::collections::BTreeSet;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use super::{Mounter, canonical};

    #[derive(Default)]
    pub struct FakeMounter {
        mounts: Mutex<BTreeSet<PathBuf>>,
        calls: Mutex<Vec<String>>,
        /// Calls (by name: "mount_tmpfs", "unmount", …) that fail.
        failing: Mutex<BTreeSet<String>>,
    }

    impl FakeMounter {
        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        pub fn mounts(&self) -> Vec<PathBuf> {
            self.mounts.lock().unwrap().iter().cloned().collect()
        }
        /// Something else (a CSI driver, a user) mounted `path`.
        pub fn add_mount(&self, path: &Path) {
            self.mounts.lock().unwrap().insert(canonical(path));
        }
        pub fn fail(&self, call: &str) {
            self.failing.lock().unwrap().insert(call.to_string());
        }
        fn call(&self, name: &str, path: &Path) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("{name} {}", path.display()));
            if self.failing.lock().unwrap().contains(name) {
                return Err(io::Error::other(format!("{name} failed (fake)")));
            }
            Ok(())
        }
    }

    impl Mounter for FakeMounter {
        fn mount_tmpfs(&self, target: &Path, _options: &str) -> io::Result<()> {
            self.call("mount_tmpfs", target)?;
            self.add_mount(target);
            Ok(())
        }
        fn bind(&self, _source: &Path, target: &Path) -> io::Result<()> {
            self.call("bind", target)?;
            self.add_mount(target);
            Ok(())
        }
        fn unmount(&self, target: &Path) -> io::Result<()> {
            self.call("unmount", target)?;
            if !self.mounts.lock().unwrap().remove(&canonical(target)) {
                return Err(io::Error::from_raw_os_error(nix::libc::EINVAL));
            }
            Ok(())
        }
        fn mounts_under(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
            let dir = canonical(dir);
            Ok(self
                .mounts
                .lock()
                .unwrap()
                .iter()
                .filter(|m| m.starts_with(&dir))
                .cloned()
                .collect())
        }
        fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
            Ok(self.mounts.lock().unwrap().contains(&canonical(path)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_fields_are_decoded() {
        let info = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:5 / /var/lib/minilet/pods/u1/volumes/kubernetes.io~secret/tok rw - tmpfs tmpfs rw\n";
        let points: Vec<PathBuf> = mount_points(info).collect();
        assert_eq!(
            points,
            [
                PathBuf::from("/mnt/a b"),
                PathBuf::from("/var/lib/minilet/pods/u1/volumes/kubernetes.io~secret/tok"),
            ]
        );
    }

    #[test]
    fn host_mounter_sees_a_real_bind_mount() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dir with space"));
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&dst).unwrap();
        let m = HostMounter;
        m.bind(&src, &dst)
            .expect("needs root: tests run as root in CI");
        assert!(m.is_mount_point(&dst).unwrap());
        assert!(!m.is_mount_point(&src).unwrap());
        assert_eq!(m.mounts_under(tmp.path()).unwrap(), vec![canonical(&dst)]);
        m.unmount(&dst).unwrap();
        assert!(m.mounts_under(tmp.path()).unwrap().is_empty());
    }
}
