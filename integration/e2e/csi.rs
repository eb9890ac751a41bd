//! CSI volumes through the real binary and the real test driver
//! (integration/csi-driver: loop devices, ext4, bind mounts, over CSI gRPC
//! on a unix socket), standalone: a dynamically provisioned claim is
//! created, staged once for two pods, published per pod, and keeps its data
//! across pods; the driver sees Stage before Publish and Unpublish before
//! Unstage; kill -9 of the agent between NodePublishVolume and the first
//! container, and during teardown, neither stages twice nor leaves a mount
//! or loop device; an inline ephemeral volume comes and goes with its pod;
//! a driver answering Unavailable keeps the pod ContainerCreating with the
//! driver and call named, until it recovers.

use std::time::Duration;

use serde_json::Value;

use crate::csi_driver::{CSI_DRIVER, CsiDriver};
use crate::harness::*;
use crate::{BUSYBOX, on_stack, running_container};

/// A class of the test driver (Immediate binding, Delete) and a claim of it.
pub(crate) fn storage(claim: &str) -> String {
    format!(
        "apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {{name: test-csi}}
provisioner: {CSI_DRIVER}
reclaimPolicy: Delete
volumeBindingMode: Immediate
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {claim}}}
spec: {{storageClassName: test-csi, accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 32Mi}}}}}}
"
    )
}

/// A pod running `script` (then END, then sleeping) with `volume` at /data.
pub(crate) fn pod(name: &str, volume: &str, script: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {BUSYBOX}
    command: [sh, -c, '{script}; echo END; sleep 3600']
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes: [{{name: data, {volume}}}]
"
    )
}

pub(crate) fn claim_volume(claim: &str) -> String {
    format!("persistentVolumeClaim: {{claimName: {claim}}}")
}

/// What container `app` of static pod `name` printed up to `END`.
pub(crate) async fn printed(agent: &Agent, name: &str) -> Vec<String> {
    crate::api_volumes::printed(agent, "default", &format!("{name}-{}", agent.node)).await
}

/// The methods the driver answered OK, in order.
pub(crate) fn ok_methods(driver: &CsiDriver) -> Vec<String> {
    driver
        .calls()
        .into_iter()
        .filter(|c| c.code == "OK")
        .map(|c| c.method)
        .collect()
}

fn position(calls: &[String], method: &str) -> Vec<usize> {
    calls
        .iter()
        .enumerate()
        .filter(|(_, m)| *m == method)
        .map(|(i, _)| i)
        .collect()
}

pub(crate) async fn wait_ok(driver: &CsiDriver, method: &str, n: usize) {
    eventually(
        &format!("{n} × {method} OK"),
        Duration::from_secs(60),
        || async { (driver.ok_count(method) >= n).then_some(()) },
    )
    .await;
}

/// The claims (storage.yaml) go, after their pods: the volume is deleted,
/// and neither the driver nor the agent holds a mount (or loop device) on
/// the host any more.
pub(crate) async fn storage_gone(agent: &Agent, driver: &CsiDriver) {
    agent.remove_manifest("storage.yaml");
    wait_ok(driver, "DeleteVolume", 1).await;
    driver.assert_nothing_left();
    assert!(agent_mounts(agent).is_empty(), "{:?}", agent_mounts(agent));
}

/// No mount of the agent's state dir is left (pods' and staging paths).
pub(crate) fn agent_mounts(agent: &Agent) -> Vec<String> {
    let root = agent.dir.path().to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| p.starts_with(&root))
        .collect()
}

pub(crate) fn agent_with(driver: &CsiDriver, node: &str) -> Agent {
    Agent::start_with(
        node,
        Options {
            minilet_config: vec![driver.config_line()],
            ..Default::default()
        },
    )
}

