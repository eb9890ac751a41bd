//! Events in API server mode: the worker's `EventSink` calls become core/v1
//! Event objects about the pod, as kubelet's recorder writes them (source
//! component "kubelet", host = the node; `kubectl describe pod` shows them).
//!
//! Like kubelet's event correlator: a repeat of the same event (same pod,
//! type, reason and message) within `AGGREGATE_WINDOW` does not make a new
//! object but bumps `count` and `lastTimestamp` of the existing one; and a
//! per-pod token bucket (burst `BURST`, one more every `REFILL`) drops the
//! rest of a storm, so a crash-looping pod cannot flood the server. Writes
//! happen on the recorder's own task; `event()` only queues (bounded: when
//! the server is away the queue fills and newer events are dropped, with a
//! count in the log, never blocking a worker).
//!
//! Side effects: POST / PATCH of events in the pod's namespace.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::sink::{EventSink, EventType, PodRef};

/// A repeat within this window updates the existing event (kubelet's
/// correlator keeps its cache for the same reason).
pub const AGGREGATE_WINDOW: Duration = Duration::from_secs(600);
/// Events one pod may burst before the bucket limits it (kubelet: 25).
pub const BURST: u32 = 25;
/// One more token after this long (kubelet: qps 1/300).
pub const REFILL: Duration = Duration::from_secs(300);
/// Events queued for the writer; beyond this they are dropped.
pub const QUEUE: usize = 1024;

struct Queued {
    pod: PodRef,
    kind: EventType,
    reason: String,
    message: String,
    at: jiff::Timestamp,
}

/// The `EventSink` half: cheap, never blocks.
pub struct Recorder {
    tx: mpsc::Sender<Queued>,
    dropped: std::sync::atomic::AtomicU64,
}

impl EventSink for Recorder {
    fn event(&self, pod: &PodRef, kind: EventType, reason: &str, message: String) {
        if pod.name.is_empty() {
            return;
        }
        let q = Queued {
            pod: pod.clone(),
            kind,
            reason: reason.to_string(),
            message,
            at: jiff::Timestamp::now(),
        };
        if self.tx.try_send(q).is_err() {
            let n = self
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_power_of_two() {
                warn!(dropped = n + 1, "event queue full: events dropped");
            }
        }
    }
}

/// What the correlator decides for one event.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Make a new Event object with this name.
    Create { name: String },
    /// Bump the existing one to this count.
    Update { name: String, count: i32 },
    /// Over the pod's rate limit.
    Drop,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    uid: String,
    kind: &'static str,
    reason: String,
    message: String,
}

struct Seen {
    name: String,
    count: i32,
    last: Instant,
}

struct Bucket {
    tokens: u32,
    refilled: Instant,
    touched: Instant,
}

/// kubelet's correlator, pure but for the clock it is given.
#[derive(Default)]
pub struct Correlator {
    seen: HashMap<Key, Seen>,
    buckets: HashMap<String, Bucket>,
    serial: u64,
}

fn kind_str(kind: EventType) -> &'static str {
    match kind {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    }
}

impl Correlator {
    pub fn decide(
        &mut self,
        pod: &PodRef,
        kind: EventType,
        reason: &str,
        message: &str,
        now: Instant,
        stamp_ns: i128,
    ) -> Decision {
        // A bucket untouched this long is full again: forget it (pods
        // that are gone leave no state behind).
        self.buckets
            .retain(|_, b| now.duration_since(b.touched) < REFILL * BURST);
        let bucket = self.buckets.entry(pod.uid.clone()).or_insert(Bucket {
            tokens: BURST,
            refilled: now,
            touched: now,
        });
        bucket.touched = now;
        let refills = (now.duration_since(bucket.refilled).as_secs() / REFILL.as_secs()) as u32;
        if refills > 0 {
            bucket.tokens = (bucket.tokens + refills).min(BURST);
            bucket.refilled = now;
        }
        if bucket.tokens == 0 {
            return Decision::Drop;
        }
        bucket.tokens -= 1;
        self.seen
            .retain(|_, s| now.duration_since(s.last) < AGGREGATE_WINDOW);
        let key = Key {
            uid: pod.uid.clone(),
            kind: kind_str(kind),
            reason: reason.to_string(),
            message: message.to_string(),
        };
        if let Some(s) = self.seen.get_mut(&key) {
            s.count += 1;
            s.last = now;
            return Decision::Update {
                name: s.name.clone(),
                count: s.count,
            };
        }
        self.serial += 1;
        // kubelet's naming: <pod>.<hex timestamp>; the serial keeps two
        // events in the same nanosecond apart.
        let name = format!("{}.{:x}", pod.name, stamp_ns + i128::from(self.serial));
        self.seen.insert(
            key,
            Seen {
                name: name.clone(),
                count: 1,
                last: now,
            },
        );
        Decision::Create { name }
    }

    /// Forget a pod that is gone.
    pub fn forget(&mut self, uid: &str) {
        self.buckets.remove(uid);
        self.seen.retain(|k, _| k.uid != uid);
    }
}

