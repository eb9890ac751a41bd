//! The standalone PersistentVolume binder: a pure function from the claims,
//! volumes and classes the node knows (plus what is bound already) to the
//! bindings to keep or make, the volumes to provision or delete, and the
//! phases `minilet get pv,pvc` shows. It decides what kube-controller-
//! manager's PV controller would (pkg/controller/volume/persistentvolume),
//! for one node and no API server:
//!
//! - A claim bound before stays bound while its volume exists and still
//!   names it (its claimRef uid); its volume gone: the claim is `Lost`.
//! - `spec.volumeName`: only that volume, if it is not another claim's and
//!   its class and size satisfy the claim.
//! - Otherwise a volume pre-bound to the claim (`spec.claimRef` naming it,
//!   as a provisioned volume is) wins; else the smallest Available volume of
//!   the claim's class ("" = no class) whose access modes include the
//!   claim's, whose volumeMode is the claim's, whose labels match the
//!   claim's selector and whose capacity covers the request.
//! - The claim's class: `spec.storageClassName` (the beta annotation), else
//!   the default class (annotation `storageclass.kubernetes.io/is-default-
//!   class: "true"`, the newest when several), else "".
//! - `volumeBindingMode: WaitForFirstConsumer`: neither bound nor
//!   provisioned before a pod of the node uses the claim (one node: the
//!   first consumer is always here).
//! - No volume matches, the class has a provisioner and the claim no
//!   selector: provision (`pvc-<claim uid>`), when a driver of that name is
//!   there; else the claim waits, saying for what.
//! - A volume whose claim (by uid) is gone is `Released`; one minilet
//!   provisioned, with reclaim policy Delete, is deleted; Retain keeps it
//!   Released (never bound again, as kube: its claimRef keeps the old uid).
//!
//! Side effects: none.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::{Deserialize, Serialize};

/// A claim's namespace and name.
pub type ClaimKey = (String, String);

/// The annotation marking the default StorageClass.
pub const DEFAULT_CLASS_ANNOTATION: &str = "storageclass.kubernetes.io/is-default-class";
const BETA_DEFAULT_CLASS_ANNOTATION: &str = "storageclass.beta.kubernetes.io/is-default-class";
/// The annotation older objects name their class with.
const BETA_CLASS_ANNOTATION: &str = "volume.beta.kubernetes.io/storage-class";
/// The provisioner of classes for statically made volumes only.
pub const NO_PROVISIONER: &str = "kubernetes.io/no-provisioner";
/// kube-controller-manager's reason text while a claim's class waits for a pod.
pub const WAIT_FOR_FIRST_CONSUMER: &str = "waiting for first consumer to be created before binding";

/// A claim as the binder sees it: the object and the uid it goes by (its
/// own, or one minilet derived, see `provision`).
#[derive(Clone, Debug)]
pub struct Claim {
    pub key: ClaimKey,
    pub uid: String,
    pub pvc: Arc<PersistentVolumeClaim>,
}

/// A volume as the binder sees it.
#[derive(Clone, Debug)]
pub struct Volume {
    pub pv: Arc<PersistentVolume>,
    /// Made by minilet's provisioner (so minilet may delete it).
    pub provisioned: bool,
}

/// Which claim a volume is bound to (kube's `pv.spec.claimRef`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClaimRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl ClaimRef {
    pub fn key(&self) -> ClaimKey {
        (self.namespace.clone(), self.name.clone())
    }
}

/// Which volume a claim is bound to (kube's `pvc.spec.volumeName`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The claim's uid when it was bound: a new claim of the same name is
    /// another claim.
    pub uid: String,
    pub volume: String,
}

/// Everything the binder decides from.
#[derive(Clone, Copy)]
pub struct Input<'a> {
    pub claims: &'a [Claim],
    pub volumes: &'a [Volume],
    /// By name.
    pub classes: &'a BTreeMap<String, Arc<StorageClass>>,
    /// Volume name → its claim, as bound before (kept after the claim goes:
    /// that is what makes the volume Released).
    pub refs: &'a BTreeMap<String, ClaimRef>,
    /// Claim → its volume, as bound before (what makes a claim Lost).
    pub bindings: &'a BTreeMap<ClaimKey, Binding>,
    /// Claims a pod of the node uses.
    pub used: &'a BTreeSet<ClaimKey>,
    /// Claims whose volume is being created already (`pvc-<uid>` recorded).
    pub creating: &'a BTreeSet<ClaimKey>,
    /// Whether a driver of this name can create volumes here.
    pub can_provision: &'a dyn Fn(&str) -> bool,
}

/// kubectl's PVC phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimPhase {
    Pending,
    Bound,
    Lost,
}

/// kubectl's PV phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumePhase {
    Available,
    Bound,
    Released,
    Failed,
}

