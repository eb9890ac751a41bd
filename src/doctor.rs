//! `minilet doctor`: checks that this node can run pods and says what is
//! wrong in one line per finding: the runtime, the host's known traps
//! (negative oom_score_adj refused, a Docker engine's FORWARD policy DROP),
//! the CNI configs and plugins, the delegating plugin's install, the CSI
//! drivers (from `csiDrivers` and the registration sockets in
//! `<stateDir>/plugins_registry/`), and the running agent.
//!
//! Side effects: reads files, dials the runtime, the CSI drivers (their
//! Identity and Node info calls only; registration sockets get GetInfo and
//! no status, so the agent's registrations are left alone) and the agent, runs
//! `iptables-save -t filter` (read only), and briefly writes this process's
//! own oom_score_adj (then restores it).

use std::path::Path;
use std::time::Duration;

use crate::cni;
use crate::config::Config;
use crate::control;
use crate::cri::Runtime;
use crate::cri::remote::RemoteRuntime;

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub level: Level,
    pub what: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        write!(f, "{tag}  {}: {}", self.what, self.detail)
    }
}

fn finding(level: Level, what: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        level,
        what,
        detail: detail.into(),
    }
}

/// Whether this host refuses a negative oom_score_adj (the CRI sandbox asks
/// for -998). Tries it on this process and puts the old value back.
pub fn oom_score_adj_refused() -> bool {
    let path = Path::new("/proc/self/oom_score_adj");
    let Ok(old) = std::fs::read_to_string(path) else {
        return false;
    };
    let refused = std::fs::write(path, "-998").is_err();
    let _ = std::fs::write(path, old.trim());
    refused
}

fn check_oom() -> Finding {
    if oom_score_adj_refused() {
        finding(
            Level::Warn,
            "oom_score_adj",
            "this host refuses a negative oom_score_adj: set restrict_oom_score_adj = true in \
             containerd's CRI plugin config, or RunPodSandbox fails with \
             \"can't get final child's PID from pipe: EOF\"",
        )
    } else {
        finding(Level::Ok, "oom_score_adj", "negative values allowed")
    }
}

async fn check_runtime(cfg: &Config) -> Finding {
    let connect = RemoteRuntime::connect(
        &cfg.container_runtime_endpoint,
        &cfg.image_service_endpoint,
        Duration::from_secs(5),
    );
    match tokio::time::timeout(Duration::from_secs(6), connect).await {
        Ok(Ok(rt)) => {
            let (name, version) = rt.version().await.unwrap_or_default();
            finding(
                Level::Ok,
                "runtime",
                format!(
                    "{name} {version} (CRI {:?}) at {}",
                    rt.api_version(),
                    cfg.container_runtime_endpoint
                ),
            )
        }
        Ok(Err(e)) => finding(Level::Fail, "runtime", crate::error_chain(&e)),
        Err(_) => finding(
            Level::Fail,
            "runtime",
            format!(
                "{} did not answer within 6s",
                cfg.container_runtime_endpoint
            ),
        ),
    }
}

fn find_plugin(cfg: &Config, plugin: &str) -> Option<std::path::PathBuf> {
    cfg.cni_bin_dirs
        .iter()
        .map(|d| d.join(plugin))
        .find(|p| p.is_file())
}

async fn check_cni(cfg: &Config) -> Vec<Finding> {
    let mut out = vec![];
    let set = cni::config::load_dir(&cfg.cni_conf_dir);
    for (file, error) in &set.errors {
        out.push(finding(
            Level::Fail,
            "cni config",
            format!("{}: {error}", file.display()),
        ));
    }
    let Some(default) = set.default.clone() else {
        out.push(finding(
            Level::Fail,
            "cni network",
            format!("no valid network config in {}", cfg.cni_conf_dir.display()),
        ));
        return out;
    };
    for net in set.networks.values() {
        let role = if net.name == default {
            "default"
        } else {
            "extra"
        };
        out.push(finding(
            Level::Ok,
            "cni network",
            format!(
                "{role} {:?} (cniVersion {}) from {}",
                net.name,
                net.cni_version,
                net.source.display()
            ),
        ));
        // Each plugin, and the IPAM plugin a main plugin delegates to.
        let ipam = net
            .plugins
            .iter()
            .filter_map(|p| p.raw.get("ipam")?.get("type")?.as_str().map(str::to_string));
        let types: Vec<String> = net
            .plugins
            .iter()
            .map(|p| p.plugin_type.clone())
            .chain(ipam)
            .collect();
        for t in types {
            out.push(match find_plugin(cfg, &t) {
                Some(path) => finding(
                    Level::Ok,
                    "cni plugin",
                    format!("{t} at {}", path.display()),
                ),
                None => finding(
                    Level::Fail,
                    "cni plugin",
                    format!("{t} not found in {:?}", cfg.cni_bin_dirs),
                ),
            });
        }
    }
    // STATUS (CNI 1.1) of the default network: what the runtime's network
    // readiness reflects. Plugins older than 1.1 answer by being present.
    let runner = cni::chain::CniRunner::new(
        cni::exec::ProcessExec::from_config(cfg),
        std::sync::Arc::new(cni::config::NetworkStore::new(set)),
        cni::cache::ResultCache::new(cfg.cni_cache_dir.clone()),
        Default::default(),
    );
    out.push(match runner.status("").await {
        Ok(()) => finding(
            Level::Ok,
            "cni status",
            format!("default network {default:?} ready"),
        ),
        Err(e) => finding(Level::Fail, "cni status", crate::error_chain(&e)),
    });
    out
}

