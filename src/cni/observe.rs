//! What the CNI code tells people about itself, in memory only:
//!
//! - [`CniMetrics`]: per (network, plugin, command, result) counters and
//!   total durations of plugin execs, rendered in the Prometheus text format;
//! - [`CniEvents`]: a bounded list of Kubernetes-style events per pod uid
//!   (`CNIPluginTiming`, `CNIError`, …), for the pod's events display;
//! - [`NetworkStatusBoard`]: per pod uid, the Multus-convention
//!   `k8s.v1.cni.cncf.io/network-status` list the last ADD produced.
//!
//! All three are shared (`Arc`) between the CNI server and whoever displays
//! them; each holds a std mutex only for the copy in or out.
//!
//! Side effects: none.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::locks::lock;

/// The pod annotation holding the network status (Multus convention).
pub const NETWORK_STATUS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/network-status";

/// Key of one counter series.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MetricKey {
    pub network: String,
    pub plugin: String,
    /// ADD, DEL, CHECK, GC, STATUS, VERSION.
    pub command: String,
    /// `success` or `error`.
    pub result: &'static str,
}

/// Count and total time of one series.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricValue {
    pub count: u64,
    pub total: Duration,
}

/// Counters of plugin execs ("metrics-ready": `render` is what a
/// `/metrics` endpoint serves).
#[derive(Debug, Default)]
pub struct CniMetrics {
    series: Mutex<BTreeMap<MetricKey, MetricValue>>,
}

impl CniMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one plugin exec.
    pub fn record(&self, network: &str, plugin: &str, command: &str, ok: bool, took: Duration) {
        let key = MetricKey {
            network: network.to_owned(),
            plugin: plugin.to_owned(),
            command: command.to_owned(),
            result: if ok { "success" } else { "error" },
        };
        let mut s = lock(&self.series);
        let v = s.entry(key).or_default();
        v.count += 1;
        v.total += took;
    }

    /// Every series, sorted.
    pub fn snapshot(&self) -> Vec<(MetricKey, MetricValue)> {
        let s = lock(&self.series);
        s.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let snap = self.snapshot();
        let mut out = String::new();
        type Family = (&'static str, &'static str, fn(&MetricValue) -> String);
        let families: [Family; 2] = [
            (
                "minilet_cni_plugin_operations_total",
                "CNI plugin executions by network, plugin, command and result.",
                |v| v.count.to_string(),
            ),
            (
                "minilet_cni_plugin_duration_seconds_sum",
                "Total seconds spent in CNI plugin executions.",
                |v| format!("{}", v.total.as_secs_f64()),
            ),
        ];
        for (name, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (k, v) in &snap {
                let _ = writeln!(
                    out,
                    "{name}{{network=\"{}\",plugin=\"{}\",command=\"{}\",result=\"{}\"}} {}",
                    escape_label(&k.network),
                    escape_label(&k.plugin),
                    escape_label(&k.command),
                    k.result,
                    value(v)
                );
            }
        }
        out
    }
}

/// Label values escape `\`, `"` and newlines (exposition format).
fn escape_label(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

/// Kubernetes event types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    Normal,
    Warning,
}

/// One event about a pod's networking.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CniEvent {
    pub time: jiff::Timestamp,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// CamelCase reason: `CNIPluginTiming`, `CNIError`, `CNICheckFailed`, ….
    pub reason: String,
    pub message: String,
}

/// Events kept per pod; older ones are dropped first.
pub const EVENTS_PER_POD: usize = 32;

/// Per-pod event lists, filled by the CNI server.
#[derive(Debug, Default)]
pub struct CniEvents {
    pods: Mutex<HashMap<String, VecDeque<CniEvent>>>,
}

impl CniEvents {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an event for pod `uid` (dropping the oldest beyond the bound).
    pub fn push(&self, uid: &str, kind: EventType, reason: &str, message: impl Into<String>) {
        let ev = CniEvent {
            time: jiff::Timestamp::now(),
            kind,
            reason: reason.to_owned(),
            message: message.into(),
        };
        let mut pods = lock(&self.pods);
        let list = pods.entry(uid.to_owned()).or_default();
        if list.len() == EVENTS_PER_POD {
            list.pop_front();
        }
        list.push_back(ev);
    }

