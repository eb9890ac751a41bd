//! API server mode, pods: minilet with a node's kubeconfig against the real
//! v1.20 control plane. Pods bound to the node run and report kubelet's
//! status; deletion stops them within the grace period and removes the
//! object; static pods get mirror pods; pods the node cannot run are
//! refused with a reason in their status. kubectl (as the admin) is the
//! client; the runtime (CRI) is the truth about what runs.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::ControlPlane;
use crate::harness::*;
use crate::{BUSYBOX, containers, on_stack, running_container, sandboxes};
use minilet::cri::Runtime;

/// The node's identity, an agent with it, and cleanup of what the test
/// made in the API (dropped before the agent, so it tears the pods down).
struct ApiNode {
    cp: ControlPlane,
    node: String,
    _kubeconfig: tempfile::TempDir,
}

impl ApiNode {
    /// An agent running as `system:node:<node>`, its Node registered by
    /// itself and Ready (the scheduler binds only to such a node).
    async fn start(node: &str) -> (Agent, ApiNode) {
        let cp = ControlPlane::load();
        cp.forget_node(node);
        wait_until("old node forgotten", Duration::from_secs(30), || {
            let (code, _, _) = cp.kubectl(&["get", "node", node]);
            code != 0
        });
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("node.kubeconfig");
        cp.node_kubeconfig(node, &kubeconfig);
        let agent = Agent::start_with(
            node,
            Options {
                args: vec!["--kubeconfig".into(), kubeconfig.display().to_string()],
                ..Default::default()
            },
        );
        wait_until("the agent's Node is Ready", Duration::from_secs(60), || {
            let (code, out, _) = cp.kubectl(&["get", "node", node, "-o", "json"]);
            code == 0
                && serde_json::from_str::<Value>(&out).is_ok_and(|n| {
                    n["status"]["conditions"].as_array().is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
                })
        });
        let n = ApiNode {
            cp,
            node: node.to_string(),
            _kubeconfig: dir,
        };
        (agent, n)
    }

    fn pod(&self, name: &str) -> Option<Value> {
        let (code, out, _) = self.cp.kubectl(&["get", "pod", name, "-o", "json"]);
        (code == 0).then(|| serde_json::from_str(&out).unwrap())
    }
}

impl Drop for ApiNode {
    fn drop(&mut self) {
        // Let the agent stop every API pod, then the Node goes (and with it,
        // through the garbage collector, its mirror pods).
        let sel = format!("spec.nodeName={}", self.node);
        self.cp.kubectl(&[
            "delete",
            "pods",
            "--all-namespaces",
            "--field-selector",
            &sel,
            "--wait=false",
        ]);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            let (_, out, _) = self.cp.kubectl(&[
                "get",
                "pods",
                "--all-namespaces",
                "--field-selector",
                &sel,
                "-o",
                "name",
            ]);
            // Mirror pods stay until the agent removes the manifests.
            let left: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
            if left.iter().all(|l| {
                let n = l.trim_start_matches("pod/");
                self.pod(n).is_some_and(|p| {
                    p["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_string()
                })
            }) {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.cp.forget_node(&self.node);
    }
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A pod bound to `node` directly (no scheduler), named `<name>-<node>` so
/// `Agent::pod_selector(name)` finds it in the runtime.
fn bound_pod(name: &str, node: &str, grace: u32, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}-{node}\n  namespace: default\n  labels:\n    e2e: {node}\nspec:\n  nodeName: {node}\n  automountServiceAccountToken: false\n  terminationGracePeriodSeconds: {grace}\n{extra_spec}  containers:\n  - name: app\n    image: {BUSYBOX}\n    command: [sh, -c, 'trap \"exit 0\" TERM; sleep 3600 & wait']\n"
    )
}

fn phase(p: &Value) -> &str {
    p["status"]["phase"].as_str().unwrap_or_default()
}

fn condition<'a>(p: &'a Value, kind: &str) -> &'a Value {
    p["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .unwrap_or(&Value::Null)
}

