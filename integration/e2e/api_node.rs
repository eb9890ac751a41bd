//! API server mode, the node's part, against the real control plane
//! (`integration/control-plane.sh up`): minilet registers its Node with a
//! kubelet's identity (system:node:<name>), reports capacity, nodeInfo and
//! conditions as kubectl shows kubelet's, renews its Lease, takes its
//! podCIDR from the controller-manager into the pods' IPAM, and lives with
//! the Node authorizer's refusals.

use std::time::{Duration, Instant};

use crate::cluster::ControlPlane;
use crate::harness::*;
use crate::{containers, on_stack, pod_ip, running_container, sleeper};

/// Start minilet as node `node` with that node's own kubeconfig (or the
/// kubeconfig of `identity` when it differs: a node lying about its name).
fn api_agent(cp: &ControlPlane, node: &str, identity: &str, mut options: Options) -> Agent {
    cp.forget_node(node);
    let dir = tempfile::Builder::new()
        .prefix("minilet-kubeconfig-")
        .tempdir()
        .unwrap()
        .keep();
    let kubeconfig = dir.join("kubelet.conf");
    cp.node_kubeconfig(identity, &kubeconfig);
    options
        .args
        .extend(["--kubeconfig".to_string(), kubeconfig.display().to_string()]);
    Agent::start_with(node, options)
}

fn kubeconfig_of(agent: &Agent) -> String {
    let args = &agent.options.args;
    let i = args.iter().position(|a| a == "--kubeconfig").unwrap();
    args[i + 1].clone()
}

fn condition<'a>(node: &'a serde_json::Value, kind: &str) -> &'a serde_json::Value {
    node["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .unwrap_or_else(|| panic!("no {kind} condition: {node}"))
}

async fn ready_node(cp: &ControlPlane, node: &str) -> serde_json::Value {
    eventually(
        &format!("node {node} Ready"),
        Duration::from_secs(60),
        || async {
            let (code, out, _) = cp.kubectl(&["get", "node", node, "-o", "json"]);
            let n: serde_json::Value = serde_json::from_str(&out).ok().filter(|_| code == 0)?;
            (condition(&n, "Ready")["status"] == "True").then_some(n)
        },
    )
    .await
}

