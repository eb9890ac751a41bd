//! Agent configuration: a KubeletConfiguration document (kubelet's field
//! names and defaults) plus an optional MiniletConfiguration document in the
//! same file, overridden by flags. Everything is validated here, before any
//! task starts; `main` prints a `ConfigError` as one line and exits non-zero.
//!
//! Side effects: reads the config file, the host name. Nothing else.

use std::path::PathBuf;
use std::time::Duration;

/// Command-line flags that override the file (kubelet's flag names).
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub pod_manifest_path: Option<PathBuf>,
    pub container_runtime_endpoint: Option<String>,
    pub root_dir: Option<PathBuf>,
    pub hostname_override: Option<String>,
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
    /// Warnings found while loading (e.g. kubelet fields minilet ignores),
    /// logged by `main` once tracing is up.
    pub warnings: Vec<String>,
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
