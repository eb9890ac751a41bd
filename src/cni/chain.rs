//! The chain runner: ADD, DEL, CHECK, STATUS and GC of attachments over the
//! networks of the config dir, as the CNI spec asks a runtime to run them —
//! ADD and CHECK in list order, DEL in reverse, each plugin getting the
//! list's `name`/`cniVersion`, `prevResult` converted to that version, and
//! `runtimeConfig` holding only the capabilities it declares. Every plugin
//! is first asked VERSION (once per binary and mtime) and must support the
//! network's `cniVersion`.
//!
//! The result cache is written ahead: before ADD's first plugin runs, an
//! entry with the config and no result (pending) is saved; the result is
//! added on success. A crash between a plugin's ADD and the final write
//! still leaves a record, and GC (or a DEL) cleans it up. DEL and CHECK use
//! the config cached at ADD time (libcni), falling back to the current one.
//!
//! Operations on one container id are serialised (the spec forbids parallel
//! operations on a container; the agent gets them from several runtimes'
//! plugin processes), different containers run in parallel: first among
//! this process's tasks, then, through the cache's per-container file lock,
//! with other processes (a delegating plugin running DEL or CHECK itself
//! while the agent is down, `minilet cni`). GC skips a container another
//! process holds, and one whose entry went while it waited.
//!
//! Test-only fault hook, compiled only with the `fault-injection` feature
//! (the end-to-end suite's builds, never the shipped binary): with
//! `MINILET_FAULT=cni-abort-after-add` in the environment (read once, when
//! the runner is built) the process aborts right after a successful ADD of
//! all plugins and before the result is cached — the "kill -9 at the worst
//! moment" of the GC tests.
//!
//! Side effects: runs plugins through `PluginExec`, writes and removes the
//! result cache, records metrics.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::cache::{CACHE_KIND, CacheError, CachedAttachment, ContainerLock, ResultCache};
use super::config::{NetworkConfigList, NetworkStore, PluginConfig, is_identifier};
use super::exec::{Command, ExecError, PluginEnv, PluginError, PluginExec, codes, parse_result};
use super::observe::{CniMetrics, short_duration};
use super::pod_cidr::PodCidr;
use super::version::{self, ConvertError, PluginInfo};
use crate::locks::lock;

/// The environment value of the fault hook (see the module header).
#[cfg(feature = "fault-injection")]
pub const FAULT_ABORT_AFTER_ADD: &str = "cni-abort-after-add";

/// Cache entries younger than this are left alone by GC: a sandbox whose
/// ADD is still running (or just finished) is not yet listed by the
/// runtime, so "not live" does not yet mean "gone".
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(30);

/// One interface of one container on a network: what the runtime passes
/// in the CNI environment plus the capability arguments.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attachment {
    pub container_id: String,
    /// Path of the network namespace; may be empty on DEL.
    pub netns: String,
    pub ifname: String,
    /// CNI_ARGS pairs: K8S_POD_NAME, K8S_POD_NAMESPACE, K8S_POD_UID,
    /// K8S_POD_INFRA_CONTAINER_ID, IgnoreUnknown=1.
    pub args: Vec<(String, String)>,
    /// Capability arguments (`portMappings`, `bandwidth`, `ips`, `mac`),
    /// passed in `runtimeConfig` to the plugins that declare them.
    pub capability_args: Map<String, Value>,
}

impl Attachment {
    /// CNI_ARGS as the environment carries it.
    pub fn cni_args(&self) -> String {
        let pairs: Vec<String> = self.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.join(";")
    }

    /// The value of one CNI_ARGS key.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Spec rules on the container id and interface name; both also become
    /// part of a cache file name, so this keeps them single path components.
    fn validate(&self) -> Result<(), String> {
        if !is_identifier(&self.container_id) {
            return Err(format!(
                "invalid container id {:?}: must start with a letter or digit and hold only letters, digits, '_', '.', '-'",
                self.container_id
            ));
        }
        validate_ifname(&self.ifname)
    }

    /// The attachment a cache entry describes (GC, DEL after a restart).
    pub fn from_cached(c: &CachedAttachment) -> Self {
        Self {
            container_id: c.container_id.clone(),
            netns: c.netns.clone(),
            ifname: c.if_name.clone(),
            args: c.cni_args.clone(),
            capability_args: c.capability_args.clone(),
        }
    }
}

/// Linux interface name rules (what the spec defers to).
pub fn validate_ifname(i: &str) -> Result<(), String> {
    if i.is_empty()
        || i.len() > 15
        || i == "."
        || i == ".."
        || i.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!("invalid interface name {i:?}"));
    }
    Ok(())
}

/// Why an operation on a network failed.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The runtime's parameters break the spec's rules.
    #[error("{0}")]
    InvalidAttachment(String),
    /// No network of that name in the config dir (and none cached).
    #[error("no CNI network named {name:?} in the config dir")]
    UnknownNetwork { name: String },
    /// The config dir holds no valid network at all.
    #[error("no default CNI network: the config dir holds no valid network")]
    NoDefaultNetwork,
    /// A plugin does not speak the network's cniVersion (per its VERSION).
    #[error("plugin {plugin} does not support cniVersion {version} (supports {supported})")]
    Unsupported {
        network: String,
        plugin: String,
        version: String,
        supported: String,
    },
    /// CHECK asked of a network that can't be checked.
    #[error("CHECK is not available on network {network}: {why}")]
    CheckUnavailable { network: String, why: String },
    /// CHECK or a cache-based operation on an attachment that was never
    /// (completely) added.
    #[error("no cached result for {network}/{container_id}/{ifname}")]
    NotAdded {
        network: String,
        container_id: String,
        ifname: String,
    },
    /// A plugin failed (for ADD, after the rollback DEL ran).
    #[error("{command} {network}")]
    Plugin {
        command: Command,
        network: String,
        /// Boxed: it is large, and errors travel through every return.
        #[source]
        source: Box<ExecError>,
    },
    /// A plugin's result could not be read in the network's version.
    #[error("{network}: result of plugin {plugin}")]
    Convert {
        network: String,
        plugin: String,
        #[source]
        source: ConvertError,
    },
    /// A network list with no plugins (config validation refuses these).
    #[error("network {network} has no plugins")]
    EmptyNetwork { network: String },
    /// The network's IPAM asks for the node's pod CIDR and it is not (yet)
    /// there (`pod_cidr`).
    #[error(transparent)]
    PodCidr(#[from] super::pod_cidr::PodCidrError),
    /// The result cache could not be written or read.
    #[error("{network}")]
    Cache {
        network: String,
        #[source]
        source: CacheError,
    },
}

impl CniError {
    /// The CNI error object reported to the runtime. A plugin's own error
    /// object passes through untouched; other failures get the well-known
    /// code that fits, with the whole error chain as `msg`.
    pub fn to_plugin_error(&self) -> PluginError {
        let code = match self {
            CniError::InvalidAttachment(_) => codes::INVALID_ENV,
            CniError::Plugin { source, .. } => {
                let mut e = source.to_plugin_error();
                if !matches!(**source, ExecError::Plugin { .. }) {
                    e.msg = error_chain(self);
                }
                return e;
            }
            CniError::Unsupported { .. } => codes::INCOMPATIBLE_VERSION,
            CniError::UnknownNetwork { .. }
            | CniError::NoDefaultNetwork
            | CniError::CheckUnavailable { .. }
            | CniError::EmptyNetwork { .. } => codes::INVALID_CONFIG,
            CniError::NotAdded { .. } => codes::INVALID_CONFIG,
            CniError::Convert { .. } => codes::DECODE_FAILURE,
            CniError::Cache { .. } => codes::IO_FAILURE,
            CniError::PodCidr(e) if e.is_retryable() => codes::TRY_AGAIN_LATER,
            CniError::PodCidr(_) => codes::INVALID_CONFIG,
        };
        PluginError {
            cni_version: String::new(),
            code,
            msg: error_chain(self),
            details: String::new(),
        }
    }

    /// The plugin whose failure this is, if any.
    pub fn plugin(&self) -> Option<&str> {
        match self {
            CniError::Plugin { source, .. } => Some(source.plugin()),
            CniError::Unsupported { plugin, .. } | CniError::Convert { plugin, .. } => Some(plugin),
            _ => None,
        }
    }
}

