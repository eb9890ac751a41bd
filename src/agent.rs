//! Wiring only: from a validated `Config` to running tasks, and back down
//! on SIGTERM. Order matters: the CNI socket must answer before any sandbox
//! is created or torn down (the runtime execs the delegating plugin inside
//! RunPodSandbox / StopPodSandbox), and the first manifest scan must be in
//! before the first relist, or an agent restart would tear down pods whose
//! manifests simply had not been read yet.
//!
//! Side effects: creates stateDir, installs the delegating CNI plugin and
//! its config into the runtime's CNI dirs, binds two root-only sockets.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::cni;
use crate::config::Config;
use crate::control;
use crate::cri::Runtime;
use crate::cri::bounded::Bounded;
use crate::cri::remote::RemoteRuntime;
use crate::pod::manager::Manager;
use crate::pod::spec::{self, HostContext};
use crate::pod::worker::Shared;
use crate::source::{Snapshot, merge, static_dir};
use crate::status::Board;

/// How often the manager relists the runtime (kubelet's PLEG period).
pub const RELIST_PERIOD: Duration = Duration::from_secs(1);

/// Startup failures; each is one line on stderr and a non-zero exit.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("creating state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the CNI network config from {dir}")]
    CniConfig {
        dir: PathBuf,
        #[source]
        source: cni::config::CniConfigError,
    },
    #[error("installing the delegating CNI plugin")]
    CniInstall(#[source] cni::install::InstallError),
    #[error("binding {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A node-wide task ended before the agent was told to stop.
    #[error("{cause}")]
    TaskDied { cause: String },
    /// The API server credentials are unusable (API server mode).
    #[error(transparent)]
    Api(#[from] crate::api::client::ClientError),
    /// The claim controller's state file is unreadable (standalone mode):
    /// refused, since it names volumes that exist on the drivers.
    #[error("loading the claims state")]
    Claims(#[source] crate::volume::provision::ProvisionError),
    /// `csiDrivers` that cannot be used (checked again here; config
    /// validation catches them first).
    #[error("the CSI drivers of the config")]
    Csi(#[source] crate::csi::CsiError),
}

/// Answers the CNI server's questions (host ports, network annotations)
/// from the pods the sources want.
struct DesiredPodNetworks(watch::Receiver<Snapshot>);

impl cni::server::PodNetworkLookup for DesiredPodNetworks {
    fn pod_network_info(&self, pod_uid: &str) -> Option<cni::server::PodNetworkInfo> {
        let snapshot = self.0.borrow();
        let desired = snapshot.pods.get(pod_uid)?;
        let port_mappings = spec::port_mappings(&desired.pod)
            .into_iter()
            .map(|p| cni::server::PortMapping {
                host_port: p.host_port,
                container_port: p.container_port,
                protocol: match crate::cri::api::Protocol::try_from(p.protocol) {
                    Ok(crate::cri::api::Protocol::Udp) => "udp",
                    Ok(crate::cri::api::Protocol::Sctp) => "sctp",
                    _ => "tcp",
                }
                .into(),
                host_ip: p.host_ip,
            })
            .collect();
        let annotations = desired.pod.metadata.annotations.clone().unwrap_or_default();
        Some(cni::server::PodNetworkInfo {
            port_mappings,
            annotations,
        })
    }
}

fn memory_capacity() -> i64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Dial the runtime, retrying (as kubelet does) until it answers or we stop.
async fn connect_runtime(cfg: &Config, cancel: &CancellationToken) -> Option<RemoteRuntime> {
    let mut delay = Duration::from_millis(250);
    loop {
        match RemoteRuntime::connect(
            &cfg.container_runtime_endpoint,
            &cfg.image_service_endpoint,
            cfg.runtime_request_timeout,
        )
        .await
        {
            Ok(rt) => return Some(rt),
            Err(e) if e.is_retryable() => {
                warn!(endpoint = %cfg.container_runtime_endpoint, error = %e, retry_in = ?delay, "container runtime not ready");
            }
            Err(e) => {
                error!(endpoint = %cfg.container_runtime_endpoint, error = %e, retry_in = ?delay, "container runtime refused the connection");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// How often cached CNI attachments are checked against the runtime's
/// sandboxes (spec 1.1 GC); the first pass runs at start.
pub const CNI_GC_PERIOD: Duration = Duration::from_secs(15);

type Runner = cni::chain::CniRunner<cni::exec::ProcessExec>;

/// CNI GC, at start and then periodically: attachments in the cache whose
/// sandbox the runtime no longer has get DEL (then GC for 1.1 plugins).
async fn gc_loop(rt: &impl Runtime, runner: &Runner, board: &Board) {
    loop {
        match rt.list_pod_sandboxes(Default::default()).await {
            Ok(sandboxes) => {
                let live = sandboxes.into_iter().map(|s| s.id).collect();
                let report = runner.gc(&live).await;
                if !report.deleted.is_empty() || !report.errors.is_empty() {
                    info!(deleted = ?report.deleted, errors = ?report.errors, "cni gc");
                }
            }
            Err(e) => warn!(error = %crate::error_chain(&e), "cni gc: cannot list sandboxes"),
        }
        // Events of pods that are gone go too.
        let uids: std::collections::HashSet<String> = board.uids().into_iter().collect();
        board.cni.events.retain(|uid| uids.contains(uid));
        tokio::time::sleep(CNI_GC_PERIOD).await;
    }
}

/// After a restart, CHECK (CNI ≥ 0.4.0) the attachments of the sandboxes
/// this node already runs; a failure is logged and recorded as an event of
/// the pod (the runtime keeps the sandbox; kubelet would not recreate it).
async fn check_adopted(rt: &impl Runtime, runner: &Runner, board: &Board, node: &str) {
    let selector =
        crate::cri::Labels::from([(crate::labels::MANAGED_BY_NODE.to_string(), node.to_string())]);
    let Ok(sandboxes) = rt.list_pod_sandboxes(selector).await else {
        return;
    };
    for sb in sandboxes
        .iter()
        .filter(|s| s.state == crate::cri::api::PodSandboxState::SandboxReady as i32)
    {
        let uid = sb
            .labels
            .get(crate::labels::POD_UID)
            .cloned()
            .unwrap_or_default();
        for cached in runner.attachments(&sb.id).await {
            if cached.result.is_null() {
                continue;
            }
            let att = cni::chain::Attachment {
                container_id: cached.container_id.clone(),
                netns: cached.netns.clone(),
                ifname: cached.if_name.clone(),
                args: cached.cni_args.clone(),
                capability_args: cached.capability_args.clone(),
            };
            let (result, report) = runner.check_report(&cached.network_name, &att).await;
            match result {
                Ok(()) => {
                    info!(pod_uid = %uid, network = %cached.network_name, timings = %report.summary(), "cni check passed for adopted pod")
                }
                Err(e) => {
                    let msg = crate::error_chain(&e);
                    warn!(pod_uid = %uid, network = %cached.network_name, error = %msg, "cni check failed for adopted pod");
                    board.cni.events.push(
                        &uid,
                        cni::observe::EventType::Warning,
                        "CNICheckFailed",
                        msg,
                    );
                }
            }
        }
    }
}

/// The local address the node reaches `server` from (its hostIP when
/// `--node-ip` is not given); empty if it cannot be found.
fn local_address_towards(server: &str) -> String {
    let host = server
        .split("://")
        .nth(1)
        .unwrap_or(server)
        .split('/')
        .next()
        .unwrap_or_default();
    let target = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:443")
    };
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect(&target)?;
            s.local_addr()
        })
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

/// Discover a driver of the config's `csiDrivers` once it answers
/// (retried with backoff; a driver often starts after the agent).
async fn discover_static(registry: &crate::csi::Registry, name: &str) {
    let mut delay = std::time::Duration::from_secs(1);
    loop {
        match registry.refresh(name).await {
            Ok(info) => {
                info!(driver = name, version = %info.vendor_version, "CSI driver found");
                return;
            }
            Err(e) => {
                warn!(driver = name, error = %crate::error_chain(&e), retry_in = ?delay, "CSI driver not reachable yet");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(30));
    }
}

/// Unstage the staged volumes no pod's record names (`CsiPlugin::sweep`),
/// retried until it goes through (their drivers may start later).
async fn sweep_staged(plugin: &crate::volume::csi::CsiPlugin) {
    let mut delay = std::time::Duration::from_secs(2);
    loop {
        match plugin.sweep().await {
            Ok(n) => {
                if n > 0 {
                    info!(volumes = n, "unstaged CSI volumes no pod uses");
                }
                return;
            }
            Err(e) => {
                debug!(error = %crate::error_chain(&e), retry_in = ?delay, "CSI sweep incomplete");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(60));
    }
}

/// Run the agent until `cancel` fires. Pods keep running afterwards.
pub async fn run(cfg: Config, cancel: CancellationToken) -> Result<(), AgentError> {
    // API server mode: credentials checked before anything starts; the
    // server itself may still be away (the node task retries).
    let api = crate::api::client::connect(&cfg).await?;
    let pod_cidr = Arc::new(if api.is_some() {
        cni::pod_cidr::PodCidr::waiting()
    } else {
        cni::pod_cidr::PodCidr::standalone()
    });
    for dir in [&cfg.state_dir, &cfg.state_dir.join("pods")] {
        std::fs::create_dir_all(dir).map_err(|source| AgentError::StateDir {
            path: dir.clone(),
            source,
        })?;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700));
    }

    // Sources first: the desired set must be known before anything is torn down.
    let first = match &cfg.static_pod_path {
        Some(dir) => static_dir::scan(dir, &cfg.node_name, &Snapshot::default()),
        None => Snapshot::default(),
    };
    for e in &first.errors {
        warn!(file = %e.file, error = %e.message, "bad manifest");
    }
    let mut tasks = tokio::task::JoinSet::new();
    // TLS bootstrap and rotation (issue 9): until a certificate is issued
    // the API tasks' requests wait; nothing else does.
    if let Some(setup) = api.as_ref().and_then(|a| a.certificates.clone()) {
        tasks.spawn(crate::api::bootstrap::run(setup, cancel.clone()));
    }
    // Every pod source feeds the merger; the manager sees their union.
    let mut sources = vec![];
    let (file_tx, file_rx) = watch::channel(first);
    if let Some(dir) = cfg.static_pod_path.clone() {
        sources.push(merge::Source::listed("file", file_rx));
        let (node, every, c) = (
            cfg.node_name.clone(),
            cfg.file_check_frequency,
            cancel.clone(),
        );
        tasks.spawn(async move {
            tokio::select! {
                _ = c.cancelled() => {}
                _ = static_dir::watch(dir, node, every, file_tx) => {}
            }
        });
    }
    // API server mode, pods (issue 7): the pods bound to this node are a
    // source; their status is written back by the status writer (a sink,
    // below), static pods get mirror pods. The source and the mirror task
    // start once the sinks exist.
    let mut api_pods = None;
    if let Some(api) = &api {
        let (tx, src) = merge::channel(crate::api::pods::SOURCE);
        sources.push(src);
        let host_ip = cfg
            .node_ip
            .map_or_else(|| local_address_towards(&api.server), |ip| ip.to_string());
        if cfg.server_tls_bootstrap {
            // The kubelet API's serving certificate, for its names.
            let names = vec![cfg.node_name.clone(), host_ip.clone()];
            tasks.spawn(crate::api::bootstrap::run_serving(
                api.client.clone(),
                cfg.node_name.clone(),
                cfg.cert_dir.clone(),
                names,
                cancel.clone(),
            ));
        }
        if cfg.node_routes {
            // Pods reach the other nodes' pods by pod IP (issue 9).
            tasks.spawn(crate::api::routes::run(
                api.client.clone(),
                cfg.node_name.clone(),
                Box::new(crate::api::routes::IpRoutes),
                cancel.clone(),
            ));
        }
        let (writer, task) = crate::api::status_writer::StatusWriter::new(
            api.client.clone(),
            host_ip,
            cancel.clone(),
        );
        tasks.spawn(task);
        api_pods = Some((api.client.clone(), tx, writer));
    }
    let (snap_tx, snap_rx) = watch::channel(merge::first(&mut sources));
    {
        let c = cancel.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = c.cancelled() => {}
                _ = merge::run(sources, snap_tx) => {}
            }
        });
    }

    // The CNI path: chain runner, the socket the delegating plugin dials,
    // then the plugin and its config in the runtime's CNI dirs.
    let networks = cni::config::load_dir(&cfg.cni_conf_dir);
    for (file, error) in &networks.errors {
        warn!(file = %file.display(), %error, "bad CNI network config");
    }
    if networks.default.is_none()
        && let Err(source) = cni::config::load_default(&cfg.cni_conf_dir)
    {
        return Err(AgentError::CniConfig {
            dir: cfg.cni_conf_dir.clone(),
            source,
        });
    }
    info!(networks = ?networks.networks.keys().collect::<Vec<_>>(), default = ?networks.default, "cni networks loaded");
    let default_net = networks
        .default
        .as_ref()
        .and_then(|n| networks.networks.get(n));
    pod_cidr.set_needed(default_net.is_some_and(cni::pod_cidr::uses_placeholder));
    let store = Arc::new(cni::config::NetworkStore::new(networks));
    {
        let (dir, store, c) = (cfg.cni_conf_dir.clone(), store.clone(), cancel.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = c.cancelled() => {}
                _ = cni::config::watch_dir(dir, store) => {}
            }
        });
    }
    let board = Board::default();
    let runner = Arc::new(
        cni::chain::CniRunner::new(
            cni::exec::ProcessExec::from_config(&cfg),
            store,
            cni::cache::ResultCache::new(cfg.cni_cache_dir.clone()),
            board.cni.metrics.clone(),
        )
        .with_pod_cidr(pod_cidr.clone()),
    );
    let cni_socket = cfg.cni_socket();
    let listener = cni::server::bind(&cni_socket).map_err(|source| AgentError::Bind {
        path: cni_socket.clone(),
        source,
    })?;
    let handler = Arc::new(cni::server::CniHandler {
        runner: runner.clone(),
        pods: Arc::new(DesiredPodNetworks(snap_rx.clone())),
        events: board.cni.events.clone(),
        status: board.cni.network_status.clone(),
    });
    tasks.spawn(cni::server::serve(listener, handler, cancel.clone()));
    cni::install::install(&cfg).map_err(AgentError::CniInstall)?;

    let control_socket = cfg.control_socket();
    let listener = control::bind_private(&control_socket).map_err(|source| AgentError::Bind {
        path: control_socket.clone(),
        source,
    })?;
    // CSI drivers (issue 8): the config's `csiDrivers`, discovered at
    // start (retried until they answer), and those that register through
    // kubelet's plugin registration dir.
    let csi_registry = crate::csi::registry_for(&cfg).map_err(AgentError::Csi)?;
    if let Some(api) = &api {
        // The node's CSINode: each discovered driver's node id, topology
        // and volume limit, for the cluster's CSI controllers.
        tasks.spawn(crate::api::csi_node::run(
            api.client.clone(),
            cfg.node_name.clone(),
            csi_registry.clone(),
            cancel.clone(),
        ));
    }
    {
        let (dir, registry) = (
            crate::csi::registry_dir(&cfg.state_dir),
            csi_registry.clone(),
        );
        let c = cancel.clone();
        tasks.spawn(async move {
            if let Err(e) =
                crate::csi::registration::watch(dir, registry, crate::csi::REGISTRATION_RESCAN, c)
                    .await
            {
                warn!(error = %crate::error_chain(&e), "CSI plugin registration is off");
            }
        });
    }
    for d in &cfg.csi_drivers {
        let (registry, name, c) = (csi_registry.clone(), d.name.clone(), cancel.clone());
        // Node-wide tasks run until the agent stops: this one then idles.
        tasks.spawn(async move {
            tokio::select! {
                _ = c.cancelled() => {}
                _ = discover_static(&registry, &name) => c.cancelled().await,
            }
        });
    }
    // Standalone PV/PVC: the claim controller binds the manifest dir's
    // claims and provisions through the CSI drivers. Not in API server
    // mode: the cluster's controllers do it there, and claims are read
    // through the object lookup.
    let mut claim_resolver: Option<Arc<dyn crate::volume::resolve::ClaimResolver>> = None;
    let volume_inputs = crate::objects::Changes::default();
    let volumes_view = if api.is_none() {
        let controller = Arc::new(crate::csi::controller::Controller::new(
            csi_registry.clone(),
        ));
        let claims = Arc::new(
            crate::volume::provision::Claims::open(&cfg.state_dir, Some(controller))
                .map_err(AgentError::Claims)?,
        );
        claim_resolver = Some(claims.clone());
        let view = claims.view();
        // A claim bound or its volume provisioned: the pods waiting on
        // that claim retry now.
        let (mut bindings, changes, c) = (claims.view(), volume_inputs.clone(), cancel.clone());
        tasks.spawn(async move {
            let mut before = crate::volume::provision::claim_states(&bindings.borrow_and_update());
            loop {
                tokio::select! {
                    _ = c.cancelled() => return,
                    r = bindings.changed() => match r {
                        Ok(()) => {
                            let now = crate::volume::provision::claim_states(&bindings.borrow_and_update());
                            for claim in crate::volume::provision::changed_claims(&before, &now) {
                                changes.bump_for(claim);
                            }
                            before = now;
                        }
                        Err(_) => return,
                    },
                }
            }
        });
        tasks.spawn(crate::volume::provision::run(
            claims,
            snap_rx.clone(),
            cancel.clone(),
        ));
        view
    } else {
        watch::channel(Default::default()).1
    };
    let logs_dir = cfg.pod_logs_dir.to_string_lossy().into_owned();
    let stats_claims: Option<Arc<dyn crate::volume::stats::ClaimVolumes>> =
        api.is_none().then(|| Arc::new(volumes_view.clone()) as _);
    tasks.spawn(control::serve(
        listener,
        board.clone(),
        volumes_view,
        logs_dir,
        cancel.clone(),
    ));

    let Some(runtime) = connect_runtime(&cfg, &cancel).await else {
        return Ok(());
    };
    let (runtime_name, runtime_version) = runtime.version().await.unwrap_or_default();
    info!(runtime = %runtime_name, version = %runtime_version, api = ?runtime.api_version(), "container runtime connected");
    board.readiness.runtime_connected();

    // Where pod views and events go: the board, and in API mode the server.
    let mut sinks = crate::sink::Sinks::board(&board);
    if let Some((client, _, writer)) = &api_pods {
        sinks.status.push(writer.clone());
        // kubelet's events, aggregated and rate-limited (api::events).
        let (recorder, task) =
            crate::api::events::recorder(client.clone(), cfg.node_name.clone(), cancel.clone());
        sinks.events.push(recorder);
        tasks.spawn(task);
    }
    let sinks = Arc::new(sinks);
    if let Some((client, tx, writer)) = api_pods {
        tasks.spawn(crate::api::pods::run(
            client.clone(),
            cfg.node_name.clone(),
            tx,
            sinks.clone(),
            sinks.clone(),
            cancel.clone(),
        ));
        tasks.spawn(crate::api::mirror::run(
            client,
            cfg.node_name.clone(),
            snap_rx.clone(),
            Some(writer),
            cancel.clone(),
        ));
    }
    // The objects pods use (issue 7): the manifest dir's, from the merged
    // snapshot; in API mode then the server's, watched one by one.
    let local = crate::objects::ObjectStore::default();
    local.replace(snap_rx.borrow().all_objects());
    {
        let (store, rx, c) = (local.clone(), snap_rx.clone(), cancel.clone());
        let changes = volume_inputs.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = c.cancelled() => {}
                _ = crate::source::feed_objects(store, rx, changes) => {}
            }
        });
    }
    let objects: Arc<dyn crate::objects::ObjectLookup> = match &api {
        Some(api) => {
            let watched = Arc::new(
                crate::api::objects::WatchedObjects::new(api.client.clone())
                    .with_changes(volume_inputs.clone()),
            );
            let (w, rx, c) = (watched.clone(), snap_rx.clone(), cancel.clone());
            tasks.spawn(async move {
                tokio::select! {
                    _ = c.cancelled() => {}
                    _ = crate::api::objects::prune(w, rx) => {}
                }
            });
            Arc::new(crate::objects::Layered {
                local,
                remote: watched,
            })
        }
        None => Arc::new(local),
    };
    // The CSI volume plugin: claims from the standalone binder, or read
    // through the object lookup in API server mode.
    let claims: Arc<dyn crate::volume::resolve::ClaimResolver> = match claim_resolver {
        Some(c) => c,
        None => Arc::new(crate::volume::resolve::LookupResolver {
            objects: objects.clone(),
        }),
    };
    let mut csi_plugin = crate::volume::csi::CsiPlugin::new(
        cfg.state_dir.clone(),
        cfg.node_name.clone(),
        Arc::new(crate::csi::node::Nodes::new(csi_registry.clone())),
        claims,
        objects.clone(),
        Arc::new(crate::volume::csi::Host),
    );
    if let Some(api) = &api {
        // CSIDriver objects and VolumeAttachments, as kubelet reads them.
        csi_plugin = csi_plugin.with_cluster(Arc::new(crate::api::csi_objects::ApiCsi {
            client: api.client.clone(),
        }));
    }
    let csi_plugin = Arc::new(csi_plugin);
    {
        // Volumes staged by an agent that died before their last pod's
        // teardown recorded it: unstaged once their driver answers.
        let (plugin, c) = (csi_plugin.clone(), cancel.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = c.cancelled() => {}
                _ = sweep_staged(&plugin) => c.cancelled().await,
            }
        });
    }
    // Volume stats (kubelet_volume_stats_*), every volumeStatsAggPeriod.
    tasks.spawn(crate::volume::stats::run(
        board.clone(),
        cfg.state_dir.clone(),
        Arc::new(crate::volume::stats::HostProbe {
            registry: csi_registry.clone(),
        }),
        stats_claims
            .unwrap_or_else(|| Arc::new(crate::volume::stats::LookupClaims(objects.clone()))),
        cfg.volume_stats_agg_period,
        cancel.clone(),
    ));

    // One node-wide bound on the calls that make the runtime work, shared by
    // every worker, the GC and adoption (cri::bounded).
    let runtime = Bounded::new(runtime, cfg.max_parallel_runtime_requests);
    let shared = Arc::new(Shared {
        runtime: Arc::new(runtime),
        host: HostContext {
            node_name: cfg.node_name.clone(),
            pod_logs_dir: cfg.pod_logs_dir.clone(),
            resolv_conf: std::fs::read_to_string(&cfg.resolv_conf).unwrap_or_else(|e| {
                warn!(path = %cfg.resolv_conf.display(), error = %e, "cannot read resolvConf; pods get no host DNS");
                String::new()
            }),
            cluster_dns: cfg.cluster_dns.clone(),
            cluster_domain: cfg.cluster_domain.clone(),
            memory_capacity: memory_capacity(),
        },
        pods_dir: cfg.state_dir.join("pods"),
        board: board.clone(),
        runtime_name: if runtime_name.is_empty() { "cri".into() } else { runtime_name },
        sync_frequency: cfg.sync_frequency,
        sandbox_slots: tokio::sync::Semaphore::new(cfg.max_parallel_sandbox_creations),
        clock: Arc::new(crate::clock::SystemClock),
        status: sinks.clone(),
        events: sinks,
        objects,
        tokens: api.as_ref().map(|api| {
            Arc::new(crate::api::tokens::Tokens::new(api.client.clone()))
                as Arc<dyn crate::objects::TokenSource>
        }),
        mounter: Arc::new(crate::volume::HostMounter),
        external_volumes: vec![csi_plugin as Arc<dyn crate::volume::External>],
        volume_inputs,
    });
    check_adopted(&*shared.runtime, &runner, &board, &cfg.node_name).await;
    {
        let (rt, runner, board, c) = (
            shared.runtime.clone(),
            runner.clone(),
            board.clone(),
            cancel.clone(),
        );
        tasks.spawn(async move {
            tokio::select! {
                _ = c.cancelled() => {}
                _ = gc_loop(&*rt, &runner, &board) => {}
            }
        });
    }
    // API server mode: the Node, its Lease and status, its podCIDR. Ready
    // follows the runtime answering CRI Version (probed every update period).
    if let Some(api) = api {
        let facts = crate::api::machine::gather(&cfg, (&shared.runtime_name, &runtime_version));
        let settings = crate::api::node::NodeSettings::from_config(&cfg);
        let (ready_tx, ready_rx) = watch::channel(true);
        let (rt, every, c) = (
            shared.runtime.clone(),
            cfg.node_status_update_frequency,
            cancel.clone(),
        );
        tasks.spawn(async move {
            tokio::select! {
                _ = c.cancelled() => {}
                _ = async {
                    loop {
                        tokio::time::sleep(every).await;
                        let up = rt.version().await.is_ok();
                        ready_tx.send_if_modified(|r| std::mem::replace(r, up) != up);
                    }
                } => {}
            }
        });
        tasks.spawn(crate::api::node::run(
            api,
            facts,
            settings,
            ready_rx,
            pod_cidr.clone(),
            cancel.clone(),
        ));
    }
    info!(
        node = %cfg.node_name,
        max_parallel_runtime_requests = cfg.max_parallel_runtime_requests,
        max_parallel_sandbox_creations = cfg.max_parallel_sandbox_creations,
        "minilet started"
    );
    let manager =
        Manager::new(shared, cfg.max_pods as usize, cancel.clone()).run(snap_rx, RELIST_PERIOD);
    let died = supervise(manager, &mut tasks, &cancel).await;
    info!("minilet stopped; pods keep running");
    match died {
        Some(cause) => Err(AgentError::TaskDied { cause }),
        None => Ok(()),
    }
}

