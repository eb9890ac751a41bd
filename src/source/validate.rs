//! Pod validation as the API server does it (kubelet applies the same
//! validation to static pods), plus what this node cannot run: a pod that
//! fails here never reaches a worker, and its errors are listed against the
//! file it came from.
//!
//! Errors read like the API server's (`field.Error`): a field path, then
//! `Required value`, `Invalid value: <value>: <why>`, `Duplicate value`,
//! `Unsupported value: <value>: supported values: ...`, `Not found` or
//! `Forbidden`, e.g. `spec.containers[0].image: Required value`. Checked:
//! metadata name and namespace, container (and init container) names,
//! images (present, and a well-formed reference as containerd parses it),
//! pull and restart policies, ports and host ports, volume mounts, volumes
//! (name, exactly one source, a kind minilet supports, hostPath), the grace
//! period and the active deadline. Not checked: fields minilet ignores
//! (resources, probes, security contexts...).
//!
//! Side effects: [`validate`] is pure; [`check_host_paths`] stats each
//! hostPath (to find symlink loops).

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::path::Path;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, Volume};

use crate::config::{is_dns1123_label, is_dns1123_subdomain};
use crate::volume::SUPPORTED_KINDS;

/// What is wrong with one field, as the API server words it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Absent or empty; the detail says what is expected, when useful.
    Required(Option<&'static str>),
    /// Present but wrong; `value` is shown as the API server shows it
    /// (strings quoted, numbers bare).
    Invalid { value: String, detail: String },
    /// The same value as an earlier field where values must differ.
    Duplicate(String),
    /// Not one of the values allowed here.
    NotSupported {
        value: String,
        supported: &'static [&'static str],
    },
    /// Refers to something that does not exist.
    NotFound(String),
    /// Not allowed here at all.
    Forbidden(String),
}

/// One invalid field of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path, e.g. `spec.containers[0].ports[1].hostPort`.
    pub path: String,
    pub reason: Reason,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = &self.path;
        match &self.reason {
            Reason::Required(None) => write!(f, "{path}: Required value"),
            Reason::Required(Some(detail)) => write!(f, "{path}: Required value: {detail}"),
            Reason::Invalid { value, detail } => {
                write!(f, "{path}: Invalid value: {value}: {detail}")
            }
            Reason::Duplicate(value) => write!(f, "{path}: Duplicate value: {value}"),
            Reason::NotSupported { value, supported } => {
                let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
                write!(
                    f,
                    "{path}: Unsupported value: {value}: supported values: {}",
                    list.join(", ")
                )
            }
            Reason::NotFound(value) => write!(f, "{path}: Not found: {value}"),
            Reason::Forbidden(detail) => write!(f, "{path}: Forbidden: {detail}"),
        }
    }
}

/// All of a pod's invalid fields, shown on one line (`; ` between them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldErrors(pub Vec<FieldError>);

/// At most this many errors are spelled out; the rest are counted.
const SHOWN: usize = 8;

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().take(SHOWN).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        if self.0.len() > SHOWN {
            write!(f, "; and {} more", self.0.len() - SHOWN)?;
        }
        Ok(())
    }
}

const RESTART_POLICIES: &[&str] = &["Always", "OnFailure", "Never"];
const PULL_POLICIES: &[&str] = &["Always", "IfNotPresent", "Never"];
const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];
const DNS_POLICIES: &[&str] = &["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"];
const TERMINATION_MESSAGE_POLICIES: &[&str] = &["File", "FallbackToLogsOnError"];
const INIT_RESTART_POLICIES: &[&str] = &["Always"];
const HOST_PATH_TYPES: &[&str] = &[
    "",
    "DirectoryOrCreate",
    "Directory",
    "FileOrCreate",
    "File",
    "Socket",
    "CharDevice",
    "BlockDevice",
];

const SUBDOMAIN_RULE: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com')";
const LABEL_RULE: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name', or '123-abc')";

/// Collects errors under a growing field path.
struct Check {
    errors: Vec<FieldError>,
}

impl Check {
    fn push(&mut self, path: impl Into<String>, reason: Reason) {
        self.errors.push(FieldError {
            path: path.into(),
            reason,
        });
    }

    fn invalid(&mut self, path: impl Into<String>, value: String, detail: impl Into<String>) {
        self.push(
            path,
            Reason::Invalid {
                value,
                detail: detail.into(),
            },
        );
    }

    fn one_of(&mut self, path: String, value: Option<&str>, supported: &'static [&'static str]) {
        if let Some(v) = value
            && !supported.contains(&v)
        {
            self.push(
                path,
                Reason::NotSupported {
                    value: quote(v),
                    supported,
                },
            );
        }
    }

    fn label(&mut self, path: String, value: &str) {
        if value.is_empty() {
            self.push(path, Reason::Required(None));
        } else if value.len() > 63 {
            self.invalid(path, quote(value), "must be no more than 63 characters");
        } else if !is_dns1123_label(value) {
            self.invalid(path, quote(value), LABEL_RULE);
        }
    }

    fn port(&mut self, path: String, port: i32, zero_ok: bool) {
        let allowed = (1..=65535).contains(&port) || (zero_ok && port == 0);
        if !allowed {
            self.invalid(
                path,
                port.to_string(),
                "must be between 1 and 65535, inclusive",
            );
        }
    }
}

