//! The real control plane harness: finds the control plane
//! `integration/control-plane.sh up` brought up (etcd, kube-apiserver with
//! the Node authorizer and NodeRestriction, scheduler, controller-manager),
//! runs kubectl against it as the admin, and mints a node's kubeconfig
//! (a client certificate for `system:node:<name>` in `system:nodes`), so a
//! test starts minilet with exactly a kubelet's identity. A missing control
//! plane is a test FAILURE, never a skip.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Agent, Options, eventually};

/// The control plane's env file, parsed.
pub struct ControlPlane {
    pub env: HashMap<String, String>,
}

fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(|l| l.trim())
        .map(|l| l.strip_prefix("export ").unwrap_or(l))
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches(['"', '\'']).to_string()))
        .collect()
}

impl ControlPlane {
    pub fn load() -> ControlPlane {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let stack = std::env::var("MINILET_STACK_DIR")
            .map_or_else(|_| repo.join("integration/.run"), PathBuf::from);
        ControlPlane::from_env_file(&stack.join("cp").join("env"))
    }

    /// The control plane whose `control-plane.sh up` wrote `file` (the
    /// kind-style cluster's own, say).
    pub fn from_env_file(file: &Path) -> ControlPlane {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| {
            panic!(
                "the control plane is not up ({}: {e}); run `integration/control-plane.sh up` first (CI does)",
                file.display()
            )
        });
        ControlPlane {
            env: parse_env(&text),
        }
    }

    pub fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from the control plane env file"))
    }

    fn kubectl_bin(&self) -> PathBuf {
        Path::new(self.get("MINILET_CP_BIN")).join("kubectl")
    }

    /// Run kubectl as the cluster admin: (exit code, stdout, stderr).
    pub fn kubectl(&self, args: &[&str]) -> (i32, String, String) {
        self.kubectl_as(self.get("MINILET_CP_ADMIN_KUBECONFIG"), args)
    }

    /// Run kubectl with `kubeconfig` (a node's, say).
    pub fn kubectl_as(&self, kubeconfig: &str, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(self.kubectl_bin())
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .output()
            .expect("run kubectl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// kubectl as the admin that must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.kubectl(args);
        assert_eq!(code, 0, "kubectl {args:?} failed: {out}{err}");
        out
    }

    /// `kubectl get -o json` of one object or list, parsed.
    pub fn get_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let out = self.kubectl_ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {all:?}: {e}: {out}"))
    }

    /// Apply a manifest given as YAML text.
    pub fn apply(&self, yaml: &str) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("obj.yaml");
        std::fs::write(&file, yaml).unwrap();
        self.kubectl_ok(&["apply", "-f", file.to_str().unwrap()]);
    }

    /// A kubeconfig for node `node` (client certificate CN
    /// system:node:<node>, O system:nodes), written to `out`.
    pub fn node_kubeconfig(&self, node: &str, out: &Path) {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let st = Command::new(repo.join("integration/control-plane.sh"))
            .args(["node-kubeconfig", node])
            .arg(out)
            .status()
            .expect("run control-plane.sh node-kubeconfig");
        assert!(
            st.success(),
            "control-plane.sh node-kubeconfig {node} failed"
        );
    }

    /// Delete a Node object (and with it, by the garbage collector, its
    /// Lease and mirror pods) so a test starts from a clean slate.
    pub fn forget_node(&self, node: &str) {
        self.kubectl(&["delete", "node", node, "--ignore-not-found", "--wait=false"]);
        self.kubectl(&[
            "-n",
            "kube-node-lease",
            "delete",
            "lease",
            node,
            "--ignore-not-found",
        ]);
    }
}

/// Run `integration/control-plane.sh ARGS` (stop/start a component, …).
pub fn control_plane(args: &[&str]) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let st = Command::new(repo.join("integration/control-plane.sh"))
        .args(args)
        .status()
        .expect("run control-plane.sh");
    assert!(st.success(), "control-plane.sh {args:?} failed");
}

