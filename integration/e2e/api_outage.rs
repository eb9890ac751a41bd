//! End-to-end: the API server goes away (kubernetes#105543, the case
//! kubelet gets wrong). With the real control plane stopped for 60 s, pods
//! keep running, a crashing static pod is still restarted, and an agent
//! restarted meanwhile tears nothing down (the API source has not listed:
//! the sources-synced gate). When the server returns, the statuses
//! converge and no pod was recreated.

use std::collections::BTreeSet;
use std::time::Duration;

use minilet::cri::Runtime;

use crate::cluster::ControlPlane;
use crate::harness::*;
use crate::{BUSYBOX, on_stack};

fn control_plane(what: &str, name: &str) {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let st = std::process::Command::new(repo.join("integration/control-plane.sh"))
        .args([what, name])
        .status()
        .expect("run control-plane.sh");
    assert!(st.success(), "control-plane.sh {what} {name} failed");
}

/// Starts the API server again even when the test fails half-way.
struct ServerBack;
impl Drop for ServerBack {
    fn drop(&mut self) {
        control_plane("start", "kube-apiserver");
    }
}

fn restarts(c: &minilet::cri::api::Container) -> u32 {
    c.annotations["io.kubernetes.container.restartCount"]
        .parse()
        .unwrap_or(0)
}

#[test]
fn pods_keep_running_and_static_pods_keep_restarting_while_the_api_server_is_away() {
    on_stack(async {
        let cp = ControlPlane::load();
        let node = "e2e-outage";
        cp.forget_node(node);
        // A run that failed half-way may have left its pod.
        cp.kubectl(&[
            "delete",
            "pod",
            "outage-api",
            "-n",
            "default",
            "--ignore-not-found",
            "--grace-period=0",
            "--force",
        ]);
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("node.kubeconfig");
        cp.node_kubeconfig(node, &kubeconfig);
        let mut agent = Agent::start_with(
            node,
            Options {
                args: vec!["--kubeconfig".into(), kubeconfig.display().to_string()],
                ..Default::default()
            },
        );
        let cri = agent.stack.cri().await;
        agent.write_manifest(
            "crash.yaml",
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: crash\nspec:\n  containers:\n  - name: app\n    image: {BUSYBOX}\n    command: [sh, -c, 'sleep 1; exit 1']\n"
            ),
        );
        cp.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: outage-api\n  namespace: default\nspec:\n  nodeName: {node}\n  automountServiceAccountToken: false\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: app\n    image: {BUSYBOX}\n    command: [sleep, '3600']\n"
        ));
        // By uid: an earlier run's pod of the same name may still be in
        // the runtime until the agent has torn it down.
        let uid = cp.get_json(&["pod", "outage-api", "-n", "default"])["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string();
        let mut api_labels = agent.selector();
        api_labels.insert("io.kubernetes.pod.uid".into(), uid);
        let api_selector = || api_labels.clone();
        let api_container = eventually("the API pod runs", Duration::from_secs(60), || async {
            cri.list_containers(api_selector())
                .await
                .unwrap()
                .into_iter()
                .find(running)
        })
        .await;
        eventually(
            "the API reports it Running",
            Duration::from_secs(30),
            || async {
                let pod = cp.get_json(&["pod", "outage-api", "-n", "default"]);
                (pod["status"]["phase"] == "Running").then_some(())
            },
        )
        .await;
        let sandboxes_before = live_sandboxes(&cri, &agent, &api_labels).await;

        // The server goes away for 60 s.
        control_plane("stop", "kube-apiserver");
        let back = ServerBack;
        let crash_before = containers_max_restarts(&cri, &agent).await;
        tokio::time::sleep(Duration::from_secs(25)).await;
        // An agent restarted while the server is away must not tear down
        // the API's pods: that source has not listed.
        agent.kill9();
        agent.restart_unready();
        tokio::time::sleep(Duration::from_secs(35)).await;
        let still = cri.list_containers(api_selector()).await.unwrap();
        assert!(
            still.iter().any(|c| c.id == api_container.id && running(c)),
            "the API pod's container kept running through the outage and the agent restart: {still:?}"
        );
        let crash_after = containers_max_restarts(&cri, &agent).await;
        assert!(
            crash_after > crash_before,
            "the crashing static pod was restarted during the outage ({crash_before} -> {crash_after})"
        );

        // The server returns: statuses converge, nothing was recreated.
        drop(back);
        agent.wait_ready();
        eventually(
            "the API pod's status converges",
            Duration::from_secs(60),
            || async {
                let pod = cp.get_json(&["pod", "outage-api", "-n", "default"]);
                let id = pod["status"]["containerStatuses"][0]["containerID"]
                    .as_str()?
                    .to_string();
                (pod["status"]["phase"] == "Running" && id.ends_with(&api_container.id))
                    .then_some(())
            },
        )
        .await;
        eventually(
            "the mirror pod shows the restarts",
            Duration::from_secs(60),
            || async {
                let pod = cp.get_json(&["pod", &format!("crash-{node}"), "-n", "default"]);
                let n = pod["status"]["containerStatuses"][0]["restartCount"].as_u64()?;
                (n >= u64::from(crash_after)).then_some(())
            },
        )
        .await;
        let sandboxes_after = live_sandboxes(&cri, &agent, &api_labels).await;
        assert_eq!(sandboxes_before, sandboxes_after, "no pod was recreated");

        cp.kubectl_ok(&[
            "delete",
            "pod",
            "outage-api",
            "-n",
            "default",
            "--wait=true",
            "--timeout=60s",
        ]);
        agent.remove_manifest("crash.yaml");
        drop(agent);
        cp.forget_node(node);
    });
}

async fn containers_max_restarts(cri: &impl Runtime, agent: &Agent) -> u32 {
    let mut l = agent.selector();
    l.insert(
        "io.kubernetes.pod.name".into(),
        format!("crash-{}", agent.node),
    );
    cri.list_containers(l)
        .await
        .unwrap()
        .iter()
        .map(restarts)
        .max()
        .unwrap_or(0)
}

/// Ids of the test's two pods' sandboxes (the API pod by uid, the static
/// one by name): leftovers of an earlier run are not counted.
async fn live_sandboxes(
    cri: &impl Runtime,
    agent: &Agent,
    api: &minilet::cri::Labels,
) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = cri
        .list_pod_sandboxes(api.clone())
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    out.extend(
        cri.list_pod_sandboxes(agent.pod_selector("crash"))
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id),
    );
    out
}
