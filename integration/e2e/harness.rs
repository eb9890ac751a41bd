//! The real-stack harness: finds the stack `integration/stack.sh up` brought
//! up (containerd, registry, CNI plugins), starts minilet's real binary
//! against it with a private config, and gives tests a CRI client of their
//! own so they check the runtime, the files and the network, not minilet's
//! report alone. A missing stack is a test FAILURE, never a skip.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use minilet::cri::remote::RemoteRuntime;
use minilet::cri::{Labels, Runtime, api};

/// One test at a time: every agent installs its delegating plugin into the
/// same runtime CNI dir, so two agents at once would steal each other's
/// CNI requests.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The stack's env file, parsed.
pub struct Stack {
    pub env: HashMap<String, String>,
}

impl Stack {
    pub fn load() -> Stack {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::var("MINILET_STACK_DIR")
            .map_or_else(|_| repo.join("integration/.run"), PathBuf::from);
        let file = dir.join("env");
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
            panic!(
                "the real stack is not up ({}: {e}); run `integration/stack.sh up` first (CI does)",
                file.display()
            )
        });
        let env = text
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        Stack { env }
    }
    pub fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from the stack env file"))
    }
    pub async fn cri(&self) -> RemoteRuntime {
        let sock = self.get("CONTAINERD_SOCK");
        RemoteRuntime::connect(sock, sock, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("containerd at {sock} does not answer: {e}"))
    }
}

pub const BRIDGE: &str = "minie2e0";
pub const SUBNET_PREFIX: &str = "10.245.";
pub const NETWORK: &str = "e2e-bridge";

/// What a test may add to the agent's default setup.
#[derive(Default, Clone)]
pub struct Options {
    /// Extra CNI configs for cniConfDir: (file name, content). The default
    /// network (10-e2e.conflist) sorts first unless a file sorts before it.
    pub cni_configs: Vec<(String, String)>,
    /// Extra directories searched for CNI plugins (before Debian's).
    pub cni_bin_dirs: Vec<PathBuf>,
    /// Environment for the agent process.
    pub env: Vec<(String, String)>,
    /// cniPluginTimeout (default 20s).
    pub plugin_timeout: Option<String>,
    /// Extra command-line flags for the agent (`--kubeconfig PATH`, …).
    pub args: Vec<String>,
    /// Extra KubeletConfiguration lines (YAML, e.g. "maxPods: 5").
    pub kubelet_config: Vec<String>,
    /// Extra MiniletConfiguration lines (YAML).
    pub minilet_config: Vec<String>,
    /// Start without waiting for the agent to be ready (it is not while a
    /// source cannot list: an API server not reached, a node not yet
    /// bootstrapped).
    pub unready: bool,
}

fn lines(extra: &[String]) -> String {
    extra.iter().map(|l| format!("{l}\n")).collect()
}

/// A minilet process with its own config, manifests, state and logs.
pub struct Agent {
    pub node: String,
    pub dir: tempfile::TempDir,
    pub stack: Stack,
    pub options: Options,
    child: Option<Child>,
}

