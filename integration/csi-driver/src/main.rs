//! The minilet-test-csi binary: flags, logging, SIGTERM, then `serve`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{ArgAction, Parser};

use minilet_test_csi::backend::Host;
use minilet_test_csi::driver::{Config, Driver};
use minilet_test_csi::serve::serve;

/// A CSI driver for tests: sparse files on loop devices, ext4, bind mounts.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The CSI socket: a path, or unix:///path.
    #[arg(long)]
    endpoint: String,
    /// Where volumes, their state, calls.jsonl and faults.json live.
    #[arg(long)]
    state_dir: PathBuf,
    /// Serve kubelet's plugin registration at <dir>/<driver-name>-reg.sock.
    #[arg(long)]
    registration_dir: Option<PathBuf>,
    /// The driver's name (GetPluginInfo).
    #[arg(long, default_value = "csi.minilet.test")]
    driver_name: String,
    /// NodeGetInfo's node_id (default: the host name).
    #[arg(long)]
    node_id: Option<String>,
    /// Offer PUBLISH_UNPUBLISH_VOLUME: a volume must be ControllerPublished
    /// to the node before it is staged.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    publish_unpublish: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let endpoint = PathBuf::from(
        args.endpoint
            .strip_prefix("unix://")
            .unwrap_or(&args.endpoint),
    );
    let node_id = match args.node_id {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("host name")?
            .trim()
            .to_string(),
    };
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("create {}", args.state_dir.display()))?;
    let config = Config {
        name: args.driver_name,
        node_id,
        state_dir: args.state_dir,
        publish_unpublish: args.publish_unpublish,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    serve(
        Driver::new(config, Host),
        &endpoint,
        args.registration_dir.as_deref(),
        shutdown,
    )
    .await
    .context("minilet-test-csi")?;
    Ok(())
}
