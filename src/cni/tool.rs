//! `minilet cni add|check|del|gc|status`: cnitool's verbs on minilet's own
//! networks, result cache and plugin dirs, run in-process (no agent
//! needed). Results are printed as JSON on stdout, failures as a CNI error
//! object (exit code 1), as a plugin would.
//!
//! Capability args can be given as a JSON object in `CAP_ARGS` (cnitool's
//! variable); `gc` takes the attachments whose netns still exists as live
//! and deletes the rest, then sends the GC verb.
//!
//! Side effects: runs plugins, reads and writes the result cache.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use super::cache::ResultCache;
use super::chain::{Attachment, CniRunner};
use super::config::{NetworkStore, load_dir};
use super::exec::{PluginError, PluginExec, ProcessExec, codes};
use super::observe::CniMetrics;

/// The tool's verbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolVerb {
    Add,
    Check,
    Del,
    Gc,
    Status,
}

/// One invocation's parameters.
#[derive(Clone, Debug, Default)]
pub struct ToolRequest {
    /// The network; `None` or `""`: the default one.
    pub network: Option<String>,
    pub netns: Option<String>,
    /// Defaults to `cnitool-` + a hash of the netns path, like cnitool.
    pub container_id: Option<String>,
    pub ifname: String,
    /// CNI_ARGS (`K=V;K=V`).
    pub args: Option<String>,
    /// Capability args (runtimeConfig), a JSON object.
    pub capability_args: Option<String>,
}

/// Runs the tool against the config's CNI dirs and cache; returns the exit
/// code.
pub async fn run_tool(
    cfg: &crate::config::Config,
    verb: ToolVerb,
    network: Option<String>,
    netns: Option<String>,
    container_id: Option<String>,
    ifname: String,
    args: Option<String>,
) -> i32 {
    let set = load_dir(&cfg.cni_conf_dir);
    for (file, e) in &set.errors {
        eprintln!("minilet cni: skipping {}: {e}", file.display());
    }
    let runner = CniRunner::new(
        ProcessExec::from_config(cfg),
        Arc::new(NetworkStore::new(set)),
        ResultCache::new(cfg.cni_cache_dir.clone()),
        Arc::new(CniMetrics::new()),
    )
    .with_gc_grace(Duration::ZERO);
    let req = ToolRequest {
        network,
        netns,
        container_id,
        ifname,
        args,
        capability_args: std::env::var("CAP_ARGS").ok(),
    };
    let mut out = Vec::new();
    let code = run_with(&runner, verb, &req, &mut out).await;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(&out).and_then(|()| stdout.flush());
    code
}

fn fail(out: &mut Vec<u8>, version: &str, code: u32, msg: String) -> i32 {
    let e = PluginError {
        cni_version: version.to_owned(),
        code,
        msg,
        details: String::new(),
    };
    print_json(out, &serde_json::to_value(e).expect("errors serialise"));
    1
}

fn print_json(out: &mut Vec<u8>, v: &Value) {
    let _ = serde_json::to_writer_pretty(&mut *out, v);
    out.push(b'\n');
}