#[test]
fn csi_claim_is_provisioned_staged_once_for_two_pods_and_keeps_its_data() {
    on_stack(async {
        let driver = CsiDriver::start("e2e-csi");
        let agent = agent_with(&driver, "e2e-csi");
        let cri = agent.stack.cri().await;
        agent.write_manifest("storage.yaml", &storage("data"));
        agent.write_manifest(
            "writer.yaml",
            &pod("writer", &claim_volume("data"), "echo kept > /data/f; sync"),
        );
        running_container(&cri, &agent, "writer", "app").await;
        printed(&agent, "writer").await;
        agent.write_manifest(
            "reader.yaml",
            &pod("reader", &claim_volume("data"), "echo R=$(cat /data/f)"),
        );
        running_container(&cri, &agent, "reader", "app").await;
        let out = printed(&agent, "reader").await;
        assert!(out.iter().any(|l| l == "R=kept"), "{out:?}");

        let calls = ok_methods(&driver);
        assert_eq!(driver.ok_count("CreateVolume"), 1, "{calls:?}");
        assert_eq!(driver.ok_count("ControllerPublishVolume"), 1, "{calls:?}");
        assert_eq!(
            driver.ok_count("NodeStageVolume"),
            1,
            "one stage for two pods: {calls:?}"
        );
        assert_eq!(driver.ok_count("NodePublishVolume"), 2, "{calls:?}");
        let (stage, publish) = (
            position(&calls, "NodeStageVolume"),
            position(&calls, "NodePublishVolume"),
        );
        assert!(stage[0] < publish[0], "Stage before Publish: {calls:?}");

        // Both pods go: Unpublish twice, then (only then) Unstage.
        agent.remove_manifest("writer.yaml");
        agent.remove_manifest("reader.yaml");
        wait_ok(&driver, "NodeUnstageVolume", 1).await;
        let calls = ok_methods(&driver);
        let unpublish = position(&calls, "NodeUnpublishVolume");
        assert_eq!(unpublish.len(), 2, "{calls:?}");
        assert!(
            unpublish
                .iter()
                .all(|u| *u < position(&calls, "NodeUnstageVolume")[0]),
            "Unpublish before Unstage: {calls:?}"
        );
        eventually(
            "no mount left under the agent",
            Duration::from_secs(20),
            || async { agent_mounts(&agent).is_empty().then_some(()) },
        )
        .await;

        // A new pod of the same claim reads what the first wrote.
        agent.write_manifest(
            "again.yaml",
            &pod("again", &claim_volume("data"), "echo A=$(cat /data/f)"),
        );
        let out = printed(&agent, "again").await;
        assert!(out.iter().any(|l| l == "A=kept"), "{out:?}");
        assert_eq!(driver.ok_count("CreateVolume"), 1);

        // The pod and the claim go: the volume is unstaged and deleted,
        // nothing is left mounted or attached.
        agent.remove_manifest("again.yaml");
        wait_ok(&driver, "NodeUnstageVolume", 2).await;
        storage_gone(&agent, &driver).await;
    });
}

/// kill -9 of the agent right after NodePublishVolume (the fault hook
/// aborts before any container starts): restarted, it publishes again
/// (idempotent) but does not stage a second time, and the pod runs.
#[test]
fn kill9_between_publish_and_first_container_does_not_stage_twice() {
    needs_fault_hook();
    on_stack(async {
        let driver = CsiDriver::start("e2e-csikill");
        let mut agent = Agent::start_with(
            "e2e-csikill",
            Options {
                minilet_config: vec![driver.config_line()],
                env: vec![("MINILET_FAULT".into(), "volume-abort-after-setup".into())],
                ..Default::default()
            },
        );
        let cri = agent.stack.cri().await;
        agent.write_manifest("storage.yaml", &storage("k"));
        agent.write_manifest("p.yaml", &pod("p", &claim_volume("k"), "echo hi > /data/f"));
        eventually(
            "the agent died in the fault hook",
            Duration::from_secs(60),
            || {
                let alive = agent.is_running();
                async move { (!alive).then_some(()) }
            },
        )
        .await;
        agent.reap();
        assert!(agent.log().contains("aborting before any container starts"));
        assert_eq!(driver.ok_count("NodeStageVolume"), 1);
        assert_eq!(driver.ok_count("NodePublishVolume"), 1);
        assert!(
            containers_of(&cri, &agent, "p").await.is_empty(),
            "no container before the abort"
        );

        agent.options.env.clear();
        agent.restart();
        running_container(&cri, &agent, "p", "app").await;
        assert_eq!(
            driver.ok_count("NodeStageVolume"),
            1,
            "staged once: {:?}",
            ok_methods(&driver)
        );

        agent.remove_manifest("p.yaml");
        wait_ok(&driver, "NodeUnstageVolume", 1).await;
        storage_gone(&agent, &driver).await;
    });
}

async fn containers_of(
    cri: &impl minilet::cri::Runtime,
    agent: &Agent,
    pod: &str,
) -> Vec<minilet::cri::api::Container> {
    cri.list_containers(agent.pod_selector(pod)).await.unwrap()
}

/// kill -9 of the agent while NodeUnstageVolume hangs (after the pod's
/// Unpublish): restarted, the agent finishes the teardown; no mount and no
/// loop device is left.
#[test]
fn kill9_during_teardown_then_restart_completes_unpublish_and_unstage() {
    on_stack(async {
        let driver = CsiDriver::start("e2e-csidown");
        let mut agent = agent_with(&driver, "e2e-csidown");
        let cri = agent.stack.cri().await;
        agent.write_manifest("storage.yaml", &storage("t"));
        agent.write_manifest("p.yaml", &pod("p", &claim_volume("t"), "true"));
        running_container(&cri, &agent, "p", "app").await;
        driver.set_faults(serde_json::json!({"NodeUnstageVolume": {"hang_ms": 60000}}));
        agent.remove_manifest("p.yaml");
        wait_ok(&driver, "NodeUnpublishVolume", 1).await;
        eventually(
            "NodeUnstageVolume under way",
            Duration::from_secs(30),
            || async {
                driver
                    .calls()
                    .iter()
                    .any(|c| c.method == "NodeUnstageVolume")
                    .then_some(())
                    .or_else(|| {
                        // The hanging call is recorded when it ends; its start
                        // shows in the driver's log.
                        driver.log().contains("NodeUnstageVolume").then_some(())
                    })
            },
        )
        .await;
        assert_eq!(
            driver.ok_count("NodeUnstageVolume"),
            0,
            "the unstage hangs: {:?}",
            ok_methods(&driver)
        );
        agent.kill9();
        driver.clear_faults();
        agent.restart();
        wait_ok(&driver, "NodeUnstageVolume", 1).await;
        eventually(
            "no mount left under the agent",
            Duration::from_secs(30),
            || async { agent_mounts(&agent).is_empty().then_some(()) },
        )
        .await;
        storage_gone(&agent, &driver).await;
    });
}

