//! Routes to the other nodes' pod CIDRs (MiniletConfiguration
//! `nodeRoutes`), as kindnet keeps them for kind's nodes: for every other
//! Node with a `spec.podCIDR(s)` and an `InternalIP` of the same family, a
//! route `<podCIDR> via <InternalIP>` in the main table, so a pod reaches a
//! pod on another node by its pod IP with no overlay.
//!
//! Level-triggered: on every change of the Node watch, and every
//! `RESYNC` besides, the whole wanted set (`wanted`, pure) is compared with
//! the routes the kernel holds with minilet's protocol number (`PROTO`), and
//! `plan` (pure) says what to replace and what to delete. Routes of other
//! owners are never touched; ours are found again after a restart by their
//! protocol, so a `kill -9` leaves nothing that the next run does not own.
//!
//! Side effects: the kernel's routing table, behind `RouteTable` (real:
//! iproute2's `ip`, `IpRoutes`; a fake in the tests).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::node::pod_cidrs;

/// The `proto` minilet's routes carry (iproute2 `ip route ... proto 77`):
/// what marks them as ours. Outside the numbers rtnetlink and the routing
/// daemons in /etc/iproute2/rt_protos use.
pub const PROTO: u8 = 77;
/// A full comparison this often even with no Node change: a route someone
/// deleted comes back.
const RESYNC: Duration = Duration::from_secs(30);

/// One route: `dst` (a CIDR) via the gateway `via`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub dst: String,
    pub via: IpAddr,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} via {}", self.dst, self.via)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("`ip {args}` failed: {reason}")]
    Ip { args: String, reason: String },
    #[error("`ip {args}` printed output that is not its JSON route list: {reason}")]
    Parse { args: String, reason: String },
}

/// The kernel's routes with protocol `PROTO`, and changes to them.
pub trait RouteTable: Send + Sync {
    fn list(&self) -> BoxFuture<'_, Result<BTreeSet<Route>, RouteError>>;
    /// Add, or change the gateway of, the route to `r.dst`.
    fn replace<'a>(&'a self, r: &'a Route) -> BoxFuture<'a, Result<(), RouteError>>;
    fn delete<'a>(&'a self, r: &'a Route) -> BoxFuture<'a, Result<(), RouteError>>;
}

/// The routes every other node's pod CIDRs need, from the Nodes as listed.
/// A Node without a pod CIDR or without an InternalIP of that CIDR's
/// family gets none (it has no pods yet, or cannot be reached).
pub fn wanted<'a>(nodes: impl IntoIterator<Item = &'a Node>, me: &str) -> BTreeSet<Route> {
    let mut out = BTreeSet::new();
    for node in nodes {
        if node.metadata.name.as_deref() == Some(me) {
            continue;
        }
        let ips: Vec<IpAddr> = node
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        for cidr in pod_cidrs(node) {
            let Some((net, _)) = cidr.split_once('/') else {
                continue;
            };
            let Ok(net) = net.parse::<IpAddr>() else {
                continue;
            };
            if let Some(via) = ips.iter().find(|ip| ip.is_ipv4() == net.is_ipv4()) {
                out.insert(Route {
                    dst: cidr.clone(),
                    via: *via,
                });
            }
        }
    }
    out
}

/// What turns `have` into `want`: routes to replace (missing, or to the
/// same destination via another gateway), and routes to delete (their
/// destination is wanted no more).
pub fn plan(have: &BTreeSet<Route>, want: &BTreeSet<Route>) -> (Vec<Route>, Vec<Route>) {
    let wanted_dsts: BTreeSet<&str> = want.iter().map(|r| r.dst.as_str()).collect();
    let replace = want.difference(have).cloned().collect();
    let delete = have
        .iter()
        .filter(|r| !wanted_dsts.contains(r.dst.as_str()))
        .cloned()
        .collect();
    (replace, delete)
}

/// One comparison and its changes; every error is logged, none stops the
/// others.
pub async fn sync(table: &dyn RouteTable, want: &BTreeSet<Route>) {
    let have = match table.list().await {
        Ok(h) => h,
        Err(e) => {
            warn!(error = %e, "node routes: cannot list minilet's routes; retrying");
            return;
        }
    };
    let (replace, delete) = plan(&have, want);
    for r in &replace {
        match table.replace(r).await {
            Ok(()) => info!(route = %r, "node routes: route to a node's pod CIDR set"),
            Err(e) => {
                warn!(route = %r, error = %e, "node routes: setting a route failed; retrying")
            }
        }
    }
    for r in &delete {
        match table.delete(r).await {
            Ok(()) => info!(route = %r, "node routes: route of a node that is gone removed"),
            Err(e) => {
                warn!(route = %r, error = %e, "node routes: removing a route failed; retrying")
            }
        }
    }
}

