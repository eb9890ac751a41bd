//! The node side of the registered CSI drivers, as the CSI volume plugin
//! (`volume::csi`) asks for it: capabilities from the registry's
//! discovery, and NodeStage/Unstage/Publish/Unpublish translated from the
//! plugin's request types to CSI messages, with `CsiError` mapped to the
//! plugin's `NodeError`. The calls themselves are `CsiClient`'s.
//!
//! Side effects: the drivers' gRPC calls.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::proto::csi;
use super::{CsiError, Registry};
use crate::volume::csi::node::{
    AccessMode, Call, Capabilities, NodeError, NodeService, PublishRequest, StageRequest,
    UnpublishRequest, UnstageRequest, VolumeCapability,
};

/// `NodeService` over the registry's drivers.
pub struct Nodes {
    registry: Arc<Registry>,
}

impl Nodes {
    pub fn new(registry: Arc<Registry>) -> Self {
        Nodes { registry }
    }

    async fn client(&self, driver: &str, call: Call) -> Result<super::CsiClient, NodeError> {
        match self.registry.driver(driver).await {
            Ok((client, _)) => Ok(client),
            Err(CsiError::UnknownDriver { .. }) => Err(NodeError::NotRegistered {
                driver: driver.to_string(),
                call,
            }),
            Err(e) => Err(node_error(driver, call, e)),
        }
    }
}

/// A client error as the volume plugin reports it.
fn node_error(driver: &str, call: Call, e: CsiError) -> NodeError {
    let driver = driver.to_string();
    match (&e, e.code()) {
        (
            CsiError::Rejected { message, .. } | CsiError::Unavailable { message, .. },
            Some(code),
        ) => NodeError::Rpc {
            driver,
            call,
            code,
            message: message.clone(),
        },
        (_, Some(code)) => NodeError::Rpc {
            driver,
            call,
            code,
            message: e.to_string(),
        },
        (CsiError::UnknownDriver { .. }, None) => NodeError::NotRegistered { driver, call },
        _ => NodeError::Other {
            driver,
            call,
            reason: e.to_string(),
        },
    }
}

/// CSI's access mode enum for ours.
pub fn proto_mode(mode: AccessMode) -> csi::volume_capability::access_mode::Mode {
    use csi::volume_capability::access_mode::Mode;
    match mode {
        AccessMode::SingleNodeWriter => Mode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
        AccessMode::MultiNodeReaderOnly => Mode::MultiNodeReaderOnly,
        AccessMode::MultiNodeSingleWriter => Mode::MultiNodeSingleWriter,
        AccessMode::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
        AccessMode::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
        AccessMode::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
    }
}

/// A mount VolumeCapability as CSI spells it.
pub fn proto_capability(c: &VolumeCapability) -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode as Am, AccessType, MountVolume};
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: c.fs_type.clone(),
            mount_flags: c.mount_flags.clone(),
            volume_mount_group: c.volume_mount_group.clone(),
        })),
        access_mode: Some(Am {
            mode: proto_mode(c.access_mode) as i32,
        }),
    }
}

/// A map as prost's `map<string, string>` fields hold it.
pub(super) fn hash_map(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl NodeService for Nodes {
    fn capabilities<'a>(
        &'a self,
        driver: &'a str,
    ) -> BoxFuture<'a, Result<Capabilities, NodeError>> {
        Box::pin(async move {
            let info = match self.registry.driver(driver).await {
                Ok((_, info)) => info,
                Err(CsiError::UnknownDriver { .. }) => {
                    return Err(NodeError::NotRegistered {
                        driver: driver.to_string(),
                        call: Call::NodeGetCapabilities,
                    });
                }
                Err(e) => return Err(node_error(driver, Call::NodeGetCapabilities, e)),
            };
            Ok(Capabilities {
                stage_unstage: info.node.stage_unstage_volume,
                single_node_multi_writer: info.node.single_node_multi_writer,
                volume_mount_group: info.node.volume_mount_group,
            })
        })
    }

    fn node_stage<'a>(
        &'a self,
        driver: &'a str,
        req: &'a StageRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            let call = Call::NodeStageVolume;
            let client = self.client(driver, call).await?;
            client
                .node_stage_volume(csi::NodeStageVolumeRequest {
                    volume_id: req.volume_id.clone(),
                    publish_context: hash_map(&req.publish_context),
                    staging_target_path: path(&req.staging_target_path),
                    volume_capability: Some(proto_capability(&req.volume_capability)),
                    secrets: hash_map(&req.secrets.0),
                    volume_context: hash_map(&req.volume_context),
                })
                .await
                .map(drop)
                .map_err(|e| node_error(driver, call, e))
        })
    }

    fn node_unstage<'a>(
        &'a self,
        driver: &'a str,
        req: &'a UnstageRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            let call = Call::NodeUnstageVolume;
            let client = self.client(driver, call).await?;
            client
                .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: req.volume_id.clone(),
                    staging_target_path: path(&req.staging_target_path),
                })
                .await
                .map(drop)
                .map_err(|e| node_error(driver, call, e))
        })
    }

    fn node_publish<'a>(
        &'a self,
        driver: &'a str,
        req: &'a PublishRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            let call = Call::NodePublishVolume;
            let client = self.client(driver, call).await?;
            client
                .node_publish_volume(csi::NodePublishVolumeRequest {
                    volume_id: req.volume_id.clone(),
                    publish_context: hash_map(&req.publish_context),
                    staging_target_path: req
                        .staging_target_path
                        .as_deref()
                        .map(path)
                        .unwrap_or_default(),
                    target_path: path(&req.target_path),
                    volume_capability: Some(proto_capability(&req.volume_capability)),
                    readonly: req.readonly,
                    secrets: hash_map(&req.secrets.0),
                    volume_context: hash_map(&req.volume_context),
                })
                .await
                .map(drop)
                .map_err(|e| node_error(driver, call, e))
        })
    }

    fn node_unpublish<'a>(
        &'a self,
        driver: &'a str,
        req: &'a UnpublishRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            let call = Call::NodeUnpublishVolume;
            let client = self.client(driver, call).await?;
            client
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: req.volume_id.clone(),
                    target_path: path(&req.target_path),
                })
                .await
                .map(drop)
                .map_err(|e| node_error(driver, call, e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn client_errors_read_as_grpc_errors_naming_driver_and_call() {
        let e = node_error(
            "d",
            Call::NodeStageVolume,
            CsiError::Rejected {
                driver: "d".into(),
                call: super::super::Call::NodeStageVolume,
                code: tonic::Code::FailedPrecondition,
                message: "not attached".into(),
            },
        );
        assert_eq!(
            e.to_string(),
            "rpc error: code = FailedPrecondition desc = not attached (NodeStageVolume to driver \"d\")"
        );
        let e = node_error(
            "d",
            Call::NodePublishVolume,
            CsiError::Timeout {
                driver: "d".into(),
                call: super::super::Call::NodePublishVolume,
                after: Duration::from_secs(2),
            },
        );
        assert!(
            matches!(
                e,
                NodeError::Rpc {
                    code: tonic::Code::DeadlineExceeded,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = node_error(
            "d",
            Call::NodePublishVolume,
            CsiError::UnknownDriver { driver: "d".into() },
        );
        assert!(matches!(e, NodeError::NotRegistered { .. }), "{e:?}");
    }
}
