//! The API server status writer: a `StatusSink` that keeps the latest view
//! of each pod and writes it to `pods/<name>/status` from its own task, as
//! kubelet's status manager does. API pods are written under their own
//! UID; a static pod's status goes to its mirror pod (same name and
//! namespace, annotation `kubernetes.io/config.mirror` = the static pod's
//! config hash).
//!
//! Only real changes are written, and a burst of them once: the first
//! change since the last write waits 250 ms for the rest (a minor one, an IP
//! or a message, 1 s, unless the phase or a container moves meanwhile; 10 s
//! while the pod is still on its normal way to Running, so a slow start is
//! written twice, as kubelet writes it).
//! What the writer compares against is what
//! the server has: read once (GET) when unknown, then what it last wrote.
//! The workers recompute the status on every observation, so before the
//! compare the new status takes the previous `lastTransitionTime` of every
//! condition whose status did not flip, and the server's `startTime`;
//! conditions the kubelet does not own (readiness gates…) are kept. A pod
//! whose server status is terminal (Succeeded, Failed) is never written
//! back to a running phase.
//!
//! The patch is a JSON merge patch (the server is v1.20: no server-side
//! apply) carrying `metadata.uid`, so a pod deleted and recreated under the
//! same name is never written with another pod's status (409).
//!
//! `gone(uid)` of an API pod the server is deleting deletes the object
//! with grace 0 and a UID precondition: the node has stopped its
//! containers, as kubelet's status manager does once they are gone.
//!
//! Failures: an unreachable server makes every pod "unknown" (so after it
//! comes back each is read and compared again: a full resync) and the task
//! backs off (1 s doubling to 30 s, with jitter). 404 and 409 mean the
//! object is gone or another one: the pod is dropped (an API pod) or
//! retried later (a mirror pod not made yet), never a hot loop.
//!
//! Side effects: pod GET, status PATCH and DELETE through `PodApi`; logs.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::pod_api::{ApiError, KubePods, PodApi};
use crate::sink::StatusSink;
use crate::source::static_dir::{
    CONFIG_HASH_ANNOTATION, CONFIG_MIRROR_ANNOTATION, CONFIG_SOURCE_ANNOTATION,
};

/// The pod condition types the kubelet owns; others on the server are kept.
const KUBELET_CONDITIONS: &[&str] = &[
    "PodScheduled",
    "PodReadyToStartContainers",
    "Initialized",
    "Ready",
    "ContainersReady",
];

/// A pod's first change since its last write waits this long for more
/// (a start that takes less is one write, not three).
const QUIET: Duration = Duration::from_millis(250);
/// A change that moves neither the phase nor a container's state (an IP,
/// a condition's reason, a waiting message) waits this many QUIETs: the
/// pod's next real step is usually that close, and then one write carries
/// both (kubelet's own client limit merges them the same way).
const MINOR_QUIETS: u32 = 4;
/// A minor change of a pod that is still starting normally (Pending, every
/// container waiting only to be created) waits this many QUIETs: kubelet
/// writes such a pod twice (Pending, then Running), because its IP and
/// start time come out with the next sync that starts the containers; on a
/// loaded node that takes more than a second, and a third write would
/// carry nothing a user waits for. A pull that takes longer still shows
/// the IP after 10 s.
const STARTING_QUIETS: u32 = 40;
/// How long a mirror pod that is not there yet waits before the next try.
const RETRY: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where a pod's status goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// An API pod: the object with this UID.
    Api {
        namespace: String,
        name: String,
        uid: String,
    },
    /// A static pod: its mirror pod, recognised by the config hash.
    Mirror {
        namespace: String,
        name: String,
        hash: String,
    },
}

impl Target {
    /// A view from a source other than the API (a manifest file) is a
    /// static pod: it carries `kubernetes.io/config.source` other than "api".
    pub fn of(view: &Pod) -> Target {
        let m = &view.metadata;
        let namespace = m.namespace.clone().unwrap_or_else(|| "default".into());
        let name = m.name.clone().unwrap_or_default();
        let ann = m.annotations.as_ref();
        let source = ann.and_then(|a| a.get(CONFIG_SOURCE_ANNOTATION));
        match source.map(String::as_str) {
            Some(s) if s != "api" => Target::Mirror {
                namespace,
                name,
                hash: ann
                    .and_then(|a| a.get(CONFIG_HASH_ANNOTATION))
                    .cloned()
                    .unwrap_or_default(),
            },
            _ => Target::Api {
                namespace,
                name,
                uid: m.uid.clone().unwrap_or_default(),
            },
        }
    }

