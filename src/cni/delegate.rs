//! The delegating plugin (`minilet-cni`): the one plugin the container
//! runtime knows. It answers VERSION itself, answers GC with success
//! (minilet collects its own attachments), and forwards ADD, DEL, CHECK and
//! STATUS over the agent's root-only unix socket; the agent runs its own
//! networks and answers with the result or a CNI error, which this prints
//! in the CNI wire format, the result converted to the runtime's cniVersion.
//! This file also defines that socket's request/response types, shared with
//! `server`.
//!
//! When no agent listens on the socket (no socket file, or a stale one),
//! DEL and CHECK run here instead (`local`), from the agent settings the
//! runtime's config carries under `withoutAgent`: tearing a pod down must
//! not depend on the agent being up. ADD (and STATUS) fail fast with "agent
//! not running".
//!
//! It runs as a short-lived process per CNI call, so the forwarding path is
//! synchronous and std-only (no tokio runtime): it must start fast and can
//! never hang — the connect is bounded by 2 s and the whole exchange by
//! `timeoutSeconds`, which also bounds a DEL or CHECK run here.
//!
//! Side effects: reads the environment and stdin, dials the agent socket,
//! writes stdout; without an agent, those of `local`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::exec::{Command, PluginError, codes};

/// The CNI versions the delegating plugin accepts in the runtime's config
/// (results are converted to any of them).
pub const SUPPORTED_VERSIONS: [&str; 5] = super::version::RESULT_VERSIONS;

/// The version this plugin speaks when nothing else is asked for.
pub const PLUGIN_VERSION: &str = "1.1.0";

/// Bound on the connect to the agent socket.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Whole-request bound when the config has no `timeoutSeconds`.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 60;

/// Largest request or response either side accepts.
pub const MAX_MESSAGE: u64 = 1 << 20;

/// What the plugin sends the agent: one per connection, then it half-closes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRequest {
    pub command: Command,
    /// Empty for STATUS.
    #[serde(default)]
    pub container_id: String,
    #[serde(default)]
    pub netns: String,
    /// Empty for STATUS.
    #[serde(default)]
    pub ifname: String,
    /// CNI_ARGS, split into pairs.
    #[serde(default)]
    pub args: Vec<(String, String)>,
    /// The `runtimeConfig` the runtime put in the plugin's stdin config.
    #[serde(default)]
    pub runtime_config: Map<String, Value>,
    /// The `cniVersion` of the runtime's config: the result must be in it.
    pub cni_version: String,
    /// The runtime's `prevResult` (DEL, CHECK), a fallback for a lost cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<Value>,
}

/// The agent's answer: a result (ADD), nothing (DEL), or an error.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<PluginError>,
}

/// The runtime's config for this plugin (what `install` writes, plus what
/// the runtime adds).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DelegateConf {
    cni_version: String,
    agent_socket: Option<PathBuf>,
    timeout_seconds: Option<u64>,
    #[serde(default)]
    runtime_config: Map<String, Value>,
    #[serde(default)]
    prev_result: Option<Value>,
    /// What DEL and CHECK run with when the agent is not there (configs
    /// written by older agents lack it: those fail as ADD does). Decoded
    /// only when needed, so it can never break the forwarding path.
    #[serde(default)]
    without_agent: Option<Value>,
}

/// Converts the agent's result into the runtime's version.
fn convert_result(result: Value, want: &str) -> Result<Value, PluginError> {
    super::version::convert_result(&result, want).map_err(|e| PluginError {
        cni_version: String::new(),
        code: codes::INCOMPATIBLE_VERSION,
        msg: format!("cannot hand the result out in cniVersion {want}: {e}"),
        details: String::new(),
    })
}

/// Splits CNI_ARGS (`K=V;K=V`); empty segments are skipped.
pub fn parse_cni_args(s: &str) -> Result<Vec<(String, String)>, String> {
    s.split(';')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(format!("invalid CNI_ARGS pair {kv:?}: want KEY=VALUE")),
        })
        .collect()
}

pub(crate) fn err(code: u32, msg: impl Into<String>) -> PluginError {
    PluginError {
        cni_version: String::new(),
        code,
        msg: msg.into(),
        details: String::new(),
    }
}

/// The plugin's entry point: `main` calls this when invoked as `minilet-cni`.
/// Returns the process exit code.
pub fn run_plugin() -> i32 {
    let env: HashMap<String, String> = std::env::vars().collect();
    run(
        &env,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
    )
}

