//! The `minilet` binary: argument parsing, tracing, the tokio runtime, and
//! dispatch. Invoked as `minilet-cni` (the name minilet installs itself
//! under in the runtime's CNI bin dir) it is the delegating CNI plugin.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use minilet::config::{self, Flags};
use minilet::{agent, cli, control};

#[derive(Parser, Debug)]
#[command(
    name = "minilet",
    version,
    about = "An all-in-one Kubernetes node agent"
)]
struct Args {
    /// KubeletConfiguration file (may hold a MiniletConfiguration document too).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Directory of static pod manifests (kubelet staticPodPath).
    #[arg(long, global = true)]
    pod_manifest_path: Option<PathBuf>,
    /// CRI endpoint, e.g. unix:///run/containerd/containerd.sock.
    #[arg(long, global = true)]
    container_runtime_endpoint: Option<String>,
    /// minilet's state directory (MiniletConfiguration stateDir).
    #[arg(long, global = true)]
    root_dir: Option<PathBuf>,
    /// Node name to use instead of the host name.
    #[arg(long, global = true)]
    hostname_override: Option<String>,
    /// kubeconfig file with the node's credentials for the API server
    /// (kubelet's flag). Without it: the in-cluster service account when
    /// KUBERNETES_SERVICE_HOST is set, else static pods only.
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// kubeconfig with bootstrap credentials (a bootstrap token): with no
    /// valid client certificate in --kubeconfig, minilet asks the cluster
    /// for one through a CSR and writes --kubeconfig (kubelet's TLS
    /// bootstrap).
    #[arg(long, global = true)]
    bootstrap_kubeconfig: Option<PathBuf>,
    /// Where issued client certificates are kept (default <root-dir>/pki).
    #[arg(long, global = true)]
    cert_dir: Option<PathBuf>,
    /// IP address of the node (its InternalIP); default: the source address
    /// of the default route.
    #[arg(long, global = true)]
    node_ip: Option<String>,
    /// Log filter (tracing-subscriber EnvFilter syntax); RUST_LOG also works.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Show pods of the running agent.
    Get {
        /// `pods`, `events` (the pods' CNI timings and errors), `metrics`
        /// (Prometheus text), `ready` (exits 0 once the agent has caught
        /// up with the node: runtime connected, sources synced, first relist
        /// reconciled; says what is missing otherwise), or `pv`, `pvc`,
        /// `pv,pvc` (PersistentVolumes and claims, standalone mode).
        resource: String,
        /// Output format: json, or the table when omitted.
        #[arg(short = 'o', long)]
        output: Option<String>,
    },
    /// Check that this node can run pods; one line per finding.
    Doctor,
    /// cnitool's verbs on minilet's CNI networks and cache (no agent needed).
    Cni {
        verb: minilet::cni::tool::ToolVerb,
        /// The network (default: the default network); unused by gc.
        network: Option<String>,
        /// Path of the network namespace (add, check, del).
        #[arg(long)]
        netns: Option<String>,
        /// Container id (default: derived from --netns, like cnitool).
        #[arg(long)]
        container_id: Option<String>,
        #[arg(long, default_value = "eth0")]
        ifname: String,
        /// CNI_ARGS, e.g. "K8S_POD_NAME=web;K8S_POD_NAMESPACE=default".
        #[arg(long)]
        args: Option<String>,
    },
    /// Print a container's log from the running agent's pods.
    Logs {
        pod: String,
        #[arg(short = 'c', long)]
        container: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'f', long)]
        follow: bool,
    },
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("minilet: {msg}");
    ExitCode::FAILURE
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() -> ExitCode {
    minilet::malloc::tune();
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if PathBuf::from(argv0)
        .file_name()
        .is_some_and(|n| n == "minilet-cni")
    {
        return ExitCode::from(minilet::cni::delegate::run_plugin() as u8);
    }
    let args = Args::parse();
    let flags = Flags {
        config: args.config.clone(),
        pod_manifest_path: args.pod_manifest_path.clone(),
        container_runtime_endpoint: args.container_runtime_endpoint.clone(),
        root_dir: args.root_dir.clone(),
        hostname_override: args.hostname_override.clone(),
        kubeconfig: args.kubeconfig.clone(),
        node_ip: args.node_ip.clone(),
        bootstrap_kubeconfig: args.bootstrap_kubeconfig.clone(),
        cert_dir: args.cert_dir.clone(),
    };
    let cfg = match config::load(&flags) {
        Ok(cfg) => cfg,
        Err(e) => return fail(minilet::error_chain(&e)),
    };
    match args.command.unwrap_or(Command::Run) {
        Command::Run => run_agent(cfg, &args.log_level),
        Command::Get { resource, output } => {
            if let Some(kinds) = volume_kinds(&resource) {
                return get_volumes(&cfg, kinds, output.as_deref());
            }
            let kind = match resource.as_str() {
                "pods" | "pod" | "po" => "pods",
                "events" | "event" | "ev" => "events",
                "metrics" => "metrics",
                "ready" | "readyz" => "ready",
                other => {
                    return fail(format!(
                        "unknown resource {other:?}: pods, events, metrics, ready, pv or pvc"
                    ));
                }
            };
            let view = match runtime().block_on(control::fetch(&cfg.control_socket())) {
                Ok(v) => v,
                Err(e) => return fail(minilet::error_chain(&e)),
            };
            match (kind, output.as_deref()) {
                ("pods", None | Some("wide")) => {
                    print!("{}", cli::pods_table(&view, jiff::Timestamp::now()))
                }
                ("pods", Some("json")) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&cli::pod_list(&view)).unwrap_or_default()
                    );
                    for e in &view.errors {
                        eprintln!("manifest error: {}: {}", e.file, e.message);
                    }
                }
                ("events", None) => print!("{}", cli::events_table(&view, jiff::Timestamp::now())),
                ("events", Some("json")) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&view.events).unwrap_or_default()
                    )
                }
                ("metrics", None) => print!("{}", view.metrics),
                ("ready", None | Some("json")) => {
                    if output.is_some() {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&view.agent).unwrap_or_default()
                        );
                    } else if view.agent.ready {
                        println!("ready");
                    } else {
                        println!("not ready: {}", view.agent.not_ready_reasons().join("; "));
                    }
                    if !view.agent.ready {
                        return ExitCode::FAILURE;
                    }
                }
                (_, Some(other)) => {
                    return fail(format!("unknown output format {other:?} for {kind}"));
                }
                _ => unreachable!("kinds are matched above"),
            }
            ExitCode::SUCCESS
        }
        Command::Doctor => {
            let report = runtime().block_on(minilet::doctor::run(&cfg));
            for f in &report {
                println!("{f}");
            }
            let failed = report
                .iter()
                .any(|f| f.level == minilet::doctor::Level::Fail);
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Cni {
            verb,
            network,
            netns,
            container_id,
            ifname,
            args,
        } => {
            let code = runtime().block_on(minilet::cni::tool::run_tool(
                &cfg,
                verb,
                network,
                netns,
                container_id,
                ifname,
                args,
            ));
            ExitCode::from(code as u8)
        }
        Command::Logs {
            pod,
            container,
            namespace,
            follow,
        } => {
            let view = match runtime().block_on(control::fetch(&cfg.control_socket())) {
                Ok(v) => v,
                Err(e) => return fail(minilet::error_chain(&e)),
            };
            let Some(p) = cli::find_pod(&view, &pod, namespace.as_deref()) else {
                return fail(cli::LogsError::NoPod(pod));
            };
            let result = cli::log_file(&view, p, container.as_deref())
                .and_then(|path| cli::print_log(&path, follow, &mut std::io::stdout().lock()));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(minilet::error_chain(&e)),
            }
        }
    }
}

