//! End-to-end lifecycle tests: what a restarted container looks like in
//! `get pods -o json` (lastState, as kubelet reports it) and in the runtime
//! (CrashLoopBackOff), before and after the agent restarts, on the real
//! containerd.

use std::time::Duration;

use minilet::cri::{Runtime, api};

use crate::harness::*;
use crate::{BUSYBOX, containers, on_stack};

fn restart_count(c: &api::Container) -> u32 {
    c.annotations["io.kubernetes.container.restartCount"]
        .parse()
        .unwrap()
}

/// The first of the pod's containers for which `which` holds, within a minute.
async fn instance(
    cri: &impl Runtime,
    agent: &Agent,
    pod: &str,
    what: &str,
    which: impl Fn(&api::Container) -> bool,
) -> api::Container {
    eventually(what, Duration::from_secs(60), || async {
        containers(cri, agent, pod).await.into_iter().find(&which)
    })
    .await
}

/// A pod whose one container runs `script`, with an emptyDir at /data that
/// outlives the container's instances.
fn pod(name: &str, script: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  terminationGracePeriodSeconds: 1\n  volumes: [{{name: data, emptyDir: {{}}}}]\n  containers:\n  - name: app\n    image: {BUSYBOX}\n    command: [sh, -c, '{script}']\n    volumeMounts: [{{name: data, mountPath: /data}}]\n"
    )
}

/// The app container's status in `get pods -o json`, once `ok` holds for it.
async fn app_status(
    agent: &Agent,
    pod: &str,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let name = format!("{pod}-{}", agent.node);
    eventually(what, Duration::from_secs(30), || async {
        let json = agent.pods_json();
        json["items"]
            .as_array()?
            .iter()
            .find(|p| p["metadata"]["name"] == name.as_str())
            .map(|p| p["status"]["containerStatuses"][0].clone())
            .filter(|s| ok(s))
    })
    .await
}

/// A container that failed once and then runs reports the failed attempt
/// as `lastState.terminated` (exit code, reason, times, container id), as
/// kubelet does; the dead instance stays in the runtime for it, so a
/// restarted agent reports the same.
#[test]
fn a_restarted_container_reports_its_previous_attempt_as_last_state() {
    on_stack(async {
        let mut agent = Agent::start("e2e-laststate");
        let cri = agent.stack.cri().await;
        agent.write_manifest(
            "once.yaml",
            &pod(
                "once",
                "[ -e /data/ran ] && exec sleep 3600; touch /data/ran; exit 3",
            ),
        );
        let second = instance(&cri, &agent, "once", "restart count 1 running", |c| {
            running(c) && restart_count(c) == 1
        })
        .await;
        let first = containers(&cri, &agent, "once")
            .await
            .into_iter()
            .find(|c| restart_count(c) == 0)
            .expect("the failed attempt stays in the runtime");
        assert!(exited(&first));

        let check = |st: &serde_json::Value| {
            assert_eq!(st["restartCount"], 1, "{st}");
            assert!(st["state"]["running"].is_object(), "{st}");
            assert_eq!(
                st["containerID"],
                format!("containerd://{}", second.id),
                "{st}"
            );
            let last = &st["lastState"]["terminated"];
            assert_eq!(last["exitCode"], 3, "{st}");
            assert_eq!(last["reason"], "Error", "{st}");
            assert_eq!(last["containerID"], format!("containerd://{}", first.id));
            let (started, finished) = (
                last["startedAt"].as_str().unwrap_or_default(),
                last["finishedAt"].as_str().unwrap_or_default(),
            );
            assert!(!started.is_empty() && started <= finished, "{st}");
        };
        let has_last = |st: &serde_json::Value| {
            st["restartCount"] == 1 && st["lastState"]["terminated"].is_object()
        };
        check(&app_status(&agent, "once", "lastState.terminated", has_last).await);

        // A new agent knows only what the runtime holds.
        agent.kill9();
        agent.restart();
        check(
            &app_status(
                &agent,
                "once",
                "lastState.terminated after a restart",
                has_last,
            )
            .await,
        );
        assert_eq!(containers(&cri, &agent, "once").await.len(), 2);

        agent.remove_manifest("once.yaml");
        eventually("pod removed", Duration::from_secs(60), || async {
            containers(&cri, &agent, "once")
                .await
                .is_empty()
                .then_some(())
        })
        .await;
    });
}

/// A crash loop keeps its backoff when the agent restarts: the new agent
/// rebuilds it from the restart count and the last exit's finishedAt the
/// runtime records, instead of restarting the container at once.
#[test]
fn a_restarted_agent_keeps_the_crash_loop_backoff() {
    on_stack(async {
        let mut agent = Agent::start("e2e-backoff");
        let cri = agent.stack.cri().await;
        agent.write_manifest("loop.yaml", &pod("loop", "exit 1"));
        // Restart count 2 has crashed: its restart is due 20 s after it finished.
        let crashed = instance(&cri, &agent, "loop", "restart count 2 exited", |c| {
            exited(c) && restart_count(c) == 2
        })
        .await;
        agent.kill9();
        agent.restart();
        let finished = cri_finished_at(&agent, &crashed.id).await;
        let next = instance(&cri, &agent, "loop", "restart count 3", |c| {
            restart_count(c) == 3
        })
        .await;
        let waited = (next.created_at - finished) as f64 / 1e9;
        assert!(
            (19.0..30.0).contains(&waited),
            "restart count 3 came {waited:.1} s after the crash, not ~20 s"
        );
        agent.remove_manifest("loop.yaml");
    });
}

/// finishedAt of a container, from the runtime.
async fn cri_finished_at(agent: &Agent, id: &str) -> i64 {
    let cri = agent.stack.cri().await;
    let st = cri.container_status(id).await.unwrap();
    assert!(st.finished_at > 0, "{id} has finished");
    st.finished_at
}
