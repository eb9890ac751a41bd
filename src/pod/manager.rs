//! The pod manager: keeps exactly one worker per pod uid, for pods a source
//! wants and for pods the runtime still holds (adopted after a restart, torn
//! down when no source wants them). A periodic relist (kubelet's PLEG) lists
//! this node's sandboxes and containers in two calls and wakes only the
//! workers whose pod changed, so a crashed container is noticed within a
//! relist period without every worker polling.
//!
//! Each pod a source wants gets `Desired::Run`; a pod the API server is
//! deleting, or one no source wants any more, `Desired::Terminate`. A pod
//! the runtime holds that no source wants is torn down only once every
//! source has listed (the merger's "sources synced" gate): until then it
//! may belong to a source that has not spoken yet.
//!
//! A worker task that dies (a panic in it, or its task aborted) is noticed
//! on the JoinSet and started again, with a log line: one pod's bug must not
//! leave that pod unmanaged, nor take the other pods down. Restarts of the
//! same pod back off (at once, then 1 s doubling to 60 s; reset once a
//! worker has lived 5 minutes), so a worker that panics on every step
//! costs little.
//!
//! Pod dirs left on disk by pods nothing runs any more (the agent died
//! between removing the sandbox and tearing the volumes down) get a
//! terminating worker too, once sources have synced.
//!
//! Side effects: ListPodSandbox / ListContainers; listing the pod dirs;
//! spawning worker tasks.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::PodStatus;
use tokio::sync::watch;
#[cfg(test)]
use tokio::task::AbortHandle;
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::lifecycle::next_delay;
use super::worker::{Handle, Shared, Worker};
use crate::cri::{Labels, Runtime};
use crate::labels;
use crate::source::{Desired, DesiredPod, Snapshot};

/// Delay before the second restart of a dead worker (the first is at once).
pub const WORKER_RESTART_START: Duration = Duration::from_secs(1);
/// Longest delay between restarts of a worker that keeps dying.
pub const WORKER_RESTART_MAX: Duration = Duration::from_secs(60);
/// A worker that lived this long died for a new reason: restart at once.
pub const WORKER_RESTART_RESET: Duration = Duration::from_secs(300);

/// One worker task, by its task id.
struct Life {
    uid: String,
    started: Instant,
    /// The delay this worker was started after, if it replaced a dead one.
    restart_delay: Option<Duration>,
    /// For the test hook that kills a worker.
    #[cfg(test)]
    abort: AbortHandle,
}

pub struct Manager<R: Runtime> {
    shared: Arc<Shared<R>>,
    max_pods: usize,
    workers: HashMap<String, Handle>,
    tasks: JoinSet<String>,
    lives: HashMap<tokio::task::Id, Life>,
    fingerprints: HashMap<String, u64>,
    snapshot: Snapshot,
    /// Pods rejected at admission (over maxPods), reported as Failed.
    rejected: std::collections::HashSet<String>,
    /// Pods being deleted whose worker has finished: not started again
    /// while the source still lists them (until the object is gone).
    terminated: std::collections::HashSet<String>,
    /// Pods whose worker ended, or whose dir found on disk was given one:
    /// a pod dir is adopted from disk at most once per agent life, so a
    /// dir left in place (mounts under it) is not retried and reported
    /// again on every relist.
    dirs_handled: std::collections::HashSet<String>,
    cancel: CancellationToken,
}

impl<R: Runtime> Manager<R> {
    pub fn new(shared: Arc<Shared<R>>, max_pods: usize, cancel: CancellationToken) -> Self {
        Manager {
            shared,
            max_pods,
            workers: HashMap::new(),
            tasks: JoinSet::new(),
            lives: HashMap::new(),
            fingerprints: HashMap::new(),
            snapshot: Snapshot::default(),
            rejected: Default::default(),
            terminated: Default::default(),
            dirs_handled: Default::default(),
            cancel,
        }
    }

    fn spawn(&mut self, uid: &str, desired: Desired, known: Option<Arc<DesiredPod>>) {
        self.spawn_after(uid, desired, known, None);
    }

