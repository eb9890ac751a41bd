//! The objects pods use, against the real v1.20 control plane (Node
//! authorizer + NodeRestriction): env and envFrom from a ConfigMap and a
//! Secret the pod references, a missing ConfigMap as kubelet reports it,
//! an image behind a registry login pulled with imagePullSecrets (and not
//! without), the node user refused a Secret no pod of its references, a
//! service account token through TokenRequest; standalone, a static pod
//! with env from a ConfigMap in the manifest dir. What a container saw is
//! read from its log (`env` at start).

use std::time::{Duration, Instant};

use crate::cluster::{ApiNode, client, control_plane, wait_until};
use crate::harness::*;
use crate::{BUSYBOX, on_stack, running_container};
use minilet::objects::{LookupError, ObjectLookup};

fn env_pod(name: &str, node: &str, image: &str, extra_spec: &str, container_extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}-{node}\n  namespace: default\nspec:\n  nodeName: {node}\n  automountServiceAccountToken: false\n  terminationGracePeriodSeconds: 1\n{extra_spec}  containers:\n  - name: app\n    image: {image}\n    command: [sh, -c, 'env; sleep 3600']\n{container_extra}"
    )
}

/// The env a container printed at start (its first log), as KEY=VALUE lines.
async fn printed_env(agent: &Agent, pod: &str) -> Vec<String> {
    eventually(
        &format!("{pod} printed its env"),
        Duration::from_secs(30),
        || async {
            let lines = first_log_lines(agent, "default", &format!("{pod}-{}", agent.node))?;
            lines
                .iter()
                .any(|l| l.starts_with("PATH="))
                .then_some(lines)
        },
    )
    .await
}

fn has(env: &[String], line: &str) -> bool {
    env.iter().any(|l| l == line)
}

/// A pod with env, valueFrom and envFrom from a ConfigMap and a Secret sees
/// the values; one naming a ConfigMap that does not exist waits with
/// kubelet's reason and message.
#[test]
fn api_pod_env_from_config_map_and_secret() {
    on_stack(async {
        let (agent, n) = ApiNode::start("e2e-objenv");
        let cri = agent.stack.cri().await;
        n.cp.kubectl(&["delete", "configmap", "e2e-cfg", "--ignore-not-found"]);
        n.cp.kubectl(&["delete", "secret", "e2e-creds", "--ignore-not-found"]);
        n.cp.apply(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: e2e-cfg, namespace: default}\ndata: {GREETING: hello, MODE: from-cm, 1st: x}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: e2e-creds, namespace: default}\nstringData: {PASS: s3cret}\n",
        );
        n.cp.apply(&env_pod(
            "envy",
            &agent.node,
            BUSYBOX,
            "",
            "    envFrom:\n    - configMapRef: {name: e2e-cfg}\n    - secretRef: {name: e2e-creds}\n      prefix: S_\n    env:\n    - {name: MODE, value: \"env-$(MODE)\"}\n    - name: PW\n      valueFrom: {secretKeyRef: {name: e2e-creds, key: PASS}}\n    - name: HI\n      valueFrom: {configMapKeyRef: {name: e2e-cfg, key: GREETING}}\n    - name: NONE\n      valueFrom: {configMapKeyRef: {name: e2e-absent, key: x, optional: true}}\n",
        ));
        running_container(&cri, &agent, "envy", "app").await;
        let env = printed_env(&agent, "envy").await;
        for want in [
            "GREETING=hello",
            "MODE=env-from-cm",
            "S_PASS=s3cret",
            "PW=s3cret",
            "HI=hello",
        ] {
            assert!(has(&env, want), "{want} in {env:?}");
        }
        assert!(!env.iter().any(|l| l.starts_with("NONE=")), "{env:?}");
        // The skipped key `1st` is reported in an
        // InvalidEnvironmentVariableNames event (its wording is unit-tested
        // in pod::spec; API events are checked once the recorder is wired).
        assert!(!env.iter().any(|l| l.starts_with("1st=")), "{env:?}");

        // A ConfigMap that does not exist: the container waits, as kubelet's.
        n.cp.apply(&env_pod(
            "lacking",
            &agent.node,
            BUSYBOX,
            "",
            "    env:\n    - name: X\n      valueFrom: {configMapKeyRef: {name: e2e-nope, key: x}}\n",
        ));
        let message = n
            .waiting(
                &format!("lacking-{}", agent.node),
                "CreateContainerConfigError",
            )
            .await;
        assert_eq!(message, "configmap \"e2e-nope\" not found");
        // A key that does not exist.
        n.cp.apply(&env_pod(
            "keyless",
            &agent.node,
            BUSYBOX,
            "",
            "    env:\n    - name: X\n      valueFrom: {configMapKeyRef: {name: e2e-cfg, key: nope}}\n",
        ));
        let message = n
            .waiting(
                &format!("keyless-{}", agent.node),
                "CreateContainerConfigError",
            )
            .await;
        assert_eq!(
            message,
            "couldn't find key nope in ConfigMap default/e2e-cfg"
        );
        drop(n);
    });
}

