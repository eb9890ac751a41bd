//! The node's CSINode object (storage.k8s.io/v1), as kubelet keeps it: one
//! entry per CSI driver the node has discovered, with the driver's id for
//! this node (NodeGetInfo's node_id: what a driver's external-attacher and
//! external-provisioner read to call ControllerPublishVolume and to place
//! volumes), its topology keys, and its volume limit (`allocatable.count`
//! from max_volumes_per_node). The CSINode is owned by the Node, so it goes
//! with it. The topology segments also become labels on the Node, as
//! kubelet adds them.
//!
//! Entries of drivers the registry no longer knows are removed, but not in
//! the first `STARTUP_GRACE` after start: registered drivers announce
//! themselves again by then, and an entry a cluster relies on must not
//! flap at every agent restart. Entries of drivers known but not yet
//! discovered are left as they are.
//!
//! The decision is `drivers_to_write` (pure, tested); `run` does the I/O,
//! on every registry change and every `RESYNC`, retried with backoff.
//!
//! Side effects: GET/POST/PUT of this node's CSINode, GET/PATCH of its
//! Node (labels), through the node's own credentials (NodeRestriction lets
//! a node write its own CSINode).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::storage::v1::{CSINode, CSINodeDriver, CSINodeSpec, VolumeNodeResources};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::client::describe;
use crate::csi::Registry;

/// Before this long after start, no entry is removed.
pub const STARTUP_GRACE: Duration = Duration::from_secs(30);
/// Looked at again this often even when nothing changed.
const RESYNC: Duration = Duration::from_secs(60);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// `sync`'s answer while the Node does not exist yet (not a failure).
const NOT_REGISTERED: &str = "the Node is not registered yet";

/// What the registry's drivers ask of the node, from one listing.
pub struct Discovered {
    /// The CSINode entries of the discovered drivers.
    pub entries: Vec<CSINodeDriver>,
    /// Every driver the registry knows, discovered or not.
    pub known: BTreeSet<String>,
    /// The Node labels their topology segments ask for.
    pub labels: BTreeMap<String, String>,
}

pub fn discovered(registry: &Registry) -> Discovered {
    let mut out = Discovered {
        entries: Vec::new(),
        known: BTreeSet::new(),
        labels: BTreeMap::new(),
    };
    for (name, d) in registry.list() {
        out.known.insert(name.clone());
        let Some(info) = d.info else { continue };
        out.labels.extend(info.topology.clone());
        out.entries.push(CSINodeDriver {
            name,
            node_id: info.node_id.clone(),
            topology_keys: (!info.topology.is_empty())
                .then(|| info.topology.keys().cloned().collect()),
            allocatable: (info.max_volumes_per_node > 0).then(|| VolumeNodeResources {
                count: i32::try_from(info.max_volumes_per_node).ok(),
            }),
        });
    }
    out
}

/// The driver list to write over `existing` (the CSINode's, `None`: no
/// object yet), or `None` when it is right already. Sorted by name.
pub fn drivers_to_write(
    existing: Option<&[CSINodeDriver]>,
    ours: &[CSINodeDriver],
    known: &BTreeSet<String>,
    may_remove: bool,
) -> Option<Vec<CSINodeDriver>> {
    let mut by_name: BTreeMap<String, CSINodeDriver> = existing
        .unwrap_or_default()
        .iter()
        .filter(|d| !may_remove || known.contains(&d.name))
        .map(|d| (d.name.clone(), d.clone()))
        .collect();
    for d in ours {
        by_name.insert(d.name.clone(), d.clone());
    }
    let want: Vec<CSINodeDriver> = by_name.into_values().collect();
    let mut have = existing.map(<[CSINodeDriver]>::to_vec);
    if let Some(h) = &mut have {
        h.sort_by(|a, b| a.name.cmp(&b.name));
    }
    (have.as_ref() != Some(&want)).then_some(want)
}