impl Agent {
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("minilet.yaml")
    }
    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }
    /// host-local's allocation files for our network.
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam").join(NETWORK)
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Write a config for `node` and start the agent.
    pub fn start(node: &str) -> Agent {
        Agent::start_with(node, Options::default())
    }

    /// `start` with extra CNI configs, plugin dirs or environment.
    pub fn start_with(node: &str, options: Options) -> Agent {
        let stack = Stack::load();
        let dir = tempfile::Builder::new()
            .prefix("minilet-e2e-")
            .tempdir()
            .unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("manifests")).unwrap();
        std::fs::create_dir_all(root.join("net.d")).unwrap();
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": true, "ipMasq": true, "hairpinMode": true,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("{SUBNET_PREFIX}0.0/16")}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": root.join("ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
                // Accepts the pods' traffic in FORWARD, which a Docker
                // engine's policy DROP would otherwise drop (docker.rs).
                {"type": "firewall"}
            ]
        });
        std::fs::write(
            root.join("net.d/10-e2e.conflist"),
            serde_json::to_vec_pretty(&conflist).unwrap(),
        )
        .unwrap();
        for (name, content) in &options.cni_configs {
            std::fs::write(root.join("net.d").join(name), content).unwrap();
        }
        let mut bin_dirs: Vec<String> = options
            .cni_bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        bin_dirs.push(stack.get("CNI_PLUGIN_DIR").to_string());
        let config = format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
             staticPodPath: {m}\ncontainerRuntimeEndpoint: {sock}\npodLogsDir: {logs}\n\
             fileCheckFrequency: 5s\n{eviction}{kextra}---\n\
             apiVersion: minilet.io/v1alpha1\nkind: MiniletConfiguration\n\
             stateDir: {state}\ncniConfDir: {netd}\ncniBinDirs: [{plugins}]\n\
             runtimeCNIConfDir: {rconf}\nruntimeCNIBinDir: {rbin}\ncniPluginTimeout: {timeout}\n{mextra}",
            // The test machines' one disk is shared with everything else
            // on them: kubelet's default nodefs.available<10% would taint
            // the test nodes with disk-pressure whenever it runs low.
            eviction = "evictionHard: {memory.available: 100Mi, nodefs.available: \"1%\", nodefs.inodesFree: \"1%\"}\n",
            kextra = lines(&options.kubelet_config),
            mextra = lines(&options.minilet_config),
            m = root.join("manifests").display(),
            sock = stack.get("CONTAINERD_SOCK"),
            logs = root.join("logs").display(),
            state = root.join("state").display(),
            netd = root.join("net.d").display(),
            plugins = bin_dirs.join(", "),
            timeout = options.plugin_timeout.as_deref().unwrap_or("20s"),
            rconf = stack.get("RUNTIME_CNI_CONF_DIR"),
            rbin = stack.get("RUNTIME_CNI_BIN_DIR"),
        );
        std::fs::write(root.join("minilet.yaml"), config).unwrap();
        let mut agent = Agent {
            node: node.to_string(),
            dir,
            stack,
            options,
            child: None,
        };
        if agent.options.unready {
            agent.restart_unready();
        } else {
            agent.spawn();
        }
        agent
    }

    fn spawn(&mut self) {
        self.restart_unready();
        self.wait_ready();
    }

    /// Start the agent again after `kill9`/`terminate` without waiting for
    /// it to be ready (it is not while a source cannot list).
    pub fn restart_unready(&mut self) {
        assert!(self.child.is_none(), "agent still running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        self.child = Some(self.command().stderr(log).spawn().expect("spawn minilet"));
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_minilet"));
        cmd.args([
            "--config",
            self.config().to_str().unwrap(),
            "--hostname-override",
            &self.node,
        ])
        .args(["--log-level", "info,minilet=debug"])
        .args(&self.options.args)
        .envs(self.options.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null());
        cmd
    }

    /// Wait (up to a minute) until the agent says it is ready.
    pub fn wait_ready(&self) {
        // Ready once the agent says so: runtime connected, sources synced,
        // its first relist done and every pod found then reconciled once.
        // (The control socket answers long before that.)
        let start = Instant::now();
        loop {
            let (code, out, err) = self.cli(&["get", "ready"]);
            if code == 0 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "minilet did not become ready: {out}{err}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's readiness report (`minilet get ready -o json`).
    pub fn ready(&self) -> serde_json::Value {
        let (_, out, err) = self.cli(&["get", "ready", "-o", "json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("get ready -o json: {e}: {out}{err}"))
    }

    /// Wait until the agent has relisted the runtime `n` more times: every
    /// pod it manages has been looked at again since the call.
    pub async fn wait_relists(&self, n: u64) {
        let relists = |a: &Agent| a.ready()["relists"].as_u64().unwrap_or(0);
        let target = relists(self) + n;
        eventually(
            &format!("{n} more relists"),
            Duration::from_secs(30),
            || async { (relists(self) >= target).then_some(()) },
        )
        .await;
    }

    /// Start the agent again with the same config and dirs.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "agent still running");
        self.spawn();
    }

    /// kill -9: no chance to clean anything up.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("agent running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "minilet ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Collect an agent process that died on its own.
    pub fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Run `minilet <args>` against this agent: (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_minilet"))
            .args([
                "--config",
                self.config().to_str().unwrap(),
                "--hostname-override",
                &self.node,
            ])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn get_pods(&self) -> String {
        let (code, out, err) = self.cli(&["get", "pods"]);
        assert_eq!(code, 0, "get pods failed: {err}");
        out
    }

    pub fn pods_json(&self) -> serde_json::Value {
        let (code, out, err) = self.cli(&["get", "pods", "-o", "json"]);
        assert_eq!(code, 0, "get pods -o json failed: {err}");
        serde_json::from_str(&out).unwrap()
    }

    pub fn write_manifest(&self, file: &str, yaml: &str) {
        // Write then rename, as editors and config managers do.
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.manifests().join(file)).unwrap();
    }

    pub fn remove_manifest(&self, file: &str) {
        std::fs::remove_file(self.manifests().join(file)).unwrap();
    }

    /// Labels selecting this agent's objects in the runtime.
    pub fn selector(&self) -> Labels {
        Labels::from([("io.minilet.node".to_string(), self.node.clone())])
    }

    pub fn pod_selector(&self, pod: &str) -> Labels {
        let mut l = self.selector();
        l.insert(
            "io.kubernetes.pod.name".into(),
            format!("{pod}-{}", self.node),
        );
        l
    }
}

impl Drop for Agent {
    /// Leave the runtime clean: remove every manifest, let the agent tear the
    /// pods down (through CNI DEL), then stop it.
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The agent's own account of what happened, for the failure report.
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("---- agent {} log (last 80 lines) ----", self.node);
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
        if self.child.is_none() {
            self.spawn();
        }
        if let Ok(entries) = std::fs::read_dir(self.manifests()) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        // First every worker must be done: a sandbox whose RunPodSandbox is
        // still in flight is not listed by the runtime yet, so an empty list
        // alone could stop the agent before it removes that sandbox.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            let (code, out, _) = self.cli(&["get", "pods"]);
            if code == 0 && out.starts_with("No resources found.") {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let selector = self.selector();
        let sock = self.stack.get("CONTAINERD_SOCK").to_string();
        // Its own thread and runtime: Drop may run inside a test's runtime.
        let clean = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let cri = RemoteRuntime::connect(&sock, &sock, Duration::from_secs(30))
                    .await
                    .ok()?;
                for _ in 0..300 {
                    let sbs = cri.list_pod_sandboxes(selector.clone()).await.ok()?;
                    if sbs.is_empty() {
                        return Some(());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                None
            })
        })
        .join()
        .unwrap_or(None);
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
        if clean.is_none() && !std::thread::panicking() {
            panic!(
                "agent {} did not clean up its pods:\n{}",
                self.node,
                self.log()
            );
        }
    }
}

/// Poll `f` until it returns `Some`, or fail with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A container's name label.
pub fn cname(c: &api::Container) -> &str {
    c.labels
        .get("io.kubernetes.container.name")
        .map_or("", String::as_str)
}

pub fn running(c: &api::Container) -> bool {
    c.state == api::ContainerState::ContainerRunning as i32
}

pub fn exited(c: &api::Container) -> bool {
    c.state == api::ContainerState::ContainerExited as i32
}

/// netns files the runtime created (`/var/run/netns/cni-*`).
pub fn netns_count() -> usize {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("cni-"))
                .count()
        })
        .unwrap_or(0)
}

