//! End-to-end CNI tests: minilet runs the chains for real pods on the real
//! containerd with Debian's plugins; checks read the pods' own output, the
//! host's interfaces, qdiscs and host-local's allocations.

use std::path::{Path, PathBuf};
use std::time::Duration;

use minilet::cri::Runtime;

use crate::harness::*;
use crate::{BUSYBOX, containers, on_stack, pod_ip, running_container, sandboxes};

/// A bridge network other than the default, with its own IPAM dir.
fn bridge_net(name: &str, bridge: &str, subnet: &str, ipam: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [{"type": "bridge", "bridge": bridge, "isGateway": true,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": ipam}}]
    })
    .to_string()
}

fn ips_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.chars().next().is_some_and(|c| c.is_ascii_digit()))
                .collect()
        })
        .unwrap_or_default()
}

fn pod(name: &str, annotations: &[(&str, &str)], cmd: &str) -> String {
    let mut y = format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n");
    if !annotations.is_empty() {
        y.push_str("  annotations:\n");
        for (k, v) in annotations {
            y.push_str(&format!("    {k}: \"{v}\"\n"));
        }
    }
    y.push_str(&format!(
        "spec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    image: {BUSYBOX}\n    command: [sh, -c, '{cmd}']\n"
    ));
    y
}

fn logs(agent: &Agent, pod: &str) -> String {
    agent.cli(&["logs", pod]).1
}