    /// The pod's events, oldest first.
    pub fn events(&self, uid: &str) -> Vec<CniEvent> {
        let pods = lock(&self.pods);
        pods.get(uid)
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets pods for which `keep` is false (pods that are gone).
    pub fn retain(&self, mut keep: impl FnMut(&str) -> bool) {
        let mut pods = lock(&self.pods);
        pods.retain(|uid, _| keep(uid));
    }
}

/// One attachment in the Multus `network-status` convention.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetworkStatus {
    /// The network name (`namespace/name` when the selection named one).
    pub name: String,
    pub interface: String,
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default)]
    pub default: bool,
    #[serde(default)]
    pub dns: Value,
}

impl NetworkStatus {
    /// From a chain's result: the interface named `ifname` inside a sandbox,
    /// the IPs pointing at it (without the prefix length, as Multus reports
    /// them), its mac, and the result's dns.
    pub fn from_result(name: &str, ifname: &str, default: bool, result: &Value) -> Self {
        let ifaces = result
            .get("interfaces")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let idx = ifaces
            .iter()
            .position(|i| {
                i.get("name").and_then(Value::as_str) == Some(ifname) && i.get("sandbox").is_some()
            })
            .or_else(|| {
                ifaces
                    .iter()
                    .position(|i| i.get("name").and_then(Value::as_str) == Some(ifname))
            });
        let mac = idx
            .and_then(|i| ifaces[i].get("mac"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let ips = result
            .get("ips")
            .and_then(Value::as_array)
            .map(|ips| {
                ips.iter()
                    .filter(
                        |ip| match (ip.get("interface").and_then(Value::as_u64), idx) {
                            (Some(i), Some(want)) => i as usize == want,
                            // No index in the result: the IP is the attachment's.
                            (None, _) => true,
                            (Some(_), None) => false,
                        },
                    )
                    .filter_map(|ip| ip.get("address").and_then(Value::as_str))
                    .map(|a| a.split('/').next().unwrap_or(a).to_owned())
                    .collect()
            })
            .unwrap_or_default();
        let dns = result
            .get("dns")
            .cloned()
            .unwrap_or_else(|| Value::Object(Default::default()));
        Self {
            name: name.to_owned(),
            interface: ifname.to_owned(),
            ips,
            mac,
            default,
            dns,
        }
    }
}

/// Pod uid → its network status list, written by the CNI server on ADD and
/// cleared on DEL; read when building the pod's status.
#[derive(Debug, Default)]
pub struct NetworkStatusBoard {
    pods: Mutex<HashMap<String, Vec<NetworkStatus>>>,
}

impl NetworkStatusBoard {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, uid: &str, status: Vec<NetworkStatus>) {
        let mut p = lock(&self.pods);
        p.insert(uid.to_owned(), status);
    }

    pub fn get(&self, uid: &str) -> Option<Vec<NetworkStatus>> {
        let p = lock(&self.pods);
        p.get(uid).cloned()
    }

    /// The annotation value (a JSON list), as Multus writes it.
    pub fn annotation(&self, uid: &str) -> Option<String> {
        self.get(uid)
            .and_then(|s| match serde_json::to_string(&s) {
                Ok(text) => Some(text),
                Err(error) => {
                    tracing::warn!(pod_uid = %uid, %error, "cannot encode the network-status annotation");
                    None
                }
            })
    }

    pub fn remove(&self, uid: &str) {
        let mut p = lock(&self.pods);
        p.remove(uid);
    }
}

/// "12ms" / "1.25s" for event messages.
pub fn short_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metrics_render_prometheus_text() {
        let m = CniMetrics::new();
        m.record("net", "bridge", "ADD", true, Duration::from_millis(12));
        m.record("net", "bridge", "ADD", true, Duration::from_millis(8));
        m.record("net", "portmap", "ADD", false, Duration::from_millis(500));
        m.record("we\"ird\\", "x", "DEL", true, Duration::ZERO);
        let text = m.render();
        let want = r#"# HELP minilet_cni_plugin_operations_total CNI plugin executions by network, plugin, command and result.
# TYPE minilet_cni_plugin_operations_total counter
minilet_cni_plugin_operations_total{network="net",plugin="bridge",command="ADD",result="success"} 2
minilet_cni_plugin_operations_total{network="net",plugin="portmap",command="ADD",result="error"} 1
minilet_cni_plugin_operations_total{network="we\"ird\\",plugin="x",command="DEL",result="success"} 1
# HELP minilet_cni_plugin_duration_seconds_sum Total seconds spent in CNI plugin executions.
# TYPE minilet_cni_plugin_duration_seconds_sum counter
minilet_cni_plugin_duration_seconds_sum{network="net",plugin="bridge",command="ADD",result="success"} 0.02
minilet_cni_plugin_duration_seconds_sum{network="net",plugin="portmap",command="ADD",result="error"} 0.5
minilet_cni_plugin_duration_seconds_sum{network="we\"ird\\",plugin="x",command="DEL",result="success"} 0
"#;
        assert_eq!(text, want);
        assert_eq!(m.snapshot()[0].1.count, 2);
    }