fn online_cpus() -> u64 {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    s.trim()
        .split(',')
        .map(|p| match p.split_once('-') {
            Some((a, b)) => b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

fn mem_total_ki() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

/// kubectl sees the node Ready with the machine's capacity and a nodeInfo
/// that names minilet and containerd; `describe` shows kubelet's
/// conditions; the Lease is renewed every ~10 s and owned by the Node; the
/// controller-manager's podCIDR reaches the agent.
#[test]
fn the_node_registers_ready_with_real_capacity_and_a_renewed_lease() {
    on_stack(async {
        let cp = ControlPlane::load();
        let node = "e2e-api-node";
        let agent = api_agent(
            &cp,
            node,
            node,
            Options {
                kubelet_config: vec!["maxPods: 42".into()],
                ..Options::default()
            },
        );
        let n = ready_node(&cp, node).await;
        let cap = &n["status"]["capacity"];
        assert_eq!(cap["cpu"], online_cpus().to_string(), "{cap}");
        assert_eq!(cap["memory"], format!("{}Ki", mem_total_ki()), "{cap}");
        assert_eq!(cap["pods"], "42", "pods = maxPods: {cap}");
        assert!(cap["ephemeral-storage"].as_str().is_some(), "{cap}");
        let alloc = &n["status"]["allocatable"];
        assert_eq!(alloc["pods"], "42", "{alloc}");
        assert_eq!(
            alloc["memory"],
            format!("{}Ki", mem_total_ki() - 100 * 1024),
            "kubelet's 100Mi eviction threshold: {alloc}"
        );
        let info = &n["status"]["nodeInfo"];
        assert!(
            info["kubeletVersion"]
                .as_str()
                .unwrap()
                .starts_with("v1.33.0-minilet."),
            "{info}"
        );
        assert!(
            info["containerRuntimeVersion"]
                .as_str()
                .unwrap()
                .starts_with("containerd://"),
            "{info}"
        );
        assert_eq!(info["operatingSystem"], "linux");
        assert_eq!(
            info["machineID"],
            std::fs::read_to_string("/etc/machine-id").unwrap().trim()
        );
        assert_eq!(n["metadata"]["labels"]["kubernetes.io/hostname"], node);
        assert_eq!(n["metadata"]["labels"]["kubernetes.io/os"], "linux");
        assert_eq!(
            n["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"],
            10250
        );
        let internal = n["status"]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["type"] == "InternalIP")
            .unwrap_or_else(|| panic!("an InternalIP: {n}"))["address"]
            .as_str()
            .unwrap()
            .to_string();

        // kubectl get nodes -o wide: Ready, minilet's version, the address,
        // the runtime.
        let wide = cp.kubectl_ok(&["get", "nodes", node, "-o", "wide"]);
        let line = wide.lines().find(|l| l.starts_with(node)).unwrap();
        for want in ["Ready", "v1.33.0-minilet.", &internal, "containerd://"] {
            assert!(line.contains(want), "{want} in: {wide}");
        }
        assert!(!line.contains("NotReady"), "{wide}");

        // kubectl describe node: kubelet's conditions, reasons and words.
        let describe = cp.kubectl_ok(&["describe", "node", node]);
        for want in [
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
            "KubeletHasNoDiskPressure",
            "KubeletHasSufficientPID",
            "KubeletReady",
            "kubelet is posting ready status",
        ] {
            assert!(describe.contains(want), "{want} in:\n{describe}");
        }

        // The Lease: held by the node, 40 s, owned by the Node, renewed.
        let lease_args = ["-n", "kube-node-lease", "lease", node];
        let lease = cp.get_json(&lease_args);
        assert_eq!(lease["spec"]["holderIdentity"], node);
        assert_eq!(lease["spec"]["leaseDurationSeconds"], 40);
        let owner = &lease["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Node");
        assert_eq!(owner["uid"], n["metadata"]["uid"], "{lease}");
        let first = lease["spec"]["renewTime"].as_str().unwrap().to_string();
        let start = Instant::now();
        let renewed = eventually("lease renewed", Duration::from_secs(13), || async {
            let l = cp.get_json(&lease_args);
            let t = l["spec"]["renewTime"].as_str()?.to_string();
            (t != first).then_some(t)
        })
        .await;
        assert!(renewed > first, "{renewed} after {first}");
        assert!(
            start.elapsed() <= Duration::from_secs(12),
            "renewed within ~10 s: {:?}",
            start.elapsed()
        );

        // podCIDR from the controller-manager, and the agent has it.
        let cidr = eventually("spec.podCIDR assigned", Duration::from_secs(30), || async {
            let n = cp.get_json(&["node", node]);
            n["spec"]["podCIDR"].as_str().map(str::to_string)
        })
        .await;
        assert!(cidr.starts_with("10.244."), "{cidr}");
        eventually(
            "the agent took the podCIDR",
            Duration::from_secs(20),
            || async {
                agent
                    .log()
                    .lines()
                    .any(|l| l.contains("node podCIDR assigned") && l.contains(&cidr))
                    .then_some(())
            },
        )
        .await;
        assert!(
            agent.log().contains("api server connected"),
            "server version logged:\n{}",
            agent.log()
        );

        // No needless writes: over ~25 s of nothing changing, the status is
        // not written again (the report period is 5 min).
        let log_at = agent.log().lines().count();
        let rv = cp.get_json(&["node", node])["metadata"]["resourceVersion"].clone();
        tokio::time::sleep(Duration::from_secs(25)).await;
        let later = cp.get_json(&["node", node]);
        assert_eq!(
            later["metadata"]["resourceVersion"], rv,
            "the Node was not rewritten while nothing changed"
        );
        let new_lines: Vec<String> = agent.log().lines().skip(log_at).map(String::from).collect();
        assert!(
            !new_lines.iter().any(|l| l.contains("request failed")),
            "{new_lines:?}"
        );
        drop(agent);
        cp.forget_node(node);
    });
}

/// The bridge of the podCIDR network: its gateway address is the node's
/// podCIDR's, so it cannot be the suite's bridge (which has another).
/// The test deletes it at the end.
const CIDR_BRIDGE: &str = "minie2ecidr";

/// A network whose host-local IPAM says `usePodCidr` hands pods addresses
/// from the Node's podCIDR.
#[test]
fn pods_get_addresses_from_the_nodes_pod_cidr() {
    on_stack(async {
        let cp = ControlPlane::load();
        let node = "e2e-api-cidr";
        let dir = tempfile::tempdir().unwrap();
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "e2e-podcidr",
            "plugins": [
                {"type": "bridge", "bridge": CIDR_BRIDGE, "isGateway": true, "ipMasq": true,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": "usePodCidr"}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": dir.path().join("ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
                {"type": "firewall"}
            ]
        });
        let agent = api_agent(
            &cp,
            node,
            node,
            Options {
                // Sorts before 10-e2e.conflist: the default network.
                cni_configs: vec![("05-podcidr.conflist".into(), conflist.to_string())],
                ..Options::default()
            },
        );
        let cri = agent.stack.cri().await;
        agent.write_manifest("p.yaml", &sleeper("p", &[("app", "sleep 3600")]));
        running_container(&cri, &agent, "p", "app").await;
        let ip = pod_ip(&cri, &agent, "p").await;
        let cidr = cp.get_json(&["node", node])["spec"]["podCIDR"]
            .as_str()
            .unwrap()
            .to_string();
        // A /24 from 10.244.0.0/16: the first three octets match.
        let prefix = cidr.rsplit_once('.').unwrap().0;
        assert!(
            cidr.ends_with(".0/24") && ip.starts_with(&format!("{prefix}.")),
            "pod IP {ip} in the node's podCIDR {cidr}"
        );
        assert_eq!(containers(&cri, &agent, "p").await.len(), 1);
        agent.remove_manifest("p.yaml");
        drop(agent);
        cp.forget_node(node);
        let _ = std::process::Command::new("ip")
            .args(["link", "delete", CIDR_BRIDGE])
            .status();
    });
}

/// The Node authorizer and NodeRestriction hold: with minilet's node
/// identity kubectl can neither create nor patch another node, nor its
/// Lease; and an agent whose identity is another node's is refused, says
/// so once, and keeps running its static pods.
#[test]
fn the_node_identity_cannot_touch_other_nodes_and_minilet_copes() {
    on_stack(async {
        let cp = ControlPlane::load();
        let node = "e2e-api-self";
        let other = "e2e-api-other";
        let agent = api_agent(&cp, node, node, Options::default());
        ready_node(&cp, node).await;
        let kc = kubeconfig_of(&agent);

        // The admin makes the other node; minilet's identity may not touch it.
        cp.forget_node(other);
        cp.apply(&format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {other}\n"
        ));
        let dir = tempfile::tempdir().unwrap();
        let other_yaml = dir.path().join("other.yaml");
        std::fs::write(
            &other_yaml,
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: e2e-api-third\n",
        )
        .unwrap();
        let lease_yaml = dir.path().join("lease.yaml");
        std::fs::write(
            &lease_yaml,
            format!(
                "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: {other}\n  namespace: kube-node-lease\nspec:\n  holderIdentity: {other}\n"
            ),
        )
        .unwrap();
        let attempts: Vec<Vec<&str>> = vec![
            vec!["create", "-f", other_yaml.to_str().unwrap()],
            vec!["label", "node", other, "x=y"],
            vec!["annotate", "node", other, "x=y"],
            vec!["taint", "node", other, "x=y:NoSchedule"],
            vec!["create", "-f", lease_yaml.to_str().unwrap()],
            vec!["delete", "node", other],
        ];
        for args in attempts {
            let (code, out, err) = cp.kubectl_as(&kc, &args);
            assert_ne!(code, 0, "kubectl {args:?} as {node} must fail: {out}");
            assert!(
                err.contains("Forbidden") || err.contains("forbidden"),
                "kubectl {args:?}: {err}"
            );
        }
        // Its own Node it may read.
        let (code, _, err) = cp.kubectl_as(&kc, &["get", "node", node]);
        assert_eq!(code, 0, "{err}");
        drop(agent);
        cp.forget_node(node);
        cp.forget_node(other);

        // An agent that calls itself "e2e-api-liar" with e2e-api-self's
        // credentials: every write is refused, the agent runs on.
        let liar = "e2e-api-liar";
        let agent = api_agent(&cp, liar, node, Options::default());
        let cri = agent.stack.cri().await;
        agent.write_manifest("p.yaml", &sleeper("p", &[("app", "sleep 3600")]));
        running_container(&cri, &agent, "p", "app").await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (code, _, _) = cp.kubectl(&["get", "node", liar]);
        assert_ne!(code, 0, "no Node made for a name the identity does not own");
        let log = agent.log();
        let refusals: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("api server request failed"))
            .collect();
        assert_eq!(
            refusals.len(),
            1,
            "the refusal is logged once, not per retry:\n{log}"
        );
        assert!(refusals[0].contains("Forbidden"), "{}", refusals[0]);
        eprintln!("the refusal, as logged: {}", refusals[0]);
        let mut agent = agent;
        assert!(agent.is_running(), "the agent lives with the refusal");
        agent.remove_manifest("p.yaml");
        drop(agent);
        cp.forget_node(liar);
    });
}

/// A kubeconfig that cannot be used is one startup line naming it.
#[test]
fn a_bad_kubeconfig_is_one_startup_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("kubelet.conf");
    std::fs::write(&bad, "apiVersion: v1\nkind: Config\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_minilet"))
        .args([
            "--kubeconfig",
            bad.to_str().unwrap(),
            "--hostname-override",
            "n1",
        ])
        .args(["--root-dir", dir.path().join("state").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("minilet: kubeconfig {}", bad.display())),
        "{err}"
    );
    assert!(!dir.path().join("state").exists(), "nothing started: {err}");
}
