//! The objects pods use (ConfigMap, Secret, PersistentVolumeClaim,
//! PersistentVolume; StorageClass for standalone provisioning), behind one
//! lookup seam. In API server mode the
//! lookup is backed by watches of exactly the objects this node's pods
//! reference (the Node authorizer allows nothing else); standalone, by the
//! objects found in the manifest dir. The pod path (env, envFrom, volumes,
//! imagePullSecrets) asks only this trait, never where objects live.
//!
//! `ObjectStore` is the in-memory implementation: the standalone source
//! fills it from the manifest dir, and unit tests fill it by hand.
//!
//! Side effects: none here (implementations may watch an API server).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, PersistentVolumeClaim, Secret};
use k8s_openapi::api::storage::v1::StorageClass;

use crate::locks::{read, write};

/// A counter bumped each time something a pod's volumes are built from
/// changes (an object the lookup serves, a standalone claim's binding),
/// after the change is visible, with the object that changed when the
/// bumper knows it. A worker whose volume set-up failed retries at once on
/// a bump of an object its pod uses (or of one not named) instead of
/// waiting out its backoff, as kubelet's volume manager re-evaluates when
/// its inputs change; 30 claims binding one by one then wake each waiting
/// pod once, not 30 times. Cheap to clone; every clone bumps the same
/// counter.
#[derive(Clone, Debug)]
pub struct Changes(Arc<ChangesInner>);

#[derive(Debug)]
struct ChangesInner {
    tx: tokio::sync::watch::Sender<u64>,
    /// The latest bumps: (counter value, what changed; None = not said).
    recent: std::sync::Mutex<std::collections::VecDeque<(u64, Option<ObjectRef>)>>,
}

/// How many bumps `Changes::since` remembers.
const RECENT_CHANGES: usize = 256;

impl Default for Changes {
    fn default() -> Self {
        Changes(Arc::new(ChangesInner {
            tx: tokio::sync::watch::Sender::new(0),
            recent: Default::default(),
        }))
    }
}

impl Changes {
    /// Something changed; what is not said (every waiting pod retries).
    pub fn bump(&self) {
        self.record(None);
    }

    /// `what` changed.
    pub fn bump_for(&self, what: ObjectRef) {
        self.record(Some(what));
    }

    fn record(&self, what: Option<ObjectRef>) {
        let mut recent = crate::locks::lock(&self.0.recent);
        let n = self.0.tx.borrow().wrapping_add(1);
        recent.push_back((n, what));
        if recent.len() > RECENT_CHANGES {
            recent.pop_front();
        }
        self.0.tx.send_replace(n);
    }

    /// The counter now.
    pub fn current(&self) -> u64 {
        *self.0.tx.borrow()
    }

    /// What changed after counter value `seen`: the objects, or `None`
    /// when a change since is not known by object (or no longer
    /// remembered), so the caller must assume anything did.
    pub fn since(&self, seen: u64) -> Option<Vec<ObjectRef>> {
        let recent = crate::locks::lock(&self.0.recent);
        if *self.0.tx.borrow() == seen {
            return Some(vec![]);
        }
        match recent.front() {
            Some((first, _)) if *first <= seen.wrapping_add(1) => {}
            _ => return None,
        }
        recent
            .iter()
            .filter(|(n, _)| *n > seen)
            .map(|(_, what)| what.clone())
            .collect()
    }

    /// A receiver that sees every later bump (`changed()`).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.tx.subscribe()
    }
}

/// The kinds of object a pod can reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    ConfigMap,
    Secret,
    PersistentVolumeClaim,
    PersistentVolume,
    /// Cluster-scoped (storage.k8s.io/v1); only the standalone provisioner
    /// needs classes: in API server mode the cluster's controllers provision.
    StorageClass,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::ConfigMap => "configmap",
            Kind::Secret => "secret",
            Kind::PersistentVolumeClaim => "persistentvolumeclaim",
            Kind::PersistentVolume => "persistentvolume",
            Kind::StorageClass => "storageclass",
        })
    }
}