/// A pod bound to the node runs and reports kubelet's status, is not
/// rewritten while nothing changes, and `kubectl delete pod` stops it
/// within its grace period: the object, the sandbox and its IP go.
#[test]
fn api_pod_runs_reports_status_and_is_deleted_gracefully() {
    on_stack(async {
        let (agent, n) = ApiNode::start("e2e-apipod").await;
        let cri = agent.stack.cri().await;
        let name = format!("web-{}", agent.node);
        n.cp.apply(&bound_pod("web", &agent.node, 5, ""));
        let ctr = running_container(&cri, &agent, "web", "app").await;
        let p = eventually(
            "status Running and ready",
            Duration::from_secs(30),
            || async {
                n.pod(&name)
                    .filter(|p| phase(p) == "Running" && condition(p, "Ready")["status"] == "True")
            },
        )
        .await;
        let st = &p["status"];
        let cs = &st["containerStatuses"][0];
        assert_eq!(cs["name"], "app", "{st}");
        assert_eq!(cs["ready"], true, "{st}");
        assert_eq!(cs["started"], true, "{st}");
        assert_eq!(cs["restartCount"], 0, "{st}");
        assert_eq!(cs["image"], BUSYBOX, "{st}");
        assert!(
            cs["imageID"].as_str().is_some_and(|s| !s.is_empty()),
            "{st}"
        );
        assert_eq!(
            cs["containerID"].as_str(),
            Some(format!("containerd://{}", ctr.id).as_str()),
            "{st}"
        );
        assert!(cs["state"]["running"]["startedAt"].is_string(), "{st}");
        let ip = st["podIP"].as_str().unwrap_or_default().to_string();
        assert!(ip.starts_with(SUBNET_PREFIX), "{st}");
        assert_eq!(st["podIPs"][0]["ip"], ip.as_str(), "{st}");
        assert!(st["hostIP"].is_string(), "{st}");
        assert!(st["startTime"].is_string(), "{st}");
        assert_eq!(st["qosClass"], "BestEffort", "{st}");
        for c in ["Initialized", "ContainersReady", "PodScheduled"] {
            assert_eq!(condition(&p, c)["status"], "True", "{c}: {st}");
        }

        // Nothing changes: nothing is written (the workers republish the
        // view after every observation).
        let rv = p["metadata"]["resourceVersion"].clone();
        agent.wait_relists(3).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let again = n.pod(&name).unwrap();
        assert_eq!(
            again["metadata"]["resourceVersion"], rv,
            "no needless status writes: {}",
            again["status"]
        );

        // Graceful delete: the container gets TERM (it exits 0 at once),
        // then the object goes with grace 0 once the pod is torn down.
        let start = Instant::now();
        n.cp.kubectl_ok(&["delete", "pod", &name, "--wait=false"]);
        eventually("pod object gone", Duration::from_secs(20), || async {
            n.pod(&name).is_none().then_some(())
        })
        .await;
        assert!(
            start.elapsed() < Duration::from_secs(5 + 5),
            "gone within the grace period (+ slack): {:?}",
            start.elapsed()
        );
        eventually("sandbox removed", Duration::from_secs(20), || async {
            sandboxes(&cri, &agent, "web")
                .await
                .is_empty()
                .then_some(())
        })
        .await;
        assert!(containers(&cri, &agent, "web").await.is_empty());
        assert!(
            !allocated_ips(&agent).contains(&ip),
            "IP {ip} released: {:?}",
            allocated_ips(&agent)
        );
        drop(n);
    });
}

/// A static pod shows up as a mirror pod with its status; deleting the
/// mirror brings it back; deleting the manifest removes it.
#[test]
fn static_pods_have_mirror_pods() {
    on_stack(async {
        let (agent, n) = ApiNode::start("e2e-mirror").await;
        let cri = agent.stack.cri().await;
        agent.write_manifest(
            "static.yaml",
            &crate::sleeper("static", &[("app", "sleep 3600")]),
        );
        running_container(&cri, &agent, "static", "app").await;
        let name = format!("static-{}", agent.node);
        let m = eventually("mirror pod Running", Duration::from_secs(30), || async {
            n.pod(&name).filter(|p| phase(p) == "Running")
        })
        .await;
        let ann = &m["metadata"]["annotations"];
        assert_eq!(
            ann["kubernetes.io/config.mirror"], ann["kubernetes.io/config.hash"],
            "{m}"
        );
        let owner = &m["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Node", "{m}");
        assert_eq!(owner["name"], agent.node.as_str(), "{m}");
        assert_eq!(m["spec"]["nodeName"], agent.node.as_str());
        let uid = m["metadata"]["uid"].as_str().unwrap().to_string();

        // Deleted by someone: made again (with its status again).
        n.cp.kubectl_ok(&["delete", "pod", &name, "--wait=false"]);
        let again = eventually("mirror pod recreated", Duration::from_secs(30), || async {
            n.pod(&name).filter(|p| {
                p["metadata"]["uid"] != uid.as_str()
                    && p["metadata"]["deletionTimestamp"].is_null()
                    && phase(p) == "Running"
            })
        })
        .await;
        assert!(again["status"]["containerStatuses"][0]["ready"] == true);
        // The static pod itself was never touched.
        assert_eq!(containers(&cri, &agent, "static").await.len(), 1);

        // The manifest goes: so does the mirror.
        agent.remove_manifest("static.yaml");
        eventually("mirror pod removed", Duration::from_secs(30), || async {
            n.pod(&name).is_none().then_some(())
        })
        .await;
        drop(n);
    });
}

