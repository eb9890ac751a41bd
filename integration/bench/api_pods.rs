//! Benchmark: N bare pods (default 30, env BENCH_PODS) created at once
//! through a real kube-apiserver, on a minilet node and on a kubelet v1.20.2
//! node, one agent at a time on the same containerd. Per agent: creation ->
//! Running (phase Running, every container ready) as a watch sees it, status
//! writes per pod until all run (from the API server's audit log), the
//! agent's RSS with N pods, and its API requests per minute while idle with
//! 10 pods (env BENCH_IDLE_PODS) over BENCH_IDLE_SECS (default 300). See
//! integration/bench/README.md.
//!
//! Runs as root against the stack of `integration/stack.sh up` and the
//! control plane of `integration/control-plane.sh up`. It takes the e2e lock
//! (/tmp/minilet-e2e.lock) itself, once per agent, and releases it between
//! them: do not wrap it in `flock` (or set BENCH_NO_LOCK=1 if you hold it).
//! Side effects: the Node objects bench-kubelet / bench-minilet (deleted
//! before and after), pods named apb-* in `default`, a CNI conflist in the
//! runtime's conf dir while kubelet runs, the bridge mlbench1; and what
//! kubelet does to the host (sysctls, iptables chains, /var/log/pods, …),
//! undone after it stops. Not a pass/fail test: it prints a table, whether
//! each target is met, and JSON.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use minilet::cri::remote::RemoteRuntime;
use minilet::cri::{Labels, Runtime};
use minilet::labels;
use serde_json::json;

/// Pods of this benchmark are named `apb-<agent>-NNN` and labelled so.
const POD_PREFIX: &str = "apb-";
const BENCH_LABEL: &str = "minilet.io/bench";
const BENCH_VALUE: &str = "api-pods";
const NAMESPACE: &str = "default";
/// The benchmark's own network for both agents: bridge and subnet collide
/// neither with the e2e tests' (minie2e0, 10.245/16) nor with static_pods'
/// (mlbench0, 10.246/16).
const NET_NAME: &str = "minilet-bench-api";
const BRIDGE: &str = "mlbench1";
const SUBNET: &str = "10.247.0.0/16";
/// kubelet's conflist in the runtime's conf dir (containerd loads the first
/// by name); whatever was there is parked under an extension it ignores.
const KUBELET_CONF: &str = "00-bench-kubelet.conflist";
const ASIDE_SUFFIX: &str = ".bench-aside";
const IDLE_PODS: usize = 10;
const IDLE_SECS: usize = 300;
/// After the deletions down to the idle set: let the agent finish its
/// teardown writes before the idle window opens.
const IDLE_SETTLE: Duration = Duration::from_secs(15);
/// The audit log backend writes before the response; a little slack anyway.
const AUDIT_SLACK: Duration = Duration::from_secs(2);
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const START_TIMEOUT: Duration = Duration::from_secs(180);
const DELETE_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(20);
const LOCK_FILE: &str = "/tmp/minilet-e2e.lock";

/// Targets of issue 7.
const TARGET_P99_FACTOR: f64 = 0.5;
const TARGET_RSS_MIB: f64 = 25.0;

/// Host settings kubelet v1.20 changes at start (container_manager_linux
/// setupKernelTunables); read before and written back after it stops.
const SYSCTLS: [&str; 5] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
];
/// Paths kubelet creates outside its --root-dir; removed after if they were
/// not there before (and, for the log dirs, only our pods' entries).
const KUBELET_PATHS: [&str; 3] = ["/var/log/pods", "/var/log/containers", "/var/lib/kubelet"];
const IPTABLES_TABLES: [&str; 3] = ["filter", "nat", "mangle"];

fn main() -> ExitCode {
    common::main("api_pods", || common::runtime()?.block_on(run()))
}

// ---------------------------------------------------------------- setup

/// The two node agents, each on its own node name.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Kubelet,
    Minilet,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Kubelet => "kubelet",
            Kind::Minilet => "minilet",
        }
    }
    fn node(self) -> &'static str {
        match self {
            Kind::Kubelet => "bench-kubelet",
            Kind::Minilet => "bench-minilet",
        }
    }
    fn pod_name(self, i: usize) -> String {
        format!("{POD_PREFIX}{}-{i:03}", self.name())
    }
}

/// The stack's and the control plane's env files, merged.
struct Env(HashMap<String, String>);

impl Env {
    fn load() -> Result<Env> {
        let stack = std::env::var_os("MINILET_STACK_DIR")
            .map_or_else(|| common::repo().join("integration/.run"), PathBuf::from);
        let cp = std::env::var_os("MINILET_CP_DIR").map_or_else(|| stack.join("cp"), PathBuf::from);
        let mut vars = HashMap::new();
        for (file, how) in [
            (stack.join("env"), "integration/stack.sh up"),
            (cp.join("env"), "integration/control-plane.sh up"),
        ] {
            let text = fs::read_to_string(&file).map_err(|e| {
                anyhow!(
                    "not up: cannot read {} ({e}); run `{how}` first",
                    file.display()
                )
            })?;
            vars.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.starts_with('#'))
                    .map(|l| l.strip_prefix("export ").unwrap_or(l))
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| {
                        (
                            k.trim().to_string(),
                            v.trim().trim_matches(['"', '\'']).to_string(),
                        )
                    }),
            );
        }
        Ok(Env(vars))
    }

    fn get(&self, key: &str) -> Result<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| anyhow!("{key} missing from the stack/control plane env files"))
    }

    fn sock(&self) -> Result<&str> {
        self.get("CONTAINERD_SOCK")
    }
}

/// The e2e lock, held for one agent's phase (None with BENCH_NO_LOCK=1).
fn take_lock() -> Result<Option<nix::fcntl::Flock<fs::File>>> {
    if std::env::var_os("BENCH_NO_LOCK").is_some() {
        return Ok(None);
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .with_context(|| format!("opening {LOCK_FILE}"))?;
    eprintln!("api_pods: waiting for {LOCK_FILE}");
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map(Some)
        .map_err(|(_, e)| anyhow!("locking {LOCK_FILE}: {e}"))
}

/// A client for the admin kubeconfig (the one that creates pods and watches).
async fn admin_client(env: &Env) -> Result<kube::Client> {
    let path = env.get("MINILET_CP_ADMIN_KUBECONFIG")?;
    let kc =
        kube::config::Kubeconfig::read_from(path).with_context(|| format!("reading {path}"))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .context("admin kubeconfig")?;
    Ok(kube::Client::try_from(config)?)
}

/// The kubelet identity of `node` (CN system:node:<node>, O system:nodes).
fn node_kubeconfig(env: &Env, node: &str, out: &Path) -> Result<()> {
    let st = Command::new(common::repo().join("integration/control-plane.sh"))
        .args(["node-kubeconfig", node])
        .arg(out)
        .env("MINILET_CP_DIR", env.get("MINILET_CP_DIR")?)
        .stderr(Stdio::inherit())
        .status()
        .context("running integration/control-plane.sh node-kubeconfig")?;
    if !st.success() {
        bail!("control-plane.sh node-kubeconfig {node} failed ({st})");
    }
    Ok(())
}

/// The bridge + host-local + portmap + firewall chain both agents run (kubelet
/// through containerd, minilet itself), host-local's state under `ipam`.
fn conflist(ipam: &Path) -> String {
    json!({
        "cniVersion": "0.4.0",
        "name": NET_NAME,
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": true, "ipMasq": true, "hairpinMode": true,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": ipam}},
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
            {"type": "firewall"}
        ]
    })
    .to_string()
}