    /// Start a worker for `uid`; `restart_delay` when it replaces a dead one
    /// (it waits that long before its first step).
    fn spawn_after(
        &mut self,
        uid: &str,
        desired: Desired,
        known: Option<Arc<DesiredPod>>,
        restart_delay: Option<Duration>,
    ) {
        let (worker, handle) = Worker::new(uid.to_string(), self.shared.clone(), desired, known);
        let cancel = self.cancel.child_token();
        let uid_owned = uid.to_string();
        let delay = restart_delay.unwrap_or_default();
        self.shared.board.readiness.worker_started(uid);
        let abort = self.tasks.spawn(async move {
            if !delay.is_zero() {
                tokio::select! {
                    _ = cancel.cancelled() => return uid_owned,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            worker.run(cancel).await;
            uid_owned
        });
        self.lives.insert(
            abort.id(),
            Life {
                uid: uid.to_string(),
                started: Instant::now(),
                restart_delay,
                #[cfg(test)]
                abort,
            },
        );
        self.workers.insert(uid.to_string(), handle);
    }

    /// A worker task ended: forget it; if the pod is still wanted start a
    /// new one (at once when it finished normally, with backoff when it
    /// died). A dead worker of a pod nobody wants is left to the relist,
    /// which adopts whatever the runtime still holds of it.
    fn worker_exited(&mut self, done: Result<(tokio::task::Id, String), JoinError>) {
        let id = match &done {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        let Some(life) = self.lives.remove(&id) else {
            return;
        };
        let uid = life.uid;
        self.workers.remove(&uid);
        self.fingerprints.remove(&uid);
        self.shared.board.readiness.worker_synced(&uid);
        let restart_delay = match done {
            Ok(_) => {
                debug!(uid = %uid, "worker ended");
                self.dirs_handled.insert(uid.clone());
                if self.snapshot.pods.contains_key(&uid) {
                    // Finished while the source still lists it: a pod being
                    // deleted whose object is not gone yet.
                    self.terminated.insert(uid.clone());
                    return;
                }
                None
            }
            Err(e) => {
                let delay = match life.restart_delay {
                    Some(prev) if life.started.elapsed() < WORKER_RESTART_RESET => {
                        next_delay(prev, WORKER_RESTART_START, WORKER_RESTART_MAX)
                    }
                    _ => Duration::ZERO,
                };
                let cause = if e.is_panic() {
                    panic_message(e.into_panic())
                } else {
                    "task aborted".to_string()
                };
                error!(uid = %uid, %cause, restart_in = ?delay, "pod worker died; starting a new one");
                self.shared.board.readiness.worker_restarted();
                Some(delay)
            }
        };
        // Level-triggered: if the pod is wanted, start over.
        if let Some(d) = self.snapshot.pods.get(&uid).cloned() {
            self.spawn_after(&uid, Desired::of(&d), Some(d), restart_delay);
        }
    }

    /// Test hook: abort the worker of `uid` as if its task had died.
    #[cfg(test)]
    fn abort_worker(&self, uid: &str) {
        for life in self.lives.values().filter(|l| l.uid == uid) {
            life.abort.abort();
        }
    }

    /// Bring the set of workers in line with a source snapshot.
    pub fn apply(&mut self, snapshot: Snapshot) {
        self.shared.board.set_errors(snapshot.errors.clone());
        for (uid, pod) in &snapshot.pods {
            let desired = Desired::of(pod);
            match self.workers.get(uid) {
                Some(h) => {
                    h.desired.send_if_modified(|cur| {
                        let changed = *cur != desired;
                        if changed {
                            *cur = desired.clone();
                        }
                        changed
                    });
                }
                None if self.terminated.contains(uid) => {}
                // Being deleted: a worker makes sure nothing of it runs and
                // reports it gone (in API mode the object is then deleted).
                None if matches!(desired, Desired::Terminate { .. }) => {
                    self.unreject(uid);
                    self.spawn(uid, desired, Some(pod.clone()));
                }
                None if self.workers.len() < self.max_pods => {
                    self.unreject(uid);
                    info!(pod = %pod.name(), uid = %uid, source = %pod.source, "pod added");
                    self.spawn(uid, desired, None);
                }
                None => self.reject(uid, pod),
            }
        }
        for (uid, h) in &self.workers {
            if !snapshot.pods.contains_key(uid) {
                h.desired.send_if_modified(|cur| {
                    let changed = matches!(cur, Desired::Run(_));
                    if changed {
                        *cur = Desired::Terminate { grace: None };
                    }
                    changed
                });
            }
        }
        // Rejected pods that are no longer wanted are gone.
        let unwanted: Vec<String> = self
            .rejected
            .iter()
            .filter(|uid| !snapshot.pods.contains_key(*uid))
            .cloned()
            .collect();
        for uid in unwanted {
            self.unreject(&uid);
        }
        self.terminated
            .retain(|uid| snapshot.pods.contains_key(uid));
        if snapshot.synced() && !self.snapshot.synced() {
            info!("all pod sources synced");
        }
        if snapshot.synced() {
            self.shared.board.readiness.sources_synced();
        }
        self.snapshot = snapshot;
    }

    /// kubelet's admission: over maxPods the pod is rejected, not run.
    fn reject(&mut self, uid: &str, desired: &DesiredPod) {
        if !self.rejected.insert(uid.to_string()) {
            return;
        }
        let message = format!(
            "Node didn't have enough resource: pods, maxPods {}",
            self.max_pods
        );
        warn!(pod = %desired.name(), uid = %uid, %message, "pod rejected");
        let mut pod = desired.pod.clone();
        pod.status = Some(PodStatus {
            phase: Some("Failed".into()),
            reason: Some("OutOfpods".into()),
            message: Some(message.clone()),
            ..Default::default()
        });
        self.shared.status.publish(uid, &pod);
        self.shared.events.event(
            &crate::sink::PodRef::of(&pod),
            crate::sink::EventType::Warning,
            "OutOfpods",
            message,
        );
    }

    fn unreject(&mut self, uid: &str) {
        if self.rejected.remove(uid) {
            self.shared.status.gone(uid);
        }
    }

    /// List this node's sandboxes and containers; wake workers whose pod
    /// changed; adopt pods the runtime holds that have no worker.
    pub async fn relist(&mut self) {
        let rt = &self.shared.runtime;
        let selector = Labels::from([(
            labels::MANAGED_BY_NODE.to_string(),
            self.shared.host.node_name.clone(),
        )]);
        let listed = tokio::try_join!(
            rt.list_pod_sandboxes(selector.clone()),
            rt.list_containers(selector)
        );
        let (sandboxes, containers) = match listed {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "relist failed");
                return;
            }
        };
        let mut per_pod: BTreeMap<String, Vec<(String, i32)>> = BTreeMap::new();
        for sb in &sandboxes {
            if let Some(uid) = sb.labels.get(labels::POD_UID) {
                per_pod
                    .entry(uid.clone())
                    .or_default()
                    .push((sb.id.clone(), sb.state));
            }
        }
        for c in &containers {
            if let Some(uid) = c.labels.get(labels::POD_UID) {
                per_pod
                    .entry(uid.clone())
                    .or_default()
                    .push((c.id.clone(), c.state + 10));
            }
        }
        let mut seen = HashMap::new();
        for (uid, mut items) in per_pod {
            items.sort();
            let mut h = DefaultHasher::new();
            items.hash(&mut h);
            let fp = h.finish();
            if self.fingerprints.get(&uid) != Some(&fp) {
                match self.workers.get(&uid) {
                    Some(handle) => handle.wake.notify_one(),
                    None if !self.snapshot.synced() => {
                        debug!(uid = %uid, pending = ?self.snapshot.pending_sources, "pod the runtime holds is left alone until every source has listed");
                        // Not recorded: looked at again on every relist until then.
                        continue;
                    }
                    None => {
                        info!(uid = %uid, "adopting pod the runtime holds but no source wants: tearing it down");
                        self.spawn(&uid, Desired::Terminate { grace: None }, None);
                    }
                }
            }
            seen.insert(uid, fp);
        }
        if self.snapshot.synced() {
            self.adopt_pod_dirs();
        }
        // A pod whose objects all vanished also counts as a change.
        for uid in self.fingerprints.keys() {
            if !seen.contains_key(uid)
                && let Some(handle) = self.workers.get(uid)
            {
                handle.wake.notify_one();
            }
        }
        self.shared
            .board
            .readiness
            .relisted(seen.keys().cloned().collect::<Vec<_>>());
        self.fingerprints = seen;
    }

    /// Pod dirs under `<stateDir>/pods` of pods nothing runs and no source
    /// wants (the agent died after the sandbox went, before the volumes
    /// did): a terminating worker tears their volumes down from the disk.
    fn adopt_pod_dirs(&mut self) {
        let Ok(dirs) = std::fs::read_dir(&self.shared.pods_dir) else {
            return;
        };
        let uids: Vec<String> = dirs
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|uid| {
                !self.workers.contains_key(uid)
                    && !self.snapshot.pods.contains_key(uid)
                    && !self.terminated.contains(uid)
                    && !self.dirs_handled.contains(uid)
            })
            .collect();
        for uid in uids {
            info!(uid = %uid, "pod dir on disk with no pod: tearing its volumes down");
            self.dirs_handled.insert(uid.clone());
            self.spawn(&uid, Desired::Terminate { grace: None }, None);
        }
    }

