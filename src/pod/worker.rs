//! The per-pod worker: one tokio task per pod uid that owns the pod's
//! `Memory`, observes the runtime, asks `lifecycle::plan` for the next step
//! and performs it through the `Runtime` seam. It never learns where the
//! pod came from: it gets a `Desired` (run this pod, or terminate it with
//! this grace) on a watch channel, and reports through the sinks: the pod's
//! view to a `StatusSink`, what happened (kubelet's event reasons) to an
//! `EventSink`.
//!
//! Side effects: CRI calls, pod log directories, and the volume stage
//! (`volume::set_up` / `tear_down`: volume dirs, mounts, external plugins).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::lifecycle::{
    self, Action, Backoff, CState, ContainerObs, Memory, Observed, Op, PullPolicy, SandboxObs,
    Schedule, VolumesObs, Waiting,
};
use super::spec::{self, Downward, HostContext};
use crate::clock::Clock;
use crate::cri::{CriError, Labels, Runtime, api};
use crate::labels;
use crate::objects::{Kind, ObjectLookup};
use crate::sink::{EventSink, EventType, PodRef, StatusSink};
use crate::source::{Desired, DesiredPod};
use crate::status::{self, Board};
use crate::volume;
use futures::StreamExt;

/// What every worker shares: the runtime, host facts, the status board.
pub struct Shared<R> {
    pub runtime: Arc<R>,
    pub host: HostContext,
    /// `<stateDir>/pods`: each pod's volumes live under `<pods_dir>/<uid>`.
    pub pods_dir: std::path::PathBuf,
    pub board: Board,
    /// Runtime name for container ids in status (`containerd://…`).
    pub runtime_name: String,
    /// kubelet `syncFrequency`: a periodic re-check even with no event.
    pub sync_frequency: Duration,
    /// Sandbox creations in flight at once. RunPodSandbox (with its CNI ADD)
    /// is the heavy call; a burst of pods on a small node finishes sooner,
    /// and each pod much sooner, when a few run at a time instead of all.
    pub sandbox_slots: tokio::sync::Semaphore,
    /// "Now" for every lifecycle decision (the runtime's timestamps are wall time).
    pub clock: Arc<dyn Clock>,
    /// Where pod views go (the board; in API mode also the status writer).
    pub status: Arc<dyn StatusSink>,
    /// Where pod events go (the board; in API mode also the recorder).
    pub events: Arc<dyn EventSink>,
    /// ConfigMaps, Secrets, claims and volumes the pods reference.
    pub objects: Arc<dyn ObjectLookup>,
    /// Service account tokens for projected volumes (API mode only).
    pub tokens: Option<Arc<dyn crate::objects::TokenSource>>,
    /// Mounts of the built-in volume kinds (tmpfs), and the mount table.
    pub mounter: Arc<dyn volume::Mounter>,
    /// Plugins for the volume kinds set up outside `volume` (CSI); the
    /// volume stage asks each whether it `handles` a volume.
    pub external_volumes: Vec<Arc<dyn volume::External>>,
    /// Bumped when what volumes are built from changes (objects, claim
    /// bindings): a pod waiting on a failed volume set-up retries at once.
    pub volume_inputs: crate::objects::Changes,
}

/// Retrying a step that failed before plan could decide (observe, status).
const STEP_ERROR_BACKOFF: Schedule = Schedule {
    start: Duration::from_millis(500),
    max: Duration::from_secs(30),
};

/// Where a pod's network attachments are reported (Multus' convention).
pub const NETWORK_STATUS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/network-status";

/// Default size of `Shared::sandbox_slots` (config
/// `maxParallelSandboxCreations`). Measured with `cargo bench --bench
/// static_pods` on 2 cores: 8 finished a burst of 30 pods sooner than 4
/// with no consistent change in the per-pod p50, within 1.05x the best
/// direct floor at 30 and 110 pods; 12 and 16 helped on a quiet machine and
/// not under load (integration/bench/README.md).
pub const PARALLEL_SANDBOXES: usize = 8;

/// CRI calls one pod makes at once when it acts on many containers (stops,
/// removals). containerd's runc shim v2 serves all containers of a sandbox
/// from one shim process, so a pod's calls all queue on that one shim:
/// 1,000 StopContainer at once wedged containerd 1.6's. Eight keeps a pod
/// with an ordinary handful of containers fully parallel (each gets its
/// whole grace period at once, as kubelet gives it) while a very wide pod
/// streams through its shim eight at a time; the price is that a wide pod
/// whose containers all ignore SIGTERM takes ceil(n/8) grace periods.
pub const POD_CRI_CALLS: usize = 8;

/// The shortest grace a deletion gets (kubelet's
/// minimumGracePeriodInSeconds): a `--grace-period=0` delete still sends
/// SIGTERM and waits this long before SIGKILL.
pub const MIN_GRACE: i64 = 2;

#[cfg(test)]
impl Shared<crate::cri::fake::FakeRuntime> {
    /// A node "n1" with logs and pod dirs under `dir`, on the fake's clock.
    pub(crate) fn for_tests(
        runtime: Arc<crate::cri::fake::FakeRuntime>,
        dir: &std::path::Path,
    ) -> Self {
        let board = Board::default();
        let sinks = Arc::new(crate::sink::Sinks::board(&board));
        Shared {
            clock: runtime.clock(),
            status: sinks.clone(),
            events: sinks,
            objects: Arc::new(crate::objects::ObjectStore::default()),
            tokens: None,
            mounter: Arc::new(volume::mount::fake::FakeMounter::default()),
            external_volumes: Vec::new(),
            volume_inputs: crate::objects::Changes::default(),
            runtime,
            host: HostContext {
                node_name: "n1".into(),
                pod_logs_dir: dir.join("logs"),
                ..Default::default()
            },
            pods_dir: dir.join("pods"),
            board,
            runtime_name: "fake".into(),
            sync_frequency: Duration::from_secs(60),
            sandbox_slots: tokio::sync::Semaphore::new(PARALLEL_SANDBOXES),
        }
    }
}

