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

/// The fault hook exists only in builds with the `fault-injection` feature
/// (never the shipped binary): without it the tests that need it fail, and
/// say how to run them.
#[cfg(not(feature = "fault-injection"))]
fn needs_fault_hook() {
    panic!(
        "this test needs minilet's fault hook: run the e2e suite with \
         `cargo test --features fault-injection` (integration/test.sh does)"
    );
}
#[cfg(feature = "fault-injection")]
fn needs_fault_hook() {}

/// kill -9 of the agent between the plugins' ADD and the cache write
/// (a fault hook), then a restart: GC releases what the dead ADD held.
#[test]
fn kill9_between_add_and_cache_write_is_collected() {
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
        assert_eq!(
            allocated_ips(&agent).len(),
            1,
            "the dead ADD left an address behind"
        );
        let leaked = allocated_ips(&agent)[0].clone();
        agent.options.env.clear();
        agent.restart();
        running_container(&cri, &agent, "p", "app").await;
        let ip = pod_ip(&cri, &agent, "p").await;
        eventually(
            "GC released the leaked address",
            Duration::from_secs(30),
            || async {
                let held = allocated_ips(&agent);
                (held == vec![ip.clone()]).then_some(())
            },
        )
        .await;
        assert!(ip != leaked || allocated_ips(&agent).len() == 1);
        // containerd keeps the sandbox whose network setup died (NotReady);
        // the worker removes it, and its CNI DEL finds the write-ahead entry.
        eventually(
            "the dead sandbox removed",
            Duration::from_secs(30),
            || async { (sandboxes(&cri, &agent, "p").await.len() == 1).then_some(()) },
        )
        .await;
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
        script(
            bin.path(),
            "e2e-fail",
            &format!(
                "{version}\n{ok_del}\necho '{{\"cniVersion\":\"1.0.0\",\"code\":7,\"msg\":\"boom from e2e-fail\",\"details\":\"it always fails\"}}'; exit 1"
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
        // Retries with backoff: several attempts, spaced further apart.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let attempts = agent.log().matches("sandbox creation failed").count();
        assert!(
            attempts >= 6,
            "each pod retried: {attempts} failures logged"
        );
        assert!(
            allocated_ips(&agent).is_empty(),
            "rolled back: {:?}",
            allocated_ips(&agent)
        );
        let cri = agent.stack.cri().await;
        let ready = cri
            .list_pod_sandboxes(agent.selector())
            .await
            .unwrap()
            .into_iter()
            .filter(|s| s.state == minilet::cri::api::PodSandboxState::SandboxReady as i32)
            .count();
        assert_eq!(ready, 0, "no sandbox came up half-networked");
        let _ = containers(&cri, &agent, "fail").await;
    });
}