/// Keep the CSINode of `node` in step with `registry` until cancelled.
pub async fn run(client: Client, node: String, registry: Arc<Registry>, cancel: CancellationToken) {
    let started = Instant::now();
    let mut changes = registry.subscribe();
    let mut backoff = BACKOFF_MIN;
    let mut last_error: Option<String> = None;
    loop {
        let may_remove = started.elapsed() >= STARTUP_GRACE;
        let wait = match sync(&client, &node, &registry, may_remove).await {
            Ok(()) => {
                last_error = None;
                backoff = BACKOFF_MIN;
                // During the grace, look again when it ends (removals).
                let left = STARTUP_GRACE.saturating_sub(started.elapsed());
                if may_remove {
                    RESYNC
                } else {
                    left.max(BACKOFF_MIN)
                }
            }
            // The node task registers the Node a moment after start.
            Err(e) if e == NOT_REGISTERED => {
                debug!(node = %node, "CSINode waits for the Node to be registered");
                BACKOFF_MIN
            }
            Err(e) => {
                if last_error.as_deref() != Some(e.as_str()) {
                    warn!(node = %node, error = %e, retry_in = ?backoff, "CSINode update failed; retrying");
                    last_error = Some(e);
                }
                let w = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                w
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// One pass: the CSINode's drivers, then the Node's topology labels.
async fn sync(
    client: &Client,
    node: &str,
    registry: &Registry,
    may_remove: bool,
) -> Result<(), String> {
    let csinodes: Api<CSINode> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let Discovered {
        entries: ours,
        known,
        labels: want,
    } = discovered(registry);
    let existing = csinodes.get_opt(node).await.map_err(|e| describe(&e))?;
    let have = existing.as_ref().map(|c| c.spec.drivers.as_slice());
    if let Some(drivers) = drivers_to_write(have, &ours, &known, may_remove) {
        let names: Vec<&str> = drivers.iter().map(|d| d.name.as_str()).collect();
        match existing {
            Some(mut c) => {
                c.spec.drivers = drivers.clone();
                csinodes
                    .replace(node, &PostParams::default(), &c)
                    .await
                    .map_err(|e| describe(&e))?;
            }
            None => {
                let Some(n) = nodes.get_opt(node).await.map_err(|e| describe(&e))? else {
                    return Err(NOT_REGISTERED.to_string());
                };
                let uid = n.metadata.uid.clone().unwrap_or_default();
                let c = CSINode {
                    metadata: ObjectMeta {
                        name: Some(node.to_string()),
                        owner_references: Some(vec![super::node::node_owner(node, &uid)]),
                        ..ObjectMeta::default()
                    },
                    spec: CSINodeSpec {
                        drivers: drivers.clone(),
                    },
                };
                csinodes
                    .create(&PostParams::default(), &c)
                    .await
                    .map_err(|e| describe(&e))?;
            }
        }
        info!(node = %node, drivers = ?names, "CSINode updated");
    }
    if !want.is_empty() {
        let n = nodes.get(node).await.map_err(|e| describe(&e))?;
        let have = n.metadata.labels.unwrap_or_default();
        if want.iter().any(|(k, v)| have.get(k) != Some(v)) {
            let patch = serde_json::json!({"metadata": {"labels": want}});
            nodes
                .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| describe(&e))?;
            info!(node = %node, labels = ?want, "node topology labels set from CSI drivers");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, id: &str) -> CSINodeDriver {
        CSINodeDriver {
            name: name.into(),
            node_id: id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn entries_follow_the_discovered_drivers_without_flapping_at_start() {
        let known: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        // No object yet: one is written, even with no driver.
        assert_eq!(drivers_to_write(None, &[], &known, false), Some(vec![]));
        // A driver discovered: added, sorted.
        let have = [entry("z-gone", "n1")];
        assert_eq!(
            drivers_to_write(Some(&have), &[entry("a", "id-a")], &known, false),
            Some(vec![entry("a", "id-a"), entry("z-gone", "n1")]),
            "early: an unknown driver's entry stays"
        );
        assert_eq!(
            drivers_to_write(Some(&have), &[entry("a", "id-a")], &known, true),
            Some(vec![entry("a", "id-a")]),
            "after the grace: it goes"
        );
        // Known but not discovered yet: left as it is; nothing to write.
        let have = [entry("a", "id-a"), entry("b", "old-b")];
        assert_eq!(
            drivers_to_write(Some(&have), &[entry("a", "id-a")], &known, true),
            None
        );
        // A new node id replaces the old.
        assert_eq!(
            drivers_to_write(Some(&have), &[entry("b", "new-b")], &known, true),
            Some(vec![entry("a", "id-a"), entry("b", "new-b")])
        );
    }
}
