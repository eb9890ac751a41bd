//! End-to-end: TLS bootstrap against the real control plane, as a kubeadm
//! node joins. A bootstrap token (control-plane.sh bootstrap-kubeconfig:
//! a bootstrap-token Secret and kubeadm's RBAC) → the agent's CSR for the
//! kube-apiserver-client-kubelet signer, approved by the controller
//! manager's csrapproving controller and signed by its csrsigning one → the
//! key and certificate in the cert dir, the kubeconfig written (0600) and
//! used. A wrong token is one clear error while static pods run; a restart
//! reuses the issued certificate; a rotation (brought forward by the
//! fault-injection build) goes through a new CSR made with the node's own
//! certificate and approved as a renewal, and the client carries on with it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use minilet::api::pki::Pair;
use minilet::cri::Runtime;

use crate::cluster::{ControlPlane, control_plane, wait_until};
use crate::harness::*;
use crate::{BUSYBOX, on_stack, sleeper};

const NODE: &str = "e2e-tls-boot";

/// The client CSRs of this node: (name, requesting user, approved, issued).
fn csrs(cp: &ControlPlane) -> Vec<(String, String, bool, bool)> {
    csrs_of(cp, "kubernetes.io/kube-apiserver-client-kubelet")
}

/// The CSRs of this node for `signer`.
fn csrs_of(cp: &ControlPlane, signer: &str) -> Vec<(String, String, bool, bool)> {
    let list = cp.get_json(&["csr"]);
    list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|c| {
            let req = c["spec"]["request"].as_str().unwrap_or("");
            // The subject is inside the base64 PEM: match the requester or
            // our naming instead.
            let user = c["spec"]["username"].as_str().unwrap_or("");
            !req.is_empty()
                && c["spec"]["signerName"] == signer
                && (user == format!("system:node:{NODE}")
                    || c["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("node-csr-")))
        })
        .map(|c| {
            let approved = c["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|x| x["type"] == "Approved"));
            (
                c["metadata"]["name"].as_str().unwrap_or("").to_string(),
                c["spec"]["username"].as_str().unwrap_or("").to_string(),
                approved,
                c["status"]["certificate"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
            )
        })
        .collect()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn node_ready(cp: &ControlPlane) -> bool {
    let (code, out, _) = cp.kubectl(&["get", "node", NODE, "-o", "json"]);
    code == 0
        && serde_json::from_str::<serde_json::Value>(&out).is_ok_and(|n| {
            n["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
}

#[test]
fn a_node_joins_by_tls_bootstrap_reuses_its_certificate_and_rotates_it() {
    needs_fault_hook();
    on_stack(async {
        let cp = ControlPlane::load();
        cp.forget_node(NODE);
        cp.kubectl(&[
            "delete",
            "pod",
            "boot-api",
            "--ignore-not-found",
            "--grace-period=0",
            "--force",
        ]);
        // CSRs of an earlier run are cluster-scoped leftovers: delete them.
        for (name, ..) in csrs(&cp)
            .into_iter()
            .chain(csrs_of(&cp, "kubernetes.io/kubelet-serving"))
        {
            cp.kubectl(&["delete", "csr", &name, "--ignore-not-found"]);
        }
        wait_until("old node forgotten", Duration::from_secs(30), || {
            cp.kubectl(&["get", "node", NODE]).0 != 0
        });
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("bootstrap.kubeconfig");
        control_plane(&["bootstrap-kubeconfig", good.to_str().unwrap()]);
        let text = std::fs::read_to_string(&good).unwrap();
        let token = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("token: "))
            .unwrap()
            .to_string();
        let wrong = dir.path().join("wrong.kubeconfig");
        std::fs::write(&wrong, text.replace(&token, "0bad00.0123456789abcdef")).unwrap();
        let kubeconfig = dir.path().join("kubelet.conf");
        let args = |bootstrap: &Path| {
            vec![
                "--kubeconfig".to_string(),
                kubeconfig.display().to_string(),
                "--bootstrap-kubeconfig".into(),
                bootstrap.display().to_string(),
            ]
        };

        // 1. A wrong token: one clear error, retried; a static pod runs.
        let mut agent = Agent::start_with(
            NODE,
            Options {
                args: args(&wrong),
                kubelet_config: vec![
                    "rotateCertificates: true".into(),
                    "serverTLSBootstrap: true".into(),
                ],
                unready: true,
                ..Default::default()
            },
        );
        let cri = agent.stack.cri().await;
        agent.write_manifest(
            "static.yaml",
            &sleeper("boot-static", &[("app", "sleep 3600")]),
        );
        let static_c = crate::running_container(&cri, &agent, "boot-static", "app").await;
        eventually(
            "the refused token is said, twice (retried)",
            Duration::from_secs(30),
            || async {
                let log = agent.log();
                let said = log.matches("the API server refused them").count();
                (said >= 2 && log.contains(&format!("bootstrap kubeconfig {}", wrong.display())))
                    .then_some(())
            },
        )
        .await;
        assert!(
            !kubeconfig.exists(),
            "nothing written without a certificate"
        );
        assert_ne!(
            cp.kubectl(&["get", "node", NODE]).0,
            0,
            "no Node without credentials"
        );

        // 2. The right token: a CSR, approved and signed; credentials
        // written and used; the static pod untouched.
        agent.terminate();
        agent.options.args = args(&good);
        agent.restart_unready();
        wait_until(
            "the bootstrapped node is Ready",
            Duration::from_secs(90),
            || node_ready(&cp),
        );
        let issued = csrs(&cp);
        let (id, _) = token.split_once('.').unwrap();
        assert!(
            issued.iter().any(|(_, user, approved, cert)| user
                == &format!("system:bootstrap:{id}")
                && *approved
                && *cert),
            "a CSR by the bootstrap token, approved and issued: {issued:?}"
        );
        let pki = agent.dir.path().join("state/pki");
        let first = minilet::api::pki::current(&pki, Pair::Client)
            .unwrap()
            .expect("a current pair");
        assert_eq!(first.common_name, format!("system:node:{NODE}"));
        assert_eq!(mode(&kubeconfig), 0o600);
        assert_eq!(
            mode(&std::fs::canonicalize(pki.join("kubelet-client-current.pem")).unwrap()),
            0o600
        );
        let (code, out, err) = cp.kubectl_as(
            kubeconfig.to_str().unwrap(),
            &["get", "node", NODE, "-o", "name"],
        );
        assert_eq!(
            (code, out.trim()),
            (0, format!("node/{NODE}").as_str()),
            "the written kubeconfig works: {err}"
        );
        let still = cri
            .list_containers(agent.pod_selector("boot-static"))
            .await
            .unwrap();
        assert!(
            still.iter().any(|c| c.id == static_c.id && running(c)),
            "the static pod ran through the bootstrap: {still:?}"
        );

        // The serving certificate: self-signed until the cluster issues
        // one; v1.20 approves only client CSRs, so the test approves it as
        // an admin would.
        let self_signed = pki.join("kubelet.crt");
        wait_until(
            "a self-signed serving pair",
            Duration::from_secs(30),
            || self_signed.exists() && pki.join("kubelet.key").exists(),
        );
        let serving = "kubernetes.io/kubelet-serving";
        let pending = eventually(
            "a serving CSR by the node",
            Duration::from_secs(30),
            || async {
                csrs_of(&cp, serving)
                    .into_iter()
                    .find(|(_, user, approved, _)| {
                        user == &format!("system:node:{NODE}") && !approved
                    })
                    .map(|(name, ..)| name)
            },
        )
        .await;
        cp.kubectl_ok(&["certificate", "approve", &pending]);
        let served = eventually(
            "the serving pair issued",
            Duration::from_secs(60),
            || async {
                minilet::api::pki::current(&pki, Pair::Server)
                    .ok()
                    .flatten()
            },
        )
        .await;
        assert_eq!(served.common_name, format!("system:node:{NODE}"));
        assert_eq!(
            mode(&std::fs::canonicalize(pki.join("kubelet-server-current.pem")).unwrap()),
            0o600
        );

        // 3. A restart reuses the certificate: no new CSR.
        let before = csrs(&cp).len();
        agent.terminate();
        agent.restart_unready();
        agent.wait_ready();
        assert!(
            agent
                .log()
                .contains("client certificate from an earlier bootstrap is valid")
        );
        assert_eq!(csrs(&cp).len(), before, "no new CSR after a restart");
        assert_eq!(
            minilet::api::pki::current(&pki, Pair::Client).unwrap(),
            Some(first.clone())
        );

        // 4. Rotation, due at once: a renewal CSR by the node itself,
        // approved (selfnodeclient); the new pair in use.
        agent.terminate();
        agent.options.env = vec![("MINILET_FAULT_ROTATE_AFTER_SECS".into(), "0".into())];
        agent.restart_unready();
        let second = eventually("a rotated certificate", Duration::from_secs(60), || async {
            minilet::api::pki::current(&pki, Pair::Client)
                .ok()
                .flatten()
                .filter(|c| c.public_key != first.public_key)
        })
        .await;
        assert_eq!(second.common_name, format!("system:node:{NODE}"));
        let renewals: Vec<_> = csrs(&cp)
            .into_iter()
            .filter(|(_, user, ..)| user == &format!("system:node:{NODE}"))
            .collect();
        assert!(
            renewals
                .iter()
                .any(|(_, _, approved, cert)| *approved && *cert),
            "a renewal CSR by the node, approved and issued: {renewals:?}"
        );
        // Stop the rotation loop the test hook makes, then prove the
        // rotated credentials carry the API tasks: a pod bound to the node.
        agent.terminate();
        agent.options.env.clear();
        agent.restart_unready();
        cp.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: boot-api\n  namespace: default\nspec:\n  nodeName: {NODE}\n  automountServiceAccountToken: false\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    image: {BUSYBOX}\n    command: [sleep, '3600']\n"
        ));
        wait_until("the API pod Running", Duration::from_secs(60), || {
            cp.get_json(&["pod", "boot-api"])["status"]["phase"] == "Running"
        });
        let now = minilet::api::pki::current(&pki, Pair::Client)
            .unwrap()
            .unwrap();
        assert!(
            now.public_key != first.public_key,
            "the rotated pair is the one in use"
        );

        cp.kubectl(&["delete", "pod", "boot-api", "--grace-period=0", "--force"]);
        agent.remove_manifest("static.yaml");
        for (name, ..) in csrs(&cp)
            .into_iter()
            .chain(csrs_of(&cp, "kubernetes.io/kubelet-serving"))
        {
            cp.kubectl(&["delete", "csr", &name, "--ignore-not-found"]);
        }
        eventually("the pods are gone", Duration::from_secs(60), || async {
            cri.list_pod_sandboxes(agent.selector())
                .await
                .unwrap()
                .into_iter()
                .all(|s| s.state != minilet::cri::api::PodSandboxState::SandboxReady as i32)
                .then_some(())
        })
        .await;
        drop(agent);
        cp.forget_node(NODE);
    });
}
