//! Volume stats (issue 8, point 8): how full each pod volume is, collected
//! by one node-wide task every `volumeStatsAggPeriod` (kubelet's
//! volume stats aggregation, default 1m) and served, already rendered, in
//! `minilet get metrics`; a scrape never walks a file system.
//!
//! - CSI volumes (claims and inline): NodeGetVolumeStats on the pod's
//!   publish path, when the driver offers GET_VOLUME_STATS (as kubelet,
//!   no fallback when it does not: the driver knows its volume best).
//! - emptyDir: du-style, as kubelet's `fs.DiskUsage`: the blocks and inodes
//!   under the dir, capacity and available from statvfs(2) of its file
//!   system. The walk does not follow symlinks, stays on the dir's device
//!   (a mount point below it is not entered), counts a hard-linked inode
//!   once, and stops after `WALK_BUDGET` entries (reported as a lower
//!   bound, with a warning).
//!
//! Names: claim-backed volumes get kubelet's gauges,
//! `kubelet_volume_stats_{capacity_bytes,available_bytes,used_bytes,inodes,inodes_free,inodes_used}`
//! with kubelet's labels `namespace` and `persistentvolumeclaim`. kubelet
//! reports nothing else under those names, and queries written for it
//! (`sum by (persistentvolumeclaim)`) would misread series without that
//! label, so emptyDir and inline CSI volumes get the same gauges named
//! `minilet_volume_stats_*`, labelled `namespace`, `pod`, `volume`.
//!
//! Side effects: through `StatsProbe` only (directory walk, statvfs(2),
//! NodeGetVolumeStats); reads of the CSI publish records (`vol_data.json`).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::csi::state::{self, MOUNT, PLUGIN_DIR, PublishData};
use super::provision::VolumesView;
use crate::csi::proto::csi;
use crate::objects::ObjectLookup;
use crate::status::Board;

/// kubelet's emptyDir plugin dir (see `volume` module).
const EMPTY_DIR: &str = "kubernetes.io~empty-dir";
/// Entries one emptyDir walk visits at most (kubelet has no cap; ours
/// keeps one huge dir from holding the collector for minutes).
pub const WALK_BUDGET: u64 = 1_000_000;

/// One volume's usage, in kubelet's terms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub capacity_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub inodes: u64,
    pub inodes_free: u64,
    pub inodes_used: u64,
}

/// Why one volume has no stats this round (logged, then skipped).
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The walk or statvfs of a dir failed.
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// NodeGetVolumeStats failed.
    #[error("NodeGetVolumeStats of volume {handle:?} on driver {driver:?}: {message}")]
    Driver {
        driver: String,
        handle: String,
        message: String,
    },
}

/// The side effects the collector needs.
pub trait StatsProbe: Send + Sync {
    /// du-style usage of `dir` plus statvfs of its file system, visiting at
    /// most `budget` entries. Blocking: called from `spawn_blocking`.
    fn dir_usage(&self, dir: &Path, budget: u64) -> Result<Usage, StatsError>;
    /// NodeGetVolumeStats of `handle` published at `path`; `Ok(None)` when
    /// the driver does not offer it (or is not known now).
    fn csi_usage<'a>(
        &'a self,
        driver: &'a str,
        handle: &'a str,
        path: &'a Path,
        staging: &'a str,
    ) -> BoxFuture<'a, Result<Option<Usage>, StatsError>>;
}

/// The PV a claim is bound to (the name of its CSI dir in the pod).
pub trait ClaimVolumes: Send + Sync {
    fn volume_name<'a>(
        &'a self,
        namespace: &'a str,
        claim: &'a str,
    ) -> BoxFuture<'a, Option<String>>;
}

/// Standalone: the binder's view.
impl ClaimVolumes for watch::Receiver<VolumesView> {
    fn volume_name<'a>(
        &'a self,
        namespace: &'a str,
        claim: &'a str,
    ) -> BoxFuture<'a, Option<String>> {
        let found = self
            .borrow()
            .claims
            .iter()
            .find(|c| {
                c.metadata.namespace.as_deref().unwrap_or("default") == namespace
                    && c.metadata.name.as_deref() == Some(claim)
            })
            .and_then(|c| c.spec.as_ref()?.volume_name.clone());
        Box::pin(async move { found })
    }
}

/// API server mode: the claim as the cluster has it.
pub struct LookupClaims(pub Arc<dyn ObjectLookup>);

impl ClaimVolumes for LookupClaims {
    fn volume_name<'a>(
        &'a self,
        namespace: &'a str,
        claim: &'a str,
    ) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            let pvc = self
                .0
                .persistent_volume_claim(namespace, claim)
                .await
                .ok()?;
            pvc.spec.as_ref()?.volume_name.clone()
        })
    }
}

/// Who a sample belongs to, which also picks its metric names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    /// `kubelet_volume_stats_*{namespace, persistentvolumeclaim}`.
    Claim { namespace: String, claim: String },
    /// `minilet_volume_stats_*{namespace, pod, volume}`.
    PodVolume {
        namespace: String,
        pod: String,
        volume: String,
    },
}

