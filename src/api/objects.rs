//! The objects this node's pods use. ConfigMaps and Secrets are watched
//! one by one as kubelet's `Watch` change-detection strategy does: the Node
//! authorizer lets a node get, list and watch one only when a pod bound to
//! it references the object, and list/watch only with a `metadata.name`
//! field selector on that object. PersistentVolumeClaims and
//! PersistentVolumes it lets a node get, never list or watch ("can only
//! get individual resources of this type"): they are read with a GET at
//! each lookup, as kubelet's volume manager reads them.
//!
//! The first lookup of an object starts its watch and waits (a short
//! while) for the first list; later lookups read the cache the watch keeps
//! current. When the server goes away the watch retries with backoff and
//! the cached object keeps being served. `retain` (fed by `prune` with the
//! references of the current pods) stops the watches no pod needs.
//!
//! Side effects: list and watch requests to the API server (tasks spawned
//! on the current tokio runtime, aborted when their watch is dropped).

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, PersistentVolumeClaim, Secret};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::locks::lock;
use crate::objects::{Kind, LookupError, ObjectLookup, ObjectRef};
use crate::source::Snapshot;

/// How long a first lookup waits for its watch's first list (kubelet's
/// watch-based manager waits for the reflector to sync, bounded likewise).
pub const FIRST_LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// One watched object as last seen.
#[derive(Clone, Debug)]
enum Object {
    ConfigMap(Arc<ConfigMap>),
    Secret(Arc<Secret>),
}

/// What a watch knows.
#[derive(Clone, Debug)]
enum State {
    /// Started, nothing listed yet.
    Pending,
    /// Listed: the object, or `None` when it does not exist.
    Synced(Option<Object>),
    /// Every attempt so far failed (refused, unreachable); a later list
    /// replaces this. Never replaces `Synced`: a cached object outlives an
    /// outage.
    Failed(LookupError),
}

/// A running watch of one object.
struct Watch {
    state: watch::Receiver<State>,
    task: tokio::task::AbortHandle,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `ObjectLookup` backed by per-object watches.
pub struct WatchedObjects {
    client: Client,
    first_list: Duration,
    watches: Mutex<HashMap<ObjectRef, Watch>>,
    /// Bumped after every change a watch publishes.
    changes: crate::objects::Changes,
}

impl WatchedObjects {
    pub fn new(client: Client) -> Self {
        Self::with_timeout(client, FIRST_LIST_TIMEOUT)
    }

    pub fn with_timeout(client: Client, first_list: Duration) -> Self {
        WatchedObjects {
            client,
            first_list,
            watches: Mutex::new(HashMap::new()),
            changes: crate::objects::Changes::default(),
        }
    }

    /// Bump `changes` after every object change (see `objects::Changes`).
    pub fn with_changes(mut self, changes: crate::objects::Changes) -> Self {
        self.changes = changes;
        self
    }

    /// Stop watching what no pod references any more.
    pub fn retain(&self, referenced: &BTreeSet<ObjectRef>) {
        let dropped: Vec<Watch> = {
            let mut watches = lock(&self.watches);
            let gone: Vec<ObjectRef> = watches
                .keys()
                .filter(|r| !referenced.contains(*r))
                .cloned()
                .collect();
            gone.iter().filter_map(|r| watches.remove(r)).collect()
        };
        if !dropped.is_empty() {
            debug!(
                stopped = dropped.len(),
                "stopped watches of unreferenced objects"
            );
        }
    }

    /// The objects watched now (for tests and `minilet doctor`).
    pub fn watched(&self) -> BTreeSet<ObjectRef> {
        lock(&self.watches).keys().cloned().collect()
    }

