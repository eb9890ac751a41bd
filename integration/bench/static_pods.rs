//! Benchmark: N static pods (default 30, env BENCH_PODS) written at once,
//! time until every container runs under minilet, side by side with the
//! runtime's own floor (the same CRI calls made directly, one pod at a time
//! and 4, 8 and 16 pods in parallel), then RSS and idle CPU over a window
//! longer than syncFrequency. See integration/bench/README.md.
//!
//! Runs as root against the stack of `integration/stack.sh up`. Not a
//! pass/fail test: it prints a table, whether each target is met, and JSON.

mod common;
mod stack;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use minilet::cri::remote::RemoteRuntime;
use minilet::cri::{Runtime, api};
use minilet::labels;
use minilet::pod::spec::{self, Downward, HostContext};
use serde_json::json;
use stack::{Stack, leftovers, load_stack, node_label, teardown_node};

/// Node name minilet runs under (`--hostname-override`).
const NODE: &str = "bench";
/// Node label of the pods the direct client makes, kept apart from minilet's.
const FLOOR_NODE: &str = "bench-floor";
/// The benchmark's own network, bridge and subnet, so it collides neither with
/// the e2e tests' `minilet0` nor with IPAM state of other runs.
const NET_NAME: &str = "minilet-bench";
const BRIDGE: &str = "mlbench0";
const SUBNET: &str = "10.246.0.0/16";
const SUBNET_PREFIX: &str = "10.246.";
/// The floor's conflist in the runtime's conf dir (sorts before minilet's).
const FLOOR_CONF: &str = "00-floor.conflist";
/// minilet's delegating conflist, and where it is parked while the floor runs
/// (an extension containerd does not load).
const MINILET_CONF: &str = "00-minilet.conflist";
const ASIDE_SUFFIX: &str = ".bench-aside";
const FLOOR_PLUGINS: [&str; 4] = ["bridge", "host-local", "portmap", "loopback"];
/// Pool sizes of the parallel direct runs (env BENCH_PARALLEL, a list).
const PARALLEL: [usize; 3] = [4, 8, 16];
const POLL: Duration = Duration::from_millis(20);
const IDLE_SETTLE: Duration = Duration::from_secs(2);
/// Idle CPU window (env BENCH_IDLE_SECS): at least the agent's syncFrequency
/// (60 s, each pod's periodic resync) so the periodic work is in it, and with
/// it four CNI GC passes (15 s) and sixty relists (1 s).
const IDLE_WINDOW_SECS: usize = 60;
const START_TIMEOUT: Duration = Duration::from_secs(180);
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(180);

/// The issues' targets: minilet within 1.3x the 4-way floor (first), and
/// within 1.05x the best direct floor, whatever its width (issue 6).
const TARGET_FACTOR: f64 = 1.3;
const TARGET_BEST_FACTOR: f64 = 1.05;
const TARGET_RSS_MIB: f64 = 20.0;
const TARGET_IDLE_CPU_PCT: f64 = 0.5;

fn main() -> ExitCode {
    common::main("static_pods", || common::runtime()?.block_on(run()))
}

fn netns_count() -> usize {
    fs::read_dir("/var/run/netns").map_or(0, |d| d.count())
}

fn manifest(i: usize, image: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: sp-{i:03}
  namespace: default
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: sleep
    image: {image}
    imagePullPolicy: IfNotPresent
    command: [sleep, \"3600\"]
"
    )
}

/// The bridge + host-local + portmap chain of config/cni/10-bridge.conflist
/// with the benchmark's own name, bridge and a /16 subnet.
fn bench_conflist() -> Result<String> {
    let path = common::repo().join("config/cni/10-bridge.conflist");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut v: serde_json::Value = serde_json::from_str(&text)?;
    v["name"] = json!(NET_NAME);
    let plugins = v["plugins"]
        .as_array_mut()
        .ok_or_else(|| anyhow!("{}: no plugins", path.display()))?;
    for p in plugins.iter_mut().filter(|p| p["type"] == "bridge") {
        p["bridge"] = json!(BRIDGE);
        p["ipam"]["ranges"] = json!([[{ "subnet": SUBNET }]]);
    }
    Ok(serde_json::to_string_pretty(&v)?)
}