impl ClaimPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimPhase::Pending => "Pending",
            ClaimPhase::Bound => "Bound",
            ClaimPhase::Lost => "Lost",
        }
    }
}

impl VolumePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumePhase::Available => "Available",
            VolumePhase::Bound => "Bound",
            VolumePhase::Released => "Released",
            VolumePhase::Failed => "Failed",
        }
    }
}

/// A claim's state after the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimState {
    pub phase: ClaimPhase,
    pub volume: Option<String>,
    /// Why it is not Bound (one line, kube-controller-manager's wording
    /// where it has one).
    pub reason: Option<String>,
}

/// A volume's state after the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeState {
    pub phase: VolumePhase,
    pub claim: Option<ClaimRef>,
    pub reason: Option<String>,
}

/// A volume to create for a claim (the external-provisioner's request).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Provision {
    pub claim: ClaimRef,
    /// The PV's name and the CSI CreateVolume name: `pvc-<claim uid>`.
    pub name: String,
    pub class: String,
    pub driver: String,
    /// The claim's request, in bytes.
    pub capacity: u64,
    pub access_modes: Vec<String>,
    /// `Filesystem` or `Block`.
    pub volume_mode: String,
    /// The class's parameters without the `csi.storage.k8s.io/` keys.
    pub parameters: BTreeMap<String, String>,
    /// `csi.storage.k8s.io/fstype` of the class.
    pub fs_type: Option<String>,
    pub reclaim_policy: String,
    pub mount_options: Vec<String>,
}

/// What the binder decided.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The whole new set (replaces `Input::refs`).
    pub refs: BTreeMap<String, ClaimRef>,
    /// The whole new set (replaces `Input::bindings`).
    pub bindings: BTreeMap<ClaimKey, Binding>,
    pub claims: BTreeMap<ClaimKey, ClaimState>,
    pub volumes: BTreeMap<String, VolumeState>,
    pub provision: Vec<Provision>,
    /// Provisioned volumes to delete (Released, reclaim policy Delete).
    pub delete: Vec<String>,
}

fn volume_name(v: &Volume) -> &str {
    v.pv.metadata.name.as_deref().unwrap_or_default()
}

/// The class a volume belongs to ("" = none).
pub fn volume_class(pv: &PersistentVolume) -> String {
    pv.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(BETA_CLASS_ANNOTATION))
        .cloned()
        .or_else(|| pv.spec.as_ref().and_then(|s| s.storage_class_name.clone()))
        .unwrap_or_default()
}

/// The default class: the newest (then first by name) marked default.
pub fn default_class(classes: &BTreeMap<String, Arc<StorageClass>>) -> Option<String> {
    let is_default = |sc: &StorageClass| {
        sc.metadata.annotations.as_ref().is_some_and(|a| {
            [DEFAULT_CLASS_ANNOTATION, BETA_DEFAULT_CLASS_ANNOTATION]
                .iter()
                .any(|k| a.get(*k).map(String::as_str) == Some("true"))
        })
    };
    classes
        .iter()
        .filter(|(_, sc)| is_default(sc))
        .max_by(|(an, a), (bn, b)| {
            let t = |sc: &StorageClass| sc.metadata.creation_timestamp.as_ref().map(|t| t.0);
            t(a).cmp(&t(b)).then_with(|| bn.cmp(an))
        })
        .map(|(n, _)| n.clone())
}

/// The class a claim asks for ("" = none): its own, else the default.
pub fn claim_class(pvc: &PersistentVolumeClaim, default: Option<&str>) -> String {
    pvc.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(BETA_CLASS_ANNOTATION))
        .cloned()
        .or_else(|| pvc.spec.as_ref().and_then(|s| s.storage_class_name.clone()))
        .or_else(|| default.map(str::to_string))
        .unwrap_or_default()
}

/// A claim's storage request in bytes (0 when absent or unreadable:
/// validation refuses those).
pub fn requested_bytes(pvc: &PersistentVolumeClaim) -> u64 {
    pvc.spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(|q| crate::cni::podnet::parse_quantity(&q.0).ok())
        .unwrap_or(0)
}

/// A volume's capacity in bytes.
pub fn capacity_bytes(pv: &PersistentVolume) -> u64 {
    pv.spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(|q| crate::cni::podnet::parse_quantity(&q.0).ok())
        .unwrap_or(0)
}

fn claim_modes(pvc: &PersistentVolumeClaim) -> Vec<String> {
    pvc.spec
        .as_ref()
        .and_then(|s| s.access_modes.clone())
        .unwrap_or_default()
}

fn claim_volume_mode(pvc: &PersistentVolumeClaim) -> String {
    pvc.spec
        .as_ref()
        .and_then(|s| s.volume_mode.clone())
        .unwrap_or_else(|| "Filesystem".into())
}

fn volume_mode(pv: &PersistentVolume) -> String {
    pv.spec
        .as_ref()
        .and_then(|s| s.volume_mode.clone())
        .unwrap_or_else(|| "Filesystem".into())
}

