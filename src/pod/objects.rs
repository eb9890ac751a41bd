//! The objects a pod's containers need, fetched through the
//! `objects::ObjectLookup` seam before the pure spec code builds a config:
//! which objects a pod references at all (`references`, what API mode
//! watches), the ConfigMaps and Secrets one container's env and envFrom
//! use (`resolve`), and the pod's image pull secrets (`pull_secrets`).
//!
//! kubelet's rules: a missing object marked `optional` is skipped, any
//! other missing object fails the container with `configmap "x" not
//! found`; envFrom keys that are not valid environment variable names are
//! skipped and reported (`InvalidEnvironmentVariableNames`); a pull secret
//! that cannot be read is logged and the pull goes on without it.
//!
//! Side effects: only the lookups (which may talk to an API server).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use tracing::{debug, warn};

use crate::cri::keyring::Keyring;
use crate::cri::{CriError, Runtime, api};
use crate::objects::{Kind, LookupError, ObjectLookup, ObjectRef};

/// Every object a pod references: env valueFrom and envFrom of all
/// containers, configMap/secret/projected/PVC volumes, imagePullSecrets.
/// API mode watches exactly these (the Node authorizer allows no others).
pub fn references(pod: &Pod) -> BTreeSet<ObjectRef> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let at = |kind, name: &str| ObjectRef {
        kind,
        namespace: namespace.to_string(),
        name: name.to_string(),
    };
    let mut out = BTreeSet::new();
    let Some(spec) = &pod.spec else {
        return out;
    };
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    for c in containers {
        for e in c.env.iter().flatten() {
            let Some(from) = &e.value_from else { continue };
            if let Some(r) = &from.config_map_key_ref {
                out.insert(at(Kind::ConfigMap, &r.name));
            }
            if let Some(r) = &from.secret_key_ref {
                out.insert(at(Kind::Secret, &r.name));
            }
        }
        for e in c.env_from.iter().flatten() {
            if let Some(r) = &e.config_map_ref {
                out.insert(at(Kind::ConfigMap, &r.name));
            }
            if let Some(r) = &e.secret_ref {
                out.insert(at(Kind::Secret, &r.name));
            }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(cm) = &v.config_map {
            out.insert(at(Kind::ConfigMap, &cm.name));
        }
        if let Some(name) = v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) {
            out.insert(at(Kind::Secret, name));
        }
        if let Some(claim) = &v.persistent_volume_claim {
            out.insert(at(Kind::PersistentVolumeClaim, &claim.claim_name));
        }
        for p in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(cm) = &p.config_map {
                out.insert(at(Kind::ConfigMap, &cm.name));
            }
            if let Some(s) = &p.secret {
                out.insert(at(Kind::Secret, &s.name));
            }
        }
    }
    for s in spec.image_pull_secrets.iter().flatten() {
        if !s.name.is_empty() {
            out.insert(at(Kind::Secret, &s.name));
        }
    }
    out.retain(|r| !r.name.is_empty());
    out
}

/// The ConfigMaps and Secrets one container's env and envFrom use, by
/// name in the pod's namespace. `None`: an optional object that does not
/// exist (kubelet skips what it would have given).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolved {
    pub config_maps: BTreeMap<String, Option<Arc<ConfigMap>>>,
    pub secrets: BTreeMap<String, Option<Arc<Secret>>>,
}

/// Fetch what `c`'s env and envFrom reference. A missing object that is
/// not optional (by every reference to it) is an error with kubelet's
/// wording; so is a refusal or an unreachable source.
pub async fn resolve(
    pod: &Pod,
    c: &Container,
    lookup: &dyn ObjectLookup,
) -> Result<Resolved, LookupError> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    // name -> optional (only if every reference says optional).
    let mut cms: BTreeMap<&str, bool> = BTreeMap::new();
    let mut secrets: BTreeMap<&str, bool> = BTreeMap::new();
    let want = |map: &mut BTreeMap<_, bool>, name, optional: Option<bool>| {
        let o = optional.unwrap_or(false);
        map.entry(name)
            .and_modify(|v: &mut bool| *v &= o)
            .or_insert(o);
    };
    for e in c.env_from.iter().flatten() {
        if let Some(r) = &e.config_map_ref {
            want(&mut cms, r.name.as_str(), r.optional);
        }
        if let Some(r) = &e.secret_ref {
            want(&mut secrets, r.name.as_str(), r.optional);
        }
    }
    for e in c.env.iter().flatten() {
        let Some(from) = &e.value_from else { continue };
        if let Some(r) = &from.config_map_key_ref {
            want(&mut cms, r.name.as_str(), r.optional);
        }
        if let Some(r) = &from.secret_key_ref {
            want(&mut secrets, r.name.as_str(), r.optional);
        }
    }
    let mut out = Resolved::default();
    for (name, optional) in cms {
        let got = optional_ok(lookup.config_map(namespace, name).await, optional)?;
        out.config_maps.insert(name.to_string(), got);
    }
    for (name, optional) in secrets {
        let got = optional_ok(lookup.secret(namespace, name).await, optional)?;
        out.secrets.insert(name.to_string(), got);
    }
    Ok(out)
}