fn quote(s: &str) -> String {
    format!("{s:?}")
}

const CONFIG_KEY_RULE: &str = "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')";

/// kube's `IsConfigMapKey` (Secret keys follow the same rule).
fn is_config_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
        && key != "."
        && key != ".."
        && !key.starts_with("..")
}

/// Validates a ConfigMap or Secret
/// from the manifest dir as the API server would its metadata (name a DNS
/// subdomain, namespace a DNS label) and its data keys; `keys` are the
/// field names (`data`, `binaryData`, `stringData`) with their keys. Empty
/// when valid.
pub fn validate_object(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    keys: &[(&str, Vec<&str>)],
) -> Vec<FieldError> {
    let mut c = Check { errors: Vec::new() };
    metadata(&mut c, meta);
    let mut seen = std::collections::BTreeSet::new();
    for (field, names) in keys {
        for k in names {
            if !is_config_key(k) {
                c.invalid(format!("{field}[{k}]"), quote(k), CONFIG_KEY_RULE);
            } else if *field != "stringData" && !seen.insert(*k) {
                c.push(format!("{field}[{k}]"), Reason::Duplicate(quote(k)));
            }
        }
    }
    c.errors
}

const RECLAIM_POLICIES: &[&str] = &["Delete", "Retain"];
const BINDING_MODES: &[&str] = &["Immediate", "WaitForFirstConsumer"];

/// Validates a StorageClass from the manifest dir as the API server does
/// (`ValidateStorageClass`): its name, a provisioner, and the policies a
/// class may name (Recycle is not one of them). Empty when valid.
pub fn validate_storage_class(sc: &k8s_openapi::api::storage::v1::StorageClass) -> Vec<FieldError> {
    let mut c = Check { errors: Vec::new() };
    metadata(&mut c, &sc.metadata);
    if sc
        .metadata
        .namespace
        .as_deref()
        .is_some_and(|ns| !ns.is_empty())
    {
        c.push(
            "metadata.namespace",
            Reason::Forbidden("not allowed on this type".into()),
        );
    }
    if sc.provisioner.is_empty() {
        c.push("provisioner", Reason::Required(None));
    } else if sc.provisioner.len() > 63 {
        c.invalid(
            "provisioner",
            quote(&sc.provisioner),
            "must be no more than 63 characters",
        );
    }
    for k in sc.parameters.iter().flatten().map(|(k, _)| k) {
        if k.is_empty() {
            c.push(
                "parameters",
                Reason::Invalid {
                    value: quote(k),
                    detail: "parameter keys must not be empty".into(),
                },
            );
        }
    }
    c.one_of(
        "reclaimPolicy".into(),
        sc.reclaim_policy.as_deref(),
        RECLAIM_POLICIES,
    );
    c.one_of(
        "volumeBindingMode".into(),
        sc.volume_binding_mode.as_deref(),
        BINDING_MODES,
    );
    c.errors
}

const ACCESS_MODES: &[&str] = &[
    "ReadOnlyMany",
    "ReadWriteMany",
    "ReadWriteOnce",
    "ReadWriteOncePod",
];
const VOLUME_MODES: &[&str] = &["Block", "Filesystem"];
const PV_RECLAIM_POLICIES: &[&str] = &["Delete", "Recycle", "Retain"];
/// The PersistentVolume sources (exactly one is required).
const PV_SOURCES: &[&str] = &[
    "awsElasticBlockStore",
    "azureDisk",
    "azureFile",
    "cephfs",
    "cinder",
    "csi",
    "fc",
    "flexVolume",
    "flocker",
    "gcePersistentDisk",
    "glusterfs",
    "hostPath",
    "iscsi",
    "local",
    "nfs",
    "photonPersistentDisk",
    "portworxVolume",
    "quobyte",
    "rbd",
    "scaleIO",
    "storageos",
    "vsphereVolume",
];

fn access_modes(c: &mut Check, modes: Option<&Vec<String>>) {
    let modes = modes.map(Vec::as_slice).unwrap_or_default();
    if modes.is_empty() {
        c.push(
            "spec.accessModes",
            Reason::Required(Some("at least 1 access mode is required")),
        );
    }
    for m in modes {
        c.one_of("spec.accessModes".into(), Some(m), ACCESS_MODES);
    }
}