/// What the default network's pods need from the host's FORWARD chain.
#[derive(Clone, Debug, PartialEq)]
struct PodNet {
    /// The file the default network comes from, named in the fix.
    source: std::path::PathBuf,
    /// The bridge its `bridge` plugin makes, if it has one.
    bridge: Option<String>,
    /// Whether the chain runs the CNI `firewall` plugin, which puts
    /// CNI-FORWARD first in FORWARD and accepts each pod's traffic there.
    has_firewall: bool,
    /// Whether the chain maps hostPorts (`portmap`).
    has_portmap: bool,
}

impl PodNet {
    fn of(net: &cni::config::NetworkConfigList) -> PodNet {
        PodNet {
            source: net.source.clone(),
            bridge: net
                .plugins
                .iter()
                .find(|p| p.plugin_type == "bridge")
                .map(|p| {
                    p.raw
                        .get("bridge")
                        .and_then(|b| b.as_str())
                        .unwrap_or("cni0")
                        .to_string()
                }),
            has_firewall: net.plugins.iter().any(|p| p.plugin_type == "firewall"),
            has_portmap: net.plugins.iter().any(|p| p.plugin_type == "portmap"),
        }
    }
}

/// The policy of FORWARD in `iptables-save` output (its `*filter` table),
/// and whether Docker's chains are there (the usual author of a DROP).
fn forward_policy(iptables_save: &str) -> (Option<&str>, bool) {
    let mut in_filter = false;
    let (mut policy, mut docker) = (None, false);
    for line in iptables_save.lines() {
        if let Some(table) = line.strip_prefix('*') {
            in_filter = table.trim() == "filter";
        } else if in_filter && let Some(chain) = line.strip_prefix(':') {
            let mut words = chain.split_whitespace();
            match words.next() {
                Some("FORWARD") => policy = words.next(),
                Some("DOCKER-USER" | "DOCKER") => docker = true,
                _ => {}
            }
        }
    }
    (policy, docker)
}

/// Whether a rule in FORWARD or DOCKER-USER accepts forwarded traffic the
/// node DNATed (a hostPort reached from another host) into `bridge`: the
/// firewall plugin accepts only connections a pod started.
fn accepts_dnat(iptables_save: &str, bridge: Option<&str>) -> bool {
    iptables_save.lines().any(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        let arg = |flag: &str| words.windows(2).find(|w| w[0] == flag).map(|w| w[1]);
        matches!(words.get(..2), Some(["-A", "FORWARD" | "DOCKER-USER"]))
            && arg("--ctstate").is_some_and(|s| s.split(',').any(|s| s == "DNAT"))
            && arg("-j") == Some("ACCEPT")
            && arg("-o").is_none_or(|o| Some(o) == bridge)
    })
}

