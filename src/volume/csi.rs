//! The CSI volume plugin, node side: kubelet's `kubernetes.io/csi` for
//! the pod's `csi` (inline ephemeral) volumes and the
//! `persistentVolumeClaim` volumes whose PersistentVolume is CSI.
//!
//! Set up: for a persistent volume of a driver with STAGE_UNSTAGE_VOLUME,
//! NodeStageVolume once per node at the global staging path (shared by
//! every pod using the volume), then NodePublishVolume per pod at
//! `<root>/pods/<uid>/volumes/kubernetes.io~csi/<specVolID>/mount`, then
//! the pod's fsGroup per the driver's fsGroupPolicy. Tear down, from
//! what is on disk alone: NodeUnpublishVolume, and NodeUnstageVolume once
//! no pod's record names the volume any more. Each step is recorded in
//! kubelet's `vol_data.json` files (`state`) before it is asked of the
//! driver, so a restarted agent neither stages twice nor forgets to
//! unstage; the pod's record is written first and removed last, so
//! whatever a crash interrupts, the pod's teardown finds and undoes.
//! Set up and tear down of one volume (driver + handle) are serialised by
//! a per-volume lock; different volumes proceed in parallel.
//!
//! Side effects: CSI node calls (through `NodeService`), mkdir/rmdir and
//! record files under the root dir, fsGroup ownership changes (through
//! `HostFs`), secret reads (through `ObjectLookup`).

pub mod cluster;
mod host;
pub mod node;
pub mod state;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{PersistentVolume, Pod, Volume};

pub use host::{ChangePolicy, Host, HostFs};
pub use node::{
    AccessMode, Call, Capabilities, DriverPolicy, FsGroupPolicy, NodeError, NodeService,
    PublishRequest, Secrets, StageRequest, UnpublishRequest, UnstageRequest, VolumeCapability,
};
use state::{Lifecycle, PublishData, StageData};

use super::VolumeError;
use crate::objects::ObjectLookup;

pub use super::resolve::ClaimResolver;

/// Who a CSI secret reference points at: (namespace, name).
type SecretRef = (String, String);

/// What one pod volume asks of its driver, from the pod spec and the PV.
#[derive(Clone, Debug, PartialEq)]
struct Source {
    /// kubelet's specVolID: the PV name, or the pod's volume name inline.
    spec_name: String,
    driver: String,
    handle: String,
    lifecycle: Lifecycle,
    readonly: bool,
    /// The PV's first access mode (as kubelet), ReadWriteOnce inline.
    access_mode: String,
    /// The PV's access modes, for the fsGroup rule; `None` inline.
    pv_access_modes: Option<Vec<String>>,
    fs_type: String,
    mount_flags: Vec<String>,
    volume_context: BTreeMap<String, String>,
    stage_secret: Option<SecretRef>,
    publish_secret: Option<SecretRef>,
}

fn namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

