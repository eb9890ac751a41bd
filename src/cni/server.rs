//! The agent side of the delegating plugin: a root-only unix socket on which
//! each connection carries one `AgentRequest` from `minilet-cni`; the
//! networks run and the answer goes back as one `AgentResponse`.
//!
//! ADD attaches the default network on the runtime's interface, then each
//! extra network the pod's `k8s.v1.cni.cncf.io/networks` annotation names
//! (as `net1`, `net2`, … or the interface it asks for); if one fails,
//! everything added is detached again (reverse order) and the ADD fails.
//! The runtime gets the default network's result, in its own cniVersion.
//! DEL detaches everything the result cache holds for the container
//! (extras in reverse interface order, the default last), so it works after
//! an agent restart and after the annotation changed. CHECK checks every
//! cached attachment; STATUS is the default network's.
//!
//! Capability args come from the pod the agent holds (found by K8S_POD_UID
//! in CNI_ARGS): `portMappings` from the spec's host ports and `bandwidth`
//! from its annotations (default network only), `ips`/`mac` from the
//! network selection; for a pod the agent doesn't know, the runtime's
//! `runtimeConfig` is used.
//!
//! Each operation leaves per-pod events (plugin timings, errors) and, on
//! ADD/DEL, the pod's `network-status` on the shared boards.
//!
//! Side effects: creates (replacing a stale one) and serves the socket; runs
//! the chains, which exec plugins and write the result cache.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::cache::CachedAttachment;
use super::chain::{Attachment, CniError, CniRunner, OpReport};
use super::delegate::{AgentRequest, AgentResponse, MAX_MESSAGE};
use super::exec::{Command, PluginError, PluginExec, codes};
use super::observe::{CniEvents, EventType, NetworkStatus, NetworkStatusBoard};
use super::podnet::{self, NetworkSelection};
use super::version;

/// A pod's host port, in the CNI `portMappings` capability convention.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: i32,
    pub container_port: i32,
    /// Lowercase: tcp, udp or sctp.
    pub protocol: String,
    /// Empty = all host addresses.
    #[serde(rename = "hostIP", default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

/// What the agent knows about a pod that matters to its networking.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodNetworkInfo {
    /// Host port mappings from the pod spec (may be empty).
    pub port_mappings: Vec<PortMapping>,
    /// The pod's annotations (networks, bandwidth).
    pub annotations: BTreeMap<String, String>,
}

/// What the server asks the agent's pod state about a pod.
pub trait PodNetworkLookup: Send + Sync {
    /// The pod's network-relevant facts; `None` when the agent doesn't know
    /// the pod (then the runtime's runtimeConfig is used, and no extra
    /// networks are attached).
    fn pod_network_info(&self, pod_uid: &str) -> Option<PodNetworkInfo>;
}

/// Everything a request needs: the runner, the pods, and where outcomes go.
pub struct CniHandler<E: PluginExec> {
    pub runner: Arc<CniRunner<E>>,
    pub pods: Arc<dyn PodNetworkLookup>,
    pub events: Arc<CniEvents>,
    pub status: Arc<NetworkStatusBoard>,
}

/// How long a client may take to send its request.
const READ_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Event reasons.
pub const REASON_TIMING: &str = "CNIPluginTiming";
pub const REASON_ERROR: &str = "CNIError";

/// Binds the agent socket at `path`, root-only (see `crate::socket`).
pub use crate::socket::bind_private as bind;

/// Serves the socket until `cancel` fires, then lets in-flight requests
/// finish (each is bounded by the plugin timeouts): cutting a chain off half
/// way would leave the node in a state no cache describes.
pub async fn serve<E: PluginExec + 'static>(
    listener: UnixListener,
    handler: Arc<CniHandler<E>>,
    cancel: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tasks.spawn(handle_connection(stream, handler.clone()));
                }
                Err(e) => {
                    // E.g. EMFILE: don't spin; the next accept may work.
                    tracing::warn!(error = %e, "cni socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    while tasks.join_next().await.is_some() {}
}

fn fail(code: u32, msg: impl Into<String>) -> PluginError {
    PluginError {
        cni_version: String::new(),
        code,
        msg: msg.into(),
        details: String::new(),
    }
}

async fn handle_connection<E: PluginExec>(mut stream: UnixStream, handler: Arc<CniHandler<E>>) {
    let response = match read_request(&mut stream).await {
        Ok(req) => {
            let pod = format!(
                "{}/{}",
                arg(&req, "K8S_POD_NAMESPACE").unwrap_or(""),
                arg(&req, "K8S_POD_NAME").unwrap_or("")
            );
            let span = tracing::info_span!(
                "cni_request",
                command = %req.command,
                container_id = %req.container_id,
                pod = %pod,
            );
            async {
                let start = std::time::Instant::now();
                let outcome = handler.process(&req).await;
                match &outcome {
                    Ok(_) => tracing::info!(elapsed_ms = start.elapsed().as_millis() as u64, "done"),
                    Err(e) => tracing::warn!(code = e.code, error = %e.msg, details = %e.details, "failed"),
                }
                outcome
            }
            .instrument(span)
            .await
        }
        Err(e) => {
            tracing::warn!(error = %e.msg, "bad cni request");
            Err(e)
        }
    };
    let response = match response {
        Ok(result) => AgentResponse {
            result,
            error: None,
        },
        Err(error) => AgentResponse {
            result: None,
            error: Some(error),
        },
    };
    let body = serde_json::to_vec(&response).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot encode the cni reply");
        // Still an answer the plugin understands: a CNI error object.
        serde_json::json!({"error": {"code": super::exec::codes::IO_FAILURE, "msg": format!("the agent could not encode its reply: {e}")}})
            .to_string()
            .into_bytes()
    });
    // The plugin may have given up already; nothing more to do then.
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
}

