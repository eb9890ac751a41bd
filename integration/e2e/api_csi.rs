//! A CSI volume in API server mode, against the real v1.20 control plane
//! (its PV controller binds the claim, its attach/detach controller makes
//! the VolumeAttachment) and the real test driver over gRPC. The test plays
//! the driver's external-attacher (none is packaged): it calls
//! ControllerPublishVolume and marks the VolumeAttachment attached with the
//! returned publish_context. The node must wait for that before
//! NodeStageVolume (the driver refuses a stage without the attachment's
//! context), pass the pod's info because the CSIDriver object says
//! podInfoOnMount, and list the volume in `status.volumesInUse` while it is
//! staged, and no longer once its pod is gone. Its CSINode names the
//! driver with the driver's node id (what the attacher calls with).

use std::time::Duration;

use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, Patch, PatchParams};
use minilet::csi::proto::csi;
use minilet::csi::{CsiClient, Timeouts};

use crate::cluster::{ApiNode, client};
use crate::csi_driver::{CSI_DRIVER, CsiDriver};
use crate::harness::*;
use crate::{BUSYBOX, on_stack, running_container};

fn capability() -> csi::VolumeCapability {
    minilet::csi::controller::capability("ReadWriteOnce", "Filesystem", None, &[])
}

/// The VolumeAttachment the attach/detach controller makes for this
/// volume on this node (kubelet's csi-<sha256(handle + driver + node)>).
fn attachment_name(handle: &str, node: &str) -> String {
    minilet::volume::csi::state::attachment_id(handle, CSI_DRIVER, node)
}

