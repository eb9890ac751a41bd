//! The CSI rules, as the spec states them and csi-sanity checks them: which
//! fields are required, which call must come before which, what "already
//! done" and "unknown volume" answer, and that every call is idempotent
//! (the same call twice makes no second loop device or mount). Calls on one
//! volume are serialised; calls on different volumes run in parallel.
//!
//! Side effects: through the `Backend` (host) and the `Store` (state dir)
//! only. Blocking: the gRPC layer runs these on blocking threads.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::backend::{Backend, BackendError, Usage};
use crate::state::{Publish, Stage, StateError, Store, Volume, file_key};

/// How many times unstage detaches a volume's loop device before it gives
/// up (250 × 20 ms).
const DETACH_LOOKS: usize = 250;

/// volume_context key kubelet sets on inline ephemeral volumes.
pub const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";
/// The publish_context key ControllerPublishVolume returns, checked at stage.
pub const ATTACHMENT_KEY: &str = "csi.minilet.test/attachment";
/// Smallest volume: mkfs.ext4 needs room for its metadata.
pub const MIN_BYTES: u64 = 16 << 20;
/// Size of a volume that asks for none, and of an ephemeral one without a
/// `size` attribute.
pub const DEFAULT_BYTES: u64 = 64 << 20;

/// Why a call failed; `code()` is its gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A REQUIRED field is empty.
    #[error("{field} is required")]
    Missing { field: &'static str },
    /// A field holds something this driver refuses.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// No volume with this id.
    #[error("volume {id} does not exist")]
    NotFound { id: String },
    /// The node id is not this driver's node.
    #[error("node {node} does not exist")]
    NodeNotFound { node: String },
    /// A volume of this name, or a publish at this path, exists with other
    /// properties.
    #[error("{what} exists with other properties: {detail}")]
    AlreadyExists { what: String, detail: String },
    /// The call came out of order (publish before stage, unstage while
    /// published, delete while in use, stage at another path, …).
    #[error("{detail}")]
    FailedPrecondition { detail: String },
    /// Asked size out of what this driver makes.
    #[error("capacity: {detail}")]
    OutOfRange { detail: String },
    /// A capability this driver was started without.
    #[error("{what} is not offered")]
    Unimplemented { what: &'static str },
    /// The host refused.
    #[error("host")]
    Host(#[from] BackendError),
    /// The state dir refused.
    #[error("state")]
    State(#[from] StateError),
}

impl DriverError {
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            DriverError::Missing { .. } | DriverError::Invalid { .. } => Code::InvalidArgument,
            DriverError::NotFound { .. } | DriverError::NodeNotFound { .. } => Code::NotFound,
            DriverError::AlreadyExists { .. } => Code::AlreadyExists,
            DriverError::FailedPrecondition { .. } => Code::FailedPrecondition,
            DriverError::OutOfRange { .. } => Code::OutOfRange,
            DriverError::Unimplemented { .. } => Code::Unimplemented,
            DriverError::Host(_) | DriverError::State(_) => Code::Internal,
        }
    }
}

fn precondition(detail: impl Into<String>) -> DriverError {
    DriverError::FailedPrecondition {
        detail: detail.into(),
    }
}

/// How a volume is to be accessed (CSI VolumeCapability, mount access only
/// for this driver).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capability {
    /// Block access asked: this driver refuses it.
    pub block: bool,
    /// Empty: the driver's default (ext4).
    pub fs_type: String,
    pub mount_flags: Vec<String>,
    /// A reader-only access mode (the mount is made read-only).
    pub reader_only: bool,
}

#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub name: String,
    pub required_bytes: u64,
    pub limit_bytes: u64,
    pub parameters: BTreeMap<String, String>,
    pub capabilities: Vec<Capability>,
}

#[derive(Debug, Clone, Default)]
pub struct ControllerPublishRequest {
    pub volume_id: String,
    pub node_id: String,
    pub capability: Option<Capability>,
    pub read_only: bool,
}

#[derive(Debug, Clone, Default)]
pub struct StageRequest {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub capability: Option<Capability>,
    pub publish_context: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default)]
pub struct PublishRequest {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub target_path: PathBuf,
    pub capability: Option<Capability>,
    pub read_only: bool,
    pub volume_context: BTreeMap<String, String>,
}

/// The driver's fixed settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub node_id: String,
    pub state_dir: PathBuf,
    /// Whether the controller has PUBLISH_UNPUBLISH_VOLUME: then a volume
    /// must be ControllerPublished to this node before it can be staged.
    pub publish_unpublish: bool,
}

