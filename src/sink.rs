//! The status sink: where a pod worker reports what its pod looks like.
//! The worker computes a full `Pod` view (metadata, spec, computed status)
//! after each observation and hands it to the sink; it never learns who
//! reads it. The local board (`minilet get pods`) is one sink; in API
//! server mode a writer that patches the pod's status subresource (or the
//! mirror pod's, for a static pod) is another. `Sinks` fans out to several.
//!
//! A sink must be cheap to call on every step: writers that talk to a
//! server queue the latest view and write it from their own task, and only
//! when it really changed.
//!
//! Events go the same way: the worker tells an `EventSink` what happened to
//! a pod (kubelet's reasons: Pulling, Pulled, Created, Started, Killing,
//! BackOff, Failed, …); the board keeps the last few per pod, and in API
//! server mode a recorder also writes them as Event objects, aggregated
//! and rate-limited as kubelet's recorder does.
//!
//! Side effects: none here.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

pub use crate::cni::observe::EventType;
use crate::status::Board;

/// Receives pod views from the workers.
pub trait StatusSink: Send + Sync {
    /// The latest view of pod `uid`, with `status` set. A pod the node
    /// rejected (admission) is published once with phase Failed.
    fn publish(&self, uid: &str, pod: &Pod);
    /// The node is done with pod `uid`: its containers and sandbox are
    /// gone (or it was rejected and is no longer wanted).
    fn gone(&self, uid: &str);
}

impl StatusSink for Board {
    fn publish(&self, uid: &str, pod: &Pod) {
        self.set_pod(uid, pod.clone());
    }
    fn gone(&self, uid: &str) {
        self.remove_pod(uid);
    }
}

/// Several sinks of each kind, each told everything, in order.
#[derive(Clone, Default)]
pub struct Sinks {
    pub status: Vec<Arc<dyn StatusSink>>,
    pub events: Vec<Arc<dyn EventSink>>,
}

impl Sinks {
    /// The board alone (standalone mode, tests).
    pub fn board(board: &Board) -> Sinks {
        Sinks {
            status: vec![Arc::new(board.clone())],
            events: vec![Arc::new(board.clone())],
        }
    }
}

impl StatusSink for Sinks {
    fn publish(&self, uid: &str, pod: &Pod) {
        for s in &self.status {
            s.publish(uid, pod);
        }
    }
    fn gone(&self, uid: &str) {
        for s in &self.status {
            s.gone(uid);
        }
    }
}

/// The pod an event is about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl PodRef {
    pub fn of(pod: &Pod) -> PodRef {
        PodRef {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
        }
    }
}

/// Receives events about pods. Cheap to call: recorders that write to a
/// server queue and aggregate on their own task.
pub trait EventSink: Send + Sync {
    /// `reason` is kubelet's CamelCase reason; `message` one line.
    fn event(&self, pod: &PodRef, kind: EventType, reason: &str, message: String);
}

impl EventSink for Board {
    fn event(&self, pod: &PodRef, kind: EventType, reason: &str, message: String) {
        self.cni.events.push(&pod.uid, kind, reason, message);
    }
}

impl EventSink for Sinks {
    fn event(&self, pod: &PodRef, kind: EventType, reason: &str, message: String) {
        for s in &self.events {
            s.event(pod, kind, reason, message.clone());
        }
    }
}
