//! Test fakes (cfg(test)): an in-process CSI driver serving Identity, Node
//! and Controller, and a registration server like node-driver-registrar's,
//! each on a unix socket in a temp dir. They record the calls they get and
//! can be told to fail or hang one. Side effects: binds sockets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::net::UnixListener;
use tonic::transport::Server;
use tonic::{Code, Request, Response, Status};

use super::proto::csi;
use super::proto::csi::controller_server::{Controller, ControllerServer};
use super::proto::csi::identity_server::{Identity, IdentityServer};
use super::proto::csi::node_server::{Node, NodeServer};
use super::proto::registration as reg;
use super::proto::registration::registration_server::{Registration, RegistrationServer};

/// What to do instead of answering a call.
#[derive(Clone, Debug)]
pub enum Fault {
    Fail(Code, &'static str),
    /// Never answer.
    Hang,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<String>,
    faults: BTreeMap<String, Fault>,
}

/// A scripted CSI driver.
#[derive(Clone, Debug)]
pub struct FakeDriver {
    name: String,
    controller: bool,
    stage: bool,
    state: Arc<Mutex<State>>,
}

impl FakeDriver {
    /// Like the test driver: Controller with create/delete and
    /// publish/unpublish, Node with stage/unstage and stats.
    pub fn block_storage(name: &str) -> FakeDriver {
        FakeDriver {
            name: name.to_string(),
            controller: true,
            stage: true,
            state: Arc::default(),
        }
    }

    /// Node service only, no staging (like a hostpath driver).
    pub fn node_only(name: &str) -> FakeDriver {
        FakeDriver {
            controller: false,
            stage: false,
            ..FakeDriver::block_storage(name)
        }
    }

    /// Makes `call` fail or hang from now on.
    pub fn fault(&self, call: &str, fault: Fault) {
        self.state
            .lock()
            .unwrap()
            .faults
            .insert(call.to_string(), fault);
    }

    /// The calls received, in order.
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    async fn enter(&self, call: &str) -> Result<(), Status> {
        let fault = {
            let mut s = self.state.lock().unwrap();
            s.calls.push(call.to_string());
            s.faults.get(call).cloned()
        };
        match fault {
            None => Ok(()),
            Some(Fault::Fail(code, msg)) => Err(Status::new(code, msg)),
            Some(Fault::Hang) => {
                std::future::pending::<()>().await;
                Ok(())
            }
        }
    }
}

fn ok<T>(t: T) -> Result<Response<T>, Status> {
    Ok(Response::new(t))
}

#[tonic::async_trait]
impl Identity for FakeDriver {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        self.enter("GetPluginInfo").await?;
        ok(csi::GetPluginInfoResponse {
            name: self.name.clone(),
            vendor_version: "0.1.0".into(),
            manifest: Default::default(),
        })
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::{Service, Type, service};
        self.enter("GetPluginCapabilities").await?;
        let service = |t: service::Type| csi::PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        let mut capabilities = vec![service(service::Type::VolumeAccessibilityConstraints)];
        if self.controller {
            capabilities.push(service(service::Type::ControllerService));
        }
        ok(csi::GetPluginCapabilitiesResponse { capabilities })
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        self.enter("Probe").await?;
        ok(csi::ProbeResponse { ready: None })
    }
}

#[tonic::async_trait]
impl Node for FakeDriver {
    async fn node_stage_volume(
        &self,
        _: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        self.enter("NodeStageVolume").await?;
        ok(csi::NodeStageVolumeResponse {})
    }

    async fn node_unstage_volume(
        &self,
        _: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        self.enter("NodeUnstageVolume").await?;
        ok(csi::NodeUnstageVolumeResponse {})
    }

    async fn node_publish_volume(
        &self,
        _: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        self.enter("NodePublishVolume").await?;
        ok(csi::NodePublishVolumeResponse {})
    }

    async fn node_unpublish_volume(
        &self,
        _: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        self.enter("NodeUnpublishVolume").await?;
        ok(csi::NodeUnpublishVolumeResponse {})
    }

