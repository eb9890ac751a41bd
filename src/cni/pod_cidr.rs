//! The node's pod CIDR as the IPAM range of a network, as kubenet does:
//! kube-controller-manager (`--allocate-node-cidrs`) writes `spec.podCIDR`
//! (and `spec.podCIDRs`) into the Node, the node task publishes it here,
//! and a network whose IPAM says `"subnet": "usePodCidr"` (the literal
//! placeholder Calico's host-local setups use; `"usePodCidrIPv6"` for the
//! IPv6 one) gets it substituted before ADD. The rule is only that literal
//! value, in a plugin's `ipam.subnet` or in an `ipam.ranges` entry's
//! `subnet`: a real subnet is never touched, so standalone configs keep
//! working as written.
//!
//! The substituted list is what ADD runs and what the result cache stores,
//! so DEL and CHECK (which use the cached config) see the same range.
//!
//! Side effects: none; `PodCidr` is a shared value behind a std lock.

use std::sync::RwLock;

use serde_json::Value;

use super::config::{self, NetworkConfigList};
use crate::locks::{read, write};

/// host-local's placeholder for the node's IPv4 pod CIDR.
pub const USE_POD_CIDR: &str = "usePodCidr";
/// The placeholder for the node's IPv6 pod CIDR.
pub const USE_POD_CIDR_V6: &str = "usePodCidrIPv6";

/// What is known about the node's pod CIDR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodCidrState {
    /// Static pods only: no Node, so no pod CIDR will ever come.
    Standalone,
    /// API server mode, the Node has no `spec.podCIDR` yet.
    Waiting,
    /// The Node's `spec.podCIDRs` (or `[spec.podCIDR]`).
    Known(Vec<String>),
}

/// The pod CIDR shared between the node task (writer) and the chain
/// runner (reader).
#[derive(Debug)]
pub struct PodCidr {
    state: RwLock<PodCidrState>,
    /// Whether the default network has a placeholder (`uses_placeholder`):
    /// only then does a missing pod CIDR keep the node's network not ready.
    needed: std::sync::atomic::AtomicBool,
}

impl PodCidr {
    /// For static pods only.
    pub fn standalone() -> Self {
        PodCidr {
            state: RwLock::new(PodCidrState::Standalone),
            needed: false.into(),
        }
    }

    /// For API server mode, until the Node has its pod CIDR.
    pub fn waiting() -> Self {
        PodCidr {
            state: RwLock::new(PodCidrState::Waiting),
            needed: false.into(),
        }
    }

    pub fn get(&self) -> PodCidrState {
        read(&self.state).clone()
    }

    /// Says whether the default network needs the pod CIDR (set once the
    /// networks are loaded).
    pub fn set_needed(&self, needed: bool) {
        self.needed
            .store(needed, std::sync::atomic::Ordering::Relaxed);
    }

    /// `None` when pods can get their default network; else why not, for
    /// the Node's Ready condition (kubelet: NetworkReady=false keeps the
    /// node NotReady, so the scheduler sends no pod that would fail ADD).
    pub fn network_not_ready(&self) -> Option<&'static str> {
        let needed = self.needed.load(std::sync::atomic::Ordering::Relaxed);
        (needed && self.get() == PodCidrState::Waiting).then_some(
            "container runtime network not ready: the default network uses usePodCidr and the Node has no spec.podCIDR yet",
        )
    }

    /// Publishes the Node's CIDRs; returns whether they changed. An empty
    /// list leaves the state as it is (the controller has not assigned one).
    pub fn set(&self, cidrs: Vec<String>) -> bool {
        if cidrs.is_empty() {
            return false;
        }
        let mut state = write(&self.state);
        let new = PodCidrState::Known(cidrs);
        if *state == new {
            return false;
        }
        *state = new;
        true
    }
}

/// Why a network's pod CIDR placeholder could not be filled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodCidrError {
    /// API server mode, and the Node has no podCIDR yet: retry later.
    #[error(
        "network {network} uses {placeholder} but the node has no spec.podCIDR yet (kube-controller-manager --allocate-node-cidrs assigns it); try again later"
    )]
    NotYet {
        network: String,
        placeholder: &'static str,
    },
    /// Static pods only: nobody will ever assign one.
    #[error(
        "network {network} uses {placeholder}, which needs the Node's spec.podCIDR: only API server mode (--kubeconfig) has one"
    )]
    Standalone {
        network: String,
        placeholder: &'static str,
    },
    /// The Node's CIDRs hold none of the family the placeholder asks for.
    #[error(
        "network {network} uses {placeholder} but the node's pod CIDRs {cidrs:?} hold none of that family"
    )]
    NoFamily {
        network: String,
        placeholder: &'static str,
        cidrs: Vec<String>,
    },
    /// The substituted list no longer validates (cannot happen for a list
    /// that validated before; reported rather than assumed).
    #[error("network {network}: the list with the pod CIDR filled in is invalid: {problem}")]
    Invalid { network: String, problem: String },
}

