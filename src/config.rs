//! Agent configuration: a KubeletConfiguration document (kubelet's field
//! names and defaults) plus an optional MiniletConfiguration document in the
//! same file, overridden by flags. Everything is validated here, before any
//! task starts; `main` prints a `ConfigError` as one line and exits non-zero.
//!
//! Precedence, lowest first: built-in defaults, the config file, flags.
//! Derived defaults are computed last, from the final values:
//! `imageServiceEndpoint` from `containerRuntimeEndpoint`, `cniCacheDir`
//! from `stateDir`.
//!
//! Unknown input is refused rather than guessed at: a field kubelet knows
//! but minilet does not implement is ignored with one warning (so an
//! existing kubelet config file works), a field nobody knows is an error
//! (a typo would otherwise silently fall back to a default).
//!
//! Side effects: reads the config file, the host name. Nothing else.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::yaml::{self, Document, Limits};

/// Larger config files are refused (a real one is a few KiB); what a
/// document may expand to is bounded by [`yaml::Limits::OBJECT`].
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Default of `maxParallelRuntimeRequests`: room for the sandbox slots plus
/// the container calls of the pods already sandboxed, far below the burst
/// (a pod's 1,000 containers stopped at once) that wedged containerd 1.6.
pub const DEFAULT_PARALLEL_RUNTIME_REQUESTS: usize = 32;

/// Where the host name is read from when --hostname-override is not given.
const HOSTNAME_FILE: &str = "/proc/sys/kernel/hostname";

const KUBELET_API_VERSION: &str = "kubelet.config.k8s.io/v1beta1";
const KUBELET_KIND: &str = "KubeletConfiguration";
const MINILET_API_VERSION: &str = "minilet.io/v1alpha1";
const MINILET_KIND: &str = "MiniletConfiguration";

/// KubeletConfiguration fields minilet implements.
const KUBELET_SUPPORTED: &[&str] = &[
    "staticPodPath",
    "containerRuntimeEndpoint",
    "imageServiceEndpoint",
    "podLogsDir",
    "maxPods",
    "runtimeRequestTimeout",
    "fileCheckFrequency",
    "syncFrequency",
    "volumeStatsAggPeriod",
    "resolvConf",
    "clusterDNS",
    "clusterDomain",
    "nodeStatusUpdateFrequency",
    "nodeStatusReportFrequency",
    "nodeLeaseDurationSeconds",
    "rotateCertificates",
    "serverTLSBootstrap",
];

/// MiniletConfiguration fields.
const MINILET_SUPPORTED: &[&str] = &[
    "stateDir",
    "cniConfDir",
    "cniBinDirs",
    "cniCacheDir",
    "runtimeCNIConfDir",
    "runtimeCNIBinDir",
    "cniPluginTimeout",
    "maxParallelSandboxCreations",
    "maxParallelRuntimeRequests",
    "csiDrivers",
    "csiOperationTimeout",
    "nodeRoutes",
];

/// Every JSON field name of kubelet's `KubeletConfiguration` v1beta1
/// (k8s.io/kubelet/config/v1beta1/types.go, besides apiVersion and kind).
/// Names minilet does not support are ignored with a warning; a name outside
/// this list is an error.
const KUBELET_FIELDS: &[&str] = &[
    "enableServer",
    "staticPodPath",
    "podLogsDir",
    "syncFrequency",
    "fileCheckFrequency",
    "httpCheckFrequency",
    "staticPodURL",
    "staticPodURLHeader",
    "address",
    "port",
    "readOnlyPort",
    "tlsCertFile",
    "tlsPrivateKeyFile",
    "tlsCipherSuites",
    "tlsCurvePreferences",
    "tlsMinVersion",
    "rotateCertificates",
    "serverTLSBootstrap",
    "authentication",
    "authorization",
    "registryPullQPS",
    "registryBurst",
    "imagePullCredentialsVerificationPolicy",
    "preloadedImagesVerificationAllowlist",
    "eventRecordQPS",
    "eventBurst",
    "enableDebuggingHandlers",
    "enableContentionProfiling",
    "healthzPort",
    "healthzBindAddress",
    "oomScoreAdj",
    "clusterDomain",
    "clusterDNS",
    "streamingConnectionIdleTimeout",
    "nodeStatusUpdateFrequency",
    "nodeStatusReportFrequency",
    "nodeLeaseDurationSeconds",
    "imageMinimumGCAge",
    "imageMaximumGCAge",
    "imageGCHighThresholdPercent",
    "imageGCLowThresholdPercent",
    "volumeStatsAggPeriod",
    "kubeletCgroups",
    "systemCgroups",
    "cgroupRoot",
    "cgroupsPerQOS",
    "cgroupDriver",
    "cpuManagerPolicy",
    "singleProcessOOMKill",
    "cpuManagerPolicyOptions",
    "cpuManagerReconcilePeriod",
    "draManagerReconcilePeriod",
    "memoryManagerPolicy",
    "topologyManagerPolicy",
    "topologyManagerScope",
    "topologyManagerPolicyOptions",
    "qosReserved",
    "runtimeRequestTimeout",
    "hairpinMode",
    "maxPods",
    "podCIDR",
    "podPidsLimit",
    "resolvConf",
    "runOnce",
    "cpuCFSQuota",
    "cpuCFSQuotaPeriod",
    "nodeStatusMaxImages",
    "maxOpenFiles",
    "contentType",
    "kubeAPIQPS",
    "kubeAPIBurst",
    "serializeImagePulls",
    "maxParallelImagePulls",
    "evictionSoft",
    "evictionSoftGracePeriod",
    "evictionPressureTransitionPeriod",
    "evictionMaxPodGracePeriod",
    "evictionMinimumReclaim",
    "mergeDefaultEvictionSettings",
    "podsPerCore",
    "enableControllerAttachDetach",
    "protectKernelDefaults",
    "makeIPTablesUtilChains",
    "iptablesMasqueradeBit",
    "iptablesDropBit",
    "featureGates",
    "failSwapOn",
    "memorySwap",
    "containerLogMaxSize",
    "containerLogMaxFiles",
    "containerLogMaxWorkers",
    "containerLogMonitorInterval",
    "configMapAndSecretChangeDetectionStrategy",
    "systemReserved",
    "kubeReserved",
    "reservedSystemCPUs",
    "showHiddenMetricsForVersion",
    "systemReservedCgroup",
    "kubeReservedCgroup",
    "enforceNodeAllocatable",
    "allowedUnsafeSysctls",
    "volumePluginDir",
    "providerID",
    "kernelMemcgNotification",
    "logging",
    "enableSystemLogHandler",
    "enableSystemLogQuery",
    "shutdownGracePeriod",
    "shutdownGracePeriodCriticalPods",
    "shutdownGracePeriodByPodPriority",
    "crashLoopBackOff",
    "reservedMemory",
    "enableProfilingHandler",
    "enableDebugFlagsHandler",
    "seccompDefault",
    "memoryThrottlingFactor",
    "memoryReservationPolicy",
    "registerWithTaints",
    "registerNode",
    "tracing",
    "localStorageCapacityIsolation",
    "containerRuntimeEndpoint",
    "imageServiceEndpoint",
    "failCgroupV1",
    "userNamespaces",
];

/// Command-line flags that override the file (kubelet's flag names).
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub pod_manifest_path: Option<PathBuf>,
    pub container_runtime_endpoint: Option<String>,
    pub root_dir: Option<PathBuf>,
    pub hostname_override: Option<String>,
    /// kubelet's --kubeconfig: credentials for the API server.
    pub kubeconfig: Option<PathBuf>,
    /// kubelet's --node-ip: the node's InternalIP address.
    pub node_ip: Option<String>,
    /// kubelet's --bootstrap-kubeconfig: credentials to ask for a client
    /// certificate with (TLS bootstrap) when --kubeconfig has none valid.
    pub bootstrap_kubeconfig: Option<PathBuf>,
    /// kubelet's --cert-dir.
    pub cert_dir: Option<PathBuf>,
}