impl Source {
    /// The volume's source; `Err(reason)` when it is not a volume this
    /// plugin can set up.
    fn of(
        pod: &Pod,
        pod_uid: &str,
        v: &Volume,
        pv: Option<&PersistentVolume>,
    ) -> Result<Source, String> {
        if let Some(csi) = &v.csi {
            return Ok(Source {
                spec_name: v.name.clone(),
                driver: csi.driver.clone(),
                handle: state::ephemeral_handle(pod_uid, &v.name),
                lifecycle: Lifecycle::Ephemeral,
                readonly: csi.read_only.unwrap_or(false),
                access_mode: "ReadWriteOnce".into(),
                pv_access_modes: None,
                fs_type: csi.fs_type.clone().unwrap_or_default(),
                mount_flags: Vec::new(),
                volume_context: csi.volume_attributes.clone().unwrap_or_default(),
                stage_secret: None,
                publish_secret: csi
                    .node_publish_secret_ref
                    .as_ref()
                    .map(|r| (namespace(pod).to_string(), r.name.clone())),
            });
        }
        let (Some(claim), Some(pv)) = (&v.persistent_volume_claim, pv) else {
            return Err(format!("volume {:?} is not a CSI volume", v.name));
        };
        let pv_name = pv.metadata.name.clone().unwrap_or_default();
        let spec = pv.spec.clone().unwrap_or_default();
        let Some(csi) = spec.csi else {
            return Err(format!(
                "persistentvolume {pv_name:?} is not a CSI volume (only CSI volumes are supported for claims)"
            ));
        };
        if spec.volume_mode.as_deref() == Some("Block") {
            return Err(format!(
                "persistentvolume {pv_name:?}: volumeMode Block is not supported"
            ));
        }
        let secret_ref = |r: &Option<k8s_openapi::api::core::v1::SecretReference>| {
            r.as_ref().and_then(|r| {
                let name = r.name.clone()?;
                Some((
                    r.namespace.clone().unwrap_or_else(|| "default".into()),
                    name,
                ))
            })
        };
        let modes = spec.access_modes.clone();
        Ok(Source {
            spec_name: pv_name,
            driver: csi.driver.clone(),
            handle: csi.volume_handle.clone(),
            lifecycle: Lifecycle::Persistent,
            readonly: claim.read_only.unwrap_or(false) || csi.read_only.unwrap_or(false),
            access_mode: modes
                .as_ref()
                .and_then(|m| m.first().cloned())
                .unwrap_or_else(|| "ReadWriteOnce".into()),
            pv_access_modes: modes,
            fs_type: csi.fs_type.clone().unwrap_or_default(),
            mount_flags: spec.mount_options.unwrap_or_default(),
            volume_context: csi.volume_attributes.clone().unwrap_or_default(),
            stage_secret: secret_ref(&csi.node_stage_secret_ref),
            publish_secret: secret_ref(&csi.node_publish_secret_ref),
        })
    }
}

/// kubelet's `supportsFSGroup`: whether the agent changes the published
/// volume's ownership to the pod's fsGroup (given one is set and the
/// driver does not apply it itself).
pub fn applies_fs_group(
    policy: FsGroupPolicy,
    fs_type: &str,
    pv_access_modes: Option<&[String]>,
    readonly: bool,
) -> bool {
    match policy {
        FsGroupPolicy::None => false,
        _ if readonly => false,
        FsGroupPolicy::File => true,
        FsGroupPolicy::ReadWriteOnceWithFsType => {
            !fs_type.is_empty()
                && match pv_access_modes {
                    // Inline volumes are always published ReadWriteOnce.
                    None => true,
                    Some(modes) => modes.iter().any(|m| m == "ReadWriteOnce"),
                }
        }
    }
}

/// The volume_context NodePublishVolume gets: the volume's attributes,
/// and kubelet's pod info keys when the driver wants them
/// (`podInfoOnMount`) and always for an inline ephemeral volume.
fn publish_volume_context(
    pod: &Pod,
    pod_uid: &str,
    src: &Source,
    policy: &DriverPolicy,
) -> BTreeMap<String, String> {
    let mut ctx = src.volume_context.clone();
    let ephemeral = src.lifecycle == Lifecycle::Ephemeral;
    if policy.pod_info_on_mount || ephemeral {
        let spec = pod.spec.as_ref();
        // Without an API server nobody's admission filled it in: the
        // ServiceAccount admission plugin's default.
        #[allow(deprecated)]
        let sa = spec
            .and_then(|s| s.service_account_name.clone().or(s.service_account.clone()))
            .unwrap_or_else(|| "default".into());
        let prefix = "csi.storage.k8s.io/";
        for (k, v) in [
            ("pod.name", pod.metadata.name.clone().unwrap_or_default()),
            ("pod.namespace", namespace(pod).to_string()),
            ("pod.uid", pod_uid.to_string()),
            ("serviceAccount.name", sa),
            ("ephemeral", ephemeral.to_string()),
        ] {
            ctx.insert(format!("{prefix}{k}"), v);
        }
    }
    ctx
}

