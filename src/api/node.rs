//! The Node object, its status and its Lease, as kubelet keeps them.
//!
//! - Registration: create the Node named `node_name` with labels, capacity,
//!   allocatable, nodeInfo, addresses and conditions; if it exists
//!   (AlreadyExists) adopt it and patch our labels onto it. Retried with
//!   backoff until it works: a node that cannot register still runs its
//!   static pods.
//! - Lease `kube-node-lease/<node>` (coordination.k8s.io/v1): holder the
//!   node, `nodeLeaseDurationSeconds`, renewed every quarter of it (10 s
//!   for 40 s, kubelet's renew interval fraction), owned by the Node so the
//!   garbage collector removes it with the Node.
//! - Status: computed every `nodeStatusUpdateFrequency`, PATCHed (strategic
//!   merge on /status, so conditions of others are kept) only when it
//!   changed, and at least every `nodeStatusReportFrequency` (kubelet ≥ 1.17
//!   with the lease as the heartbeat). `lastTransitionTime` moves only when
//!   a condition's status flips; `lastHeartbeatTime` is when it was written.
//! - `spec.podCIDR(s)`, set by kube-controller-manager, is published to the
//!   CNI runner (`cni::pod_cidr`).
//! - Volumes: the Node carries kubelet's `controller-managed-attach-detach`
//!   annotation (the attach/detach controller makes the VolumeAttachments
//!   the CSI plugin waits for), and `status.volumesInUse` lists the CSI
//!   volumes recorded on disk, so the controller never detaches one the
//!   node still has staged or published.
//!
//! Only this node's Node and Lease are touched (the Node authorizer refuses
//! anything else). Failures are logged once per change of message, retried
//! with backoff and jitter, and never stop the agent.
//!
//! Pure parts (status from facts, condition transitions, change detection,
//! the Lease) are functions tested by tables; `run` does the I/O.
//! Side effects of `run`: GET/POST/PATCH of the Node, GET/POST/PUT of the
//! Lease, pressure samples of the machine (`machine::sample`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus,
    NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::client::{ApiClient, describe, status_code};
use crate::cni::pod_cidr::PodCidr;
use crate::config::Config;
use crate::eviction::EvictionHard;

/// The namespace of node leases.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// kubelet's port, reported in daemonEndpoints (kubectl logs/exec dial it).
pub const KUBELET_PORT: i32 = 10250;

/// The machine as the Node describes it (`machine::gather`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeFacts {
    pub node_name: String,
    /// Online CPUs.
    pub cpus: u32,
    /// MemTotal in bytes.
    pub memory_bytes: u64,
    /// Size of the filesystem holding the state dir, in bytes.
    pub ephemeral_storage_bytes: u64,
    /// maxPods: the `pods` capacity.
    pub max_pods: u32,
    /// kubelet `evictionHard`: pressure thresholds, held back from allocatable.
    pub eviction: EvictionHard,
    pub kernel_version: String,
    pub os_image: String,
    /// GOARCH name (amd64, arm64...).
    pub architecture: String,
    pub machine_id: String,
    pub system_uuid: String,
    pub boot_id: String,
    /// "<runtime name>://<version>" from CRI Version.
    pub container_runtime_version: String,
    pub kubelet_version: String,
    pub internal_ip: Option<IpAddr>,
    pub hostname: String,
}

/// The node status timings (kubelet's KubeletConfiguration fields).
#[derive(Clone, Debug, PartialEq)]
pub struct NodeSettings {
    pub update_frequency: Duration,
    pub report_frequency: Duration,
    pub lease_duration_seconds: u32,
    /// Where pressure samples read the filesystem (kubelet's root dir).
    pub state_dir: PathBuf,
}

impl NodeSettings {
    pub fn from_config(cfg: &Config) -> Self {
        NodeSettings {
            update_frequency: cfg.node_status_update_frequency,
            report_frequency: cfg.node_status_report_frequency,
            lease_duration_seconds: cfg.node_lease_duration_seconds,
            state_dir: cfg.state_dir.clone(),
        }
    }

    /// kubelet renews the lease every quarter of its duration.
    pub fn lease_renew_interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.lease_duration_seconds) * 250)
    }

    /// The deadline of one heartbeat request (lease renewal, status read
    /// or patch), kubelet's: the smaller of `nodeStatusUpdateFrequency` and
    /// the lease duration. A connection that died without a reset (the node
    /// cut off from the network) would otherwise hold the request for the
    /// client's read timeout (295 s) and keep the node Unknown for that long
    /// after it is back; dropping the request closes that connection.
    pub fn heartbeat_timeout(&self) -> Duration {
        self.update_frequency
            .min(Duration::from_secs(u64::from(self.lease_duration_seconds)))
            .max(Duration::from_secs(1))
    }
}

/// `request`, failed with a `kube::Error` when it takes longer than
/// `deadline` (see `NodeSettings::heartbeat_timeout`).
async fn heartbeat<T>(
    deadline: Duration,
    request: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    match tokio::time::timeout(deadline, request).await {
        Ok(r) => r,
        Err(_) => Err(kube::Error::Service(
            format!("no answer in {} s (heartbeat timeout)", deadline.as_secs()).into(),
        )),
    }
}

