//! End-to-end: minilet's pods beside a Docker engine. Docker sets the
//! FORWARD policy to DROP and accepts only its own bridge, and with bridge
//! netfilter on, even frames between two pods on one CNI bridge go through
//! FORWARD. The suite's chain (like config/cni/10-bridge.conflist) ends with
//! the CNI `firewall` plugin, which accepts each pod's traffic in its own
//! CNI-FORWARD chain; these tests check that pods then reach each other and
//! a hostPort through the node, and that Docker's rules stay as they were.
//! They assert Docker's rules are in place first, so they cannot pass by
//! testing an ACCEPT policy.

use std::process::Command;
use std::time::Duration;

use crate::harness::*;
use crate::{BUSYBOX, on_stack, pod_ip, running_container};

/// `iptables-save -t filter`, as the CNI plugins see the tables.
fn filter_table() -> String {
    let out = Command::new("iptables-save")
        .args(["-t", "filter"])
        .output()
        .expect("iptables-save runs");
    assert!(out.status.success(), "iptables-save: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Docker's filter rules, without the counters that change as packets pass.
fn docker_rules(table: &str) -> Vec<String> {
    table
        .lines()
        .filter(|l| l.contains("DOCKER") || l.starts_with(":FORWARD "))
        .map(|l| l.split(" [").next().unwrap_or(l).to_string())
        .collect()
}

/// Fails, naming what is missing, unless the host has Docker's FORWARD
/// policy DROP with bridge netfilter on: the conditions this file is about.
fn assert_docker_rules(table: &str) {
    let nf =
        std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables").unwrap_or_default();
    assert!(
        table.lines().any(|l| l.starts_with(":FORWARD DROP"))
            && table.lines().any(|l| l.starts_with(":DOCKER-USER ")),
        "this test needs a Docker engine's rules (FORWARD policy DROP, DOCKER-USER); \
         start dockerd first. filter table:\n{table}"
    );
    assert_eq!(
        nf.trim(),
        "1",
        "this test needs bridge netfilter on (net.bridge.bridge-nf-call-iptables = 1, br_netfilter)"
    );
}

const HOST_PORT: u16 = 18081;

/// A pod on the e2e bridge reaches another pod directly and through the
/// other's hostPort on the node's bridge address, with Docker's FORWARD
/// DROP in place; the firewall plugin's per-pod rules go with the pods and
/// Docker's rules are untouched.
#[test]
fn pods_reach_each_other_and_a_host_port_beside_docker() {
    on_stack(async {
        let before = filter_table();
        assert_docker_rules(&before);
        let agent = Agent::start("e2e-docker");
        let cri = agent.stack.cri().await;
        agent.write_manifest(
            "server.yaml",
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: server\nspec:\n  \
                 terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    image: {BUSYBOX}\n    \
                 command: [sh, -c, 'mkdir -p /www; echo from-server > /www/index.html; httpd -f -p 80 -h /www']\n    \
                 ports:\n    - containerPort: 80\n      hostPort: {HOST_PORT}\n"
            ),
        );
        running_container(&cri, &agent, "server", "app").await;
        let ip = pod_ip(&cri, &agent, "server").await;
        // The node's address on the bridge: the first of the subnet.
        let gateway = format!("{SUBNET_PREFIX}0.1");
        agent.write_manifest(
            "client.yaml",
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: client\nspec:\n  \
                 terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    image: {BUSYBOX}\n    \
                 command: [sh, -c, 'until a=$(timeout 3 wget -q -O- http://{ip}/); do sleep 0.5; done; echo pod:$a; \
                 until b=$(timeout 3 wget -q -O- http://{gateway}:{HOST_PORT}/); do sleep 0.5; done; echo hostport:$b; \
                 sleep 3600']\n"
            ),
        );
        // (busybox 1.35's wget crashes with -T: timeout(1) bounds each try.)
        eventually(
            "the client reached the server pod and its hostPort",
            Duration::from_secs(30),
            || async {
                let out = agent.cli(&["logs", "client"]).1;
                (out.contains("pod:from-server") && out.contains("hostport:from-server"))
                    .then_some(())
            },
        )
        .await;
        // From the node itself too (OUTPUT, not FORWARD: a sanity check).
        let body = eventually(
            "hostPort answers on loopback",
            Duration::from_secs(10),
            || async { http_get(&format!("127.0.0.1:{HOST_PORT}")) },
        )
        .await;
        assert_eq!(body.trim(), "from-server");

        // The firewall plugin accepts the pods' traffic ahead of Docker's rules.
        let during = filter_table();
        let forward: Vec<&str> = during
            .lines()
            .filter(|l| l.starts_with("-A FORWARD "))
            .collect();
        assert!(
            forward
                .first()
                .is_some_and(|l| l.contains("-j CNI-FORWARD")),
            "CNI-FORWARD first in FORWARD: {forward:?}"
        );
        assert!(
            during.contains(&format!("-A CNI-FORWARD -s {ip}/32 -j ACCEPT")),
            "{during}"
        );
        assert_eq!(docker_rules(&during), docker_rules(&before));

        // Removing the pods takes their rules; Docker's stay as they were.
        agent.remove_manifest("client.yaml");
        agent.remove_manifest("server.yaml");
        eventually(
            "the server's firewall rules removed",
            Duration::from_secs(30),
            || async { (!filter_table().contains(&format!(" {ip}/32 "))).then_some(()) },
        )
        .await;
        assert_eq!(docker_rules(&filter_table()), docker_rules(&before));
    });
}