/// One async lock per volume (driver + handle), so two pods setting up or
/// tearing down the same volume never interleave their steps. Entries go
/// when the last holder or waiter is done.
#[derive(Default)]
struct VolumeLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

struct VolumeGuard<'a> {
    locks: &'a VolumeLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl VolumeLocks {
    async fn lock(&self, driver: &str, handle: &str) -> VolumeGuard<'_> {
        let key = format!("{driver}\0{handle}");
        let m = crate::locks::lock(&self.0)
            .entry(key.clone())
            .or_default()
            .clone();
        VolumeGuard {
            locks: self,
            key,
            guard: Some(m.lock_owned().await),
        }
    }
}

impl Drop for VolumeGuard<'_> {
    fn drop(&mut self) {
        let mut map = crate::locks::lock(&self.locks.0);
        if let Some(g) = self.guard.take() {
            let m = tokio::sync::OwnedMutexGuard::mutex(&g).clone();
            drop(g);
            // The map's and this clone: nobody else holds or waits for it,
            // and nobody can start to while the map is locked.
            if Arc::strong_count(&m) == 2 {
                map.remove(&self.key);
            }
        }
    }
}

/// The plugin. One per agent; cheap to share behind an `Arc`.
pub struct CsiPlugin {
    /// kubelet's --root-dir (config `stateDir`).
    root: PathBuf,
    node_name: String,
    drivers: Arc<dyn NodeService>,
    claims: Arc<dyn ClaimResolver>,
    objects: Arc<dyn ObjectLookup>,
    host: Arc<dyn HostFs>,
    locks: VolumeLocks,
    /// API server mode: CSIDriver objects and VolumeAttachments.
    cluster: Option<Arc<dyn cluster::Cluster>>,
}

fn set_up_failed(volume: &str, reason: impl std::fmt::Display) -> VolumeError {
    VolumeError::SetUp {
        volume: volume.to_string(),
        reason: reason.to_string(),
    }
}

fn failed(op: &'static str, volume: &str, reason: impl std::fmt::Display) -> VolumeError {
    VolumeError::Operation {
        op,
        volume: volume.to_string(),
        reason: reason.to_string(),
    }
}

fn tear_down_failed(volume: &str, reason: impl std::fmt::Display) -> VolumeError {
    VolumeError::TearDown {
        volume: volume.to_string(),
        reason: reason.to_string(),
    }
}

fn chain(e: &state::StateError) -> String {
    crate::error_chain(e)
}

const MOUNT_DEVICE: &str = "MountVolume.MountDevice";
const UNMOUNT_DEVICE: &str = "UnmountDevice";

impl CsiPlugin {
    pub fn new(
        root: PathBuf,
        node_name: String,
        drivers: Arc<dyn NodeService>,
        claims: Arc<dyn ClaimResolver>,
        objects: Arc<dyn ObjectLookup>,
        host: Arc<dyn HostFs>,
    ) -> CsiPlugin {
        CsiPlugin {
            root,
            node_name,
            drivers,
            claims,
            objects,
            host,
            locks: VolumeLocks::default(),
            cluster: None,
        }
    }

    /// In API server mode: drivers' policies from their CSIDriver objects,
    /// and persistent volumes wait for their VolumeAttachment.
    pub fn with_cluster(mut self, cluster: Arc<dyn cluster::Cluster>) -> CsiPlugin {
        self.cluster = Some(cluster);
        self
    }

    /// The driver's policy: its CSIDriver object in a cluster (kubelet's
    /// defaults when it has none), else what the node service says.
    async fn policy(&self, driver: &str) -> Result<DriverPolicy, String> {
        match &self.cluster {
            Some(c) => match c.driver(driver).await {
                Ok(p) => Ok(p.unwrap_or_else(cluster::without_object)),
                Err(e) => Err(format!("reading CSIDriver {driver:?}: {e}")),
            },
            None => self.drivers.policy(driver).await.map_err(|e| e.to_string()),
        }
    }