impl PodCidrError {
    /// Whether a later ADD may succeed without anyone changing the config.
    pub fn is_retryable(&self) -> bool {
        matches!(self, PodCidrError::NotYet { .. })
    }
}

/// The placeholder a `subnet` value is, if any.
fn placeholder(v: &Value) -> Option<&'static str> {
    match v.as_str() {
        Some(USE_POD_CIDR) => Some(USE_POD_CIDR),
        Some(USE_POD_CIDR_V6) => Some(USE_POD_CIDR_V6),
        _ => None,
    }
}

/// Every `subnet` slot of a plugin's `ipam` that holds a placeholder.
fn slots(plugin: &mut Value) -> Vec<&mut Value> {
    let Some(ipam) = plugin.get_mut("ipam").and_then(Value::as_object_mut) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (key, v) in ipam.iter_mut() {
        match key.as_str() {
            "subnet" if placeholder(v).is_some() => out.push(v),
            "ranges" => {
                for set in v.as_array_mut().into_iter().flatten() {
                    for range in set.as_array_mut().into_iter().flatten() {
                        if let Some(s) = range.get_mut("subnet")
                            && placeholder(s).is_some()
                        {
                            out.push(s);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Fills the placeholders of a network list's JSON (`{"plugins": [...]}`)
/// from `state`. Pure. `Ok(false)`: there were none (the value is as it
/// was).
pub fn substitute(
    network: &str,
    list: &mut Value,
    state: &PodCidrState,
) -> Result<bool, PodCidrError> {
    let mut found = false;
    for plugin in list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        for slot in slots(plugin) {
            found = true;
            let Some(which) = placeholder(slot) else {
                continue;
            };
            let cidrs = match state {
                PodCidrState::Known(c) => c,
                PodCidrState::Waiting => {
                    return Err(PodCidrError::NotYet {
                        network: network.into(),
                        placeholder: which,
                    });
                }
                PodCidrState::Standalone => {
                    return Err(PodCidrError::Standalone {
                        network: network.into(),
                        placeholder: which,
                    });
                }
            };
            let want_v6 = which == USE_POD_CIDR_V6;
            let Some(cidr) = cidrs.iter().find(|c| c.contains(':') == want_v6) else {
                return Err(PodCidrError::NoFamily {
                    network: network.into(),
                    placeholder: which,
                    cidrs: cidrs.clone(),
                });
            };
            *slot = Value::String(cidr.clone());
        }
    }
    Ok(found)
}

/// Whether `net` holds a placeholder anywhere (a look at the bytes, as
/// `apply` takes first; "usePodCidrIPv6" starts with the same needle).
pub fn uses_placeholder(net: &NetworkConfigList) -> bool {
    let needle = USE_POD_CIDR.as_bytes();
    net.bytes.windows(needle.len()).any(|w| w == needle)
}

/// `net` with its placeholders filled from `state`, or `None` when it has
/// none (the common case: a quick look at the bytes first).
pub fn apply(
    net: &NetworkConfigList,
    state: &PodCidrState,
) -> Result<Option<NetworkConfigList>, PodCidrError> {
    if !uses_placeholder(net) {
        return Ok(None);
    }
    let invalid = |problem: String| PodCidrError::Invalid {
        network: net.name.clone(),
        problem,
    };
    let mut list: Value = serde_json::from_slice(&net.bytes).map_err(|e| invalid(e.to_string()))?;
    if !substitute(&net.name, &mut list, state)? {
        return Ok(None);
    }
    let bytes = serde_json::to_vec(&list).map_err(|e| invalid(e.to_string()))?;
    config::parse(&bytes, true, &net.source)
        .map(Some)
        .map_err(|e| invalid(crate::error_chain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn list(ipam: Value) -> Value {
        json!({"cniVersion": "1.0.0", "name": "net", "plugins": [
            {"type": "bridge", "bridge": "cni0", "ipam": ipam},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]})
    }

    fn known(c: &[&str]) -> PodCidrState {
        PodCidrState::Known(c.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn placeholders_are_filled_by_family_and_nothing_else_is_touched() {
        let dual = known(&["10.244.1.0/24", "fd00:1::/64"]);
        type Case = (
            &'static str,
            Value,
            PodCidrState,
            Result<Option<Value>, &'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "ranges v4",
                json!({"type": "host-local", "ranges": [[{"subnet": "usePodCidr"}]], "routes": [{"dst": "0.0.0.0/0"}]}),
                dual.clone(),
                Ok(Some(
                    json!({"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}),
                )),
            ),
            (
                "dual-stack ranges",
                json!({"type": "host-local", "ranges": [[{"subnet": "usePodCidr"}], [{"subnet": "usePodCidrIPv6"}]]}),
                dual.clone(),
                Ok(Some(
                    json!({"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:1::/64"}]]}),
                )),
            ),
            (
                "old-style subnet",
                json!({"type": "host-local", "subnet": "usePodCidr"}),
                dual.clone(),
                Ok(Some(
                    json!({"type": "host-local", "subnet": "10.244.1.0/24"}),
                )),
            ),
            (
                "a real subnet is left alone",
                json!({"type": "host-local", "ranges": [[{"subnet": "10.245.0.0/16"}]]}),
                PodCidrState::Waiting,
                Ok(None),
            ),
            (
                "not yet assigned",
                json!({"type": "host-local", "ranges": [[{"subnet": "usePodCidr"}]]}),
                PodCidrState::Waiting,
                Err("not-yet"),
            ),
            (
                "standalone",
                json!({"type": "host-local", "ranges": [[{"subnet": "usePodCidr"}]]}),
                PodCidrState::Standalone,
                Err("standalone"),
            ),
            (
                "no v6 cidr",
                json!({"type": "host-local", "ranges": [[{"subnet": "usePodCidrIPv6"}]]}),
                known(&["10.244.1.0/24"]),
                Err("family"),
            ),
        ];
        for (name, ipam, state, want) in cases {
            let mut v = list(ipam);
            let before = v.clone();
            let got = substitute("net", &mut v, &state);
            match (got, want) {
                (Ok(true), Ok(Some(ipam))) => assert_eq!(v, list(ipam), "{name}"),
                (Ok(false), Ok(None)) => assert_eq!(v, before, "{name}"),
                (Err(e), Err(kind)) => {
                    let ok = matches!(
                        (&e, kind),
                        (PodCidrError::NotYet { .. }, "not-yet")
                            | (PodCidrError::Standalone { .. }, "standalone")
                            | (PodCidrError::NoFamily { .. }, "family")
                    );
                    assert!(ok, "{name}: {e}");
                    assert_eq!(e.is_retryable(), kind == "not-yet", "{name}");
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn apply_rebuilds_the_list_and_its_cached_bytes() {
        let v = list(json!({"type": "host-local", "ranges": [[{"subnet": "usePodCidr"}]]}));
        let bytes = serde_json::to_vec(&v).unwrap();
        let net = config::parse(&bytes, true, std::path::Path::new("/n/10.conflist")).unwrap();
        let state = known(&["10.244.3.0/24"]);
        let filled = apply(&net, &state).unwrap().expect("substituted");
        assert_eq!(filled.name, "net");
        assert_eq!(
            filled.plugins[0].raw["ipam"]["ranges"][0][0]["subnet"],
            "10.244.3.0/24"
        );
        let cached: Value = serde_json::from_slice(&filled.bytes).unwrap();
        assert_eq!(
            cached["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.3.0/24"
        );
        // Without a placeholder: nothing to do, no copy.
        let plain = config::parse(
            &serde_json::to_vec(&list(
                json!({"type": "host-local", "subnet": "10.1.0.0/16"}),
            ))
            .unwrap(),
            true,
            std::path::Path::new("/n/x.conflist"),
        )
        .unwrap();
        assert_eq!(apply(&plain, &PodCidrState::Waiting), Ok(None));
        // The message says what to wait for.
        let err = apply(&net, &PodCidrState::Waiting).unwrap_err();
        assert!(err.to_string().contains("no spec.podCIDR yet"), "{err}");
    }

    #[test]
    fn set_publishes_only_real_changes() {
        let p = PodCidr::waiting();
        assert!(!p.set(vec![]), "no cidr assigned yet");
        assert_eq!(p.get(), PodCidrState::Waiting);
        assert!(p.set(vec!["10.244.0.0/24".into()]));
        assert!(!p.set(vec!["10.244.0.0/24".into()]));
        assert_eq!(p.get(), known(&["10.244.0.0/24"]));
    }
}
