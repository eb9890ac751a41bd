//! Benchmark: N pods (default 30, env BENCH_PODS), each with its own
//! dynamically provisioned CSI volume, written at once into the static pod
//! dir with their StorageClass and claims; time until every container runs
//! under minilet, against the same pods without volumes and against the
//! test driver's own calls (CreateVolume, ControllerPublishVolume,
//! NodeStageVolume, NodePublishVolume) made directly by the bench, one
//! volume at a time and all in parallel. From the driver's call log: the
//! time each pod spent inside driver calls, minilet's own overhead per pod,
//! and how many different volumes' calls were in flight at once. See
//! integration/bench/README.md.
//!
//! Runs as root against the stack of `integration/stack.sh up`, under the
//! e2e lock (taken here; BENCH_NO_LOCK=1 if the caller holds it). Not a
//! pass/fail test: it prints a table, whether each target is met, and JSON.

mod common;
mod stack;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use minilet::cri::remote::RemoteRuntime;
use minilet::cri::{Runtime, api};
use minilet::csi::proto::csi;
use minilet::csi::{CsiClient, Timeouts};
use minilet::labels;
use minilet_test_csi::harness::{CSI_DRIVER, CsiDriver, CsiOptions};
use minilet_test_csi::record::Call;
use serde_json::{Value, json};
use stack::{Stack, leftovers, load_stack, node_label, teardown_node};

/// Node name minilet runs under (`--hostname-override`), and the driver's node id.
const NODE: &str = "bench-csi";
/// The bench's own network, so it collides neither with the e2e suite's
/// nor with the other benches'.
const NET_NAME: &str = "minilet-bench-csi";
const BRIDGE: &str = "mlbench2";
const SUBNET: &str = "10.248.0.0/16";
const LOCK_FILE: &str = "/tmp/minilet-e2e.lock";
const CLASS: &str = "bench-csi";
/// Each claim's (and each direct volume's) size.
const SIZE: i64 = 32 << 20;
const POLL: Duration = Duration::from_millis(20);
const START_TIMEOUT: Duration = Duration::from_secs(300);
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(300);
/// The target: minilet's volume path adds at most this per pod
/// beyond the driver's own calls.
const TARGET_OVERHEAD_MS: f64 = 10.0;
/// The calls of one volume's set-up path, in order.
const SETUP: [&str; 4] = [
    "CreateVolume",
    "ControllerPublishVolume",
    "NodeStageVolume",
    "NodePublishVolume",
];

fn main() -> ExitCode {
    common::main("csi_volumes", || common::runtime()?.block_on(run()))
}

// ---------------------------------------------------------------- setup

/// The e2e lock, held for the whole run (None with BENCH_NO_LOCK=1).
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
    eprintln!("csi_volumes: waiting for {LOCK_FILE}");
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map(Some)
        .map_err(|(_, e)| anyhow!("locking {LOCK_FILE}: {e}"))
}

/// The test driver's binary: MINILET_TEST_CSI, else built (cargo, the
/// bench's own profile) next to the bench binary's target dir.
fn driver_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MINILET_TEST_CSI") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("MINILET_TEST_CSI={} is not a file", p.display());
        }
        return Ok(p);
    }
    // target/<profile>/deps/csi_volumes-<hash> → target/<profile>
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("no target dir above {}", exe.display()))?
        .to_path_buf();
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["build", "-p", "minilet-test-csi"])
        .current_dir(common::repo());
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    eprintln!("csi_volumes: {cmd:?}");
    let st = cmd
        .status()
        .context("running cargo build -p minilet-test-csi")?;
    if !st.success() {
        bail!("cargo build -p minilet-test-csi failed ({st})");
    }
    let bin = dir.join("minilet-test-csi");
    if !bin.is_file() {
        bail!("{} missing after the build", bin.display());
    }
    Ok(bin)
}

/// Mount points under `root` (/proc/self/mountinfo).
fn mounts_under(root: &Path) -> Vec<String> {
    let root = root.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| p.starts_with(&root))
        .collect()
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// ---------------------------------------------------------------- direct

/// One volume's set-up through the bench's own client: the four calls'
/// durations (ms, in `SETUP` order) and the whole path.
struct DirectVolume {
    calls_ms: [f64; 4],
    total_ms: f64,
}

/// What a direct volume needs to be torn down again.
struct Made {
    volume_id: String,
    staging: PathBuf,
    target: PathBuf,
}

fn mount_capability() -> csi::VolumeCapability {
    minilet::csi::controller::capability("ReadWriteOnce", "Filesystem", None, &[])
}

