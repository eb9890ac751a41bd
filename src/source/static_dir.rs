//! The static pod source: the manifests in kubelet's `staticPodPath`.
//!
//! `scan` reads the directory once and returns the whole desired set (a
//! [`Snapshot`]); `watch` rescans on inotify events (debounced) and every
//! `fileCheckFrequency`, and publishes a snapshot whenever it differs.
//!
//! What is read, like kubelet: every `*.yaml`, `*.yml` and `*.json` file
//! directly in the directory (not recursive; dotfiles, other extensions and
//! sub-directories are ignored), each YAML document (`---`) one `v1` `Pod`,
//! or one `v1` `ConfigMap`, `Secret`, `PersistentVolumeClaim` or
//! `PersistentVolume`, or a `storage.k8s.io/v1` `StorageClass`, for the
//! pods to use (validated like pods: name a DNS subdomain, data keys valid
//! config keys, a class's provisioner and policies as the API server checks
//! them; a Secret's `stringData` folded
//! into `data` as the API server does). The objects travel in the
//! snapshot (`Snapshot::objects`, by file), good or bad with their file.
//!
//! Identity, like kubelet (pkg/kubelet/config/common.go): the pod is named
//! `<name>-<node>`, its namespace defaults to `default`, `spec.nodeName` is the
//! node, it tolerates every `NoExecute` taint, and it carries the annotations
//! `kubernetes.io/config.source: file`, `kubernetes.io/config.hash` and
//! `kubernetes.io/config.seen` (RFC 3339, when this version was first seen).
//! `kubernetes.io/config.mirror` is never set (removed if a manifest has it).
//!
//! **The one deliberate difference from kubelet: the UID.** kubelet derives
//! the UID from a hash of the whole pod, so any edit makes a new pod and the
//! whole pod (sandbox included) is recreated. minilet replaces only what an
//! edit changed, so the UID must survive edits: it is the hex MD5 of
//! `"host:" + node`, `"file:" + path` and `namespace + "/" + name` (the
//! final name). A `metadata.uid` in the manifest is ignored. What changes on
//! every edit is `kubernetes.io/config.hash`: the hex MD5 of the node, the
//! path and the pod's canonical JSON (as read from the file, before
//! defaulting). `config.seen` is kept for as long as the hash stays the same.
//!
//! Validation, like kubelet's for static pods: every pod is checked as the
//! API server would check it ([`super::validate`]) before it is published,
//! so a pod it would refuse never reaches a worker.
//!
//! Bounds: a file over [`MAX_MANIFEST_BYTES`] is not read; each document is
//! parsed within [`Limits::OBJECT`] (aliases expanded count against it, so
//! an alias bomb is one error after bounded work), its lists hold at most
//! [`MAX_LIST_ITEMS`] items (checked before it is decoded) and the pod is
//! at most [`MAX_POD_BYTES`] as JSON. A file is parsed in two linear
//! passes: the documents' heads (apiVersion, kind, list lengths), then the
//! pods.
//!
//! Bad input: each bad file gives one [`SourceError`] naming the file and the
//! position (line/column, or the document index: the Nth non-empty
//! document; a leading `---` or a document of only comments is not
//! counted). A file is good or
//! bad as a whole; a bad file keeps its *last good version* (its pods from
//! the previous snapshot), other files are unaffected. A deleted file drops
//! its pods; an empty file is bad (it is what a truncate-then-write looks
//! like halfway), so it keeps them. The same pod (namespace/name) in two files is an error on the
//! later file in path order; the earlier one keeps the pod. A directory that
//! cannot be listed (missing, permissions) keeps every previous pod, as
//! kubelet does: deleting the directory is not a way to stop pods.
//!
//! Side effects: reads the directory and its files; `watch` holds an inotify
//! watch on the directory and logs (tracing).

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Toleration,
};
use k8s_openapi::api::storage::v1::StorageClass;
use md5::{Digest, Md5};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch as tokio_watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::validate::{self, FieldErrors};
use super::{DesiredPod, Snapshot, SourceError};
use crate::objects::Objects;
use crate::yaml::{self, Document, Limits, Text};

/// kubelet's annotation naming the source of a pod (`file` here).
pub const CONFIG_SOURCE_ANNOTATION: &str = "kubernetes.io/config.source";
/// kubelet's annotation holding the hash of the pod's configuration.
pub const CONFIG_HASH_ANNOTATION: &str = "kubernetes.io/config.hash";
/// kubelet's annotation holding when this version of the pod was first seen.
pub const CONFIG_SEEN_ANNOTATION: &str = "kubernetes.io/config.seen";
/// kubelet's annotation marking a mirror pod; never set on a static pod.
pub const CONFIG_MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Larger manifests are refused before being read.
pub const MAX_MANIFEST_BYTES: u64 = 10 * 1024 * 1024;
/// Longer lists in a pod are refused before the pod is decoded: a list
/// item can cost a thousand times its text (an empty container, `{}`, is
/// 2 KiB), so this bounds the memory a pod takes. Twice the largest pods
/// tried (a thousand containers).
pub const MAX_LIST_ITEMS: usize = 2048;
/// Files with more documents are refused: every pod of a file is held at
/// once (a few KiB each, from 60 bytes of text), and no node runs more
/// than a few hundred.
pub const MAX_DOCUMENTS: usize = 4096;
/// Larger pods (as JSON) are refused: etcd's default request limit, so no
/// pod the API server could store is refused.
pub const MAX_POD_BYTES: usize = 1536 * 1024;

/// Quiet time after the last event before rescanning (coalesces the
/// write/rename bursts of editors).
const DEBOUNCE: Duration = Duration::from_millis(100);
/// A burst that never goes quiet still gets a rescan this soon after its
/// first event, so a change is applied within a second.
const MAX_DEBOUNCE: Duration = Duration::from_millis(500);
/// How often a missing (or unwatchable) directory is looked for.
const DIR_POLL: Duration = Duration::from_secs(1);

/// What is wrong with one manifest file. Shown to people as one line (the
/// causes joined with ": ") in a [`SourceError`].
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The path is a symlink chain that loops (ELOOP).
    #[error("symlink loop")]
    SymlinkLoop,
    /// The path is a symlink whose target does not exist.
    #[error("symlink to a missing file")]
    DanglingSymlink,
    /// A FIFO, socket or device: never opened (a FIFO would block).
    #[error("not a regular file")]
    NotRegularFile,
    /// Over [`MAX_MANIFEST_BYTES`].
    #[error("file is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: u64, limit: u64 },
    /// Cannot stat, open or read the file (permission denied...).
    #[error("cannot read the file")]
    Read {
        #[source]
        source: io::Error,
    },
    /// Bytes that are not UTF-8.
    #[error("not UTF-8 text")]
    NotUtf8,
    /// YAML syntax or type error; the cause carries line and column.
    #[error("document {doc}: invalid YAML")]
    Yaml {
        doc: usize,
        #[source]
        source: yaml::Error,
    },
    /// JSON syntax or type error; the cause carries line and column.
    #[error("invalid JSON")]
    Json {
        #[source]
        source: serde_json::Error,
    },
    /// No document at all (empty, or only comments). Treated as bad rather
    /// than as "no pods": an editor or `cat >` truncating the file before
    /// writing it must not stop its pods. Deleting the file removes them.
    #[error("no pod in the file (delete the file to remove its pods)")]
    Empty,
    /// The two passes over a file's text saw different documents (cannot
    /// happen: both read the same text under the same bounds).
    #[error("the documents changed between two reads of the same text")]
    DocumentsChanged,
    /// A document that is not a mapping.
    #[error("document {doc}: not a mapping")]
    NotAMapping { doc: usize },
    /// A document that is not a `v1` `Pod` (or an object pods use).
    #[error("document {doc}: apiVersion {} kind {} is not a v1 Pod (or ConfigMap, Secret, PersistentVolumeClaim, PersistentVolume; or a storage.k8s.io/v1 StorageClass)", show(.api_version), show(.kind))]
    NotAPod {
        doc: usize,
        api_version: Option<String>,
        kind: Option<String>,
    },
    /// A Pod whose fields have the wrong types.
    #[error("document {doc}: invalid Pod")]
    InvalidPod {
        doc: usize,
        #[source]
        source: yaml::Error,
    },
    /// A ConfigMap, Secret, claim or volume whose fields have the wrong types.
    #[error("document {doc}: invalid {kind}")]
    InvalidObject {
        doc: usize,
        kind: &'static str,
        #[source]
        source: yaml::Error,
    },
    /// A ConfigMap, Secret, claim or volume the API server would refuse.
    #[error("document {doc}: {kind} {name} is invalid: {errors}")]
    BadObject {
        doc: usize,
        kind: &'static str,
        name: String,
        errors: FieldErrors,
    },
    /// The same object in an earlier file (path order), which keeps it.
    #[error("document {doc}: {kind} {name} is already defined by {other}")]
    DuplicateObject {
        doc: usize,
        kind: &'static str,
        name: String,
        other: String,
    },
    /// `metadata.name` absent or empty.
    #[error("document {doc}: metadata.name is missing")]
    MissingName { doc: usize },
    /// Fields the API server would refuse, or that this node cannot run
    /// (see [`validate`]), all of them on one line.
    #[error("document {doc}: pod {pod} is invalid: {errors}")]
    Invalid {
        doc: usize,
        pod: String,
        errors: FieldErrors,
    },
    /// A document that expands (aliases included) past what one pod may
    /// be ([`Limits::OBJECT`]): refused before it is decoded.
    #[error("document {doc}: too large once expanded (aliases included)")]
    OverLimits {
        doc: usize,
        #[source]
        source: yaml::Error,
    },
    /// More than [`MAX_DOCUMENTS`] documents (reading stopped there).
    #[error("more than {limit} documents in one file")]
    TooManyDocuments { limit: usize },
    /// A list over [`MAX_LIST_ITEMS`] items.
    #[error("document {doc}: a list of {items} items, over the {limit}-item limit")]
    ListTooLong {
        doc: usize,
        items: usize,
        limit: usize,
    },
    /// A decoded pod over [`MAX_POD_BYTES`] as JSON.
    #[error("document {doc}: pod {pod} is {size} bytes as JSON, over the {limit}-byte limit")]
    PodTooLarge {
        doc: usize,
        pod: String,
        size: usize,
        limit: usize,
    },
    /// The same pod twice in one file.
    #[error("document {doc}: pod {pod} is also document {first}")]
    DuplicateInFile {
        doc: usize,
        pod: String,
        first: usize,
    },
    /// The same pod in an earlier file (path order), which keeps it.
    #[error("document {doc}: pod {pod} is already defined by {other}")]
    DuplicateAcrossFiles {
        doc: usize,
        pod: String,
        other: String,
    },
}

