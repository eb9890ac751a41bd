//! The real CRI adapter: gRPC over a unix socket (tonic), CRI v1 with a
//! fallback to v1alpha2 for runtimes that only serve that.
//!
//! v1 was cut from v1alpha2 without renumbering any field, so the v1 message
//! types are sent unchanged on the v1alpha2 method paths; only the service
//! name in the path differs. Every call runs under runtimeRequestTimeout,
//! except PullImage which, as in kubelet, is a long-running request. tonic
//! status codes are mapped to `CriError` here and nowhere else.

use std::time::Duration;

use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::client::Grpc;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

use super::{CriError, Labels, Result, Runtime, api};

/// Which CRI API version the runtime answered to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiVersion {
    V1,
    V1alpha2,
}

impl ApiVersion {
    fn package(self) -> &'static str {
        match self {
            ApiVersion::V1 => "runtime.v1",
            ApiVersion::V1alpha2 => "runtime.v1alpha2",
        }
    }
}

#[derive(Clone, Copy)]
enum Service {
    Runtime,
    Image,
}

/// A CRI client for one runtime (and its image service).
#[derive(Clone)]
pub struct RemoteRuntime {
    runtime: Grpc<Channel>,
    image: Grpc<Channel>,
    api: ApiVersion,
    timeout: Duration,
}

fn socket_path(endpoint: &str) -> Result<String> {
    match endpoint.strip_prefix("unix://") {
        Some(path) if path.starts_with('/') => Ok(path.to_string()),
        _ => Err(CriError::BadEndpoint {
            endpoint: endpoint.to_string(),
        }),
    }
}

fn channel(endpoint: &str) -> Result<Channel> {
    let path = socket_path(endpoint)?;
    // The URI is a placeholder: the connector dials the socket. The channel
    // is lazy so a runtime restart is survived by reconnecting on next call.
    let channel = Endpoint::from_static("http://[::]:50051").connect_with_connector_lazy(
        tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }),
    );
    Ok(channel)
}

impl RemoteRuntime {
    /// Dial the runtime and image endpoints and find the API version the
    /// runtime speaks: v1 first, v1alpha2 when v1 is Unimplemented.
    pub async fn connect(
        runtime_endpoint: &str,
        image_endpoint: &str,
        timeout: Duration,
    ) -> Result<Self> {
        let runtime = Grpc::new(channel(runtime_endpoint)?);
        let image = Grpc::new(channel(image_endpoint)?);
        let mut client = RemoteRuntime {
            runtime,
            image,
            api: ApiVersion::V1,
            timeout,
        };
        match client.version_call().await {
            Ok(_) => {}
            Err(CriError::Rejected { source, .. }) if source.code() == Code::Unimplemented => {
                client.api = ApiVersion::V1alpha2;
                client.version_call().await?;
            }
            Err(e) => return Err(e),
        }
        Ok(client)
    }

    /// The CRI API version in use.
    pub fn api_version(&self) -> ApiVersion {
        self.api
    }

    async fn call<Req, Resp>(
        &self,
        service: Service,
        method: &'static str,
        request: Req,
        timeout: Option<Duration>,
    ) -> Result<Resp>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let (mut grpc, service_name) = match service {
            Service::Runtime => (self.runtime.clone(), "RuntimeService"),
            Service::Image => (self.image.clone(), "ImageService"),
        };
        let path = format!("/{}.{}/{}", self.api.package(), service_name, method);
        let path = PathAndQuery::try_from(path.as_str())
            .map_err(|_| CriError::BadPath { op: method, path })?;
        let fut = async move {
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(format!("runtime not ready: {e}")))?;
            let mut req = tonic::Request::new(request);
            if let Some(t) = timeout {
                req.set_timeout(t);
            }
            grpc.unary(req, path, tonic_prost::ProstCodec::default())
                .await
                .map(tonic::Response::into_inner)
        };
        let result = match timeout {
            Some(t) => match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(CriError::Timeout {
                        op: method,
                        secs: t.as_secs(),
                    });
                }
            },
            None => fut.await,
        };
        result.map_err(|status| map_status(method, status, self.timeout))
    }

    async fn version_call(&self) -> Result<api::VersionResponse> {
        self.call(
            Service::Runtime,
            "Version",
            api::VersionRequest {
                version: "v1".into(),
            },
            Some(self.timeout),
        )
        .await
    }
}

/// The one place tonic codes become `CriError`s.
pub fn map_status(op: &'static str, status: Status, timeout: Duration) -> CriError {
    match status.code() {
        Code::Unavailable | Code::ResourceExhausted | Code::Aborted => {
            CriError::Unavailable { op, source: status }
        }
        Code::DeadlineExceeded | Code::Cancelled => CriError::Timeout {
            op,
            secs: timeout.as_secs(),
        },
        Code::NotFound => CriError::NotFound {
            op,
            id: status.message().to_string(),
        },
        _ => CriError::Rejected {
            op,
            message: status.message().to_string(),
            source: status,
        },
    }
}