    fn key(&self) -> (&str, &str) {
        match self {
            Target::Api {
                namespace, name, ..
            }
            | Target::Mirror {
                namespace, name, ..
            } => (namespace, name),
        }
    }

    /// Whether `pod` (as read from the server) is the object this target means.
    fn matches(&self, pod: &Pod) -> bool {
        match self {
            Target::Api { uid, .. } => pod.metadata.uid.as_deref() == Some(uid),
            Target::Mirror { hash, .. } => {
                pod.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(CONFIG_MIRROR_ANNOTATION))
                    == Some(hash)
            }
        }
    }
}

fn is_terminal(phase: Option<&str>) -> bool {
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// The status to write: the view's, with what must be carried over from
/// what the server has (`old`). Pure.
pub fn merged_status(view: &PodStatus, old: &PodStatus, host_ip: &str) -> PodStatus {
    let mut new = view.clone();
    if !host_ip.is_empty() {
        new.host_ip = Some(host_ip.to_string());
    }
    if old.start_time.is_some() {
        new.start_time.clone_from(&old.start_time);
    }
    let old_conds = old.conditions.clone().unwrap_or_default();
    let mut conds: Vec<PodCondition> = new.conditions.take().unwrap_or_default();
    for c in &mut conds {
        c.last_probe_time = None;
        if let Some(prev) = old_conds.iter().find(|o| o.type_ == c.type_)
            && prev.status == c.status
            && prev.last_transition_time.is_some()
        {
            c.last_transition_time
                .clone_from(&prev.last_transition_time);
        }
    }
    // Conditions others own (readiness gates, DisruptionTarget…) stay; the
    // scheduler's PodScheduled is replaced only if the view has one.
    for o in &old_conds {
        let ours = KUBELET_CONDITIONS.contains(&o.type_.as_str());
        let in_view = conds.iter().any(|c| c.type_ == o.type_);
        if !in_view && (!ours || o.type_ == "PodScheduled") {
            conds.push(o.clone());
        }
    }
    new.conditions = (!conds.is_empty()).then_some(conds);
    // The server sets qosClass when it creates the pod; it is not the
    // node's to change.
    if old.qos_class.is_some() {
        new.qos_class.clone_from(&old.qos_class);
    }
    if new.nominated_node_name.is_none() {
        new.nominated_node_name.clone_from(&old.nominated_node_name);
    }
    new
}

/// The status as JSON for comparing: no nulls, no empty objects, lists of
/// conditions and container statuses in a fixed order. Times are already
/// whole seconds (the API's format).
fn canonical(s: &PodStatus) -> Value {
    fn clean(v: &mut Value) -> bool {
        match v {
            Value::Null => false,
            Value::Object(m) => {
                m.retain(|_, x| clean(x));
                !m.is_empty()
            }
            Value::Array(a) => {
                for x in a.iter_mut() {
                    clean(x);
                }
                !a.is_empty()
            }
            _ => true,
        }
    }
    let mut v = serde_json::to_value(s).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        for (list, key) in [
            ("conditions", "type"),
            ("containerStatuses", "name"),
            ("initContainerStatuses", "name"),
        ] {
            if let Some(Value::Array(a)) = m.get_mut(list) {
                a.sort_by(|x, y| x[key].as_str().cmp(&y[key].as_str()));
            }
        }
    }
    clean(&mut v);
    v
}

/// Whether writing `new` over `old` changes anything the API shows.
pub fn same_status(new: &PodStatus, old: &PodStatus) -> bool {
    canonical(new) == canonical(old)
}

/// The merge patch writing `status` to the pod with `uid`: the whole
/// status, with the fields the kubelet clears set to null.
pub fn patch_body(uid: &str, status: &PodStatus) -> Value {
    let mut s = serde_json::to_value(status).unwrap_or_default();
    if let Some(m) = s.as_object_mut() {
        for k in [
            "reason",
            "message",
            "podIP",
            "podIPs",
            "initContainerStatuses",
            "containerStatuses",
        ] {
            m.entry(k).or_insert(Value::Null);
        }
    }
    serde_json::json!({ "metadata": { "uid": uid }, "status": s })
}

/// A pod due for a sync: uid, generation, view, gone, what the server has.
type Due = (String, u64, Option<Pod>, bool, Option<Known>);

