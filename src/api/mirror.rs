//! Mirror pods: the API's view of this node's static pods, as kubelet makes
//! them. For each static pod (a pod of the merged snapshot whose source is
//! not "api") a pod of the same name, namespace, labels and spec, bound to
//! the node, with the annotation `kubernetes.io/config.mirror` set to the
//! static pod's config hash and an owner reference to the Node (v1 Node,
//! its name and UID, as the controller, not blocking deletion: exactly
//! what NodeRestriction lets a node create).
//!
//! Reconciled level-triggered from the snapshot and a watch of the pods
//! bound to the node, on every change of either and every 10 s: a missing
//! mirror is created (someone deleted it), one with another hash is
//! deleted and made again (the manifest changed, or someone deleted it:
//! the server then waits for the node to finish), one whose static pod is
//! gone is deleted. Deletes carry grace 0 and the mirror's UID as a
//! precondition. The status writer writes the mirrors' status; it is told
//! when a mirror is (re)created so it writes the status again.
//!
//! Side effects: a GET of the Node, a list+watch of the node's pods, pod
//! create and delete (through `PodApi`); logs.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::pod_api::{ApiError, KubePods, PodApi};
use super::pods::SOURCE;
use super::status_writer::StatusWriter;
use crate::source::Snapshot;
use crate::source::static_dir::{CONFIG_HASH_ANNOTATION, CONFIG_MIRROR_ANNOTATION};

/// How often the mirrors are checked with nothing else happening.
const PERIOD: Duration = Duration::from_secs(10);

fn hash_of(pod: &Pod, annotation: &str) -> Option<String> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotation))
        .cloned()
}