/// The validated configuration the agent runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The node name: --hostname-override, else the host name, lowercased.
    pub node_name: String,
    /// kubelet `staticPodPath`; `None` = no static pods.
    pub static_pod_path: Option<PathBuf>,
    /// kubelet `containerRuntimeEndpoint`, default unix:///run/containerd/containerd.sock.
    pub container_runtime_endpoint: String,
    /// kubelet `imageServiceEndpoint`; defaults to the runtime endpoint.
    pub image_service_endpoint: String,
    /// kubelet `podLogsDir`, default /var/log/pods.
    pub pod_logs_dir: PathBuf,
    /// kubelet `maxPods`, default 110.
    pub max_pods: u32,
    /// kubelet `runtimeRequestTimeout`, default 2m.
    pub runtime_request_timeout: Duration,
    /// kubelet `fileCheckFrequency`, default 20s: full rescan of staticPodPath
    /// besides the inotify watch.
    pub file_check_frequency: Duration,
    /// kubelet `syncFrequency`, default 1m: periodic resync of every pod.
    pub sync_frequency: Duration,
    /// kubelet `volumeStatsAggPeriod`, default 1m: how often the volume
    /// stats (`kubelet_volume_stats_*`) are collected.
    pub volume_stats_agg_period: Duration,
    /// kubelet `resolvConf`, default /etc/resolv.conf.
    pub resolv_conf: PathBuf,
    /// kubelet `clusterDNS`, default empty.
    pub cluster_dns: Vec<String>,
    /// kubelet `clusterDomain`, default empty.
    pub cluster_domain: String,
    /// minilet `stateDir` (flag --root-dir), default /var/lib/minilet.
    pub state_dir: PathBuf,
    /// minilet `cniConfDir`, default /etc/minilet/net.d.
    pub cni_conf_dir: PathBuf,
    /// minilet `cniBinDirs`, default [/opt/cni/bin, /usr/lib/cni].
    pub cni_bin_dirs: Vec<PathBuf>,
    /// minilet `cniCacheDir`, default <stateDir>/cni/cache.
    pub cni_cache_dir: PathBuf,
    /// minilet `runtimeCNIConfDir`, default /etc/cni/net.d.
    pub runtime_cni_conf_dir: PathBuf,
    /// minilet `runtimeCNIBinDir`, default /opt/cni/bin.
    pub runtime_cni_bin_dir: PathBuf,
    /// minilet `cniPluginTimeout`, default 30s: one plugin exec.
    pub cni_plugin_timeout: Duration,
    /// minilet `maxParallelSandboxCreations`: RunPodSandbox calls in flight
    /// at once, node-wide. Less than `max_parallel_runtime_requests`; when
    /// unset, the default capped to that bound minus one.
    pub max_parallel_sandbox_creations: usize,
    /// minilet `maxParallelRuntimeRequests`, default 32: CRI calls that make
    /// the runtime work (create, start, stop, remove) in flight at once,
    /// node-wide (`cri::bounded`). At least 2.
    pub max_parallel_runtime_requests: usize,
    /// kubelet's --kubeconfig (a flag only, as kubelet has it). `None`: the
    /// in-cluster service account when its environment is there, else
    /// static pods only (`api::client::connect` decides).
    pub kubeconfig: Option<PathBuf>,
    /// kubelet's --bootstrap-kubeconfig (a flag only): TLS bootstrap
    /// (`api::bootstrap`). Needs --kubeconfig, where the issued
    /// credentials are written.
    pub bootstrap_kubeconfig: Option<PathBuf>,
    /// kubelet's --cert-dir, default <stateDir>/pki: the issued client
    /// certificates (`api::pki`).
    pub cert_dir: PathBuf,
    /// kubelet `rotateCertificates`, default false (kubelet's): renew the
    /// client certificate through a new CSR before it expires.
    pub rotate_certificates: bool,
    /// kubelet `serverTLSBootstrap`, default false: ask the cluster for the
    /// kubelet API's serving certificate (kubelet-serving signer).
    pub server_tls_bootstrap: bool,
    /// kubelet's --node-ip: the Node's InternalIP. `None`: the source
    /// address of the default route.
    pub node_ip: Option<IpAddr>,
    /// kubelet `nodeStatusUpdateFrequency`, default 10s: how often the node
    /// status is computed and, when it changed, patched.
    pub node_status_update_frequency: Duration,
    /// kubelet `nodeStatusReportFrequency`, default 5m (or the update
    /// frequency, when only that is set): the status is patched at least
    /// this often even when nothing changed.
    pub node_status_report_frequency: Duration,
    /// kubelet `nodeLeaseDurationSeconds`, default 40; the Lease is renewed
    /// every quarter of it.
    pub node_lease_duration_seconds: u32,
    /// kubelet `evictionHard`: the thresholds of the pressure conditions
    /// and allocatable (`eviction`), kubelet's defaults when unset.
    pub eviction_hard: crate::eviction::EvictionHard,
    /// minilet `csiDrivers`, default empty: CSI drivers known without
    /// kubelet's plugin registration (edge boxes with no node-driver-registrar).
    pub csi_drivers: Vec<CsiDriverConfig>,
    /// minilet `csiOperationTimeout`, default 2m (kubelet's csiTimeout): the
    /// deadline of one CSI call that does work (stage, publish, create and
    /// their undo); the calls that only ask keep their short deadline.
    pub csi_operation_timeout: Duration,
    /// minilet `nodeRoutes`, default false: in API server mode, keep a route
    /// to every other Node's `spec.podCIDR(s)` via its InternalIP (what
    /// kindnet does for kind's nodes; kubenet left it to a cloud's route
    /// controller), so pods reach pods on other nodes by pod IP.
    pub node_routes: bool,
    /// Warnings found while loading (e.g. kubelet fields minilet ignores),
    /// logged by `main` once tracing is up.
    pub warnings: Vec<String>,
}

/// One entry of minilet `csiDrivers`: a CSI driver at a fixed socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsiDriverConfig {
    /// The driver's name (its GetPluginInfo name, e.g. "hostpath.csi.k8s.io").
    pub name: String,
    /// Its unix socket, as written: `unix:///path` or `/path`.
    pub endpoint: String,
}

impl Config {
    /// Socket the delegating CNI plugin dials (root-only).
    pub fn cni_socket(&self) -> PathBuf {
        self.state_dir.join("cni.sock")
    }
    /// Socket `minilet get pods` / `minilet logs` dial (root-only).
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join("minilet.sock")
    }
    /// Host directory holding a pod's volumes (kubelet's layout).
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.state_dir.join("pods").join(uid)
    }
}

impl Config {
    /// The configuration with every default, for `node_name` (what `load`
    /// returns for no config file and no flags besides the node name).
    pub fn default_for(node_name: impl Into<String>) -> Config {
        let state_dir = PathBuf::from("/var/lib/minilet");
        Config {
            node_name: node_name.into(),
            static_pod_path: None,
            container_runtime_endpoint: "unix:///run/containerd/containerd.sock".into(),
            image_service_endpoint: "unix:///run/containerd/containerd.sock".into(),
            pod_logs_dir: "/var/log/pods".into(),
            max_pods: 110,
            runtime_request_timeout: Duration::from_secs(120),
            file_check_frequency: Duration::from_secs(20),
            sync_frequency: Duration::from_secs(60),
            volume_stats_agg_period: Duration::from_secs(60),
            resolv_conf: "/etc/resolv.conf".into(),
            cluster_dns: Vec::new(),
            cluster_domain: String::new(),
            cni_cache_dir: state_dir.join("cni/cache"),
            cert_dir: state_dir.join("pki"),
            cni_conf_dir: "/etc/minilet/net.d".into(),
            cni_bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
            runtime_cni_conf_dir: "/etc/cni/net.d".into(),
            runtime_cni_bin_dir: "/opt/cni/bin".into(),
            cni_plugin_timeout: Duration::from_secs(30),
            max_parallel_sandbox_creations: crate::pod::worker::PARALLEL_SANDBOXES,
            max_parallel_runtime_requests: DEFAULT_PARALLEL_RUNTIME_REQUESTS,
            kubeconfig: None,
            bootstrap_kubeconfig: None,
            rotate_certificates: false,
            server_tls_bootstrap: false,
            node_ip: None,
            node_status_update_frequency: Duration::from_secs(10),
            node_status_report_frequency: Duration::from_secs(300),
            node_lease_duration_seconds: 40,
            eviction_hard: Default::default(),
            csi_drivers: Vec::new(),
            csi_operation_timeout: Duration::from_secs(120),
            node_routes: false,
            warnings: Vec::new(),
            state_dir,
        }
    }
}

/// Where a setting's value came from, named in validation errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A document of the config file (`doc` counts from 1).
    File { path: PathBuf, doc: usize },
    /// A command-line flag, e.g. `--root-dir`.
    Flag(&'static str),
    /// The host name file, when --hostname-override is not given.
    HostName(PathBuf),
    /// A built-in default, or one derived from another setting.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, doc } => {
                write!(f, "config file {} (document {doc})", path.display())
            }
            Origin::Flag(flag) => write!(f, "flag {flag}"),
            Origin::HostName(path) => write!(f, "host name from {}", path.display()),
            Origin::Default => f.write_str("default"),
        }
    }
}

/// Why the configuration could not be loaded. Each variant displays as one
/// line naming the file (or flag) and the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config` names a file that does not exist.
    #[error("config file {} does not exist", .path.display())]
    NotFound { path: PathBuf },
    /// The config file exists but cannot be read (permission denied, a
    /// directory, not UTF-8...).
    #[error("cannot read config file {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is over [`MAX_CONFIG_BYTES`]: refused before it is read
    /// (so `--config /dev/zero` does not read forever).
    #[error("config file {} is over the {limit}-byte limit", .path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    /// The file is not valid YAML, or expands past [`yaml::Limits::OBJECT`]
    /// (aliases); `at` is "line L column C" when known.
    #[error("config file {}: invalid YAML at {at}: {reason}", .path.display())]
    Yaml {
        path: PathBuf,
        at: String,
        reason: String,
    },
    /// A document that is not a mapping of fields.
    #[error("config file {} (document {doc}): expected a mapping of fields", .path.display())]
    NotAMapping { path: PathBuf, doc: usize },
    /// A document whose apiVersion/kind pair minilet does not know.
    #[error(
        "config file {} (document {doc}): unknown apiVersion {} / kind {}; expected {KUBELET_API_VERSION} {KUBELET_KIND} or {MINILET_API_VERSION} {MINILET_KIND}",
        .path.display(), show_opt(.api_version), show_opt(.kind)
    )]
    UnknownKind {
        path: PathBuf,
        doc: usize,
        api_version: Option<String>,
        kind: Option<String>,
    },
    /// The same kind of document twice in one file.
    #[error("config file {} (document {doc}): a second {kind} document (the first is document {first})", .path.display())]
    DuplicateKind {
        path: PathBuf,
        doc: usize,
        kind: &'static str,
        first: usize,
    },
    /// A field that is not part of the document's kind; `hint` suggests
    /// the name that was probably meant.
    #[error("config file {} (document {doc}): unknown {kind} field {field:?}{}", .path.display(), show_hint(.hint))]
    UnknownField {
        path: PathBuf,
        doc: usize,
        kind: &'static str,
        field: String,
        hint: Option<String>,
    },
    /// A value of the wrong type, malformed or out of range.
    #[error("{origin}: invalid {field} {value}: {reason}")]
    Invalid {
        origin: Origin,
        field: &'static str,
        value: String,
        reason: String,
    },
    /// No --hostname-override and the host name cannot be read.
    #[error("cannot read the host name from {} (use --hostname-override)", .path.display())]
    HostName {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn show_opt(v: &Option<String>) -> String {
    match v {
        Some(s) => format!("{s:?}"),
        None => "(missing)".into(),
    }
}

fn show_hint(hint: &Option<String>) -> String {
    hint.as_ref().map(|h| format!("; {h}")).unwrap_or_default()
}

/// Loads the config file named by `flags.config` (if any), applies the
/// flags and the defaults, and validates the result.
pub fn load(flags: &Flags) -> Result<Config, ConfigError> {
    let file = match &flags.config {
        None => None,
        Some(path) => Some((path.as_path(), read_file(path)?)),
    };
    let file = file.as_ref().map(|(p, text)| (*p, text.as_str()));
    resolve(flags, file, &read_host_name)
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    let read_error = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound => ConfigError::NotFound {
            path: path.to_path_buf(),
        },
        _ => ConfigError::Read {
            path: path.to_path_buf(),
            source,
        },
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes))
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_CONFIG_BYTES,
        });
    }
    String::from_utf8(bytes)
        .map_err(|e| read_error(io::Error::new(io::ErrorKind::InvalidData, e.utf8_error())))
}

