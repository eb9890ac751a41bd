//! The standalone claim controller: kube-controller-manager's binder and
//! the CSI external-provisioner's job, for one node and no API server.
//! Each [`Claims::sync`] reads the manifest dir's claims, volumes and
//! classes, asks the pure binder (`claims::plan`), records the result, and
//! drives the driver calls to completion: CreateVolume for claims that
//! need a volume, DeleteVolume (after ControllerUnpublishVolume) for
//! provisioned volumes whose claim went under reclaim policy Delete.
//!
//! Provisioned volumes are PVs as the external-provisioner makes them:
//! named `pvc-<claim uid>`, `spec.csi {driver, volumeHandle,
//! volumeAttributes, fsType}` (fsType from the class parameter
//! `csi.storage.k8s.io/fstype`), the class's reclaim policy and mount
//! options, a `claimRef` naming the claim by uid, and the annotation
//! `pv.kubernetes.io/provisioned-by`.
//!
//! Claim uids: a claim's `metadata.uid` when the manifest sets one; else
//! one derived from its namespace, name and creation (`metadata.
//! creationTimestamp` when set, else when minilet first saw it, kept in the
//! state file): the hex MD5 of `"claim:" + namespace + "/" + name + "@" +
//! time` in UUID form. A claim removed from the dir and written back is a
//! new claim (a new uid), as with the API server: its old volume stays
//! Released (or is deleted) and is not bound again.
//!
//! State: `<stateDir>/volumes/claims.json` (written atomically, tmp +
//! fsync + rename) holds the claims' uids and bindings, every volume's
//! claimRef, the volumes minilet provisioned and their ControllerPublish
//! results. A CreateVolume is recorded as intended (its name) before the
//! call, so an agent killed mid-call retries with the same name (CSI
//! CreateVolume is idempotent by name) and never makes a second volume;
//! a volume is forgotten only after DeleteVolume succeeded.
//!
//! Safety: DeleteVolume is held back while the manifest dir has errors (a
//! file that does not parse may hold the claim that looks gone).
//!
//! Side effects: the state file; the driver calls through [`Provisioner`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeClaimStatus, PersistentVolumeSpec, PersistentVolumeStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::claims::{self, Claim, ClaimKey, ClaimPhase, ClaimRef, Plan, Provision};
use super::resolve::{ClaimError, ClaimResolver, ResolvedClaim};
use crate::locks::lock;
use crate::objects::Objects;
use crate::source::Snapshot;

/// The annotation naming the driver that made a volume.
pub const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// How often the controller looks again without a change (retries of
/// failed driver calls).
pub const RESYNC: Duration = Duration::from_secs(5);

/// What a driver call answered when it failed (the adapter's one-line
/// rendering of the CSI error). DeleteVolume and ControllerUnpublishVolume
/// of an unknown volume count as success: the adapter answers Ok.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CallError(pub String);

/// A volume a driver made (CreateVolumeResponse.volume).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreatedVolume {
    pub volume_id: String,
    /// Bytes; 0 = unknown (the request is recorded instead).
    pub capacity: u64,
    pub volume_context: BTreeMap<String, String>,
}

/// A ControllerPublishVolume request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub driver: String,
    pub volume_id: String,
    pub node_id: String,
    pub readonly: bool,
    pub access_modes: Vec<String>,
    pub volume_mode: String,
    pub fs_type: Option<String>,
    pub mount_options: Vec<String>,
    pub volume_context: BTreeMap<String, String>,
}

/// The controller side of the CSI drivers (helper csi-client's client,
/// adapted by the lead); faked in tests.
pub trait Provisioner: Send + Sync {
    /// Whether a driver of this name is registered and has the controller
    /// capability CREATE_DELETE_VOLUME.
    fn can_provision(&self, driver: &str) -> bool;
    /// The node id (NodeGetInfo) to publish to, when the driver has
    /// PUBLISH_UNPUBLISH_VOLUME; `None` when it does not publish.
    fn publish_node(&self, driver: &str) -> Option<String>;
    /// CreateVolume, named `req.name` (idempotent by name).
    fn create_volume<'a>(
        &'a self,
        req: &'a Provision,
    ) -> BoxFuture<'a, Result<CreatedVolume, CallError>>;
    /// DeleteVolume (an unknown volume is success).
    fn delete_volume<'a>(
        &'a self,
        driver: &'a str,
        volume_id: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>>;
    /// ControllerPublishVolume → publish_context.
    fn controller_publish<'a>(
        &'a self,
        req: &'a Publish,
    ) -> BoxFuture<'a, Result<BTreeMap<String, String>, CallError>>;
    /// ControllerUnpublishVolume (an unknown volume is success).
    fn controller_unpublish<'a>(
        &'a self,
        driver: &'a str,
        volume_id: &'a str,
        node_id: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>>;
}

/// Errors of the claim controller.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The state file is not what this version writes: refused rather than
    /// overwritten (it names volumes that exist on the drivers).
    #[error("{path} is not a valid claims state file (move it away to start afresh)")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What minilet remembers of a claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClaimRecord {
    uid: String,
    first_seen: jiff::Timestamp,
    /// The volume it is bound to (with the uid it was bound under).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    binding: Option<claims::Binding>,
}

/// A volume minilet provisions or provisioned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
enum VolumeRecord {
    /// CreateVolume intended (recorded before the call) or in flight.
    Creating { request: Box<Provision> },
    /// Made: its PersistentVolume.
    Created { pv: Box<PersistentVolume> },
    /// Its claim went under policy Delete: DeleteVolume until it succeeds.
    Deleting { pv: Box<PersistentVolume> },
}

