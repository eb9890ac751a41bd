//! The gRPC adapter: CSI Identity, Controller and Node over the rules in
//! `driver`, and kubelet's plugin Registration service. Every call goes
//! through one door (`Csi::call`): the fault file is consulted, the work
//! runs on a blocking thread, the result is mapped to a gRPC status and
//! the call is recorded in calls.jsonl.
//!
//! Side effects: those of `driver`, `faults` and `record`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::backend::Backend;
use crate::driver::{
    Capability, ControllerPublishRequest, CreateRequest, Driver, DriverError, PublishRequest,
    StageRequest,
};
use crate::faults::Faults;
use crate::proto::csi::{self as pb, volume_capability};
use crate::proto::registration as reg;
use crate::record::{Call, Recorder, now_ms};

pub const VENDOR_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The CSI services of one driver process.
pub struct Csi<B> {
    driver: Arc<Driver<B>>,
    faults: Faults,
    recorder: Arc<Recorder>,
}

/// What a call names, for its record.
#[derive(Default)]
struct Ids {
    volume_id: String,
    name: String,
    node_id: String,
    staging_path: String,
    target_path: String,
    pod: String,
}

impl Ids {
    fn volume(mut self, id: &str) -> Ids {
        self.volume_id = id.to_string();
        self
    }
    fn name(mut self, name: &str) -> Ids {
        self.name = name.to_string();
        self
    }
    fn node(mut self, node: &str) -> Ids {
        self.node_id = node.to_string();
        self
    }
    fn staging(mut self, path: &str) -> Ids {
        self.staging_path = path.to_string();
        self
    }
    fn target(mut self, path: &str) -> Ids {
        self.target_path = path.to_string();
        self
    }
    /// The pod a publish is for, when the CO passes pod info.
    fn pod(mut self, context: &HashMap<String, String>) -> Ids {
        self.pod = context.get(POD_NAME_KEY).cloned().unwrap_or_default();
        self
    }
}

/// volume_context key of the pod's name (podInfoOnMount, ephemeral volumes).
const POD_NAME_KEY: &str = "csi.storage.k8s.io/pod.name";

/// Records the call as Cancelled if it is dropped unanswered (the client
/// gave up, e.g. on a hung call).
struct Pending {
    call: Option<Call>,
    recorder: Arc<Recorder>,
}

impl Pending {
    fn finish(mut self, status: Option<&Status>) {
        if let Some(mut call) = self.call.take() {
            set_result(&mut call, status);
            self.recorder.record(&call);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut call) = self.call.take() {
            set_result(
                &mut call,
                Some(&Status::cancelled("the client went away before the answer")),
            );
            self.recorder.record(&call);
        }
    }
}

fn set_result(call: &mut Call, status: Option<&Status>) {
    call.end_ms = now_ms();
    match status {
        None => call.code = "OK".into(),
        Some(s) => {
            call.code = format!("{:?}", s.code());
            call.message = s.message().to_string();
        }
    }
}

/// The status for a rule's error: its code, and the whole cause chain.
fn status_of(e: &DriverError) -> Status {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    Status::new(e.code(), msg)
}

fn path_str(p: &str) -> PathBuf {
    PathBuf::from(p)
}