async fn direct_volume(
    client: &CsiClient,
    work: &Path,
    tag: &str,
    i: usize,
) -> Result<(DirectVolume, Made)> {
    let staging = work.join(format!("direct/{tag}/staging/{i:03}"));
    let target = work.join(format!("direct/{tag}/pods/{i:03}/mount"));
    // The CO makes the staging dir and the target's parent (as minilet does).
    fs::create_dir_all(&staging)?;
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    let start = Instant::now();
    let mut calls_ms = [0.0; 4];
    let t = Instant::now();
    let created = client
        .create_volume(csi::CreateVolumeRequest {
            name: format!("bench-direct-{tag}-{i:03}"),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: SIZE,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_capability()],
            ..Default::default()
        })
        .await?
        .volume
        .ok_or_else(|| anyhow!("CreateVolume answered without a volume"))?;
    calls_ms[0] = ms_since(t);
    let made = Made {
        volume_id: created.volume_id.clone(),
        staging: staging.clone(),
        target: target.clone(),
    };
    let t = Instant::now();
    let published = client
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: created.volume_id.clone(),
            node_id: NODE.into(),
            volume_capability: Some(mount_capability()),
            volume_context: created.volume_context.clone(),
            ..Default::default()
        })
        .await?;
    calls_ms[1] = ms_since(t);
    let t = Instant::now();
    client
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: created.volume_id.clone(),
            publish_context: published.publish_context.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(mount_capability()),
            volume_context: created.volume_context.clone(),
            ..Default::default()
        })
        .await?;
    calls_ms[2] = ms_since(t);
    let t = Instant::now();
    client
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: created.volume_id.clone(),
            publish_context: published.publish_context,
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_capability()),
            volume_context: created.volume_context,
            ..Default::default()
        })
        .await?;
    calls_ms[3] = ms_since(t);
    Ok((
        DirectVolume {
            calls_ms,
            total_ms: ms_since(start),
        },
        made,
    ))
}

