//! What a pod asks of the network, read from its annotations: the extra
//! networks of `k8s.v1.cni.cncf.io/networks` (the Multus convention) and
//! the bandwidth limits of `kubernetes.io/ingress-bandwidth` /
//! `kubernetes.io/egress-bandwidth`, turned into CNI capability arguments.
//!
//! Networks are looked up by name in minilet's config dir; a `namespace/`
//! prefix is accepted (and reported back in `network-status`) but does not
//! select anything: minilet has no NetworkAttachmentDefinition objects.
//!
//! Side effects: none.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The pod annotation selecting extra networks.
pub const NETWORKS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/networks";
/// Kubernetes' traffic shaping annotations (bits per second, quantities).
pub const INGRESS_BANDWIDTH_ANNOTATION: &str = "kubernetes.io/ingress-bandwidth";
pub const EGRESS_BANDWIDTH_ANNOTATION: &str = "kubernetes.io/egress-bandwidth";

/// Burst given with every rate: containerd's CRI plugin passes
/// `math.MaxUint32` (bits) so that only the rate limits.
pub const BANDWIDTH_BURST: u64 = u32::MAX as u64;

/// One element of the networks annotation (its JSON form's fields; the text
/// form fills name, namespace and interface).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct NetworkSelection {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    /// The interface name in the pod; `net<N>` when absent.
    #[serde(default)]
    pub interface: Option<String>,
    /// Static IPs (CIDR notation), the `ips` capability.
    #[serde(default)]
    pub ips: Vec<String>,
    /// The `mac` capability.
    #[serde(default)]
    pub mac: Option<String>,
}

impl NetworkSelection {
    /// `namespace/name`, or `name`.
    pub fn display_name(&self) -> String {
        match &self.namespace {
            Some(ns) if !ns.is_empty() => format!("{ns}/{}", self.name),
            _ => self.name.clone(),
        }
    }

    /// The `runtimeConfig` capability args this selection carries.
    pub fn capability_args(&self) -> Map<String, Value> {
        let mut m = Map::new();
        if !self.ips.is_empty() {
            m.insert("ips".into(), json!(self.ips));
        }
        if let Some(mac) = &self.mac {
            m.insert("mac".into(), json!(mac));
        }
        m
    }
}

/// Parses the networks annotation: either a JSON list of selection objects,
/// or comma-separated `name`, `namespace/name`, `name@ifname`,
/// `namespace/name@ifname`. Empty means no extra networks.
pub fn parse_networks(s: &str) -> Result<Vec<NetworkSelection>, String> {
    let t = s.trim();
    if t.is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<NetworkSelection> = if t.starts_with('[') {
        serde_json::from_str(t).map_err(|e| format!("{NETWORKS_ANNOTATION}: invalid JSON: {e}"))?
    } else {
        t.split(',')
            .map(str::trim)
            .map(|item| {
                if item.is_empty() {
                    return Err(format!("{NETWORKS_ANNOTATION}: empty element in {s:?}"));
                }
                let (rest, interface) = match item.split_once('@') {
                    Some((r, i)) => (r, Some(i.to_owned())),
                    None => (item, None),
                };
                let (namespace, name) = match rest.split_once('/') {
                    Some((ns, n)) => (Some(ns.to_owned()), n),
                    None => (None, rest),
                };
                Ok(NetworkSelection {
                    name: name.to_owned(),
                    namespace,
                    interface,
                    ..Default::default()
                })
            })
            .collect::<Result<_, _>>()?
    };
    for sel in &list {
        if let Err(e) = super::config::validate_network_name(&sel.name) {
            return Err(format!("{NETWORKS_ANNOTATION}: {e}"));
        }
        if let Some(ns) = &sel.namespace
            && (ns.is_empty() || ns.contains('/') || ns.contains('@'))
        {
            return Err(format!("{NETWORKS_ANNOTATION}: invalid namespace {ns:?}"));
        }
        if let Some(i) = &sel.interface
            && let Err(e) = super::chain::validate_ifname(i)
        {
            return Err(format!("{NETWORKS_ANNOTATION}: {e}"));
        }
    }
    Ok(list)
}

