//! `minilet doctor`: checks that this node can run pods and says what is
//! wrong in one line per finding: the runtime, the host's known traps
//! (negative oom_score_adj refused), the CNI configs and plugins, the
//! delegating plugin's install, and the running agent.
//!
//! Side effects: reads files, dials the runtime and the agent, and briefly
//! writes this process's own oom_score_adj (then restores it).

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

/// Every check, in the order they are printed.
pub async fn run(cfg: &Config) -> Vec<Finding> {
    let mut out = vec![check_runtime(cfg).await, check_oom()];
    out.extend(check_cni(cfg).await);
    out.extend(check_delegate(cfg));
    out.push(check_static_pods(cfg));
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
