//! Benchmark (issue 9): the kind-style cluster of integration/cluster.sh,
//! minilet nodes beside kubelet v1.20.2 nodes (same node image, same
//! containerd, `--agent kubelet`), in one run:
//!
//! - `cluster.sh up --nodes N` to N Ready nodes, N = 1, 3, 5, on warm caches
//!   (a first `up --nodes 1` builds or reuses the images and the control
//!   plane's binaries, unmeasured), wall clock of the whole command;
//! - on 3 nodes, a Deployment of 30 busybox replicas from `kubectl apply`
//!   to all 30 Running (polled every 200 ms);
//! - each node agent's RSS (VmRSS of the minilet or kubelet process, read
//!   from the host's /proc), sampled every second for 60 s with the 30 pods
//!   running: mean and peak per node.
//!
//! Targets (the issue's): all-Running ≤ 0.5× kubelet's; every node agent's
//! RSS ≤ 25 MiB. A table and JSON (BENCH_JSON=path writes it there too).
//! Not a timed test: run it with `cargo bench --bench cluster`, as root,
//! with the stack up (integration/stack.sh up; its images go into the node
//! image). The cluster is `minilet-bench` in a temp run dir, taken down at
//! the end (and between rows).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

// The cluster is built by cluster.sh (it builds the binary itself): the
// helpers for a bench that runs minilet directly go unused here.
#[allow(
    dead_code,
    reason = "shared with the benches that start minilet themselves"
)]
mod common;

const NAME: &str = "minilet-bench";
const AGENTS: [&str; 2] = ["minilet", "kubelet"];
const SIZES: [usize; 3] = [1, 3, 5];
const PODS: usize = 30;
const RSS_WINDOW: Duration = Duration::from_secs(60);

struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    fn sh(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(common::repo().join("integration/cluster.sh"))
            .args(args)
            .env("MINILET_CLUSTER_NAME", NAME)
            .env("MINILET_CLUSTER_DIR", &self.dir)
            .output()
            .context("run integration/cluster.sh")?;
        if !out.status.success() {
            bail!(
                "cluster.sh {args:?} failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let env = std::fs::read_to_string(self.dir.join("cp/env"))?;
        let bin = env
            .lines()
            .find_map(|l| l.strip_prefix("export MINILET_CP_BIN="))
            .context("no MINILET_CP_BIN in the cluster's cp/env")?
            .trim_matches(['"', '\'']);
        let mut cmd = Command::new(Path::new(bin).join("kubectl"));
        cmd.arg("--kubeconfig")
            .arg(self.dir.join("kubeconfig"))
            .args(args);
        let out = if let Some(text) = stdin {
            use std::io::Write;
            let mut child = cmd
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()?;
            child
                .stdin
                .take()
                .context("stdin")?
                .write_all(text.as_bytes())?;
            child.wait_with_output()?
        } else {
            cmd.output()?
        };
        if !out.status.success() {
            bail!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn down(&self) -> Result<()> {
        self.sh(&["down"]).map(drop)
    }
}

fn deployment() -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: bench, namespace: default}}
spec:
  replicas: {PODS}
  selector: {{matchLabels: {{app: bench}}}}
  template:
    metadata: {{labels: {{app: bench}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: sleep
        image: localhost:5000/busybox:1.36
        command: [sleep, '3600']
"
    )
}

fn running(c: &Cluster) -> Result<usize> {
    let out = c.kubectl(
        &[
            "get",
            "pods",
            "-l",
            "app=bench",
            "-o",
            "jsonpath={range .items[*]}{.status.phase}{\"\\n\"}{end}",
        ],
        None,
    )?;
    Ok(out.lines().filter(|l| *l == "Running").count())
}

/// The node agent's pid in each of the cluster's node containers.
fn agent_pids(agent: &str) -> Result<BTreeMap<String, u32>> {
    let out = Command::new("docker")
        .args([
            "ps",
            "--filter",
            &format!("label=io.minilet.cluster={NAME}"),
            "--format",
            "{{.Names}} {{.ID}}",
        ])
        .output()?;
    let mut pids = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((name, id)) = line.split_once(' ') else {
            continue;
        };
        for entry in std::fs::read_dir("/proc")? {
            let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() != agent {
                continue;
            }
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            if cgroup.contains(id) {
                pids.insert(name.to_string(), pid);
            }
        }
    }
    Ok(pids)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

struct AgentRun {
    up: BTreeMap<usize, f64>,
    all_running: f64,
    /// node → (mean, peak) MiB.
    rss: BTreeMap<String, (f64, f64)>,
}

fn run_agent(c: &Cluster, agent: &str) -> Result<AgentRun> {
    let mut up = BTreeMap::new();
    let mut all_running = 0.0;
    let mut rss = BTreeMap::new();
    for n in SIZES {
        c.down()?;
        let t = Instant::now();
        c.sh(&["up", "--nodes", &n.to_string(), "--agent", agent])?;
        let secs = t.elapsed().as_secs_f64();
        eprintln!("cluster: {agent}: up --nodes {n}: {secs:.1} s");
        up.insert(n, secs);
        if n != 3 {
            continue;
        }
        let t = Instant::now();
        c.kubectl(&["apply", "-f", "-"], Some(&deployment()))?;
        loop {
            if running(c)? == PODS {
                break;
            }
            if t.elapsed() > Duration::from_secs(300) {
                bail!("{agent}: {PODS} pods not Running after 300 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        all_running = t.elapsed().as_secs_f64();
        eprintln!(
            "cluster: {agent}: {PODS} pods Running in {all_running:.1} s; RSS for {} s",
            RSS_WINDOW.as_secs()
        );
        let pids = agent_pids(agent)?;
        if pids.len() != 3 {
            bail!(
                "{agent}: found the agent in {} of 3 node containers: {pids:?}",
                pids.len()
            );
        }
        let mut samples: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let t = Instant::now();
        while t.elapsed() < RSS_WINDOW {
            for (node, pid) in &pids {
                if let Some(k) = rss_kib(*pid) {
                    samples.entry(node.clone()).or_default().push(k);
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        for (node, s) in samples {
            let mean = s.iter().sum::<u64>() as f64 / s.len() as f64 / 1024.0;
            let peak = *s.iter().max().unwrap_or(&0) as f64 / 1024.0;
            rss.insert(node, (common::round3(mean), common::round3(peak)));
        }
    }
    c.down()?;
    Ok(AgentRun {
        up,
        all_running,
        rss,
    })
}

fn run() -> Result<bool> {
    let tmp = tempfile::tempdir()?;
    let c = Cluster {
        dir: tmp.path().join("cluster"),
    };
    eprintln!("cluster: warm-up: up --nodes 1 (builds or reuses the images and binaries)");
    let warm = (|| {
        c.down()?;
        c.sh(&["up", "--nodes", "1"])?;
        c.down()
    })();
    if let Err(e) = warm {
        let _ = c.down();
        return Err(e);
    }
    let mut runs = BTreeMap::new();
    for agent in AGENTS {
        match run_agent(&c, agent) {
            Ok(r) => {
                runs.insert(agent, r);
            }
            Err(e) => {
                let _ = c.down();
                return Err(e);
            }
        }
    }
    let (m, k) = (&runs["minilet"], &runs["kubelet"]);
    println!("\n| figure | minilet | kubelet v1.20.2 | minilet/kubelet | target |");
    println!("| --- | --- | --- | --- | --- |");
    for n in SIZES {
        println!(
            "| up --nodes {n} to {n} Ready (s) | {:.1} | {:.1} | {:.2} | |",
            m.up[&n],
            k.up[&n],
            m.up[&n] / k.up[&n]
        );
    }
    let ratio = m.all_running / k.all_running;
    println!(
        "| {PODS}-pod Deployment on 3 nodes, apply to all Running (s) | {:.1} | {:.1} | {ratio:.2} | ≤ 0.5: {} |",
        m.all_running,
        k.all_running,
        if ratio <= 0.5 { "MET" } else { "NOT MET" }
    );
    let worst = |r: &AgentRun| r.rss.values().map(|v| v.1).fold(0.0, f64::max);
    let fmt = |r: &AgentRun| {
        r.rss
            .values()
            .map(|(mean, peak)| format!("{mean:.1}/{peak:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "| node agent RSS, mean/peak per node over {} s with the pods (MiB) | {} | {} | {:.2} | ≤ 25: {} |",
        RSS_WINDOW.as_secs(),
        fmt(m),
        fmt(k),
        worst(m) / worst(k),
        if worst(m) <= 25.0 { "MET" } else { "NOT MET" }
    );
    let agent_json = |r: &AgentRun| {
        json!({
            "up_seconds": r.up.iter().map(|(n, s)| (n.to_string(), json!(common::round3(*s)))).collect::<serde_json::Map<_, _>>(),
            "all_running_seconds": common::round3(r.all_running),
            "rss_mib": r.rss.iter().map(|(n, (mean, peak))| (n.clone(), json!({"mean": mean, "peak": peak}))).collect::<serde_json::Map<_, _>>(),
        })
    };
    let report: Value = json!({
        "bench": "cluster",
        "pods": PODS,
        "nodes_for_pods": 3,
        "rss_window_seconds": RSS_WINDOW.as_secs(),
        "minilet": agent_json(m),
        "kubelet": agent_json(k),
        "all_running_ratio": common::round3(ratio),
        "targets": {"all_running_ratio_max": 0.5, "rss_mib_max": 25.0},
        "met": {"all_running": ratio <= 0.5, "rss": worst(m) <= 25.0},
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("\n{text}");
    if let Some(path) = std::env::var_os("BENCH_JSON") {
        std::fs::write(path, &text)?;
    }
    Ok(true)
}

fn main() -> ExitCode {
    common::main("cluster", run)
}