/// The interface names of the extra networks: the requested one, else
/// `net1`, `net2`, … by position (Multus' rule); duplicates (or `eth0`)
/// are an error.
pub fn extra_interfaces(sel: &[NetworkSelection], primary: &str) -> Result<Vec<String>, String> {
    let mut names: Vec<String> = Vec::with_capacity(sel.len());
    for (i, s) in sel.iter().enumerate() {
        let n = s
            .interface
            .clone()
            .unwrap_or_else(|| format!("net{}", i + 1));
        if n == primary || names.contains(&n) {
            return Err(format!(
                "{NETWORKS_ANNOTATION}: interface {n:?} is used twice in the pod"
            ));
        }
        names.push(n);
    }
    Ok(names)
}

/// A Kubernetes quantity as an integer, rounded up (`resource.Quantity`'s
/// `Value()`): decimal digits with an optional fraction and a suffix among
/// m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei, or an `e`/`E` exponent.
pub fn parse_quantity(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a quantity like 10M");
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let num = num.strip_prefix('+').unwrap_or(num);
    if num.is_empty() || num.matches('.').count() > 1 || num == "." {
        return Err(bad());
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    // value = digits / 10^frac.len() * 10^exp10 * 2^exp2
    let (exp10, exp2): (i32, u32) = match suffix {
        "" => (0, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        e if e.starts_with(['e', 'E']) => (e[1..].parse::<i32>().map_err(|_| bad())?, 0),
        _ => return Err(bad()),
    };
    let digits: u128 = format!("{int}{frac}").parse().map_err(|_| bad())?;
    let exp10 = exp10 - frac.len() as i32;
    let too_big = || format!("{s:?} is too large");
    let mut v = digits.checked_mul(1u128 << exp2).ok_or_else(too_big)?;
    if exp10 >= 0 {
        v = 10u128
            .checked_pow(exp10 as u32)
            .and_then(|p| v.checked_mul(p))
            .ok_or_else(too_big)?;
    } else {
        let p = 10u128.checked_pow((-exp10) as u32).unwrap_or(u128::MAX);
        v = v.div_ceil(p);
    }
    u64::try_from(v).map_err(|_| too_big())
}

/// Kubernetes' sanity bounds on a bandwidth (1 kbit/s … 1 Pbit/s).
const MIN_BANDWIDTH: u64 = 1_000;
const MAX_BANDWIDTH: u64 = 1_000_000_000_000_000;

fn bandwidth(annotations: &BTreeMap<String, String>, key: &str) -> Result<Option<u64>, String> {
    let Some(v) = annotations.get(key) else {
        return Ok(None);
    };
    let bits = parse_quantity(v).map_err(|e| format!("{key}: {e}"))?;
    if bits < MIN_BANDWIDTH {
        return Err(format!("{key}: {v} is unreasonably small (< 1kbit)"));
    }
    if bits > MAX_BANDWIDTH {
        return Err(format!("{key}: {v} is unreasonably large (> 1Pbit)"));
    }
    Ok(Some(bits))
}

/// The `bandwidth` capability argument from the pod's annotations (rates in
/// bits per second, bursts in bits, as the bandwidth plugin expects), or
/// `None` without either annotation.
pub fn bandwidth_capability(
    annotations: &BTreeMap<String, String>,
) -> Result<Option<Value>, String> {
    let ingress = bandwidth(annotations, INGRESS_BANDWIDTH_ANNOTATION)?;
    let egress = bandwidth(annotations, EGRESS_BANDWIDTH_ANNOTATION)?;
    if ingress.is_none() && egress.is_none() {
        return Ok(None);
    }
    let mut m = Map::new();
    if let Some(r) = ingress {
        m.insert("ingressRate".into(), json!(r));
        m.insert("ingressBurst".into(), json!(BANDWIDTH_BURST));
    }
    if let Some(r) = egress {
        m.insert("egressRate".into(), json!(r));
        m.insert("egressBurst".into(), json!(BANDWIDTH_BURST));
    }
    Ok(Some(Value::Object(m)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(name: &str, ns: Option<&str>, ifname: Option<&str>) -> NetworkSelection {
        NetworkSelection {
            name: name.into(),
            namespace: ns.map(Into::into),
            interface: ifname.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn networks_annotation_table() {
        let cases: Vec<(&str, Vec<NetworkSelection>)> = vec![
            ("", vec![]),
            ("  ", vec![]),
            ("net-a", vec![sel("net-a", None, None)]),
            (
                "net-a, net-b",
                vec![sel("net-a", None, None), sel("net-b", None, None)],
            ),
            (
                "team/net-a@fast0,net-b@data",
                vec![
                    sel("net-a", Some("team"), Some("fast0")),
                    sel("net-b", None, Some("data")),
                ],
            ),
            (
                r#"[{"name":"net-a","namespace":"team","interface":"if9","ips":["10.9.0.7/24"],"mac":"02:00:00:00:00:07","default-route":["10.9.0.1"]},{"name":"net-b"}]"#,
                vec![
                    NetworkSelection {
                        ips: vec!["10.9.0.7/24".into()],
                        mac: Some("02:00:00:00:00:07".into()),
                        ..sel("net-a", Some("team"), Some("if9"))
                    },
                    sel("net-b", None, None),
                ],
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse_networks(input).unwrap(), want, "{input}");
        }
        for (bad, msg) in [
            ("a,,b", "empty element"),
            ("-x", "network name"),
            ("a/b/c", "network name"),
            ("/a", "invalid namespace"),
            ("a@", "interface name"),
            ("a@x/y", "interface name"),
            ("[{\"name\":1}]", "invalid JSON"),
            ("[{\"namespace\":\"x\"}]", "invalid JSON"),
        ] {
            let e = parse_networks(bad).unwrap_err();
            assert!(e.contains(msg), "{bad}: {e}");
            assert!(e.contains(NETWORKS_ANNOTATION), "{e}");
        }
    }

    #[test]
    fn extra_interface_names() {
        let s = parse_networks("a, b@data, c").unwrap();
        assert_eq!(
            extra_interfaces(&s, "eth0").unwrap(),
            ["net1", "data", "net3"]
        );
        let dup = parse_networks("a@x, b@x").unwrap();
        assert!(extra_interfaces(&dup, "eth0").is_err());
        let eth0 = parse_networks("a@eth0").unwrap();
        assert!(extra_interfaces(&eth0, "eth0").is_err());
    }

    #[test]
    fn selection_capabilities() {
        let s =
            &parse_networks(r#"[{"name":"n","ips":["10.0.0.2/24"],"mac":"02:00:00:00:00:02"}]"#)
                .unwrap()[0];
        assert_eq!(
            Value::Object(s.capability_args()),
            json!({"ips": ["10.0.0.2/24"], "mac": "02:00:00:00:00:02"})
        );
        assert!(sel("n", None, None).capability_args().is_empty());
        assert_eq!(sel("n", Some("ns"), None).display_name(), "ns/n");
    }

    #[test]
    fn quantities_table() {
        let cases = [
            ("10M", 10_000_000),
            ("1k", 1_000),
            ("1.5M", 1_500_000),
            ("100", 100),
            ("1Ki", 1_024),
            ("2Mi", 2 * 1_048_576),
            ("1G", 1_000_000_000),
            ("1e3", 1_000),
            ("1500m", 2),
            ("0.5k", 500),
            ("1P", 1_000_000_000_000_000),
            ("+5k", 5_000),
        ];
        for (q, want) in cases {
            assert_eq!(parse_quantity(q), Ok(want), "{q}");
        }
        for bad in [
            "",
            "M",
            "10 M",
            "1.2.3M",
            "10X",
            "-5M",
            "1e",
            "99999999999999999999E",
        ] {
            assert!(parse_quantity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bandwidth_from_annotations() {
        let ann = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(bandwidth_capability(&ann(&[])), Ok(None));
        assert_eq!(
            bandwidth_capability(&ann(&[(INGRESS_BANDWIDTH_ANNOTATION, "10M")])),
            Ok(Some(
                json!({"ingressRate": 10_000_000, "ingressBurst": 4_294_967_295u64})
            ))
        );
        assert_eq!(
            bandwidth_capability(&ann(&[
                (INGRESS_BANDWIDTH_ANNOTATION, "1M"),
                (EGRESS_BANDWIDTH_ANNOTATION, "2Mi")
            ])),
            Ok(Some(
                json!({"ingressRate": 1_000_000, "ingressBurst": 4_294_967_295u64,
                           "egressRate": 2_097_152, "egressBurst": 4_294_967_295u64})
            ))
        );
        for (v, msg) in [
            ("10", "unreasonably small"),
            ("2P", "unreasonably large"),
            ("x", "not a quantity"),
        ] {
            let e = bandwidth_capability(&ann(&[(EGRESS_BANDWIDTH_ANNOTATION, v)])).unwrap_err();
            assert!(
                e.contains(msg) && e.contains(EGRESS_BANDWIDTH_ANNOTATION),
                "{e}"
            );
        }
    }
}