fn key(pod: &Pod) -> (String, String) {
    (
        pod.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

/// The mirror pod of static pod `pod` on node `node` (UID `node_uid`). Pure.
pub fn mirror_of(pod: &Pod, node: &str, node_uid: &str) -> Pod {
    let (namespace, name) = key(pod);
    let mut annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let hash = hash_of(pod, CONFIG_HASH_ANNOTATION).unwrap_or_default();
    annotations.insert(CONFIG_MIRROR_ANNOTATION.into(), hash);
    let mut spec = pod.spec.clone().unwrap_or_default();
    spec.node_name = Some(node.to_string());
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            labels: pod.metadata.labels.clone(),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node.to_string(),
                uid: node_uid.to_string(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// One step towards the wanted mirrors.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create this mirror, for the static pod with this UID.
    Create { static_uid: String, pod: Box<Pod> },
    /// Delete the mirror `namespace/name` with this UID.
    Delete {
        namespace: String,
        name: String,
        uid: String,
    },
}

/// What to do so that `mirrors` (the node's mirror pods on the server)
/// reflect `statics`. Pure.
pub fn plan(
    statics: &BTreeMap<String, Pod>,
    mirrors: &BTreeMap<(String, String), Pod>,
    node: &str,
    node_uid: &str,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut wanted = HashSet::new();
    for (static_uid, pod) in statics {
        let k = key(pod);
        wanted.insert(k.clone());
        let hash = hash_of(pod, CONFIG_HASH_ANNOTATION);
        match mirrors.get(&k) {
            None => actions.push(Action::Create {
                static_uid: static_uid.clone(),
                pod: Box::new(mirror_of(pod, node, node_uid)),
            }),
            // Someone deleted it (the server waits for the node to finish
            // the deletion), or the manifest changed: delete it now (grace
            // 0), make it again once it is gone.
            Some(m)
                if m.metadata.deletion_timestamp.is_some()
                    || hash_of(m, CONFIG_MIRROR_ANNOTATION) != hash =>
            {
                actions.push(delete(m));
            }
            Some(_) => {}
        }
    }
    for (k, m) in mirrors {
        if !wanted.contains(k) {
            actions.push(delete(m));
        }
    }
    actions
}

fn delete(m: &Pod) -> Action {
    let (namespace, name) = key(m);
    Action::Delete {
        namespace,
        name,
        uid: m.metadata.uid.clone().unwrap_or_default(),
    }
}

/// The static pods of a merged snapshot, by UID.
fn statics(snap: &Snapshot) -> BTreeMap<String, Pod> {
    snap.pods
        .iter()
        .filter(|(_, d)| d.source != SOURCE)
        .map(|(uid, d)| (uid.clone(), d.pod.clone()))
        .collect()
}

fn is_mirror(p: &Pod) -> bool {
    hash_of(p, CONFIG_MIRROR_ANNOTATION).is_some()
}

/// Keep mirror pods for the static pods of `snapshots` until `cancel`.
/// `writer` is told when a mirror is made, so it writes its status.
pub async fn run(
    client: kube::Client,
    node: String,
    snapshots: watch::Receiver<Snapshot>,
    writer: Option<Arc<StatusWriter>>,
    cancel: CancellationToken,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let pods_api: Api<Pod> = Api::all(client.clone());
    let config = super::client::watch_config().fields(&format!("spec.nodeName={node}"));
    let stream = watcher::watcher(pods_api, config);
    let mut backoff = super::pods::Backoff::default();
    let api = KubePods { client };
    let mut r = Reconciler {
        api: &api,
        node: node.clone(),
        node_uid: None,
        writer,
    };
    let mut snapshots = snapshots;
    let mut stream = std::pin::pin!(stream);
    let mut mirrors: BTreeMap<(String, String), Pod> = BTreeMap::new();
    let mut relist: Option<BTreeMap<(String, String), Pod>> = None;
    let mut synced = false;
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
            ch = snapshots.changed() => {
                if ch.is_err() {
                    return;
                }
            }
            ev = stream.next() => match ev {
                None => return,
                Some(Err(e)) => {
                    let wait = backoff.next_delay();
                    warn!(error = %crate::error_chain(&e), retry_in = ?wait, "mirror pod watch failed; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
                Some(Ok(Event::Init)) => { relist = Some(BTreeMap::new()); continue; }
                Some(Ok(Event::InitApply(p))) => {
                    if let Some(r) = relist.as_mut() && is_mirror(&p) {
                        r.insert(key(&p), p);
                    }
                    continue;
                }
                Some(Ok(Event::InitDone)) => {
                    backoff.reset();
                    if let Some(r) = relist.take() {
                        mirrors = r;
                    }
                    synced = true;
                }
                Some(Ok(Event::Apply(p))) => {
                    if is_mirror(&p) {
                        mirrors.insert(key(&p), p);
                    } else {
                        mirrors.remove(&key(&p));
                    }
                }
                Some(Ok(Event::Delete(p))) => {
                    mirrors.remove(&key(&p));
                }
            },
        }
        if !synced {
            continue;
        }
        let snap = snapshots.borrow_and_update().clone();
        // Only once every source has listed: a static source that has
        // not spoken must not make its mirrors vanish.
        if !snap.synced() {
            continue;
        }
        let Some(node_uid) = r.node_uid(&nodes).await else {
            continue;
        };
        for action in plan(&statics(&snap), &mirrors, &node, &node_uid) {
            if let Some(m) = r.apply(action).await {
                mirrors.insert(key(&m), m);
            }
        }
    }
}

struct Reconciler<'a> {
    api: &'a dyn PodApi,
    node: String,
    node_uid: Option<String>,
    writer: Option<Arc<StatusWriter>>,
}

impl Reconciler<'_> {
    async fn node_uid(&mut self, nodes: &Api<Node>) -> Option<String> {
        if self.node_uid.is_none() {
            match nodes.get_opt(&self.node).await {
                Ok(Some(n)) => self.node_uid = n.metadata.uid,
                Ok(None) => {}
                Err(e) => {
                    warn!(node = %self.node, error = %crate::error_chain(&e), "cannot read the node for mirror pods");
                }
            }
        }
        self.node_uid.clone()
    }

    /// Run one action; the mirror it created, if any.
    async fn apply(&mut self, action: Action) -> Option<Pod> {
        match action {
            Action::Create { static_uid, pod } => {
                let (ns, name) = key(&pod);
                match self.api.create(pod.as_ref()).await {
                    Ok(m) => {
                        info!(pod = %format!("{ns}/{name}"), "mirror pod created");
                        if let Some(w) = &self.writer {
                            w.resync_pod(&static_uid);
                        }
                        Some(m)
                    }
                    // Made already (our watch lags): the watch brings it.
                    Err(ApiError::Gone { code: 409, .. }) => None,
                    Err(e) => {
                        if matches!(e, ApiError::Refused { code: 403, .. }) {
                            // The Node may have been recreated: read its UID again.
                            self.node_uid = None;
                        }
                        warn!(pod = %format!("{ns}/{name}"), error = %crate::error_chain(&e), "cannot create mirror pod");
                        None
                    }
                }
            }
            Action::Delete {
                namespace,
                name,
                uid,
            } => {
                match self.api.delete(&namespace, &name, &uid, Some(0)).await {
                    Ok(()) => info!(pod = %format!("{namespace}/{name}"), "mirror pod deleted"),
                    Err(ApiError::Gone { .. }) => {}
                    Err(e) => {
                        warn!(pod = %format!("{namespace}/{name}"), error = %crate::error_chain(&e), "cannot delete mirror pod");
                    }
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::static_dir::CONFIG_SOURCE_ANNOTATION;
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn static_pod(name: &str, hash: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(format!("{name}-n1"));
        p.metadata.namespace = Some("default".into());
        p.metadata.uid = Some(format!("static-{name}"));
        p.metadata.labels = Some(BTreeMap::from([("app".into(), name.into())]));
        p.metadata.annotations = Some(BTreeMap::from([
            (CONFIG_SOURCE_ANNOTATION.into(), "file".into()),
            (CONFIG_HASH_ANNOTATION.into(), hash.into()),
        ]));
        p.spec = Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("busybox".into()),
                ..Default::default()
            }],
            ..Default::default()
        });
        p
    }

    fn on_server(mut m: Pod, uid: &str) -> Pod {
        m.metadata.uid = Some(uid.into());
        m
    }

    #[test]
    fn a_mirror_is_what_node_restriction_lets_a_node_create() {
        let m = mirror_of(&static_pod("web", "h1"), "n1", "node-uid");
        assert_eq!(m.metadata.name.as_deref(), Some("web-n1"));
        assert_eq!(m.metadata.uid, None, "the server picks the UID");
        let a = m.metadata.annotations.as_ref().unwrap();
        assert_eq!(a[CONFIG_MIRROR_ANNOTATION], "h1");
        assert_eq!(a[CONFIG_HASH_ANNOTATION], "h1");
        let o = &m.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (
                o.api_version.as_str(),
                o.kind.as_str(),
                o.name.as_str(),
                o.uid.as_str()
            ),
            ("v1", "Node", "n1", "node-uid")
        );
        assert_eq!(
            o.controller,
            Some(true),
            "NodeRestriction wants a controller ref"
        );
        assert_ne!(o.block_owner_deletion, Some(true));
        assert_eq!(m.spec.as_ref().unwrap().node_name.as_deref(), Some("n1"));
        assert_eq!(m.metadata.labels.as_ref().unwrap()["app"], "web");
    }

    #[test]
    fn plan_creates_replaces_and_removes() {
        let statics = BTreeMap::from([
            ("s-web".to_string(), static_pod("web", "h1")),
            ("s-db".to_string(), static_pod("db", "h2")),
            ("s-new".to_string(), static_pod("new", "h3")),
        ]);
        let mut mirrors = BTreeMap::new();
        let web = on_server(mirror_of(&static_pod("web", "h1"), "n1", "nu"), "m-web");
        let db_old = on_server(mirror_of(&static_pod("db", "old"), "n1", "nu"), "m-db");
        let orphan = on_server(mirror_of(&static_pod("gone", "h9"), "n1", "nu"), "m-gone");
        for m in [web, db_old, orphan] {
            mirrors.insert(key(&m), m);
        }
        let actions = plan(&statics, &mirrors, "n1", "nu");
        assert!(actions.contains(&Action::Delete {
            namespace: "default".into(),
            name: "db-n1".into(),
            uid: "m-db".into()
        }));
        assert!(actions.contains(&Action::Delete {
            namespace: "default".into(),
            name: "gone-n1".into(),
            uid: "m-gone".into()
        }));
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Create { static_uid, .. } if static_uid == "s-new"))
        );
        assert_eq!(actions.len(), 3, "web is up to date: {actions:?}");
    }

    #[test]
    fn a_mirror_being_deleted_is_deleted_now_then_made_again() {
        let statics = BTreeMap::from([("s-web".to_string(), static_pod("web", "h1"))]);
        let mut m = on_server(mirror_of(&static_pod("web", "h0"), "n1", "nu"), "m1");
        m.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::from_second(5).unwrap()));
        let mirrors = BTreeMap::from([(key(&m), m)]);
        assert_eq!(
            plan(&statics, &mirrors, "n1", "nu"),
            [Action::Delete {
                namespace: "default".into(),
                name: "web-n1".into(),
                uid: "m1".into()
            }]
        );
        let actions = plan(&statics, &BTreeMap::new(), "n1", "nu");
        assert_eq!(actions.len(), 1);
    }
}
