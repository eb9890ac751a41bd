//! The gRPC client for one CSI driver, over its unix socket.
//!
//! One lazy tonic channel per driver: nothing is dialled until the first
//! call, and a driver that restarts is redialled on the next call. Dialling
//! is bounded by the connect timeout; every call by a per-call deadline,
//! sent to the driver as grpc-timeout and enforced here too, so a hung
//! driver costs at most that long. Statuses become `CsiError` in
//! `error.rs`, nowhere else. Side effects: connects to the driver's socket.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

use super::error::{Call, CsiError};
use super::proto::csi;
use super::proto::csi::controller_client::ControllerClient;
use super::proto::csi::identity_client::IdentityClient;
use super::proto::csi::node_client::NodeClient;

/// How long dialling and calls may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Dialling the socket.
    pub connect: Duration,
    /// Calls that only ask (GetPluginInfo, Probe, the capability and info
    /// calls, registration): a healthy driver answers these at once.
    pub info: Duration,
    /// Calls that do work (create, publish, stage and their undo, stats):
    /// kubelet's csiTimeout, 2 minutes.
    pub operation: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            info: Duration::from_secs(10),
            operation: Duration::from_secs(120),
        }
    }
}

impl Timeouts {
    /// The deadline for one call.
    pub fn for_call(&self, call: Call) -> Duration {
        match call {
            Call::GetPluginInfo
            | Call::GetPluginCapabilities
            | Call::Probe
            | Call::ControllerGetCapabilities
            | Call::NodeGetCapabilities
            | Call::NodeGetInfo
            | Call::GetInfo
            | Call::NotifyRegistrationStatus => self.info,
            _ => self.operation,
        }
    }
}

/// The socket path of an endpoint written `unix:///path` or `/path`;
/// `None` for anything else (relative paths, other schemes).
pub fn socket_path(endpoint: &str) -> Option<PathBuf> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    path.starts_with('/').then(|| PathBuf::from(path))
}

/// A lazy channel to a unix socket: dialled on first use, redialled after
/// the peer goes away, each dial bounded by `connect`.
pub(crate) fn unix_channel(path: &Path, connect: Duration) -> Channel {
    let path = path.to_path_buf();
    // The URI is a placeholder: the connector dials the socket.
    Endpoint::from_static("http://localhost").connect_with_connector_lazy(tower::service_fn(
        move |_: Uri| {
            let path = path.clone();
            async move {
                match tokio::time::timeout(connect, UnixStream::connect(&path)).await {
                    Ok(stream) => Ok(TokioIo::new(stream?)),
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connecting to {} timed out", path.display()),
                    )),
                }
            }
        },
    ))
}

