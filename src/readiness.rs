//! The agent's readiness: whether it has caught up with the node since it
//! started. Ready means the container runtime is connected, the sources'
//! first snapshot is applied, the first relist of the runtime succeeded, and
//! every worker known at that relist (pods the sources want and pods the
//! runtime holds) has finished its first reconcile. Until then a restarted
//! agent has not yet looked at what runs, so "nothing changed" proves
//! nothing; after it, it does. Ready latches: it says that start-up is over,
//! not that the runtime still answers.
//!
//! Also counts relists and worker restarts, so callers can wait for "the
//! agent looked again" instead of sleeping. Written by the agent, the
//! manager and the workers; read through the control socket
//! (`minilet get ready`). No side effects besides one log line.

use std::collections::BTreeSet;
use std::sync::Mutex;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};

use crate::locks::lock;

/// What `minilet get ready` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub ready: bool,
    /// When the agent became ready.
    pub ready_since: Option<Time>,
    pub runtime_connected: bool,
    /// The sources' first snapshot has been applied.
    pub sources_synced: bool,
    /// Successful relists since the agent started.
    pub relists: u64,
    /// Uids of the pods the runtime held at the first successful relist:
    /// what a restarted agent found and adopted.
    pub first_relist_pods: Vec<String>,
    /// Uids of workers that have not finished their first reconcile.
    pub pending_pods: Vec<String>,
    /// Workers that died (panicked or aborted) and were started again.
    pub worker_restarts: u64,
}

impl AgentStatus {
    /// Why the agent is not ready yet; empty once it is.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        if self.ready {
            return vec![];
        }
        let mut out = vec![];
        if !self.runtime_connected {
            out.push("container runtime not connected".to_string());
        }
        if !self.sources_synced {
            out.push("sources not synced".to_string());
        }
        if self.relists == 0 {
            out.push("no relist yet".to_string());
        }
        if !self.pending_pods.is_empty() {
            out.push(format!(
                "{} pod(s) not reconciled yet: {}",
                self.pending_pods.len(),
                self.pending_pods.join(", ")
            ));
        }
        out
    }
}

/// The shared, mutable readiness state.
#[derive(Default)]
pub struct Readiness {
    inner: Mutex<AgentStatusInner>,
}

#[derive(Default)]
struct AgentStatusInner {
    status: AgentStatus,
    pending: BTreeSet<String>,
}

impl Readiness {
    pub fn runtime_connected(&self) {
        self.update(|s| s.status.runtime_connected = true);
    }
    pub fn sources_synced(&self) {
        self.update(|s| s.status.sources_synced = true);
    }
    /// A relist succeeded and found pods with these uids.
    pub fn relisted(&self, uids: impl IntoIterator<Item = String>) {
        self.update(|s| {
            if s.status.relists == 0 {
                s.status.first_relist_pods = uids.into_iter().collect();
            }
            s.status.relists += 1;
        });
    }
    /// A worker started and has not reconciled yet.
    pub fn worker_started(&self, uid: &str) {
        self.update(|s| {
            s.pending.insert(uid.to_string());
        });
    }
    /// A worker finished its first reconcile (or ended before it could).
    pub fn worker_synced(&self, uid: &str) {
        self.update(|s| {
            s.pending.remove(uid);
        });
    }
    /// A worker died and was started again.
    pub fn worker_restarted(&self) {
        self.update(|s| s.status.worker_restarts += 1);
    }
    pub fn status(&self) -> AgentStatus {
        let s = lock(&self.inner);
        AgentStatus {
            pending_pods: s.pending.iter().cloned().collect(),
            ..s.status.clone()
        }
    }

    fn update(&self, f: impl FnOnce(&mut AgentStatusInner)) {
        let mut s = lock(&self.inner);
        f(&mut s);
        let st = &s.status;
        if !st.ready
            && st.runtime_connected
            && st.sources_synced
            && st.relists > 0
            && s.pending.is_empty()
        {
            s.status.ready = true;
            s.status.ready_since =
                crate::status::time(crate::clock::Clock::now_ns(&crate::clock::SystemClock));
            tracing::info!(
                adopted = s.status.first_relist_pods.len(),
                "minilet ready: runtime connected, sources synced, first relist reconciled"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_once_every_condition_holds_and_then_latches() {
        let r = Readiness::default();
        let not_ready = |r: &Readiness| r.status().not_ready_reasons();
        assert_eq!(not_ready(&r).len(), 3, "{:?}", not_ready(&r));
        r.runtime_connected();
        r.sources_synced();
        r.worker_started("a");
        r.worker_started("b");
        r.relisted(["a".to_string()]);
        let st = r.status();
        assert!(!st.ready);
        assert_eq!(st.pending_pods, ["a", "b"]);
        assert_eq!(
            st.not_ready_reasons(),
            ["2 pod(s) not reconciled yet: a, b"]
        );
        r.worker_synced("a");
        assert!(!r.status().ready, "b has not reconciled");
        r.worker_synced("b");
        let st = r.status();
        assert!(st.ready && st.ready_since.is_some());
        assert!(st.not_ready_reasons().is_empty());
        assert_eq!(st.first_relist_pods, ["a"]);
        // Later relists count but keep the first relist's pods; new workers
        // do not make a ready agent unready.
        r.relisted(["c".to_string()]);
        r.worker_started("c");
        let st = r.status();
        assert!(st.ready);
        assert_eq!(
            (st.relists, st.first_relist_pods.clone()),
            (2, vec!["a".into()])
        );
    }

    #[test]
    fn no_relist_no_readiness() {
        let r = Readiness::default();
        r.runtime_connected();
        r.sources_synced();
        assert_eq!(r.status().not_ready_reasons(), ["no relist yet"]);
    }
}
