//! Pure translation of a v1 Pod into CRI sandbox and container configs,
//! with kubelet's labels, annotations, defaults and resource arithmetic.
//! No I/O: host facts (resolv.conf text, memory capacity, volume paths) and
//! the ConfigMaps and Secrets env uses (`pod::objects::Resolved`) are
//! passed in.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::objects::Resolved;
use crate::cri::api;
use crate::labels;

/// Errors in a pod spec found while building a container config; shown as
/// the container's `CreateContainerConfigError`.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    /// A volumeMount names a volume the pod does not declare.
    #[error("container {container}: volumeMount {mount:?} names no volume of the pod")]
    MissingVolume { container: String, mount: String },
    /// A quantity that does not parse.
    #[error("container {container}: {field} {value:?} is not a valid quantity")]
    BadQuantity {
        container: String,
        field: &'static str,
        value: String,
    },
    /// An env var refers to a field minilet cannot resolve.
    #[error("container {container}: env {var}: unsupported {what}")]
    UnsupportedEnv {
        container: String,
        var: String,
        what: String,
    },
    /// A ConfigMap or Secret the env references was not fetched (a bug:
    /// `pod::objects::resolve` fetches every one).
    #[error("container {container}: {kind} {name:?} was not looked up")]
    Unresolved {
        container: String,
        kind: &'static str,
        name: String,
    },
    /// A key the env references is not in the object (kubelet's words).
    #[error("couldn't find key {key} in {kind} {namespace}/{name}")]
    MissingKey {
        key: String,
        kind: &'static str,
        namespace: String,
        name: String,
    },
    /// A subPath that would escape the volume.
    #[error(
        "container {container}: subPath {sub_path:?} must be relative and stay inside the volume"
    )]
    BadSubPath { container: String, sub_path: String },
}

/// Host facts and agent settings the configs depend on.
#[derive(Clone, Debug, Default)]
pub struct HostContext {
    pub node_name: String,
    pub pod_logs_dir: PathBuf,
    /// Text of the host's resolv.conf (kubelet `resolvConf`).
    pub resolv_conf: String,
    pub cluster_dns: Vec<String>,
    pub cluster_domain: String,
    /// Node memory in bytes, for kubelet's oom_score_adj formula.
    pub memory_capacity: i64,
}

/// kubelet's pod log directory: `<podLogsDir>/<ns>_<name>_<uid>`.
pub fn log_directory(pod_logs_dir: &Path, namespace: &str, name: &str, uid: &str) -> PathBuf {
    pod_logs_dir.join(format!("{namespace}_{name}_{uid}"))
}

/// kubelet's container log path, relative to the log directory.
pub fn log_path(container: &str, restart_count: i32) -> String {
    format!("{container}/{restart_count}.log")
}

fn meta(pod: &Pod) -> (&str, &str, &str) {
    let m = &pod.metadata;
    (
        m.name.as_deref().unwrap_or_default(),
        m.namespace.as_deref().unwrap_or("default"),
        m.uid.as_deref().unwrap_or_default(),
    )
}

fn spec(pod: &Pod) -> PodSpec {
    pod.spec.clone().unwrap_or_default()
}

/// FNV-1a 64 over a canonical JSON rendering: stable across runs and builds.
pub fn stable_hash(value: &impl serde::Serialize) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// kubelet's container hash annotation: changes whenever the container's spec does.
pub fn container_hash(c: &Container) -> String {
    stable_hash(c)
}

/// Hash of everything that shapes the sandbox; a change means a new sandbox.
pub fn sandbox_hash(pod: &Pod) -> String {
    let s = spec(pod);
    let ports: Vec<_> = port_mappings(pod)
        .into_iter()
        .map(|p| (p.protocol, p.container_port, p.host_port, p.host_ip))
        .collect();
    stable_hash(&(
        s.host_network,
        s.host_pid,
        s.host_ipc,
        s.share_process_namespace,
        &s.hostname,
        &s.subdomain,
        &s.dns_policy,
        &s.dns_config,
        ports,
    ))
}

fn protocol(p: Option<&str>) -> i32 {
    match p.unwrap_or("TCP") {
        "UDP" => api::Protocol::Udp as i32,
        "SCTP" => api::Protocol::Sctp as i32,
        _ => api::Protocol::Tcp as i32,
    }
}

/// hostPort mappings of all containers (kubelet passes them to the sandbox).
pub fn port_mappings(pod: &Pod) -> Vec<api::PortMapping> {
    let s = spec(pod);
    s.init_containers
        .iter()
        .flatten()
        .chain(s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.host_port.unwrap_or(0) != 0)
        .map(|p| api::PortMapping {
            protocol: protocol(p.protocol.as_deref()),
            container_port: p.container_port,
            host_port: p.host_port.unwrap_or(0),
            host_ip: p.host_ip.clone().unwrap_or_default(),
        })
        .collect()
}