    fn state_of(&self, r: &ObjectRef) -> watch::Receiver<State> {
        let mut watches = lock(&self.watches);
        if let Some(w) = watches.get(r) {
            return w.state.clone();
        }
        let (tx, rx) = watch::channel(State::Pending);
        let c = self.client.clone();
        let (ns, name) = (r.namespace.as_str(), r.name.clone());
        let object = r.clone();
        let ch = &self.changes;
        let task = match r.kind {
            Kind::ConfigMap => tokio::spawn(run(
                Api::namespaced(c, ns),
                name,
                object,
                (tx, ch.clone()),
                |o| Object::ConfigMap(Arc::new(o)),
            )),
            Kind::Secret => tokio::spawn(run(
                Api::namespaced(c, ns),
                name,
                object,
                (tx, ch.clone()),
                |o| Object::Secret(Arc::new(o)),
            )),
            // Read with a GET each time (`fetch`), never watched.
            Kind::PersistentVolumeClaim | Kind::PersistentVolume | Kind::StorageClass => {
                tx.send_replace(State::Failed(LookupError::Unavailable {
                    object,
                    reason: "not watched: read with a GET (a bug)".into(),
                }));
                tokio::spawn(async {})
            }
        };
        watches.insert(
            r.clone(),
            Watch {
                state: rx.clone(),
                task: task.abort_handle(),
            },
        );
        rx
    }

    async fn get(&self, r: ObjectRef) -> Result<Object, LookupError> {
        let mut rx = self.state_of(&r);
        let unavailable = |reason: &str| LookupError::Unavailable {
            object: r.clone(),
            reason: reason.to_string(),
        };
        let waited = tokio::time::timeout(
            self.first_list,
            rx.wait_for(|s| !matches!(s, State::Pending)),
        )
        .await;
        let state = match waited {
            Err(_) => {
                return Err(unavailable(&format!(
                    "not listed by the API server within {:?}",
                    self.first_list
                )));
            }
            Ok(Err(_)) => return Err(unavailable("its watch stopped")),
            Ok(Ok(s)) => s.clone(),
        };
        match state {
            State::Synced(Some(o)) => Ok(o),
            State::Synced(None) => Err(LookupError::NotFound(r)),
            State::Failed(e) => Err(e),
            State::Pending => Err(unavailable("not listed yet")),
        }
    }
}

/// Keep `tx` current with the one object `name` (by a field-selected
/// watch). Runs until aborted; the watcher relists and rewatches with
/// backoff after every error.
async fn run<K>(
    api: Api<K>,
    name: String,
    object: ObjectRef,
    (tx, changes): (watch::Sender<State>, crate::objects::Changes),
    wrap: fn(K) -> Object,
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let config = super::client::watch_config().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    // The initial list arrives as Init, InitApply…, InitDone: publish it
    // whole, so a relist that no longer has the object says so.
    let mut listing: Option<K> = None;
    while let Some(ev) = events.next().await {
        match ev {
            Ok(watcher::Event::Init) => listing = None,
            Ok(watcher::Event::InitApply(o)) => listing = Some(o),
            Ok(watcher::Event::InitDone) => {
                tx.send_replace(State::Synced(listing.take().map(wrap)));
                changes.bump();
            }
            Ok(watcher::Event::Apply(o)) => {
                tx.send_replace(State::Synced(Some(wrap(o))));
                changes.bump();
            }
            Ok(watcher::Event::Delete(_)) => {
                tx.send_replace(State::Synced(None));
                changes.bump();
            }
            Err(e) => {
                let err = classify(&object, &e);
                warn!(%object, error = %err, "object watch failed; retrying");
                tx.send_if_modified(|s| match s {
                    State::Synced(_) => false,
                    _ => {
                        *s = State::Failed(err);
                        true
                    }
                });
            }
        }
    }
}

/// One GET of the object `r` names: claims and volumes, which the Node
/// authorizer lets a node get but not list or watch (as kubelet, which
/// reads them with a GET each time it sets a volume up).
async fn fetch<K>(api: Api<K>, r: ObjectRef) -> Result<Arc<K>, LookupError>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug,
{
    match api.get_opt(&r.name).await {
        Ok(Some(o)) => Ok(Arc::new(o)),
        Ok(None) => Err(LookupError::NotFound(r)),
        Err(kube::Error::Api(s)) if s.code == 403 => Err(LookupError::Forbidden {
            object: r,
            reason: s.message.clone(),
        }),
        Err(e) => Err(LookupError::Unavailable {
            object: r,
            reason: super::client::describe(&e),
        }),
    }
}

/// A watch error as the lookup reports it: the server's refusal
/// (`Forbidden`, with its message), anything else `Unavailable`.
fn classify(object: &ObjectRef, e: &watcher::Error) -> LookupError {
    let api_error = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.as_ref()),
        watcher::Error::WatchError(s) => Some(s.as_ref()),
        _ => None,
    };
    match api_error {
        Some(s) if s.code == 403 => LookupError::Forbidden {
            object: object.clone(),
            reason: s.message.clone(),
        },
        Some(s) => LookupError::Unavailable {
            object: object.clone(),
            reason: s.message.clone(),
        },
        None => LookupError::Unavailable {
            object: object.clone(),
            reason: e.to_string(),
        },
    }
}