/// A ControllerPublishVolume that succeeded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Published {
    driver: String,
    volume_id: String,
    node_id: String,
    context: BTreeMap<String, String>,
}

/// The state file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct State {
    /// By `namespace/name`.
    #[serde(default)]
    claims: BTreeMap<String, ClaimRecord>,
    /// Volume name → the claim it is bound to (kube's claimRef).
    #[serde(default)]
    refs: BTreeMap<String, ClaimRef>,
    /// By PV name.
    #[serde(default)]
    volumes: BTreeMap<String, VolumeRecord>,
    /// By PV name.
    #[serde(default)]
    published: BTreeMap<String, Published>,
}

/// The PVs and PVCs with their status, as `minilet get pv,pvc` shows them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumesView {
    pub volumes: Vec<PersistentVolume>,
    pub claims: Vec<PersistentVolumeClaim>,
    /// Why claims are not bound, by `namespace/name`.
    #[serde(default)]
    pub waiting: BTreeMap<String, String>,
}

/// Each claim of a view, by (namespace, name): its bound volume and phase.
pub type ClaimStates = BTreeMap<(String, String), (Option<String>, Option<String>)>;

/// The claims of `view` and what pods wait on in them.
pub fn claim_states(view: &VolumesView) -> ClaimStates {
    view.claims
        .iter()
        .map(|c| {
            let key = (
                c.metadata.namespace.clone().unwrap_or_default(),
                c.metadata.name.clone().unwrap_or_default(),
            );
            let volume = c.spec.as_ref().and_then(|s| s.volume_name.clone());
            let phase = c.status.as_ref().and_then(|s| s.phase.clone());
            (key, (volume, phase))
        })
        .collect()
}

/// The claims whose state differs between two views (added, changed or
/// gone), as objects, for `objects::Changes::bump_for`.
pub fn changed_claims(before: &ClaimStates, now: &ClaimStates) -> Vec<crate::objects::ObjectRef> {
    let keys: std::collections::BTreeSet<_> = before.keys().chain(now.keys()).collect();
    keys.into_iter()
        .filter(|k| before.get(*k) != now.get(*k))
        .map(|(namespace, name)| crate::objects::ObjectRef {
            kind: crate::objects::Kind::PersistentVolumeClaim,
            namespace: namespace.clone(),
            name: name.clone(),
        })
        .collect()
}

fn claim_id(key: &ClaimKey) -> String {
    format!("{}/{}", key.0, key.1)
}

/// A stable uid for a claim that has none (see the module header).
pub fn derived_uid(namespace: &str, name: &str, created: jiff::Timestamp) -> String {
    use md5::{Digest, Md5};
    let h = Md5::digest(format!("claim:{namespace}/{name}@{created}").as_bytes());
    let x: String = h.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// The claims a pod of the snapshot uses.
pub fn used_claims(snapshot: &Snapshot) -> BTreeSet<ClaimKey> {
    let mut out = BTreeSet::new();
    for p in snapshot.pods.values() {
        let ns = p.namespace().to_string();
        for v in p.pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            if let Some(c) = &v.persistent_volume_claim {
                out.insert((ns.clone(), c.claim_name.clone()));
            }
        }
    }
    out
}

/// The PV a CreateVolume made (the external-provisioner's shape).
pub fn provisioned_pv(
    req: &Provision,
    made: &CreatedVolume,
    now: jiff::Timestamp,
) -> PersistentVolume {
    let capacity = if made.capacity > 0 {
        made.capacity
    } else {
        req.capacity
    };
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(req.name.clone()),
            annotations: Some(BTreeMap::from([(
                PROVISIONED_BY.to_string(),
                req.driver.clone(),
            )])),
            creation_timestamp: Some(Time(now)),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: Some(req.access_modes.clone()),
            capacity: Some(BTreeMap::from([(
                "storage".to_string(),
                crate::api::node::bytes_quantity(capacity),
            )])),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: Some(req.claim.namespace.clone()),
                name: Some(req.claim.name.clone()),
                uid: Some(req.claim.uid.clone()),
                ..Default::default()
            }),
            csi: Some(CSIPersistentVolumeSource {
                driver: req.driver.clone(),
                volume_handle: made.volume_id.clone(),
                volume_attributes: (!made.volume_context.is_empty())
                    .then(|| made.volume_context.clone()),
                fs_type: req.fs_type.clone(),
                ..Default::default()
            }),
            mount_options: (!req.mount_options.is_empty()).then(|| req.mount_options.clone()),
            persistent_volume_reclaim_policy: Some(req.reclaim_policy.clone()),
            storage_class_name: Some(req.class.clone()),
            volume_mode: Some(req.volume_mode.clone()),
            ..Default::default()
        }),
        status: None,
    }
}

/// The standalone claim controller (see the module header). Shared: the
/// loop syncs it, the CSI volume plugin resolves claims through it.
pub struct Claims {
    path: PathBuf,
    provisioner: Option<Arc<dyn Provisioner>>,
    state: Mutex<State>,
    /// The last failure of a driver call, by PV name.
    errors: Mutex<BTreeMap<String, String>>,
    view: watch::Sender<VolumesView>,
}

/// The state file under the state dir.
pub fn state_path(state_dir: &Path) -> PathBuf {
    state_dir.join("volumes").join("claims.json")
}

/// At most this many CreateVolume (and DeleteVolume) calls at once.
const PARALLEL_VOLUME_CALLS: usize = 16;