fn host_context(logs: &Path, node: &str) -> HostContext {
    let memory_capacity = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        .map_or(0, |kb| kb * 1024);
    HostContext {
        node_name: node.into(),
        pod_logs_dir: logs.into(),
        resolv_conf: fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        cluster_dns: vec![],
        cluster_domain: String::new(),
        memory_capacity,
    }
}

// ---------------------------------------------------------------- teardown

// ---------------------------------------------------------------- floor

/// The runtime's CNI dirs switched to the plain chain for the floor.
struct FloorConf {
    conf_dir: PathBuf,
    parked: bool,
    links: Vec<PathBuf>,
}

impl FloorConf {
    fn install(stack: &Stack, conflist: &str) -> Result<FloorConf> {
        let conf_dir = stack.runtime_conf_dir.clone();
        let mut links = vec![];
        for p in FLOOR_PLUGINS {
            let dst = stack.runtime_bin_dir.join(p);
            if !dst.exists() {
                let src = stack.plugin_dir.join(p);
                std::os::unix::fs::symlink(&src, &dst)
                    .with_context(|| format!("linking {} to {}", dst.display(), src.display()))?;
                links.push(dst);
            }
        }
        let mine = conf_dir.join(MINILET_CONF);
        let parked = mine.exists();
        if parked {
            fs::rename(
                &mine,
                conf_dir.join(format!("{MINILET_CONF}{ASIDE_SUFFIX}")),
            )
            .with_context(|| format!("moving {} aside", mine.display()))?;
        }
        let conf = FloorConf {
            conf_dir,
            parked,
            links,
        };
        if let Err(e) = fs::write(conf.conf_dir.join(FLOOR_CONF), conflist) {
            conf.restore()?;
            bail!("writing {FLOOR_CONF}: {e}");
        }
        Ok(conf)
    }

    fn restore(&self) -> Result<()> {
        let floor = self.conf_dir.join(FLOOR_CONF);
        if floor.exists() {
            fs::remove_file(&floor).with_context(|| format!("removing {}", floor.display()))?;
        }
        if self.parked {
            let aside = self.conf_dir.join(format!("{MINILET_CONF}{ASIDE_SUFFIX}"));
            let mine = self.conf_dir.join(MINILET_CONF);
            if !mine.exists() {
                fs::rename(&aside, &mine)
                    .with_context(|| format!("restoring {}", mine.display()))?;
            } else {
                let _ = fs::remove_file(&aside);
            }
        }
        for l in &self.links {
            let _ = fs::remove_file(l);
        }
        Ok(())
    }
}

/// Put back what an interrupted earlier run left in the runtime's conf dir.
fn repair_conf_dir(stack: &Stack) {
    let dir = &stack.runtime_conf_dir;
    let _ = fs::remove_file(dir.join(FLOOR_CONF));
    let aside = dir.join(format!("{MINILET_CONF}{ASIDE_SUFFIX}"));
    if aside.exists() {
        if dir.join(MINILET_CONF).exists() {
            let _ = fs::remove_file(&aside);
        } else {
            let _ = fs::rename(&aside, dir.join(MINILET_CONF));
        }
    }
}

/// One pod through the direct client: RunPodSandbox, CreateContainer,
/// StartContainer. Returns the time from RunPodSandbox's start to the
/// container started, and the sandbox id.
async fn direct_pod(rt: &RemoteRuntime, host: &HostContext, pod: &Pod) -> Result<(f64, String)> {
    let start = Instant::now();
    let sandbox = spec::sandbox_config(pod, host, 0);
    fs::create_dir_all(&sandbox.log_directory)?;
    let sid = rt.run_pod_sandbox(sandbox.clone()).await?;
    let c = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .ok_or_else(|| anyhow!("pod without container"))?;
    let downward = Downward {
        pod_ip: String::new(),
    };
    let config = spec::container_config(
        pod,
        c,
        false,
        0,
        host,
        &downward,
        &HashMap::new(),
        &Default::default(),
    )?;
    fs::create_dir_all(Path::new(&sandbox.log_directory).join(&c.name))?;
    let cid = rt.create_container(&sid, config, sandbox).await?;
    rt.start_container(&cid).await?;
    Ok((start.elapsed().as_secs_f64(), sid))
}