/// Parsed resolv.conf: (nameservers, searches, options).
pub fn parse_resolv_conf(text: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut servers, mut searches, mut options) = (vec![], vec![], vec![]);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => servers.extend(words.next().map(str::to_string)),
            Some("search") | Some("domain") => searches = words.map(str::to_string).collect(),
            Some("options") => options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    (servers, searches, options)
}

/// kubelet's DNS policy: ClusterFirst falls back to the host's resolv.conf
/// when no clusterDNS is configured; `None` uses only `dnsConfig`.
pub fn dns_config(pod: &Pod, host: &HostContext) -> api::DnsConfig {
    let s = spec(pod);
    let (_, namespace, _) = meta(pod);
    let policy = s.dns_policy.as_deref().unwrap_or("ClusterFirst");
    let host_net = s.host_network.unwrap_or(false);
    let cluster = match policy {
        "ClusterFirstWithHostNet" => true,
        "ClusterFirst" => !host_net,
        _ => false,
    } && !host.cluster_dns.is_empty();
    let (host_servers, host_searches, host_options) = parse_resolv_conf(&host.resolv_conf);
    let mut cfg = match (policy, cluster) {
        ("None", _) => api::DnsConfig::default(),
        (_, true) => {
            let d = &host.cluster_domain;
            let mut searches = vec![
                format!("{namespace}.svc.{d}"),
                format!("svc.{d}"),
                d.clone(),
            ];
            searches.extend(host_searches);
            api::DnsConfig {
                servers: host.cluster_dns.clone(),
                searches,
                options: vec!["ndots:5".into()],
            }
        }
        _ => api::DnsConfig {
            servers: host_servers,
            searches: host_searches,
            options: host_options,
        },
    };
    if let Some(extra) = s.dns_config {
        cfg.servers.extend(extra.nameservers.unwrap_or_default());
        cfg.searches.extend(extra.searches.unwrap_or_default());
        for o in extra.options.unwrap_or_default() {
            let name = o.name.unwrap_or_default();
            cfg.options
                .retain(|x| x.split(':').next() != Some(name.as_str()));
            cfg.options.push(match o.value {
                Some(v) => format!("{name}:{v}"),
                None => name,
            });
        }
    }
    cfg
}

fn namespace_options(s: &PodSpec) -> api::NamespaceOption {
    use api::NamespaceMode::{Container, Node, Pod};
    let pick = |host: Option<bool>, other| if host.unwrap_or(false) { Node } else { other };
    let pid_default = if s.share_process_namespace.unwrap_or(false) {
        Pod
    } else {
        Container
    };
    api::NamespaceOption {
        network: pick(s.host_network, Pod) as i32,
        pid: pick(s.host_pid, pid_default) as i32,
        ipc: pick(s.host_ipc, Pod) as i32,
        ..Default::default()
    }
}

/// The labels that tie a runtime object to a pod (and to this node).
pub fn pod_labels(pod: &Pod, node_name: &str) -> HashMap<String, String> {
    let (name, namespace, uid) = meta(pod);
    HashMap::from([
        (labels::POD_NAME.to_string(), name.to_string()),
        (labels::POD_NAMESPACE.to_string(), namespace.to_string()),
        (labels::POD_UID.to_string(), uid.to_string()),
        (labels::MANAGED_BY_NODE.to_string(), node_name.to_string()),
    ])
}

/// The PodSandboxConfig kubelet would send, for the given attempt.
pub fn sandbox_config(pod: &Pod, host: &HostContext, attempt: u32) -> api::PodSandboxConfig {
    let (name, namespace, uid) = meta(pod);
    let s = spec(pod);
    let host_net = s.host_network.unwrap_or(false);
    // As kubelet: a host-network pod shares the host's UTS namespace, so it
    // gets no hostname of its own (runc refuses to set one there).
    let hostname = if host_net {
        String::new()
    } else {
        let h = s.hostname.clone().unwrap_or_else(|| name.to_string());
        h.chars()
            .take(63)
            .collect::<String>()
            .trim_end_matches(['-', '.'])
            .to_string()
    };
    let mut sandbox_labels: HashMap<String, String> = pod
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    sandbox_labels.extend(pod_labels(pod, &host.node_name));
    let mut annotations: HashMap<String, String> = pod
        .metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    annotations.insert(labels::SANDBOX_HASH.into(), sandbox_hash(pod));
    let privileged = s
        .init_containers
        .iter()
        .flatten()
        .chain(s.containers.iter())
        .any(|c| c.security_context.as_ref().and_then(|sc| sc.privileged) == Some(true));
    let psc = s.security_context.clone().unwrap_or_default();
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: namespace.into(),
            attempt,
        }),
        hostname,
        log_directory: log_directory(&host.pod_logs_dir, namespace, name, uid)
            .to_string_lossy()
            .into_owned(),
        dns_config: Some(dns_config(pod, host)),
        port_mappings: port_mappings(pod),
        labels: sandbox_labels,
        annotations,
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options(&s)),
                run_as_user: psc.run_as_user.map(|value| api::Int64Value { value }),
                run_as_group: psc.run_as_group.map(|value| api::Int64Value { value }),
                supplemental_groups: psc.supplemental_groups.unwrap_or_default(),
                privileged,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Values a container's env can reference through fieldRef.
