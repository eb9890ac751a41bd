//! The storage backend: what a block-storage driver does to the host. A
//! volume is a sparse file, attached as a loop device, formatted on first
//! use and mounted; a publish is a bind mount.
//!
//! Side effects (`Host` only): creates and removes files, runs `losetup`,
//! `blkid`, `mkfs.<type>`, `mount` and `umount`, reads /proc/self/mountinfo.
//! The rules in `driver` see only the `Backend` trait; their tests use the
//! fake at the bottom.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A host operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A file operation on `path` failed.
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A command could not be run, or exited non-zero.
    #[error("{command} failed: {detail}")]
    Command { command: String, detail: String },
}

/// Usage of a mounted filesystem, as statvfs reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

/// The host side of the driver: every call is idempotent where its doc says
/// so, and none keeps state of its own (the host is the truth).
pub trait Backend: Send + Sync + 'static {
    /// Create a sparse file of `size` bytes (an existing one is resized).
    fn create_disk(&self, path: &Path, size: u64) -> Result<(), BackendError>;
    /// Remove the file; a missing one is fine.
    fn remove_disk(&self, path: &Path) -> Result<(), BackendError>;
    /// The loop device `disk` is attached to, if any.
    fn find_loop(&self, disk: &Path) -> Result<Option<PathBuf>, BackendError>;
    /// Attach `disk` to a free loop device; returns the device.
    fn attach(&self, disk: &Path) -> Result<PathBuf, BackendError>;
    /// Detach a loop device.
    fn detach(&self, device: &Path) -> Result<(), BackendError>;
    /// The filesystem type on `device`, None when it has none yet.
    fn filesystem(&self, device: &Path) -> Result<Option<String>, BackendError>;
    /// Make a filesystem of `fs_type` on `device`.
    fn mkfs(&self, device: &Path, fs_type: &str) -> Result<(), BackendError>;
    /// Mount `device` (a filesystem of `fs_type`) at `target` with `options`.
    fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<(), BackendError>;
    /// Bind-mount `source` at `target`, read-only if asked.
    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), BackendError>;
    /// Unmount `target`.
    fn unmount(&self, target: &Path) -> Result<(), BackendError>;
    /// Whether something is mounted at `path`.
    fn is_mounted(&self, path: &Path) -> Result<bool, BackendError>;
    /// Usage of the filesystem mounted at `path`.
    fn usage(&self, path: &Path) -> Result<Usage, BackendError>;
    /// Create the directory `path` (and its parents); an existing one is fine.
    fn make_dir(&self, path: &Path) -> Result<(), BackendError>;
    /// Remove the empty directory `path`; a missing one is fine.
    fn remove_dir(&self, path: &Path) -> Result<(), BackendError>;
    /// Whether `path` is an existing directory.
    fn is_dir(&self, path: &Path) -> bool;
}

/// The real host.
pub struct Host;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BackendError {
    let path = path.to_path_buf();
    move |source| BackendError::Io { op, path, source }
}

