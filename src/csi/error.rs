//! The errors of talking to a CSI driver, and the one place gRPC status
//! codes are mapped to them (`CsiError::from_status`).
//!
//! Every variant names the driver and the call. Whether to retry follows
//! the CSI spec's error tables and kubelet's `isFinalError`: a call that
//! ran out of time, or that the driver answered Unavailable,
//! DeadlineExceeded, ResourceExhausted, Aborted ("an operation is pending
//! for this volume") or Cancelled may succeed if sent again unchanged, with
//! backoff; InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
//! OutOfRange and Unimplemented need the caller (or the world) to change
//! something first. Side effects: none.

use std::fmt;
use std::time::Duration;

use tonic::{Code, Status};

/// The CSI (and registration) RPCs minilet makes, named as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    GetPluginInfo,
    GetPluginCapabilities,
    Probe,
    CreateVolume,
    DeleteVolume,
    ControllerPublishVolume,
    ControllerUnpublishVolume,
    ControllerGetCapabilities,
    NodeStageVolume,
    NodeUnstageVolume,
    NodePublishVolume,
    NodeUnpublishVolume,
    NodeGetVolumeStats,
    NodeGetCapabilities,
    NodeGetInfo,
    /// pluginregistration.Registration/GetInfo.
    GetInfo,
    /// pluginregistration.Registration/NotifyRegistrationStatus.
    NotifyRegistrationStatus,
}

impl Call {
    /// The RPC's method name.
    pub fn name(self) -> &'static str {
        match self {
            Call::GetPluginInfo => "GetPluginInfo",
            Call::GetPluginCapabilities => "GetPluginCapabilities",
            Call::Probe => "Probe",
            Call::CreateVolume => "CreateVolume",
            Call::DeleteVolume => "DeleteVolume",
            Call::ControllerPublishVolume => "ControllerPublishVolume",
            Call::ControllerUnpublishVolume => "ControllerUnpublishVolume",
            Call::ControllerGetCapabilities => "ControllerGetCapabilities",
            Call::NodeStageVolume => "NodeStageVolume",
            Call::NodeUnstageVolume => "NodeUnstageVolume",
            Call::NodePublishVolume => "NodePublishVolume",
            Call::NodeUnpublishVolume => "NodeUnpublishVolume",
            Call::NodeGetVolumeStats => "NodeGetVolumeStats",
            Call::NodeGetCapabilities => "NodeGetCapabilities",
            Call::NodeGetInfo => "NodeGetInfo",
            Call::GetInfo => "GetInfo",
            Call::NotifyRegistrationStatus => "NotifyRegistrationStatus",
        }
    }

    /// Calls that undo something (detach, unmount, delete): for these a
    /// NotFound from the driver means there is nothing left to undo.
    pub fn is_teardown(self) -> bool {
        matches!(
            self,
            Call::DeleteVolume
                | Call::ControllerUnpublishVolume
                | Call::NodeUnstageVolume
                | Call::NodeUnpublishVolume
        )
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A failed call to a CSI driver (or to a registration socket, where
/// `driver` is the socket path).
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// The endpoint is not an absolute unix socket path.
    #[error(
        "CSI driver {driver}: endpoint {endpoint:?} is not a unix socket (unix:///path or /path)"
    )]
    BadEndpoint { driver: String, endpoint: String },
    /// No driver of that name is configured or registered.
    #[error("CSI driver {driver} is not registered")]
    UnknownDriver { driver: String },
    /// A plugin registration for a name minilet's `csiDrivers` lists.
    #[error(
        "CSI driver {driver} is configured in csiDrivers; a plugin registration of that name is refused"
    )]
    Configured { driver: String },
    /// No answer within the call's timeout (a hung or overloaded driver).
    #[error("CSI driver {driver}: {call} timed out after {after:?}")]
    Timeout {
        driver: String,
        call: Call,
        after: Duration,
    },
    /// The driver is not there (socket missing, connection refused) or
    /// answered UNAVAILABLE.
    #[error("CSI driver {driver}: {call}: unavailable: {message}")]
    Unavailable {
        driver: String,
        call: Call,
        message: String,
    },
    /// The driver answered with an error code; `retryable` and the helpers
    /// below say what the code means for this call.
    #[error("CSI driver {driver}: {call} failed: {code:?}: {message}")]
    Rejected {
        driver: String,
        call: Call,
        code: Code,
        message: String,
    },
    /// The driver answered OK with something the spec does not allow (e.g.
    /// GetPluginInfo naming another driver, NodeGetInfo without node_id).
    #[error("CSI driver {driver}: {call}: {reason}")]
    BadAnswer {
        driver: String,
        call: Call,
        reason: String,
    },
}

impl CsiError {
    /// The one mapping from a gRPC status to our error.
    pub fn from_status(driver: &str, call: Call, status: &Status) -> CsiError {
        // A connection that could not be made shows as Unavailable with the
        // transport error as its message.
        let message = status.message().to_string();
        match status.code() {
            Code::Unavailable => CsiError::Unavailable {
                driver: driver.to_string(),
                call,
                message,
            },
            code => CsiError::Rejected {
                driver: driver.to_string(),
                call,
                code,
                message,
            },
        }
    }

    /// The driver's name (or the registration socket's path).
    pub fn driver(&self) -> &str {
        match self {
            CsiError::BadEndpoint { driver, .. }
            | CsiError::UnknownDriver { driver }
            | CsiError::Configured { driver }
            | CsiError::Timeout { driver, .. }
            | CsiError::Unavailable { driver, .. }
            | CsiError::Rejected { driver, .. }
            | CsiError::BadAnswer { driver, .. } => driver,
        }
    }