/// A kube-rs client from a kubeconfig file (the admin's, a node's).
pub async fn client(kubeconfig: &str) -> kube::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

/// Poll `f` every 200 ms until it holds; fail after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A node of the control plane: its kubelet identity (kubeconfig) and the
/// cleanup of what a test made in the API. Dropped before the agent, so
/// the agent tears the node's pods down; then the Node goes (and with it,
/// through the garbage collector, its Lease and mirror pods).
pub struct ApiNode {
    pub cp: ControlPlane,
    pub node: String,
    pub kubeconfig: PathBuf,
    pub dir: tempfile::TempDir,
}

impl ApiNode {
    /// An agent running as `system:node:<node>`, its Node registered by
    /// itself and Ready (the scheduler binds only to such a node).
    pub fn start(node: &str) -> (Agent, ApiNode) {
        ApiNode::start_with(node, Options::default())
    }

    /// `start` with more agent options (the kubeconfig flag is added).
    pub fn start_with(node: &str, mut options: Options) -> (Agent, ApiNode) {
        let n = ApiNode::identity(node);
        options
            .args
            .extend(["--kubeconfig".into(), n.kubeconfig.display().to_string()]);
        let agent = Agent::start_with(node, options);
        wait_until("the agent's Node is Ready", Duration::from_secs(60), || {
            n.ready()
        });
        (agent, n)
    }

    /// The identity alone: no Node object, no agent.
    pub fn identity(node: &str) -> ApiNode {
        let cp = ControlPlane::load();
        cp.forget_node(node);
        wait_until("old node forgotten", Duration::from_secs(30), || {
            cp.kubectl(&["get", "node", node]).0 != 0
        });
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("node.kubeconfig");
        cp.node_kubeconfig(node, &kubeconfig);
        ApiNode {
            cp,
            node: node.to_string(),
            kubeconfig,
            dir,
        }
    }

    /// Whether the Node reports Ready=True.
    pub fn ready(&self) -> bool {
        let (code, out, _) = self.cp.kubectl(&["get", "node", &self.node, "-o", "json"]);
        code == 0
            && serde_json::from_str::<Value>(&out).is_ok_and(|n| {
                n["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            })
    }

    /// A pod in the default namespace, if it exists.
    pub fn pod(&self, name: &str) -> Option<Value> {
        let (code, out, _) = self.cp.kubectl(&["get", "pod", name, "-o", "json"]);
        (code == 0).then(|| serde_json::from_str(&out).unwrap())
    }

    /// The first container's waiting message, once its reason is `reason`.
    pub async fn waiting(&self, name: &str, reason: &str) -> String {
        eventually(
            &format!("{name} waiting with {reason}"),
            Duration::from_secs(60),
            || async {
                let p = self.pod(name)?;
                let w = &p["status"]["containerStatuses"][0]["state"]["waiting"];
                (w["reason"] == reason).then(|| w["message"].as_str().unwrap_or("").to_string())
            },
        )
        .await
    }
}

impl Drop for ApiNode {
    fn drop(&mut self) {
        let sel = format!("spec.nodeName={}", self.node);
        let list = ["pods", "--all-namespaces", "--field-selector", &sel];
        let mut delete = vec!["delete"];
        delete.extend_from_slice(&list);
        delete.push("--wait=false");
        self.cp.kubectl(&delete);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            let mut get = vec!["get"];
            get.extend_from_slice(&list);
            get.extend_from_slice(&["-o", "name"]);
            // Mirror pods stay until the agent removes the manifests.
            let out = self.cp.kubectl(&get).1;
            let only_mirrors = out.lines().filter(|l| !l.is_empty()).all(|l| {
                self.pod(l.trim_start_matches("pod/")).is_some_and(|p| {
                    p["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_string()
                })
            });
            if only_mirrors {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.cp.forget_node(&self.node);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn env_lines_with_and_without_export_parse() {
        let env = super::parse_env("export A=\"1\"\nB=2\n# c=3\n");
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "2");
        assert!(!env.contains_key("# c"));
    }
}