/// Keep the routes in step with the Nodes until `cancel`. The routes stay
/// when minilet stops (the pods keep running and keep talking).
pub async fn run(
    client: kube::Client,
    me: String,
    table: Box<dyn RouteTable>,
    cancel: CancellationToken,
) {
    let api: Api<Node> = Api::all(client);
    let mut events = watcher(api, super::client::watch_config())
        .default_backoff()
        .boxed();
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, Node>> = None;
    let mut synced = false;
    let mut resync = tokio::time::interval(RESYNC);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = resync.tick() => {}
            ev = events.next() => match ev {
                None => return,
                Some(Ok(watcher::Event::Init)) => listing = Some(BTreeMap::new()),
                Some(Ok(watcher::Event::InitApply(n))) => {
                    listing.get_or_insert_default().insert(key(&n), n);
                    continue;
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    nodes = listing.take().unwrap_or_default();
                    synced = true;
                }
                Some(Ok(watcher::Event::Apply(n))) => {
                    nodes.insert(key(&n), n);
                }
                Some(Ok(watcher::Event::Delete(n))) => {
                    nodes.remove(&key(&n));
                }
                Some(Err(e)) => {
                    warn!(error = %e, "node routes: Node watch failed; retrying");
                    continue;
                }
            },
        }
        // Until the first full list, an empty set would delete every route.
        if synced {
            sync(table.as_ref(), &wanted(nodes.values(), &me)).await;
        }
    }
}

fn key(n: &Node) -> String {
    n.metadata.name.clone().unwrap_or_default()
}

/// `RouteTable` through iproute2's `ip` (its JSON output for the list).
pub struct IpRoutes;

impl IpRoutes {
    async fn ip(args: &[String]) -> Result<Vec<u8>, RouteError> {
        let shown = args.join(" ");
        let out = tokio::process::Command::new("ip")
            .args(args)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(10), out)
            .await
            .map_err(|_| RouteError::Ip {
                args: shown.clone(),
                reason: "no answer in 10 s".into(),
            })?
            .map_err(|e| RouteError::Ip {
                args: shown.clone(),
                reason: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(RouteError::Ip {
                args: shown,
                reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(out.stdout)
    }

    fn family(r: &Route) -> &'static str {
        if r.via.is_ipv4() { "-4" } else { "-6" }
    }
}

/// `ip -j route show proto 77`'s entries: {"dst": ..., "gateway": ...}.
pub fn parse_ip_json(text: &[u8]) -> Result<BTreeSet<Route>, String> {
    #[derive(serde::Deserialize)]
    struct Entry {
        dst: String,
        gateway: Option<String>,
    }
    if text.iter().all(u8::is_ascii_whitespace) {
        return Ok(BTreeSet::new());
    }
    let entries: Vec<Entry> = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    Ok(entries
        .into_iter()
        .filter_map(|e| {
            Some(Route {
                via: e.gateway?.parse().ok()?,
                dst: e.dst,
            })
        })
        .collect())
}

impl RouteTable for IpRoutes {
    fn list(&self) -> BoxFuture<'_, Result<BTreeSet<Route>, RouteError>> {
        async {
            let mut all = BTreeSet::new();
            for fam in ["-4", "-6"] {
                let args: Vec<String> = [fam, "-j", "route", "show", "proto", &PROTO.to_string()]
                    .map(String::from)
                    .into();
                let out = Self::ip(&args).await?;
                all.extend(parse_ip_json(&out).map_err(|reason| RouteError::Parse {
                    args: args.join(" "),
                    reason,
                })?);
            }
            Ok(all)
        }
        .boxed()
    }

    fn replace<'a>(&'a self, r: &'a Route) -> BoxFuture<'a, Result<(), RouteError>> {
        async move {
            let args = [
                Self::family(r),
                "route",
                "replace",
                &r.dst,
                "via",
                &r.via.to_string(),
                "proto",
                &PROTO.to_string(),
            ]
            .map(String::from);
            Self::ip(&args).await.map(drop)
        }
        .boxed()
    }

    fn delete<'a>(&'a self, r: &'a Route) -> BoxFuture<'a, Result<(), RouteError>> {
        async move {
            let args = [
                Self::family(r),
                "route",
                "del",
                &r.dst,
                "proto",
                &PROTO.to_string(),
            ]
            .map(String::from);
            Self::ip(&args).await.map(drop)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};

    use super::*;

    fn node(name: &str, ip: Option<&str>, cidr: Option<&str>) -> Node {
        Node {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: cidr.map(Into::into),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: ip.map(|ip| {
                    vec![
                        NodeAddress {
                            type_: "Hostname".into(),
                            address: name.into(),
                        },
                        NodeAddress {
                            type_: "InternalIP".into(),
                            address: ip.into(),
                        },
                    ]
                }),
                ..Default::default()
            }),
        }
    }

    fn route(dst: &str, via: &str) -> Route {
        Route {
            dst: dst.into(),
            via: via.parse().unwrap(),
        }
    }