fn read_host_name() -> Result<(String, Origin), ConfigError> {
    let path = PathBuf::from(HOSTNAME_FILE);
    match std::fs::read_to_string(&path) {
        Ok(name) => Ok((name, Origin::HostName(path))),
        Err(source) => Err(ConfigError::HostName { path, source }),
    }
}

/// A value and where it came from.
#[derive(Clone, Debug)]
struct Setting<T> {
    value: T,
    origin: Origin,
}

/// What the config file set; `None` = not set (absent or null).
#[derive(Default, Debug)]
struct FileSettings {
    static_pod_path: Option<Setting<String>>,
    container_runtime_endpoint: Option<Setting<String>>,
    image_service_endpoint: Option<Setting<String>>,
    pod_logs_dir: Option<Setting<String>>,
    max_pods: Option<u32>,
    runtime_request_timeout: Option<Duration>,
    file_check_frequency: Option<Duration>,
    sync_frequency: Option<Duration>,
    volume_stats_agg_period: Option<Duration>,
    resolv_conf: Option<Setting<String>>,
    cluster_dns: Option<Setting<Vec<String>>>,
    cluster_domain: Option<Setting<String>>,
    node_status_update_frequency: Option<Duration>,
    node_status_report_frequency: Option<Duration>,
    node_lease_duration_seconds: Option<u32>,
    rotate_certificates: Option<bool>,
    server_tls_bootstrap: Option<bool>,
    eviction_hard: Option<crate::eviction::EvictionHard>,
    eviction_warnings: Vec<String>,
    state_dir: Option<Setting<String>>,
    cni_conf_dir: Option<Setting<String>>,
    cni_bin_dirs: Option<Setting<Vec<String>>>,
    cni_cache_dir: Option<Setting<String>>,
    runtime_cni_conf_dir: Option<Setting<String>>,
    runtime_cni_bin_dir: Option<Setting<String>>,
    cni_plugin_timeout: Option<Duration>,
    max_parallel_sandbox_creations: Option<Setting<u32>>,
    max_parallel_runtime_requests: Option<Setting<u32>>,
    csi_drivers: Option<Setting<Vec<CsiDriverConfig>>>,
    csi_operation_timeout: Option<Duration>,
    node_routes: Option<bool>,
    /// Kubelet fields present but not implemented, in file order.
    unsupported: Vec<String>,
}

/// The whole of `load` minus the I/O: `file` is (path, contents).
fn resolve(
    flags: &Flags,
    file: Option<(&Path, &str)>,
    host_name: &dyn Fn() -> Result<(String, Origin), ConfigError>,
) -> Result<Config, ConfigError> {
    let fs = match file {
        Some((path, text)) => parse_file(path, text)?,
        None => FileSettings::default(),
    };
    let mut cfg = Config::default_for("");
    if let (Some((path, _)), false) = (file, fs.unsupported.is_empty()) {
        cfg.warnings.push(format!(
            "config file {}: KubeletConfiguration fields not supported by minilet and ignored: {}",
            path.display(),
            fs.unsupported.join(", ")
        ));
    }

    // The node name: kubelet trims and lowercases the override too.
    let (raw_name, origin) = match &flags.hostname_override {
        Some(name) => (name.clone(), Origin::Flag("--hostname-override")),
        None => host_name()?,
    };
    cfg.node_name = raw_name.trim().to_lowercase();
    if !is_dns1123_subdomain(&cfg.node_name) {
        return Err(invalid(
            origin,
            "nodeName",
            format!("{:?}", cfg.node_name),
            "must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', at most 253 characters)",
        ));
    }

    // Flags over file over defaults; each path and endpoint validated with
    // the origin of the value that won.
    let static_pod_path = pick_path_flag(
        &flags.pod_manifest_path,
        "--pod-manifest-path",
        fs.static_pod_path,
    );
    cfg.static_pod_path = match static_pod_path {
        // kubelet: an empty staticPodPath means no static pods.
        Some(s) if s.value.is_empty() => None,
        Some(s) => Some(abs_path(s, "staticPodPath")?),
        None => None,
    };

    let runtime = match &flags.container_runtime_endpoint {
        Some(v) => Some(Setting {
            value: v.clone(),
            origin: Origin::Flag("--container-runtime-endpoint"),
        }),
        None => fs.container_runtime_endpoint,
    };
    if let Some(s) = runtime {
        cfg.container_runtime_endpoint = endpoint(s, "containerRuntimeEndpoint")?;
    }
    cfg.image_service_endpoint = match fs.image_service_endpoint {
        Some(s) => endpoint(s, "imageServiceEndpoint")?,
        None => cfg.container_runtime_endpoint.clone(),
    };

    set_path(&mut cfg.pod_logs_dir, fs.pod_logs_dir, "podLogsDir")?;
    set_path(&mut cfg.resolv_conf, fs.resolv_conf, "resolvConf")?;
    if let Some(v) = fs.max_pods {
        cfg.max_pods = v;
    }
    if let Some(v) = fs.runtime_request_timeout {
        cfg.runtime_request_timeout = v;
    }
    if let Some(v) = fs.file_check_frequency {
        cfg.file_check_frequency = v;
    }
    if let Some(v) = fs.sync_frequency {
        cfg.sync_frequency = v;
    }
    if let Some(v) = fs.volume_stats_agg_period {
        cfg.volume_stats_agg_period = v;
    }
    // kubelet: with only nodeStatusUpdateFrequency set, the report
    // frequency defaults to it (the behaviour before the lease existed).
    if let Some(v) = fs.node_status_update_frequency {
        cfg.node_status_update_frequency = v;
        cfg.node_status_report_frequency = v;
    }
    if let Some(v) = fs.node_status_report_frequency {
        cfg.node_status_report_frequency = v;
    }
    if let Some(v) = fs.node_lease_duration_seconds {
        cfg.node_lease_duration_seconds = v;
    }
    if let Some(v) = fs.eviction_hard {
        cfg.eviction_hard = v;
    }
    cfg.warnings.extend(fs.eviction_warnings.iter().cloned());
    cfg.kubeconfig.clone_from(&flags.kubeconfig);
    if let Some(b) = &flags.bootstrap_kubeconfig {
        if flags.kubeconfig.is_none() {
            return Err(invalid(
                Origin::Flag("--bootstrap-kubeconfig"),
                "bootstrapKubeconfig",
                format!("{:?}", b.display().to_string()),
                "needs --kubeconfig too: the file the issued credentials are written to",
            ));
        }
        cfg.bootstrap_kubeconfig = Some(b.clone());
    }
    if let Some(v) = fs.rotate_certificates {
        cfg.rotate_certificates = v;
    }
    if let Some(v) = fs.server_tls_bootstrap {
        cfg.server_tls_bootstrap = v;
    }
    if let Some(ip) = &flags.node_ip {
        cfg.node_ip = Some(ip.trim().parse::<IpAddr>().map_err(|_| {
            invalid(
                Origin::Flag("--node-ip"),
                "nodeIP",
                format!("{ip:?}"),
                "must be an IP address",
            )
        })?);
    }
    if let Some(s) = fs.cluster_dns {
        for ip in &s.value {
            if ip.parse::<IpAddr>().is_err() {
                return Err(invalid(
                    s.origin,
                    "clusterDNS",
                    format!("{ip:?}"),
                    "must be a list of IP addresses",
                ));
            }
        }
        cfg.cluster_dns = s.value;
    }
    if let Some(s) = fs.cluster_domain {
        let bare = s.value.strip_suffix('.').unwrap_or(&s.value);
        if !s.value.is_empty() && !is_dns1123_subdomain(bare) {
            return Err(invalid(
                s.origin,
                "clusterDomain",
                format!("{:?}", s.value),
                "must be a DNS-1123 subdomain such as cluster.local",
            ));
        }
        cfg.cluster_domain = s.value;
    }

    let state_dir = pick_path_flag(&flags.root_dir, "--root-dir", fs.state_dir);
    if let Some(s) = state_dir {
        cfg.state_dir = abs_path(s, "stateDir")?;
    }
    set_path(&mut cfg.cni_conf_dir, fs.cni_conf_dir, "cniConfDir")?;
    if let Some(s) = fs.cni_bin_dirs {
        if s.value.is_empty() {
            return Err(invalid(
                s.origin,
                "cniBinDirs",
                "[]".into(),
                "must list at least one directory",
            ));
        }
        cfg.cni_bin_dirs = s
            .value
            .into_iter()
            .map(|value| {
                abs_path(
                    Setting {
                        value,
                        origin: s.origin.clone(),
                    },
                    "cniBinDirs",
                )
            })
            .collect::<Result<_, _>>()?;
    }
    // Derived from the final stateDir, flags included.
    cfg.cert_dir = match &flags.cert_dir {
        Some(p) => abs_path(
            Setting {
                value: p.to_string_lossy().into_owned(),
                origin: Origin::Flag("--cert-dir"),
            },
            "certDir",
        )?,
        None => cfg.state_dir.join("pki"),
    };
    cfg.cni_cache_dir = match fs.cni_cache_dir {
        Some(s) => abs_path(s, "cniCacheDir")?,
        None => cfg.state_dir.join("cni/cache"),
    };
    set_path(
        &mut cfg.runtime_cni_conf_dir,
        fs.runtime_cni_conf_dir,
        "runtimeCNIConfDir",
    )?;
    set_path(
        &mut cfg.runtime_cni_bin_dir,
        fs.runtime_cni_bin_dir,
        "runtimeCNIBinDir",
    )?;
    if let Some(v) = fs.cni_plugin_timeout {
        cfg.cni_plugin_timeout = v;
    }
    parallel_bounds(
        &mut cfg,
        fs.max_parallel_sandbox_creations,
        fs.max_parallel_runtime_requests,
    )?;
    if let Some(s) = fs.csi_drivers {
        check_csi_drivers(&s)?;
        cfg.csi_drivers = s.value;
    }
    if let Some(v) = fs.csi_operation_timeout {
        cfg.csi_operation_timeout = v;
    }
    if let Some(v) = fs.node_routes {
        cfg.node_routes = v;
    }
    Ok(cfg)
}