/// Pods the node cannot run: an image that does not exist waits with
/// ErrImagePull / ImagePullBackOff; an unsupported volume kind is refused
/// (Failed, with the reason and a Warning event); a good pod beside them
/// runs untouched.
#[test]
fn bad_api_pods_get_a_reason_and_leave_the_node_alone() {
    on_stack(async {
        let (mut agent, n) = ApiNode::start("e2e-apibad").await;
        let cri = agent.stack.cri().await;
        let node = agent.node.clone();
        n.cp.apply(&bound_pod("good", &node, 1, ""));
        let good = running_container(&cri, &agent, "good", "app").await;
        n.cp.apply(&bound_pod("noimage", &node, 1, "").replace(BUSYBOX, "localhost:5000/nope:404"));
        n.cp.apply(&bound_pod(
            "nfs",
            &node,
            1,
            "  volumes:\n  - name: data\n    nfs:\n      server: 127.0.0.1\n      path: /x\n",
        ));
        let nfs = eventually("nfs pod refused", Duration::from_secs(30), || async {
            n.pod(&format!("nfs-{node}"))
                .filter(|p| phase(p) == "Failed")
        })
        .await;
        assert_eq!(nfs["status"]["reason"], "UnexpectedAdmissionError", "{nfs}");
        let msg = nfs["status"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("spec.volumes[0].nfs"), "{msg}");
        assert!(
            sandboxes(&cri, &agent, "nfs").await.is_empty(),
            "never started"
        );
        let waiting = eventually("image pull waits", Duration::from_secs(60), || async {
            n.pod(&format!("noimage-{node}")).and_then(|p| {
                let r = p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                    .as_str()
                    .map(String::from)?;
                ["ErrImagePull", "ImagePullBackOff"]
                    .contains(&r.as_str())
                    .then_some(p)
            })
        })
        .await;
        assert_eq!(phase(&waiting), "Pending", "{}", waiting["status"]);
        // Both go when deleted: the refused one has nothing to stop, the
        // waiting one stops its sandbox; the node deletes the objects.
        for bad in ["nfs", "noimage"] {
            n.cp.kubectl_ok(&["delete", "pod", &format!("{bad}-{node}"), "--wait=false"]);
        }
        eventually("bad pods deleted", Duration::from_secs(20), || async {
            (n.pod(&format!("nfs-{node}")).is_none() && n.pod(&format!("noimage-{node}")).is_none())
                .then_some(())
        })
        .await;
        assert!(sandboxes(&cri, &agent, "noimage").await.is_empty());
        // The good pod is untouched.
        let cs = containers(&cri, &agent, "good").await;
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].id, good.id);
        assert!(agent.is_running());
        drop(n);
    });
}

/// A Deployment of 3 replicas: the scheduler binds them to the node, all
/// run with pod IPs and ready containers.
#[test]
fn a_deployment_is_scheduled_and_runs() {
    on_stack(async {
        let (agent, n) = ApiNode::start("e2e-deploy").await;
        let cri = agent.stack.cri().await;
        let node = agent.node.clone();
        let deploy = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: sleepers-{node}\n  namespace: default\nspec:\n  replicas: 3\n  selector:\n    matchLabels:\n      app: sleepers-{node}\n  template:\n    metadata:\n      labels:\n        app: sleepers-{node}\n    spec:\n      automountServiceAccountToken: false\n      terminationGracePeriodSeconds: 2\n      nodeSelector:\n        kubernetes.io/hostname: {node}\n      containers:\n      - name: app\n        image: {BUSYBOX}\n        command: [sleep, '3600']\n"
        );
        n.cp.apply(&deploy);
        let sel = format!("app=sleepers-{node}");
        let pods = eventually("3 replicas Running", Duration::from_secs(90), || async {
            let l = n.cp.get_json(&["pods", "-l", &sel]);
            let items = l["items"].as_array().cloned().unwrap_or_default();
            (items.len() == 3
                && items.iter().all(|p| {
                    phase(p) == "Running"
                        && p["spec"]["nodeName"] == node.as_str()
                        && p["status"]["podIP"].is_string()
                        && p["status"]["containerStatuses"][0]["ready"] == true
                }))
            .then_some(items)
        })
        .await;
        let ips: std::collections::HashSet<&str> = pods
            .iter()
            .map(|p| p["status"]["podIP"].as_str().unwrap())
            .collect();
        assert_eq!(ips.len(), 3, "distinct pod IPs: {ips:?}");
        let sbs = cri.list_pod_sandboxes(agent.selector()).await.unwrap();
        assert_eq!(sbs.len(), 3, "three sandboxes in the runtime");
        n.cp.kubectl_ok(&["delete", "deployment", &format!("sleepers-{node}")]);
        drop(n);
    });
}

/// A TCP relay to the API server that a test can cut: while down, open
/// connections are dropped and new ones closed at once (the server looks
/// gone to the agent, TLS and all, without stopping the shared server).
struct Relay {
    port: u16,
    up: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    _thread: std::thread::JoinHandle<()>,
}