fn sorted(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

/// The rules' view of a VolumeCapability; None when it or its access type
/// or mode is missing (all REQUIRED).
fn capability(c: Option<&pb::VolumeCapability>) -> Option<Capability> {
    use pb::volume_capability::access_mode::Mode;
    let c = c?;
    let mode = c.access_mode.as_ref()?.mode;
    let reader_only =
        mode == Mode::SingleNodeReaderOnly as i32 || mode == Mode::MultiNodeReaderOnly as i32;
    match c.access_type.as_ref()? {
        volume_capability::AccessType::Block(_) => Some(Capability {
            block: true,
            reader_only,
            ..Capability::default()
        }),
        volume_capability::AccessType::Mount(m) => Some(Capability {
            block: false,
            fs_type: m.fs_type.clone(),
            mount_flags: m.mount_flags.clone(),
            reader_only,
        }),
    }
}

impl<B: Backend> Csi<B> {
    pub fn new(driver: Arc<Driver<B>>, recorder: Arc<Recorder>) -> Csi<B> {
        Csi {
            faults: Faults::new(&driver.config.state_dir),
            driver,
            recorder,
        }
    }

    /// The one door of every call: fault, work (blocking), status, record.
    async fn call<T, F>(
        &self,
        method: &'static str,
        ids: Ids,
        work: F,
    ) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Driver<B>) -> Result<T, DriverError> + Send + 'static,
    {
        let pending = Pending {
            call: Some(Call {
                method: method.to_string(),
                volume_id: ids.volume_id,
                name: ids.name,
                node_id: ids.node_id,
                staging_path: ids.staging_path,
                target_path: ids.target_path,
                pod: ids.pod,
                start_ms: now_ms(),
                ..Call::default()
            }),
            recorder: self.recorder.clone(),
        };
        let hit = self.faults.take(method);
        if let Some(hang) = hit.as_ref().and_then(|h| h.hang) {
            tracing::info!(method, ?hang, "injected hang");
            tokio::time::sleep(hang).await;
        }
        let (before, after) = match hit.and_then(|h| h.fail.map(|f| (f, h.after))) {
            Some((f, true)) => (None, Some(f)),
            Some((f, false)) => (Some(f), None),
            None => (None, None),
        };
        let result = match before {
            Some((code, msg)) => Err(Status::new(code, msg)),
            None => {
                let driver = self.driver.clone();
                match tokio::task::spawn_blocking(move || work(&driver)).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(e)) => Err(status_of(&e)),
                    Err(e) => Err(Status::internal(format!("{method} panicked: {e}"))),
                }
            }
        };
        let result = match (result, after) {
            (Ok(_), Some((code, msg))) => Err(Status::new(code, msg)),
            (r, _) => r,
        };
        match &result {
            Ok(_) => tracing::debug!(method, "ok"),
            Err(s) => tracing::info!(method, code = ?s.code(), message = s.message(), "failed"),
        }
        pending.finish(result.as_ref().err());
        result.map(Response::new)
    }
}