/// The last collected stats, rendered on each scrape.
#[derive(Default)]
pub struct StatsBoard {
    samples: RwLock<BTreeMap<Owner, Usage>>,
}

const GAUGES: &[(&str, &str)] = &[
    ("capacity_bytes", "Capacity in bytes of the volume"),
    ("available_bytes", "Number of available bytes in the volume"),
    ("used_bytes", "Number of used bytes in the volume"),
    ("inodes", "Maximum number of inodes in the volume"),
    ("inodes_free", "Number of free inodes in the volume"),
    ("inodes_used", "Number of used inodes in the volume"),
];

fn gauge(u: &Usage, i: usize) -> u64 {
    [
        u.capacity_bytes,
        u.available_bytes,
        u.used_bytes,
        u.inodes,
        u.inodes_free,
        u.inodes_used,
    ][i]
}

/// A Prometheus label value, escaped.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl StatsBoard {
    /// Replaces every sample (volumes gone since the last round vanish).
    pub fn replace(&self, samples: BTreeMap<Owner, Usage>) {
        *self.samples.write().unwrap_or_else(|e| e.into_inner()) = samples;
    }

    /// Prometheus text, one family per gauge and prefix; empty when there
    /// are no samples.
    pub fn render(&self) -> String {
        let samples = self.samples.read().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for prefix in ["kubelet", "minilet"] {
            for (i, (name, help)) in GAUGES.iter().enumerate() {
                let mut lines = samples
                    .iter()
                    .filter_map(|(owner, u)| {
                        let labels = match (prefix, owner) {
                            ("kubelet", Owner::Claim { namespace, claim }) => format!(
                                "namespace=\"{}\",persistentvolumeclaim=\"{}\"",
                                esc(namespace),
                                esc(claim)
                            ),
                            (
                                "minilet",
                                Owner::PodVolume {
                                    namespace,
                                    pod,
                                    volume,
                                },
                            ) => format!(
                                "namespace=\"{}\",pod=\"{}\",volume=\"{}\"",
                                esc(namespace),
                                esc(pod),
                                esc(volume)
                            ),
                            _ => return None,
                        };
                        Some((labels, gauge(u, i)))
                    })
                    .peekable();
                if lines.peek().is_none() {
                    continue;
                }
                let _ = writeln!(out, "# HELP {prefix}_volume_stats_{name} {help}");
                let _ = writeln!(out, "# TYPE {prefix}_volume_stats_{name} gauge");
                for (labels, v) in lines {
                    let _ = writeln!(out, "{prefix}_volume_stats_{name}{{{labels}}} {v}");
                }
            }
        }
        out
    }
}

/// One pod volume to measure.
#[derive(Clone, Debug, PartialEq)]
enum Target {
    Dir(PathBuf),
    Csi(PathBuf),
}

/// What to measure for each of a pod's volumes: emptyDirs by path, claims
/// and inline CSI volumes by their CSI dir (a claim's is named by its PV).
async fn targets(
    root: &Path,
    uid: &str,
    pod: &Pod,
    claims: &dyn ClaimVolumes,
) -> Vec<(Owner, Target)> {
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let volumes_dir = root.join("pods").join(uid).join("volumes");
    let mut out = Vec::new();
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    for v in volumes.into_iter().flatten() {
        let pod_volume = || Owner::PodVolume {
            namespace: namespace.clone(),
            pod: name.clone(),
            volume: v.name.clone(),
        };
        if v.empty_dir.is_some() {
            out.push((
                pod_volume(),
                Target::Dir(volumes_dir.join(EMPTY_DIR).join(&v.name)),
            ));
        } else if v.csi.is_some() {
            out.push((
                pod_volume(),
                Target::Csi(volumes_dir.join(PLUGIN_DIR).join(&v.name)),
            ));
        } else if let Some(c) = &v.persistent_volume_claim {
            let Some(pv) = claims.volume_name(&namespace, &c.claim_name).await else {
                continue;
            };
            out.push((
                Owner::Claim {
                    namespace: namespace.clone(),
                    claim: c.claim_name.clone(),
                },
                Target::Csi(volumes_dir.join(PLUGIN_DIR).join(pv)),
            ));
        }
    }
    out
}

/// One round: every volume of every pod on the board.
pub async fn collect(
    root: &Path,
    pods: &[(String, Pod)],
    probe: &Arc<dyn StatsProbe>,
    claims: &dyn ClaimVolumes,
) -> BTreeMap<Owner, Usage> {
    let mut samples = BTreeMap::new();
    for (uid, pod) in pods {
        for (owner, target) in targets(root, uid, pod, claims).await {
            let usage = match &target {
                Target::Dir(dir) => {
                    if !dir.is_dir() {
                        continue;
                    }
                    let (p, d) = (probe.clone(), dir.clone());
                    match tokio::task::spawn_blocking(move || p.dir_usage(&d, WALK_BUDGET)).await {
                        Ok(r) => r.map(Some),
                        Err(_) => continue,
                    }
                }
                Target::Csi(dir) => {
                    // Only a volume whose publish finished is asked about.
                    let data = match state::read::<PublishData>(dir) {
                        Ok(Some(d)) if d.published => d,
                        _ => continue,
                    };
                    probe
                        .csi_usage(
                            &data.driver_name,
                            &data.volume_handle,
                            &dir.join(MOUNT),
                            &data.staging_target_path,
                        )
                        .await
                }
            };
            match usage {
                Ok(Some(u)) => {
                    samples.insert(owner, u);
                }
                Ok(None) => {}
                Err(e) => debug!(pod = %uid, error = %e, "volume stats"),
            }
        }
    }
    samples
}