/// A bare pod bound to `node` (spec.nodeName: the scheduler is out of it).
fn pod(kind: Kind, i: usize, image: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": kind.pod_name(i),
            "namespace": NAMESPACE,
            "labels": { BENCH_LABEL: BENCH_VALUE, "minilet.io/bench-node": kind.node() },
        },
        "spec": {
            "nodeName": kind.node(),
            // No service-account token volume: the same pod for both agents
            // whatever volume kinds minilet supports yet.
            "automountServiceAccountToken": false,
            // The host's resolv.conf: with the default ClusterFirst and no
            // cluster DNS configured, kubelet posts a MissingClusterDNS
            // event on every sync of every pod (~1/min each), which would
            // be counted as idle traffic of a config this bench leaves out.
            "dnsPolicy": "Default",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "sleep",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["sleep", "3600"],
            }],
        },
    }))?)
}

// ---------------------------------------------------------------- host state

/// What a node agent may change on the host, recorded before it starts and
/// put back after it stops.
struct HostGuard {
    sysctls: Vec<(&'static str, String)>,
    existed: Vec<(&'static str, bool)>,
    kube_chains: HashSet<(String, String)>,
    /// Runtime conf dir files parked while kubelet runs.
    parked: Vec<PathBuf>,
    conf_dir: PathBuf,
}

fn kube_chains() -> HashSet<(String, String)> {
    let mut out = HashSet::new();
    for t in IPTABLES_TABLES {
        let Ok(o) = Command::new("iptables").args(["-t", t, "-S"]).output() else {
            continue;
        };
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            if let Some(c) = l.strip_prefix("-N ").filter(|c| c.starts_with("KUBE-")) {
                out.insert((t.to_string(), c.to_string()));
            }
        }
    }
    out
}

/// `iptables -S` words, double-quoted ones kept whole.
fn split_rule(line: &str) -> Vec<String> {
    let mut words = vec![];
    let mut cur = String::new();
    let mut quoted = false;
    for ch in line.chars() {
        match ch {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// Remove iptables chains `new` (table, chain) and the rules jumping to them.
fn remove_chains(new: &HashSet<(String, String)>) {
    for t in IPTABLES_TABLES {
        let mine: HashSet<&str> = new
            .iter()
            .filter(|(tt, _)| tt == t)
            .map(|(_, c)| c.as_str())
            .collect();
        if mine.is_empty() {
            continue;
        }
        let Ok(o) = Command::new("iptables").args(["-t", t, "-S"]).output() else {
            continue;
        };
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            let w = split_rule(l);
            let jumps = w
                .windows(2)
                .any(|p| p[0] == "-j" && mine.contains(p[1].as_str()));
            if w.first().is_some_and(|a| a == "-A") && jumps && !mine.contains(w[1].as_str()) {
                let _ = Command::new("iptables")
                    .args(["-t", t, "-D"])
                    .args(&w[1..])
                    .status();
            }
        }
        for c in &mine {
            let _ = Command::new("iptables").args(["-t", t, "-F", c]).status();
        }
        for c in &mine {
            let _ = Command::new("iptables").args(["-t", t, "-X", c]).status();
        }
    }
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn delete_bridge() {
    if link_exists(BRIDGE) {
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).status();
    }
}

impl HostGuard {
    fn record(env: &Env) -> Result<HostGuard> {
        Ok(HostGuard {
            sysctls: SYSCTLS
                .iter()
                .filter_map(|k| {
                    fs::read_to_string(Path::new("/proc/sys").join(k))
                        .ok()
                        .map(|v| (*k, v.trim().to_string()))
                })
                .collect(),
            existed: KUBELET_PATHS
                .iter()
                .map(|p| (*p, Path::new(p).exists()))
                .collect(),
            kube_chains: kube_chains(),
            parked: vec![],
            conf_dir: env.get("RUNTIME_CNI_CONF_DIR")?.into(),
        })
    }

    /// kubelet's network: park what the runtime's conf dir holds, write ours.
    fn install_conflist(&mut self, conflist: &str) -> Result<()> {
        for e in fs::read_dir(&self.conf_dir)?.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(ASIDE_SUFFIX) || name == KUBELET_CONF {
                continue;
            }
            let aside = self.conf_dir.join(format!("{name}{ASIDE_SUFFIX}"));
            fs::rename(&p, &aside).with_context(|| format!("parking {}", p.display()))?;
            self.parked.push(aside);
        }
        fs::write(self.conf_dir.join(KUBELET_CONF), conflist)
            .with_context(|| format!("writing {KUBELET_CONF}"))
    }

    /// Put the host back; returns what had changed (and was undone).
    fn restore(&self, pod_log_prefix: &str) -> Vec<String> {
        let mut changed = vec![];
        let _ = fs::remove_file(self.conf_dir.join(KUBELET_CONF));
        for aside in &self.parked {
            let orig = aside.with_file_name(
                aside
                    .file_name()
                    .map(|n| {
                        n.to_string_lossy()
                            .trim_end_matches(ASIDE_SUFFIX)
                            .to_string()
                    })
                    .unwrap_or_default(),
            );
            if orig.exists() {
                let _ = fs::remove_file(aside);
            } else if let Err(e) = fs::rename(aside, &orig) {
                changed.push(format!("cannot restore {}: {e}", orig.display()));
            }
        }
        for (k, before) in &self.sysctls {
            let path = Path::new("/proc/sys").join(k);
            let now = fs::read_to_string(&path).unwrap_or_default();
            if now.trim() != before {
                changed.push(format!("sysctl {k} {before} -> {}", now.trim()));
                let _ = fs::write(&path, before);
            }
        }
        let chains: HashSet<_> = kube_chains()
            .difference(&self.kube_chains)
            .cloned()
            .collect();
        if !chains.is_empty() {
            let mut names: Vec<String> = chains.iter().map(|(t, c)| format!("{t}/{c}")).collect();
            names.sort();
            changed.push(format!("iptables chains {}", names.join(" ")));
            remove_chains(&chains);
        }
        // Our pods' log dirs (namespace_name_uid) and container log links.
        for dir in ["/var/log/pods", "/var/log/containers"] {
            let prefix = if dir.ends_with("pods") {
                format!("{NAMESPACE}_{pod_log_prefix}")
            } else {
                pod_log_prefix.to_string()
            };
            if let Ok(rd) = fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy().starts_with(&prefix) {
                        let p = e.path();
                        let _ = if p.is_dir() && !p.is_symlink() {
                            fs::remove_dir_all(&p)
                        } else {
                            fs::remove_file(&p)
                        };
                    }
                }
            }
        }
        for (p, existed) in &self.existed {
            if !existed && Path::new(p).exists() {
                changed.push(format!("created {p}"));
                let _ = if p.starts_with("/var/log") {
                    fs::remove_dir(p)
                } else {
                    fs::remove_dir_all(p)
                };
            }
        }
        delete_bridge();
        changed
    }
}

