//! DEL and CHECK without the agent: when the delegating plugin finds no
//! agent on its socket (stopped for an upgrade, crashed), it runs these two
//! itself, in its own process, through the same handler the agent serves
//! its socket with (`server::CniHandler`): every attachment the result
//! cache holds for the container is detached (extra networks too), with the
//! config cached at ADD time, or the default network's current one. So a
//! runtime tearing a pod down (StopPodSandbox from crictl, a drain, a
//! cleanup script) releases its netns and addresses whether the agent is up
//! or not. ADD still needs the agent: only it knows the pod (host ports,
//! extra networks), so without it ADD fails fast.
//!
//! What the plugin needs for this comes in the runtime's config, under
//! `withoutAgent` (see `Settings`): `install` writes the agent's CNI
//! settings there, next to `agentSocket`. That config is what the runtime
//! hands the plugin on every call, written by the same agent at the same
//! moment as the socket path, so the two can't disagree, and no other file
//! (nor a state dir the plugin would have to guess) is read.
//!
//! An agent starting at the same moment is safe: both sides take the
//! result cache's per-container file lock around each operation.
//!
//! Side effects: those of the chain (runs plugins, reads and removes the
//! result cache), in the plugin process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::cache::ResultCache;
use super::chain::CniRunner;
use super::config::{NetworkStore, load_dir};
use super::delegate::{AgentRequest, err};
use super::exec::{Command, PluginError, ProcessExec, codes};
use super::observe::{CniEvents, CniMetrics, NetworkStatusBoard};
use super::server::{CniHandler, PodNetworkInfo, PodNetworkLookup};

/// The agent's CNI settings, as the runtime's config carries them
/// (`withoutAgent`), in minilet's config names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// `cniConfDir`: the networks.
    pub cni_conf_dir: PathBuf,
    /// `cniBinDirs`: where their plugins are.
    pub cni_bin_dirs: Vec<PathBuf>,
    /// `cniCacheDir`: the result cache (and its locks).
    pub cni_cache_dir: PathBuf,
    /// `cniPluginTimeout`, in milliseconds: one plugin exec.
    pub cni_plugin_timeout_ms: u64,
}

impl Settings {
    /// The settings of the agent config `cfg`.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Self {
            cni_conf_dir: cfg.cni_conf_dir.clone(),
            cni_bin_dirs: cfg.cni_bin_dirs.clone(),
            cni_cache_dir: cfg.cni_cache_dir.clone(),
            cni_plugin_timeout_ms: u64::try_from(cfg.cni_plugin_timeout.as_millis())
                .unwrap_or(u64::MAX),
        }
    }
}

/// Without the agent no pod is known: capability args come from the cache
/// (what ADD used) or the runtime's runtimeConfig.
struct NoPods;

impl PodNetworkLookup for NoPods {
    fn pod_network_info(&self, _pod_uid: &str) -> Option<PodNetworkInfo> {
        None
    }
}

/// Whether `command` can run without the agent.
pub fn runs_without_agent(command: Command) -> bool {
    matches!(command, Command::Del | Command::Check)
}

/// Runs `request` (DEL or CHECK) in this process as the agent would,
/// bounded by `timeout` (the plugin's `timeoutSeconds`; plugins still
/// running then are killed).
pub fn run(
    settings: &Settings,
    request: &AgentRequest,
    timeout: Duration,
) -> Result<Option<Value>, PluginError> {
    if !runs_without_agent(request.command) {
        return Err(err(
            codes::INVALID_ENV,
            format!("{} needs the agent", request.command),
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            err(
                codes::IO_FAILURE,
                format!("cannot start {} without the agent: {e}", request.command),
            )
        })?;
    rt.block_on(async {
        let runner = CniRunner::new(
            ProcessExec::new(
                settings.cni_bin_dirs.clone(),
                Duration::from_millis(settings.cni_plugin_timeout_ms),
            ),
            // Bad files are the agent's to report; the valid ones run.
            Arc::new(NetworkStore::new(load_dir(&settings.cni_conf_dir))),
            ResultCache::new(settings.cni_cache_dir.clone()),
            Arc::new(CniMetrics::new()),
        );
        let handler = CniHandler {
            runner: Arc::new(runner),
            pods: Arc::new(NoPods),
            events: Arc::new(CniEvents::new()),
            status: Arc::new(NetworkStatusBoard::new()),
        };
        tokio::time::timeout(timeout, handler.process(request))
            .await
            .unwrap_or_else(|_| {
                Err(err(
                    codes::TRY_AGAIN_LATER,
                    format!(
                        "{} without the agent did not finish within {}s",
                        request.command,
                        timeout.as_secs()
                    ),
                ))
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_wire_format_and_from_config() {
        let mut cfg = crate::config::Config::default_for("node");
        cfg.cni_conf_dir = "/etc/minilet/net.d".into();
        cfg.cni_bin_dirs = vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()];
        cfg.cni_cache_dir = "/var/lib/minilet/cni/cache".into();
        cfg.cni_plugin_timeout = Duration::from_millis(2500);
        let s = Settings::from_config(&cfg);
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            serde_json::json!({
                "cniConfDir": "/etc/minilet/net.d",
                "cniBinDirs": ["/opt/cni/bin", "/usr/lib/cni"],
                "cniCacheDir": "/var/lib/minilet/cni/cache",
                "cniPluginTimeoutMs": 2500,
            })
        );
    }

    #[test]
    fn add_is_refused() {
        let req = AgentRequest {
            command: Command::Add,
            container_id: "c1".into(),
            netns: "/var/run/netns/x".into(),
            ifname: "eth0".into(),
            args: vec![],
            runtime_config: Default::default(),
            cni_version: "1.0.0".into(),
            prev_result: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let s = Settings {
            cni_conf_dir: dir.path().into(),
            cni_bin_dirs: vec![],
            cni_cache_dir: dir.path().into(),
            cni_plugin_timeout_ms: 1000,
        };
        let e = run(&s, &req, Duration::from_secs(1)).unwrap_err();
        assert!(e.msg.contains("ADD needs the agent"), "{}", e.msg);
    }
}