fn storage_quantity(
    c: &mut Check,
    path: &str,
    q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
) {
    match q.map(|q| crate::cni::podnet::parse_quantity(&q.0)) {
        None => c.push(path, Reason::Required(None)),
        Some(Err(e)) => c.invalid(path, quote(&q.map(|q| q.0.clone()).unwrap_or_default()), e),
        Some(Ok(0)) => c.invalid(
            path,
            quote(&q.map(|q| q.0.clone()).unwrap_or_default()),
            "must be greater than zero",
        ),
        Some(Ok(_)) => {}
    }
}

/// Validates a PersistentVolumeClaim as the API server does
/// (`ValidatePersistentVolumeClaim`): metadata, access modes, a storage
/// request, the volume mode. Empty when valid.
pub fn validate_claim(pvc: &k8s_openapi::api::core::v1::PersistentVolumeClaim) -> Vec<FieldError> {
    let mut c = Check { errors: Vec::new() };
    metadata(&mut c, &pvc.metadata);
    let spec = pvc.spec.clone().unwrap_or_default();
    access_modes(&mut c, spec.access_modes.as_ref());
    let request = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"));
    storage_quantity(&mut c, "spec.resources[storage]", request);
    c.one_of(
        "spec.volumeMode".into(),
        spec.volume_mode.as_deref(),
        VOLUME_MODES,
    );
    c.errors
}

/// Validates a PersistentVolume as the API server does
/// (`ValidatePersistentVolume`): metadata, access modes, a storage
/// capacity, exactly one volume source, the reclaim policy. Empty when valid.
pub fn validate_volume(pv: &k8s_openapi::api::core::v1::PersistentVolume) -> Vec<FieldError> {
    let mut c = Check { errors: Vec::new() };
    metadata(&mut c, &pv.metadata);
    let spec = pv.spec.clone().unwrap_or_default();
    access_modes(&mut c, spec.access_modes.as_ref());
    let capacity = spec.capacity.as_ref().and_then(|m| m.get("storage"));
    storage_quantity(&mut c, "spec.capacity[storage]", capacity);
    let json = serde_json::to_value(&spec).unwrap_or_default();
    let sources = PV_SOURCES
        .iter()
        .filter(|k| json.get(**k).is_some_and(|v| !v.is_null()))
        .count();
    match sources {
        0 => c.push("spec", Reason::Required(Some("must specify a volume type"))),
        1 => {}
        _ => c.push(
            "spec",
            Reason::Forbidden("may not specify more than 1 volume type".into()),
        ),
    }
    c.one_of(
        "spec.persistentVolumeReclaimPolicy".into(),
        spec.persistent_volume_reclaim_policy.as_deref(),
        PV_RECLAIM_POLICIES,
    );
    c.one_of(
        "spec.volumeMode".into(),
        spec.volume_mode.as_deref(),
        VOLUME_MODES,
    );
    c.errors
}

fn metadata(c: &mut Check, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    let name = meta.name.as_deref().unwrap_or_default();
    if name.is_empty() {
        c.push(
            "metadata.name",
            Reason::Required(Some("name or generateName is required")),
        );
    } else if name.len() > 253 {
        c.invalid(
            "metadata.name",
            quote(name),
            "must be no more than 253 characters",
        );
    } else if !is_dns1123_subdomain(name) {
        c.invalid("metadata.name", quote(name), SUBDOMAIN_RULE);
    }
    if let Some(ns) = meta.namespace.as_deref() {
        c.label("metadata.namespace".into(), ns);
    }
}

/// Validates a pod as the API server would on create, and what minilet
/// cannot run (volume kinds). Empty when the pod is valid.
pub fn validate(pod: &Pod) -> Vec<FieldError> {
    let mut c = Check { errors: Vec::new() };
    metadata(&mut c, &pod.metadata);
    match &pod.spec {
        None => c.push("spec.containers", Reason::Required(None)),
        Some(spec) => validate_spec(&mut c, spec),
    }
    c.errors
}