#[derive(Clone, Debug, Default)]
pub struct Downward {
    pub pod_ip: String,
}

/// Expand `$(VAR)` references as kubelet does; `$$` escapes a `$`; an
/// unknown reference is left as written.
pub fn expand(input: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let (Some(body), Some(end)) = (after.strip_prefix('('), after.find(')')) {
            let name = &body[..end - 1];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&rest[i..i + 2 + end]),
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Millicores of a CPU quantity ("500m", "1", "0.5").
pub fn parse_cpu_millis(q: &str) -> Option<i64> {
    if let Some(m) = q.strip_suffix('m') {
        return m.parse().ok();
    }
    q.parse::<f64>().ok().map(|c| (c * 1000.0).ceil() as i64)
}

/// Bytes of a memory quantity ("64Mi", "1G", "1000", "1.5Gi", "128974848e0").
pub fn parse_bytes(q: &str) -> Option<i64> {
    const SUFFIXES: [(&str, f64); 12] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    for (suffix, mult) in SUFFIXES {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|v| (v * mult).ceil() as i64);
        }
    }
    if let Some(n) = q.strip_suffix('m') {
        return n.parse::<f64>().ok().map(|v| (v / 1000.0).ceil() as i64);
    }
    q.parse::<f64>().ok().map(|v| v.ceil() as i64)
}

fn quantity(
    map: Option<&BTreeMap<String, Quantity>>,
    key: &str,
    container: &str,
    field: &'static str,
    parse: fn(&str) -> Option<i64>,
) -> Result<Option<i64>, SpecError> {
    let Some(q) = map.and_then(|m| m.get(key)) else {
        return Ok(None);
    };
    parse(&q.0).map(Some).ok_or_else(|| SpecError::BadQuantity {
        container: container.into(),
        field,
        value: q.0.clone(),
    })
}

/// kubelet's resource arithmetic: requests → shares, limits → CFS quota and
/// memory limit; limits default the requests (API defaulting).
pub fn resources(
    c: &Container,
    memory_capacity: i64,
) -> Result<api::LinuxContainerResources, SpecError> {
    const PERIOD: i64 = 100_000;
    let r = c.resources.clone().unwrap_or_default();
    let (req, lim) = (r.requests.as_ref(), r.limits.as_ref());
    let n = &c.name;
    let cpu_lim = quantity(lim, "cpu", n, "limits.cpu", parse_cpu_millis)?;
    let cpu_req = quantity(req, "cpu", n, "requests.cpu", parse_cpu_millis)?.or(cpu_lim);
    let mem_lim = quantity(lim, "memory", n, "limits.memory", parse_bytes)?;
    let mem_req = quantity(req, "memory", n, "requests.memory", parse_bytes)?.or(mem_lim);
    let cpu_shares = cpu_req.map_or(2, |m| (m * 1024 / 1000).max(2));
    let cpu_quota = cpu_lim.map_or(0, |m| (m * PERIOD / 1000).max(1000));
    // kubelet's QoS-based oom_score_adj (the runtime clamps it when restricted).
    let guaranteed =
        cpu_lim.is_some() && mem_lim.is_some() && cpu_req == cpu_lim && mem_req == mem_lim;
    let best_effort = cpu_req.is_none() && mem_req.is_none();
    let oom_score_adj = if guaranteed {
        -997
    } else if best_effort {
        1000
    } else {
        let cap = memory_capacity.max(1);
        let adj = 1000 - (1000 * mem_req.unwrap_or(0)) / cap;
        adj.clamp(2, 999)
    };
    Ok(api::LinuxContainerResources {
        cpu_period: if cpu_quota > 0 { PERIOD } else { 0 },
        cpu_quota,
        cpu_shares,
        memory_limit_in_bytes: mem_lim.unwrap_or(0),
        oom_score_adj,
        ..Default::default()
    })
}

const MASKED_PATHS: [&str; 9] = [
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];
const READONLY_PATHS: [&str; 6] = [
    "/proc/asound",
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// kubelet's `IsEnvVarName`: `[-._a-zA-Z][-._a-zA-Z0-9]*`.
pub fn is_env_var_name(name: &str) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
    name.chars()
        .next()
        .is_some_and(|c| ok(c) && !c.is_ascii_digit())
        && name.chars().all(ok)
}