/// The plugin with its environment, stdin and stdout injected (tests call
/// this in-process). Prints a result or a CNI error object; returns 0 or 1.
pub fn run(env: &HashMap<String, String>, stdin: &mut dyn Read, stdout: &mut dyn Write) -> i32 {
    // Errors are reported in the runtime's version once we know it.
    let mut version = PLUGIN_VERSION.to_owned();
    let outcome = handle(env, stdin, &mut version);
    let (out, code) = match outcome {
        Ok(Some(v)) => (Some(v), 0),
        Ok(None) => (None, 0),
        Err(mut e) => {
            e.cni_version = version;
            (Some(serde_json::to_value(e).expect("errors serialise")), 1)
        }
    };
    if let Some(v) = out {
        let mut bytes = serde_json::to_vec(&v).expect("JSON serialises");
        bytes.push(b'\n');
        if stdout
            .write_all(&bytes)
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return 1;
        }
    }
    code
}

fn handle(
    env: &HashMap<String, String>,
    stdin: &mut dyn Read,
    version: &mut String,
) -> Result<Option<Value>, PluginError> {
    let get = |k: &str| env.get(k).map(String::as_str).unwrap_or("");
    let command = Command::parse(get("CNI_COMMAND")).ok_or_else(|| {
        err(
            codes::INVALID_ENV,
            format!("unknown CNI_COMMAND {:?}", get("CNI_COMMAND")),
        )
    })?;
    if command == Command::Version {
        return Ok(Some(serde_json::json!({
            "cniVersion": PLUGIN_VERSION,
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }

    let mut raw = Vec::new();
    stdin.take(MAX_MESSAGE).read_to_end(&mut raw).map_err(|e| {
        err(
            codes::IO_FAILURE,
            format!("reading the network config from stdin: {e}"),
        )
    })?;
    let conf: DelegateConf = serde_json::from_slice(&raw).map_err(|e| {
        err(
            codes::DECODE_FAILURE,
            format!("decoding the network config: {e}"),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(PluginError {
            details: format!("minilet-cni supports {SUPPORTED_VERSIONS:?}"),
            ..err(
                codes::INCOMPATIBLE_VERSION,
                format!("incompatible CNI version {:?}", conf.cni_version),
            )
        });
    }
    version.clone_from(&conf.cni_version);
    let socket = conf.agent_socket.ok_or_else(|| {
        err(
            codes::INVALID_CONFIG,
            "network config has no \"agentSocket\"",
        )
    })?;

    if command == Command::Gc {
        // minilet's agent collects its own stale attachments (at start and
        // periodically); the runtime's view adds nothing it lacks.
        return Ok(None);
    }
    let container_id = get("CNI_CONTAINERID");
    let ifname = get("CNI_IFNAME");
    let netns = get("CNI_NETNS");
    if command != Command::Status
        && (container_id.is_empty()
            || ifname.is_empty()
            || (netns.is_empty() && command != Command::Del))
    {
        return Err(err(
            codes::INVALID_ENV,
            format!("{command} needs CNI_CONTAINERID, CNI_IFNAME and (except for DEL) CNI_NETNS"),
        ));
    }
    let args = parse_cni_args(get("CNI_ARGS")).map_err(|m| err(codes::INVALID_ENV, m))?;
    let request = AgentRequest {
        command,
        container_id: container_id.to_owned(),
        netns: netns.to_owned(),
        ifname: ifname.to_owned(),
        args,
        runtime_config: conf.runtime_config,
        cni_version: conf.cni_version.clone(),
        prev_result: conf.prev_result,
    };
    let timeout = Duration::from_secs(
        conf.timeout_seconds
            .unwrap_or(DEFAULT_TIMEOUT_SECONDS)
            .max(1),
    );
    // DEL and CHECK are idempotent: when the agent goes away mid-request
    // (stopping, or dying: the connection breaks before any answer), ask
    // again; with no agent left they run here.
    let mut lost = 0;
    let response = loop {
        let stream = match connect(&socket, CONNECT_TIMEOUT.min(timeout)) {
            Ok(stream) => stream,
            Err(e) => {
                // No agent at all (not merely a slow one): DEL and CHECK
                // run here, so a pod can be torn down while it is down.
                let absent = matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                );
                return match conf.without_agent {
                    Some(settings) if absent && super::local::runs_without_agent(command) => {
                        let settings: super::local::Settings = serde_json::from_value(settings)
                            .map_err(|e| {
                                err(
                                    codes::INVALID_CONFIG,
                                    format!("decoding \"withoutAgent\": {e}"),
                                )
                            })?;
                        super::local::run(&settings, &request, timeout).map(|_| None)
                    }
                    _ => Err(err(
                        codes::TRY_AGAIN_LATER,
                        format!("agent not running at {}: {e}", socket.display()),
                    )),
                };
            }
        };
        match call_agent(stream, &socket, &request, timeout) {
            Ok(response) => break response,
            Err(CallError::Lost(_))
                if super::local::runs_without_agent(command) && lost < LOST_RETRIES =>
            {
                lost += 1;
                std::thread::sleep(LOST_PAUSE);
            }
            Err(CallError::Lost(e) | CallError::Failed(e)) => return Err(e),
        }
    };
    if let Some(e) = response.error {
        return Err(e);
    }
    match (command, response.result) {
        (Command::Add, Some(result)) => convert_result(result, &conf.cni_version).map(Some),
        (Command::Add, None) => Err(err(
            codes::DECODE_FAILURE,
            "the agent answered ADD without a result",
        )),
        // DEL, CHECK and STATUS print nothing on success.
        _ => Ok(None),
    }
}

/// How often DEL or CHECK is asked again after the agent went away
/// mid-request, and the pause before each time.
const LOST_RETRIES: u32 = 3;
const LOST_PAUSE: Duration = Duration::from_millis(100);

/// Why an exchange with the agent failed.
enum CallError {
    /// The connection broke before any byte of an answer: the agent went
    /// away mid-request (it stopped, or died).
    Lost(PluginError),
    /// Anything else: a timeout, a bad answer.
    Failed(PluginError),
}

impl From<PluginError> for CallError {
    fn from(e: PluginError) -> Self {
        CallError::Failed(e)
    }
}

/// Whether an I/O error means the peer is gone.
fn peer_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::NotConnected
    )
}

/// One request/response exchange with the agent on `stream` (connected to
/// `socket`), bounded by `timeout`.
fn call_agent(
    mut stream: UnixStream,
    socket: &Path,
    request: &AgentRequest,
    timeout: Duration,
) -> Result<AgentResponse, CallError> {
    let deadline = Instant::now() + timeout;
    let too_slow = || {
        err(
            codes::TRY_AGAIN_LATER,
            format!(
                "agent at {} did not answer within {}s",
                socket.display(),
                timeout.as_secs()
            ),
        )
    };
    let io_err = |e: std::io::Error| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            CallError::Failed(too_slow())
        } else {
            let pe = err(
                codes::IO_FAILURE,
                format!("talking to the agent at {}: {e}", socket.display()),
            );
            if peer_gone(&e) {
                CallError::Lost(pe)
            } else {
                CallError::Failed(pe)
            }
        }
    };
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    };

    let body = serde_json::to_vec(request).expect("requests serialise");
    stream
        .set_write_timeout(Some(remaining().ok_or_else(too_slow)?))
        .map_err(io_err)?;
    stream.write_all(&body).map_err(io_err)?;
    // Half-close: the agent reads the request to EOF.
    stream.shutdown(std::net::Shutdown::Write).map_err(io_err)?;

    // A read timeout bounds one read, so re-arm it with what is left.
    let mut reply = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        stream
            .set_read_timeout(Some(remaining().ok_or_else(too_slow)?))
            .map_err(io_err)?;
        match stream.read(&mut buf) {
            Ok(0) if reply.is_empty() => {
                return Err(CallError::Lost(err(
                    codes::IO_FAILURE,
                    format!(
                        "the agent at {} closed the connection without an answer",
                        socket.display()
                    ),
                )));
            }
            Ok(0) => break,
            Ok(n) => {
                reply.extend_from_slice(&buf[..n]);
                if reply.len() as u64 > MAX_MESSAGE {
                    return Err(CallError::Failed(err(
                        codes::DECODE_FAILURE,
                        "the agent's answer is too large",
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if reply.is_empty() => return Err(io_err(e)),
            Err(e) => return Err(CallError::Failed(io_err(e).into_inner())),
        }
    }
    serde_json::from_slice(&reply).map_err(|e| {
        CallError::Failed(err(
            codes::DECODE_FAILURE,
            format!(
                "the agent's answer is not valid ({e}): {:?}",
                super::exec::head(&reply)
            ),
        ))
    })
}

impl CallError {
    fn into_inner(self) -> PluginError {
        match self {
            CallError::Lost(e) | CallError::Failed(e) => e,
        }
    }
}

/// `UnixStream::connect` with a bound: it can block when the agent's accept
/// backlog is full. The connecting thread is left behind on timeout; the
/// process exits right after.
fn connect(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(UnixStream::connect(&p));
    });
    rx.recv_timeout(timeout).unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_parse() {
        assert_eq!(parse_cni_args("").unwrap(), vec![]);
        assert_eq!(
            parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=web;;X=a=b;E=").unwrap(),
            vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAME".into(), "web".into()),
                ("X".into(), "a=b".into()),
                ("E".into(), String::new()),
            ]
        );
        assert!(parse_cni_args("novalue").is_err());
        assert!(parse_cni_args("=v").is_err());
    }

    #[test]
    fn results_are_converted_to_the_runtime_version() {
        let r = serde_json::json!({"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.0.0.2/24"}]});
        assert_eq!(
            convert_result(r.clone(), "0.3.1").unwrap()["cniVersion"],
            "0.3.1"
        );
        assert_eq!(convert_result(r.clone(), "0.4.0").unwrap(), r);
        assert_eq!(
            convert_result(r, "1.1.0").unwrap(),
            serde_json::json!({"cniVersion": "1.1.0", "ips": [{"address": "10.0.0.2/24"}]})
        );
        let r1 = serde_json::json!({"cniVersion": "1.0.0", "ips": [{"address": "fd00::2/64"}]});
        assert_eq!(
            convert_result(r1, "0.4.0").unwrap(),
            serde_json::json!({"cniVersion": "0.4.0", "ips": [{"version": "6", "address": "fd00::2/64"}]})
        );
        let e = convert_result(serde_json::json!({"cniVersion": "0.2.0"}), "1.0.0").unwrap_err();
        assert_eq!(e.code, codes::INCOMPATIBLE_VERSION);
        assert!(e.msg.contains("0.2.0"), "{}", e.msg);
    }

    fn run_with(env: &[(&str, &str)], stdin: &str) -> (i32, Value) {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut out = Vec::new();
        let code = run(&env, &mut stdin.as_bytes(), &mut out);
        let v = if out.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&out).unwrap()
        };
        (code, v)
    }

    #[test]
    fn version_is_answered_locally() {
        let (code, out) = run_with(&[("CNI_COMMAND", "VERSION")], "");
        assert_eq!(code, 0);
        assert_eq!(
            out,
            serde_json::json!({"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]})
        );
        // GC is answered locally too (no agent socket is dialled).
        let (code, out) = run_with(
            &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
            r#"{"cniVersion":"1.1.0","name":"minilet","agentSocket":"/nonexistent","cni.dev/valid-attachments":[]}"#,
        );
        assert_eq!((code, out), (0, Value::Null));
    }

    #[test]
    fn a_bad_without_agent_section_fails_only_the_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","agentSocket":"{}/none.sock","withoutAgent":{{"cniConfDir":7}}}}"#,
            dir.path().display()
        );
        let env = |cmd| {
            [
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", "/var/run/netns/x"),
                ("CNI_IFNAME", "eth0"),
            ]
        };
        let (rc, out) = run_with(&env("DEL"), &conf);
        assert_eq!(
            (rc, out["code"].as_u64()),
            (1, Some(codes::INVALID_CONFIG.into()))
        );
        assert!(
            out["msg"].as_str().unwrap().contains("withoutAgent"),
            "{out}"
        );
        // ADD never reads it: it fails for the missing agent, as always.
        let (rc, out) = run_with(&env("ADD"), &conf);
        assert_eq!(
            (rc, out["code"].as_u64()),
            (1, Some(codes::TRY_AGAIN_LATER.into()))
        );
    }

    #[test]
    fn bad_input_gives_cni_errors() {
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        type Env<'a> = &'a [(&'a str, &'a str)];
        let cases: [(Env, &str, u32, &str); 6] = [
            (
                &[("CNI_COMMAND", "FROB")],
                "{}",
                codes::INVALID_ENV,
                "unknown CNI_COMMAND",
            ),
            (&env, "not json", codes::DECODE_FAILURE, "decoding"),
            (
                &env,
                r#"{"cniVersion":"9.9.9","agentSocket":"/x"}"#,
                codes::INCOMPATIBLE_VERSION,
                "9.9.9",
            ),
            (
                &env,
                r#"{"cniVersion":"1.0.0"}"#,
                codes::INVALID_CONFIG,
                "agentSocket",
            ),
            (
                &env[..2],
                r#"{"cniVersion":"1.0.0","agentSocket":"/x"}"#,
                codes::INVALID_ENV,
                "CNI_IFNAME",
            ),
            (
                &[
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "c1"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_ARGS", "bad"),
                ],
                r#"{"cniVersion":"1.0.0","agentSocket":"/x"}"#,
                codes::INVALID_ENV,
                "CNI_ARGS",
            ),
        ];
        for (env, stdin, code, msg) in cases {
            let (rc, out) = run_with(env, stdin);
            assert_eq!(rc, 1, "{stdin}");
            assert_eq!(out["code"], code, "{out}");
            assert!(out["msg"].as_str().unwrap().contains(msg), "{out}");
            assert!(out["cniVersion"].is_string(), "{out}");
        }
    }
}
