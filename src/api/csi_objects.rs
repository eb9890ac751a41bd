//! The cluster's CSI objects for the CSI volume plugin (`volume::csi::
//! cluster::Cluster`): a driver's CSIDriver object and a volume's
//! VolumeAttachment, read with a GET when a volume is set up (the Node
//! authorizer lets a node read CSIDrivers, and the VolumeAttachments of
//! its own node). A server without storage.k8s.io/v1 CSIDriver (before
//! 1.18) answers 404 for every driver: kubelet's defaults then apply.
//!
//! Side effects: GET requests to the API server.

use futures::future::BoxFuture;
use k8s_openapi::api::storage::v1::{CSIDriver, VolumeAttachment};
use kube::{Api, Client};

use super::client::describe;
use crate::volume::csi::DriverPolicy;
use crate::volume::csi::cluster::{Attachment, Cluster, policy_of};

/// `Cluster` over the API server.
pub struct ApiCsi {
    pub client: Client,
}

impl Cluster for ApiCsi {
    fn driver<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<DriverPolicy>, String>> {
        Box::pin(async move {
            let api: Api<CSIDriver> = Api::all(self.client.clone());
            let d = api.get_opt(name).await.map_err(|e| describe(&e))?;
            Ok(d.map(|d| policy_of(&d.spec)))
        })
    }

    fn attachment<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Attachment>, String>> {
        Box::pin(async move {
            let api: Api<VolumeAttachment> = Api::all(self.client.clone());
            let va = api.get_opt(name).await.map_err(|e| describe(&e))?;
            Ok(va.map(|va| attachment_of(&va)))
        })
    }
}

/// A VolumeAttachment as the node needs it.
pub fn attachment_of(va: &VolumeAttachment) -> Attachment {
    let st = va.status.as_ref();
    Attachment {
        attached: st.is_some_and(|s| s.attached),
        metadata: st
            .and_then(|s| s.attachment_metadata.clone())
            .unwrap_or_default(),
        attach_error: st
            .and_then(|s| s.attach_error.as_ref())
            .map(|e| e.message.clone().unwrap_or_default()),
        deleting: va.metadata.deletion_timestamp.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attachment_reads_its_status() {
        let va: VolumeAttachment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "csi-1"},
            "spec": {"attacher": "d", "nodeName": "n1", "source": {"persistentVolumeName": "pv1"}},
            "status": {"attached": true, "attachmentMetadata": {"devicePath": "/dev/loop2"}}
        }))
        .unwrap();
        let a = attachment_of(&va);
        assert!(a.attached && !a.deleting);
        assert_eq!(a.metadata["devicePath"], "/dev/loop2");
        let pending: VolumeAttachment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "csi-1"},
            "spec": {"attacher": "d", "nodeName": "n1", "source": {}},
            "status": {"attached": false, "attachError": {"message": "busy"}}
        }))
        .unwrap();
        assert_eq!(
            attachment_of(&pending).attach_error.as_deref(),
            Some("busy")
        );
    }
}