/// Natural order of interface names (`net2` before `net10`).
fn ifname_key(s: &str) -> (String, u64, String) {
    let digits = s.len() - s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (head, num) = s.split_at(s.len() - digits);
    (head.to_owned(), num.parse().unwrap_or(0), s.to_owned())
}

impl<E: PluginExec> CniHandler<E> {
    /// Answers one request (what the socket server does per connection).
    pub async fn process(&self, req: &AgentRequest) -> Result<Option<Value>, PluginError> {
        // Refuse before touching the node when the result couldn't be
        // handed out in the runtime's version anyway.
        if !version::RESULT_VERSIONS.contains(&req.cni_version.as_str()) {
            return Err(PluginError {
                details: format!("minilet converts results to {:?}", version::RESULT_VERSIONS),
                ..fail(
                    codes::INCOMPATIBLE_VERSION,
                    format!("incompatible CNI version {:?}", req.cni_version),
                )
            });
        }
        let uid = arg(req, "K8S_POD_UID").unwrap_or("").to_owned();
        let info = (!uid.is_empty())
            .then(|| self.pods.pod_network_info(&uid))
            .flatten();
        let att = Attachment {
            container_id: req.container_id.clone(),
            netns: req.netns.clone(),
            ifname: req.ifname.clone(),
            args: req.args.clone(),
            capability_args: req.runtime_config.clone(),
        };
        match req.command {
            Command::Add => self.add(&uid, info.as_ref(), att).await.map(Some),
            Command::Del => self
                .del(&uid, info.as_ref(), att, req.prev_result.as_ref())
                .await
                .map(|()| None),
            Command::Check => self.check(&uid, att).await.map(|()| None),
            Command::Status => self
                .runner
                .status("")
                .await
                .map(|()| None)
                .map_err(|e| e.to_plugin_error()),
            // The runtime's GC: minilet collects its own attachments.
            Command::Gc => Ok(None),
            Command::Version => Err(fail(
                codes::INVALID_ENV,
                "VERSION is answered by the plugin",
            )),
        }
    }

    fn event(&self, uid: &str, kind: EventType, reason: &str, message: String) {
        if !uid.is_empty() {
            self.events.push(uid, kind, reason, message);
        }
    }

    fn timing(&self, uid: &str, report: &OpReport) {
        if !report.steps.is_empty() {
            self.event(uid, EventType::Normal, REASON_TIMING, report.summary());
        }
    }

    /// Records an error as a `CNIError` event and turns it into the wire
    /// error.
    fn error(&self, uid: &str, what: &str, e: &CniError) -> PluginError {
        let pe = e.to_plugin_error();
        let mut msg = format!("{what}: {} (code {})", pe.msg, pe.code);
        if !pe.details.is_empty() {
            msg.push_str(&format!("; details: {}", pe.details));
        }
        if let Some(plugin) = e.plugin()
            && !msg.contains(plugin)
        {
            msg.push_str(&format!("; plugin {plugin}"));
        }
        self.event(uid, EventType::Warning, REASON_ERROR, msg);
        // The plugin's own error object reaches the runtime untouched.
        pe
    }

    /// The default network's capability args for this pod.
    fn default_caps(
        &self,
        info: Option<&PodNetworkInfo>,
        att: &mut Attachment,
    ) -> Result<(), String> {
        let Some(info) = info else {
            return Ok(());
        };
        // The pod spec is the authority on host ports when we hold the pod.
        if info.port_mappings.is_empty() {
            att.capability_args.remove("portMappings");
        } else {
            let v = serde_json::to_value(&info.port_mappings)
                .map_err(|e| format!("encoding the pod's port mappings: {e}"))?;
            att.capability_args.insert("portMappings".into(), v);
        }
        match podnet::bandwidth_capability(&info.annotations)? {
            Some(bw) => {
                att.capability_args.insert("bandwidth".into(), bw);
            }
            None => {
                att.capability_args.remove("bandwidth");
            }
        }
        Ok(())
    }

    /// The extra networks of the pod with their interface names, checked
    /// against the current config before anything runs.
    fn extras(
        &self,
        info: Option<&PodNetworkInfo>,
        primary: &str,
    ) -> Result<Vec<(NetworkSelection, String)>, String> {
        let Some(s) = info.and_then(|i| i.annotations.get(podnet::NETWORKS_ANNOTATION)) else {
            return Ok(Vec::new());
        };
        let sel = podnet::parse_networks(s)?;
        let names = podnet::extra_interfaces(&sel, primary)?;
        let set = self.runner.store().current();
        for s in &sel {
            if !set.networks.contains_key(&s.name) {
                return Err(format!(
                    "{}: no CNI network named {:?} in the config dir",
                    podnet::NETWORKS_ANNOTATION,
                    s.name
                ));
            }
        }
        Ok(sel.into_iter().zip(names).collect())
    }