/// Undo one direct volume: Unpublish, Unstage, ControllerUnpublish, Delete.
async fn direct_teardown(client: &CsiClient, m: &Made) -> Result<()> {
    client
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: m.volume_id.clone(),
            target_path: m.target.display().to_string(),
        })
        .await?;
    client
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: m.volume_id.clone(),
            staging_target_path: m.staging.display().to_string(),
        })
        .await?;
    client
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: m.volume_id.clone(),
            node_id: NODE.into(),
            ..Default::default()
        })
        .await?;
    client
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: m.volume_id.clone(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

struct DirectRun {
    total_s: f64,
    volumes: Vec<DirectVolume>,
    /// Max different volumes' Stage/Publish calls in flight at once.
    max_in_flight: usize,
}

/// `n` volumes set up through the bench's client, one at a time or all at
/// once; then all torn down (not measured).
async fn direct_run(
    client: &CsiClient,
    driver: &CsiDriver,
    work: &Path,
    n: usize,
    parallel: bool,
) -> Result<DirectRun> {
    let tag = if parallel { "par" } else { "seq" };
    let first_call = now_ms();
    let start = Instant::now();
    let results: Vec<Result<(DirectVolume, Made)>> = if parallel {
        futures::future::join_all((0..n).map(|i| direct_volume(client, work, tag, i))).await
    } else {
        let mut v = vec![];
        for i in 0..n {
            v.push(direct_volume(client, work, tag, i).await);
        }
        v
    };
    let total_s = start.elapsed().as_secs_f64();
    let mut volumes = vec![];
    let mut made = vec![];
    let mut first_err = None;
    for r in results {
        match r {
            Ok((v, m)) => {
                volumes.push(v);
                made.push(m);
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let calls: Vec<Call> = driver
        .calls()
        .into_iter()
        .filter(|c| c.start_ms >= first_call)
        .collect();
    let max_in_flight = max_overlap(&calls, &["NodeStageVolume", "NodePublishVolume"]);
    let torn = futures::future::join_all(made.iter().map(|m| direct_teardown(client, m))).await;
    if let Some(e) = first_err {
        return Err(e.context(format!("direct run {tag}")));
    }
    torn.into_iter()
        .collect::<Result<Vec<()>>>()
        .with_context(|| format!("teardown of direct run {tag}"))?;
    Ok(DirectRun {
        total_s,
        volumes,
        max_in_flight,
    })
}

/// The most calls of `methods` (OK, of different volumes) in flight at one
/// time, from their start/end ms; calls touching only at an end do not overlap.
fn max_overlap(calls: &[Call], methods: &[&str]) -> usize {
    let mut events: Vec<(u64, i32)> = calls
        .iter()
        .filter(|c| c.code == "OK" && methods.contains(&c.method.as_str()))
        .flat_map(|c| [(c.start_ms, 1), (c.end_ms.max(c.start_ms), -1)])
        .collect();
    // Ends before starts at the same ms.
    events.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in events {
        now += d;
        max = max.max(now);
    }
    max as usize
}

// ---------------------------------------------------------------- minilet

struct Agent {
    child: Child,
    bin: PathBuf,
    config: PathBuf,
}

impl Agent {
    fn start(
        bin: &Path,
        work: &Path,
        stack: &Stack,
        driver: &CsiDriver,
        log: &Path,
    ) -> Result<Agent> {
        let net_d = work.join("net.d");
        for d in ["manifests", "staging", "logs"] {
            fs::create_dir_all(work.join(d))?;
        }
        fs::create_dir_all(&net_d)?;
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": NET_NAME,
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": true, "ipMasq": true,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": work.join("ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
            ]
        });
        fs::write(
            net_d.join("10-bench.conflist"),
            serde_json::to_vec_pretty(&conflist)?,
        )?;
        let config = work.join("minilet.yaml");
        fs::write(
            &config,
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
staticPodPath: {manifests}
containerRuntimeEndpoint: {sock}
podLogsDir: {logs}
evictionHard: {{memory.available: 100Mi, nodefs.available: \"1%\", nodefs.inodesFree: \"1%\"}}
---
apiVersion: minilet.io/v1alpha1
kind: MiniletConfiguration
stateDir: {state}
cniConfDir: {net_d}
cniBinDirs: [{plugins}]
runtimeCNIConfDir: {rconf}
runtimeCNIBinDir: {rbin}
{driver}
",
                manifests = work.join("manifests").display(),
                sock = stack.sock,
                logs = work.join("logs").display(),
                state = work.join("state").display(),
                net_d = net_d.display(),
                plugins = stack.plugin_dir.display(),
                rconf = stack.runtime_conf_dir.display(),
                rbin = stack.runtime_bin_dir.display(),
                driver = driver.config_line(),
            ),
        )?;
        let log_file = fs::File::create(log)?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .args(["--hostname-override", NODE])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Agent {
            child,
            bin: bin.into(),
            config,
        })
    }

    fn cli(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .args(["--hostname-override", NODE])
            .args(args)
            .output()
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let launched = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("minilet exited during startup ({status}); see its log");
            }
            if self.cli(&["get", "pods"]).is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if launched.elapsed() > Duration::from_secs(30) {
                bail!("minilet does not answer `get pods` after 30 s; see its log");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// claim name → (its bound volume's name, that volume's CSI handle),
    /// from `get pv,pvc`.
    fn claim_volumes(&self) -> Result<HashMap<String, (String, String)>> {
        let out = self.cli(&["get", "pv,pvc", "-o", "json"])?;
        if !out.status.success() {
            bail!(
                "minilet get pv,pvc failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let list: Value = serde_json::from_slice(&out.stdout)?;
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let handles: HashMap<&str, &str> = items
            .iter()
            .filter(|i| i["kind"] == "PersistentVolume")
            .filter_map(|i| {
                Some((
                    i["metadata"]["name"].as_str()?,
                    i["spec"]["csi"]["volumeHandle"].as_str()?,
                ))
            })
            .collect();
        Ok(items
            .iter()
            .filter(|i| i["kind"] == "PersistentVolumeClaim")
            .filter_map(|i| {
                let pv = i["spec"]["volumeName"].as_str()?;
                Some((
                    i["metadata"]["name"].as_str()?.to_string(),
                    (pv.to_string(), handles.get(pv)?.to_string()),
                ))
            })
            .collect())
    }

    /// SIGTERM, then wait; SIGKILL after 30 s. Whether it exited by itself.
    async fn stop(&mut self) -> bool {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
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

fn class_manifest() -> String {
    format!(
        "apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {{name: {CLASS}}}
provisioner: {CSI_DRIVER}
reclaimPolicy: Delete
volumeBindingMode: Immediate
"
    )
}

fn claim_manifest(i: usize) -> String {
    format!(
        "apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: bv-{i:03}, namespace: default}}
spec: {{storageClassName: {CLASS}, accessModes: [ReadWriteOnce], resources: {{requests: {{storage: {SIZE}}}}}}}
"
    )
}

fn pod_manifest(i: usize, image: &str, with_volume: bool) -> String {
    let (mounts, volumes) = if with_volume {
        (
            "\n    volumeMounts: [{name: data, mountPath: /data}]".to_string(),
            format!(
                "\n  volumes: [{{name: data, persistentVolumeClaim: {{claimName: bv-{i:03}}}}}]"
            ),
        )
    } else {
        (String::new(), String::new())
    };
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: bp-{i:03}
  namespace: default
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: sleep
    image: {image}
    imagePullPolicy: IfNotPresent
    command: [sleep, \"3600\"]{mounts}{volumes}
"
    )
}

/// The pod index of a static pod's name label (`bp-007-bench-csi` → 7).
fn pod_index(name: &str) -> Option<usize> {
    name.strip_prefix("bp-")?.get(..3)?.parse().ok()
}

/// Files staged, then renamed into the manifest dir in a tight loop; per
/// pod, t0 (just before the first rename) → first poll showing its
/// container RUNNING. Returns (per pod index → seconds, t0 wall ms).
async fn write_and_wait(
    rt: &RemoteRuntime,
    agent: &mut Agent,
    work: &Path,
    files: &[(String, String)],
    n: usize,
    problems: &mut Vec<String>,
    what: &str,
) -> Result<(BTreeMap<usize, f64>, u64, Option<f64>)> {
    let (staging, manifests) = (work.join("staging"), work.join("manifests"));
    let mut moves = vec![];
    for (name, text) in files {
        fs::write(staging.join(name), text)?;
        moves.push((staging.join(name), manifests.join(name)));
    }
    let pid = agent.child.id();
    let cpu_before = common::cpu_ticks(pid);
    let t0_ms = now_ms();
    let t0 = Instant::now();
    for (src, dst) in &moves {
        fs::rename(src, dst)?;
    }
    let mut seen = BTreeMap::new();
    let mut next = t0;
    loop {
        let list = rt.list_containers(node_label(NODE)).await;
        let at = t0.elapsed().as_secs_f64();
        for c in list.into_iter().flatten() {
            if c.state == api::ContainerState::ContainerRunning as i32
                && let Some(i) = c.labels.get(labels::POD_NAME).and_then(|p| pod_index(p))
            {
                seen.entry(i).or_insert(at);
            }
        }
        if seen.len() >= n {
            break;
        }
        if t0.elapsed() > START_TIMEOUT {
            problems.push(format!(
                "{what}: only {} of {n} containers running after {} s",
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
    let cpu_s = match (cpu_before, common::cpu_ticks(pid)) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / common::clock_ticks_per_sec()),
        _ => None,
    };
    Ok((seen, t0_ms, cpu_s))
}

/// Remove manifest files whose name starts with `prefix`.
fn remove_manifests(work: &Path, prefix: &str) {
    if let Ok(entries) = fs::read_dir(work.join("manifests")) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Poll `done` every 100 ms up to TEARDOWN_TIMEOUT; seconds taken, or None.
async fn wait_until<F, Fut>(mut done: F) -> Option<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while t.elapsed() < TEARDOWN_TIMEOUT {
        if done().await {
            return Some(t.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn sandboxes_gone(rt: &RemoteRuntime) -> bool {
    rt.list_pod_sandboxes(node_label(NODE))
        .await
        .is_ok_and(|s| s.is_empty())
}

/// Per pod, from the driver's call log: ms spent inside the set-up calls
/// of its volume (by handle; CreateVolume by the volume's name).
fn driver_ms_per_pod(
    calls: &[Call],
    volumes: &HashMap<String, (String, String)>,
    n: usize,
) -> BTreeMap<usize, f64> {
    (0..n)
        .filter_map(|i| {
            let claim = format!("bv-{i:03}");
            let (pv, handle) = volumes.get(&claim)?;
            let ms: u64 = calls
                .iter()
                .filter(|c| SETUP.contains(&c.method.as_str()))
                .filter(|c| {
                    if c.method == "CreateVolume" {
                        c.name == *pv
                    } else {
                        c.volume_id == *handle
                    }
                })
                .map(|c| c.end_ms.saturating_sub(c.start_ms))
                .sum();
            Some((i, ms as f64))
        })
        .collect()
}

/// Per pod, ms between the set-up calls of its volume (CreateVolume end →
/// ControllerPublishVolume start → … → NodePublishVolume start, the first
/// OK call of each): the agent's own time on the volume path between the
/// driver's calls, free of the other pods' place in the start queue.
fn gaps_ms_per_pod(
    calls: &[Call],
    volumes: &HashMap<String, (String, String)>,
    n: usize,
) -> BTreeMap<usize, [f64; 3]> {
    (0..n)
        .filter_map(|i| {
            let (pv, handle) = volumes.get(&format!("bv-{i:03}"))?;
            let steps: Vec<&Call> = SETUP
                .iter()
                .map(|m| {
                    calls.iter().find(|c| {
                        c.code == "OK"
                            && c.method == *m
                            && if *m == "CreateVolume" {
                                c.name == *pv
                            } else {
                                c.volume_id == *handle
                            }
                    })
                })
                .collect::<Option<_>>()?;
            let gap = |k: usize| steps[k + 1].start_ms.saturating_sub(steps[k].end_ms) as f64;
            Some((i, [gap(0), gap(1), gap(2)]))
        })
        .collect()
}

// ---------------------------------------------------------------- output

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn stats_json(v: &[f64], unit: &str) -> Value {
    let v = sorted(v.to_vec());
    json!({
        format!("p50_{unit}"): common::pct(&v, 50.0).map(common::round3),
        format!("p99_{unit}"): common::pct(&v, 99.0).map(common::round3),
        format!("max_{unit}"): v.last().copied().map(common::round3),
        format!("min_{unit}"): v.first().copied().map(common::round3),
    })
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    match (v, unit) {
        (None, _) => "-".into(),
        (Some(v), "s") => format!("{v:.2} s"),
        (Some(v), _) => format!("{v:.1} ms"),
    }
}

fn row(label: &str, total: Option<f64>, per: &[f64], unit: &str) {
    let per = sorted(per.to_vec());
    println!(
        "{label:<52}{:>10}{:>11}{:>11}{:>11}",
        fmt(total, "s"),
        fmt(common::pct(&per, 50.0), unit),
        fmt(common::pct(&per, 99.0), unit),
        fmt(per.last().copied(), unit),
    );
}

// ---------------------------------------------------------------- run

async fn run() -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root (loop devices, mounts, containerd)");
    }
    let n = common::env_positive("BENCH_PODS", 30)?;
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
    if rt.image_status(&stack.busybox).await?.is_none() {
        bail!(
            "image {} is not present in the runtime; run `integration/stack.sh up`",
            stack.busybox
        );
    }
    let bin = common::minilet_binary("csi_volumes")?;
    let driver_bin = driver_binary()?;
    let out = common::target_dir().join("bench-csi-volumes");
    fs::create_dir_all(&out)?;
    let _lock = take_lock()?;
    let work = tempfile::Builder::new()
        .prefix("minilet-bench-csi-")
        .tempdir()
        .context("creating a work dir")?;
    let work_path = work.path().to_path_buf();
    if !rt.list_pod_sandboxes(node_label(NODE)).await?.is_empty() {
        eprintln!("csi_volumes: removing pods an earlier run left with {NODE:?}");
        teardown_node(&rt, NODE).await?;
    }
    let mut problems: Vec<String> = vec![];
    let options = |binary: &Path| CsiOptions {
        binary: Some(binary.to_path_buf()),
        ..CsiOptions::new(NODE)
    };

    // 1. The driver's own calls, from the bench's client.
    eprintln!("csi_volumes: driver calls direct, {n} volumes one at a time, then {n} in parallel");
    let (seq, par) = {
        let driver = CsiDriver::start_with(options(&driver_bin));
        let client = CsiClient::new(
            CSI_DRIVER,
            &driver.endpoint().display().to_string(),
            Timeouts::default(),
        )?;
        // One unmeasured call dials the socket.
        client.get_plugin_info(csi::GetPluginInfoRequest {}).await?;
        let seq = direct_run(&client, &driver, &work_path, n, false).await?;
        let par = direct_run(&client, &driver, &work_path, n, true).await?;
        if !driver.mounts().is_empty() || !driver.loop_devices().is_empty() {
            problems.push(format!(
                "direct runs left mounts {:?} and loop devices {:?}",
                driver.mounts(),
                driver.loop_devices()
            ));
        }
        (seq, par)
    };

    // 2. minilet, the pods without volumes, then with one volume each; the
    //    same agent (configured with the driver in both runs).
    let driver = CsiDriver::start_with(options(&driver_bin));
    let log = out.join("minilet.log");
    let mut agent = Agent::start(&bin, &work_path, &stack, &driver, &log)?;
    let measured = measure_minilet(
        &rt,
        &mut agent,
        &driver,
        &work_path,
        &stack,
        n,
        &mut problems,
    )
    .await;
    // Whatever happened: pods, claims and class gone, volumes deleted.
    remove_manifests(&work_path, "");
    if wait_until(|| sandboxes_gone(&rt)).await.is_none() {
        problems.push("sandboxes still in the runtime after the manifests were deleted".into());
    }
    if !agent.stop().await {
        problems.push("minilet did not exit within 30 s of SIGTERM (killed)".into());
    }
    if leftovers(&rt, NODE).await? != (0, 0) {
        problems.push("sandboxes or containers left after stop; removed by the bench".into());
        teardown_node(&rt, NODE).await?;
    }
    let agent_mounts = mounts_under(&work_path);
    if !agent_mounts.is_empty() {
        problems.push(format!(
            "mounts left under the agent's dir: {agent_mounts:?}"
        ));
    }
    if !driver.mounts().is_empty() || !driver.loop_devices().is_empty() {
        problems.push(format!(
            "the driver's mounts {:?} and loop devices {:?} left",
            driver.mounts(),
            driver.loop_devices()
        ));
    }
    let m = measured?;
    drop(driver);

    // 3. Report.
    report(n, &seq, &par, &m, &out, &log, &mut problems)?;
    drop(work);
    Ok(problems.is_empty())
}

struct MiniletRuns {
    without: BTreeMap<usize, f64>,
    with: BTreeMap<usize, f64>,
    /// Per pod, ms inside its volume's set-up calls.
    driver_ms: BTreeMap<usize, f64>,
    /// Per pod, ms between its volume's driver calls (Create → CP → Stage → Publish).
    gaps_ms: BTreeMap<usize, [f64; 3]>,
    /// Per call kind, the durations (ms) of minilet's calls.
    call_ms: BTreeMap<String, Vec<f64>>,
    /// minilet's CPU time (utime + stime), manifest write → all running.
    cpu_without_s: Option<f64>,
    cpu_with_s: Option<f64>,
    stage_publish_in_flight: usize,
    create_in_flight: usize,
    all_setup_in_flight: usize,
    teardown_s: Option<f64>,
    delete_s: Option<f64>,
}

async fn measure_minilet(
    rt: &RemoteRuntime,
    agent: &mut Agent,
    driver: &CsiDriver,
    work: &Path,
    stack: &Stack,
    n: usize,
    problems: &mut Vec<String>,
) -> Result<MiniletRuns> {
    agent.wait_ready().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    eprintln!("csi_volumes: minilet, {n} pods without volumes");
    let files: Vec<(String, String)> = (0..n)
        .map(|i| {
            (
                format!("pod-{i:03}.yaml"),
                pod_manifest(i, &stack.busybox, false),
            )
        })
        .collect();
    let (without, _, cpu_without_s) =
        write_and_wait(rt, agent, work, &files, n, problems, "without volumes").await?;
    remove_manifests(work, "pod-");
    if wait_until(|| sandboxes_gone(rt)).await.is_none() {
        bail!(
            "the pods without volumes are not gone after {} s",
            TEARDOWN_TIMEOUT.as_secs()
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    eprintln!(
        "csi_volumes: minilet, {n} pods with a volume each (class + claims + pods written at once)"
    );
    let mut files = vec![("class.yaml".to_string(), class_manifest())];
    files.extend((0..n).map(|i| (format!("claim-{i:03}.yaml"), claim_manifest(i))));
    files.extend((0..n).map(|i| {
        (
            format!("pod-{i:03}.yaml"),
            pod_manifest(i, &stack.busybox, true),
        )
    }));
    let (with, t0_ms, cpu_with_s) =
        write_and_wait(rt, agent, work, &files, n, problems, "with volumes").await?;

    let volumes = agent.claim_volumes()?;
    let calls: Vec<Call> = driver
        .calls()
        .into_iter()
        .filter(|c| c.start_ms >= t0_ms)
        .collect();
    let failed: Vec<String> = calls
        .iter()
        .filter(|c| c.code != "OK")
        .map(|c| format!("{} {} {}", c.method, c.code, c.message))
        .collect();
    if !failed.is_empty() {
        eprintln!("csi_volumes: driver calls that did not answer OK: {failed:?}");
    }
    let driver_ms = driver_ms_per_pod(&calls, &volumes, n);
    if driver_ms.len() < n {
        problems.push(format!(
            "only {} of {n} claims map to a volume handle (get pv,pvc)",
            driver_ms.len()
        ));
    }
    let mut call_ms: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for c in calls.iter().filter(|c| c.code == "OK") {
        call_ms
            .entry(c.method.clone())
            .or_default()
            .push(c.end_ms.saturating_sub(c.start_ms) as f64);
    }

    // Teardown: pods (Unpublish, Unstage), then claims and class (Delete).
    let t = Instant::now();
    remove_manifests(work, "pod-");
    let unstaged = wait_until(|| async {
        sandboxes_gone(rt).await && driver.ok_count("NodeUnstageVolume") >= n
    })
    .await;
    if unstaged.is_none() {
        problems.push(format!(
            "{} of {n} volumes unstaged {} s after the pods were deleted",
            driver.ok_count("NodeUnstageVolume"),
            TEARDOWN_TIMEOUT.as_secs()
        ));
    }
    let teardown_s = unstaged.map(|_| t.elapsed().as_secs_f64());
    let t = Instant::now();
    remove_manifests(work, "claim-");
    remove_manifests(work, "class");
    let deleted = wait_until(|| async { driver.ok_count("DeleteVolume") >= n }).await;
    if deleted.is_none() {
        problems.push(format!(
            "{} of {n} volumes deleted {} s after the claims were",
            driver.ok_count("DeleteVolume"),
            TEARDOWN_TIMEOUT.as_secs()
        ));
    }
    Ok(MiniletRuns {
        without,
        with,
        driver_ms,
        gaps_ms: gaps_ms_per_pod(&calls, &volumes, n),
        call_ms,
        cpu_without_s,
        cpu_with_s,
        stage_publish_in_flight: max_overlap(&calls, &["NodeStageVolume", "NodePublishVolume"]),
        create_in_flight: max_overlap(&calls, &["CreateVolume"]),
        all_setup_in_flight: max_overlap(&calls, &SETUP),
        teardown_s,
        delete_s: deleted.map(|_| t.elapsed().as_secs_f64()),
    })
}

fn report(
    n: usize,
    seq: &DirectRun,
    par: &DirectRun,
    m: &MiniletRuns,
    out: &Path,
    log: &Path,
    problems: &mut Vec<String>,
) -> Result<()> {
    let load = fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let per_s = |v: &BTreeMap<usize, f64>| v.values().copied().collect::<Vec<_>>();
    let total =
        |v: &BTreeMap<usize, f64>| (v.len() >= n).then(|| v.values().copied().fold(0.0, f64::max));
    let direct_ms = |r: &DirectRun| r.volumes.iter().map(|v| v.total_ms).collect::<Vec<_>>();
    // Per pod: with − without − driver calls, in ms.
    let overhead: Vec<f64> = (0..n)
        .filter_map(|i| {
            Some((m.with.get(&i)? - m.without.get(&i)?) * 1000.0 - m.driver_ms.get(&i)?)
        })
        .collect();
    let added: Vec<f64> = (0..n)
        .filter_map(|i| Some((m.with.get(&i)? - m.without.get(&i)?) * 1000.0))
        .collect();
    let over = sorted(overhead.clone());
    let over_p50 = common::pct(&over, 50.0);
    let over_p99 = common::pct(&over, 99.0);
    let over_met = over_p50.is_some_and(|v| v <= TARGET_OVERHEAD_MS);
    let parallel_met = m.stage_publish_in_flight > 1;
    let met = |b: bool| if b { "MET" } else { "NOT MET" };

    println!();
    println!(
        "csi volumes: {n} pods, one {} MiB volume each ({CSI_DRIVER}: sparse file, loop device, ext4, bind mount); load average {load}",
        SIZE >> 20
    );
    println!(
        "{:<52}{:>10}{:>11}{:>11}{:>11}",
        "", "total", "p50", "p99", "max"
    );
    row(
        "driver direct, 1 volume at a time (per volume)",
        Some(seq.total_s),
        &direct_ms(seq),
        "ms",
    );
    row(
        &format!("driver direct, {n} volumes in parallel (per volume)"),
        Some(par.total_s),
        &direct_ms(par),
        "ms",
    );
    row(
        "minilet, pods without volumes (per pod)",
        total(&m.without),
        &per_s(&m.without),
        "s",
    );
    row(
        "minilet, pods with a volume each (per pod)",
        total(&m.with),
        &per_s(&m.with),
        "s",
    );
    row(
        "  added by the volume (with − without, per pod)",
        None,
        &added,
        "ms",
    );
    row(
        "  inside driver calls on the pod's path",
        None,
        &m.driver_ms.values().copied().collect::<Vec<_>>(),
        "ms",
    );
    row(
        "  minilet's volume path overhead (added − driver)",
        None,
        &overhead,
        "ms",
    );
    row(
        "  between a volume's driver calls (Create..Publish)",
        None,
        &m.gaps_ms
            .values()
            .map(|g| g.iter().sum())
            .collect::<Vec<_>>(),
        "ms",
    );
    let gap = |k: usize| m.gaps_ms.values().map(|g| g[k]).collect::<Vec<f64>>();
    println!(
        "between the calls, p50/max: CreateVolume -> ControllerPublish {}/{}, -> NodeStage {}/{}, -> NodePublish {}/{}",
        fmt(common::pct(&sorted(gap(0)), 50.0), "ms"),
        fmt(sorted(gap(0)).last().copied(), "ms"),
        fmt(common::pct(&sorted(gap(1)), 50.0), "ms"),
        fmt(sorted(gap(1)).last().copied(), "ms"),
        fmt(common::pct(&sorted(gap(2)), 50.0), "ms"),
        fmt(sorted(gap(2)).last().copied(), "ms"),
    );
    let p50 = |v: Vec<f64>| common::pct(&sorted(v), 50.0);
    let of_p50s = match (
        p50(per_s(&m.with)),
        p50(per_s(&m.without)),
        p50(m.driver_ms.values().copied().collect()),
    ) {
        (Some(w), Some(wo), Some(d)) => Some((w - wo) * 1000.0 - d),
        _ => None,
    };
    println!(
        "overhead from the p50s (with − without − driver calls): {}",
        fmt(of_p50s, "ms")
    );
    // The agent's own work, free of the queueing noise above: its CPU time
    // over the run with volumes less the run without, per pod.
    let cpu_added_ms = match (m.cpu_with_s, m.cpu_without_s) {
        (Some(w), Some(wo)) => Some((w - wo) * 1000.0 / n as f64),
        _ => None,
    };
    println!(
        "minilet CPU time, manifest write -> all running: without volumes {}, with {}; added by the volumes per pod {}",
        fmt(m.cpu_without_s.map(|v| v * 1000.0), "ms"),
        fmt(m.cpu_with_s.map(|v| v * 1000.0), "ms"),
        fmt(cpu_added_ms, "ms")
    );
    println!(
        "(direct per volume: CreateVolume start -> NodePublishVolume end, CreateVolume + ControllerPublishVolume + NodeStageVolume + NodePublishVolume; minilet per pod: manifest write -> container seen RUNNING)"
    );
    let call_p50 = |calls: &dyn Fn(usize) -> f64| {
        let v = sorted((0..seq.volumes.len()).map(calls).collect());
        common::pct(&v, 50.0).unwrap_or(0.0)
    };
    println!(
        "driver calls p50, direct one at a time: {}",
        SETUP
            .iter()
            .enumerate()
            .map(|(k, name)| format!("{name} {:.1} ms", call_p50(&|i| seq.volumes[i].calls_ms[k])))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "driver calls p50 (driver's own log), under minilet: {}",
        SETUP
            .iter()
            .map(|name| {
                let v = sorted(m.call_ms.get(*name).cloned().unwrap_or_default());
                format!("{name} {} ({}x)", fmt(common::pct(&v, 50.0), "ms"), v.len())
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "in flight at once, different volumes: Stage/Publish {} under minilet ({} direct parallel, {} direct one at a time); CreateVolume {}; any set-up call {}",
        m.stage_publish_in_flight,
        par.max_in_flight,
        seq.max_in_flight,
        m.create_in_flight,
        m.all_setup_in_flight
    );
    println!(
        "teardown: pods deleted -> {n} volumes unstaged {}; claims deleted -> {n} DeleteVolume {}; log {}",
        fmt(m.teardown_s, "s"),
        fmt(m.delete_s, "s"),
        log.display()
    );
    println!(
        "targets: minilet's volume path overhead per pod p50 {} (p99 {}) <= {TARGET_OVERHEAD_MS} ms: {}; volumes of different pods set up in parallel (Stage/Publish in flight > 1): {}",
        fmt(over_p50, "ms"),
        fmt(over_p99, "ms"),
        met(over_met),
        met(parallel_met)
    );
    for p in problems.iter() {
        println!("problem: {p}");
    }
    let direct_json = |r: &DirectRun| {
        let mut v = stats_json(&direct_ms(r), "ms");
        v["total_s"] = json!(common::round3(r.total_s));
        v["stage_publish_in_flight"] = json!(r.max_in_flight);
        for (k, name) in SETUP.iter().enumerate() {
            v[format!("{name}_ms")] = stats_json(
                &r.volumes.iter().map(|x| x.calls_ms[k]).collect::<Vec<_>>(),
                "ms",
            );
        }
        v
    };
    let pods_json = |v: &BTreeMap<usize, f64>| {
        let mut j = stats_json(&per_s(v), "s");
        j["total_s"] = json!(total(v).map(common::round3));
        j["running"] = json!(v.len());
        j
    };
    let report = json!({
        "pods": n,
        "volume_mib": SIZE >> 20,
        "driver": CSI_DRIVER,
        "load_average": load,
        "direct_seq": direct_json(seq),
        "direct_parallel": direct_json(par),
        "minilet_without_volumes": pods_json(&m.without),
        "minilet_with_volumes": pods_json(&m.with),
        "added_per_pod": stats_json(&added, "ms"),
        "driver_calls_per_pod": stats_json(&m.driver_ms.values().copied().collect::<Vec<_>>(), "ms"),
        "overhead_per_pod": stats_json(&overhead, "ms"),
        "overhead_of_p50s_ms": of_p50s.map(common::round3),
        "minilet_cpu_ms": {
            "without_volumes": m.cpu_without_s.map(|v| common::round3(v * 1000.0)),
            "with_volumes": m.cpu_with_s.map(|v| common::round3(v * 1000.0)),
            "added_per_pod": cpu_added_ms.map(common::round3),
        },
        "between_calls_per_pod": stats_json(&m.gaps_ms.values().map(|g| g.iter().sum()).collect::<Vec<f64>>(), "ms"),
        "between_create_and_controller_publish": stats_json(&gap(0), "ms"),
        "between_controller_publish_and_stage": stats_json(&gap(1), "ms"),
        "between_stage_and_publish": stats_json(&gap(2), "ms"),
        "overhead_all_ms": overhead.iter().map(|v| common::round3(*v)).collect::<Vec<_>>(),
        "minilet_calls_ms": m.call_ms.iter().map(|(k, v)| (k.clone(), stats_json(v, "ms"))).collect::<serde_json::Map<_, _>>(),
        "in_flight": {
            "stage_publish": m.stage_publish_in_flight,
            "create_volume": m.create_in_flight,
            "any_setup": m.all_setup_in_flight,
        },
        "teardown_unstaged_s": m.teardown_s.map(common::round3),
        "teardown_deleted_s": m.delete_s.map(common::round3),
        "targets": {
            "overhead_limit_ms": TARGET_OVERHEAD_MS,
            "overhead_met": over_met,
            "parallel_met": parallel_met,
        },
        "log": log.display().to_string(),
        "problems": problems,
    });
    let line = serde_json::to_string(&report)?;
    let json_path = out.join("result.json");
    fs::write(&json_path, format!("{line}\n"))?;
    println!("JSON: {line}");
    println!("(also written to {})", json_path.display());
    Ok(())
}