/// What the writer knows of one pod.
#[derive(Default)]
struct Entry {
    /// The latest view the worker published.
    view: Option<Pod>,
    /// Bumped by every publish/gone; a sync that read an older generation
    /// leaves the entry dirty.
    generation: u64,
    synced_generation: u64,
    gone: bool,
    /// What the server has (as last read or written), `None`: unknown.
    server: Option<Known>,
    /// Do not try again before this (a mirror pod not there yet).
    not_before: Option<Instant>,
}

#[derive(Clone)]
struct Known {
    /// The UID of the object written (the mirror pod's own for a static pod).
    uid: String,
    status: PodStatus,
}

impl Entry {
    fn dirty(&self) -> bool {
        self.generation != self.synced_generation
    }
}

/// The writer: the sink side (cheap, any thread) and its task.
pub struct StatusWriter {
    entries: Mutex<HashMap<String, Entry>>,
    wake: Notify,
    host_ip: String,
    /// How long a first change waits for more before it is written.
    quiet: Duration,
}

/// What one sync of one pod came to.
enum Outcome {
    /// Nothing more to do until the next publish.
    Done(Option<Known>),
    /// Forget the pod (gone from the server, or finished with).
    Forget,
    /// Try again after `RETRY` (a mirror pod not made yet).
    Later(Option<Known>),
}

impl StatusWriter {
    /// A writer for `client`'s server; `host_ip` is the node's InternalIP,
    /// written as each pod's hostIP. Run the returned task until `cancel`.
    pub fn new(
        client: kube::Client,
        host_ip: String,
        cancel: CancellationToken,
    ) -> (Arc<StatusWriter>, impl Future<Output = ()> + Send) {
        Self::with_api(Arc::new(KubePods { client }), host_ip, cancel)
    }

    /// The same over any `PodApi` (tests give a fake).
    pub fn with_api(
        api: Arc<dyn PodApi>,
        host_ip: String,
        cancel: CancellationToken,
    ) -> (Arc<StatusWriter>, impl Future<Output = ()> + Send) {
        let w = Arc::new(StatusWriter {
            entries: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            host_ip,
            quiet: QUIET,
        });
        let task = Arc::clone(&w).run(api, cancel);
        (w, task)
    }