/// One line on whether forwarded pod traffic survives the host's FORWARD
/// chain. With policy DROP (Docker sets it) routed pod traffic (egress,
/// hostPorts reached through the node) is dropped, and with bridge
/// netfilter on (`bridge-nf-call-iptables`) so is pod-to-pod traffic on
/// the bridge, unless the chain accepts it (the `firewall` plugin).
fn forward_finding(iptables_save: &str, bridge_nf: bool, net: &PodNet) -> Finding {
    const WHAT: &str = "pod forwarding";
    let (policy, docker) = forward_policy(iptables_save);
    let by = if docker { " (set by Docker)" } else { "" };
    match policy {
        Some("DROP")
            if net.has_firewall
                && net.has_portmap
                && !accepts_dnat(iptables_save, net.bridge.as_deref()) =>
        {
            finding(
                Level::Warn,
                WHAT,
                format!(
                    "FORWARD policy DROP{by}: the firewall plugin in {} accepts the pods' traffic, \
                     but new connections from other hosts to hostPorts are dropped: \
                     iptables -I {} {}-m conntrack --ctstate DNAT -j ACCEPT",
                    net.source.display(),
                    if docker { "DOCKER-USER" } else { "FORWARD" },
                    net.bridge
                        .as_deref()
                        .map_or(String::new(), |b| format!("-o {b} ")),
                ),
            )
        }
        Some("DROP") if net.has_firewall => finding(
            Level::Ok,
            WHAT,
            format!(
                "FORWARD policy DROP{by}; the firewall plugin in {} accepts the pods' traffic",
                net.source.display()
            ),
        ),
        Some("DROP") => {
            let dropped = if bridge_nf {
                "pod-to-pod (bridge netfilter is on), pod egress and hostPort traffic"
            } else {
                "pod egress and hostPort traffic"
            };
            let bridge = net
                .bridge
                .as_deref()
                .map_or(String::new(), |b| format!(" on {b}"));
            finding(
                Level::Fail,
                WHAT,
                format!(
                    "FORWARD policy DROP{by} drops {dropped}{bridge}: add {{\"type\": \"firewall\"}} \
                     at the end of the plugins in {}",
                    net.source.display()
                ),
            )
        }
        Some(p) => finding(Level::Ok, WHAT, format!("FORWARD policy {p}")),
        None => finding(
            Level::Warn,
            WHAT,
            "no FORWARD chain in iptables-save's filter table: cannot tell whether pod traffic is dropped",
        ),
    }
}

async fn check_forward(cfg: &Config) -> Option<Finding> {
    let set = cni::config::load_dir(&cfg.cni_conf_dir);
    let net = PodNet::of(set.networks.get(set.default.as_ref()?)?);
    let out = tokio::process::Command::new("iptables-save")
        .args(["-t", "filter"])
        .kill_on_drop(true)
        .output();
    let text = match tokio::time::timeout(Duration::from_secs(10), out).await {
        Ok(Ok(o)) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(Ok(o)) => {
            let err = String::from_utf8_lossy(&o.stderr);
            return Some(finding(
                Level::Warn,
                "pod forwarding",
                format!("iptables-save failed ({}): {}", o.status, err.trim()),
            ));
        }
        Ok(Err(e)) => {
            return Some(finding(
                Level::Warn,
                "pod forwarding",
                format!("cannot run iptables-save: {e}"),
            ));
        }
        Err(_) => {
            return Some(finding(
                Level::Warn,
                "pod forwarding",
                "iptables-save did not answer within 10s",
            ));
        }
    };
    // The sysctl exists only while br_netfilter is loaded: absent = off.
    let bridge_nf = std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
        .is_ok_and(|v| v.trim() == "1");
    Some(forward_finding(&text, bridge_nf, &net))
}

/// The delegating plugin's config must be the first the runtime reads.
fn check_delegate(cfg: &Config) -> Vec<Finding> {
    let mut out = vec![];
    let plugin = cfg.runtime_cni_bin_dir.join("minilet-cni");
    out.push(if plugin.is_file() {
        finding(Level::Ok, "delegating plugin", plugin.display().to_string())
    } else {
        finding(
            Level::Warn,
            "delegating plugin",
            format!(
                "{} missing: the agent installs it when it starts",
                plugin.display()
            ),
        )
    });
    let mut confs: Vec<String> = std::fs::read_dir(&cfg.runtime_cni_conf_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n.ends_with(".conf") || n.ends_with(".conflist") || n.ends_with(".json")
                })
                .collect()
        })
        .unwrap_or_default();
    confs.sort();
    out.push(match confs.first().map(String::as_str) {
        Some("00-minilet.conflist") => finding(
            Level::Ok,
            "runtime cni config",
            format!("00-minilet.conflist is first in {}", cfg.runtime_cni_conf_dir.display()),
        ),
        Some(other) => finding(
            Level::Fail,
            "runtime cni config",
            format!(
                "{other} sorts before 00-minilet.conflist in {}: the runtime would use it, not minilet's chain",
                cfg.runtime_cni_conf_dir.display()
            ),
        ),
        None => finding(
            Level::Warn,
            "runtime cni config",
            format!(
                "no config in {}: the agent writes 00-minilet.conflist when it starts",
                cfg.runtime_cni_conf_dir.display()
            ),
        ),
    });
    out
}