    async fn add(
        &self,
        uid: &str,
        info: Option<&PodNetworkInfo>,
        mut att: Attachment,
    ) -> Result<Value, PluginError> {
        let invalid = |m: String| {
            self.event(uid, EventType::Warning, REASON_ERROR, m.clone());
            fail(codes::INVALID_CONFIG, m)
        };
        self.default_caps(info, &mut att).map_err(invalid)?;
        let extras = self.extras(info, &att.ifname).map_err(invalid)?;

        let (r, report) = self.runner.add_report("", &att).await;
        self.timing(uid, &report);
        let default_name = report.network.clone();
        let result =
            r.map_err(|e| self.error(uid, &format!("ADD {default_name}/{}", att.ifname), &e))?;
        if !has_container_ip(&result, &att.ifname) {
            // containerd refuses such a result ("failed to find network
            // info for sandbox"): say why here, where it's debuggable.
            tracing::warn!(ifname = %att.ifname, "chain result has no IP on the container interface");
        }
        let mut statuses = vec![NetworkStatus::from_result(
            &default_name,
            &att.ifname,
            true,
            &result,
        )];
        // What this ADD attached, in order (the default first).
        let mut added: Vec<(String, Attachment)> = vec![(default_name.clone(), att.clone())];
        for (sel, ifname) in extras {
            let extra = Attachment {
                ifname: ifname.clone(),
                capability_args: sel.capability_args(),
                ..att.clone()
            };
            let (r, report) = self.runner.add_report(&sel.name, &extra).await;
            self.timing(uid, &report);
            match r {
                Ok(res) => {
                    statuses.push(NetworkStatus::from_result(
                        &sel.display_name(),
                        &ifname,
                        false,
                        &res,
                    ));
                    added.push((sel.name.clone(), extra));
                }
                Err(e) => {
                    let pe = self.error(uid, &format!("ADD {}/{ifname}", sel.name), &e);
                    // All or nothing: detach what this ADD attached.
                    for (net, a) in added.iter().rev() {
                        let (r, report) = self.runner.del_report(net, a, None).await;
                        self.timing(uid, &report);
                        if let Err(e) = r {
                            self.error(uid, &format!("rollback DEL {net}/{}", a.ifname), &e);
                        }
                    }
                    return Err(pe);
                }
            }
        }
        if !uid.is_empty() {
            self.status.set(uid, statuses);
        }
        Ok(result)
    }