    /// The call that failed, when one was made.
    pub fn call(&self) -> Option<Call> {
        match self {
            CsiError::BadEndpoint { .. }
            | CsiError::UnknownDriver { .. }
            | CsiError::Configured { .. } => None,
            CsiError::Timeout { call, .. }
            | CsiError::Unavailable { call, .. }
            | CsiError::Rejected { call, .. }
            | CsiError::BadAnswer { call, .. } => Some(*call),
        }
    }

    /// The gRPC code the driver answered with, if it answered with one
    /// (a client-side timeout counts as DeadlineExceeded).
    pub fn code(&self) -> Option<Code> {
        match self {
            CsiError::Timeout { .. } => Some(Code::DeadlineExceeded),
            CsiError::Unavailable { .. } => Some(Code::Unavailable),
            CsiError::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether sending the same request again, after a backoff, may
    /// succeed without anything else changing (kubelet's "not final").
    /// CSI calls are idempotent, so retrying one that may have been carried
    /// out is safe. Unknown drivers are retryable too: a registration may
    /// be on its way.
    pub fn retryable(&self) -> bool {
        match self {
            CsiError::Timeout { .. } | CsiError::Unavailable { .. } => true,
            CsiError::UnknownDriver { .. } => true,
            CsiError::Rejected { code, .. } => matches!(
                code,
                Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted | Code::Cancelled
            ),
            CsiError::BadEndpoint { .. }
            | CsiError::BadAnswer { .. }
            | CsiError::Configured { .. } => false,
        }
    }

    /// NotFound: the volume (or node, or content source) does not exist.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(Code::NotFound)
    }

    /// A NotFound answer to a teardown call (DeleteVolume,
    /// ControllerUnpublishVolume, NodeUnstageVolume, NodeUnpublishVolume):
    /// the thing to undo is already gone, which a level-triggered caller
    /// may count as done.
    pub fn is_gone(&self) -> bool {
        self.is_not_found() && self.call().is_some_and(Call::is_teardown)
    }

    /// FailedPrecondition: the call came in the wrong order or state
    /// (publish before stage, volume in use, published to another node).
    pub fn is_failed_precondition(&self) -> bool {
        self.code() == Some(Code::FailedPrecondition)
    }

    /// AlreadyExists: a volume of that name, or a publish at that path,
    /// exists with other, incompatible parameters.
    pub fn is_already_exists(&self) -> bool {
        self.code() == Some(Code::AlreadyExists)
    }

    /// Unimplemented: the driver does not serve this call (e.g. no
    /// Controller service on this endpoint).
    pub fn is_unimplemented(&self) -> bool {
        self.code() == Some(Code::Unimplemented)
    }

    /// A short reason for pod status and events ("NodeStageVolume: Unavailable").
    pub fn reason(&self) -> String {
        match (self.call(), self.code()) {
            (Some(call), Some(code)) => format!("{call}: {code:?}"),
            (Some(call), None) => call.to_string(),
            (None, _) => "CSIDriverUnknown".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_retryable_per_the_spec() {
        let cases = [
            (Code::Unavailable, true),
            (Code::DeadlineExceeded, true),
            (Code::ResourceExhausted, true),
            (Code::Aborted, true),
            (Code::Cancelled, true),
            (Code::InvalidArgument, false),
            (Code::NotFound, false),
            (Code::AlreadyExists, false),
            (Code::FailedPrecondition, false),
            (Code::OutOfRange, false),
            (Code::Unimplemented, false),
            (Code::Internal, false),
            (Code::Unknown, false),
        ];
        for (code, want) in cases {
            let e =
                CsiError::from_status("a.csi", Call::NodeStageVolume, &Status::new(code, "nope"));
            assert_eq!(e.retryable(), want, "{code:?}");
            assert_eq!(e.code(), Some(code));
            assert_eq!(e.driver(), "a.csi");
            assert_eq!(e.call(), Some(Call::NodeStageVolume));
        }
    }

    #[test]
    fn messages_name_driver_call_and_code() {
        let e = CsiError::from_status(
            "a.csi",
            Call::NodePublishVolume,
            &Status::failed_precondition("volume not staged"),
        );
        assert_eq!(
            e.to_string(),
            "CSI driver a.csi: NodePublishVolume failed: FailedPrecondition: volume not staged"
        );
        assert!(e.is_failed_precondition());
        assert_eq!(e.reason(), "NodePublishVolume: FailedPrecondition");
        let t = CsiError::Timeout {
            driver: "a.csi".into(),
            call: Call::Probe,
            after: Duration::from_secs(2),
        };
        assert_eq!(t.to_string(), "CSI driver a.csi: Probe timed out after 2s");
        assert!(t.retryable());
    }

    #[test]
    fn not_found_is_gone_only_for_teardown_calls() {
        let nf = |call| CsiError::from_status("a.csi", call, &Status::not_found("no such volume"));
        assert!(nf(Call::NodeUnpublishVolume).is_gone());
        assert!(nf(Call::NodeUnstageVolume).is_gone());
        assert!(nf(Call::DeleteVolume).is_gone());
        assert!(nf(Call::ControllerUnpublishVolume).is_gone());
        assert!(!nf(Call::NodeStageVolume).is_gone());
        assert!(nf(Call::NodeStageVolume).is_not_found());
        let other = CsiError::from_status(
            "a.csi",
            Call::NodeUnpublishVolume,
            &Status::internal("boom"),
        );
        assert!(!other.is_gone());
    }
}
