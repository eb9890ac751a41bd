//! Network configuration: loads and validates the networks minilet runs
//! from its own CNI config dir (`cniConfDir`), in the CNI spec's file
//! formats, and keeps them current.
//!
//! Every file ending in `.conflist`, `.conf` or `.json` is one network
//! (a single-plugin `.conf`/`.json` becomes a one-plugin list); the default
//! network is the first file by name (the convention libcni-based runtimes
//! follow). Each plugin keeps its raw JSON object: plugins define arbitrary
//! keys of their own. A bad file is one error naming it; it never hides the
//! good ones. [`watch_dir`] re-reads the dir on inotify events and
//! periodically into a [`NetworkStore`]; what it publishes applies to the
//! next ADD (attachments already made keep the config cached with them).
//!
//! Side effects: reads the config dir and its files; `watch_dir` holds an
//! inotify watch on the dir.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::locks::{read, write};

/// Why a network configuration could not be loaded. Every variant names the
/// file or directory it is about.
#[derive(Debug, thiserror::Error)]
pub enum CniConfigError {
    /// The config dir could not be listed.
    #[error("cannot read CNI config dir {}", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config dir holds no `.conflist`, `.conf` or `.json` file.
    #[error("no CNI network config (*.conflist, *.conf, *.json) in {}", dir.display())]
    NoConfig { dir: PathBuf },
    /// The chosen file could not be read.
    #[error("cannot read CNI config {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("CNI config {} is not valid JSON", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The file is JSON but breaks a rule of the spec.
    #[error("CNI config {}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
}

/// One plugin of a list: its `type` plus its whole raw JSON object.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginConfig {
    /// The `type` field: the name of the executable in the bin dirs.
    pub plugin_type: String,
    /// The plugin's JSON object as written in the file (including `type`).
    pub raw: Map<String, Value>,
}