fn show(v: &Option<String>) -> String {
    v.as_ref()
        .map_or_else(|| "(missing)".to_string(), |s| format!("{s:?}"))
}

/// An error and its causes on one line.
fn one_line(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}

/// Reads `dir` once and returns every static pod it defines. `previous` is
/// the last snapshot: it supplies the last good version of files that went
/// bad, and `config.seen` of pods that did not change.
pub fn scan(dir: &Path, node_name: &str, previous: &Snapshot) -> Snapshot {
    scan_at(dir, node_name, previous, jiff::Timestamp::now())
}

fn scan_at(dir: &Path, node_name: &str, previous: &Snapshot, now: jiff::Timestamp) -> Snapshot {
    let files = match list_manifests(dir) {
        Ok(files) => files,
        Err(e) => {
            let message = match e.kind() {
                io::ErrorKind::NotFound => "directory does not exist".to_string(),
                _ => format!("cannot list the directory: {e}"),
            };
            return Snapshot {
                pods: previous.pods.clone(),
                errors: vec![SourceError {
                    file: dir.display().to_string(),
                    message: format!("{message}; keeping the previous pods"),
                }],
                ..Default::default()
            };
        }
    };

    let mut by_source: HashMap<&str, Vec<&Arc<DesiredPod>>> = HashMap::new();
    for pod in previous.pods.values() {
        by_source.entry(pod.source.as_str()).or_default().push(pod);
    }
    let seen = now.to_string();
    let mut out = Snapshot::default();
    // namespace/name -> file that has it; the first file in path order wins.
    let mut claimed: HashMap<String, String> = HashMap::new();
    // kind/namespace/name of objects -> file, likewise.
    let mut claimed_objects: HashMap<String, String> = HashMap::new();

    for path in files {
        let source = path.display().to_string();
        let result = read_manifest(&path).and_then(|read| {
            let Some(docs) = read else { return Ok(None) };
            let n = docs.len();
            let mut raw_pods = Vec::new();
            let mut objects = Vec::new();
            for (doc, d) in docs {
                match d {
                    Doc::Pod(p) => raw_pods.push((doc, p)),
                    Doc::Object(o) => objects.push((doc, *o)),
                }
            }
            let pods = raw_pods
                .into_iter()
                .map(|(doc, raw)| {
                    static_pod(raw, doc, &source, node_name, &seen, previous).map(|p| (doc, p))
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| (e, n))?;
            check_duplicates(&pods, &claimed).map_err(|e| (e, n))?;
            let objects = file_objects(objects, &claimed_objects).map_err(|e| (e, n))?;
            Ok(Some((pods, objects)))
        });
        match result {
            // Not a manifest after all (a directory named foo.yaml, or
            // removed since the listing).
            Ok(None) => {}
            Ok(Some((pods, objects))) => {
                for (_, pod) in pods {
                    claimed.insert(pod_key(&pod.pod), source.clone());
                    out.pods.insert(pod.uid().to_string(), pod);
                }
                if objects != Objects::default() {
                    for key in object_keys(&objects) {
                        claimed_objects.insert(key, source.clone());
                    }
                    out.objects.insert(source.clone(), objects);
                }
            }
            Err((err, docs)) => {
                let last_good = by_source.get(source.as_str());
                let had_objects = previous.objects.contains_key(&source);
                let mut message = one_line(&err);
                if docs > 1 {
                    message.push_str(&format!("; the whole file ({docs} documents) is rejected"));
                }
                if last_good.is_some() || had_objects {
                    message.push_str("; keeping its last good version");
                }
                out.errors.push(SourceError {
                    file: source.clone(),
                    message,
                });
                for pod in last_good.into_iter().flatten() {
                    let key = pod_key(&pod.pod);
                    if let Entry::Vacant(slot) = claimed.entry(key) {
                        slot.insert(source.clone());
                        out.pods.insert(pod.uid().to_string(), Arc::clone(pod));
                    }
                }
                if let Some(objects) = previous.objects.get(&source) {
                    let keys = object_keys(objects);
                    if keys.iter().all(|k| !claimed_objects.contains_key(k)) {
                        for key in keys {
                            claimed_objects.insert(key, source.clone());
                        }
                        out.objects.insert(source.clone(), objects.clone());
                    }
                }
            }
        }
    }
    out
}

/// The manifest candidates in `dir`, sorted by path.
fn list_manifests(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_manifest_name(name) {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Whether a file name is read as a manifest: not a dotfile (editor swap
/// files, kubelet's rule), and a .yaml, .yml or .json extension.
fn is_manifest_name(name: &str) -> bool {
    if name.starts_with('.') {
        return false;
    }
    let Some((_, ext)) = name.rsplit_once('.') else {
        return false;
    };
    ["yaml", "yml", "json"]
        .iter()
        .any(|e| ext.eq_ignore_ascii_case(e))
}

/// Error of a whole file and its document count (for the message).
type FileError = (ManifestError, usize);

/// Reads and parses one file into (document index, raw pod) pairs; `None`
/// when the path is not a file to read (a directory, or gone).
fn read_manifest(path: &Path) -> Result<Option<Vec<(usize, Doc)>>, FileError> {
    let text = match read_text(path) {
        Ok(Some(text)) => text,
        Ok(None) => return Ok(None),
        Err(e) => return Err((e, 1)),
    };
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_json {
        parse_json(&text).map(Some)
    } else {
        parse_yaml(&text).map(Some)
    }
}

fn read_text(path: &Path) -> Result<Option<String>, ManifestError> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) => return stat_error(path, e),
    };
    if meta.is_dir() {
        tracing::debug!(path = %path.display(), "ignoring a directory in the static pod directory");
        return Ok(None);
    }
    if !meta.is_file() {
        return Err(ManifestError::NotRegularFile);
    }
    let limit = MAX_MANIFEST_BYTES;
    if meta.len() > limit {
        return Err(ManifestError::TooLarge {
            size: meta.len(),
            limit,
        });
    }
    let mut bytes = Vec::new();
    let read = fs::File::open(path).and_then(|f| f.take(limit + 1).read_to_end(&mut bytes));
    match read {
        Ok(_) if bytes.len() as u64 > limit => Err(ManifestError::TooLarge {
            size: bytes.len() as u64,
            limit,
        }),
        Ok(_) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| ManifestError::NotUtf8),
        // Removed between the listing and now: as if never listed.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(read_error(e)),
    }
}

/// Classifies a failed `stat` (which follows symlinks).
fn stat_error(path: &Path, e: io::Error) -> Result<Option<String>, ManifestError> {
    if e.kind() == io::ErrorKind::NotFound {
        // A dangling symlink is a mistake to report; a plain file removed
        // since the listing is just gone.
        return match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => Err(ManifestError::DanglingSymlink),
            _ => Ok(None),
        };
    }
    Err(read_error(e))
}