// ---------------------------------------------------------------- agents

/// A node agent process started with a node kubeconfig.
struct Agent {
    kind: Kind,
    child: Child,
    log: PathBuf,
    /// kubelet's --root-dir (bind-mounted onto itself by kubelet).
    root_dir: Option<PathBuf>,
}

impl Agent {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(format!(
                "{} exited ({st}); see {}",
                self.kind.name(),
                self.log.display()
            )),
            _ => None,
        }
    }

    /// SIGTERM, then wait; SIGKILL after 30 s. Returns whether it exited by itself.
    async fn stop(&mut self) -> bool {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let _ = kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

fn kubelet_config(work: &Path) -> Result<PathBuf> {
    let path = work.join("kubelet.yaml");
    // kubelet's API client limit (kubeAPIQPS 5, burst 10 by default) paces
    // its status writes; BENCH_KUBELET_QPS raises it for a sensitivity run.
    let qps = match std::env::var_os("BENCH_KUBELET_QPS") {
        Some(_) => {
            let q = common::env_positive("BENCH_KUBELET_QPS", 5)?;
            format!("kubeAPIQPS: {q}\nkubeAPIBurst: {}\n", 2 * q)
        }
        None => String::new(),
    };
    // cgroupfs: containerd's config has SystemdCgroup = false. No QoS cgroups
    // or node allocatable enforcement on these VMs; no iptables util chains
    // (kube-proxy's business); image GC off (the stack's images are shared).
    fs::write(
        &path,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
makeIPTablesUtilChains: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: \"1Mi\"
  nodefs.available: \"1%\"
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
address: 127.0.0.1
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
{qps}"
        ),
    )?;
    Ok(path)
}

fn minilet_config(env: &Env, work: &Path, chain: &str) -> Result<PathBuf> {
    let net_d = work.join("net.d");
    fs::create_dir_all(&net_d)?;
    fs::write(net_d.join("10-bench.conflist"), chain)?;
    let path = work.join("minilet.yaml");
    fs::write(
        &path,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: {sock}
podLogsDir: {logs}
# The disk is shared with other users: DiskPressure would taint the node.
evictionHard:
  nodefs.available: \"1%\"
---
apiVersion: minilet.io/v1alpha1
kind: MiniletConfiguration
stateDir: {state}
cniConfDir: {net_d}
cniBinDirs: [{plugins}]
runtimeCNIConfDir: {rconf}
runtimeCNIBinDir: {rbin}
",
            sock = env.sock()?,
            logs = work.join("logs").display(),
            state = work.join("state").display(),
            net_d = net_d.display(),
            plugins = env.get("CNI_PLUGIN_DIR").unwrap_or("/usr/lib/cni"),
            rconf = env.get("RUNTIME_CNI_CONF_DIR")?,
            rbin = env.get("RUNTIME_CNI_BIN_DIR")?,
        ),
    )?;
    Ok(path)
}

/// Start `kind` for its node with `kubeconfig`, its log under `out`.
fn spawn_agent(
    kind: Kind,
    env: &Env,
    minilet_bin: Option<&Path>,
    work: &Path,
    kubeconfig: &Path,
    chain: &str,
    out: &Path,
) -> Result<Agent> {
    let log = out.join(format!("{}.log", kind.name()));
    let log_file = fs::File::create(&log)?;
    let mut root_dir = None;
    let mut cmd = match kind {
        Kind::Kubelet => {
            let root = work.join("root");
            root_dir = Some(root.clone());
            let mut c = Command::new(Path::new(env.get("MINILET_CP_BIN")?).join("kubelet"));
            c.arg("--config")
                .arg(kubelet_config(work)?)
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .arg("--root-dir")
                .arg(&root)
                .arg("--cert-dir")
                .arg(work.join("pki"))
                .args([
                    "--container-runtime=remote",
                    &format!("--container-runtime-endpoint={}", env.sock()?),
                    &format!("--image-service-endpoint={}", env.sock()?),
                    &format!("--pod-infra-container-image={}", env.get("PAUSE_IMAGE")?),
                    // Negative oom_score_adj is refused on these machines.
                    "--oom-score-adj=0",
                    "--hostname-override",
                    kind.node(),
                    "--v=1",
                ]);
            c
        }
        Kind::Minilet => {
            let bin = minilet_bin.ok_or_else(|| anyhow!("no minilet binary"))?;
            let mut c = Command::new(bin);
            c.arg("--config")
                .arg(minilet_config(env, work, chain)?)
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .args(["--hostname-override", kind.node()]);
            c
        }
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {}", kind.name()))?;
    Ok(Agent {
        kind,
        child,
        log,
        root_dir,
    })
}

// ---------------------------------------------------------------- /proc

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------- API

/// What the watch has seen of the benchmark's pods of one node.
#[derive(Default)]
struct Seen {
    synced: bool,
    /// Present pods, and when each was first seen Running with all ready.
    pods: HashMap<String, Option<Instant>>,
    /// Names listed since the watch (re)started: a relist drops the others
    /// (their deletion fell between two watches).
    listing: Option<HashSet<String>>,
    error: Option<String>,
}

fn running_and_ready(p: &Pod) -> bool {
    let Some(status) = &p.status else {
        return false;
    };
    let want = p.spec.as_ref().map_or(0, |s| s.containers.len());
    let cs = status.container_statuses.as_deref().unwrap_or_default();
    status.phase.as_deref() == Some("Running") && cs.len() == want && cs.iter().all(|c| c.ready)
}

/// A watch on the pods labelled for `kind`'s node, recorded into `seen`.
fn watch_pods(api: Api<Pod>, kind: Kind, seen: Arc<Mutex<Seen>>) -> tokio::task::JoinHandle<()> {
    let selector = format!(
        "{BENCH_LABEL}={BENCH_VALUE},minilet.io/bench-node={}",
        kind.node()
    );
    tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default().labels(&selector)).boxed();
        while let Some(ev) = stream.next().await {
            let at = Instant::now();
            let Ok(mut s) = seen.lock() else { return };
            match ev {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    if let Some(l) = s.listing.as_mut() {
                        l.insert(name.clone());
                    }
                    let ready = running_and_ready(&p);
                    let e = s.pods.entry(name).or_insert(None);
                    if ready && e.is_none() {
                        *e = Some(at);
                    }
                }
                Ok(watcher::Event::Delete(p)) => {
                    s.pods.remove(&p.metadata.name.unwrap_or_default());
                }
                Ok(watcher::Event::Init) => s.listing = Some(HashSet::new()),
                Ok(watcher::Event::InitDone) => {
                    if let Some(listed) = s.listing.take() {
                        s.pods.retain(|n, _| listed.contains(n));
                    }
                    s.synced = true;
                }
                Err(e) => s.error = Some(e.to_string()),
            }
        }
    })
}