/// A label selector's verdict (matchLabels and matchExpressions, ANDed).
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let got = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => got.is_some_and(|v| values.contains(v)),
            "NotIn" => got.is_none_or(|v| !values.contains(v)),
            "Exists" => got.is_some(),
            "DoesNotExist" => got.is_none(),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// The claim a volume names in its own `spec.claimRef` (pre-binding; a
/// provisioned volume's names its claim with the uid).
fn spec_ref(pv: &PersistentVolume) -> Option<(ClaimKey, Option<String>)> {
    let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
    let name = r.name.clone().filter(|n| !n.is_empty())?;
    let ns = r
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    Some(((ns, name), r.uid.clone().filter(|u| !u.is_empty())))
}

/// Why `pv` cannot serve `claim` (`checkVolumeSatisfyClaim`), if it cannot.
fn mismatch(pv: &PersistentVolume, pvc: &PersistentVolumeClaim, class: &str) -> Option<String> {
    let name = pv.metadata.name.as_deref().unwrap_or_default();
    if capacity_bytes(pv) < requested_bytes(pvc) {
        return Some(format!("requested PV {name:?} is too small"));
    }
    if volume_class(pv) != class {
        return Some(format!(
            "storageClassName of PV {name:?} does not match the claim's ({class:?})"
        ));
    }
    if volume_mode(pv) != claim_volume_mode(pvc) {
        return Some(format!(
            "volumeMode of PV {name:?} does not match the claim's"
        ));
    }
    None
}

/// Whether `pv` may serve `claim` when matched by class (not by name).
fn matches(pv: &PersistentVolume, pvc: &PersistentVolumeClaim, class: &str) -> bool {
    if mismatch(pv, pvc, class).is_some() {
        return false;
    }
    let have: BTreeSet<String> = pv
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    if !claim_modes(pvc).iter().all(|m| have.contains(m)) {
        return false;
    }
    match pvc.spec.as_ref().and_then(|s| s.selector.as_ref()) {
        Some(sel) => {
            let labels = pv.metadata.labels.clone().unwrap_or_default();
            selector_matches(sel, &labels)
        }
        None => true,
    }
}