fn validate_spec(c: &mut Check, spec: &PodSpec) {
    let volumes = spec.volumes.as_deref().unwrap_or_default();
    let volume_names = validate_volumes(c, volumes);

    if spec.containers.is_empty() {
        c.push("spec.containers", Reason::Required(None));
    }
    let init = spec.init_containers.as_deref().unwrap_or_default();
    let mut names = HashSet::new();
    let host_network = spec.host_network.unwrap_or(false);
    for (i, ctr) in init.iter().enumerate() {
        let path = format!("spec.initContainers[{i}]");
        validate_container(c, &path, ctr, &mut names, &volume_names, host_network);
        c.one_of(
            format!("{path}.restartPolicy"),
            ctr.restart_policy.as_deref(),
            INIT_RESTART_POLICIES,
        );
    }
    for (i, ctr) in spec.containers.iter().enumerate() {
        let path = format!("spec.containers[{i}]");
        validate_container(c, &path, ctr, &mut names, &volume_names, host_network);
        if ctr.restart_policy.is_some() {
            c.push(
                format!("{path}.restartPolicy"),
                Reason::Forbidden("may not be set for non-init containers".into()),
            );
        }
    }
    // The API server's checkHostPortConflicts: one hostIP/protocol/hostPort
    // per pod, over its (regular) containers.
    let mut host_ports = HashSet::new();
    for (i, ctr) in spec.containers.iter().enumerate() {
        for (j, p) in ctr.ports.iter().flatten().enumerate() {
            let port = p.host_port.unwrap_or(0);
            if port == 0 {
                continue;
            }
            let key = format!(
                "{}/{}/{port}",
                p.host_ip.as_deref().unwrap_or_default(),
                p.protocol.as_deref().unwrap_or("TCP")
            );
            if !host_ports.insert(key.clone()) {
                c.push(
                    format!("spec.containers[{i}].ports[{j}].hostPort"),
                    Reason::Duplicate(quote(&key)),
                );
            }
        }
    }

    c.one_of(
        "spec.restartPolicy".into(),
        spec.restart_policy.as_deref(),
        RESTART_POLICIES,
    );
    c.one_of(
        "spec.dnsPolicy".into(),
        spec.dns_policy.as_deref(),
        DNS_POLICIES,
    );
    if let Some(grace) = spec.termination_grace_period_seconds
        && grace < 0
    {
        c.invalid(
            "spec.terminationGracePeriodSeconds",
            grace.to_string(),
            "must be greater than or equal to 0",
        );
    }
    if let Some(deadline) = spec.active_deadline_seconds
        && !(1..=i64::from(i32::MAX)).contains(&deadline)
    {
        c.invalid(
            "spec.activeDeadlineSeconds",
            deadline.to_string(),
            "must be between 1 and 2147483647, inclusive",
        );
    }
}

/// Checks the volumes; returns the names of the valid ones, for mounts.
fn validate_volumes<'a>(c: &mut Check, volumes: &'a [Volume]) -> HashSet<&'a str> {
    let mut names = HashSet::new();
    for (i, v) in volumes.iter().enumerate() {
        let path = format!("spec.volumes[{i}]");
        let before = c.errors.len();
        c.label(format!("{path}.name"), &v.name);
        if c.errors.len() == before && !names.insert(v.name.as_str()) {
            c.push(format!("{path}.name"), Reason::Duplicate(quote(&v.name)));
        }
        let kinds = sources(v);
        match kinds.as_slice() {
            [] => c.push(
                path.clone(),
                Reason::Required(Some("must specify a volume type")),
            ),
            [kind] if !SUPPORTED_KINDS.contains(&kind.as_str()) => c.push(
                format!("{path}.{kind}"),
                Reason::NotSupported {
                    value: quote(kind),
                    supported: SUPPORTED_KINDS,
                },
            ),
            [_] => {}
            [_, extra, ..] => c.push(
                format!("{path}.{extra}"),
                Reason::Forbidden("may not specify more than 1 volume type".into()),
            ),
        }
        if let Some(hp) = &v.host_path {
            let path = format!("{path}.hostPath");
            if hp.path.is_empty() {
                c.push(format!("{path}.path"), Reason::Required(None));
            } else if !hp.path.starts_with('/') {
                c.invalid(
                    format!("{path}.path"),
                    quote(&hp.path),
                    "must be an absolute path",
                );
            } else if has_backsteps(&hp.path) {
                c.invalid(
                    format!("{path}.path"),
                    quote(&hp.path),
                    "must not contain '..'",
                );
            }
            c.one_of(format!("{path}.type"), hp.type_.as_deref(), HOST_PATH_TYPES);
        }
    }
    names
}

/// The source fields a volume sets (`emptyDir`, `nfs`...), as the API
/// names them: every field but `name`, read from its JSON form so that no
/// kind of the API can be missed.
fn sources(v: &Volume) -> Vec<String> {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter(|(k, v)| k != "name" && !v.is_null())
            .map(|(k, _)| k)
            .collect(),
        _ => Vec::new(),
    }
}

fn has_backsteps(path: &str) -> bool {
    path.split('/').any(|part| part == "..")
}