    fn with_entries<R>(&self, f: impl FnOnce(&mut HashMap<String, Entry>) -> R) -> R {
        let mut g = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut g)
    }

    /// Forget what the server has for every pod, so each is read and
    /// compared again (after the server was away, or a mirror pod was
    /// recreated).
    pub fn resync(&self) {
        self.with_entries(|es| {
            for e in es.values_mut() {
                e.server = None;
                e.not_before = None;
                e.generation += 1;
            }
        });
        self.wake.notify_one();
    }

    /// Forget what the server has for pod `uid` (its mirror was just
    /// made again), so its status is read and written again.
    pub fn resync_pod(&self, uid: &str) {
        self.with_entries(|es| {
            if let Some(e) = es.get_mut(uid) {
                e.server = None;
                e.not_before = None;
                e.generation += 1;
            }
        });
        self.wake.notify_one();
    }

    async fn run(self: Arc<Self>, api: Arc<dyn PodApi>, cancel: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let (wait, failed) = match self.pass(api.as_ref()).await {
                Err(e) => {
                    warn!(error = %crate::error_chain(&e), retry_in = ?backoff, "pod status write failed; will resync");
                    self.resync();
                    let w = jitter(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    (w, true)
                }
                Ok(next) => {
                    backoff = BACKOFF_MIN;
                    let w = next.map_or(Duration::from_secs(3600), |at| {
                        at.saturating_duration_since(Instant::now())
                    });
                    (w, false)
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.wake.notified(), if !failed => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Sync every dirty pod that is due; the earliest time a pod waits
    /// for. Stops at the first retryable error.
    async fn pass(&self, api: &dyn PodApi) -> Result<Option<Instant>, ApiError> {
        let now = Instant::now();
        let due: Vec<Due> = self.with_entries(|es| {
            es.iter()
                .filter(|(_, e)| e.dirty() && e.not_before.is_none_or(|t| t <= now))
                .map(|(uid, e)| {
                    (
                        uid.clone(),
                        e.generation,
                        e.view.clone(),
                        e.gone,
                        e.server.clone(),
                    )
                })
                .collect()
        });
        for (uid, generation, view, gone, known) in due {
            let outcome = match view {
                Some(view) => self.sync(api, &uid, &view, gone, known).await?,
                None => Outcome::Forget,
            };
            self.with_entries(|es| {
                let Some(e) = es.get_mut(&uid) else { return };
                match outcome {
                    Outcome::Forget if e.generation == generation => {
                        es.remove(&uid);
                    }
                    Outcome::Forget => e.server = None,
                    Outcome::Done(k) => {
                        e.server = k;
                        e.synced_generation = generation;
                        e.not_before = None;
                    }
                    Outcome::Later(k) => {
                        e.server = k;
                        e.not_before = Some(Instant::now() + RETRY);
                    }
                }
            });
        }
        Ok(self.with_entries(|es| {
            es.values()
                .filter(|e| e.dirty())
                .map(|e| e.not_before.unwrap_or(now))
                .min()
        }))
    }

    async fn sync(
        &self,
        api: &dyn PodApi,
        uid: &str,
        view: &Pod,
        gone: bool,
        known: Option<Known>,
    ) -> Result<Outcome, ApiError> {
        let target = Target::of(view);
        let (ns, name) = target.key();
        let span = tracing::info_span!("pod_status", pod = %format!("{ns}/{name}"), uid);
        self.sync_in(api, &target, view, gone, known)
            .instrument(span)
            .await
    }

    async fn sync_in(
        &self,
        api: &dyn PodApi,
        target: &Target,
        view: &Pod,
        gone: bool,
        known: Option<Known>,
    ) -> Result<Outcome, ApiError> {
        let (ns, name) = target.key();
        if gone {
            if let Target::Api { uid, .. } = &target {
                // Delete only what the server is deleting (the node never
                // deletes a pod it was not asked to): read it first.
                match api.get(ns, name).await {
                    Ok(Some(p))
                        if target.matches(&p) && p.metadata.deletion_timestamp.is_some() =>
                    {
                        match api.delete(ns, name, uid, Some(0)).await {
                            Ok(()) => info!("pod deleted: its containers are gone"),
                            Err(ApiError::Gone { .. }) => {}
                            Err(e) if e.is_retryable() => return Err(e),
                            Err(e) => {
                                warn!(error = %crate::error_chain(&e), "could not delete pod")
                            }
                        }
                    }
                    Ok(_) | Err(ApiError::Gone { .. }) => {}
                    Err(e) if e.is_retryable() => return Err(e),
                    Err(e) => warn!(error = %crate::error_chain(&e), "could not read pod"),
                }
            }
            return Ok(Outcome::Forget);
        }
        let Some(status) = view.status.as_ref() else {
            return Ok(Outcome::Done(known));
        };
        let known = match known {
            Some(k) => k,
            None => match api.get(ns, name).await {
                Ok(Some(p)) if target.matches(&p) => Known {
                    uid: p.metadata.uid.clone().unwrap_or_default(),
                    status: p.status.clone().unwrap_or_default(),
                },
                Ok(_) | Err(ApiError::Gone { .. }) => {
                    return Ok(match target {
                        // Not there (yet): the mirror reconciler makes it.
                        Target::Mirror { .. } => Outcome::Later(None),
                        Target::Api { .. } => Outcome::Forget,
                    });
                }
                Err(e) if e.is_retryable() => return Err(e),
                Err(e) => {
                    warn!(error = %crate::error_chain(&e), "could not read pod");
                    return Ok(Outcome::Later(None));
                }
            },
        };
        let new = merged_status(status, &known.status, &self.host_ip);
        let old_phase = known.status.phase.as_deref();
        if is_terminal(old_phase) && !is_terminal(new.phase.as_deref()) {
            debug!(
                phase = ?new.phase,
                "not writing a running phase over a terminal one"
            );
            return Ok(Outcome::Done(Some(known)));
        }
        if same_status(&new, &known.status) {
            return Ok(Outcome::Done(Some(known)));
        }
        match api
            .patch_status(ns, name, patch_body(&known.uid, &new))
            .await
        {
            Ok(()) => {
                debug!(phase = ?new.phase, "pod status written");
                Ok(Outcome::Done(Some(Known {
                    uid: known.uid,
                    status: new,
                })))
            }
            Err(ApiError::Gone { .. }) => Ok(match target {
                Target::Mirror { .. } => Outcome::Later(None),
                Target::Api { .. } => Outcome::Forget,
            }),
            Err(e) if e.is_retryable() => Err(e),
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "pod status refused");
                Ok(Outcome::Done(Some(known)))
            }
        }
    }
}

/// `d` give or take a quarter, so many nodes do not retry in step.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    let f = 0.75 + f64::from(nanos % 1000) / 2000.0;
    d.mul_f64(f)
}