impl PluginConfig {
    /// Whether the plugin declares `capabilities: { <name>: true }`; only
    /// such plugins get that key in `runtimeConfig` (spec, config lists).
    pub fn has_capability(&self, name: &str) -> bool {
        self.raw
            .get("capabilities")
            .and_then(|c| c.get(name))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// A validated network configuration list.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkConfigList {
    /// The network name: part of the cache key and of every plugin's config.
    pub name: String,
    /// The list's `cniVersion`; overrides each plugin's own (spec).
    pub cni_version: String,
    /// The list's `disableCheck` (used once CHECK is implemented).
    pub disable_check: bool,
    pub plugins: Vec<PluginConfig>,
    /// The list as JSON bytes (a `.conf` is wrapped into a list first):
    /// what the result cache stores as `config`.
    pub bytes: Vec<u8>,
    /// The file it came from, for messages.
    pub source: PathBuf,
}

/// File extensions of CNI configs, in libcni's sense.
const EXTENSIONS: [&str; 3] = ["conflist", "conf", "json"];

/// The config files in `dir`, sorted by file name (byte order), hidden
/// files skipped.
pub fn config_files(dir: &Path) -> Result<Vec<PathBuf>, CniConfigError> {
    let read_dir = |source| CniConfigError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir)? {
        let path = entry.map_err(read_dir)?.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        let ext_ok = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e));
        if !hidden && ext_ok && path.is_file() {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Loads the default network: the first config file in `dir` by name.
pub fn load_default(dir: &Path) -> Result<NetworkConfigList, CniConfigError> {
    let first = config_files(dir)?
        .into_iter()
        .next()
        .ok_or_else(|| CniConfigError::NoConfig {
            dir: dir.to_path_buf(),
        })?;
    load_file(&first)
}

/// Loads one file: a list if it ends in `.conflist`, else a single plugin.
pub fn load_file(path: &Path) -> Result<NetworkConfigList, CniConfigError> {
    let bytes = std::fs::read(path).map_err(|source| CniConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let is_list = path.extension().is_some_and(|e| e == "conflist");
    parse(&bytes, is_list, path)
}

/// Parses and validates config bytes; `path` is only used in messages.
pub fn parse(
    bytes: &[u8],
    is_list: bool,
    path: &Path,
) -> Result<NetworkConfigList, CniConfigError> {
    let invalid = |problem: String| CniConfigError::Invalid {
        path: path.to_path_buf(),
        problem,
    };
    let value: Value = serde_json::from_slice(bytes).map_err(|source| CniConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    let Value::Object(top) = value else {
        return Err(invalid("top level is not a JSON object".into()));
    };
    // A single-plugin config becomes a list of one: the list takes its name
    // and cniVersion, the plugin keeps everything (libcni does the same).
    let (top, bytes) = if is_list {
        (top, bytes.to_vec())
    } else {
        let mut list = Map::new();
        for key in ["cniVersion", "name"] {
            if let Some(v) = top.get(key) {
                list.insert(key.into(), v.clone());
            }
        }
        list.insert("plugins".into(), Value::Array(vec![Value::Object(top)]));
        let bytes = serde_json::to_vec(&list)
            .map_err(|e| invalid(format!("cannot encode as a list: {e}")))?;
        (list, bytes)
    };

    let name = match top.get("name") {
        Some(Value::String(n)) => n.clone(),
        Some(_) => return Err(invalid("\"name\" is not a string".into())),
        None => return Err(invalid("missing \"name\"".into())),
    };
    validate_network_name(&name).map_err(invalid)?;
    let cni_version = match top.get("cniVersion") {
        Some(Value::String(v)) => v.clone(),
        Some(_) => return Err(invalid("\"cniVersion\" is not a string".into())),
        None => return Err(invalid("missing \"cniVersion\"".into())),
    };
    if !is_semver(&cni_version) {
        return Err(invalid(format!(
            "cniVersion {cni_version:?} is not a version like 1.0.0"
        )));
    }
    if !super::version::RESULT_VERSIONS.contains(&cni_version.as_str()) {
        return Err(invalid(format!(
            "cniVersion {cni_version:?} is not supported (supported: {})",
            super::version::RESULT_VERSIONS.join(", ")
        )));
    }
    // disableCheck is a boolean, but the spec once wrote it as a string.
    let disable_check = match top.get("disableCheck") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) if s == "true" || s == "false" => s == "true",
        Some(_) => return Err(invalid("\"disableCheck\" is not a boolean".into())),
    };
    let plugins = match top.get("plugins") {
        Some(Value::Array(p)) if !p.is_empty() => p,
        Some(Value::Array(_)) => return Err(invalid("\"plugins\" is empty".into())),
        Some(_) => return Err(invalid("\"plugins\" is not a list".into())),
        None => return Err(invalid("missing \"plugins\"".into())),
    };
    let plugins = plugins
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let Value::Object(raw) = p else {
                return Err(invalid(format!("plugin {i} is not a JSON object")));
            };
            match raw.get("type") {
                Some(Value::String(t)) if valid_plugin_type(t) => Ok(PluginConfig {
                    plugin_type: t.clone(),
                    raw: raw.clone(),
                }),
                Some(Value::String(t)) => Err(invalid(format!(
                    "plugin {i} has an invalid \"type\" {t:?} (must be a file name)"
                ))),
                _ => Err(invalid(format!("plugin {i} has no string \"type\""))),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NetworkConfigList {
        name,
        cni_version,
        disable_check,
        plugins,
        bytes,
        source: path.to_path_buf(),
    })
}

/// Every network of a config dir, by name, with the default and the errors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkSet {
    /// Valid networks by name.
    pub networks: BTreeMap<String, NetworkConfigList>,
    /// The name of the network from the first valid file by file name.
    pub default: Option<String>,
    /// One message per bad file (or the dir itself, if unreadable).
    pub errors: Vec<(PathBuf, String)>,
}

impl NetworkSet {
    /// The network `name`, or the default one for `""`.
    pub fn get(&self, name: &str) -> Option<&NetworkConfigList> {
        if name.is_empty() {
            self.networks.get(self.default.as_deref()?)
        } else {
            self.networks.get(name)
        }
    }
}