/// Runs one call under its deadline and maps the outcome. `who` names the
/// peer in errors (a driver name, or a registration socket).
pub(crate) async fn run_call<T>(
    who: &str,
    call: Call,
    deadline: Duration,
    fut: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<T, CsiError> {
    let started = tokio::time::Instant::now();
    let timeout = || CsiError::Timeout {
        driver: who.to_string(),
        call,
        after: deadline,
    };
    match tokio::time::timeout(deadline, fut).await {
        Err(_) => Err(timeout()),
        // The channel enforces the request's grpc-timeout too, and reports
        // it as Cancelled ("Timeout expired"): the same deadline ran out.
        Ok(Err(status))
            if status.code() == tonic::Code::Cancelled
                && started.elapsed() + Duration::from_millis(20) >= deadline =>
        {
            Err(timeout())
        }
        Ok(Err(status)) => Err(CsiError::from_status(who, call, &status)),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}

/// A request carrying its deadline, so the driver can give up too.
pub(crate) fn with_deadline<T>(message: T, deadline: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline);
    request
}

/// A client for one CSI driver. Cheap to clone (the channel is shared).
#[derive(Clone, Debug)]
pub struct CsiClient {
    driver: String,
    endpoint: String,
    channel: Channel,
    timeouts: Timeouts,
}

/// One typed wrapper per RPC: client type, method, request, response.
macro_rules! rpc {
    ($(#[$doc:meta])* $fn:ident, $client:ident, $call:ident, $req:ty, $resp:ty) => {
        $(#[$doc])*
        pub async fn $fn(&self, request: $req) -> Result<$resp, CsiError> {
            let deadline = self.timeouts.for_call(Call::$call);
            let mut client = $client::new(self.channel.clone());
            run_call(
                &self.driver,
                Call::$call,
                deadline,
                client.$fn(with_deadline(request, deadline)),
            )
            .await
        }
    };
}

impl CsiClient {
    /// A client for `driver` at `endpoint` (`unix:///path` or `/path`).
    /// Does not dial: the first call does.
    pub fn new(driver: &str, endpoint: &str, timeouts: Timeouts) -> Result<CsiClient, CsiError> {
        let path = socket_path(endpoint).ok_or_else(|| CsiError::BadEndpoint {
            driver: driver.to_string(),
            endpoint: endpoint.to_string(),
        })?;
        Ok(CsiClient {
            driver: driver.to_string(),
            endpoint: endpoint.to_string(),
            channel: unix_channel(&path, timeouts.connect),
            timeouts,
        })
    }

    /// The driver's name, as it is known to the registry.
    pub fn driver(&self) -> &str {
        &self.driver
    }

    /// The endpoint as given.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The timeouts in force.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    rpc!(
        /// Identity: the driver's name, version and manifest.
        get_plugin_info, IdentityClient, GetPluginInfo,
        csi::GetPluginInfoRequest, csi::GetPluginInfoResponse
    );
    rpc!(
        /// Identity: which services (Controller, topology) the plugin offers.
        get_plugin_capabilities, IdentityClient, GetPluginCapabilities,
        csi::GetPluginCapabilitiesRequest, csi::GetPluginCapabilitiesResponse
    );
    rpc!(
        /// Identity: whether the plugin is ready (unset `ready` means yes).
        probe, IdentityClient, Probe, csi::ProbeRequest, csi::ProbeResponse
    );
    rpc!(
        /// Controller: create (or find, by name) a volume.
        create_volume, ControllerClient, CreateVolume,
        csi::CreateVolumeRequest, csi::CreateVolumeResponse
    );
    rpc!(
        /// Controller: delete a volume (gone already counts as done).
        delete_volume, ControllerClient, DeleteVolume,
        csi::DeleteVolumeRequest, csi::DeleteVolumeResponse
    );
    rpc!(
        /// Controller: attach a volume to a node.
        controller_publish_volume, ControllerClient, ControllerPublishVolume,
        csi::ControllerPublishVolumeRequest, csi::ControllerPublishVolumeResponse
    );
    rpc!(
        /// Controller: detach a volume from a node.
        controller_unpublish_volume, ControllerClient, ControllerUnpublishVolume,
        csi::ControllerUnpublishVolumeRequest, csi::ControllerUnpublishVolumeResponse
    );
    rpc!(
        /// Controller: which controller RPCs the plugin serves.
        controller_get_capabilities, ControllerClient, ControllerGetCapabilities,
        csi::ControllerGetCapabilitiesRequest, csi::ControllerGetCapabilitiesResponse
    );
    rpc!(
        /// Node: mount the volume at its node-global staging path.
        node_stage_volume, NodeClient, NodeStageVolume,
        csi::NodeStageVolumeRequest, csi::NodeStageVolumeResponse
    );
    rpc!(
        /// Node: undo NodeStageVolume.
        node_unstage_volume, NodeClient, NodeUnstageVolume,
        csi::NodeUnstageVolumeRequest, csi::NodeUnstageVolumeResponse
    );
    rpc!(
        /// Node: make the volume available at a pod's target path.
        node_publish_volume, NodeClient, NodePublishVolume,
        csi::NodePublishVolumeRequest, csi::NodePublishVolumeResponse
    );
    rpc!(
        /// Node: undo NodePublishVolume.
        node_unpublish_volume, NodeClient, NodeUnpublishVolume,
        csi::NodeUnpublishVolumeRequest, csi::NodeUnpublishVolumeResponse
    );
    rpc!(
        /// Node: usage (bytes, inodes) of a published volume.
        node_get_volume_stats, NodeClient, NodeGetVolumeStats,
        csi::NodeGetVolumeStatsRequest, csi::NodeGetVolumeStatsResponse
    );
    rpc!(
        /// Node: which node RPCs the plugin serves (STAGE_UNSTAGE_VOLUME...).
        node_get_capabilities, NodeClient, NodeGetCapabilities,
        csi::NodeGetCapabilitiesRequest, csi::NodeGetCapabilitiesResponse
    );
    rpc!(
        /// Node: the driver's node id, volume limit and topology.
        node_get_info, NodeClient, NodeGetInfo,
        csi::NodeGetInfoRequest, csi::NodeGetInfoResponse
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_absolute_unix_paths() {
        assert_eq!(
            socket_path("unix:///run/csi.sock"),
            Some(PathBuf::from("/run/csi.sock"))
        );
        assert_eq!(
            socket_path("/run/csi.sock"),
            Some(PathBuf::from("/run/csi.sock"))
        );
        assert_eq!(socket_path("unix://run/csi.sock"), None);
        assert_eq!(socket_path("run/csi.sock"), None);
        assert_eq!(socket_path("tcp://127.0.0.1:1"), None);
        assert_eq!(socket_path(""), None);
    }

    #[test]
    fn info_calls_get_the_short_deadline() {
        let t = Timeouts::default();
        assert_eq!(t.for_call(Call::Probe), t.info);
        assert_eq!(t.for_call(Call::NodeStageVolume), t.operation);
        assert!(CsiClient::new("a.csi", "relative.sock", t).is_err());
    }
}

#[cfg(test)]
mod rpc_tests {
    use std::time::Instant;

    use tonic::Code;

    use super::super::fake::{FakeDriver, Fault, serve_driver};
    use super::*;

    fn quick(operation: Duration) -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(1),
            info: Duration::from_secs(2),
            operation,
        }
    }

    /// A fake block-storage driver in a temp dir and a client for it.
    async fn start(operation: Duration) -> (tempfile::TempDir, FakeDriver, CsiClient) {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeDriver::block_storage("a.csi");
        let sock = serve_driver(dir.path(), fake.clone()).await;
        let endpoint = format!("unix://{}", sock.display());
        let client = CsiClient::new("a.csi", &endpoint, quick(operation)).unwrap();
        (dir, fake, client)
    }

    fn stage_request() -> csi::NodeStageVolumeRequest {
        csi::NodeStageVolumeRequest {
            volume_id: "vol-1".into(),
            staging_target_path: "/var/lib/minilet/plugins/kubernetes.io/csi/a.csi/x/globalmount"
                .into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn calls_reach_the_driver_and_answers_come_back() {
        let (_dir, fake, client) = start(Duration::from_secs(2)).await;
        client.node_stage_volume(stage_request()).await.unwrap();
        let stats = client
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest::default())
            .await
            .unwrap();
        assert_eq!(stats.usage[0].used, 20);
        let created = client
            .create_volume(csi::CreateVolumeRequest {
                name: "pvc-1".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(created.volume.unwrap().volume_id, "vol-pvc-1");
        assert_eq!(
            fake.calls(),
            ["NodeStageVolume", "NodeGetVolumeStats", "CreateVolume"]
        );
    }

    #[tokio::test]
    async fn driver_errors_map_to_typed_errors() {
        let (_dir, fake, client) = start(Duration::from_secs(2)).await;
        fake.fault(
            "NodePublishVolume",
            Fault::Fail(Code::FailedPrecondition, "not staged"),
        );
        fake.fault(
            "NodeStageVolume",
            Fault::Fail(Code::ResourceExhausted, "too many"),
        );
        fake.fault(
            "NodeUnpublishVolume",
            Fault::Fail(Code::NotFound, "no such volume"),
        );
        let e = client
            .node_publish_volume(csi::NodePublishVolumeRequest::default())
            .await
            .unwrap_err();
        assert!(e.is_failed_precondition() && !e.retryable(), "{e}");
        assert_eq!(e.call(), Some(Call::NodePublishVolume));
        let e = client.node_stage_volume(stage_request()).await.unwrap_err();
        assert!(e.retryable(), "{e}");
        let e = client
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest::default())
            .await
            .unwrap_err();
        assert!(e.is_gone(), "{e}");
    }

    #[tokio::test]
    async fn a_hanging_driver_times_out() {
        let (_dir, fake, client) = start(Duration::from_millis(300)).await;
        fake.fault("NodeStageVolume", Fault::Hang);
        let started = Instant::now();
        let e = client.node_stage_volume(stage_request()).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            matches!(
                e,
                CsiError::Timeout {
                    call: Call::NodeStageVolume,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.retryable());
        // The channel still works for the next call.
        client
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_missing_socket_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let client = CsiClient::new(
            "a.csi",
            dir.path().join("nobody.sock").to_str().unwrap(),
            quick(Duration::from_secs(2)),
        )
        .unwrap();
        let e = client.probe(csi::ProbeRequest {}).await.unwrap_err();
        assert!(
            matches!(
                e,
                CsiError::Unavailable {
                    call: Call::Probe,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.retryable());
    }
}