impl StatusSink for StatusWriter {
    fn publish(&self, uid: &str, pod: &Pod) {
        self.with_entries(|es| {
            let e = es.entry(uid.to_string()).or_default();
            e.view = Some(pod.clone());
            e.gone = false;
            // The first change since the last sync waits a moment, so the
            // steps of a quick start (sandbox, IP, container) are one write;
            // a minor one waits longer, unless a real step comes meanwhile.
            let major = is_major(e.server.as_ref().map(|k| &k.status), pod.status.as_ref());
            let quiets = if major {
                1
            } else if starting(pod.status.as_ref()) {
                STARTING_QUIETS
            } else {
                MINOR_QUIETS
            };
            let at = Instant::now() + self.quiet * quiets;
            match e.not_before {
                None if !e.dirty() => e.not_before = Some(at),
                Some(nb) if major && at < nb => e.not_before = Some(at),
                _ => {}
            }
            e.generation += 1;
        });
        self.wake.notify_one();
    }

    fn gone(&self, uid: &str) {
        let known = self.with_entries(|es| match es.get_mut(uid) {
            Some(e) => {
                e.gone = true;
                e.not_before = None;
                e.generation += 1;
                true
            }
            None => false,
        });
        if known {
            self.wake.notify_one();
        }
    }
}

/// Whether the pod is on its normal way to Running: Pending, no pod-level
/// error, and every container waiting only to be created or initialised,
/// with no message (a failed mount's message is news: it goes out in 1 s).
fn starting(s: Option<&PodStatus>) -> bool {
    let Some(s) = s else { return false };
    s.phase.as_deref() == Some("Pending")
        && s.reason.is_none()
        && s.init_container_statuses
            .iter()
            .flatten()
            .chain(s.container_statuses.iter().flatten())
            .all(|c| {
                c.state
                    .as_ref()
                    .and_then(|st| st.waiting.as_ref())
                    .is_some_and(|w| {
                        w.message.is_none()
                            && matches!(
                                w.reason.as_deref(),
                                Some("ContainerCreating" | "PodInitializing")
                            )
                    })
            })
}

/// Whether `new` moves the pod on from `old` (what the server has): its
/// phase, or any container's state kind or readiness. Unknown is a move.
fn is_major(old: Option<&PodStatus>, new: Option<&PodStatus>) -> bool {
    let (Some(old), Some(new)) = (old, new) else {
        return true;
    };
    fn kinds(s: &PodStatus) -> Vec<(String, u8, bool)> {
        s.init_container_statuses
            .iter()
            .flatten()
            .chain(s.container_statuses.iter().flatten())
            .map(|c| {
                let kind = match &c.state {
                    Some(st) if st.running.is_some() => 1,
                    Some(st) if st.terminated.is_some() => 2,
                    _ => 0,
                };
                (c.name.clone(), kind, c.ready)
            })
            .collect()
    }
    old.phase != new.phase || kinds(old) != kinds(new)
}

#[cfg(test)]
mod tests {
    use super::super::pod_api::fake::FakePods;
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use std::collections::BTreeMap;

    fn t(secs: i64) -> Option<Time> {
        Some(Time(jiff::Timestamp::from_second(secs).unwrap()))
    }

    fn cond(kind: &str, status: &str, at: i64) -> PodCondition {
        PodCondition {
            type_: kind.into(),
            status: status.into(),
            last_transition_time: t(at),
            ..Default::default()
        }
    }

    fn status(phase: &str, conds: Vec<PodCondition>) -> PodStatus {
        PodStatus {
            phase: Some(phase.into()),
            conditions: Some(conds),
            ..Default::default()
        }
    }

    fn api_pod(uid: &str, name: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("default".into());
        p.metadata.uid = Some(uid.into());
        p
    }

    fn static_view(uid: &str, name: &str, hash: &str) -> Pod {
        let mut p = api_pod(uid, name);
        p.metadata.annotations = Some(BTreeMap::from([
            (CONFIG_SOURCE_ANNOTATION.into(), "file".into()),
            (CONFIG_HASH_ANNOTATION.into(), hash.into()),
        ]));
        p
    }

