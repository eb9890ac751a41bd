//! What both benchmarks need: where the repo and the target dir are, and
//! the minilet binary to measure (the one minilet ships).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo().join("target"), PathBuf::from)
}

/// Build the shipped `minilet` (static, non-PIE: integration/build-release.sh)
/// unless MINILET_BIN names a binary to use. `bench` prefixes the messages.
pub fn minilet_binary(bench: &str) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("MINILET_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("MINILET_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    eprintln!("{bench}: integration/build-release.sh");
    let out = Command::new(repo().join("integration/build-release.sh"))
        .current_dir(repo())
        .stderr(Stdio::inherit())
        .output()
        .context("running integration/build-release.sh")?;
    if !out.status.success() {
        bail!("integration/build-release.sh failed ({})", out.status);
    }
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !bin.is_file() {
        bail!("{} missing after the build", bin.display());
    }
    Ok(bin)
}