/// An inline ephemeral CSI volume: published (never staged) with the pod
/// info in its volume_context, gone with its pod.
#[test]
fn inline_ephemeral_volume_comes_and_goes_with_its_pod() {
    on_stack(async {
        let driver = CsiDriver::start("e2e-csieph");
        let agent = agent_with(&driver, "e2e-csieph");
        let cri = agent.stack.cri().await;
        agent.write_manifest(
            "e.yaml",
            &pod(
                "e",
                &format!("csi: {{driver: {CSI_DRIVER}, volumeAttributes: {{size: \"16777216\"}}}}"),
                "echo x > /data/x && echo W=$(cat /data/x)",
            ),
        );
        running_container(&cri, &agent, "e", "app").await;
        let out = printed(&agent, "e").await;
        assert!(out.iter().any(|l| l == "W=x"), "{out:?}");
        assert_eq!(driver.ok_count("NodeStageVolume"), 0);
        let publish = driver
            .calls()
            .into_iter()
            .find(|c| c.method == "NodePublishVolume" && c.code == "OK")
            .unwrap();
        assert!(publish.volume_id.starts_with("csi-"), "{publish:?}");
        agent.remove_manifest("e.yaml");
        wait_ok(&driver, "NodeUnpublishVolume", 1).await;
        driver.assert_nothing_left();
    });
}

/// The first container's waiting state of static pod `name`.
fn waiting(agent: &Agent, name: &str) -> Option<(String, String)> {
    let pods: Value = agent.pods_json();
    let full = format!("{name}-{}", agent.node);
    let p = pods["items"]
        .as_array()?
        .iter()
        .find(|p| p["metadata"]["name"] == full.as_str())?;
    let w = &p["status"]["containerStatuses"][0]["state"]["waiting"];
    Some((
        w["reason"].as_str()?.to_string(),
        w["message"].as_str().unwrap_or_default().to_string(),
    ))
}

/// With `faults` set on the driver, a pod of a claim waits
/// ContainerCreating with a message naming `call`, and no publish went
/// through; once they are cleared it runs; then pod and claim go and nothing
/// is left. Returns the waiting message.
pub(crate) async fn faulted_pod_waits_then_runs(
    agent: &Agent,
    driver: &CsiDriver,
    faults: Value,
    call: &str,
) -> String {
    let cri = agent.stack.cri().await;
    driver.set_faults(faults);
    agent.write_manifest("storage.yaml", &storage("f"));
    agent.write_manifest("p.yaml", &pod("p", &claim_volume("f"), "true"));
    let (reason, message) = eventually(
        &format!("the pod waits naming {call}"),
        Duration::from_secs(60),
        || async { waiting(agent, "p").filter(|(_, m)| m.contains(call)) },
    )
    .await;
    assert_eq!(reason, "ContainerCreating", "{message}");
    assert!(message.contains(CSI_DRIVER), "{message}");
    assert_eq!(driver.ok_count("NodePublishVolume"), 0);
    driver.clear_faults();
    running_container(&cri, agent, "p", "app").await;
    agent.remove_manifest("p.yaml");
    wait_ok(driver, "NodeUnstageVolume", 1).await;
    storage_gone(agent, driver).await;
    message
}

/// A driver that answers Unavailable to NodeStageVolume: the pod waits
/// ContainerCreating with a FailedMount message naming the driver and the
/// call, is retried, and runs once the driver recovers; nothing is left
/// published from the failed attempts.
#[test]
fn a_driver_answering_unavailable_keeps_the_pod_creating_then_it_runs() {
    on_stack(async {
        let driver = CsiDriver::start("e2e-csifail");
        let agent = agent_with(&driver, "e2e-csifail");
        let message = faulted_pod_waits_then_runs(
            &agent,
            &driver,
            serde_json::json!({"NodeStageVolume": {"code": "Unavailable", "times": 1000}}),
            "NodeStageVolume",
        )
        .await;
        assert!(
            message.contains("MountVolume.MountDevice failed")
                && message.contains("code = Unavailable"),
            "{message}"
        );
    });
}