fn read_error(e: io::Error) -> ManifestError {
    if e.raw_os_error() == Some(libc::ELOOP) {
        ManifestError::SymlinkLoop
    } else {
        ManifestError::Read { source: e }
    }
}

fn parse_json(text: &str) -> Result<Vec<(usize, Doc)>, FileError> {
    // Syntax first, with serde_json's messages and in constant memory; then
    // the pod is decoded as YAML (JSON is YAML), under the same bounds.
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map_err(|source| (ManifestError::Json { source }, 1))?;
    parse_yaml(text)
}

fn parse_yaml(text: &str) -> Result<Vec<(usize, Doc)>, FileError> {
    // Two passes, each linear: the first reads only each document's top
    // level (syntax, bounds, apiVersion and kind), so the document count is
    // known for the message even when an early document is bad, and a
    // Deployment is named as such rather than as a Pod with bad fields; the
    // second decodes the pods, with line/column on type errors.
    let heads = yaml::documents::<Document<Text>>(text, Limits::OBJECT, MAX_DOCUMENTS);
    if heads.len() > MAX_DOCUMENTS {
        let limit = MAX_DOCUMENTS;
        // Counted as one: the true count was not read.
        return Err((ManifestError::TooManyDocuments { limit }, 1));
    }
    let n = heads.len();
    let mut checked = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    for (i, head) in heads.into_iter().enumerate() {
        match head {
            Ok(head) => checked.push(head),
            Err(source) => return Err((yaml_error(i + 1, source), i + 1)),
        }
    }
    if n == 0 {
        return Err((ManifestError::Empty, 1));
    }
    // Every head is checked before any pod is decoded: a list too long to
    // decode must never be.
    for (i, head) in checked.iter().enumerate() {
        let doc = i + 1;
        if head.entries().is_none() {
            return Err((ManifestError::NotAMapping { doc }, n));
        }
        let field = |k: &str| head.field(k).map(str::to_string);
        kinds.push(check_kind(doc, field("apiVersion"), field("kind")).map_err(|e| (e, n))?);
        let items = head.longest_list();
        if items > MAX_LIST_ITEMS {
            let limit = MAX_LIST_ITEMS;
            return Err((ManifestError::ListTooLong { doc, items, limit }, n));
        }
    }
    let mut out: Vec<Option<Doc>> = (0..n).map(|_| None).collect();
    // One pass per kind present, each decoding only its own documents'
    // errors (a ConfigMap does not decode as a Pod): at most five linear
    // passes, one for a file of pods only.
    decode(text, &kinds, DocKind::Pod, &mut out, Doc::Pod)?;
    decode(text, &kinds, DocKind::ConfigMap, &mut out, |o| {
        Doc::Object(Box::new(ObjectDoc::ConfigMap(o)))
    })?;
    decode(text, &kinds, DocKind::Secret, &mut out, |o| {
        Doc::Object(Box::new(ObjectDoc::Secret(o)))
    })?;
    decode(text, &kinds, DocKind::Claim, &mut out, |o| {
        Doc::Object(Box::new(ObjectDoc::Claim(o)))
    })?;
    decode(text, &kinds, DocKind::Volume, &mut out, |o| {
        Doc::Object(Box::new(ObjectDoc::Volume(Box::new(o))))
    })?;
    decode(text, &kinds, DocKind::Class, &mut out, |o| {
        Doc::Object(Box::new(ObjectDoc::Class(o)))
    })?;
    let out: Vec<(usize, Doc)> = out
        .into_iter()
        .enumerate()
        .filter_map(|(i, d)| d.map(|d| (i + 1, d)))
        .collect();
    // Every pass reads the same text under the same bounds.
    if out.len() != n {
        return Err((ManifestError::DocumentsChanged, n));
    }
    Ok(out)
}

/// Decode the documents of one kind into their slots.
fn decode<T: serde::de::DeserializeOwned>(
    text: &str,
    kinds: &[DocKind],
    kind: DocKind,
    out: &mut [Option<Doc>],
    wrap: impl Fn(T) -> Doc,
) -> Result<(), FileError> {
    let n = kinds.len();
    if !kinds.contains(&kind) {
        return Ok(());
    }
    for (i, got) in yaml::documents::<T>(text, Limits::OBJECT, n)
        .into_iter()
        .enumerate()
    {
        if kinds.get(i) != Some(&kind) {
            continue;
        }
        let doc = i + 1;
        match got {
            Ok(o) => out[i] = Some(wrap(o)),
            Err(source) if source.is_over_limit() => {
                return Err((ManifestError::OverLimits { doc, source }, n));
            }
            Err(source) if kind == DocKind::Pod => {
                return Err((ManifestError::InvalidPod { doc, source }, n));
            }
            Err(source) => {
                let kind = kind.name();
                return Err((ManifestError::InvalidObject { doc, kind, source }, n));
            }
        }
    }
    Ok(())
}

/// The kinds a manifest document may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DocKind {
    Pod,
    ConfigMap,
    Secret,
    Claim,
    Volume,
    Class,
}

impl DocKind {
    fn name(self) -> &'static str {
        match self {
            DocKind::Pod => "Pod",
            DocKind::ConfigMap => "ConfigMap",
            DocKind::Secret => "Secret",
            DocKind::Claim => "PersistentVolumeClaim",
            DocKind::Volume => "PersistentVolume",
            DocKind::Class => "StorageClass",
        }
    }
}

/// One decoded document (held only while its file is checked, so the
/// variants' sizes do not matter).
#[allow(clippy::large_enum_variant)]
enum Doc {
    Pod(Pod),
    Object(Box<ObjectDoc>),
}

#[allow(clippy::large_enum_variant)]
enum ObjectDoc {
    ConfigMap(ConfigMap),
    Secret(Secret),
    Claim(PersistentVolumeClaim),
    Volume(Box<PersistentVolume>),
    Class(StorageClass),
}

fn keys<'a, V>(
    field: &'static str,
    m: &'a Option<BTreeMap<String, V>>,
) -> (&'static str, Vec<&'a str>) {
    (field, m.iter().flatten().map(|(k, _)| k.as_str()).collect())
}

/// Validate a file's objects, default their namespace, fold a Secret's
/// stringData into data, and refuse names an earlier file defines.
fn file_objects(
    docs: Vec<(usize, ObjectDoc)>,
    claimed: &HashMap<String, String>,
) -> Result<Objects, ManifestError> {
    let mut out = Objects::default();
    for (doc, o) in docs {
        let (kind, meta, errors) = match &o {
            ObjectDoc::ConfigMap(c) => (
                "ConfigMap",
                &c.metadata,
                validate::validate_object(
                    &c.metadata,
                    &[keys("data", &c.data), keys("binaryData", &c.binary_data)],
                ),
            ),
            ObjectDoc::Secret(s) => (
                "Secret",
                &s.metadata,
                validate::validate_object(
                    &s.metadata,
                    &[keys("data", &s.data), keys("stringData", &s.string_data)],
                ),
            ),
            ObjectDoc::Claim(c) => (
                "PersistentVolumeClaim",
                &c.metadata,
                validate::validate_claim(c),
            ),
            ObjectDoc::Volume(v) => (
                "PersistentVolume",
                &v.metadata,
                validate::validate_volume(v),
            ),
            ObjectDoc::Class(sc) => (
                "StorageClass",
                &sc.metadata,
                validate::validate_storage_class(sc),
            ),
        };
        let name = meta.name.clone().unwrap_or_default();
        if !errors.is_empty() {
            return Err(ManifestError::BadObject {
                doc,
                kind,
                name,
                errors: FieldErrors(errors),
            });
        }
        let namespace = match &o {
            ObjectDoc::Volume(_) | ObjectDoc::Class(_) => String::new(),
            _ => meta
                .namespace
                .clone()
                .filter(|ns| !ns.is_empty())
                .unwrap_or_else(|| "default".into()),
        };
        let key = (namespace.clone(), name.clone());
        let claim = format!("{kind}/{namespace}/{name}");
        if let Some(other) = claimed.get(&claim) {
            return Err(ManifestError::DuplicateObject {
                doc,
                kind,
                name,
                other: other.clone(),
            });
        }
        let ns = (!namespace.is_empty()).then_some(namespace);
        match o {
            ObjectDoc::ConfigMap(mut c) => {
                c.metadata.namespace = ns;
                out.config_maps.insert(key, Arc::new(c));
            }
            ObjectDoc::Secret(mut s) => {
                s.metadata.namespace = ns;
                // The API server folds stringData into data (it wins).
                if let Some(strings) = s.string_data.take() {
                    let data = s.data.get_or_insert_with(BTreeMap::new);
                    for (k, v) in strings {
                        data.insert(k, ByteString(v.into_bytes()));
                    }
                }
                if s.type_.is_none() {
                    s.type_ = Some("Opaque".into());
                }
                out.secrets.insert(key, Arc::new(s));
            }
            ObjectDoc::Claim(mut c) => {
                c.metadata.namespace = ns;
                out.claims.insert(key, Arc::new(c));
            }
            ObjectDoc::Volume(v) => {
                out.volumes.insert(key, Arc::new(*v));
            }
            ObjectDoc::Class(mut sc) => {
                sc.metadata.namespace = None;
                out.classes.insert(key, Arc::new(sc));
            }
        }
    }
    Ok(out)
}

