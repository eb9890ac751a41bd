//! Plugin execution: the seam between the chain logic and the processes it
//! starts. `PluginExec` runs one plugin binary with the CNI environment and
//! a config on stdin and returns its stdout; `ProcessExec` is the real one.
//!
//! Side effects (ProcessExec): looks up binaries in the bin dirs, spawns a
//! plugin process in its own process group, and kills that group when the
//! plugin outlives its timeout.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Well-known CNI error codes (spec, "Well-known Error Codes").
pub mod codes {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Invalid necessary environment variables (CNI_COMMAND, CNI_ARGS, ...).
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODE_FAILURE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: a transient condition the runtime may retry.
    pub const TRY_AGAIN_LATER: u32 = 11;
}

/// A CNI command (spec 1.1: GC and STATUS included).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    /// Garbage collection (1.1.0): the config carries
    /// `cni.dev/valid-attachments`; only CNI_COMMAND and CNI_PATH are set.
    Gc,
    /// Plugin readiness (1.1.0): only CNI_COMMAND and CNI_PATH are set.
    Status,
}

impl Command {
    /// The value of CNI_COMMAND.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Gc => "GC",
            Command::Status => "STATUS",
        }
    }

    /// Parses a CNI_COMMAND value.
    pub fn parse(s: &str) -> Option<Command> {
        [
            Command::Add,
            Command::Del,
            Command::Check,
            Command::Version,
            Command::Gc,
            Command::Status,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }

    /// Whether the command concerns one container attachment (and so gets
    /// CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS).
    pub fn per_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The per-invocation CNI environment (CNI_PATH is the executor's business).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginEnv {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// CNI_ARGS, already joined as `K=V;K=V`.
    pub args: String,
}

/// The error object a plugin prints on stdout when it fails (spec, Result).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginError {
    #[serde(
        rename = "cniVersion",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub cni_version: String,
    pub code: u32,
    #[serde(default)]
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

/// Why running one plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// No executable named after the plugin's `type` in any bin dir.
    #[error("plugin {plugin} not found in {dirs:?}")]
    NotFound { plugin: String, dirs: Vec<PathBuf> },
    /// The binary exists but could not be started.
    #[error("cannot start plugin {plugin} ({})", path.display())]
    Spawn {
        plugin: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing stdin or reading the plugin's output failed.
    #[error("i/o with plugin {plugin}")]
    Io {
        plugin: String,
        #[source]
        source: std::io::Error,
    },
    /// The plugin ran longer than the timeout; its process group was killed.
    #[error("plugin {plugin} timed out after {timeout:?} and was killed")]
    Timeout { plugin: String, timeout: Duration },
    /// The plugin exited non-zero and printed a CNI error object.
    #[error("plugin {plugin} failed: {error}")]
    Plugin { plugin: String, error: PluginError },
    /// The plugin exited non-zero without a CNI error object on stdout.
    #[error("plugin {plugin} exited with {status}; stdout: {stdout:?}; stderr: {stderr:?}")]
    Exited {
        plugin: String,
        status: String,
        /// The first bytes of stdout, lossily decoded.
        stdout: String,
        /// The last bytes of stderr, lossily decoded.
        stderr: String,
    },
    /// The plugin exited 0 but its stdout is not a JSON object.
    #[error("plugin {plugin} printed something that is not a CNI result: {head:?}")]
    BadOutput {
        plugin: String,
        /// The first bytes of stdout, lossily decoded.
        head: String,
    },
}

impl ExecError {
    /// The plugin this is about.
    pub fn plugin(&self) -> &str {
        match self {
            ExecError::NotFound { plugin, .. }
            | ExecError::Spawn { plugin, .. }
            | ExecError::Io { plugin, .. }
            | ExecError::Timeout { plugin, .. }
            | ExecError::Plugin { plugin, .. }
            | ExecError::Exited { plugin, .. }
            | ExecError::BadOutput { plugin, .. } => plugin,
        }
    }

    /// The CNI error object this failure is reported as to the runtime.
    /// A plugin's own error passes through untouched; the rest get the
    /// well-known code that fits, mapped here and nowhere else.
    pub fn to_plugin_error(&self) -> PluginError {
        let code = match self {
            ExecError::Plugin { error, .. } => return error.clone(),
            ExecError::Timeout { .. } => codes::TRY_AGAIN_LATER,
            ExecError::NotFound { .. } => codes::INVALID_CONFIG,
            ExecError::BadOutput { .. } => codes::DECODE_FAILURE,
            ExecError::Spawn { .. } | ExecError::Io { .. } | ExecError::Exited { .. } => {
                codes::IO_FAILURE
            }
        };
        PluginError {
            cni_version: String::new(),
            code,
            msg: self.to_string(),
            details: String::new(),
        }
    }
}

/// Runs one CNI plugin. The chain is generic over this so tests can use a
/// scripted fake or tiny script plugins.
pub trait PluginExec: Send + Sync {
    /// Runs plugin `plugin_type` with `env` and `stdin`; returns its stdout
    /// on exit status 0 (possibly empty: DEL prints nothing).
    fn exec(
        &self,
        plugin_type: &str,
        env: &PluginEnv,
        stdin: &[u8],
    ) -> impl Future<Output = Result<Vec<u8>, ExecError>> + Send;

    /// What identifies the binary behind `plugin_type` now (path and mtime
    /// for real plugins): VERSION answers are cached until it changes. An
    /// error when there is no such plugin.
    fn identity(&self, plugin_type: &str) -> Result<String, ExecError> {
        Ok(plugin_type.to_owned())
    }
}

/// How many bytes of output an error message quotes.
const QUOTE_BYTES: usize = 256;

/// The first bytes of `b`, lossily decoded.
pub(crate) fn head(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(QUOTE_BYTES)]).into_owned()
}

