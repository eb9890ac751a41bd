//! The pod manager: keeps exactly one worker per pod uid, for pods a source
//! wants and for pods the runtime still holds (adopted after a restart, torn
//! down when no source wants them). A periodic relist (kubelet's PLEG) lists
//! this node's sandboxes and containers in two calls and wakes only the
//! workers whose pod changed, so a crashed container is noticed within a
//! relist period without every worker polling.
//!
//! Side effects: ListPodSandbox / ListContainers; spawning worker tasks.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::PodStatus;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::worker::{Handle, Shared, Worker};
use crate::cri::{Labels, Runtime};
use crate::labels;
use crate::source::Snapshot;

pub struct Manager<R: Runtime> {
    shared: Arc<Shared<R>>,
    max_pods: usize,
    workers: HashMap<String, Handle>,
    tasks: JoinSet<String>,
    fingerprints: HashMap<String, u64>,
    snapshot: Snapshot,
    cancel: CancellationToken,
}

impl<R: Runtime> Manager<R> {
    pub fn new(shared: Arc<Shared<R>>, max_pods: usize, cancel: CancellationToken) -> Self {
        Manager {
            shared,
            max_pods,
            workers: HashMap::new(),
            tasks: JoinSet::new(),
            fingerprints: HashMap::new(),
            snapshot: Snapshot::default(),
            cancel,
        }
    }

    fn spawn(&mut self, uid: &str, desired: Option<Arc<crate::source::DesiredPod>>) {
        let (worker, handle) = Worker::new(uid.to_string(), self.shared.clone(), desired);
        let cancel = self.cancel.child_token();
        let uid_owned = uid.to_string();
        self.tasks.spawn(async move {
            worker.run(cancel).await;
            uid_owned
        });
        self.workers.insert(uid.to_string(), handle);
    }

    /// Bring the set of workers in line with a source snapshot.
    pub fn apply(&mut self, snapshot: Snapshot) {
        self.shared.board.set_errors(snapshot.errors.clone());
        for (uid, desired) in &snapshot.pods {
            match self.workers.get(uid) {
                Some(h) => {
                    h.desired.send_if_modified(|cur| {
                        let changed = cur.as_ref() != Some(desired);
                        if changed {
                            *cur = Some(desired.clone());
                        }
                        changed
                    });
                }
                None if self.workers.len() < self.max_pods => {
                    info!(pod = %desired.name(), uid = %uid, source = %desired.source, "pod added");
                    self.spawn(uid, Some(desired.clone()));
                }
                None => {
                    // kubelet's admission: over maxPods the pod is rejected, not run.
                    let mut pod = desired.pod.clone();
                    pod.status = Some(PodStatus {
                        phase: Some("Failed".into()),
                        reason: Some("OutOfpods".into()),
                        message: Some(format!(
                            "Node didn't have enough resource: pods, maxPods {}",
                            self.max_pods
                        )),
                        ..Default::default()
                    });
                    self.shared.board.set_pod(uid, pod);
                }
            }
        }
        for (uid, h) in &self.workers {
            if !snapshot.pods.contains_key(uid) {
                h.desired.send_if_modified(|cur| cur.take().is_some());
            }
        }
        // Rejected pods that are no longer wanted leave the board.
        for pod in self.shared.board.view("").pods {
            let uid = pod.metadata.uid.unwrap_or_default();
            if !snapshot.pods.contains_key(&uid) && !self.workers.contains_key(&uid) {
                self.shared.board.remove_pod(&uid);
            }
        }
        self.snapshot = snapshot;
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
                    None => {
                        info!(uid = %uid, "adopting pod the runtime holds but no source wants: tearing it down");
                        self.spawn(&uid, None);
                    }
                }
            }
            seen.insert(uid, fp);
        }
        // A pod whose objects all vanished also counts as a change.
        for uid in self.fingerprints.keys() {
            if !seen.contains_key(uid)
                && let Some(handle) = self.workers.get(uid)
            {
                handle.wake.notify_one();
            }
        }
        self.fingerprints = seen;
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
                Some(done) = self.tasks.join_next() => {
                    let Ok(uid) = done else { continue };
                    debug!(uid = %uid, "worker ended");
                    self.workers.remove(&uid);
                    self.fingerprints.remove(&uid);
                    // Level-triggered: if the pod is wanted again, start over.
                    if let Some(d) = self.snapshot.pods.get(&uid).cloned() {
                        self.spawn(&uid, Some(d));
                    }
                }
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

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
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
        settle().await;
        let view = sh.board.view("");
        let rejected: Vec<_> = view
            .pods
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("OutOfpods"))
            .collect();
        assert_eq!(rejected.len(), 1);
        cancel.cancel();
    }

    #[tokio::test]
    async fn orphans_in_the_runtime_are_torn_down() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let sh = shared(rt.clone(), tmp.path());
        let cancel = CancellationToken::new();
        let (tx, rx) = watch::channel(snap(&["a"]));
        let m = Manager::new(sh.clone(), 10, cancel.clone());
        let task = tokio::spawn(m.run(rx, Duration::from_millis(20)));
        settle().await;
        assert_eq!(rt.sandboxes().len(), 1);
        // The source drops the pod: the runtime ends up empty.
        tx.send(Snapshot::default()).unwrap();
        for _ in 0..100 {
            if rt.sandboxes().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(rt.sandboxes().is_empty() && rt.containers().is_empty());
        // A new manager with an empty source adopts and removes leftovers.
        let rt2 = Arc::new(FakeRuntime::with_images(&["img:1"]));
        let sh2 = shared(rt2.clone(), tmp.path());
        let (tx2, rx2) = watch::channel(snap(&["b"]));
        let m2 = Manager::new(sh2.clone(), 10, cancel.child_token());
        let t2 = tokio::spawn(m2.run(rx2, Duration::from_millis(20)));
        settle().await;
        assert_eq!(rt2.sandboxes().len(), 1);
        cancel.cancel();
        task.await.unwrap();
        t2.await.unwrap();
        let m3_cancel = CancellationToken::new();
        let (_tx3, rx3) = watch::channel(Snapshot::default());
        let t3 = tokio::spawn(
            Manager::new(sh2.clone(), 10, m3_cancel.clone()).run(rx3, Duration::from_millis(20)),
        );
        for _ in 0..100 {
            if rt2.sandboxes().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(rt2.sandboxes().is_empty(), "orphan sandbox removed");
        m3_cancel.cancel();
        t3.await.unwrap();
        drop(tx2);
    }
}