    #[test]
    fn transition_times_move_only_when_a_condition_flips() {
        let old = status(
            "Pending",
            vec![
                cond("PodScheduled", "True", 100),
                cond("Ready", "False", 100),
                cond("Initialized", "True", 100),
                cond("example.com/gate", "True", 90),
            ],
        );
        let view = status(
            "Running",
            vec![
                cond("Initialized", "True", 200),
                cond("Ready", "True", 200),
                cond("PodScheduled", "True", 200),
            ],
        );
        let new = merged_status(&view, &old, "10.0.0.5");
        let c = new.conditions.clone().unwrap();
        let at = |k: &str| {
            c.iter()
                .find(|x| x.type_ == k)
                .unwrap()
                .last_transition_time
                .clone()
        };
        assert_eq!(at("Initialized"), t(100), "unchanged: keeps its time");
        assert_eq!(at("PodScheduled"), t(100));
        assert_eq!(at("Ready"), t(200), "flipped: the new time");
        assert_eq!(at("example.com/gate"), t(90), "others' conditions kept");
        assert_eq!(new.host_ip.as_deref(), Some("10.0.0.5"));
        // The same view again, a second later: nothing to write.
        let again = status(
            "Running",
            vec![
                cond("Ready", "True", 201),
                cond("Initialized", "True", 201),
                cond("PodScheduled", "True", 201),
            ],
        );
        let newer = merged_status(&again, &new, "10.0.0.5");
        assert!(same_status(&newer, &new), "order and times ignored");
    }

    #[test]
    fn compare_ignores_order_nulls_and_empty_objects_but_not_values() {
        let a = serde_json::from_value::<PodStatus>(serde_json::json!({
            "phase": "Running",
            "containerStatuses": [
                {"name": "b", "image": "x", "imageID": "", "ready": true, "restartCount": 0, "lastState": {}},
                {"name": "a", "image": "x", "imageID": "", "ready": true, "restartCount": 0}
            ]
        }))
        .unwrap();
        let mut b = a.clone();
        b.container_statuses.as_mut().unwrap().reverse();
        b.container_statuses.as_mut().unwrap()[0].last_state = None;
        assert!(same_status(&a, &b));
        b.container_statuses.as_mut().unwrap()[0].restart_count = 1;
        assert!(!same_status(&a, &b));
    }

    #[test]
    fn the_patch_clears_what_the_view_no_longer_has() {
        let body = patch_body("u1", &status("Running", vec![]));
        assert_eq!(body["metadata"]["uid"], "u1");
        assert!(body["status"]["reason"].is_null());
        assert!(body["status"].as_object().unwrap().contains_key("message"));
        assert_eq!(body["status"]["phase"], "Running");
    }

    #[test]
    fn static_pods_write_to_their_mirror() {
        assert!(matches!(
            Target::of(&static_view("u", "web-n1", "h1")),
            Target::Mirror { hash, .. } if hash == "h1"
        ));
        assert!(matches!(Target::of(&api_pod("u", "x")), Target::Api { uid, .. } if uid == "u"));
    }

    async fn settle(w: &StatusWriter, api: &FakePods) {
        for _ in 0..20 {
            let _ = w.pass(api).await;
        }
    }

    fn writer() -> Arc<StatusWriter> {
        writer_quiet(Duration::ZERO)
    }

    /// A writer on node IP 10.0.0.5 whose first change waits `quiet`.
    fn writer_quiet(quiet: Duration) -> Arc<StatusWriter> {
        Arc::new(StatusWriter {
            entries: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            host_ip: "10.0.0.5".into(),
            quiet,
        })
    }

    fn with_status(mut p: Pod, s: PodStatus) -> Pod {
        p.status = Some(s);
        p
    }