#[tonic::async_trait]
impl<B: Backend> pb::identity_server::Identity for Csi<B> {
    async fn get_plugin_info(
        &self,
        _: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        self.call("GetPluginInfo", Ids::default(), |d| {
            Ok(pb::GetPluginInfoResponse {
                name: d.config.name.clone(),
                vendor_version: VENDOR_VERSION.into(),
                manifest: Default::default(),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        use pb::plugin_capability::{Service, Type, service};
        self.call("GetPluginCapabilities", Ids::default(), |_| {
            Ok(pb::GetPluginCapabilitiesResponse {
                capabilities: vec![pb::PluginCapability {
                    r#type: Some(Type::Service(Service {
                        r#type: service::Type::ControllerService as i32,
                    })),
                }],
            })
        })
        .await
    }

    async fn probe(
        &self,
        _: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        self.call("Probe", Ids::default(), |_| {
            Ok(pb::ProbeResponse { ready: Some(true) })
        })
        .await
    }
}

#[tonic::async_trait]
impl<B: Backend> pb::controller_server::Controller for Csi<B> {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        let range = r.capacity_range.unwrap_or_default();
        let caps: Vec<Option<Capability>> = r
            .volume_capabilities
            .iter()
            .map(|c| capability(Some(c)))
            .collect();
        let ids = Ids::default().name(&r.name);
        self.call("CreateVolume", ids, move |d| {
            if caps.iter().any(Option::is_none) {
                return Err(DriverError::Missing {
                    field: "volume_capabilities[].access_type/access_mode",
                });
            }
            let (Ok(required_bytes), Ok(limit_bytes)) = (
                u64::try_from(range.required_bytes),
                u64::try_from(range.limit_bytes),
            ) else {
                return Err(DriverError::Invalid {
                    field: "capacity_range",
                    reason: "negative".into(),
                });
            };
            let v = d.create_volume(&CreateRequest {
                name: r.name,
                required_bytes,
                limit_bytes,
                parameters: sorted(r.parameters),
                capabilities: caps.into_iter().flatten().collect(),
            })?;
            Ok(pb::CreateVolumeResponse {
                volume: Some(pb::Volume {
                    capacity_bytes: i64::try_from(v.capacity_bytes).unwrap_or(i64::MAX),
                    volume_id: v.id,
                    volume_context: Default::default(),
                    content_source: None,
                    accessible_topology: vec![],
                }),
            })
        })
        .await
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        let ids = Ids::default().volume(&r.volume_id);
        self.call("DeleteVolume", ids, move |d| {
            d.delete_volume(&r.volume_id)?;
            Ok(pb::DeleteVolumeResponse {})
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        req: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let ids = Ids::default().volume(&r.volume_id).node(&r.node_id);
        let enabled = self.driver.config.publish_unpublish;
        self.call("ControllerPublishVolume", ids, move |d| {
            if !enabled {
                return Err(DriverError::Unimplemented {
                    what: "ControllerPublishVolume (started with --publish-unpublish=false)",
                });
            }
            let context = d.controller_publish(&ControllerPublishRequest {
                capability: capability(r.volume_capability.as_ref()),
                volume_id: r.volume_id,
                node_id: r.node_id,
                read_only: r.readonly,
            })?;
            Ok(pb::ControllerPublishVolumeResponse {
                publish_context: context.into_iter().collect(),
            })
        })
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let ids = Ids::default().volume(&r.volume_id).node(&r.node_id);
        let enabled = self.driver.config.publish_unpublish;
        self.call("ControllerUnpublishVolume", ids, move |d| {
            if !enabled {
                return Err(DriverError::Unimplemented {
                    what: "ControllerUnpublishVolume (started with --publish-unpublish=false)",
                });
            }
            d.controller_unpublish(&r.volume_id, &r.node_id)?;
            Ok(pb::ControllerUnpublishVolumeResponse {})
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use pb::controller_service_capability::{Rpc, Type, rpc};
        self.call("ControllerGetCapabilities", Ids::default(), |d| {
            let mut types = vec![rpc::Type::CreateDeleteVolume];
            if d.config.publish_unpublish {
                types.push(rpc::Type::PublishUnpublishVolume);
            }
            Ok(pb::ControllerGetCapabilitiesResponse {
                capabilities: types
                    .into_iter()
                    .map(|t| pb::ControllerServiceCapability {
                        r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
                    })
                    .collect(),
            })
        })
        .await
    }
}

#[tonic::async_trait]
impl<B: Backend> pb::node_server::Node for Csi<B> {
    async fn node_stage_volume(
        &self,
        req: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let ids = Ids::default()
            .volume(&r.volume_id)
            .staging(&r.staging_target_path);
        self.call("NodeStageVolume", ids, move |d| {
            d.node_stage(&StageRequest {
                capability: capability(r.volume_capability.as_ref()),
                staging_path: path_str(&r.staging_target_path),
                volume_id: r.volume_id,
                publish_context: sorted(r.publish_context),
            })?;
            Ok(pb::NodeStageVolumeResponse {})
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        req: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let ids = Ids::default()
            .volume(&r.volume_id)
            .staging(&r.staging_target_path);
        self.call("NodeUnstageVolume", ids, move |d| {
            d.node_unstage(&r.volume_id, &path_str(&r.staging_target_path))?;
            Ok(pb::NodeUnstageVolumeResponse {})
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let ids = Ids::default()
            .volume(&r.volume_id)
            .staging(&r.staging_target_path)
            .target(&r.target_path)
            .pod(&r.volume_context);
        self.call("NodePublishVolume", ids, move |d| {
            d.node_publish(&PublishRequest {
                capability: capability(r.volume_capability.as_ref()),
                staging_path: path_str(&r.staging_target_path),
                target_path: path_str(&r.target_path),
                volume_id: r.volume_id,
                read_only: r.readonly,
                volume_context: sorted(r.volume_context),
            })?;
            Ok(pb::NodePublishVolumeResponse {})
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let ids = Ids::default().volume(&r.volume_id).target(&r.target_path);
        self.call("NodeUnpublishVolume", ids, move |d| {
            d.node_unpublish(&r.volume_id, &path_str(&r.target_path))?;
            Ok(pb::NodeUnpublishVolumeResponse {})
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        use pb::volume_usage::Unit;
        let r = req.into_inner();
        let ids = Ids::default().volume(&r.volume_id).target(&r.volume_path);
        self.call("NodeGetVolumeStats", ids, move |d| {
            let u = d.volume_stats(&r.volume_id, &path_str(&r.volume_path))?;
            let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            Ok(pb::NodeGetVolumeStatsResponse {
                usage: vec![
                    pb::VolumeUsage {
                        available: i(u.available_bytes),
                        total: i(u.total_bytes),
                        used: i(u.used_bytes),
                        unit: Unit::Bytes as i32,
                    },
                    pb::VolumeUsage {
                        available: i(u.free_inodes),
                        total: i(u.total_inodes),
                        used: i(u.used_inodes),
                        unit: Unit::Inodes as i32,
                    },
                ],
                volume_condition: None,
            })
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::{Rpc, Type, rpc};
        self.call("NodeGetCapabilities", Ids::default(), |_| {
            Ok(pb::NodeGetCapabilitiesResponse {
                capabilities: [rpc::Type::StageUnstageVolume, rpc::Type::GetVolumeStats]
                    .into_iter()
                    .map(|t| pb::NodeServiceCapability {
                        r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        self.call("NodeGetInfo", Ids::default(), |d| {
            Ok(pb::NodeGetInfoResponse {
                node_id: d.config.node_id.clone(),
                max_volumes_per_node: 0,
                accessible_topology: None,
            })
        })
        .await
    }
}

/// kubelet's plugin Registration service, as node-driver-registrar serves it.
pub struct Registration {
    pub name: String,
    /// The CSI socket the kubelet should dial.
    pub endpoint: String,
    pub recorder: Arc<Recorder>,
}

#[tonic::async_trait]
impl reg::registration_server::Registration for Registration {
    async fn get_info(
        &self,
        _: Request<reg::InfoRequest>,
    ) -> Result<Response<reg::PluginInfo>, Status> {
        tracing::info!("registration: GetInfo");
        let now = now_ms();
        self.recorder.record(&Call {
            method: "GetInfo".into(),
            code: "OK".into(),
            start_ms: now,
            end_ms: now,
            ..Call::default()
        });
        Ok(Response::new(reg::PluginInfo {
            r#type: "CSIPlugin".into(),
            name: self.name.clone(),
            endpoint: self.endpoint.clone(),
            supported_versions: vec!["1.0.0".into()],
        }))
    }

    async fn notify_registration_status(
        &self,
        req: Request<reg::RegistrationStatus>,
    ) -> Result<Response<reg::RegistrationStatusResponse>, Status> {
        let s = req.into_inner();
        if s.plugin_registered {
            tracing::info!("registration: the kubelet registered this driver");
        } else {
            tracing::warn!(
                error = s.error,
                "registration: the kubelet refused this driver"
            );
        }
        let now = now_ms();
        self.recorder.record(&Call {
            method: "NotifyRegistrationStatus".into(),
            code: "OK".into(),
            message: if s.plugin_registered {
                "registered".into()
            } else {
                format!("not registered: {}", s.error)
            },
            start_ms: now,
            end_ms: now,
            ..Call::default()
        });
        Ok(Response::new(reg::RegistrationStatusResponse {}))
    }
}