/// One envFrom source's variables (prefix applied), and the keys it had
/// that are no valid variable names (kubelet skips and reports them).
struct FromSource {
    vars: Vec<(String, String)>,
    invalid: Vec<String>,
    what: &'static str,
    name: String,
}

fn unresolved(c: &Container, kind: &'static str, name: &str) -> SpecError {
    SpecError::Unresolved {
        container: c.name.clone(),
        kind,
        name: name.to_string(),
    }
}

/// One `configMapKeyRef` / `secretKeyRef` of an env var.
struct KeyRef<'a> {
    kind: &'static str,
    namespace: &'a str,
    name: &'a str,
    key: &'a str,
    optional: bool,
}

impl KeyRef<'_> {
    /// The key's value if the object has it; `None` (skip the variable)
    /// when it lacks it and the ref is optional; kubelet's error otherwise.
    fn value(&self, found: Option<String>) -> Result<Option<String>, SpecError> {
        match (found, self.optional) {
            (Some(v), _) => Ok(Some(v)),
            (None, true) => Ok(None),
            (None, false) => Err(SpecError::MissingKey {
                key: self.key.to_string(),
                kind: self.kind,
                namespace: self.namespace.to_string(),
                name: self.name.to_string(),
            }),
        }
    }
}

/// envFrom in order; an optional object that does not exist gives nothing.
fn env_from(c: &Container, objects: &Resolved) -> Result<Vec<FromSource>, SpecError> {
    let mut out = Vec::new();
    for e in c.env_from.iter().flatten() {
        let prefix = e.prefix.as_deref().unwrap_or_default();
        let (what, name, data): (_, _, Vec<(String, String)>) = if let Some(r) = &e.config_map_ref {
            let Some(got) = objects.config_maps.get(&r.name) else {
                return Err(unresolved(c, "configmap", &r.name));
            };
            let Some(cm) = got else { continue };
            let data = cm.data.iter().flatten();
            (
                "configMap",
                &r.name,
                data.map(|(k, v)| (k.clone(), v.clone())).collect(),
            )
        } else if let Some(r) = &e.secret_ref {
            let Some(got) = objects.secrets.get(&r.name) else {
                return Err(unresolved(c, "secret", &r.name));
            };
            let Some(secret) = got else { continue };
            let data = secret.data.iter().flatten();
            let data = data.map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()));
            ("secret", &r.name, data.collect())
        } else {
            continue;
        };
        let mut source = FromSource {
            vars: vec![],
            invalid: vec![],
            what,
            name: name.clone(),
        };
        for (k, v) in data {
            let k = format!("{prefix}{k}");
            if is_env_var_name(&k) {
                source.vars.push((k, v));
            } else {
                source.invalid.push(k);
            }
        }
        source.invalid.sort();
        out.push(source);
    }
    Ok(out)
}

/// kubelet's `InvalidEnvironmentVariableNames` warnings for a container's
/// envFrom (one per source that had such keys), worded as kubelet's event.
pub fn invalid_env_names(pod: &Pod, c: &Container, objects: &Resolved) -> Vec<String> {
    let (_, namespace, _) = meta(pod);
    env_from(c, objects)
        .unwrap_or_default()
        .into_iter()
        .filter(|s| !s.invalid.is_empty())
        .map(|s| {
            format!(
                "Keys [{}] from the EnvFrom {} {namespace}/{} were skipped since they are considered invalid environment variable names.",
                s.invalid.join(", "),
                s.what,
                s.name
            )
        })
        .collect()
}