fn tail(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[b.len().saturating_sub(QUOTE_BYTES)..])
        .trim()
        .to_owned()
}

/// Decodes a successful plugin's stdout into a result object.
pub fn parse_result(plugin: &str, stdout: &[u8]) -> Result<serde_json::Value, ExecError> {
    match serde_json::from_slice::<serde_json::Value>(stdout) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        _ => Err(ExecError::BadOutput {
            plugin: plugin.to_owned(),
            head: head(stdout),
        }),
    }
}

/// The real executor: plugin processes found in the bin dirs.
#[derive(Clone, Debug)]
pub struct ProcessExec {
    bin_dirs: Vec<PathBuf>,
    timeout: Duration,
}

impl ProcessExec {
    /// `timeout` bounds one plugin run (`cniPluginTimeout`).
    pub fn new(bin_dirs: Vec<PathBuf>, timeout: Duration) -> Self {
        Self { bin_dirs, timeout }
    }

    /// From the agent config's `cniBinDirs` and `cniPluginTimeout`.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Self::new(cfg.cni_bin_dirs.clone(), cfg.cni_plugin_timeout)
    }

    /// The first executable file named `plugin_type` in the bin dirs.
    pub fn find(&self, plugin_type: &str) -> Result<PathBuf, ExecError> {
        use std::os::unix::fs::PermissionsExt;
        let not_found = || ExecError::NotFound {
            plugin: plugin_type.to_owned(),
            dirs: self.bin_dirs.clone(),
        };
        // The type is a file name, never a path (config validation says so
        // too; this keeps a fake config from escaping the bin dirs).
        if plugin_type.is_empty() || plugin_type.contains('/') || plugin_type.starts_with('.') {
            return Err(not_found());
        }
        self.bin_dirs
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| {
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
            .ok_or_else(not_found)
    }

    fn cni_path(&self) -> String {
        let dirs: Vec<_> = self.bin_dirs.iter().map(|d| d.to_string_lossy()).collect();
        dirs.join(":")
    }

    async fn run(
        &self,
        path: &Path,
        plugin: &str,
        env: &PluginEnv,
        stdin: &[u8],
    ) -> Result<Vec<u8>, ExecError> {
        let io = |source| ExecError::Io {
            plugin: plugin.to_owned(),
            source,
        };
        let mut cmd = tokio::process::Command::new(path);
        // The plugin inherits the agent's environment (portmap needs PATH to
        // find iptables), minus stray CNI_* variables, plus its own.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CNI_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("CNI_COMMAND", env.command.as_str())
            .env("CNI_PATH", self.cni_path());
        // VERSION, GC and STATUS get only CNI_COMMAND and CNI_PATH (spec).
        if env.command.per_attachment() {
            cmd.env("CNI_CONTAINERID", &env.container_id)
                .env("CNI_NETNS", &env.netns)
                .env("CNI_IFNAME", &env.ifname)
                .env("CNI_ARGS", &env.args);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills whatever it started
            // too (a shell plugin's children hold its stdout open).
            .process_group(0)
            .kill_on_drop(true);
        // ETXTBSY: the binary was just written and another thread's fork
        // briefly holds the write fd (plugin installs, script tests). It
        // clears within milliseconds.
        let mut attempts = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 10 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                r => {
                    break r.map_err(|source| ExecError::Spawn {
                        plugin: plugin.to_owned(),
                        path: path.to_path_buf(),
                        source,
                    })?;
                }
            }
        };
        let pgid = child.id();
        let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let (Some(mut child_in), Some(mut child_out), Some(mut child_err)) = pipes else {
            return Err(ExecError::Spawn {
                plugin: plugin.to_owned(),
                path: path.to_path_buf(),
                source: std::io::Error::other("the plugin's stdio was not piped"),
            });
        };

        let work = async {
            let write = async {
                // A plugin may exit without reading stdin: not our failure.
                match child_in.write_all(stdin).await {
                    Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e),
                    _ => {}
                }
                drop(child_in);
                Ok(())
            };
            let mut out = Vec::new();
            let mut err = Vec::new();
            let (w, o, e, status) = tokio::join!(
                write,
                child_out.read_to_end(&mut out),
                child_err.read_to_end(&mut err),
                child.wait()
            );
            w?;
            o?;
            e?;
            Ok::<_, std::io::Error>((status?, out, err))
        };
        let (status, out, err) = match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r.map_err(io)?,
            Err(_) => {
                if let Some(pid) = pgid {
                    // Negative pid = the whole group; ESRCH just means it's gone.
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                // Reap it now; SIGKILL can't be ignored, so this is prompt.
                let _ = child.wait().await;
                return Err(ExecError::Timeout {
                    plugin: plugin.to_owned(),
                    timeout: self.timeout,
                });
            }
        };
        if status.success() {
            return Ok(out);
        }
        match serde_json::from_slice::<PluginError>(&out) {
            Ok(error) => Err(ExecError::Plugin {
                plugin: plugin.to_owned(),
                error,
            }),
            Err(_) => Err(ExecError::Exited {
                plugin: plugin.to_owned(),
                status: status.to_string(),
                stdout: head(&out),
                stderr: tail(&err),
            }),
        }
    }
}