/// The driver: rules over a backend and a store.
pub struct Driver<B> {
    pub config: Config,
    backend: B,
    store: Store,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// The id CreateVolume gives a name: stable, so a retried CreateVolume (or
/// one after a driver restart) finds the volume it made.
pub fn volume_id(name: &str) -> String {
    // FNV-1a, 64 bit.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("vol-{h:016x}")
}

fn require(value: &str, field: &'static str) -> Result<(), DriverError> {
    if value.is_empty() {
        Err(DriverError::Missing { field })
    } else {
        Ok(())
    }
}

fn require_path(value: &Path, field: &'static str) -> Result<(), DriverError> {
    require(&value.to_string_lossy(), field)?;
    if value.is_relative() {
        return Err(DriverError::Invalid {
            field,
            reason: format!("{} is not absolute", value.display()),
        });
    }
    Ok(())
}

fn mount_capability(cap: Option<&Capability>) -> Result<&Capability, DriverError> {
    let cap = cap.ok_or(DriverError::Missing {
        field: "volume_capability",
    })?;
    if cap.block {
        return Err(DriverError::Invalid {
            field: "volume_capability",
            reason: "block access is not supported (mount only)".into(),
        });
    }
    Ok(cap)
}

fn fs_type(cap: &Capability) -> String {
    if cap.fs_type.is_empty() {
        "ext4".into()
    } else {
        cap.fs_type.clone()
    }
}

impl<B: Backend> Driver<B> {
    pub fn new(config: Config, backend: B) -> Driver<B> {
        Driver {
            store: Store::new(&config.state_dir),
            config,
            backend,
            locks: Mutex::new(HashMap::new()),
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The lock serialising calls on one volume.
    fn lock(&self, id: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    fn load(&self, id: &str) -> Result<Volume, DriverError> {
        self.store
            .load(id)?
            .ok_or_else(|| DriverError::NotFound { id: id.to_string() })
    }

    fn disk_path(&self, id: &str) -> PathBuf {
        self.config
            .state_dir
            .join("disks")
            .join(format!("{}.img", file_key(id)))
    }

    // ---- Controller ----

    /// CreateVolume: a sparse file. Same name and properties → the same
    /// volume; same name with another size or parameters → AlreadyExists.
    pub fn create_volume(&self, req: &CreateRequest) -> Result<Volume, DriverError> {
        require(&req.name, "name")?;
        if req.capabilities.is_empty() {
            return Err(DriverError::Missing {
                field: "volume_capabilities",
            });
        }
        for cap in &req.capabilities {
            mount_capability(Some(cap))?;
        }
        if req.limit_bytes != 0 && req.limit_bytes < req.required_bytes {
            return Err(DriverError::Invalid {
                field: "capacity_range",
                reason: format!(
                    "limit_bytes {} < required_bytes {}",
                    req.limit_bytes, req.required_bytes
                ),
            });
        }
        let asked = if req.required_bytes == 0 {
            DEFAULT_BYTES.min(if req.limit_bytes == 0 {
                u64::MAX
            } else {
                req.limit_bytes
            })
        } else {
            req.required_bytes
        };
        // Whole MiB, at least MIN_BYTES.
        let capacity = asked.max(MIN_BYTES).div_ceil(1 << 20) * (1 << 20);
        if req.limit_bytes != 0 && capacity > req.limit_bytes {
            return Err(DriverError::OutOfRange {
                detail: format!(
                    "the smallest volume is {capacity} bytes, limit_bytes is {}",
                    req.limit_bytes
                ),
            });
        }
        let id = volume_id(&req.name);
        let lock = self.lock(&id);
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = self.store.load(&id)? {
            let fits = existing.capacity_bytes >= req.required_bytes
                && (req.limit_bytes == 0 || existing.capacity_bytes <= req.limit_bytes);
            if existing.name == req.name && fits && existing.parameters == req.parameters {
                // A retry (its answer may have been lost): the file again,
                // in case the first call stopped before making it.
                self.backend
                    .create_disk(&existing.disk, existing.capacity_bytes)?;
                return Ok(existing);
            }
            return Err(DriverError::AlreadyExists {
                what: format!("volume {}", req.name),
                detail: format!(
                    "capacity {} bytes, parameters {:?}",
                    existing.capacity_bytes, existing.parameters
                ),
            });
        }
        let volume = Volume {
            id: id.clone(),
            name: req.name.clone(),
            capacity_bytes: capacity,
            parameters: req.parameters.clone(),
            ephemeral: false,
            disk: self.disk_path(&id),
            attachments: BTreeMap::new(),
            stage: None,
            publishes: BTreeMap::new(),
        };
        // State first: a crash after it leaves a known volume whose file a
        // retry makes, never an unknown file.
        self.store.save(&volume)?;
        self.backend.create_disk(&volume.disk, capacity)?;
        Ok(volume)
    }

    /// DeleteVolume: an unknown volume is already deleted (OK); one in use
    /// (attached, staged or published) is FailedPrecondition.
    pub fn delete_volume(&self, id: &str) -> Result<(), DriverError> {
        require(id, "volume_id")?;
        let lock = self.lock(id);
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(volume) = self.store.load(id)? else {
            return Ok(());
        };
        if !volume.attachments.is_empty() || volume.stage.is_some() || !volume.publishes.is_empty()
        {
            return Err(precondition(format!(
                "volume {id} is in use (attached to {:?}, staged: {}, published at {:?})",
                volume.attachments.keys().collect::<Vec<_>>(),
                volume.stage.is_some(),
                volume.publishes.keys().collect::<Vec<_>>()
            )));
        }
        self.backend.remove_disk(&volume.disk)?;
        self.store.remove(id)?;
        Ok(())
    }

    /// ControllerPublishVolume: record the attachment; returns the
    /// publish_context the CO must hand to NodeStageVolume.
    pub fn controller_publish(
        &self,
        req: &ControllerPublishRequest,
    ) -> Result<BTreeMap<String, String>, DriverError> {
        require(&req.volume_id, "volume_id")?;
        require(&req.node_id, "node_id")?;
        mount_capability(req.capability.as_ref())?;
        let lock = self.lock(&req.volume_id);
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut volume = self.load(&req.volume_id)?;
        if req.node_id != self.config.node_id {
            return Err(DriverError::NodeNotFound {
                node: req.node_id.clone(),
            });
        }
        let context = BTreeMap::from([
            (
                ATTACHMENT_KEY.to_string(),
                format!("{}@{}", volume.id, req.node_id),
            ),
            ("readOnly".to_string(), req.read_only.to_string()),
        ]);
        if let Some(existing) = volume.attachments.get(&req.node_id) {
            if *existing == context {
                return Ok(context);
            }
            return Err(DriverError::AlreadyExists {
                what: format!("attachment of {} to {}", volume.id, req.node_id),
                detail: format!("publish_context {existing:?}"),
            });
        }
        volume
            .attachments
            .insert(req.node_id.clone(), context.clone());
        self.store.save(&volume)?;
        Ok(context)
    }

    /// ControllerUnpublishVolume: drop the attachment (none → OK). Refused
    /// while the node still has the volume staged.
    pub fn controller_unpublish(&self, id: &str, node_id: &str) -> Result<(), DriverError> {
        require(id, "volume_id")?;
        let lock = self.lock(id);
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut volume = self.load(id)?;
        // An empty node_id means "from every node".
        let gone = if node_id.is_empty() {
            std::mem::take(&mut volume.attachments).len()
        } else {
            usize::from(volume.attachments.remove(node_id).is_some())
        };
        if gone == 0 {
            return Ok(());
        }
        if volume.stage.is_some() {
            return Err(precondition(format!(
                "volume {id} is still staged on {}: NodeUnstageVolume first",
                self.config.node_id
            )));
        }
        self.store.save(&volume)?;
        Ok(())
    }

    // ---- Node ----

    /// Attach, format on first use, mount at `staging`. Idempotent: each
    /// step is skipped when the host shows it done.
    fn ensure_staged(
        &self,
        volume: &mut Volume,
        staging: &Path,
        cap: &Capability,
    ) -> Result<(), DriverError> {
        let fs = fs_type(cap);
        let device = match self.backend.find_loop(&volume.disk)? {
            Some(d) => d,
            None => self.backend.attach(&volume.disk)?,
        };
        match self.backend.filesystem(&device)? {
            None => self.backend.mkfs(&device, &fs)?,
            Some(found) if found != fs => {
                return Err(DriverError::AlreadyExists {
                    what: format!("volume {}", volume.id),
                    detail: format!("formatted as {found}, {fs} asked"),
                });
            }
            Some(_) => {}
        }
        if !self.backend.is_mounted(staging)? {
            let mut flags = cap.mount_flags.clone();
            if cap.reader_only {
                flags.push("ro".into());
            }
            self.backend.mount(&device, staging, &fs, &flags)?;
        }
        volume.stage = Some(Stage {
            staging_path: staging.to_path_buf(),
            device,
            fs_type: fs,
            mount_flags: cap.mount_flags.clone(),
        });
        self.store.save(volume)?;
        Ok(())
    }

    /// Unmount the staging path and detach the loop device.
    fn ensure_unstaged(&self, volume: &mut Volume) -> Result<(), DriverError> {
        if let Some(stage) = &volume.stage
            && self.backend.is_mounted(&stage.staging_path)?
        {
            self.backend.unmount(&stage.staging_path)?;
        }
        // By the disk, not the recorded device: a crash between attach and
        // save left a device the state does not name. A deferred detach
        // keeps the device listed a moment: look again, for up to 5 s.
        let mut looks = 0;
        while let Some(device) = self.backend.find_loop(&volume.disk)? {
            self.backend.detach(&device)?;
            looks += 1;
            if looks >= DETACH_LOOKS {
                return Err(DriverError::Host(BackendError::Command {
                    command: format!("losetup -d {}", device.display()),
                    detail: format!("still attached after {looks} detaches"),
                }));
            }
            if looks > 1 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        if volume.stage.take().is_some() {
            self.store.save(volume)?;
        }
        Ok(())
    }

    /// NodeStageVolume.
    pub fn node_stage(&self, req: &StageRequest) -> Result<(), DriverError> {
        require(&req.volume_id, "volume_id")?;
        require_path(&req.staging_path, "staging_target_path")?;
        let cap = mount_capability(req.capability.as_ref())?;
        let lock = self.lock(&req.volume_id);
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut volume = self.load(&req.volume_id)?;
        if let Some(stage) = &volume.stage {
            if stage.staging_path != req.staging_path {
                return Err(precondition(format!(
                    "volume {} is staged at {}, not {}",
                    volume.id,
                    stage.staging_path.display(),
                    req.staging_path.display()
                )));
            }
            if stage.fs_type != fs_type(cap) || stage.mount_flags != cap.mount_flags {
                return Err(DriverError::AlreadyExists {
                    what: format!("stage of {} at {}", volume.id, stage.staging_path.display()),
                    detail: format!("{} {:?}", stage.fs_type, stage.mount_flags),
                });
            }
        }
        if self.config.publish_unpublish && !volume.ephemeral {
            let Some(context) = volume.attachments.get(&self.config.node_id) else {
                return Err(precondition(format!(
                    "volume {} is not ControllerPublished to node {}",
                    volume.id, self.config.node_id
                )));
            };
            if context.get(ATTACHMENT_KEY) != req.publish_context.get(ATTACHMENT_KEY) {
                return Err(DriverError::Invalid {
                    field: "publish_context",
                    reason: format!(
                        "{:?} is not what ControllerPublishVolume returned ({context:?})",
                        req.publish_context
                    ),
                });
            }
        }
        // The CO makes the staging dir (kubelet does); a missing one is its bug.
        if !self.backend.is_dir(&req.staging_path) {
            return Err(precondition(format!(
                "staging_target_path {} is not a directory",
                req.staging_path.display()
            )));
        }
        self.ensure_staged(&mut volume, &req.staging_path, cap)
    }

    /// NodeUnstageVolume. Not staged there → OK; still published → FailedPrecondition.
    pub fn node_unstage(&self, id: &str, staging_path: &Path) -> Result<(), DriverError> {
        require(id, "volume_id")?;
        require_path(staging_path, "staging_target_path")?;
        let lock = self.lock(id);
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut volume = self.load(id)?;
        match &volume.stage {
            Some(stage) if stage.staging_path != staging_path => return Ok(()),
            _ => {}
        }
        if !volume.publishes.is_empty() {
            return Err(precondition(format!(
                "volume {id} is still published at {:?}: NodeUnpublishVolume first",
                volume.publishes.keys().collect::<Vec<_>>()
            )));
        }
        self.ensure_unstaged(&mut volume)
    }

    /// The private staging dir of an ephemeral volume.
    fn ephemeral_stage(&self, id: &str) -> PathBuf {
        self.config.state_dir.join("ephemeral").join(file_key(id))
    }

    /// NodePublishVolume.
    pub fn node_publish(&self, req: &PublishRequest) -> Result<(), DriverError> {
        require(&req.volume_id, "volume_id")?;
        require_path(&req.target_path, "target_path")?;
        let cap = mount_capability(req.capability.as_ref())?;
        let ephemeral = req
            .volume_context
            .get(EPHEMERAL_KEY)
            .is_some_and(|v| v == "true");
        let lock = self.lock(&req.volume_id);
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (mut volume, staging) = if ephemeral {
            self.ephemeral_volume(req, cap)?
        } else {
            require_path(&req.staging_path, "staging_target_path").map_err(|_| {
                precondition(
                    "staging_target_path is required: this driver has STAGE_UNSTAGE_VOLUME",
                )
            })?;
            let volume = self.load(&req.volume_id)?;
            match &volume.stage {
                Some(s) if s.staging_path == req.staging_path => {}
                Some(s) => {
                    return Err(precondition(format!(
                        "volume {} is staged at {}, not {}",
                        volume.id,
                        s.staging_path.display(),
                        req.staging_path.display()
                    )));
                }
                None => {
                    return Err(precondition(format!(
                        "volume {} is not staged: NodeStageVolume first",
                        volume.id
                    )));
                }
            }
            (volume, req.staging_path.clone())
        };
        let read_only = req.read_only || cap.reader_only;
        if let Some(existing) = volume.publishes.get(&req.target_path)
            && existing.read_only != read_only
        {
            return Err(DriverError::AlreadyExists {
                what: format!("publish of {} at {}", volume.id, req.target_path.display()),
                detail: format!("read_only {}", existing.read_only),
            });
        }
        self.backend.make_dir(&req.target_path)?;
        if !self.backend.is_mounted(&req.target_path)? {
            self.backend.bind(&staging, &req.target_path, read_only)?;
        }
        volume
            .publishes
            .insert(req.target_path.clone(), Publish { read_only });
        self.store.save(&volume)?;
        Ok(())
    }

    /// An inline ephemeral volume: made and staged privately on its first
    /// publish. Its size is the `size` attribute in bytes, if given.
    fn ephemeral_volume(
        &self,
        req: &PublishRequest,
        cap: &Capability,
    ) -> Result<(Volume, PathBuf), DriverError> {
        let mut volume = match self.store.load(&req.volume_id)? {
            Some(v) if !v.ephemeral => {
                return Err(DriverError::AlreadyExists {
                    what: format!("volume {}", v.id),
                    detail: "a persistent volume has this id".into(),
                });
            }
            Some(v) => v,
            None => {
                let size = match req.volume_context.get("size") {
                    Some(s) => s.parse::<u64>().map_err(|e| DriverError::Invalid {
                        field: "volume_context.size",
                        reason: e.to_string(),
                    })?,
                    None => DEFAULT_BYTES,
                };
                let volume = Volume {
                    id: req.volume_id.clone(),
                    name: String::new(),
                    capacity_bytes: size.max(MIN_BYTES),
                    parameters: BTreeMap::new(),
                    ephemeral: true,
                    disk: self.disk_path(&req.volume_id),
                    attachments: BTreeMap::new(),
                    stage: None,
                    publishes: BTreeMap::new(),
                };
                self.store.save(&volume)?;
                volume
            }
        };
        let staging = self.ephemeral_stage(&volume.id);
        self.backend
            .create_disk(&volume.disk, volume.capacity_bytes)?;
        self.backend.make_dir(&staging)?;
        self.ensure_staged(&mut volume, &staging, cap)?;
        Ok((volume, staging))
    }

    /// NodeUnpublishVolume: unmount and remove the target (not published
    /// there → OK). The last unpublish of an ephemeral volume removes its
    /// mounts, loop device and file.
    pub fn node_unpublish(&self, id: &str, target: &Path) -> Result<(), DriverError> {
        require(id, "volume_id")?;
        require_path(target, "target_path")?;
        let lock = self.lock(id);
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut volume = self.load(id)?;
        if self.backend.is_mounted(target)? {
            self.backend.unmount(target)?;
        }
        self.backend.remove_dir(target)?;
        if volume.publishes.remove(target).is_some() {
            self.store.save(&volume)?;
        }
        if volume.ephemeral && volume.publishes.is_empty() {
            self.ensure_unstaged(&mut volume)?;
            self.backend.remove_dir(&self.ephemeral_stage(id))?;
            self.backend.remove_disk(&volume.disk)?;
            // The record stays (no disk, no stage, no publish), so a retried
            // unpublish answers OK rather than NotFound.
        }
        Ok(())
    }

    /// NodeGetVolumeStats: statvfs of a path where the volume is staged or
    /// published.
    pub fn volume_stats(&self, id: &str, path: &Path) -> Result<Usage, DriverError> {
        require(id, "volume_id")?;
        require_path(path, "volume_path")?;
        let volume = self.load(id)?;
        let known = volume.publishes.contains_key(path)
            || volume
                .stage
                .as_ref()
                .is_some_and(|s| s.staging_path == path);
        if !known || !self.backend.is_mounted(path)? {
            return Err(DriverError::NotFound {
                id: format!("{id} at {}", path.display()),
            });
        }
        Ok(self.backend.usage(path)?)
    }
}

#[cfg(test)]
mod tests;