    /// The publish_context of a persistent volume whose driver must be
    /// attached: its VolumeAttachment's metadata once attached.
    async fn attached(&self, src: &Source) -> Result<BTreeMap<String, String>, String> {
        let Some(c) = &self.cluster else {
            return Ok(BTreeMap::new());
        };
        let id = state::attachment_id(&src.handle, &src.driver, &self.node_name);
        let a = c
            .attachment(&id)
            .await
            .map_err(|e| format!("reading VolumeAttachment {id}: {e}"))?;
        cluster::wait_attached(&id, &src.driver, &src.handle, &self.node_name, a.as_ref())
    }

    /// A secret's data as strings, for a call's `secrets`; `what` names the
    /// reference in the error (kubelet: `fetching NodePublishSecretRef ns/name failed: …`).
    async fn secrets(&self, r: &Option<SecretRef>, what: &str) -> Result<Secrets, String> {
        let Some((ns, name)) = r else {
            return Ok(Secrets::default());
        };
        let s = self
            .objects
            .secret(ns, name)
            .await
            .map_err(|e| format!("fetching {what} {ns}/{name} failed: {e}"))?;
        let mut out: BTreeMap<String, String> = s
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
            .collect();
        for (k, v) in s.string_data.iter().flatten() {
            out.insert(k.clone(), v.clone());
        }
        Ok(Secrets(out))
    }

    /// Whether the volume is this plugin's: inline `csi`, or a claim (its
    /// PV is resolved in `set_up`, which refuses a PV that is not CSI).
    pub fn handles(&self, _pod: &Pod, v: &Volume) -> bool {
        v.csi.is_some() || v.persistent_volume_claim.is_some()
    }