async fn check_agent(cfg: &Config) -> Finding {
    match control::fetch(&cfg.control_socket()).await {
        Ok(view) => finding(
            Level::Ok,
            "agent",
            format!(
                "running: {} pods, {} manifest errors",
                view.pods.len(),
                view.errors.len()
            ),
        ),
        Err(e) => finding(Level::Warn, "agent", crate::error_chain(&e)),
    }
}

fn check_static_pods(cfg: &Config) -> Finding {
    match &cfg.static_pod_path {
        None => finding(Level::Ok, "static pods", "staticPodPath unset: none"),
        Some(p) if p.is_dir() => finding(Level::Ok, "static pods", p.display().to_string()),
        Some(p) => finding(
            Level::Warn,
            "static pods",
            format!(
                "{} is not a directory (yet): the agent waits for it",
                p.display()
            ),
        ),
    }
}

/// Timeouts for doctor's CSI calls: a healthy driver answers at once.
const CSI_TIMEOUTS: crate::csi::Timeouts = crate::csi::Timeouts {
    connect: Duration::from_secs(2),
    info: Duration::from_secs(3),
    operation: Duration::from_secs(3),
};

/// One line per CSI driver: where it is, whether it answers, its version
/// and capabilities.
async fn check_csi(cfg: &Config) -> Vec<Finding> {
    use crate::csi::{self, CsiClient, registration};
    // (name, endpoint, where it comes from)
    let mut drivers: Vec<(String, String, String)> = cfg
        .csi_drivers
        .iter()
        .map(|d| (d.name.clone(), d.endpoint.clone(), "csiDrivers".to_string()))
        .collect();
    let mut out = vec![];
    let dir = csi::registry_dir(&cfg.state_dir);
    if dir.is_dir() {
        match registration::peek(&dir, CSI_TIMEOUTS).await {
            Ok(found) => {
                for (socket, info) in found {
                    match info {
                        Ok(i) if i.r#type == registration::CSI_PLUGIN_TYPE => drivers.push((
                            i.name,
                            i.endpoint,
                            format!("registered by {}", socket.display()),
                        )),
                        Ok(_) => {} // a device plugin: not ours
                        Err(e) => out.push(finding(
                            Level::Warn,
                            "csi registration",
                            crate::error_chain(&e),
                        )),
                    }
                }
            }
            Err(e) => out.push(finding(
                Level::Warn,
                "csi registration",
                crate::error_chain(&e),
            )),
        }
    }
    if drivers.is_empty() && out.is_empty() {
        out.push(finding(
            Level::Ok,
            "csi driver",
            "none configured (csiDrivers) or registered",
        ));
    }
    for (name, endpoint, from) in drivers {
        let found = match CsiClient::new(&name, &endpoint, CSI_TIMEOUTS) {
            Ok(client) => csi::discover(&client).await,
            Err(e) => Err(e),
        };
        out.push(match found {
            Ok(info) => {
                let caps = info.capability_names();
                finding(
                    if info.ready { Level::Ok } else { Level::Warn },
                    "csi driver",
                    format!(
                        "{name} {} at {endpoint} ({from}): {}, node {}, capabilities {}",
                        info.vendor_version,
                        if info.ready {
                            "ready"
                        } else {
                            "not ready (Probe)"
                        },
                        info.node_id,
                        if caps.is_empty() {
                            "none".to_string()
                        } else {
                            caps.join(",")
                        },
                    ),
                )
            }
            Err(e) => finding(
                Level::Fail,
                "csi driver",
                format!(
                    "{name} at {endpoint} ({from}): unreachable: {}",
                    crate::error_chain(&e)
                ),
            ),
        });
    }
    out
}

