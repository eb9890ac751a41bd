//! The per-pod worker: one tokio task per pod uid that owns the pod's
//! `Memory`, observes the runtime, asks `lifecycle::plan` for the next step
//! and performs it through the `Runtime` seam. It never learns where the
//! pod came from: it gets `Option<DesiredPod>` on a watch channel.
//!
//! Side effects: CRI calls, pod log and volume directories, tmpfs mounts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::lifecycle::{
    self, Action, CState, ContainerObs, Memory, Observed, SandboxObs, Waiting, next_delay,
};
use super::spec::{self, Downward, HostContext};
use crate::cri::{CriError, Labels, Runtime, api};
use crate::labels;
use crate::source::DesiredPod;
use crate::status::{self, Board};
use crate::volume;

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
}

/// Where a pod's network attachments are reported (Multus' convention).
pub const NETWORK_STATUS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/network-status";

/// Default size of `Shared::sandbox_slots` (config
/// `maxParallelSandboxCreations`). Measured with `cargo bench --bench
/// static_pods` on 2 cores: 8 finished a burst of 30 pods sooner than 4
/// with no consistent change in the per-pod p50, within 1.05x the best
/// direct floor at 30 and 110 pods; 12 and 16 helped on a quiet machine and
/// not under load (integration/bench/README.md).
pub const PARALLEL_SANDBOXES: usize = 8;