    /// Stage (once per node) and publish the pod's volume; the path
    /// containers mount. Idempotent: a published volume is left as it is.
    pub async fn set_up(
        &self,
        pod: &Pod,
        v: &Volume,
        pod_dir: &Path,
    ) -> Result<PathBuf, VolumeError> {
        let pod_uid = match &pod.metadata.uid {
            Some(uid) => uid.clone(),
            None => pod_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let resolved = match &v.persistent_volume_claim {
            Some(c) => Some(
                self.claims
                    .resolve(namespace(pod), &c.claim_name, c.read_only.unwrap_or(false))
                    .await
                    .map_err(|e| set_up_failed(&v.name, e))?,
            ),
            None => None,
        };
        let pv = resolved.as_ref().map(|r| r.volume.clone());
        let src =
            Source::of(pod, &pod_uid, v, pv.as_deref()).map_err(|r| set_up_failed(&v.name, r))?;
        let name = src.spec_name.as_str();
        let vol_dir = pod_dir
            .join("volumes")
            .join(state::PLUGIN_DIR)
            .join(name.replace('/', "~"));
        let target = vol_dir.join(state::MOUNT);
        let recorded =
            state::read::<PublishData>(&vol_dir).map_err(|e| set_up_failed(name, chain(&e)))?;
        // A mount table we cannot read: set up again (every step is idempotent).
        if recorded.as_ref().is_some_and(|r| r.published) && self.mounted(&target).unwrap_or(false)
        {
            return Ok(target);
        }

        let caps = self
            .drivers
            .capabilities(&src.driver)
            .await
            .map_err(|e| set_up_failed(name, e))?;
        let policy = self
            .policy(&src.driver)
            .await
            .map_err(|e| set_up_failed(name, e))?;
        let mut publish_context = resolved.map(|r| r.publish_context).unwrap_or_default();
        if policy.attach_required && src.lifecycle == Lifecycle::Persistent {
            publish_context.extend(
                self.attached(&src)
                    .await
                    .map_err(|e| set_up_failed(name, e))?,
            );
        }
        let staging = (caps.stage_unstage && src.lifecycle == Lifecycle::Persistent)
            .then(|| state::staging_path(&self.root, &src.driver, &src.handle));
        let security = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
        let fs_group = security
            .and_then(|s| s.fs_group)
            .and_then(|g| u32::try_from(g).ok());
        let access_mode = AccessMode::from_k8s(&src.access_mode, caps.single_node_multi_writer)
            .ok_or_else(|| {
                set_up_failed(name, format!("unknown access mode {:?}", src.access_mode))
            })?;
        let capability = VolumeCapability {
            access_mode,
            fs_type: src.fs_type.clone(),
            mount_flags: src.mount_flags.clone(),
            volume_mount_group: match fs_group {
                Some(g) if caps.volume_mount_group => g.to_string(),
                _ => String::new(),
            },
        };

        let _guard = self.locks.lock(&src.driver, &src.handle).await;
        // 1. The pod's record, before anything is asked of the driver:
        // whatever a crash interrupts from here, teardown finds it.
        let mut record = PublishData {
            spec_vol_id: src.spec_name.clone(),
            volume_handle: src.handle.clone(),
            driver_name: src.driver.clone(),
            node_name: self.node_name.clone(),
            attachment_id: state::attachment_id(&src.handle, &src.driver, &self.node_name),
            lifecycle: src.lifecycle,
            staging_target_path: staging
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            published: false,
        };
        // Never overwrite the record of another volume (a PV recreated under
        // the same name with another handle): its teardown would be lost.
        if let Some(r) = recorded.as_ref().filter(|r| {
            (r.driver_name.as_str(), r.volume_handle.as_str())
                != (src.driver.as_str(), src.handle.as_str())
        }) {
            return Err(set_up_failed(
                name,
                format!(
                    "{} still holds volume {:?} of driver {:?}: it must be torn down first",
                    vol_dir.display(),
                    r.volume_handle,
                    r.driver_name
                ),
            ));
        }
        if recorded.as_ref() != Some(&record) {
            state::write(&vol_dir, &record).map_err(|e| set_up_failed(name, chain(&e)))?;
        }

        // 2. NodeStageVolume, once per node.
        if let Some(staging) = &staging {
            self.stage(&src, staging, &capability, &publish_context)
                .await?;
        }

        // 3. NodePublishVolume into the pod (the CO makes the target's
        // parent, the driver the target itself).
        let secrets = self
            .secrets(&src.publish_secret, "NodePublishSecretRef")
            .await
            .map_err(|r| set_up_failed(name, r))?;
        let req = PublishRequest {
            volume_id: src.handle.clone(),
            publish_context,
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            volume_capability: capability.clone(),
            readonly: src.readonly,
            secrets,
            volume_context: publish_volume_context(pod, &pod_uid, &src, &policy),
        };
        self.drivers
            .node_publish(&src.driver, &req)
            .await
            .map_err(|e| set_up_failed(name, e))?;

        // 4. fsGroup, unless the driver applied it (VOLUME_MOUNT_GROUP).
        let chown = applies_fs_group(
            policy.fs_group_policy,
            &src.fs_type,
            src.pv_access_modes.as_deref(),
            src.readonly,
        );
        if let Some(gid) = fs_group.filter(|_| chown && !caps.volume_mount_group) {
            let change =
                ChangePolicy::from_k8s(security.and_then(|s| s.fs_group_change_policy.as_deref()));
            self.host
                .set_ownership(&target, gid, src.readonly, change)
                .map_err(|e| {
                    set_up_failed(
                        name,
                        format!("applyFSGroup failed for vol {}: {e}", src.handle),
                    )
                })?;
        }
        record.published = true;
        state::write(&vol_dir, &record).map_err(|e| set_up_failed(name, chain(&e)))?;
        tracing::debug!(
            pod_uid,
            volume = name,
            driver = src.driver,
            "csi volume published"
        );
        Ok(target)
    }

    /// NodeStageVolume at the global path unless it is staged (and its
    /// staging path mounted: after a reboot it must be staged again).
    async fn stage(
        &self,
        src: &Source,
        staging: &Path,
        capability: &VolumeCapability,
        publish_context: &BTreeMap<String, String>,
    ) -> Result<(), VolumeError> {
        let name = src.spec_name.as_str();
        let err = |e: state::StateError| failed(MOUNT_DEVICE, name, chain(&e));
        let gdir = staging.parent().unwrap_or(staging);
        let recorded = state::read::<StageData>(gdir).map_err(err)?;
        if recorded.as_ref().is_some_and(|r| r.staged) && self.mounted(staging).unwrap_or(false) {
            return Ok(());
        }
        let mut record = StageData {
            volume_handle: src.handle.clone(),
            driver_name: src.driver.clone(),
            staged: false,
        };
        state::write(gdir, &record).map_err(err)?;
        std::fs::create_dir_all(staging).map_err(|e| {
            failed(
                MOUNT_DEVICE,
                name,
                format!("create {}: {e}", staging.display()),
            )
        })?;
        let secrets = self
            .secrets(&src.stage_secret, "NodeStageSecretRef")
            .await
            .map_err(|r| failed(MOUNT_DEVICE, name, r))?;
        let req = StageRequest {
            volume_id: src.handle.clone(),
            publish_context: publish_context.clone(),
            staging_target_path: staging.to_path_buf(),
            volume_capability: capability.clone(),
            secrets,
            volume_context: src.volume_context.clone(),
        };
        self.drivers
            .node_stage(&src.driver, &req)
            .await
            .map_err(|e| failed(MOUNT_DEVICE, name, e))?;
        record.staged = true;
        state::write(gdir, &record).map_err(err)
    }

    /// Undo `set_up` for `volume_dir` (`pods/<uid>/volumes/kubernetes.io~csi/<name>`)
    /// from its record alone: unpublish, unstage when no other pod's record
    /// names the volume, then drop the record. Idempotent; nothing is
    /// removed while still mounted.
    pub async fn tear_down(&self, pod_uid: &str, volume_dir: &Path) -> Result<(), VolumeError> {
        let name = volume_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = name.as_str();
        let err = |e: state::StateError| tear_down_failed(name, chain(&e));
        let target = volume_dir.join(state::MOUNT);
        let Some(rec) = state::read::<PublishData>(volume_dir).map_err(err)? else {
            // No record: nothing was asked of a driver here (or all but the
            // dirs is undone already).
            match self.mounted(&target) {
                Ok(false) => {}
                Ok(true) => {
                    return Err(tear_down_failed(
                        name,
                        format!(
                            "{} is mounted but has no {}: cannot tell which driver to ask",
                            target.display(),
                            state::VOL_DATA
                        ),
                    ));
                }
                Err(e) => return Err(tear_down_failed(name, e)),
            }
            state::remove(&target).map_err(err)?;
            return state::remove(volume_dir).map_err(err);
        };
        let _guard = self.locks.lock(&rec.driver_name, &rec.volume_handle).await;
        let req = UnpublishRequest {
            volume_id: rec.volume_handle.clone(),
            target_path: target.clone(),
        };
        let r = self.drivers.node_unpublish(&rec.driver_name, &req).await;
        self.undone(r, &target)
            .map_err(|e| tear_down_failed(name, e))?;
        state::remove(&target).map_err(err)?;

        if !rec.staging_target_path.is_empty() {
            let me = std::fs::canonicalize(volume_dir).unwrap_or_else(|_| volume_dir.to_path_buf());
            let others = state::publishers(&self.root, &rec.driver_name, &rec.volume_handle)
                .into_iter()
                .filter(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone()) != me)
                .count();
            if others == 0 {
                let staging = Path::new(&rec.staging_target_path);
                self.unstage(name, &rec.driver_name, &rec.volume_handle, staging)
                    .await?;
            } else {
                tracing::debug!(
                    pod_uid,
                    volume = name,
                    others,
                    "csi volume still used: not unstaged"
                );
            }
        }
        // Last: the record that made this teardown resumable.
        state::remove(&volume_dir.join(state::VOL_DATA)).map_err(err)?;
        state::remove(volume_dir).map_err(err)?;
        tracing::debug!(
            pod_uid,
            volume = name,
            driver = rec.driver_name,
            "csi volume torn down"
        );
        Ok(())
    }