/// The claim keys (`Kind/namespace/name`) of a file's objects.
fn object_keys(o: &Objects) -> Vec<String> {
    let each = |kind: &str, m: Vec<&(String, String)>| -> Vec<String> {
        m.into_iter()
            .map(|(ns, name)| format!("{kind}/{ns}/{name}"))
            .collect()
    };
    [
        each("ConfigMap", o.config_maps.keys().collect()),
        each("Secret", o.secrets.keys().collect()),
        each("PersistentVolumeClaim", o.claims.keys().collect()),
        each("PersistentVolume", o.volumes.keys().collect()),
        each("StorageClass", o.classes.keys().collect()),
    ]
    .concat()
}

fn yaml_error(doc: usize, source: yaml::Error) -> ManifestError {
    if source.is_over_limit() {
        ManifestError::OverLimits { doc, source }
    } else {
        ManifestError::Yaml { doc, source }
    }
}

fn check_kind(
    doc: usize,
    api_version: Option<String>,
    kind: Option<String>,
) -> Result<DocKind, ManifestError> {
    let known = match kind.as_deref() {
        Some("Pod") => Some(DocKind::Pod),
        Some("ConfigMap") => Some(DocKind::ConfigMap),
        Some("Secret") => Some(DocKind::Secret),
        Some("PersistentVolumeClaim") => Some(DocKind::Claim),
        Some("PersistentVolume") => Some(DocKind::Volume),
        Some("StorageClass") => Some(DocKind::Class),
        _ => None,
    };
    let group_version = match known {
        Some(DocKind::Class) => "storage.k8s.io/v1",
        _ => "v1",
    };
    match known {
        Some(k) if api_version.as_deref() == Some(group_version) => Ok(k),
        _ => Err(ManifestError::NotAPod {
            doc,
            api_version,
            kind,
        }),
    }
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

fn hex_md5(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Validates one raw pod and gives it its static identity (see the module
/// header). Reuses the previous `DesiredPod` when its hash is unchanged.
fn static_pod(
    raw: Pod,
    doc: usize,
    source: &str,
    node_name: &str,
    seen: &str,
    previous: &Snapshot,
) -> Result<Arc<DesiredPod>, ManifestError> {
    let name = match raw.metadata.name.as_deref() {
        None | Some("") => return Err(ManifestError::MissingName { doc }),
        Some(n) => n.to_string(),
    };
    let full_name = format!("{name}-{node_name}");
    let namespace = raw
        .metadata
        .namespace
        .clone()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let key = format!("{namespace}/{full_name}");

    let canonical = serde_json::to_vec(&raw).expect("a Pod serializes to JSON");
    if canonical.len() > MAX_POD_BYTES {
        return Err(ManifestError::PodTooLarge {
            doc,
            pod: key,
            size: canonical.len(),
            limit: MAX_POD_BYTES,
        });
    }
    let hash = hex_md5(&[
        b"host:",
        node_name.as_bytes(),
        b"file:",
        source.as_bytes(),
        &canonical,
    ]);
    let uid = hex_md5(&[
        b"host:",
        node_name.as_bytes(),
        b"file:",
        source.as_bytes(),
        key.as_bytes(),
    ]);
    if let Some(prev) = previous.pods.get(&uid) {
        let prev_hash = prev
            .pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CONFIG_HASH_ANNOTATION));
        if prev_hash == Some(&hash) {
            return Ok(Arc::clone(prev));
        }
    }

    let mut pod = raw;
    pod.metadata.name = Some(full_name);
    pod.metadata.namespace = Some(namespace);
    pod.metadata.uid = Some(uid);
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.remove(CONFIG_MIRROR_ANNOTATION);
    annotations.insert(CONFIG_SOURCE_ANNOTATION.into(), "file".into());
    annotations.insert(CONFIG_HASH_ANNOTATION.into(), hash);
    annotations.insert(CONFIG_SEEN_ANNOTATION.into(), seen.into());
    let spec = pod.spec.get_or_insert_with(Default::default);
    spec.node_name = Some(node_name.to_string());
    // kubelet: static pods tolerate NoExecute taints, so node problems do
    // not evict them.
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    let tolerates_all = |t: &Toleration| {
        t.operator.as_deref() == Some("Exists")
            && t.key.is_none()
            && t.effect.as_deref() == Some("NoExecute")
    };
    if !tolerations.iter().any(tolerates_all) {
        tolerations.push(Toleration {
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            ..Default::default()
        });
    }
    // As the API server would see the pod: with its final name.
    let mut errors = validate::validate(&pod);
    errors.extend(validate::check_host_paths(&pod));
    if !errors.is_empty() {
        return Err(ManifestError::Invalid {
            doc,
            pod: key,
            errors: FieldErrors(errors),
        });
    }
    Ok(Arc::new(DesiredPod {
        pod,
        source: source.to_string(),
    }))
}

/// The file's pods must be distinct among themselves and from the pods of
/// earlier files.
fn check_duplicates(
    pods: &[(usize, Arc<DesiredPod>)],
    claimed: &HashMap<String, String>,
) -> Result<(), ManifestError> {
    let mut mine: Vec<(String, usize)> = Vec::new();
    for (doc, pod) in pods {
        let (key, doc) = (pod_key(&pod.pod), *doc);
        if let Some((_, first)) = mine.iter().find(|(k, _)| *k == key) {
            return Err(ManifestError::DuplicateInFile {
                doc,
                pod: key,
                first: *first,
            });
        }
        if let Some(other) = claimed.get(&key) {
            return Err(ManifestError::DuplicateAcrossFiles {
                doc,
                pod: key,
                other: other.clone(),
            });
        }
        mine.push((key, doc));
    }
    Ok(())
}

/// The inotify watch on the directory, and which directory it is: a
/// directory deleted and recreated under the same path needs a new watch.
struct DirWatch {
    _watcher: notify::RecommendedWatcher,
    id: (u64, u64),
}

fn dir_id(dir: &Path) -> io::Result<(u64, u64)> {
    let meta = fs::metadata(dir)?;
    if meta.is_dir() {
        Ok((meta.dev(), meta.ino()))
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        ))
    }
}

fn start_watch(
    dir: &Path,
    events: &mpsc::UnboundedSender<notify::Result<notify::Event>>,
) -> Result<DirWatch, String> {
    let id = dir_id(dir).map_err(|e| e.to_string())?;
    let events = events.clone();
    let mut watcher = notify::recommended_watcher(move |ev| {
        // The receiver only goes away when `watch` returns.
        let _ = events.send(ev);
    })
    .map_err(|e| e.to_string())?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|e| e.to_string())?;
    Ok(DirWatch {
        _watcher: watcher,
        id,
    })
}

/// Whether an event may change what `scan` sees. Our own reads show up as
/// Access(Open) events and must not trigger rescans.
fn is_relevant(ev: &notify::Event, dir: &Path) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return false,
        _ => {}
    }
    ev.need_rescan()
        || ev.paths.is_empty()
        || ev.paths.iter().any(|p| {
            p == dir
                || p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_manifest_name)
        })
}