/// The two concurrency bounds, kept consistent: each RunPodSandbox holds a
/// sandbox slot and, while it runs, a node-wide runtime slot, so fewer
/// sandbox slots than runtime slots means a burst of creations never takes
/// them all (containers of ready pods and stops still get through).
fn parallel_bounds(
    cfg: &mut Config,
    sandboxes: Option<Setting<u32>>,
    requests: Option<Setting<u32>>,
) -> Result<(), ConfigError> {
    // At least 2 (parsing): one slot for a sandbox creation, one for the rest.
    if let Some(s) = requests {
        cfg.max_parallel_runtime_requests = s.value as usize;
    }
    let limit = cfg.max_parallel_runtime_requests;
    match sandboxes {
        Some(s) if s.value as usize >= limit => Err(invalid(
            s.origin,
            "maxParallelSandboxCreations",
            s.value.to_string(),
            &format!("must be less than maxParallelRuntimeRequests ({limit})"),
        )),
        Some(s) => {
            cfg.max_parallel_sandbox_creations = s.value as usize;
            Ok(())
        }
        None => {
            cfg.max_parallel_sandbox_creations = cfg.max_parallel_sandbox_creations.min(limit - 1);
            Ok(())
        }
    }
}

/// `csiDrivers`: names as the CSI spec wants them (GetPluginInfo's rule),
/// sockets as absolute paths, each name once.
fn check_csi_drivers(s: &Setting<Vec<CsiDriverConfig>>) -> Result<(), ConfigError> {
    let mut seen = std::collections::BTreeSet::new();
    for (i, d) in s.value.iter().enumerate() {
        if !crate::csi::is_driver_name(&d.name) {
            return Err(invalid(
                s.origin.clone(),
                "csiDrivers",
                format!("[{i}].name {:?}", d.name),
                "must be a CSI driver name: at most 63 characters, letters, digits, '-' and '.', starting and ending with a letter or digit",
            ));
        }
        if crate::csi::socket_path(&d.endpoint).is_none() {
            return Err(invalid(
                s.origin.clone(),
                "csiDrivers",
                format!("[{i}].endpoint {:?}", d.endpoint),
                "must be an absolute unix socket path: unix:///path/csi.sock or /path/csi.sock",
            ));
        }
        if !seen.insert(d.name.as_str()) {
            return Err(invalid(
                s.origin.clone(),
                "csiDrivers",
                format!("[{i}].name {:?}", d.name),
                "is listed twice",
            ));
        }
    }
    Ok(())
}

fn invalid(origin: Origin, field: &'static str, value: String, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        origin,
        field,
        value,
        reason: reason.to_string(),
    }
}

fn pick_path_flag(
    flag: &Option<PathBuf>,
    name: &'static str,
    file: Option<Setting<String>>,
) -> Option<Setting<String>> {
    match flag {
        Some(p) => Some(Setting {
            value: p.to_string_lossy().into_owned(),
            origin: Origin::Flag(name),
        }),
        None => file,
    }
}

fn abs_path(s: Setting<String>, field: &'static str) -> Result<PathBuf, ConfigError> {
    let path = PathBuf::from(&s.value);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(invalid(
            s.origin,
            field,
            format!("{:?}", s.value),
            "must be an absolute path",
        ))
    }
}

fn set_path(
    slot: &mut PathBuf,
    s: Option<Setting<String>>,
    field: &'static str,
) -> Result<(), ConfigError> {
    if let Some(s) = s {
        *slot = abs_path(s, field)?;
    }
    Ok(())
}

fn endpoint(s: Setting<String>, field: &'static str) -> Result<String, ConfigError> {
    // Only unix sockets: minilet dials nothing else, and an absolute socket
    // path keeps "unix://relative" mistakes out.
    match s.value.strip_prefix("unix://") {
        Some(rest) if rest.starts_with('/') => Ok(s.value),
        _ => Err(invalid(
            s.origin,
            field,
            format!("{:?}", s.value),
            "must be a unix socket URL such as unix:///run/containerd/containerd.sock",
        )),
    }
}

/// Which document kinds a file may hold.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DocKind {
    Kubelet,
    Minilet,
}

impl DocKind {
    fn name(self) -> &'static str {
        match self {
            DocKind::Kubelet => KUBELET_KIND,
            DocKind::Minilet => MINILET_KIND,
        }
    }
    fn supported(self) -> &'static [&'static str] {
        match self {
            DocKind::Kubelet => KUBELET_SUPPORTED,
            DocKind::Minilet => MINILET_SUPPORTED,
        }
    }
    fn other(self) -> DocKind {
        match self {
            DocKind::Kubelet => DocKind::Minilet,
            DocKind::Minilet => DocKind::Kubelet,
        }
    }
}

fn parse_file(path: &Path, text: &str) -> Result<FileSettings, ConfigError> {
    let mut fs = FileSettings::default();
    let mut seen: Vec<(DocKind, usize)> = Vec::new();
    for (i, document) in yaml::documents::<Document<Value>>(text, Limits::OBJECT, 2)
        .into_iter()
        .enumerate()
    {
        let doc = i + 1;
        let map = match document.map_err(|e| yaml_error(path, doc, &e))? {
            Document::Mapping(entries) => entries,
            Document::NotAMapping => {
                return Err(ConfigError::NotAMapping {
                    path: path.to_path_buf(),
                    doc,
                });
            }
        };
        let get = |k: &str| {
            map.iter()
                .find(|(key, _)| key.as_str() == Some(k))
                .and_then(|(_, v)| v.as_str())
        };
        let api_version = get("apiVersion");
        let kind_name = get("kind");
        let kind = match (api_version, kind_name) {
            (Some(KUBELET_API_VERSION), Some(KUBELET_KIND)) => DocKind::Kubelet,
            (Some(MINILET_API_VERSION), Some(MINILET_KIND)) => DocKind::Minilet,
            _ => {
                return Err(ConfigError::UnknownKind {
                    path: path.to_path_buf(),
                    doc,
                    api_version: api_version.map(str::to_string),
                    kind: kind_name.map(str::to_string),
                });
            }
        };
        if let Some(&(_, first)) = seen.iter().find(|(k, _)| *k == kind) {
            return Err(ConfigError::DuplicateKind {
                path: path.to_path_buf(),
                doc,
                kind: kind.name(),
                first,
            });
        }
        seen.push((kind, doc));
        let ctx = DocCtx { path, doc, kind };
        for (key, value) in &map {
            let Some(field) = key.as_str() else {
                return Err(ctx.unknown_field(show(key)));
            };
            if field == "apiVersion" || field == "kind" {
                continue;
            }
            match kind {
                DocKind::Kubelet => read_kubelet_field(&ctx, field, value, &mut fs)?,
                DocKind::Minilet => read_minilet_field(&ctx, field, value, &mut fs)?,
            }
        }
    }
    Ok(fs)
}

fn yaml_error(path: &Path, doc: usize, e: &yaml::Error) -> ConfigError {
    // The position goes in `at`, so the line does not say it twice.
    let at = match e.location() {
        Some((line, column)) => format!("line {line} column {column}"),
        None => format!("document {doc}"),
    };
    let reason = e.reason().to_string();
    ConfigError::Yaml {
        path: path.to_path_buf(),
        at,
        reason,
    }
}

/// The document a field is read from.
struct DocCtx<'a> {
    path: &'a Path,
    doc: usize,
    kind: DocKind,
}

