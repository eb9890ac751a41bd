//! The real control plane harness: finds the control plane
//! `integration/control-plane.sh up` brought up (etcd, kube-apiserver with
//! the Node authorizer and NodeRestriction, scheduler, controller-manager),
//! runs kubectl against it as the admin, and mints a node's kubeconfig
//! (a client certificate for `system:node:<name>` in `system:nodes`), so a
//! test starts minilet with exactly a kubelet's identity. A missing control
//! plane is a test FAILURE, never a skip.

#![allow(dead_code)] // used by the API-mode tests as they land
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The control plane's env file, parsed.
pub struct ControlPlane {
    pub env: HashMap<String, String>,
    pub dir: PathBuf,
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
        let dir = stack.join("cp");
        let file = dir.join("env");
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
            panic!(
                "the control plane is not up ({}: {e}); run `integration/control-plane.sh up` first (CI does)",
                file.display()
            )
        });
        ControlPlane {
            env: parse_env(&text),
            dir,
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
