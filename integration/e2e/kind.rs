//! End-to-end: the kind-style cluster (`integration/cluster.sh`), with
//! kubectl as the client: a real control plane on the host, three node
//! containers, each with its own containerd and minilet, joined through TLS
//! bootstrap; then a wrong token, a Deployment across the nodes and pod to
//! pod traffic between them, one node cut off for 60 s, one node killed and
//! started again, and `down`, checked. One test: `up` is the expensive part,
//! and each step builds on the cluster the one before left.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{ControlPlane, wait_until};
use crate::harness::serial;

const NAME: &str = "minilet-e2e";
const NODES: [&str; 3] = [
    "minilet-e2e-node-1",
    "minilet-e2e-node-2",
    "minilet-e2e-node-3",
];
const LABEL: &str = "io.minilet.cluster=minilet-e2e";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `integration/cluster.sh ARGS` for this test's cluster: (code, stdout, stderr).
fn cluster(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(repo().join("integration/cluster.sh"))
        .args(args)
        .env("MINILET_CLUSTER_NAME", NAME)
        .env("MINILET_CLUSTER_DIR", dir)
        .output()
        .expect("run integration/cluster.sh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cluster_ok(dir: &Path, args: &[&str]) -> String {
    let (code, out, err) = cluster(dir, args);
    assert_eq!(code, 0, "cluster.sh {args:?} failed:\n{out}\n{err}");
    out
}

/// `docker ARGS`: (success, stdout + stderr).
fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn docker_ok(args: &[&str]) -> String {
    let (ok, text) = docker(args);
    assert!(ok, "docker {args:?} failed: {text}");
    text
}

/// Takes the cluster down when the test ends, passed or not.
struct Down(PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let (code, out, err) = cluster(&self.0, &["down"]);
        if code != 0 {
            eprintln!("cluster.sh down (cleanup) failed:\n{out}\n{err}");
        }
    }
}

/// The Ready condition's status of each Node, by name.
fn node_ready(cp: &ControlPlane) -> BTreeMap<String, String> {
    let nodes = cp.get_json(&["nodes"]);
    nodes["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            let ready = n["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready")
                .map_or("Unknown", |c| c["status"].as_str().unwrap_or("Unknown"));
            (
                n["metadata"]["name"].as_str().unwrap_or("").to_string(),
                ready.to_string(),
            )
        })
        .collect()
}

fn all_ready(cp: &ControlPlane, nodes: &[&str]) -> bool {
    let r = node_ready(cp);
    nodes
        .iter()
        .all(|n| r.get(*n).map(String::as_str) == Some("True"))
}

/// The web pods: (name, uid, node, pod IP, phase, restarts).
fn web_pods(cp: &ControlPlane) -> Vec<(String, String, String, String, String, i64)> {
    let pods = cp.get_json(&["pods", "-l", "app=web"]);
    pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let s = |v: &Value| v.as_str().unwrap_or("").to_string();
            let restarts = p["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| c["restartCount"].as_i64().unwrap_or(0))
                .sum();
            (
                s(&p["metadata"]["name"]),
                s(&p["metadata"]["uid"]),
                s(&p["spec"]["nodeName"]),
                s(&p["status"]["podIP"]),
                s(&p["status"]["phase"]),
                restarts,
            )
        })
        .collect()
}

fn running_web_pods(cp: &ControlPlane, n: usize) -> bool {
    let pods = web_pods(cp);
    pods.len() == n && pods.iter().all(|p| p.4 == "Running" && !p.3.is_empty())
}

/// Sandboxes (pause containers) with a running task in `node`'s containerd.
fn running_sandboxes(node: &str) -> usize {
    let (ok, containers) = docker(&["exec", node, "ctr", "-n", "k8s.io", "containers", "ls"]);
    if !ok {
        return usize::MAX;
    }
    let pause: BTreeSet<&str> = containers
        .lines()
        .filter(|l| l.contains("/pause:"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let (_, tasks) = docker(&["exec", node, "ctr", "-n", "k8s.io", "tasks", "ls"]);
    tasks
        .lines()
        .filter(|l| l.ends_with("RUNNING"))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|id| pause.contains(id))
        .count()
}

fn web_deployment(replicas: usize) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: default}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: {image}
        command: [sh, -c, 'mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www']
"#,
        image = crate::BUSYBOX
    )
}