fn optional_ok<T>(
    got: Result<Arc<T>, LookupError>,
    optional: bool,
) -> Result<Option<Arc<T>>, LookupError> {
    match got {
        Ok(o) => Ok(Some(o)),
        Err(LookupError::NotFound(_)) if optional => Ok(None),
        Err(e) => Err(e),
    }
}

/// Pull `image` with the pod's pull secrets as kubelet does: no matching
/// credential, an anonymous pull; otherwise each matching credential in
/// turn (longest registry key first) until one works, and all their
/// errors if none does.
pub async fn pull_image<R: Runtime>(
    rt: &R,
    lookup: &dyn ObjectLookup,
    pod: &Pod,
    image: &str,
    sandbox: &api::PodSandboxConfig,
) -> Result<String, CriError> {
    let secrets = pull_secrets(pod, lookup).await;
    let (ring, errors) = Keyring::from_secrets(secrets.iter().map(|s| s.as_ref()));
    for e in errors {
        warn!(error = %e, "pull secret skipped");
    }
    let creds = ring.lookup(image);
    debug!(
        %image,
        secrets = secrets.len(),
        credentials = creds.len(),
        "pull credentials"
    );
    if creds.is_empty() {
        return rt.pull_image(image, None, sandbox.clone()).await;
    }
    let mut earlier: Vec<String> = Vec::new();
    let mut creds = creds.into_iter().peekable();
    while let Some(auth) = creds.next() {
        match rt.pull_image(image, Some(auth), sandbox.clone()).await {
            Ok(r) => return Ok(r),
            Err(e) if creds.peek().is_some() => earlier.push(e.message()),
            // kubelet aggregates the errors; the last one keeps its type.
            Err(CriError::Rejected {
                op,
                message,
                source,
            }) if !earlier.is_empty() => {
                earlier.push(message);
                return Err(CriError::Rejected {
                    op,
                    message: format!("[{}]", earlier.join(", ")),
                    source,
                });
            }
            Err(e) => return Err(e),
        }
    }
    // Not reached: `creds` was not empty.
    rt.pull_image(image, None, sandbox.clone()).await
}

