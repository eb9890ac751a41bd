//! CSI drivers that come and go, through the real binary and the real test
//! driver: a driver found only through kubelet's plugin registration
//! (`<stateDir>/plugins_registry`, no `csiDrivers`), started after the
//! agent made the dir and before the agent runs, serves an inline volume
//! and shows in `minilet doctor`; a driver killed while a pod uses its
//! volume (configured, or registered and then registering again) leaves the
//! pod running and its teardown waiting (pod dir and data kept, the driver
//! named in the log) until it returns; a NodePublishVolume
//! that outlives `csiOperationTimeout` keeps the pod ContainerCreating with
//! the driver, the call and DeadlineExceeded named, until the driver
//! answers in time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use minilet_test_csi::harness::CsiOptions;

use crate::csi::{
    agent_mounts, agent_with, claim_volume, faulted_pod_waits_then_runs, ok_methods, pod, printed,
    storage, storage_gone, wait_ok,
};
use crate::csi_driver::{CSI_DRIVER, CsiDriver};
use crate::harness::*;
use crate::{on_stack, running_container};

fn inline_volume() -> String {
    format!("csi: {{driver: {CSI_DRIVER}, volumeAttributes: {{size: \"16777216\"}}}}")
}

/// The registrations the driver was told of: "registered" or why not.
fn registrations(driver: &CsiDriver) -> Vec<String> {
    driver
        .calls()
        .into_iter()
        .filter(|c| c.method == "NotifyRegistrationStatus")
        .map(|c| c.message)
        .collect()
}

async fn registered(driver: &CsiDriver, n: usize) {
    eventually(
        &format!("{n} registrations of the driver"),
        Duration::from_secs(30),
        || async {
            let got = registrations(driver);
            assert!(
                got.iter().all(|m| m == "registered"),
                "the agent refused the driver: {got:?}"
            );
            (got.len() >= n).then_some(())
        },
    )
    .await;
}

fn registration_options(agent: &Agent) -> CsiOptions {
    let mut options = CsiOptions::new(&agent.node);
    options.registration_dir = Some(agent.dir.path().join("state/plugins_registry"));
    options
}

/// A pod with an inline volume of the driver runs and writes to it, then
/// goes, and the driver unpublished it.
async fn inline_pod_runs_and_goes(agent: &Agent, driver: &CsiDriver, name: &str, round: usize) {
    let cri = agent.stack.cri().await;
    let file = format!("{name}.yaml");
    agent.write_manifest(
        &file,
        &pod(
            name,
            &inline_volume(),
            "echo x > /data/x && echo W=$(cat /data/x)",
        ),
    );
    running_container(&cri, agent, name, "app").await;
    let out = printed(agent, name).await;
    assert!(out.iter().any(|l| l == "W=x"), "{out:?}");
    agent.remove_manifest(&file);
    wait_ok(driver, "NodeUnpublishVolume", round).await;
}

#[test]
fn a_driver_found_through_plugin_registration_serves_pods_and_shows_in_doctor() {
    on_stack(async {
        // Declared before the agent: dropped after it (its pods' volumes
        // are torn down while the driver still runs).
        let mut driver: Option<CsiDriver> = None;
        let mut agent = Agent::start("e2e-csireg");
        let reg_dir = agent.dir.path().join("state/plugins_registry");
        assert!(
            !std::fs::read_to_string(agent.config())
                .unwrap()
                .contains("csiDrivers"),
            "no static driver list"
        );
        eventually(
            "the agent made plugins_registry",
            Duration::from_secs(10),
            || async { reg_dir.is_dir().then_some(()) },
        )
        .await;

        // 1. The driver starts after the agent: inotify sees its socket.
        let d = driver.insert(CsiDriver::start_with(registration_options(&agent)));
        registered(d, 1).await;
        let calls = ok_methods(d);
        assert_eq!(
            calls.first().map(String::as_str),
            Some("GetInfo"),
            "{calls:?}"
        );
        inline_pod_runs_and_goes(&agent, d, "e1", 1).await;
        let (_, out, err) = agent.cli(&["doctor"]);
        let line = out
            .lines()
            .find(|l| l.contains(CSI_DRIVER))
            .unwrap_or_else(|| panic!("doctor does not list the driver:\n{out}{err}"));
        assert!(
            line.contains("registered by")
                && line.contains(&reg_dir.display().to_string())
                && line.contains("ready"),
            "{line}"
        );

        // 2. The driver is there (and made the dir) before the agent runs:
        // the agent's first scan finds it.
        agent.terminate();
        d.terminate();
        std::fs::remove_dir_all(&reg_dir).unwrap();
        d.spawn();
        assert!(reg_dir.is_dir(), "the driver made the dir");
        agent.restart();
        registered(d, 2).await;
        inline_pod_runs_and_goes(&agent, d, "e2", 2).await;
        d.assert_nothing_left();
    });
}

/// The one pod dir under the agent's state dir that holds a CSI volume's
/// mount dir, and that mount dir.
fn csi_mount_dir(agent: &Agent) -> Option<(PathBuf, PathBuf)> {
    let pods = agent.dir.path().join("state/pods");
    for pod in std::fs::read_dir(&pods).ok()?.flatten() {
        let csi = pod.path().join("volumes/kubernetes.io~csi");
        if let Some(vol) = std::fs::read_dir(&csi).ok()?.flatten().next() {
            return Some((pod.path(), vol.path().join("mount")));
        }
    }
    None
}

