//! The files of API data volumes (secret, configMap, downwardAPI,
//! projected), computed from the pod and the objects it references, as
//! kubelet's volume plugins compute them: `items` map keys to paths (and
//! modes), without items every key is a file; `defaultMode` 0644; a
//! missing object or key fails the volume unless `optional`; downward API
//! values with kubelet's formatting.
//!
//! Side effects: none (pure).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, Volume,
};

use super::atomic::{File, Payload};
use crate::pod::objects::Resolved;

/// kubelet's default file mode for API data volumes.
pub const DEFAULT_MODE: i32 = 0o644;

/// Why a volume's files cannot be computed: kubelet's reason, without the
/// `MountVolume.SetUp failed for volume "x" : ` prefix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("configmap references non-existent config key: {key}")]
    MissingConfigKey { key: String },
    #[error("references non-existent secret key: {key}")]
    MissingSecretKey { key: String },
    #[error("unsupported fieldPath: {path}")]
    FieldPath { path: String },
    #[error("unsupported container resource: {resource}")]
    Resource { resource: String },
    #[error("container {name:?} not found in the pod")]
    NoContainer { name: String },
    #[error("serviceAccountToken projection needs an API server (standalone mode has none)")]
    NoTokens,
}

/// Node allocatable, for resourceFieldRef limits a container does not set.
#[derive(Clone, Copy, Debug, Default)]
pub struct Allocatable {
    pub cpu_millis: i64,
    pub memory_bytes: i64,
    pub ephemeral_storage_bytes: i64,
}

/// The key→data of a ConfigMap (data and binaryData) or a Secret.
fn config_map_data(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    out
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

fn mode_bits(mode: Option<i32>, default: i32) -> u32 {
    (mode.unwrap_or(default) & 0o7777) as u32
}

/// kubelet's `MakePayload` for secrets and configMaps.
fn key_payload(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: i32,
    optional: bool,
    missing_key: impl Fn(&str) -> PayloadError,
    out: &mut Payload,
) -> Result<(), PayloadError> {
    match items.filter(|i| !i.is_empty()) {
        None => {
            for (k, v) in data {
                out.insert(
                    k.clone(),
                    File {
                        data: v.clone(),
                        mode: mode_bits(None, default_mode),
                    },
                );
            }
        }
        Some(items) => {
            for item in items {
                let Some(v) = data.get(&item.key) else {
                    if optional {
                        continue;
                    }
                    return Err(missing_key(&item.key));
                };
                out.insert(
                    item.path.clone(),
                    File {
                        data: v.clone(),
                        mode: mode_bits(item.mode, default_mode),
                    },
                );
            }
        }
    }
    Ok(())
}

/// Go's `%q` for the ASCII cases that matter (Rust's `{:?}` otherwise).
fn quote(s: &str) -> String {
    format!("{s:?}")
}

/// kubelet's `fieldpath.FormatMap`: sorted `k="v"` lines, no trailing newline.
pub fn format_map(m: &BTreeMap<String, String>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={}", quote(v)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The value of a downward API fieldRef for a volume.
pub fn field_value(pod: &Pod, path: &str) -> Result<String, PayloadError> {
    let m = &pod.metadata;
    let subscript = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("['"))
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_string)
    };
    let empty = BTreeMap::new();
    let labels = m.labels.as_ref().unwrap_or(&empty);
    let annotations = m.annotations.as_ref().unwrap_or(&empty);
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_else(|| "default".into()),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "metadata.labels" => format_map(labels),
        "metadata.annotations" => format_map(annotations),
        "spec.nodeName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        _ => {
            if let Some(k) = subscript("metadata.labels") {
                labels.get(&k).cloned().unwrap_or_default()
            } else if let Some(k) = subscript("metadata.annotations") {
                annotations.get(&k).cloned().unwrap_or_default()
            } else {
                return Err(PayloadError::FieldPath { path: path.into() });
            }
        }
    })
}

fn find_container<'a>(pod: &'a Pod, name: &str) -> Option<&'a Container> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
}