    #[test]
    fn wanted_routes_are_the_other_nodes_cidrs_via_their_internal_ips() {
        let nodes = [
            node("a", Some("172.18.0.2"), Some("10.244.0.0/24")),
            node("b", Some("172.18.0.3"), Some("10.244.1.0/24")),
            node("c", None, Some("10.244.2.0/24")),
            node("d", Some("172.18.0.5"), None),
            node("e", Some("fd00::5"), Some("10.244.4.0/24")),
        ];
        let want = wanted(&nodes, "a");
        assert_eq!(
            want,
            BTreeSet::from([route("10.244.1.0/24", "172.18.0.3")]),
            "not itself, nor c, d or e"
        );
    }

    #[test]
    fn plan_replaces_missing_and_moved_routes_and_deletes_gone_ones() {
        let have = BTreeSet::from([
            route("10.244.1.0/24", "172.18.0.3"),
            route("10.244.2.0/24", "172.18.0.4"),
            route("10.244.3.0/24", "172.18.0.9"),
        ]);
        let want = BTreeSet::from([
            route("10.244.1.0/24", "172.18.0.3"),
            route("10.244.2.0/24", "172.18.0.7"),
            route("10.244.5.0/24", "172.18.0.6"),
        ]);
        let (replace, delete) = plan(&have, &want);
        assert_eq!(
            replace,
            [
                route("10.244.2.0/24", "172.18.0.7"),
                route("10.244.5.0/24", "172.18.0.6")
            ]
        );
        assert_eq!(
            delete,
            [route("10.244.3.0/24", "172.18.0.9")],
            "a moved route is replaced, not deleted"
        );
        let (r, d) = plan(&want, &want);
        assert!(r.is_empty() && d.is_empty(), "in step: nothing to do");
    }

    #[test]
    fn ip_json_is_parsed_and_empty_output_is_no_routes() {
        let text = br#"[{"dst":"10.244.1.0/24","gateway":"172.18.0.3","dev":"eth0","protocol":"77","flags":[]},
            {"dst":"10.244.9.0/24","dev":"eth0","flags":[]}]"#;
        assert_eq!(
            parse_ip_json(text).unwrap(),
            BTreeSet::from([route("10.244.1.0/24", "172.18.0.3")])
        );
        assert!(parse_ip_json(b"\n").unwrap().is_empty());
        assert!(parse_ip_json(b"[]").unwrap().is_empty());
        assert!(parse_ip_json(b"Error: garbage").is_err());
    }

    /// A route table in memory that records the calls.
    #[derive(Default)]
    struct FakeTable {
        routes: Mutex<BTreeSet<Route>>,
        calls: Mutex<Vec<String>>,
        fail_replace: bool,
    }

    impl RouteTable for FakeTable {
        fn list(&self) -> BoxFuture<'_, Result<BTreeSet<Route>, RouteError>> {
            let r = self.routes.lock().unwrap().clone();
            async move { Ok(r) }.boxed()
        }
        fn replace<'a>(&'a self, r: &'a Route) -> BoxFuture<'a, Result<(), RouteError>> {
            self.calls.lock().unwrap().push(format!("replace {r}"));
            let res = if self.fail_replace {
                Err(RouteError::Ip {
                    args: "route replace".into(),
                    reason: "Nexthop has invalid gateway".into(),
                })
            } else {
                let mut t = self.routes.lock().unwrap();
                t.retain(|x| x.dst != r.dst);
                t.insert(r.clone());
                Ok(())
            };
            async move { res }.boxed()
        }
        fn delete<'a>(&'a self, r: &'a Route) -> BoxFuture<'a, Result<(), RouteError>> {
            self.calls.lock().unwrap().push(format!("delete {r}"));
            self.routes.lock().unwrap().remove(r);
            async { Ok(()) }.boxed()
        }
    }

    #[tokio::test]
    async fn sync_is_idempotent_and_a_failure_does_not_stop_the_rest() {
        let t = FakeTable::default();
        t.routes
            .lock()
            .unwrap()
            .insert(route("10.244.3.0/24", "172.18.0.9"));
        let want = BTreeSet::from([route("10.244.1.0/24", "172.18.0.3")]);
        sync(&t, &want).await;
        assert_eq!(*t.routes.lock().unwrap(), want);
        assert_eq!(t.calls.lock().unwrap().len(), 2);
        sync(&t, &want).await;
        assert_eq!(
            t.calls.lock().unwrap().len(),
            2,
            "in step: a second sync changes nothing"
        );

        let t = FakeTable {
            fail_replace: true,
            ..Default::default()
        };
        t.routes
            .lock()
            .unwrap()
            .insert(route("10.244.3.0/24", "172.18.0.9"));
        sync(&t, &want).await;
        assert!(
            t.routes.lock().unwrap().is_empty(),
            "the delete still ran after a failed replace"
        );
    }
}