    /// Whether an undo call (unpublish, unstage) left `path` free to
    /// remove: the call succeeded or found nothing (NotFound), and the path
    /// is no mount point any more. `Err(reason)` otherwise.
    fn undone(&self, r: Result<(), NodeError>, path: &Path) -> Result<(), String> {
        match r {
            Err(e) if !e.is_not_found() => Err(e.to_string()),
            _ => match self.mounted(path)? {
                true => Err(format!(
                    "{} is still mounted after the driver undid it",
                    path.display()
                )),
                false => Ok(()),
            },
        }
    }

    /// Whether `path` is a mount point; `Err(reason)` when the mount table
    /// cannot be read (then nothing may be removed).
    fn mounted(&self, path: &Path) -> Result<bool, String> {
        self.host
            .is_mount_point(path)
            .map_err(|e| format!("check whether {} is a mount point: {e}", path.display()))
    }

    /// NodeUnstageVolume and the global dir's removal; done already when
    /// neither the global record nor the staging dir is there.
    async fn unstage(
        &self,
        name: &str,
        driver: &str,
        handle: &str,
        staging: &Path,
    ) -> Result<(), VolumeError> {
        let err = |e: state::StateError| failed(UNMOUNT_DEVICE, name, chain(&e));
        let gdir = staging.parent().unwrap_or(staging);
        if state::read::<StageData>(gdir).map_err(err)?.is_none() && !staging.exists() {
            return Ok(());
        }
        let req = UnstageRequest {
            volume_id: handle.to_string(),
            staging_target_path: staging.to_path_buf(),
        };
        let r = self.drivers.node_unstage(driver, &req).await;
        self.undone(r, staging)
            .map_err(|e| failed(UNMOUNT_DEVICE, name, e))?;
        state::remove(staging).map_err(err)?;
        state::remove(&gdir.join(state::VOL_DATA)).map_err(err)?;
        // The per-driver dir above stays: another volume's set up may be
        // making its global dir in it right now.
        state::remove(gdir).map_err(err)
    }
}

