//! Installs the delegating plugin where the container runtime looks for CNI
//! plugins and configs: the running executable as `minilet-cni` in the
//! runtime's bin dir, and `00-minilet.conflist` (a name that sorts first:
//! containerd loads only the first config) in its conf dir. The config
//! names the agent's socket and, under `withoutAgent`, the agent's CNI
//! settings, with which the plugin runs DEL and CHECK itself while the
//! agent is down (`local`).
//!
//! Side effects: creates those dirs, writes both files atomically (temp
//! file in the same dir + rename); an identical file is left untouched, so
//! restarts don't make the runtime reload its config.

use std::path::{Path, PathBuf};

use super::local::Settings;
use crate::config::Config;

/// Name of the plugin binary (main dispatches on argv[0]).
pub const PLUGIN_NAME: &str = "minilet-cni";
/// Name of the config written to the runtime's conf dir.
pub const CONF_NAME: &str = "00-minilet.conflist";

/// Why installing the delegating plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The running executable could not be read.
    #[error("cannot read the running executable {}", path.display())]
    ReadSelf {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A target file or dir could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Installs the plugin binary and the runtime's network config.
pub fn install(cfg: &Config) -> Result<(), InstallError> {
    install_from(
        Path::new("/proc/self/exe"),
        &cfg.runtime_cni_bin_dir,
        &cfg.runtime_cni_conf_dir,
        &cfg.cni_socket(),
        &Settings::from_config(cfg),
    )
}

/// `install` with every path explicit (tests).
pub fn install_from(
    exe: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    socket: &Path,
    without_agent: &Settings,
) -> Result<(), InstallError> {
    copy_if_changed(exe, bin_dir, PLUGIN_NAME)?;
    let conflist = runtime_conflist(socket, Some(without_agent));
    write_if_changed(conf_dir, CONF_NAME, &conflist, 0o644)?;
    Ok(())
}

/// Whether two files hold the same bytes, compared in small chunks: the
/// agent binary is megabytes, and reading it whole would set the agent's
/// peak memory.
fn same_content(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let (fa, fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ra, mut rb) = (std::io::BufReader::new(fa), std::io::BufReader::new(fb));
    let (mut ba, mut bb) = ([0u8; 8192], [0u8; 8192]);
    loop {
        let n = ra.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        rb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// Copy the running binary into the runtime's bin dir unless an identical
/// copy is there; streamed, then renamed into place (the runtime never
/// execs a half-written file).
fn copy_if_changed(exe: &Path, dir: &Path, name: &str) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    if same_content(exe, &path).unwrap_or(false) {
        return Ok(());
    }
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    std::fs::copy(exe, &tmp).map_err(|source| InstallError::ReadSelf {
        path: exe.to_path_buf(),
        source,
    })?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(source) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(&path)(source));
    }
    Ok(())
}

/// The config the runtime runs: the delegating plugin alone, with what it
/// needs to run DEL and CHECK without the agent (`None`: it can't).
pub fn runtime_conflist(socket: &Path, without_agent: Option<&Settings>) -> Vec<u8> {
    let mut plugin = serde_json::json!({
        "type": PLUGIN_NAME,
        "agentSocket": socket,
        "timeoutSeconds": super::delegate::DEFAULT_TIMEOUT_SECONDS,
        "capabilities": {"portMappings": true},
    });
    if let Some(s) = without_agent {
        plugin["withoutAgent"] = serde_json::to_value(s).expect("settings serialise");
    }
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "minilet",
        "plugins": [plugin],
    });
    let mut bytes = serde_json::to_vec_pretty(&conf).expect("JSON serialises");
    bytes.push(b'\n');
    bytes
}

fn write_if_changed(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let path = dir.join(name);
    if std::fs::read(&path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    // Same dir as the target, so the rename is atomic: the runtime never
    // execs or reads a half-written file.
    super::cache::write_atomic(dir, &path, bytes, mode)
        .map_err(|source| InstallError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn installs_binary_and_config_once() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("minilet");
        std::fs::write(&exe, b"\x7fELF pretend").unwrap();
        let bin = dir.path().join("opt/cni/bin");
        let conf = dir.path().join("etc/cni/net.d");
        let socket = Path::new("/var/lib/minilet/cni.sock");
        let settings = Settings {
            cni_conf_dir: "/etc/minilet/net.d".into(),
            cni_bin_dirs: vec!["/opt/cni/bin".into()],
            cni_cache_dir: "/var/lib/minilet/cni/cache".into(),
            cni_plugin_timeout_ms: 30_000,
        };

        install_from(&exe, &bin, &conf, socket, &settings).unwrap();
        let plugin = bin.join("minilet-cni");
        assert_eq!(std::fs::read(&plugin).unwrap(), b"\x7fELF pretend");
        assert_eq!(
            std::fs::metadata(&plugin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(conf.join("00-minilet.conflist")).unwrap())
                .unwrap();
        assert_eq!(
            written,
            serde_json::json!({"cniVersion":"1.0.0","name":"minilet","plugins":[{
                "type":"minilet-cni","agentSocket":"/var/lib/minilet/cni.sock",
                "timeoutSeconds":60,"capabilities":{"portMappings":true},
                "withoutAgent":{"cniConfDir":"/etc/minilet/net.d","cniBinDirs":["/opt/cni/bin"],
                    "cniCacheDir":"/var/lib/minilet/cni/cache","cniPluginTimeoutMs":30000}}]})
        );
        // Valid for our own loader too.
        let list = crate::cni::config::load_default(&conf).unwrap();
        assert_eq!(list.plugins[0].plugin_type, "minilet-cni");

        // Identical content: files untouched (same inode).
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let (bin_ino, conf_ino) = (ino(&plugin), ino(&conf.join("00-minilet.conflist")));
        install_from(&exe, &bin, &conf, socket, &settings).unwrap();
        assert_eq!(ino(&plugin), bin_ino);
        assert_eq!(ino(&conf.join("00-minilet.conflist")), conf_ino);

        // New content: replaced by rename, no temp files left behind.
        std::fs::write(&exe, b"\x7fELF v2").unwrap();
        install_from(&exe, &bin, &conf, socket, &settings).unwrap();
        assert_eq!(std::fs::read(&plugin).unwrap(), b"\x7fELF v2");
        assert_ne!(ino(&plugin), bin_ino);
        let names: Vec<_> = std::fs::read_dir(&bin)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["minilet-cni"]);
    }

    #[test]
    fn missing_executable_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = install_from(
            &dir.path().join("nope"),
            dir.path(),
            dir.path(),
            Path::new("/s"),
            &Settings::from_config(&Config::default_for("n")),
        )
        .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