/// An image behind a registry login: without a pull secret the pull fails
/// (ErrImagePull); with a dockerconfigjson secret the pod runs.
#[test]
fn api_pod_pulls_a_private_image_with_image_pull_secrets() {
    on_stack(async {
        let (agent, n) = ApiNode::start("e2e-objpull");
        let cri = agent.stack.cri().await;
        // The login registry's names, from the stack's env file (stack.sh up
        // writes them), not from the test's own environment.
        let st = &agent.stack;
        let image = st.get("MINILET_AUTH_IMAGE").to_string();
        let registry = st.get("MINILET_AUTH_REGISTRY").to_string();
        let (user, pass) = (
            st.get("MINILET_AUTH_USER").to_string(),
            st.get("MINILET_AUTH_PASS").to_string(),
        );
        n.cp.kubectl(&["delete", "secret", "e2e-regcred", "--ignore-not-found"]);
        n.cp.kubectl_ok(&[
            "create",
            "secret",
            "docker-registry",
            "e2e-regcred",
            &format!("--docker-server={registry}"),
            &format!("--docker-username={user}"),
            &format!("--docker-password={pass}"),
        ]);
        n.cp.apply(&env_pod(
            "anon",
            &agent.node,
            &image,
            "",
            "    imagePullPolicy: Always\n",
        ));
        let message = n
            .waiting(&format!("anon-{}", agent.node), "ErrImagePull")
            .await;
        assert!(message.contains(&image), "{message}");
        n.cp.apply(&env_pod(
            "authed",
            &agent.node,
            &image,
            "  imagePullSecrets: [{name: e2e-regcred}]\n",
            "    imagePullPolicy: Always\n",
        ));
        running_container(&cri, &agent, "authed", "app").await;
        drop(n);
    });
}