impl CsiPlugin {
    /// Unstage every staged volume no pod's record names (a pod dir
    /// removed behind the agent's back; teardown itself never leaves one).
    /// For the agent's start, after orphaned pods are torn down; safe
    /// beside set ups, which record their pod before staging under the
    /// same per-volume lock. Returns how many it unstaged.
    pub async fn sweep(&self) -> Result<usize, VolumeError> {
        let mut done = 0;
        for (driver, handle) in state::staged_volumes(&self.root) {
            let _guard = self.locks.lock(&driver, &handle).await;
            if state::publishers(&self.root, &driver, &handle).is_empty() {
                let staging = state::staging_path(&self.root, &driver, &handle);
                self.unstage(&handle, &driver, &handle, &staging).await?;
                done += 1;
            }
        }
        Ok(done)
    }
}

impl super::External for CsiPlugin {
    fn plugin_dir(&self) -> &'static str {
        state::PLUGIN_DIR
    }
    fn handles(&self, pod: &Pod, volume: &Volume) -> bool {
        CsiPlugin::handles(self, pod, volume)
    }
    fn set_up<'a>(
        &'a self,
        pod: &'a Pod,
        volume: &'a Volume,
        pod_dir: &'a Path,
    ) -> BoxFuture<'a, Result<PathBuf, VolumeError>> {
        Box::pin(CsiPlugin::set_up(self, pod, volume, pod_dir))
    }
    fn tear_down<'a>(
        &'a self,
        pod_uid: &'a str,
        volume_dir: &'a Path,
    ) -> BoxFuture<'a, Result<(), VolumeError>> {
        Box::pin(CsiPlugin::tear_down(self, pod_uid, volume_dir))
    }
}
