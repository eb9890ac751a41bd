//! Network configuration: finds and validates the network minilet runs from
//! its own CNI config dir (`cniConfDir`), in the CNI spec's file formats.
//!
//! The default network is the first file by name ending in `.conflist`,
//! `.conf` or `.json` (the convention libcni-based runtimes follow). A
//! single-plugin `.conf`/`.json` becomes a one-plugin list. Each plugin keeps
//! its raw JSON object: plugins define arbitrary keys of their own.
//!
//! Side effects: reads the config dir and the chosen file. Nothing else.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

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
        let bytes = serde_json::to_vec(&list).expect("a JSON map serialises");
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

    #[test]
    fn example_conflist_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cni/10-bridge.conflist");
        let l = load_file(&path).unwrap();
        let types: Vec<_> = l.plugins.iter().map(|p| p.plugin_type.as_str()).collect();
        assert_eq!(types, ["bridge", "portmap"]);
        assert_eq!(l.cni_version, "1.0.0");
        assert!(l.plugins[1].has_capability("portMappings"));
    }
}
