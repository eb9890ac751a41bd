//! The agent side of the delegating plugin: a root-only unix socket on which
//! each connection carries one `AgentRequest` from `minilet-cni`; the chain
//! runs and the answer goes back as one `AgentResponse`.
//!
//! Port mappings come from the pod spec the agent holds (found by
//! K8S_POD_UID in CNI_ARGS) when the pod is known, else from the runtime's
//! `runtimeConfig`.
//!
//! Side effects: creates (replacing a stale one) and serves the socket; runs
//! the chain, which execs plugins and writes the result cache.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::chain::{Attachment, CniRunner};
use super::delegate::{AgentRequest, AgentResponse, MAX_MESSAGE, convertible, incompatible};
use super::exec::{Command, PluginError, PluginExec, codes};

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

/// What the server asks the agent's pod state about a pod.
pub trait PodNetworkLookup: Send + Sync {
    /// The pod's host port mappings; `None` when the agent doesn't know the
    /// pod (then the runtime's runtimeConfig is used).
    fn port_mappings(&self, pod_uid: &str) -> Option<Vec<PortMapping>>;
}

/// How long a client may take to send its request.
const READ_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the agent socket at `path`, mode 0600. A stale socket (nobody
/// listening) is replaced; a live one, or a non-socket file, is an error.
/// The socket is bound under a temporary name, chmodded, then renamed into
/// place, so it is never reachable with looser permissions.
/// Must be called inside a tokio runtime.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running agent", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Serves the socket until `cancel` fires, then lets in-flight requests
/// finish (each is bounded by the plugin timeouts): cutting a chain off half
/// way would leave the node in a state no cache describes.
pub async fn serve<E: PluginExec + 'static>(
    listener: UnixListener,
    runner: Arc<CniRunner<E>>,
    pods: Arc<dyn PodNetworkLookup>,
    cancel: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tasks.spawn(handle_connection(stream, runner.clone(), pods.clone()));
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

async fn handle_connection<E: PluginExec>(
    mut stream: UnixStream,
    runner: Arc<CniRunner<E>>,
    pods: Arc<dyn PodNetworkLookup>,
) {
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
                let outcome = process(&req, &runner, pods.as_ref()).await;
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
    let body = serde_json::to_vec(&response).expect("responses serialise");
    // The plugin may have given up already; nothing more to do then.
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
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

async fn process<E: PluginExec>(
    req: &AgentRequest,
    runner: &CniRunner<E>,
    pods: &dyn PodNetworkLookup,
) -> Result<Option<Value>, PluginError> {
    // Refuse before touching the node when the result couldn't be handed
    // out in the runtime's version anyway.
    let chain_version = &runner.network().cni_version;
    if !convertible(chain_version, &req.cni_version) {
        return Err(incompatible(chain_version, &req.cni_version));
    }
    let mut att = Attachment {
        container_id: req.container_id.clone(),
        netns: req.netns.clone(),
        ifname: req.ifname.clone(),
        args: req.args.clone(),
        capability_args: req.runtime_config.clone(),
    };
    // The pod spec is the authority on host ports when we hold the pod.
    if let Some(mappings) = arg(req, "K8S_POD_UID").and_then(|uid| pods.port_mappings(uid)) {
        if mappings.is_empty() {
            att.capability_args.remove("portMappings");
        } else {
            let v = serde_json::to_value(mappings).expect("port mappings serialise");
            att.capability_args.insert("portMappings".into(), v);
        }
    }
    match req.command {
        Command::Add => {
            let result = runner.add(&att).await.map_err(|e| e.to_plugin_error())?;
            if !has_container_ip(&result, &att.ifname) {
                // containerd refuses such a result ("failed to find network
                // info for sandbox"): say why here, where it's debuggable.
                tracing::warn!(ifname = %att.ifname, "chain result has no IP on the container interface");
            }
            Ok(Some(result))
        }
        Command::Del => {
            runner
                .del_with_fallback(&att, req.prev_result.as_ref())
                .await
                .map_err(|e| e.to_plugin_error())?;
            Ok(None)
        }
        Command::Check => Err(fail(
            codes::UNSUPPORTED_FIELD,
            "CHECK is not implemented by minilet yet",
        )),
        Command::Version => Err(fail(
            codes::INVALID_ENV,
            "VERSION is answered by the plugin",
        )),
    }
}

/// Whether the result holds an interface named `ifname` inside a sandbox
/// with at least one IP pointing at it.
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
    use std::path::PathBuf;

    /// Knows one pod, uid "uid-known", with one host port.
    struct Pods;
    impl PodNetworkLookup for Pods {
        fn port_mappings(&self, pod_uid: &str) -> Option<Vec<PortMapping>> {
            (pod_uid == "uid-known").then(|| {
                vec![PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: "tcp".into(),
                    host_ip: String::new(),
                }]
            })
        }
    }

    struct Agent {
        dir: tempfile::TempDir,
        socket: PathBuf,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    /// An agent on a temp socket running the recording plugin as a chain
    /// of `first` and `ports` (which declares portMappings).
    async fn start_agent() -> Agent {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cni/testdata/record.sh");
        for n in ["first", "ports"] {
            std::fs::copy(&src, bin.join(n)).unwrap();
            std::fs::set_permissions(bin.join(n), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let net = crate::cni::config::parse(
            br#"{"cniVersion":"1.0.0","name":"chain","plugins":[{"type":"first"},{"type":"ports","capabilities":{"portMappings":true}}]}"#,
            true,
            Path::new("test.conflist"),
        )
        .unwrap();
        let runner = Arc::new(CniRunner::new(
            ProcessExec::new(vec![bin], Duration::from_secs(10)),
            net,
            ResultCache::new(dir.path().join("cache")),
        ));
        let socket = dir.path().join("run/cni.sock");
        let listener = bind(&socket).unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(listener, runner, Arc::new(Pods), cancel.clone()));
        Agent {
            dir,
            socket,
            cancel,
            task,
        }
    }

    fn plugin_log(agent: &Agent) -> Vec<Value> {
        std::fs::read_to_string(agent.dir.path().join("bin/log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l.splitn(3, ' ').nth(2).unwrap()).unwrap())
            .collect()
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

        // A runtime config in another result format: refused before any plugin runs.
        let (code, out, _) =
            run_plugin("ADD", "uid-other", runtime_conf(&agent.socket, "0.4.0", 60)).await;
        assert_eq!(code, 1);
        let e: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(e["code"], codes::INCOMPATIBLE_VERSION);
        assert_eq!(e["cniVersion"], "0.4.0");
        assert_eq!(plugin_log(&agent).len(), 6);

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
        // CHECK is not there yet, and says so.
        let (code, out, _) = run_plugin(
            "CHECK",
            "uid-known",
            runtime_conf(&agent.socket, "1.0.0", 60),
        )
        .await;
        assert_eq!(code, 1);
        assert!(out.contains("CHECK is not implemented"), "{out}");
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
        let e: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(e["code"], codes::TRY_AGAIN_LATER);
        assert!(
            e["msg"]
                .as_str()
                .unwrap()
                .contains("did not answer within 1s"),
            "{e}"
        );
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