/// One sample of what the pressure conditions look at.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// MemAvailable in bytes; `None` if unreadable.
    pub memory_available: Option<u64>,
    /// MemTotal in bytes (what a percentage threshold is of).
    pub memory_total: u64,
    pub fs_capacity: u64,
    pub fs_available: u64,
    pub inodes: u64,
    pub inodes_free: u64,
}

/// What the node reports each period: what the conditions say, and the
/// volumes it uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    pub runtime_ready: bool,
    /// Why pods cannot get their network yet (`PodCidr::network_not_ready`).
    pub network_not_ready: Option<&'static str>,
    pub memory_pressure: bool,
    pub disk_pressure: bool,
    /// kubelet has no default PID threshold on Linux: always false here.
    pub pid_pressure: bool,
    /// `status.volumesInUse` (`volume::csi::state::volumes_in_use`).
    pub volumes_in_use: Vec<String>,
}

/// The conditions from a sample, against the hard eviction thresholds.
pub fn health(runtime_ready: bool, s: &Sample, e: &EvictionHard) -> Health {
    Health {
        runtime_ready,
        network_not_ready: None,
        memory_pressure: s
            .memory_available
            .is_some_and(|m| e.memory_available.breached(m, s.memory_total.max(m))),
        disk_pressure: e.nodefs_available.breached(s.fs_available, s.fs_capacity)
            || e.nodefs_inodes_free.breached(s.inodes_free, s.inodes),
        pid_pressure: false,
        volumes_in_use: Vec::new(),
    }
}

/// kubelet's annotation that the attach/detach controller attaches and
/// detaches this node's volumes (kubelet's enableControllerAttachDetach,
/// default true): without it the controller makes no VolumeAttachment.
pub const CONTROLLER_MANAGED_ATTACH_DETACH: &str =
    "volumes.kubernetes.io/controller-managed-attach-detach";

/// The annotations minilet keeps on its Node.
pub fn annotations() -> BTreeMap<String, String> {
    BTreeMap::from([(
        CONTROLLER_MANAGED_ATTACH_DETACH.to_string(),
        "true".to_string(),
    )])
}

/// kubelet's labels on its Node (the beta ones are still set by kubelet).
pub fn labels(f: &NodeFacts) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("kubernetes.io/hostname".into(), f.hostname.clone()),
        ("kubernetes.io/os".into(), "linux".into()),
        ("kubernetes.io/arch".into(), f.architecture.clone()),
        ("beta.kubernetes.io/os".into(), "linux".into()),
        ("beta.kubernetes.io/arch".into(), f.architecture.clone()),
    ])
}

/// A byte count as the API server writes it back: a binary suffix when it
/// is a multiple of 1 Ki (the largest that keeps it whole), plain otherwise.
pub fn bytes_quantity(n: u64) -> Quantity {
    const SUFFIXES: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if n == 0 || !n.is_multiple_of(1024) {
        return Quantity(n.to_string());
    }
    let (mut v, mut i) = (n / 1024, 0);
    while v.is_multiple_of(1024) && i + 1 < SUFFIXES.len() {
        v /= 1024;
        i += 1;
    }
    Quantity(format!("{v}{}", SUFFIXES[i]))
}

/// capacity: what the machine has.
pub fn capacity(f: &NodeFacts) -> BTreeMap<String, Quantity> {
    BTreeMap::from([
        ("cpu".into(), Quantity(f.cpus.to_string())),
        ("memory".into(), bytes_quantity(f.memory_bytes)),
        (
            "ephemeral-storage".into(),
            bytes_quantity(f.ephemeral_storage_bytes),
        ),
        ("pods".into(), Quantity(f.max_pods.to_string())),
    ])
}

/// allocatable: capacity minus kubelet's default hard eviction thresholds
/// (no kube/system reservations are configured), as kubelet computes it.
pub fn allocatable(f: &NodeFacts) -> BTreeMap<String, Quantity> {
    let e = &f.eviction;
    let mut a = capacity(f);
    let mem = f.memory_bytes;
    a.insert(
        "memory".into(),
        bytes_quantity(mem - e.memory_available.amount(mem)),
    );
    let fs = f.ephemeral_storage_bytes;
    a.insert(
        "ephemeral-storage".into(),
        bytes_quantity(fs - e.nodefs_available.amount(fs)),
    );
    a
}

/// The four conditions minilet owns, in kubelet's order.
pub const CONDITION_TYPES: [&str; 4] = ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"];

/// (status, reason, message) of each condition, kubelet's words.
fn condition_words(h: &Health) -> [(&'static str, &'static str, &'static str, &'static str); 4] {
    let (f, t) = ("False", "True");
    [
        if h.memory_pressure {
            (
                "MemoryPressure",
                t,
                "KubeletHasInsufficientMemory",
                "kubelet has insufficient memory available",
            )
        } else {
            (
                "MemoryPressure",
                f,
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            )
        },
        if h.disk_pressure {
            (
                "DiskPressure",
                t,
                "KubeletHasDiskPressure",
                "kubelet has disk pressure",
            )
        } else {
            (
                "DiskPressure",
                f,
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
            )
        },
        if h.pid_pressure {
            (
                "PIDPressure",
                t,
                "KubeletHasInsufficientPID",
                "kubelet has insufficient PID available",
            )
        } else {
            (
                "PIDPressure",
                f,
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
            )
        },
        match (h.runtime_ready, h.network_not_ready) {
            (false, _) => ("Ready", f, "KubeletNotReady", "container runtime is down"),
            (true, Some(why)) => ("Ready", f, "KubeletNotReady", why),
            (true, None) => (
                "Ready",
                t,
                "KubeletReady",
                "kubelet is posting ready status",
            ),
        },
    ]
}