/// One object, by kind, namespace ("" for cluster-scoped) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {:?}", self.kind, self.name)
        } else {
            write!(
                f,
                "{} {:?} in namespace {:?}",
                self.kind, self.name, self.namespace
            )
        }
    }
}

/// Why an object could not be had. kubelet's wording where it has one
/// (`configmap "x" not found`), so `CreateContainerConfigError` messages
/// read the same.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("{} {:?} not found", .0.kind, .0.name)]
    NotFound(ObjectRef),
    /// The source of objects cannot answer now (API server unreachable,
    /// watch not yet synced): retry later.
    #[error("{object}: {reason}")]
    Unavailable { object: ObjectRef, reason: String },
    /// The API server refused (the Node authorizer: the pod does not
    /// reference it, or it is not bound to this node).
    #[error("{object}: forbidden: {reason}")]
    Forbidden { object: ObjectRef, reason: String },
}

impl LookupError {
    /// Whether asking again later can succeed without anything changing
    /// on the node (a missing object can appear too: kubelet retries both).
    pub fn is_retryable(&self) -> bool {
        true
    }
}

/// The lookup seam. Implementations cache: callers may ask on every step.
pub trait ObjectLookup: Send + Sync {
    fn config_map<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<ConfigMap>, LookupError>>;
    fn secret<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<Secret>, LookupError>>;
    fn persistent_volume_claim<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<PersistentVolumeClaim>, LookupError>>;
    fn persistent_volume<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<PersistentVolume>, LookupError>>;
    /// Only the standalone provisioner needs classes; lookups that have
    /// none say NotFound.
    fn storage_class<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<StorageClass>, LookupError>> {
        let r = ObjectRef {
            kind: Kind::StorageClass,
            namespace: String::new(),
            name: name.to_string(),
        };
        Box::pin(async move { Err(LookupError::NotFound(r)) })
    }
}

/// Service account tokens for projected `serviceAccountToken` volume
/// sources (API mode: the TokenRequest API, `api::tokens::Tokens`).
/// Standalone there is none.
pub trait TokenSource: Send + Sync {
    fn token<'a>(
        &'a self,
        key: &'a crate::api::tokens::TokenKey,
    ) -> BoxFuture<'a, Result<String, crate::api::tokens::TokenError>>;
    /// Drop what is cached for a pod that is gone.
    fn forget_pod(&self, _pod_uid: &str) {}
}

/// Objects held in memory, keyed by reference.
#[derive(Clone, Default)]
pub struct ObjectStore {
    inner: Arc<RwLock<Objects>>,
}

/// A set of objects of all kinds (what a source found).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub config_maps: BTreeMap<(String, String), Arc<ConfigMap>>,
    pub secrets: BTreeMap<(String, String), Arc<Secret>>,
    pub claims: BTreeMap<(String, String), Arc<PersistentVolumeClaim>>,
    /// Cluster-scoped: keyed by ("", name).
    pub volumes: BTreeMap<(String, String), Arc<PersistentVolume>>,
    /// Cluster-scoped: keyed by ("", name).
    pub classes: BTreeMap<(String, String), Arc<StorageClass>>,
}

fn key(namespace: &str, name: &str) -> (String, String) {
    (namespace.to_string(), name.to_string())
}

