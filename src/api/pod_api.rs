//! The pod calls the status writer and the mirror pod reconciler make, behind
//! one narrow trait (`PodApi`) so both are tested with a hand-written fake;
//! `KubePods` is the kube-rs implementation. Errors are classified once,
//! here: gone (404, or 409 from a UID precondition: the object is another
//! one now), refused (403, 422: retrying will not help) and unavailable
//! (everything else: retry with backoff).
//!
//! Side effects: `KubePods` talks to the API server.

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};

/// Why a pod call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404, or 409 (a UID precondition failed, or the object exists
    /// already): the object we meant is not there.
    #[error("{what}: not found or replaced ({code})")]
    Gone { what: String, code: u16 },
    /// 403, 422, 400: the server refuses this request as such.
    #[error("{what}: refused ({code}): {message}")]
    Refused {
        what: String,
        code: u16,
        message: String,
    },
    /// The server is unreachable or failing: retry later.
    #[error("{what}")]
    Unavailable {
        what: String,
        #[source]
        source: kube::Error,
    },
}

impl ApiError {
    /// Classify a kube error for `what` ("patch pod status default/x").
    pub fn of(what: String, e: kube::Error) -> ApiError {
        match &e {
            kube::Error::Api(s) if s.code == 404 || s.code == 409 => {
                ApiError::Gone { what, code: s.code }
            }
            kube::Error::Api(s) if matches!(s.code, 400 | 403 | 422) => ApiError::Refused {
                what,
                code: s.code,
                message: s.message.clone(),
            },
            _ => ApiError::Unavailable { what, source: e },
        }
    }

    /// Worth retrying with backoff (the server may come back).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ApiError::Unavailable { .. })
    }
}

/// The pod calls of the status writer and the mirror reconciler.
pub trait PodApi: Send + Sync {
    /// The pod, `None` when it does not exist.
    fn get(&self, ns: &str, name: &str) -> BoxFuture<'static, Result<Option<Pod>, ApiError>>;
    /// Pods bound to `node` (mirror pods among them).
    fn list_on_node(&self, node: &str) -> BoxFuture<'static, Result<Vec<Pod>, ApiError>>;
    fn create(&self, pod: &Pod) -> BoxFuture<'static, Result<Pod, ApiError>>;
    /// A JSON merge patch of `pods/<name>/status`.
    fn patch_status(
        &self,
        ns: &str,
        name: &str,
        patch: serde_json::Value,
    ) -> BoxFuture<'static, Result<(), ApiError>>;
    /// Delete with a UID precondition; `grace` seconds (`None`: the pod's).
    fn delete(
        &self,
        ns: &str,
        name: &str,
        uid: &str,
        grace: Option<u32>,
    ) -> BoxFuture<'static, Result<(), ApiError>>;
}

/// `PodApi` through kube-rs.
#[derive(Clone)]
pub struct KubePods {
    pub client: kube::Client,
}

impl KubePods {
    fn api(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), ns)
    }
}

impl PodApi for KubePods {
    fn get(&self, ns: &str, name: &str) -> BoxFuture<'static, Result<Option<Pod>, ApiError>> {
        let api = self.api(ns);
        let (what, name) = (format!("get pod {ns}/{name}"), name.to_string());
        async move { api.get_opt(&name).await.map_err(|e| ApiError::of(what, e)) }.boxed()
    }

    fn list_on_node(&self, node: &str) -> BoxFuture<'static, Result<Vec<Pod>, ApiError>> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let lp = kube::api::ListParams::default().fields(&format!("spec.nodeName={node}"));
        let what = format!("list pods on node {node}");
        async move {
            api.list(&lp)
                .await
                .map(|l| l.items)
                .map_err(|e| ApiError::of(what, e))
        }
        .boxed()
    }

    fn create(&self, pod: &Pod) -> BoxFuture<'static, Result<Pod, ApiError>> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let api = self.api(&ns);
        let pod = pod.clone();
        let what = format!(
            "create pod {ns}/{}",
            pod.metadata.name.as_deref().unwrap_or_default()
        );
        async move {
            api.create(&PostParams::default(), &pod)
                .await
                .map_err(|e| ApiError::of(what, e))
        }
        .boxed()
    }

    fn patch_status(
        &self,
        ns: &str,
        name: &str,
        patch: serde_json::Value,
    ) -> BoxFuture<'static, Result<(), ApiError>> {
        let api = self.api(ns);
        let (what, name) = (format!("patch pod status {ns}/{name}"), name.to_string());
        async move {
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ())
                .map_err(|e| ApiError::of(what, e))
        }
        .boxed()
    }

    fn delete(
        &self,
        ns: &str,
        name: &str,
        uid: &str,
        grace: Option<u32>,
    ) -> BoxFuture<'static, Result<(), ApiError>> {
        let api = self.api(ns);
        let (what, name) = (format!("delete pod {ns}/{name}"), name.to_string());
        let dp = DeleteParams {
            grace_period_seconds: grace,
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..Default::default()
        };
        async move {
            api.delete(&name, &dp)
                .await
                .map(|_| ())
                .map_err(|e| ApiError::of(what, e))
        }
        .boxed()
    }
}