fn floor_pods(n: usize, image: &str, run: &str) -> Result<Vec<Pod>> {
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    (0..n)
        .map(|i| {
            let mut pod: Pod = minilet::yaml::from_str(&manifest(i, image))?;
            let name = pod.metadata.name.clone().unwrap_or_default();
            pod.metadata.name = Some(format!("{name}-{FLOOR_NODE}"));
            pod.metadata.uid = Some(format!("floor-{run}-{nonce}-{i:03}"));
            Ok(pod)
        })
        .collect()
}

struct Run {
    total: f64,
    per_pod: Vec<f64>,
}

/// `n` pods through the direct client, `parallel` at a time; then teardown.
async fn floor_run(
    rt: &RemoteRuntime,
    host: &HostContext,
    stack: &Stack,
    n: usize,
    parallel: usize,
    tag: &str,
) -> Result<Run> {
    let pods = floor_pods(n, &stack.busybox, tag)?;
    let start = Instant::now();
    let results: Vec<Result<(f64, String)>> =
        futures::stream::iter(pods.iter().map(|p| direct_pod(rt, host, p)))
            .buffer_unordered(parallel)
            .collect()
            .await;
    let total = start.elapsed().as_secs_f64();
    let torn = teardown_node(rt, FLOOR_NODE).await;
    let per_pod = results
        .into_iter()
        .map(|r| r.map(|(t, _)| t))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("direct run {tag}"))?;
    torn.with_context(|| format!("teardown after direct run {tag}"))?;
    let left = leftovers(rt, FLOOR_NODE).await?;
    if left != (0, 0) {
        bail!("after direct run {tag}: {left:?} (sandboxes, containers) left in the runtime");
    }
    Ok(Run { total, per_pod })
}

/// One unmeasured pod that proves the runtime now uses the floor chain (its
/// IP is in the benchmark subnet). containerd reloads its conf dir by itself.
async fn floor_probe(rt: &RemoteRuntime, host: &HostContext, stack: &Stack) -> Result<()> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut last = String::new();
    for attempt in 0..10 {
        let pod = floor_pods(1, &stack.busybox, &format!("probe{attempt}"))?.remove(0);
        let result = direct_pod(rt, host, &pod).await;
        let ip = match &result {
            Ok((_, sid)) => rt
                .pod_sandbox_status(sid)
                .await
                .ok()
                .and_then(|s| s.network)
                .map(|n| n.ip)
                .unwrap_or_default(),
            Err(e) => format!("error: {e:#}"),
        };
        teardown_node(rt, FLOOR_NODE).await?;
        if ip.starts_with(SUBNET_PREFIX) {
            return Ok(());
        }
        last = ip;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!(
        "the runtime did not pick up {FLOOR_CONF} (probe pod got {last:?}, want an IP in {SUBNET})"
    )
}

// ---------------------------------------------------------------- minilet

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

fn hwm_mib(pid: u32) -> f64 {
    mib(proc_status_kib(pid, "VmHWM:").unwrap_or(0))
}

struct Agent {
    child: Child,
    bin: PathBuf,
    config: PathBuf,
}

impl Agent {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn cli(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .args(["--hostname-override", NODE])
            .args(args)
            .output()
    }