/// The conditions for `h` at `now`: lastHeartbeatTime is now; a
/// condition keeps the lastTransitionTime of `prev` (the server's, or what
/// was last written) unless its status flipped.
pub fn conditions(h: &Health, prev: &[NodeCondition], now: Timestamp) -> Vec<NodeCondition> {
    condition_words(h)
        .into_iter()
        .map(|(type_, status, reason, message)| {
            let old = prev.iter().find(|c| c.type_ == type_);
            let transition = match old {
                Some(c) if c.status == status => c.last_transition_time.clone(),
                _ => None,
            };
            NodeCondition {
                type_: type_.into(),
                status: status.into(),
                reason: Some(reason.into()),
                message: Some(message.into()),
                last_heartbeat_time: Some(Time(now)),
                last_transition_time: transition.or(Some(Time(now))),
            }
        })
        .collect()
}

/// The status minilet writes: everything it owns, nothing else.
pub fn status(f: &NodeFacts, h: &Health, prev: &[NodeCondition], now: Timestamp) -> NodeStatus {
    let mut addresses = Vec::new();
    if let Some(ip) = f.internal_ip {
        addresses.push(NodeAddress {
            type_: "InternalIP".into(),
            address: ip.to_string(),
        });
    }
    addresses.push(NodeAddress {
        type_: "Hostname".into(),
        address: f.hostname.clone(),
    });
    NodeStatus {
        capacity: Some(capacity(f)),
        allocatable: Some(allocatable(f)),
        conditions: Some(conditions(h, prev, now)),
        addresses: Some(addresses),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint { port: KUBELET_PORT }),
        }),
        volumes_in_use: (!h.volumes_in_use.is_empty()).then(|| h.volumes_in_use.clone()),
        node_info: Some(NodeSystemInfo {
            architecture: f.architecture.clone(),
            boot_id: f.boot_id.clone(),
            container_runtime_version: f.container_runtime_version.clone(),
            kernel_version: f.kernel_version.clone(),
            kube_proxy_version: String::new(),
            kubelet_version: f.kubelet_version.clone(),
            machine_id: f.machine_id.clone(),
            operating_system: "linux".into(),
            os_image: f.os_image.clone(),
            swap: None,
            system_uuid: f.system_uuid.clone(),
        }),
        ..NodeStatus::default()
    }
}

/// The strategic merge patch writing `new`: a list that became empty is
/// deleted (null), not left as the server has it.
pub fn status_patch(new: &NodeStatus) -> serde_json::Value {
    let mut patch = serde_json::json!({ "status": new });
    if new.volumes_in_use.is_none() {
        patch["status"]["volumesInUse"] = serde_json::Value::Null;
    }
    patch
}

/// Whether `new` says something `old` did not: any difference but the
/// heartbeat times (kubelet's nodeStatusHasChanged).
pub fn changed(old: &NodeStatus, new: &NodeStatus) -> bool {
    let strip = |s: &NodeStatus| {
        let mut s = s.clone();
        for c in s.conditions.iter_mut().flatten() {
            c.last_heartbeat_time = None;
        }
        s
    };
    strip(old) != strip(new)
}

/// Whether the server's conditions (as last seen) disagree with ours: the
/// node lifecycle controller marks a silent node Unknown, and only a write
/// puts it right.
pub fn server_disagrees(server: &[NodeCondition], ours: &[NodeCondition]) -> bool {
    ours.iter().any(|c| {
        server
            .iter()
            .find(|s| s.type_ == c.type_)
            .is_none_or(|s| s.status != c.status || s.reason != c.reason)
    })
}

/// Whether to write now: on a change, or when the report period is up.
pub fn due(changed: bool, since_report: Option<Duration>, report: Duration) -> bool {
    changed || since_report.is_none_or(|d| d >= report)
}

/// The Node to create.
pub fn node_object(f: &NodeFacts, h: &Health, now: Timestamp) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(f.node_name.clone()),
            labels: Some(labels(f)),
            annotations: Some(annotations()),
            ..ObjectMeta::default()
        },
        spec: None,
        status: Some(status(f, h, &[], now)),
    }
}

/// The pod CIDRs of a Node's spec (podCIDRs, else podCIDR).
pub fn pod_cidrs(node: &Node) -> Vec<String> {
    let Some(spec) = &node.spec else {
        return Vec::new();
    };
    match &spec.pod_cidrs {
        Some(list) if !list.is_empty() => list.clone(),
        _ => spec.pod_cidr.iter().cloned().collect(),
    }
}

/// The owner reference kubelet puts on its Lease.
pub fn node_owner(node: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node.into(),
        uid: uid.into(),
        ..OwnerReference::default()
    }
}