/// The pod's imagePullSecrets that could be read. As kubelet: one that
/// cannot is logged and left out; the pull is still tried.
pub async fn pull_secrets(pod: &Pod, lookup: &dyn ObjectLookup) -> Vec<Arc<Secret>> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut out = Vec::new();
    let refs = pod
        .spec
        .iter()
        .flat_map(|s| s.image_pull_secrets.iter().flatten());
    for r in refs.filter(|r| !r.name.is_empty()) {
        match lookup.secret(namespace, &r.name).await {
            Ok(s) => out.push(s),
            Err(e) => warn!(
                secret = %r.name,
                error = %e,
                "unable to retrieve pull secret; the image pull may not succeed"
            ),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{ObjectStore, Objects};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(yaml: &str) -> Pod {
        crate::yaml::from_str(yaml).unwrap()
    }

    fn all_kinds() -> Pod {
        pod(r#"
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: ns}
spec:
  imagePullSecrets: [{name: pull}]
  initContainers:
  - name: i
    image: x
    env:
    - name: A
      valueFrom: {configMapKeyRef: {name: cm-env, key: a}}
  containers:
  - name: c
    image: x
    env:
    - name: B
      valueFrom: {secretKeyRef: {name: s-env, key: b}}
    - name: C
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    envFrom:
    - configMapRef: {name: cm-from}
    - secretRef: {name: s-from}
  volumes:
  - {name: v1, configMap: {name: cm-vol}}
  - {name: v2, secret: {secretName: s-vol}}
  - {name: v3, persistentVolumeClaim: {claimName: claim}}
  - name: v4
    projected:
      sources:
      - configMap: {name: cm-proj}
      - secret: {name: s-proj}
      - serviceAccountToken: {path: token}
  - {name: v5, emptyDir: {}}
"#)
    }

    #[test]
    fn references_cover_every_place_a_pod_names_an_object() {
        let got: Vec<String> = references(&all_kinds())
            .iter()
            .map(|r| format!("{}/{}/{}", r.kind, r.namespace, r.name))
            .collect();
        assert_eq!(
            got,
            [
                "configmap/ns/cm-env",
                "configmap/ns/cm-from",
                "configmap/ns/cm-proj",
                "configmap/ns/cm-vol",
                "secret/ns/pull",
                "secret/ns/s-env",
                "secret/ns/s-from",
                "secret/ns/s-proj",
                "secret/ns/s-vol",
                "persistentvolumeclaim/ns/claim",
            ]
        );
        assert!(
            references(&pod("metadata: {name: q}\nspec: {containers: [{name: c}]}")).is_empty()
        );
    }

    fn store_with_cm(name: &str, data: &[(&str, &str)]) -> ObjectStore {
        let store = ObjectStore::default();
        let mut objects = Objects::default();
        objects.config_maps.insert(
            ("ns".into(), name.into()),
            Arc::new(ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some("ns".into()),
                    ..Default::default()
                },
                data: Some(
                    data.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            }),
        );
        store.replace(objects);
        store
    }

    #[tokio::test]
    async fn resolve_fetches_what_the_container_uses_and_skips_optional_absentees() {
        let p = pod(r#"
metadata: {name: p, namespace: ns}
spec:
  containers:
  - name: c
    env:
    - name: A
      valueFrom: {configMapKeyRef: {name: cfg, key: a}}
    - name: B
      valueFrom: {secretKeyRef: {name: gone, key: b, optional: true}}
"#);
        let c = &p.spec.as_ref().unwrap().containers[0];
        let store = store_with_cm("cfg", &[("a", "1")]);
        let r = resolve(&p, c, &store).await.unwrap();
        assert!(r.config_maps["cfg"].is_some());
        assert_eq!(r.secrets["gone"], None);

        let mut strict = p.clone();
        strict.spec.as_mut().unwrap().containers[0]
            .env
            .as_mut()
            .unwrap()[1]
            .value_from
            .as_mut()
            .unwrap()
            .secret_key_ref
            .as_mut()
            .unwrap()
            .optional = None;
        let c = &strict.spec.as_ref().unwrap().containers[0];
        let e = resolve(&strict, c, &store).await.unwrap_err();
        assert_eq!(e.to_string(), "secret \"gone\" not found");
    }

    #[tokio::test]
    async fn a_private_image_pulls_with_the_matching_pull_secret_only() {
        use crate::cri::fake::FakeRuntime;
        let rt = FakeRuntime::new();
        let image = "localhost:5001/private/busybox:1.36";
        rt.private_image(image, "minilet", "minilet-pass");
        let p = pod(r#"
metadata: {name: p, namespace: ns}
spec:
  imagePullSecrets: [{name: wrong}, {name: regcred}, {name: absent}]
  containers: [{name: c, image: "localhost:5001/private/busybox:1.36"}]
"#);
        let sandbox = api::PodSandboxConfig::default();
        let store = ObjectStore::default();
        let e = pull_image(&rt, &store, &p, image, &sandbox)
            .await
            .unwrap_err();
        assert_eq!(e.message(), "401 Unauthorized", "no secret: anonymous");

        let secret = |name: &str, json: &str| {
            Arc::new(Secret {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/dockerconfigjson".into()),
                data: Some(BTreeMap::from([(
                    ".dockerconfigjson".to_string(),
                    k8s_openapi::ByteString(json.as_bytes().to_vec()),
                )])),
                ..Default::default()
            })
        };
        let mut objects = Objects::default();
        // A deeper key is tried first, fails, then the host's works.
        objects.secrets.insert(
            ("ns".into(), "wrong".into()),
            secret(
                "wrong",
                r#"{"auths":{"localhost:5001/private":{"username":"x","password":"y"}}}"#,
            ),
        );
        objects.secrets.insert(
            ("ns".into(), "regcred".into()),
            secret(
                "regcred",
                r#"{"auths":{"http://localhost:5001":{"auth":"bWluaWxldDptaW5pbGV0LXBhc3M="}}}"#,
            ),
        );
        store.replace(objects);
        pull_image(&rt, &store, &p, image, &sandbox).await.unwrap();
        let sent: Vec<_> = rt
            .pull_auths()
            .into_iter()
            .map(|(_, a)| a.map(|(u, _)| u))
            .collect();
        assert_eq!(
            sent,
            [None, Some("x".to_string()), Some("minilet".to_string())]
        );
    }

    #[tokio::test]
    async fn unreadable_pull_secrets_are_left_out() {
        let p = all_kinds();
        assert!(pull_secrets(&p, &ObjectStore::default()).await.is_empty());
    }
}