/// Every check, in the order they are printed.
pub async fn run(cfg: &Config) -> Vec<Finding> {
    let mut out = vec![check_runtime(cfg).await, check_oom()];
    out.extend(check_cni(cfg).await);
    out.extend(check_forward(cfg).await);
    out.extend(check_delegate(cfg));
    out.push(check_static_pods(cfg));
    out.extend(check_csi(cfg).await);
    out.push(check_agent(cfg).await);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_each_problem_in_one_line() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = Config::default_for("n1");
        cfg.container_runtime_endpoint = format!("unix://{}/none.sock", tmp.path().display());
        cfg.image_service_endpoint = cfg.container_runtime_endpoint.clone();
        cfg.cni_conf_dir = tmp.path().join("net.d");
        cfg.runtime_cni_conf_dir = tmp.path().join("rt/net.d");
        cfg.runtime_cni_bin_dir = tmp.path().join("rt/bin");
        cfg.state_dir = tmp.path().join("state");
        std::fs::create_dir_all(&cfg.runtime_cni_conf_dir).unwrap();
        std::fs::write(cfg.runtime_cni_conf_dir.join("00-aaa.conf"), "{}").unwrap();
        std::fs::write(cfg.runtime_cni_conf_dir.join("00-minilet.conflist"), "{}").unwrap();
        let report = run(&cfg).await;
        let by = |what: &str| report.iter().find(|f| f.what == what).unwrap().clone();
        assert_eq!(by("runtime").level, Level::Fail);
        assert_eq!(by("cni network").level, Level::Fail);
        let rt_conf = by("runtime cni config");
        assert_eq!(rt_conf.level, Level::Fail);
        assert!(
            rt_conf.detail.contains("00-aaa.conf sorts before"),
            "{rt_conf}"
        );
        assert_eq!(by("agent").level, Level::Warn);
        for f in &report {
            assert_eq!(f.to_string().lines().count(), 1, "{f}");
        }
    }

    #[tokio::test]
    async fn reports_each_csi_driver() {
        use crate::csi::fake::{FakeDriver, FakeRegistrar, serve_driver, serve_registrar};
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = Config::default_for("n1");
        cfg.state_dir = tmp.path().join("state");
        assert_eq!(
            check_csi(&cfg).await,
            [finding(
                Level::Ok,
                "csi driver",
                "none configured (csiDrivers) or registered"
            )]
        );
        let a_dir = tmp.path().join("a");
        let b_dir = tmp.path().join("b");
        std::fs::create_dir_all(&a_dir).unwrap();
        std::fs::create_dir_all(&b_dir).unwrap();
        let a_sock = serve_driver(&a_dir, FakeDriver::block_storage("a.csi")).await;
        let b_sock = serve_driver(&b_dir, FakeDriver::node_only("b.csi")).await;
        let reg_dir = crate::csi::registry_dir(&cfg.state_dir);
        std::fs::create_dir_all(&reg_dir).unwrap();
        let registrar = FakeRegistrar::csi("b.csi", &b_sock);
        let _server = serve_registrar(&reg_dir.join("b.csi-reg.sock"), registrar.clone());
        cfg.csi_drivers = vec![
            crate::config::CsiDriverConfig {
                name: "a.csi".into(),
                endpoint: format!("unix://{}", a_sock.display()),
            },
            crate::config::CsiDriverConfig {
                name: "gone.csi".into(),
                endpoint: tmp.path().join("gone.sock").display().to_string(),
            },
        ];
        let report = check_csi(&cfg).await;
        assert_eq!(report.len(), 3, "{report:?}");
        assert_eq!(report[0].level, Level::Ok);
        assert_eq!(
            report[0].detail,
            format!(
                "a.csi 0.1.0 at unix://{} (csiDrivers): ready, node node-1, capabilities CONTROLLER_SERVICE,VOLUME_ACCESSIBILITY_CONSTRAINTS,STAGE_UNSTAGE_VOLUME,GET_VOLUME_STATS,CREATE_DELETE_VOLUME,PUBLISH_UNPUBLISH_VOLUME",
                a_sock.display()
            )
        );
        assert_eq!(report[1].level, Level::Fail);
        assert!(
            report[1].detail.starts_with("gone.csi at "),
            "{}",
            report[1]
        );
        assert!(report[1].detail.contains("unreachable"), "{}", report[1]);
        assert_eq!(report[2].level, Level::Ok);
        assert!(
            report[2].detail.starts_with("b.csi 0.1.0 at "),
            "{}",
            report[2]
        );
        assert!(report[2].detail.contains("registered by"), "{}", report[2]);
        // doctor only looks: the registrar was told nothing.
        assert!(registrar.statuses().is_empty());
        for f in &report {
            assert_eq!(f.to_string().lines().count(), 1, "{f}");
        }
    }

    /// `iptables-save -t filter` on a host running a Docker engine with no
    /// containers (taken on this project's machines).
    const DOCKER_FILTER: &str = "# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A FORWARD -i docker0 -o docker0 -j ACCEPT
