//! Pod sources: where desired pods come from.
//!
//! A source yields *snapshots* (level-triggered): the whole set of pods it
//! wants now, plus the errors it found. The pod manager never learns which
//! source a pod came from beyond the `source` string it shows to people.

pub mod static_dir;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

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
}