/// The tool over any runner; output goes to `out`.
pub async fn run_with<E: PluginExec>(
    runner: &CniRunner<E>,
    verb: ToolVerb,
    req: &ToolRequest,
    out: &mut Vec<u8>,
) -> i32 {
    let network = req.network.clone().unwrap_or_default();
    let version = runner
        .network(&network)
        .map(|n| n.cni_version)
        .unwrap_or_else(|_| super::delegate::PLUGIN_VERSION.into());
    match verb {
        ToolVerb::Status => {
            return match runner.status(&network).await {
                Ok(()) => 0,
                Err(e) => {
                    let mut pe = e.to_plugin_error();
                    pe.cni_version = version;
                    print_json(out, &serde_json::to_value(pe).expect("errors serialise"));
                    1
                }
            };
        }
        ToolVerb::Gc => {
            let live: HashSet<String> = match runner.cache().list().await {
                Ok(all) => all
                    .into_iter()
                    .filter(|a| !a.netns.is_empty() && Path::new(&a.netns).exists())
                    .map(|a| a.container_id)
                    .collect(),
                Err(e) => {
                    return fail(
                        out,
                        &version,
                        codes::IO_FAILURE,
                        crate::cni::chain::error_chain(&e),
                    );
                }
            };
            let report = runner.gc(&live).await;
            let v = serde_json::json!({
                "deleted": report.deleted,
                "gc": report.gc_calls,
                "errors": report.errors,
            });
            print_json(out, &v);
            return i32::from(!report.errors.is_empty());
        }
        ToolVerb::Add | ToolVerb::Check | ToolVerb::Del => {}
    }
    let Some(netns) = req.netns.clone().filter(|n| !n.is_empty()) else {
        return fail(
            out,
            &version,
            codes::INVALID_ENV,
            "--netns is required".into(),
        );
    };
    let container_id = req.container_id.clone().unwrap_or_else(|| {
        use md5::Digest;
        let h = md5::Md5::digest(netns.as_bytes());
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        format!("cnitool-{}", &hex[..20])
    });
    let args = match super::delegate::parse_cni_args(req.args.as_deref().unwrap_or("")) {
        Ok(a) => a,
        Err(m) => return fail(out, &version, codes::INVALID_ENV, m),
    };
    let capability_args = match &req.capability_args {
        None => Map::new(),
        Some(s) => match serde_json::from_str::<Map<String, Value>>(s) {
            Ok(m) => m,
            Err(e) => {
                return fail(
                    out,
                    &version,
                    codes::DECODE_FAILURE,
                    format!("CAP_ARGS is not a JSON object: {e}"),
                );
            }
        },
    };
    let att = Attachment {
        container_id,
        netns,
        ifname: if req.ifname.is_empty() {
            "eth0".into()
        } else {
            req.ifname.clone()
        },
        args,
        capability_args,
    };
    let r = match verb {
        ToolVerb::Add => runner.add(&network, &att).await.map(Some),
        ToolVerb::Check => runner.check(&network, &att).await.map(|()| None),
        _ => runner.del(&network, &att).await.map(|()| None),
    };
    match r {
        Ok(Some(result)) => {
            print_json(out, &result);
            0
        }
        Ok(None) => 0,
        Err(e) => {
            let mut pe = e.to_plugin_error();
            pe.cni_version = version;
            print_json(out, &serde_json::to_value(pe).expect("errors serialise"));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::fake::FakeExec;

    fn runner() -> CniRunner<FakeExec> {
        let net = crate::cni::config::parse(
            br#"{"cniVersion":"1.1.0","name":"n1","plugins":[{"type":"one"},{"type":"two","capabilities":{"portMappings":true}}]}"#,
            true,
            Path::new("x.conflist"),
        )
        .unwrap();
        let mut set = crate::cni::config::NetworkSet {
            default: Some("n1".into()),
            ..Default::default()
        };
        set.networks.insert("n1".into(), net);
        CniRunner::new(
            FakeExec::new(),
            Arc::new(NetworkStore::new(set)),
            ResultCache::new(tempfile::tempdir().unwrap().keep()),
            Arc::new(CniMetrics::new()),
        )
        .with_gc_grace(Duration::ZERO)
    }

    async fn run(r: &CniRunner<FakeExec>, verb: ToolVerb, req: &ToolRequest) -> (i32, String) {
        let mut out = Vec::new();
        let code = run_with(r, verb, req, &mut out).await;
        (code, String::from_utf8(out).unwrap())
    }

    #[tokio::test]
    async fn verbs_like_cnitool() {
        let r = runner();
        let ns = tempfile::NamedTempFile::new().unwrap();
        let netns = ns.path().to_string_lossy().into_owned();
        let req = ToolRequest {
            netns: Some(netns.clone()),
            container_id: Some("c1".into()),
            ifname: "eth0".into(),
            args: Some("K8S_POD_NAME=web".into()),
            capability_args: Some(
                r#"{"portMappings":[{"hostPort":1,"containerPort":2,"protocol":"tcp"}]}"#.into(),
            ),
            ..Default::default()
        };
        let (code, out) = run(&r, ToolVerb::Add, &req).await;
        assert_eq!(code, 0, "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["plugins"], serde_json::json!(["one", "two"]));
        let calls = r.exec().op_calls();
        assert_eq!(calls[1].env.args, "K8S_POD_NAME=web");
        assert_eq!(
            calls[1].stdin["runtimeConfig"]["portMappings"][0]["hostPort"],
            1
        );
        assert_eq!(run(&r, ToolVerb::Check, &req).await, (0, String::new()));
        assert_eq!(
            run(&r, ToolVerb::Status, &ToolRequest::default()).await,
            (0, String::new())
        );
        // Another attachment whose netns is gone: gc deletes it, keeps c1.
        let gone = ToolRequest {
            netns: Some("/nonexistent/netns".into()),
            container_id: None,
            ..req.clone()
        };
        assert_eq!(run(&r, ToolVerb::Add, &gone).await.0, 0);
        let (code, out) = run(&r, ToolVerb::Gc, &ToolRequest::default()).await;
        assert_eq!(code, 0, "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        let deleted = v["deleted"][0][1].as_str().unwrap();
        assert!(
            deleted.starts_with("cnitool-") && deleted.len() == 28,
            "{v}"
        );
        assert_eq!(v["deleted"].as_array().unwrap().len(), 1);
        assert_eq!(v["gc"], serde_json::json!([["n1", "one"], ["n1", "two"]]));
        assert_eq!(run(&r, ToolVerb::Del, &req).await, (0, String::new()));
        // Errors are CNI error objects.
        let (code, out) = run(&r, ToolVerb::Check, &req).await;
        assert_eq!(code, 1);
        let e: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(e["cniVersion"], "1.1.0");
        assert!(
            e["msg"].as_str().unwrap().contains("no cached result"),
            "{e}"
        );
        let (code, out) = run(
            &r,
            ToolVerb::Add,
            &ToolRequest {
                netns: None,
                ..req.clone()
            },
        )
        .await;
        assert_eq!(code, 1);
        assert!(out.contains("--netns is required"), "{out}");
        let (code, out) = run(
            &r,
            ToolVerb::Add,
            &ToolRequest {
                network: Some("nope".into()),
                ..req.clone()
            },
        )
        .await;
        assert_eq!(code, 1);
        assert!(out.contains("no CNI network named"), "{out}");
    }
}