#[cfg(test)]
impl<R> Shared<R> {
    /// A node "n1" with logs and pod dirs under `dir`.
    pub(crate) fn for_tests(runtime: Arc<R>, dir: &std::path::Path) -> Self {
        Shared {
            runtime,
            host: HostContext {
                node_name: "n1".into(),
                pod_logs_dir: dir.join("logs"),
                ..Default::default()
            },
            pods_dir: dir.join("pods"),
            board: Board::default(),
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
    #[error("pod volumes")]
    Volume(#[from] volume::VolumeError),
    #[error("pod spec")]
    Spec(#[from] spec::SpecError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The handle the manager keeps for one worker.
pub struct Handle {
    pub desired: watch::Sender<Option<Arc<DesiredPod>>>,
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
    desired: watch::Receiver<Option<Arc<DesiredPod>>>,
    wake: Arc<Notify>,
    mem: Memory,
    cache: Cache,
    /// The last desired pod, kept to report status while terminating.
    last_pod: Option<Pod>,
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
    /// Spawn-ready worker and the manager's handle for it.
    pub fn new(
        uid: String,
        shared: Arc<Shared<R>>,
        desired: Option<Arc<DesiredPod>>,
    ) -> (Self, Handle) {
        let (tx, rx) = watch::channel(desired);
        let wake = Arc::new(Notify::new());
        let worker = Worker {
            uid,
            shared,
            desired: rx,
            wake: wake.clone(),
            mem: Memory::default(),
            cache: Cache::default(),
            last_pod: None,
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
        let name = match self.desired.borrow().as_deref() {
            Some(d) => format!("{}/{}", d.namespace(), d.name()),
            None => "(no longer wanted)".to_string(),
        };
        let span = info_span!("pod", pod = %name, uid = %self.uid);
        async move {
            let mut error_delay = Duration::ZERO;
            loop {
                let desired = self.desired.borrow_and_update().clone();
                let step = self.step(desired.as_deref()).await;
                let until = match step {
                    Ok(Some(Action::Finished)) => {
                        info!("pod removed");
                        self.shared.board.remove_pod(&self.uid);
                        return;
                    }
                    Ok(Some(Action::Wait { until })) => {
                        error_delay = Duration::ZERO;
                        until.map(|u| Duration::from_nanos((u - status::now_ns()).max(0) as u64))
                    }
                    Ok(_) => {
                        error_delay = Duration::ZERO;
                        continue;
                    }
                    Err(e) => {
                        error_delay = next_delay(
                            error_delay,
                            Duration::from_millis(500),
                            Duration::from_secs(30),
                        );
                        warn!(error = %crate::error_chain(&e), retry_in = ?error_delay, "pod step failed");
                        Some(error_delay)
                    }
                };
                let sleep = until.unwrap_or(self.shared.sync_frequency);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = self.desired.changed() => {}
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(sleep) => {}
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Observe, publish status, plan, act. Returns the action taken.
    async fn step(&mut self, desired: Option<&DesiredPod>) -> Result<Option<Action>, StepError> {
        if let Some(d) = desired.filter(|d| self.last_pod.as_ref() != Some(&d.pod)) {
            self.last_pod = Some(d.pod.clone());
        }
        let obs = self.observe().await?;
        let now = status::now_ns();
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
            self.shared.board.set_pod(&self.uid, view);
        }
        let action = lifecycle::plan(desired.map(|d| &d.pod), &obs, &self.mem, now);
        debug!(?action, "plan");
        self.act(&action, desired, &obs).await?;
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

    /// The pod's grace period: from its spec, else (a pod adopted after a
    /// restart that no source wants) from the containers' annotation.
    fn grace_period(&self, desired: Option<&DesiredPod>, obs: &Observed, ids: &[String]) -> i64 {
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
        obs: &Observed,
    ) -> Result<(), StepError> {
        let rt = self.shared.runtime.clone();
        let ok_if_gone = |r: Result<(), CriError>| match r {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        };
        match action {
            Action::Wait { .. } => Ok(()),
            Action::Finished => {
                volume::cleanup(&self.shared.pods_dir.join(&self.uid))?;
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
                let grace = self.grace_period(desired, obs, ids);
                info!(?ids, grace, "stopping containers");
                let stops = ids.iter().map(|id| rt.stop_container(id, grace));
                for r in futures::future::join_all(stops).await {
                    ok_if_gone(r)?;
                }
                Ok(())
            }
            Action::RemoveContainers { ids } => {
                debug!(?ids, "removing containers");
                let removes = ids.iter().map(|id| rt.remove_container(id));
                for r in futures::future::join_all(removes).await {
                    ok_if_gone(r)?;
                }
                Ok(())
            }
            Action::StopSandbox { id } => {
                info!(sandbox = %id, "stopping sandbox");
                Ok(ok_if_gone(rt.stop_pod_sandbox(id).await)?)
            }
            Action::RemoveSandbox { id } => {
                info!(sandbox = %id, "removing sandbox");
                Ok(ok_if_gone(rt.remove_pod_sandbox(id).await)?)
            }
            Action::CreateSandbox { attempt } => {
                let pod = &desired
                    .expect("plan creates sandboxes only for desired pods")
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
                    .expect("plan starts containers only for desired pods")
                    .pod;
                self.start_container(pod, obs, sandbox_id, name, *init, *restart_count)
                    .await
            }
        }
    }

    async fn create_sandbox(&mut self, pod: &Pod, attempt: u32) {
        let result = async {
            volume::prepare(&self.shared.pods_dir.join(&self.uid), pod)?;
            let config = spec::sandbox_config(pod, &self.shared.host, attempt);
            std::fs::create_dir_all(&config.log_directory).map_err(|source| StepError::Io {
                what: "create log directory",
                path: config.log_directory.clone().into(),
                source,
            })?;
            let _slot = self
                .shared
                .sandbox_slots
                .acquire()
                .await
                .expect("never closed");
            info!(attempt, "creating sandbox");
            Ok::<_, StepError>(self.shared.runtime.run_pod_sandbox(config).await?)
        }
        .await;
        match result {
            Ok(id) => {
                info!(sandbox = %id, "sandbox ready");
                self.mem.sandbox_error = None;
                self.mem.sandbox_backoff = None;
            }
            Err(e) => {
                let msg = crate::error_chain(&e);
                let delay = next_delay(
                    self.mem.sandbox_backoff.map_or(Duration::ZERO, |(d, _)| d),
                    lifecycle::SANDBOX_BACKOFF_START,
                    lifecycle::SANDBOX_BACKOFF_MAX,
                );
                warn!(error = %msg, retry_in = ?delay, "sandbox creation failed");
                self.mem.sandbox_error = Some(msg);
                self.mem.sandbox_backoff =
                    Some((delay, status::now_ns() + delay.as_nanos() as i64));
            }
        }
    }

    /// Pull the image as the policy says. `Err` holds the waiting reason.
    async fn ensure_image(
        &mut self,
        c: &Container,
        sandbox: &api::PodSandboxConfig,
    ) -> Result<(), Waiting> {
        let image = c.image.clone().unwrap_or_default();
        let rt = &self.shared.runtime;
        let present = match spec::pull_policy(c) {
            "Always" => false,
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
            return Ok(());
        }
        if spec::pull_policy(c) == "Never" {
            return Err(Waiting {
                reason: "ErrImageNeverPull".into(),
                message: format!(
                    "container image {image:?} is not present with pull policy of Never"
                ),
            });
        }
        info!(%image, "pulling image");
        match rt.pull_image(&image, sandbox.clone()).await {
            Ok(_) => {
                self.mem.pull_backoff.remove(&image);
                Ok(())
            }
            Err(e) => Err(Waiting {
                reason: "ErrImagePull".into(),
                message: format!("failed to pull image {image:?}: {}", e.message()),
            }),
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
        if let Err(w) = self.ensure_image(c, &sandbox_config).await {
            let image = c.image.clone().unwrap_or_default();
            let (delay, _) = self
                .mem
                .pull_backoff
                .get(&image)
                .copied()
                .unwrap_or_default();
            let delay = next_delay(
                delay,
                lifecycle::PULL_BACKOFF_START,
                lifecycle::PULL_BACKOFF_MAX,
            );
            warn!(container = name, reason = %w.reason, error = %w.message, retry_in = ?delay, "image not available");
            self.mem
                .pull_backoff
                .insert(image, (delay, status::now_ns() + delay.as_nanos() as i64));
            self.mem.waiting.insert(name.to_string(), w);
            return Ok(());
        }
        // Crash backoff bookkeeping: this start is a restart of a dead instance.
        if let Some(prev) = obs.latest(name, init).filter(|p| p.state == CState::Exited) {
            let ran = Duration::from_nanos(
                prev.finished_at.saturating_sub(prev.started_at).max(0) as u64
            );
            let current = if ran >= lifecycle::CRASH_BACKOFF_RESET {
                Duration::ZERO
            } else {
                self.mem.crash_delay.get(name).copied().unwrap_or_default()
            };
            if prev.hash == spec::container_hash(c) {
                let d = next_delay(
                    current,
                    lifecycle::CRASH_BACKOFF_START,
                    lifecycle::CRASH_BACKOFF_MAX,
                );
                self.mem.crash_delay.insert(name.to_string(), d);
            }
        }
        let downward = Downward {
            pod_ip: sandbox_obs.map(|s| s.ip.clone()).unwrap_or_default(),
        };
        let built = volume::prepare(&self.shared.pods_dir.join(&self.uid), pod)
            .map_err(StepError::from)
            .and_then(|paths| {
                Ok(spec::container_config(
                    pod,
                    c,
                    init,
                    restart_count,
                    &self.shared.host,
                    &downward,
                    &paths,
                )?)
            });
        let config = match built {
            Ok(config) => config,
            Err(e) => {
                self.mem.waiting.insert(
                    name.to_string(),
                    Waiting {
                        reason: "CreateContainerConfigError".into(),
                        message: crate::error_chain(&e),
                    },
                );
                return Err(e);
            }
        };
        let log_dir = std::path::Path::new(&sandbox_config.log_directory).join(name);
        std::fs::create_dir_all(&log_dir).map_err(|source| StepError::Io {
            what: "create log directory",
            path: log_dir,
            source,
        })?;
        info!(container = name, init, restart_count, "starting container");
        let rt = &self.shared.runtime;
        let id = match rt
            .create_container(sandbox_id, config, sandbox_config)
            .await
        {
            Ok(id) => id,
            Err(e) => {
                self.mem.waiting.insert(
                    name.to_string(),
                    Waiting {
                        reason: "CreateContainerError".into(),
                        message: e.message(),
                    },
                );
                return Err(e.into());
            }
        };
        if let Err(e) = rt.start_container(&id).await {
            self.mem.waiting.insert(
                name.to_string(),
                Waiting {
                    reason: "RunContainerError".into(),
                    message: e.message(),
                },
            );
            return Err(e.into());
        }
        self.mem.waiting.remove(name);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::fake::FakeRuntime;

    fn desired(yaml: &str) -> Arc<DesiredPod> {
        Arc::new(DesiredPod {
            pod: serde_yaml::from_str(yaml).unwrap(),
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
            let a = w.step(d).await.unwrap().unwrap();
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
        let (mut w, _h) = Worker::new("u1".into(), shared(rt.clone(), tmp.path()), Some(d.clone()));
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
        let (mut w, _h) = Worker::new("u2".into(), shared(rt.clone(), tmp.path()), Some(d.clone()));
        let acts = drive(&mut w, Some(&d), 5).await;
        assert!(
            matches!(acts.last(), Some(Action::Wait { until: Some(_) })),
            "{acts:?}"
        );
        let _ = w.step(Some(&d)).await.unwrap();
        let view = w.shared.board.view("");
        let cs = &view.pods[0]
            .status
            .as_ref()
            .unwrap()
            .container_statuses
            .as_ref()
            .unwrap()[0];
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
        let (mut w, _h) = Worker::new("u1".into(), shared(rt.clone(), tmp.path()), Some(d.clone()));
        drive(&mut w, Some(&d), 10).await;
        // A restarted agent whose sources no longer hold the pod.
        let (mut orphan, _h2) = Worker::new("u1".into(), shared(rt.clone(), tmp.path()), None);
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
        let (mut w, _h) = Worker::new("u1".into(), shared(rt.clone(), tmp.path()), Some(d.clone()));
        drive(&mut w, Some(&d), 10).await;
        let init_id = rt.containers()[0].id.clone();
        rt.exit_container(&init_id, 0);
        drive(&mut w, Some(&d), 10).await;
        // A new agent (fresh worker, empty memory) adopts: no new calls that create.
        let (mut w2, _h2) =
            Worker::new("u1".into(), shared(rt.clone(), tmp.path()), Some(d.clone()));
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
}