/// `err: cause: cause`, for messages that leave this process.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

/// One plugin exec of an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub plugin: String,
    pub command: Command,
    pub took: Duration,
    pub ok: bool,
}

/// What one operation ran, for events and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpReport {
    /// The network's real name (`""` resolved to the default's).
    pub network: String,
    pub ifname: String,
    pub steps: Vec<Step>,
}

impl OpReport {
    /// "ADD bridge 12ms, portmap 9ms on minilet-bridge/eth0"; with several
    /// commands (an ADD rolled back) each step names its own.
    pub fn summary(&self) -> String {
        let first = self.steps.first().map(|s| s.command);
        let uniform = self.steps.iter().all(|s| Some(s.command) == first);
        let parts: Vec<String> = self
            .steps
            .iter()
            .map(|s| {
                let failed = if s.ok { "" } else { " (failed)" };
                if uniform {
                    format!("{} {}{failed}", s.plugin, short_duration(s.took))
                } else {
                    format!(
                        "{} {} {}{failed}",
                        s.command,
                        s.plugin,
                        short_duration(s.took)
                    )
                }
            })
            .collect();
        let prefix = match (uniform, first) {
            (true, Some(c)) => format!("{c} "),
            _ => String::new(),
        };
        format!(
            "{prefix}{} on {}/{}",
            parts.join(", "),
            self.network,
            self.ifname
        )
    }
}

/// What a GC pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Cached attachments (network, container id, ifname) that got DEL.
    pub deleted: Vec<(String, String, String)>,
    /// Stale attachments left for a later pass (too young, or busy).
    pub deferred: Vec<(String, String, String)>,
    /// (network, plugin) pairs that were sent the GC verb.
    pub gc_calls: Vec<(String, String)>,
    /// One line per failure; the pass goes on after each.
    pub errors: Vec<String>,
}

/// How GC's DEL of one stale attachment went, when it didn't fail.
enum GcStep {
    Deleted,
    /// Another process holds the container: deferred.
    Busy,
    /// Its entry went while GC waited for the lock: someone else deleted it.
    Gone,
}

/// A container locked in this process and across processes. Fields drop in
/// order: the file lock first, then this process's.
struct Locked {
    _file: ContainerLock,
    _task: ContainerGuard,
}

/// Runs the networks' chains. Generic over the executor so tests can use
/// script plugins or the scripted fake.
pub struct CniRunner<E: PluginExec> {
    exec: E,
    store: Arc<NetworkStore>,
    cache: ResultCache,
    metrics: Arc<CniMetrics>,
    locks: ContainerLocks,
    /// Plugin type → (binary identity, its VERSION answer).
    versions: Mutex<HashMap<String, (String, PluginInfo)>>,
    gc_grace: Duration,
    /// The node's pod CIDR, for networks whose IPAM says `usePodCidr`.
    pod_cidr: Arc<PodCidr>,
    #[cfg(feature = "fault-injection")]
    abort_after_add: bool,
}

impl<E: PluginExec> CniRunner<E> {
    pub fn new(
        exec: E,
        store: Arc<NetworkStore>,
        cache: ResultCache,
        metrics: Arc<CniMetrics>,
    ) -> Self {
        Self {
            exec,
            store,
            cache,
            metrics,
            locks: ContainerLocks::default(),
            versions: Mutex::default(),
            gc_grace: DEFAULT_GC_GRACE,
            pod_cidr: Arc::new(PodCidr::standalone()),
            #[cfg(feature = "fault-injection")]
            abort_after_add: std::env::var("MINILET_FAULT")
                .is_ok_and(|v| v == FAULT_ABORT_AFTER_ADD),
        }
    }

    /// How old a stale cache entry must be before GC removes it.
    pub fn with_gc_grace(mut self, grace: Duration) -> Self {
        self.gc_grace = grace;
        self
    }

    /// Where the node's pod CIDR comes from (API server mode: the node
    /// task fills it); without, `usePodCidr` networks fail as standalone.
    pub fn with_pod_cidr(mut self, pod_cidr: Arc<PodCidr>) -> Self {
        self.pod_cidr = pod_cidr;
        self
    }

    /// The network store this runner reads.
    pub fn store(&self) -> &Arc<NetworkStore> {
        &self.store
    }

    /// The plugin executor.
    pub fn exec(&self) -> &E {
        &self.exec
    }

    /// The result cache.
    pub fn cache(&self) -> &ResultCache {
        &self.cache
    }

    /// The metrics every plugin exec is recorded in.
    pub fn metrics(&self) -> &Arc<CniMetrics> {
        &self.metrics
    }

    /// The current network `name` (`""`: the default), as written.
    pub fn network(&self, name: &str) -> Result<NetworkConfigList, CniError> {
        let set = self.store.current();
        set.get(name).cloned().ok_or_else(|| {
            if name.is_empty() {
                CniError::NoDefaultNetwork
            } else {
                CniError::UnknownNetwork { name: name.into() }
            }
        })
    }

    /// The current network `name` as it runs: with the node's pod CIDR in
    /// place of a `usePodCidr` placeholder (`pod_cidr`).
    pub fn network_to_run(&self, name: &str) -> Result<NetworkConfigList, CniError> {
        let net = self.network(name)?;
        Ok(super::pod_cidr::apply(&net, &self.pod_cidr.get())?.unwrap_or(net))
    }