impl Relay {
    fn start(target: &str) -> Relay {
        let target = target.to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::watch::channel(true);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((mut conn, _)) = listener.accept().await else {
                        return;
                    };
                    if rx.has_changed().is_err() {
                        return;
                    }
                    if !*rx.borrow() {
                        drop(conn);
                        continue;
                    }
                    let (target, mut rx) = (target.clone(), rx.clone());
                    tokio::spawn(async move {
                        let Ok(mut up) = tokio::net::TcpStream::connect(&target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut conn, &mut up) => {}
                            _ = rx.wait_for(|up| !*up) => {}
                        }
                    });
                }
            });
        });
        Relay {
            port,
            up: std::sync::Arc::new(tx),
            _thread: thread,
        }
    }

    fn set(&self, up: bool) {
        self.up.send_replace(up);
    }
}

/// The API server goes away (a relay cut for ~25 s): running pods keep
/// running, a crashing container is still restarted, an agent restarted
/// meanwhile tears nothing down; when it returns the statuses converge
/// (the restarts show) and no pod was recreated.
#[test]
fn api_server_away_stops_no_pod_and_statuses_converge_after() {
    on_stack(async {
        let cp = ControlPlane::load();
        let node = "e2e-apiaway";
        let relay = Relay::start("127.0.0.1:6443");
        // Node, kubeconfig through the relay, agent.
        let (agent0, n0) = ApiNode::start(node).await;
        drop(agent0); // only wanted the Node; restart through the relay below
        let kc = n0._kubeconfig.path().join("node.kubeconfig");
        let text = std::fs::read_to_string(&kc).unwrap();
        let relayed = n0._kubeconfig.path().join("relayed.kubeconfig");
        std::fs::write(
            &relayed,
            text.replace(
                "https://127.0.0.1:6443",
                &format!("https://127.0.0.1:{}", relay.port),
            ),
        )
        .unwrap();
        let mut agent = Agent::start_with(
            node,
            Options {
                args: vec!["--kubeconfig".into(), relayed.display().to_string()],
                ..Default::default()
            },
        );
        let cri = agent.stack.cri().await;
        cp.apply(&bound_pod("keep", node, 1, ""));
        cp.apply(&bound_pod("crash", node, 1, "").replace("sleep 3600 & wait", "sleep 2; exit 1"));
        let keep = running_container(&cri, &agent, "keep", "app").await;
        let keep_sb = sandboxes(&cri, &agent, "keep").await;
        eventually(
            "both Running in the API",
            Duration::from_secs(30),
            || async {
                let k = n0.pod(&format!("keep-{node}"))?;
                let c = n0.pod(&format!("crash-{node}"))?;
                (phase(&k) == "Running" && phase(&c) == "Running").then_some(())
            },
        )
        .await;

        relay.set(false);
        tokio::time::sleep(Duration::from_secs(12)).await;
        // Meanwhile the agent restarts (kill -9), the server still away;
        // the relay comes back while it waits for the API source's list.
        agent.kill9();
        let back = {
            let up = relay.up.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(12));
                up.send_replace(true);
            })
        };
        // Nothing may be torn down while the API source has not listed.
        let before_restart = containers(&cri, &agent, "keep").await;
        assert!(before_restart.iter().any(|c| c.id == keep.id && running(c)));
        agent.restart();
        back.join().unwrap();
        assert!(
            agent.log().contains("pod watch failed") || agent.log().contains("will resync"),
            "the agent saw the server go"
        );
        let cs = containers(&cri, &agent, "keep").await;
        assert!(
            cs.iter().any(|c| c.id == keep.id && running(c)),
            "keep's container survived the outage and the restart"
        );
        let sb = sandboxes(&cri, &agent, "keep").await;
        assert_eq!(sb.len(), 1);
        assert_eq!(sb[0].id, keep_sb[0].id, "no pod recreated");
        // The crashing container went on restarting during the outage, and
        // the API shows it once the server is back.
        let restarts = containers(&cri, &agent, "crash")
            .await
            .iter()
            .filter_map(|c| {
                c.annotations["io.kubernetes.container.restartCount"]
                    .parse::<i64>()
                    .ok()
            })
            .max()
            .unwrap_or(0);
        assert!(restarts >= 1, "restarted while the server was away");
        eventually("statuses converge", Duration::from_secs(40), || async {
            let c = n0.pod(&format!("crash-{node}"))?;
            let k = n0.pod(&format!("keep-{node}"))?;
            let rc = c["status"]["containerStatuses"][0]["restartCount"].as_i64()?;
            (rc >= restarts && phase(&k) == "Running").then_some(())
        })
        .await;
        drop(n0);
        drop(agent);
    });
}