fn wrong_kind(r: ObjectRef) -> LookupError {
    LookupError::Unavailable {
        object: r,
        reason: "the watch holds another kind (a bug)".into(),
    }
}

fn at(kind: Kind, namespace: &str, name: &str) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: namespace.to_string(),
        name: name.to_string(),
    }
}

impl ObjectLookup for WatchedObjects {
    fn config_map<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<ConfigMap>, LookupError>> {
        let r = at(Kind::ConfigMap, namespace, name);
        Box::pin(async move {
            match self.get(r.clone()).await? {
                Object::ConfigMap(o) => Ok(o),
                _ => Err(wrong_kind(r)),
            }
        })
    }
    fn secret<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<Secret>, LookupError>> {
        let r = at(Kind::Secret, namespace, name);
        Box::pin(async move {
            match self.get(r.clone()).await? {
                Object::Secret(o) => Ok(o),
                _ => Err(wrong_kind(r)),
            }
        })
    }
    fn persistent_volume_claim<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<PersistentVolumeClaim>, LookupError>> {
        let r = at(Kind::PersistentVolumeClaim, namespace, name);
        Box::pin(fetch(Api::namespaced(self.client.clone(), namespace), r))
    }
    fn persistent_volume<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<PersistentVolume>, LookupError>> {
        let r = at(Kind::PersistentVolume, "", name);
        Box::pin(fetch(Api::all(self.client.clone()), r))
    }
    fn storage_class<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<k8s_openapi::api::storage::v1::StorageClass>, LookupError>> {
        let r = at(Kind::StorageClass, "", name);
        Box::pin(fetch(Api::all(self.client.clone()), r))
    }
}

/// The objects the pods of a snapshot reference.
pub fn referenced(snapshot: &Snapshot) -> BTreeSet<ObjectRef> {
    snapshot
        .pods
        .values()
        .flat_map(|p| crate::pod::objects::references(&p.pod))
        .collect()
}

/// The agent's entry point: stop the watches no desired pod needs, each
/// time the merged snapshot changes. Returns when the sender is gone.
pub async fn prune(objects: Arc<WatchedObjects>, mut pods: watch::Receiver<Snapshot>) {
    loop {
        let refs = referenced(&pods.borrow_and_update());
        objects.retain(&refs);
        if pods.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_forbidden_and_anything_else_unavailable() {
        let r = at(Kind::Secret, "ns", "s");
        let status = |code: u16, message: &str| {
            Box::new(kube::core::Status {
                code,
                message: message.into(),
                ..Default::default()
            })
        };
        let e = classify(
            &r,
            &watcher::Error::InitialListFailed(kube::Error::Api(status(
                403,
                "secrets \"s\" is forbidden: no relationship found",
            ))),
        );
        assert!(matches!(e, LookupError::Forbidden { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "secret \"s\" in namespace \"ns\": forbidden: secrets \"s\" is forbidden: no relationship found"
        );
        let e = classify(&r, &watcher::Error::NoResourceVersion);
        assert!(matches!(e, LookupError::Unavailable { .. }));
    }
}
