//! The API server pod source: the pods bound to this node
//! (`spec.nodeName=<node>`), watched with kube-runtime's watcher and
//! published to the merger as snapshots keyed by UID (source "api").
//!
//! - `None` until the first complete list (the watcher's `InitDone`), so
//!   the node never tears down an API pod because the server has not
//!   answered yet; then `Some(snapshot)` on every change.
//! - Mirror pods (annotation `kubernetes.io/config.mirror`) are skipped:
//!   they are this node's reflection of its own static pods.
//! - A pod under deletion (deletionTimestamp) stays in the snapshot: the
//!   manager stops it with its deletion grace period, and the status
//!   writer deletes the object once its containers are gone.
//! - A pod the node cannot run (a spec minilet refuses: an unsupported
//!   volume kind, a bad field) is rejected as kubelet rejects a pod at
//!   admission: status phase Failed, reason `UnexpectedAdmissionError`,
//!   message `Pod was rejected: <field errors>`, and a Warning event with
//!   the same reason; it never reaches a worker. When such a pod is then
//!   deleted, the source tells the status writer it is gone (there are no
//!   containers to wait for).
//! - A pod already terminal on the server (Succeeded, Failed) is not
//!   started again; one this source already published stays (its worker
//!   keeps the finished containers).
//! - When the server goes away the watcher retries with backoff and
//!   jitter (800 ms doubling to 30 s, give or take a quarter) and the last
//!   snapshot stays published: no pod is stopped because the server is
//!   unreachable (kubernetes#105543).
//!
//! Side effects: a list+watch of pods; status and events through the sinks.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::sink::{EventSink, EventType, PodRef, StatusSink};
use crate::source::static_dir::CONFIG_MIRROR_ANNOTATION;
use crate::source::validate::{self, FieldError, FieldErrors, Reason};
use crate::source::{DesiredPod, Snapshot};

/// The source's name in the merger and on its pods.
pub const SOURCE: &str = "api";

/// kubelet's reason for a pod its admission could not take for a reason
/// no more specific one names.
pub const REJECT_REASON: &str = "UnexpectedAdmissionError";

/// Volume kinds API pods may use: those the volume code supplies (the same
/// list the static source accepts); a pod with one is not rejected here.
pub const API_VOLUME_KINDS: &[&str] = crate::volume::SUPPORTED_KINDS;

/// What the node does with one pod from the API.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// A mirror pod, or a pod already finished: not this source's to run.
    Skip,
    Run(Box<DesiredPod>),
    /// The node cannot run it: `message` says why (kubelet's wording).
    Reject {
        message: String,
    },
}

/// Whether the validator's error is only about a volume kind API pods may
/// have (the validator knows the kinds the static source supports).
fn allowed_for_api(e: &FieldError) -> bool {
    match &e.reason {
        Reason::NotSupported { value, .. } => {
            e.path.starts_with("spec.volumes[")
                && API_VOLUME_KINDS
                    .iter()
                    .any(|k| value.trim_matches('"') == *k)
        }
        _ => false,
    }
}

fn is_mirror(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(CONFIG_MIRROR_ANNOTATION))
}

/// Decide one pod (pure). `known`: this source published it before.
pub fn classify(pod: &Pod, known: bool) -> Verdict {
    if is_mirror(pod) {
        return Verdict::Skip;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) && !known {
        return Verdict::Skip;
    }
    let mut errors: Vec<FieldError> = validate::validate(pod)
        .into_iter()
        .filter(|e| !allowed_for_api(e))
        .collect();
    if pod.metadata.uid.as_deref().unwrap_or_default().is_empty() {
        errors.push(FieldError {
            path: "metadata.uid".into(),
            reason: Reason::Required(None),
        });
    }
    if errors.is_empty() {
        errors.extend(validate::check_host_paths(pod));
    }
    if !errors.is_empty() {
        return Verdict::Reject {
            message: format!("Pod was rejected: {}", FieldErrors(errors)),
        };
    }
    let mut pod = pod.clone();
    if pod
        .metadata
        .namespace
        .as_deref()
        .unwrap_or_default()
        .is_empty()
    {
        pod.metadata.namespace = Some("default".into());
    }
    Verdict::Run(Box::new(DesiredPod {
        pod,
        source: SOURCE.into(),
    }))
}