fn get<T>(
    map: &BTreeMap<(String, String), Arc<T>>,
    kind: Kind,
    namespace: &str,
    name: &str,
) -> Result<Arc<T>, LookupError> {
    map.get(&key(namespace, name)).cloned().ok_or_else(|| {
        LookupError::NotFound(ObjectRef {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    })
}

impl ObjectStore {
    /// Replace everything (a source's new snapshot of its objects).
    pub fn replace(&self, objects: Objects) {
        *write(&self.inner) = objects;
    }

    pub fn snapshot(&self) -> Objects {
        read(&self.inner).clone()
    }
}

impl ObjectLookup for ObjectStore {
    fn config_map<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<ConfigMap>, LookupError>> {
        let r = get(
            &read(&self.inner).config_maps,
            Kind::ConfigMap,
            namespace,
            name,
        );
        Box::pin(async move { r })
    }
    fn secret<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<Secret>, LookupError>> {
        let r = get(&read(&self.inner).secrets, Kind::Secret, namespace, name);
        Box::pin(async move { r })
    }
    fn persistent_volume_claim<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<PersistentVolumeClaim>, LookupError>> {
        let r = get(
            &read(&self.inner).claims,
            Kind::PersistentVolumeClaim,
            namespace,
            name,
        );
        Box::pin(async move { r })
    }
    fn persistent_volume<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<PersistentVolume>, LookupError>> {
        let r = get(&read(&self.inner).volumes, Kind::PersistentVolume, "", name);
        Box::pin(async move { r })
    }
    fn storage_class<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<StorageClass>, LookupError>> {
        let r = get(&read(&self.inner).classes, Kind::StorageClass, "", name);
        Box::pin(async move { r })
    }
}

/// The manifest dir's objects first, then the API server's: standalone
/// pods find what their dir defines, API pods what the server has.
pub struct Layered {
    pub local: ObjectStore,
    pub remote: Arc<dyn ObjectLookup>,
}

/// `local`'s answer unless it lacks the object, then `remote`'s.
macro_rules! layered {
    ($self:ident, $method:ident, $($arg:expr),*) => {
        Box::pin(async move {
            match $self.local.$method($($arg),*).await {
                Err(LookupError::NotFound(_)) => $self.remote.$method($($arg),*).await,
                found => found,
            }
        })
    };
}

impl ObjectLookup for Layered {
    fn config_map<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<ConfigMap>, LookupError>> {
        layered!(self, config_map, namespace, name)
    }
    fn secret<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<Secret>, LookupError>> {
        layered!(self, secret, namespace, name)
    }
    fn persistent_volume_claim<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<PersistentVolumeClaim>, LookupError>> {
        layered!(self, persistent_volume_claim, namespace, name)
    }
    fn persistent_volume<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<PersistentVolume>, LookupError>> {
        layered!(self, persistent_volume, name)
    }
    fn storage_class<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Arc<StorageClass>, LookupError>> {
        layered!(self, storage_class, name)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn changes_say_what_changed_while_they_remember_it() {
        let c = super::Changes::default();
        let r = |name: &str| super::ObjectRef {
            kind: super::Kind::PersistentVolumeClaim,
            namespace: "ns".into(),
            name: name.into(),
        };
        let seen = c.current();
        assert_eq!(c.since(seen), Some(vec![]));
        c.bump_for(r("a"));
        c.bump_for(r("b"));
        assert_eq!(c.since(seen), Some(vec![r("a"), r("b")]));
        assert_eq!(c.since(seen + 1), Some(vec![r("b")]));
        c.bump();
        assert_eq!(c.since(seen), None, "an unnamed change: anything may have");
        let later = c.current();
        for i in 0..300 {
            c.bump_for(r(&format!("x{i}")));
        }
        assert_eq!(c.since(later), None, "fell out of the memory");
        assert_eq!(c.since(c.current() - 2).map(|v| v.len()), Some(2));
    }

    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[tokio::test]
    async fn the_store_finds_what_it_holds_and_names_what_it_lacks() {
        let store = ObjectStore::default();
        let mut objects = Objects::default();
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some("cfg".into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        objects
            .config_maps
            .insert(key("default", "cfg"), Arc::new(cm));
        store.replace(objects);
        assert!(store.config_map("default", "cfg").await.is_ok());
        let e = store.secret("default", "pw").await.unwrap_err();
        assert_eq!(e.to_string(), "secret \"pw\" not found");
    }
}