/// The container's environment as kubelet makes it: envFrom first (later
/// sources override earlier), then env in order (overriding envFrom), each
/// `value` expanded against what is defined so far.
fn env(
    pod: &Pod,
    c: &Container,
    host: &HostContext,
    downward: &Downward,
    objects: &Resolved,
) -> Result<Vec<api::KeyValue>, SpecError> {
    let (name, namespace, uid) = meta(pod);
    let s = spec(pod);
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    // First-definition order, later definitions replace the value.
    let mut order: Vec<String> = Vec::new();
    let mut set = |vars: &mut BTreeMap<String, String>, k: String, v: String| {
        if vars.insert(k.clone(), v).is_none() {
            order.push(k);
        }
    };
    for source in env_from(c, objects)? {
        for (k, v) in source.vars {
            set(&mut vars, k, v);
        }
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (_, Some(from)) => {
                if let Some(r) = &from.config_map_key_ref {
                    let Some(got) = objects.config_maps.get(&r.name) else {
                        return Err(unresolved(c, "configmap", &r.name));
                    };
                    let value = got
                        .as_ref()
                        .and_then(|cm| cm.data.as_ref()?.get(&r.key).cloned());
                    let key = KeyRef {
                        kind: "ConfigMap",
                        namespace,
                        name: &r.name,
                        key: &r.key,
                        optional: r.optional.unwrap_or(false),
                    };
                    match key.value(value)? {
                        Some(v) => v,
                        None => continue,
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    let Some(got) = objects.secrets.get(&r.name) else {
                        return Err(unresolved(c, "secret", &r.name));
                    };
                    let value = got.as_ref().and_then(|s| {
                        let v = s.data.as_ref()?.get(&r.key)?;
                        Some(String::from_utf8_lossy(&v.0).into_owned())
                    });
                    let key = KeyRef {
                        kind: "Secret",
                        namespace,
                        name: &r.name,
                        key: &r.key,
                        optional: r.optional.unwrap_or(false),
                    };
                    match key.value(value)? {
                        Some(v) => v,
                        None => continue,
                    }
                } else if let Some(field) = &from.field_ref {
                    match field.field_path.as_str() {
                        "metadata.name" => name.to_string(),
                        "metadata.namespace" => namespace.to_string(),
                        "metadata.uid" => uid.to_string(),
                        "spec.nodeName" => s
                            .node_name
                            .clone()
                            .unwrap_or_else(|| host.node_name.clone()),
                        "spec.serviceAccountName" => {
                            s.service_account_name.clone().unwrap_or_default()
                        }
                        "status.podIP" => downward.pod_ip.clone(),
                        other => {
                            return Err(SpecError::UnsupportedEnv {
                                container: c.name.clone(),
                                var: e.name.clone(),
                                what: format!("fieldRef {other}"),
                            });
                        }
                    }
                } else {
                    return Err(SpecError::UnsupportedEnv {
                        container: c.name.clone(),
                        var: e.name.clone(),
                        what:
                            "valueFrom (fieldRef, configMapKeyRef and secretKeyRef are supported)"
                                .into(),
                    });
                }
            }
            (Some(v), None) => expand(v, &vars),
            (None, None) => String::new(),
        };
        set(&mut vars, e.name.clone(), value);
    }
    Ok(order
        .into_iter()
        .map(|key| {
            let value = vars.get(&key).cloned().unwrap_or_default();
            api::KeyValue { key, value }
        })
        .collect())
}

/// Volumes kubelet always mounts read-only (secret, configMap,
/// downwardAPI, projected: their files are the API's, not the pod's).
fn read_only_volumes(pod: &Pod) -> std::collections::HashSet<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter(|v| {
            v.secret.is_some()
                || v.config_map.is_some()
                || v.downward_api.is_some()
                || v.projected.is_some()
        })
        .map(|v| v.name.clone())
        .collect()
}

fn mounts(
    c: &Container,
    volume_paths: &HashMap<String, PathBuf>,
    read_only: &std::collections::HashSet<String>,
) -> Result<Vec<api::Mount>, SpecError> {
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let Some(host_path) = volume_paths.get(&m.name) else {
            return Err(SpecError::MissingVolume {
                container: c.name.clone(),
                mount: m.name.clone(),
            });
        };
        let mut host_path = host_path.clone();
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            let p = Path::new(sub);
            if p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
                return Err(SpecError::BadSubPath {
                    container: c.name.clone(),
                    sub_path: sub.into(),
                });
            }
            host_path = host_path.join(p);
        }
        out.push(api::Mount {
            container_path: m.mount_path.clone(),
            host_path: host_path.to_string_lossy().into_owned(),
            readonly: m.read_only.unwrap_or(false) || read_only.contains(&m.name),
            propagation: match m.mount_propagation.as_deref() {
                Some("HostToContainer") => api::MountPropagation::PropagationHostToContainer as i32,
                Some("Bidirectional") => api::MountPropagation::PropagationBidirectional as i32,
                _ => api::MountPropagation::PropagationPrivate as i32,
            },
            ..Default::default()
        });
    }
    Ok(out)
}