impl Runtime for RemoteRuntime {
    async fn version(&self) -> Result<(String, String)> {
        let v = self.version_call().await?;
        Ok((v.runtime_name, v.runtime_version))
    }

    async fn run_pod_sandbox(&self, config: api::PodSandboxConfig) -> Result<String> {
        let req = api::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        };
        let resp: api::RunPodSandboxResponse = self
            .call(Service::Runtime, "RunPodSandbox", req, Some(self.timeout))
            .await?;
        Ok(resp.pod_sandbox_id)
    }

    async fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
        let req = api::StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        let _: api::StopPodSandboxResponse = self
            .call(Service::Runtime, "StopPodSandbox", req, Some(self.timeout))
            .await?;
        Ok(())
    }

    async fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        let req = api::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        let _: api::RemovePodSandboxResponse = self
            .call(
                Service::Runtime,
                "RemovePodSandbox",
                req,
                Some(self.timeout),
            )
            .await?;
        Ok(())
    }

    async fn pod_sandbox_status(&self, id: &str) -> Result<api::PodSandboxStatus> {
        let req = api::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: false,
        };
        let resp: api::PodSandboxStatusResponse = self
            .call(
                Service::Runtime,
                "PodSandboxStatus",
                req,
                Some(self.timeout),
            )
            .await?;
        resp.status.ok_or(CriError::NotFound {
            op: "PodSandboxStatus",
            id: id.to_string(),
        })
    }

    async fn list_pod_sandboxes(&self, labels: Labels) -> Result<Vec<api::PodSandbox>> {
        let req = api::ListPodSandboxRequest {
            filter: Some(api::PodSandboxFilter {
                label_selector: labels,
                ..Default::default()
            }),
        };
        let resp: api::ListPodSandboxResponse = self
            .call(Service::Runtime, "ListPodSandbox", req, Some(self.timeout))
            .await?;
        Ok(resp.items)
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: api::ContainerConfig,
        sandbox_config: api::PodSandboxConfig,
    ) -> Result<String> {
        let req = api::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.to_string(),
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        };
        let resp: api::CreateContainerResponse = self
            .call(Service::Runtime, "CreateContainer", req, Some(self.timeout))
            .await?;
        Ok(resp.container_id)
    }

    async fn start_container(&self, id: &str) -> Result<()> {
        let req = api::StartContainerRequest {
            container_id: id.to_string(),
        };
        let _: api::StartContainerResponse = self
            .call(Service::Runtime, "StartContainer", req, Some(self.timeout))
            .await?;
        Ok(())
    }

    async fn stop_container(&self, id: &str, timeout: i64) -> Result<()> {
        let req = api::StopContainerRequest {
            container_id: id.to_string(),
            timeout,
        };
        // As kubelet: the call may legitimately take the whole grace period.
        let deadline = self.timeout + Duration::from_secs(timeout.max(0) as u64);
        let _: api::StopContainerResponse = self
            .call(Service::Runtime, "StopContainer", req, Some(deadline))
            .await?;
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<()> {
        let req = api::RemoveContainerRequest {
            container_id: id.to_string(),
        };
        let _: api::RemoveContainerResponse = self
            .call(Service::Runtime, "RemoveContainer", req, Some(self.timeout))
            .await?;
        Ok(())
    }

    async fn list_containers(&self, labels: Labels) -> Result<Vec<api::Container>> {
        let req = api::ListContainersRequest {
            filter: Some(api::ContainerFilter {
                label_selector: labels,
                ..Default::default()
            }),
        };
        let resp: api::ListContainersResponse = self
            .call(Service::Runtime, "ListContainers", req, Some(self.timeout))
            .await?;
        Ok(resp.containers)
    }

    async fn container_status(&self, id: &str) -> Result<api::ContainerStatus> {
        let req = api::ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        };
        let resp: api::ContainerStatusResponse = self
            .call(Service::Runtime, "ContainerStatus", req, Some(self.timeout))
            .await?;
        resp.status.ok_or(CriError::NotFound {
            op: "ContainerStatus",
            id: id.to_string(),
        })
    }

    async fn image_status(&self, image: &str) -> Result<Option<api::Image>> {
        let req = api::ImageStatusRequest {
            image: Some(api::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            verbose: false,
        };
        let resp: api::ImageStatusResponse = self
            .call(Service::Image, "ImageStatus", req, Some(self.timeout))
            .await?;
        Ok(resp.image)
    }

    async fn pull_image(
        &self,
        image: &str,
        auth: Option<api::AuthConfig>,
        sandbox_config: api::PodSandboxConfig,
    ) -> Result<String> {
        let req = api::PullImageRequest {
            image: Some(api::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            auth,
            sandbox_config: Some(sandbox_config),
        };
        // Long-running, as in kubelet: no runtimeRequestTimeout on pulls.
        let resp: api::PullImageResponse =
            self.call(Service::Image, "PullImage", req, None).await?;
        Ok(resp.image_ref)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime that only serves CRI v1alpha2 (Version and ListPodSandbox),
    /// over a real unix socket: everything else is Unimplemented.
    #[derive(Clone)]
    struct AlphaOnly;

    impl tonic::server::NamedService for AlphaOnly {
        const NAME: &'static str = "runtime.v1alpha2.RuntimeService";
    }

    struct Unary<F>(F);

    impl<Req, Resp, F> tonic::server::UnaryService<Req> for Unary<F>
    where
        F: Fn(Req) -> Resp,
        Resp: Send + 'static,
    {
        type Response = Resp;
        type Future = std::future::Ready<std::result::Result<tonic::Response<Resp>, Status>>;
        fn call(&mut self, req: tonic::Request<Req>) -> Self::Future {
            std::future::ready(Ok(tonic::Response::new((self.0)(req.into_inner()))))
        }
    }

    impl tower::Service<http::Request<tonic::body::Body>> for AlphaOnly {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future =
            futures::future::BoxFuture<'static, std::result::Result<Self::Response, Self::Error>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::result::Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
            Box::pin(async move {
                Ok(match req.uri().path() {
                    "/runtime.v1alpha2.RuntimeService/Version" => {
                        let svc = Unary(|_: api::VersionRequest| api::VersionResponse {
                            runtime_name: "alpha".into(),
                            runtime_version: "0.1".into(),
                            ..Default::default()
                        });
                        tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                            .unary(svc, req)
                            .await
                    }
                    "/runtime.v1alpha2.RuntimeService/ListPodSandbox" => {
                        let svc =
                            Unary(
                                |_: api::ListPodSandboxRequest| api::ListPodSandboxResponse {
                                    items: vec![api::PodSandbox {
                                        id: "sb1".into(),
                                        ..Default::default()
                                    }],
                                },
                            );
                        tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                            .unary(svc, req)
                            .await
                    }
                    _ => Status::unimplemented("not here").into_http(),
                })
            })
        }
    }

    #[tokio::test]
    async fn falls_back_to_v1alpha2_when_v1_is_unimplemented() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cri.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let incoming = futures::stream::unfold(listener, |l| async move {
            Some((l.accept().await.map(|(s, _)| s), l))
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AlphaOnly)
                .serve_with_incoming(incoming),
        );
        let endpoint = format!("unix://{}", path.display());
        let rt = RemoteRuntime::connect(&endpoint, &endpoint, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(rt.api_version(), ApiVersion::V1alpha2);
        assert_eq!(
            rt.version().await.unwrap(),
            ("alpha".to_string(), "0.1".to_string())
        );
        let items = rt.list_pod_sandboxes(Labels::new()).await.unwrap();
        assert_eq!(
            items[0].id, "sb1",
            "v1 messages decode from v1alpha2 replies"
        );
        let err = rt.stop_pod_sandbox("x").await.unwrap_err();
        assert!(!err.is_retryable(), "Unimplemented is permanent: {err}");
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_retryable_error() {
        let err = RemoteRuntime::connect(
            "unix:///nonexistent/cri.sock",
            "unix:///nonexistent/cri.sock",
            Duration::from_secs(2),
        )
        .await
        .err()
        .expect("no runtime there");
        assert!(err.is_retryable(), "{err}");
    }

    #[test]
    fn endpoints_must_be_unix_sockets() {
        assert_eq!(socket_path("unix:///run/c.sock").unwrap(), "/run/c.sock");
        for bad in ["tcp://1.2.3.4:5", "/run/c.sock", "unix://relative"] {
            assert!(
                matches!(socket_path(bad), Err(CriError::BadEndpoint { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn status_codes_map_once() {
        let t = Duration::from_secs(2);
        let cases = [
            (Code::Unavailable, true, false),
            (Code::DeadlineExceeded, true, false),
            (Code::NotFound, false, true),
            (Code::InvalidArgument, false, false),
            (Code::Unknown, false, false),
        ];
        for (code, retry, nf) in cases {
            let e = map_status("X", Status::new(code, "m"), t);
            assert_eq!(e.is_retryable(), retry, "{code:?}");
            assert_eq!(e.is_not_found(), nf, "{code:?}");
        }
    }
}