    /// The cached attachments of a container, sorted by network then ifname.
    pub async fn attachments(&self, container_id: &str) -> Vec<CachedAttachment> {
        match self.cache.list().await {
            Ok(all) => all
                .into_iter()
                .filter(|a| a.container_id == container_id)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "cannot list the CNI result cache");
                Vec::new()
            }
        }
    }

    /// ADD: every plugin in list order, each getting the previous result.
    pub async fn add(&self, network: &str, att: &Attachment) -> Result<Value, CniError> {
        self.add_report(network, att).await.0
    }

    /// ADD, also returning what ran and how long each plugin took.
    ///
    /// Before the first plugin, a pending cache entry is written; on
    /// success the result is cached and returned. On failure the plugins
    /// run so far get a best-effort DEL in reverse order (the failing one
    /// included: it may have done half its work); the pending entry goes
    /// only when that rollback succeeded, so GC retries it otherwise.
    pub async fn add_report(
        &self,
        network: &str,
        att: &Attachment,
    ) -> (Result<Value, CniError>, OpReport) {
        let mut report = OpReport {
            ifname: att.ifname.clone(),
            ..Default::default()
        };
        let r = self.add_inner(network, att, &mut report).await;
        (r, report)
    }

    async fn add_inner(
        &self,
        network: &str,
        att: &Attachment,
        report: &mut OpReport,
    ) -> Result<Value, CniError> {
        att.validate().map_err(CniError::InvalidAttachment)?;
        let net = self.network_to_run(network)?;
        report.network.clone_from(&net.name);
        let _guard = self.lock(&net.name, &att.container_id).await?;
        self.check_versions(&net, &net.plugins).await?;
        let cache_err = |source| CniError::Cache {
            network: net.name.clone(),
            source,
        };
        let mut entry = CachedAttachment {
            kind: CACHE_KIND.into(),
            container_id: att.container_id.clone(),
            config: net.bytes.clone(),
            if_name: att.ifname.clone(),
            network_name: net.name.clone(),
            netns: att.netns.clone(),
            cni_args: att.args.clone(),
            capability_args: att.capability_args.clone(),
            result: Value::Null,
        };
        // Write-ahead: from here on, whatever the plugins do is on record.
        self.cache.save(&entry).await.map_err(cache_err)?;
        let env = env(Command::Add, att);
        let mut prev: Option<Value> = None;
        for (i, plugin) in net.plugins.iter().enumerate() {
            let step = async {
                let stdin = plugin_stdin(&net, plugin, prev.as_ref(), &att.capability_args, None);
                let out = self.run(&net, plugin, &env, &stdin, report).await;
                let out = out.and_then(|o| parse_result(&plugin.plugin_type, &o));
                match out {
                    Ok(r) => version::convert_result(&r, &net.cni_version).map_err(|source| {
                        CniError::Convert {
                            network: net.name.clone(),
                            plugin: plugin.plugin_type.clone(),
                            source,
                        }
                    }),
                    Err(source) => Err(CniError::Plugin {
                        command: Command::Add,
                        network: net.name.clone(),
                        source: Box::new(source),
                    }),
                }
            };
            match step.await {
                Ok(result) => prev = Some(result),
                Err(e) => {
                    tracing::warn!(network = %net.name, plugin = %plugin.plugin_type, error = %error_chain(&e), "add failed, rolling back");
                    self.rollback(&net, &net.plugins[..=i], att, prev.as_ref(), report)
                        .await;
                    return Err(e);
                }
            }
        }
        let result = prev.ok_or_else(|| CniError::EmptyNetwork {
            network: net.name.clone(),
        })?;
        #[cfg(feature = "fault-injection")]
        if self.abort_after_add {
            // Test-only: see the module header.
            tracing::error!(
                "MINILET_FAULT={FAULT_ABORT_AFTER_ADD}: aborting before the result is cached"
            );
            std::process::abort();
        }
        entry.result = result.clone();
        if let Err(source) = self.cache.save(&entry).await {
            // Without the result a later DEL would lack prevResult: undo now
            // rather than leave an attachment we can't describe.
            self.rollback(&net, &net.plugins, att, Some(&result), report)
                .await;
            return Err(cache_err(source));
        }
        Ok(result)
    }

    /// DEL: every plugin in reverse order, each getting the cached ADD
    /// result as `prevResult` (converted to the network's version), with the
    /// config cached at ADD time. Idempotent: without a cache entry the
    /// plugins still run (they clean up what they can; a netns that is
    /// already gone is fine for them) and the entry is removed only once all
    /// of them succeeded, so a failed DEL can be retried.
    pub async fn del(&self, network: &str, att: &Attachment) -> Result<(), CniError> {
        self.del_report(network, att, None).await.0
    }

    /// DEL with `fallback` as `prevResult` when there is no cached result
    /// (the runtime's own copy of our result, after a lost cache), also
    /// returning what ran.
    pub async fn del_report(
        &self,
        network: &str,
        att: &Attachment,
        fallback: Option<&Value>,
    ) -> (Result<(), CniError>, OpReport) {
        let mut report = OpReport {
            ifname: att.ifname.clone(),
            ..Default::default()
        };
        let r = async {
            att.validate().map_err(CniError::InvalidAttachment)?;
            let name = self.resolve_name(network)?;
            report.network.clone_from(&name);
            let _guard = self.lock(&name, &att.container_id).await?;
            self.del_locked(&name, att, fallback, &mut report).await
        }
        .await;
        (r, report)
    }

    /// Both locks of a container, held until the guard drops: this
    /// process's (so one of its tasks at a time waits for the file lock),
    /// then the cache's file lock, shared with other processes.
    async fn lock(&self, network: &str, container_id: &str) -> Result<Locked, CniError> {
        let task = self.locks.lock(container_id).await;
        let file = self
            .cache
            .lock(container_id)
            .await
            .map_err(|source| CniError::Cache {
                network: network.to_owned(),
                source,
            })?;
        Ok(Locked {
            _file: file,
            _task: task,
        })
    }

    /// A network name with `""` resolved to the default's.
    fn resolve_name(&self, network: &str) -> Result<String, CniError> {
        if network.is_empty() {
            Ok(self.network("")?.name)
        } else {
            Ok(network.to_owned())
        }
    }

    /// The cache entry of an attachment; an unreadable one counts as none
    /// (a corrupt file must not make the attachment undeletable).
    async fn cached(&self, network: &str, att: &Attachment) -> Option<CachedAttachment> {
        match self
            .cache
            .load(network, &att.container_id, &att.ifname)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(network, container_id = %att.container_id, error = %error_chain(&e), "ignoring unreadable result cache");
                None
            }
        }
    }

    /// The config an existing attachment runs with: the one cached at ADD
    /// time if readable, else the current one of that name.
    fn config_for(
        &self,
        network: &str,
        cached: Option<&CachedAttachment>,
    ) -> Result<NetworkConfigList, CniError> {
        if let Some(c) = cached
            && let Ok(net) = super::config::parse(&c.config, true, Path::new("(result cache)"))
            && net.name == network
        {
            return Ok(net);
        }
        self.network_to_run(network)
    }

    async fn del_locked(
        &self,
        network: &str,
        att: &Attachment,
        fallback: Option<&Value>,
        report: &mut OpReport,
    ) -> Result<(), CniError> {
        let cached = self.cached(network, att).await;
        let net = self.config_for(network, cached.as_ref())?;
        self.check_versions(&net, &net.plugins).await?;
        let prev = cached
            .as_ref()
            .map(|c| &c.result)
            .filter(|r| !r.is_null())
            .or(fallback)
            .and_then(|r| match version::convert_result(r, &net.cni_version) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!(network = %net.name, error = %e, "DEL without prevResult: the cached one can't be converted");
                    None
                }
            });
        // The runtime may not repeat capability args on DEL; portmap needs
        // them to remove its rules.
        let caps = match &cached {
            Some(c) if att.capability_args.is_empty() => &c.capability_args,
            _ => &att.capability_args,
        };
        let env = env(Command::Del, att);
        for plugin in net.plugins.iter().rev() {
            let stdin = plugin_stdin(&net, plugin, prev.as_ref(), caps, None);
            if let Err(source) = self.run(&net, plugin, &env, &stdin, report).await {
                // Spec: stop the list at the first error.
                return Err(CniError::Plugin {
                    command: Command::Del,
                    network: net.name.clone(),
                    source: Box::new(source),
                });
            }
        }
        self.cache
            .remove(&net.name, &att.container_id, &att.ifname)
            .await
            .map_err(|source| CniError::Cache {
                network: net.name.clone(),
                source,
            })
    }

    /// CHECK: every plugin in list order with the cached result as
    /// `prevResult`. Only for networks at cniVersion ≥ 0.4.0 without
    /// `disableCheck`, and only for attachments whose ADD completed.
    pub async fn check(&self, network: &str, att: &Attachment) -> Result<(), CniError> {
        self.check_report(network, att).await.0
    }

    /// CHECK, also returning what ran.
    pub async fn check_report(
        &self,
        network: &str,
        att: &Attachment,
    ) -> (Result<(), CniError>, OpReport) {
        let mut report = OpReport {
            ifname: att.ifname.clone(),
            ..Default::default()
        };
        let r = async {
            att.validate().map_err(CniError::InvalidAttachment)?;
            let name = self.resolve_name(network)?;
            report.network.clone_from(&name);
            let _guard = self.lock(&name, &att.container_id).await?;
            let cached = self.cached(&name, att).await;
            let net = self.config_for(&name, cached.as_ref())?;
            if !version::at_least(&net.cni_version, "0.4.0") {
                return Err(CniError::CheckUnavailable {
                    network: net.name.clone(),
                    why: format!("cniVersion {} predates CHECK (0.4.0)", net.cni_version),
                });
            }
            if net.disable_check {
                return Err(CniError::CheckUnavailable {
                    network: net.name.clone(),
                    why: "disableCheck is set".into(),
                });
            }
            let Some(cached) = cached.filter(|c| !c.result.is_null()) else {
                return Err(CniError::NotAdded {
                    network: net.name.clone(),
                    container_id: att.container_id.clone(),
                    ifname: att.ifname.clone(),
                });
            };
            self.check_versions(&net, &net.plugins).await?;
            let prev =
                version::convert_result(&cached.result, &net.cni_version).map_err(|source| {
                    CniError::Convert {
                        network: net.name.clone(),
                        plugin: "(cached result)".into(),
                        source,
                    }
                })?;
            let caps = if att.capability_args.is_empty() {
                &cached.capability_args
            } else {
                &att.capability_args
            };
            let env = env(Command::Check, att);
            for plugin in &net.plugins {
                let stdin = plugin_stdin(&net, plugin, Some(&prev), caps, None);
                if let Err(source) = self.run(&net, plugin, &env, &stdin, &mut report).await {
                    return Err(CniError::Plugin {
                        command: Command::Check,
                        network: net.name.clone(),
                        source: Box::new(source),
                    });
                }
            }
            Ok(())
        }
        .await;
        (r, report)
    }

    /// STATUS of a network: every plugin's binary answers VERSION with the
    /// network's cniVersion; for networks at ≥ 1.1.0 each plugin is also
    /// sent the STATUS verb (its error, e.g. code 50 "not available",
    /// comes back as is).
    pub async fn status(&self, network: &str) -> Result<(), CniError> {
        let net = self.network_to_run(network)?;
        self.check_versions(&net, &net.plugins).await?;
        if !version::at_least(&net.cni_version, "1.1.0") {
            return Ok(());
        }
        let env = PluginEnv {
            command: Command::Status,
            container_id: String::new(),
            netns: String::new(),
            ifname: String::new(),
            args: String::new(),
        };
        let mut report = OpReport::default();
        for plugin in &net.plugins {
            let stdin = plugin_stdin(&net, plugin, None, &Map::new(), None);
            if let Err(source) = self.run(&net, plugin, &env, &stdin, &mut report).await {
                return Err(CniError::Plugin {
                    command: Command::Status,
                    network: net.name.clone(),
                    source: Box::new(source),
                });
            }
        }
        Ok(())
    }

    /// GC: DEL every cached attachment (pending ones too) whose container
    /// id is not in `live` and whose entry is older than the grace period;
    /// then, for each network at cniVersion ≥ 1.1.0, send GC to each of its
    /// plugins supporting 1.1.0 with `cni.dev/valid-attachments` = the
    /// network's remaining cached attachments. Errors are collected, never
    /// fatal.
    pub async fn gc(&self, live_container_ids: &HashSet<String>) -> GcReport {
        let mut report = GcReport::default();
        let entries = match self.cache.list().await {
            Ok(e) => e,
            Err(e) => {
                report.errors.push(error_chain(&e));
                return report;
            }
        };
        for entry in entries
            .iter()
            .filter(|e| !live_container_ids.contains(&e.container_id))
        {
            let key = (
                entry.network_name.clone(),
                entry.container_id.clone(),
                entry.if_name.clone(),
            );
            let age = self
                .cache
                .age(&entry.network_name, &entry.container_id, &entry.if_name)
                .await;
            if age.is_none_or(|a| a < self.gc_grace) || self.locks.held(&entry.container_id) {
                report.deferred.push(key);
                continue;
            }
            let att = Attachment::from_cached(entry);
            let mut op = OpReport::default();
            let r = async {
                let cache_err = |source| CniError::Cache {
                    network: entry.network_name.clone(),
                    source,
                };
                let _task = self.locks.lock(&att.container_id).await;
                // Another process on it (a plugin running DEL without the
                // agent): leave it to that one, look again next pass.
                let Some(_file) = self.cache.try_lock(&att.container_id).map_err(cache_err)? else {
                    return Ok(GcStep::Busy);
                };
                // An operation that held the lock before us may have
                // deleted it already.
                if self
                    .cache
                    .load(&entry.network_name, &att.container_id, &att.ifname)
                    .await
                    .is_ok_and(|e| e.is_none())
                {
                    return Ok(GcStep::Gone);
                }
                self.del_locked(&entry.network_name, &att, None, &mut op)
                    .await
                    .map(|()| GcStep::Deleted)
            }
            .await;
            match r {
                Ok(GcStep::Busy) => report.deferred.push(key),
                Ok(GcStep::Gone) => {}
                Ok(GcStep::Deleted) => {
                    tracing::info!(network = %key.0, container_id = %key.1, ifname = %key.2, pending = entry.result.is_null(), "gc: deleted stale attachment");
                    report.deleted.push(key);
                }
                Err(e) => report.errors.push(format!(
                    "DEL {}/{}/{}: {}",
                    key.0,
                    key.1,
                    key.2,
                    error_chain(&e)
                )),
            }
        }
        let remaining = match self.cache.list().await {
            Ok(e) => e,
            Err(e) => {
                report.errors.push(error_chain(&e));
                return report;
            }
        };
        let stale_locks = self.cache.remove_idle_locks();
        if !stale_locks.is_empty() {
            tracing::info!(containers = ?stale_locks, "gc: removed lock files left by killed processes");
        }
        let set = self.store.current();
        for net in set.networks.values() {
            if !version::at_least(&net.cni_version, "1.1.0") {
                continue;
            }
            let valid: Vec<Value> = remaining
                .iter()
                .filter(|e| e.network_name == net.name)
                .map(|e| json!({"containerID": e.container_id, "ifname": e.if_name}))
                .collect();
            let env = PluginEnv {
                command: Command::Gc,
                container_id: String::new(),
                netns: String::new(),
                ifname: String::new(),
                args: String::new(),
            };
            for plugin in &net.plugins {
                match self.plugin_info(net, plugin).await {
                    Ok(info) if info.supports("1.1.0") => {}
                    Ok(_) => continue,
                    Err(e) => {
                        report
                            .errors
                            .push(format!("GC {}: {}", net.name, error_chain(&e)));
                        continue;
                    }
                }
                let extra = ("cni.dev/valid-attachments", Value::Array(valid.clone()));
                let stdin = plugin_stdin(net, plugin, None, &Map::new(), Some(extra));
                let mut op = OpReport::default();
                match self.run(net, plugin, &env, &stdin, &mut op).await {
                    Ok(_) => report
                        .gc_calls
                        .push((net.name.clone(), plugin.plugin_type.clone())),
                    Err(e) => report
                        .errors
                        .push(format!("GC {}: {}", net.name, error_chain(&e))),
                }
            }
        }
        report
    }

    /// Best-effort DEL of `plugins` in reverse order after a failed ADD;
    /// removes the pending cache entry when every DEL succeeded.
    async fn rollback(
        &self,
        net: &NetworkConfigList,
        plugins: &[PluginConfig],
        att: &Attachment,
        prev: Option<&Value>,
        report: &mut OpReport,
    ) {
        let env = env(Command::Del, att);
        let mut clean = true;
        for plugin in plugins.iter().rev() {
            let stdin = plugin_stdin(net, plugin, prev, &att.capability_args, None);
            if let Err(e) = self.run(net, plugin, &env, &stdin, report).await {
                clean = false;
                tracing::warn!(network = %net.name, plugin = %plugin.plugin_type, error = %error_chain(&e), "rollback del failed; gc will retry");
            }
        }
        if clean
            && let Err(e) = self
                .cache
                .remove(&net.name, &att.container_id, &att.ifname)
                .await
        {
            tracing::warn!(network = %net.name, error = %error_chain(&e), "cannot remove the pending cache entry");
        }
    }

    /// Runs one plugin, recording the step and the metrics.
    async fn run(
        &self,
        net: &NetworkConfigList,
        plugin: &PluginConfig,
        env: &PluginEnv,
        stdin: &[u8],
        report: &mut OpReport,
    ) -> Result<Vec<u8>, ExecError> {
        let start = Instant::now();
        let r = self.exec.exec(&plugin.plugin_type, env, stdin).await;
        let took = start.elapsed();
        self.metrics.record(
            &net.name,
            &plugin.plugin_type,
            env.command.as_str(),
            r.is_ok(),
            took,
        );
        report.steps.push(Step {
            plugin: plugin.plugin_type.clone(),
            command: env.command,
            took,
            ok: r.is_ok(),
        });
        r
    }

    /// Every plugin of `plugins` must support the network's version.
    async fn check_versions(
        &self,
        net: &NetworkConfigList,
        plugins: &[PluginConfig],
    ) -> Result<(), CniError> {
        for plugin in plugins {
            let info = self
                .plugin_info(net, plugin)
                .await
                .map_err(|source| CniError::Plugin {
                    command: Command::Version,
                    network: net.name.clone(),
                    source: Box::new(source),
                })?;
            if !info.supports(&net.cni_version) {
                return Err(CniError::Unsupported {
                    network: net.name.clone(),
                    plugin: plugin.plugin_type.clone(),
                    version: net.cni_version.clone(),
                    supported: info.range(),
                });
            }
        }
        Ok(())
    }

    /// The plugin's VERSION answer, asked once per binary (path + mtime).
    async fn plugin_info(
        &self,
        net: &NetworkConfigList,
        plugin: &PluginConfig,
    ) -> Result<PluginInfo, ExecError> {
        let ty = &plugin.plugin_type;
        let identity = self.exec.identity(ty)?;
        {
            let v = lock(&self.versions);
            if let Some((id, info)) = v.get(ty)
                && *id == identity
            {
                return Ok(info.clone());
            }
        }
        let env = PluginEnv {
            command: Command::Version,
            container_id: String::new(),
            netns: String::new(),
            ifname: String::new(),
            args: String::new(),
        };
        let stdin = json!({"cniVersion": net.cni_version})
            .to_string()
            .into_bytes();
        let start = Instant::now();
        let out = self.exec.exec(ty, &env, &stdin).await;
        self.metrics
            .record(&net.name, ty, "VERSION", out.is_ok(), start.elapsed());
        let out = out?;
        let info: PluginInfo = serde_json::from_slice(&out).map_err(|_| ExecError::BadOutput {
            plugin: ty.clone(),
            head: super::exec::head(&out),
        })?;
        // Spec: a plugin answering without supportedVersions speaks 0.1.0.
        let info = if info.supported_versions.is_empty() {
            PluginInfo {
                supported_versions: vec!["0.1.0".into()],
                ..info
            }
        } else {
            info
        };
        lock(&self.versions).insert(ty.clone(), (identity, info.clone()));
        Ok(info)
    }
}