/// Run `manager` beside the node-wide `tasks` (sources, CNI server, control
/// socket, CNI GC) until `cancel`. Those tasks end only when cancelled: one
/// that ends before (a panic in it) leaves the node without, say, its CNI
/// server, which a restart of the agent fixes and nothing less would. So it
/// stops the agent, pods kept running, with the cause; a supervisor
/// (systemd, the container runtime) starts it again and it adopts them. A
/// pod's own worker dying is the manager's business, not this.
async fn supervise(
    manager: impl std::future::Future<Output = ()>,
    tasks: &mut tokio::task::JoinSet<()>,
    cancel: &CancellationToken,
) -> Option<String> {
    let mut manager = std::pin::pin!(manager);
    let mut manager_done = false;
    let died = loop {
        tokio::select! {
            () = &mut manager => {
                manager_done = true;
                break None;
            }
            Some(done) = tasks.join_next() => {
                if cancel.is_cancelled() {
                    // Ending because the agent stops.
                    continue;
                }
                break Some(match done {
                    Err(e) if e.is_panic() => "a node-wide agent task panicked".to_string(),
                    Err(_) => "a node-wide agent task was aborted".to_string(),
                    Ok(()) => "a node-wide agent task ended".to_string(),
                });
            }
        }
    };
    if let Some(cause) = &died {
        error!(%cause, "stopping the agent (pods keep running); restart it to recover");
    }
    cancel.cancel();
    if !manager_done {
        manager.await;
    }
    while tasks.join_next().await.is_some() {}
    died
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_node_wide_task_that_panics_stops_the_agent_cleanly() {
        let cancel = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let c = cancel.clone();
        tasks.spawn(async move { c.cancelled().await });
        tasks.spawn(async { panic!("boom") });
        let c = cancel.clone();
        let manager = async move { c.cancelled().await };
        let died = tokio::time::timeout(
            Duration::from_secs(10),
            supervise(manager, &mut tasks, &cancel),
        )
        .await
        .expect("the death stops the agent");
        assert_eq!(died.as_deref(), Some("a node-wide agent task panicked"));
        assert!(cancel.is_cancelled() && tasks.is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_agent_is_not_a_death() {
        let cancel = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..3 {
            let c = cancel.clone();
            tasks.spawn(async move { c.cancelled().await });
        }
        let c = cancel.clone();
        let manager = async move { c.cancelled().await };
        cancel.cancel();
        assert_eq!(supervise(manager, &mut tasks, &cancel).await, None);
        assert!(tasks.is_empty());
    }
}