fn volumes_in_use(n: &ApiNode) -> Vec<String> {
    let node = n.cp.get_json(&["node", &n.node]);
    node["status"]["volumesInUse"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn api_csi_volume_waits_for_its_attachment_and_is_reported_in_use() {
    on_stack(async {
        let node = "e2e-apicsi";
        let driver = CsiDriver::start(node);
        let (agent, n) = ApiNode::start_with(
            node,
            Options {
                minilet_config: vec![driver.config_line()],
                ..Default::default()
            },
        );
        let cri = agent.stack.cri().await;
        let annotations = n.cp.get_json(&["node", node]);
        assert_eq!(
            annotations["metadata"]["annotations"]["volumes.kubernetes.io/controller-managed-attach-detach"],
            "true",
            "the node asks for controller attach/detach"
        );

        // The node's CSINode names the driver with its node id, owned by
        // the Node: what the cluster's CSI controllers read.
        let node_id = eventually(
            "the CSINode lists the driver",
            Duration::from_secs(30),
            || async {
                let (code, out, _) = n.cp.kubectl(&["get", "csinode", node, "-o", "json"]);
                let c: serde_json::Value = serde_json::from_str(&out).ok().filter(|_| code == 0)?;
                assert_eq!(c["metadata"]["ownerReferences"][0]["kind"], "Node", "{c}");
                c["spec"]["drivers"].as_array()?.iter().find_map(|d| {
                    (d["name"] == CSI_DRIVER)
                        .then(|| d["nodeID"].as_str().unwrap_or_default().to_string())
                })
            },
        )
        .await;
        assert_eq!(node_id, node, "NodeGetInfo's node id");

        // A volume made on the driver (as its external-provisioner would),
        // a PV of it pre-bound to a claim, the claim, and the driver's
        // CSIDriver object: attach required, pod info on mount.
        let csi_client = CsiClient::new(
            CSI_DRIVER,
            &driver.endpoint().display().to_string(),
            Timeouts::default(),
        )
        .unwrap();
        let made = csi_client
            .create_volume(csi::CreateVolumeRequest {
                name: "e2e-apicsi-vol".into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 32 << 20,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![capability()],
                ..Default::default()
            })
            .await
            .unwrap()
            .volume
            .unwrap();
        let handle = made.volume_id.clone();
        let attrs: String = made
            .volume_context
            .iter()
            .map(|(k, v)| format!("{k:?}: {v:?}, "))
            .collect();
        let pod = format!("data-{node}");
        n.cp.apply(&format!(
            "apiVersion: storage.k8s.io/v1
kind: CSIDriver
metadata: {{name: {CSI_DRIVER}}}
spec: {{attachRequired: true, podInfoOnMount: true, volumeLifecycleModes: [Persistent]}}
---
apiVersion: v1
kind: PersistentVolume
metadata: {{name: e2e-apicsi-pv}}
spec:
  capacity: {{storage: 32Mi}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ''
  claimRef: {{namespace: default, name: e2e-apicsi-claim}}
  csi: {{driver: {CSI_DRIVER}, volumeHandle: {handle:?}, fsType: ext4, volumeAttributes: {{{attrs}}}}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: e2e-apicsi-claim, namespace: default}}
spec: {{storageClassName: '', volumeName: e2e-apicsi-pv, accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 32Mi}}}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {pod}, namespace: default}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {BUSYBOX}
    command: [sh, -c, 'echo hi > /data/f; echo END; sleep 3600']
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes: [{{name: data, persistentVolumeClaim: {{claimName: e2e-apicsi-claim}}}}]
"
        ));

        // Not attached yet: the pod waits, saying for what, and nothing is
        // staged.
        let va_name = attachment_name(&handle, node);
        let message = eventually(
            "the pod waits for its attachment",
            Duration::from_secs(60),
            || async {
                let p = n.pod(&pod)?;
                let w = &p["status"]["containerStatuses"][0]["state"]["waiting"];
                let m = w["message"].as_str()?.to_string();
                (w["reason"] == "ContainerCreating" && m.contains("VolumeAttachment")).then_some(m)
            },
        )
        .await;
        assert!(message.contains(&va_name), "{message}");
        assert_eq!(driver.ok_count("NodeStageVolume"), 0);

        // The controller made the VolumeAttachment; attach it as the
        // external-attacher would.
        let admin = client(n.cp.get("MINILET_CP_ADMIN_KUBECONFIG")).await;
        let vas: Api<VolumeAttachment> = Api::all(admin);
        let va = eventually(
            "the attach/detach controller's VolumeAttachment",
            Duration::from_secs(60),
            || async { vas.get_opt(&va_name).await.ok().flatten() },
        )
        .await;
        assert_eq!(va.spec.node_name, node);
        assert_eq!(va.spec.attacher, CSI_DRIVER);
        let published = csi_client
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: handle.clone(),
                node_id: node_id.clone(),
                volume_capability: Some(capability()),
                volume_context: made.volume_context.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        let status = serde_json::json!({"status": {
            "attached": true,
            "attachmentMetadata": published.publish_context,
        }});
        vas.patch_status(&va_name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();

        running_container(&cri, &agent, "data", "app").await;
        let calls = driver.calls();
        let publish = calls
            .iter()
            .find(|c| c.method == "NodePublishVolume" && c.code == "OK")
            .expect("published");
        assert_eq!(publish.pod, pod, "podInfoOnMount: the pod's name passed");
        assert_eq!(driver.ok_count("NodeStageVolume"), 1, "{calls:?}");
        let unique = format!("kubernetes.io/csi/{CSI_DRIVER}^{handle}");
        eventually(
            "volumesInUse lists the volume",
            Duration::from_secs(30),
            || async { volumes_in_use(&n).contains(&unique).then_some(()) },
        )
        .await;

        // The pod goes: unpublished, unstaged, no longer in use.
        n.cp.kubectl_ok(&["delete", "pod", &pod, "--wait=false"]);
        eventually("the volume unstaged", Duration::from_secs(60), || async {
            (driver.ok_count("NodeUnstageVolume") >= 1).then_some(())
        })
        .await;
        eventually("volumesInUse empty", Duration::from_secs(30), || async {
            volumes_in_use(&n).is_empty().then_some(())
        })
        .await;
        eventually(
            "the pod object deleted",
            Duration::from_secs(30),
            || async { n.pod(&pod).is_none().then_some(()) },
        )
        .await;

        // Detach and clean up as the cluster's side would.
        csi_client
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: handle.clone(),
                node_id: node.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        for (kind, name) in [
            ("pvc", "e2e-apicsi-claim"),
            ("pv", "e2e-apicsi-pv"),
            ("csidriver", CSI_DRIVER),
        ] {
            n.cp.kubectl(&["delete", kind, name, "--wait=false"]);
        }
        // The controller detaches once the pod is gone and the node no
        // longer lists the volume, and the external-attacher would then
        // remove the object: there is none here, so the test deletes it.
        n.cp.kubectl(&["delete", "volumeattachment", &va_name, "--wait=false"]);
        csi_client
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: handle,
                ..Default::default()
            })
            .await
            .unwrap();
        drop(n);
        drop(agent);
        driver.assert_nothing_left();
    });
}