fn env(command: Command, att: &Attachment) -> PluginEnv {
    PluginEnv {
        command,
        container_id: att.container_id.clone(),
        netns: att.netns.clone(),
        ifname: att.ifname.clone(),
        args: att.cni_args(),
    }
}

/// One plugin's stdin: its own config, the list's `name` and `cniVersion`,
/// `prevResult` when there is one, `runtimeConfig` holding only the
/// capability args the plugin declares, and an extra key (GC's
/// `cni.dev/valid-attachments`).
fn plugin_stdin(
    net: &NetworkConfigList,
    plugin: &PluginConfig,
    prev: Option<&Value>,
    caps: &Map<String, Value>,
    extra: Option<(&str, Value)>,
) -> Vec<u8> {
    let mut conf = plugin.raw.clone();
    conf.insert("name".into(), Value::String(net.name.clone()));
    conf.insert("cniVersion".into(), Value::String(net.cni_version.clone()));
    conf.remove("prevResult");
    if let Some(prev) = prev {
        conf.insert("prevResult".into(), prev.clone());
    }
    let runtime_config: Map<String, Value> = caps
        .iter()
        .filter(|(k, _)| plugin.has_capability(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    conf.remove("runtimeConfig");
    if !runtime_config.is_empty() {
        conf.insert("runtimeConfig".into(), Value::Object(runtime_config));
    }
    if let Some((k, v)) = extra {
        conf.insert(k.into(), v);
    }
    // A Value's text is its JSON: no error to handle.
    Value::Object(conf).to_string().into_bytes()
}

/// One async mutex per container id with an operation in flight; an entry
/// lives only while someone holds or waits for it, so the map stays as small
/// as the number of concurrent operations.
#[derive(Default)]
struct ContainerLocks {
    map: Arc<Mutex<LockMap>>,
}

/// Container id → (its mutex, how many guards hold or wait for it).
type LockMap = HashMap<String, (Arc<tokio::sync::Mutex<()>>, usize)>;

/// Holds (or waits for) one container's lock; dropping it releases the lock
/// and removes the map entry when it was the last user. The count is kept
/// explicitly, so a waiter cancelled mid-wait cleans up as well.
struct ContainerGuard {
    map: Arc<Mutex<LockMap>>,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl ContainerLocks {
    async fn lock(&self, key: &str) -> ContainerGuard {
        let m = {
            let mut map = lock(&self.map);
            let entry = map.entry(key.to_owned()).or_default();
            entry.1 += 1;
            entry.0.clone()
        };
        let mut g = ContainerGuard {
            map: self.map.clone(),
            key: key.to_owned(),
            guard: None,
        };
        g.guard = Some(m.lock_owned().await);
        g
    }

    /// Whether an operation on `key` is running or waiting.
    fn held(&self, key: &str) -> bool {
        lock(&self.map).contains_key(key)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = lock(&self.map);
        if let Some(entry) = map.get_mut(&self.key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::config::NetworkSet;
    use crate::cni::fake::FakeExec;
    use std::path::PathBuf;

    pub(crate) fn network_v(name: &str, version: &str, plugins: &str) -> NetworkConfigList {
        let s = format!(r#"{{"cniVersion":"{version}","name":"{name}","plugins":{plugins}}}"#);
        crate::cni::config::parse(s.as_bytes(), true, Path::new("test.conflist")).unwrap()
    }

    fn network(plugins: &str) -> NetworkConfigList {
        network_v("testnet", "1.0.0", plugins)
    }

    /// A store whose default is the first network given.
    pub(crate) fn store_of(nets: Vec<NetworkConfigList>) -> Arc<NetworkStore> {
        let mut set = NetworkSet::default();
        for n in nets {
            set.default.get_or_insert(n.name.clone());
            set.networks.insert(n.name.clone(), n);
        }
        Arc::new(NetworkStore::new(set))
    }

    fn runner_with<E: PluginExec>(exec: E, nets: Vec<NetworkConfigList>) -> CniRunner<E> {
        CniRunner::new(
            exec,
            store_of(nets),
            ResultCache::new(tempfile::tempdir().unwrap().keep()),
            Arc::new(CniMetrics::new()),
        )
    }

    fn att(cid: &str) -> Attachment {
        Attachment {
            container_id: cid.into(),
            netns: "/var/run/netns/test".into(),
            ifname: "eth0".into(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAME".into(), "web".into()),
            ],
            capability_args: Map::new(),
        }
    }

    fn ops(fake: &FakeExec) -> Vec<String> {
        fake.op_calls()
            .into_iter()
            .map(|c| format!("{} {}", c.plugin, c.env.command))
            .collect()
    }

    /// The recording shell plugin, installed under several names.
    pub(crate) fn script_plugins(names: &[&str]) -> (tempfile::TempDir, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cni/testdata/record.sh");
        for n in names {
            let p = dir.path().join(n);
            std::fs::copy(&src, &p).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let log = dir.path().join("log");
        (dir, log)
    }

    /// The log of the recording plugin: (name, command, stdin).
    pub(crate) fn read_log(log: &Path) -> Vec<(String, String, Value)> {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.lines()
            .map(|l| {
                let mut parts = l.splitn(3, ' ');
                let name = parts.next().unwrap().to_owned();
                let cmd = parts.next().unwrap().to_owned();
                let stdin: Value = serde_json::from_str(parts.next().unwrap()).unwrap();
                (name, cmd, stdin)
            })
            .collect()
    }

    fn order(calls: &[(String, String, Value)]) -> Vec<String> {
        calls.iter().map(|(n, c, _)| format!("{n} {c}")).collect()
    }

    fn script_runner(
        names: &[&str],
        nets: Vec<NetworkConfigList>,
    ) -> (
        CniRunner<crate::cni::exec::ProcessExec>,
        tempfile::TempDir,
        PathBuf,
    ) {
        let (dir, log) = script_plugins(names);
        let exec =
            crate::cni::exec::ProcessExec::new(vec![dir.path().into()], Duration::from_secs(10));
        let runner = CniRunner::new(
            exec,
            store_of(nets),
            ResultCache::new(dir.path().join("cache")),
            Arc::new(CniMetrics::new()),
        );
        (runner, dir, log)
    }

    /// A `usePodCidr` network: ADD before the node has its pod CIDR fails
    /// with "try again later" and runs nothing; once the node task has
    /// published it, the plugin gets the real range, and the cache keeps
    /// that config for DEL.
    #[tokio::test]
    async fn use_pod_cidr_waits_for_the_node_then_runs_with_its_range() {
        let (runner, dir, log) = script_runner(
            &["one"],
            vec![network(
                r#"[{"type":"one","ipam":{"type":"host-local","ranges":[[{"subnet":"usePodCidr"}]]}}]"#,
            )],
        );
        let cidr = Arc::new(PodCidr::waiting());
        let runner = runner.with_pod_cidr(cidr.clone());
        let err = runner.add("", &att("c1")).await.unwrap_err();
        assert!(matches!(err, CniError::PodCidr(_)), "{err:?}");
        assert_eq!(err.to_plugin_error().code, codes::TRY_AGAIN_LATER);
        assert!(read_log(&log).is_empty(), "no plugin ran");

        cidr.set(vec!["10.244.7.0/24".into()]);
        runner.add("", &att("c1")).await.unwrap();
        let calls = read_log(&log);
        assert_eq!(
            calls[0].2["ipam"]["ranges"][0][0]["subnet"],
            "10.244.7.0/24"
        );
        let cached = runner
            .cache()
            .load("testnet", "c1", "eth0")
            .await
            .unwrap()
            .unwrap();
        let config: Value = serde_json::from_slice(&cached.config).unwrap();
        assert_eq!(
            config["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.7.0/24"
        );
        drop(dir);
    }

    #[tokio::test]
    async fn script_chain_add_check_del() {
        let (runner, _dir, log) = script_runner(
            &["one", "two", "three", "four"],
            vec![network(
                r#"[{"type":"one","keep":{"a":1}},
                {"type":"two","capabilities":{"portMappings":true,"bandwidth":false}},
                {"type":"three","capabilities":{"bandwidth":true,"mac":true}},
                {"type":"four","capabilities":{"ips":true}}]"#,
            )],
        );
        let mut a = att("c1");
        a.capability_args = serde_json::json!({
            "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
            "bandwidth": {"ingressRate": 1000000, "ingressBurst": 4294967295u64},
            "mac": "02:00:00:00:00:01",
            "ips": ["10.9.0.7/24"],
            "other": 1
        })
        .as_object()
        .unwrap()
        .clone();

        let result = runner.add("", &a).await.unwrap();
        assert_eq!(
            result["plugins"],
            serde_json::json!(["one", "two", "three", "four"])
        );
        assert_eq!(result["cniVersion"], "1.0.0");

        let calls = read_log(&log);
        assert_eq!(
            order(&calls),
            ["one ADD", "two ADD", "three ADD", "four ADD"]
        );
        // Every plugin: its own keys, the list's name and version.
        for (_, _, stdin) in &calls {
            assert_eq!(stdin["name"], "testnet");
            assert_eq!(stdin["cniVersion"], "1.0.0");
        }
        assert_eq!(calls[0].2["keep"], serde_json::json!({"a": 1}));
        // prevResult: absent for the first, then the previous result intact.
        assert!(calls[0].2.get("prevResult").is_none());
        assert_eq!(
            calls[1].2["prevResult"]["plugins"],
            serde_json::json!(["one"])
        );
        assert_eq!(
            calls[2].2["prevResult"]["plugins"],
            serde_json::json!(["one", "two"])
        );
        assert_eq!(calls[3].2["prevResult"]["ips"][0]["address"], "10.1.2.3/24");
        // runtimeConfig only with the declared (true) capabilities.
        assert!(calls[0].2.get("runtimeConfig").is_none());
        assert_eq!(
            calls[1].2["runtimeConfig"],
            serde_json::json!({"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]})
        );
        assert_eq!(
            calls[2].2["runtimeConfig"],
            serde_json::json!({"bandwidth": {"ingressRate": 1000000, "ingressBurst": 4294967295u64}, "mac": "02:00:00:00:00:01"})
        );
        assert_eq!(
            calls[3].2["runtimeConfig"],
            serde_json::json!({"ips": ["10.9.0.7/24"]})
        );

        // The cache holds the final result, config and args.
        let cached = runner
            .cache()
            .load("testnet", "c1", "eth0")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(cached.result, result);
        assert_eq!(cached.config, runner.network("").unwrap().bytes);
        assert_eq!(cached.cni_args, a.args);
        assert_eq!(cached.capability_args, a.capability_args);
        assert_eq!(runner.attachments("c1").await, vec![cached]);

        // CHECK without capability args: list order, cached result and args.
        std::fs::remove_file(&log).unwrap();
        let mut d = a.clone();
        d.capability_args = Map::new();
        runner.check("testnet", &d).await.unwrap();
        let calls = read_log(&log);
        assert_eq!(
            order(&calls),
            ["one CHECK", "two CHECK", "three CHECK", "four CHECK"]
        );
        for (_, _, stdin) in &calls {
            assert_eq!(stdin["prevResult"], result);
        }
        assert_eq!(calls[2].2["runtimeConfig"]["mac"], "02:00:00:00:00:01");
        assert!(calls[0].2.get("runtimeConfig").is_none());

        // DEL without capability args: reverse order, cached result and args.
        std::fs::remove_file(&log).unwrap();
        runner.del("", &d).await.unwrap();
        let calls = read_log(&log);
        assert_eq!(
            order(&calls),
            ["four DEL", "three DEL", "two DEL", "one DEL"]
        );
        for (_, _, stdin) in &calls {
            assert_eq!(stdin["prevResult"], result);
        }
        assert_eq!(
            calls[2].2["runtimeConfig"]["portMappings"][0]["hostPort"],
            8080
        );
        assert!(
            runner
                .cache()
                .load("testnet", "c1", "eth0")
                .await
                .unwrap()
                .is_none()
        );
        // CHECK of a deleted attachment: a clear error, no plugin run.
        std::fs::remove_file(&log).unwrap();
        let e = runner.check("", &d).await.unwrap_err();
        assert!(matches!(e, CniError::NotAdded { .. }), "{e}");
        assert!(read_log(&log).is_empty());

        // DEL again: no cache, plugins still called (without prevResult), ok.
        runner.del("", &d).await.unwrap();
        let calls = read_log(&log);
        assert_eq!(calls.len(), 4);
        assert!(
            calls
                .iter()
                .all(|(_, c, s)| c == "DEL" && s.get("prevResult").is_none())
        );
        // Every exec was counted, VERSION included (once per plugin).
        let m = runner.metrics().snapshot();
        let count = |cmd: &str| -> u64 {
            m.iter()
                .filter(|(k, _)| k.command == cmd)
                .map(|(_, v)| v.count)
                .sum()
        };
        assert_eq!(
            (count("ADD"), count("CHECK"), count("DEL"), count("VERSION")),
            (4, 4, 8, 4)
        );
    }

    #[tokio::test]
    async fn add_failure_rolls_back_and_keeps_error() {
        let fake = FakeExec::new();
        fake.fail(
            "two",
            Command::Add,
            PluginError {
                cni_version: "1.0.0".into(),
                code: 102,
                msg: "boom".into(),
                details: "veth exists".into(),
            },
        );
        let runner = runner_with(
            fake,
            vec![network(
                r#"[{"type":"one"},{"type":"two"},{"type":"three"}]"#,
            )],
        );
        let (r, report) = runner.add_report("", &att("c1")).await;
        let pe = r.unwrap_err().to_plugin_error();
        assert_eq!(
            (pe.code, pe.msg.as_str(), pe.details.as_str()),
            (102, "boom", "veth exists")
        );
        assert_eq!(
            ops(&runner.exec),
            ["one ADD", "two ADD", "two DEL", "one DEL"]
        );
        let s = report.summary();
        assert!(
            s.starts_with("ADD one ") && s.contains("ADD two ") && s.contains("(failed)"),
            "{s}"
        );
        assert!(s.ends_with("on testnet/eth0"), "{s}");
        // Rollback DEL got the last good result.
        let dels = runner.exec.op_calls();
        assert_eq!(
            dels[2].stdin["prevResult"]["plugins"],
            serde_json::json!(["one"])
        );
        // A clean rollback removes the write-ahead entry.
        assert!(runner.cache().list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn failed_rollback_leaves_pending_entry_for_gc() {
        let fake = FakeExec::new();
        let err = PluginError {
            cni_version: String::new(),
            code: 11,
            msg: "busy".into(),
            details: String::new(),
        };
        fake.fail("two", Command::Add, err.clone());
        fake.fail("one", Command::Del, err);
        let runner = runner_with(fake, vec![network(r#"[{"type":"one"},{"type":"two"}]"#)])
            .with_gc_grace(Duration::ZERO);
        runner.add("", &att("c1")).await.unwrap_err();
        let left = runner.cache().list().await.unwrap();
        assert_eq!(left.len(), 1);
        assert!(left[0].result.is_null(), "pending entry");
        // The container is gone; GC retries the DEL (failing again first).
        let report = runner.gc(&HashSet::new()).await;
        assert!(report.deleted.is_empty());
        assert!(
            report.errors[0].contains("DEL testnet/c1/eth0"),
            "{report:?}"
        );
        runner.exec.clear_failures();
        let report = runner.gc(&HashSet::new()).await;
        assert_eq!(
            report.deleted,
            [("testnet".into(), "c1".into(), "eth0".into())]
        );
        assert!(runner.cache().list().await.unwrap().is_empty());
        // The DEL of a pending entry has no prevResult.
        let last = runner.exec.op_calls().pop().unwrap();
        assert_eq!(format!("{} {}", last.plugin, last.env.command), "one DEL");
        assert!(last.stdin.get("prevResult").is_none());
    }

    #[tokio::test]
    async fn write_ahead_entry_exists_while_plugins_run() {
        let (runner, dir, _log) = script_runner(
            &["one"],
            vec![network(r#"[{"type":"one"},{"type":"peek"}]"#)],
        );
        // `peek` copies the cache entry as it is while it runs.
        let cache_file = dir.path().join("cache/results/testnet-c1-eth0");
        let seen = dir.path().join("seen");
        let peek = dir.path().join("peek");
        std::fs::write(
            &peek,
            format!(
                "#!/bin/sh\ncat >/dev/null\n[ \"$CNI_COMMAND\" = VERSION ] && {{ echo '{{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"1.0.0\"]}}'; exit 0; }}\ncp {} {}\necho '{{\"cniVersion\":\"1.0.0\"}}'\n",
                cache_file.display(),
                seen.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&peek, std::fs::Permissions::from_mode(0o755)).unwrap();
        runner.add("", &att("c1")).await.unwrap();
        let during: Value = serde_json::from_slice(&std::fs::read(&seen).unwrap()).unwrap();
        assert_eq!(during["networkName"], "testnet");
        assert!(during.get("result").is_none(), "{during}");
        assert!(during["config"].is_string());
        let after = runner
            .cache()
            .load("testnet", "c1", "eth0")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(after.result["cniVersion"], "1.0.0");
    }

    #[tokio::test]
    async fn del_failure_stops_and_keeps_cache() {
        let runner = runner_with(
            FakeExec::new(),
            vec![network(r#"[{"type":"one"},{"type":"two"}]"#)],
        );
        runner.add("", &att("c1")).await.unwrap();
        runner.exec.fail(
            "two",
            Command::Del,
            PluginError {
                cni_version: String::new(),
                code: 5,
                msg: "busy".into(),
                details: String::new(),
            },
        );
        runner.del("", &att("c1")).await.unwrap_err();
        assert_eq!(ops(&runner.exec), ["one ADD", "two ADD", "two DEL"]);
        assert!(
            runner
                .cache()
                .load("testnet", "c1", "eth0")
                .await
                .unwrap()
                .is_some()
        );
        runner.exec.clear_failures();
        runner.del("testnet", &att("c1")).await.unwrap();
        assert!(runner.cache().list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn del_without_cache_uses_runtime_prev_result_converted() {
        let runner = runner_with(
            FakeExec::new(),
            vec![network_v(
                "old",
                "0.4.0",
                r#"[{"type":"one"},{"type":"two"}]"#,
            )],
        );
        let theirs = serde_json::json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "interface": 0}]});
        let (r, _) = runner.del_report("", &att("c1"), Some(&theirs)).await;
        r.unwrap();
        let calls = runner.exec.op_calls();
        assert_eq!(calls.len(), 2);
        let want = serde_json::json!({"cniVersion": "0.4.0", "ips": [{"address": "10.0.0.2/24", "interface": 0, "version": "4"}]});
        assert!(calls.iter().all(|c| c.stdin["prevResult"] == want));
        // Our own cache wins over the runtime's copy.
        let ours = runner.add("", &att("c2")).await.unwrap();
        runner
            .del_report("", &att("c2"), Some(&theirs))
            .await
            .0
            .unwrap();
        assert_eq!(runner.exec.op_calls()[5].stdin["prevResult"], ours);
    }

    #[tokio::test]
    async fn del_and_check_use_the_config_cached_at_add() {
        let fake = FakeExec::new();
        let runner = runner_with(fake, vec![network(r#"[{"type":"one"},{"type":"two"}]"#)]);
        runner.add("", &att("c1")).await.unwrap();
        // The config changes: new pods get the new chain, c1 keeps its own.
        let mut set = NetworkSet::default();
        let new = network(r#"[{"type":"one"},{"type":"three"}]"#);
        set.default = Some(new.name.clone());
        set.networks.insert(new.name.clone(), new);
        assert!(runner.store().replace(set));
        runner.add("", &att("c2")).await.unwrap();
        runner.check("", &att("c1")).await.unwrap();
        runner.del("", &att("c1")).await.unwrap();
        assert_eq!(
            ops(&runner.exec),
            [
                "one ADD",
                "two ADD",
                "one ADD",
                "three ADD",
                "one CHECK",
                "two CHECK",
                "two DEL",
                "one DEL"
            ]
        );
        // The network vanishes from the dir: DEL still works from the cache.
        assert!(runner.store().replace(NetworkSet::default()));
        runner.del("testnet", &att("c2")).await.unwrap();
        assert!(runner.cache().list().await.unwrap().is_empty());
        // Unknown network, nothing cached: a clear error.
        let e = runner.del("testnet", &att("c3")).await.unwrap_err();
        assert!(
            e.to_string().contains("no CNI network named \"testnet\""),
            "{e}"
        );
        let e = runner.add("", &att("c3")).await.unwrap_err();
        assert!(matches!(e, CniError::NoDefaultNetwork), "{e}");
    }

    #[tokio::test]
    async fn check_only_where_the_spec_allows_it() {
        let fake = FakeExec::new();
        let runner = runner_with(
            fake,
            vec![
                network_v("v031", "0.3.1", r#"[{"type":"one"}]"#),
                crate::cni::config::parse(
                    br#"{"cniVersion":"1.0.0","name":"nocheck","disableCheck":true,"plugins":[{"type":"one"}]}"#,
                    true,
                    Path::new("x.conflist"),
                )
                .unwrap(),
                network_v("v04", "0.4.0", r#"[{"type":"one"}]"#),
            ],
        );
        for net in ["v031", "nocheck", "v04"] {
            runner.add(net, &att("c1")).await.unwrap();
        }
        let e = runner.check("v031", &att("c1")).await.unwrap_err();
        assert!(e.to_string().contains("predates CHECK"), "{e}");
        let e = runner.check("nocheck", &att("c1")).await.unwrap_err();
        assert!(e.to_string().contains("disableCheck"), "{e}");
        runner.check("v04", &att("c1")).await.unwrap();
        assert_eq!(
            ops(&runner.exec)
                .iter()
                .filter(|c| c.ends_with("CHECK"))
                .count(),
            1
        );
        // A failing CHECK keeps the plugin's error.
        runner.exec.fail(
            "one",
            Command::Check,
            PluginError {
                cni_version: "0.4.0".into(),
                code: 999,
                msg: "eth0 has no address".into(),
                details: String::new(),
            },
        );
        let e = runner.check("v04", &att("c1")).await.unwrap_err();
        assert_eq!(e.to_plugin_error().code, 999);
    }

    #[tokio::test]
    async fn versions_are_asked_once_and_enforced() {
        let fake = FakeExec::new();
        fake.set_versions(
            "old",
            &["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"],
        );
        let runner = runner_with(
            fake,
            vec![
                network_v("new", "1.1.0", r#"[{"type":"one"},{"type":"old"}]"#),
                network_v("mid", "1.0.0", r#"[{"type":"one"},{"type":"old"}]"#),
            ],
        );
        let e = runner.add("new", &att("c1")).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "plugin old does not support cniVersion 1.1.0 (supports 0.1.0…1.0.0)"
        );
        assert_eq!(e.to_plugin_error().code, codes::INCOMPATIBLE_VERSION);
        assert!(ops(&runner.exec).is_empty(), "nothing ran");
        assert!(runner.cache().list().await.unwrap().is_empty());
        runner.add("mid", &att("c1")).await.unwrap();
        runner.add("mid", &att("c2")).await.unwrap();
        let versions = runner
            .exec
            .calls()
            .iter()
            .filter(|c| c.env.command == Command::Version)
            .count();
        assert_eq!(versions, 2, "one VERSION per plugin binary");
        // STATUS reports the same mismatch.
        let e = runner.status("new").await.unwrap_err();
        assert!(e.to_string().contains("does not support cniVersion 1.1.0"));
    }

    #[tokio::test]
    async fn status_sends_the_verb_only_at_1_1_0() {
        let fake = FakeExec::new();
        let runner = runner_with(
            fake,
            vec![
                network_v("new", "1.1.0", r#"[{"type":"one"},{"type":"two"}]"#),
                network_v("mid", "1.0.0", r#"[{"type":"one"}]"#),
            ],
        );
        runner.status("").await.unwrap();
        runner.status("mid").await.unwrap();
        assert_eq!(ops(&runner.exec), ["one STATUS", "two STATUS"]);
        let c = &runner.exec.op_calls()[0];
        assert_eq!(c.stdin["name"], "new");
        assert_eq!(c.stdin["cniVersion"], "1.1.0");
        runner.exec.fail(
            "two",
            Command::Status,
            PluginError {
                cni_version: "1.1.0".into(),
                code: 50,
                msg: "plugin not available".into(),
                details: "no uplink".into(),
            },
        );
        let e = runner.status("new").await.unwrap_err();
        assert_eq!(e.to_plugin_error().code, 50);
        assert!(matches!(
            runner.status("nope").await,
            Err(CniError::UnknownNetwork { .. })
        ));
    }

    #[tokio::test]
    async fn gc_deletes_stale_and_sends_valid_attachments() {
        let fake = FakeExec::new();
        fake.set_versions("legacy", &["1.0.0", "1.1.0"]);
        let runner = runner_with(
            fake,
            vec![
                network_v("new", "1.1.0", r#"[{"type":"one"},{"type":"legacy"}]"#),
                network_v("mid", "1.0.0", r#"[{"type":"one"}]"#),
            ],
        );
        for cid in ["live1", "dead1"] {
            runner.add("new", &att(cid)).await.unwrap();
            let mut a = att(cid);
            a.ifname = "net1".into();
            runner.add("mid", &a).await.unwrap();
        }
        let live: HashSet<String> = ["live1".to_string()].into();
        // Fresh entries are within the grace period: deferred, not deleted.
        let report = runner.gc(&live).await;
        assert!(report.deleted.is_empty());
        assert_eq!(report.deferred.len(), 2);
        let runner = runner.with_gc_grace(Duration::ZERO);
        // Another process (a plugin running DEL without the agent) holds
        // dead1: left to it, nothing runs.
        let before = runner.exec.op_calls().len();
        let other = ResultCache::new(runner.cache().dir());
        let held = other.lock("dead1").await.unwrap();
        let report = runner.gc(&live).await;
        assert!(report.deleted.is_empty(), "{report:?}");
        assert_eq!(report.deferred.len(), 2);
        assert!(report.errors.is_empty(), "{report:?}");
        assert_eq!(
            runner.exec.op_calls().len() - before,
            2,
            "only the GC verbs ran"
        );
        drop(held);
        // Processes killed while holding locks left their files.
        let locks = runner.cache().dir().join("locks");
        for cid in ["live1", "gone1"] {
            std::fs::write(locks.join(cid), "").unwrap();
        }
        let before = runner.exec.op_calls().len();
        let report = runner.gc(&live).await;
        assert!(report.errors.is_empty(), "{report:?}");
        let left: Vec<_> = std::fs::read_dir(&locks)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(left.is_empty(), "idle lock files removed: {left:?}");
        assert_eq!(
            report.deleted,
            [
                ("mid".into(), "dead1".into(), "net1".into()),
                ("new".into(), "dead1".into(), "eth0".into())
            ]
        );
        assert_eq!(
            report.gc_calls,
            [
                ("new".into(), "one".into()),
                ("new".into(), "legacy".into())
            ]
        );
        let calls: Vec<_> = runner.exec.op_calls().split_off(before);
        let names: Vec<_> = calls
            .iter()
            .map(|c| format!("{} {} {}", c.plugin, c.env.command, c.env.container_id))
            .collect();
        assert_eq!(
            names,
            [
                "one DEL dead1",
                "legacy DEL dead1",
                "one DEL dead1",
                "one GC ",
                "legacy GC "
            ]
        );
        for c in &calls[3..] {
            assert_eq!(
                c.stdin["cni.dev/valid-attachments"],
                serde_json::json!([{"containerID": "live1", "ifname": "eth0"}])
            );
            assert_eq!(c.stdin["cniVersion"], "1.1.0");
        }
        assert_eq!(runner.attachments("live1").await.len(), 2);
        assert!(runner.attachments("dead1").await.is_empty());
    }

    #[tokio::test]
    async fn invalid_attachment_runs_nothing() {
        let runner = runner_with(FakeExec::new(), vec![network(r#"[{"type":"one"}]"#)]);
        for (cid, ifname) in [
            ("../x", "eth0"),
            ("", "eth0"),
            ("c1", "a/b"),
            ("c1", ""),
            ("c1", "0123456789abcdef"),
        ] {
            let mut a = att(cid);
            a.ifname = ifname.into();
            let err = runner.add("", &a).await.unwrap_err();
            assert_eq!(
                err.to_plugin_error().code,
                codes::INVALID_ENV,
                "{cid} {ifname}"
            );
            runner.del("", &a).await.unwrap_err();
            runner.check("", &a).await.unwrap_err();
        }
        assert!(runner.exec.calls().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn same_container_serialised_others_parallel() {
        let fake = FakeExec::new();
        fake.set_delay(Duration::from_secs(1));
        let runner = Arc::new(runner_with(fake, vec![network(r#"[{"type":"one"}]"#)]));
        let start = tokio::time::Instant::now();
        let run = |cid: &'static str| {
            let r = runner.clone();
            tokio::spawn(async move { r.add("", &att(cid)).await.unwrap() })
        };
        let (a, b, c) = (run("c1"), run("c1"), run("c2"));
        let _ = tokio::join!(a, b, c);
        // VERSION (1 s, once: the second c1 waits for the lock, c2 asks
        // its own), then c1 twice in a row (2 s), c2 alongside.
        assert!(
            start.elapsed() <= Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
        let c1: Vec<_> = runner
            .exec
            .op_calls()
            .into_iter()
            .filter(|c| c.env.container_id == "c1")
            .collect();
        assert_eq!(c1.len(), 2);
        assert!(c1[1].at >= c1[0].at + Duration::from_secs(1));
        assert_eq!(runner.locks.len(), 0, "lock map must not grow");
    }

    #[tokio::test]
    async fn cancelled_waiter_does_not_leak_lock_entry() {
        let locks = ContainerLocks::default();
        let g = locks.lock("c").await;
        assert!(locks.held("c"));
        let waiter = locks.lock("c");
        assert!(
            tokio::time::timeout(Duration::from_millis(10), waiter)
                .await
                .is_err()
        );
        assert_eq!(locks.len(), 1);
        drop(g);
        assert_eq!(locks.len(), 0);
        assert!(!locks.held("c"));
        // A waiter cancelled after the holder left cleans up too.
        let g = locks.lock("c").await;
        let mut waiter = Box::pin(locks.lock("c"));
        assert!(futures::poll!(waiter.as_mut()).is_pending());
        drop(g);
        drop(waiter);
        assert_eq!(locks.len(), 0);
    }
}
