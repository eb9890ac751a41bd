//! Pod sources: where desired pods come from.
//!
//! A source yields *snapshots* (level-triggered): the whole set of pods it
//! wants now, plus the errors it found. The pod manager never learns which
//! source a pod came from beyond the `source` string it shows to people.

pub mod merge;
pub mod static_dir;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

use crate::objects::Objects;

/// A pod the node should run, fully defaulted: name, namespace and uid set,
/// kubelet's config annotations present.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredPod {
    pub pod: Pod,
    /// Where it came from, for people: a manifest path, or "api".
    pub source: String,
}

impl DesiredPod {
    pub fn uid(&self) -> &str {
        self.pod.metadata.uid.as_deref().unwrap_or_default()
    }
    pub fn name(&self) -> &str {
        self.pod.metadata.name.as_deref().unwrap_or_default()
    }
    pub fn namespace(&self) -> &str {
        self.pod.metadata.namespace.as_deref().unwrap_or("default")
    }
}

/// One problem with one input of a source, shown in `minilet get pods`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceError {
    /// The file (or object) at fault.
    pub file: String,
    /// One line: what is wrong and where (line/column when known).
    pub message: String,
}

/// Everything a source wants now, keyed by pod uid.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub pods: BTreeMap<String, Arc<DesiredPod>>,
    pub errors: Vec<SourceError>,
    /// Sources that have not listed yet (merged snapshots only). While any
    /// is pending, the node must not tear down a pod it finds running that
    /// no source wants: the pending source may want it.
    pub pending_sources: Vec<String>,
    /// ConfigMaps, Secrets, claims, volumes and classes the source defines, by the
    /// file that defines them (the manifest dir's; API objects are watched,
    /// not listed, see `api::objects`).
    pub objects: BTreeMap<String, Objects>,
}

impl Snapshot {
    /// Every object of every file; a name two files define goes to the
    /// first file in path order (the later one is reported by the source).
    pub fn all_objects(&self) -> Objects {
        let mut out = Objects::default();
        for o in self.objects.values() {
            for (k, v) in &o.config_maps {
                out.config_maps
                    .entry(k.clone())
                    .or_insert_with(|| v.clone());
            }
            for (k, v) in &o.secrets {
                out.secrets.entry(k.clone()).or_insert_with(|| v.clone());
            }
            for (k, v) in &o.claims {
                out.claims.entry(k.clone()).or_insert_with(|| v.clone());
            }
            for (k, v) in &o.volumes {
                out.volumes.entry(k.clone()).or_insert_with(|| v.clone());
            }
            for (k, v) in &o.classes {
                out.classes.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        out
    }

    /// Every source has listed at least once.
    pub fn synced(&self) -> bool {
        self.pending_sources.is_empty()
    }
}

/// Keep `store` holding the objects of the latest snapshot (the manifest
/// dir's ConfigMaps, Secrets, claims, volumes), bumping `changes` after
/// each change. Returns when the sender is gone.
pub async fn feed_objects(
    store: crate::objects::ObjectStore,
    mut snapshots: tokio::sync::watch::Receiver<Snapshot>,
    changes: crate::objects::Changes,
) {
    loop {
        let objects = snapshots.borrow_and_update().all_objects();
        if store.snapshot() != objects {
            store.replace(objects);
            changes.bump();
        }
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

/// What the node should do with one pod (the worker's desired state).
#[derive(Clone, Debug, PartialEq)]
pub enum Desired {
    /// Run it as specified.
    Run(Arc<DesiredPod>),
    /// Stop its containers and sandbox, then forget it. `grace`: seconds
    /// for each container to stop (the API's deletionGracePeriodSeconds);
    /// `None` uses the pod's terminationGracePeriodSeconds (kubelet: 30).
    Terminate { grace: Option<i64> },
}

impl Desired {
    /// The pod to run, if it is to run.
    pub fn running(&self) -> Option<&Arc<DesiredPod>> {
        match self {
            Desired::Run(d) => Some(d),
            Desired::Terminate { .. } => None,
        }
    }

    /// What a source's pod asks for: a pod the API server is deleting
    /// (deletionTimestamp set) is terminated with its deletion grace.
    pub fn of(pod: &Arc<DesiredPod>) -> Desired {
        let m = &pod.pod.metadata;
        match m.deletion_timestamp {
            Some(_) => Desired::Terminate {
                grace: m.deletion_grace_period_seconds,
            },
            None => Desired::Run(pod.clone()),
        }
    }
}