    async fn node_get_volume_stats(
        &self,
        _: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        self.enter("NodeGetVolumeStats").await?;
        ok(csi::NodeGetVolumeStatsResponse {
            usage: vec![csi::VolumeUsage {
                available: 10,
                total: 30,
                used: 20,
                unit: csi::volume_usage::Unit::Bytes as i32,
            }],
            volume_condition: None,
        })
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::{Rpc, Type, rpc};
        self.enter("NodeGetCapabilities").await?;
        let cap = |t: rpc::Type| csi::NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        };
        let mut capabilities = vec![cap(rpc::Type::GetVolumeStats)];
        if self.stage {
            capabilities.push(cap(rpc::Type::StageUnstageVolume));
        }
        ok(csi::NodeGetCapabilitiesResponse { capabilities })
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        self.enter("NodeGetInfo").await?;
        ok(csi::NodeGetInfoResponse {
            node_id: "node-1".into(),
            max_volumes_per_node: 16,
            accessible_topology: Some(csi::Topology {
                segments: [("topology.minilet.io/node".to_string(), "node-1".to_string())]
                    .into_iter()
                    .collect(),
            }),
        })
    }
}

#[tonic::async_trait]
impl Controller for FakeDriver {
    async fn create_volume(
        &self,
        r: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        self.enter("CreateVolume").await?;
        let r = r.into_inner();
        ok(csi::CreateVolumeResponse {
            volume: Some(csi::Volume {
                capacity_bytes: r.capacity_range.map_or(0, |c| c.required_bytes),
                volume_id: format!("vol-{}", r.name),
                ..Default::default()
            }),
        })
    }

    async fn delete_volume(
        &self,
        _: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        self.enter("DeleteVolume").await?;
        ok(csi::DeleteVolumeResponse {})
    }

    async fn controller_publish_volume(
        &self,
        _: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        self.enter("ControllerPublishVolume").await?;
        ok(csi::ControllerPublishVolumeResponse::default())
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        self.enter("ControllerUnpublishVolume").await?;
        ok(csi::ControllerUnpublishVolumeResponse {})
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::{Rpc, Type, rpc};
        self.enter("ControllerGetCapabilities").await?;
        let cap = |t: rpc::Type| csi::ControllerServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        };
        ok(csi::ControllerGetCapabilitiesResponse {
            capabilities: vec![
                cap(rpc::Type::CreateDeleteVolume),
                cap(rpc::Type::PublishUnpublishVolume),
            ],
        })
    }
}

/// Accepts connections on a listener for tonic.
fn incoming(
    listener: UnixListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::UnixStream>> {
    futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| s);
        Some((next, l))
    })
}

/// Serves `fake` at `<dir>/csi.sock` until the test's runtime ends.
pub async fn serve_driver(dir: &Path, fake: FakeDriver) -> PathBuf {
    let path = dir.join("csi.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let router = Server::builder()
        .add_service(IdentityServer::new(fake.clone()))
        .add_service(NodeServer::new(fake.clone()))
        .add_service(ControllerServer::new(fake));
    tokio::spawn(router.serve_with_incoming(incoming(listener)));
    path
}

/// A registration server like node-driver-registrar's, recording the
/// statuses it is told.
#[derive(Clone, Debug)]
pub struct FakeRegistrar {
    pub info: reg::PluginInfo,
    pub statuses: Arc<Mutex<Vec<reg::RegistrationStatus>>>,
}

impl FakeRegistrar {
    pub fn csi(name: &str, endpoint: &Path) -> FakeRegistrar {
        FakeRegistrar {
            info: reg::PluginInfo {
                r#type: "CSIPlugin".into(),
                name: name.to_string(),
                endpoint: endpoint.display().to_string(),
                supported_versions: vec!["1.0.0".into()],
            },
            statuses: Arc::default(),
        }
    }

    pub fn statuses(&self) -> Vec<reg::RegistrationStatus> {
        self.statuses.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl Registration for FakeRegistrar {
    async fn get_info(
        &self,
        _: Request<reg::InfoRequest>,
    ) -> Result<Response<reg::PluginInfo>, Status> {
        ok(self.info.clone())
    }

    async fn notify_registration_status(
        &self,
        r: Request<reg::RegistrationStatus>,
    ) -> Result<Response<reg::RegistrationStatusResponse>, Status> {
        self.statuses.lock().unwrap().push(r.into_inner());
        ok(reg::RegistrationStatusResponse {})
    }
}

/// Serves `registrar` at `path`; the returned handle stops it when aborted.
pub fn serve_registrar(path: &Path, registrar: FakeRegistrar) -> tokio::task::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    let router = Server::builder().add_service(RegistrationServer::new(registrar));
    tokio::spawn(async move {
        let _ = router.serve_with_incoming(incoming(listener)).await;
    })
}