impl Claims {
    /// Load `<stateDir>/volumes/claims.json` (none yet: empty).
    pub fn open(
        state_dir: &Path,
        provisioner: Option<Arc<dyn Provisioner>>,
    ) -> Result<Claims, ProvisionError> {
        let path = state_path(state_dir);
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| ProvisionError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(source) => return Err(ProvisionError::Read { path, source }),
        };
        Ok(Claims {
            path,
            provisioner,
            state: Mutex::new(state),
            errors: Mutex::new(BTreeMap::new()),
            view: watch::channel(VolumesView::default()).0,
        })
    }

    /// The PVs and PVCs as last synced.
    pub fn view(&self) -> watch::Receiver<VolumesView> {
        self.view.subscribe()
    }

    fn persist(&self, state: &State) -> Result<(), ProvisionError> {
        let bytes = serde_json::to_vec_pretty(state).unwrap_or_default();
        let dir = self.path.parent().unwrap_or(Path::new("."));
        crate::cni::cache::write_atomic(dir, &self.path, &bytes, 0o600).map_err(|source| {
            ProvisionError::Write {
                path: self.path.clone(),
                source,
            }
        })
    }

    /// Change the state and write it (only when it changed).
    fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T, ProvisionError> {
        let mut st = lock(&self.state);
        let before = st.clone();
        let out = f(&mut st);
        if *st != before
            && let Err(e) = self.persist(&st)
        {
            // Not recorded: not done (the next sync tries again).
            *st = before;
            return Err(e);
        }
        Ok(out)
    }

    fn can_provision(&self, driver: &str) -> bool {
        self.provisioner
            .as_ref()
            .is_some_and(|p| p.can_provision(driver))
    }

    /// One reconcile: bind, record, then drive CreateVolume / DeleteVolume.
    /// `hold_deletes`: the manifest dir has errors (see the module header).
    pub async fn sync(
        &self,
        objects: &Objects,
        used: &BTreeSet<ClaimKey>,
        hold_deletes: bool,
        now: jiff::Timestamp,
    ) -> Result<(), ProvisionError> {
        let plan = self.decide(objects, used, hold_deletes, now)?;
        // Volumes are made and deleted side by side (each call's record is
        // written on its own, under the state lock), so 30 claims written
        // at once do not wait for each other's CreateVolume.
        use futures::StreamExt;
        let creating = self.records(|r| match r {
            VolumeRecord::Creating { request } => Some((**request).clone()),
            _ => None,
        });
        let created: Vec<Result<bool, ProvisionError>> = futures::stream::iter(creating)
            .map(|(name, req)| async move {
                let done = self.create(&name, &req, now).await?;
                if done {
                    // Bound and shown at once: its pod does not wait for
                    // the other claims' CreateVolume calls.
                    let plan = self.decide(objects, used, hold_deletes, now)?;
                    self.publish_view(objects, &plan);
                }
                Ok(done)
            })
            .buffer_unordered(PARALLEL_VOLUME_CALLS)
            .collect()
            .await;
        let deleting = self.records(|r| match r {
            VolumeRecord::Deleting { pv } => Some(pv.clone()),
            _ => None,
        });
        let deleted: Vec<Result<bool, ProvisionError>> = futures::stream::iter(deleting)
            .map(|(name, pv)| async move { self.delete(&name, &pv).await })
            .buffer_unordered(PARALLEL_VOLUME_CALLS)
            .collect()
            .await;
        let mut changed = false;
        for r in created.into_iter().chain(deleted) {
            changed |= r?;
        }
        let plan = if changed {
            self.decide(objects, used, hold_deletes, now)?
        } else {
            plan
        };
        self.publish_view(objects, &plan);
        Ok(())
    }

    fn records<T>(&self, pick: impl Fn(&VolumeRecord) -> Option<T>) -> Vec<(String, T)> {
        lock(&self.state)
            .volumes
            .iter()
            .filter_map(|(n, r)| pick(r).map(|t| (n.clone(), t)))
            .collect()
    }

    /// Plan and record (claims' uids, bindings, intended creations and
    /// deletions) before any driver call.
    fn decide(
        &self,
        objects: &Objects,
        used: &BTreeSet<ClaimKey>,
        hold_deletes: bool,
        now: jiff::Timestamp,
    ) -> Result<Plan, ProvisionError> {
        self.update(|st| {
            // Uids: kept while the claim stays, new for a new claim.
            let mut records = BTreeMap::new();
            let mut list = Vec::new();
            for ((ns, name), pvc) in &objects.claims {
                let id = claim_id(&(ns.clone(), name.clone()));
                let own = pvc.metadata.uid.clone().filter(|u| !u.is_empty());
                let rec = match st.claims.get(&id) {
                    Some(r) if own.as_ref().is_none_or(|u| *u == r.uid) => r.clone(),
                    _ => {
                        let created = pvc
                            .metadata
                            .creation_timestamp
                            .as_ref()
                            .map_or(now, |t| t.0);
                        ClaimRecord {
                            uid: own.unwrap_or_else(|| derived_uid(ns, name, created)),
                            first_seen: now,
                            binding: None,
                        }
                    }
                };
                list.push(Claim {
                    key: (ns.clone(), name.clone()),
                    uid: rec.uid.clone(),
                    pvc: pvc.clone(),
                });
                records.insert(id, rec);
            }
            st.claims = records;
            let volumes = volumes_of(objects, st);
            let classes: BTreeMap<String, _> = objects
                .classes
                .iter()
                .map(|((_, n), c)| (n.clone(), c.clone()))
                .collect();
            let bindings: BTreeMap<ClaimKey, claims::Binding> = st
                .claims
                .iter()
                .filter_map(|(id, r)| {
                    let (ns, name) = id.split_once('/')?;
                    Some(((ns.into(), name.into()), r.binding.clone()?))
                })
                .collect();
            let creating: BTreeSet<ClaimKey> = st
                .volumes
                .values()
                .filter_map(|r| match r {
                    VolumeRecord::Creating { request } => Some(request.claim.key()),
                    _ => None,
                })
                .collect();
            let can = |d: &str| self.can_provision(d);
            let plan = claims::plan(claims::Input {
                claims: &list,
                volumes: &volumes,
                classes: &classes,
                refs: &st.refs,
                bindings: &bindings,
                used,
                creating: &creating,
                can_provision: &can,
            });
            st.refs = plan.refs.clone();
            for (key, b) in &plan.bindings {
                if let Some(r) = st.claims.get_mut(&claim_id(key)) {
                    r.binding = Some(b.clone());
                }
            }
            for p in &plan.provision {
                info!(claim = %claim_id(&p.claim.key()), volume = %p.name, driver = %p.driver, "provisioning a volume");
                st.volumes
                    .entry(p.name.clone())
                    .or_insert_with(|| VolumeRecord::Creating {
                        request: Box::new(p.clone()),
                    });
            }
            if !hold_deletes {
                for name in &plan.delete {
                    if let Some(VolumeRecord::Created { pv }) = st.volumes.get(name) {
                        info!(volume = %name, "claim gone, reclaim policy Delete: deleting the volume");
                        let pv = pv.clone();
                        st.volumes
                            .insert(name.clone(), VolumeRecord::Deleting { pv });
                    }
                }
            } else if !plan.delete.is_empty() {
                warn!(volumes = ?plan.delete, "the manifest dir has errors: volumes of gone claims are not deleted until it is clean");
            }
            plan
        })
    }

    fn note(&self, name: &str, result: Result<(), String>) {
        let mut errors = lock(&self.errors);
        match result {
            Ok(()) => {
                errors.remove(name);
            }
            Err(e) => {
                warn!(volume = %name, error = %e, "volume call failed; retrying");
                errors.insert(name.to_string(), e);
            }
        }
    }

    /// Drive one CreateVolume; true when it completed.
    async fn create(
        &self,
        name: &str,
        req: &Provision,
        now: jiff::Timestamp,
    ) -> Result<bool, ProvisionError> {
        let Some(p) = self.provisioner.as_ref() else {
            self.note(
                name,
                Err(format!(
                    "CreateVolume on driver {:?}: no CSI driver is configured",
                    req.driver
                )),
            );
            return Ok(false);
        };
        match p.create_volume(req).await {
            Ok(made) => {
                self.note(name, Ok(()));
                let pv = Box::new(provisioned_pv(req, &made, now));
                info!(volume = %name, handle = %made.volume_id, "volume created");
                self.update(|st| {
                    st.volumes
                        .insert(name.to_string(), VolumeRecord::Created { pv });
                })?;
                Ok(true)
            }
            Err(e) => {
                self.note(
                    name,
                    Err(format!("CreateVolume on driver {:?}: {e}", req.driver)),
                );
                Ok(false)
            }
        }
    }

    /// Drive one unpublish + DeleteVolume; true when it completed.
    async fn delete(&self, name: &str, pv: &PersistentVolume) -> Result<bool, ProvisionError> {
        let Some(p) = self.provisioner.as_ref() else {
            self.note(
                name,
                Err("DeleteVolume: no CSI driver is configured".into()),
            );
            return Ok(false);
        };
        let Some(csi) = pv.spec.as_ref().and_then(|s| s.csi.as_ref()) else {
            return Ok(false);
        };
        let published = lock(&self.state).published.get(name).cloned();
        if let Some(pb) = published {
            if let Err(e) = p
                .controller_unpublish(&pb.driver, &pb.volume_id, &pb.node_id)
                .await
            {
                self.note(
                    name,
                    Err(format!(
                        "ControllerUnpublishVolume on driver {:?}: {e}",
                        pb.driver
                    )),
                );
                return Ok(false);
            }
            self.update(|st| {
                st.published.remove(name);
            })?;
        }
        match p.delete_volume(&csi.driver, &csi.volume_handle).await {
            Ok(()) => {
                self.note(name, Ok(()));
                info!(volume = %name, "volume deleted");
                self.update(|st| {
                    st.volumes.remove(name);
                    st.refs.remove(name);
                })?;
                Ok(true)
            }
            Err(e) => {
                self.note(
                    name,
                    Err(format!("DeleteVolume on driver {:?}: {e}", csi.driver)),
                );
                Ok(false)
            }
        }
    }

    /// The PVs and PVCs with the plan's phases.
    fn publish_view(&self, objects: &Objects, plan: &Plan) {
        let st = lock(&self.state).clone();
        let errors = lock(&self.errors).clone();
        let mut view = VolumesView::default();
        let default = claims::default_class(
            &objects
                .classes
                .iter()
                .map(|((_, n), c)| (n.clone(), c.clone()))
                .collect(),
        );
        for v in volumes_of(objects, &st) {
            let mut pv = (*v.pv).clone();
            let name = pv.metadata.name.clone().unwrap_or_default();
            let Some(s) = plan.volumes.get(&name) else {
                continue;
            };
            let spec = pv.spec.get_or_insert_with(Default::default);
            if let Some(r) = &s.claim {
                spec.claim_ref = Some(ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("PersistentVolumeClaim".into()),
                    namespace: Some(r.namespace.clone()),
                    name: Some(r.name.clone()),
                    uid: (!r.uid.is_empty()).then(|| r.uid.clone()),
                    ..Default::default()
                });
            }
            let failed = errors.get(&name);
            let deleting = matches!(st.volumes.get(&name), Some(VolumeRecord::Deleting { .. }));
            pv.status = Some(PersistentVolumeStatus {
                phase: Some(
                    if failed.is_some() && deleting {
                        "Failed"
                    } else {
                        s.phase.as_str()
                    }
                    .into(),
                ),
                reason: failed
                    .map(|_| "VolumeFailedDelete".to_string())
                    .or_else(|| s.reason.as_ref().map(|_| "VolumeFailed".to_string())),
                message: failed.cloned().or_else(|| s.reason.clone()),
                ..Default::default()
            });
            view.volumes.push(pv);
        }
        for ((ns, name), pvc) in &objects.claims {
            let key = (ns.clone(), name.clone());
            let Some(s) = plan.claims.get(&key) else {
                continue;
            };
            let mut c = (**pvc).clone();
            let id = claim_id(&key);
            let rec = st.claims.get(&id);
            if c.metadata.uid.is_none() {
                c.metadata.uid = rec.map(|r| r.uid.clone());
            }
            if c.metadata.creation_timestamp.is_none() {
                c.metadata.creation_timestamp = rec.map(|r| Time(r.first_seen));
            }
            c.metadata.namespace = Some(ns.clone());
            let class = claims::claim_class(&c, default.as_deref());
            let spec = c.spec.get_or_insert_with(Default::default);
            if !class.is_empty() {
                spec.storage_class_name = Some(class);
            }
            let bound = view.volumes.iter().find(|v| {
                s.phase == ClaimPhase::Bound && v.metadata.name.as_deref() == s.volume.as_deref()
            });
            if let Some(v) = &s.volume {
                spec.volume_name = Some(v.clone());
            }
            c.status = Some(PersistentVolumeClaimStatus {
                phase: Some(s.phase.as_str().into()),
                access_modes: bound.and_then(|v| v.spec.as_ref()?.access_modes.clone()),
                capacity: bound.and_then(|v| v.spec.as_ref()?.capacity.clone()),
                ..Default::default()
            });
            if let Some(r) = &s.reason {
                // A failing CreateVolume says more than "waiting".
                let pv_name = format!("pvc-{}", rec.map(|r| r.uid.as_str()).unwrap_or_default());
                let r = errors.get(&pv_name).cloned().unwrap_or_else(|| r.clone());
                view.waiting.insert(id, r);
            }
            view.claims.push(c);
        }
        self.view.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
    }

    async fn publish(
        &self,
        pv: &PersistentVolume,
        readonly: bool,
    ) -> Result<BTreeMap<String, String>, ClaimError> {
        let name = pv.metadata.name.clone().unwrap_or_default();
        let Some(csi) = pv.spec.as_ref().and_then(|s| s.csi.as_ref()) else {
            return Ok(BTreeMap::new());
        };
        let Some(p) = self.provisioner.as_ref() else {
            return Ok(BTreeMap::new());
        };
        let Some(node_id) = p.publish_node(&csi.driver) else {
            return Ok(BTreeMap::new());
        };
        if let Some(pb) = lock(&self.state).published.get(&name)
            && pb.node_id == node_id
            && pb.volume_id == csi.volume_handle
        {
            return Ok(pb.context.clone());
        }
        let spec = pv.spec.clone().unwrap_or_default();
        let req = Publish {
            driver: csi.driver.clone(),
            volume_id: csi.volume_handle.clone(),
            node_id: node_id.clone(),
            readonly: readonly || csi.read_only == Some(true),
            access_modes: spec.access_modes.clone().unwrap_or_default(),
            volume_mode: spec
                .volume_mode
                .clone()
                .unwrap_or_else(|| "Filesystem".into()),
            fs_type: csi.fs_type.clone(),
            mount_options: spec.mount_options.clone().unwrap_or_default(),
            volume_context: csi.volume_attributes.clone().unwrap_or_default(),
        };
        let context = p
            .controller_publish(&req)
            .await
            .map_err(|e| ClaimError::Publish {
                driver: csi.driver.clone(),
                volume: name.clone(),
                message: e.0,
            })?;
        let recorded = Published {
            driver: csi.driver.clone(),
            volume_id: csi.volume_handle.clone(),
            node_id,
            context: context.clone(),
        };
        // Not recorded: published again next time (idempotent), and
        // unpublished at deletion only if recorded; say so in the log.
        if let Err(e) = self.update(|st| {
            st.published.insert(name.clone(), recorded);
        }) {
            warn!(volume = %name, error = %crate::error_chain(&e), "cannot record ControllerPublishVolume");
        }
        Ok(context)
    }
}