/// The Lease renewed at `now`: `base` (the one last read or written, for
/// its resourceVersion) or a new one; owned by the Node when its uid is
/// known.
pub fn renewed_lease(
    base: Option<&Lease>,
    node: &str,
    node_uid: Option<&str>,
    duration_seconds: u32,
    now: Timestamp,
) -> Lease {
    let mut lease = base.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(node.into()),
            namespace: Some(LEASE_NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = Some(node.into());
    spec.lease_duration_seconds = Some(i32::try_from(duration_seconds).unwrap_or(i32::MAX));
    spec.renew_time = Some(MicroTime(now));
    if let Some(uid) = node_uid {
        let owners = lease.metadata.owner_references.get_or_insert_with(Vec::new);
        if !owners.iter().any(|o| o.kind == "Node" && o.uid == uid) {
            owners.push(node_owner(node, uid));
        }
    }
    lease
}

/// Exponential backoff with jitter, and the once-per-change error log.
#[derive(Debug)]
pub struct Retry {
    what: &'static str,
    base: Duration,
    cap: Duration,
    attempts: u32,
    failing: Option<String>,
}

impl Retry {
    pub fn new(what: &'static str, base: Duration, cap: Duration) -> Self {
        Retry {
            what,
            base,
            cap,
            attempts: 0,
            failing: None,
        }
    }

    /// Records a failure; logs it when its message is new; returns how
    /// long to wait (base·2ⁿ up to cap, ±20 %).
    pub fn failed(&mut self, e: &kube::Error) -> Duration {
        let msg = describe(e);
        if self.failing.as_deref() != Some(msg.as_str()) {
            warn!(what = self.what, error = %msg, attempts = self.attempts + 1, "api server request failed; retrying with backoff");
            self.failing = Some(msg);
        }
        let exp = self.base.saturating_mul(1u32 << self.attempts.min(16));
        self.attempts = self.attempts.saturating_add(1);
        jitter(exp.min(self.cap))
    }

    /// Records a success; says so when it follows failures.
    pub fn ok(&mut self) {
        if self.failing.take().is_some() {
            info!(
                what = self.what,
                attempts = self.attempts,
                "api server request works again"
            );
        }
        self.attempts = 0;
    }

    pub fn is_failing(&self) -> bool {
        self.failing.is_some()
    }
}

/// `d` ±20 %, from a fresh std hasher key (random enough to spread nodes).
fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(d.as_nanos() as u64);
    let r = (h.finish() % 401) as f64 / 1000.0; // 0.0 ..= 0.4
    d.mul_f64(0.8 + r)
}

/// `now` to whole seconds: the server keeps metav1.Time at that
/// precision, so what we compare against is what it sent back.
fn now_seconds() -> Timestamp {
    let now = Timestamp::now();
    Timestamp::from_second(now.as_second()).unwrap_or(now)
}

/// The node task: register, then keep the Lease and the status current
/// until `cancel`. Never returns an error: the API server being away or
/// refusing is logged and retried, and the agent goes on running pods.
pub async fn run(
    api: ApiClient,
    facts: NodeFacts,
    settings: NodeSettings,
    runtime_ready: watch::Receiver<bool>,
    pod_cidr: Arc<PodCidr>,
    cancel: CancellationToken,
) {
    let task = async {
        let node = register(&api, &facts, &settings, &runtime_ready, &pod_cidr).await;
        publish_cidr(&pod_cidr, &node);
        let uid = node.metadata.uid.clone();
        let resync = AtomicBool::new(false);
        tokio::join!(
            lease_loop(&api, &settings, uid.as_deref(), &resync),
            status_loop(
                &api,
                &facts,
                &settings,
                &runtime_ready,
                &pod_cidr,
                node,
                &resync
            ),
        );
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        () = task => {}
    }
}

fn current_health(
    facts: &NodeFacts,
    settings: &NodeSettings,
    runtime_ready: &watch::Receiver<bool>,
    pod_cidr: &PodCidr,
) -> Health {
    Health {
        volumes_in_use: crate::volume::csi::state::volumes_in_use(&settings.state_dir),
        network_not_ready: pod_cidr.network_not_ready(),
        ..health(
            *runtime_ready.borrow(),
            &super::machine::sample(&settings.state_dir),
            &facts.eviction,
        )
    }
}

fn publish_cidr(pod_cidr: &PodCidr, node: &Node) {
    let cidrs = pod_cidrs(node);
    if pod_cidr.set(cidrs.clone()) {
        info!(pod_cidrs = ?cidrs, "node podCIDR assigned: the default network's usePodCidr range");
    }
}

/// Create the Node, or adopt it; retried until one works.
async fn register(
    api: &ApiClient,
    facts: &NodeFacts,
    settings: &NodeSettings,
    runtime_ready: &watch::Receiver<bool>,
    pod_cidr: &PodCidr,
) -> Node {
    let nodes: Api<Node> = Api::all(api.client.clone());
    let mut retry = Retry::new(
        "register node",
        Duration::from_millis(200),
        Duration::from_secs(7),
    );
    loop {
        let attempt = async {
            api.refresh().await?;
            let h = current_health(facts, settings, runtime_ready, pod_cidr);
            match nodes
                .create(
                    &PostParams::default(),
                    &node_object(facts, &h, now_seconds()),
                )
                .await
            {
                Ok(n) => {
                    info!(node = %facts.node_name, "node registered");
                    Ok(n)
                }
                Err(e) if status_code(&e) == Some(409) => adopt(&nodes, facts).await,
                Err(e) => Err(e),
            }
        };
        match attempt.await {
            Ok(n) => {
                retry.ok();
                return n;
            }
            Err(e) => tokio::time::sleep(retry.failed(&e)).await,
        }
    }
}