fn validate_container<'a>(
    c: &mut Check,
    path: &str,
    ctr: &'a Container,
    names: &mut HashSet<&'a str>,
    volumes: &HashSet<&str>,
    host_network: bool,
) {
    let before = c.errors.len();
    c.label(format!("{path}.name"), &ctr.name);
    // Names are unique across init and regular containers.
    if c.errors.len() == before && !names.insert(ctr.name.as_str()) {
        c.push(format!("{path}.name"), Reason::Duplicate(quote(&ctr.name)));
    }
    match ctr.image.as_deref() {
        None | Some("") => c.push(format!("{path}.image"), Reason::Required(None)),
        Some(image) if image.trim() != image => c.invalid(
            format!("{path}.image"),
            quote(image),
            "must not have leading or trailing whitespace",
        ),
        Some(image) => {
            if let Err(why) = check_image_reference(image) {
                c.invalid(format!("{path}.image"), quote(image), why);
            }
        }
    }
    c.one_of(
        format!("{path}.imagePullPolicy"),
        ctr.image_pull_policy.as_deref(),
        PULL_POLICIES,
    );
    c.one_of(
        format!("{path}.terminationMessagePolicy"),
        ctr.termination_message_policy.as_deref(),
        TERMINATION_MESSAGE_POLICIES,
    );

    let mut port_names = HashSet::new();
    for (j, p) in ctr.ports.iter().flatten().enumerate() {
        let path = format!("{path}.ports[{j}]");
        if let Some(name) = p.name.as_deref() {
            if let Err(why) = check_port_name(name) {
                c.invalid(format!("{path}.name"), quote(name), why);
            } else if !port_names.insert(name) {
                c.push(format!("{path}.name"), Reason::Duplicate(quote(name)));
            }
        }
        c.port(format!("{path}.containerPort"), p.container_port, false);
        if let Some(host) = p.host_port {
            c.port(format!("{path}.hostPort"), host, true);
            if host_network && host != 0 && host != p.container_port {
                c.invalid(
                    format!("{path}.hostPort"),
                    host.to_string(),
                    "must match `containerPort` when `hostNetwork` is true",
                );
            }
        }
        c.one_of(format!("{path}.protocol"), p.protocol.as_deref(), PROTOCOLS);
    }

    let mut mount_paths = HashSet::new();
    for (j, m) in ctr.volume_mounts.iter().flatten().enumerate() {
        let path = format!("{path}.volumeMounts[{j}]");
        if m.name.is_empty() {
            c.push(format!("{path}.name"), Reason::Required(None));
        } else if !volumes.contains(m.name.as_str()) {
            c.push(format!("{path}.name"), Reason::NotFound(quote(&m.name)));
        }
        if m.mount_path.is_empty() {
            c.push(format!("{path}.mountPath"), Reason::Required(None));
        } else if !mount_paths.insert(m.mount_path.as_str()) {
            c.invalid(
                format!("{path}.mountPath"),
                quote(&m.mount_path),
                "must be unique",
            );
        }
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            if sub.starts_with('/') {
                c.invalid(
                    format!("{path}.subPath"),
                    quote(sub),
                    "must be a relative path",
                );
            } else if has_backsteps(sub) {
                c.invalid(
                    format!("{path}.subPath"),
                    quote(sub),
                    "must not contain '..'",
                );
            }
        }
    }

    for (j, e) in ctr.env.iter().flatten().enumerate() {
        if e.name.is_empty() {
            c.push(format!("{path}.env[{j}].name"), Reason::Required(None));
        }
    }
}

/// An IANA service name, as port names must be: at most 15 characters of
/// lowercase letters, digits and '-', at least one letter, no "--", not
/// starting or ending with '-'.
fn check_port_name(name: &str) -> Result<(), &'static str> {
    if name.len() > 15 {
        return Err("must be no more than 15 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)");
    }
    if name.contains("--") {
        return Err("must not contain consecutive hyphens");
    }
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("must contain at least one letter (a-z)");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err("must not begin or end with a hyphen");
    }
    Ok(())
}

/// Whether `image` parses as a reference the way containerd parses it
/// (distribution's grammar: `[domain[:port]/]path[:tag][@digest]`, the
/// path lowercase). The API server only requires an image; a malformed
/// one would fail every pull (kubelet's InvalidImageName), so it is
/// refused here instead.
fn check_image_reference(image: &str) -> Result<(), &'static str> {
    const BAD: &str = "invalid reference format";
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        let (algo, hex) = digest.split_once(':').ok_or(BAD)?;
        let algo_ok = !algo.is_empty()
            && algo.split(['+', '.', '-', '_']).all(|part| {
                part.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                    && part.chars().all(|c| c.is_ascii_alphanumeric())
            });
        if !algo_ok || hex.len() < 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err("invalid reference format: invalid digest");
        }
    }
    // A tag follows the last ':' after the last '/' (a ':' before it is a
    // registry port).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        let first_ok = tag
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let rest_ok = tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !first_ok || !rest_ok || tag.len() > 128 {
            return Err("invalid reference format: invalid tag");
        }
    }
    if name.is_empty() {
        return Err(BAD);
    }
    if name.len() > 255 {
        return Err(
            "invalid reference format: repository name must not be more than 255 characters",
        );
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    // The first part is a registry when it looks like a host.
    if parts.len() > 1
        && (parts[0].contains(['.', ':'])
            || parts[0] == "localhost"
            || parts[0].chars().any(|c| c.is_ascii_uppercase()))
    {
        let domain = parts.remove(0);
        if !domain_ok(domain) {
            return Err(BAD);
        }
    }
    for part in parts {
        if part.chars().any(|c| c.is_ascii_uppercase()) {
            return Err("invalid reference format: repository name must be lowercase");
        }
        if !path_component_ok(part) {
            return Err(BAD);
        }
    }
    Ok(())
}