/// A pod on `node` that fetches every `(name, ip)` and exits 0 only when
/// each answered with its own name.
fn fetcher(node: &str, targets: &[(String, String)]) -> String {
    let script: String = targets
        .iter()
        .map(|(name, ip)| {
            format!("test \"$(timeout 5 wget -q -O- http://{ip}:8080/)\" = {name} && ")
        })
        .collect::<String>()
        + "echo all-answered";
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: fetch, namespace: default}}
spec:
  nodeName: {node}
  restartPolicy: Never
  containers:
  - name: fetch
    image: {image}
    command: [sh, -c, '{script}']
"#,
        image = crate::BUSYBOX
    )
}

/// A node container's traffic on its network, dropped (`cut`) or let
/// through again: iptables in the node's own network namespace.
fn partition(node: &str, cut: bool) {
    let op = if cut { "-I" } else { "-D" };
    for rule in [
        ["INPUT", "-i"],
        ["OUTPUT", "-o"],
        ["FORWARD", "-i"],
        ["FORWARD", "-o"],
    ] {
        docker_ok(&[
            "exec", node, "iptables", op, rule[0], rule[1], "eth0", "-j", "DROP",
        ]);
    }
}

/// The subject of `node`'s client certificate, as minilet wrote it.
fn client_cert_subject(node: &str) -> String {
    let pem = docker_ok(&[
        "exec",
        node,
        "cat",
        "/var/lib/minilet/pki/kubelet-client-current.pem",
    ]);
    let mut child = Command::new("openssl")
        .args([
            "x509", "-noout", "-subject", "-serial", "-nameopt", "RFC2253",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run openssl");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pem.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{node}: its client certificate does not parse: {pem}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kind_cluster_three_nodes_join_spread_partition_restart_and_down() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("cluster");
    let down = Down(run.clone());

    // 1. up --nodes 3: three Ready nodes, each with its own certificate
    //    issued through a CSR.
    let t0 = Instant::now();
    let out = cluster(&run, &["up", "--nodes", "3"]);
    assert_eq!(
        out.0, 0,
        "cluster.sh up --nodes 3 failed:\n{}\n{}",
        out.1, out.2
    );
    eprintln!(
        "kind: up --nodes 3 in {:.1} s\n{}",
        t0.elapsed().as_secs_f64(),
        out.2
    );
    let cp = ControlPlane::from_env_file(&run.join("cp/env"));
    assert!(
        all_ready(&cp, &NODES),
        "up returned before 3 Ready nodes: {:?}",
        node_ready(&cp)
    );
    let csrs = cp.get_json(&["csr"]);
    let issued = csrs["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            c["spec"]["signerName"] == "kubernetes.io/kube-apiserver-client-kubelet"
                && c["spec"]["username"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("system:bootstrap:")
                && c["status"]["certificate"].is_string()
        })
        .count();
    assert_eq!(
        issued, 3,
        "one issued client CSR per node, asked with the bootstrap token: {csrs}"
    );
    let mut serials = BTreeSet::new();
    for node in NODES {
        let subject = client_cert_subject(node);
        assert!(
            subject.contains(&format!("CN=system:node:{node}"))
                && subject.contains("O=system:nodes"),
            "{node}: client certificate subject {subject}"
        );
        serials.insert(
            subject
                .lines()
                .find(|l| l.starts_with("serial="))
                .unwrap_or("")
                .to_string(),
        );
    }
    assert_eq!(
        serials.len(),
        3,
        "each node has its own certificate: {serials:?}"
    );

    // 2. A wrong bootstrap token: that node's one clear error, retried; the
    //    others stay Ready.
    let bad = "minilet-e2e-badtoken";
    cluster_ok(&run, &["join", bad, "--token", "0bad00.0123456789abcdef"]);
    wait_until(
        "the wrong token's clear error in the node's log",
        Duration::from_secs(60),
        || {
            docker(&["logs", bad])
                .1
                .matches("the API server refused them (Unauthorized")
                .count()
                >= 2
        },
    );
    assert!(
        !node_ready(&cp).contains_key(bad),
        "a node with a wrong token registered"
    );
    assert!(
        all_ready(&cp, &NODES),
        "the other nodes stay Ready: {:?}",
        node_ready(&cp)
    );
    docker_ok(&["rm", "-f", "-v", bad]);

    // 3. Nine replicas spread over the three nodes, all Running; a pod on
    //    node 1 fetches from pods on the other two by pod IP.
    cp.apply(&web_deployment(9));
    wait_until(
        "9 web pods Running with pod IPs",
        Duration::from_secs(120),
        || running_web_pods(&cp, 9),
    );
    let pods = web_pods(&cp);
    let used: BTreeSet<&str> = pods.iter().map(|p| p.2.as_str()).collect();
    assert_eq!(
        used,
        BTreeSet::from(NODES),
        "the replicas spread over all three nodes: {pods:?}"
    );
    let targets: Vec<(String, String)> = ["minilet-e2e-node-2", "minilet-e2e-node-3"]
        .iter()
        .map(|n| {
            let p = pods.iter().find(|p| p.2 == *n).unwrap();
            (p.0.clone(), p.3.clone())
        })
        .collect();
    cp.apply(&fetcher(NODES[0], &targets));
    wait_until(
        "the fetch pod on node 1 reached node 2's and node 3's pods",
        Duration::from_secs(90),
        || {
            let phase = cp.get_json(&["pod", "fetch"])["status"]["phase"]
                .as_str()
                .unwrap_or("")
                .to_string();
            assert_ne!(
                phase,
                "Failed",
                "fetch failed: {}",
                cp.kubectl(&["logs", "fetch"]).1
            );
            phase == "Succeeded"
        },
    );

    // 4. Node 3 cut off for 60 s: NotReady in the API, its pods keep
    //    running inside it; back, it is Ready with no pod recreated.
    let on3: BTreeSet<String> = pods
        .iter()
        .filter(|p| p.2 == NODES[2])
        .map(|p| p.1.clone())
        .collect();
    let sandboxes3 = running_sandboxes(NODES[2]);
    assert_eq!(sandboxes3, on3.len(), "node 3 runs one sandbox per pod");
    partition(NODES[2], true);
    let cut = Instant::now();
    wait_until(
        "node 3 NotReady/Unknown in the API while cut off",
        Duration::from_secs(90),
        || node_ready(&cp).get(NODES[2]).is_some_and(|r| r != "True"),
    );
    let left = Duration::from_secs(60).saturating_sub(cut.elapsed());
    std::thread::sleep(left);
    assert_eq!(
        running_sandboxes(NODES[2]),
        sandboxes3,
        "node 3's pods kept running while cut off"
    );
    partition(NODES[2], false);
    wait_until("node 3 Ready again", Duration::from_secs(90), || {
        all_ready(&cp, &NODES)
    });
    wait_until(
        "9 web pods Running after the partition",
        Duration::from_secs(60),
        || running_web_pods(&cp, 9),
    );
    let after: Vec<_> = web_pods(&cp);
    let on3_after: BTreeSet<String> = after
        .iter()
        .filter(|p| p.2 == NODES[2])
        .map(|p| p.1.clone())
        .collect();
    assert_eq!(on3_after, on3, "no pod was recreated on node 3");
    assert!(
        after.iter().all(|p| p.5 == 0),
        "no container restarted: {after:?}"
    );
    assert_eq!(
        running_sandboxes(NODES[2]),
        sandboxes3,
        "no second sandbox on node 3"
    );

    // 5. docker kill node 2, start it again: minilet adopts its pods (new
    //    sandboxes for the same pods, as after a reboot), no duplicates.
    let on2: BTreeSet<String> = after
        .iter()
        .filter(|p| p.2 == NODES[1])
        .map(|p| p.1.clone())
        .collect();
    docker_ok(&["kill", NODES[1]]);
    docker_ok(&["start", NODES[1]]);
    wait_until(
        "node 2 Ready after its restart",
        Duration::from_secs(120),
        || all_ready(&cp, &NODES),
    );
    wait_until(
        "9 web pods Running after node 2's restart",
        Duration::from_secs(120),
        || running_web_pods(&cp, 9) && running_sandboxes(NODES[1]) == on2.len(),
    );
    let again = web_pods(&cp);
    let on2_again: BTreeSet<String> = again
        .iter()
        .filter(|p| p.2 == NODES[1])
        .map(|p| p.1.clone())
        .collect();
    assert_eq!(
        on2_again, on2,
        "node 2 kept the same pods (adopted, not recreated)"
    );
    assert_eq!(again.len(), 9, "no duplicate pods: {again:?}");
    // Stays so: no sandbox made twice a little later either.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        running_sandboxes(NODES[1]),
        on2.len(),
        "one running sandbox per pod on node 2"
    );

    // 6. down: nothing left, checked here too.
    drop(down);
    let (_, containers) = docker(&["ps", "-aq", "--filter", &format!("label={LABEL}")]);
    assert!(
        containers.trim().is_empty(),
        "containers left: {containers}"
    );
    let (_, volumes) = docker(&["volume", "ls", "-q", "--filter", &format!("label={LABEL}")]);
    assert!(volumes.trim().is_empty(), "volumes left: {volumes}");
    assert!(
        !docker(&["network", "inspect", &format!("{NAME}-net")]).0,
        "network left"
    );
    assert!(!run.exists(), "run dir left: {}", run.display());
}