    /// SIGTERM, then wait; SIGKILL after 30 s. Returns whether it exited by itself.
    async fn stop(&mut self) -> bool {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let pid = Pid::from_raw(self.pid() as i32);
        let _ = kill(pid, Signal::SIGTERM);
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

/// What one minilet run is asked to do.
struct RunOpts {
    /// maxParallelSandboxCreations written to its config; `None` = the default.
    slots: Option<usize>,
    idle_window: Duration,
}

struct MiniletResult {
    /// The sandbox slots it ran with (the agent's default when not set).
    slots: usize,
    /// The idle CPU window as measured.
    idle_window_s: f64,
    total: Option<f64>,
    per_pod: Vec<f64>,
    /// Per pod, from t0 to the runtime's own started_at of the container.
    per_pod_runtime: Vec<f64>,
    running: usize,
    ready_after: f64,
    peak_rss_mib: f64,
    peak_rss_during_start_mib: f64,
    idle_rss_mib: f64,
    start_cpu_s: f64,
    idle_cpu_pct: Option<f64>,
    teardown_s: Option<f64>,
    /// VmHWM (MiB): of the startup, then (reset after startup) at checkpoints
    /// all running, after idle, after teardown.
    hwm: Vec<(&'static str, f64)>,
    /// Wall clock of t0 (just before the first rename), to line up with the agent's log.
    t0_utc: String,
    log: PathBuf,
}

#[allow(clippy::too_many_arguments)]
async fn minilet_run(
    rt: &RemoteRuntime,
    stack: &Stack,
    bin: &Path,
    work: &Path,
    out: &Path,
    conflist: &str,
    n: usize,
    opts: &RunOpts,
    problems: &mut Vec<String>,
) -> Result<MiniletResult> {
    let manifests = work.join("manifests");
    for d in ["manifests", "staging", "state", "logs"] {
        let _ = fs::remove_dir_all(work.join(d));
    }
    let staging = work.join("staging");
    let net_d = work.join("net.d");
    for d in [&manifests, &staging, &net_d] {
        fs::create_dir_all(d)?;
    }
    fs::write(net_d.join("10-bridge.conflist"), conflist)?;
    let config = work.join("minilet.yaml");
    fs::write(
        &config,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
staticPodPath: {manifests}
containerRuntimeEndpoint: {sock}
podLogsDir: {logs}
---
apiVersion: minilet.io/v1alpha1
kind: MiniletConfiguration
stateDir: {state}
cniConfDir: {net_d}
cniBinDirs: [{plugins}]
runtimeCNIConfDir: {rconf}
runtimeCNIBinDir: {rbin}
{slots}",
            manifests = manifests.display(),
            sock = stack.sock,
            logs = work.join("logs").display(),
            state = work.join("state").display(),
            net_d = net_d.display(),
            plugins = stack.plugin_dir.display(),
            rconf = stack.runtime_conf_dir.display(),
            rbin = stack.runtime_bin_dir.display(),
            slots = opts
                .slots
                .map(|k| format!("maxParallelSandboxCreations: {k}\n"))
                .unwrap_or_default(),
        ),
    )?;
    let slots = match opts.slots {
        Some(k) => k,
        None => minilet::config::Config::default_for(NODE).max_parallel_sandbox_creations,
    };
    let log = out.join(format!("minilet-slots{slots}.log"));
    let log_file = fs::File::create(&log)?;
    let child = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .args(["--hostname-override", NODE])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut agent = Agent {
        child,
        bin: bin.into(),
        config,
    };
    let result = measure(
        rt,
        &mut agent,
        &manifests,
        &staging,
        stack,
        n,
        opts.idle_window,
        problems,
    )
    .await;
    // Whatever happened: manifests gone, pods gone, agent stopped.
    let mut teardown_s = None;
    if let Ok(entries) = fs::read_dir(&manifests) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    let t = Instant::now();
    while t.elapsed() < TEARDOWN_TIMEOUT {
        match rt.list_pod_sandboxes(node_label(NODE)).await {
            Ok(s) if s.is_empty() => {
                teardown_s = Some(t.elapsed().as_secs_f64());
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    if teardown_s.is_none() {
        problems.push(format!(
            "minilet: sandboxes still in the runtime {}s after the manifests were deleted",
            TEARDOWN_TIMEOUT.as_secs()
        ));
    }
    let hwm = proc_status_kib(agent.pid(), "VmHWM:").unwrap_or(0);
    if !agent.stop().await {
        problems.push("minilet: did not exit within 30 s of SIGTERM (killed)".into());
    }
    let (sandboxes, containers) = leftovers(rt, NODE).await?;
    if sandboxes + containers > 0 {
        problems.push(format!(
            "minilet: {sandboxes} sandboxes and {containers} containers left after stop; removed by the benchmark"
        ));
        teardown_node(rt, NODE).await?;
    }
    let mut r = result?;
    r.hwm.push(("teardown", mib(hwm)));
    r.peak_rss_mib = r.hwm.iter().map(|(_, v)| *v).fold(0.0, f64::max);
    r.teardown_s = teardown_s;
    r.log = log;
    r.slots = slots;
    Ok(r)
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    rt: &RemoteRuntime,
    agent: &mut Agent,
    manifests: &Path,
    staging: &Path,
    stack: &Stack,
    n: usize,
    idle_window: Duration,
    problems: &mut Vec<String>,
) -> Result<MiniletResult> {
    let pid = agent.pid();
    let launched = Instant::now();
    loop {
        if let Ok(Some(status)) = agent.child.try_wait() {
            bail!("minilet exited during startup ({status}); see its log");
        }
        if agent
            .cli(&["get", "pods"])
            .is_ok_and(|o| o.status.success())
        {
            break;
        }
        if launched.elapsed() > Duration::from_secs(30) {
            bail!("minilet does not answer `get pods` after 30 s; see its log");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready_after = launched.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Peak of the startup alone, then reset VmHWM (clear_refs 5) so the later
    // checkpoints show the peak of the pod phases on their own.
    let mut hwm = vec![("startup", hwm_mib(pid))];
    let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");

    // Stage the manifests, then rename them in, in a tight loop.
    let mut moves = vec![];
    for i in 0..n {
        let name = format!("sp-{i:03}.yaml");
        fs::write(staging.join(&name), manifest(i, &stack.busybox))?;
        moves.push((staging.join(&name), manifests.join(&name)));
    }
    let cpu_before = common::cpu_ticks(pid).unwrap_or(0);
    let t0_wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i64;
    let t0 = Instant::now();
    for (src, dst) in &moves {
        fs::rename(src, dst)?;
    }

    let mut seen: HashMap<String, (f64, String)> = HashMap::new();
    let mut peak_sampled = 0u64;
    let mut next = t0;
    loop {
        let list = rt.list_containers(node_label(NODE)).await;
        let at = t0.elapsed().as_secs_f64();
        for c in list.into_iter().flatten() {
            if c.state == api::ContainerState::ContainerRunning as i32 {
                let pod = c.labels.get(labels::POD_NAME).cloned().unwrap_or_default();
                seen.entry(pod).or_insert((at, c.id));
            }
        }
        peak_sampled = peak_sampled.max(proc_status_kib(pid, "VmRSS:").unwrap_or(0));
        if seen.len() >= n {
            break;
        }
        if t0.elapsed() > START_TIMEOUT {
            problems.push(format!(
                "minilet: only {} of {n} containers running after {}s",
                seen.len(),
                START_TIMEOUT.as_secs()
            ));
            break;
        }
        if let Ok(Some(status)) = agent.child.try_wait() {
            bail!("minilet exited during the run ({status}); see its log");
        }
        next += POLL;
        tokio::time::sleep_until(next.into()).await;
    }
    let start_cpu_ticks = common::cpu_ticks(pid)
        .unwrap_or(0)
        .saturating_sub(cpu_before);
    hwm.push(("running", hwm_mib(pid)));
    let running = seen.len();
    let mut per_pod: Vec<f64> = seen.values().map(|(t, _)| *t).collect();
    per_pod.sort_by(f64::total_cmp);
    let total = (running >= n).then(|| per_pod.last().copied().unwrap_or(0.0));
    // Cross-check with the runtime's own start timestamps.
    let mut per_pod_runtime = vec![];
    for (_, id) in seen.values() {
        if let Ok(s) = rt.container_status(id).await {
            per_pod_runtime.push((s.started_at - t0_wall) as f64 / 1e9);
        }
    }
    per_pod_runtime.sort_by(f64::total_cmp);

    // Idle CPU with the pods running.
    tokio::time::sleep(IDLE_SETTLE).await;
    let hz = common::clock_ticks_per_sec();
    let idle_start = Instant::now();
    let before = common::cpu_ticks(pid);
    while idle_start.elapsed() < idle_window {
        peak_sampled = peak_sampled.max(proc_status_kib(pid, "VmRSS:").unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = common::cpu_ticks(pid);
    let window = idle_start.elapsed().as_secs_f64();
    let idle_cpu_pct = match (before, after) {
        (Some(b), Some(a)) => Some((a.saturating_sub(b)) as f64 / hz / window * 100.0),
        _ => None,
    };
    let idle_rss = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    hwm.push(("idle", hwm_mib(pid)));
    Ok(MiniletResult {
        slots: 0,
        idle_window_s: window,
        total,
        per_pod,
        per_pod_runtime,
        running,
        ready_after,
        peak_rss_mib: 0.0,
        peak_rss_during_start_mib: mib(peak_sampled),
        idle_rss_mib: mib(idle_rss),
        start_cpu_s: start_cpu_ticks as f64 / hz,
        idle_cpu_pct,
        teardown_s: None,
        hwm,
        t0_utc: jiff::Timestamp::from_nanosecond(i128::from(t0_wall))
            .map(|t| t.to_string())
            .unwrap_or_default(),
        log: PathBuf::new(),
    })
}

// ---------------------------------------------------------------- output

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2} s"))
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn run_json(total: Option<f64>, per_pod: &[f64]) -> serde_json::Value {
    json!({
        "total_s": total.map(common::round3),
        "p50_pod_s": common::pct(per_pod, 50.0).map(common::round3),
        "p99_pod_s": common::pct(per_pod, 99.0).map(common::round3),
        "min_pod_s": per_pod.first().copied().map(common::round3),
        "max_pod_s": per_pod.last().copied().map(common::round3),
    })
}

async fn run() -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root (it drives containerd and CNI)");
    }
    let n: usize = common::env_positive("BENCH_PODS", 30)?;
    let widths = env_positive_list("BENCH_PARALLEL", &PARALLEL)?;
    let slot_runs: Vec<Option<usize>> = match std::env::var_os("BENCH_SLOTS") {
        Some(_) => env_positive_list("BENCH_SLOTS", &[])?
            .into_iter()
            .map(Some)
            .collect(),
        None => vec![None],
    };
    let idle_window =
        Duration::from_secs(common::env_positive("BENCH_IDLE_SECS", IDLE_WINDOW_SECS)? as u64);
    let stack = load_stack()?;
    let rt = match tokio::time::timeout(
        Duration::from_secs(10),
        RemoteRuntime::connect(&stack.sock, &stack.sock, Duration::from_secs(120)),
    )
    .await
    {
        Ok(Ok(rt)) => rt,
        Ok(Err(e)) => bail!(
            "containerd at {} does not answer ({e}); run `integration/stack.sh up`",
            stack.sock
        ),
        Err(_) => bail!(
            "containerd at {} does not answer within 10 s; run `integration/stack.sh up`",
            stack.sock
        ),
    };
    let (rt_name, rt_version) = rt.version().await?;
    if rt.image_status(&stack.busybox).await?.is_none() {
        bail!(
            "image {} is not present in the runtime; run `integration/stack.sh up`",
            stack.busybox
        );
    }
    let bin = common::minilet_binary("static_pods")?;
    let out = common::target_dir().join("bench-static-pods");
    fs::create_dir_all(&out)?;
    let work = tempfile::Builder::new()
        .prefix("minilet-bench-")
        .tempdir()
        .context("creating a work dir")?;
    let work_path = work.path().to_path_buf();

    // Leftovers of an interrupted earlier run.
    repair_conf_dir(&stack);
    for node in [FLOOR_NODE, NODE] {
        if leftovers(&rt, node).await? != (0, 0) {
            eprintln!("static_pods: removing pods an earlier run left with {node:?}");
            teardown_node(&rt, node).await?;
        }
    }
    let netns_before = netns_count();
    let conflist = bench_conflist()?;
    let mut problems: Vec<String> = vec![];

    // 1. The floor: the runtime runs the plain chain itself.
    eprintln!(
        "static_pods: direct CRI floor, {n} pods, 1 at a time and {} in parallel",
        join(&widths, "/")
    );
    let host = host_context(&work_path.join("logs"), FLOOR_NODE);
    let floor = FloorConf::install(&stack, &conflist)?;
    let floor_result = async {
        floor_probe(&rt, &host, &stack).await?;
        let seq = floor_run(&rt, &host, &stack, n, 1, "seq").await?;
        let mut par = vec![];
        for &k in &widths {
            par.push((
                k,
                floor_run(&rt, &host, &stack, n, k, &format!("par{k}")).await?,
            ));
        }
        Ok::<_, anyhow::Error>((seq, par))
    }
    .await;
    let restored = floor.restore();
    let (seq, par) = floor_result?;
    restored?;
    let netns_after_floor = netns_count();
    if netns_after_floor != netns_before {
        problems.push(format!(
            "direct runs: netns count {netns_before} before, {netns_after_floor} after"
        ));
    }

    // 2. minilet, once per sandbox-slot setting.
    let mut runs = vec![];
    for slots in &slot_runs {
        eprintln!(
            "static_pods: minilet, {n} manifests written at once, sandbox slots {}, idle window {} s",
            slots.map_or_else(|| "default".into(), |k| k.to_string()),
            idle_window.as_secs()
        );
        let opts = RunOpts {
            slots: *slots,
            idle_window,
        };
        let m = minilet_run(
            &rt,
            &stack,
            &bin,
            &work_path,
            &out,
            &conflist,
            n,
            &opts,
            &mut problems,
        )
        .await?;
        let netns_after = netns_count();
        if netns_after != netns_before {
            problems.push(format!(
                "minilet (slots {}): netns count {netns_before} before, {netns_after} after (leak)",
                m.slots
            ));
        }
        runs.push(m);
    }

    // 3. Report.
    let seq_pods = sorted(seq.per_pod);
    let par: Vec<(usize, Run)> = par
        .into_iter()
        .map(|(k, r)| {
            (
                k,
                Run {
                    total: r.total,
                    per_pod: sorted(r.per_pod),
                },
            )
        })
        .collect();
    // The best floor: the fastest direct run, whatever its width.
    let (best_k, best) = par
        .iter()
        .map(|(k, r)| (*k, r.total))
        .chain([(1, seq.total)])
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((1, seq.total));
    let four = par.iter().find(|(k, _)| *k == 4).map(|(_, r)| r.total);
    let met = |b: bool| if b { "MET" } else { "NOT MET" };
    let load = fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    println!();
    println!(
        "static pods: {n} pods, busybox, image present ({rt_name} {rt_version}); load average {load}"
    );
    let idle_col = format!("idle CPU/{}s", idle_window.as_secs());
    println!(
        "{:<34}{:>10}{:>10}{:>10}{:>11}{:>14}",
        "", "total", "p50/pod", "p99/pod", "peak RSS", idle_col
    );
    let row = |label: &str, total: Option<f64>, pods: &[f64], rss: &str, cpu: &str| {
        println!(
            "{label:<34}{:>10}{:>10}{:>10}{rss:>11}{cpu:>14}",
            secs(total),
            secs(common::pct(pods, 50.0)),
            secs(common::pct(pods, 99.0)),
        )
    };
    row(
        "direct CRI, 1 at a time",
        Some(seq.total),
        &seq_pods,
        "",
        "",
    );
    for (k, r) in &par {
        row(
            &format!("direct CRI, {k} parallel"),
            Some(r.total),
            &r.per_pod,
            "",
            "",
        );
    }
    for m in &runs {
        let idle = m
            .idle_cpu_pct
            .map_or_else(|| "-".into(), |c| format!("{c:.2} %"));
        row(
            &format!("minilet, {} sandbox slots", m.slots),
            m.total,
            &m.per_pod,
            &format!("{:.1} MiB", m.peak_rss_mib),
            &idle,
        );
    }
    println!(
        "(direct per pod: RunPodSandbox start -> container started; minilet per pod: manifest write -> container seen RUNNING)"
    );
    let best_limit = best * TARGET_BEST_FACTOR;
    let mut verdicts = vec![];
    for m in &runs {
        let best_met = m.total.is_some_and(|t| t <= best_limit);
        let four_met = four.map(|f| m.total.is_some_and(|t| t <= f * TARGET_FACTOR));
        let rss_met = m.peak_rss_mib <= TARGET_RSS_MIB;
        let cpu_met = m.idle_cpu_pct.is_some_and(|c| c < TARGET_IDLE_CPU_PCT);
        println!(
            "targets, {} slots: <= {TARGET_BEST_FACTOR}x best direct (direct-{best_k}, {best_limit:.2} s): {}; <= {TARGET_FACTOR}x direct-4: {}; RSS <= {TARGET_RSS_MIB} MiB: {}; idle CPU < {TARGET_IDLE_CPU_PCT} %: {}",
            m.slots,
            met(best_met),
            four_met.map_or("-", met),
            met(rss_met),
            met(cpu_met)
        );
        if let Some(t) = m.total {
            println!(
                "minilet, {} slots: {:.2}x best direct (direct-{best_k}), {}; p50/pod {}",
                m.slots,
                t / best,
                par.iter()
                    .map(|(k, r)| format!("{:.2}x direct-{k}", t / r.total))
                    .chain([format!("{:.2}x direct-1", t / seq.total)])
                    .collect::<Vec<_>>()
                    .join(", "),
                secs(common::pct(&m.per_pod, 50.0)),
            );
        }
        println!(
            "minilet, {} slots: ready after {:.2} s, {} of {n} running, CPU during start {:.2} s, RSS {:.1} MiB max sampled during start/idle, {:.1} MiB idle, idle window {:.1} s, teardown {}, runtime started_at p50/max {}/{}",
            m.slots,
            m.ready_after,
            m.running,
            m.start_cpu_s,
            m.peak_rss_during_start_mib,
            m.idle_rss_mib,
            m.idle_window_s,
            secs(m.teardown_s),
            secs(common::pct(&m.per_pod_runtime, 50.0)),
            secs(m.per_pod_runtime.last().copied()),
        );
        println!(
            "minilet, {} slots: peak RSS (VmHWM) at startup, then since startup at each checkpoint: {}; t0 = {}; log {}",
            m.slots,
            m.hwm
                .iter()
                .map(|(k, v)| format!("{k} {v:.1} MiB"))
                .collect::<Vec<_>>()
                .join(", "),
            m.t0_utc,
            m.log.display()
        );
        verdicts.push(json!({
            "best_direct_limit_s": common::round3(best_limit),
            "best_direct_met": best_met,
            "direct4_limit_s": four.map(|f| common::round3(f * TARGET_FACTOR)),
            "direct4_met": four_met,
            "rss_limit_mib": TARGET_RSS_MIB,
            "rss_met": rss_met,
            "idle_cpu_limit_pct": TARGET_IDLE_CPU_PCT,
            "idle_cpu_met": cpu_met,
        }));
    }
    for p in &problems {
        println!("problem: {p}");
    }
    let report = json!({
        "pods": n,
        "image": stack.busybox,
        "runtime": format!("{rt_name} {rt_version}"),
        "load_average": load,
        "direct_seq": run_json(Some(seq.total), &seq_pods),
        "direct_parallel": par
            .iter()
            .map(|(k, r)| (k.to_string(), run_json(Some(r.total), &r.per_pod)))
            .collect::<serde_json::Map<_, _>>(),
        "best_direct": { "parallel": best_k, "total_s": common::round3(best) },
        "minilet": runs.iter().zip(verdicts).map(|(m, targets)| json!({
            "sandbox_slots": m.slots,
            "total_s": m.total.map(common::round3),
            "p50_pod_s": common::pct(&m.per_pod, 50.0).map(common::round3),
            "p99_pod_s": common::pct(&m.per_pod, 99.0).map(common::round3),
            "vs_best_direct": m.total.map(|t| common::round3(t / best)),
            "running": m.running,
            "runtime_started_at_p50_s": common::pct(&m.per_pod_runtime, 50.0).map(common::round3),
            "runtime_started_at_max_s": m.per_pod_runtime.last().copied().map(common::round3),
            "ready_after_s": common::round3(m.ready_after),
            "peak_rss_mib": common::round3(m.peak_rss_mib),
            "max_sampled_rss_mib": common::round3(m.peak_rss_during_start_mib),
            "idle_rss_mib": common::round3(m.idle_rss_mib),
            "start_cpu_s": common::round3(m.start_cpu_s),
            "idle_cpu_pct": m.idle_cpu_pct.map(common::round3),
            "idle_window_s": common::round3(m.idle_window_s),
            "teardown_s": m.teardown_s.map(common::round3),
            "peak_rss_by_phase_mib": m.hwm.iter().map(|(k, v)| ((*k).to_string(), json!(common::round3(*v)))).collect::<serde_json::Map<_, _>>(),
            "t0_utc": m.t0_utc,
            "log": m.log.display().to_string(),
            "targets": targets,
        })).collect::<Vec<_>>(),
        "problems": problems,
    });
    let line = serde_json::to_string(&report)?;
    let json_path = out.join("result.json");
    fs::write(&json_path, format!("{line}\n"))?;
    println!("JSON: {line}");
    println!("(also written to {})", json_path.display());
    drop(work);
    // Not pass/fail on targets; only a broken run (pods that never ran,
    // leftovers) exits non-zero.
    Ok(problems.is_empty())
}

fn join(v: &[usize], sep: &str) -> String {
    v.iter().map(usize::to_string).collect::<Vec<_>>().join(sep)
}

/// A comma-separated list of positive counts from the environment (e.g.
/// `BENCH_PARALLEL=4,8,16`), or `default` when unset.
fn env_positive_list(name: &str, default: &[usize]) -> Result<Vec<usize>> {
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().parse().ok().filter(|n| *n > 0))
            .collect::<Option<Vec<usize>>>()
            .filter(|l| !l.is_empty())
            .ok_or_else(|| {
                anyhow!("{name}={v:?} is not a list of positive numbers such as 4,8,16")
            }),
        Err(_) => Ok(default.to_vec()),
    }
}