/// The node user is refused a Secret no pod of its references (the Node
/// authorizer works, and the lookup says Forbidden), and is allowed one a
/// pod bound to it does reference, through a name-selected watch.
#[test]
fn node_lookup_sees_only_what_its_pods_reference() {
    on_stack(async {
        let n = ApiNode::identity("e2e-objauthz");
        n.cp.kubectl(&[
            "delete",
            "secret",
            "e2e-lonely",
            "e2e-used",
            "--ignore-not-found",
        ]);
        n.cp.apply(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: e2e-lonely, namespace: default}\nstringData: {k: v}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: e2e-used, namespace: default}\nstringData: {k: v}\n",
        );
        let kubeconfig = n.kubeconfig.display().to_string();
        let (code, _, err) =
            n.cp.kubectl_as(&kubeconfig, &["get", "secret", "e2e-lonely"]);
        assert_ne!(code, 0);
        assert!(
            err.contains("Forbidden") || err.contains("forbidden"),
            "{err}"
        );

        let lookup = minilet::api::objects::WatchedObjects::new(client(&kubeconfig).await);
        let e = lookup.secret("default", "e2e-lonely").await.unwrap_err();
        assert!(matches!(e, LookupError::Forbidden { .. }), "{e:?}");

        // A pod bound to the node that references e2e-used (the agent is
        // not running: the pod only makes the authorizer's graph edge).
        n.cp.apply(&env_pod(
            "user",
            &n.node,
            BUSYBOX,
            "",
            "    env:\n    - name: K\n      valueFrom: {secretKeyRef: {name: e2e-used, key: k}}\n",
        ));
        let user_uid = n.pod(&format!("user-{}", n.node)).unwrap()["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string();
        let start = Instant::now();
        let got = loop {
            match lookup.secret("default", "e2e-used").await {
                Ok(s) => break s,
                // The authorizer's graph follows pods through an informer.
                Err(e) if start.elapsed() < Duration::from_secs(20) => {
                    eprintln!("not yet: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("referenced secret: {e}"),
            }
        };
        assert_eq!(got.data.as_ref().unwrap()["k"].0, b"v");
        // Kept current by the watch.
        n.cp.kubectl_ok(&[
            "patch",
            "secret",
            "e2e-used",
            "-p",
            r#"{"stringData":{"k":"w"}}"#,
        ]);
        eventually(
            "the watch sees the update",
            Duration::from_secs(20),
            || async {
                let s = lookup.secret("default", "e2e-used").await.ok()?;
                (s.data.as_ref()?["k"].0 == b"w").then_some(())
            },
        )
        .await;
        // The server away: the cached object is still served; an object
        // never listed is Unavailable (after the first-list timeout).
        {
            let _away = ApiServerAway::stop();
            let s = lookup.secret("default", "e2e-used").await.unwrap();
            assert_eq!(s.data.as_ref().unwrap()["k"].0, b"w");
            let start = Instant::now();
            let e = lookup.config_map("default", "e2e-later").await.unwrap_err();
            assert!(matches!(e, LookupError::Unavailable { .. }), "{e:?}");
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{:?}",
                start.elapsed()
            );
        }
        wait_until("API server back", Duration::from_secs(60), || {
            n.cp.kubectl(&["get", "--raw", "/readyz"]).0 == 0
        });
        lookup.retain(&Default::default());
        let missing = lookup.config_map("default", "e2e-never").await.unwrap_err();
        assert!(
            matches!(missing, LookupError::Forbidden { .. }),
            "an unreferenced name is refused, not reported missing: {missing:?}"
        );
        // Dropping the reference stops the watch.
        lookup.retain(&Default::default());
        assert!(lookup.watched().is_empty());

        // TokenRequest for the pod's service account, bound to the pod.
        let uid = user_uid;
        let tokens = minilet::api::tokens::Tokens::new(client(&kubeconfig).await);
        let req = minilet::api::tokens::TokenKey {
            namespace: "default".into(),
            service_account: "default".into(),
            audiences: vec!["minilet-e2e".into()],
            expiration_seconds: 3600,
            pod_name: format!("user-{}", n.node),
            pod_uid: uid,
        };
        n.cp.apply(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: default, namespace: default}\n",
        );
        let start = Instant::now();
        let token = loop {
            match tokens.get(&req).await {
                Ok(t) => break t,
                Err(e) if start.elapsed() < Duration::from_secs(20) => {
                    eprintln!("token not yet: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("token request: {e}"),
            }
        };
        assert_eq!(token.token.split('.').count(), 3, "a JWT");
        let again = tokens.get(&req).await.unwrap();
        assert_eq!(again.token, token.token, "cached, not requested again");
        // No agent runs here to finish the pod's deletion.
        n.cp.kubectl(&[
            "delete",
            "pod",
            &format!("user-{}", n.node),
            "--grace-period=0",
            "--force",
        ]);
        drop(n);
    });
}

/// Standalone: a static pod takes env from a ConfigMap and a Secret in the
/// manifest dir.
#[test]
fn static_pod_env_from_a_config_map_in_the_manifest_dir() {
    on_stack(async {
        let agent = Agent::start("e2e-objstatic");
        let cri = agent.stack.cri().await;
        agent.write_manifest(
            "objects.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: local-cfg}\ndata: {GREETING: hi-from-dir}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: local-pw}\nstringData: {PASS: dir-secret}\n",
        );
        agent.write_manifest(
            "envy.yaml",
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: envy\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    image: {BUSYBOX}\n    command: [sh, -c, 'env; sleep 3600']\n    envFrom:\n    - configMapRef: {{name: local-cfg}}\n    env:\n    - name: PW\n      valueFrom: {{secretKeyRef: {{name: local-pw, key: PASS}}}}\n"
            ),
        );
        running_container(&cri, &agent, "envy", "app").await;
        let env = printed_env(&agent, "envy").await;
        assert!(has(&env, "GREETING=hi-from-dir"), "{env:?}");
        assert!(has(&env, "PW=dir-secret"), "{env:?}");
        agent.remove_manifest("envy.yaml");
        agent.remove_manifest("objects.yaml");
    });
}

/// kube-apiserver stopped for a while; started again when dropped (also
/// when the test fails).
struct ApiServerAway;

impl ApiServerAway {
    fn stop() -> ApiServerAway {
        control_plane(&["stop", "kube-apiserver"]);
        ApiServerAway
    }
}

impl Drop for ApiServerAway {
    fn drop(&mut self) {
        control_plane(&["start", "kube-apiserver"]);
    }
}
