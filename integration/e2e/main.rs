//! End-to-end tests: minilet's real binary on a real containerd, with the
//! Debian CNI plugins and a registry on loopback (`integration/stack.sh up`).
//! Every check reads the runtime (CRI), the files on disk or the network.
//! They need root and the stack, and FAIL (never skip) without them.

mod api_bootstrap;
mod api_csi;
mod api_events;
mod api_node;
mod api_objects;
mod api_outage;
mod api_pods;
mod api_volumes;
mod claims;
mod cluster;
mod cni;
mod csi;
mod csi_driver;
mod csi_drivers;
mod docker;
mod harness;
mod input;
mod kind;
mod lifecycle;
mod volume_stats;
mod volume_update;

use std::time::Duration;

use harness::*;
use minilet::cri::{Runtime, api};

const BUSYBOX: &str = "localhost:5000/busybox:1.36";

/// Run one test body on its own runtime, one test at a time.
fn on_stack(test: impl std::future::Future<Output = ()>) {
    let _serial = serial();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(test);
}

fn example(name: &str) -> String {
    std::fs::read_to_string(format!("{}/manifests/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn sleeper(name: &str, containers: &[(&str, &str)]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n"
    );
    for (c, cmd) in containers {
        y.push_str(&format!(
            "  - name: {c}\n    image: {BUSYBOX}\n    command: [sh, -c, '{cmd}']\n"
        ));
    }
    y
}

async fn sandboxes(cri: &impl Runtime, agent: &Agent, pod: &str) -> Vec<api::PodSandbox> {
    cri.list_pod_sandboxes(agent.pod_selector(pod))
        .await
        .unwrap()
}

async fn containers(cri: &impl Runtime, agent: &Agent, pod: &str) -> Vec<api::Container> {
    cri.list_containers(agent.pod_selector(pod)).await.unwrap()
}

/// Wait until the pod's named container runs; returns it.
async fn running_container(
    cri: &impl Runtime,
    agent: &Agent,
    pod: &str,
    name: &str,
) -> api::Container {
    eventually(
        &format!("{pod}/{name} running"),
        Duration::from_secs(60),
        || async {
            containers(cri, agent, pod)
                .await
                .into_iter()
                .find(|c| cname(c) == name && running(c))
        },
    )
    .await
}

async fn pod_ip(cri: &impl Runtime, agent: &Agent, pod: &str) -> String {
    let sb = sandboxes(cri, agent, pod).await;
    let ready: Vec<_> = sb
        .iter()
        .filter(|s| s.state == api::PodSandboxState::SandboxReady as i32)
        .collect();
    assert_eq!(ready.len(), 1, "one ready sandbox for {pod}");
    cri.pod_sandbox_status(&ready[0].id)
        .await
        .unwrap()
        .network
        .unwrap()
        .ip
}

/// The example manifests run as described, and deleting them removes
/// sandboxes, containers, IP allocations, netns, veths and log dirs.
#[test]
fn example_manifests_run_and_are_removed_without_leaks() {
    on_stack(async {
        let netns_before = netns_count();
        let agent = Agent::start("e2e-examples");
        let cri = agent.stack.cri().await;
        for f in ["web.yaml", "shared-volume.yaml", "job.yaml"] {
            agent.write_manifest(f, &example(f));
        }

        // web: the init container ran, exited 0, before the app started.
        let httpd = running_container(&cri, &agent, "web", "httpd").await;
        let all = containers(&cri, &agent, "web").await;
        let init = all
            .iter()
            .find(|c| cname(c) == "write-page")
            .expect("init container kept");
        let init_st = cri.container_status(&init.id).await.unwrap();
        let httpd_st = cri.container_status(&httpd.id).await.unwrap();
        assert_eq!(init_st.exit_code, 0);
        assert!(
            init_st.finished_at <= httpd_st.started_at,
            "init finished before the app started"
        );
        // Its log is at kubelet's path, in the CRI format.
        let uid = httpd.labels["io.kubernetes.pod.uid"].clone();
        let log = agent
            .logs_dir()
            .join(format!("default_web-{}_{uid}", agent.node))
            .join("write-page/0.log");
        let text =
            std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let line = text.lines().next().expect("a log line");
        let parts: Vec<&str> = line.splitn(4, ' ').collect();
        assert!(
            jiff::Timestamp::strptime("%Y-%m-%dT%H:%M:%S%.fZ", parts[0]).is_ok()
                || parts[0].parse::<jiff::Timestamp>().is_ok(),
            "{line}"
        );
        assert_eq!(&parts[1..], ["stdout", "F", "page written"], "{line}");

        // The app has an IP from the bridge subnet and serves over the bridge
        // and over its hostPort.
        let ip = pod_ip(&cri, &agent, "web").await;
        assert!(
            ip.starts_with(SUBNET_PREFIX),
            "pod IP {ip} from the bridge subnet"
        );
        assert!(allocated_ips(&agent).contains(&ip), "host-local holds {ip}");
        let body = eventually(
            "web answers on its pod IP",
            Duration::from_secs(10),
            || async { http_get(&format!("{ip}:80")) },
        )
        .await;
        assert_eq!(body.trim(), format!("hello from web-{}", agent.node));
        let body = eventually(
            "web answers on hostPort 8080",
            Duration::from_secs(10),
            || async { http_get("127.0.0.1:8080") },
        )
        .await;
        assert_eq!(body.trim(), format!("hello from web-{}", agent.node));

        // shared: both containers run and see the same (tmpfs) emptyDir.
        running_container(&cri, &agent, "shared", "writer").await;
        running_container(&cri, &agent, "shared", "reader").await;
        let (code, out, _) = eventually(
            "reader prints the writer's lines",
            Duration::from_secs(15),
            || async {
                let r = agent.cli(&["logs", "shared", "-c", "reader"]);
                r.1.contains("line 2").then_some(r)
            },
        )
        .await;
        assert_eq!(code, 0, "{out}");

        // job: fails once, succeeds on the retry, then its sandbox is stopped.
        eventually("job completes", Duration::from_secs(60), || async {
            let cs = containers(&cri, &agent, "job").await;
            let done = cs
                .iter()
                .any(|c| exited(c) && c.annotations["io.kubernetes.container.restartCount"] == "1");
            let sb = sandboxes(&cri, &agent, "job").await;
            let stopped = sb
                .iter()
                .all(|s| s.state != api::PodSandboxState::SandboxReady as i32);
            (done && stopped).then_some(())
        })
        .await;
        let (_, logs, _) = agent.cli(&["logs", "job"]);
        assert_eq!(logs.trim(), "second attempt: done");

        let table = agent.get_pods();
        let row = |name: &str| -> Vec<String> {
            table
                .lines()
                .find(|l| l.starts_with(&format!("{name}-")))
                .unwrap_or_else(|| panic!("{name} in\n{table}"))
                .split_whitespace()
                .map(String::from)
                .collect()
        };
        assert_eq!(row("web")[1..3], ["1/1", "Running"], "{table}");
        assert_eq!(row("shared")[1..3], ["2/2", "Running"], "{table}");
        assert_eq!(row("job")[2], "Completed", "{table}");
        let json = agent.pods_json();
        assert_eq!(json["kind"], "PodList");
        let web = json["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["metadata"]["name"] == format!("web-{}", agent.node))
            .unwrap();
        assert_eq!(web["status"]["phase"], "Running");
        assert_eq!(web["status"]["podIP"], ip.as_str());
        assert_eq!(
            web["metadata"]["annotations"]["kubernetes.io/config.source"],
            "file"
        );
        assert_eq!(
            web["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"],
            0
        );

        // Delete the manifests: everything goes, through CNI DEL.
        for f in ["web.yaml", "shared-volume.yaml", "job.yaml"] {
            agent.remove_manifest(f);
        }
        eventually(
            "all sandboxes and containers removed",
            Duration::from_secs(60),
            || async {
                let sbs = cri.list_pod_sandboxes(agent.selector()).await.unwrap();
                let cs = cri.list_containers(agent.selector()).await.unwrap();
                (sbs.is_empty() && cs.is_empty()).then_some(())
            },
        )
        .await;
        assert!(
            allocated_ips(&agent).is_empty(),
            "IPs released: {:?}",
            allocated_ips(&agent)
        );
        assert_eq!(netns_count(), netns_before, "netns removed");
        // The kernel deletes a veth when its netns goes, asynchronously.
        eventually("veths removed", Duration::from_secs(10), || async {
            (bridge_ports() == 0).then_some(())
        })
        .await;
        let left: Vec<_> = std::fs::read_dir(agent.logs_dir())
            .unwrap()
            .flatten()
            .collect();
        assert!(left.is_empty(), "pod log dirs removed: {left:?}");
        assert!(
            http_get("127.0.0.1:8080").is_none(),
            "hostPort mapping removed"
        );
    });
}

/// A crashing container is restarted with kubelet's growing backoff.
#[test]
fn crashing_container_restarts_with_growing_backoff() {
    on_stack(async {
        let agent = Agent::start("e2e-crash");
        let cri = agent.stack.cri().await;
        agent.write_manifest(
            "crash.yaml",
            &sleeper("crash", &[("app", "echo crashing; exit 1")]),
        );
        // Record when each restart count first appears (CRI created_at).
        let mut created: Vec<i64> = vec![];
        let mut saw_backoff = false;
        let start = std::time::Instant::now();
        while created.len() < 4 || created.contains(&0) {
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "restart count 3 not reached: {created:?}"
            );
            for c in containers(&cri, &agent, "crash").await {
                let rc: usize = c.annotations["io.kubernetes.container.restartCount"]
                    .parse()
                    .unwrap();
                if created.len() <= rc {
                    created.resize(rc + 1, 0);
                }
                if created[rc] == 0 {
                    created[rc] = c.created_at;
                }
            }
            saw_backoff |= agent.get_pods().contains("CrashLoopBackOff");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let gaps: Vec<f64> = created
            .windows(2)
            .map(|w| (w[1] - w[0]) as f64 / 1e9)
            .collect();
        // kubelet: first restart at once, then 10 s, then 20 s.
        assert!(gaps[1] >= 9.0, "second restart waited ~10 s: {gaps:?}");
        assert!(gaps[2] >= gaps[1] + 5.0, "backoff grows: {gaps:?}");
        assert!(saw_backoff, "get pods showed CrashLoopBackOff");
        // Each instance logs to <container>/<restartCount>.log.
        let uid =
            containers(&cri, &agent, "crash").await[0].labels["io.kubernetes.pod.uid"].clone();
        let dir = agent
            .logs_dir()
            .join(format!("default_crash-{}_{uid}/app", agent.node));
        let latest = std::fs::read_to_string(dir.join("3.log")).unwrap_or_default();
        assert!(latest.contains("stdout F crashing"), "{latest}");
    });
}

/// Editing one container's spec replaces that container only.
#[test]
fn editing_a_manifest_replaces_only_that_container() {
    on_stack(async {
        let agent = Agent::start("e2e-edit");
        let cri = agent.stack.cri().await;
        let before = sleeper(
            "edit",
            &[
                ("a", "trap \"exit 0\" TERM; sleep 3600 & wait"),
                ("b", "trap \"exit 0\" TERM; sleep 3600 & wait"),
            ],
        );
        agent.write_manifest("edit.yaml", &before);
        let a = running_container(&cri, &agent, "edit", "a").await;
        let b = running_container(&cri, &agent, "edit", "b").await;
        let sb = sandboxes(&cri, &agent, "edit").await;
        let after = before.replacen(
            "trap \"exit 0\" TERM; sleep 3600 & wait'",
            "trap \"exit 0\" TERM; echo v2; sleep 3600 & wait'",
            2,
        );
        let after = after.replacen("echo v2; ", "", 1); // only b changes
        assert_ne!(before, after);
        agent.write_manifest("edit.yaml", &after);
        let b2 = eventually("b replaced", Duration::from_secs(30), || async {
            containers(&cri, &agent, "edit")
                .await
                .into_iter()
                .find(|c| cname(c) == "b" && running(c) && c.id != b.id)
        })
        .await;
        assert_ne!(
            b2.annotations["io.kubernetes.container.hash"],
            b.annotations["io.kubernetes.container.hash"]
        );
        let a_now = running_container(&cri, &agent, "edit", "a").await;
        assert_eq!(a_now.id, a.id, "a untouched");
        let sb_now = sandboxes(&cri, &agent, "edit").await;
        assert_eq!(sb_now.len(), 1);
        assert_eq!(sb_now[0].id, sb[0].id, "same sandbox");
    });
}

/// kill -9 of the agent, a manifest removed while it is down, restart:
/// the running pod is adopted as is (no second sandbox, same containers);
/// the orphan is torn down through CNI DEL (IP released).
#[test]
fn kill9_then_restart_adopts_and_tears_down_orphans() {
    on_stack(async {
        let mut agent = Agent::start("e2e-kill9");
        let cri = agent.stack.cri().await;
        agent.write_manifest("keep.yaml", &sleeper("keep", &[("app", "sleep 3600")]));
        agent.write_manifest("gone.yaml", &sleeper("gone", &[("app", "sleep 3600")]));
        let keep = running_container(&cri, &agent, "keep", "app").await;
        running_container(&cri, &agent, "gone", "app").await;
        let keep_sb = sandboxes(&cri, &agent, "keep").await;
        let gone_ip = pod_ip(&cri, &agent, "gone").await;
        assert!(allocated_ips(&agent).contains(&gone_ip));

        let keep_uid = keep.labels["io.kubernetes.pod.uid"].clone();
        let gone_uid =
            containers(&cri, &agent, "gone").await[0].labels["io.kubernetes.pod.uid"].clone();
        agent.kill9();
        agent.remove_manifest("gone.yaml");
        let log_before = agent.log().len();
        agent.restart();
        // Ready: the first relist after the restart found both pods, and
        // each one's worker has reconciled it once.
        let ready = agent.ready();
        let found = &ready["firstRelistPods"];
        assert!(
            [&keep_uid, &gone_uid].iter().all(|u| found
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == u.as_str())),
            "first relist covered both pods: {ready}"
        );

        eventually("orphan torn down", Duration::from_secs(60), || async {
            sandboxes(&cri, &agent, "gone")
                .await
                .is_empty()
                .then_some(())
        })
        .await;
        assert!(containers(&cri, &agent, "gone").await.is_empty());
        assert!(
            !allocated_ips(&agent).contains(&gone_ip),
            "orphan's IP released"
        );
        // A few more relists of the adopted pod: nothing may change.
        agent.wait_relists(3).await;
        let sb = sandboxes(&cri, &agent, "keep").await;
        assert_eq!(sb.len(), 1, "no second sandbox");
        assert_eq!(sb[0].id, keep_sb[0].id);
        let cs = containers(&cri, &agent, "keep").await;
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].id, keep.id, "same container");
        assert_eq!(allocated_ips(&agent).len(), 1, "exactly one IP held");
        // CNI CHECK passed for the adopted pod's attachment after the restart.
        let log = agent.log()[log_before..].to_string();
        assert!(
            log.lines()
                .any(|l| l.contains("cni check passed for adopted pod")
                    && l.contains(&format!("pod_uid={keep_uid}"))),
            "CHECK passed after restart:\n{log}"
        );
        assert!(!log.contains("cni check failed"), "{log}");
        // The restarted agent reports the container it adopted.
        assert_adopted(&agent, "keep", &keep.id);
    });
}

