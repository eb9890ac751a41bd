//! The container runtime seam: a narrow trait over the CRI calls minilet
//! makes, the typed errors those calls return, and the real gRPC adapter
//! (`remote`). Unit tests use the hand-written fake in `fake`.
//!
//! Messages are CRI v1 types from the `k8s-cri` crate: they are the wire
//! contract, so the fake and the real adapter speak exactly what a runtime
//! would see. v1alpha2 runtimes are served by the adapter, not the trait.

pub mod bounded;
#[cfg(test)]
pub mod fake;
pub mod keyring;
pub mod remote;

use std::collections::HashMap;
use std::future::Future;

pub use k8s_cri::v1 as api;

/// Errors of CRI calls. tonic codes are mapped once, in `remote`.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// The runtime is unreachable, overloaded or too slow: retry later.
    #[error("{op}: runtime unavailable")]
    Unavailable {
        op: &'static str,
        #[source]
        source: tonic::Status,
    },
    /// The call exceeded runtimeRequestTimeout.
    #[error("{op}: timed out after {secs}s")]
    Timeout { op: &'static str, secs: u64 },
    /// The object is gone. Idempotent removals treat this as success.
    #[error("{op}: {id} not found")]
    NotFound { op: &'static str, id: String },
    /// The runtime refused the request; retrying the same request won't help.
    #[error("{op}: {message}")]
    Rejected {
        op: &'static str,
        message: String,
        #[source]
        source: tonic::Status,
    },
    /// The socket could not be dialled at all.
    #[error("cannot connect to {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The gRPC path built for a call is not a valid URI path (a bug: the
    /// names it is made of are constants).
    #[error("{op}: invalid gRPC method path {path:?}")]
    BadPath { op: &'static str, path: String },
    /// The endpoint string is not a `unix://` path.
    #[error("unsupported runtime endpoint {endpoint:?}: only unix:// sockets are supported")]
    BadEndpoint { endpoint: String },
}

impl CriError {
    /// Transient errors get the call retried with backoff.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CriError::Unavailable { .. } | CriError::Timeout { .. } | CriError::Connect { .. }
        )
    }
    pub fn is_not_found(&self) -> bool {
        matches!(self, CriError::NotFound { .. })
    }
    /// The runtime's own words, for a container's `message` in pod status.
    pub fn message(&self) -> String {
        match self {
            CriError::Rejected { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, CriError>;

/// Label selector for List calls: every pair must match.
pub type Labels = HashMap<String, String>;

/// The CRI calls minilet makes. Removals and stops are idempotent: NotFound
/// is reported as `CriError::NotFound`, and callers treat it as done.
pub trait Runtime: Send + Sync + 'static {
    /// The runtime's name and version, e.g. ("containerd", "1.6.20").
    fn version(&self) -> impl Future<Output = Result<(String, String)>> + Send;
    fn run_pod_sandbox(
        &self,
        config: api::PodSandboxConfig,
    ) -> impl Future<Output = Result<String>> + Send;
    fn stop_pod_sandbox(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    fn remove_pod_sandbox(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    fn pod_sandbox_status(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<api::PodSandboxStatus>> + Send;
    fn list_pod_sandboxes(
        &self,
        labels: Labels,
    ) -> impl Future<Output = Result<Vec<api::PodSandbox>>> + Send;
    fn create_container(
        &self,
        sandbox_id: &str,
        config: api::ContainerConfig,
        sandbox_config: api::PodSandboxConfig,
    ) -> impl Future<Output = Result<String>> + Send;
    fn start_container(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    /// Stop with a grace period in seconds, then SIGKILL (the runtime's job).
    fn stop_container(&self, id: &str, timeout: i64) -> impl Future<Output = Result<()>> + Send;
    fn remove_container(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    fn list_containers(
        &self,
        labels: Labels,
    ) -> impl Future<Output = Result<Vec<api::Container>>> + Send;
    fn container_status(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<api::ContainerStatus>> + Send;
    /// `Ok(None)` when the image is not present.
    fn image_status(&self, image: &str) -> impl Future<Output = Result<Option<api::Image>>> + Send;
    /// Returns the image reference the runtime resolved. `auth`: registry
    /// credentials (from the pod's imagePullSecrets, see `keyring`), or
    /// `None` for an anonymous pull.
    fn pull_image(
        &self,
        image: &str,
        auth: Option<api::AuthConfig>,
        sandbox_config: api::PodSandboxConfig,
    ) -> impl Future<Output = Result<String>> + Send;
}