/// Run a command; its stdout on success.
fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<String, BackendError> {
    let command = || {
        let mut s = program.to_string();
        for a in args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    };
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| BackendError::Command {
            command: command(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(BackendError::Command {
            command: command(),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Undo the octal escapes (`\040` for a space) of a /proc/self/mountinfo field.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points listed in a mountinfo text (field 5).
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|f| PathBuf::from(unescape_mountinfo(f)))
        .collect()
}

/// The loop devices `losetup -j FILE` names (`/dev/loop0: []: (/path)`).
fn parse_losetup_j(out: &str) -> Option<PathBuf> {
    out.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(dev, _)| PathBuf::from(dev.trim()))
        .next()
}

impl Backend for Host {
    fn create_disk(&self, path: &Path, size: u64) -> Result<(), BackendError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err("create dir for", path))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err("create", path))?;
        // set_len on a new file allocates nothing: a sparse file.
        file.set_len(size).map_err(io_err("size", path))
    }

    fn remove_disk(&self, path: &Path) -> Result<(), BackendError> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", path)(e)),
            _ => Ok(()),
        }
    }

    fn find_loop(&self, disk: &Path) -> Result<Option<PathBuf>, BackendError> {
        let out = run("losetup", &["-j".as_ref(), disk.as_os_str()])?;
        Ok(parse_losetup_j(&out))
    }

    fn attach(&self, disk: &Path) -> Result<PathBuf, BackendError> {
        let out = run(
            "losetup",
            &["--find".as_ref(), "--show".as_ref(), disk.as_os_str()],
        )?;
        Ok(PathBuf::from(out.trim()))
    }

    fn detach(&self, device: &Path) -> Result<(), BackendError> {
        match run("losetup", &["-d".as_ref(), device.as_os_str()]) {
            // Detached already: a busy device's detach is deferred (the
            // kernel clears it on its last close), so it may still have
            // been listed a moment ago; a second -d then finds no device.
            Err(BackendError::Command { detail, .. })
                if detail.contains("No such device or address") =>
            {
                Ok(())
            }
            r => r.map(drop),
        }
    }

    fn filesystem(&self, device: &Path) -> Result<Option<String>, BackendError> {
        // blkid exits 2 when it finds no signature: a blank device.
        let out = Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "TYPE"])
            .arg(device)
            .output()
            .map_err(|e| BackendError::Command {
                command: format!("blkid {}", device.display()),
                detail: e.to_string(),
            })?;
        match out.status.code() {
            Some(0) => {
                let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
                Ok((!t.is_empty()).then_some(t))
            }
            Some(2) => Ok(None),
            _ => Err(BackendError::Command {
                command: format!("blkid {}", device.display()),
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            }),
        }
    }

    fn mkfs(&self, device: &Path, fs_type: &str) -> Result<(), BackendError> {
        let program = format!("mkfs.{fs_type}");
        let quiet: &std::ffi::OsStr = if fs_type.starts_with("ext") {
            "-q".as_ref()
        } else {
            "-f".as_ref()
        };
        run(&program, &[quiet, device.as_os_str()]).map(drop)
    }

    fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<(), BackendError> {
        let mut args: Vec<&std::ffi::OsStr> = vec!["-t".as_ref(), fs_type.as_ref()];
        let joined = options.join(",");
        if !joined.is_empty() {
            args.extend(["-o".as_ref(), joined.as_ref() as &std::ffi::OsStr]);
        }
        args.extend([device.as_os_str(), target.as_os_str()]);
        run("mount", &args).map(drop)
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), BackendError> {
        run(
            "mount",
            &["--bind".as_ref(), source.as_os_str(), target.as_os_str()],
        )?;
        if read_only {
            // A bind mount takes MS_RDONLY only on a remount.
            let remounted = run(
                "mount",
                &[
                    "-o".as_ref(),
                    "remount,bind,ro".as_ref(),
                    target.as_os_str(),
                ],
            );
            if let Err(e) = remounted {
                // Never leave a writable mount where a read-only one was asked.
                let _ = self.unmount(target);
                return Err(e);
            }
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), BackendError> {
        run("umount", &[target.as_os_str()]).map(drop)
    }

    fn is_mounted(&self, path: &Path) -> Result<bool, BackendError> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(io_err("read", Path::new("/proc/self/mountinfo")))?;
        // mountinfo names the resolved path.
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(mount_points(&info).contains(&path))
    }

    fn usage(&self, path: &Path) -> Result<Usage, BackendError> {
        let s = nix::sys::statvfs::statvfs(path)
            .map_err(|e| io_err("statvfs", path)(io::Error::from(e)))?;
        let frsize = s.fragment_size();
        let total = s.blocks() * frsize;
        let free = s.blocks_free() * frsize;
        Ok(Usage {
            total_bytes: total,
            available_bytes: s.blocks_available() * frsize,
            used_bytes: total.saturating_sub(free),
            total_inodes: s.files(),
            free_inodes: s.files_free(),
            used_inodes: s.files().saturating_sub(s.files_free()),
        })
    }

    fn make_dir(&self, path: &Path) -> Result<(), BackendError> {
        std::fs::create_dir_all(path).map_err(io_err("create dir", path))
    }

    fn remove_dir(&self, path: &Path) -> Result<(), BackendError> {
        match std::fs::remove_dir(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove dir", path)(e)),
            _ => Ok(()),
        }
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }
}

#[cfg(test)]
pub mod fake {
    //! A host in memory: disks, loop devices, filesystems and mounts, and a
    //! log of the mutating calls so tests can count them.

    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use super::{Backend, BackendError, Usage};

    #[derive(Default)]
    pub struct Host {
        pub disks: BTreeMap<PathBuf, u64>,
        /// loop device → disk
        pub loops: BTreeMap<PathBuf, PathBuf>,
        /// device → filesystem type
        pub filesystems: BTreeMap<PathBuf, String>,
        /// mount point → (source, read-only)
        pub mounts: BTreeMap<PathBuf, (PathBuf, bool)>,
        pub dirs: BTreeSet<PathBuf>,
        pub calls: Vec<String>,
        next_loop: u32,
    }

    #[derive(Default)]
    pub struct Fake(pub Mutex<Host>);