impl DocCtx<'_> {
    fn origin(&self) -> Origin {
        Origin::File {
            path: self.path.to_path_buf(),
            doc: self.doc,
        }
    }

    fn setting<T>(&self, value: T) -> Setting<T> {
        Setting {
            value,
            origin: self.origin(),
        }
    }

    fn invalid(&self, field: &'static str, value: &Value, reason: &str) -> ConfigError {
        invalid(self.origin(), field, show(value), reason)
    }

    fn unknown_field(&self, field: String) -> ConfigError {
        let other = self.kind.other();
        let hint = if other.supported().contains(&field.as_str()) {
            Some(format!("{field} belongs in the {} document", other.name()))
        } else {
            closest(&field, self.kind.supported()).map(|name| format!("did you mean {name}?"))
        };
        ConfigError::UnknownField {
            path: self.path.to_path_buf(),
            doc: self.doc,
            kind: self.kind.name(),
            field,
            hint,
        }
    }

    /// A string; `None` for null.
    fn string(
        &self,
        field: &'static str,
        v: &Value,
    ) -> Result<Option<Setting<String>>, ConfigError> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(self.setting(s.clone()))),
            _ => Err(self.invalid(field, v, "must be a string")),
        }
    }

    /// A map of strings to strings; `None` for null.
    fn string_map(
        &self,
        field: &'static str,
        v: &Value,
    ) -> Result<Option<BTreeMap<String, String>>, ConfigError> {
        match v {
            Value::Null => Ok(None),
            Value::Object(m) => m
                .iter()
                .map(|(k, item)| match item {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    _ => Err(self.invalid(field, item, "must map names to strings")),
                })
                .collect::<Result<_, _>>()
                .map(Some),
            _ => Err(self.invalid(field, v, "must map names to strings")),
        }
    }

    /// A list of strings; `None` for null.
    fn strings(
        &self,
        field: &'static str,
        v: &Value,
    ) -> Result<Option<Setting<Vec<String>>>, ConfigError> {
        match v {
            Value::Null => Ok(None),
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(self.invalid(field, item, "must be a list of strings")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|list| Some(self.setting(list))),
            _ => Err(self.invalid(field, v, "must be a list of strings")),
        }
    }

    /// true or false; `None` for null.
    fn boolean(&self, field: &'static str, v: &Value) -> Result<Option<bool>, ConfigError> {
        match v {
            Value::Null => Ok(None),
            Value::Bool(b) => Ok(Some(*b)),
            _ => Err(self.invalid(field, v, "must be true or false")),
        }
    }

    /// A whole number, at least `min`; `None` for null.
    fn count(
        &self,
        field: &'static str,
        v: &Value,
        min: u32,
    ) -> Result<Option<Setting<u32>>, ConfigError> {
        match v {
            Value::Null => Ok(None),
            Value::Number(n) => match n.as_i64() {
                Some(n) if n < i64::from(min) => {
                    Err(self.invalid(field, v, &format!("must be at least {min}")))
                }
                Some(n) => u32::try_from(n)
                    .map(|n| Some(self.setting(n)))
                    .map_err(|_| self.invalid(field, v, "must be at most 4294967295")),
                None => Err(self.invalid(field, v, "must be a whole number")),
            },
            _ => Err(self.invalid(field, v, "must be a whole number")),
        }
    }

    /// minilet `csiDrivers`: a list of `{name, endpoint}` mappings of
    /// strings; `None` for null. Checked further by `check_csi_drivers`.
    fn csi_drivers(&self, v: &Value) -> Result<Option<Setting<Vec<CsiDriverConfig>>>, ConfigError> {
        const FIELD: &str = "csiDrivers";
        const SHAPE: &str = "must be a list of {name, endpoint} mappings";
        let items = match v {
            Value::Null => return Ok(None),
            Value::Array(items) => items,
            _ => return Err(self.invalid(FIELD, v, SHAPE)),
        };
        let mut list = Vec::with_capacity(items.len());
        for item in items {
            let Value::Object(m) = item else {
                return Err(self.invalid(FIELD, item, SHAPE));
            };
            let mut entry = CsiDriverConfig {
                name: String::new(),
                endpoint: String::new(),
            };
            for (k, field_value) in m {
                let slot = match k.as_str() {
                    "name" => &mut entry.name,
                    "endpoint" => &mut entry.endpoint,
                    _ => {
                        return Err(self.invalid(
                            FIELD,
                            item,
                            &format!("unknown key {k:?} (an entry has name and endpoint)"),
                        ));
                    }
                };
                match field_value {
                    Value::String(s) => slot.clone_from(s),
                    _ => {
                        return Err(self.invalid(FIELD, item, &format!("{k} must be a string")));
                    }
                }
            }
            list.push(entry);
        }
        Ok(Some(self.setting(list)))
    }

    /// A Go duration string ("1m30s"), greater than zero; `None` for null.
    fn duration(&self, field: &'static str, v: &Value) -> Result<Option<Duration>, ConfigError> {
        let s = match v {
            Value::Null => return Ok(None),
            Value::String(s) => s,
            _ => {
                return Err(self.invalid(field, v, "must be a duration string such as \"1m30s\""));
            }
        };
        match parse_go_duration(s) {
            Ok(d) if d.is_zero() => Err(self.invalid(field, v, "must be greater than zero")),
            Ok(d) => Ok(Some(d)),
            Err(reason) => Err(self.invalid(field, v, &reason)),
        }
    }
}

fn read_kubelet_field(
    ctx: &DocCtx<'_>,
    field: &str,
    v: &Value,
    fs: &mut FileSettings,
) -> Result<(), ConfigError> {
    match field {
        "staticPodPath" => fs.static_pod_path = ctx.string("staticPodPath", v)?,
        "containerRuntimeEndpoint" => {
            fs.container_runtime_endpoint = ctx.string("containerRuntimeEndpoint", v)?;
        }
        "imageServiceEndpoint" => {
            fs.image_service_endpoint = ctx.string("imageServiceEndpoint", v)?;
        }
        "podLogsDir" => fs.pod_logs_dir = ctx.string("podLogsDir", v)?,
        "maxPods" => fs.max_pods = ctx.count("maxPods", v, 1)?.map(|s| s.value),
        "runtimeRequestTimeout" => {
            fs.runtime_request_timeout = ctx.duration("runtimeRequestTimeout", v)?;
        }
        "fileCheckFrequency" => {
            fs.file_check_frequency = ctx.duration("fileCheckFrequency", v)?;
        }
        "syncFrequency" => fs.sync_frequency = ctx.duration("syncFrequency", v)?,
        "volumeStatsAggPeriod" => {
            fs.volume_stats_agg_period = ctx.duration("volumeStatsAggPeriod", v)?
        }
        "resolvConf" => fs.resolv_conf = ctx.string("resolvConf", v)?,
        "clusterDNS" => fs.cluster_dns = ctx.strings("clusterDNS", v)?,
        "clusterDomain" => fs.cluster_domain = ctx.string("clusterDomain", v)?,
        "nodeStatusUpdateFrequency" => {
            fs.node_status_update_frequency = ctx.duration("nodeStatusUpdateFrequency", v)?;
        }
        "nodeStatusReportFrequency" => {
            fs.node_status_report_frequency = ctx.duration("nodeStatusReportFrequency", v)?;
        }
        "rotateCertificates" => fs.rotate_certificates = ctx.boolean("rotateCertificates", v)?,
        "serverTLSBootstrap" => fs.server_tls_bootstrap = ctx.boolean("serverTLSBootstrap", v)?,
        "nodeLeaseDurationSeconds" => {
            fs.node_lease_duration_seconds = ctx
                .count("nodeLeaseDurationSeconds", v, 1)?
                .map(|s| s.value);
        }
        "evictionHard" => {
            if let Some(map) = ctx.string_map("evictionHard", v)? {
                let (e, warnings) = crate::eviction::parse(&map)
                    .map_err(|reason| ctx.invalid("evictionHard", v, &reason))?;
                fs.eviction_hard = Some(e);
                fs.eviction_warnings = warnings;
            }
        }
        _ if KUBELET_FIELDS.contains(&field) => fs.unsupported.push(field.to_string()),
        _ => return Err(ctx.unknown_field(field.to_string())),
    }
    Ok(())
}

fn read_minilet_field(
    ctx: &DocCtx<'_>,
    field: &str,
    v: &Value,
    fs: &mut FileSettings,
) -> Result<(), ConfigError> {
    match field {
        "stateDir" => fs.state_dir = ctx.string("stateDir", v)?,
        "cniConfDir" => fs.cni_conf_dir = ctx.string("cniConfDir", v)?,
        "cniBinDirs" => fs.cni_bin_dirs = ctx.strings("cniBinDirs", v)?,
        "cniCacheDir" => fs.cni_cache_dir = ctx.string("cniCacheDir", v)?,
        "runtimeCNIConfDir" => fs.runtime_cni_conf_dir = ctx.string("runtimeCNIConfDir", v)?,
        "runtimeCNIBinDir" => fs.runtime_cni_bin_dir = ctx.string("runtimeCNIBinDir", v)?,
        "cniPluginTimeout" => fs.cni_plugin_timeout = ctx.duration("cniPluginTimeout", v)?,
        "maxParallelSandboxCreations" => {
            fs.max_parallel_sandbox_creations = ctx.count("maxParallelSandboxCreations", v, 1)?;
        }
        "maxParallelRuntimeRequests" => {
            fs.max_parallel_runtime_requests = ctx.count("maxParallelRuntimeRequests", v, 2)?;
        }
        "csiDrivers" => fs.csi_drivers = ctx.csi_drivers(v)?,
        "csiOperationTimeout" => {
            fs.csi_operation_timeout = ctx.duration("csiOperationTimeout", v)?;
        }
        "nodeRoutes" => fs.node_routes = ctx.boolean("nodeRoutes", v)?,
        _ => return Err(ctx.unknown_field(field.to_string())),
    }
    Ok(())
}

/// A YAML value as people wrote it, for error messages.
fn show(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "(a list)".into(),
        Value::Object(_) => "(a mapping)".into(),
    }
}