    async fn del(
        &self,
        uid: &str,
        info: Option<&PodNetworkInfo>,
        mut att: Attachment,
        fallback: Option<&Value>,
    ) -> Result<(), PluginError> {
        let mut cached = self.runner.attachments(&att.container_id).await;
        // The primary last; the extras in reverse interface order.
        let primary: Vec<CachedAttachment> = cached
            .iter()
            .filter(|c| c.if_name == att.ifname)
            .cloned()
            .collect();
        cached.retain(|c| c.if_name != att.ifname);
        cached.sort_by_key(|c| std::cmp::Reverse(ifname_key(&c.if_name)));
        let mut first_err = None;
        for c in &cached {
            let a = Attachment {
                netns: att.netns.clone(),
                ..Attachment::from_cached(c)
            };
            let (r, report) = self.runner.del_report(&c.network_name, &a, None).await;
            self.timing(uid, &report);
            if let Err(e) = r {
                let pe = self.error(uid, &format!("DEL {}/{}", c.network_name, c.if_name), &e);
                first_err.get_or_insert(pe);
            }
        }
        // The cached args win (what ADD used); without a cache entry, the
        // pod's current ones.
        let nets: Vec<String> = if primary.is_empty() {
            let _ = self.default_caps(info, &mut att);
            vec![String::new()]
        } else {
            att.capability_args.clear();
            primary.iter().map(|c| c.network_name.clone()).collect()
        };
        for net in nets {
            let (r, report) = self.runner.del_report(&net, &att, fallback).await;
            self.timing(uid, &report);
            if let Err(CniError::NoDefaultNetwork) = r {
                // Nothing cached and no network to run: nothing of ours is
                // attached, and a DEL must not block the sandbox's removal.
                tracing::warn!(container_id = %att.container_id, "DEL without a cache entry or a default network: nothing to do");
                continue;
            }
            if let Err(e) = r {
                let pe = self.error(uid, &format!("DEL {}/{}", report.network, att.ifname), &e);
                first_err.get_or_insert(pe);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if !uid.is_empty() {
            self.status.remove(uid);
        }
        Ok(())
    }

    async fn check(&self, uid: &str, att: Attachment) -> Result<(), PluginError> {
        let cached = self.runner.attachments(&att.container_id).await;
        if !cached.iter().any(|c| c.if_name == att.ifname) {
            // Nothing cached for the runtime's interface: the runner's
            // error says so.
            let (r, _) = self.runner.check_report("", &att).await;
            return r.map_err(|e| self.error(uid, &format!("CHECK {}", att.ifname), &e));
        }
        for c in cached {
            let a = Attachment {
                netns: att.netns.clone(),
                ..Attachment::from_cached(&c)
            };
            let (r, report) = self.runner.check_report(&c.network_name, &a).await;
            self.timing(uid, &report);
            r.map_err(|e| self.error(uid, &format!("CHECK {}/{}", c.network_name, c.if_name), &e))?;
        }
        Ok(())
    }
}

fn arg<'a>(req: &'a AgentRequest, key: &str) -> Option<&'a str> {
    req.args
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}
async fn read_request(stream: &mut UnixStream) -> Result<AgentRequest, PluginError> {
    // The socket is 0600, but check the peer as well: only our own user
    // (root) may drive the node's networking.
    let me = nix::unistd::geteuid().as_raw();
    match stream.peer_cred() {
        Ok(c) if c.uid() == me => {}
        Ok(c) => {
            return Err(fail(
                codes::IO_FAILURE,
                format!("uid {} may not use the cni socket", c.uid()),
            ));
        }
        Err(e) => return Err(fail(codes::IO_FAILURE, format!("peer credentials: {e}"))),
    }
    let mut body = Vec::new();
    let read = tokio::time::timeout(
        READ_REQUEST_TIMEOUT,
        (&mut *stream).take(MAX_MESSAGE + 1).read_to_end(&mut body),
    )
    .await;
    match read {
        Err(_) => return Err(fail(codes::IO_FAILURE, "timed out reading the request")),
        Ok(Err(e)) => return Err(fail(codes::IO_FAILURE, format!("reading the request: {e}"))),
        Ok(Ok(_)) if body.len() as u64 > MAX_MESSAGE => {
            return Err(fail(codes::DECODE_FAILURE, "request too large"));
        }
        Ok(Ok(_)) => {}
    }
    serde_json::from_slice(&body)
        .map_err(|e| fail(codes::DECODE_FAILURE, format!("malformed request: {e}")))
}
fn has_container_ip(result: &Value, ifname: &str) -> bool {
    let Some(ifaces) = result.get("interfaces").and_then(Value::as_array) else {
        return false;
    };
    let Some(idx) = ifaces.iter().position(|i| {
        i.get("name").and_then(Value::as_str) == Some(ifname)
            && i.get("sandbox")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
    }) else {
        return false;
    };
    result
        .get("ips")
        .and_then(Value::as_array)
        .is_some_and(|ips| {
            ips.iter()
                .any(|ip| ip.get("interface").and_then(Value::as_u64) == Some(idx as u64))
        })
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::cache::ResultCache;
    use crate::cni::delegate;
    use crate::cni::exec::ProcessExec;
    use std::collections::HashMap;
    use std::io;
    use std::path::{Path, PathBuf};

    /// Knows pods by uid: "uid-known" has one host port; others as set.
    #[derive(Default)]
    struct Pods(std::sync::Mutex<HashMap<String, PodNetworkInfo>>);
    impl PodNetworkLookup for Pods {
        fn pod_network_info(&self, pod_uid: &str) -> Option<PodNetworkInfo> {
            self.0.lock().unwrap().get(pod_uid).cloned()
        }
    }
    impl Pods {
        fn known() -> Self {
            let p = Pods::default();
            p.set("uid-known", &[]);
            p
        }
        fn set(&self, uid: &str, annotations: &[(&str, &str)]) {
            let info = PodNetworkInfo {
                port_mappings: vec![PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: "tcp".into(),
                    host_ip: String::new(),
                }],
                annotations: annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            };
            self.0.lock().unwrap().insert(uid.into(), info);
        }
    }

    struct Agent {
        dir: tempfile::TempDir,
        socket: PathBuf,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        handler: Arc<CniHandler<ProcessExec>>,
        pods: Arc<Pods>,
    }

    /// An agent on a temp socket running the recording plugin: the default
    /// network `chain` = `first` + `ports` (declares portMappings and
    /// bandwidth); extra networks `net-a` = `a1` (declares mac, ips) and
    /// `net-b` = `b1` (0.4.0), and `net-c` = `c1`.
    async fn start_agent() -> Agent {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cni/testdata/record.sh");
        for n in ["first", "ports", "a1", "b1", "c1"] {
            std::fs::copy(&src, bin.join(n)).unwrap();
            std::fs::set_permissions(bin.join(n), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let conf = dir.path().join("net.d");
        std::fs::create_dir(&conf).unwrap();
        for (file, body) in [
            (
                "10-chain.conflist",
                r#"{"cniVersion":"1.0.0","name":"chain","plugins":[{"type":"first"},{"type":"ports","capabilities":{"portMappings":true,"bandwidth":true}}]}"#,
            ),
            (
                "20-a.conflist",
                r#"{"cniVersion":"1.0.0","name":"net-a","plugins":[{"type":"a1","capabilities":{"mac":true,"ips":true}}]}"#,
            ),
            (
                "30-b.conf",
                r#"{"cniVersion":"0.4.0","name":"net-b","type":"b1"}"#,
            ),
            (
                "40-c.conf",
                r#"{"cniVersion":"1.0.0","name":"net-c","type":"c1"}"#,
            ),
        ] {
            std::fs::write(conf.join(file), body).unwrap();
        }
        let set = crate::cni::config::load_dir(&conf);
        assert!(set.errors.is_empty(), "{:?}", set.errors);
        let runner = Arc::new(CniRunner::new(
            ProcessExec::new(vec![bin], Duration::from_secs(10)),
            Arc::new(crate::cni::config::NetworkStore::new(set)),
            ResultCache::new(dir.path().join("cache")),
            Arc::new(crate::cni::observe::CniMetrics::new()),
        ));
        let pods = Arc::new(Pods::known());
        let handler = Arc::new(CniHandler {
            runner,
            pods: pods.clone(),
            events: Arc::new(CniEvents::new()),
            status: Arc::new(NetworkStatusBoard::new()),
        });
        let socket = dir.path().join("run/cni.sock");
        let listener = bind(&socket).unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(listener, handler.clone(), cancel.clone()));
        Agent {
            dir,
            socket,
            cancel,
            task,
            handler,
            pods,
        }
    }

    /// The recording plugins' log: (plugin, command, stdin).
    fn full_log(agent: &Agent) -> Vec<(String, String, Value)> {
        std::fs::read_to_string(agent.dir.path().join("bin/log"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let mut p = l.splitn(3, ' ');
                (
                    p.next().unwrap().to_owned(),
                    p.next().unwrap().to_owned(),
                    serde_json::from_str(p.next().unwrap()).unwrap(),
                )
            })
            .collect()
    }

    fn plugin_log(agent: &Agent) -> Vec<Value> {
        full_log(agent).into_iter().map(|(_, _, v)| v).collect()
    }

    /// Runs the real plugin code path in a blocking thread.
    async fn run_plugin(command: &str, uid: &str, stdin: String) -> (i32, String, Duration) {
        let env: HashMap<String, String> = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "sandbox1"),
            ("CNI_NETNS", "/var/run/netns/cni-1234"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            (
                "CNI_ARGS",
                &format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=sandbox1;K8S_POD_UID={uid}"),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        tokio::task::spawn_blocking(move || {
            let start = std::time::Instant::now();
            let mut out = Vec::new();
            let code = delegate::run(&env, &mut stdin.as_bytes(), &mut out);
            (code, String::from_utf8(out).unwrap(), start.elapsed())
        })
        .await
        .unwrap()
    }

    /// STATUS as the runtime sends it: no container, only the config.
    async fn run_status(socket: &Path) -> (i32, String, Duration) {
        let env: HashMap<String, String> =
            [("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/opt/cni/bin")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
        let stdin = runtime_conf(socket, "1.1.0", 60);
        tokio::task::spawn_blocking(move || {
            let start = std::time::Instant::now();
            let mut out = Vec::new();
            let code = delegate::run(&env, &mut stdin.as_bytes(), &mut out);
            (code, String::from_utf8(out).unwrap(), start.elapsed())
        })
        .await
        .unwrap()
    }

    fn runtime_conf(socket: &Path, version: &str, timeout: u64) -> String {
        // What containerd passes: install's config plus the runtimeConfig.
        format!(
            r#"{{"cniVersion":"{version}","name":"minilet","type":"minilet-cni","agentSocket":"{}","timeoutSeconds":{timeout},
                "capabilities":{{"portMappings":true}},
                "runtimeConfig":{{"portMappings":[{{"hostPort":9999,"containerPort":99,"protocol":"udp"}}]}}}}"#,
            socket.display()
        )
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn delegate_end_to_end() {
        let agent = start_agent().await;
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let meta = std::fs::metadata(&agent.socket).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);

        // ADD for a pod the agent knows: the spec's ports win.
        let (code, out, _) =
            run_plugin("ADD", "uid-known", runtime_conf(&agent.socket, "1.0.0", 60)).await;
        assert_eq!(code, 0, "{out}");
        let result: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(result["cniVersion"], "1.0.0");
        assert_eq!(result["plugins"], serde_json::json!(["first", "ports"]));
        assert_eq!(result["interfaces"][0]["name"], "eth0");
        assert_eq!(
            result["interfaces"][0]["sandbox"],
            "/var/run/netns/cni-1234"
        );
        assert_eq!(result["ips"][0]["address"], "10.1.2.3/24");
        assert!(has_container_ip(&result, "eth0"));
        let log = plugin_log(&agent);
        assert_eq!(log.len(), 2);
        assert!(log[0].get("runtimeConfig").is_none());
        assert_eq!(
            log[1]["runtimeConfig"],
            serde_json::json!({"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]})
        );
        // The agent's cache has the attachment.
        let cache = ResultCache::new(agent.dir.path().join("cache"));
        assert_eq!(
            cache
                .load("chain", "sandbox1", "eth0")
                .await
                .unwrap()
                .unwrap()
                .result,
            result
        );

        // DEL: prints nothing, reverse order with the cached result.
        let (code, out, _) =
            run_plugin("DEL", "uid-known", runtime_conf(&agent.socket, "1.0.0", 60)).await;
        assert_eq!((code, out.as_str()), (0, ""));
        let log = plugin_log(&agent);
        assert_eq!(log.len(), 4);
        assert_eq!(log[2]["prevResult"], result);
        assert!(
            cache
                .load("chain", "sandbox1", "eth0")
                .await
                .unwrap()
                .is_none()
        );

        // A pod the agent doesn't know: the runtime's runtimeConfig is used.
        let (code, out, _) =
            run_plugin("ADD", "uid-other", runtime_conf(&agent.socket, "1.0.0", 60)).await;
        assert_eq!(code, 0, "{out}");
        assert_eq!(
            plugin_log(&agent)[5]["runtimeConfig"]["portMappings"][0]["hostPort"],
            9999
        );

        // A runtime config in the older result format: converted.
        let (code, out, _) =
            run_plugin("ADD", "uid-other", runtime_conf(&agent.socket, "0.4.0", 60)).await;
        assert_eq!(code, 0, "{out}");
        let r: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(r["cniVersion"], "0.4.0");
        assert_eq!(r["ips"][0]["version"], "4");
        // One the agent can't produce: refused before any plugin runs.
        let n = plugin_log(&agent).len();
        let (code, out, _) =
            run_plugin("ADD", "uid-other", runtime_conf(&agent.socket, "0.2.0", 60)).await;
        assert_eq!(code, 1);
        let e: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(e["code"], codes::INCOMPATIBLE_VERSION);
        assert_eq!(plugin_log(&agent).len(), n);
        let (code, _, _) =
            run_plugin("DEL", "uid-other", runtime_conf(&agent.socket, "1.0.0", 60)).await;
        assert_eq!(code, 0);

        // A plugin error's code/msg/details reach the runtime intact.
        let failing = agent.dir.path().join("bin/ports");
        std::fs::write(
            &failing,
            "#!/bin/sh\necho '{\"cniVersion\":\"1.0.0\",\"code\":104,\"msg\":\"port taken\",\"details\":\"8080/tcp\"}'\nexit 1\n",
        )
        .unwrap();
        let (code, out, _) =
            run_plugin("ADD", "uid-known", runtime_conf(&agent.socket, "1.0.0", 60)).await;
        assert_eq!(code, 1);
        let e: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(e["code"], 104);
        assert_eq!(e["msg"], "port taken");
        assert_eq!(e["details"], "8080/tcp");

        agent.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), agent.task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn malformed_requests_get_errors_and_server_survives() {
        let agent = start_agent().await;
        for body in [&b"garbage"[..], b"{}", br#"{"command":"ADD"}"#] {
            let mut s = UnixStream::connect(&agent.socket).await.unwrap();
            s.write_all(body).await.unwrap();
            s.shutdown().await.unwrap();
            let mut reply = Vec::new();
            s.read_to_end(&mut reply).await.unwrap();
            let r: AgentResponse = serde_json::from_slice(&reply).unwrap();
            let e = r.error.unwrap();
            assert_eq!(e.code, codes::DECODE_FAILURE, "{}", e.msg);
            assert!(e.msg.contains("malformed request"), "{}", e.msg);
        }
        // Still serving.
        let (code, out, _) =
            run_plugin("ADD", "uid-known", runtime_conf(&agent.socket, "1.0.0", 60)).await;
        assert_eq!(code, 0, "{out}");
        // CHECK goes through to the plugins, in list order.
        let n = full_log(&agent).len();
        let (code, out, _) = run_plugin(
            "CHECK",
            "uid-known",
            runtime_conf(&agent.socket, "1.0.0", 60),
        )
        .await;
        assert_eq!((code, out.as_str()), (0, ""));
        let checks: Vec<_> = full_log(&agent)[n..]
            .iter()
            .map(|(p, c, _)| format!("{p} {c}"))
            .collect();
        assert_eq!(checks, ["first CHECK", "ports CHECK"]);
        // STATUS: the default network's (1.0.0: the plugins answer VERSION).
        let (code, out, _) = run_status(&agent.socket).await;
        assert_eq!((code, out.as_str()), (0, ""));
        agent.cancel.cancel();
        agent.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn no_agent_fails_fast_with_try_again() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cni.sock");
        let (code, out, took) = run_plugin("ADD", "u", runtime_conf(&socket, "1.0.0", 60)).await;
        assert_eq!(code, 1);
        assert!(took < Duration::from_secs(2), "took {took:?}");
        let e: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(e["code"], codes::TRY_AGAIN_LATER);
        assert_eq!(e["cniVersion"], "1.0.0");
        let msg = e["msg"].as_str().unwrap();
        assert!(
            msg.starts_with(&format!("agent not running at {}: ", socket.display())),
            "{msg}"
        );

        // A stale socket file (the agent died): same answer, and bind
        // replaces it.
        let stale = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        drop(stale);
        let (code, out, took) = run_plugin("DEL", "u", runtime_conf(&socket, "1.0.0", 60)).await;
        assert_eq!(code, 1);
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert!(out.contains("agent not running at"), "{out}");
        let _listener = bind(&socket).unwrap();
        // ...but a live one is not stolen.
        assert_eq!(bind(&socket).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        // And a non-socket file is not deleted.
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(bind(&file).is_err());
        assert!(file.exists());
    }

    /// What `install` writes for this agent: `runtime_conf` plus the
    /// settings the plugin runs DEL and CHECK with when the agent is gone.
    fn runtime_conf_without_agent(agent: &Agent) -> String {
        let settings = crate::cni::local::Settings {
            cni_conf_dir: agent.dir.path().join("net.d"),
            cni_bin_dirs: vec![agent.dir.path().join("bin")],
            cni_cache_dir: agent.dir.path().join("cache"),
            cni_plugin_timeout_ms: 10_000,
        };
        let mut conf: Value =
            serde_json::from_str(&runtime_conf(&agent.socket, "1.0.0", 60)).unwrap();
        conf["withoutAgent"] = serde_json::to_value(settings).unwrap();
        conf.to_string()
    }

    /// An agent whose pod `uid` (with `annotations`) was ADDed through the
    /// plugin, then stopped (SIGTERM: its socket file stays, stale).
    /// Returns it, the runtime config and the ADD's result.
    async fn added_then_stopped(uid: &str, annotations: &[(&str, &str)]) -> (Agent, String, Value) {
        let mut agent = start_agent().await;
        agent.pods.set(uid, annotations);
        let conf = runtime_conf_without_agent(&agent);
        let (code, out, _) = run_plugin("ADD", uid, conf.clone()).await;
        assert_eq!(code, 0, "{out}");
        agent.cancel.cancel();
        (&mut agent.task).await.unwrap();
        assert!(agent.socket.exists());
        (agent, conf, serde_json::from_str(&out).unwrap())
    }

    /// The message of the "try again later" error the plugin printed.
    fn try_again_msg(out: &str) -> String {
        let e: Value = serde_json::from_str(out).unwrap();
        assert_eq!(e["code"], codes::TRY_AGAIN_LATER, "{e}");
        e["msg"].as_str().unwrap().to_owned()
    }

    fn ops_since(agent: &Agent, n: usize) -> Vec<String> {
        full_log(agent)[n..]
            .iter()
            .map(|(p, c, _)| format!("{p} {c}"))
            .collect()
    }

    /// The agent stopped: DEL and CHECK run in the plugin itself, from the
    /// cache and the agent's settings in the runtime's config (extra
    /// networks included); ADD still fails fast.
    #[tokio::test(flavor = "multi_thread")]
    async fn without_the_agent_del_and_check_run_in_the_plugin() {
        let (agent, conf, added) =
            added_then_stopped("uid-multi", &[(podnet::NETWORKS_ANNOTATION, "net-a")]).await;

        let n = full_log(&agent).len();
        let (code, out, _) = run_plugin("CHECK", "uid-multi", conf.clone()).await;
        assert_eq!((code, out.as_str()), (0, ""));
        assert_eq!(
            ops_since(&agent, n),
            ["first CHECK", "ports CHECK", "a1 CHECK"]
        );

        let n = full_log(&agent).len();
        let (code, out, took) = run_plugin("ADD", "uid-multi", conf.clone()).await;
        assert_eq!(code, 1, "{out}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert!(try_again_msg(&out).starts_with("agent not running at"));
        assert_eq!(
            ops_since(&agent, n),
            Vec::<String>::new(),
            "ADD ran nothing"
        );

        let n = full_log(&agent).len();
        let (code, out, _) = run_plugin("DEL", "uid-multi", conf.clone()).await;
        assert_eq!((code, out.as_str()), (0, ""));
        let log = full_log(&agent);
        assert_eq!(ops_since(&agent, n), ["a1 DEL", "ports DEL", "first DEL"]);
        // With the cached result and capability args (what ADD used).
        assert_eq!(log[n + 1].2["prevResult"], added);
        assert_eq!(
            log[n + 1].2["runtimeConfig"]["portMappings"][0]["hostPort"],
            8080
        );
        let cache = ResultCache::new(agent.dir.path().join("cache"));
        assert!(cache.list().await.unwrap().is_empty(), "cache released");
        let locks = std::fs::read_dir(agent.dir.path().join("cache/locks")).unwrap();
        assert_eq!(locks.count(), 0, "no lock file left");

        // The runtime retries DEL (and with no socket file at all): still
        // fine, the default chain gets its idempotent DEL.
        std::fs::remove_file(&agent.socket).unwrap();
        let n = full_log(&agent).len();
        let (code, out, _) = run_plugin("DEL", "uid-multi", conf.clone()).await;
        assert_eq!((code, out.as_str()), (0, ""));
        assert_eq!(ops_since(&agent, n), ["ports DEL", "first DEL"]);
        // A runtime config without the settings (an older agent wrote it):
        // DEL fails as before, naming the missing agent.
        let (code, out, _) =
            run_plugin("DEL", "uid-multi", runtime_conf(&agent.socket, "1.0.0", 60)).await;
        assert_eq!(code, 1);
        assert!(out.contains("agent not running at"), "{out}");
    }

    /// The agent dies while a DEL is in flight (it took the connection and
    /// never answered): the plugin asks again, finds no agent, and runs the
    /// DEL itself. An ADD that loses its agent fails.
    #[tokio::test(flavor = "multi_thread")]
    async fn agent_dying_mid_del_leaves_the_del_to_the_plugin() {
        let (agent, conf, _) = added_then_stopped("uid-known", &[]).await;
        // A dying agent: takes one connection, drops it unanswered, goes.
        let dying = |socket: PathBuf| {
            let _ = std::fs::remove_file(&socket);
            let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
            std::thread::spawn(move || {
                let (conn, _) = listener.accept().unwrap();
                drop(conn);
                drop(listener);
                std::fs::remove_file(&socket).unwrap();
            })
        };
        let t = dying(agent.socket.clone());
        let (code, out, _) = run_plugin("ADD", "uid-known", conf.clone()).await;
        t.join().unwrap();
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains("without an answer") || out.contains("talking to the agent"),
            "{out}"
        );

        let t = dying(agent.socket.clone());
        let n = full_log(&agent).len();
        let (code, out, _) = run_plugin("DEL", "uid-known", conf).await;
        t.join().unwrap();
        assert_eq!((code, out.as_str()), (0, ""));
        assert_eq!(ops_since(&agent, n), ["ports DEL", "first DEL"]);
        let cache = ResultCache::new(agent.dir.path().join("cache"));
        assert!(cache.list().await.unwrap().is_empty(), "cache released");
    }

    /// A plugin running DEL without the agent and an agent starting at the
    /// same moment: the cache's per-container file lock serialises them.
    #[tokio::test(flavor = "multi_thread")]
    async fn del_without_the_agent_waits_for_the_containers_lock() {
        let (agent, conf, _) = added_then_stopped("uid-known", &[]).await;
        // The (restarted) agent holds sandbox1's lock for a while.
        let cache = ResultCache::new(agent.dir.path().join("cache"));
        let held = cache.lock("sandbox1").await.unwrap();
        let n = full_log(&agent).len();
        let del = tokio::spawn(run_plugin("DEL", "uid-known", conf));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!del.is_finished(), "DEL waits for the lock");
        assert_eq!(ops_since(&agent, n), Vec::<String>::new());
        drop(held);
        let (code, out, _) = tokio::time::timeout(Duration::from_secs(10), del)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((code, out.as_str()), (0, ""));
        assert_eq!(ops_since(&agent, n), ["ports DEL", "first DEL"]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn agent_that_never_answers_hits_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cni.sock");
        // Bound, accepting into the backlog, never answering.
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let (code, out, took) = run_plugin("ADD", "u", runtime_conf(&socket, "1.0.0", 1)).await;
        assert_eq!(code, 1);
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(3),
            "took {took:?}"
        );
        let msg = try_again_msg(&out);
        assert!(msg.contains("did not answer within 1s"), "{msg}");
    }

    fn req(command: Command, uid: &str, ifname: &str) -> AgentRequest {
        AgentRequest {
            command,
            container_id: "sb1".into(),
            netns: "/var/run/netns/x".into(),
            ifname: ifname.into(),
            args: vec![
                ("K8S_POD_NAMESPACE".into(), "default".into()),
                ("K8S_POD_NAME".into(), "web".into()),
                ("K8S_POD_UID".into(), uid.into()),
            ],
            runtime_config: serde_json::Map::new(),
            cni_version: "1.0.0".into(),
            prev_result: None,
        }
    }

    #[tokio::test]
    async fn extra_networks_attach_in_order_and_detach_in_reverse() {
        let agent = start_agent().await;
        agent.pods.set(
            "uid-multi",
            &[
                (
                    podnet::NETWORKS_ANNOTATION,
                    r#"[{"name":"net-a","namespace":"team","mac":"02:00:00:00:00:0a","ips":["10.9.0.7/24"]},{"name":"net-b","interface":"data"},{"name":"net-c"}]"#,
                ),
                (podnet::INGRESS_BANDWIDTH_ANNOTATION, "10M"),
            ],
        );
        let h = &agent.handler;
        let result = h
            .process(&req(Command::Add, "uid-multi", "eth0"))
            .await
            .unwrap()
            .unwrap();
        // The runtime gets the default network's result.
        assert_eq!(result["plugins"], serde_json::json!(["first", "ports"]));
        let log = full_log(&agent);
        let order: Vec<_> = log
            .iter()
            .map(|(p, c, s)| format!("{p} {c} {}", s["name"].as_str().unwrap()))
            .collect();
        assert_eq!(
            order,
            [
                "first ADD chain",
                "ports ADD chain",
                "a1 ADD net-a",
                "b1 ADD net-b",
                "c1 ADD net-c"
            ]
        );
        // Capability args: ports + bandwidth on the default, mac/ips on net-a.
        assert_eq!(
            log[1].2["runtimeConfig"],
            serde_json::json!({
                "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
                "bandwidth": {"ingressRate": 10_000_000, "ingressBurst": 4_294_967_295u64}
            })
        );
        assert_eq!(
            log[2].2["runtimeConfig"],
            serde_json::json!({"mac": "02:00:00:00:00:0a", "ips": ["10.9.0.7/24"]})
        );
        assert!(log[3].2.get("runtimeConfig").is_none());
        assert_eq!(log[3].2["cniVersion"], "0.4.0");
        let ifnames: Vec<_> = h
            .runner
            .attachments("sb1")
            .await
            .iter()
            .map(|a| format!("{}/{}", a.network_name, a.if_name))
            .collect();
        assert_eq!(
            ifnames,
            ["chain/eth0", "net-a/net1", "net-b/data", "net-c/net3"]
        );
        // network-status, Multus style.
        let status = h.status.get("uid-multi").unwrap();
        let brief: Vec<_> = status
            .iter()
            .map(|s| format!("{} {} {}", s.name, s.interface, s.default))
            .collect();
        assert_eq!(
            brief,
            [
                "chain eth0 true",
                "team/net-a net1 false",
                "net-b data false",
                "net-c net3 false"
            ]
        );
        assert_eq!(status[0].ips, ["10.1.2.3"]);
        // Timing events, one per network.
        let ev = h.events.events("uid-multi");
        assert_eq!(ev.len(), 4);
        assert!(ev[0].message.starts_with("ADD first "), "{}", ev[0].message);
        assert!(
            ev[0].message.ends_with("on chain/eth0"),
            "{}",
            ev[0].message
        );
        assert_eq!(ev[0].reason, REASON_TIMING);

        // The annotation changes: DEL still detaches what the cache holds,
        // extras in reverse interface order, the default last.
        agent.pods.set("uid-multi", &[]);
        let n = full_log(&agent).len();
        h.process(&req(Command::Del, "uid-multi", "eth0"))
            .await
            .unwrap();
        let order: Vec<_> = full_log(&agent)[n..]
            .iter()
            .map(|(p, c, _)| format!("{p} {c}"))
            .collect();
        assert_eq!(
            order,
            ["c1 DEL", "a1 DEL", "b1 DEL", "ports DEL", "first DEL"]
        );
        assert!(h.runner.attachments("sb1").await.is_empty());
        assert!(h.status.get("uid-multi").is_none());
        // Idempotent.
        h.process(&req(Command::Del, "uid-multi", "eth0"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn failing_extra_network_undoes_the_whole_add() {
        let agent = start_agent().await;
        agent
            .pods
            .set("uid-f", &[(podnet::NETWORKS_ANNOTATION, "net-a, net-b")]);
        std::fs::write(
            agent.dir.path().join("bin/b1"),
            "#!/bin/sh
cat >/dev/null
[ \"$CNI_COMMAND\" = VERSION ] && { echo '{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"0.4.0\"]}'; exit 0; }
[ \"$CNI_COMMAND\" = DEL ] && { echo \"b1 DEL {}\" >> $(dirname $0)/log; exit 0; }
echo '{\"code\":7,\"msg\":\"no such parent\",\"details\":\"eth9\"}'; exit 1
",
        )
        .unwrap();
        let h = &agent.handler;
        let e = h
            .process(&req(Command::Add, "uid-f", "eth0"))
            .await
            .unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str(), e.details.as_str()),
            (7, "no such parent", "eth9")
        );
        let order: Vec<_> = full_log(&agent)
            .iter()
            .map(|(p, c, _)| format!("{p} {c}"))
            .collect();
        assert_eq!(
            order,
            [
                "first ADD",
                "ports ADD",
                "a1 ADD",
                "b1 DEL",
                "a1 DEL",
                "ports DEL",
                "first DEL"
            ]
        );
        assert!(
            h.runner.attachments("sb1").await.is_empty(),
            "nothing leaks"
        );
        assert!(h.status.get("uid-f").is_none());
        let ev = h.events.events("uid-f");
        let err = ev.iter().find(|e| e.reason == REASON_ERROR).unwrap();
        assert!(
            err.message.contains("ADD net-b/net2")
                && err.message.contains("no such parent")
                && err.message.contains("code 7")
                && err.message.contains("eth9"),
            "{}",
            err.message
        );
        // Bad annotations fail before anything runs.
        let n = full_log(&agent).len();
        for bad in ["nope", "net-a@eth0", "-x"] {
            agent
                .pods
                .set("uid-f", &[(podnet::NETWORKS_ANNOTATION, bad)]);
            let e = h
                .process(&req(Command::Add, "uid-f", "eth0"))
                .await
                .unwrap_err();
            assert_eq!(e.code, codes::INVALID_CONFIG, "{bad}: {}", e.msg);
        }
        agent
            .pods
            .set("uid-f", &[(podnet::EGRESS_BANDWIDTH_ANNOTATION, "lots")]);
        let e = h
            .process(&req(Command::Add, "uid-f", "eth0"))
            .await
            .unwrap_err();
        assert!(e.msg.contains("egress-bandwidth"), "{}", e.msg);
        assert_eq!(full_log(&agent).len(), n);
    }

    #[test]
    fn natural_interface_order() {
        let mut v = vec!["net10", "net2", "data", "net1"];
        v.sort_by_key(|s| ifname_key(s));
        assert_eq!(v, ["data", "net1", "net2", "net10"]);
    }

    #[test]
    fn port_mapping_wire_format() {
        let pm = PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: "sctp".into(),
            host_ip: "127.0.0.1".into(),
        };
        assert_eq!(
            serde_json::to_value(&pm).unwrap(),
            serde_json::json!({"hostPort":8080,"containerPort":80,"protocol":"sctp","hostIP":"127.0.0.1"})
        );
    }
}