    #[test]
    fn events_are_bounded_per_pod() {
        let e = CniEvents::new();
        for i in 0..EVENTS_PER_POD + 5 {
            e.push("u1", EventType::Normal, "CNIPluginTiming", format!("m{i}"));
        }
        e.push("u2", EventType::Warning, "CNIError", "boom");
        let list = e.events("u1");
        assert_eq!(list.len(), EVENTS_PER_POD);
        assert_eq!(list[0].message, "m5");
        assert_eq!(e.events("u2")[0].kind, EventType::Warning);
        e.retain(|uid| uid == "u2");
        assert!(e.events("u1").is_empty());
        let v = serde_json::to_value(&e.events("u2")[0]).unwrap();
        assert_eq!(v["type"], "Warning");
        assert_eq!(v["reason"], "CNIError");
    }

    #[test]
    fn network_status_from_result() {
        let r = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa:aa:aa:aa:aa:aa"},
                {"name": "veth1", "mac": "bb:bb:bb:bb:bb:bb"},
                {"name": "eth0", "mac": "cc:cc:cc:cc:cc:cc", "sandbox": "/var/run/netns/x"}
            ],
            "ips": [
                {"address": "10.0.0.5/24", "interface": 2},
                {"address": "fd00::5/64", "interface": 2},
                {"address": "192.168.0.1/24", "interface": 0}
            ],
            "dns": {"nameservers": ["1.1.1.1"]}
        });
        let s = NetworkStatus::from_result("minilet-bridge", "eth0", true, &r);
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({"name": "minilet-bridge", "interface": "eth0", "ips": ["10.0.0.5", "fd00::5"],
                   "mac": "cc:cc:cc:cc:cc:cc", "default": true, "dns": {"nameservers": ["1.1.1.1"]}})
        );
        let bare = NetworkStatus::from_result(
            "ns/net-a",
            "net1",
            false,
            &json!({"cniVersion": "1.0.0", "ips": [{"address": "10.9.0.2/16"}]}),
        );
        assert_eq!(
            serde_json::to_value(&bare).unwrap(),
            json!({"name": "ns/net-a", "interface": "net1", "ips": ["10.9.0.2"], "default": false, "dns": {}})
        );
        let board = NetworkStatusBoard::new();
        board.set("u", vec![s, bare]);
        let ann: Value = serde_json::from_str(&board.annotation("u").unwrap()).unwrap();
        assert_eq!(ann[1]["interface"], "net1");
        board.remove("u");
        assert!(board.get("u").is_none());
    }

    #[test]
    fn durations_for_messages() {
        assert_eq!(short_duration(Duration::from_millis(12)), "12ms");
        assert_eq!(short_duration(Duration::from_millis(1250)), "1.25s");
    }
}