/// The Event object kubelet would write.
pub fn event_object(
    node: &str,
    q_pod: &PodRef,
    kind: EventType,
    reason: &str,
    message: &str,
    name: &str,
    at: jiff::Timestamp,
) -> Event {
    let time = Time(at);
    Event {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(q_pod.namespace.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(q_pod.namespace.clone()),
            name: Some(q_pod.name.clone()),
            uid: Some(q_pod.uid.clone()),
            ..Default::default()
        },
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        type_: Some(kind_str(kind).to_string()),
        source: Some(EventSource {
            component: Some("kubelet".into()),
            host: Some(node.to_string()),
        }),
        first_timestamp: Some(time.clone()),
        last_timestamp: Some(time),
        count: Some(1),
        reporting_component: Some("kubelet".into()),
        reporting_instance: Some(node.to_string()),
        event_time: None::<MicroTime>,
        ..Default::default()
    }
}

/// A recorder for node `node` and its writer task (run it until `cancel`).
pub fn recorder(
    client: kube::Client,
    node: String,
    cancel: CancellationToken,
) -> (
    std::sync::Arc<Recorder>,
    impl std::future::Future<Output = ()>,
) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let rec = std::sync::Arc::new(Recorder {
        tx,
        dropped: Default::default(),
    });
    (rec, write_loop(client, node, rx, cancel))
}

async fn write_loop(
    client: kube::Client,
    node: String,
    mut rx: mpsc::Receiver<Queued>,
    cancel: CancellationToken,
) {
    let mut correlator = Correlator::default();
    loop {
        let q = tokio::select! {
            _ = cancel.cancelled() => return,
            q = rx.recv() => match q { Some(q) => q, None => return },
        };
        let stamp = q.at.as_nanosecond();
        let decision =
            correlator.decide(&q.pod, q.kind, &q.reason, &q.message, Instant::now(), stamp);
        let api: Api<Event> = Api::namespaced(client.clone(), &q.pod.namespace);
        let result = match &decision {
            Decision::Drop => {
                debug!(pod = %q.pod.name, reason = %q.reason, "event over the pod's rate limit: dropped");
                continue;
            }
            Decision::Create { name } => {
                let ev = event_object(&node, &q.pod, q.kind, &q.reason, &q.message, name, q.at);
                api.create(&PostParams::default(), &ev).await.map(|_| ())
            }
            Decision::Update { name, count } => {
                let patch = serde_json::json!({
                    "count": count,
                    "lastTimestamp": Time(q.at),
                });
                match api
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    // Gone (expired on the server): make it anew.
                    Err(kube::Error::Api(s)) if s.code == 404 => {
                        let mut ev =
                            event_object(&node, &q.pod, q.kind, &q.reason, &q.message, name, q.at);
                        ev.count = Some(*count);
                        api.create(&PostParams::default(), &ev).await.map(|_| ())
                    }
                    r => r.map(|_| ()),
                }
            }
        };
        if let Err(e) = result {
            // Like kubelet: an event that cannot be written is dropped, not retried forever.
            debug!(pod = %q.pod.name, reason = %q.reason, error = %e, "event not written");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodRef {
        PodRef {
            namespace: "default".into(),
            name: "web".into(),
            uid: "u1".into(),
        }
    }

    #[test]
    fn a_repeat_bumps_the_count_of_the_same_object() {
        let mut c = Correlator::default();
        let t = Instant::now();
        let Decision::Create { name } = c.decide(&pod(), EventType::Warning, "BackOff", "m", t, 1)
        else {
            panic!("first is a create")
        };
        assert_eq!(
            c.decide(&pod(), EventType::Warning, "BackOff", "m", t, 2),
            Decision::Update {
                name: name.clone(),
                count: 2
            }
        );
        assert!(matches!(
            c.decide(&pod(), EventType::Warning, "BackOff", "other", t, 3),
            Decision::Create { .. }
        ));
        // After the window, a new object.
        assert!(matches!(
            c.decide(
                &pod(),
                EventType::Warning,
                "BackOff",
                "m",
                t + AGGREGATE_WINDOW + Duration::from_secs(1),
                4
            ),
            Decision::Create { .. }
        ));
    }

    #[test]
    fn a_storm_is_cut_at_the_burst_and_refills_slowly() {
        let mut c = Correlator::default();
        let t = Instant::now();
        let kept = (0..100)
            .filter(|i| {
                c.decide(&pod(), EventType::Normal, "Pulled", &format!("m{i}"), t, *i)
                    != Decision::Drop
            })
            .count();
        assert_eq!(kept, BURST as usize);
        assert_ne!(
            c.decide(&pod(), EventType::Normal, "Pulled", "x", t + REFILL, 200),
            Decision::Drop
        );
        assert_eq!(
            c.decide(&pod(), EventType::Normal, "Pulled", "y", t + REFILL, 201),
            Decision::Drop
        );
        c.forget("u1");
        assert!(matches!(
            c.decide(&pod(), EventType::Normal, "Pulled", "z", t, 5),
            Decision::Create { .. }
        ));
    }

    #[test]
    fn the_object_reads_as_kubelets() {
        let at = jiff::Timestamp::from_second(1_700_000_000).unwrap();
        let ev = event_object(
            "n1",
            &pod(),
            EventType::Normal,
            "Started",
            "Started container app",
            "web.1",
            at,
        );
        assert_eq!(ev.source.unwrap().component.as_deref(), Some("kubelet"));
        assert_eq!(ev.involved_object.kind.as_deref(), Some("Pod"));
        assert_eq!(ev.involved_object.uid.as_deref(), Some("u1"));
        assert_eq!(ev.type_.as_deref(), Some("Normal"));
        assert_eq!(ev.count, Some(1));
    }
}
