//! The host file system side of the CSI volume plugin that tests fake:
//! whether a path is a mount point (so nothing is removed across a mount
//! and a staged/published volume is not set up twice), and the fsGroup
//! ownership change of a published volume (kubelet's
//! `volume.SetVolumeOwnership`, simplified).
//!
//! Side effects (`Host`): reads /proc/self/mountinfo; lchown and chmod of
//! every file under a published volume.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// A pod's `securityContext.fsGroupChangePolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChangePolicy {
    /// Change every file on every mount (kubelet's default).
    #[default]
    Always,
    /// Skip the walk when the volume's root already has the group and modes.
    OnRootMismatch,
}

impl ChangePolicy {
    pub fn from_k8s(s: Option<&str>) -> ChangePolicy {
        match s {
            Some("OnRootMismatch") => ChangePolicy::OnRootMismatch,
            _ => ChangePolicy::Always,
        }
    }
}

/// The narrow host seam.
pub trait HostFs: Send + Sync {
    fn is_mount_point(&self, path: &Path) -> io::Result<bool>;
    /// Give the tree at `dir` to group `gid`: group read/write (read only
    /// when `readonly`) on every file, plus setgid and group search on
    /// directories, so new files inherit the group. Symlinks are not followed.
    fn set_ownership(
        &self,
        dir: &Path,
        gid: u32,
        readonly: bool,
        policy: ChangePolicy,
    ) -> io::Result<()>;
}

/// The real host.
pub struct Host;

const RW: u32 = 0o660;
const RO: u32 = 0o440;
const DIR_EXTRA: u32 = 0o2110; // setgid + group/owner search

fn wanted(mode: u32, is_dir: bool, readonly: bool) -> u32 {
    let mut mask = if readonly { RO } else { RW };
    if is_dir {
        mask |= DIR_EXTRA;
    }
    mode | mask
}

fn change(path: &Path, gid: u32, readonly: bool) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.gid() != gid {
        std::os::unix::fs::lchown(path, None, Some(gid))?;
    }
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode() & 0o7777;
    let want = wanted(mode, meta.is_dir(), readonly);
    if want != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(want))?;
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            change(&entry?.path(), gid, readonly)?;
        }
    }
    Ok(())
}

impl HostFs for Host {
    fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
        crate::volume::Mounter::is_mount_point(&crate::volume::HostMounter, path)
    }

    fn set_ownership(
        &self,
        dir: &Path,
        gid: u32,
        readonly: bool,
        policy: ChangePolicy,
    ) -> io::Result<()> {
        if policy == ChangePolicy::OnRootMismatch {
            let meta = fs::metadata(dir)?;
            let mode = meta.permissions().mode() & 0o7777;
            if meta.gid() == gid && wanted(mode, true, readonly) == mode {
                return Ok(());
            }
        }
        change(dir, gid, readonly)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_gives_the_tree_to_the_group_with_setgid_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vol");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::write(root.join("sub/f"), "x").unwrap();
        fs::set_permissions(root.join("sub/f"), fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        let before = fs::metadata("/etc/passwd").unwrap().permissions().mode();
        Host.set_ownership(&root, 4242, false, ChangePolicy::Always)
            .expect("needs root: tests run as root in CI");
        let f = fs::metadata(root.join("sub/f")).unwrap();
        assert_eq!(f.gid(), 4242);
        assert_eq!(f.permissions().mode() & 0o7777, 0o660);
        let d = fs::metadata(root.join("sub")).unwrap();
        assert_eq!(d.gid(), 4242);
        assert_eq!(d.permissions().mode() & 0o2000, 0o2000);
        // The symlink's target is left alone.
        assert_eq!(
            fs::metadata("/etc/passwd").unwrap().permissions().mode(),
            before
        );
        assert_eq!(fs::symlink_metadata(root.join("link")).unwrap().gid(), 4242);
        // OnRootMismatch: the root matches, so a new file is not touched.
        fs::write(root.join("late"), "y").unwrap();
        std::os::unix::fs::lchown(root.join("late"), None, Some(0)).unwrap();
        Host.set_ownership(&root, 4242, false, ChangePolicy::OnRootMismatch)
            .unwrap();
        assert_ne!(fs::metadata(root.join("late")).unwrap().gid(), 4242);
    }
}