/// Watches `dir` and publishes a new snapshot on `tx` each time the desired
/// set (or the errors) change: after an inotify event (debounced: 100 ms
/// after the last event of a burst, at most 500 ms after its first), every
/// `rescan_every` (kubelet's fileCheckFrequency, a safety net for missed
/// events), and when a missing directory appears (polled each second).
/// Never gives up on errors: they are logged and the loop goes on. Returns
/// when every receiver of `tx` is gone.
pub async fn watch(
    dir: PathBuf,
    node_name: String,
    rescan_every: Duration,
    tx: tokio_watch::Sender<Snapshot>,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut current = tx.borrow().clone();
    let mut dir_watch: Option<DirWatch> = None;
    // Whether the "cannot watch" warning was logged since the last success.
    let mut warned = false;
    let mut rescan = tokio::time::interval(rescan_every.max(Duration::from_millis(10)));
    rescan.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut dir_poll =
        tokio::time::interval(DIR_POLL.min(rescan_every).max(Duration::from_millis(10)));
    dir_poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // (first, last) event of the burst waiting for a rescan.
    let mut burst: Option<(Instant, Instant)> = None;

    loop {
        let deadline = burst.map(|(first, last)| (last + DEBOUNCE).min(first + MAX_DEBOUNCE));
        let wake = tokio::select! {
            () = tx.closed() => return,
            ev = events.recv() => match ev {
                Some(Ok(ev)) => {
                    if is_relevant(&ev, &dir) {
                        let now = Instant::now();
                        burst = Some(burst.map_or((now, now), |(first, _)| (first, now)));
                    }
                    continue;
                }
                Some(Err(error)) => {
                    tracing::warn!(dir = %dir.display(), %error, "static pod watch error; rewatching");
                    dir_watch = None;
                    Wake::Scan
                }
                // We hold a sender: the channel never closes.
                None => continue,
            },
            () = sleep_until_opt(deadline) => Wake::Scan,
            _ = rescan.tick() => Wake::Scan,
            _ = dir_poll.tick(), if dir_watch.is_none() => Wake::Poll,
        };

        if dir_watch.is_none() {
            match start_watch(&dir, &events_tx) {
                Ok(w) => {
                    if warned {
                        tracing::info!(dir = %dir.display(), "watching the static pod directory");
                    }
                    warned = false;
                    dir_watch = Some(w);
                }
                Err(error) => {
                    if !warned {
                        tracing::warn!(dir = %dir.display(), %error, "cannot watch the static pod directory; polling for it");
                        warned = true;
                    }
                    if wake == Wake::Poll {
                        // Still missing: the periodic rescan covers the rest.
                        continue;
                    }
                }
            }
        }
        burst = None;

        let (d, n, prev) = (dir.clone(), node_name.clone(), current.clone());
        let next = match tokio::task::spawn_blocking(move || scan(&d, &n, &prev)).await {
            Ok(next) => next,
            Err(error) => {
                tracing::error!(dir = %dir.display(), %error, "static pod scan failed");
                continue;
            }
        };
        // A deleted or replaced directory invalidates the inotify watch.
        if let Some(w) = &dir_watch
            && dir_id(&dir).ok() != Some(w.id)
        {
            dir_watch = None;
        }
        if next != current {
            log_changes(&dir, &current, &next);
            current = next;
            tx.send_replace(current.clone());
        }
    }
}