/// `pv`, `pvc` or both (`pv,pvc`, any order, kubectl's long names too).
fn volume_kinds(resource: &str) -> Option<cli::VolumeKinds> {
    let mut kinds = cli::VolumeKinds {
        pv: false,
        pvc: false,
    };
    for r in resource.split(',') {
        match r {
            "pv" | "persistentvolume" | "persistentvolumes" => kinds.pv = true,
            "pvc" | "persistentvolumeclaim" | "persistentvolumeclaims" => kinds.pvc = true,
            _ => return None,
        }
    }
    Some(kinds)
}

fn get_volumes(cfg: &config::Config, kinds: cli::VolumeKinds, output: Option<&str>) -> ExitCode {
    let view = match runtime().block_on(control::fetch_volumes(&cfg.control_socket())) {
        Ok(v) => v,
        Err(e) => return fail(minilet::error_chain(&e)),
    };
    match output {
        None | Some("wide") => print!(
            "{}",
            cli::volumes_table(&view, kinds, jiff::Timestamp::now())
        ),
        Some("json") => println!(
            "{}",
            serde_json::to_string_pretty(&cli::volumes_list(&view, kinds)).unwrap_or_default()
        ),
        Some(other) => return fail(format!("unknown output format {other:?} for pv,pvc")),
    }
    ExitCode::SUCCESS
}

fn run_agent(cfg: config::Config, log_level: &str) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(log_level));
    let filter = match filter {
        Ok(f) => f,
        Err(e) => return fail(format!("--log-level {log_level:?}: {e}")),
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    let rt = runtime();
    let cancel = CancellationToken::new();
    let result = rt.block_on(async {
        let stop = cancel.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("signal received: stopping (pods keep running)");
            stop.cancel();
        });
        // Free pages back to the kernel after bursts (see `malloc`).
        tokio::spawn(async {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
            loop {
                every.tick().await;
                minilet::malloc::trim();
            }
        });
        agent::run(cfg, cancel).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(minilet::error_chain(&e)),
    }
}