/// The status kubelet writes for a pod it rejects at admission.
pub fn rejected_status(message: &str) -> PodStatus {
    PodStatus {
        phase: Some("Failed".into()),
        reason: Some(REJECT_REASON.into()),
        message: Some(message.to_string()),
        ..Default::default()
    }
}

/// Retry delays for a failing watch: 800 ms doubling to 30 s, each give
/// or take a quarter (so many nodes do not retry in step).
#[derive(Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    pub fn next_delay(&mut self) -> std::time::Duration {
        let base = std::time::Duration::from_millis(800) * 2u32.pow(self.failures.min(6));
        self.failures += 1;
        let base = base.min(std::time::Duration::from_secs(30));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos());
        base.mul_f64(0.75 + f64::from(nanos % 1000) / 2000.0)
    }
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// The source's state between watch events.
struct State {
    /// Every pod bound to the node, by UID, as the server has it.
    pods: BTreeMap<String, Pod>,
    /// Pods rejected (status and event sent once).
    rejected: HashSet<String>,
    /// Rejected or finished pods under deletion already handed to `gone`.
    released: HashSet<String>,
    last: Snapshot,
}

impl State {
    /// The snapshot of all runnable pods; rejects and releases new ones.
    fn snapshot(&mut self, status: &dyn StatusSink, events: &dyn EventSink) -> Snapshot {
        let mut out = Snapshot::default();
        for (uid, pod) in &self.pods {
            let known = self.last.pods.contains_key(uid);
            let deleting = pod.metadata.deletion_timestamp.is_some();
            match classify(pod, known) {
                Verdict::Run(d) => {
                    out.pods.insert(uid.clone(), Arc::new(*d));
                }
                Verdict::Skip if is_mirror(pod) => {}
                Verdict::Skip => {
                    if deleting && self.released.insert(uid.clone()) {
                        status.publish(uid, pod);
                        status.gone(uid);
                    }
                }
                Verdict::Reject { message } => {
                    let mut view = pod.clone();
                    if self.rejected.insert(uid.clone()) {
                        warn!(pod = %key(pod), uid, %message, "pod rejected");
                        events.event(
                            &PodRef::of(pod),
                            EventType::Warning,
                            REJECT_REASON,
                            message.clone(),
                        );
                        view.status = Some(rejected_status(&message));
                        status.publish(uid, &view);
                    }
                    if deleting && self.released.insert(uid.clone()) {
                        view.status = Some(rejected_status(&message));
                        status.publish(uid, &view);
                        status.gone(uid);
                    }
                }
            }
        }
        self.rejected.retain(|u| self.pods.contains_key(u));
        self.released.retain(|u| self.pods.contains_key(u));
        out
    }
}

fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

