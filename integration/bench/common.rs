//! What the benchmarks share: their `main`, where the repo and the target
//! dir are, and the minilet binary to measure (the one minilet ships).

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, anyhow, bail};

/// The `main` of the benchmark `name`. `cargo bench` passes --bench;
/// `cargo test --all-targets` runs bench targets without it, and must not
/// start a benchmark that takes minutes: then it only says how to run it.
/// `run`: Ok(true) a good run, Ok(false) a broken one, Err printed.
pub fn main(name: &str, run: impl FnOnce() -> Result<bool>) -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        println!("{name}: a benchmark, not a test: run it with `cargo bench --bench {name}`");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime the async benchmarks run on: two workers, like the agent.
#[allow(
    dead_code,
    reason = "cni_hop builds its own, with a bound on blocking threads"
)]
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start tokio")
}

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

/// A positive count from the environment, or `default` when unset.
pub fn env_positive(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| anyhow!("{name}={v:?} is not a positive number")),
        Err(_) => Ok(default),
    }
}

/// The value at percentile `p` (nearest rank) of sorted samples.
pub fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// utime + stime of a process, in clock ticks.
#[allow(dead_code)] // not every benchmark measures CPU time
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 when that fails).
#[allow(dead_code)] // not every benchmark measures CPU time
pub fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Three decimals, for the JSON line.
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