/// Errors of one step; the worker logs them once and retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("runtime call failed")]
    Cri(#[from] CriError),
    #[error("pod spec")]
    Spec(#[from] spec::SpecError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The plan asked to build something for a pod no source wants (a bug
    /// in `plan`): the step fails and is retried, the worker lives on.
    #[error("cannot {0}: no source wants this pod")]
    NotDesired(&'static str),
    /// The sandbox slots were closed (only at shutdown).
    #[error("waiting for a sandbox slot")]
    SandboxSlots(#[from] tokio::sync::AcquireError),
}

/// The handle the manager keeps for one worker.
pub struct Handle {
    pub desired: watch::Sender<Desired>,
    pub wake: Arc<Notify>,
}

/// Caches of facts the runtime reports that never change for an id.
#[derive(Default)]
struct Cache {
    /// Container status by id, for containers that have exited.
    exited: HashMap<String, api::ContainerStatus>,
    /// started_at of running containers by id.
    started: HashMap<String, i64>,
    /// IP of sandboxes by id.
    ips: HashMap<String, String>,
}

pub struct Worker<R> {
    uid: String,
    shared: Arc<Shared<R>>,
    desired: watch::Receiver<Desired>,
    wake: Arc<Notify>,
    /// `Shared::volume_inputs`, as this worker has seen it.
    volume_inputs: watch::Receiver<u64>,
    /// Its counter value when this worker last looked at what changed.
    volume_seen: u64,
    /// The next volume set-up is a retry because its inputs changed (not
    /// its backoff): failing the same way again is not news.
    retry_on_change: bool,
    mem: Memory,
    cache: Cache,
    /// The last desired pod, kept to report status while terminating.
    last_pod: Option<Pod>,
    /// BackOff events already sent, by container name and reason, so one
    /// back-off is one event (the recorder aggregates repeats anyway).
    backoff_told: HashMap<String, String>,
    /// The pod's volumes as the volume stage last set them up: for which
    /// volumes of the spec, and each one's host path (container mounts).
    volumes: Option<VolumesSetUp>,
    /// Backoff of failed steps (observe and the like); none after a good
    /// one. No step runs before its `until`, even when woken: wake-ups
    /// (relists, manifest rescans) must not shorten it.
    error_backoff: Option<Backoff>,
}

/// `MINILET_FAULT` value (feature `fault-injection`) that aborts the agent
/// right after a pod's volumes are set up, before its first container.
#[cfg(feature = "fault-injection")]
const FAULT_ABORT_AFTER_VOLUMES: &str = "volume-abort-after-setup";

/// What `Action::SetUpVolumes` made.
struct VolumesSetUp {
    spec: Vec<k8s_openapi::api::core::v1::Volume>,
    paths: HashMap<String, std::path::PathBuf>,
}

/// What the run loop does after one turn.
#[derive(Debug, PartialEq)]
enum Next {
    /// The pod is gone: the worker ends.
    Finished,
    /// Something was done: look again at once.
    Again,
    /// Nothing to do before this long, unless something changes.
    Sleep(Duration),
}

fn find_container<'a>(pod: &'a Pod, name: &str, init: bool) -> Option<&'a Container> {
    let s = pod.spec.as_ref()?;
    if init {
        s.init_containers.iter().flatten().find(|c| c.name == name)
    } else {
        s.containers.iter().find(|c| c.name == name)
    }
}

impl<R: Runtime> Worker<R> {
    /// Spawn-ready worker and the manager's handle for it. `known` is the
    /// pod's last spec when it is to be terminated from the start (an API
    /// pod already being deleted), so its status can still be reported.
    pub fn new(
        uid: String,
        shared: Arc<Shared<R>>,
        desired: Desired,
        known: Option<Arc<DesiredPod>>,
    ) -> (Self, Handle) {
        let last_pod = desired.running().or(known.as_ref()).map(|d| d.pod.clone());
        let (tx, rx) = watch::channel(desired);
        let wake = Arc::new(Notify::new());
        let worker = Worker {
            uid,
            volume_inputs: shared.volume_inputs.subscribe(),
            volume_seen: shared.volume_inputs.current(),
            retry_on_change: false,
            shared,
            desired: rx,
            wake: wake.clone(),
            mem: Memory::default(),
            cache: Cache::default(),
            last_pod,
            backoff_told: HashMap::new(),
            volumes: None,
            error_backoff: None,
        };
        (worker, Handle { desired: tx, wake })
    }

    fn selector(&self) -> Labels {
        Labels::from([
            (labels::POD_UID.to_string(), self.uid.clone()),
            (
                labels::MANAGED_BY_NODE.to_string(),
                self.shared.host.node_name.clone(),
            ),
        ])
    }

    /// Run until the pod is gone (returns) or the agent stops (cancel).
    pub async fn run(mut self, cancel: CancellationToken) {
        let name = match &self.last_pod {
            Some(p) => format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or("default"),
                p.metadata.name.as_deref().unwrap_or_default()
            ),
            None => "(no longer wanted)".to_string(),
        };
        let span = info_span!("pod", pod = %name, uid = %self.uid);
        async move {
            loop {
                let desired = self.desired.borrow_and_update().clone();
                let sleep = match self.turn(&desired).await {
                    Next::Finished => return,
                    Next::Again => continue,
                    Next::Sleep(d) => d,
                };
                // A change of volume inputs wakes only a worker whose
                // volume set-up failed; every other one sleeps on, so 30
                // claims binding cost no 30 x 30 extra turns (each two CRI
                // lists).
                let until = tokio::time::Instant::now() + sleep;
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = self.desired.changed() => break,
                        _ = self.wake.notified() => break,
                        Ok(()) = self.volume_inputs.changed() => {
                            if self.volume_inputs_changed() {
                                break;
                            }
                        }
                        _ = tokio::time::sleep_until(until) => break,
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    fn now(&self) -> i64 {
        self.shared.clock.now_ns()
    }

    /// One step, and how long the loop may sleep after it.
    async fn turn(&mut self, desired: &Desired) -> Next {
        let left = self.error_backoff.map_or(0, |b| b.until - self.now());
        if left > 0 {
            return Next::Sleep(Duration::from_nanos(left as u64));
        }
        let step = self.step(desired).await;
        // Reconciled once since the agent started (readiness).
        self.shared.board.readiness.worker_synced(&self.uid);
        match step {
            Ok(Some(Action::Finished)) => {
                info!("pod removed");
                self.shared.status.gone(&self.uid);
                Next::Finished
            }
            Ok(Some(Action::Wait { until })) => {
                self.error_backoff = None;
                let sync = self.shared.sync_frequency;
                Next::Sleep(until.map_or(sync, |u| {
                    Duration::from_nanos((u - self.now()).max(0) as u64).min(sync)
                }))
            }
            Ok(_) => {
                self.error_backoff = None;
                Next::Again
            }
            Err(e) => {
                let b = Backoff::after(self.error_backoff, STEP_ERROR_BACKOFF, self.now());
                warn!(error = %crate::error_chain(&e), retry_in = ?b.delay, "pod step failed");
                self.error_backoff = Some(b);
                Next::Sleep(b.delay)
            }
        }
    }

    /// Observe, publish status, plan, act. Returns the action taken.
    async fn step(&mut self, want: &Desired) -> Result<Option<Action>, StepError> {
        let desired = want.running().map(|d| d.as_ref());
        if let Some(d) = desired.filter(|d| self.last_pod.as_ref() != Some(&d.pod)) {
            self.last_pod = Some(d.pod.clone());
        }
        let mut obs = self.observe().await?;
        obs.volumes = self.volumes_obs(desired.map(|d| &d.pod));
        let now = self.now();
        self.mem.forget_settled(&obs, now);
        if let Some(pod) = desired.map(|d| &d.pod).or(self.last_pod.as_ref()) {
            let mut view = pod.clone();
            view.status = Some(status::compute(
                pod,
                &obs,
                &self.mem,
                &self.shared.runtime_name,
                now,
            ));
            if desired.is_none() {
                view.metadata.deletion_timestamp = status::time(now);
            }
            // Multus' convention: what each network attachment got.
            if let Some(net) = self.shared.board.cni.network_status.annotation(&self.uid) {
                view.metadata
                    .annotations
                    .get_or_insert_default()
                    .insert(NETWORK_STATUS_ANNOTATION.into(), net);
            }
            self.tell_backoffs(&view);
            self.shared.status.publish(&self.uid, &view);
        }
        let action = lifecycle::plan(desired.map(|d| &d.pod), &obs, &self.mem, now);
        debug!(?action, "plan");
        let grace = match want {
            Desired::Terminate { grace } => *grace,
            Desired::Run(_) => None,
        };
        self.act(&action, desired, grace, &obs).await?;
        Ok(Some(action))
    }

    async fn observe(&mut self) -> Result<Observed, StepError> {
        let rt = &self.shared.runtime;
        let (sandboxes, containers) = tokio::try_join!(
            rt.list_pod_sandboxes(self.selector()),
            rt.list_containers(self.selector())
        )?;
        let mut obs = Observed::default();
        for sb in sandboxes {
            let ready = sb.state == api::PodSandboxState::SandboxReady as i32;
            let ip = match self.cache.ips.get(&sb.id) {
                Some(ip) => ip.clone(),
                None if ready => {
                    let ip = match rt.pod_sandbox_status(&sb.id).await {
                        Ok(st) => st.network.map(|n| n.ip).unwrap_or_default(),
                        Err(e) if e.is_not_found() => continue,
                        Err(e) => return Err(e.into()),
                    };
                    self.cache.ips.insert(sb.id.clone(), ip.clone());
                    ip
                }
                None => String::new(),
            };
            obs.sandboxes.push(SandboxObs {
                ready,
                attempt: sb.metadata.as_ref().map_or(0, |m| m.attempt),
                created_at: sb.created_at,
                hash: sb
                    .annotations
                    .get(labels::SANDBOX_HASH)
                    .cloned()
                    .unwrap_or_default(),
                ip,
                id: sb.id,
            });
        }
        for c in containers {
            let mut state = match api::ContainerState::try_from(c.state) {
                Ok(api::ContainerState::ContainerCreated) => CState::Created,
                Ok(api::ContainerState::ContainerRunning) => CState::Running,
                Ok(api::ContainerState::ContainerExited) => CState::Exited,
                _ => CState::Unknown,
            };
            let (mut exit_code, mut reason, mut message) = (0, String::new(), String::new());
            let (mut started_at, mut finished_at) = (0, 0);
            if state == CState::Exited {
                if !self.cache.exited.contains_key(&c.id) {
                    match rt.container_status(&c.id).await {
                        Ok(st) => {
                            self.cache.exited.insert(c.id.clone(), st);
                        }
                        Err(e) if e.is_not_found() => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                let st = &self.cache.exited[&c.id];
                (exit_code, reason, message) =
                    (st.exit_code, st.reason.clone(), st.message.clone());
                (started_at, finished_at) = (st.started_at, st.finished_at);
                state = if st.state == api::ContainerState::ContainerExited as i32 {
                    CState::Exited
                } else {
                    state
                };
            } else if state == CState::Running {
                if !self.cache.started.contains_key(&c.id) {
                    match rt.container_status(&c.id).await {
                        Ok(st) => {
                            self.cache.started.insert(c.id.clone(), st.started_at);
                        }
                        Err(e) if e.is_not_found() => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                started_at = self.cache.started[&c.id];
            }
            let annotation = |k: &str| c.annotations.get(k).cloned().unwrap_or_default();
            obs.containers.push(ContainerObs {
                name: c
                    .labels
                    .get(labels::CONTAINER_NAME)
                    .cloned()
                    .unwrap_or_default(),
                sandbox_id: c.pod_sandbox_id.clone(),
                init: c
                    .labels
                    .get(labels::CONTAINER_INIT)
                    .is_some_and(|v| v == "true"),
                state,
                exit_code,
                reason,
                message,
                created_at: c.created_at,
                started_at,
                finished_at,
                restart_count: annotation(labels::CONTAINER_RESTART_COUNT)
                    .parse()
                    .unwrap_or(0),
                hash: annotation(labels::CONTAINER_HASH),
                image: c
                    .image
                    .as_ref()
                    .map(|i| i.image.clone())
                    .unwrap_or_default(),
                image_ref: c.image_ref.clone(),
                grace_period: annotation(labels::POD_TERMINATION_GRACE_PERIOD)
                    .parse()
                    .ok(),
                id: c.id,
            });
        }
        // Forget ids the runtime no longer has.
        let live: std::collections::HashSet<&str> =
            obs.containers.iter().map(|c| c.id.as_str()).collect();
        self.cache.exited.retain(|id, _| live.contains(id.as_str()));
        self.cache
            .started
            .retain(|id, _| live.contains(id.as_str()));
        let sbs: std::collections::HashSet<&str> =
            obs.sandboxes.iter().map(|s| s.id.as_str()).collect();
        self.cache.ips.retain(|id, _| sbs.contains(id.as_str()));
        Ok(obs)
    }

    /// The volume stage's observation: set up for this spec (trivially for
    /// a pod without volumes), and whether the pod dir is on disk.
    fn volumes_obs(&self, desired: Option<&Pod>) -> VolumesObs {
        let set_up = desired.is_some_and(|pod| {
            let want = volume::volumes_of(pod);
            want.is_empty() || self.volumes.as_ref().is_some_and(|v| v.spec == want)
        });
        VolumesObs {
            set_up,
            on_disk: self.pod_dir().symlink_metadata().is_ok(),
        }
    }

    fn pod_dir(&self) -> std::path::PathBuf {
        self.shared.pods_dir.join(&self.uid)
    }

    /// The pod's grace period: the deletion's own when the API server gave
    /// one (at least `MIN_GRACE`, as kubelet), else from its spec, else (a
    /// pod adopted after a restart that no source wants) from the
    /// containers' annotation.
    fn grace_period(
        &self,
        desired: Option<&DesiredPod>,
        deletion_grace: Option<i64>,
        obs: &Observed,
        ids: &[String],
    ) -> i64 {
        if let Some(g) = deletion_grace {
            return g.max(MIN_GRACE);
        }
        desired
            .map(|d| &d.pod)
            .or(self.last_pod.as_ref())
            .and_then(|p| p.spec.as_ref()?.termination_grace_period_seconds)
            .or_else(|| {
                obs.containers
                    .iter()
                    .filter(|c| ids.contains(&c.id))
                    .filter_map(|c| c.grace_period)
                    .max()
            })
            .unwrap_or(30)
    }

    async fn act(
        &mut self,
        action: &Action,
        desired: Option<&DesiredPod>,
        deletion_grace: Option<i64>,
        obs: &Observed,
    ) -> Result<(), StepError> {
        let rt = self.shared.runtime.clone();
        match action {
            Action::Wait { .. } => {
                // kubelet's periodic volume sync: a changed ConfigMap or
                // Secret reaches a running pod's files (atomically).
                if let Some(d) = desired
                    && self.volumes.is_some()
                    && lifecycle::current_sandbox(&d.pod, obs).is_some()
                    && let Err(e) = self.refresh_volumes(&d.pod).await
                {
                    debug!(error = %crate::error_chain(&e), "volume refresh failed; files kept");
                }
                Ok(())
            }
            Action::SetUpVolumes => {
                let pod = &desired.ok_or(StepError::NotDesired("set up volumes"))?.pod;
                self.set_up_volumes(pod).await;
                Ok(())
            }
            Action::TearDownVolumes => {
                self.tear_down_volumes().await;
                Ok(())
            }
            Action::Finished => {
                if let Some(t) = &self.shared.tokens {
                    t.forget_pod(&self.uid);
                }
                if let Some(pod) = &self.last_pod {
                    let (name, ns) = (
                        pod.metadata.name.as_deref(),
                        pod.metadata.namespace.as_deref(),
                    );
                    let dir = spec::log_directory(
                        &self.shared.host.pod_logs_dir,
                        ns.unwrap_or("default"),
                        name.unwrap_or_default(),
                        &self.uid,
                    );
                    let _ = std::fs::remove_dir_all(dir);
                }
                Ok(())
            }
            Action::StopContainers { ids } => {
                let grace = self.grace_period(desired, deletion_grace, obs, ids);
                info!(?ids, grace, "stopping containers");
                for c in obs.containers.iter().filter(|c| ids.contains(&c.id)) {
                    self.event(
                        EventType::Normal,
                        "Killing",
                        format!("Stopping container {}", c.name),
                    );
                }
                let results = each_bounded(ids, |id| {
                    let rt = rt.clone();
                    async move { rt.stop_container(&id, grace).await }
                })
                .await;
                self.attempted(Op::StopContainer, results);
                Ok(())
            }
            Action::RemoveContainers { ids } => {
                debug!(?ids, "removing containers");
                let results = each_bounded(ids, |id| {
                    let rt = rt.clone();
                    async move { rt.remove_container(&id).await }
                })
                .await;
                self.attempted(Op::RemoveContainer, results);
                Ok(())
            }
            Action::StopSandbox { id } => {
                info!(sandbox = %id, "stopping sandbox");
                let r = rt.stop_pod_sandbox(id).await;
                self.attempted(Op::StopSandbox, vec![(id.clone(), r)]);
                Ok(())
            }
            Action::RemoveSandbox { id } => {
                info!(sandbox = %id, "removing sandbox");
                let r = rt.remove_pod_sandbox(id).await;
                self.attempted(Op::RemoveSandbox, vec![(id.clone(), r)]);
                Ok(())
            }
            Action::StartCreated { id, name } => {
                info!(container = %name, %id, "starting a container that was created but never started");
                let r = rt.start_container(id).await;
                // Counted even when it answers OK: a container still Created
                // after a start is removed and made afresh, not started again.
                self.attempted(Op::StartCreated, vec![(id.clone(), Ok(()))]);
                match r {
                    Ok(()) => self.started(name),
                    Err(e) => self.start_failed(name, "RunContainerError", e.message()),
                }
                Ok(())
            }
            Action::CreateSandbox { attempt } => {
                let pod = &desired
                    .ok_or(StepError::NotDesired("create a sandbox"))?
                    .pod;
                self.create_sandbox(pod, *attempt).await;
                Ok(())
            }
            Action::StartContainer {
                sandbox_id,
                name,
                init,
                restart_count,
            } => {
                let pod = &desired
                    .ok_or(StepError::NotDesired("start a container"))?
                    .pod;
                self.start_container(pod, obs, sandbox_id, name, *init, *restart_count)
                    .await
            }
        }
    }

    async fn create_sandbox(&mut self, pod: &Pod, attempt: u32) {
        let result = async {
            let config = spec::sandbox_config(pod, &self.shared.host, attempt);
            std::fs::create_dir_all(&config.log_directory).map_err(|source| StepError::Io {
                what: "create log directory",
                path: config.log_directory.clone().into(),
                source,
            })?;
            let _slot = self.shared.sandbox_slots.acquire().await?;
            info!(attempt, "creating sandbox");
            Ok::<_, StepError>(self.shared.runtime.run_pod_sandbox(config).await?)
        }
        .await;
        match result {
            Ok(id) => {
                info!(sandbox = %id, "sandbox ready");
                self.mem.sandbox_error = None;
                // A re-creation counts even when it succeeds: a sandbox that
                // dies at once is not re-made in a loop. The backoff ends
                // once a sandbox has lived (`Memory::forget_settled`).
                self.mem.sandbox_backoff = (attempt > 0).then(|| {
                    Backoff::after(
                        self.mem.sandbox_backoff,
                        lifecycle::SANDBOX_BACKOFF,
                        self.now(),
                    )
                });
            }
            Err(e) => {
                let msg = crate::error_chain(&e);
                let b = Backoff::after(
                    self.mem.sandbox_backoff,
                    lifecycle::SANDBOX_BACKOFF,
                    self.now(),
                );
                warn!(error = %msg, retry_in = ?b.delay, "sandbox creation failed");
                self.event(
                    EventType::Warning,
                    "FailedCreatePodSandBox",
                    format!("Failed to create pod sandbox: {msg}"),
                );
                self.mem.sandbox_error = Some(msg);
                self.mem.sandbox_backoff = Some(b);
            }
        }
    }

    /// Pull the image as the policy says. `Err` holds the waiting reason.
    async fn ensure_image(
        &mut self,
        pod: &Pod,
        c: &Container,
        sandbox: &api::PodSandboxConfig,
    ) -> Result<(), Waiting> {
        let image = lifecycle::pull_key(c).to_string();
        if image.is_empty() {
            // kubelet's answer; no runtime call can help, so none is made.
            return Err(Waiting {
                reason: "InvalidImageName".into(),
                message: format!("container {:?} has no image", c.name),
            });
        }
        let rt = &self.shared.runtime;
        let policy = PullPolicy::of(c);
        let present = match policy {
            PullPolicy::Always => false,
            _ => rt
                .image_status(&image)
                .await
                .map_err(|e| Waiting {
                    reason: "ErrImagePull".into(),
                    message: e.message(),
                })?
                .is_some(),
        };
        if present {
            self.event(
                EventType::Normal,
                "Pulled",
                format!("Container image {image:?} already present on machine"),
            );
            return Ok(());
        }
        if policy == PullPolicy::Never {
            return Err(Waiting {
                reason: "ErrImageNeverPull".into(),
                message: format!(
                    "container image {image:?} is not present with pull policy of Never"
                ),
            });
        }
        info!(%image, "pulling image");
        self.event(
            EventType::Normal,
            "Pulling",
            format!("Pulling image {image:?}"),
        );
        let began = std::time::Instant::now();
        match super::objects::pull_image(
            rt.as_ref(),
            self.shared.objects.as_ref(),
            pod,
            &image,
            sandbox,
        )
        .await
        {
            Ok(_) => {
                self.mem.pull_backoff.remove(&image);
                self.event(
                    EventType::Normal,
                    "Pulled",
                    format!(
                        "Successfully pulled image {image:?} in {:.3}s",
                        began.elapsed().as_secs_f64()
                    ),
                );
                Ok(())
            }
            Err(e) => {
                let message = format!("failed to pull image {image:?}: {}", e.message());
                self.event(
                    EventType::Warning,
                    "Failed",
                    format!("Failed to pull image {image:?}: {}", e.message()),
                );
                Err(Waiting {
                    reason: "ErrImagePull".into(),
                    message,
                })
            }
        }
    }

    async fn start_container(
        &mut self,
        pod: &Pod,
        obs: &Observed,
        sandbox_id: &str,
        name: &str,
        init: bool,
        restart_count: i32,
    ) -> Result<(), StepError> {
        let Some(c) = find_container(pod, name, init) else {
            return Ok(());
        };
        let sandbox_obs = obs.sandboxes.iter().find(|s| s.id == sandbox_id);
        let attempt = sandbox_obs.map_or(0, |s| s.attempt);
        let sandbox_config = spec::sandbox_config(pod, &self.shared.host, attempt);
        if let Err(w) = self.ensure_image(pod, c, &sandbox_config).await {
            let key = lifecycle::pull_key(c).to_string();
            let b = Backoff::after(
                self.mem.pull_backoff.get(&key).copied(),
                lifecycle::PULL_BACKOFF,
                self.now(),
            );
            warn!(container = name, reason = %w.reason, error = %w.message, retry_in = ?b.delay, "image not available");
            self.mem.pull_backoff.insert(key, b);
            self.mem.waiting.insert(name.to_string(), w);
            return Ok(());
        }
        // Crash backoff bookkeeping: this start is a restart of a dead
        // instance, in the crash series `plan` will judge the next death by.
        if let Some(prev) = obs.latest(name, init).filter(|p| p.state == CState::Exited) {
            let series = lifecycle::series_after_restart(prev, &spec::container_hash(c), &self.mem);
            self.mem.crash_series.insert(name.to_string(), series);
        }
        let downward = Downward {
            pod_ip: sandbox_obs.map(|s| s.ip.clone()).unwrap_or_default(),
        };
        // The ConfigMaps and Secrets env uses; kubelet's message as is
        // (`configmap "x" not found`).
        let objects = match super::objects::resolve(pod, c, self.shared.objects.as_ref()).await {
            Ok(objects) => objects,
            Err(e) => {
                self.start_failed(name, "CreateContainerConfigError", e.to_string());
                return Ok(());
            }
        };
        for message in spec::invalid_env_names(pod, c, &objects) {
            self.event(
                EventType::Warning,
                "InvalidEnvironmentVariableNames",
                message,
            );
        }
        // `plan` starts no container before the volume stage set them up.
        let paths = self
            .volumes
            .as_ref()
            .map(|v| v.paths.clone())
            .unwrap_or_default();
        let built = Ok::<_, StepError>(paths).and_then(|paths| {
            Ok(spec::container_config(
                pod,
                c,
                init,
                restart_count,
                &self.shared.host,
                &downward,
                &paths,
                &objects,
            )?)
        });
        let config = match built {
            Ok(config) => config,
            // kubelet's words for a missing key, unprefixed.
            Err(StepError::Spec(e @ spec::SpecError::MissingKey { .. })) => {
                self.start_failed(name, "CreateContainerConfigError", e.to_string());
                return Ok(());
            }
            Err(e) => {
                self.start_failed(name, "CreateContainerConfigError", crate::error_chain(&e));
                return Ok(());
            }
        };
        let log_dir = std::path::Path::new(&sandbox_config.log_directory).join(name);
        if let Err(source) = std::fs::create_dir_all(&log_dir) {
            let e = StepError::Io {
                what: "create log directory",
                path: log_dir,
                source,
            };
            self.start_failed(name, "CreateContainerError", crate::error_chain(&e));
            return Ok(());
        }
        info!(container = name, init, restart_count, "starting container");
        let rt = &self.shared.runtime;
        let id = match rt
            .create_container(sandbox_id, config, sandbox_config)
            .await
        {
            Ok(id) => id,
            Err(e) => {
                self.start_failed(name, "CreateContainerError", e.message());
                return Ok(());
            }
        };
        self.event(
            EventType::Normal,
            "Created",
            format!("Created container {name}"),
        );
        if let Err(e) = rt.start_container(&id).await {
            // The container stays Created: `plan` removes it rather than
            // adopting it, since its start already failed.
            let now = self.now();
            self.mem.attempted(Op::StartCreated, &id, now);
            self.start_failed(name, "RunContainerError", e.message());
            return Ok(());
        }
        self.started(name);
        Ok(())
    }

    /// A container started: its waiting reason and start backoff are over.
    fn started(&mut self, name: &str) {
        self.event(
            EventType::Normal,
            "Started",
            format!("Started container {name}"),
        );
        self.backoff_told.remove(name);
        self.mem.waiting.remove(name);
        self.mem.start_backoff.remove(name);
    }

    /// Creating or starting a container failed: remember why (its waiting
    /// reason) and when to try again. Logged here, once.
    fn start_failed(&mut self, name: &str, reason: &str, message: String) {
        let b = Backoff::after(
            self.mem.start_backoff.get(name).copied(),
            lifecycle::START_BACKOFF,
            self.now(),
        );
        warn!(container = name, reason, error = %message, retry_in = ?b.delay, "container not started");
        self.event(EventType::Warning, "Failed", format!("Error: {message}"));
        self.mem.start_backoff.insert(name.to_string(), b);
        self.mem.waiting.insert(
            name.to_string(),
            Waiting {
                reason: reason.to_string(),
                message,
            },
        );
    }

    /// What the pod's API data volumes are made of (the objects they
    /// reference, fetched now).
    async fn volume_objects(
        &self,
        pod: &Pod,
    ) -> Result<super::objects::Resolved, volume::VolumeError> {
        super::objects::resolve_volumes(
            pod,
            self.shared.objects.as_ref(),
            self.shared.tokens.as_deref(),
        )
        .await
    }

    fn volume_inputs<'a>(&self, objects: &'a super::objects::Resolved) -> volume::Inputs<'a> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as i64);
        volume::Inputs {
            objects,
            node: volume::Allocatable {
                cpu_millis: cpus * 1000,
                memory_bytes: self.shared.host.memory_capacity,
                ephemeral_storage_bytes: 0,
            },
            now: jiff::Timestamp::from_nanosecond(i128::from(self.now()))
                .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
        }
    }

    /// `Action::SetUpVolumes`: every volume of the pod, built-in and
    /// external. A failure is kubelet's FailedMount (event, and the
    /// containers' waiting message), retried with `VOLUME_BACKOFF`.
    async fn set_up_volumes(&mut self, pod: &Pod) {
        let result = async {
            let objects = self.volume_objects(pod).await?;
            let inputs = self.volume_inputs(&objects);
            volume::set_up(
                &self.pod_dir(),
                pod,
                &inputs,
                self.shared.mounter.as_ref(),
                &self.shared.external_volumes,
            )
            .await
        }
        .await;
        match result {
            Ok(paths) => {
                self.retry_on_change = false;
                debug!(volumes = paths.len(), "volumes set up");
                // Test-only: the end-to-end suite's kill -9 between the
                // volumes' set-up (NodePublishVolume) and the first container.
                #[cfg(feature = "fault-injection")]
                if !paths.is_empty()
                    && std::env::var("MINILET_FAULT").is_ok_and(|v| v == FAULT_ABORT_AFTER_VOLUMES)
                {
                    tracing::error!(
                        "MINILET_FAULT={FAULT_ABORT_AFTER_VOLUMES}: aborting before any container starts"
                    );
                    std::process::abort();
                }
                self.mem.volume_backoff = None;
                self.mem.volume_error = None;
                self.volumes = Some(VolumesSetUp {
                    spec: volume::volumes_of(pod).to_vec(),
                    paths,
                });
            }
            Err(e) => {
                let b = Backoff::after(
                    self.mem.volume_backoff,
                    lifecycle::VOLUME_BACKOFF,
                    self.now(),
                );
                let message = crate::error_chain(&e);
                // A retry on someone else's change (another claim bound)
                // that fails as before: no second warning, no event.
                let again = std::mem::take(&mut self.retry_on_change)
                    && self.mem.volume_error.as_deref() == Some(message.as_str());
                if again {
                    debug!(error = %message, retry_in = ?b.delay, "volume setup still failing");
                } else {
                    warn!(error = %message, retry_in = ?b.delay, "volume setup failed");
                    self.event(EventType::Warning, "FailedMount", message.clone());
                }
                self.mem.volume_backoff = Some(b);
                self.mem.volume_error = Some(message);
            }
        }
    }

    /// What volumes are built from changed (a claim bound, an object
    /// appeared): a failed set-up is due again now, not after its backoff.
    /// True when that makes a turn due: the set-up failed and what changed
    /// is something the pod uses (or is not said).
    fn volume_inputs_changed(&mut self) -> bool {
        let now = *self.volume_inputs.borrow_and_update();
        let seen = std::mem::replace(&mut self.volume_seen, now);
        // Most workers have nothing failed: they look no further.
        if self.mem.volume_error.is_none() || self.mem.volume_backoff.is_none() {
            return false;
        }
        let relevant = match (self.shared.volume_inputs.since(seen), &self.last_pod) {
            (Some(what), Some(pod)) => {
                let refs = super::objects::references(pod);
                let claims = refs.iter().any(|r| r.kind == Kind::PersistentVolumeClaim);
                what.iter().any(|r| {
                    refs.contains(r)
                        || (claims && matches!(r.kind, Kind::PersistentVolume | Kind::StorageClass))
                })
            }
            _ => true,
        };
        if relevant {
            debug!("volume inputs changed: retrying the volume set-up now");
            self.mem.volume_backoff = None;
            self.retry_on_change = true;
        }
        relevant
    }

    /// The periodic refresh of a running pod's API data volumes.
    async fn refresh_volumes(&self, pod: &Pod) -> Result<(), volume::VolumeError> {
        let objects = self.volume_objects(pod).await?;
        let inputs = self.volume_inputs(&objects);
        volume::refresh(&self.pod_dir(), pod, &inputs, self.shared.mounter.as_ref())
    }

    /// `Action::TearDownVolumes`, retried with backoff while it fails. A
    /// pod dir that still holds mounts is left in place, said once; the
    /// worker may then end (`Memory::volumes_left`).
    async fn tear_down_volumes(&mut self) {
        let b = self.mem.attempted(Op::TearDownVolumes, "", self.now());
        let result = volume::tear_down(
            &self.pod_dir(),
            &self.uid,
            self.shared.mounter.as_ref(),
            &self.shared.external_volumes,
        )
        .await;
        match result {
            Ok(()) => {
                debug!("volumes torn down");
                self.volumes = None;
            }
            Err(e @ volume::VolumeError::StillPresent { .. }) => {
                error!(error = %e, "pod dir left in place: nothing under a mount is deleted");
                self.mem.volumes_left = true;
            }
            Err(e) => {
                warn!(error = %crate::error_chain(&e), retry_in = ?b.delay, "volume teardown failed");
            }
        }
    }

    /// Tell the event sink about this pod.
    fn event(&self, kind: EventType, reason: &str, message: String) {
        let pod = match &self.last_pod {
            Some(p) => PodRef::of(p),
            None => PodRef {
                uid: self.uid.clone(),
                ..Default::default()
            },
        };
        self.shared.events.event(&pod, kind, reason, message);
    }

    /// kubelet's BackOff events: once each time a container enters a
    /// back-off (CrashLoopBackOff, ImagePullBackOff), seen in its status.
    fn tell_backoffs(&mut self, view: &Pod) {
        let Some(st) = &view.status else { return };
        let all = st
            .init_container_statuses
            .iter()
            .flatten()
            .chain(st.container_statuses.iter().flatten());
        let mut events = vec![];
        for cs in all {
            let reason = cs
                .state
                .as_ref()
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.clone());
            let told = self.backoff_told.get(&cs.name);
            match reason.as_deref() {
                Some(r @ ("CrashLoopBackOff" | "ImagePullBackOff"))
                    if told.map(String::as_str) != Some(r) =>
                {
                    let message = if r == "CrashLoopBackOff" {
                        "Back-off restarting failed container".to_string()
                    } else {
                        format!("Back-off pulling image {:?}", cs.image)
                    };
                    events.push(message);
                    self.backoff_told.insert(cs.name.clone(), r.to_string());
                }
                Some("CrashLoopBackOff" | "ImagePullBackOff") => {}
                _ => {
                    self.backoff_told.remove(&cs.name);
                }
            }
        }
        for message in events {
            self.event(EventType::Warning, "BackOff", message);
        }
    }

    /// Remember an attempt of `op` on each object, so `plan` does not repeat
    /// it before its backoff; log the failures (NotFound counts as done).
    fn attempted(&mut self, op: Op, results: Vec<(String, Result<(), CriError>)>) {
        let now = self.now();
        for (id, r) in results {
            let b = self.mem.attempted(op, &id, now);
            if let Err(e) = &r
                && !e.is_not_found()
            {
                warn!(?op, %id, error = %crate::error_chain(e), retry_in = ?b.delay, "runtime call failed");
            }
        }
    }
}

/// `call` on each id, at most `POD_CRI_CALLS` at once; results by id.
async fn each_bounded<F, Fut>(ids: &[String], call: F) -> Vec<(String, Result<(), CriError>)>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<(), CriError>>,
{
    futures::stream::iter(ids.iter().cloned())
        .map(|id| {
            let fut = call(id.clone());
            async move { (id, fut.await) }
        })
        .buffer_unordered(POD_CRI_CALLS)
        .collect()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::fake::FakeRuntime;

    fn desired(yaml: &str) -> Arc<DesiredPod> {
        Arc::new(DesiredPod {
            pod: crate::yaml::from_str(yaml).unwrap(),
            source: "test".into(),
        })
    }

    const POD: &str = r#"
metadata: {name: web-n1, namespace: default, uid: u1}
spec:
  terminationGracePeriodSeconds: 1
  initContainers: [{name: init, image: "img:1"}]
  containers: [{name: app, image: "img:1"}]
"#;

    /// A test's desired state: run this pod, or (None) terminate it.
    fn want(d: Option<&DesiredPod>) -> Desired {
        match d {
            Some(d) => Desired::Run(Arc::new(d.clone())),
            None => Desired::Terminate { grace: None },
        }
    }

    fn shared(rt: Arc<FakeRuntime>, dir: &std::path::Path) -> Arc<Shared<FakeRuntime>> {
        Arc::new(Shared::for_tests(rt, dir))
    }

    async fn drive(
        w: &mut Worker<FakeRuntime>,
        d: Option<&DesiredPod>,
        steps: usize,
    ) -> Vec<Action> {
        let mut out = vec![];
        for _ in 0..steps {
            let a = w.step(&want(d)).await.unwrap().unwrap();
            let stop = matches!(a, Action::Wait { .. } | Action::Finished);
            out.push(a);
            if stop {
                break;
            }
        }
        out
    }

    #[tokio::test]
    async fn runs_init_then_app_then_tears_down() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let d = desired(POD);
        let (mut w, _h) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp.path()),
            Desired::Run(d.clone()),
            None,
        );
        let acts = drive(&mut w, Some(&d), 10).await;
        assert!(matches!(acts[0], Action::CreateSandbox { attempt: 0 }));
        assert!(
            matches!(&acts[1], Action::StartContainer { name, init: true, .. } if name == "init")
        );
        assert_eq!(
            acts.last(),
            Some(&Action::Wait { until: None }),
            "init runs"
        );
        let init_id = rt.containers()[0].id.clone();
        rt.exit_container(&init_id, 0);
        let acts = drive(&mut w, Some(&d), 10).await;
        assert!(
            matches!(&acts[0], Action::StartContainer { name, init: false, .. } if name == "app")
        );
        let board = w.shared.board.view("");
        let st = board.pods[0].status.as_ref().unwrap();
        assert_eq!(st.phase.as_deref(), Some("Running"));
        assert_eq!(st.pod_ip.as_deref(), Some("10.0.0.1"));
        // kubelet's events, in order, for both containers.
        let events: Vec<String> = board
            .events
            .iter()
            .map(|e| format!("{} {}", e.event.reason, e.event.message))
            .collect();
        assert_eq!(
            events,
            [
                "Pulled Container image \"img:1\" already present on machine",
                "Created Created container init",
                "Started Started container init",
                "Pulled Container image \"img:1\" already present on machine",
                "Created Created container app",
                "Started Started container app",
            ]
        );
        let log_dir = tmp.path().join("logs/default_web-n1_u1/app");
        assert!(log_dir.is_dir());

        // Gone from the source: containers, sandbox, then finished.
        let acts = drive(&mut w, None, 10).await;
        assert!(matches!(acts[0], Action::StopContainers { .. }));
        assert!(matches!(acts[1], Action::StopSandbox { .. }));
        assert_eq!(acts.last(), Some(&Action::Finished));
        assert!(rt.sandboxes().is_empty() && rt.containers().is_empty());
        assert!(!tmp.path().join("logs/default_web-n1_u1").exists());
    }

    #[tokio::test]
    async fn pull_failure_shows_err_image_pull_and_backs_off() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::new());
        rt.fail_next("PullImage", "manifest unknown");
        let d = desired(
            "metadata: {name: p, namespace: default, uid: u2}\nspec:\n  containers: [{name: app, image: \"img:2\"}]\n",
        );
        let (mut w, _h) = Worker::new(
            "u2".into(),
            shared(rt.clone(), tmp.path()),
            Desired::Run(d.clone()),
            None,
        );
        let acts = drive(&mut w, Some(&d), 5).await;
        assert!(
            matches!(acts.last(), Some(Action::Wait { until: Some(_) })),
            "{acts:?}"
        );
        let _ = w.step(&want(Some(&d))).await.unwrap();
        let cs = app_status(&w);
        let waiting = cs.state.as_ref().unwrap().waiting.as_ref().unwrap();
        assert_eq!(waiting.reason.as_deref(), Some("ErrImagePull"));
        assert!(
            waiting
                .message
                .as_deref()
                .unwrap()
                .contains("manifest unknown")
        );
    }

    #[tokio::test]
    async fn an_orphan_is_stopped_with_the_grace_period_it_was_made_with() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let d = desired(POD);
        let (mut w, _h) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp.path()),
            Desired::Run(d.clone()),
            None,
        );
        drive(&mut w, Some(&d), 10).await;
        // A restarted agent whose sources no longer hold the pod.
        let (mut orphan, _h2) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp.path()),
            Desired::Terminate { grace: None },
            None,
        );
        rt.clear_calls();
        drive(&mut orphan, None, 10).await;
        assert!(
            rt.calls()
                .iter()
                .any(|c| c.starts_with("StopContainer") && c.ends_with("grace=1")),
            "{:?}",
            rt.calls()
        );
        assert!(rt.sandboxes().is_empty());
    }

    #[tokio::test]
    async fn adopts_what_runs_without_duplicates() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let d = desired(POD);
        let (mut w, _h) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp.path()),
            Desired::Run(d.clone()),
            None,
        );
        drive(&mut w, Some(&d), 10).await;
        let init_id = rt.containers()[0].id.clone();
        rt.exit_container(&init_id, 0);
        drive(&mut w, Some(&d), 10).await;
        // A new agent (fresh worker, empty memory) adopts: no new calls that create.
        let (mut w2, _h2) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp.path()),
            Desired::Run(d.clone()),
            None,
        );
        rt.clear_calls();
        let acts = drive(&mut w2, Some(&d), 5).await;
        assert_eq!(acts, vec![Action::Wait { until: None }]);
        assert!(
            rt.calls()
                .iter()
                .all(|c| !c.starts_with("Run") && !c.starts_with("Create"))
        );
        assert_eq!(rt.sandboxes().len(), 1);
    }

    /// A plan that asks to build a pod no source wants fails the step (and
    /// is retried); it does not panic the worker.
    #[tokio::test]
    async fn building_an_unwanted_pod_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let (mut w, _h) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp.path()),
            Desired::Terminate { grace: None },
            None,
        );
        let start = Action::StartContainer {
            sandbox_id: "sb1".into(),
            name: "app".into(),
            init: false,
            restart_count: 0,
        };
        for action in [Action::CreateSandbox { attempt: 0 }, start] {
            let err = w
                .act(&action, None, None, &Observed::default())
                .await
                .unwrap_err();
            assert!(matches!(err, StepError::NotDesired(_)), "{err:?}");
        }
        assert!(rt.sandboxes().is_empty() && rt.containers().is_empty());
    }

    const S: i64 = 1_000_000_000;

    /// One app container, as most tests need.
    fn app_pod(uid: &str, containers: &str) -> Arc<DesiredPod> {
        desired(&format!(
            "metadata: {{name: p-n1, namespace: default, uid: {uid}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers: {containers}\n"
        ))
    }

    /// Run the worker's loop (`turn` and its sleeps, as `run` does) on paused
    /// time until `done` holds or `span` of simulated time has passed. A
    /// wake-up every `wake` stands for the manager's relist noticing a
    /// change (and for anything else that interrupts a sleep): a backoff
    /// must hold against it. Stops after 10,000 turns, so a retry that
    /// escapes its backoff fails the test instead of hanging it. Returns
    /// the turns taken.
    async fn simulate(
        w: &mut Worker<FakeRuntime>,
        d: Option<&DesiredPod>,
        span: Duration,
        wake: Option<Duration>,
        done: impl Fn() -> bool,
    ) -> usize {
        let end = tokio::time::Instant::now() + span;
        let mut turns = 0;
        while tokio::time::Instant::now() < end && turns < 10_000 && !done() {
            turns += 1;
            match w.turn(&want(d)).await {
                Next::Finished => break,
                Next::Again => {}
                Next::Sleep(s) => {
                    let left = end - tokio::time::Instant::now();
                    tokio::time::sleep(wake.map_or(s, |w| s.min(w)).min(left)).await;
                }
            }
        }
        turns
    }

    /// Times (ns) of the calls that start with `prefix`.
    fn times(rt: &FakeRuntime, prefix: &str) -> Vec<i64> {
        rt.calls_at()
            .into_iter()
            .filter(|(_, c)| c.starts_with(prefix))
            .map(|(t, _)| t)
            .collect()
    }

    /// Whole seconds between successive times (the fake's stamps differ
    /// from the clock by nanoseconds).
    fn gaps_secs(t: &[i64]) -> Vec<i64> {
        t.windows(2).map(|w| (w[1] - w[0] + S / 2) / S).collect()
    }

    fn app_status(w: &Worker<FakeRuntime>) -> k8s_openapi::api::core::v1::ContainerStatus {
        let view = w.shared.board.view("");
        view.pods[0]
            .status
            .as_ref()
            .unwrap()
            .container_statuses
            .as_ref()
            .unwrap()[0]
            .clone()
    }

    const RELIST: Option<Duration> = Some(Duration::from_secs(1));

    #[tokio::test(start_paused = true)]
    async fn crash_loop_backs_off_10_20_40_to_300_and_resets_after_ten_clean_minutes() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        rt.exit_after("app", Duration::from_secs(1), 1);
        let d = app_pod("u1", "[{name: app, image: \"img:1\"}]");
        let (mut w, _h) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp.path()),
            Desired::Run(d.clone()),
            None,
        );
        let starts = || rt.count("StartContainer");
        simulate(&mut w, Some(&d), Duration::from_secs(3600), RELIST, || {
            starts() >= 9
        })
        .await;
        // Each instance ran 1 s; the rest of each gap is the backoff. The
        // first restart is immediate: at the next wake-up (relist), <= 1 s.
        let waits: Vec<i64> = gaps_secs(&times(&rt, "StartContainer"))
            .iter()
            .map(|g| g - 1)
            .collect();
        assert!(waits[0] <= 1, "{waits:?}");
        assert_eq!(waits[1..], [10, 20, 40, 80, 160, 300, 300]);
        w.step(&want(Some(&d))).await.unwrap();
        let st = app_status(&w);
        assert_eq!(st.restart_count, 8);

        // The ninth instance (just started) runs eleven minutes clean: the
        // backoff resets, its crash restarts at once, the next waits 10 s.
        rt.exit_after("app", Duration::from_secs(660), 1);
        simulate(&mut w, Some(&d), Duration::from_secs(3600), RELIST, || {
            starts() >= 10
        })
        .await;
        rt.exit_after("app", Duration::from_secs(1), 1);
        simulate(&mut w, Some(&d), Duration::from_secs(3600), RELIST, || {
            starts() >= 12
        })
        .await;
        let t = times(&rt, "StartContainer");
        let waits: Vec<i64> = gaps_secs(&t[8..])
            .iter()
            .zip([660, 1, 1])
            .map(|(g, ran)| g - ran)
            .collect();
        assert!(waits[0] <= 1, "{waits:?}");
        assert_eq!(waits[1..], [10, 20]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_agent_keeps_the_crash_loop_backoff_and_the_last_state() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        rt.exit_after("app", Duration::from_secs(1), 1);
        let d = app_pod("u1", "[{name: app, image: \"img:1\"}]");
        let (mut w, _h) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp.path()),
            Desired::Run(d.clone()),
            None,
        );
        // Restart count 3 started, then crashed.
        simulate(&mut w, Some(&d), Duration::from_secs(3600), RELIST, || {
            rt.count("StartContainer") >= 4
        })
        .await;
        simulate(&mut w, Some(&d), Duration::from_secs(2), RELIST, || false).await;
        drop(w);
        let crashed = rt
            .containers()
            .into_iter()
            .filter(|c| c.annotations[crate::labels::CONTAINER_RESTART_COUNT] == "3")
            .map(|c| (c.state, c.finished_at))
            .next()
            .unwrap();
        assert_eq!(crashed.0, api::ContainerState::ContainerExited as i32);

        // A new agent: empty memory, the runtime's records only.
        let (mut w2, _h2) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp.path()),
            Desired::Run(d.clone()),
            None,
        );
        rt.clear_calls();
        simulate(&mut w2, Some(&d), Duration::from_secs(5), RELIST, || false).await;
        assert_eq!(rt.count("StartContainer"), 0, "{:?}", rt.calls());
        let st = app_status(&w2);
        let waiting = st.state.as_ref().unwrap().waiting.as_ref().unwrap();
        assert_eq!(waiting.reason.as_deref(), Some("CrashLoopBackOff"));
        assert!(
            waiting
                .message
                .as_deref()
                .unwrap()
                .starts_with("back-off 40s"),
            "{waiting:?}"
        );
        simulate(&mut w2, Some(&d), Duration::from_secs(120), RELIST, || {
            rt.count("StartContainer") >= 1
        })
        .await;
        let restarted = times(&rt, "StartContainer")[0];
        assert_eq!(
            (restarted - crashed.1) / S,
            40,
            "the fourth crash waits 40 s"
        );

        // Running again (and this time for good): lastState is the attempt
        // before, read from the runtime (this worker never saw it run), and
        // the garbage rule keeps it there.
        rt.exit_after("app", Duration::from_secs(3600), 1);
        simulate(&mut w2, Some(&d), Duration::from_secs(30), RELIST, || false).await;
        let st = app_status(&w2);
        assert_eq!(st.restart_count, 4);
        assert!(st.state.as_ref().unwrap().running.is_some());
        let last = st.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(last.exit_code, 1);
        assert_eq!(last.reason.as_deref(), Some("Error"));
        assert_eq!(last.finished_at, status::time(crashed.1));
        assert!(last.started_at.is_some() && last.container_id.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_container_without_an_image_is_not_retried_in_a_loop() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::new());
        let d = app_pod("u1", "[{name: app}]");
        let (mut w, _h) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp.path()),
            Desired::Run(d.clone()),
            None,
        );
        let turns = simulate(&mut w, Some(&d), Duration::from_secs(600), RELIST, || false).await;
        // One turn a second (the wake-ups), not a loop.
        assert!(turns < 700, "{turns} turns in 600 s");
        assert_eq!(rt.count("PullImage") + rt.count("ImageStatus"), 0);
        // Attempts at 0, 10, 30, 70, 150, 310 s: the pull backoff.
        assert_eq!(w.mem.pull_backoff[""].delay, Duration::from_secs(300));
        let st = app_status(&w);
        let waiting = st.state.as_ref().unwrap().waiting.as_ref().unwrap();
        assert_eq!(waiting.reason.as_deref(), Some("InvalidImageName"));
    }

    /// A running pod "u1" with one app container, then deleted.
    async fn running_then_deleted(
        rt: &Arc<FakeRuntime>,
        tmp: &std::path::Path,
    ) -> Worker<FakeRuntime> {
        let d = app_pod("u1", "[{name: app, image: \"img:1\"}]");
        let (mut w, _h) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp),
            Desired::Run(d.clone()),
            None,
        );
        simulate(&mut w, Some(&d), Duration::from_secs(5), RELIST, || {
            rt.count("StartContainer") >= 1
        })
        .await;
        rt.clear_calls();
        w
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_that_does_not_take_is_repeated_with_backoff() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        rt.ignore_stop("app");
        let mut w = running_then_deleted(&rt, tmp.path()).await;
        simulate(&mut w, None, Duration::from_secs(60), RELIST, || false).await;
        assert_eq!(
            gaps_secs(&times(&rt, "StopContainer")),
            vec![1, 2, 4, 8, 16]
        );
        assert_eq!(rt.count("StopPodSandbox"), 0, "containers first");
    }

    #[tokio::test(start_paused = true)]
    async fn failing_removals_and_sandbox_stops_back_off() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        rt.fail_always("StopPodSandbox", "", "cni teardown failed");
        let mut w = running_then_deleted(&rt, tmp.path()).await;
        simulate(&mut w, None, Duration::from_secs(60), RELIST, || false).await;
        assert_eq!(
            gaps_secs(&times(&rt, "StopPodSandbox")),
            vec![1, 2, 4, 8, 16]
        );

        rt.clear_faults();
        rt.fail_always("RemoveContainer", "", "device or resource busy");
        rt.clear_calls();
        simulate(&mut w, None, Duration::from_secs(60), RELIST, || false).await;
        assert_eq!(
            gaps_secs(&times(&rt, "RemoveContainer")),
            vec![1, 2, 4, 8, 16]
        );

        rt.clear_faults();
        let turns = simulate(&mut w, None, Duration::from_secs(120), RELIST, || false).await;
        assert!(turns < 120);
        assert!(rt.sandboxes().is_empty() && rt.containers().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_config_error_backs_off_and_does_not_hold_up_other_containers() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:bad", "img:1"]));
        let d = app_pod(
            "u1",
            "[{name: bad, image: \"img:bad\", volumeMounts: [{name: nope, mountPath: /x}]}, {name: good, image: \"img:1\"}]",
        );
        let (mut w, _h) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp.path()),
            Desired::Run(d.clone()),
            None,
        );
        simulate(&mut w, Some(&d), Duration::from_secs(60), RELIST, || false).await;
        assert_eq!(
            rt.calls()
                .iter()
                .filter(|c| *c == "CreateContainer good")
                .count(),
            1
        );
        // One image check per attempt: at 0, 1, 3, 7, 15, 25 … 55 s.
        assert_eq!(
            gaps_secs(&times(&rt, "ImageStatus img:bad")),
            vec![1, 2, 4, 8, 10, 10, 10, 10]
        );
        let bad = app_status(&w);
        let waiting = bad.state.as_ref().unwrap().waiting.as_ref().unwrap();
        assert_eq!(
            waiting.reason.as_deref(),
            Some("CreateContainerConfigError")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_a_wide_pod_bounds_the_calls_in_flight() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let names: Vec<String> = (0..100)
            .map(|i| format!("{{name: c{i}, image: \"img:1\"}}"))
            .collect();
        let d = app_pod("u1", &format!("[{}]", names.join(", ")));
        let (mut w, _h) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp.path()),
            Desired::Run(d.clone()),
            None,
        );
        simulate(&mut w, Some(&d), Duration::from_secs(60), RELIST, || {
            rt.count("StartContainer") >= 100
        })
        .await;
        rt.set_latency(Duration::from_millis(100));
        simulate(&mut w, None, Duration::from_secs(600), RELIST, || false).await;
        assert_eq!(rt.count("StopContainer"), 100);
        assert!(rt.containers().is_empty() && rt.sandboxes().is_empty());
        assert_eq!(rt.peak_in_flight(), POD_CRI_CALLS, "parallel, but bounded");
    }

    /// The agent dies between CreateContainer and StartContainer: to the
    /// runtime that is a Created container that never got its start. Then a
    /// new agent's worker (empty memory). Returns it and the container's id.
    async fn created_then_agent_restarted(
        rt: &Arc<FakeRuntime>,
        tmp: &std::path::Path,
        d: &Arc<DesiredPod>,
    ) -> (Worker<FakeRuntime>, String) {
        rt.fail_next("StartContainer", "agent killed");
        let (mut w, _h) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp),
            Desired::Run(d.clone()),
            None,
        );
        w.step(&want(Some(d))).await.unwrap();
        w.step(&want(Some(d))).await.unwrap();
        let made = rt.containers();
        assert_eq!(made.len(), 1);
        assert_eq!(made[0].state, api::ContainerState::ContainerCreated as i32);
        let (w2, _h2) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp),
            Desired::Run(d.clone()),
            None,
        );
        rt.clear_calls();
        (w2, made[0].id.clone())
    }

    /// The calls that make, start or remove something.
    fn changes(rt: &FakeRuntime) -> Vec<String> {
        rt.calls()
            .into_iter()
            .filter(|c| {
                ["Start", "Remove", "Create", "Run"]
                    .iter()
                    .any(|p| c.starts_with(p))
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_container_created_before_an_agent_restart_is_started_not_duplicated() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let d = app_pod("u1", "[{name: app, image: \"img:1\"}]");
        let (mut w2, made) = created_then_agent_restarted(&rt, tmp.path(), &d).await;
        simulate(&mut w2, Some(&d), Duration::from_secs(10), RELIST, || false).await;
        assert_eq!(changes(&rt), vec![format!("StartContainer {made}")]);
        let now = rt.containers();
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].state, api::ContainerState::ContainerRunning as i32);
        assert_eq!(app_status(&w2).restart_count, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_adopted_container_that_fails_to_start_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let d = app_pod("u1", "[{name: app, image: \"img:1\"}]");
        let (mut w2, made) = created_then_agent_restarted(&rt, tmp.path(), &d).await;
        rt.fail_next("StartContainer", "exec format error");
        simulate(&mut w2, Some(&d), Duration::from_secs(10), RELIST, || false).await;
        let changes = changes(&rt);
        assert_eq!(
            changes,
            vec![
                format!("StartContainer {made}"),
                format!("RemoveContainer {made}"),
                "CreateContainer app".to_string(),
                changes.last().cloned().unwrap(),
            ]
        );
        assert!(changes[3].starts_with("StartContainer") && !changes[3].ends_with(&made));
        let now = rt.containers();
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].state, api::ContainerState::ContainerRunning as i32);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sandbox_that_dies_at_once_is_not_remade_in_a_loop() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        rt.sandboxes_die_after(Duration::ZERO);
        let d = app_pod("u1", "[{name: app, image: \"img:1\"}]");
        let (mut w, _h) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp.path()),
            Desired::Run(d.clone()),
            None,
        );
        simulate(&mut w, Some(&d), Duration::from_secs(60), RELIST, || false).await;
        assert_eq!(
            gaps_secs(&times(&rt, "RunPodSandbox")),
            vec![0, 1, 2, 4, 8, 16]
        );
        // Once sandboxes live, the backoff is forgotten.
        rt.sandboxes_die_after(Duration::from_secs(3600));
        simulate(&mut w, Some(&d), Duration::from_secs(120), RELIST, || false).await;
        assert!(w.mem.sandbox_backoff.is_none());
    }

    /// Shared state with a fake external volume plugin and a fake mounter
    /// the test can reach.
    fn shared_with_volumes(
        rt: &Arc<FakeRuntime>,
        dir: &std::path::Path,
        external: &Arc<volume::fake::FakeExternal>,
        mounter: &Arc<volume::mount::fake::FakeMounter>,
    ) -> Arc<Shared<FakeRuntime>> {
        let mut s = Shared::for_tests(rt.clone(), dir);
        s.external_volumes = vec![external.clone()];
        s.mounter = mounter.clone();
        Arc::new(s)
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_volume_set_up_retries_at_once_when_its_inputs_change() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let ext = Arc::new(volume::fake::FakeExternal::default());
        let mounter = Arc::new(volume::mount::fake::FakeMounter::default());
        let d = desired(
            "metadata: {name: p-n1, namespace: default, uid: u1}\nspec:\n  volumes: [{name: data, csi: {driver: d}}]\n  containers: [{name: app, image: \"img:1\"}]\n",
        );
        let shared = shared_with_volumes(&rt, tmp.path(), &ext, &mounter);
        let (mut w, _h) = Worker::new("u1".into(), shared.clone(), want(Some(&d)), None);
        ext.fail_set_up("claim default/data is not bound yet");
        w.step(&want(Some(&d))).await.unwrap();
        assert_eq!(ext.calls().len(), 1);
        // In backoff: another turn (a relist, say) does not retry.
        w.step(&want(Some(&d))).await.unwrap();
        assert_eq!(ext.calls().len(), 1, "backoff holds");
        let failed_mounts = |w: &Worker<FakeRuntime>| {
            w.shared
                .board
                .view("")
                .events
                .iter()
                .filter(|e| e.event.reason == "FailedMount")
                .count()
        };
        assert_eq!(failed_mounts(&w), 1);
        // Another pod's claim binds: nothing to do for this one.
        let claim = |name: &str| crate::objects::ObjectRef {
            kind: Kind::PersistentVolumeClaim,
            namespace: "default".into(),
            name: name.into(),
        };
        shared.volume_inputs.bump_for(claim("theirs"));
        assert!(!w.volume_inputs_changed(), "not this pod's claim");
        // Something unnamed changed: a retry at once, failing as before:
        // no second FailedMount.
        shared.volume_inputs.bump();
        assert!(w.volume_inputs_changed(), "a failed set-up is due again");
        w.step(&want(Some(&d))).await.unwrap();
        assert_eq!(ext.calls().len(), 2);
        assert_eq!(failed_mounts(&w), 1, "the same failure is not news");
        // The claim binds: the next turn retries, backoff or not.
        ext.fail_set_up("");
        shared.volume_inputs.bump();
        assert!(w.volume_inputs.has_changed().unwrap());
        w.volume_inputs_changed();
        w.step(&want(Some(&d))).await.unwrap();
        assert_eq!(ext.calls().len(), 3, "{:?}", ext.calls());
        assert!(w.mem.volume_error.is_none());
        // A change with nothing failed costs nothing: no turn.
        shared.volume_inputs.bump();
        assert!(!w.volume_inputs_changed());
        assert!(w.mem.volume_backoff.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn external_volumes_are_set_up_before_any_container_and_torn_down_after_the_sandbox() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let ext = Arc::new(volume::fake::FakeExternal::default());
        let mounter = Arc::new(volume::mount::fake::FakeMounter::default());
        // Each plugin call, with the runtime calls made before it.
        type Seen = Vec<(String, Vec<String>)>;
        let seen: Arc<std::sync::Mutex<Seen>> = Arc::default();
        let (rt2, seen2) = (rt.clone(), seen.clone());
        ext.witness(Box::new(move |call| {
            seen2.lock().unwrap().push((call.to_string(), rt2.calls()));
        }));
        let d = desired(
            "metadata: {name: p-n1, namespace: default, uid: u1}\nspec:\n  terminationGracePeriodSeconds: 1\n  volumes: [{name: data, csi: {driver: d}}, {name: tmp, emptyDir: {medium: Memory}}]\n  containers: [{name: app, image: \"img:1\", volumeMounts: [{name: data, mountPath: /data}]}]\n",
        );
        ext.fail_set_up("driver d: NodePublishVolume: unavailable");
        let (mut w, _h) = Worker::new(
            "u1".into(),
            shared_with_volumes(&rt, tmp.path(), &ext, &mounter),
            Desired::Run(d.clone()),
            None,
        );
        simulate(&mut w, Some(&d), Duration::from_secs(10), RELIST, || false).await;
        assert_eq!(
            rt.count("RunPodSandbox"),
            0,
            "no sandbox before the volumes"
        );
        let st = app_status(&w);
        let waiting = st.state.as_ref().unwrap().waiting.as_ref().unwrap();
        let failed = "MountVolume.SetUp failed for volume \"data\" : driver d: NodePublishVolume: unavailable";
        assert_eq!(waiting.reason.as_deref(), Some("ContainerCreating"));
        assert_eq!(waiting.message.as_deref(), Some(failed));
        let board = w.shared.board.view("");
        assert!(
            board
                .events
                .iter()
                .any(|e| e.event.reason == "FailedMount" && e.event.message == failed)
        );
        // Retried with backoff: at 0, 0.5, 1.5, 3.5, 7.5 s.
        assert_eq!(ext.calls().len(), 5, "{:?}", ext.calls());

        ext.fail_set_up("");
        simulate(&mut w, Some(&d), Duration::from_secs(20), RELIST, || {
            rt.count("StartContainer") >= 1
        })
        .await;
        let (call, before) = seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(call, "set_up data");
        assert!(
            before
                .iter()
                .all(|c| !c.starts_with("RunPodSandbox") && !c.starts_with("StartContainer")),
            "{before:?}"
        );
        w.step(&want(Some(&d))).await.unwrap();
        assert!(app_status(&w).state.unwrap().running.is_some());
        assert!(w.mem.volume_error.is_none());
        let data = tmp.path().join("pods/u1/volumes/fake~csi/data/mount");
        assert_eq!(w.volumes.as_ref().unwrap().paths["data"], data);

        // Deleted: the plugin tears down after the sandbox is removed, and
        // our tmpfs is unmounted before the pod dir goes.
        simulate(&mut w, None, Duration::from_secs(30), RELIST, || false).await;
        let (call, before) = seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(call, "tear_down u1 data");
        assert!(
            before.iter().any(|c| c.starts_with("RemovePodSandbox")),
            "{before:?}"
        );
        assert!(mounter.mounts().is_empty());
        assert!(!tmp.path().join("pods/u1").exists());
        assert!(rt.sandboxes().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_dir_still_holding_a_mount_is_left_and_said_once() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let ext = Arc::new(volume::fake::FakeExternal::default());
        let mounter = Arc::new(volume::mount::fake::FakeMounter::default());
        let shared = shared_with_volumes(&rt, tmp.path(), &ext, &mounter);
        let d = desired(
            "metadata: {name: p-n1, namespace: default, uid: u1}\nspec:\n  terminationGracePeriodSeconds: 1\n  volumes: [{name: tmp, emptyDir: {}}]\n  containers: [{name: app, image: \"img:1\"}]\n",
        );
        let (mut w, _h) = Worker::new("u1".into(), shared.clone(), Desired::Run(d.clone()), None);
        simulate(&mut w, Some(&d), Duration::from_secs(5), RELIST, || {
            rt.count("StartContainer") >= 1
        })
        .await;
        // Something not ours mounted under the pod dir, holding data.
        let foreign = tmp
            .path()
            .join("pods/u1/volumes/kubernetes.io~empty-dir/tmp/mnt");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("data"), "precious").unwrap();
        mounter.add_mount(&foreign);
        let turns = simulate(&mut w, None, Duration::from_secs(600), RELIST, || false).await;
        assert!(turns < 20, "{turns} turns: the worker must not spin");
        assert!(w.mem.volumes_left);
        assert_eq!(
            std::fs::read_to_string(foreign.join("data")).unwrap(),
            "precious"
        );
        assert!(rt.sandboxes().is_empty());
        // The worker finished: a new one (the manager's adoption of the
        // dir after a restart) tries once more, and leaves it too.
        let (mut w2, _h2) = Worker::new(
            "u1".into(),
            shared,
            Desired::Terminate { grace: None },
            None,
        );
        let acts = drive(&mut w2, None, 5).await;
        assert_eq!(acts, vec![Action::TearDownVolumes, Action::Finished]);
        assert!(foreign.join("data").exists());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_runtime_is_retried_with_backoff_whatever_wakes_the_worker() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        rt.fail_always("ListContainers", "", "runtime unavailable");
        let d = app_pod("u1", "[{name: app, image: \"img:1\"}]");
        let (mut w, _h) = Worker::new(
            "u1".into(),
            shared(rt.clone(), tmp.path()),
            Desired::Run(d.clone()),
            None,
        );
        let often = Some(Duration::from_millis(100));
        simulate(&mut w, Some(&d), Duration::from_secs(60), often, || false).await;
        let t = times(&rt, "ListContainers");
        let gaps_ms: Vec<i64> = t
            .windows(2)
            .map(|w| (w[1] - w[0] + S / 2000) / (S / 1000))
            .collect();
        assert_eq!(gaps_ms, vec![500, 1000, 2000, 4000, 8000, 16000]);
    }
}