/// Delete the Node and its Lease (both may be absent).
async fn forget_node(client: &kube::Client, node: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    ok_404(
        nodes
            .delete(node, &DeleteParams::default())
            .await
            .map(|_| ()),
    )?;
    ok_404(
        leases
            .delete(node, &DeleteParams::default())
            .await
            .map(|_| ()),
    )?;
    Ok(())
}

fn ok_404(r: kube::Result<()>) -> Result<()> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => Ok(other?),
    }
}

/// Force-delete benchmark pods an interrupted earlier run left behind.
async fn delete_leftover_pods(pods: &Api<Pod>) -> Result<usize> {
    let list = pods
        .list(&ListParams::default().labels(&format!("{BENCH_LABEL}={BENCH_VALUE}")))
        .await?;
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    for p in &list.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        ok_404(pods.delete(&name, &dp).await.map(|_| ()))?;
    }
    Ok(list.items.len())
}

/// Node Ready=True, and the kubelet version and runtime it reports.
async fn wait_node_ready(client: &kube::Client, agent: &mut Agent) -> Result<(f64, String)> {
    let nodes: Api<Node> = Api::all(client.clone());
    let start = Instant::now();
    loop {
        if let Some(e) = agent.exited() {
            bail!("{e} before its node was Ready");
        }
        if let Ok(Some(n)) = nodes.get_opt(agent.kind.node()).await {
            let status = n.status.unwrap_or_default();
            let ready = status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if ready {
                let info = status.node_info.unwrap_or_default();
                return Ok((
                    start.elapsed().as_secs_f64(),
                    format!(
                        "{} on {}",
                        info.kubelet_version, info.container_runtime_version
                    ),
                ));
            }
        }
        if start.elapsed() > READY_TIMEOUT {
            bail!(
                "node {} not Ready after {} s; see {}",
                agent.kind.node(),
                READY_TIMEOUT.as_secs(),
                agent.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Delete `names` (graceful, the pods' own 1 s grace), wait until the watch
/// sees every one gone. Returns the time that took.
async fn delete_pods(
    pods: &Api<Pod>,
    names: &[String],
    seen: &Mutex<Seen>,
    agent: &mut Agent,
) -> Result<f64> {
    let start = Instant::now();
    let dels = futures::future::join_all(names.iter().map(|n| async move {
        ok_404(pods.delete(n, &DeleteParams::default()).await.map(|_| ()))
    }))
    .await;
    dels.into_iter().collect::<Result<Vec<()>>>()?;
    loop {
        let left = {
            let s = seen.lock().map_err(|_| anyhow!("watch state poisoned"))?;
            names.iter().filter(|n| s.pods.contains_key(*n)).count()
        };
        if left == 0 {
            return Ok(start.elapsed().as_secs_f64());
        }
        if let Some(e) = agent.exited() {
            bail!("{e} while {left} pods were being deleted");
        }
        if start.elapsed() > DELETE_TIMEOUT {
            bail!(
                "{left} of {} pods still there {} s after their deletion",
                names.len(),
                DELETE_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------- audit log

/// One request in the audit log.
struct AuditEntry {
    user: String,
    verb: String,
    resource: String,
    subresource: String,
    name: String,
    at: jiff::Timestamp,
}

fn audit_len(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

/// The requests logged after byte `offset`, one per auditID (a watch logs
/// ResponseStarted and ResponseComplete), by time received.
fn read_audit(path: &Path, offset: u64) -> Result<Vec<AuditEntry>> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let offset = if audit_len(path) < offset { 0 } else { offset };
    f.seek(SeekFrom::Start(offset))?;
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    let mut ids = HashSet::new();
    let mut out = vec![];
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let s = |p: &str| {
            v.pointer(p)
                .and_then(|x| x.as_str())
                .unwrap_or_default()
                .to_string()
        };
        if !ids.insert(s("/auditID")) {
            continue;
        }
        let Ok(at) = s("/requestReceivedTimestamp").parse::<jiff::Timestamp>() else {
            continue;
        };
        out.push(AuditEntry {
            user: s("/user/username"),
            verb: s("/verb"),
            resource: s("/objectRef/resource"),
            subresource: s("/objectRef/subresource"),
            name: s("/objectRef/name"),
            at,
        });
    }
    Ok(out)
}

fn is_status_write(e: &AuditEntry) -> bool {
    matches!(e.verb.as_str(), "patch" | "update")
        && e.resource == "pods"
        && e.subresource == "status"
}

fn request_key(e: &AuditEntry) -> String {
    if e.subresource.is_empty() {
        format!("{} {}", e.verb, e.resource)
    } else {
        format!("{} {}/{}", e.verb, e.resource, e.subresource)
    }
}

// ---------------------------------------------------------------- CRI

/// Stop and remove sandboxes of pods named apb-<kind>-* (kubelet's and
/// minilet's sandboxes both carry the pod's name label). Returns how many.
async fn sweep_sandboxes(rt: &RemoteRuntime, kind: Kind) -> Result<usize> {
    let prefix = format!("{POD_PREFIX}{}-", kind.name());
    let mut n = 0;
    for s in rt.list_pod_sandboxes(Labels::new()).await? {
        let m = s.metadata.unwrap_or_default();
        if m.namespace == NAMESPACE && m.name.starts_with(&prefix) {
            n += 1;
            for r in [
                rt.stop_pod_sandbox(&s.id).await,
                rt.remove_pod_sandbox(&s.id).await,
            ] {
                match r {
                    Err(e) if !e.is_not_found() => return Err(e.into()),
                    _ => {}
                }
            }
        }
    }
    Ok(n)
}

/// Ready sandboxes in the runtime that are not this benchmark's: kubelet
/// stops every pod it does not know, so it must not start beside them.
async fn foreign_ready_sandboxes(rt: &RemoteRuntime) -> Result<Vec<String>> {
    Ok(rt
        .list_pod_sandboxes(Labels::new())
        .await?
        .into_iter()
        .filter(|s| s.state == minilet::cri::api::PodSandboxState::SandboxReady as i32)
        .filter_map(|s| {
            let m = s.metadata.unwrap_or_default();
            let owner = s
                .labels
                .get(labels::MANAGED_BY_NODE)
                .map(|n| format!(" of minilet node {n}"))
                .unwrap_or_default();
            (!m.name.starts_with(POD_PREFIX)).then(|| format!("{}/{}{owner}", m.namespace, m.name))
        })
        .collect())
}

/// Per pod of `kind`: its create sent -> its container's started_at as the
/// runtime reports it (s), sorted.
async fn runtime_started(
    rt: &RemoteRuntime,
    kind: Kind,
    sent_at: &HashMap<String, Instant>,
    t0: Instant,
    t0_wall: jiff::Timestamp,
) -> Vec<f64> {
    let prefix = format!("{POD_PREFIX}{}-", kind.name());
    let mut out = vec![];
    for c in rt.list_containers(Labels::new()).await.unwrap_or_default() {
        let Some(name) = c
            .labels
            .get(labels::POD_NAME)
            .filter(|n| n.starts_with(&prefix))
        else {
            continue;
        };
        let (Some(sent), Ok(st)) = (sent_at.get(name), rt.container_status(&c.id).await) else {
            continue;
        };
        let sent_wall = t0_wall.as_nanosecond() + sent.duration_since(t0).as_nanos() as i128;
        out.push((i128::from(st.started_at) - sent_wall) as f64 / 1e9);
    }
    out.sort_by(f64::total_cmp);
    out
}

// ---------------------------------------------------------------- one agent

/// What one agent's phase measured.
#[derive(Default)]
struct Phase {
    version: String,
    ready_after_s: f64,
    /// Per pod create sent -> seen Running and ready, sorted (s).
    per_pod: Vec<f64>,
    running: usize,
    /// First create sent -> last pod Running (s).
    total_s: Option<f64>,
    /// Per pod create sent -> the runtime's started_at of its container,
    /// sorted (s): where the time went, runtime or agent/API.
    per_pod_runtime: Vec<f64>,
    status_writes: usize,
    status_writes_max_pod: usize,
    /// Status writes in the 10 s after all ran (not part of the target).
    status_writes_after: usize,
    rss_mib: f64,
    hwm_mib: f64,
    max_rss_start_mib: f64,
    idle_rss_mib: f64,
    idle_window_s: f64,
    idle_requests: usize,
    idle_by_request: BTreeMap<String, usize>,
    delete_to_idle_s: f64,
    teardown_s: Option<f64>,
    t0_utc: String,
}

impl Phase {
    fn idle_per_min(&self) -> Option<f64> {
        (self.idle_window_s > 0.0).then(|| self.idle_requests as f64 / (self.idle_window_s / 60.0))
    }
    fn writes_per_pod(&self) -> Option<f64> {
        (self.running > 0).then(|| self.status_writes as f64 / self.running as f64)
    }
    fn p(&self, p: f64) -> Option<f64> {
        common::pct(&self.per_pod, p)
    }
}

struct Ctx<'a> {
    env: &'a Env,
    client: kube::Client,
    rt: &'a RemoteRuntime,
    minilet_bin: Option<PathBuf>,
    out: PathBuf,
    n: usize,
    idle_pods: usize,
    idle_window: Duration,
    audit: PathBuf,
}

/// The e2e lock, once the stack suits `kind`: the API server answers, and
/// for kubelet no pod that is not the benchmark's runs in the runtime
/// (kubelet would stop it). While it does not, the lock is let go so its
/// owner can clean up, and taken again 20 s later, for up to
/// BENCH_WAIT_SECS (600).
async fn lock_for(ctx: &Ctx<'_>, kind: Kind) -> Result<Option<nix::fcntl::Flock<fs::File>>> {
    let patience = Duration::from_secs(common::env_positive("BENCH_WAIT_SECS", 600)? as u64);
    let mut start = None;
    loop {
        let lock = take_lock()?;
        // Patience counts from the first time the lock is held.
        let start = *start.get_or_insert_with(Instant::now);
        let why = match ctx.client.apiserver_version().await {
            Err(e) => Some(format!("the API server does not answer ({e})")),
            Ok(_) if kind == Kind::Kubelet => {
                let foreign = foreign_ready_sandboxes(ctx.rt).await?;
                (!foreign.is_empty()).then(|| {
                    format!(
                        "the runtime runs {} pods that are not the benchmark's ({}): kubelet would stop them",
                        foreign.len(),
                        foreign.join(", ")
                    )
                })
            }
            Ok(_) => None,
        };
        let Some(why) = why else {
            return Ok(lock);
        };
        if start.elapsed() > patience {
            bail!(
                "{why}; waited {} s: run when the stack is idle",
                patience.as_secs()
            );
        }
        eprintln!("api_pods: {}: {why}; waiting", kind.name());
        drop(lock);
        tokio::time::sleep(Duration::from_secs(20)).await;
    }
}

/// One agent from a clean node to a clean node, under the e2e lock. Host
/// changes undone are pushed to `changes`, broken-run findings to `problems`.
async fn run_agent(
    ctx: &Ctx<'_>,
    kind: Kind,
    changes: &mut Vec<String>,
    problems: &mut Vec<String>,
) -> Result<Phase> {
    let _lock = lock_for(ctx, kind).await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), NAMESPACE);
    let left = delete_leftover_pods(&pods).await?;
    if left > 0 {
        eprintln!("api_pods: force-deleted {left} pods an earlier run left");
    }
    for k in [Kind::Kubelet, Kind::Minilet] {
        let swept = sweep_sandboxes(ctx.rt, k).await?;
        if swept > 0 {
            eprintln!(
                "api_pods: removed {swept} sandboxes an earlier run left ({})",
                k.name()
            );
        }
    }
    forget_node(&ctx.client, kind.node()).await?;
    delete_bridge();
    let work = tempfile::Builder::new()
        .prefix(&format!("minilet-bench-api-{}-", kind.name()))
        .tempdir()
        .context("creating a work dir")?;
    let kubeconfig = work.path().join("kubeconfig");
    node_kubeconfig(ctx.env, kind.node(), &kubeconfig)?;
    let chain = conflist(&work.path().join("ipam"));
    let mut guard = HostGuard::record(ctx.env)?;
    if kind == Kind::Kubelet {
        guard.install_conflist(&chain)?;
    }
    let audit_offset = audit_len(&ctx.audit);
    eprintln!("api_pods: {} on node {}", kind.name(), kind.node());
    let mut agent = match spawn_agent(
        kind,
        ctx.env,
        ctx.minilet_bin.as_deref(),
        work.path(),
        &kubeconfig,
        &chain,
        &ctx.out,
    ) {
        Ok(a) => a,
        Err(e) => {
            changes.extend(guard.restore(&format!("{POD_PREFIX}{}-", kind.name())));
            return Err(e);
        }
    };
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watch = watch_pods(pods.clone(), kind, seen.clone());
    let result = measure(ctx, kind, &pods, &mut agent, &seen, audit_offset, problems).await;

    // Whatever happened: pods deleted through the API, agent stopped,
    // sandboxes swept, node forgotten, host put back.
    let names: Vec<String> = (0..ctx.n).map(|i| kind.pod_name(i)).collect();
    let teardown = delete_pods(&pods, &names, &seen, &mut agent).await;
    watch.abort();
    let teardown_s = match teardown {
        Ok(t) => Some(t),
        Err(e) => {
            problems.push(format!("{}: teardown: {e:#}", kind.name()));
            let _ = delete_leftover_pods(&pods).await;
            None
        }
    };
    // The sandboxes of deleted pods: minilet removes them, kubelet only stops
    // them (its GC removes them later). Sweep while the network config the
    // runtime needs for CNI DEL is still in place.
    let stopped = agent.stop().await;
    if !stopped {
        problems.push(format!(
            "{}: did not exit within 30 s of SIGTERM (killed)",
            kind.name()
        ));
    }
    match sweep_sandboxes(ctx.rt, kind).await {
        Ok(n) if n > 0 && kind == Kind::Minilet => problems.push(format!(
            "minilet: {n} sandboxes left after its pods were gone; removed by the benchmark"
        )),
        Ok(_) => {}
        Err(e) => problems.push(format!("{}: sweeping sandboxes: {e:#}", kind.name())),
    }
    if let Some(root) = &agent.root_dir {
        let _ = nix::mount::umount2(root, nix::mount::MntFlags::MNT_DETACH);
    }
    if let Err(e) = forget_node(&ctx.client, kind.node()).await {
        problems.push(format!("{}: deleting the node: {e:#}", kind.name()));
    }
    let undone = guard.restore(&format!("{POD_PREFIX}{}-", kind.name()));
    if kind == Kind::Minilet && !undone.is_empty() {
        problems.push(format!("minilet changed the host: {}", undone.join("; ")));
    }
    changes.extend(undone.into_iter().map(|c| format!("{}: {c}", kind.name())));
    drop(work);
    let mut phase = result?;
    phase.teardown_s = teardown_s;
    Ok(phase)
}

async fn measure(
    ctx: &Ctx<'_>,
    kind: Kind,
    pods: &Api<Pod>,
    agent: &mut Agent,
    seen: &Mutex<Seen>,
    audit_offset: u64,
    problems: &mut Vec<String>,
) -> Result<Phase> {
    let mut phase = Phase::default();
    let (ready_after, version) = wait_node_ready(&ctx.client, agent).await?;
    phase.ready_after_s = ready_after;
    phase.version = version;
    let start = Instant::now();
    while !seen
        .lock()
        .map_err(|_| anyhow!("watch state poisoned"))?
        .synced
    {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the pod watch did not sync within 30 s");
        }
        tokio::time::sleep(POLL).await;
    }
    let image = ctx.env.get("BUSYBOX_IMAGE")?;
    let objs = (0..ctx.n)
        .map(|i| pod(kind, i, image))
        .collect::<Result<Vec<_>>>()?;
    let pid = agent.pid();

    // All creates in flight at once; each pod's clock starts as its request goes.
    let t0_wall = jiff::Timestamp::now();
    phase.t0_utc = t0_wall.to_string();
    let t0 = Instant::now();
    let pp = PostParams::default();
    let sent = futures::future::join_all(objs.iter().map(|p| {
        let pp = &pp;
        async move {
            let at = Instant::now();
            pods.create(pp, p).await.map(|_| at)
        }
    }))
    .await;
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    for (p, r) in objs.iter().zip(sent) {
        let name = p.metadata.name.clone().unwrap_or_default();
        sent_at.insert(
            name.clone(),
            r.with_context(|| format!("creating pod {name}"))?,
        );
    }

    let mut max_rss = 0u64;
    let running_at = loop {
        let ran: Vec<(String, Instant)> = {
            let s = seen.lock().map_err(|_| anyhow!("watch state poisoned"))?;
            s.pods
                .iter()
                .filter_map(|(n, t)| t.map(|t| (n.clone(), t)))
                .collect()
        };
        max_rss = max_rss.max(proc_status_kib(pid, "VmRSS:").unwrap_or(0));
        if ran.len() >= ctx.n || t0.elapsed() > START_TIMEOUT {
            break ran;
        }
        if let Some(e) = agent.exited() {
            bail!("{e} during the pod starts");
        }
        tokio::time::sleep(POLL).await;
    };
    let all_wall = jiff::Timestamp::now();
    phase.running = running_at.len();
    if phase.running < ctx.n {
        problems.push(format!(
            "{}: only {} of {} pods Running after {} s",
            kind.name(),
            phase.running,
            ctx.n,
            START_TIMEOUT.as_secs()
        ));
    }
    let mut per_pod: Vec<f64> = running_at
        .iter()
        .filter_map(|(n, t)| sent_at.get(n).map(|s| t.duration_since(*s).as_secs_f64()))
        .collect();
    per_pod.sort_by(f64::total_cmp);
    phase.per_pod = per_pod;
    phase.total_s = (phase.running >= ctx.n).then(|| {
        running_at
            .iter()
            .map(|(_, t)| t.duration_since(t0).as_secs_f64())
            .fold(0.0, f64::max)
    });
    phase.rss_mib = mib(proc_status_kib(pid, "VmRSS:").unwrap_or(0));
    phase.per_pod_runtime = runtime_started(ctx.rt, kind, &sent_at, t0, t0_wall).await;
    phase.hwm_mib = mib(proc_status_kib(pid, "VmHWM:").unwrap_or(0));
    phase.max_rss_start_mib = mib(max_rss);

    // Status writes between the first create and all Running, by the node's user.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let user = format!("system:node:{}", kind.node());
    let ours: HashSet<&String> = sent_at.keys().collect();
    let entries = read_audit(&ctx.audit, audit_offset)?;
    let mut by_pod: HashMap<&str, usize> = HashMap::new();
    let (t0_audit, all_audit) = (t0_wall, all_wall);
    for e in entries
        .iter()
        .filter(|e| e.user == user && is_status_write(e) && ours.contains(&e.name))
    {
        if e.at >= t0_audit && e.at <= all_audit {
            phase.status_writes += 1;
            *by_pod.entry(e.name.as_str()).or_default() += 1;
        } else if e.at > all_audit {
            phase.status_writes_after += 1;
        }
    }
    phase.status_writes_max_pod = by_pod.values().copied().max().unwrap_or(0);

    // Down to the idle set; let the deletions settle; then the idle window.
    let doomed: Vec<String> = (ctx.idle_pods..ctx.n).map(|i| kind.pod_name(i)).collect();
    phase.delete_to_idle_s = delete_pods(pods, &doomed, seen, agent).await?;
    tokio::time::sleep(IDLE_SETTLE).await;
    let idle_offset = audit_len(&ctx.audit);
    let idle_start_wall = jiff::Timestamp::now();
    let idle_start = Instant::now();
    eprintln!(
        "api_pods: {}: idle with {} pods for {} s",
        kind.name(),
        ctx.idle_pods,
        ctx.idle_window.as_secs()
    );
    while idle_start.elapsed() < ctx.idle_window {
        if let Some(e) = agent.exited() {
            bail!("{e} while idle");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let idle_end_wall = jiff::Timestamp::now();
    phase.idle_window_s = idle_start.elapsed().as_secs_f64();
    phase.idle_rss_mib = mib(proc_status_kib(pid, "VmRSS:").unwrap_or(0));
    tokio::time::sleep(AUDIT_SLACK).await;
    // Requests received in the window; a watch opened before it (and still
    // open) is not one of them.
    let idle_entries = read_audit(&ctx.audit, idle_offset)?;
    for e in idle_entries
        .iter()
        .filter(|e| e.user == user && e.at >= idle_start_wall && e.at < idle_end_wall)
    {
        phase.idle_requests += 1;
        *phase.idle_by_request.entry(request_key(e)).or_default() += 1;
    }
    let alive = {
        let s = seen.lock().map_err(|_| anyhow!("watch state poisoned"))?;
        s.pods.values().filter(|t| t.is_some()).count()
    };
    if alive != ctx.idle_pods {
        problems.push(format!(
            "{}: {alive} of {} idle pods Running at the end of the idle window",
            kind.name(),
            ctx.idle_pods
        ));
    }
    if let Some(e) = seen
        .lock()
        .map_err(|_| anyhow!("watch state poisoned"))?
        .error
        .take()
    {
        eprintln!("api_pods: the pod watch reported (and recovered from): {e}");
    }
    Ok(phase)
}

// ---------------------------------------------------------------- output

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2} s"))
}

fn num(v: Option<f64>, unit: &str) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}{unit}"))
}

fn r3(v: Option<f64>) -> Option<f64> {
    v.map(common::round3)
}

fn phase_json(p: &Phase) -> serde_json::Value {
    json!({
        "version": p.version,
        "node_ready_after_s": common::round3(p.ready_after_s),
        "running": p.running,
        "t0_utc": p.t0_utc,
        "start": {
            "p50_s": r3(p.p(50.0)),
            "p99_s": r3(p.p(99.0)),
            "max_s": r3(p.per_pod.last().copied()),
            "min_s": r3(p.per_pod.first().copied()),
            "total_s": r3(p.total_s),
            "all_s": p.per_pod.iter().map(|v| common::round3(*v)).collect::<Vec<_>>(),
        },
        "runtime_started": {
            "p50_s": r3(common::pct(&p.per_pod_runtime, 50.0)),
            "p99_s": r3(common::pct(&p.per_pod_runtime, 99.0)),
            "max_s": r3(p.per_pod_runtime.last().copied()),
        },
        "status_writes": p.status_writes,
        "status_writes_per_pod": r3(p.writes_per_pod()),
        "status_writes_max_pod": p.status_writes_max_pod,
        "status_writes_10s_after": p.status_writes_after,
        "rss_mib": common::round3(p.rss_mib),
        "hwm_mib": common::round3(p.hwm_mib),
        "max_sampled_rss_during_start_mib": common::round3(p.max_rss_start_mib),
        "idle_rss_mib": common::round3(p.idle_rss_mib),
        "idle_window_s": common::round3(p.idle_window_s),
        "idle_requests": p.idle_requests,
        "idle_requests_per_min": r3(p.idle_per_min()),
        "idle_by_request": p.idle_by_request,
        "delete_to_idle_s": common::round3(p.delete_to_idle_s),
        "teardown_s": r3(p.teardown_s),
    })
}

async fn run() -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root (it runs node agents on containerd)");
    }
    let n = common::env_positive("BENCH_PODS", 30)?;
    let idle_pods = common::env_positive("BENCH_IDLE_PODS", IDLE_PODS)?.min(n);
    let idle_window =
        Duration::from_secs(common::env_positive("BENCH_IDLE_SECS", IDLE_SECS)? as u64);
    let kinds: Vec<Kind> = match std::env::var("BENCH_AGENTS") {
        Ok(v) => v
            .split(',')
            .map(|s| match s.trim() {
                "kubelet" => Ok(Kind::Kubelet),
                "minilet" => Ok(Kind::Minilet),
                other => Err(anyhow!(
                    "BENCH_AGENTS: unknown agent {other:?} (kubelet, minilet)"
                )),
            })
            .collect::<Result<_>>()?,
        Err(_) => vec![Kind::Kubelet, Kind::Minilet],
    };
    let env = Env::load()?;
    let rt = match tokio::time::timeout(
        Duration::from_secs(10),
        RemoteRuntime::connect(env.sock()?, env.sock()?, Duration::from_secs(120)),
    )
    .await
    {
        Ok(Ok(rt)) => rt,
        Ok(Err(e)) => bail!("containerd at {} does not answer ({e})", env.sock()?),
        Err(_) => bail!("containerd at {} does not answer within 10 s", env.sock()?),
    };
    let (rt_name, rt_version) = rt.version().await?;
    let image = env.get("BUSYBOX_IMAGE")?;
    if rt.image_status(image).await?.is_none() {
        bail!("image {image} is not present in the runtime; run `integration/stack.sh up`");
    }
    let client = admin_client(&env).await?;
    let server_version = env
        .get("MINILET_CP_VERSION")
        .map_or_else(|_| "unknown".to_string(), |v| format!("v{v}"));
    // Build minilet before any lock is taken.
    let minilet_bin = if kinds.contains(&Kind::Minilet) {
        Some(common::minilet_binary("api_pods")?)
    } else {
        None
    };
    let out = common::target_dir().join("bench-api-pods");
    fs::create_dir_all(&out)?;
    let ctx = Ctx {
        env: &env,
        client,
        rt: &rt,
        minilet_bin,
        out: out.clone(),
        n,
        idle_pods,
        idle_window,
        audit: env.get("MINILET_CP_AUDIT_LOG")?.into(),
    };
    let mut problems = vec![];
    let mut changes = vec![];
    let mut phases: Vec<(Kind, Result<Phase>)> = vec![];
    for kind in kinds {
        let r = run_agent(&ctx, kind, &mut changes, &mut problems).await;
        // Each agent's figures as soon as it is done: a run cut short
        // between the two phases still leaves the first.
        if let Ok(p) = &r {
            eprintln!("api_pods: {} done: {}", kind.name(), phase_json(p));
        }
        if let Err(e) = &r {
            eprintln!("api_pods: {}: {e:#}", kind.name());
            problems.push(format!("{}: {e:#}", kind.name()));
        }
        phases.push((kind, r));
    }

    // Report.
    let get = |k: Kind| {
        phases
            .iter()
            .find(|(kk, _)| *kk == k)
            .and_then(|(_, r)| r.as_ref().ok())
    };
    let (kl, ml) = (get(Kind::Kubelet), get(Kind::Minilet));
    let load = fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let ratio = |m: Option<f64>, k: Option<f64>| match (m, k) {
        (Some(m), Some(k)) if k > 0.0 => Some(m / k),
        _ => None,
    };
    let met = |b: Option<bool>| match b {
        Some(true) => "MET",
        Some(false) => "NOT MET",
        None => "-",
    };
    let col = |p: Option<&Phase>, f: &dyn Fn(&Phase) -> String| p.map_or_else(|| "-".into(), f);
    println!();
    println!(
        "api pods: {n} bare pods created at once through the API (spec.nodeName set), {image} present; {rt_name} {rt_version}; API server {server_version}; load average {load}"
    );
    println!(
        "{:<40}{:>16}{:>16}{:>17}  target",
        "", "kubelet", "minilet", "minilet/kubelet"
    );
    let p99_ratio = ratio(ml.and_then(|m| m.p(99.0)), kl.and_then(|k| k.p(99.0)));
    let writes_ratio = ratio(
        ml.and_then(Phase::writes_per_pod),
        kl.and_then(Phase::writes_per_pod),
    );
    let idle_ratio = ratio(
        ml.and_then(Phase::idle_per_min),
        kl.and_then(Phase::idle_per_min),
    );
    let p99_met = p99_ratio.map(|r| r <= TARGET_P99_FACTOR);
    let writes_met = writes_ratio.map(|r| r <= 1.0);
    let idle_met = idle_ratio.map(|r| r <= 1.0);
    let rss_met = ml.map(|m| m.hwm_mib <= TARGET_RSS_MIB);
    let row = |label: &str, k: String, m: String, r: Option<f64>, target: String| {
        println!(
            "{label:<40}{k:>16}{m:>16}{:>17}  {target}",
            r.map_or_else(|| "-".into(), |r| format!("{r:.2}x"))
        );
    };
    row(
        "start p50 (create -> Running+ready)",
        col(kl, &|p| secs(p.p(50.0))),
        col(ml, &|p| secs(p.p(50.0))),
        ratio(ml.and_then(|m| m.p(50.0)), kl.and_then(|k| k.p(50.0))),
        String::new(),
    );
    row(
        "start p99",
        col(kl, &|p| secs(p.p(99.0))),
        col(ml, &|p| secs(p.p(99.0))),
        p99_ratio,
        format!("<= {TARGET_P99_FACTOR}x: {}", met(p99_met)),
    );
    row(
        "start max",
        col(kl, &|p| secs(p.per_pod.last().copied())),
        col(ml, &|p| secs(p.per_pod.last().copied())),
        ratio(
            ml.and_then(|m| m.per_pod.last().copied()),
            kl.and_then(|k| k.per_pod.last().copied()),
        ),
        String::new(),
    );
    row(
        &format!("all {n} Running (first create -> last)"),
        col(kl, &|p| secs(p.total_s)),
        col(ml, &|p| secs(p.total_s)),
        ratio(ml.and_then(|m| m.total_s), kl.and_then(|k| k.total_s)),
        String::new(),
    );
    row(
        "container started (runtime) p50",
        col(kl, &|p| secs(common::pct(&p.per_pod_runtime, 50.0))),
        col(ml, &|p| secs(common::pct(&p.per_pod_runtime, 50.0))),
        None,
        String::new(),
    );
    row(
        "container started (runtime) p99",
        col(kl, &|p| secs(common::pct(&p.per_pod_runtime, 99.0))),
        col(ml, &|p| secs(common::pct(&p.per_pod_runtime, 99.0))),
        None,
        String::new(),
    );
    row(
        "status writes per pod until Running",
        col(kl, &|p| num(p.writes_per_pod(), "")),
        col(ml, &|p| num(p.writes_per_pod(), "")),
        writes_ratio,
        format!("<= 1x: {}", met(writes_met)),
    );
    row(
        &format!("idle API requests/min ({idle_pods} pods)"),
        col(kl, &|p| num(p.idle_per_min(), "")),
        col(ml, &|p| num(p.idle_per_min(), "")),
        idle_ratio,
        format!("<= 1x: {}", met(idle_met)),
    );
    row(
        &format!("agent RSS, {n} pods (VmRSS)"),
        col(kl, &|p| format!("{:.1} MiB", p.rss_mib)),
        col(ml, &|p| format!("{:.1} MiB", p.rss_mib)),
        ratio(ml.map(|m| m.rss_mib), kl.map(|k| k.rss_mib)),
        String::new(),
    );
    row(
        "agent peak RSS so far (VmHWM)",
        col(kl, &|p| format!("{:.1} MiB", p.hwm_mib)),
        col(ml, &|p| format!("{:.1} MiB", p.hwm_mib)),
        ratio(ml.map(|m| m.hwm_mib), kl.map(|k| k.hwm_mib)),
        format!("minilet <= {TARGET_RSS_MIB} MiB: {}", met(rss_met)),
    );
    println!(
        "(per pod: its create request sent -> a watch sees phase Running with every container ready; status writes: patch/update pods/status by system:node:<node> in the audit log between the first create and the last pod Running; idle: every request of the node's user received in the window, from the audit log)"
    );
    for (kind, r) in &phases {
        if let Ok(p) = r {
            println!(
                "{}: {}; node Ready after {:.1} s; {} of {n} Running; status writes {} (max {} on one pod, {} more in the 10 s after); idle window {:.0} s, {} requests: {}; idle RSS {:.1} MiB; teardown {}",
                kind.name(),
                p.version,
                p.ready_after_s,
                p.running,
                p.status_writes,
                p.status_writes_max_pod,
                p.status_writes_after,
                p.idle_window_s,
                p.idle_requests,
                p.idle_by_request
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                p.idle_rss_mib,
                secs(p.teardown_s),
            );
        }
    }
    for c in &changes {
        println!("host change undone: {c}");
    }
    for p in &problems {
        println!("problem: {p}");
    }
    let agent_json = |k: Kind| {
        phases
            .iter()
            .find(|(kk, _)| *kk == k)
            .map(|(_, r)| match r {
                Ok(p) => phase_json(p),
                Err(e) => json!({ "error": format!("{e:#}") }),
            })
    };
    let report = json!({
        "pods": n,
        "idle_pods": idle_pods,
        "idle_window_s": idle_window.as_secs(),
        "image": image,
        "runtime": format!("{rt_name} {rt_version}"),
        "apiserver": server_version,
        "load_average": load,
        "kubelet_api_qps": std::env::var("BENCH_KUBELET_QPS").unwrap_or_else(|_| "default (5, burst 10)".into()),
        "kubelet": agent_json(Kind::Kubelet),
        "minilet": agent_json(Kind::Minilet),
        "ratios": {
            "start_p99": r3(p99_ratio),
            "status_writes_per_pod": r3(writes_ratio),
            "idle_requests_per_min": r3(idle_ratio),
        },
        "targets": {
            "start_p99_max_factor": TARGET_P99_FACTOR,
            "start_p99_met": p99_met,
            "status_writes_met": writes_met,
            "idle_requests_met": idle_met,
            "rss_limit_mib": TARGET_RSS_MIB,
            "rss_met": rss_met,
        },
        "host_changes_undone": changes,
        "problems": problems,
    });
    let line = serde_json::to_string(&report)?;
    let json_path = out.join("result.json");
    fs::write(&json_path, format!("{line}\n"))?;
    println!("JSON: {line}");
    println!(
        "(also written to {}; agent logs beside it)",
        json_path.display()
    );
    // Not pass/fail on targets; only a broken run exits non-zero.
    Ok(problems.is_empty())
}