    #[tokio::test]
    async fn writes_only_real_changes() {
        let api = FakePods::default();
        let mut server = api_pod("u1", "p");
        server.status = Some(status("Pending", vec![cond("PodScheduled", "True", 50)]));
        api.insert(server);
        let w = writer();
        let view = |at| {
            with_status(
                api_pod("u1", "p"),
                status(
                    "Running",
                    vec![cond("Ready", "True", at), cond("PodScheduled", "True", at)],
                ),
            )
        };
        w.publish("u1", &view(100));
        settle(&w, &api).await;
        assert_eq!(api.count("get"), 1);
        assert_eq!(api.count("patch"), 1);
        let s = api.pod("default", "p").unwrap().status.unwrap();
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.host_ip.as_deref(), Some("10.0.0.5"));
        let sched = s.conditions.unwrap();
        let sched = sched.iter().find(|c| c.type_ == "PodScheduled").unwrap();
        assert_eq!(sched.last_transition_time, t(50), "scheduler's time kept");
        // The worker republishes every observation: no more writes.
        for at in 101..110 {
            w.publish("u1", &view(at));
            settle(&w, &api).await;
        }
        assert_eq!(api.count("patch"), 1, "{:?}", api.calls());
        assert_eq!(api.count("get"), 1, "no reads while the server is known");
    }

    #[tokio::test(start_paused = true)]
    async fn a_minor_change_waits_for_the_next_real_step() {
        let api = FakePods::default();
        api.insert(api_pod("u1", "p"));
        let w = writer_quiet(QUIET);
        let pending = || with_status(api_pod("u1", "p"), status("Pending", vec![]));
        w.publish("u1", &pending());
        tokio::time::advance(QUIET).await;
        settle(&w, &api).await;
        assert_eq!(api.count("patch"), 1, "the first status goes out soon");
        // The sandbox's IP: minor, it waits.
        let mut with_ip = pending();
        with_ip.status.as_mut().unwrap().pod_ip = Some("10.1.0.7".into());
        w.publish("u1", &with_ip);
        tokio::time::advance(QUIET * 2).await;
        settle(&w, &api).await;
        assert_eq!(api.count("patch"), 1, "a minor change waits");
        // Running arrives: one write carries both.
        let mut running = with_ip.clone();
        running.status.as_mut().unwrap().phase = Some("Running".into());
        w.publish("u1", &running);
        tokio::time::advance(QUIET).await;
        settle(&w, &api).await;
        assert_eq!(api.count("patch"), 2);
        let s = api.pod("default", "p").unwrap().status.unwrap();
        assert_eq!(
            (s.phase.as_deref(), s.pod_ip.as_deref()),
            (Some("Running"), Some("10.1.0.7"))
        );
        // A minor change alone still goes out, later.
        let mut msg = running.clone();
        msg.status.as_mut().unwrap().message = Some("x".into());
        w.publish("u1", &msg);
        tokio::time::advance(QUIET * MINOR_QUIETS).await;
        settle(&w, &api).await;
        assert_eq!(api.count("patch"), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_start_is_still_two_writes_but_a_stuck_one_shows_its_ip() {
        use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting, ContainerStatus};
        let api = FakePods::default();
        api.insert(api_pod("u1", "p"));
        let w = writer_quiet(QUIET);
        let waiting = |reason: &str, ip: Option<&str>| {
            let mut s = status("Pending", vec![]);
            s.container_statuses = Some(vec![ContainerStatus {
                name: "app".into(),
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]);
            s.pod_ip = ip.map(Into::into);
            with_status(api_pod("u1", "p"), s)
        };
        w.publish("u1", &waiting("ContainerCreating", None));
        tokio::time::advance(QUIET).await;
        settle(&w, &api).await;
        assert_eq!(api.count("patch"), 1);
        // The sandbox's IP while the container is being created: a loaded
        // node takes seconds to start it; the IP waits for Running.
        w.publish("u1", &waiting("ContainerCreating", Some("10.1.0.7")));
        tokio::time::advance(QUIET * MINOR_QUIETS * 3).await;
        settle(&w, &api).await;
        assert_eq!(api.count("patch"), 1, "no third write for a starting pod");
        // Still not running after 10 s (a long pull): the IP goes out.
        tokio::time::advance(QUIET * STARTING_QUIETS).await;
        settle(&w, &api).await;
        assert_eq!(api.count("patch"), 2);
        // A pod in trouble is not "starting": its news goes out in 1 s.
        let mut mount_failed = waiting("ContainerCreating", Some("10.1.0.7"));
        let st = mount_failed.status.as_mut().unwrap();
        st.container_statuses.as_mut().unwrap()[0]
            .state
            .as_mut()
            .unwrap()
            .waiting
            .as_mut()
            .unwrap()
            .message = Some("MountVolume.SetUp failed".into());
        assert!(!starting(mount_failed.status.as_ref()));
        w.publish("u1", &waiting("ErrImagePull", Some("10.1.0.7")));
        tokio::time::advance(QUIET).await;
        settle(&w, &api).await;
        assert_eq!(api.count("patch"), 2, "minor: waits a moment");
        tokio::time::advance(QUIET * MINOR_QUIETS).await;
        settle(&w, &api).await;
        assert_eq!(api.count("patch"), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quick_start_is_one_write() {
        let api = FakePods::default();
        api.insert(api_pod("u1", "p"));
        let w = writer_quiet(QUIET);
        for phase in ["Pending", "Pending", "Running"] {
            w.publish(
                "u1",
                &with_status(api_pod("u1", "p"), status(phase, vec![])),
            );
            settle(&w, &api).await;
            tokio::time::advance(Duration::from_millis(60)).await;
        }
        assert_eq!(api.count("patch"), 0, "still quiet");
        tokio::time::advance(QUIET).await;
        settle(&w, &api).await;
        assert_eq!(api.count("patch"), 1);
        let s = api.pod("default", "p").unwrap().status.unwrap();
        assert_eq!(s.phase.as_deref(), Some("Running"));
    }

    #[tokio::test]
    async fn an_outage_resyncs_against_the_server_when_it_returns() {
        let api = FakePods::default();
        api.insert(api_pod("u1", "p"));
        let w = writer();
        w.publish(
            "u1",
            &with_status(api_pod("u1", "p"), status("Running", vec![])),
        );
        settle(&w, &api).await;
        assert_eq!(api.count("patch"), 1);
        api.down.store(true, std::sync::atomic::Ordering::SeqCst);
        w.publish(
            "u1",
            &with_status(api_pod("u1", "p"), status("Succeeded", vec![])),
        );
        assert!(w.pass(&api).await.is_err());
        w.resync();
        // Someone else changed the status meanwhile; the server is back.
        api.down.store(false, std::sync::atomic::Ordering::SeqCst);
        settle(&w, &api).await;
        let s = api.pod("default", "p").unwrap().status.unwrap();
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        let gets = api.count("get");
        assert!(gets >= 2, "read again after the outage: {:?}", api.calls());
    }

    #[tokio::test]
    async fn a_pod_that_is_gone_or_replaced_is_not_a_loop() {
        let api = FakePods::default();
        api.insert(api_pod("other-uid", "p"));
        let w = writer();
        w.publish(
            "u1",
            &with_status(api_pod("u1", "p"), status("Running", vec![])),
        );
        settle(&w, &api).await;
        assert_eq!(api.count("patch"), 0, "never writes another pod's status");
        assert!(w.with_entries(|es| es.is_empty()), "forgotten");
    }

    #[tokio::test]
    async fn terminal_is_never_written_back_to_running() {
        let api = FakePods::default();
        let mut server = api_pod("u1", "p");
        server.status = Some(PodStatus {
            phase: Some("Failed".into()),
            reason: Some("UnexpectedAdmissionError".into()),
            ..Default::default()
        });
        api.insert(server);
        let w = writer();
        w.publish(
            "u1",
            &with_status(api_pod("u1", "p"), status("Pending", vec![])),
        );
        settle(&w, &api).await;
        assert_eq!(api.count("patch"), 0);
    }

    #[tokio::test]
    async fn gone_deletes_a_pod_under_deletion_with_grace_zero() {
        let api = FakePods::default();
        let mut server = api_pod("u1", "p");
        server.metadata.deletion_timestamp = t(10);
        api.insert(server.clone());
        api.insert(api_pod("u2", "q"));
        let w = writer();
        w.publish("u1", &with_status(server, status("Running", vec![])));
        w.publish(
            "u2",
            &with_status(api_pod("u2", "q"), status("Running", vec![])),
        );
        settle(&w, &api).await;
        w.gone("u1");
        w.gone("u2");
        settle(&w, &api).await;
        assert!(api.pod("default", "p").is_none());
        assert!(
            api.calls()
                .contains(&"delete default/p uid=u1 grace=Some(0)".to_string())
        );
        assert!(api.pod("default", "q").is_some(), "not being deleted: kept");
        assert!(w.with_entries(|es| es.is_empty()));
    }

    #[tokio::test]
    async fn a_static_pod_waits_for_its_mirror_then_writes_to_it() {
        let api = FakePods::default();
        let w = writer();
        let view = with_status(static_view("s1", "web-n1", "h1"), status("Running", vec![]));
        w.publish("s1", &view);
        settle(&w, &api).await;
        assert_eq!(api.count("patch"), 0);
        let mut mirror = api_pod("m1", "web-n1");
        mirror.metadata.annotations = Some(BTreeMap::from([(
            CONFIG_MIRROR_ANNOTATION.into(),
            "h1".into(),
        )]));
        api.insert(mirror);
        w.resync();
        settle(&w, &api).await;
        let s = api.pod("default", "web-n1").unwrap().status.unwrap();
        assert_eq!(s.phase.as_deref(), Some("Running"));
    }
}