/// The volumes the binder sees: the manifest dir's, then minilet's own
/// (a name the manifest dir defines too stays the manifest dir's).
fn volumes_of(objects: &Objects, st: &State) -> Vec<claims::Volume> {
    let mut out: Vec<claims::Volume> = objects
        .volumes
        .values()
        .map(|pv| claims::Volume {
            pv: pv.clone(),
            provisioned: false,
        })
        .collect();
    for (name, r) in &st.volumes {
        let pv = match r {
            VolumeRecord::Created { pv } | VolumeRecord::Deleting { pv } => pv,
            VolumeRecord::Creating { .. } => continue,
        };
        if objects.volumes.contains_key(&(String::new(), name.clone())) {
            continue;
        }
        out.push(claims::Volume {
            pv: Arc::new((**pv).clone()),
            provisioned: true,
        });
    }
    out
}

impl ClaimResolver for Claims {
    fn resolve<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        readonly: bool,
    ) -> BoxFuture<'a, Result<ResolvedClaim, ClaimError>> {
        Box::pin(async move {
            let (claim, volume) = {
                let view = self.view.borrow();
                let Some(claim) = view.claims.iter().find(|c| {
                    c.metadata.namespace.as_deref() == Some(namespace)
                        && c.metadata.name.as_deref() == Some(name)
                }) else {
                    return Err(ClaimError::NotFound {
                        namespace: namespace.into(),
                        name: name.into(),
                    });
                };
                let reason = view.waiting.get(&format!("{namespace}/{name}")).cloned();
                let volume = super::resolve::bound_volume(claim, reason)?;
                let Some(pv) = view
                    .volumes
                    .iter()
                    .find(|v| v.metadata.name.as_deref() == Some(volume.as_str()))
                else {
                    return Err(ClaimError::VolumeNotFound {
                        claim: name.into(),
                        volume,
                    });
                };
                (Arc::new(claim.clone()), Arc::new(pv.clone()))
            };
            let publish_context = self.publish(&volume, readonly).await?;
            Ok(ResolvedClaim {
                claim,
                volume,
                publish_context,
            })
        })
    }
}

