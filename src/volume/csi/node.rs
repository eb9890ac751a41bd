//! The driver seam of the CSI volume plugin: the node-side CSI calls it
//! makes (NodeGetCapabilities, NodeStage/Unstage, NodePublish/Unpublish),
//! in our own request types mirroring the CSI messages' fields, and the
//! typed error a call fails with. The gRPC client (`crate::csi`) is
//! adapted to `NodeService` where the agent is wired; tests use
//! `super::fake`.
//!
//! Side effects: none here (implementations talk to drivers).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use futures::future::BoxFuture;

/// The CSI calls this plugin makes, named as the spec names the RPCs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Call {
    NodeGetCapabilities,
    NodeStageVolume,
    NodeUnstageVolume,
    NodePublishVolume,
    NodeUnpublishVolume,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A node call that failed, with the driver and call it was.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum NodeError {
    /// The driver answered with a gRPC status (transport failures are
    /// `Unavailable`, timeouts `DeadlineExceeded`, as gRPC reports them).
    /// Worded as kubelet's events quote gRPC errors, then who said it.
    #[error("rpc error: code = {code:?} desc = {message} ({call} to driver {driver:?})")]
    Rpc {
        driver: String,
        call: Call,
        code: tonic::Code,
        message: String,
    },
    /// Anything else a client reports without a gRPC status (a bad
    /// endpoint, an answer the spec does not allow).
    #[error("{reason} ({call} to driver {driver:?})")]
    Other {
        driver: String,
        call: Call,
        reason: String,
    },
    /// No driver of that name is registered with the agent (kubelet's words).
    #[error("driver name {driver} not found in the list of registered CSI drivers")]
    NotRegistered { driver: String, call: Call },
}

impl NodeError {
    /// The spec's NotFound: the volume is unknown to the driver. For the
    /// undo calls (unpublish, unstage) that means there is nothing to undo.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            NodeError::Rpc {
                code: tonic::Code::NotFound,
                ..
            }
        )
    }
}

/// What NodeGetCapabilities says the plugin needs to know.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// STAGE_UNSTAGE_VOLUME: stage once per node at the global path.
    pub stage_unstage: bool,
    /// SINGLE_NODE_MULTI_WRITER: kubelet then maps ReadWriteOnce to
    /// SINGLE_NODE_MULTI_WRITER and ReadWriteOncePod to SINGLE_NODE_SINGLE_WRITER.
    pub single_node_multi_writer: bool,
    /// VOLUME_MOUNT_GROUP: the driver applies fsGroup itself (passed as
    /// `volume_mount_group`), so the agent does not chown.
    pub volume_mount_group: bool,
}

/// A CSIDriver object's `fsGroupPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FsGroupPolicy {
    /// Change ownership only when fsType is set and the volume is ReadWriteOnce.
    #[default]
    ReadWriteOnceWithFsType,
    /// Always change ownership.
    File,
    /// Never change ownership.
    None,
}

/// What a CSIDriver object says about a driver, for the node side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverPolicy {
    pub fs_group_policy: FsGroupPolicy,
    /// `podInfoOnMount`: add the pod's name, namespace, uid and service
    /// account to NodePublishVolume's volume_context.
    pub pod_info_on_mount: bool,
    /// `attachRequired`: a persistent volume waits for its
    /// VolumeAttachment to be attached before NodeStage (API server mode).
    pub attach_required: bool,
}

impl Default for DriverPolicy {
    /// Standalone there is no CSIDriver object to ask, so pod info is
    /// always passed (drivers that do not want it ignore unknown keys);
    /// kubelet's default fsGroupPolicy; nothing to wait for (the claim
    /// binder makes ControllerPublishVolume itself).
    fn default() -> Self {
        DriverPolicy {
            fs_group_policy: FsGroupPolicy::default(),
            pod_info_on_mount: true,
            attach_required: false,
        }
    }
}

/// CSI's VolumeCapability.AccessMode.Mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// kubelet's mapping of a Kubernetes access mode (`asCSIAccessModeV1`
    /// and its SINGLE_NODE_MULTI_WRITER-capable twin); `None` for an
    /// unknown mode.
    pub fn from_k8s(mode: &str, single_node_multi_writer: bool) -> Option<AccessMode> {
        Some(match (mode, single_node_multi_writer) {
            ("ReadWriteOnce", false) => AccessMode::SingleNodeWriter,
            ("ReadWriteOnce", true) => AccessMode::SingleNodeMultiWriter,
            ("ReadOnlyMany", _) => AccessMode::MultiNodeReaderOnly,
            ("ReadWriteMany", _) => AccessMode::MultiNodeMultiWriter,
            // Drivers without SINGLE_NODE_MULTI_WRITER know no single-writer mode.
            ("ReadWriteOncePod", false) => AccessMode::SingleNodeWriter,
            ("ReadWriteOncePod", true) => AccessMode::SingleNodeSingleWriter,
            _ => return None,
        })
    }
}