/// The node-wide task: collects every `period` until cancelled.
pub async fn run(
    board: Board,
    root: PathBuf,
    probe: Arc<dyn StatsProbe>,
    claims: Arc<dyn ClaimVolumes>,
    period: Duration,
    cancel: CancellationToken,
) {
    loop {
        let pods = board.pods();
        let samples = collect(&root, &pods, &probe, &*claims).await;
        board.volume_stats.replace(samples);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// The du walk: 512-byte blocks and inodes under `dir` (itself included),
/// on `dir`'s device only, symlinks not followed, each inode once, at
/// most `budget` entries. Returns (bytes, inodes, complete).
pub fn walk(dir: &Path, budget: u64) -> Result<(u64, u64, bool), StatsError> {
    let io_err = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| StatsError::Io {
            action,
            path,
            source,
        }
    };
    let top = std::fs::symlink_metadata(dir).map_err(io_err("stat", dir))?;
    let dev = top.dev();
    let (mut bytes, mut inodes) = (top.blocks() * 512, 1u64);
    let mut seen = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        // A dir that vanished or cannot be read mid-walk is skipped, as du.
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            if inodes >= budget {
                return Ok((bytes, inodes, false));
            }
            let Ok(md) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            if md.dev() != dev {
                continue; // a mount point below the volume: not ours
            }
            if md.nlink() > 1 && !md.is_dir() && !seen.insert(md.ino()) {
                continue;
            }
            bytes += md.blocks() * 512;
            inodes += 1;
            if md.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes, true))
}

/// The real probe: the file system and the CSI drivers of the registry.
pub struct HostProbe {
    pub registry: Arc<crate::csi::Registry>,
}

impl StatsProbe for HostProbe {
    fn dir_usage(&self, dir: &Path, budget: u64) -> Result<Usage, StatsError> {
        let (used_bytes, inodes_used, complete) = walk(dir, budget)?;
        if !complete {
            warn!(path = %dir.display(), budget, "volume stats: walk budget reached, usage is a lower bound");
        }
        let st = nix::sys::statvfs::statvfs(dir).map_err(|e| StatsError::Io {
            action: "statvfs",
            path: dir.to_path_buf(),
            source: e.into(),
        })?;
        let frag = st.fragment_size() as u64;
        Ok(Usage {
            capacity_bytes: st.blocks() as u64 * frag,
            available_bytes: st.blocks_available() as u64 * frag,
            used_bytes,
            inodes: st.files() as u64,
            inodes_free: st.files_available() as u64,
            inodes_used,
        })
    }

    fn csi_usage<'a>(
        &'a self,
        driver: &'a str,
        handle: &'a str,
        path: &'a Path,
        staging: &'a str,
    ) -> BoxFuture<'a, Result<Option<Usage>, StatsError>> {
        Box::pin(async move {
            let offered = self
                .registry
                .info(driver)
                .is_some_and(|i| i.node.get_volume_stats);
            let Ok(client) = self.registry.client(driver) else {
                return Ok(None);
            };
            if !offered {
                return Ok(None);
            }
            let resp = client
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: handle.to_string(),
                    volume_path: path.to_string_lossy().into_owned(),
                    staging_target_path: staging.to_string(),
                })
                .await
                .map_err(|e| StatsError::Driver {
                    driver: driver.to_string(),
                    handle: handle.to_string(),
                    message: e.to_string(),
                })?;
            Ok(Some(from_csi(&resp)))
        })
    }
}

/// kubelet's reading of a NodeGetVolumeStats answer: BYTES gives
/// capacity (total), available and used; INODES the same for inodes.
/// Negative numbers (a confused driver) read as 0.
pub fn from_csi(resp: &csi::NodeGetVolumeStatsResponse) -> Usage {
    use csi::volume_usage::Unit;
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    let mut u = Usage::default();
    for usage in &resp.usage {
        match Unit::try_from(usage.unit) {
            Ok(Unit::Bytes) => {
                u.capacity_bytes = n(usage.total);
                u.available_bytes = n(usage.available);
                u.used_bytes = n(usage.used);
            }
            Ok(Unit::Inodes) => {
                u.inodes = n(usage.total);
                u.inodes_free = n(usage.available);
                u.inodes_used = n(usage.used);
            }
            _ => {}
        }
    }
    u
}

#[cfg(test)]
mod tests;