/// Keep `claims` synced with the snapshots (standalone mode), every change
/// and every [`RESYNC`], until cancelled. Waits for every source to list
/// first: claims missing from a half-read dir must not look gone.
pub async fn run(
    claims: Arc<Claims>,
    mut snapshots: watch::Receiver<Snapshot>,
    cancel: CancellationToken,
) {
    loop {
        let (objects, used, dirty, synced) = {
            let s = snapshots.borrow_and_update();
            (
                s.all_objects(),
                used_claims(&s),
                !s.errors.is_empty(),
                s.synced(),
            )
        };
        if synced
            && let Err(e) = claims
                .sync(&objects, &used, dirty, jiff::Timestamp::now())
                .await
        {
            warn!(error = %crate::error_chain(&e), "claims sync failed; retrying");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = snapshots.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(RESYNC) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_change_names_the_claims_it_changed() {
        let claim = |name: &str, volume: Option<&str>| PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PersistentVolumeClaimSpec {
                volume_name: volume.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        };
        let view = |claims: Vec<PersistentVolumeClaim>| VolumesView {
            claims,
            ..Default::default()
        };
        let a = claim_states(&view(vec![claim("a", None), claim("b", None)]));
        let b = claim_states(&view(vec![
            claim("a", Some("pv-a")),
            claim("b", None),
            claim("c", None),
        ]));
        let names: Vec<String> = changed_claims(&a, &b).into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["a", "c"]);
        let names: Vec<String> = changed_claims(&b, &a).into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["a", "c"], "a claim gone counts too");
    }
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Records calls; fails CreateVolume while `fail_create` > 0.
    #[derive(Default)]
    struct FakeDriver {
        calls: Mutex<Vec<String>>,
        fail_create: AtomicUsize,
        fail_delete: AtomicUsize,
        publishes: bool,
        /// CreateVolume of a name containing this waits for the notify.
        hold: Option<(String, Arc<tokio::sync::Notify>)>,
    }

    impl Provisioner for FakeDriver {
        fn can_provision(&self, driver: &str) -> bool {
            driver == "test.csi"
        }
        fn publish_node(&self, _driver: &str) -> Option<String> {
            self.publishes.then(|| "node-1".to_string())
        }
        fn create_volume<'a>(
            &'a self,
            req: &'a Provision,
        ) -> BoxFuture<'a, Result<CreatedVolume, CallError>> {
            lock(&self.calls).push(format!("create {}", req.name));
            let fail = self
                .fail_create
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let hold = self
                .hold
                .as_ref()
                .filter(|(n, _)| req.name.contains(n.as_str()))
                .map(|(_, gate)| gate.clone());
            Box::pin(async move {
                if let Some(gate) = hold {
                    gate.notified().await;
                }
                if fail {
                    return Err(CallError("Unavailable: driver restarting".into()));
                }
                Ok(CreatedVolume {
                    volume_id: format!("vol-{}", req.name),
                    capacity: 0,
                    volume_context: BTreeMap::from([("path".into(), "/srv".into())]),
                })
            })
        }
        fn delete_volume<'a>(
            &'a self,
            _driver: &'a str,
            volume_id: &'a str,
        ) -> BoxFuture<'a, Result<(), CallError>> {
            lock(&self.calls).push(format!("delete {volume_id}"));
            let fail = self
                .fail_delete
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            Box::pin(async move {
                if fail {
                    Err(CallError("Internal: busy".into()))
                } else {
                    Ok(())
                }
            })
        }
        fn controller_publish<'a>(
            &'a self,
            req: &'a Publish,
        ) -> BoxFuture<'a, Result<BTreeMap<String, String>, CallError>> {
            lock(&self.calls).push(format!("publish {} {}", req.volume_id, req.node_id));
            Box::pin(async { Ok(BTreeMap::from([("device".into(), "/dev/loop7".into())])) })
        }
        fn controller_unpublish<'a>(
            &'a self,
            _driver: &'a str,
            volume_id: &'a str,
            node_id: &'a str,
        ) -> BoxFuture<'a, Result<(), CallError>> {
            lock(&self.calls).push(format!("unpublish {volume_id} {node_id}"));
            Box::pin(async { Ok(()) })
        }
    }

    fn objects(with_claim: bool, class_extra: serde_json::Value) -> Objects {
        let mut o = Objects::default();
        let mut sc = serde_json::json!({"metadata": {"name": "fast"}, "provisioner": "test.csi",
            "parameters": {"csi.storage.k8s.io/fstype": "ext4"}});
        if let (Some(a), serde_json::Value::Object(b)) = (sc.as_object_mut(), class_extra) {
            a.extend(b);
        }
        o.classes.insert(
            (String::new(), "fast".into()),
            Arc::new(serde_json::from_value(sc).unwrap()),
        );
        if with_claim {
            o.claims.insert(
                ("default".into(), "data".into()),
                Arc::new(
                    serde_json::from_value(serde_json::json!({
                        "metadata": {"name": "data", "namespace": "default",
                                     "creationTimestamp": "2026-12-01T10:00:00Z"},
                        "spec": {"storageClassName": "fast", "accessModes": ["ReadWriteOnce"],
                                 "resources": {"requests": {"storage": "64Mi"}}},
                    }))
                    .unwrap(),
                ),
            );
        }
        o
    }

    fn t0() -> jiff::Timestamp {
        "2026-12-01T12:00:00Z".parse().unwrap()
    }

    fn calls(d: &FakeDriver) -> Vec<String> {
        lock(&d.calls).clone()
    }

    #[tokio::test]
    async fn a_claim_is_provisioned_once_bound_and_its_volume_deleted_when_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let driver = Arc::new(FakeDriver::default());
        let claims = Claims::open(dir.path(), Some(driver.clone())).unwrap();
        let used = BTreeSet::new();
        let o = objects(true, serde_json::json!({}));
        claims.sync(&o, &used, false, t0()).await.unwrap();
        let uid = derived_uid("default", "data", "2026-12-01T10:00:00Z".parse().unwrap());
        let name = format!("pvc-{uid}");
        assert_eq!(calls(&driver), [format!("create {name}")]);
        let view = claims.view().borrow().clone();
        assert_eq!(view.claims.len(), 1);
        let c = &view.claims[0];
        assert_eq!(c.status.as_ref().unwrap().phase.as_deref(), Some("Bound"));
        assert_eq!(
            c.spec.as_ref().unwrap().volume_name.as_deref(),
            Some(name.as_str())
        );
        let pv = &view.volumes[0];
        let csi = pv.spec.as_ref().unwrap().csi.as_ref().unwrap();
        assert_eq!(csi.driver, "test.csi");
        assert_eq!(csi.volume_handle, format!("vol-{name}"));
        assert_eq!(csi.fs_type.as_deref(), Some("ext4"));
        assert_eq!(
            pv.metadata.annotations.as_ref().unwrap()[PROVISIONED_BY],
            "test.csi"
        );
        assert_eq!(
            pv.spec.as_ref().unwrap().capacity.as_ref().unwrap()["storage"].0,
            "64Mi"
        );
        assert_eq!(pv.status.as_ref().unwrap().phase.as_deref(), Some("Bound"));
        // Again: nothing new.
        claims.sync(&o, &used, false, t0()).await.unwrap();
        assert_eq!(calls(&driver).len(), 1);
        // The resolver finds it.
        let got = claims.resolve("default", "data", false).await.unwrap();
        assert_eq!(got.volume.metadata.name.as_deref(), Some(name.as_str()));
        // The claim goes while the dir has errors: held. Then deleted.
        let gone = objects(false, serde_json::json!({}));
        claims.sync(&gone, &used, true, t0()).await.unwrap();
        assert_eq!(calls(&driver).len(), 1);
        claims.sync(&gone, &used, false, t0()).await.unwrap();
        assert_eq!(calls(&driver)[1], format!("delete vol-{name}"));
        assert!(claims.view().borrow().volumes.is_empty());
        let e = claims.resolve("default", "data", false).await.unwrap_err();
        assert_eq!(e.to_string(), "persistentvolumeclaim \"data\" not found");
    }

    #[tokio::test]
    async fn each_claim_is_bound_as_soon_as_its_own_volume_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let slow = derived_uid("default", "slow", "2026-12-01T10:00:00Z".parse().unwrap());
        let gate = Arc::new(tokio::sync::Notify::new());
        let driver = Arc::new(FakeDriver {
            hold: Some((slow, gate.clone())),
            ..Default::default()
        });
        let claims = Arc::new(Claims::open(dir.path(), Some(driver.clone())).unwrap());
        let mut o = objects(true, serde_json::json!({}));
        let mut slow_claim = (*o.claims[&("default".to_string(), "data".to_string())]).clone();
        slow_claim.metadata.name = Some("slow".into());
        o.claims
            .insert(("default".into(), "slow".into()), Arc::new(slow_claim));
        let sync = {
            let (claims, o) = (claims.clone(), o.clone());
            tokio::spawn(async move { claims.sync(&o, &BTreeSet::new(), false, t0()).await })
        };
        let phase = |v: &VolumesView, name: &str| {
            v.claims
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(name))
                .and_then(|c| c.status.as_ref()?.phase.clone())
        };
        let mut view = claims.view();
        let seen = tokio::time::timeout(
            Duration::from_secs(5),
            view.wait_for(|v| phase(v, "data").as_deref() == Some("Bound")),
        )
        .await
        .expect("data bound while slow's CreateVolume is still in flight")
        .unwrap()
        .clone();
        assert_eq!(phase(&seen, "slow").as_deref(), Some("Pending"));
        assert!(claims.resolve("default", "data", false).await.is_ok());
        gate.notify_one();
        sync.await.unwrap().unwrap();
        assert_eq!(
            phase(&claims.view().borrow(), "slow").as_deref(),
            Some("Bound")
        );
    }

    #[tokio::test]
    async fn a_restart_mid_create_retries_the_same_name_and_never_makes_two() {
        let dir = tempfile::tempdir().unwrap();
        let driver = Arc::new(FakeDriver::default());
        driver.fail_create.store(1, Ordering::SeqCst);
        let o = objects(true, serde_json::json!({}));
        {
            let claims = Claims::open(dir.path(), Some(driver.clone())).unwrap();
            claims
                .sync(&o, &BTreeSet::new(), false, t0())
                .await
                .unwrap();
            let view = claims.view().borrow().clone();
            assert_eq!(
                view.claims[0].status.as_ref().unwrap().phase.as_deref(),
                Some("Pending")
            );
            let why = &view.waiting["default/data"];
            assert!(
                why.contains("CreateVolume on driver \"test.csi\": Unavailable"),
                "{why}"
            );
            let e = claims.resolve("default", "data", false).await.unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("PersistentVolumeClaim \"data\" is not bound: CreateVolume"),
                "{e}"
            );
        }
        // The intent is on disk before the call.
        let text = std::fs::read_to_string(state_path(dir.path())).unwrap();
        assert!(text.contains("\"state\": \"creating\""), "{text}");
        // A new agent, a later time: the same name again, one volume.
        let claims = Claims::open(dir.path(), Some(driver.clone())).unwrap();
        let later: jiff::Timestamp = "2026-12-01T13:00:00Z".parse().unwrap();
        claims
            .sync(&o, &BTreeSet::new(), false, later)
            .await
            .unwrap();
        let c = calls(&driver);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0], c[1]);
        let view = claims.view().borrow().clone();
        assert_eq!(
            view.claims[0].status.as_ref().unwrap().phase.as_deref(),
            Some("Bound")
        );
        assert_eq!(view.volumes.len(), 1);
    }

    #[tokio::test]
    async fn without_a_driver_the_claim_waits_saying_so() {
        let dir = tempfile::tempdir().unwrap();
        let claims = Claims::open(dir.path(), None).unwrap();
        claims
            .sync(
                &objects(true, serde_json::json!({})),
                &BTreeSet::new(),
                false,
                t0(),
            )
            .await
            .unwrap();
        let view = claims.view().borrow().clone();
        assert_eq!(
            view.waiting["default/data"],
            "waiting for the CSI driver \"test.csi\" to be registered on this node (no provisioner for class \"fast\")"
        );
    }

    #[tokio::test]
    async fn wait_for_first_consumer_provisions_once_a_pod_uses_the_claim() {
        let dir = tempfile::tempdir().unwrap();
        let driver = Arc::new(FakeDriver::default());
        let claims = Claims::open(dir.path(), Some(driver.clone())).unwrap();
        let o = objects(
            true,
            serde_json::json!({"volumeBindingMode": "WaitForFirstConsumer"}),
        );
        claims
            .sync(&o, &BTreeSet::new(), false, t0())
            .await
            .unwrap();
        assert!(calls(&driver).is_empty());
        let used = BTreeSet::from([("default".to_string(), "data".to_string())]);
        claims.sync(&o, &used, false, t0()).await.unwrap();
        assert_eq!(calls(&driver).len(), 1);
    }

    #[tokio::test]
    async fn publish_happens_once_and_unpublish_before_delete() {
        let dir = tempfile::tempdir().unwrap();
        let driver = Arc::new(FakeDriver {
            publishes: true,
            ..Default::default()
        });
        driver.fail_delete.store(1, Ordering::SeqCst);
        let claims = Claims::open(dir.path(), Some(driver.clone())).unwrap();
        let o = objects(true, serde_json::json!({}));
        claims
            .sync(&o, &BTreeSet::new(), false, t0())
            .await
            .unwrap();
        let a = claims.resolve("default", "data", false).await.unwrap();
        let b = claims.resolve("default", "data", false).await.unwrap();
        assert_eq!(a.publish_context["device"], "/dev/loop7");
        assert_eq!(b.publish_context, a.publish_context);
        let gone = objects(false, serde_json::json!({}));
        claims
            .sync(&gone, &BTreeSet::new(), false, t0())
            .await
            .unwrap();
        // The first DeleteVolume failed: Failed, kept, retried.
        let view = claims.view().borrow().clone();
        let st = view.volumes[0].status.clone().unwrap();
        assert_eq!(st.phase.as_deref(), Some("Failed"));
        assert!(st.message.unwrap().contains("Internal: busy"));
        claims
            .sync(&gone, &BTreeSet::new(), false, t0())
            .await
            .unwrap();
        let c = calls(&driver);
        let verbs: Vec<&str> = c.iter().map(|c| c.split(' ').next().unwrap()).collect();
        assert_eq!(
            verbs,
            ["create", "publish", "unpublish", "delete", "delete"]
        );
        assert!(claims.view().borrow().volumes.is_empty());
    }

    #[test]
    fn derived_uids_are_uuid_shaped_and_stable() {
        let t = t0();
        let a = derived_uid("default", "data", t);
        assert_eq!(a, derived_uid("default", "data", t));
        assert_ne!(a, derived_uid("default", "data2", t));
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
    }

    #[test]
    fn a_corrupt_state_file_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "{not json").unwrap();
        let Err(e) = Claims::open(dir.path(), None) else {
            panic!("opened a corrupt state file");
        };
        assert!(crate::error_chain(&e).contains("not a valid claims state file"));
    }
}