/// The supported name closest to `field` within edit distance 2, compared
/// case-insensitively.
fn closest(field: &str, names: &[&'static str]) -> Option<&'static str> {
    let lower = field.to_lowercase();
    names
        .iter()
        .map(|name| (edit_distance(&lower, &name.to_lowercase()), *name))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, name)| name)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Parses a Go `time.ParseDuration` string: an optional sign, then one or
/// more decimal numbers (with an optional fraction) each followed by a unit
/// (ns, us, µs, ms, s, m, h); "0" alone needs no unit. Negative durations
/// are refused: no minilet setting can use one.
pub(crate) fn parse_go_duration(s: &str) -> Result<Duration, String> {
    const UNITS: &[(&str, u128)] = &[
        ("ns", 1),
        ("us", 1_000),
        ("\u{b5}s", 1_000),
        ("\u{3bc}s", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    let bad = || format!("{s:?} is not a duration such as \"300ms\", \"1m30s\" or \"2h\"");
    let mut rest = s;
    if let Some(r) = rest.strip_prefix('-') {
        if r != "0" {
            return Err("must not be negative".into());
        }
        rest = r;
    } else if let Some(r) = rest.strip_prefix('+') {
        rest = r;
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_digits, after) = rest.split_at(int_len);
        let (frac_digits, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.bytes().take_while(u8::is_ascii_digit).count();
                a.split_at(n)
            }
            None => ("", after),
        };
        if int_digits.is_empty() && frac_digits.is_empty() {
            return Err(bad());
        }
        let unit_len = after
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(after.len(), |(i, _)| i);
        let (unit, after) = after.split_at(unit_len);
        let Some(&(_, scale)) = UNITS.iter().find(|(name, _)| *name == unit) else {
            return Err(bad());
        };
        let int: u128 = if int_digits.is_empty() {
            0
        } else {
            int_digits
                .parse()
                .map_err(|_| "is out of range".to_string())?
        };
        let mut part = int.checked_mul(scale).ok_or("is out of range")?;
        // Fractions beyond nanosecond precision are dropped, as Go does.
        let frac_digits = &frac_digits[..frac_digits.len().min(18)];
        if !frac_digits.is_empty() {
            let frac: u128 = frac_digits.parse().map_err(|_| bad())?;
            let denom = 10u128.pow(u32::try_from(frac_digits.len()).unwrap_or(18));
            part += frac * scale / denom;
        }
        total = total.checked_add(part).ok_or("is out of range")?;
        if total > i64::MAX as u128 {
            return Err("is out of range".into());
        }
        rest = after;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| "is out of range".to_string())?;
    // The remainder is below 1e9 and so fits in u32.
    let nanos = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

/// Whether `s` is a DNS-1123 subdomain (Kubernetes object and node names):
/// at most 253 characters, dot-separated parts of lowercase letters, digits
/// and '-', each starting and ending with a letter or digit.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(dns_part_ok)
}

/// Whether `s` is a DNS-1123 label (namespaces, container names): one
/// subdomain part of at most 63 characters.
pub fn is_dns1123_label(s: &str) -> bool {
    s.len() <= 63 && dns_part_ok(s)
}

fn dns_part_ok(part: &str) -> bool {
    let b = part.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            alnum(first) && alnum(last) && b.iter().all(|c| alnum(c) || *c == b'-')
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Result<(String, Origin), ConfigError> {
        Ok(("Host-1\n".into(), Origin::HostName(HOSTNAME_FILE.into())))
    }

    fn flags() -> Flags {
        Flags::default()
    }

    fn from_text(flags: &Flags, text: &str) -> Result<Config, ConfigError> {
        resolve(
            flags,
            Some((Path::new("/etc/minilet/config.yaml"), text)),
            &host,
        )
    }

    const KUBELET: &str = "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n";
    const MINILET: &str = "apiVersion: minilet.io/v1alpha1\nkind: MiniletConfiguration\n";

    #[test]
    fn defaults_without_a_file() {
        let cfg = resolve(&flags(), None, &host).unwrap();
        assert_eq!(cfg, Config::default_for("host-1"));
        assert_eq!(
            cfg.cni_cache_dir,
            PathBuf::from("/var/lib/minilet/cni/cache")
        );
        assert_eq!(cfg.image_service_endpoint, cfg.container_runtime_endpoint);
    }

    #[test]
    fn defaults_with_empty_documents() {
        for text in [
            "",
            "# nothing\n",
            KUBELET,
            &format!("{KUBELET}---\n{MINILET}---\n"),
        ] {
            let cfg = from_text(&flags(), text).unwrap();
            assert_eq!(cfg, Config::default_for("host-1"), "{text:?}");
        }
    }

    #[test]
    fn file_values_and_flag_overrides() {
        let file = format!(
            "{KUBELET}staticPodPath: /etc/kubernetes/manifests\n\
             containerRuntimeEndpoint: unix:///run/crio/crio.sock\n\
             podLogsDir: /logs\nmaxPods: 5\nruntimeRequestTimeout: 1m30s\n\
             fileCheckFrequency: 500ms\nsyncFrequency: 1h\nvolumeStatsAggPeriod: 2s\nresolvConf: /run/resolv.conf\n\
             clusterDNS: [10.96.0.10, 'fd00::a']\nclusterDomain: cluster.local\n\
             ---\n{MINILET}stateDir: /srv/minilet\ncniConfDir: /a\ncniBinDirs: [/b]\n\
             runtimeCNIConfDir: /c\nruntimeCNIBinDir: /d\ncniPluginTimeout: 5s\n"
        );
        let full_flags = Flags {
            config: None,
            pod_manifest_path: Some("/m".into()),
            container_runtime_endpoint: Some("unix:///x.sock".into()),
            root_dir: Some("/root-dir".into()),
            hostname_override: Some(" Node.Example ".into()),
            ..Flags::default()
        };
        type Check = fn(&Config);
        let cases: Vec<(&str, Flags, Check)> = vec![
            ("file only", flags(), |c| {
                assert_eq!(c.node_name, "host-1");
                assert_eq!(c.static_pod_path, Some("/etc/kubernetes/manifests".into()));
                assert_eq!(c.container_runtime_endpoint, "unix:///run/crio/crio.sock");
                // imageServiceEndpoint follows the runtime endpoint.
                assert_eq!(c.image_service_endpoint, "unix:///run/crio/crio.sock");
                assert_eq!(c.pod_logs_dir, PathBuf::from("/logs"));
                assert_eq!(c.max_pods, 5);
                assert_eq!(c.runtime_request_timeout, Duration::from_secs(90));
                assert_eq!(c.file_check_frequency, Duration::from_millis(500));
                assert_eq!(c.sync_frequency, Duration::from_secs(3600));
                assert_eq!(c.volume_stats_agg_period, Duration::from_secs(2));
                assert_eq!(c.resolv_conf, PathBuf::from("/run/resolv.conf"));
                assert_eq!(c.cluster_dns, ["10.96.0.10", "fd00::a"]);
                assert_eq!(c.cluster_domain, "cluster.local");
                assert_eq!(c.state_dir, PathBuf::from("/srv/minilet"));
                assert_eq!(c.cni_cache_dir, PathBuf::from("/srv/minilet/cni/cache"));
                assert_eq!(c.cni_conf_dir, PathBuf::from("/a"));
                assert_eq!(c.cni_bin_dirs, [PathBuf::from("/b")]);
                assert_eq!(c.runtime_cni_conf_dir, PathBuf::from("/c"));
                assert_eq!(c.runtime_cni_bin_dir, PathBuf::from("/d"));
                assert_eq!(c.cni_plugin_timeout, Duration::from_secs(5));
                assert!(c.warnings.is_empty());
            }),
            ("flags win", full_flags, |c| {
                assert_eq!(c.node_name, "node.example");
                assert_eq!(c.static_pod_path, Some("/m".into()));
                assert_eq!(c.container_runtime_endpoint, "unix:///x.sock");
                assert_eq!(c.image_service_endpoint, "unix:///x.sock");
                assert_eq!(c.state_dir, PathBuf::from("/root-dir"));
                // Derived after the flag: follows --root-dir.
                assert_eq!(c.cni_cache_dir, PathBuf::from("/root-dir/cni/cache"));
                assert_eq!(c.max_pods, 5);
            }),
        ];
        for (name, f, check) in cases {
            let cfg = from_text(&f, &file).unwrap_or_else(|e| panic!("{name}: {e}"));
            check(&cfg);
        }
    }

    /// The node status settings have kubelet's defaults and its rule that
    /// the report frequency follows an explicitly set update frequency.
    #[test]
    fn node_status_frequencies_follow_kubelet_defaults() {
        let d = from_text(&flags(), KUBELET).unwrap();
        assert_eq!(d.node_status_update_frequency, Duration::from_secs(10));
        assert_eq!(d.node_status_report_frequency, Duration::from_secs(300));
        assert_eq!(d.node_lease_duration_seconds, 40);
        assert_eq!((d.kubeconfig, d.node_ip), (None, None));
        let only_update = from_text(
            &flags(),
            &format!("{KUBELET}nodeStatusUpdateFrequency: 20s\n"),
        )
        .unwrap();
        assert_eq!(
            only_update.node_status_report_frequency,
            Duration::from_secs(20)
        );
        let both = from_text(
            &flags(),
            &format!(
                "{KUBELET}nodeStatusUpdateFrequency: 20s\nnodeStatusReportFrequency: 1m\nnodeLeaseDurationSeconds: 60\n"
            ),
        )
        .unwrap();
        assert_eq!(both.node_status_report_frequency, Duration::from_secs(60));
        assert_eq!(both.node_lease_duration_seconds, 60);
        let f = Flags {
            kubeconfig: Some("/etc/kubernetes/kubelet.conf".into()),
            node_ip: Some("10.0.0.5".into()),
            ..flags()
        };
        let c = from_text(&f, KUBELET).unwrap();
        assert_eq!(c.kubeconfig, Some("/etc/kubernetes/kubelet.conf".into()));
        assert_eq!(c.node_ip, Some("10.0.0.5".parse().unwrap()));
        let bad = Flags {
            node_ip: Some("ten".into()),
            ..flags()
        };
        let err = from_text(&bad, KUBELET).unwrap_err().to_string();
        assert_eq!(
            err,
            "flag --node-ip: invalid nodeIP \"ten\": must be an IP address"
        );
    }

    #[test]
    fn tls_bootstrap_flags_as_kubelets() {
        let c = from_text(&flags(), KUBELET).unwrap();
        assert_eq!(c.cert_dir, PathBuf::from("/var/lib/minilet/pki"));
        assert!(!c.rotate_certificates, "kubelet's default");
        assert_eq!(c.bootstrap_kubeconfig, None);
        let f = Flags {
            kubeconfig: Some("/etc/minilet/kubelet.conf".into()),
            bootstrap_kubeconfig: Some("/etc/minilet/bootstrap.conf".into()),
            root_dir: Some("/r".into()),
            ..flags()
        };
        let c = from_text(
            &f,
            &format!("{KUBELET}rotateCertificates: true\nserverTLSBootstrap: true\n"),
        )
        .unwrap();
        assert_eq!(
            c.bootstrap_kubeconfig,
            Some("/etc/minilet/bootstrap.conf".into())
        );
        assert_eq!(c.cert_dir, PathBuf::from("/r/pki"));
        assert!(c.rotate_certificates && c.server_tls_bootstrap);
        let c = from_text(
            &Flags {
                cert_dir: Some("/certs".into()),
                ..f.clone()
            },
            KUBELET,
        )
        .unwrap();
        assert_eq!(c.cert_dir, PathBuf::from("/certs"));
        let err = from_text(
            &Flags {
                kubeconfig: None,
                ..f.clone()
            },
            KUBELET,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "flag --bootstrap-kubeconfig: invalid bootstrapKubeconfig \"/etc/minilet/bootstrap.conf\": needs --kubeconfig too: the file the issued credentials are written to"
        );
        let err = from_text(&f, &format!("{KUBELET}rotateCertificates: yes please\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rotateCertificates") && err.contains("must be true or false"),
            "{err}"
        );
    }

    #[test]
    fn explicit_image_endpoint_and_cache_dir_are_kept() {
        let text = format!(
            "{KUBELET}imageServiceEndpoint: unix:///img.sock\n---\n{MINILET}cniCacheDir: /cache\n"
        );
        let f = Flags {
            root_dir: Some("/r".into()),
            ..flags()
        };
        let cfg = from_text(&f, &text).unwrap();
        assert_eq!(cfg.image_service_endpoint, "unix:///img.sock");
        assert_eq!(cfg.cni_cache_dir, PathBuf::from("/cache"));
    }

    /// The sandbox slots stay below the node-wide runtime bound: set
    /// explicitly, they must; left to the default, they are capped.
    #[test]
    fn parallel_bounds_stay_consistent() {
        const F: &str = "config file /etc/minilet/config.yaml (document 2)";
        let m = |body: &str| format!("{KUBELET}---\n{MINILET}{body}");
        let default_slots = crate::pod::worker::PARALLEL_SANDBOXES;
        let ok: Vec<(&str, String, usize, usize)> = vec![
            (
                "defaults",
                m(""),
                default_slots,
                DEFAULT_PARALLEL_RUNTIME_REQUESTS,
            ),
            (
                "both set",
                m("maxParallelSandboxCreations: 6\nmaxParallelRuntimeRequests: 10\n"),
                6,
                10,
            ),
            (
                "sandbox slots alone",
                m("maxParallelSandboxCreations: 31\n"),
                31,
                32,
            ),
            (
                "a small runtime bound caps the default sandbox slots",
                m("maxParallelRuntimeRequests: 2\n"),
                1,
                2,
            ),
        ];
        for (name, text, slots, requests) in ok {
            let c = from_text(&flags(), &text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                (
                    c.max_parallel_sandbox_creations,
                    c.max_parallel_runtime_requests
                ),
                (slots, requests),
                "{name}"
            );
        }
        let bad = [
            (
                m("maxParallelSandboxCreations: 8\nmaxParallelRuntimeRequests: 8\n"),
                format!(
                    "{F}: invalid maxParallelSandboxCreations 8: must be less than maxParallelRuntimeRequests (8)"
                ),
            ),
            (
                m("maxParallelSandboxCreations: 40\n"),
                format!(
                    "{F}: invalid maxParallelSandboxCreations 40: must be less than maxParallelRuntimeRequests (32)"
                ),
            ),
            (
                m("maxParallelRuntimeRequests: 1\n"),
                format!("{F}: invalid maxParallelRuntimeRequests 1: must be at least 2"),
            ),
            (
                m("maxParallelSandboxCreations: four\n"),
                format!(
                    "{F}: invalid maxParallelSandboxCreations \"four\": must be a whole number"
                ),
            ),
        ];
        for (text, want) in bad {
            let err = from_text(&flags(), &text).expect_err(&text);
            assert_eq!(err.to_string(), want);
        }
    }

    /// Every error displays as one line naming the file (or flag) and field.
    #[test]
    fn csi_drivers_are_read_from_the_minilet_document() {
        let text = format!(
            "{KUBELET}---\n{MINILET}csiDrivers:\n- name: hostpath.csi.k8s.io\n  endpoint: unix:///var/lib/kubelet/plugins/hostpath/csi.sock\n- name: b.csi\n  endpoint: /run/b.sock\n"
        );
        let c = from_text(&flags(), &text).unwrap();
        assert_eq!(
            c.csi_drivers,
            vec![
                CsiDriverConfig {
                    name: "hostpath.csi.k8s.io".into(),
                    endpoint: "unix:///var/lib/kubelet/plugins/hostpath/csi.sock".into(),
                },
                CsiDriverConfig {
                    name: "b.csi".into(),
                    endpoint: "/run/b.sock".into(),
                },
            ]
        );
        assert!(from_text(&flags(), KUBELET).unwrap().csi_drivers.is_empty());
    }

    #[test]
    fn node_routes_is_a_boolean_defaulting_to_false() {
        let m = |body: &str| format!("{KUBELET}---\n{MINILET}{body}");
        assert!(
            from_text(&flags(), &m("nodeRoutes: true\n"))
                .unwrap()
                .node_routes
        );
        assert!(!from_text(&flags(), KUBELET).unwrap().node_routes);
        let err = from_text(&flags(), &m("nodeRoutes: yes please\n")).expect_err("not a bool");
        assert!(err.to_string().contains("nodeRoutes"), "{err}");
    }

    #[test]
    fn csi_operation_timeout_is_a_duration_defaulting_to_two_minutes() {
        let m = |body: &str| format!("{KUBELET}---\n{MINILET}{body}");
        let c = from_text(&flags(), &m("csiOperationTimeout: 1m30s\n")).unwrap();
        assert_eq!(c.csi_operation_timeout, Duration::from_secs(90));
        let c = from_text(&flags(), KUBELET).unwrap();
        assert_eq!(c.csi_operation_timeout, Duration::from_secs(120));
        for bad in ["csiOperationTimeout: 0s\n", "csiOperationTimeout: 5\n"] {
            let err = from_text(&flags(), &m(bad)).expect_err(bad).to_string();
            assert!(err.contains("invalid csiOperationTimeout"), "{err}");
        }
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let k = |body: &str| format!("{KUBELET}{body}");
        let m = |body: &str| format!("{KUBELET}---\n{MINILET}{body}");
        let with = |f: fn(&mut Flags)| {
            let mut fl = flags();
            f(&mut fl);
            fl
        };
        const F: &str = "config file /etc/minilet/config.yaml";
        let cases: Vec<(&str, String, Flags, String)> = vec![
            (
                "unknown kubelet field, close to a supported one",
                k("staticPodPth: /x\n"),
                flags(),
                format!("{F} (document 1): unknown KubeletConfiguration field \"staticPodPth\"; did you mean staticPodPath?"),
            ),
            (
                "unknown field, wrong case",
                k("maxpods: 3\n"),
                flags(),
                format!("{F} (document 1): unknown KubeletConfiguration field \"maxpods\"; did you mean maxPods?"),
            ),
            (
                "unknown field, nothing close",
                k("frobnicate: true\n"),
                flags(),
                format!("{F} (document 1): unknown KubeletConfiguration field \"frobnicate\""),
            ),
            (
                "unknown minilet field",
                m("stateDri: /x\n"),
                flags(),
                format!("{F} (document 2): unknown MiniletConfiguration field \"stateDri\"; did you mean stateDir?"),
            ),
            (
                "a field in the wrong document",
                m("staticPodPath: /x\n"),
                flags(),
                format!("{F} (document 2): unknown MiniletConfiguration field \"staticPodPath\"; staticPodPath belongs in the KubeletConfiguration document"),
            ),
            (
                "unknown kind",
                "apiVersion: v1\nkind: Pod\n".into(),
                flags(),
                format!("{F} (document 1): unknown apiVersion \"v1\" / kind \"Pod\"; expected kubelet.config.k8s.io/v1beta1 KubeletConfiguration or minilet.io/v1alpha1 MiniletConfiguration"),
            ),
            (
                "wrong apiVersion for the kind",
                "apiVersion: kubelet.config.k8s.io/v1\nkind: KubeletConfiguration\n".into(),
                flags(),
                format!("{F} (document 1): unknown apiVersion \"kubelet.config.k8s.io/v1\" / kind \"KubeletConfiguration\"; expected kubelet.config.k8s.io/v1beta1 KubeletConfiguration or minilet.io/v1alpha1 MiniletConfiguration"),
            ),
            (
                "no kind",
                "maxPods: 3\n".into(),
                flags(),
                format!("{F} (document 1): unknown apiVersion (missing) / kind (missing); expected kubelet.config.k8s.io/v1beta1 KubeletConfiguration or minilet.io/v1alpha1 MiniletConfiguration"),
            ),
            (
                "two kubelet documents",
                format!("{KUBELET}---\n{KUBELET}"),
                flags(),
                format!("{F} (document 2): a second KubeletConfiguration document (the first is document 1)"),
            ),
            (
                "not a mapping",
                "- a\n- b\n".into(),
                flags(),
                format!("{F} (document 1): expected a mapping of fields"),
            ),
            (
                "yaml syntax error with its position",
                k("maxPods: [1\n"),
                flags(),
                format!("{F}: invalid YAML at line 3 column 10: maxPods: unclosed bracket '['"),
            ),
            (
                "yaml error in a later document",
                format!("{KUBELET}---\n{MINILET}stateDir: \"/x\n"),
                flags(),
                format!("{F}: invalid YAML at line 6 column 11: unclosed quote"),
            ),
            (
                "maxPods zero",
                k("maxPods: 0\n"),
                flags(),
                format!("{F} (document 1): invalid maxPods 0: must be at least 1"),
            ),
            (
                "maxPods not a number",
                k("maxPods: many\n"),
                flags(),
                format!("{F} (document 1): invalid maxPods \"many\": must be a whole number"),
            ),
            (
                "endpoint not unix",
                k("containerRuntimeEndpoint: tcp://1.2.3.4:5\n"),
                flags(),
                format!("{F} (document 1): invalid containerRuntimeEndpoint \"tcp://1.2.3.4:5\": must be a unix socket URL such as unix:///run/containerd/containerd.sock"),
            ),
            (
                "endpoint flag not unix",
                String::new(),
                with(|f| f.container_runtime_endpoint = Some("/run/x.sock".into())),
                "flag --container-runtime-endpoint: invalid containerRuntimeEndpoint \"/run/x.sock\": must be a unix socket URL such as unix:///run/containerd/containerd.sock".into(),
            ),
            (
                "image endpoint not unix",
                k("imageServiceEndpoint: unix://relative.sock\n"),
                flags(),
                format!("{F} (document 1): invalid imageServiceEndpoint \"unix://relative.sock\": must be a unix socket URL such as unix:///run/containerd/containerd.sock"),
            ),
            (
                "relative path in the file",
                k("podLogsDir: logs\n"),
                flags(),
                format!("{F} (document 1): invalid podLogsDir \"logs\": must be an absolute path"),
            ),
            (
                "relative path from a flag",
                String::new(),
                with(|f| f.root_dir = Some("var/lib".into())),
                "flag --root-dir: invalid stateDir \"var/lib\": must be an absolute path".into(),
            ),
            (
                "relative manifest path flag",
                String::new(),
                with(|f| f.pod_manifest_path = Some("manifests".into())),
                "flag --pod-manifest-path: invalid staticPodPath \"manifests\": must be an absolute path".into(),
            ),
            (
                "zero stats period",
                k("volumeStatsAggPeriod: 0s\n"),
                flags(),
                format!("{F} (document 1): invalid volumeStatsAggPeriod \"0s\": must be greater than zero"),
            ),
            (
                "zero duration",
                k("syncFrequency: 0s\n"),
                flags(),
                format!("{F} (document 1): invalid syncFrequency \"0s\": must be greater than zero"),
            ),
            (
                "negative duration",
                k("fileCheckFrequency: -5s\n"),
                flags(),
                format!("{F} (document 1): invalid fileCheckFrequency \"-5s\": must not be negative"),
            ),
            (
                "duration without unit",
                m("cniPluginTimeout: 30\n"),
                flags(),
                format!("{F} (document 2): invalid cniPluginTimeout 30: must be a duration string such as \"1m30s\""),
            ),
            (
                "malformed duration",
                k("runtimeRequestTimeout: 2 minutes\n"),
                flags(),
                format!("{F} (document 1): invalid runtimeRequestTimeout \"2 minutes\": \"2 minutes\" is not a duration such as \"300ms\", \"1m30s\" or \"2h\""),
            ),
            (
                "empty cniBinDirs",
                m("cniBinDirs: []\n"),
                flags(),
                format!("{F} (document 2): invalid cniBinDirs []: must list at least one directory"),
            ),
            (
                "cniBinDirs not a list",
                m("cniBinDirs: /opt/cni/bin\n"),
                flags(),
                format!("{F} (document 2): invalid cniBinDirs \"/opt/cni/bin\": must be a list of strings"),
            ),
            (
                "clusterDNS not an IP",
                k("clusterDNS: [kube-dns]\n"),
                flags(),
                format!("{F} (document 1): invalid clusterDNS \"kube-dns\": must be a list of IP addresses"),
            ),
            (
                "node name from the flag",
                String::new(),
                with(|f| f.hostname_override = Some("bad_name".into())),
                "flag --hostname-override: invalid nodeName \"bad_name\": must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', at most 253 characters)".into(),
            ),
            (
                "csiDrivers: empty name",
                m("csiDrivers:\n- name: ''\n  endpoint: /csi.sock\n"),
                flags(),
                format!("{F} (document 2): invalid csiDrivers [0].name \"\": must be a CSI driver name: at most 63 characters, letters, digits, '-' and '.', starting and ending with a letter or digit"),
            ),
            (
                "csiDrivers: relative endpoint",
                m("csiDrivers:\n- name: a.csi\n  endpoint: unix://run/csi.sock\n"),
                flags(),
                format!("{F} (document 2): invalid csiDrivers [0].endpoint \"unix://run/csi.sock\": must be an absolute unix socket path: unix:///path/csi.sock or /path/csi.sock"),
            ),
            (
                "csiDrivers: a name twice",
                m("csiDrivers:\n- {name: a.csi, endpoint: /a.sock}\n- {name: a.csi, endpoint: /b.sock}\n"),
                flags(),
                format!("{F} (document 2): invalid csiDrivers [1].name \"a.csi\": is listed twice"),
            ),
            (
                "csiDrivers: unknown key",
                m("csiDrivers:\n- {name: a.csi, socket: /a.sock}\n"),
                flags(),
                format!("{F} (document 2): invalid csiDrivers (a mapping): unknown key \"socket\" (an entry has name and endpoint)"),
            ),
        ];
        for (name, text, f, want) in cases {
            let err = from_text(&f, &text).expect_err(name);
            let got = err.to_string();
            assert_eq!(got, want, "{name}");
            assert!(!got.contains('\n'), "{name}: more than one line");
        }
    }

    #[test]
    fn unsupported_kubelet_fields_make_one_warning() {
        let text = k_text(
            "address: 0.0.0.0\nmaxPods: 7\ncgroupDriver: systemd\nauthentication:\n  anonymous: {enabled: false}\n",
        );
        let cfg = from_text(&flags(), &text).unwrap();
        assert_eq!(cfg.max_pods, 7);
        assert_eq!(
            cfg.warnings,
            [
                "config file /etc/minilet/config.yaml: KubeletConfiguration fields not supported by minilet and ignored: address, cgroupDriver, authentication"
            ]
        );
    }

    fn k_text(body: &str) -> String {
        format!("{KUBELET}{body}")
    }

    #[test]
    fn null_values_mean_unset() {
        let cfg = from_text(&flags(), &k_text("staticPodPath:\nmaxPods: ~\n")).unwrap();
        assert_eq!(cfg, Config::default_for("host-1"));
        let cfg = from_text(&flags(), &k_text("staticPodPath: \"\"\n")).unwrap();
        assert_eq!(cfg.static_pod_path, None);
    }

    #[test]
    fn go_durations() {
        let ok: &[(&str, Duration)] = &[
            ("2m", Duration::from_secs(120)),
            ("1m30s", Duration::from_secs(90)),
            ("500ms", Duration::from_millis(500)),
            ("1h", Duration::from_secs(3600)),
            ("1.5h", Duration::from_secs(5400)),
            (".5s", Duration::from_millis(500)),
            ("1.s", Duration::from_secs(1)),
            ("+20s", Duration::from_secs(20)),
            ("1h2m3s4ms5us6ns", Duration::new(3723, 4_005_006)),
            ("3\u{b5}s", Duration::from_micros(3)),
            ("3\u{3bc}s", Duration::from_micros(3)),
            ("0", Duration::ZERO),
            ("-0", Duration::ZERO),
            ("0.0000000001s", Duration::ZERO),
        ];
        for (s, want) in ok {
            assert_eq!(parse_go_duration(s), Ok(*want), "{s}");
        }
        let bad = [
            "", "1", "s", "1d", "1.2.3s", ".s", "1 s", "-1s", "1s-", "3000000h", "1H",
        ];
        for s in bad {
            assert!(parse_go_duration(s).is_err(), "{s:?} should fail");
        }
    }

    #[test]
    fn dns_names() {
        for ok in ["a", "node-1", "node.example.com", "0abc"] {
            assert!(is_dns1123_subdomain(ok), "{ok}");
        }
        for bad in [
            "",
            "Node",
            "-a",
            "a-",
            "a..b",
            "a_b",
            ".a",
            &"a".repeat(254),
        ] {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
        assert!(is_dns1123_label("kube-system"));
        assert!(!is_dns1123_label("a.b"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            closest("staticPodPth", KUBELET_SUPPORTED),
            Some("staticPodPath")
        );
        assert_eq!(closest("MAXPODS", KUBELET_SUPPORTED), Some("maxPods"));
        assert_eq!(closest("cniBinDir", MINILET_SUPPORTED), Some("cniBinDirs"));
        assert_eq!(closest("podDir", KUBELET_SUPPORTED), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn load_reads_files_and_reports_missing_and_unreadable_ones() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("minilet.yaml");
        std::fs::write(&good, k_text("maxPods: 9\n")).unwrap();
        let f = |config: PathBuf| Flags {
            config: Some(config),
            hostname_override: Some("n1".into()),
            ..flags()
        };
        let cfg = load(&f(good)).unwrap();
        assert_eq!(cfg.max_pods, 9);
        assert_eq!(cfg.node_name, "n1");

        let missing = dir.path().join("nope.yaml");
        let err = load(&f(missing.clone())).unwrap_err();
        assert!(matches!(err, ConfigError::NotFound { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("config file {} does not exist", missing.display())
        );

        // A directory cannot be read as a file.
        let err = load(&f(dir.path().to_path_buf())).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("cannot read config file {}", dir.path().display())
        );
    }

    #[test]
    fn a_config_file_gets_the_same_bounds_as_a_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let f = |config: PathBuf| Flags {
            config: Some(config),
            hostname_override: Some("n1".into()),
            ..flags()
        };
        // Over the size limit: refused without reading it all (a FIFO or
        // /dev/zero would never end).
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, " ".repeat(MAX_CONFIG_BYTES as usize + 1)).unwrap();
        let err = load(&f(big.clone())).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "config file {} is over the 1048576-byte limit",
                big.display()
            )
        );
        let err = load(&f("/dev/zero".into())).unwrap_err();
        assert!(matches!(err, ConfigError::TooLarge { .. }), "{err:?}");

        // An alias bomb: one error, after bounded work.
        let mut bomb = format!("{KUBELET}clusterDNS: &l0 [a, a, a, a, a, a, a, a, a, a]\n");
        for i in 1..10 {
            let refs = vec![format!("*l{}", i - 1); 10].join(", ");
            bomb.push_str(&format!("x{i}: &l{i} [{refs}]\n"));
        }
        let start = std::time::Instant::now();
        let err = from_text(&flags(), &bomb).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, ConfigError::Yaml { .. }), "{err:?}");
        assert!(err.to_string().contains("budget breached"), "{err}");
    }

    #[test]
    fn load_without_flags_uses_the_host_name() {
        let cfg = load(&flags()).unwrap();
        let want = std::fs::read_to_string(HOSTNAME_FILE)
            .unwrap()
            .trim()
            .to_lowercase();
        assert_eq!(cfg.node_name, want);
    }

    /// The shipped example must load and say exactly the defaults.
    #[test]
    fn example_config_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/minilet.yaml");
        let cfg = load(&Flags {
            config: Some(path),
            hostname_override: Some("n1".into()),
            ..flags()
        })
        .unwrap();
        assert_eq!(cfg, Config::default_for("n1"));
    }
}