/// Decide. Claims are taken in key order, so two claims that fit the same
/// volume always split the same way.
pub fn plan(input: Input<'_>) -> Plan {
    let mut out = Plan::default();
    let default = default_class(input.classes);
    let claims: BTreeMap<&ClaimKey, &Claim> = input.claims.iter().map(|c| (&c.key, c)).collect();
    let volumes: BTreeMap<&str, &Volume> =
        input.volumes.iter().map(|v| (volume_name(v), v)).collect();
    let alive = |r: &ClaimRef| claims.get(&r.key()).is_some_and(|c| c.uid == r.uid);
    // The bindings of volumes that still exist.
    for (name, r) in input.refs {
        if volumes.contains_key(name.as_str()) {
            out.refs.insert(name.clone(), r.clone());
        }
    }
    // A volume is taken when it names a claim: bound, pre-bound, or
    // Released (its claim gone: never bound again).
    let taken_by =
        |refs: &BTreeMap<String, ClaimRef>, v: &Volume| -> Option<(ClaimKey, Option<String>)> {
            let name = volume_name(v);
            refs.get(name)
                .map(|r| (r.key(), Some(r.uid.clone())))
                .or_else(|| spec_ref(&v.pv))
        };

    for (key, claim) in &claims {
        let pvc = &claim.pvc;
        let class = claim_class(pvc, default.as_deref());
        let bind = |out: &mut Plan, volume: &str| {
            out.refs.insert(
                volume.to_string(),
                ClaimRef {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                    uid: claim.uid.clone(),
                },
            );
            out.bindings.insert(
                (*key).clone(),
                Binding {
                    uid: claim.uid.clone(),
                    volume: volume.to_string(),
                },
            );
            out.claims.insert(
                (*key).clone(),
                ClaimState {
                    phase: ClaimPhase::Bound,
                    volume: Some(volume.to_string()),
                    reason: None,
                },
            );
        };
        let pending = |out: &mut Plan, reason: String| {
            out.claims.insert(
                (*key).clone(),
                ClaimState {
                    phase: ClaimPhase::Pending,
                    volume: None,
                    reason: Some(reason),
                },
            );
        };

        // Bound before: stays bound, or is Lost.
        if let Some(b) = input.bindings.get(*key).filter(|b| b.uid == claim.uid) {
            let still = volumes.contains_key(b.volume.as_str())
                && out.refs.get(&b.volume).is_some_and(|r| r.uid == claim.uid);
            if still {
                bind(&mut out, &b.volume);
            } else {
                out.bindings.insert((*key).clone(), b.clone());
                out.claims.insert(
                    (*key).clone(),
                    ClaimState {
                        phase: ClaimPhase::Lost,
                        volume: Some(b.volume.clone()),
                        reason: Some(format!(
                            "Bound claim has lost its PersistentVolume {:?}. Data on the volume is lost!",
                            b.volume
                        )),
                    },
                );
            }
            continue;
        }

        // By name.
        if let Some(want) = pvc
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .filter(|n| !n.is_empty())
        {
            let Some(v) = volumes.get(want.as_str()) else {
                pending(&mut out, format!("volume {want:?} requested and not found"));
                continue;
            };
            let other = |(k, uid): (ClaimKey, Option<String>)| {
                &k != *key || uid.is_some_and(|u| u != claim.uid)
            };
            if taken_by(&out.refs, v).is_some_and(other) {
                pending(
                    &mut out,
                    format!("volume {want:?} is already bound to a different claim"),
                );
                continue;
            }
            match mismatch(&v.pv, pvc, &class) {
                Some(why) => pending(&mut out, why),
                None => bind(&mut out, &want),
            }
            continue;
        }

        // Pre-bound to this claim (a provisioned volume is): taken as is.
        let prebound = input.volumes.iter().find(|v| {
            !out.refs.contains_key(volume_name(v))
                && spec_ref(&v.pv)
                    .is_some_and(|(k, uid)| &k == *key && uid.is_none_or(|u| u == claim.uid))
        });
        if let Some(v) = prebound {
            bind(&mut out, volume_name(v));
            continue;
        }

        let sc = input.classes.get(&class);
        let wait =
            sc.is_some_and(|sc| sc.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"));
        if wait && !input.used.contains(*key) {
            pending(&mut out, WAIT_FOR_FIRST_CONSUMER.into());
            continue;
        }

        // The smallest Available volume that fits.
        let best = input
            .volumes
            .iter()
            .filter(|v| taken_by(&out.refs, v).is_none())
            .filter(|v| matches(&v.pv, pvc, &class))
            .min_by_key(|v| (capacity_bytes(&v.pv), volume_name(v).to_string()));
        if let Some(v) = best {
            bind(&mut out, volume_name(v));
            continue;
        }

        // Nothing fits: provision, or wait saying for what.
        let has_selector = pvc
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .is_some();
        let reason = match sc {
            _ if class.is_empty() => {
                "no persistent volumes available for this claim and no storage class is set"
                    .to_string()
            }
            None => format!("storageclass.storage.k8s.io {class:?} not found"),
            Some(sc) if sc.provisioner == NO_PROVISIONER => format!(
                "no persistent volumes available for this claim (class {class:?} has no provisioner)"
            ),
            Some(_) if has_selector => {
                "claim Selector is not supported: no persistent volume matches it".to_string()
            }
            Some(sc) if input.creating.contains(*key) => format!(
                "waiting for a volume to be created by the provisioner {:?}",
                sc.provisioner
            ),
            Some(sc) if !(input.can_provision)(&sc.provisioner) => format!(
                "waiting for the CSI driver {:?} to be registered on this node (no provisioner for class {class:?})",
                sc.provisioner
            ),
            Some(sc) => {
                out.provision.push(provision_for(claim, &class, sc));
                format!(
                    "waiting for a volume to be created by the provisioner {:?}",
                    sc.provisioner
                )
            }
        };
        pending(&mut out, reason);
    }

    // The volumes' phases, from the bindings just made.
    for v in input.volumes {
        let name = volume_name(v);
        let r = out.refs.get(name).cloned();
        let state = match r {
            Some(r) if alive(&r) => VolumeState {
                phase: VolumePhase::Bound,
                claim: Some(r),
                reason: None,
            },
            Some(r) => released(v, r, &mut out.delete),
            None => match spec_ref(&v.pv) {
                // A provisioned volume whose claim went before it was bound.
                Some((k, Some(uid))) if claims.get(&k).is_none_or(|c| c.uid != uid) => {
                    let r = ClaimRef {
                        namespace: k.0,
                        name: k.1,
                        uid,
                    };
                    out.refs.insert(name.to_string(), r.clone());
                    released(v, r, &mut out.delete)
                }
                other => VolumeState {
                    phase: VolumePhase::Available,
                    claim: other.map(|((namespace, name), uid)| ClaimRef {
                        namespace,
                        name,
                        uid: uid.unwrap_or_default(),
                    }),
                    reason: None,
                },
            },
        };
        out.volumes.insert(name.to_string(), state);
    }
    out
}

/// A volume whose claim is gone: deleted when minilet made it and its
/// policy says Delete; Failed when the policy says Delete but the volume is
/// the manifest dir's (minilet deletes only what it provisioned).
fn released(v: &Volume, r: ClaimRef, delete: &mut Vec<String>) -> VolumeState {
    let policy =
        v.pv.spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.clone())
            .unwrap_or_else(|| "Retain".into());
    let (phase, reason) = match policy.as_str() {
        "Delete" if v.provisioned => {
            delete.push(volume_name(v).to_string());
            (VolumePhase::Released, None)
        }
        "Delete" => (
            VolumePhase::Failed,
            Some(
                "minilet deletes only the volumes it provisioned: remove this PersistentVolume from the manifest dir"
                    .to_string(),
            ),
        ),
        _ => (VolumePhase::Released, None),
    };
    VolumeState {
        phase,
        claim: Some(r),
        reason,
    }
}

