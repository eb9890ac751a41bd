//! CNI versions: comparing them, what a plugin's VERSION answer says, and
//! converting results between the two result formats the spec has had since
//! 0.3.0, the way libcni does:
//!
//! - 0.3.0, 0.3.1, 0.4.0: each entry of `ips` carries `"version": "4"|"6"`;
//!   interfaces are `{name, mac, sandbox}`, routes `{dst, gw}`.
//! - 1.0.0, 1.1.0: no `version` on ips; 1.1.0 adds optional interface
//!   (`mtu`, `socketPath`, `pciID`) and route (`mtu`, `advmss`, `priority`,
//!   `table`, `scope`) fields that 1.0.0 readers ignore.
//!
//! Going down to 0.x drops what the older format has no field for; going up
//! drops `version`. Within a format only `cniVersion` changes. 0.1.0/0.2.0
//! (the legacy `ip4`/`ip6` result) are refused.
//!
//! Side effects: none.

use serde_json::{Map, Value};

/// The result versions minilet reads and writes.
pub const RESULT_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A parsed `MAJOR.MINOR.PATCH`.
pub type Version = (u32, u32, u32);

/// Parses `MAJOR.MINOR.PATCH`; `None` for anything else.
pub fn parse(v: &str) -> Option<Version> {
    let mut it = v.split('.').map(|p| {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            p.parse::<u32>().ok()
        }
    });
    let v = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(v)
}

/// `a >= b` for version strings; an unparsable `a` is never ≥.
pub fn at_least(a: &str, b: &str) -> bool {
    match (parse(a), parse(b)) {
        (Some(a), Some(b)) => a >= b,
        _ => false,
    }
}

/// The two result formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// 0.3.0 … 0.4.0.
    V04,
    /// 1.0.0 and later.
    V1,
}

fn format_of(v: &str) -> Option<Format> {
    match parse(v)? {
        (0, 3, _) | (0, 4, _) => Some(Format::V04),
        (1, _, _) => Some(Format::V1),
        _ => None,
    }
}

/// Why a result could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// The result's own `cniVersion` is missing or not one we read.
    #[error("result version {have:?} is not supported (supported: {RESULT_VERSIONS:?})")]
    UnsupportedSource { have: String },
    /// The wanted version is not one we write.
    #[error("cannot convert a result to version {want:?} (supported: {RESULT_VERSIONS:?})")]
    UnsupportedTarget { want: String },
    /// The result is not a JSON object.
    #[error("result is not a JSON object")]
    NotAnObject,
}

/// Converts a result object to `want`, as libcni's `GetAsVersion` does.
pub fn convert_result(result: &Value, want: &str) -> Result<Value, ConvertError> {
    let Value::Object(obj) = result else {
        return Err(ConvertError::NotAnObject);
    };
    let have = obj
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let from = format_of(&have)
        .filter(|_| RESULT_VERSIONS.contains(&have.as_str()))
        .ok_or(ConvertError::UnsupportedSource { have: have.clone() })?;
    let to = format_of(want)
        .filter(|_| RESULT_VERSIONS.contains(&want))
        .ok_or_else(|| ConvertError::UnsupportedTarget { want: want.into() })?;
    let mut out = obj.clone();
    match (from, to) {
        (Format::V04, Format::V04) | (Format::V1, Format::V1) => {}
        (Format::V04, Format::V1) => {
            if let Some(Value::Array(ips)) = out.get_mut("ips") {
                for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
                    ip.remove("version");
                }
            }
        }
        (Format::V1, Format::V04) => to_v04(&mut out),
    }
    out.insert("cniVersion".into(), Value::String(want.to_owned()));
    Ok(Value::Object(out))
}

/// Keeps only the keys of `obj` in `keep`.
fn retain(obj: &mut Map<String, Value>, keep: &[&str]) {
    obj.retain(|k, _| keep.contains(&k.as_str()));
}

/// 1.x → 0.3/0.4: `version` from the address family, fields the old types
/// lack dropped (libcni's 0.4.0 types simply have no place for them).
fn to_v04(out: &mut Map<String, Value>) {
    if let Some(Value::Array(ifaces)) = out.get_mut("interfaces") {
        for i in ifaces.iter_mut().filter_map(Value::as_object_mut) {
            retain(i, &["name", "mac", "sandbox"]);
        }
    }
    if let Some(Value::Array(ips)) = out.get_mut("ips") {
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            let v6 = ip
                .get("address")
                .and_then(Value::as_str)
                .is_some_and(|a| a.contains(':'));
            retain(ip, &["interface", "address", "gateway"]);
            ip.insert(
                "version".into(),
                Value::String(if v6 { "6" } else { "4" }.into()),
            );
        }
    }
    if let Some(Value::Array(routes)) = out.get_mut("routes") {
        for r in routes.iter_mut().filter_map(Value::as_object_mut) {
            retain(r, &["dst", "gw"]);
        }
    }
    retain(out, &["cniVersion", "interfaces", "ips", "routes", "dns"]);
}

/// A plugin's answer to VERSION.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct PluginInfo {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// Spec: plugins that predate VERSION support only 0.1.0; the field
    /// is required otherwise.
    #[serde(rename = "supportedVersions", default)]
    pub supported_versions: Vec<String>,
}

impl PluginInfo {
    pub fn supports(&self, version: &str) -> bool {
        self.supported_versions.iter().any(|v| v == version)
    }