fn uid_of(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

/// Watch the pods bound to `node` and publish them on `tx` until `cancel`.
/// Rejections go to `status` and `events`.
pub async fn run(
    client: kube::Client,
    node: String,
    tx: watch::Sender<Option<Snapshot>>,
    status: Arc<dyn StatusSink>,
    events: Arc<dyn EventSink>,
    cancel: CancellationToken,
) {
    let api: Api<Pod> = Api::all(client);
    let config = super::client::watch_config().fields(&format!("spec.nodeName={node}"));
    let stream = watcher::watcher(api, config);
    run_stream(stream, tx, status, events, cancel).await;
}

/// The source over any watcher stream (tests feed events by hand).
pub async fn run_stream<S>(
    stream: S,
    tx: watch::Sender<Option<Snapshot>>,
    status: Arc<dyn StatusSink>,
    events: Arc<dyn EventSink>,
    cancel: CancellationToken,
) where
    S: futures::Stream<Item = Result<Event<Pod>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut state = State {
        pods: BTreeMap::new(),
        rejected: HashSet::new(),
        released: HashSet::new(),
        last: Snapshot::default(),
    };
    let mut listed = false;
    let mut relist: Option<BTreeMap<String, Pod>> = None;
    let mut failing = false;
    let mut backoff = Backoff::default();
    loop {
        let ev = tokio::select! {
            () = cancel.cancelled() => return,
            ev = stream.next() => ev,
        };
        let changed = match ev {
            None => {
                warn!("pod watch ended; the last snapshot stays");
                return;
            }
            Some(Err(e)) => {
                if !failing {
                    warn!(error = %crate::error_chain(&e), "pod watch failed; retrying with backoff, pods keep running");
                }
                failing = true;
                // The watcher retries when polled again: wait first.
                let wait = backoff.next_delay();
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                false
            }
            Some(Ok(ev)) => {
                // Init comes before the list is read: not a sign of life.
                if failing && !matches!(ev, Event::Init) {
                    info!("pod watch back");
                    failing = false;
                    backoff.reset();
                }
                match ev {
                    Event::Init => {
                        relist = Some(BTreeMap::new());
                        false
                    }
                    Event::InitApply(p) => {
                        if let Some(r) = relist.as_mut() {
                            r.insert(uid_of(&p), p);
                        }
                        false
                    }
                    Event::InitDone => {
                        if let Some(r) = relist.take() {
                            state.pods = r;
                        }
                        listed = true;
                        true
                    }
                    Event::Apply(p) => {
                        state.pods.insert(uid_of(&p), p);
                        true
                    }
                    Event::Delete(p) => {
                        state.pods.remove(&uid_of(&p));
                        true
                    }
                }
            }
        };
        if !(changed && listed) {
            continue;
        }
        let snap = state.snapshot(status.as_ref(), events.as_ref());
        state.last = snap.clone();
        tx.send_if_modified(|cur| {
            let new = Some(snap);
            let differs = *cur != new;
            if differs {
                *cur = new;
            }
            differs
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, NFSVolumeSource, PodSpec, Volume};
    use std::sync::Mutex;

    fn pod(uid: &str, name: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("default".into());
        p.metadata.uid = Some(uid.into());
        p.spec = Some(PodSpec {
            node_name: Some("n1".into()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("busybox:1.36".into()),
                ..Default::default()
            }],
            ..Default::default()
        });
        p
    }

    fn with_volume(mut p: Pod, v: Volume) -> Pod {
        p.spec.as_mut().unwrap().volumes = Some(vec![v]);
        p
    }

    #[derive(Default)]
    struct Rec {
        published: Mutex<Vec<(String, Pod)>>,
        gone: Mutex<Vec<String>>,
        events: Mutex<Vec<(String, String)>>,
    }
    impl StatusSink for Rec {
        fn publish(&self, uid: &str, pod: &Pod) {
            self.published
                .lock()
                .unwrap()
                .push((uid.into(), pod.clone()));
        }
        fn gone(&self, uid: &str) {
            self.gone.lock().unwrap().push(uid.into());
        }
    }
    impl EventSink for Rec {
        fn event(&self, _: &PodRef, _: EventType, reason: &str, message: String) {
            self.events.lock().unwrap().push((reason.into(), message));
        }
    }

    #[test]
    fn mirror_pods_are_skipped_and_good_pods_run() {
        let mut m = pod("m", "web-n1");
        m.metadata.annotations = Some(BTreeMap::from([(
            CONFIG_MIRROR_ANNOTATION.into(),
            "h".into(),
        )]));
        assert_eq!(classify(&m, false), Verdict::Skip);
        let Verdict::Run(d) = classify(&pod("u", "a"), false) else {
            panic!()
        };
        assert_eq!(d.source, "api");
        assert_eq!(d.uid(), "u");
    }

    #[test]
    fn volumes_the_api_supplies_are_accepted_others_rejected() {
        let secret = with_volume(
            pod("u", "a"),
            Volume {
                name: "token".into(),
                secret: Some(Default::default()),
                ..Default::default()
            },
        );
        assert!(matches!(classify(&secret, false), Verdict::Run(_)));
        let nfs = with_volume(
            pod("u", "a"),
            Volume {
                name: "data".into(),
                nfs: Some(NFSVolumeSource {
                    path: "/x".into(),
                    server: "s".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        let Verdict::Reject { message } = classify(&nfs, false) else {
            panic!("nfs must be rejected")
        };
        assert!(
            message.starts_with("Pod was rejected: spec.volumes[0].nfs: Unsupported value"),
            "{message}"
        );
    }

    #[test]
    fn rejection_status_is_kubelets() {
        let s = rejected_status("Pod was rejected: x");
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        assert_eq!(s.reason.as_deref(), Some("UnexpectedAdmissionError"));
        assert_eq!(s.message.as_deref(), Some("Pod was rejected: x"));
    }

    #[test]
    fn finished_pods_are_not_started_again() {
        let mut p = pod("u", "a");
        p.status = Some(PodStatus {
            phase: Some("Succeeded".into()),
            ..Default::default()
        });
        assert_eq!(classify(&p, false), Verdict::Skip);
        assert!(matches!(classify(&p, true), Verdict::Run(_)), "ours: kept");
    }

    fn nfs_pod(uid: &str) -> Pod {
        with_volume(
            pod(uid, "bad"),
            Volume {
                name: "data".into(),
                nfs: Some(NFSVolumeSource {
                    path: "/x".into(),
                    server: "s".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
    }

    #[tokio::test]
    async fn publishes_after_the_first_list_rejects_once_and_keeps_deleting_pods() {
        let (tx, rx) = watch::channel(None);
        let rec = Arc::new(Rec::default());
        let (etx, erx) = futures::channel::mpsc::unbounded();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run_stream(
            erx,
            tx,
            rec.clone(),
            rec.clone(),
            cancel.clone(),
        ));
        let send = |e: Event<Pod>| etx.unbounded_send(Ok(e)).unwrap();
        send(Event::Init);
        send(Event::InitApply(pod("u1", "a")));
        send(Event::InitApply(nfs_pod("u2")));
        tokio::task::yield_now().await;
        assert!(rx.borrow().is_none(), "nothing before InitDone");
        send(Event::InitDone);
        let mut rx2 = rx.clone();
        rx2.wait_for(Option::is_some).await.unwrap();
        let s = rx2.borrow().clone().unwrap();
        assert_eq!(s.pods.keys().collect::<Vec<_>>(), ["u1"]);
        assert_eq!(rec.events.lock().unwrap().len(), 1);
        assert_eq!(rec.events.lock().unwrap()[0].0, "UnexpectedAdmissionError");
        // A watch error: the last snapshot stays.
        etx.unbounded_send(Err(watcher::Error::NoResourceVersion))
            .unwrap();
        // The bad pod is updated (no second rejection), then deleted.
        let mut bad = nfs_pod("u2");
        send(Event::Apply(bad.clone()));
        bad.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::from_second(10).unwrap(),
            ));
        send(Event::Apply(bad));
        let mut good = pod("u1", "a");
        good.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::from_second(10).unwrap(),
            ));
        send(Event::Apply(good));
        rx2.wait_for(|s| {
            s.as_ref().is_some_and(|s| {
                s.pods
                    .get("u1")
                    .is_some_and(|p| p.pod.metadata.deletion_timestamp.is_some())
            })
        })
        .await
        .unwrap();
        assert_eq!(rec.events.lock().unwrap().len(), 1, "rejected once");
        assert_eq!(
            *rec.gone.lock().unwrap(),
            ["u2"],
            "the rejected pod released"
        );
        cancel.cancel();
        task.await.unwrap();
    }
}
