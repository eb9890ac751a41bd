//! The controller side of the registered CSI drivers, as the standalone
//! claim controller (`volume::provision`) asks for it: CreateVolume,
//! DeleteVolume, ControllerPublishVolume and ControllerUnpublishVolume,
//! with the capabilities the registry discovered. Only the translation
//! from minilet's requests to CSI messages lives here; the calls, their
//! timeouts and error codes are `CsiClient`'s.
//!
//! Side effects: the drivers' gRPC calls.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::node::hash_map;
use super::proto::csi;
use super::{CsiError, Registry};
use crate::volume::claims::Provision;
use crate::volume::provision::{CallError, CreatedVolume, Provisioner, Publish};

/// `Provisioner` over the registry's drivers.
pub struct Controller {
    registry: Arc<Registry>,
}

impl Controller {
    pub fn new(registry: Arc<Registry>) -> Self {
        Controller { registry }
    }
}

/// One VolumeCapability: a block device for `Block` volume mode, else a
/// mount with the fsType and mount flags; the access mode mapped as
/// kubelet maps it (for a driver without SINGLE_NODE_MULTI_WRITER).
pub fn capability(
    mode: &str,
    volume_mode: &str,
    fs_type: Option<&str>,
    mount_flags: &[String],
) -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
    let access_type = if volume_mode == "Block" {
        AccessType::Block(BlockVolume {})
    } else {
        AccessType::Mount(MountVolume {
            fs_type: fs_type.unwrap_or_default().to_string(),
            mount_flags: mount_flags.to_vec(),
            volume_mount_group: String::new(),
        })
    };
    csi::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(AccessMode {
            mode: crate::volume::csi::node::AccessMode::from_k8s(mode, false).map_or(
                csi::volume_capability::access_mode::Mode::Unknown,
                super::node::proto_mode,
            ) as i32,
        }),
    }
}

fn call_error(e: CsiError) -> CallError {
    CallError(crate::error_chain(&e))
}

fn map(m: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

impl Provisioner for Controller {
    fn can_provision(&self, driver: &str) -> bool {
        self.registry
            .info(driver)
            .is_some_and(|i| i.controller.create_delete_volume)
    }

    fn publish_node(&self, driver: &str) -> Option<String> {
        self.registry
            .info(driver)
            .filter(|i| i.controller.publish_unpublish_volume)
            .map(|i| i.node_id.clone())
    }

    fn create_volume<'a>(
        &'a self,
        req: &'a Provision,
    ) -> BoxFuture<'a, Result<CreatedVolume, CallError>> {
        Box::pin(async move {
            let (client, _) = self
                .registry
                .driver(&req.driver)
                .await
                .map_err(call_error)?;
            let capacity = i64::try_from(req.capacity).unwrap_or(i64::MAX);
            let answer = client
                .create_volume(csi::CreateVolumeRequest {
                    name: req.name.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: capacity,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: req
                        .access_modes
                        .iter()
                        .map(|m| {
                            capability(
                                m,
                                &req.volume_mode,
                                req.fs_type.as_deref(),
                                &req.mount_options,
                            )
                        })
                        .collect(),
                    parameters: hash_map(&req.parameters),
                    ..Default::default()
                })
                .await
                .map_err(call_error)?;
            let volume = answer.volume.ok_or_else(|| {
                CallError(format!(
                    "CSI driver {:?}: CreateVolume answered without a volume",
                    req.driver
                ))
            })?;
            Ok(CreatedVolume {
                volume_id: volume.volume_id,
                capacity: u64::try_from(volume.capacity_bytes).unwrap_or(0),
                volume_context: map(&volume.volume_context),
            })
        })
    }

    fn delete_volume<'a>(
        &'a self,
        driver: &'a str,
        volume_id: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async move {
            let (client, _) = self.registry.driver(driver).await.map_err(call_error)?;
            match client
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: volume_id.to_string(),
                    ..Default::default()
                })
                .await
            {
                Err(e) if !e.is_gone() => Err(call_error(e)),
                _ => Ok(()),
            }
        })
    }

    fn controller_publish<'a>(
        &'a self,
        req: &'a Publish,
    ) -> BoxFuture<'a, Result<BTreeMap<String, String>, CallError>> {
        Box::pin(async move {
            let (client, _) = self
                .registry
                .driver(&req.driver)
                .await
                .map_err(call_error)?;
            let mode = req.access_modes.first().map_or("ReadWriteOnce", |m| m);
            let answer = client
                .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                    volume_id: req.volume_id.clone(),
                    node_id: req.node_id.clone(),
                    volume_capability: Some(capability(
                        mode,
                        &req.volume_mode,
                        req.fs_type.as_deref(),
                        &req.mount_options,
                    )),
                    readonly: req.readonly,
                    volume_context: hash_map(&req.volume_context),
                    ..Default::default()
                })
                .await
                .map_err(call_error)?;
            Ok(map(&answer.publish_context))
        })
    }

    fn controller_unpublish<'a>(
        &'a self,
        driver: &'a str,
        volume_id: &'a str,
        node_id: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async move {
            let (client, _) = self.registry.driver(driver).await.map_err(call_error)?;
            match client
                .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                    volume_id: volume_id.to_string(),
                    node_id: node_id.to_string(),
                    ..Default::default()
                })
                .await
            {
                Err(e) if !e.is_gone() => Err(call_error(e)),
                _ => Ok(()),
            }
        })
    }
}