/// kubelet's `ExtractContainerResourceValue`: the value divided by the
/// divisor (default 1), rounded up; an unset limit is node allocatable.
pub fn resource_value(
    c: &Container,
    resource: &str,
    divisor: Option<&str>,
    node: &Allocatable,
) -> Result<String, PayloadError> {
    use crate::pod::spec::{parse_bytes, parse_cpu_millis};
    let bad = || PayloadError::Resource {
        resource: resource.into(),
    };
    let (set, name) = resource.split_once('.').ok_or_else(bad)?;
    let res = c.resources.as_ref();
    let get = |m: Option<
        &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >| { m.and_then(|m| m.get(name)).map(|q| q.0.clone()) };
    let limit = get(res.and_then(|r| r.limits.as_ref()));
    let value = match set {
        "limits" => limit,
        // The API defaults an unset request to the limit.
        "requests" => get(res.and_then(|r| r.requests.as_ref())).or(limit),
        _ => return Err(bad()),
    };
    let divisor = divisor.filter(|d| !d.is_empty() && *d != "0");
    let (value, divisor) = match name {
        "cpu" => {
            let v = match value {
                Some(q) => parse_cpu_millis(&q).ok_or_else(bad)?,
                None if set == "limits" => node.cpu_millis,
                None => 0,
            };
            let d = divisor
                .map_or(Some(1000), parse_cpu_millis)
                .ok_or_else(bad)?;
            (v, d)
        }
        "memory" | "ephemeral-storage" => {
            let fallback = if name == "memory" {
                node.memory_bytes
            } else {
                node.ephemeral_storage_bytes
            };
            let v = match value {
                Some(q) => parse_bytes(&q).ok_or_else(bad)?,
                None if set == "limits" => fallback,
                None => 0,
            };
            let d = divisor.map_or(Some(1), parse_bytes).ok_or_else(bad)?;
            (v, d)
        }
        _ => return Err(bad()),
    };
    let d = divisor.max(1);
    Ok(((value + d - 1).div_euclid(d)).to_string())
}

fn downward_payload(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: i32,
    node: &Allocatable,
    out: &mut Payload,
) -> Result<(), PayloadError> {
    for item in items {
        let value = if let Some(f) = &item.field_ref {
            field_value(pod, &f.field_path)?
        } else if let Some(r) = &item.resource_field_ref {
            let name = r.container_name.as_deref().unwrap_or_default();
            let c = find_container(pod, name)
                .ok_or_else(|| PayloadError::NoContainer { name: name.into() })?;
            resource_value(
                c,
                &r.resource,
                r.divisor.as_ref().map(|d| d.0.as_str()),
                node,
            )?
        } else {
            continue;
        };
        out.insert(
            item.path.clone(),
            File {
                data: value.into_bytes(),
                mode: mode_bits(item.mode, default_mode),
            },
        );
    }
    Ok(())
}

fn config_map<'a>(
    objects: &'a Resolved,
    name: &str,
    optional: bool,
) -> Result<Option<&'a ConfigMap>, PayloadError> {
    match objects.config_maps.get(name).and_then(|o| o.as_deref()) {
        Some(cm) => Ok(Some(cm)),
        None if optional => Ok(None),
        None => Err(PayloadError::NotFound {
            kind: "configmap",
            name: name.into(),
        }),
    }
}

fn secret<'a>(
    objects: &'a Resolved,
    name: &str,
    optional: bool,
) -> Result<Option<&'a Secret>, PayloadError> {
    match objects.secrets.get(name).and_then(|o| o.as_deref()) {
        Some(s) => Ok(Some(s)),
        None if optional => Ok(None),
        None => Err(PayloadError::NotFound {
            kind: "secret",
            name: name.into(),
        }),
    }
}