/// veth interfaces attached to the test bridge.
pub fn bridge_ports() -> usize {
    let out = Command::new("ip")
        .args(["-o", "link", "show", "master", BRIDGE])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Addresses host-local holds for our network (its files named by IP).
pub fn allocated_ips(agent: &Agent) -> Vec<String> {
    std::fs::read_dir(agent.ipam_dir())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(SUBNET_PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

/// GET http://addr/ with a plain TCP client; returns the body.
pub fn http_get(addr: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// The fault hook exists only in builds with the `fault-injection` feature
/// (never the shipped binary): without it the tests that need it fail, and
/// say how to run them.
#[cfg(not(feature = "fault-injection"))]
pub fn needs_fault_hook() {
    panic!(
        "this test needs minilet's fault hook: run the e2e suite with \
         `cargo test --features fault-injection` (integration/test.sh does)"
    );
}
#[cfg(feature = "fault-injection")]
pub fn needs_fault_hook() {}

/// The lines container `app` of pod `namespace`/`pod` printed in its first
/// log (CRI log lines `<time> stdout F <text>`, text only); `None` before
/// the log exists.
pub fn first_log_lines(agent: &Agent, namespace: &str, pod: &str) -> Option<Vec<String>> {
    let prefix = format!("{namespace}_{pod}_");
    let dir = std::fs::read_dir(agent.logs_dir())
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))?;
    let text = std::fs::read_to_string(dir.path().join("app/0.log")).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3).map(str::to_string))
            .collect(),
    )
}