/// The agent's status (filled only by this agent process's workers) shows
/// `pod`'s only container as the running container `id`.
fn assert_adopted(agent: &Agent, pod: &str, id: &str) {
    let list = agent.pods_json();
    let p = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["metadata"]["name"] == format!("{pod}-{}", agent.node))
        .unwrap_or_else(|| panic!("{pod} on the board: {list}"));
    let status = &p["status"];
    assert_eq!(status["phase"], "Running", "{status}");
    let c = &status["containerStatuses"][0];
    assert_eq!(
        c["containerID"]
            .as_str()
            .and_then(|s| s.split("://").nth(1)),
        Some(id),
        "{status}"
    );
    assert!(c["state"]["running"].is_object(), "{status}");
}

/// SIGTERM stops the agent and leaves pods running; a restart adopts them.
#[test]
fn sigterm_leaves_pods_running() {
    on_stack(async {
        let mut agent = Agent::start("e2e-sigterm");
        let cri = agent.stack.cri().await;
        agent.write_manifest("p.yaml", &sleeper("p", &[("app", "sleep 3600")]));
        let c = running_container(&cri, &agent, "p", "app").await;
        let status = agent.terminate();
        assert!(status.success(), "clean exit on SIGTERM: {status:?}");
        // The agent has exited: what it left is what the runtime shows now.
        let still = containers(&cri, &agent, "p").await;
        assert!(
            still.iter().any(|x| x.id == c.id && running(x)),
            "pod kept running"
        );
        agent.restart();
        // Ready: the first relist found the pod and its worker reconciled it.
        let ready = agent.ready();
        let uid = &c.labels["io.kubernetes.pod.uid"];
        assert!(
            ready["firstRelistPods"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == uid.as_str()),
            "first relist covered the pod: {ready}"
        );
        agent.wait_relists(3).await;
        let cs = containers(&cri, &agent, "p").await;
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].id, c.id);
        assert_eq!(sandboxes(&cri, &agent, "p").await.len(), 1);
        assert_adopted(&agent, "p", &c.id);
    });
}