/// Loads every config file of `dir`. Never fails as a whole: an unreadable
/// dir or a bad file becomes an entry in `errors`; of two files naming the
/// same network, the later one (by file name) is the error.
pub fn load_dir(dir: &Path) -> NetworkSet {
    let mut set = NetworkSet::default();
    let files = match config_files(dir) {
        Ok(f) => f,
        Err(e) => {
            set.errors
                .push((dir.to_path_buf(), crate::cni::chain::error_chain(&e)));
            return set;
        }
    };
    for file in files {
        match load_file(&file) {
            Ok(net) => {
                if let Some(first) = set.networks.get(&net.name) {
                    let msg = format!(
                        "CNI config {}: network {:?} is already defined by {}",
                        file.display(),
                        net.name,
                        first.source.display()
                    );
                    set.errors.push((file, msg));
                    continue;
                }
                if set.default.is_none() {
                    set.default = Some(net.name.clone());
                }
                set.networks.insert(net.name.clone(), net);
            }
            Err(e) => set.errors.push((file, crate::cni::chain::error_chain(&e))),
        }
    }
    set
}

/// The current network set, shared between the watcher (writer) and the
/// runner (readers). A std lock, held only to clone an `Arc` in or out.
#[derive(Debug, Default)]
pub struct NetworkStore {
    current: RwLock<Arc<NetworkSet>>,
}

impl NetworkStore {
    pub fn new(set: NetworkSet) -> Self {
        Self {
            current: RwLock::new(Arc::new(set)),
        }
    }

    /// The set as it is now; later changes don't affect the returned value.
    pub fn current(&self) -> Arc<NetworkSet> {
        read(&self.current).clone()
    }

    /// Replaces the set; returns whether it changed.
    pub fn replace(&self, set: NetworkSet) -> bool {
        let mut cur = write(&self.current);
        if **cur == set {
            return false;
        }
        *cur = Arc::new(set);
        true
    }
}

/// Quiet time after the last event of a burst before re-reading.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// A burst that never goes quiet is still read this soon after it began.
const MAX_DEBOUNCE: Duration = Duration::from_millis(500);
/// Periodic re-read: the safety net for missed events, and how a dir that
/// did not exist (or was replaced) gets watched again.
pub const RESCAN_EVERY: Duration = Duration::from_secs(10);

/// Keeps `store` equal to `load_dir(dir)`: re-reads after inotify events
/// (debounced), every [`RESCAN_EVERY`], and logs each change once. Never
/// returns (run it under a cancellation select).
pub async fn watch_dir(dir: PathBuf, store: Arc<NetworkStore>) {
    watch_dir_every(dir, store, RESCAN_EVERY).await
}