-A DOCKER-USER -j RETURN
COMMIT
";

    fn pod_net(has_firewall: bool) -> PodNet {
        PodNet {
            source: "/etc/minilet/net.d/10-bridge.conflist".into(),
            bridge: Some("minilet0".into()),
            has_firewall,
            has_portmap: false,
        }
    }

    #[test]
    fn host_ports_from_other_hosts_need_a_dnat_accept() {
        let net = PodNet {
            has_portmap: true,
            ..pod_net(true)
        };
        let f = forward_finding(DOCKER_FILTER, true, &net);
        assert_eq!(f.level, Level::Warn, "{f}");
        assert_eq!(f.to_string().lines().count(), 1, "{f}");
        assert!(
            f.detail.ends_with(
                "iptables -I DOCKER-USER -o minilet0 -m conntrack --ctstate DNAT -j ACCEPT"
            ),
            "{f}"
        );
        // The rule it names, as iptables-save prints it once added.
        let fixed = DOCKER_FILTER.replace(
            "-A DOCKER-USER -j RETURN",
            "-A DOCKER-USER -o minilet0 -m conntrack --ctstate DNAT -j ACCEPT\n-A DOCKER-USER -j RETURN",
        );
        assert_eq!(forward_finding(&fixed, true, &net).level, Level::Ok);
        // One for another bridge does not count.
        let other = fixed.replace("-o minilet0", "-o br-other");
        assert_eq!(forward_finding(&other, true, &net).level, Level::Warn);
    }

    #[test]
    fn docker_forward_drop_without_a_fix_names_the_problem_and_the_fix() {
        let f = forward_finding(DOCKER_FILTER, true, &pod_net(false));
        assert_eq!(f.level, Level::Fail);
        assert_eq!(f.to_string().lines().count(), 1, "{f}");
        for part in [
            "FORWARD policy DROP (set by Docker)",
            "pod-to-pod (bridge netfilter is on)",
            "hostPort",
            "on minilet0",
            r#"add {"type": "firewall"}"#,
            "/etc/minilet/net.d/10-bridge.conflist",
        ] {
            assert!(f.detail.contains(part), "{part:?} missing from: {f}");
        }
        // Bridge netfilter off: traffic on the bridge stays L2, only
        // routed traffic meets the policy.
        let f = forward_finding(DOCKER_FILTER, false, &pod_net(false));
        assert_eq!(f.level, Level::Fail);
        assert!(!f.detail.contains("pod-to-pod"), "{f}");
        assert!(f.detail.contains("pod egress and hostPort"), "{f}");
    }

    #[test]
    fn forward_is_fine_with_the_firewall_plugin_or_an_accept_policy() {
        let f = forward_finding(DOCKER_FILTER, true, &pod_net(true));
        assert_eq!(f.level, Level::Ok, "{f}");
        assert!(f.detail.contains("firewall plugin"), "{f}");
        // Only the filter table's FORWARD counts (mangle has one too).
        let plain = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\nCOMMIT\n\
                     *mangle\n:FORWARD DROP [0:0]\nCOMMIT\n";
        let f = forward_finding(plain, true, &pod_net(false));
        assert_eq!(f.level, Level::Ok, "{f}");
        assert_eq!(f.detail, "FORWARD policy ACCEPT");
        // A DROP not made by Docker is reported without blaming it.
        let own = "*filter\n:FORWARD DROP [0:0]\nCOMMIT\n";
        let f = forward_finding(own, true, &pod_net(false));
        assert_eq!(f.level, Level::Fail);
        assert!(!f.detail.contains("Docker"), "{f}");
        let f = forward_finding("", true, &pod_net(false));
        assert_eq!(f.level, Level::Warn, "{f}");
    }

    #[test]
    fn the_example_chain_carries_the_fix() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cni/10-bridge.conflist");
        let net = PodNet::of(&cni::config::load_file(&path).unwrap());
        assert_eq!(net.bridge.as_deref(), Some("minilet0"));
        assert!(net.has_firewall && net.has_portmap, "{net:?}");
        let f = forward_finding(DOCKER_FILTER, true, &net);
        assert_ne!(f.level, Level::Fail, "{f}");
    }

    #[test]
    fn oom_probe_restores_the_old_value() {
        let before = std::fs::read_to_string("/proc/self/oom_score_adj").unwrap();
        let _ = oom_score_adj_refused();
        assert_eq!(
            std::fs::read_to_string("/proc/self/oom_score_adj").unwrap(),
            before
        );
    }
}
