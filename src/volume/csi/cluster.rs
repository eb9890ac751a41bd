//! What the cluster says about CSI volumes, in API server mode: a driver's
//! CSIDriver object (attachRequired, podInfoOnMount, fsGroupPolicy) and a
//! volume's VolumeAttachment (made by kube-controller-manager's
//! attach/detach controller, marked attached by the driver's
//! external-attacher; its attachmentMetadata is the publish_context that
//! NodeStage and NodePublish get). Standalone there is no cluster: drivers
//! get `DriverPolicy::default()` and the claim binder publishes volumes
//! itself.
//!
//! `wait_attached` is the pure check kubelet's csi attacher makes in
//! WaitForAttach, with its messages; the lookups are the `Cluster` seam
//! (`api::csi_objects` over the server, a fake in tests).
//!
//! Side effects: none here.

use std::collections::BTreeMap;

use futures::future::BoxFuture;

use super::node::{DriverPolicy, FsGroupPolicy};

/// A VolumeAttachment as the node needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attachment {
    pub attached: bool,
    /// `status.attachmentMetadata`: the volume's publish_context.
    pub metadata: BTreeMap<String, String>,
    /// `status.attachError.message`.
    pub attach_error: Option<String>,
    /// It has a deletionTimestamp (being detached).
    pub deleting: bool,
}

/// The lookups of the cluster's CSI objects; an error is the reason the
/// server could not answer (unreachable, forbidden), retried by the caller.
pub trait Cluster: Send + Sync {
    /// The policy of the driver's CSIDriver object; `None`: no object.
    fn driver<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<DriverPolicy>, String>>;
    /// The VolumeAttachment called `name`; `None`: not there (yet).
    fn attachment<'a>(&'a self, name: &'a str)
    -> BoxFuture<'a, Result<Option<Attachment>, String>>;
}

/// What a driver with no CSIDriver object gets in a cluster (kubelet's
/// defaults): it must be attached, gets no pod info, and fsGroup is applied
/// to ReadWriteOnce volumes with an fsType.
pub fn without_object() -> DriverPolicy {
    DriverPolicy {
        fs_group_policy: FsGroupPolicy::ReadWriteOnceWithFsType,
        pod_info_on_mount: false,
        attach_required: true,
    }
}

/// A CSIDriver object's spec as policy: absent fields take the API's
/// defaults (attachRequired true, podInfoOnMount false,
/// fsGroupPolicy ReadWriteOnceWithFSType); an fsGroupPolicy this version
/// does not know is the default, as kubelet treats it.
pub fn policy_of(spec: &k8s_openapi::api::storage::v1::CSIDriverSpec) -> DriverPolicy {
    DriverPolicy {
        fs_group_policy: match spec.fs_group_policy.as_deref() {
            Some("File") => FsGroupPolicy::File,
            Some("None") => FsGroupPolicy::None,
            _ => FsGroupPolicy::ReadWriteOnceWithFsType,
        },
        pod_info_on_mount: spec.pod_info_on_mount.unwrap_or(false),
        attach_required: spec.attach_required.unwrap_or(true),
    }
}

/// The publish_context of an attached volume, or why the node must wait
/// (kubelet's WaitForAttach: retried by the caller).
pub fn wait_attached(
    id: &str,
    driver: &str,
    handle: &str,
    node: &str,
    a: Option<&Attachment>,
) -> Result<BTreeMap<String, String>, String> {
    let Some(a) = a else {
        return Err(format!(
            "volume {handle:?} of driver {driver:?} is not attached to node {node:?} yet: VolumeAttachment {id} not found"
        ));
    };
    if a.deleting {
        return Err(format!("volume attachment {id} is being deleted"));
    }
    if a.attached {
        return Ok(a.metadata.clone());
    }
    Err(match &a.attach_error {
        Some(m) => format!("VolumeAttachment {id}: attach failed: {m}"),
        None => format!(
            "volume {handle:?} of driver {driver:?} is not attached to node {node:?} yet: VolumeAttachment {id} is not attached (the driver's external-attacher marks it)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csidriver_object_without_fields_takes_the_api_defaults() {
        let spec = k8s_openapi::api::storage::v1::CSIDriverSpec::default();
        assert_eq!(policy_of(&spec), without_object());
        let spec = k8s_openapi::api::storage::v1::CSIDriverSpec {
            attach_required: Some(false),
            pod_info_on_mount: Some(true),
            fs_group_policy: Some("File".into()),
            ..Default::default()
        };
        assert_eq!(
            policy_of(&spec),
            DriverPolicy {
                fs_group_policy: FsGroupPolicy::File,
                pod_info_on_mount: true,
                attach_required: false,
            }
        );
        let odd = k8s_openapi::api::storage::v1::CSIDriverSpec {
            fs_group_policy: Some("Sometimes".into()),
            ..Default::default()
        };
        assert_eq!(
            policy_of(&odd).fs_group_policy,
            FsGroupPolicy::ReadWriteOnceWithFsType
        );
    }

    #[test]
    fn only_an_attached_attachment_gives_its_metadata() {
        let w = |a: Option<&Attachment>| wait_attached("csi-1", "d", "h", "n1", a);
        assert!(
            w(None)
                .unwrap_err()
                .ends_with("VolumeAttachment csi-1 not found")
        );
        let mut a = Attachment::default();
        assert!(w(Some(&a)).unwrap_err().contains("is not attached"));
        a.attach_error = Some("rpc error: code = Internal desc = disk busy".into());
        assert_eq!(
            w(Some(&a)).unwrap_err(),
            "VolumeAttachment csi-1: attach failed: rpc error: code = Internal desc = disk busy"
        );
        a.attached = true;
        a.metadata.insert("devicePath".into(), "/dev/loop9".into());
        assert_eq!(w(Some(&a)).unwrap()["devicePath"], "/dev/loop9");
        a.deleting = true;
        assert_eq!(
            w(Some(&a)).unwrap_err(),
            "volume attachment csi-1 is being deleted"
        );
    }
}