/// The CSI parameter prefix the external-provisioner keeps for itself.
const CSI_PREFIX: &str = "csi.storage.k8s.io/";
const FS_TYPE_KEY: &str = "csi.storage.k8s.io/fstype";

fn provision_for(claim: &Claim, class: &str, sc: &StorageClass) -> Provision {
    let params = sc.parameters.clone().unwrap_or_default();
    let fs_type = params.get(FS_TYPE_KEY).cloned();
    Provision {
        claim: ClaimRef {
            namespace: claim.key.0.clone(),
            name: claim.key.1.clone(),
            uid: claim.uid.clone(),
        },
        name: format!("pvc-{}", claim.uid),
        class: class.to_string(),
        driver: sc.provisioner.clone(),
        capacity: requested_bytes(&claim.pvc),
        access_modes: claim_modes(&claim.pvc),
        volume_mode: claim_volume_mode(&claim.pvc),
        parameters: params
            .into_iter()
            .filter(|(k, _)| !k.starts_with(CSI_PREFIX))
            .collect(),
        fs_type,
        reclaim_policy: sc.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
        mount_options: sc.mount_options.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pvc(name: &str, extra: serde_json::Value) -> Claim {
        let mut v = serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        });
        merge(&mut v, extra);
        Claim {
            key: ("default".into(), name.into()),
            uid: format!("uid-{name}"),
            pvc: Arc::new(serde_json::from_value(v).unwrap()),
        }
    }

    fn pv(name: &str, size: &str, extra: serde_json::Value) -> Volume {
        let mut v = serde_json::json!({
            "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "capacity": {"storage": size},
                     "hostPath": {"path": "/tmp"}},
        });
        merge(&mut v, extra);
        Volume {
            pv: Arc::new(serde_json::from_value(v).unwrap()),
            provisioned: false,
        }
    }

    fn class(name: &str, extra: serde_json::Value) -> (String, Arc<StorageClass>) {
        let mut v = serde_json::json!({"metadata": {"name": name}, "provisioner": "test.csi"});
        merge(&mut v, extra);
        (name.into(), Arc::new(serde_json::from_value(v).unwrap()))
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    struct World {
        claims: Vec<Claim>,
        volumes: Vec<Volume>,
        classes: BTreeMap<String, Arc<StorageClass>>,
        refs: BTreeMap<String, ClaimRef>,
        bindings: BTreeMap<ClaimKey, Binding>,
        used: BTreeSet<ClaimKey>,
        creating: BTreeSet<ClaimKey>,
        drivers: Vec<&'static str>,
    }

    impl World {
        fn new(claims: Vec<Claim>, volumes: Vec<Volume>) -> World {
            World {
                claims,
                volumes,
                classes: BTreeMap::new(),
                refs: BTreeMap::new(),
                bindings: BTreeMap::new(),
                used: BTreeSet::new(),
                creating: BTreeSet::new(),
                drivers: vec!["test.csi"],
            }
        }
        fn plan(&self) -> Plan {
            let can = |d: &str| self.drivers.contains(&d);
            plan(Input {
                claims: &self.claims,
                volumes: &self.volumes,
                classes: &self.classes,
                refs: &self.refs,
                bindings: &self.bindings,
                used: &self.used,
                creating: &self.creating,
                can_provision: &can,
            })
        }
        /// Apply a plan's bindings (what the loop persists).
        fn apply(&mut self, p: &Plan) {
            self.refs = p.refs.clone();
            self.bindings = p.bindings.clone();
        }
    }

    fn key(name: &str) -> ClaimKey {
        ("default".into(), name.into())
    }

    fn phase(p: &Plan, claim: &str) -> (ClaimPhase, Option<String>) {
        let s = &p.claims[&key(claim)];
        (s.phase, s.volume.clone())
    }

    fn reason(p: &Plan, claim: &str) -> String {
        p.claims[&key(claim)].reason.clone().unwrap_or_default()
    }

    #[test]
    fn static_binding_by_class_modes_and_size_takes_the_smallest_fit() {
        use serde_json::json;
        let cases: Vec<(&str, Claim, Vec<Volume>, Option<&str>)> = vec![
            (
                "smallest that fits",
                pvc("c", json!({})),
                vec![
                    pv("big", "10Gi", json!({})),
                    pv("small", "512Mi", json!({})),
                    pv("fit", "2Gi", json!({})),
                ],
                Some("fit"),
            ),
            (
                "access modes must include the claim's",
                pvc("c", json!({"spec": {"accessModes": ["ReadWriteMany"]}})),
                vec![
                    pv("rwo", "1Gi", json!({})),
                    pv(
                        "rwx",
                        "5Gi",
                        json!({"spec": {"accessModes": ["ReadWriteOnce", "ReadWriteMany"]}}),
                    ),
                ],
                Some("rwx"),
            ),
            (
                "class must be equal (no class matches only no class)",
                pvc("c", json!({"spec": {"storageClassName": ""}})),
                vec![
                    pv("fast", "1Gi", json!({"spec": {"storageClassName": "fast"}})),
                    pv("plain", "8Gi", json!({})),
                ],
                Some("plain"),
            ),
            (
                "a named class",
                pvc("c", json!({"spec": {"storageClassName": "fast"}})),
                vec![
                    pv("plain", "1Gi", json!({})),
                    pv("fast", "8Gi", json!({"spec": {"storageClassName": "fast"}})),
                ],
                Some("fast"),
            ),
            (
                "selector",
                pvc(
                    "c",
                    json!({"spec": {"selector": {"matchLabels": {"tier": "gold"}}}}),
                ),
                vec![
                    pv("a", "1Gi", json!({})),
                    pv(
                        "b",
                        "2Gi",
                        json!({"metadata": {"labels": {"tier": "gold"}}}),
                    ),
                ],
                Some("b"),
            ),
            (
                "block mode wants a block volume",
                pvc("c", json!({"spec": {"volumeMode": "Block"}})),
                vec![pv("fs", "1Gi", json!({}))],
                None,
            ),
            (
                "volumeName wins over a better fit",
                pvc("c", json!({"spec": {"volumeName": "big"}})),
                vec![pv("fit", "1Gi", json!({})), pv("big", "10Gi", json!({}))],
                Some("big"),
            ),
            (
                "volumeName too small",
                pvc("c", json!({"spec": {"volumeName": "tiny"}})),
                vec![pv("tiny", "1Mi", json!({}))],
                None,
            ),
            (
                "pre-bound to another claim is not taken",
                pvc("c", json!({})),
                vec![pv(
                    "other",
                    "1Gi",
                    json!({"spec": {"claimRef": {"name": "d", "namespace": "default"}}}),
                )],
                None,
            ),
            (
                "pre-bound to this claim wins",
                pvc("c", json!({})),
                vec![
                    pv("fit", "1Gi", json!({})),
                    pv(
                        "mine",
                        "9Gi",
                        json!({"spec": {"claimRef": {"name": "c", "namespace": "default"}}}),
                    ),
                ],
                Some("mine"),
            ),
        ];
        for (what, claim, volumes, want) in cases {
            let w = World::new(vec![claim], volumes);
            let p = w.plan();
            let (ph, vol) = phase(&p, "c");
            assert_eq!(vol.as_deref(), want, "{what}");
            let want_phase = if want.is_some() {
                ClaimPhase::Bound
            } else {
                ClaimPhase::Pending
            };
            assert_eq!(ph, want_phase, "{what}: {:?}", p.claims);
            if let Some(v) = want {
                assert_eq!(p.volumes[v].phase, VolumePhase::Bound, "{what}");
                assert_eq!(p.refs[v].uid, "uid-c", "{what}");
            }
            assert!(p.provision.is_empty(), "{what}");
        }
    }

    #[test]
    fn two_claims_never_share_a_volume() {
        let mut w = World::new(
            vec![
                pvc("a", serde_json::json!({})),
                pvc("b", serde_json::json!({})),
            ],
            vec![pv("v1", "1Gi", serde_json::json!({}))],
        );
        let p = w.plan();
        assert_eq!(phase(&p, "a"), (ClaimPhase::Bound, Some("v1".into())));
        assert_eq!(phase(&p, "b").0, ClaimPhase::Pending);
        assert_eq!(
            reason(&p, "b"),
            "no persistent volumes available for this claim and no storage class is set"
        );
        // Stable: the next round keeps the same split.
        w.apply(&p);
        assert_eq!(w.plan(), p);
    }

    #[test]
    fn the_default_class_applies_to_claims_without_one() {
        let mut w = World::new(
            vec![pvc("c", serde_json::json!({}))],
            vec![pv("plain", "1Gi", serde_json::json!({}))],
        );
        w.classes = BTreeMap::from([
            class(
                "old",
                serde_json::json!({"metadata": {"annotations": {DEFAULT_CLASS_ANNOTATION: "true"}, "creationTimestamp": "2026-01-01T00:00:00Z"}}),
            ),
            class(
                "new",
                serde_json::json!({"provisioner": "new.csi", "metadata": {"annotations": {DEFAULT_CLASS_ANNOTATION: "true"}, "creationTimestamp": "2026-06-01T00:00:00Z"}}),
            ),
        ]);
        w.drivers = vec!["new.csi"];
        let p = w.plan();
        // The newest default class, not the classless volume.
        assert_eq!(phase(&p, "c").0, ClaimPhase::Pending);
        assert_eq!(p.provision.len(), 1);
        let prov = &p.provision[0];
        assert_eq!(prov.driver, "new.csi");
        assert_eq!(prov.class, "new");
        assert_eq!(prov.name, "pvc-uid-c");
        assert_eq!(prov.capacity, 1 << 30);
        assert_eq!(prov.reclaim_policy, "Delete");
        // An explicit "" opts out of the default.
        w.claims = vec![pvc(
            "c",
            serde_json::json!({"spec": {"storageClassName": ""}}),
        )];
        assert_eq!(phase(&w.plan(), "c").1.as_deref(), Some("plain"));
    }

    /// What, classes, used by a pod, creating already, drivers, reason,
    /// provisions.
    type WaitCase = (
        &'static str,
        Vec<(String, Arc<StorageClass>)>,
        bool,
        bool,
        &'static [&'static str],
        &'static str,
        usize,
    );

    #[test]
    fn provisioning_waits_for_its_reasons() {
        use serde_json::json;
        let c = || pvc("c", json!({"spec": {"storageClassName": "fast"}}));
        let cases: Vec<WaitCase> = vec![
            (
                "no class object",
                vec![],
                false,
                false,
                &["test.csi"],
                "storageclass.storage.k8s.io \"fast\" not found",
                0,
            ),
            (
                "no driver",
                vec![class("fast", json!({}))],
                false,
                false,
                &[],
                "waiting for the CSI driver \"test.csi\" to be registered on this node (no provisioner for class \"fast\")",
                0,
            ),
            (
                "provision",
                vec![class("fast", json!({}))],
                false,
                false,
                &["test.csi"],
                "waiting for a volume to be created by the provisioner \"test.csi\"",
                1,
            ),
            (
                "already creating",
                vec![class("fast", json!({}))],
                false,
                true,
                &["test.csi"],
                "waiting for a volume to be created by the provisioner \"test.csi\"",
                0,
            ),
            (
                "WaitForFirstConsumer, no pod",
                vec![class(
                    "fast",
                    json!({"volumeBindingMode": "WaitForFirstConsumer"}),
                )],
                false,
                false,
                &["test.csi"],
                WAIT_FOR_FIRST_CONSUMER,
                0,
            ),
            (
                "WaitForFirstConsumer, a pod",
                vec![class(
                    "fast",
                    json!({"volumeBindingMode": "WaitForFirstConsumer"}),
                )],
                true,
                false,
                &["test.csi"],
                "waiting for a volume to be created by the provisioner \"test.csi\"",
                1,
            ),
            (
                "no-provisioner class",
                vec![class("fast", json!({"provisioner": NO_PROVISIONER}))],
                false,
                false,
                &["test.csi"],
                "no persistent volumes available for this claim (class \"fast\" has no provisioner)",
                0,
            ),
        ];
        for (what, classes, used, creating, drivers, want, n) in cases {
            let mut w = World::new(vec![c()], vec![]);
            w.classes = classes.into_iter().collect();
            w.drivers = drivers.to_vec();
            if used {
                w.used.insert(key("c"));
            }
            if creating {
                w.creating.insert(key("c"));
            }
            let p = w.plan();
            assert_eq!(phase(&p, "c").0, ClaimPhase::Pending, "{what}");
            assert_eq!(reason(&p, "c"), want, "{what}");
            assert_eq!(p.provision.len(), n, "{what}");
        }
    }

    #[test]
    fn class_parameters_reach_the_request_without_the_csi_keys() {
        let mut w = World::new(
            vec![pvc(
                "c",
                serde_json::json!({"spec": {"storageClassName": "fast", "accessModes": ["ReadWriteOncePod"]}}),
            )],
            vec![],
        );
        w.classes = BTreeMap::from([class(
            "fast",
            serde_json::json!({"reclaimPolicy": "Retain", "mountOptions": ["noatime"],
                "parameters": {"type": "ssd", "csi.storage.k8s.io/fstype": "xfs",
                               "csi.storage.k8s.io/provisioner-secret-name": "s"}}),
        )]);
        let p = w.plan();
        let prov = &p.provision[0];
        assert_eq!(
            prov.parameters,
            BTreeMap::from([("type".into(), "ssd".into())])
        );
        assert_eq!(prov.fs_type.as_deref(), Some("xfs"));
        assert_eq!(prov.reclaim_policy, "Retain");
        assert_eq!(prov.mount_options, ["noatime"]);
        assert_eq!(prov.access_modes, ["ReadWriteOncePod"]);
    }

    fn provisioned(name: &str, claim: &str, policy: &str) -> Volume {
        let mut v = pv(
            name,
            "1Gi",
            serde_json::json!({"spec": {"storageClassName": "fast", "persistentVolumeReclaimPolicy": policy,
                "claimRef": {"name": claim, "namespace": "default", "uid": format!("uid-{claim}")}}}),
        );
        v.provisioned = true;
        v
    }

    #[test]
    fn a_provisioned_volume_binds_its_claim_and_is_released_or_deleted_when_it_goes() {
        for (policy, deleted) in [("Delete", true), ("Retain", false)] {
            let mut w = World::new(
                vec![pvc(
                    "c",
                    serde_json::json!({"spec": {"storageClassName": "fast"}}),
                )],
                vec![provisioned("pvc-uid-c", "c", policy)],
            );
            w.classes = BTreeMap::from([class("fast", serde_json::json!({}))]);
            let p = w.plan();
            assert_eq!(
                phase(&p, "c"),
                (ClaimPhase::Bound, Some("pvc-uid-c".into()))
            );
            assert!(p.provision.is_empty());
            w.apply(&p);
            // The claim goes.
            w.claims.clear();
            let p = w.plan();
            assert_eq!(
                p.volumes["pvc-uid-c"].phase,
                VolumePhase::Released,
                "{policy}"
            );
            assert_eq!(p.delete.is_empty(), !deleted, "{policy}");
            assert!(p.bindings.is_empty());
            w.apply(&p);
            // A new claim of the same name (another uid) does not get it back.
            let mut again = pvc(
                "c",
                serde_json::json!({"spec": {"storageClassName": "fast"}}),
            );
            again.uid = "uid-c2".into();
            w.claims = vec![again];
            let p = w.plan();
            assert_eq!(
                p.volumes["pvc-uid-c"].phase,
                VolumePhase::Released,
                "{policy}"
            );
            assert_eq!(p.provision[0].name, "pvc-uid-c2", "{policy}");
        }
    }

    #[test]
    fn a_provisioned_volume_whose_claim_went_before_binding_is_released() {
        let w = World::new(vec![], vec![provisioned("pvc-uid-c", "c", "Delete")]);
        let p = w.plan();
        assert_eq!(p.volumes["pvc-uid-c"].phase, VolumePhase::Released);
        assert_eq!(p.delete, ["pvc-uid-c"]);
        assert_eq!(p.refs["pvc-uid-c"].uid, "uid-c");
    }

    #[test]
    fn a_manifest_volume_is_released_never_deleted_and_a_bound_claim_whose_volume_goes_is_lost() {
        let mut w = World::new(
            vec![pvc("c", serde_json::json!({}))],
            vec![pv(
                "v",
                "1Gi",
                serde_json::json!({"spec": {"persistentVolumeReclaimPolicy": "Delete"}}),
            )],
        );
        let p = w.plan();
        w.apply(&p);
        // The volume's manifest goes: the claim is Lost, and stays so.
        let vols = std::mem::take(&mut w.volumes);
        let p = w.plan();
        assert_eq!(phase(&p, "c"), (ClaimPhase::Lost, Some("v".into())));
        w.apply(&p);
        assert_eq!(w.plan().claims, p.claims);
        // The same name back is another volume as far as the claim knows
        // (kube: a new PV object): the claim stays Lost.
        w.volumes = vols;
        let p = w.plan();
        assert_eq!(phase(&p, "c").0, ClaimPhase::Lost);
        // The claim goes instead: a Delete volume of the manifest dir fails.
        let mut w = World::new(
            vec![pvc("c", serde_json::json!({}))],
            vec![pv(
                "v",
                "1Gi",
                serde_json::json!({"spec": {"persistentVolumeReclaimPolicy": "Delete"}}),
            )],
        );
        let p = w.plan();
        w.apply(&p);
        w.claims.clear();
        let p = w.plan();
        assert_eq!(p.volumes["v"].phase, VolumePhase::Failed);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn selectors() {
        let labels = BTreeMap::from([("tier".to_string(), "gold".to_string())]);
        let sel = |v: serde_json::Value| -> LabelSelector { serde_json::from_value(v).unwrap() };
        let cases = [
            (serde_json::json!({}), true),
            (serde_json::json!({"matchLabels": {"tier": "gold"}}), true),
            (serde_json::json!({"matchLabels": {"tier": "tin"}}), false),
            (
                serde_json::json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["gold", "x"]}]}),
                true,
            ),
            (
                serde_json::json!({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["gold"]}]}),
                false,
            ),
            (
                serde_json::json!({"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]}),
                true,
            ),
            (
                serde_json::json!({"matchExpressions": [{"key": "zone", "operator": "Exists"}]}),
                false,
            ),
        ];
        for (s, want) in cases {
            assert_eq!(selector_matches(&sel(s.clone()), &labels), want, "{s}");
        }
    }
}