/// The agent's CNI result cache entries (file names).
fn cache_entries(agent: &Agent) -> Vec<String> {
    let dir = agent.dir.path().join("state/cni/cache/results");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The container id host-local recorded as holding `ip` (its file's first
/// line).
fn ip_owner(agent: &Agent, ip: &str) -> String {
    let text = std::fs::read_to_string(agent.ipam_dir().join(ip)).unwrap_or_default();
    text.lines().next().unwrap_or("").trim().to_string()
}

/// The id of the pod's ready sandbox.
async fn ready_sandbox(cri: &impl Runtime, agent: &Agent, pod: &str) -> String {
    sandboxes(cri, agent, pod)
        .await
        .into_iter()
        .find(|s| s.state == minilet::cri::api::PodSandboxState::SandboxReady as i32)
        .map(|s| s.id)
        .unwrap_or_else(|| panic!("{pod} has no ready sandbox"))
}

/// Two pods reach each other over the bridge minilet's chain built.
#[test]
fn pods_reach_each_other_over_the_bridge() {
    on_stack(async {
        let agent = Agent::start("e2e-reach");
        let cri = agent.stack.cri().await;
        agent.write_manifest(
            "server.yaml",
            &pod(
                "server",
                &[],
                "mkdir -p /www; echo from-server > /www/index.html; httpd -f -p 80 -h /www",
            ),
        );
        running_container(&cri, &agent, "server", "app").await;
        let ip = pod_ip(&cri, &agent, "server").await;
        agent.write_manifest(
            "client.yaml",
            &pod(
                "client",
                &[],
                &format!("until wget -q -O- http://{ip}/; do sleep 0.5; done; sleep 3600"),
            ),
        );
        eventually(
            "client fetched the server's page",
            Duration::from_secs(30),
            || async { logs(&agent, "client").contains("from-server").then_some(()) },
        )
        .await;
        // Per-plugin timings are the pods' events and metrics-ready counters.
        let (code, events, _) = agent.cli(&["get", "events"]);
        assert_eq!(code, 0);
        let timing = events
            .lines()
            .find(|l| l.contains("CNIPluginTiming") && l.contains("pod/server-"))
            .unwrap_or_else(|| panic!("a timing event for the server pod:\n{events}"));
        assert!(
            timing.contains("bridge") && timing.contains("portmap"),
            "{timing}"
        );
        let (_, metrics, _) = agent.cli(&["get", "metrics"]);
        let adds = metrics
            .lines()
            .find(|l| {
                l.starts_with("minilet_cni_plugin_operations_total")
                    && l.contains("plugin=\"bridge\"")
                    && l.contains("command=\"ADD\"")
            })
            .unwrap_or_else(|| panic!("bridge ADD counter:\n{metrics}"));
        let count: f64 = adds.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(count >= 2.0, "two pods, two bridge ADDs: {adds}");
    });
}

/// `k8s.v1.cni.cncf.io/networks` attaches extra networks as net1, net2 after
/// eth0; network-status shows all three; deleting the pod releases all.
#[test]
fn extra_networks_attach_in_order_and_detach_in_reverse() {
    on_stack(async {
        let ipam = tempfile::tempdir().unwrap();
        let options = Options {
            cni_configs: vec![
                (
                    "20-net-a.conflist".into(),
                    bridge_net("net-a", "minie2ea", "10.246.0.0/24", ipam.path()),
                ),
                (
                    "30-net-b.conflist".into(),
                    bridge_net("net-b", "minie2eb", "10.247.0.0/24", ipam.path()),
                ),
            ],
            ..Default::default()
        };
        let agent = Agent::start_with("e2e-multi", options);
        let cri = agent.stack.cri().await;
        agent.write_manifest(
            "multi.yaml",
            &pod(
                "multi",
                &[("k8s.v1.cni.cncf.io/networks", "net-a, net-b")],
                "ip -o -4 addr show; sleep 3600",
            ),
        );
        running_container(&cri, &agent, "multi", "app").await;
        let out = eventually("addresses printed", Duration::from_secs(15), || async {
            let l = logs(&agent, "multi");
            l.contains("net2").then_some(l)
        })
        .await;
        let line = |ifname: &str| {
            out.lines()
                .find(|l| l.split_whitespace().nth(1) == Some(ifname))
                .unwrap_or_default()
                .to_string()
        };
        assert!(line("eth0").contains(SUBNET_PREFIX), "{out}");
        assert!(line("net1").contains("10.246.0."), "{out}");
        assert!(line("net2").contains("10.247.0."), "{out}");

        let json = agent.pods_json();
        let p = &json["items"][0];
        let status: serde_json::Value = serde_json::from_str(
            p["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        let names: Vec<&str> = status
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["interface"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(names, ["eth0", "net1", "net2"], "{status}");
        assert_eq!(status[0]["default"], true);
        assert_eq!(ips_in(&ipam.path().join("net-a")).len(), 1);

        agent.remove_manifest("multi.yaml");
        eventually("pod gone", Duration::from_secs(30), || async {
            sandboxes(&cri, &agent, "multi")
                .await
                .is_empty()
                .then_some(())
        })
        .await;
        assert!(
            ips_in(&ipam.path().join("net-a")).is_empty(),
            "net-a released"
        );
        assert!(
            ips_in(&ipam.path().join("net-b")).is_empty(),
            "net-b released"
        );
        assert!(allocated_ips(&agent).is_empty(), "default released");
        for bridge in ["minie2ea", "minie2eb"] {
            let out = std::process::Command::new("ip")
                .args(["-o", "link", "show", "master", bridge])
                .output()
                .unwrap();
            assert!(
                String::from_utf8_lossy(&out.stdout).trim().is_empty(),
                "veths on {bridge} removed"
            );
            let _ = std::process::Command::new("ip")
                .args(["link", "del", bridge])
                .status();
        }
    });
}

/// tuning sets a sysctl inside the pod; bandwidth shapes it from the pod's
/// kubernetes.io/ingress-bandwidth / egress-bandwidth annotations.
#[test]
fn tuning_and_bandwidth_apply() {
    on_stack(async {
        let ipam = tempfile::tempdir().unwrap();
        let tuned = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "tuned",
            "plugins": [
                {"type": "bridge", "bridge": "minie2et", "isGateway": true,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.248.0.0/24"}]], "dataDir": ipam.path()}},
                {"type": "tuning", "sysctl": {"net.core.somaxconn": "321"}},
                {"type": "bandwidth", "capabilities": {"bandwidth": true}}
            ]
        });
        // 05- sorts before the harness's 10-e2e: this is the default network.
        let options = Options {
            cni_configs: vec![("05-tuned.conflist".into(), tuned.to_string())],
            ..Default::default()
        };
        let agent = Agent::start_with("e2e-tuned", options);
        let cri = agent.stack.cri().await;
        agent.write_manifest(
            "shaped.yaml",
            &pod(
                "shaped",
                &[
                    ("kubernetes.io/ingress-bandwidth", "1M"),
                    ("kubernetes.io/egress-bandwidth", "2M"),
                ],
                "cat /proc/sys/net/core/somaxconn; sleep 3600",
            ),
        );
        running_container(&cri, &agent, "shaped", "app").await;
        let out = eventually("sysctl printed", Duration::from_secs(15), || async {
            let l = logs(&agent, "shaped");
            (!l.trim().is_empty()).then_some(l)
        })
        .await;
        assert_eq!(out.trim(), "321", "tuning set the sysctl inside the pod");
        let qdiscs = String::from_utf8_lossy(
            &std::process::Command::new("tc")
                .args(["qdisc", "show"])
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned();
        assert!(
            qdiscs.contains("tbf"),
            "bandwidth installed a tbf qdisc:\n{qdiscs}"
        );
        agent.remove_manifest("shaped.yaml");
        eventually("pod gone", Duration::from_secs(30), || async {
            sandboxes(&cri, &agent, "shaped")
                .await
                .is_empty()
                .then_some(())
        })
        .await;
        assert!(ips_in(&ipam.path().join("tuned")).is_empty());
        let _ = std::process::Command::new("ip")
            .args(["link", "del", "minie2et"])
            .status();
    });
}

/// 100 pods come and go: afterwards host-local holds no address, and no
/// veth or netns is left.
#[test]
fn churn_of_100_pods_leaves_nothing_behind() {
    on_stack(async {
        let netns_before = netns_count();
        let agent = Agent::start("e2e-churn");
        let cri = agent.stack.cri().await;
        let n = 100;
        for i in 0..n {
            agent.write_manifest(
                &format!("p{i}.yaml"),
                &pod(&format!("p{i}"), &[], "sleep 3600"),
            );
        }
        eventually("100 pods running", Duration::from_secs(240), || async {
            let cs = cri.list_containers(agent.selector()).await.unwrap();
            (cs.iter().filter(|c| running(c)).count() == n).then_some(())
        })
        .await;
        assert_eq!(allocated_ips(&agent).len(), n, "one address per pod");
        // Half go, then the rest: the survivors keep exactly their addresses.
        for i in 0..n / 2 {
            agent.remove_manifest(&format!("p{i}.yaml"));
        }
        eventually("50 pods left", Duration::from_secs(120), || async {
            let sbs = cri.list_pod_sandboxes(agent.selector()).await.unwrap();
            (sbs.len() == n / 2).then_some(())
        })
        .await;
        let mut live_ips = vec![];
        for i in n / 2..n {
            live_ips.push(pod_ip(&cri, &agent, &format!("p{i}")).await);
        }
        let mut held = allocated_ips(&agent);
        held.sort();
        live_ips.sort();
        assert_eq!(
            held, live_ips,
            "host-local holds exactly the live pods' addresses"
        );
        for i in n / 2..n {
            agent.remove_manifest(&format!("p{i}.yaml"));
        }
        eventually("all gone", Duration::from_secs(120), || async {
            cri.list_pod_sandboxes(agent.selector())
                .await
                .unwrap()
                .is_empty()
                .then_some(())
        })
        .await;
        assert!(allocated_ips(&agent).is_empty());
        eventually("veths gone", Duration::from_secs(10), || async {
            (bridge_ports() == 0).then_some(())
        })
        .await;
        assert_eq!(netns_count(), netns_before, "netns gone");
    });
}

/// kill -9 of the agent between the plugins' ADD and the cache write (a
/// fault hook). The runtime tears the failed sandbox down at once, and its
/// DEL reaches the delegating plugin with no agent behind it: the plugin
/// DELs from the write-ahead entry itself, so nothing is held even before
/// the agent is back. Restarted, the agent runs the pod with one address,
/// owned by the live sandbox, and one cache entry.
#[test]
fn kill9_between_add_and_cache_write_leaks_nothing() {
    needs_fault_hook();
    on_stack(async {
        let options = Options {
            env: vec![("MINILET_FAULT".into(), "cni-abort-after-add".into())],
            ..Default::default()
        };
        let mut agent = Agent::start_with("e2e-fault", options);
        let cri = agent.stack.cri().await;
        agent.write_manifest("p.yaml", &pod("p", &[], "sleep 3600"));
        eventually(
            "the agent died in the fault hook",
            Duration::from_secs(30),
            || {
                let alive = agent.is_running();
                async move { (!alive).then_some(()) }
            },
        )
        .await;
        agent.reap();
        assert!(
            agent.log().contains("aborting before the result is cached"),
            "the chain's ADD completed (an address was taken) before the abort"
        );
        eventually(
            "the runtime's teardown released the dead ADD's address and cache entry",
            Duration::from_secs(30),
            || async {
                (allocated_ips(&agent).is_empty() && cache_entries(&agent).is_empty()).then_some(())
            },
        )
        .await;

        agent.options.env.clear();
        agent.restart();
        running_container(&cri, &agent, "p", "app").await;
        let ip = pod_ip(&cri, &agent, "p").await;
        let live = ready_sandbox(&cri, &agent, "p").await;
        assert_eq!(allocated_ips(&agent), vec![ip.clone()]);
        assert_eq!(
            ip_owner(&agent, &ip),
            live,
            "the address belongs to the live sandbox"
        );
        assert_eq!(
            cache_entries(&agent),
            [format!("{NETWORK}-{live}-eth0")],
            "one cache entry: the live sandbox's"
        );
        eventually(
            "no sandbox but the live one",
            Duration::from_secs(30),
            || async { (sandboxes(&cri, &agent, "p").await.len() == 1).then_some(()) },
        )
        .await;
    });
}

/// The agent stopped (SIGTERM, as before an upgrade), then the pod torn
/// down through CRI directly (what `crictl stopp` / `crictl rmp` or a drain
/// do): the delegating plugin runs the DEL itself, so the netns, the address
/// and the cache entry go. Started again, the agent converges (it recreates
/// the pod from its manifest) with no error about the old sandbox.
#[test]
fn pod_removed_through_cri_while_the_agent_is_stopped_releases_its_network() {
    on_stack(async {
        let mut agent = Agent::start("e2e-noagent");
        let cri = agent.stack.cri().await;
        agent.write_manifest("web.yaml", &pod("web", &[], "sleep 3600"));
        running_container(&cri, &agent, "web", "app").await;
        let old = ready_sandbox(&cri, &agent, "web").await;
        let entry = agent
            .dir
            .path()
            .join(format!("state/cni/cache/results/{NETWORK}-{old}-eth0"));
        let cached: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&entry).unwrap()).unwrap();
        let netns = PathBuf::from(cached["netns"].as_str().unwrap());
        assert!(netns.exists(), "{}", netns.display());
        assert_eq!(allocated_ips(&agent).len(), 1);

        assert!(agent.terminate().success(), "SIGTERM: a clean exit");
        cri.stop_pod_sandbox(&old)
            .await
            .expect("StopPodSandbox with the agent stopped");
        cri.remove_pod_sandbox(&old)
            .await
            .expect("RemovePodSandbox with the agent stopped");
        assert!(!netns.exists(), "netns {} gone", netns.display());
        assert!(
            allocated_ips(&agent).is_empty(),
            "address released: {:?}",
            allocated_ips(&agent)
        );
        assert!(!entry.exists(), "cache entry gone");
        let locks = agent.dir.path().join("state/cni/cache/locks");
        assert_eq!(
            std::fs::read_dir(&locks).map_or(0, |d| d.count()),
            0,
            "no lock file left in {}",
            locks.display()
        );

        let before = agent.log().len();
        agent.restart();
        running_container(&cri, &agent, "web", "app").await;
        let new = ready_sandbox(&cri, &agent, "web").await;
        assert_ne!(new, old);
        assert_eq!(allocated_ips(&agent).len(), 1);
        // The start-up GC pass ran before any pod was started (see
        // agent::run), so its report, if any, is in the log by now.
        let log = agent.log()[before..].to_string();
        let complaints: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("cni gc"))
            .filter(|l| l.contains(&old) || l.contains("web-") || l.contains("cni"))
            .collect();
        assert!(
            complaints.is_empty(),
            "the restarted agent complained:\n{}",
            complaints.join("\n")
        );
    });
}

/// GC proper: a minilet process killed between its plugins' ADD and the
/// cache write, for a sandbox the runtime never knew; after the agent
/// restarts, its CNI GC (grace 30 s, period 15 s) DELs the attachment from
/// the write-ahead entry, releasing the address.
#[test]
fn gc_after_a_restart_releases_what_a_killed_add_held() {
    needs_fault_hook();
    on_stack(async {
        let mut agent = Agent::start("e2e-gc");
        agent.kill9();
        let netns = format!("minilet-e2e-gc-{}", std::process::id());
        assert!(
            std::process::Command::new("ip")
                .args(["netns", "add", &netns])
                .status()
                .unwrap()
                .success()
        );
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_minilet"))
            .args([
                "--config",
                agent.config().to_str().unwrap(),
                "--hostname-override",
                &agent.node,
            ])
            .args([
                "cni",
                "add",
                NETWORK,
                "--netns",
                &format!("/var/run/netns/{netns}"),
                "--container-id",
                "e2e-gc-leak",
            ])
            .env("MINILET_FAULT", "cni-abort-after-add")
            .output()
            .unwrap();
        assert!(!out.status.success(), "the fault hook aborted the ADD");
        assert_eq!(
            allocated_ips(&agent).len(),
            1,
            "the killed ADD holds an address"
        );
        let entry = agent.dir.path().join(format!(
            "state/cni/cache/results/{NETWORK}-e2e-gc-leak-eth0"
        ));
        assert!(entry.exists(), "write-ahead entry at {}", entry.display());
        // The "sandbox" is gone before anyone cleaned up.
        assert!(
            std::process::Command::new("ip")
                .args(["netns", "del", &netns])
                .status()
                .unwrap()
                .success()
        );

        agent.restart();
        eventually(
            "GC released the address",
            Duration::from_secs(90),
            || async { (allocated_ips(&agent).is_empty() && !entry.exists()).then_some(()) },
        )
        .await;
        // The GC logs its report once the pass is over, a moment after the
        // address is released.
        eventually(
            "the agent's GC reported it",
            Duration::from_secs(10),
            || async { agent.log().contains("cni gc").then_some(()) },
        )
        .await;
    });
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn one_plugin_net(name: &str, plugin: &str) -> String {
    serde_json::json!({"cniVersion": "1.0.0", "name": name, "plugins": [{"type": plugin}]})
        .to_string()
}

/// A plugin that hangs, one that exits 1 with an error JSON, one that
/// prints garbage: each pod shows the error and retries with backoff, and
/// the default network's ADD is rolled back (no address held).
#[test]
fn failing_plugins_show_their_error_and_leak_nothing() {
    on_stack(async {
        let bin = tempfile::tempdir().unwrap();
        let version = r#"if [ "$CNI_COMMAND" = VERSION ]; then echo '{"cniVersion":"1.0.0","supportedVersions":["0.3.1","0.4.0","1.0.0"]}'; exit 0; fi"#;
        let ok_del = r#"if [ "$CNI_COMMAND" = DEL ]; then exit 0; fi"#;
        script(
            bin.path(),
            "e2e-hang",
            &format!("{version}\n{ok_del}\nsleep 3600"),
        );
        // e2e-fail logs when each ADD came: the spacing of the retries.
        let adds_log = bin.path().join("e2e-fail.adds");
        script(
            bin.path(),
            "e2e-fail",
            &format!(
                "{version}\n{ok_del}\ndate +%s.%N >> {}\necho '{{\"cniVersion\":\"1.0.0\",\"code\":7,\"msg\":\"boom from e2e-fail\",\"details\":\"it always fails\"}}'; exit 1",
                adds_log.display()
            ),
        );
        script(
            bin.path(),
            "e2e-garbage",
            &format!("{version}\n{ok_del}\necho 'this is not json'"),
        );
        let options = Options {
            cni_configs: vec![
                (
                    "50-hang.conflist".into(),
                    one_plugin_net("hang", "e2e-hang"),
                ),
                (
                    "51-fail.conflist".into(),
                    one_plugin_net("fail", "e2e-fail"),
                ),
                (
                    "52-garbage.conflist".into(),
                    one_plugin_net("garbage", "e2e-garbage"),
                ),
            ],
            cni_bin_dirs: vec![bin.path().to_path_buf()],
            plugin_timeout: Some("2s".into()),
            ..Default::default()
        };
        let agent = Agent::start_with("e2e-failing", options);
        for net in ["hang", "fail", "garbage"] {
            agent.write_manifest(
                &format!("{net}.yaml"),
                &pod(net, &[("k8s.v1.cni.cncf.io/networks", net)], "sleep 3600"),
            );
        }
        let want = [
            ("hang", "timed out"),
            ("fail", "boom from e2e-fail"),
            ("garbage", "this is not json"),
        ];
        eventually(
            "each pod shows its plugin's error",
            Duration::from_secs(60),
            || async {
                let json = agent.pods_json();
                let items = json["items"].as_array().cloned().unwrap_or_default();
                want.iter()
                    .all(|(net, text)| {
                        items.iter().any(|p| {
                            p["metadata"]["name"]
                                .as_str()
                                .is_some_and(|n| n.starts_with(&format!("{net}-")))
                                && p["status"]["message"]
                                    .as_str()
                                    .is_some_and(|m| m.contains(text))
                        })
                    })
                    .then_some(())
            },
        )
        .await;
        // Retries with backoff (1 s, doubling): each ADD of the failing
        // plugin comes further after the previous one than that one did.
        let adds: Vec<f64> = eventually(
            "four ADD attempts of e2e-fail",
            Duration::from_secs(60),
            || async {
                let text = std::fs::read_to_string(&adds_log).unwrap_or_default();
                let t: Vec<f64> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
                (t.len() >= 4).then_some(t)
            },
        )
        .await;
        let gaps: Vec<f64> = adds.windows(2).take(3).map(|w| w[1] - w[0]).collect();
        assert!(gaps[0] >= 0.9, "the first retry waited its 1 s: {gaps:?}");
        assert!(
            gaps.windows(2).all(|g| g[1] >= g[0] + 0.5) && gaps[2] >= 2.0 * gaps[0],
            "retries spaced further apart each time: {gaps:?} s"
        );
        // Each failed ADD is rolled back: between two attempts the default
        // network holds no address (one leaked would stay held).
        eventually(
            "no address held between attempts",
            Duration::from_secs(30),
            || async { allocated_ips(&agent).is_empty().then_some(()) },
        )
        .await;
        let cri = agent.stack.cri().await;
        let ready = cri
            .list_pod_sandboxes(agent.selector())
            .await
            .unwrap()
            .into_iter()
            .filter(|s| s.state == minilet::cri::api::PodSandboxState::SandboxReady as i32)
            .count();
        assert_eq!(ready, 0, "no sandbox came up half-networked");
        for net in ["hang", "fail", "garbage"] {
            let cs = containers(&cri, &agent, net).await;
            assert!(
                cs.is_empty(),
                "{net}: no container without a networked sandbox: {cs:?}"
            );
        }
    });
}
