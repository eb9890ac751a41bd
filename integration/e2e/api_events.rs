//! API server mode, events: what the node did to a pod shows in
//! `kubectl get events` / `kubectl describe pod` as kubelet's does (source
//! kubelet, host the node, kubelet's reasons and words), a repeat is one
//! Event with a count, and a crash loop does not flood the server.

use std::time::Duration;

use serde_json::Value;

use crate::cluster::ApiNode;
use crate::harness::*;
use crate::{BUSYBOX, on_stack};

fn pod(name: &str, node: &str, script: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  nodeName: {node}\n  automountServiceAccountToken: false\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    image: {BUSYBOX}\n    command: [sh, -c, '{script}']\n"
    )
}

/// The Events about pod `name` (default namespace), as kubectl lists them.
fn events(n: &ApiNode, name: &str) -> Vec<Value> {
    let sel = format!("involvedObject.name={name}");
    let list =
        n.cp.get_json(&["events", "-n", "default", "--field-selector", &sel]);
    list["items"].as_array().cloned().unwrap_or_default()
}

fn reasons(evs: &[Value]) -> Vec<String> {
    evs.iter()
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn the_node_writes_kubelets_events_aggregated() {
    on_stack(async {
        let (agent, n) = ApiNode::start("e2e-events");
        let node = agent.node.clone();
        n.cp.kubectl(&[
            "delete",
            "pod",
            "ev-ok",
            "ev-crash",
            "--ignore-not-found",
            "--grace-period=0",
            "--force",
        ]);
        n.cp.apply(&pod("ev-ok", &node, "sleep 3600"));
        n.cp.apply(&pod("ev-crash", &node, "exit 1"));
        let ok = eventually(
            "Pulled, Created, Started for ev-ok",
            Duration::from_secs(60),
            || async {
                let evs = events(&n, "ev-ok");
                let r = reasons(&evs);
                ["Pulled", "Created", "Started"]
                    .iter()
                    .all(|want| r.iter().any(|x| x == want))
                    .then_some(evs)
            },
        )
        .await;
        let started = ok.iter().find(|e| e["reason"] == "Started").unwrap();
        assert_eq!(started["message"], "Started container app");
        assert_eq!(started["type"], "Normal");
        assert_eq!(started["source"]["component"], "kubelet");
        assert_eq!(started["source"]["host"], node.as_str());
        assert_eq!(started["involvedObject"]["kind"], "Pod");
        let describe = n.cp.kubectl_ok(&["describe", "pod", "ev-ok"]);
        assert!(describe.contains("Started container app"), "{describe}");

        // A crash loop: BackOff appears, and repeats of one event are one
        // object with a count, not one object each.
        let crash = eventually("BackOff for ev-crash", Duration::from_secs(90), || async {
            let evs = events(&n, "ev-crash");
            reasons(&evs).iter().any(|r| r == "BackOff").then_some(evs)
        })
        .await;
        let backoff = crash.iter().find(|e| e["reason"] == "BackOff").unwrap();
        assert_eq!(backoff["message"], "Back-off restarting failed container");
        assert_eq!(backoff["type"], "Warning");
        let counted = eventually(
            "a repeated event counted",
            Duration::from_secs(90),
            || async {
                events(&n, "ev-crash")
                    .into_iter()
                    .find(|e| e["count"].as_i64().unwrap_or(1) > 1)
            },
        )
        .await;
        let same: Vec<_> = events(&n, "ev-crash")
            .into_iter()
            .filter(|e| e["reason"] == counted["reason"] && e["message"] == counted["message"])
            .collect();
        assert_eq!(same.len(), 1, "one object per repeated event: {same:?}");

        // Deletion: kubelet's Killing.
        n.cp.kubectl_ok(&["delete", "pod", "ev-ok", "--wait=false"]);
        eventually("Killing for ev-ok", Duration::from_secs(30), || async {
            reasons(&events(&n, "ev-ok"))
                .iter()
                .any(|r| r == "Killing")
                .then_some(())
        })
        .await;
        drop(n);
        drop(agent);
    });
}