    /// "0.1.0…1.0.0" for messages.
    pub fn range(&self) -> String {
        let mut vs: Vec<&String> = self.supported_versions.iter().collect();
        vs.sort_by_key(|v| parse(v).unwrap_or_default());
        match (vs.first(), vs.last()) {
            (Some(a), Some(b)) if a == b => a.to_string(),
            (Some(a), Some(b)) => format!("{a}…{b}"),
            _ => "nothing".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_and_compare() {
        assert_eq!(parse("1.1.0"), Some((1, 1, 0)));
        assert_eq!(parse("0.10.2"), Some((0, 10, 2)));
        for bad in ["", "1.0", "1.0.0.0", "a.b.c", "1..0", "-1.0.0", "+1.0.0"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert!(at_least("1.1.0", "1.1.0"));
        assert!(at_least("1.10.0", "1.9.0"));
        assert!(!at_least("0.4.0", "1.0.0"));
        assert!(at_least("0.4.0", "0.4.0"));
        assert!(!at_least("x", "0.1.0"));
    }

    fn v1(version: &str) -> Value {
        json!({
            "cniVersion": version,
            "interfaces": [
                {"name": "br0", "mac": "aa:bb:cc:dd:ee:ff"},
                {"name": "eth0", "mac": "11:22:33:44:55:66", "sandbox": "/var/run/netns/x", "mtu": 1400, "pciID": "0000:00:01.0"}
            ],
            "ips": [
                {"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 1},
                {"address": "fd00::5/64", "gateway": "fd00::1", "interface": 1}
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1", "mtu": 1300, "table": 100}],
            "dns": {"nameservers": ["10.96.0.10"], "search": ["svc"]}
        })
    }

    fn v04(version: &str) -> Value {
        json!({
            "cniVersion": version,
            "interfaces": [
                {"name": "br0", "mac": "aa:bb:cc:dd:ee:ff"},
                {"name": "eth0", "mac": "11:22:33:44:55:66", "sandbox": "/var/run/netns/x"}
            ],
            "ips": [
                {"version": "4", "address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 1},
                {"version": "6", "address": "fd00::5/64", "gateway": "fd00::1", "interface": 1}
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}],
            "dns": {"nameservers": ["10.96.0.10"], "search": ["svc"]}
        })
    }

    /// v1 without the 1.1-only fields: what a round trip through 0.4 keeps.
    fn v1_plain(version: &str) -> Value {
        let mut v = v1(version);
        let eth0 = v["interfaces"][1].as_object_mut().unwrap();
        eth0.remove("mtu");
        eth0.remove("pciID");
        let r = v["routes"][0].as_object_mut().unwrap();
        r.remove("mtu");
        r.remove("table");
        v
    }

    #[test]
    fn conversion_table() {
        let cases: Vec<(Value, &str, Value)> = vec![
            // Same format: relabel only.
            (v04("0.3.0"), "0.3.1", v04("0.3.1")),
            (v04("0.4.0"), "0.3.0", v04("0.3.0")),
            (v1("1.1.0"), "1.0.0", v1("1.0.0")),
            (v1("1.0.0"), "1.1.0", v1("1.1.0")),
            (v1("1.0.0"), "1.0.0", v1("1.0.0")),
            // Down: version from the address family, newer fields dropped.
            (v1("1.1.0"), "0.4.0", v04("0.4.0")),
            (v1("1.0.0"), "0.3.1", v04("0.3.1")),
            (v1("1.0.0"), "0.3.0", v04("0.3.0")),
            // Up: version dropped.
            (v04("0.4.0"), "1.0.0", v1_plain("1.0.0")),
            (v04("0.3.1"), "1.1.0", v1_plain("1.1.0")),
            (v04("0.3.0"), "1.0.0", v1_plain("1.0.0")),
        ];
        for (input, want_version, want) in cases {
            let got = convert_result(&input, want_version).unwrap();
            assert_eq!(got, want, "{} -> {want_version}", input["cniVersion"]);
        }
        // Round trip 1.0 -> 0.4 -> 1.0 keeps everything 1.0 has.
        let back = convert_result(
            &convert_result(&v1_plain("1.0.0"), "0.4.0").unwrap(),
            "1.0.0",
        );
        assert_eq!(back.unwrap(), v1_plain("1.0.0"));
        // Minimal results (no ips / interfaces) convert too.
        assert_eq!(
            convert_result(&json!({"cniVersion": "1.0.0"}), "0.4.0").unwrap(),
            json!({"cniVersion": "0.4.0"})
        );
    }

    #[test]
    fn conversion_refusals() {
        let cases = [
            (json!({"cniVersion": "0.2.0", "ip4": {}}), "1.0.0", "0.2.0"),
            (json!({"ips": []}), "1.0.0", "\"\""),
            (json!({"cniVersion": "2.0.0"}), "1.0.0", "2.0.0"),
            (json!({"cniVersion": "1.0.0"}), "0.2.0", "0.2.0"),
            (json!({"cniVersion": "1.0.0"}), "1.2.0", "1.2.0"),
            (json!([1]), "1.0.0", "not a JSON object"),
        ];
        for (input, want, msg) in cases {
            let e = convert_result(&input, want).unwrap_err().to_string();
            assert!(e.contains(msg), "{input} -> {want}: {e}");
        }
    }

    #[test]
    fn plugin_info_range() {
        let info: PluginInfo = serde_json::from_value(json!({
            "cniVersion": "1.0.0",
            "supportedVersions": ["1.0.0", "0.1.0", "0.4.0", "0.3.1"]
        }))
        .unwrap();
        assert!(info.supports("0.4.0"));
        assert!(!info.supports("1.1.0"));
        assert_eq!(info.range(), "0.1.0…1.0.0");
    }
}
