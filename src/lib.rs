//! minilet: an all-in-one Kubernetes node agent.
//!
//! The crate is a library plus a thin binary (`src/main.rs`). Modules own one
//! concern each; side effects sit behind narrow traits (`cri::Runtime`,
//! `cni::exec::PluginExec`) so each module is testable with a hand-written fake.

pub mod agent;
pub mod api;
pub mod cli;
pub mod clock;
pub mod cni;
pub mod config;
pub mod control;
pub mod cri;
pub mod csi;
pub mod doctor;
pub mod eviction;
pub mod locks;
pub mod objects;
pub mod pod;
pub mod readiness;
pub mod sink;
pub mod socket;
pub mod source;
pub mod status;
pub mod volume;
pub mod yaml;

// The pod manager restarts a worker task that panicked: tokio catches the
// unwind and reports it on the task's handle. With panic = "abort" the same
// panic would end the whole agent, and every pod on the node with it.
#[cfg(panic = "abort")]
compile_error!(
    "minilet must be built with panic = \"unwind\": the pod manager restarts workers that panic"
);

/// An error and its causes on one line ("what: cause: cause"), for logs and
/// for the one-line messages people see.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Labels and annotations minilet puts on sandboxes and containers. The
/// `io.kubernetes.*` names are kubelet's, so tools (crictl, containerd's
/// `ctr`) see minilet's pods as they see kubelet's.
pub mod labels {
    pub const POD_NAME: &str = "io.kubernetes.pod.name";
    pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
    pub const POD_UID: &str = "io.kubernetes.pod.uid";
    pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
    /// kubelet's annotations on containers.
    pub const CONTAINER_HASH: &str = "io.kubernetes.container.hash";
    pub const CONTAINER_RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
    pub const CONTAINER_TERMINATION_MESSAGE_PATH: &str =
        "io.kubernetes.container.terminationMessagePath";
    pub const POD_TERMINATION_GRACE_PERIOD: &str = "io.kubernetes.pod.terminationGracePeriod";
    /// minilet's own: which node agent owns the object. An agent adopts only
    /// what carries its node name, so two agents can share one runtime.
    pub const MANAGED_BY_NODE: &str = "io.minilet.node";
    /// minilet's own: hash of the sandbox-shaping parts of the pod spec; a
    /// change means the sandbox must be recreated (kubelet: podSandboxChanged).
    pub const SANDBOX_HASH: &str = "io.minilet.sandbox-hash";
    /// minilet's own, on containers: whether the container is an init container.
    pub const CONTAINER_INIT: &str = "io.minilet.container.init";
}