/// The ContainerConfig kubelet would send for this container instance;
/// `objects` holds what `pod::objects::resolve` fetched for it.
#[allow(clippy::too_many_arguments)]
pub fn container_config(
    pod: &Pod,
    c: &Container,
    init: bool,
    restart_count: i32,
    host: &HostContext,
    downward: &Downward,
    volume_paths: &HashMap<String, PathBuf>,
    objects: &Resolved,
) -> Result<api::ContainerConfig, SpecError> {
    let s = spec(pod);
    let envs = env(pod, c, host, downward, objects)?;
    let vars: BTreeMap<String, String> = envs
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect();
    let mut container_labels = pod_labels(pod, &host.node_name);
    container_labels.insert(labels::CONTAINER_NAME.into(), c.name.clone());
    container_labels.insert(labels::CONTAINER_INIT.into(), init.to_string());
    let grace = s.termination_grace_period_seconds.unwrap_or(30);
    let termination_path = c
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    let annotations = HashMap::from([
        (labels::CONTAINER_HASH.to_string(), container_hash(c)),
        (
            labels::CONTAINER_RESTART_COUNT.to_string(),
            restart_count.to_string(),
        ),
        (
            labels::CONTAINER_TERMINATION_MESSAGE_PATH.to_string(),
            termination_path,
        ),
        (
            labels::POD_TERMINATION_GRACE_PERIOD.to_string(),
            grace.to_string(),
        ),
    ]);
    let psc = s.security_context.clone().unwrap_or_default();
    let sc = c.security_context.clone().unwrap_or_default();
    let privileged = sc.privileged.unwrap_or(false);
    let caps = sc.capabilities.clone().unwrap_or_default();
    let security_context = api::LinuxContainerSecurityContext {
        capabilities: Some(api::Capability {
            add_capabilities: caps.add.unwrap_or_default(),
            drop_capabilities: caps.drop.unwrap_or_default(),
            ..Default::default()
        }),
        privileged,
        namespace_options: Some(namespace_options(&s)),
        run_as_user: sc
            .run_as_user
            .or(psc.run_as_user)
            .map(|value| api::Int64Value { value }),
        run_as_group: sc
            .run_as_group
            .or(psc.run_as_group)
            .map(|value| api::Int64Value { value }),
        readonly_rootfs: sc.read_only_root_filesystem.unwrap_or(false),
        supplemental_groups: psc.supplemental_groups.unwrap_or_default(),
        no_new_privs: sc.allow_privilege_escalation == Some(false),
        masked_paths: if privileged {
            vec![]
        } else {
            MASKED_PATHS.map(String::from).to_vec()
        },
        readonly_paths: if privileged {
            vec![]
        } else {
            READONLY_PATHS.map(String::from).to_vec()
        },
        ..Default::default()
    };
    Ok(api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: c.name.clone(),
            attempt: restart_count.max(0) as u32,
        }),
        image: Some(api::ImageSpec {
            image: c.image.clone().unwrap_or_default(),
            user_specified_image: c.image.clone().unwrap_or_default(),
            ..Default::default()
        }),
        command: c
            .command
            .iter()
            .flatten()
            .map(|a| expand(a, &vars))
            .collect(),
        args: c.args.iter().flatten().map(|a| expand(a, &vars)).collect(),
        working_dir: c.working_dir.clone().unwrap_or_default(),
        envs,
        mounts: mounts(c, volume_paths, &read_only_volumes(pod))?,
        labels: container_labels,
        annotations,
        log_path: log_path(&c.name, restart_count),
        stdin: c.stdin.unwrap_or(false),
        stdin_once: c.stdin_once.unwrap_or(false),
        tty: c.tty.unwrap_or(false),
        linux: Some(api::LinuxContainerConfig {
            resources: Some(resources(c, host.memory_capacity)?),
            security_context: Some(security_context),
        }),
        ..Default::default()
    })
}