#[cfg(test)]
pub mod fake {
    //! A scripted API server of pods: a map by namespace/name, every call
    //! recorded, and a switch that makes every call fail as unreachable.
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct FakePods {
        pub pods: Mutex<BTreeMap<String, Pod>>,
        pub calls: Mutex<Vec<String>>,
        pub down: std::sync::atomic::AtomicBool,
        next_uid: std::sync::atomic::AtomicU32,
    }

    fn key(ns: &str, name: &str) -> String {
        format!("{ns}/{name}")
    }

    fn unavailable(what: String) -> ApiError {
        ApiError::Unavailable {
            what,
            source: kube::Error::LinesCodecMaxLineLengthExceeded,
        }
    }

    impl FakePods {
        pub fn insert(&self, pod: Pod) {
            let k = key(
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default(),
            );
            self.pods.lock().unwrap().insert(k, pod);
        }
        pub fn pod(&self, ns: &str, name: &str) -> Option<Pod> {
            self.pods.lock().unwrap().get(&key(ns, name)).cloned()
        }
        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        pub fn count(&self, prefix: &str) -> usize {
            self.calls()
                .iter()
                .filter(|c| c.starts_with(prefix))
                .count()
        }
        fn call(&self, c: String) -> Result<(), ApiError> {
            self.calls.lock().unwrap().push(c.clone());
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(unavailable(c));
            }
            Ok(())
        }
    }

    impl PodApi for FakePods {
        fn get(&self, ns: &str, name: &str) -> BoxFuture<'static, Result<Option<Pod>, ApiError>> {
            let r = self
                .call(format!("get {ns}/{name}"))
                .map(|()| self.pod(ns, name));
            async move { r }.boxed()
        }
        fn list_on_node(&self, node: &str) -> BoxFuture<'static, Result<Vec<Pod>, ApiError>> {
            let r = self.call(format!("list {node}")).map(|()| {
                self.pods
                    .lock()
                    .unwrap()
                    .values()
                    .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
                    .cloned()
                    .collect()
            });
            async move { r }.boxed()
        }
        fn create(&self, pod: &Pod) -> BoxFuture<'static, Result<Pod, ApiError>> {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let r = self.call(format!("create {ns}/{name}")).and_then(|()| {
                if self.pod(&ns, &name).is_some() {
                    return Err(ApiError::Gone {
                        what: "create".into(),
                        code: 409,
                    });
                }
                let mut p = pod.clone();
                let n = self
                    .next_uid
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                p.metadata.uid = Some(format!("server-uid-{n}"));
                self.insert(p.clone());
                Ok(p)
            });
            async move { r }.boxed()
        }
        fn patch_status(
            &self,
            ns: &str,
            name: &str,
            patch: serde_json::Value,
        ) -> BoxFuture<'static, Result<(), ApiError>> {
            let r = self.call(format!("patch {ns}/{name}")).and_then(|()| {
                let mut pods = self.pods.lock().unwrap();
                let Some(p) = pods.get_mut(&key(ns, name)) else {
                    return Err(ApiError::Gone {
                        what: "patch".into(),
                        code: 404,
                    });
                };
                if patch["metadata"]["uid"].as_str() != p.metadata.uid.as_deref() {
                    return Err(ApiError::Gone {
                        what: "patch".into(),
                        code: 409,
                    });
                }
                let mut v = serde_json::to_value(&p.status).unwrap();
                merge(&mut v, &patch["status"]);
                p.status = serde_json::from_value(v).unwrap();
                Ok(())
            });
            async move { r }.boxed()
        }
        fn delete(
            &self,
            ns: &str,
            name: &str,
            uid: &str,
            grace: Option<u32>,
        ) -> BoxFuture<'static, Result<(), ApiError>> {
            let r = self
                .call(format!("delete {ns}/{name} uid={uid} grace={grace:?}"))
                .and_then(|()| {
                    let mut pods = self.pods.lock().unwrap();
                    match pods.get(&key(ns, name)) {
                        Some(p) if p.metadata.uid.as_deref() == Some(uid) => {
                            pods.remove(&key(ns, name));
                            Ok(())
                        }
                        Some(_) => Err(ApiError::Gone {
                            what: "delete".into(),
                            code: 409,
                        }),
                        None => Err(ApiError::Gone {
                            what: "delete".into(),
                            code: 404,
                        }),
                    }
                });
            async move { r }.boxed()
        }
    }

    /// RFC 7386 JSON merge patch.
    pub fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        let Some(p) = patch.as_object() else {
            *target = patch.clone();
            return;
        };
        if !target.is_object() {
            *target = serde_json::json!({});
        }
        let t = target.as_object_mut().unwrap();
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
    }
}
