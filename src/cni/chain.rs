//! The chain runner: ADD and DEL of one attachment over the network's plugin
//! list, as the CNI spec asks a runtime to do it — list order for ADD with
//! each result passed on as `prevResult`, reverse order for DEL with the
//! cached ADD result, `name`/`cniVersion` of the list in every plugin's
//! config, and `runtimeConfig` only for declared capabilities.
//!
//! Operations on one container id are serialised (the spec forbids parallel
//! operations on a container; the agent gets them from several runtimes'
//! plugin processes), different containers run in parallel.
//!
//! Side effects: runs plugins through `PluginExec`, writes and removes the
//! result cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

use super::cache::{CACHE_KIND, CacheError, CachedAttachment, ResultCache};
use super::config::{NetworkConfigList, PluginConfig, is_identifier};
use super::exec::{Command, ExecError, PluginEnv, PluginError, PluginExec, codes, parse_result};

/// One interface of one container on the network: what the runtime passes
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
    /// Capability arguments (e.g. `portMappings`), passed in `runtimeConfig`
    /// to the plugins that declare the capability.
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
        let i = &self.ifname;
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
}

/// Why an ADD or DEL of an attachment failed.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The runtime's parameters break the spec's rules.
    #[error("{0}")]
    InvalidAttachment(String),
    /// A plugin failed (for ADD, after the rollback DEL ran).
    #[error("{command} {network}")]
    Plugin {
        command: Command,
        network: String,
        #[source]
        source: ExecError,
    },
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
            CniError::Plugin { source, .. } => return source.to_plugin_error(),
            CniError::Cache { .. } => codes::IO_FAILURE,
        };
        PluginError {
            cni_version: String::new(),
            code,
            msg: error_chain(self),
            details: String::new(),
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

/// Runs the network's chain. Generic over the executor so tests can use
/// script plugins or the scripted fake.
pub struct CniRunner<E: PluginExec> {
    exec: E,
    network: NetworkConfigList,
    cache: ResultCache,
    locks: ContainerLocks,
}

impl<E: PluginExec> CniRunner<E> {
    pub fn new(exec: E, network: NetworkConfigList, cache: ResultCache) -> Self {
        Self {
            exec,
            network,
            cache,
            locks: ContainerLocks::default(),
        }
    }

    /// The network this runner serves.
    pub fn network(&self) -> &NetworkConfigList {
        &self.network
    }

    /// The result cache (for GC, later).
    pub fn cache(&self) -> &ResultCache {
        &self.cache
    }

    /// Adds the attachment: every plugin in list order, each getting the
    /// previous one's result. On success the final result is cached and
    /// returned. On failure the plugins run so far get a best-effort DEL in
    /// reverse order (the failing one included: it may have done half its
    /// work) and the ADD error is returned.
    pub async fn add(&self, att: &Attachment) -> Result<Value, CniError> {
        att.validate().map_err(CniError::InvalidAttachment)?;
        let _guard = self.locks.lock(&att.container_id).await;
        let net = &self.network;
        let env = self.env(Command::Add, att);
        let mut prev: Option<Value> = None;
        for (i, plugin) in net.plugins.iter().enumerate() {
            let step = async {
                let stdin = self.plugin_stdin(plugin, prev.as_ref(), &att.capability_args);
                let out = self.exec.exec(&plugin.plugin_type, &env, &stdin).await?;
                parse_result(&plugin.plugin_type, &out)
            };
            match step.await {
                Ok(result) => prev = Some(result),
                Err(source) => {
                    tracing::warn!(
                        network = %net.name,
                        plugin = %plugin.plugin_type,
                        error = %error_chain(&source),
                        "add failed, rolling back"
                    );
                    self.rollback(&net.plugins[..=i], att, prev.as_ref()).await;
                    return Err(CniError::Plugin {
                        command: Command::Add,
                        network: net.name.clone(),
                        source,
                    });
                }
            }
        }
        let result = prev.expect("a validated list has at least one plugin");
        let entry = CachedAttachment {
            kind: CACHE_KIND.into(),
            container_id: att.container_id.clone(),
            config: net.bytes.clone(),
            if_name: att.ifname.clone(),
            network_name: net.name.clone(),
            netns: att.netns.clone(),
            cni_args: att.args.clone(),
            capability_args: att.capability_args.clone(),
            result: result.clone(),
        };
        if let Err(source) = self.cache.save(&entry).await {
            // Without the cache a later DEL would lack prevResult: undo now
            // rather than leave an attachment we can't describe.
            self.rollback(&net.plugins, att, Some(&result)).await;
            return Err(CniError::Cache {
                network: net.name.clone(),
                source,
            });
        }
        Ok(result)
    }

    /// Deletes the attachment: every plugin in reverse order, each getting
    /// the cached ADD result as `prevResult`. Idempotent: without a cache
    /// entry the plugins still run (they clean up what they can) and the
    /// cache entry is removed only once all of them succeeded, so a failed
    /// DEL can be retried with the same `prevResult`.
    pub async fn del(&self, att: &Attachment) -> Result<(), CniError> {
        self.del_with_fallback(att, None).await
    }

    /// DEL, with `fallback` as `prevResult` when the agent has no cache entry
    /// (the runtime's own copy of our result, after a lost cache).
    pub async fn del_with_fallback(
        &self,
        att: &Attachment,
        fallback: Option<&Value>,
    ) -> Result<(), CniError> {
        att.validate().map_err(CniError::InvalidAttachment)?;
        let _guard = self.locks.lock(&att.container_id).await;
        let net = &self.network;
        let cached = match self
            .cache
            .load(&net.name, &att.container_id, &att.ifname)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                // A corrupt entry must not make the attachment undeletable.
                tracing::warn!(network = %net.name, container_id = %att.container_id, error = %error_chain(&e), "ignoring unreadable result cache");
                None
            }
        };
        let prev = cached.as_ref().map(|c| &c.result).or(fallback);
        // The runtime may not repeat capability args on DEL; portmap needs
        // them to remove its rules.
        let caps = match &cached {
            Some(c) if att.capability_args.is_empty() => &c.capability_args,
            _ => &att.capability_args,
        };
        let env = self.env(Command::Del, att);
        for plugin in net.plugins.iter().rev() {
            let stdin = self.plugin_stdin(plugin, prev, caps);
            if let Err(source) = self.exec.exec(&plugin.plugin_type, &env, &stdin).await {
                // Spec: stop the list at the first error.
                return Err(CniError::Plugin {
                    command: Command::Del,
                    network: net.name.clone(),
                    source,
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

    /// Best-effort DEL of `plugins` in reverse order after a failed ADD.
    async fn rollback(&self, plugins: &[PluginConfig], att: &Attachment, prev: Option<&Value>) {
        let env = self.env(Command::Del, att);
        for plugin in plugins.iter().rev() {
            let stdin = self.plugin_stdin(plugin, prev, &att.capability_args);
            if let Err(e) = self.exec.exec(&plugin.plugin_type, &env, &stdin).await {
                tracing::warn!(
                    network = %self.network.name,
                    plugin = %plugin.plugin_type,
                    error = %error_chain(&e),
                    "rollback del failed"
                );
            }
        }
    }

    fn env(&self, command: Command, att: &Attachment) -> PluginEnv {
        PluginEnv {
            command,
            container_id: att.container_id.clone(),
            netns: att.netns.clone(),
            ifname: att.ifname.clone(),
            args: att.cni_args(),
        }
    }

    /// One plugin's stdin: its own config, the list's `name` and
    /// `cniVersion`, `prevResult` when there is one, and `runtimeConfig`
    /// holding only the capability args the plugin declares.
    fn plugin_stdin(
        &self,
        plugin: &PluginConfig,
        prev: Option<&Value>,
        caps: &Map<String, Value>,
    ) -> Vec<u8> {
        let mut conf = plugin.raw.clone();
        conf.insert("name".into(), Value::String(self.network.name.clone()));
        conf.insert(
            "cniVersion".into(),
            Value::String(self.network.cni_version.clone()),
        );
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
        serde_json::to_vec(&conf).expect("a JSON map serialises")
    }
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
            let mut map = self.map.lock().expect("lock map is never poisoned");
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

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.map.lock().expect("lock map is never poisoned");
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
    use crate::cni::fake::FakeExec;
    use std::path::Path;
    use std::time::Duration;

    fn network(plugins: &str) -> NetworkConfigList {
        let s = format!(r#"{{"cniVersion":"1.0.0","name":"testnet","plugins":{plugins}}}"#);
        crate::cni::config::parse(s.as_bytes(), true, Path::new("test.conflist")).unwrap()
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

    /// The recording shell plugin, installed under several names.
    fn script_plugins(names: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
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
    fn read_log(log: &Path) -> Vec<(String, String, Value)> {
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

    fn script_runner(
        names: &[&str],
        plugins: &str,
    ) -> (
        CniRunner<crate::cni::exec::ProcessExec>,
        tempfile::TempDir,
        std::path::PathBuf,
    ) {
        let (dir, log) = script_plugins(names);
        let exec =
            crate::cni::exec::ProcessExec::new(vec![dir.path().into()], Duration::from_secs(10));
        let cache = ResultCache::new(dir.path().join("cache"));
        (CniRunner::new(exec, network(plugins), cache), dir, log)
    }

    #[tokio::test]
    async fn script_chain_add_then_del() {
        let (runner, _dir, log) = script_runner(
            &["one", "two", "three"],
            r#"[{"type":"one","keep":{"a":1}},
                {"type":"two","capabilities":{"portMappings":true,"bandwidth":false}},
                {"type":"three","capabilities":{"bandwidth":true}}]"#,
        );
        let mut a = att("c1");
        a.capability_args = serde_json::json!({"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}],"other":1})
            .as_object()
            .unwrap()
            .clone();

        let result = runner.add(&a).await.unwrap();
        assert_eq!(
            result["plugins"],
            serde_json::json!(["one", "two", "three"])
        );
        assert_eq!(result["cniVersion"], "1.0.0");

        let calls = read_log(&log);
        let order: Vec<_> = calls.iter().map(|(n, c, _)| format!("{n} {c}")).collect();
        assert_eq!(order, ["one ADD", "two ADD", "three ADD"]);
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
        assert_eq!(calls[2].2["prevResult"]["ips"][0]["address"], "10.1.2.3/24");
        // runtimeConfig only with the declared (true) capabilities.
        assert!(calls[0].2.get("runtimeConfig").is_none());
        assert_eq!(
            calls[1].2["runtimeConfig"],
            serde_json::json!({"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]})
        );
        assert!(calls[2].2.get("runtimeConfig").is_none());

        // The cache holds the final result, config and args.
        let cached = runner
            .cache()
            .load("testnet", "c1", "eth0")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(cached.result, result);
        assert_eq!(cached.config, runner.network().bytes);
        assert_eq!(cached.cni_args, a.args);
        assert_eq!(cached.capability_args, a.capability_args);

        // DEL without capability args: reverse order, cached result and args.
        std::fs::remove_file(&log).unwrap();
        let mut d = a.clone();
        d.capability_args = Map::new();
        runner.del(&d).await.unwrap();
        let calls = read_log(&log);
        let order: Vec<_> = calls.iter().map(|(n, c, _)| format!("{n} {c}")).collect();
        assert_eq!(order, ["three DEL", "two DEL", "one DEL"]);
        for (_, _, stdin) in &calls {
            assert_eq!(stdin["prevResult"], result);
        }
        assert_eq!(
            calls[1].2["runtimeConfig"]["portMappings"][0]["hostPort"],
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

        // DEL again: no cache, plugins still called (without prevResult), ok.
        std::fs::remove_file(&log).unwrap();
        runner.del(&d).await.unwrap();
        let calls = read_log(&log);
        assert_eq!(calls.len(), 3);
        assert!(
            calls
                .iter()
                .all(|(_, c, s)| c == "DEL" && s.get("prevResult").is_none())
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
        let runner = CniRunner::new(
            fake,
            network(r#"[{"type":"one"},{"type":"two"},{"type":"three"}]"#),
            ResultCache::new(tempfile::tempdir().unwrap().keep()),
        );
        let err = runner.add(&att("c1")).await.unwrap_err();
        let pe = err.to_plugin_error();
        assert_eq!(
            (pe.code, pe.msg.as_str(), pe.details.as_str()),
            (102, "boom", "veth exists")
        );
        let calls: Vec<_> = runner
            .exec
            .calls()
            .into_iter()
            .map(|c| format!("{} {}", c.plugin, c.env.command))
            .collect();
        assert_eq!(calls, ["one ADD", "two ADD", "two DEL", "one DEL"]);
        // Rollback DEL got the last good result.
        let dels = runner.exec.calls();
        assert_eq!(
            dels[2].stdin["prevResult"]["plugins"],
            serde_json::json!(["one"])
        );
        assert!(
            runner
                .cache()
                .load("testnet", "c1", "eth0")
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn del_failure_stops_and_keeps_cache() {
        let fake = FakeExec::new();
        let runner = CniRunner::new(
            fake,
            network(r#"[{"type":"one"},{"type":"two"}]"#),
            ResultCache::new(tempfile::tempdir().unwrap().keep()),
        );
        runner.add(&att("c1")).await.unwrap();
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
        runner.del(&att("c1")).await.unwrap_err();
        let calls: Vec<_> = runner
            .exec
            .calls()
            .into_iter()
            .map(|c| format!("{} {}", c.plugin, c.env.command))
            .collect();
        assert_eq!(calls, ["one ADD", "two ADD", "two DEL"]);
        assert!(
            runner
                .cache()
                .load("testnet", "c1", "eth0")
                .await
                .unwrap()
                .is_some()
        );
        runner.exec.clear_failures();
        runner.del(&att("c1")).await.unwrap();
        assert!(
            runner
                .cache()
                .load("testnet", "c1", "eth0")
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn del_without_cache_uses_runtime_prev_result() {
        let runner = CniRunner::new(
            FakeExec::new(),
            network(r#"[{"type":"one"},{"type":"two"}]"#),
            ResultCache::new(tempfile::tempdir().unwrap().keep()),
        );
        let theirs = serde_json::json!({"cniVersion": "1.0.0", "plugins": ["from-runtime"]});
        runner
            .del_with_fallback(&att("c1"), Some(&theirs))
            .await
            .unwrap();
        let calls = runner.exec.calls();
        assert_eq!(calls.len(), 2);
        assert!(calls.iter().all(|c| c.stdin["prevResult"] == theirs));
        // Our own cache wins over the runtime's copy.
        let ours = runner.add(&att("c2")).await.unwrap();
        runner
            .del_with_fallback(&att("c2"), Some(&theirs))
            .await
            .unwrap();
        assert_eq!(runner.exec.calls()[5].stdin["prevResult"], ours);
    }

    #[tokio::test]
    async fn invalid_attachment_runs_nothing() {
        let runner = CniRunner::new(
            FakeExec::new(),
            network(r#"[{"type":"one"}]"#),
            ResultCache::new(tempfile::tempdir().unwrap().keep()),
        );
        for (cid, ifname) in [
            ("../x", "eth0"),
            ("", "eth0"),
            ("c1", "a/b"),
            ("c1", ""),
            ("c1", "0123456789abcdef"),
        ] {
            let mut a = att(cid);
            a.ifname = ifname.into();
            let err = runner.add(&a).await.unwrap_err();
            assert_eq!(
                err.to_plugin_error().code,
                codes::INVALID_ENV,
                "{cid} {ifname}"
            );
            runner.del(&a).await.unwrap_err();
        }
        assert!(runner.exec.calls().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn same_container_serialised_others_parallel() {
        let fake = FakeExec::new();
        fake.set_delay(Duration::from_secs(1));
        let runner = Arc::new(CniRunner::new(
            fake,
            network(r#"[{"type":"one"}]"#),
            ResultCache::new(tempfile::tempdir().unwrap().keep()),
        ));
        let start = tokio::time::Instant::now();
        let run = |cid: &'static str| {
            let r = runner.clone();
            tokio::spawn(async move { r.add(&att(cid)).await.unwrap() })
        };
        let (a, b, c) = (run("c1"), run("c1"), run("c2"));
        let _ = tokio::join!(a, b, c);
        // c1 twice in a row (2 s), c2 alongside.
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        let c1: Vec<_> = runner
            .exec
            .calls()
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
        let waiter = locks.lock("c");
        assert!(
            tokio::time::timeout(Duration::from_millis(10), waiter)
                .await
                .is_err()
        );
        assert_eq!(locks.len(), 1);
        drop(g);
        assert_eq!(locks.len(), 0);
        // A waiter cancelled after the holder left cleans up too.
        let g = locks.lock("c").await;
        let mut waiter = Box::pin(locks.lock("c"));
        assert!(futures::poll!(waiter.as_mut()).is_pending());
        drop(g);
        drop(waiter);
        assert_eq!(locks.len(), 0);
    }

    /// Removes what the real-plugin test creates, even when it panics: the
    /// plugins' own DEL (IPAM lease, iptables rules), the netns, the bridge.
    struct NetGuard {
        ns: String,
        bridge: String,
        del_stdins: Vec<(String, Vec<u8>)>,
        container_id: String,
    }

    impl Drop for NetGuard {
        fn drop(&mut self) {
            use std::io::Write;
            use std::process::{Command as Proc, Stdio};
            for (plugin, stdin) in self.del_stdins.iter().rev() {
                let child = Proc::new(format!("/usr/lib/cni/{plugin}"))
                    .env("CNI_COMMAND", "DEL")
                    .env("CNI_CONTAINERID", &self.container_id)
                    .env("CNI_NETNS", format!("/var/run/netns/{}", self.ns))
                    .env("CNI_IFNAME", "eth0")
                    .env("CNI_PATH", "/usr/lib/cni")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn();
                if let Ok(mut child) = child {
                    let _ = child.stdin.take().unwrap().write_all(stdin);
                    let _ = child.wait();
                }
            }
            let _ = Proc::new("ip").args(["netns", "del", &self.ns]).status();
            let _ = Proc::new("ip").args(["link", "del", &self.bridge]).status();
        }
    }

    fn sh(args: &[&str]) -> (bool, String) {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// bridge + host-local + portmap from /usr/lib/cni in a netns of the
    /// test's own. Needs root and the Debian plugins: fails without them.
    #[tokio::test]
    async fn real_plugins_in_a_netns() {
        use std::hash::{BuildHasher, RandomState};
        let r = RandomState::new().hash_one(std::process::id());
        let id = format!("{:08x}", r as u32);
        let ns = format!("minilet-test-{id}");
        let bridge = format!("mlt{id}");
        let (o2, o3) = (200 + (r >> 32) % 50, (r >> 40) % 256);
        let subnet_prefix = format!("10.{o2}.{o3}.");
        let host_port = 20000 + (r >> 48) % 20000;
        let data = tempfile::tempdir().unwrap();
        let net_name = format!("mlt-{id}");
        let plugins = serde_json::json!([
            {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": true, "hairpinMode": true,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("{subnet_prefix}0/24")}]],
                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": data.path()}},
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
        ]);
        let list = format!(r#"{{"cniVersion":"1.0.0","name":"{net_name}","plugins":{plugins}}}"#);
        let net =
            crate::cni::config::parse(list.as_bytes(), true, Path::new("real.conflist")).unwrap();
        let container_id = format!("minilet-test-{id}");
        let caps = serde_json::json!({"portMappings": [{"hostPort": host_port, "containerPort": 80, "protocol": "tcp"}]});
        let _guard = NetGuard {
            ns: ns.clone(),
            bridge: bridge.clone(),
            container_id: container_id.clone(),
            del_stdins: net
                .plugins
                .iter()
                .map(|p| {
                    let mut c = p.raw.clone();
                    c.insert("name".into(), net_name.clone().into());
                    c.insert("cniVersion".into(), "1.0.0".into());
                    c.insert("runtimeConfig".into(), caps.clone());
                    (p.plugin_type.clone(), serde_json::to_vec(&c).unwrap())
                })
                .collect(),
        };
        let (ok, out) = sh(&["ip", "netns", "add", &ns]);
        assert!(ok, "ip netns add (needs root): {out}");

        let cache_dir = tempfile::tempdir().unwrap();
        let runner = CniRunner::new(
            crate::cni::exec::ProcessExec::new(
                vec!["/usr/lib/cni".into()],
                Duration::from_secs(30),
            ),
            net,
            ResultCache::new(cache_dir.path()),
        );
        let att = Attachment {
            container_id: container_id.clone(),
            netns: format!("/var/run/netns/{ns}"),
            ifname: "eth0".into(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), "default".into()),
                ("K8S_POD_NAME".into(), "web".into()),
                ("K8S_POD_UID".into(), "uid-1".into()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), container_id.clone()),
            ],
            capability_args: caps.as_object().unwrap().clone(),
        };

        let result = runner.add(&att).await.unwrap();
        assert_eq!(result["cniVersion"], "1.0.0");
        let ifaces = result["interfaces"].as_array().unwrap();
        let eth0 = ifaces
            .iter()
            .position(|i| i["name"] == "eth0")
            .expect("eth0 in result");
        assert_eq!(ifaces[eth0]["sandbox"], att.netns);
        let ip = result["ips"]
            .as_array()
            .unwrap()
            .iter()
            .find(|ip| ip["interface"] == eth0)
            .expect("an IP on eth0");
        let addr = ip["address"].as_str().unwrap();
        assert!(
            addr.starts_with(&subnet_prefix) && addr.ends_with("/24"),
            "{addr}"
        );
        let bare = addr.trim_end_matches("/24");
        let (_, out) = sh(&["ip", "-n", &ns, "-4", "addr", "show", "eth0"]);
        assert!(out.contains(addr), "{out}");
        let lease = data.path().join(&net_name).join(bare);
        assert!(lease.exists(), "host-local lease {}", lease.display());
        let veth = ifaces
            .iter()
            .find(|i| {
                i["name"] != "eth0" && i["name"] != bridge.as_str() && i.get("sandbox").is_none()
            })
            .and_then(|i| i["name"].as_str())
            .expect("host veth in result")
            .to_owned();
        assert!(
            sh(&["ip", "link", "show", &veth]).0,
            "veth {veth} on the host"
        );
        let dport = format!("--dport {host_port}");
        let (_, nat) = sh(&["iptables", "-t", "nat", "-S"]);
        assert!(nat.contains(&dport), "portmap rule for {host_port}");
        assert!(
            runner
                .cache()
                .load(&net_name, &container_id, "eth0")
                .await
                .unwrap()
                .is_some()
        );

        runner.del(&att).await.unwrap();
        assert!(!lease.exists(), "lease released");
        assert!(!sh(&["ip", "link", "show", &veth]).0, "veth {veth} removed");
        let (_, nat) = sh(&["iptables", "-t", "nat", "-S"]);
        assert!(!nat.contains(&dport), "portmap rule removed");
        assert!(
            runner
                .cache()
                .load(&net_name, &container_id, "eth0")
                .await
                .unwrap()
                .is_none()
        );
        // Again: idempotent with the real plugins too.
        runner.del(&att).await.unwrap();
    }
}