/// The Node exists (an earlier run, or kubelet before): take it over, and
/// put our labels on it if they are not there.
async fn adopt(nodes: &Api<Node>, facts: &NodeFacts) -> Result<Node, kube::Error> {
    let existing = nodes.get(&facts.node_name).await?;
    let want = labels(facts);
    let have = existing.metadata.labels.clone().unwrap_or_default();
    let want_ann = annotations();
    let have_ann = existing.metadata.annotations.clone().unwrap_or_default();
    let missing = want.iter().any(|(k, v)| have.get(k) != Some(v))
        || want_ann.iter().any(|(k, v)| have_ann.get(k) != Some(v));
    let node = if missing {
        let patch = serde_json::json!({"metadata": {"labels": want, "annotations": want_ann}});
        nodes
            .patch(
                &facts.node_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?
    } else {
        existing
    };
    info!(node = %facts.node_name, labels_patched = missing, "node exists: adopted");
    Ok(node)
}

/// Renew the Lease every quarter of its duration; on failure back off
/// (200 ms doubling to 7 s, kubelet's lease controller) and ask the status
/// loop to re-read the Node (a stale lease makes the controller mark it
/// Unknown).
async fn lease_loop(
    api: &ApiClient,
    settings: &NodeSettings,
    node_uid: Option<&str>,
    resync: &AtomicBool,
) {
    let leases: Api<Lease> = Api::namespaced(api.client.clone(), LEASE_NAMESPACE);
    let node = api.node_name.as_str();
    let mut retry = Retry::new(
        "renew node lease",
        Duration::from_millis(200),
        Duration::from_secs(7),
    );
    let mut cached: Option<Lease> = None;
    loop {
        // A server without coordination.k8s.io/v1 (before 1.14) has no node
        // leases: one line says so (server_lacks) and this loop only looks
        // again now and then. Such a server wants a status heartbeat every
        // update period instead, which minilet does not do: it is older
        // than anything minilet supports.
        if api.server_lacks("coordination.k8s.io/v1") {
            tokio::time::sleep(settings.report_frequency).await;
            continue;
        }
        let attempt = async {
            let base = match cached.take() {
                Some(l) => Some(l),
                None => leases.get_opt(node).await?,
            };
            let lease = renewed_lease(
                base.as_ref(),
                node,
                node_uid,
                settings.lease_duration_seconds,
                Timestamp::now(),
            );
            if base.is_some() {
                leases.replace(node, &PostParams::default(), &lease).await
            } else {
                leases.create(&PostParams::default(), &lease).await
            }
        };
        let wait = match heartbeat(settings.heartbeat_timeout(), attempt).await {
            Ok(l) => {
                cached = Some(l);
                retry.ok();
                settings.lease_renew_interval()
            }
            Err(e) => {
                // Conflict or anything else: read it afresh next time.
                resync.store(true, Ordering::Relaxed);
                retry.failed(&e)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Compute the status every update period; patch it when it changed, when
/// the server disagrees, or when the report period is up.
async fn status_loop(
    api: &ApiClient,
    facts: &NodeFacts,
    settings: &NodeSettings,
    runtime_ready: &watch::Receiver<bool>,
    pod_cidr: &PodCidr,
    registered: Node,
    resync: &AtomicBool,
) {
    let nodes: Api<Node> = Api::all(api.client.clone());
    let node = api.node_name.as_str();
    let mut retry = Retry::new(
        "update node status",
        Duration::from_millis(500),
        settings.update_frequency,
    );
    let mut server: Vec<NodeCondition> = registered
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default();
    let mut last_sent: Option<NodeStatus> = None;
    let mut last_report: Option<Instant> = None;
    let mut first = true;
    // Whether the last status computed said the network was not ready.
    let mut network_waited = false;
    loop {
        if !first {
            // Waiting for the podCIDR keeps the node NotReady: look again
            // every second, so it turns Ready as soon as it has one (also
            // when the answer to the last patch brought it).
            let wait = if network_waited {
                settings.update_frequency.min(Duration::from_secs(1))
            } else {
                settings.update_frequency
            };
            tokio::time::sleep(wait).await;
        }
        first = false;
        // Re-read the Node after failures, and until it has its podCIDR.
        let waiting = matches!(pod_cidr.get(), crate::cni::pod_cidr::PodCidrState::Waiting);
        if resync.swap(false, Ordering::Relaxed) || waiting {
            match heartbeat(settings.heartbeat_timeout(), nodes.get(node)).await {
                Ok(n) => {
                    publish_cidr(pod_cidr, &n);
                    server = n.status.and_then(|s| s.conditions).unwrap_or_default();
                }
                Err(e) => {
                    resync.store(true, Ordering::Relaxed);
                    retry.failed(&e);
                    continue;
                }
            }
        }
        let h = current_health(facts, settings, runtime_ready, pod_cidr);
        network_waited = h.network_not_ready.is_some();
        let new = status(facts, &h, &server, now_seconds());
        let ours = new.conditions.as_deref().unwrap_or_default();
        let is_changed = last_sent.as_ref().is_none_or(|old| changed(old, &new))
            || server_disagrees(&server, ours);
        if !due(
            is_changed,
            last_report.map(|t| t.elapsed()),
            settings.report_frequency,
        ) {
            continue;
        }
        let patch = status_patch(&new);
        let (params, patch) = (PatchParams::default(), Patch::Strategic(&patch));
        let request = nodes.patch_status(node, &params, &patch);
        match heartbeat(settings.heartbeat_timeout(), request).await {
            Ok(n) => {
                retry.ok();
                publish_cidr(pod_cidr, &n);
                server = n.status.and_then(|s| s.conditions).unwrap_or_default();
                if is_changed {
                    let ready = ours.iter().find(|c| c.type_ == "Ready");
                    info!(ready = ?ready.map(|c| &c.status), "node status updated");
                }
                last_sent = Some(new);
                last_report = Some(Instant::now());
            }
            Err(e) => {
                // Retried next period (the backoff is capped to it); the
                // Node is re-read first.
                resync.store(true, Ordering::Relaxed);
                retry.failed(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> NodeFacts {
        NodeFacts {
            node_name: "n1".into(),
            eviction: EvictionHard::default(),
            cpus: 2,
            memory_bytes: 4030680 * 1024,
            ephemeral_storage_bytes: 30308240 * 1024,
            max_pods: 110,
            kernel_version: "6.1.0".into(),
            os_image: "Debian GNU/Linux 12 (bookworm)".into(),
            architecture: "amd64".into(),
            machine_id: "m".into(),
            system_uuid: "s".into(),
            boot_id: "b".into(),
            container_runtime_version: "containerd://1.6.20".into(),
            kubelet_version: "v1.33.0-minilet.0.1.0".into(),
            internal_ip: Some("192.0.2.2".parse().unwrap()),
            hostname: "n1".into(),
        }
    }

    #[test]
    fn volumes_in_use_are_reported_and_cleared() {
        let f = facts();
        let h = Health {
            volumes_in_use: vec!["kubernetes.io/csi/d^vol-1".into()],
            ..ready()
        };
        let s = status(&f, &h, &[], t(0));
        assert_eq!(
            s.volumes_in_use.as_deref(),
            Some(&["kubernetes.io/csi/d^vol-1".to_string()][..])
        );
        assert_eq!(
            status_patch(&s)["status"]["volumesInUse"][0],
            "kubernetes.io/csi/d^vol-1"
        );
        let none = status(&f, &ready(), &[], t(10));
        assert!(changed(&s, &none));
        let p = status_patch(&none);
        assert!(p["status"].as_object().unwrap()["volumesInUse"].is_null());
        let node = node_object(&f, &ready(), t(0));
        assert_eq!(
            node.metadata.annotations.unwrap()[CONTROLLER_MANAGED_ATTACH_DETACH],
            "true"
        );
    }

    fn ready() -> Health {
        Health {
            runtime_ready: true,
            ..Health::default()
        }
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn q(m: &BTreeMap<String, Quantity>, k: &str) -> String {
        m[k].0.clone()
    }

    #[test]
    fn status_is_built_from_the_facts_as_kubelet_reports_them() {
        let s = status(&facts(), &ready(), &[], t(0));
        let cap = s.capacity.as_ref().unwrap();
        assert_eq!(q(cap, "cpu"), "2");
        assert_eq!(q(cap, "memory"), "4030680Ki");
        assert_eq!(q(cap, "ephemeral-storage"), "30308240Ki");
        assert_eq!(q(cap, "pods"), "110");
        let alloc = s.allocatable.as_ref().unwrap();
        assert_eq!(q(alloc, "memory"), "3928280Ki", "minus 100Mi");
        assert_eq!(q(alloc, "ephemeral-storage"), "27277416Ki", "minus 10%");
        assert_eq!(q(alloc, "cpu"), "2");
        let info = s.node_info.as_ref().unwrap();
        assert_eq!(info.operating_system, "linux");
        assert_eq!(info.container_runtime_version, "containerd://1.6.20");
        assert_eq!(info.kube_proxy_version, "");
        let addrs: Vec<_> = s
            .addresses
            .as_ref()
            .unwrap()
            .iter()
            .map(|a| format!("{}={}", a.type_, a.address))
            .collect();
        assert_eq!(addrs, ["InternalIP=192.0.2.2", "Hostname=n1"]);
        assert_eq!(
            s.daemon_endpoints.unwrap().kubelet_endpoint.unwrap().port,
            10250
        );
        let conds: Vec<_> = s
            .conditions
            .unwrap()
            .iter()
            .map(|c| format!("{}={} {}", c.type_, c.status, c.reason.clone().unwrap()))
            .collect();
        assert_eq!(
            conds,
            [
                "MemoryPressure=False KubeletHasSufficientMemory",
                "DiskPressure=False KubeletHasNoDiskPressure",
                "PIDPressure=False KubeletHasSufficientPID",
                "Ready=True KubeletReady",
            ]
        );
        let l = labels(&facts());
        assert_eq!(l["kubernetes.io/hostname"], "n1");
        assert_eq!(l["kubernetes.io/os"], "linux");
        assert_eq!(l["kubernetes.io/arch"], "amd64");
    }

    #[test]
    fn quantities_are_written_in_the_servers_canonical_form() {
        for (n, want) in [
            (0, "0"),
            (1000, "1000"),
            (1024, "1Ki"),
            (1536 * 1024, "1536Ki"),
            (4 * 1024 * 1024 * 1024, "4Gi"),
            (27933017657, "27933017657"),
        ] {
            assert_eq!(bytes_quantity(n).0, want, "{n}");
        }
    }

    #[test]
    fn pressure_follows_kubelets_default_hard_thresholds() {
        let ok = Sample {
            memory_available: Some(1 << 30),
            memory_total: 4 << 30,
            fs_capacity: 100,
            fs_available: 50,
            inodes: 100,
            inodes_free: 50,
        };
        type Case = (&'static str, Sample, bool, bool);
        let cases: Vec<Case> = vec![
            ("healthy", ok.clone(), false, false),
            (
                "memory below 100Mi",
                Sample {
                    memory_available: Some(99 << 20),
                    ..ok.clone()
                },
                true,
                false,
            ),
            (
                "memory unreadable",
                Sample {
                    memory_available: None,
                    ..ok.clone()
                },
                false,
                false,
            ),
            (
                "fs below 10%",
                Sample {
                    fs_available: 9,
                    ..ok.clone()
                },
                false,
                true,
            ),
            (
                "fs at 10%",
                Sample {
                    fs_available: 10,
                    ..ok.clone()
                },
                false,
                false,
            ),
            (
                "inodes below 5%",
                Sample {
                    inodes_free: 4,
                    ..ok.clone()
                },
                false,
                true,
            ),
            (
                "no fs info",
                Sample {
                    fs_capacity: 0,
                    fs_available: 0,
                    inodes: 0,
                    inodes_free: 0,
                    ..ok.clone()
                },
                false,
                false,
            ),
        ];
        for (name, s, mem, disk) in cases {
            let h = health(true, &s, &EvictionHard::default());
            assert_eq!((h.memory_pressure, h.disk_pressure), (mem, disk), "{name}");
            assert!(!h.pid_pressure);
        }
        let words = conditions(
            &Health {
                runtime_ready: false,
                network_not_ready: None,
                memory_pressure: true,
                disk_pressure: true,
                pid_pressure: false,
                volumes_in_use: Vec::new(),
            },
            &[],
            t(0),
        );
        let got: Vec<_> = words
            .iter()
            .map(|c| {
                (
                    c.status.as_str(),
                    c.reason.as_deref().unwrap(),
                    c.message.as_deref().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "True",
                    "KubeletHasInsufficientMemory",
                    "kubelet has insufficient memory available"
                ),
                (
                    "True",
                    "KubeletHasDiskPressure",
                    "kubelet has disk pressure"
                ),
                (
                    "False",
                    "KubeletHasSufficientPID",
                    "kubelet has sufficient PID available"
                ),
                ("False", "KubeletNotReady", "container runtime is down"),
            ]
        );
    }

    #[test]
    fn a_node_waiting_for_its_pod_cidr_is_not_ready_with_the_reason() {
        let cidr = PodCidr::waiting();
        assert_eq!(
            cidr.network_not_ready(),
            None,
            "a network without usePodCidr needs none"
        );
        cidr.set_needed(true);
        let why = cidr.network_not_ready().expect("waiting for the podCIDR");
        let h = Health {
            network_not_ready: Some(why),
            ..ready()
        };
        let ready_cond = conditions(&h, &[], t(0))
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready_cond.status, "False");
        assert_eq!(ready_cond.reason.as_deref(), Some("KubeletNotReady"));
        assert!(ready_cond.message.unwrap().contains("no spec.podCIDR yet"));
        cidr.set(vec!["10.244.1.0/24".into()]);
        assert_eq!(cidr.network_not_ready(), None, "ready once it has one");
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let first = conditions(&ready(), &[], t(0));
        assert!(
            first
                .iter()
                .all(|c| c.last_transition_time == Some(Time(t(0))))
        );
        // Same health later: heartbeat moves, transition stays.
        let later = conditions(&ready(), &first, t(10));
        for c in &later {
            assert_eq!(c.last_heartbeat_time, Some(Time(t(10))));
            assert_eq!(c.last_transition_time, Some(Time(t(0))), "{}", c.type_);
        }
        // The runtime goes down: only Ready flips.
        let down = Health {
            runtime_ready: false,
            ..ready()
        };
        let flipped = conditions(&down, &later, t(20));
        for c in &flipped {
            let want = if c.type_ == "Ready" { t(20) } else { t(0) };
            assert_eq!(c.last_transition_time, Some(Time(want)), "{}", c.type_);
        }
        // The controller's Unknown counts as a different status too.
        let mut unknown = later.clone();
        unknown[3].status = "Unknown".into();
        unknown[3].reason = Some("NodeStatusUnknown".into());
        let back = conditions(&ready(), &unknown, t(30));
        assert_eq!(back[3].last_transition_time, Some(Time(t(30))));
        assert!(server_disagrees(&unknown, &back));
        assert!(!server_disagrees(&back, &back));
        assert!(
            server_disagrees(&[], &back),
            "no conditions on the server yet"
        );
    }

    #[test]
    fn only_real_changes_or_the_report_period_cause_a_write() {
        let f = facts();
        let s0 = status(&f, &ready(), &[], t(0));
        let prev = s0.conditions.clone().unwrap();
        let s1 = status(&f, &ready(), &prev, t(10));
        assert!(!changed(&s0, &s1), "only heartbeats differ");
        let down = Health {
            runtime_ready: false,
            ..ready()
        };
        assert!(changed(&s0, &status(&f, &down, &prev, t(10))));
        let mut bigger = f.clone();
        bigger.max_pods = 20;
        assert!(changed(&s0, &status(&bigger, &ready(), &prev, t(10))));
        let report = Duration::from_secs(300);
        assert!(due(false, None, report), "never written: write");
        assert!(!due(false, Some(Duration::from_secs(10)), report));
        assert!(due(false, Some(Duration::from_secs(300)), report));
        assert!(due(true, Some(Duration::from_secs(1)), report));
    }

    #[test]
    fn the_lease_is_renewed_in_place_and_owned_by_the_node() {
        let fresh = renewed_lease(None, "n1", Some("uid-1"), 40, t(0));
        assert_eq!(fresh.metadata.name.as_deref(), Some("n1"));
        assert_eq!(fresh.metadata.namespace.as_deref(), Some(LEASE_NAMESPACE));
        let spec = fresh.spec.as_ref().unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("n1"));
        assert_eq!(spec.lease_duration_seconds, Some(40));
        assert_eq!(spec.renew_time, Some(MicroTime(t(0))));
        let owners = fresh.metadata.owner_references.clone().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (owners[0].kind.as_str(), owners[0].uid.as_str()),
            ("Node", "uid-1")
        );

        let mut read = fresh.clone();
        read.metadata.resource_version = Some("42".into());
        let again = renewed_lease(Some(&read), "n1", Some("uid-1"), 40, t(10));
        assert_eq!(
            again.metadata.resource_version.as_deref(),
            Some("42"),
            "for the PUT"
        );
        assert_eq!(again.spec.unwrap().renew_time, Some(MicroTime(t(10))));
        assert_eq!(
            again.metadata.owner_references.unwrap().len(),
            1,
            "not duplicated"
        );
        // Before the Node's uid is known: no owner yet.
        let orphan = renewed_lease(None, "n1", None, 40, t(0));
        assert!(orphan.metadata.owner_references.is_none());
        assert_eq!(
            NodeSettings {
                update_frequency: Duration::from_secs(10),
                report_frequency: Duration::from_secs(300),
                lease_duration_seconds: 40,
                state_dir: "/".into(),
            }
            .lease_renew_interval(),
            Duration::from_secs(10)
        );
    }

    #[tokio::test]
    async fn a_heartbeat_that_hangs_fails_at_kubelets_deadline() {
        let settings = |update: u64, lease: u32| NodeSettings {
            update_frequency: Duration::from_secs(update),
            report_frequency: Duration::from_secs(300),
            lease_duration_seconds: lease,
            state_dir: "/".into(),
        };
        assert_eq!(
            settings(10, 40).heartbeat_timeout(),
            Duration::from_secs(10)
        );
        assert_eq!(
            settings(60, 40).heartbeat_timeout(),
            Duration::from_secs(40)
        );
        let hangs = std::future::pending::<Result<(), kube::Error>>();
        let err = heartbeat(Duration::from_millis(20), hangs)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("heartbeat timeout"), "{err}");
        let answers = async { Ok::<_, kube::Error>(7) };
        assert_eq!(
            heartbeat(Duration::from_millis(20), answers).await.unwrap(),
            7
        );
    }

    #[test]
    fn pod_cidrs_prefer_the_list() {
        let mut n = Node::default();
        assert!(pod_cidrs(&n).is_empty());
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: Some("10.244.1.0/24".into()),
            ..Default::default()
        });
        assert_eq!(pod_cidrs(&n), ["10.244.1.0/24"]);
        n.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.244.1.0/24".into(), "fd00::/64".into()]);
        assert_eq!(pod_cidrs(&n).len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_backs_off_with_jitter_and_logs_once_per_message() {
        let mut r = Retry::new("x", Duration::from_millis(200), Duration::from_secs(7));
        let e = kube::Error::Api(Box::new(
            kube::core::Status::failure("nope", "Forbidden").with_code(403),
        ));
        let waits: Vec<_> = (0..8).map(|_| r.failed(&e)).collect();
        assert!(waits[0] >= Duration::from_millis(160) && waits[0] <= Duration::from_millis(280));
        assert!(waits[2] >= Duration::from_millis(640), "{waits:?}");
        assert!(
            waits.iter().all(|w| *w <= Duration::from_millis(8400)),
            "capped: {waits:?}"
        );
        assert!(r.is_failing());
        r.ok();
        assert!(!r.is_failing());
        assert!(
            r.failed(&e) <= Duration::from_millis(280),
            "reset after success"
        );
    }
}