/// The files of `v` when it is an API data volume (`None` otherwise).
/// `objects` holds what the pod's volumes reference (missing ones absent
/// or `None`), and the tokens serviceAccountToken projections asked for.
pub fn payload(
    pod: &Pod,
    v: &Volume,
    objects: &Resolved,
    node: &Allocatable,
) -> Result<Option<Payload>, PayloadError> {
    let mut out = Payload::new();
    if let Some(s) = &v.secret {
        let name = s.secret_name.as_deref().unwrap_or_default();
        let optional = s.optional.unwrap_or(false);
        if let Some(sec) = secret(objects, name, optional)? {
            key_payload(
                &secret_data(sec),
                s.items.as_deref(),
                s.default_mode.unwrap_or(DEFAULT_MODE),
                optional,
                |k| PayloadError::MissingSecretKey { key: k.into() },
                &mut out,
            )?;
        }
    } else if let Some(c) = &v.config_map {
        let optional = c.optional.unwrap_or(false);
        if let Some(cm) = config_map(objects, &c.name, optional)? {
            key_payload(
                &config_map_data(cm),
                c.items.as_deref(),
                c.default_mode.unwrap_or(DEFAULT_MODE),
                optional,
                |k| PayloadError::MissingConfigKey { key: k.into() },
                &mut out,
            )?;
        }
    } else if let Some(d) = &v.downward_api {
        downward_payload(
            pod,
            d.items.as_deref().unwrap_or_default(),
            d.default_mode.unwrap_or(DEFAULT_MODE),
            node,
            &mut out,
        )?;
    } else if let Some(p) = &v.projected {
        let mode = p.default_mode.unwrap_or(DEFAULT_MODE);
        for src in p.sources.iter().flatten() {
            if let Some(s) = &src.secret {
                let optional = s.optional.unwrap_or(false);
                if let Some(sec) = secret(objects, &s.name, optional)? {
                    key_payload(
                        &secret_data(sec),
                        s.items.as_deref(),
                        mode,
                        optional,
                        |k| PayloadError::MissingSecretKey { key: k.into() },
                        &mut out,
                    )?;
                }
            }
            if let Some(c) = &src.config_map {
                let optional = c.optional.unwrap_or(false);
                if let Some(cm) = config_map(objects, &c.name, optional)? {
                    key_payload(
                        &config_map_data(cm),
                        c.items.as_deref(),
                        mode,
                        optional,
                        |k| PayloadError::MissingConfigKey { key: k.into() },
                        &mut out,
                    )?;
                }
            }
            if let Some(d) = &src.downward_api {
                downward_payload(
                    pod,
                    d.items.as_deref().unwrap_or_default(),
                    mode,
                    node,
                    &mut out,
                )?;
            }
            if let Some(t) = &src.service_account_token {
                let token = objects
                    .tokens
                    .get(&(v.name.clone(), t.path.clone()))
                    .ok_or(PayloadError::NoTokens)?;
                out.insert(
                    t.path.clone(),
                    File {
                        data: token.clone().into_bytes(),
                        mode: mode_bits(None, mode),
                    },
                );
            }
        }
    } else {
        return Ok(None);
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn pod(yaml: &str) -> Pod {
        crate::yaml::from_str(yaml).unwrap()
    }

    fn objects() -> Resolved {
        let cm: ConfigMap =
            crate::yaml::from_str("metadata: {name: cfg}\ndata: {x: hello, y: world}\n").unwrap();
        let s: Secret =
            crate::yaml::from_str("metadata: {name: pw}\ndata: {token: c2VjcmV0}\n").unwrap();
        let mut r = Resolved::default();
        r.config_maps.insert("cfg".into(), Some(Arc::new(cm)));
        r.secrets.insert("pw".into(), Some(Arc::new(s)));
        r
    }

    fn files(p: &Payload) -> Vec<String> {
        p.iter()
            .map(|(k, f)| format!("{k}={}:{:o}", String::from_utf8_lossy(&f.data), f.mode))
            .collect()
    }

    fn volume_files(p: &Pod, i: usize) -> Result<Vec<String>, PayloadError> {
        let v = &p.spec.as_ref().unwrap().volumes.as_ref().unwrap()[i];
        let node = Allocatable {
            cpu_millis: 2000,
            memory_bytes: 4 << 30,
            ephemeral_storage_bytes: 0,
        };
        payload(p, v, &objects(), &node).map(|o| files(&o.unwrap()))
    }

    #[test]
    fn secret_and_config_map_items_modes_and_defaults() {
        let p = pod(r#"
spec:
  containers: []
  volumes:
  - {name: a, secret: {secretName: pw}}
  - {name: b, configMap: {name: cfg, defaultMode: 384, items: [{key: x, path: dir/x.txt, mode: 256}, {key: y, path: y}]}}
  - {name: c, secret: {secretName: nope}}
  - {name: d, secret: {secretName: nope, optional: true}}
  - {name: e, configMap: {name: cfg, items: [{key: nokey, path: z}]}}
  - {name: f, configMap: {name: cfg, optional: true, items: [{key: nokey, path: z}, {key: x, path: x}]}}
"#);
        assert_eq!(volume_files(&p, 0).unwrap(), ["token=secret:644"]);
        assert_eq!(
            volume_files(&p, 1).unwrap(),
            ["dir/x.txt=hello:400", "y=world:600"]
        );
        assert_eq!(
            volume_files(&p, 2).unwrap_err().to_string(),
            "secret \"nope\" not found"
        );
        assert!(volume_files(&p, 3).unwrap().is_empty());
        assert_eq!(
            volume_files(&p, 4).unwrap_err().to_string(),
            "configmap references non-existent config key: nokey"
        );
        assert_eq!(volume_files(&p, 5).unwrap(), ["x=hello:644"]);
    }

    #[test]
    fn downward_api_formatting() {
        let p = pod(r#"
metadata:
  name: web
  namespace: ns
  uid: u-1
  labels: {app: web, tier: "front \"end\""}
  annotations: {a: "1"}
spec:
  containers:
  - name: c
    resources: {limits: {memory: 64Mi}, requests: {cpu: 250m}}
  volumes:
  - name: info
    downwardAPI:
      items:
      - {path: name, fieldRef: {fieldPath: metadata.name}}
      - {path: ns, fieldRef: {fieldPath: metadata.namespace}}
      - {path: uid, fieldRef: {fieldPath: metadata.uid}}
      - {path: labels, fieldRef: {fieldPath: metadata.labels}}
      - {path: app, fieldRef: {fieldPath: "metadata.labels['app']"}}
      - {path: cpu_req, resourceFieldRef: {containerName: c, resource: requests.cpu}}
      - {path: cpu_req_m, resourceFieldRef: {containerName: c, resource: requests.cpu, divisor: 1m}}
      - {path: cpu_lim, resourceFieldRef: {containerName: c, resource: limits.cpu}}
      - {path: mem_lim, resourceFieldRef: {containerName: c, resource: limits.memory, divisor: 1Mi}}
      - {path: mem_req, resourceFieldRef: {containerName: c, resource: requests.memory}}
  - name: bad
    downwardAPI: {items: [{path: x, fieldRef: {fieldPath: status.phase}}]}
"#);
        assert_eq!(
            volume_files(&p, 0).unwrap(),
            [
                "app=web:644",
                "cpu_lim=2:644",
                "cpu_req=1:644",
                "cpu_req_m=250:644",
                "labels=app=\"web\"\ntier=\"front \\\"end\\\"\":644",
                "mem_lim=64:644",
                "mem_req=67108864:644",
                "name=web:644",
                "ns=ns:644",
                "uid=u-1:644",
            ]
        );
        assert_eq!(
            volume_files(&p, 1).unwrap_err().to_string(),
            "unsupported fieldPath: status.phase"
        );
    }

    #[test]
    fn projected_merges_sources_and_needs_tokens() {
        let p = pod(r#"
metadata: {name: web, namespace: ns}
spec:
  containers: []
  volumes:
  - name: all
    projected:
      defaultMode: 288
      sources:
      - secret: {name: pw}
      - configMap: {name: cfg, items: [{key: x, path: x}]}
      - downwardAPI: {items: [{path: namespace, fieldRef: {fieldPath: metadata.namespace}}]}
  - name: sa
    projected: {sources: [{serviceAccountToken: {path: token}}]}
  - {name: scratch, emptyDir: {}}
"#);
        assert_eq!(
            volume_files(&p, 0).unwrap(),
            ["namespace=ns:440", "token=secret:440", "x=hello:440"]
        );
        assert_eq!(volume_files(&p, 1).unwrap_err(), PayloadError::NoTokens);
        let mut with_token = objects();
        with_token
            .tokens
            .insert(("sa".into(), "token".into()), "a.b.c".into());
        let v = &p.spec.as_ref().unwrap().volumes.as_ref().unwrap()[1];
        let got = payload(&p, v, &with_token, &Allocatable::default()).unwrap();
        assert_eq!(files(&got.unwrap()), ["token=a.b.c:644"]);
        let v = &p.spec.as_ref().unwrap().volumes.as_ref().unwrap()[2];
        let none = payload(&p, v, &objects(), &Allocatable::default());
        assert_eq!(none, Ok(None));
    }
}