    /// Run until cancelled: apply snapshots, relist every `relist_every`,
    /// reap finished workers. Workers stop with the same token; pods keep
    /// running (as kubelet on SIGTERM).
    pub async fn run(mut self, mut snapshots: watch::Receiver<Snapshot>, relist_every: Duration) {
        let first = snapshots.borrow_and_update().clone();
        self.apply(first);
        self.relist().await;
        let mut tick = tokio::time::interval(relist_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snap = snapshots.borrow_and_update().clone();
                    self.apply(snap);
                }
                _ = tick.tick() => self.relist().await,
                Some(done) = self.tasks.join_next_with_id() => self.worker_exited(done),
            }
        }
        while self.tasks.join_next().await.is_some() {}
    }

    /// Number of live workers (tests and benchmarks).
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }
}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p
            .downcast_ref::<&str>()
            .map_or_else(|| "panic".to_string(), |s| s.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::fake::FakeRuntime;
    use crate::source::DesiredPod;

    fn shared(rt: Arc<FakeRuntime>, dir: &std::path::Path) -> Arc<Shared<FakeRuntime>> {
        Arc::new(Shared::for_tests(rt, dir))
    }

    fn snap(uids: &[&str]) -> Snapshot {
        let mut s = Snapshot::default();
        for uid in uids {
            let pod = crate::yaml::from_str(&format!(
                "metadata: {{name: p-{uid}, namespace: default, uid: {uid}}}\nspec:\n  containers: [{{name: app, image: \"img:1\"}}]\n"
            ))
            .unwrap();
            s.pods.insert(
                uid.to_string(),
                Arc::new(DesiredPod {
                    pod,
                    source: "t".into(),
                }),
            );
        }
        s
    }

    /// Wait until `cond` holds, failing after a bound (no sleeps as
    /// synchronisation: the condition is the signal).
    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A manager running on `sh`, wanting pods `uids`, relisting every 20 ms.
    fn run_manager(
        sh: &Arc<Shared<FakeRuntime>>,
        uids: &[&str],
    ) -> (
        watch::Sender<Snapshot>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let cancel = CancellationToken::new();
        let (tx, rx) = watch::channel(snap(uids));
        let m = Manager::new(sh.clone(), 10, cancel.clone());
        (
            tx,
            cancel,
            tokio::spawn(m.run(rx, Duration::from_millis(20))),
        )
    }

    fn running_containers(rt: &FakeRuntime) -> usize {
        rt.containers()
            .iter()
            .filter(|c| c.state == crate::cri::api::ContainerState::ContainerRunning as i32)
            .count()
    }

    fn calls_of(rt: &FakeRuntime, method: &str) -> usize {
        rt.calls().iter().filter(|c| c.starts_with(method)).count()
    }

    #[tokio::test]
    async fn max_pods_rejects_the_extra_pod() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let sh = shared(rt.clone(), tmp.path());
        let cancel = CancellationToken::new();
        let mut m = Manager::new(sh.clone(), 2, cancel.clone());
        m.apply(snap(&["a", "b", "c"]));
        assert_eq!(m.len(), 2);
        wait_until("both admitted pods running", || {
            running_containers(&rt) == 2 && sh.board.view("").pods.len() == 3
        })
        .await;
        let view = sh.board.view("");
        let rejected: Vec<_> = view
            .pods
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("OutOfpods"))
            .collect();
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].metadata.uid.as_deref(), Some("c"));
        assert_eq!(rt.sandboxes().len(), 2, "the rejected pod got no sandbox");
        cancel.cancel();
    }

    #[tokio::test]
    async fn orphans_in_the_runtime_are_torn_down() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let (tx, cancel, task) = run_manager(&shared(rt.clone(), tmp.path()), &["a"]);
        wait_until("a running", || running_containers(&rt) == 1).await;
        assert_eq!(rt.sandboxes().len(), 1);
        // The source drops the pod: the runtime ends up empty.
        tx.send(Snapshot::default()).unwrap();
        wait_until("a torn down", || {
            rt.sandboxes().is_empty() && rt.containers().is_empty()
        })
        .await;
        cancel.cancel();
        task.await.unwrap();
        // A new manager with an empty source adopts and removes leftovers.
        let rt2 = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let (_tx2, cancel2, t2) = run_manager(&shared(rt2.clone(), tmp.path()), &["b"]);
        wait_until("b running", || running_containers(&rt2) == 1).await;
        assert_eq!(rt2.sandboxes().len(), 1);
        cancel2.cancel();
        t2.await.unwrap();
        let sh3 = shared(rt2.clone(), tmp.path());
        let (_tx3, cancel3, t3) = run_manager(&sh3, &[]);
        wait_until("orphan sandbox removed", || rt2.sandboxes().is_empty()).await;
        // The restarted agent said what its first relist found.
        assert_eq!(sh3.board.readiness.status().first_relist_pods, ["b"]);
        cancel3.cancel();
        t3.await.unwrap();
    }

    #[tokio::test]
    async fn a_pod_dir_left_by_a_dead_agent_gets_its_volumes_torn_down() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        // The agent died after the sandbox went, before the volumes did.
        let left = tmp
            .path()
            .join("pods/gone/volumes/kubernetes.io~empty-dir/x");
        std::fs::create_dir_all(&left).unwrap();
        std::fs::write(left.join("f"), "x").unwrap();
        let (_tx, cancel, task) = run_manager(&shared(rt.clone(), tmp.path()), &["a"]);
        wait_until("a running", || running_containers(&rt) == 1).await;
        wait_until("the dir removed", || !tmp.path().join("pods/gone").exists()).await;
        assert!(tmp.path().join("pods").exists());
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_pending_source_holds_back_the_teardown_of_pods_nobody_wants_yet() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let (tx, cancel, task) = run_manager(&shared(rt.clone(), tmp.path()), &["a"]);
        wait_until("a running", || running_containers(&rt) == 1).await;
        cancel.cancel();
        task.await.unwrap();
        drop(tx);
        // Restart with the API source not yet listed: "a" is left alone.
        let sh = shared(rt.clone(), tmp.path());
        let (tx, cancel, task) = run_manager(&sh, &[]);
        let mut waiting = Snapshot::default();
        waiting.pending_sources.push("api".into());
        tx.send(waiting).unwrap();
        // Ten relists' worth of time.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            running_containers(&rt),
            1,
            "nothing torn down before the sources synced"
        );
        assert_eq!(calls_of(&rt, "StopContainer"), 0);
        assert!(!sh.board.readiness.status().sources_synced);
        // The source lists, without "a": now it goes.
        tx.send(Snapshot::default()).unwrap();
        wait_until("a torn down once synced", || rt.sandboxes().is_empty()).await;
        assert!(sh.board.readiness.status().sources_synced);
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_pod_being_deleted_stops_with_its_deletion_grace_and_is_reported_gone_once() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let sh = shared(rt.clone(), tmp.path());
        let (tx, cancel, task) = run_manager(&sh, &["a"]);
        wait_until("a running", || running_containers(&rt) == 1).await;
        let mut deleting = snap(&["a"]);
        let d = deleting.pods.get_mut("a").unwrap();
        let mut pod = d.pod.clone();
        pod.metadata.deletion_timestamp = crate::status::time(1);
        pod.metadata.deletion_grace_period_seconds = Some(7);
        *d = Arc::new(DesiredPod {
            pod,
            source: "t".into(),
        });
        tx.send(deleting.clone()).unwrap();
        wait_until("a torn down", || {
            rt.sandboxes().is_empty() && sh.board.view("").pods.is_empty()
        })
        .await;
        assert!(
            rt.calls()
                .iter()
                .any(|c| c.starts_with("StopContainer") && c.ends_with("grace=7")),
            "stopped with the deletion's grace: {:?}",
            rt.calls()
        );
        // Still listed (the object is not deleted yet): no new worker.
        let stops = calls_of(&rt, "StopPodSandbox");
        tx.send(deleting.clone()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(calls_of(&rt, "RunPodSandbox"), 1);
        assert_eq!(calls_of(&rt, "StopPodSandbox"), stops);
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn ready_once_the_first_relist_is_reconciled() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let sh = shared(rt.clone(), tmp.path());
        sh.board.readiness.runtime_connected();
        // a's first step (sandbox creation) waits for a slot.
        let slots = sh
            .sandbox_slots
            .acquire_many(super::super::worker::PARALLEL_SANDBOXES as u32)
            .await
            .unwrap();
        let (_tx, cancel, task) = run_manager(&sh, &["a"]);
        wait_until("a few relists", || sh.board.readiness.status().relists >= 3).await;
        let st = sh.board.readiness.status();
        assert!(!st.ready, "relisted, but a has not been reconciled: {st:?}");
        assert_eq!(st.pending_pods, ["a"]);
        drop(slots);
        wait_until("ready", || sh.board.readiness.status().ready).await;
        // Ready means a's worker has acted: its sandbox exists.
        assert_eq!(rt.sandboxes().len(), 1);
        cancel.cancel();
        task.await.unwrap();
    }

    /// A worker that panics mid-step is noticed and replaced, and the new
    /// one finishes what the dead one started.
    #[tokio::test]
    async fn a_worker_that_panics_is_started_again_and_converges() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        rt.panic_next("CreateContainer");
        let sh = shared(rt.clone(), tmp.path());
        let (_tx, cancel, task) = run_manager(&sh, &["a"]);
        wait_until("a running after its worker died", || {
            running_containers(&rt) == 1
        })
        .await;
        assert_eq!(sh.board.readiness.status().worker_restarts, 1);
        assert_eq!(calls_of(&rt, "CreateContainer"), 2, "{:?}", rt.calls());
        assert_eq!(
            rt.sandboxes().len(),
            1,
            "the new worker adopted the sandbox"
        );
        cancel.cancel();
        task.await.unwrap();
    }

    /// A worker whose task is aborted is replaced; a worker that keeps dying
    /// is restarted with a growing delay.
    #[tokio::test]
    async fn an_aborted_worker_is_replaced_with_backoff() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let sh = shared(rt.clone(), tmp.path());
        let cancel = CancellationToken::new();
        let mut m = Manager::new(sh.clone(), 10, cancel.clone());
        let delays = |m: &Manager<FakeRuntime>| -> Vec<Option<Duration>> {
            m.lives.values().map(|l| l.restart_delay).collect()
        };
        m.apply(snap(&["a"]));
        for want in [
            Duration::ZERO,
            WORKER_RESTART_START,
            WORKER_RESTART_START * 2,
        ] {
            // Killed before its first step (nothing awaited since the spawn).
            m.abort_worker("a");
            let done = m.tasks.join_next_with_id().await.unwrap();
            assert!(done.as_ref().is_err_and(JoinError::is_cancelled));
            m.worker_exited(done);
            assert_eq!(m.len(), 1, "a new worker for a");
            assert_eq!(delays(&m), [Some(want)]);
        }
        assert_eq!(sh.board.readiness.status().worker_restarts, 3);
        assert!(rt.sandboxes().is_empty(), "the dead workers did nothing");
        // The last one starts after its delay and converges.
        tokio::time::pause();
        let done = tokio::select! {
            d = m.tasks.join_next_with_id() => Some(d),
            _ = async { wait_until("a running", || running_containers(&rt) == 1).await } => None,
        };
        assert!(done.is_none(), "the worker lives: {done:?}");
        assert_eq!(rt.sandboxes().len(), 1);
        cancel.cancel();
        while m.tasks.join_next().await.is_some() {}
    }
}