/// Bad manifest files: each error is shown with its file, the agent keeps
/// running, other pods are untouched, and a file that turns bad keeps its
/// last good pods running.
#[test]
fn bad_manifests_leave_other_pods_alone() {
    on_stack(async {
        let mut agent = Agent::start("e2e-bad");
        let cri = agent.stack.cri().await;
        let good = sleeper("good", &[("app", "sleep 3600")]);
        agent.write_manifest("good.yaml", &good);
        let c = running_container(&cri, &agent, "good", "app").await;

        agent.write_manifest(
            "syntax.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: [unclosed\n",
        );
        agent.write_manifest(
            "kind.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
        );
        agent.write_manifest(
            "noname.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {}\nspec: {containers: [{name: a, image: x}]}\n",
        );
        agent.write_manifest("zdup.yaml", &good);
        agent.write_manifest(
            "huge.yaml",
            &format!("# {}\n", "x".repeat(11 * 1024 * 1024)),
        );
        std::os::unix::fs::symlink("loop-b.yaml", agent.manifests().join("loop-a.yaml")).unwrap();
        std::os::unix::fs::symlink("loop-a.yaml", agent.manifests().join("loop-b.yaml")).unwrap();

        let table = eventually("all errors shown", Duration::from_secs(10), || async {
            let t = agent.get_pods();
            [
                "syntax.yaml",
                "kind.yaml",
                "noname.yaml",
                "zdup.yaml",
                "huge.yaml",
                "loop-a.yaml",
            ]
            .iter()
            .all(|f| t.contains(f))
            .then_some(t)
        })
        .await;
        assert!(table.contains("MANIFEST ERRORS"), "{table}");
        let syntax = table.lines().find(|l| l.contains("syntax.yaml")).unwrap();
        assert!(
            syntax.contains("line"),
            "error names the position: {syntax}"
        );
        assert!(agent.is_running(), "agent alive");

        // The good file turns bad: its last good version keeps running.
        agent.write_manifest(
            "good.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: good\n",
        );
        eventually(
            "good.yaml's error shown",
            Duration::from_secs(10),
            || async { agent.get_pods().contains("good.yaml").then_some(()) },
        )
        .await;
        // The bad version is applied (its error is shown); a few relists
        // later the last good version still runs, untouched.
        agent.wait_relists(3).await;
        let cs = containers(&cri, &agent, "good").await;
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].id, c.id, "last good version keeps running, untouched");
        assert!(running(&cs[0]));
        assert!(
            agent
                .get_pods()
                .lines()
                .any(|l| l.starts_with("good-") && l.contains("Running"))
        );
    });
}

/// hostNetwork pods skip CNI: no address is allocated, the pod sees the
/// host's interfaces.
#[test]
fn host_network_pods_skip_cni() {
    on_stack(async {
        let agent = Agent::start("e2e-hostnet");
        let cri = agent.stack.cri().await;
        let manifest = sleeper("hostnet", &[("app", "ip -o link show; sleep 3600")])
            .replace("spec:\n", "spec:\n  hostNetwork: true\n");
        agent.write_manifest("hostnet.yaml", &manifest);
        running_container(&cri, &agent, "hostnet", "app").await;
        let out = eventually("links printed", Duration::from_secs(15), || async {
            let l = agent.cli(&["logs", "hostnet"]).1;
            (!l.is_empty()).then_some(l)
        })
        .await;
        assert!(!out.contains("eth0@"), "no veth of ours inside: {out}");
        assert!(allocated_ips(&agent).is_empty(), "no address allocated");
        assert!(
            !agent.log().contains("cni_request"),
            "the CNI path was not used"
        );
    });
}

/// A config error: one line on stderr naming the field, non-zero exit,
/// before anything starts.
#[test]
fn config_errors_exit_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(
        &cfg,
        "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nstaticPodPth: /x\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_minilet"))
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("staticPodPth"), "{err}");
}