    impl Fake {
        pub fn host(&self) -> std::sync::MutexGuard<'_, Host> {
            self.0.lock().unwrap()
        }
        /// How many mutating calls named `op` were made.
        pub fn count(&self, op: &str) -> usize {
            self.host().calls.iter().filter(|c| *c == op).count()
        }
    }

    fn fail(what: &str) -> BackendError {
        BackendError::Command {
            command: what.to_string(),
            detail: "fake refuses".into(),
        }
    }

    impl Backend for Fake {
        fn create_disk(&self, path: &Path, size: u64) -> Result<(), BackendError> {
            let mut h = self.host();
            h.calls.push("create_disk".into());
            h.disks.insert(path.into(), size);
            Ok(())
        }
        fn remove_disk(&self, path: &Path) -> Result<(), BackendError> {
            let mut h = self.host();
            h.calls.push("remove_disk".into());
            h.disks.remove(path);
            Ok(())
        }
        fn find_loop(&self, disk: &Path) -> Result<Option<PathBuf>, BackendError> {
            let h = self.host();
            Ok(h.loops
                .iter()
                .find(|(_, d)| *d == disk)
                .map(|(l, _)| l.clone()))
        }
        fn attach(&self, disk: &Path) -> Result<PathBuf, BackendError> {
            let mut h = self.host();
            if !h.disks.contains_key(disk) {
                return Err(fail("attach of a missing disk"));
            }
            h.calls.push("attach".into());
            let dev = PathBuf::from(format!("/dev/loop{}", h.next_loop));
            h.next_loop += 1;
            h.loops.insert(dev.clone(), disk.into());
            Ok(dev)
        }
        fn detach(&self, device: &Path) -> Result<(), BackendError> {
            let mut h = self.host();
            h.calls.push("detach".into());
            h.loops
                .remove(device)
                .map(drop)
                .ok_or_else(|| fail("detach"))
        }
        fn filesystem(&self, device: &Path) -> Result<Option<String>, BackendError> {
            let h = self.host();
            let disk = h.loops.get(device).ok_or_else(|| fail("blkid"))?;
            Ok(h.filesystems.get(disk).cloned())
        }
        fn mkfs(&self, device: &Path, fs_type: &str) -> Result<(), BackendError> {
            let mut h = self.host();
            h.calls.push("mkfs".into());
            let disk = h.loops.get(device).cloned().ok_or_else(|| fail("mkfs"))?;
            h.filesystems.insert(disk, fs_type.into());
            Ok(())
        }
        fn mount(
            &self,
            device: &Path,
            target: &Path,
            _fs_type: &str,
            _options: &[String],
        ) -> Result<(), BackendError> {
            let mut h = self.host();
            h.calls.push("mount".into());
            if !h.dirs.contains(target) {
                return Err(fail("mount on a missing dir"));
            }
            h.mounts.insert(target.into(), (device.into(), false));
            Ok(())
        }
        fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), BackendError> {
            let mut h = self.host();
            h.calls.push("bind".into());
            if !h.dirs.contains(target) || !h.mounts.contains_key(source) {
                return Err(fail("bind"));
            }
            h.mounts.insert(target.into(), (source.into(), read_only));
            Ok(())
        }
        fn unmount(&self, target: &Path) -> Result<(), BackendError> {
            let mut h = self.host();
            h.calls.push("unmount".into());
            h.mounts
                .remove(target)
                .map(drop)
                .ok_or_else(|| fail("umount"))
        }
        fn is_mounted(&self, path: &Path) -> Result<bool, BackendError> {
            Ok(self.host().mounts.contains_key(path))
        }
        fn usage(&self, path: &Path) -> Result<Usage, BackendError> {
            if !self.host().mounts.contains_key(path) {
                return Err(fail("statvfs"));
            }
            Ok(Usage {
                total_bytes: 100,
                available_bytes: 60,
                used_bytes: 40,
                total_inodes: 10,
                free_inodes: 7,
                used_inodes: 3,
            })
        }
        fn make_dir(&self, path: &Path) -> Result<(), BackendError> {
            self.host().dirs.insert(path.into());
            Ok(())
        }
        fn remove_dir(&self, path: &Path) -> Result<(), BackendError> {
            let mut h = self.host();
            if h.mounts.contains_key(path) {
                return Err(fail("rmdir of a mount point"));
            }
            h.dirs.remove(path);
            Ok(())
        }
        fn is_dir(&self, path: &Path) -> bool {
            self.host().dirs.contains(path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_fields_are_unescaped() {
        let info = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 98:0 / /var/lib/x rw - ext4 /dev/loop0 rw\n";
        assert_eq!(
            mount_points(info),
            vec![
                PathBuf::from("/mnt/with space"),
                PathBuf::from("/var/lib/x")
            ]
        );
    }

    #[test]
    fn losetup_j_names_the_device() {
        assert_eq!(
            parse_losetup_j("/dev/loop3: [2049]:1234 (/state/disks/v.img)\n"),
            Some(PathBuf::from("/dev/loop3"))
        );
        assert_eq!(parse_losetup_j(""), None);
    }
}