/// [`watch_dir`] with the periodic re-read interval explicit (tests).
pub async fn watch_dir_every(dir: PathBuf, store: Arc<NetworkStore>, rescan_every: Duration) {
    use notify::Watcher;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher: Option<(notify::RecommendedWatcher, std::fs::Metadata)> = None;
    let mut rescan = tokio::time::interval(rescan_every.max(Duration::from_millis(10)));
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut burst: Option<(tokio::time::Instant, tokio::time::Instant)>;
    loop {
        // (Re)establish the watch when there is none or the dir was replaced.
        let same_dir = |m: &std::fs::Metadata| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&dir).is_ok_and(|n| n.ino() == m.ino() && n.dev() == m.dev())
        };
        if watcher.as_ref().is_none_or(|(_, m)| !same_dir(m))
            && let Ok(meta) = std::fs::metadata(&dir)
        {
            let tx = tx.clone();
            let w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
                let relevant = match &ev {
                    Ok(ev) => !matches!(
                        ev.kind,
                        notify::EventKind::Access(notify::event::AccessKind::Open(_))
                            | notify::EventKind::Access(notify::event::AccessKind::Read)
                            | notify::EventKind::Access(notify::event::AccessKind::Close(
                                notify::event::AccessMode::Read
                            ))
                    ),
                    Err(_) => true,
                };
                if relevant {
                    let _ = tx.send(());
                }
            })
            .and_then(|mut w| {
                w.watch(&dir, notify::RecursiveMode::NonRecursive)?;
                Ok(w)
            });
            match w {
                Ok(w) => watcher = Some((w, meta)),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the CNI config dir; re-reading periodically")
                }
            }
        }
        let d = dir.clone();
        let set = match tokio::task::spawn_blocking(move || load_dir(&d)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "CNI config scan failed");
                NetworkSet::default()
            }
        };
        let old = store.current();
        if store.replace(set) {
            log_change(&dir, &old, &store.current());
        }
        burst = None;
        // Wait for the next reason to re-read.
        loop {
            let deadline = burst.map(|(first, last)| (last + DEBOUNCE).min(first + MAX_DEBOUNCE));
            tokio::select! {
                ev = rx.recv() => {
                    if ev.is_some() {
                        let now = tokio::time::Instant::now();
                        burst = Some(burst.map_or((now, now), |(f, _)| (f, now)));
                    }
                }
                () = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => break,
                _ = rescan.tick() => break,
            }
        }
    }
}

fn log_change(dir: &Path, old: &NetworkSet, new: &NetworkSet) {
    for (file, msg) in new.errors.iter().filter(|e| !old.errors.contains(e)) {
        tracing::warn!(file = %file.display(), error = %msg, "bad CNI network config");
    }
    tracing::info!(
        dir = %dir.display(),
        networks = ?new.networks.keys().collect::<Vec<_>>(),
        default = ?new.default,
        errors = new.errors.len(),
        "CNI networks changed; new pods use them"
    );
}

/// Spec: a network name starts with an alphanumeric character, followed by
/// alphanumerics, `_`, `.` or `-`. It becomes part of a cache file name, so
/// this also keeps it a single path component.
pub fn validate_network_name(name: &str) -> Result<(), String> {
    if is_identifier(name) {
        Ok(())
    } else {
        Err(format!(
            "network name {name:?} must start with a letter or digit and hold only letters, digits, '_', '.', '-'"
        ))
    }
}

/// The spec's identifier rule, shared by network names and container ids.
pub(crate) fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A plugin type is looked up as a file name in the bin dirs.
fn valid_plugin_type(t: &str) -> bool {
    !t.is_empty() && t != "." && t != ".." && !t.contains('/') && !t.contains('\0')
}