/// CSI's VolumeCapability for a mounted (filesystem) volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeCapability {
    pub access_mode: AccessMode,
    /// Empty: the driver's default.
    pub fs_type: String,
    pub mount_flags: Vec<String>,
    /// The fsGroup, when the driver has VOLUME_MOUNT_GROUP; else empty.
    pub volume_mount_group: String,
}

/// Secrets passed to a call; never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(pub BTreeMap<String, String>);

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secrets({} keys)", self.0.len())
    }
}

/// NodeStageVolumeRequest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageRequest {
    pub volume_id: String,
    pub publish_context: BTreeMap<String, String>,
    pub staging_target_path: PathBuf,
    pub volume_capability: VolumeCapability,
    pub secrets: Secrets,
    pub volume_context: BTreeMap<String, String>,
}

/// NodeUnstageVolumeRequest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnstageRequest {
    pub volume_id: String,
    pub staging_target_path: PathBuf,
}

/// NodePublishVolumeRequest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishRequest {
    pub volume_id: String,
    pub publish_context: BTreeMap<String, String>,
    /// Set iff the driver has STAGE_UNSTAGE_VOLUME.
    pub staging_target_path: Option<PathBuf>,
    pub target_path: PathBuf,
    pub volume_capability: VolumeCapability,
    pub readonly: bool,
    pub secrets: Secrets,
    pub volume_context: BTreeMap<String, String>,
}

/// NodeUnpublishVolumeRequest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnpublishRequest {
    pub volume_id: String,
    pub target_path: PathBuf,
}

/// The node service of the registered CSI drivers, by driver name.
pub trait NodeService: Send + Sync {
    /// NodeGetCapabilities (implementations may cache it per registration).
    fn capabilities<'a>(
        &'a self,
        driver: &'a str,
    ) -> BoxFuture<'a, Result<Capabilities, NodeError>>;
    /// The driver's CSIDriver object's policy (API server mode); the
    /// default is what a node with no CSIDriver object uses.
    fn policy<'a>(&'a self, _driver: &'a str) -> BoxFuture<'a, Result<DriverPolicy, NodeError>> {
        Box::pin(async { Ok(DriverPolicy::default()) })
    }
    fn node_stage<'a>(
        &'a self,
        driver: &'a str,
        req: &'a StageRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>>;
    fn node_unstage<'a>(
        &'a self,
        driver: &'a str,
        req: &'a UnstageRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>>;
    fn node_publish<'a>(
        &'a self,
        driver: &'a str,
        req: &'a PublishRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>>;
    fn node_unpublish<'a>(
        &'a self,
        driver: &'a str,
        req: &'a UnpublishRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_modes_map_as_kubelet_maps_them() {
        use AccessMode::*;
        let table = [
            ("ReadWriteOnce", false, Some(SingleNodeWriter)),
            ("ReadWriteOnce", true, Some(SingleNodeMultiWriter)),
            ("ReadOnlyMany", false, Some(MultiNodeReaderOnly)),
            ("ReadWriteMany", true, Some(MultiNodeMultiWriter)),
            ("ReadWriteOncePod", false, Some(SingleNodeWriter)),
            ("ReadWriteOncePod", true, Some(SingleNodeSingleWriter)),
            ("Bogus", false, None),
        ];
        for (mode, snmw, want) in table {
            assert_eq!(AccessMode::from_k8s(mode, snmw), want, "{mode} {snmw}");
        }
    }

    #[test]
    fn errors_read_like_kubelet_and_hide_secrets() {
        let e = NodeError::Rpc {
            driver: "d.example".into(),
            call: Call::NodeStageVolume,
            code: tonic::Code::Unavailable,
            message: "connection refused".into(),
        };
        assert_eq!(
            e.to_string(),
            "rpc error: code = Unavailable desc = connection refused (NodeStageVolume to driver \"d.example\")"
        );
        assert!(!e.is_not_found());
        let s = Secrets([("password".to_string(), "hunter2".to_string())].into());
        assert_eq!(format!("{s:?}"), "Secrets(1 keys)");
    }
}