/// `host[:port]`: dot-separated labels of letters, digits and inner '-'
/// (or a bracketed IPv6 address), then an optional numeric port.
fn domain_ok(domain: &str) -> bool {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, port)) => {
                if v6.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                ("", port)
            }
            None => return false,
        }
    } else {
        match domain.split_once(':') {
            Some((host, _)) => (host, &domain[host.len()..]),
            None => (domain, ""),
        }
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    let host_ok = host.split('.').all(|label| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    });
    port_ok && (domain.starts_with('[') || host_ok)
}

/// `[a-z0-9]+` joined by one separator: '.', '_', "__", or any run of '-'.
fn path_component_ok(part: &str) -> bool {
    let b = part.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &part[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Node-side checks of each hostPath: the path must not run through a
/// symlink loop (it could never be mounted; kubelet would retry it
/// forever). A path that does not exist yet is fine (DirectoryOrCreate).
pub fn check_host_paths(pod: &Pod) -> Vec<FieldError> {
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or_default();
    let mut errors = Vec::new();
    for (i, v) in volumes.iter().enumerate() {
        let Some(hp) = &v.host_path else { continue };
        if !hp.path.starts_with('/') {
            continue;
        }
        if let Err(e) = Path::new(&hp.path).try_exists()
            && is_symlink_loop(&e)
        {
            errors.push(FieldError {
                path: format!("spec.volumes[{i}].hostPath.path"),
                reason: Reason::Invalid {
                    value: quote(&hp.path),
                    detail: "too many levels of symbolic links (a symlink loop)".into(),
                },
            });
        }
    }
    errors
}

fn is_symlink_loop(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid pod with `spec` (YAML, indented two spaces) in place of the
    /// default one.
    fn pod(spec: &str) -> Pod {
        crate::yaml::from_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: default\nspec:\n{spec}"
        ))
        .unwrap()
    }

    const C: &str = "  containers:\n  - name: main\n    image: busybox\n";

    #[test]
    fn a_valid_pod_has_no_errors() {
        let p = pod(&format!(
            "{C}    imagePullPolicy: IfNotPresent\n    ports: [{{name: http, containerPort: 80, hostPort: 8080, protocol: TCP}}]\n    volumeMounts: [{{name: data, mountPath: /data, subPath: a/b}}]\n  initContainers: [{{name: init, image: 'localhost:5000/a/b-c__d.e:v1.2_3', restartPolicy: Always}}]\n  volumes: [{{name: data, emptyDir: {{}}}}, {{name: host, hostPath: {{path: /tmp, type: Directory}}}}]\n  restartPolicy: OnFailure\n  terminationGracePeriodSeconds: 0\n"
        ));
        assert_eq!(validate(&p), []);
    }

    /// Each case: the spec, then every error expected, in order.
    #[test]
    fn invalid_pods_are_named_like_the_api_server_does() {
        let cases: &[(&str, String, &[&str])] = &[
            ("no containers", "  containers: []\n".into(), &["spec.containers: Required value"]),
            (
                "missing image",
                "  containers: [{name: main}]\n".into(),
                &["spec.containers[0].image: Required value"],
            ),
            (
                "empty image",
                "  containers: [{name: main, image: ''}]\n".into(),
                &["spec.containers[0].image: Required value"],
            ),
            (
                "image with spaces",
                "  containers: [{name: main, image: ' busybox'}]\n".into(),
                &["spec.containers[0].image: Invalid value: \" busybox\": must not have leading or trailing whitespace"],
            ),
            (
                "uppercase image",
                "  containers: [{name: main, image: Busybox}]\n".into(),
                &["spec.containers[0].image: Invalid value: \"Busybox\": invalid reference format: repository name must be lowercase"],
            ),
            (
                "malformed image",
                "  containers: [{name: main, image: 'busybox::latest'}]\n".into(),
                &["spec.containers[0].image: Invalid value: \"busybox::latest\": invalid reference format"],
            ),
            (
                "bad digest",
                "  containers: [{name: main, image: 'busybox@sha256:abc'}]\n".into(),
                &["spec.containers[0].image: Invalid value: \"busybox@sha256:abc\": invalid reference format: invalid digest"],
            ),
            (
                "negative grace period",
                format!("{C}  terminationGracePeriodSeconds: -1\n"),
                &["spec.terminationGracePeriodSeconds: Invalid value: -1: must be greater than or equal to 0"],
            ),
            (
                "zero active deadline",
                format!("{C}  activeDeadlineSeconds: 0\n"),
                &["spec.activeDeadlineSeconds: Invalid value: 0: must be between 1 and 2147483647, inclusive"],
            ),
            (
                "ports out of range",
                format!("{C}    ports: [{{containerPort: 0}}, {{containerPort: 70000, hostPort: -1}}]\n"),
                &[
                    "spec.containers[0].ports[0].containerPort: Invalid value: 0: must be between 1 and 65535, inclusive",
                    "spec.containers[0].ports[1].containerPort: Invalid value: 70000: must be between 1 and 65535, inclusive",
                    "spec.containers[0].ports[1].hostPort: Invalid value: -1: must be between 1 and 65535, inclusive",
                ],
            ),
            (
                "duplicate host ports across containers",
                "  containers:\n  - {name: a, image: x, ports: [{containerPort: 80, hostPort: 8080}]}\n  - {name: b, image: x, ports: [{containerPort: 81, hostPort: 8080, protocol: UDP}, {containerPort: 82, hostPort: 8080}]}\n".into(),
                &["spec.containers[1].ports[1].hostPort: Duplicate value: \"/TCP/8080\""],
            ),
            (
                "host network needs hostPort == containerPort",
                format!("{C}    ports: [{{containerPort: 80, hostPort: 8080}}]\n  hostNetwork: true\n"),
                &["spec.containers[0].ports[0].hostPort: Invalid value: 8080: must match `containerPort` when `hostNetwork` is true"],
            ),
            (
                "bad protocol and port names",
                format!("{C}    ports: [{{name: HTTP, containerPort: 80, protocol: tcp}}, {{name: web, containerPort: 81}}, {{name: web, containerPort: 82}}]\n"),
                &[
                    "spec.containers[0].ports[0].name: Invalid value: \"HTTP\": must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)",
                    "spec.containers[0].ports[0].protocol: Unsupported value: \"tcp\": supported values: \"SCTP\", \"TCP\", \"UDP\"",
                    "spec.containers[0].ports[2].name: Duplicate value: \"web\"",
                ],
            ),
            (
                "invalid policies",
                format!("{C}    imagePullPolicy: Sometimes\n  restartPolicy: Maybe\n  dnsPolicy: Mine\n"),
                &[
                    "spec.containers[0].imagePullPolicy: Unsupported value: \"Sometimes\": supported values: \"Always\", \"IfNotPresent\", \"Never\"",
                    "spec.restartPolicy: Unsupported value: \"Maybe\": supported values: \"Always\", \"OnFailure\", \"Never\"",
                    "spec.dnsPolicy: Unsupported value: \"Mine\": supported values: \"ClusterFirstWithHostNet\", \"ClusterFirst\", \"Default\", \"None\"",
                ],
            ),
            (
                "container restart policies",
                format!("{C}    restartPolicy: Always\n  initContainers: [{{name: i, image: x, restartPolicy: Never}}]\n"),
                &[
                    "spec.initContainers[0].restartPolicy: Unsupported value: \"Never\": supported values: \"Always\"",
                    "spec.containers[0].restartPolicy: Forbidden: may not be set for non-init containers",
                ],
            ),
            (
                "duplicate container names, init containers included",
                "  initContainers: [{name: a, image: x}]\n  containers: [{name: a, image: x}, {name: b, image: x}, {name: b, image: x}]\n".into(),
                &[
                    "spec.containers[0].name: Duplicate value: \"a\"",
                    "spec.containers[2].name: Duplicate value: \"b\"",
                ],
            ),
            (
                "bad container names",
                "  containers: [{name: '', image: x}, {name: A_b, image: x}]\n".into(),
                &[
                    "spec.containers[0].name: Required value",
                    "spec.containers[1].name: Invalid value: \"A_b\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name', or '123-abc')",
                ],
            ),
            (
                "duplicate volume names",
                format!("{C}  volumes: [{{name: d, emptyDir: {{}}}}, {{name: d, emptyDir: {{}}}}]\n"),
                &["spec.volumes[1].name: Duplicate value: \"d\""],
            ),
            (
                "a mount naming no volume, duplicate mount paths, bad subPath",
                format!("{C}    volumeMounts: [{{name: nope, mountPath: /a}}, {{name: d, mountPath: /a, subPath: ../x}}, {{name: d, mountPath: ''}}]\n  volumes: [{{name: d, emptyDir: {{}}}}]\n"),
                &[
                    "spec.containers[0].volumeMounts[0].name: Not found: \"nope\"",
                    "spec.containers[0].volumeMounts[1].mountPath: Invalid value: \"/a\": must be unique",
                    "spec.containers[0].volumeMounts[1].subPath: Invalid value: \"../x\": must not contain '..'",
                    "spec.containers[0].volumeMounts[2].mountPath: Required value",
                ],
            ),
            (
                "a volume with no source",
                format!("{C}  volumes: [{{name: d}}]\n"),
                &["spec.volumes[0]: Required value: must specify a volume type"],
            ),
            (
                "a volume with two sources",
                format!("{C}  volumes: [{{name: d, emptyDir: {{}}, hostPath: {{path: /tmp}}}}]\n"),
                &["spec.volumes[0].hostPath: Forbidden: may not specify more than 1 volume type"],
            ),
            (
                "volume kinds minilet does not support",
                format!("{C}  volumes: [{{name: a, nfs: {{server: s, path: /x}}}}, {{name: b, iscsi: {{targetPortal: t, iqn: q, lun: 0}}}}]\n"),
                &[
                    "spec.volumes[0].nfs: Unsupported value: \"nfs\": supported values: \"emptyDir\", \"hostPath\", \"secret\", \"configMap\", \"downwardAPI\", \"projected\", \"csi\", \"persistentVolumeClaim\"",
                    "spec.volumes[1].iscsi: Unsupported value: \"iscsi\": supported values: \"emptyDir\", \"hostPath\", \"secret\", \"configMap\", \"downwardAPI\", \"projected\", \"csi\", \"persistentVolumeClaim\"",
                ],
            ),
            (
                "hostPath not absolute, with backsteps, bad type",
                format!("{C}  volumes: [{{name: a, hostPath: {{path: data}}}}, {{name: b, hostPath: {{path: /a/../b, type: Folder}}}}, {{name: c, hostPath: {{path: ''}}}}]\n"),
                &[
                    "spec.volumes[0].hostPath.path: Invalid value: \"data\": must be an absolute path",
                    "spec.volumes[1].hostPath.path: Invalid value: \"/a/../b\": must not contain '..'",
                    "spec.volumes[1].hostPath.type: Unsupported value: \"Folder\": supported values: \"\", \"DirectoryOrCreate\", \"Directory\", \"FileOrCreate\", \"File\", \"Socket\", \"CharDevice\", \"BlockDevice\"",
                    "spec.volumes[2].hostPath.path: Required value",
                ],
            ),
            (
                "env without a name",
                format!("{C}    env: [{{name: '', value: x}}]\n"),
                &["spec.containers[0].env[0].name: Required value"],
            ),
        ];
        for (name, spec, want) in cases {
            let got: Vec<String> = validate(&pod(spec))
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(got, *want, "{name}");
        }
    }

    #[test]
    fn metadata_names_follow_the_dns_rules() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            (
                "",
                None,
                "metadata.name: Required value: name or generateName is required",
            ),
            (
                "Web_1",
                None,
                "metadata.name: Invalid value: \"Web_1\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com')",
            ),
            (
                "web",
                Some("a.b"),
                "metadata.namespace: Invalid value: \"a.b\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name', or '123-abc')",
            ),
        ];
        for (name, ns, want) in cases {
            let mut p = pod(C);
            p.metadata.name = Some(name.to_string());
            p.metadata.namespace = ns.map(str::to_string);
            let got: Vec<String> = validate(&p).iter().map(ToString::to_string).collect();
            assert_eq!(got, [*want], "{name}");
        }
        let mut p = pod(C);
        p.metadata.name = Some("a".repeat(254));
        assert!(
            validate(&p)[0]
                .to_string()
                .ends_with("must be no more than 253 characters")
        );
    }

    #[test]
    fn image_references() {
        for ok in [
            "busybox",
            "busybox:1.36",
            "library/busybox:latest",
            "localhost:5000/minilet/busybox:v1",
            "registry.example.com/a/b/c",
            "[::1]:5000/a",
            "a__b/c-d---e.f_g",
            "busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "busybox:1@sha256:0123456789abcdef0123456789abcdef",
            "Registry.Example.com/a",
        ] {
            assert_eq!(check_image_reference(ok), Ok(()), "{ok}");
        }
        for bad in [
            ":latest",
            "busybox:",
            "a//b",
            "a/",
            "-a",
            "a_-b",
            "a...b",
            "busybox:-x",
            "UPPER",
            "bad host:5000/a",
            "host:port/a",
            "a@sha256",
            "a@md5:xyz",
        ] {
            assert!(check_image_reference(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_host_path_through_a_symlink_loop_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::os::unix::fs::symlink(dir.path().join("b"), &a).unwrap();
        std::os::unix::fs::symlink(&a, dir.path().join("b")).unwrap();
        let p = pod(&format!(
            "{C}  volumes: [{{name: l, hostPath: {{path: '{}/x'}}}}, {{name: m, hostPath: {{path: '{}/missing'}}}}]\n",
            a.display(),
            dir.path().display()
        ));
        assert_eq!(validate(&p), []);
        let got: Vec<String> = check_host_paths(&p)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            [format!(
                "spec.volumes[0].hostPath.path: Invalid value: \"{}/x\": too many levels of symbolic links (a symlink loop)",
                a.display()
            )]
        );
    }

    #[test]
    fn many_errors_stay_on_one_line() {
        let errors = FieldErrors(
            (0..10)
                .map(|i| FieldError {
                    path: format!("f{i}"),
                    reason: Reason::Required(None),
                })
                .collect(),
        );
        let line = errors.to_string();
        assert!(line.starts_with("f0: Required value; f1: Required value"));
        assert!(line.ends_with("f7: Required value; and 2 more"), "{line}");
    }
}