impl PluginExec for ProcessExec {
    async fn exec(
        &self,
        plugin_type: &str,
        env: &PluginEnv,
        stdin: &[u8],
    ) -> Result<Vec<u8>, ExecError> {
        let path = self.find(plugin_type)?;
        self.run(&path, plugin_type, env, stdin).await
    }

    fn identity(&self, plugin_type: &str) -> Result<String, ExecError> {
        let path = self.find(plugin_type)?;
        let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        Ok(format!("{}@{mtime:?}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn env() -> PluginEnv {
        PluginEnv {
            command: Command::Add,
            container_id: "c1".into(),
            netns: "/var/run/netns/x".into(),
            ifname: "eth0".into(),
            args: "A=1;B=2".into(),
        }
    }

    #[tokio::test]
    async fn passes_env_and_stdin_and_returns_stdout() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "echoer",
            r#"printf '{"env":"%s %s %s %s %s %s","stdin":' "$CNI_COMMAND" "$CNI_CONTAINERID" "$CNI_NETNS" "$CNI_IFNAME" "$CNI_ARGS" "$CNI_PATH"; cat; printf '}'"#,
        );
        let other = tempfile::tempdir().unwrap();
        let exec = ProcessExec::new(
            vec![other.path().into(), dir.path().into()],
            Duration::from_secs(5),
        );
        let out = exec.exec("echoer", &env(), br#"{"x":1}"#).await.unwrap();
        let v = parse_result("echoer", &out).unwrap();
        let cni_path = format!("{}:{}", other.path().display(), dir.path().display());
        assert_eq!(
            v["env"],
            format!("ADD c1 /var/run/netns/x eth0 A=1;B=2 {cni_path}")
        );
        assert_eq!(v["stdin"]["x"], 1);
    }

    #[tokio::test]
    async fn missing_plugin_names_the_dirs() {
        let exec = ProcessExec::new(
            vec!["/nonexistent/a".into(), "/nonexistent/b".into()],
            Duration::from_secs(1),
        );
        let err = exec.exec("nope", &env(), b"{}").await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ExecError::NotFound { .. }));
        assert!(msg.contains("plugin nope not found in"), "{msg}");
        assert!(
            msg.contains("/nonexistent/a") && msg.contains("/nonexistent/b"),
            "{msg}"
        );
        // A path in `type` is never resolved.
        let err = exec.exec("../../bin/sh", &env(), b"{}").await.unwrap_err();
        assert!(matches!(err, ExecError::NotFound { .. }));
    }

    #[tokio::test]
    async fn hanging_plugin_is_killed_at_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        // The shell and its child both record their pids, then hang.
        script(
            dir.path(),
            "hang",
            &format!(
                "echo $$ >> {p}\nsh -c 'echo $$ >> {p}; exec sleep 300' &\nwait",
                p = pids.display()
            ),
        );
        let exec = ProcessExec::new(vec![dir.path().into()], Duration::from_millis(500));
        let start = std::time::Instant::now();
        let err = exec.exec("hang", &env(), b"{}").await.unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "took {:?}",
            start.elapsed()
        );
        assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
        assert_eq!(err.to_plugin_error().code, codes::TRY_AGAIN_LATER);
        let pids = std::fs::read_to_string(&pids).unwrap();
        let pids: Vec<i32> = pids.lines().map(|l| l.trim().parse().unwrap()).collect();
        assert_eq!(pids.len(), 2, "{pids:?}");
        // Give init a moment to reap the orphaned grandchild.
        for pid in pids {
            let gone = async {
                loop {
                    let stat =
                        std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    // Gone, or a zombie waiting to be reaped: either way dead.
                    if stat.is_empty()
                        || stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z'))
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(2), gone)
                .await
                .unwrap_or_else(|_| panic!("process {pid} still alive"));
        }
    }

    #[tokio::test]
    async fn error_json_keeps_code_msg_details() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "failer",
            r#"cat >/dev/null; echo '{"cniVersion":"1.0.0","code":101,"msg":"no addresses","details":"range 10.0.0.0/30 full"}'; echo log >&2; exit 1"#,
        );
        let exec = ProcessExec::new(vec![dir.path().into()], Duration::from_secs(5));
        let err = exec.exec("failer", &env(), b"{}").await.unwrap_err();
        let ExecError::Plugin { plugin, error } = &err else {
            panic!("{err}")
        };
        assert_eq!(plugin, "failer");
        assert_eq!(error.code, 101);
        assert_eq!(error.msg, "no addresses");
        assert_eq!(error.details, "range 10.0.0.0/30 full");
        assert_eq!(err.to_plugin_error(), *error);
    }

    #[tokio::test]
    async fn garbage_output_is_quoted() {
        let dir = tempfile::tempdir().unwrap();
        script(dir.path(), "garbage0", "echo 'hello world, not json'");
        script(
            dir.path(),
            "garbage1",
            "echo 'panic: runtime error'; echo 'goroutine 1' >&2; exit 2",
        );
        // Exits without reading its (large) stdin: must not be an error.
        script(dir.path(), "noread", "echo '{}'");
        let exec = ProcessExec::new(vec![dir.path().into()], Duration::from_secs(5));

        let out = exec.exec("garbage0", &env(), b"{}").await.unwrap();
        let err = parse_result("garbage0", &out).unwrap_err();
        assert!(err.to_string().contains("hello world, not json"), "{err}");
        assert_eq!(err.to_plugin_error().code, codes::DECODE_FAILURE);

        let err = exec.exec("garbage1", &env(), b"{}").await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ExecError::Exited { .. }), "{msg}");
        assert!(
            msg.contains("panic: runtime error") && msg.contains("goroutine 1"),
            "{msg}"
        );
        assert!(msg.contains("exit status: 2"), "{msg}");

        let big = vec![b' '; 1 << 20];
        assert_eq!(exec.exec("noread", &env(), &big).await.unwrap(), b"{}\n");
    }
}