/// kubelet's imagePullPolicy defaulting: `:latest` or no tag → Always.
pub fn pull_policy(c: &Container) -> &str {
    if let Some(p) = c.image_pull_policy.as_deref() {
        return p;
    }
    let image = c.image.as_deref().unwrap_or_default();
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, ResourceRequirements, VolumeMount};

    fn pod(yaml: &str) -> Pod {
        crate::yaml::from_str(yaml).unwrap()
    }

    fn web() -> Pod {
        pod(r#"
apiVersion: v1
kind: Pod
metadata: {name: web-node1, namespace: default, uid: u1, labels: {app: web}}
spec:
  containers:
  - name: c
    image: localhost:5000/busybox:1.36
    command: [sh, -c, "echo $(GREETING) $$HOME"]
    env:
    - {name: GREETING, value: hi}
    - name: POD
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    - name: IP
      valueFrom: {fieldRef: {fieldPath: status.podIP}}
    ports: [{containerPort: 80, hostPort: 8080}]
"#)
    }

    #[test]
    fn pull_policy_defaults_like_kubelet() {
        let cases = [
            ("busybox", "Always"),
            ("busybox:latest", "Always"),
            ("localhost:5000/busybox", "Always"),
            ("localhost:5000/busybox:1.36", "IfNotPresent"),
            ("busybox@sha256:abc", "IfNotPresent"),
        ];
        for (image, want) in cases {
            let c = Container {
                image: Some(image.into()),
                ..Default::default()
            };
            assert_eq!(pull_policy(&c), want, "{image}");
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_cpu_millis("500m"), Some(500));
        assert_eq!(parse_cpu_millis("2"), Some(2000));
        assert_eq!(parse_cpu_millis("0.25"), Some(250));
        assert_eq!(parse_bytes("64Mi"), Some(64 << 20));
        assert_eq!(parse_bytes("1G"), Some(1_000_000_000));
        assert_eq!(parse_bytes("1000"), Some(1000));
        assert_eq!(parse_bytes("x"), None);
    }

    #[test]
    fn resources_follow_kubelet_arithmetic() {
        let mut c = Container::default();
        let r = resources(&c, 1 << 30).unwrap();
        assert_eq!((r.cpu_shares, r.cpu_quota, r.oom_score_adj), (2, 0, 1000));
        c.resources = Some(ResourceRequirements {
            limits: Some(BTreeMap::from([
                ("cpu".into(), Quantity("250m".into())),
                ("memory".into(), Quantity("64Mi".into())),
            ])),
            ..Default::default()
        });
        let r = resources(&c, 1 << 30).unwrap();
        assert_eq!(r.cpu_shares, 256);
        assert_eq!((r.cpu_quota, r.cpu_period), (25_000, 100_000));
        assert_eq!(r.memory_limit_in_bytes, 64 << 20);
        assert_eq!(
            r.oom_score_adj, -997,
            "limits only → requests = limits → Guaranteed"
        );
        c.resources = Some(ResourceRequirements {
            requests: Some(BTreeMap::from([("memory".into(), Quantity("oops".into()))])),
            ..Default::default()
        });
        assert!(matches!(
            resources(&c, 1),
            Err(SpecError::BadQuantity { .. })
        ));
    }

    #[test]
    fn expand_matches_kubelet() {
        let vars = BTreeMap::from([("A".to_string(), "x".to_string())]);
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &vars), "x-$(B)-$(A)-$");
    }

    #[test]
    fn container_config_carries_kubelet_labels_env_and_log_path() {
        let p = web();
        let host = HostContext {
            node_name: "node1".into(),
            pod_logs_dir: "/var/log/pods".into(),
            ..Default::default()
        };
        let c = &p.spec.as_ref().unwrap().containers[0];
        let down = Downward {
            pod_ip: "10.1.2.3".into(),
        };
        let cfg = container_config(
            &p,
            c,
            false,
            3,
            &host,
            &down,
            &HashMap::new(),
            &Resolved::default(),
        )
        .unwrap();
        assert_eq!(cfg.log_path, "c/3.log");
        assert_eq!(cfg.labels[labels::POD_UID], "u1");
        assert_eq!(cfg.labels[labels::CONTAINER_NAME], "c");
        assert_eq!(cfg.annotations[labels::CONTAINER_RESTART_COUNT], "3");
        assert_eq!(cfg.command[2], "echo hi $HOME");
        let env: HashMap<_, _> = cfg
            .envs
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_str()))
            .collect();
        assert_eq!(env["POD"], "web-node1");
        assert_eq!(env["IP"], "10.1.2.3");
    }

    fn cm(data: &[(&str, &str)]) -> Option<std::sync::Arc<k8s_openapi::api::core::v1::ConfigMap>> {
        Some(std::sync::Arc::new(k8s_openapi::api::core::v1::ConfigMap {
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    fn secret(data: &[(&str, &str)]) -> Option<std::sync::Arc<k8s_openapi::api::core::v1::Secret>> {
        Some(std::sync::Arc::new(k8s_openapi::api::core::v1::Secret {
            data: Some(
                data.iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            k8s_openapi::ByteString(v.as_bytes().to_vec()),
                        )
                    })
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    fn env_of(p: &Pod, objects: &Resolved) -> Result<Vec<(String, String)>, SpecError> {
        let c = &p.spec.as_ref().unwrap().containers[0];
        let host = HostContext::default();
        Ok(env(p, c, &host, &Downward::default(), objects)?
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect())
    }

    #[test]
    fn env_from_objects_follows_kubelet_precedence_and_expansion() {
        let p = pod(r#"
metadata: {name: p, namespace: ns}
spec:
  containers:
  - name: c
    envFrom:
    - configMapRef: {name: base}
    - secretRef: {name: creds}
      prefix: S_
    - configMapRef: {name: absent, optional: true}
    env:
    - {name: MODE, value: "env-$(MODE)-$(S_PASS)"}
    - name: ONE
      valueFrom: {configMapKeyRef: {name: base, key: one}}
    - name: NOPE
      valueFrom: {configMapKeyRef: {name: base, key: nope, optional: true}}
    - name: PW
      valueFrom: {secretKeyRef: {name: creds, key: PASS}}
"#);
        let objects = Resolved {
            config_maps: BTreeMap::from([
                (
                    "base".to_string(),
                    cm(&[("MODE", "cm"), ("one", "1"), ("bad key", "x"), ("1st", "y")]),
                ),
                ("absent".to_string(), None),
            ]),
            secrets: BTreeMap::from([("creds".to_string(), secret(&[("PASS", "hunter2")]))]),
            ..Default::default()
        };
        let got = env_of(&p, &objects).unwrap();
        let want = [
            ("MODE", "env-cm-hunter2"),
            ("one", "1"),
            ("S_PASS", "hunter2"),
            ("ONE", "1"),
            ("PW", "hunter2"),
        ];
        assert_eq!(
            got,
            want.map(|(k, v)| (k.to_string(), v.to_string())).to_vec()
        );
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert_eq!(
            invalid_env_names(&p, c, &objects),
            [
                "Keys [1st, bad key] from the EnvFrom configMap ns/base were skipped since they are considered invalid environment variable names."
            ]
        );
    }

    #[test]
    fn a_missing_key_or_an_unfetched_object_is_an_error_in_kubelet_words() {
        let p = pod(r#"
metadata: {name: p, namespace: ns}
spec:
  containers:
  - name: c
    env:
    - name: K
      valueFrom: {secretKeyRef: {name: creds, key: k}}
"#);
        let empty = Resolved {
            secrets: BTreeMap::from([("creds".to_string(), secret(&[]))]),
            ..Default::default()
        };
        assert_eq!(
            env_of(&p, &empty).unwrap_err().to_string(),
            "couldn't find key k in Secret ns/creds"
        );
        assert!(matches!(
            env_of(&p, &Resolved::default()),
            Err(SpecError::Unresolved { .. })
        ));
        assert!(is_env_var_name("_a.b-c1") && !is_env_var_name("1a") && !is_env_var_name("a b"));
    }

    #[test]
    fn missing_volume_and_bad_subpath_are_errors() {
        let mut c = Container {
            name: "c".into(),
            volume_mounts: Some(vec![VolumeMount {
                name: "data".into(),
                mount_path: "/data".into(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert!(matches!(
            mounts(&c, &HashMap::new(), &Default::default()),
            Err(SpecError::MissingVolume { .. })
        ));
        let vols = HashMap::from([("data".to_string(), PathBuf::from("/v/data"))]);
        c.volume_mounts.as_mut().unwrap()[0].sub_path = Some("../x".into());
        assert!(matches!(
            mounts(&c, &vols, &Default::default()),
            Err(SpecError::BadSubPath { .. })
        ));
        c.volume_mounts.as_mut().unwrap()[0].sub_path = Some("sub".into());
        assert_eq!(
            mounts(&c, &vols, &Default::default()).unwrap()[0].host_path,
            "/v/data/sub"
        );
        assert!(!mounts(&c, &vols, &Default::default()).unwrap()[0].readonly);
        let p: Pod = crate::yaml::from_str(
            "spec:\n  containers: []\n  volumes: [{name: data, secret: {secretName: s}}]\n",
        )
        .unwrap();
        let ro = read_only_volumes(&p);
        assert!(
            mounts(&c, &vols, &ro).unwrap()[0].readonly,
            "API data volumes are read-only"
        );
    }

    #[test]
    fn sandbox_config_has_ports_dns_and_log_dir() {
        let p = web();
        let host = HostContext {
            node_name: "node1".into(),
            pod_logs_dir: "/var/log/pods".into(),
            resolv_conf: "nameserver 1.1.1.1\nsearch example.org\noptions ndots:2\n".into(),
            ..Default::default()
        };
        let sb = sandbox_config(&p, &host, 0);
        assert_eq!(sb.log_directory, "/var/log/pods/default_web-node1_u1");
        assert_eq!(sb.hostname, "web-node1");
        assert_eq!(sb.port_mappings.len(), 1);
        assert_eq!(sb.port_mappings[0].host_port, 8080);
        let dns = sb.dns_config.unwrap();
        assert_eq!(dns.servers, vec!["1.1.1.1"]);
        assert_eq!(dns.searches, vec!["example.org"]);
        assert_eq!(sb.labels["app"], "web");
        assert_eq!(sb.labels[labels::MANAGED_BY_NODE], "node1");

        let mut host_net = p.clone();
        host_net.spec.as_mut().unwrap().host_network = Some(true);
        let sb = sandbox_config(&host_net, &host, 0);
        assert_eq!(sb.hostname, "", "host network: the host's own hostname");
        let ns = sb
            .linux
            .unwrap()
            .security_context
            .unwrap()
            .namespace_options
            .unwrap();
        assert_eq!(ns.network, api::NamespaceMode::Node as i32);
    }

    #[test]
    fn sandbox_hash_ignores_container_images_but_not_ports() {
        let a = web();
        let mut b = web();
        b.spec.as_mut().unwrap().containers[0].image = Some("other".into());
        assert_eq!(sandbox_hash(&a), sandbox_hash(&b));
        b.spec.as_mut().unwrap().containers[0].ports = Some(vec![ContainerPort {
            container_port: 80,
            host_port: Some(9090),
            ..Default::default()
        }]);
        assert_ne!(sandbox_hash(&a), sandbox_hash(&b));
    }
}