/// `MAJOR.MINOR.PATCH` with numeric parts (all CNI versions look like this).
pub(crate) fn is_semver(v: &str) -> bool {
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_list(s: &str) -> Result<NetworkConfigList, CniConfigError> {
        parse(s.as_bytes(), true, Path::new("/x/10-net.conflist"))
    }

    #[test]
    fn valid_list_keeps_raw_plugins() {
        let l = parse_list(
            r#"{"cniVersion":"1.0.0","name":"net","plugins":[
                {"type":"bridge","bridge":"br0","ipam":{"type":"host-local"}},
                {"type":"portmap","capabilities":{"portMappings":true,"other":false}}]}"#,
        )
        .unwrap();
        assert_eq!(l.name, "net");
        assert_eq!(l.cni_version, "1.0.0");
        assert_eq!(l.plugins.len(), 2);
        assert_eq!(l.plugins[0].plugin_type, "bridge");
        assert_eq!(l.plugins[0].raw["bridge"], "br0");
        assert!(!l.plugins[0].has_capability("portMappings"));
        assert!(l.plugins[1].has_capability("portMappings"));
        assert!(!l.plugins[1].has_capability("other"));
    }

    #[test]
    fn single_conf_becomes_list() {
        let l = parse(
            br#"{"cniVersion":"0.4.0","name":"one","type":"bridge","bridge":"b"}"#,
            false,
            Path::new("/x/a.conf"),
        )
        .unwrap();
        assert_eq!(l.name, "one");
        assert_eq!(l.cni_version, "0.4.0");
        assert_eq!(l.plugins.len(), 1);
        assert_eq!(l.plugins[0].raw["bridge"], "b");
        let round: Value = serde_json::from_slice(&l.bytes).unwrap();
        assert_eq!(round["plugins"][0]["type"], "bridge");
        assert_eq!(round["name"], "one");
    }

    #[test]
    fn invalid_configs_name_file_and_problem() {
        let cases = [
            (r#"[]"#, "not a JSON object"),
            (
                r#"{"cniVersion":"1.0.0","plugins":[{"type":"a"}]}"#,
                "missing \"name\"",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"-x","plugins":[{"type":"a"}]}"#,
                "network name",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"a/b","plugins":[{"type":"a"}]}"#,
                "network name",
            ),
            (
                r#"{"name":"n","plugins":[{"type":"a"}]}"#,
                "missing \"cniVersion\"",
            ),
            (
                r#"{"cniVersion":"one","name":"n","plugins":[{"type":"a"}]}"#,
                "not a version",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
                "\"plugins\" is empty",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n"}"#,
                "missing \"plugins\"",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"bridge":"x"}]}"#,
                "plugin 0 has no string \"type\"",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"a"},{"type":"../sh"}]}"#,
                "plugin 1 has an invalid",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"a"},3]}"#,
                "plugin 1 is not a JSON object",
            ),
        ];
        for (input, want) in cases {
            let err = parse_list(input).unwrap_err().to_string();
            assert!(err.contains("/x/10-net.conflist"), "{input}: {err}");
            assert!(err.contains(want), "{input}: {err} should contain {want}");
        }
        let err = parse_list("{not json").unwrap_err();
        assert!(matches!(err, CniConfigError::Parse { .. }));
    }

    #[test]
    fn default_is_first_config_file_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let conf =
            |name: &str| format!(r#"{{"cniVersion":"1.0.0","name":"{name}","type":"bridge"}}"#);
        std::fs::write(dir.path().join("20-b.conf"), conf("b")).unwrap();
        std::fs::write(dir.path().join("30-c.json"), conf("c")).unwrap();
        std::fs::write(dir.path().join("05-ignored.txt"), "x").unwrap();
        std::fs::write(dir.path().join(".00-hidden.conf"), "x").unwrap();
        assert_eq!(load_default(dir.path()).unwrap().name, "b");
        std::fs::write(
            dir.path().join("10-a.conflist"),
            r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        let l = load_default(dir.path()).unwrap();
        assert_eq!(l.name, "a");
        assert_eq!(l.source, dir.path().join("10-a.conflist"));

        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_default(empty.path()),
            Err(CniConfigError::NoConfig { .. })
        ));
        assert!(matches!(
            load_default(&empty.path().join("missing")),
            Err(CniConfigError::ReadDir { .. })
        ));
    }

    fn write(dir: &Path, name: &str, body: &str) {
        std::fs::write(dir.join(name), body).unwrap();
    }

    fn list(name: &str, plugin: &str) -> String {
        format!(r#"{{"cniVersion":"1.0.0","name":"{name}","plugins":[{{"type":"{plugin}"}}]}}"#)
    }

    #[test]
    fn load_dir_keeps_good_networks_and_names_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "05-broken.conflist", "{not json");
        write(d, "10-a.conflist", &list("net-a", "bridge"));
        write(
            d,
            "20-b.conf",
            r#"{"cniVersion":"0.4.0","name":"net-b","type":"macvlan"}"#,
        );
        write(d, "30-dup.conflist", &list("net-a", "ptp"));
        write(
            d,
            "40-old.conflist",
            r#"{"cniVersion":"0.2.0","name":"old","plugins":[{"type":"x"}]}"#,
        );
        write(
            d,
            "50-noplugins.conflist",
            r#"{"cniVersion":"1.0.0","name":"np"}"#,
        );
        write(
            d,
            "60-notype.conflist",
            r#"{"cniVersion":"1.1.0","name":"nt","plugins":[{}]}"#,
        );
        write(d, "README.md", "not a config");
        let set = load_dir(d);
        // The default is the first *valid* file by name.
        assert_eq!(set.default.as_deref(), Some("net-a"));
        assert_eq!(set.networks.keys().collect::<Vec<_>>(), ["net-a", "net-b"]);
        assert_eq!(set.get("").unwrap().plugins[0].plugin_type, "bridge");
        assert_eq!(set.get("net-b").unwrap().cni_version, "0.4.0");
        assert!(set.get("nope").is_none());
        let errs: Vec<(String, &str)> = set
            .errors
            .iter()
            .map(|(p, m)| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    m.as_str(),
                )
            })
            .collect();
        let want = [
            ("05-broken.conflist", "not valid JSON"),
            ("30-dup.conflist", "network \"net-a\" is already defined by"),
            ("40-old.conflist", "cniVersion \"0.2.0\" is not supported"),
            ("50-noplugins.conflist", "missing \"plugins\""),
            ("60-notype.conflist", "plugin 0 has no string \"type\""),
        ];
        assert_eq!(errs.len(), want.len(), "{errs:?}");
        for ((file, msg), (wfile, wmsg)) in errs.iter().zip(want) {
            assert_eq!(file, wfile);
            assert!(msg.contains(wmsg), "{file}: {msg}");
            // One line per file, naming it.
            assert!(msg.contains(wfile) && !msg.contains('\n'), "{msg}");
        }

        let missing = load_dir(&d.join("missing"));
        assert!(missing.networks.is_empty() && missing.default.is_none());
        assert!(missing.errors[0].1.contains("cannot read CNI config dir"));
    }

    #[tokio::test]
    async fn watcher_applies_a_change_within_a_second() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "10-a.conflist", &list("net-a", "bridge"));
        let store = Arc::new(NetworkStore::default());
        // A long periodic re-read: only inotify can be this fast.
        let task = tokio::spawn(watch_dir_every(
            dir.path().to_path_buf(),
            store.clone(),
            Duration::from_secs(3600),
        ));
        let st = store.clone();
        tokio::task::spawn_blocking(move || {
            let wait_for = |pred: &dyn Fn(&NetworkSet) -> bool| {
                let start = std::time::Instant::now();
                loop {
                    if pred(&st.current()) {
                        return;
                    }
                    assert!(
                        start.elapsed() < Duration::from_secs(1),
                        "{:?}",
                        st.current()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            };
            wait_for(&|s| s.default.as_deref() == Some("net-a"));
            // A new file that sorts first becomes the default.
            write(dir.path(), "05-z.conflist", &list("net-z", "ptp"));
            wait_for(&|s| s.default.as_deref() == Some("net-z") && s.networks.len() == 2);
            // Editor style: write a temp file, rename it over the config.
            write(dir.path(), ".tmp", &list("net-a", "macvlan"));
            std::fs::rename(dir.path().join(".tmp"), dir.path().join("10-a.conflist")).unwrap();
            wait_for(&|s| {
                s.get("net-a")
                    .is_some_and(|n| n.plugins[0].plugin_type == "macvlan")
            });
            // A broken edit: the network goes, the error names the file.
            write(dir.path(), "05-z.conflist", "{");
            wait_for(&|s| s.default.as_deref() == Some("net-a") && s.errors.len() == 1);
            std::fs::remove_file(dir.path().join("05-z.conflist")).unwrap();
            wait_for(&|s| s.errors.is_empty());
        })
        .await
        .unwrap();
        task.abort();
    }

    #[test]
    fn example_conflist_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cni/10-bridge.conflist");
        let l = load_file(&path).unwrap();
        let types: Vec<_> = l.plugins.iter().map(|p| p.plugin_type.as_str()).collect();
        assert_eq!(types, ["bridge", "portmap", "firewall"]);
        assert_eq!(l.cni_version, "1.0.0");
        assert!(l.plugins[1].has_capability("portMappings"));
    }
}