/// Why the watch loop woke up.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Rescan: debounced events, the periodic tick, or a watch error.
    Scan,
    /// Look for a missing directory.
    Poll,
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Logs each error once, when it appears, and the size of the new set.
fn log_changes(dir: &Path, old: &Snapshot, new: &Snapshot) {
    for err in new.errors.iter().filter(|e| !old.errors.contains(e)) {
        tracing::warn!(file = %err.file, error = %err.message, "bad static pod manifest");
    }
    for err in old
        .errors
        .iter()
        .filter(|e| !new.errors.iter().any(|n| n.file == e.file))
    {
        tracing::info!(file = %err.file, "static pod manifest fixed or removed");
    }
    tracing::info!(dir = %dir.display(), pods = new.pods.len(), errors = new.errors.len(), "static pods changed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const NODE: &str = "node1";

    fn pod_yaml(name: &str, image: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  containers:\n  - name: main\n    image: {image}\n"
        )
    }

    fn t(secs: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        p
    }

    fn names(s: &Snapshot) -> Vec<String> {
        let mut v: Vec<String> = s
            .pods
            .values()
            .map(|p| format!("{}/{}", p.namespace(), p.name()))
            .collect();
        v.sort();
        v
    }

    fn annotation<'a>(p: &'a DesiredPod, key: &str) -> &'a str {
        p.pod.metadata.annotations.as_ref().unwrap()[key].as_str()
    }

    fn only_pod(s: &Snapshot) -> &DesiredPod {
        assert_eq!(s.pods.len(), 1, "{s:?}");
        s.pods.values().next().unwrap()
    }

    #[test]
    fn static_identity_like_kubelet() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "web.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  uid: ignored\n  annotations:\n    kubernetes.io/config.mirror: x\n    team: a\nspec:\n  containers:\n  - name: main\n    image: nginx\n",
        );
        let s = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        let p = only_pod(&s);
        let source = path.display().to_string();
        assert_eq!(p.name(), "web-node1");
        assert_eq!(p.namespace(), "default");
        assert_eq!(p.pod.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(p.source, source);
        let want_uid = hex_md5(&[
            b"host:node1",
            b"file:",
            source.as_bytes(),
            b"default/web-node1",
        ]);
        assert_eq!(p.uid(), want_uid);
        assert_eq!(s.pods.keys().next().unwrap(), &want_uid);
        let spec = p.pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some(NODE));
        let tol = spec.tolerations.as_ref().unwrap();
        assert_eq!(tol.len(), 1);
        assert_eq!(tol[0].operator.as_deref(), Some("Exists"));
        assert_eq!(tol[0].effect.as_deref(), Some("NoExecute"));
        let a = p.pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(a[CONFIG_SOURCE_ANNOTATION], "file");
        assert_eq!(a[CONFIG_SEEN_ANNOTATION], "2023-11-14T22:13:20Z");
        assert_eq!(a[CONFIG_HASH_ANNOTATION].len(), 32);
        assert_eq!(a["team"], "a");
        assert!(!a.contains_key(CONFIG_MIRROR_ANNOTATION));
    }

    #[test]
    fn uid_stable_across_edits_while_hash_and_seen_follow_the_content() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "web.yaml", &pod_yaml("web", "nginx:1"));
        let s1 = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
        let p1 = only_pod(&s1);

        // Unchanged: same pod, seen kept, snapshot equal (nothing to send).
        let s2 = scan_at(dir.path(), NODE, &s1, t(10));
        assert_eq!(s2, s1);
        assert!(Arc::ptr_eq(
            s1.pods.values().next().unwrap(),
            s2.pods.values().next().unwrap()
        ));

        // Edited: same uid, new hash, new seen.
        write(dir.path(), "web.yaml", &pod_yaml("web", "nginx:2"));
        let s3 = scan_at(dir.path(), NODE, &s2, t(20));
        let p3 = only_pod(&s3);
        assert_eq!(p3.uid(), p1.uid());
        assert_ne!(
            annotation(p3, CONFIG_HASH_ANNOTATION),
            annotation(p1, CONFIG_HASH_ANNOTATION)
        );
        assert_eq!(
            annotation(p3, CONFIG_SEEN_ANNOTATION),
            "2023-11-14T22:13:40Z"
        );
        assert_eq!(
            p3.pod.spec.as_ref().unwrap().containers[0].image.as_deref(),
            Some("nginx:2")
        );

        // The uid depends on the node and the file.
        let other = scan_at(dir.path(), "node2", &Snapshot::default(), t(0));
        assert_ne!(only_pod(&other).uid(), p1.uid());
    }

    #[test]
    fn multi_document_yaml_and_json_files() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            &format!(
                "---\n{}---\n# just a comment\n---\n{}",
                pod_yaml("one", "x"),
                pod_yaml("two", "y").replace("name: two", "name: two\n  namespace: kube-system")
            ),
        );
        write(
            dir.path(),
            "b.json",
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"three"},"spec":{"containers":[{"name":"c","image":"z"}]}}"#,
        );
        write(dir.path(), "c.yml", &pod_yaml("four", "w"));
        let s = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!(
            names(&s),
            [
                "default/four-node1",
                "default/one-node1",
                "default/three-node1",
                "kube-system/two-node1"
            ]
        );
    }

    #[test]
    fn storage_classes_are_objects_and_checked_like_the_api_server_does() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "sc.yaml",
            "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: fast}\nprovisioner: test.csi.minilet.io\nvolumeBindingMode: WaitForFirstConsumer\nparameters: {csi.storage.k8s.io/fstype: ext4}\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: data}\nspec: {storageClassName: fast, accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}\n",
        );
        let s = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        let all = s.all_objects();
        let sc = &all.classes[&(String::new(), "fast".to_string())];
        assert_eq!(sc.provisioner, "test.csi.minilet.io");
        assert!(
            all.claims
                .contains_key(&("default".to_string(), "data".to_string()))
        );
        let cases = [
            (
                "apiVersion: v1\nkind: StorageClass\nmetadata: {name: x}\nprovisioner: p\n",
                "document 1: apiVersion \"v1\" kind \"StorageClass\" is not a v1 Pod (or ConfigMap, Secret, PersistentVolumeClaim, PersistentVolume; or a storage.k8s.io/v1 StorageClass)",
            ),
            (
                "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: x}\nreclaimPolicy: Recycle\nvolumeBindingMode: Later\n",
                "document 1: StorageClass x is invalid: provisioner: Required value; reclaimPolicy: Unsupported value: \"Recycle\": supported values: \"Delete\", \"Retain\"; volumeBindingMode: Unsupported value: \"Later\": supported values: \"Immediate\", \"WaitForFirstConsumer\"",
            ),
            (
                "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: x}\nprovisioner: [p]\n",
                "document 1: invalid StorageClass",
            ),
            (
                "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: c}\nspec: {accessModes: [ReadWriteSometimes]}\n",
                "document 1: PersistentVolumeClaim c is invalid: spec.accessModes: Unsupported value: \"ReadWriteSometimes\": supported values: \"ReadOnlyMany\", \"ReadWriteMany\", \"ReadWriteOnce\", \"ReadWriteOncePod\"; spec.resources[storage]: Required value",
            ),
            (
                "apiVersion: v1\nkind: PersistentVolume\nmetadata: {name: v}\nspec: {capacity: {storage: lots}}\n",
                "document 1: PersistentVolume v is invalid: spec.accessModes: Required value: at least 1 access mode is required; spec.capacity[storage]: Invalid value: \"lots\": \"lots\" is not a quantity like 10M; spec: Required value: must specify a volume type",
            ),
        ];
        for (text, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), "bad.yaml", text);
            let s = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
            assert_eq!(s.errors.len(), 1, "{text}");
            assert!(
                s.errors[0].message.starts_with(want),
                "{}",
                s.errors[0].message
            );
            assert!(s.errors[0].file.ends_with("bad.yaml"));
        }
    }

    #[test]
    fn config_maps_and_secrets_beside_pods_are_objects_of_their_file() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            &format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cfg}}\ndata: {{GREETING: hi}}\n---\n{}---\napiVersion: v1\nkind: Secret\nmetadata: {{name: pw, namespace: kube-system}}\nstringData: {{PASS: s3cret}}\n",
                pod_yaml("one", "x"),
            ),
        );
        write(
            dir.path(),
            "b.json",
            r#"{"apiVersion":"v1","kind":"PersistentVolume","metadata":{"name":"pv1"},"spec":{"capacity":{"storage":"1Gi"},"accessModes":["ReadWriteOnce"],"hostPath":{"path":"/srv"}}}"#,
        );
        let s = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!(names(&s), ["default/one-node1"]);
        let all = s.all_objects();
        let cm = &all.config_maps[&("default".to_string(), "cfg".to_string())];
        assert_eq!(cm.data.as_ref().unwrap()["GREETING"], "hi");
        let pw = &all.secrets[&("kube-system".to_string(), "pw".to_string())];
        assert_eq!(pw.data.as_ref().unwrap()["PASS"].0, b"s3cret");
        assert_eq!(pw.type_.as_deref(), Some("Opaque"));
        assert!(
            all.volumes
                .contains_key(&(String::new(), "pv1".to_string()))
        );

        // A bad key rejects the whole file, which keeps its last good
        // version (objects included); the same name in a later file is
        // an error there.
        write(
            dir.path(),
            "a.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {\"bad key\": x}\n",
        );
        write(
            dir.path(),
            "c.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {A: b}\n",
        );
        let s2 = scan_at(dir.path(), NODE, &s, t(1));
        let messages: Vec<_> = s2.errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(
            messages[0].starts_with("document 1: ConfigMap cfg is invalid: data[bad key]: Invalid value: \"bad key\": a valid config key"),
            "{messages:?}"
        );
        assert!(messages[0].ends_with("; keeping its last good version"));
        assert_eq!(
            messages[1],
            format!(
                "document 1: ConfigMap cfg is already defined by {}",
                dir.path().join("a.yaml").display()
            )
        );
        assert_eq!(s2.all_objects(), all);
        fs::remove_file(dir.path().join("a.yaml")).unwrap();
        let s3 = scan_at(dir.path(), NODE, &s2, t(2));
        let cm = &s3.all_objects().config_maps[&("default".to_string(), "cfg".to_string())];
        assert_eq!(cm.data.as_ref().unwrap()["A"], "b");
    }

    #[test]
    fn ignores_dotfiles_other_extensions_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let good = pod_yaml("web", "x");
        for name in [
            ".web.yaml",
            ".web.yaml.swp",
            "web.yaml~",
            "web.txt",
            "README",
            "web.yaml.bak",
            "#web.yaml#",
        ] {
            write(dir.path(), name, &good);
        }
        fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        write(&dir.path().join("sub.yaml"), "inner.yaml", &good);
        let s = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
        assert_eq!(s, Snapshot::default());
        assert!(is_manifest_name("a.YAML"));
    }

    /// Each case: files to create, then the one error expected on `bad.*`.
    #[test]
    fn bad_inputs() {
        type Setup = Box<dyn Fn(&Path)>;
        let yaml = |text: &'static str| -> Setup {
            Box::new(move |d: &Path| {
                fs::write(d.join("bad.yaml"), text).unwrap();
            })
        };
        let cases: Vec<(&str, Setup, &str, &str)> = vec![
            (
                "invalid yaml",
                yaml("apiVersion: v1\nkind: Pod\nmetadata:\n  name: [x\n"),
                "bad.yaml",
                "document 1: invalid YAML: metadata.name: unclosed bracket '[' at line 4 column 9",
            ),
            (
                "wrong field type, with its position",
                yaml(
                    "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: main\n    ports:\n    - containerPort: eighty\n",
                ),
                "bad.yaml",
                "document 1: invalid Pod: spec.containers[0].ports[0].containerPort: invalid i32 at line 9 column 22",
            ),
            (
                "unknown kind",
                yaml("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n"),
                "bad.yaml",
                "document 1: apiVersion \"apps/v1\" kind \"Deployment\" is not a v1 Pod (or ConfigMap, Secret, PersistentVolumeClaim, PersistentVolume; or a storage.k8s.io/v1 StorageClass)",
            ),
            (
                "wrong apiVersion",
                yaml("apiVersion: v2\nkind: Pod\nmetadata:\n  name: web\n"),
                "bad.yaml",
                "document 1: apiVersion \"v2\" kind \"Pod\" is not a v1 Pod (or ConfigMap, Secret, PersistentVolumeClaim, PersistentVolume; or a storage.k8s.io/v1 StorageClass)",
            ),
            (
                "no kind at all",
                yaml("metadata:\n  name: web\n"),
                "bad.yaml",
                "document 1: apiVersion (missing) kind (missing) is not a v1 Pod (or ConfigMap, Secret, PersistentVolumeClaim, PersistentVolume; or a storage.k8s.io/v1 StorageClass)",
            ),
            (
                "empty file",
                yaml(""),
                "bad.yaml",
                "no pod in the file (delete the file to remove its pods)",
            ),
            (
                "only comments and separators",
                yaml("# nothing yet\n---\n---\n"),
                "bad.yaml",
                "no pod in the file (delete the file to remove its pods)",
            ),
            (
                "not a mapping",
                yaml("- a\n"),
                "bad.yaml",
                "document 1: not a mapping",
            ),
            (
                "missing name",
                yaml(
                    "apiVersion: v1\nkind: Pod\nmetadata: {}\nspec:\n  containers: [{name: a, image: b}]\n",
                ),
                "bad.yaml",
                "document 1: metadata.name is missing",
            ),
            (
                "invalid name",
                yaml(
                    "apiVersion: v1\nkind: Pod\nmetadata:\n  name: Web_1\nspec:\n  containers: [{name: a, image: b}]\n",
                ),
                "bad.yaml",
                "document 1: pod default/Web_1-node1 is invalid: metadata.name: Invalid value: \"Web_1-node1\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com')",
            ),
            (
                "invalid namespace",
                yaml(
                    "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: a.b\nspec:\n  containers: [{name: a, image: b}]\n",
                ),
                "bad.yaml",
                "document 1: pod a.b/web-node1 is invalid: metadata.namespace: Invalid value: \"a.b\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name', or '123-abc')",
            ),
            (
                "no containers",
                yaml(
                    "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers: []\n",
                ),
                "bad.yaml",
                "document 1: pod default/web-node1 is invalid: spec.containers: Required value",
            ),
            (
                "no spec",
                yaml("apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n"),
                "bad.yaml",
                "document 1: pod default/web-node1 is invalid: spec.containers: Required value",
            ),
            (
                "two containers with one name",
                yaml(
                    "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  initContainers: [{name: a, image: b}]\n  containers: [{name: a, image: b}]\n",
                ),
                "bad.yaml",
                "document 1: pod default/web-node1 is invalid: spec.containers[0].name: Duplicate value: \"a\"",
            ),
            (
                "invalid container name",
                yaml(
                    "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers: [{name: A, image: b}]\n",
                ),
                "bad.yaml",
                "document 1: pod default/web-node1 is invalid: spec.containers[0].name: Invalid value: \"A\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name', or '123-abc')",
            ),
            (
                "one bad document rejects the whole file",
                Box::new(|d: &Path| {
                    let text = format!(
                        "{}---\napiVersion: v1\nkind: Service\n",
                        pod_yaml("web", "x")
                    );
                    fs::write(d.join("bad.yaml"), text).unwrap();
                }),
                "bad.yaml",
                "document 2: apiVersion \"v1\" kind \"Service\" is not a v1 Pod (or ConfigMap, Secret, PersistentVolumeClaim, PersistentVolume; or a storage.k8s.io/v1 StorageClass); the whole file (2 documents) is rejected",
            ),
            (
                "the same pod twice in a file",
                Box::new(|d: &Path| {
                    let text = format!("{}---\n{}", pod_yaml("web", "x"), pod_yaml("web", "y"));
                    fs::write(d.join("bad.yaml"), text).unwrap();
                }),
                "bad.yaml",
                "document 2: pod default/web-node1 is also document 1; the whole file (2 documents) is rejected",
            ),
            (
                "invalid json",
                Box::new(|d: &Path| {
                    fs::write(d.join("bad.json"), "{\"apiVersion\": \"v1\",\n \"kind\": }").unwrap()
                }),
                "bad.json",
                "invalid JSON: expected value at line 2 column 10",
            ),
            (
                "json that is not a pod",
                Box::new(|d: &Path| fs::write(d.join("bad.json"), "[1]").unwrap()),
                "bad.json",
                "document 1: not a mapping",
            ),
            (
                "file over 10 MB",
                Box::new(|d: &Path| {
                    let f = fs::File::create(d.join("bad.yaml")).unwrap();
                    f.set_len(MAX_MANIFEST_BYTES + 1).unwrap();
                }),
                "bad.yaml",
                "file is 10485761 bytes, over the 10485760-byte limit",
            ),
            (
                "not utf-8",
                Box::new(|d: &Path| fs::write(d.join("bad.yaml"), b"name: \xff\xfe\n").unwrap()),
                "bad.yaml",
                "not UTF-8 text",
            ),
            (
                "a fifo is not a regular file",
                Box::new(|d: &Path| {
                    nix::unistd::mkfifo(&d.join("bad.yaml"), nix::sys::stat::Mode::S_IRWXU)
                        .unwrap();
                }),
                "bad.yaml",
                "not a regular file",
            ),
            (
                "symlink loop",
                Box::new(|d: &Path| {
                    symlink(d.join("bad.yaml"), d.join("loop.yml")).unwrap();
                    symlink(d.join("loop.yml"), d.join("bad.yaml")).unwrap();
                }),
                "bad.yaml",
                "symlink loop",
            ),
            (
                "dangling symlink",
                Box::new(|d: &Path| symlink(d.join("nowhere"), d.join("bad.yaml")).unwrap()),
                "bad.yaml",
                "symlink to a missing file",
            ),
        ];
        for (name, setup, file, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            setup(dir.path());
            let s = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
            let bad = dir.path().join(file).display().to_string();
            let errors: Vec<_> = s.errors.iter().filter(|e| e.file == bad).collect();
            assert_eq!(errors.len(), 1, "{name}: {:?}", s.errors);
            assert_eq!(errors[0].message, want, "{name}");
            assert!(!errors[0].message.contains('\n'), "{name}");
            assert!(s.pods.is_empty(), "{name}: {:?}", names(&s));
        }
    }

    #[test]
    fn a_pod_the_api_server_would_refuse_is_listed_against_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = write(
            dir.path(),
            "bad.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\nspec:\n  terminationGracePeriodSeconds: -5\n  containers:\n  - name: main\n    volumeMounts: [{name: data, mountPath: /d}]\n  volumes: [{name: cfg, nfs: {server: s, path: /x}}]\n",
        );
        write(dir.path(), "good.yaml", &pod_yaml("good", "busybox"));
        let s = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
        assert_eq!(names(&s), ["default/good-node1"]);
        assert_eq!(
            s.errors,
            [SourceError {
                file: bad.display().to_string(),
                message: "document 1: pod default/bad-node1 is invalid: spec.volumes[0].nfs: Unsupported value: \"nfs\": supported values: \"emptyDir\", \"hostPath\", \"secret\", \"configMap\", \"downwardAPI\", \"projected\", \"csi\", \"persistentVolumeClaim\"; spec.containers[0].image: Required value; spec.containers[0].volumeMounts[0].name: Not found: \"data\"; spec.terminationGracePeriodSeconds: Invalid value: -5: must be greater than or equal to 0".into(),
            }]
        );
    }

    #[test]
    fn a_file_of_too_many_documents_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let doc = "---\na: b\n";
        write(dir.path(), "many.yaml", &doc.repeat(MAX_DOCUMENTS + 10));
        let s = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
        assert_eq!(s.errors.len(), 1);
        assert_eq!(s.errors[0].message, "more than 4096 documents in one file");
    }

    #[test]
    fn the_example_manifests_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
        let s = scan_at(&dir, NODE, &Snapshot::default(), t(0));
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!(s.pods.len(), 3, "{:?}", names(&s));
    }

    #[test]
    fn an_alias_bomb_or_a_flood_of_nodes_is_one_error() {
        // Nine levels of nine aliases under a field Pod ignores: ~1 KiB of
        // text, 9^9 strings once expanded. Plus the pod in a JSON file
        // (which cannot alias) of too many nodes.
        let mut text = format!("{}x-lol:\n  l0: &l0 lol\n", pod_yaml("bomb", "busybox"));
        for i in 1..10 {
            let refs = vec![format!("*l{}", i - 1); 9].join(", ");
            text.push_str(&format!("  l{i}: &l{i} [{refs}]\n"));
        }
        let dir = tempfile::tempdir().unwrap();
        let bomb = write(dir.path(), "bomb.yaml", &text);
        let json = format!(
            r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"wide"}},"spec":{{"containers":[{}]}}}}"#,
            vec!["{}"; 60_000].join(",")
        );
        let wide = write(dir.path(), "wide.json", &json);
        let start = std::time::Instant::now();
        let s = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
        // Wall time on a shared, loaded machine: only an unbounded parse
        // (minutes) fails this.
        assert!(start.elapsed() < Duration::from_secs(60));
        assert!(s.pods.is_empty());
        assert_eq!(s.errors.len(), 2, "{:?}", s.errors);
        assert_eq!(s.errors[0].file, bomb.display().to_string());
        assert!(
            s.errors[0]
                .message
                .starts_with("document 1: too large once expanded (aliases included): x-lol."),
            "{}",
            s.errors[0].message
        );
        assert_eq!(s.errors[1].file, wide.display().to_string());
        assert!(
            s.errors[1].message.starts_with(
                "document 1: too large once expanded (aliases included): spec.containers"
            ),
            "{}",
            s.errors[1].message
        );

        // Within the node bound, a list too long to decode.
        let json = json.replacen(&"{},".repeat(57_000), "", 1);
        fs::write(&wide, json).unwrap();
        let s = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
        assert_eq!(
            s.errors[1].message,
            "document 1: a list of 3000 items, over the 2048-item limit"
        );
    }

    #[test]
    fn a_pod_over_the_size_limit_is_refused() {
        // Within the node and text bounds, but over MAX_POD_BYTES as JSON.
        let mut text =
            pod_yaml("big", "busybox").replace("  - name: main\n    image: busybox\n", "");
        let value = "v".repeat(150);
        for c in 0..5 {
            text.push_str(&format!("  - name: c{c}\n    image: busybox\n    env:\n"));
            for i in 0..1800 {
                text.push_str(&format!("    - {{name: e{i}, value: {value}}}\n"));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "big.yaml", &text);
        let s = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
        assert!(s.pods.is_empty());
        let message = &s.errors[0].message;
        assert!(
            message.starts_with("document 1: pod default/big-node1 is ")
                && message.ends_with(" bytes as JSON, over the 1572864-byte limit"),
            "{message}"
        );
    }

    #[test]
    fn a_file_of_many_documents_is_parsed_in_linear_time() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..2000)
            .map(|i| format!("---\n{}", pod_yaml(&format!("p{i}"), "busybox")))
            .collect();
        write(dir.path(), "many.yaml", &text);
        let before = crate::yaml::tests::DECODED.get();
        let start = std::time::Instant::now();
        let s = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
        let elapsed = start.elapsed();
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!(s.pods.len(), 2000);
        // Two linear passes (heads, then pods): each document decoded twice,
        // where re-parsing documents 1..i for each i decodes ~2 million.
        assert_eq!(crate::yaml::tests::DECODED.get() - before, 2 * 2000);
        // Generous for an unoptimised build on a loaded machine; the
        // quadratic parse took minutes here.
        assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
    }

    #[test]
    fn read_errors_are_one_line_with_the_cause() {
        // Tests run as root, where mode 000 does not stop reads: check the
        // mapping of the errno instead.
        let e = read_error(io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(
            one_line(&e),
            "cannot read the file: Permission denied (os error 13)"
        );
        let e = read_error(io::Error::from_raw_os_error(libc::ELOOP));
        assert_eq!(one_line(&e), "symlink loop");
    }

    #[test]
    fn a_bad_file_keeps_its_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(
            dir.path(),
            "a.yaml",
            &format!("{}---\n{}", pod_yaml("a1", "x"), pod_yaml("a2", "x")),
        );
        write(dir.path(), "b.yaml", &pod_yaml("b", "x"));
        let s1 = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
        assert_eq!(
            names(&s1),
            ["default/a1-node1", "default/a2-node1", "default/b-node1"]
        );

        // a.yaml breaks while b.yaml changes: a keeps its pods, b moves on.
        write(
            dir.path(),
            "a.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: [\n",
        );
        write(dir.path(), "b.yaml", &pod_yaml("b", "y"));
        let s2 = scan_at(dir.path(), NODE, &s1, t(10));
        assert_eq!(names(&s2), names(&s1));
        for (uid, pod) in &s1.pods {
            if pod.source == a.display().to_string() {
                assert!(Arc::ptr_eq(pod, &s2.pods[uid]));
            }
        }
        let b = s2.pods.values().find(|p| p.name() == "b-node1").unwrap();
        assert_eq!(
            b.pod.spec.as_ref().unwrap().containers[0].image.as_deref(),
            Some("y")
        );
        assert_eq!(s2.errors.len(), 1);
        assert_eq!(s2.errors[0].file, a.display().to_string());
        assert!(
            s2.errors[0]
                .message
                .ends_with("; keeping its last good version"),
            "{}",
            s2.errors[0].message
        );

        // Still bad on the next scan: kept again (from the kept version).
        let s3 = scan_at(dir.path(), NODE, &s2, t(20));
        assert_eq!(s3, s2);

        // Deleted: its pods go, and so does its error.
        fs::remove_file(&a).unwrap();
        let s4 = scan_at(dir.path(), NODE, &s3, t(30));
        assert_eq!(names(&s4), ["default/b-node1"]);
        assert!(s4.errors.is_empty());
    }

    #[test]
    fn a_new_bad_file_has_no_pods() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", "kind: Pod\n");
        let s = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
        assert!(s.pods.is_empty());
        assert!(!s.errors[0].message.contains("last good"));
    }

    #[test]
    fn the_same_pod_in_two_files_stays_with_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.yaml", &pod_yaml("web", "from-a"));
        let b = write(dir.path(), "b.yaml", &pod_yaml("web", "from-b"));
        let s = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
        let p = only_pod(&s);
        assert_eq!(p.source, a.display().to_string());
        assert_eq!(
            s.errors,
            [SourceError {
                file: b.display().to_string(),
                message: format!(
                    "document 1: pod default/web-node1 is already defined by {}",
                    a.display()
                ),
            }]
        );

        // b had the pod first; a later file taking it over is refused, and
        // b's last good version is not shadowed by a.
        let dir = tempfile::tempdir().unwrap();
        let b = write(dir.path(), "b.yaml", &pod_yaml("web", "from-b"));
        let s1 = scan_at(dir.path(), NODE, &Snapshot::default(), t(0));
        write(dir.path(), "c.yaml", &pod_yaml("web", "from-c"));
        let s2 = scan_at(dir.path(), NODE, &s1, t(1));
        assert_eq!(only_pod(&s2).source, b.display().to_string());
        assert_eq!(s2.errors.len(), 1);
    }

    #[test]
    fn a_missing_directory_keeps_the_previous_pods() {
        let dir = tempfile::tempdir().unwrap();
        let manifests = dir.path().join("manifests");
        let s = scan_at(&manifests, NODE, &Snapshot::default(), t(0));
        assert!(s.pods.is_empty());
        assert_eq!(
            s.errors[0].message,
            "directory does not exist; keeping the previous pods"
        );

        fs::create_dir(&manifests).unwrap();
        write(&manifests, "a.yaml", &pod_yaml("web", "x"));
        let s1 = scan_at(&manifests, NODE, &Snapshot::default(), t(0));
        fs::remove_dir_all(&manifests).unwrap();
        let s2 = scan_at(&manifests, NODE, &s1, t(1));
        assert_eq!(s2.pods, s1.pods);
        assert_eq!(s2.errors.len(), 1);
    }

    #[test]
    fn only_changes_to_manifests_are_relevant_events() {
        use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind};
        let dir = Path::new("/m");
        let ev = |kind, name: &str| notify::Event::new(kind).add_path(dir.join(name));
        let cases = [
            (
                ev(
                    EventKind::Access(AccessKind::Open(AccessMode::Any)),
                    "a.yaml",
                ),
                false,
            ),
            (
                ev(
                    EventKind::Access(AccessKind::Close(AccessMode::Read)),
                    "a.yaml",
                ),
                false,
            ),
            (
                ev(
                    EventKind::Access(AccessKind::Close(AccessMode::Write)),
                    "a.yaml",
                ),
                true,
            ),
            (ev(EventKind::Create(CreateKind::File), "a.json"), true),
            (ev(EventKind::Modify(ModifyKind::Any), "a.yml"), true),
            (ev(EventKind::Remove(RemoveKind::File), "a.yaml"), true),
            (
                ev(EventKind::Create(CreateKind::File), ".a.yaml.swp"),
                false,
            ),
            (ev(EventKind::Modify(ModifyKind::Any), "4913"), false),
            (
                notify::Event::new(EventKind::Remove(RemoveKind::Folder)).add_path(dir.into()),
                true,
            ),
            (notify::Event::new(EventKind::Other), true),
        ];
        for (i, (event, want)) in cases.iter().enumerate() {
            assert_eq!(is_relevant(event, dir), *want, "case {i}: {event:?}");
        }
    }

    async fn next_change(rx: &mut tokio_watch::Receiver<Snapshot>, within: Duration) -> Snapshot {
        tokio::time::timeout(within, rx.changed())
            .await
            .expect("a new snapshot in time")
            .unwrap();
        rx.borrow_and_update().clone()
    }

    #[tokio::test]
    async fn watch_applies_writes_renames_and_deletes_within_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = tokio_watch::channel(Snapshot::default());
        // A long periodic rescan: only inotify can be fast enough.
        let task = tokio::spawn(watch(
            dir.path().to_path_buf(),
            NODE.into(),
            Duration::from_secs(3600),
            tx,
        ));
        // The watch is live once it reports a file: it installs inotify
        // before its first scan, so from then on only inotify can report.
        write(dir.path(), "probe.yaml", &pod_yaml("probe", "v1"));
        let s = next_change(&mut rx, Duration::from_secs(10)).await;
        assert_eq!(names(&s), ["default/probe-node1"]);
        fs::remove_file(dir.path().join("probe.yaml")).unwrap();
        let s = next_change(&mut rx, Duration::from_secs(1)).await;
        assert!(s.pods.is_empty());

        write(dir.path(), "web.yaml", &pod_yaml("web", "v1"));
        let s = next_change(&mut rx, Duration::from_secs(1)).await;
        assert_eq!(names(&s), ["default/web-node1"]);

        // Editor style: write a dotfile, rename it over the manifest.
        write(dir.path(), ".web.yaml.tmp", &pod_yaml("web", "v2"));
        fs::rename(
            dir.path().join(".web.yaml.tmp"),
            dir.path().join("web.yaml"),
        )
        .unwrap();
        let s = next_change(&mut rx, Duration::from_secs(1)).await;
        let p = only_pod(&s);
        assert_eq!(
            p.pod.spec.as_ref().unwrap().containers[0].image.as_deref(),
            Some("v2")
        );

        fs::remove_file(dir.path().join("web.yaml")).unwrap();
        let s = next_change(&mut rx, Duration::from_secs(1)).await;
        assert!(s.pods.is_empty());

        // Our own reads (open events) must not cause rescans that publish.
        assert!(
            tokio::time::timeout(Duration::from_millis(400), rx.changed())
                .await
                .is_err()
        );

        drop(rx);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("watch returns once nobody listens")
            .unwrap();
    }

    #[tokio::test]
    async fn watch_waits_for_a_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let manifests = dir.path().join("manifests");
        let (tx, mut rx) = tokio_watch::channel(Snapshot::default());
        let task = tokio::spawn(watch(
            manifests.clone(),
            NODE.into(),
            Duration::from_secs(3600),
            tx,
        ));

        let s = next_change(&mut rx, Duration::from_secs(1)).await;
        assert_eq!(s.errors.len(), 1, "{s:?}");

        fs::create_dir(&manifests).unwrap();
        write(&manifests, "web.yaml", &pod_yaml("web", "x"));
        // Found by the one-second poll.
        let s = next_change(&mut rx, Duration::from_secs(2)).await;
        assert_eq!(names(&s), ["default/web-node1"]);
        assert!(s.errors.is_empty());

        // And watched from then on.
        write(&manifests, "db.yaml", &pod_yaml("db", "x"));
        let s = next_change(&mut rx, Duration::from_secs(1)).await;
        assert_eq!(names(&s), ["default/db-node1", "default/web-node1"]);
        task.abort();
    }
}
