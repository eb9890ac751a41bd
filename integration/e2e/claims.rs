//! Standalone PersistentVolumes and claims through the real binary: a
//! claim binds to the smallest fitting volume of the manifest dir, a claim
//! whose class names a CSI driver that is not there waits saying so,
//! `minilet get pv,pvc` shows them as kubectl does, the binding survives a
//! restart (kept under the root dir), and a claim removed from the dir
//! leaves its Retain volume Released.

use std::time::Duration;

use serde_json::Value;

use crate::harness::*;
use crate::on_stack;

const OBJECTS: &str = "apiVersion: v1
kind: PersistentVolume
metadata: {name: small}
spec: {capacity: {storage: 1Gi}, accessModes: [ReadWriteOnce], hostPath: {path: /tmp/minilet-e2e-small}}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: big}
spec: {capacity: {storage: 10Gi}, accessModes: [ReadWriteOnce], hostPath: {path: /tmp/minilet-e2e-big}}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: fast}
provisioner: absent.csi.minilet.io
";

const CLAIMS: &str = "apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec: {storageClassName: '', accessModes: [ReadWriteOnce], resources: {requests: {storage: 512Mi}}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: fresh}
spec: {storageClassName: fast, accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
";

fn volumes(agent: &Agent) -> Value {
    let (code, out, err) = agent.cli(&["get", "pv,pvc", "-o", "json"]);
    assert_eq!(code, 0, "get pv,pvc failed: {err}");
    serde_json::from_str(&out).unwrap()
}

fn phase(list: &Value, kind: &str, name: &str) -> String {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["kind"] == kind && i["metadata"]["name"] == name)
        .map(|i| {
            i["status"]["phase"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default()
}

#[test]
fn claims_bind_wait_survive_a_restart_and_release() {
    on_stack(async {
        let mut agent = Agent::start("e2e-claims");
        agent.write_manifest("objects.yaml", OBJECTS);
        agent.write_manifest("claims.yaml", CLAIMS);
        let list = eventually("data bound", Duration::from_secs(20), || async {
            let l = volumes(&agent);
            (phase(&l, "PersistentVolumeClaim", "data") == "Bound").then_some(l)
        })
        .await;
        assert_eq!(phase(&list, "PersistentVolume", "small"), "Bound");
        assert_eq!(phase(&list, "PersistentVolume", "big"), "Available");
        assert_eq!(phase(&list, "PersistentVolumeClaim", "fresh"), "Pending");

        let (code, table, err) = agent.cli(&["get", "pvc"]);
        assert_eq!(code, 0, "{err}");
        let row: Vec<&str> = table
            .lines()
            .find(|l| l.starts_with("data "))
            .unwrap()
            .split_whitespace()
            .collect();
        // No class: the STORAGECLASS cell is empty, AGE follows.
        assert_eq!(row[..5], ["data", "Bound", "small", "1Gi", "RWO"]);
        assert!(
            table.contains("persistentvolumeclaim/default/fresh: waiting for the CSI driver \"absent.csi.minilet.io\""),
            "{table}"
        );
        let (code, table, err) = agent.cli(&["get", "pv"]);
        assert_eq!(code, 0, "{err}");
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("small ") && l.contains("default/data")),
            "{table}"
        );

        // Kept under the root dir: an agent killed and restarted binds the
        // same way.
        agent.kill9();
        agent.restart();
        let list = eventually("data bound again", Duration::from_secs(20), || async {
            let l = volumes(&agent);
            (phase(&l, "PersistentVolumeClaim", "data") == "Bound").then_some(l)
        })
        .await;
        let data = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["metadata"]["name"] == "data")
            .unwrap();
        assert_eq!(data["spec"]["volumeName"], "small");

        // The claims go: the Retain volume is Released, never Available.
        agent.remove_manifest("claims.yaml");
        eventually("small released", Duration::from_secs(20), || async {
            (phase(&volumes(&agent), "PersistentVolume", "small") == "Released").then_some(())
        })
        .await;
    });
}