fn mounted(path: &Path) -> bool {
    let p = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_str()))
}

/// Pod `name` (manifest `<name>.yaml`, already written) runs and wrote
/// "kept" to /data/f; then the driver is killed -9 under it: the container
/// keeps running; the pod removed, its teardown is held, not forced (the
/// agent logs the retry naming the driver and NodeUnpublishVolume; the pod
/// dir, the mount and the data stay). Returns the pod dir.
async fn kill_the_driver_under(agent: &Agent, driver: &mut CsiDriver, name: &str) -> PathBuf {
    let cri = agent.stack.cri().await;
    let before = running_container(&cri, agent, name, "app").await;
    printed(agent, name).await;
    let (pod_dir, mount) = csi_mount_dir(agent).expect("the pod's CSI mount dir");
    assert!(mounted(&mount), "{}", mount.display());

    driver.kill9();
    agent.wait_relists(3).await;
    let now = running_container(&cri, agent, name, "app").await;
    assert_eq!(now.id, before.id, "the container kept running");

    agent.remove_manifest(&format!("{name}.yaml"));
    eventually(
        "the agent names the driver and the failed unpublish",
        Duration::from_secs(60),
        || async {
            agent
                .log()
                .lines()
                .any(|l| {
                    l.contains("volume teardown failed")
                        && l.contains("retry_in")
                        && l.contains("NodeUnpublishVolume")
                        && l.contains(CSI_DRIVER)
                })
                .then_some(())
        },
    )
    .await;
    agent.wait_relists(2).await;
    assert!(pod_dir.is_dir(), "the pod dir stays");
    assert!(
        mounted(&mount),
        "the publish stays: {:?}",
        agent_mounts(agent)
    );
    assert_eq!(
        std::fs::read_to_string(mount.join("f")).unwrap(),
        "kept\n",
        "no data deleted"
    );
    pod_dir
}

async fn gone(what: &Path) {
    eventually(
        &format!("{} is gone", what.display()),
        Duration::from_secs(30),
        || async { (!what.exists()).then_some(()) },
    )
    .await;
}

/// kill -9 of the driver while a pod uses its claim: the pod keeps
/// running; its teardown waits and completes once the driver is back.
#[test]
fn a_driver_killed_under_a_running_pod_holds_its_teardown_until_it_returns() {
    on_stack(async {
        let mut driver = CsiDriver::start("e2e-csigone");
        let agent = agent_with(&driver, "e2e-csigone");
        agent.write_manifest("storage.yaml", &storage("g"));
        agent.write_manifest(
            "p.yaml",
            &pod("p", &claim_volume("g"), "echo kept > /data/f; sync"),
        );
        let pod_dir = kill_the_driver_under(&agent, &mut driver, "p").await;
        driver.spawn();
        wait_ok(&driver, "NodeUnpublishVolume", 1).await;
        wait_ok(&driver, "NodeUnstageVolume", 1).await;
        gone(&pod_dir).await;
        storage_gone(&agent, &driver).await;
    });
}

/// The same with an inline volume of a driver found through plugin
/// registration, restarted as a DaemonSet's would be (kill -9 leaves its
/// registration socket; the new process binds a new one): the held
/// teardown completes once the agent registered it again.
#[test]
fn a_registered_driver_killed_and_restarted_completes_the_teardown() {
    on_stack(async {
        let mut driver: Option<CsiDriver> = None;
        let agent = Agent::start("e2e-csiregone");
        let d = driver.insert(CsiDriver::start_with(registration_options(&agent)));
        registered(d, 1).await;
        agent.write_manifest("e.yaml", &pod("e", &inline_volume(), "echo kept > /data/f"));
        let pod_dir = kill_the_driver_under(&agent, d, "e").await;
        d.spawn();
        registered(d, 2).await;
        wait_ok(d, "NodeUnpublishVolume", 1).await;
        gone(&pod_dir).await;
        d.assert_nothing_left();
        assert!(
            agent_mounts(&agent).is_empty(),
            "{:?}",
            agent_mounts(&agent)
        );
    });
}

/// NodePublishVolume hanging past `csiOperationTimeout`: the pod waits
/// ContainerCreating naming the driver, the call and DeadlineExceeded, runs
/// once the driver answers in time, and nothing half-mounted is left.
#[test]
fn a_publish_slower_than_the_call_timeout_keeps_the_pod_creating_then_it_runs() {
    on_stack(async {
        let driver = CsiDriver::start("e2e-csislow");
        let agent = Agent::start_with(
            "e2e-csislow",
            Options {
                minilet_config: vec![driver.config_line(), "csiOperationTimeout: 3s".into()],
                ..Default::default()
            },
        );
        let message = faulted_pod_waits_then_runs(
            &agent,
            &driver,
            serde_json::json!({"NodePublishVolume": {"hang_ms": 60000}}),
            "NodePublishVolume",
        )
        .await;
        // No retry of a publish the agent gave up on left a target of
        // this driver mounted (faulted_pod_waits_then_runs checked).
        assert!(
            message.contains("MountVolume.SetUp failed")
                && message.contains("code = DeadlineExceeded"),
            "{message}"
        );
    });
}
