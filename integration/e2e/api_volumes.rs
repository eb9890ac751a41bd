//! API data volumes against the real v1.20 control plane (Node authorizer,
//! NodeRestriction, the ServiceAccount admission and token controller): a
//! pod with the default service account token secret volume reads a JWT
//! and its namespace; configMap (items, path, mode) and secret volumes show
//! their files; a secret volume naming a missing Secret keeps the pod
//! ContainerCreating with kubelet's FailedMount event until the Secret is
//! made; a projected volume gets a TokenRequest token; standalone, a
//! static pod mounts a ConfigMap from the manifest dir, and a pod dir that
//! still holds a mount when its pod goes is never deleted. What a container
//! saw is read from its log.

use std::time::Duration;

use serde_json::Value;

use crate::cluster::ApiNode;
use crate::harness::*;
use crate::{BUSYBOX, on_stack, running_container, sandboxes};

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A pod bound to `node` running `script` (then sleeping), named
/// `<name>-<node>`; `spec` is put under `spec:` as is.
fn script_pod(name: &str, node: &str, spec: &str, mounts: &str, script: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}-{node}\n  namespace: default\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 1\n{spec}  containers:\n  - name: app\n    image: {BUSYBOX}\n    command: [sh, -c, '{script}; echo END; sleep 3600']\n{mounts}"
    )
}

/// What container `app` of the pod printed (its first log) up to `END`.
pub(crate) async fn printed(agent: &Agent, namespace: &str, pod: &str) -> Vec<String> {
    eventually(
        &format!("{pod} printed its files"),
        Duration::from_secs(60),
        || async {
            let lines = first_log_lines(agent, namespace, pod)?;
            lines.iter().any(|l| l == "END").then_some(lines)
        },
    )
    .await
}

fn has(lines: &[String], line: &str) -> bool {
    lines.iter().any(|l| l == line)
}

/// Without `automountServiceAccountToken: false` the ServiceAccount
/// admission adds the default token secret volume: the pod runs, and reads
/// a JWT and its namespace from it.
#[test]
fn api_pod_reads_its_service_account_token() {
    on_stack(async {
        let (agent, n) = ApiNode::start("e2e-volsa");
        let cri = agent.stack.cri().await;
        let name = format!("sa-{}", agent.node);
        n.cp.apply(&script_pod(
            "sa",
            &agent.node,
            "",
            "",
            &format!(
                "echo TOKEN=$(cat {SA_DIR}/token); echo NS=$(cat {SA_DIR}/namespace); ls {SA_DIR}"
            ),
        ));
        running_container(&cri, &agent, "sa", "app").await;
        let p = n.pod(&name).unwrap();
        let vols = p["spec"]["volumes"].to_string();
        assert!(
            vols.contains("default-token-"),
            "admission added it: {vols}"
        );
        let out = printed(&agent, "default", &name).await;
        let token = out
            .iter()
            .find_map(|l| l.strip_prefix("TOKEN="))
            .unwrap_or_default();
        let parts: Vec<&str> = token.split('.').collect();
        assert!(
            parts.len() == 3 && parts.iter().all(|p| !p.is_empty()),
            "a JWT: {out:?}"
        );
        assert!(has(&out, "NS=default"), "{out:?}");
        assert!(has(&out, "ca.crt"), "{out:?}");
        drop(n);
    });
}

/// The projected service account volume newer servers add: a
/// TokenRequest token bound to the pod, kube-root-ca.crt's `ca.crt`, and
/// the namespace from the downward API.
#[test]
fn api_pod_reads_a_projected_service_account_token() {
    on_stack(async {
        let (agent, n) = ApiNode::start("e2e-volproj");
        let cri = agent.stack.cri().await;
        let name = format!("proj-{}", agent.node);
        n.cp.apply(&script_pod(
            "proj",
            &agent.node,
            "  automountServiceAccountToken: false\n  volumes:\n  - name: sa\n    projected:\n      sources:\n      - serviceAccountToken: {path: token, expirationSeconds: 3600}\n      - configMap: {name: kube-root-ca.crt, items: [{key: ca.crt, path: ca.crt}]}\n      - downwardAPI: {items: [{path: namespace, fieldRef: {fieldPath: metadata.namespace}}]}\n",
            "    volumeMounts:\n    - {name: sa, mountPath: /sa}\n",
            "echo TOKEN=$(cat /sa/token); echo NS=$(cat /sa/namespace); head -1 /sa/ca.crt",
        ));
        running_container(&cri, &agent, "proj", "app").await;
        let out = printed(&agent, "default", &name).await;
        let token = out
            .iter()
            .find_map(|l| l.strip_prefix("TOKEN="))
            .unwrap_or_default();
        assert_eq!(
            token.split('.').filter(|p| !p.is_empty()).count(),
            3,
            "a JWT: {out:?}"
        );
        assert!(has(&out, "NS=default"), "{out:?}");
        assert!(has(&out, "-----BEGIN CERTIFICATE-----"), "{out:?}");
        drop(n);
    });
}

/// configMap (items with a path and a mode) and secret volumes show the
/// objects' data as files, through kubelet's `..data` layout.
#[test]
fn api_pod_sees_config_map_and_secret_volume_files() {
    on_stack(async {
        // A short periodic sync: the update below shows within seconds.
        let (agent, n) = ApiNode::start_with(
            "e2e-volfiles",
            Options {
                kubelet_config: vec!["syncFrequency: 2s".into()],
                ..Default::default()
            },
        );
        let cri = agent.stack.cri().await;
        let (cm, sec) = (
            format!("vol-cfg-{}", agent.node),
            format!("vol-pw-{}", agent.node),
        );
        let _made = Made(vec![("configmap", cm.clone()), ("secret", sec.clone())]);
        n.cp.apply(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {cm}, namespace: default}}\ndata: {{x: hello-cfg, y: not-listed}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {sec}, namespace: default}}\nstringData: {{pass: s3cret}}\n"
        ));
        let name = format!("files-{}", agent.node);
        n.cp.apply(&script_pod(
            "files",
            &agent.node,
            &format!(
                "  automountServiceAccountToken: false\n  volumes:\n  - name: cfg\n    configMap: {{name: {cm}, items: [{{key: x, path: sub/x.txt, mode: 256}}]}}\n  - name: pw\n    secret: {{secretName: {sec}}}\n"
            ),
            "    volumeMounts:\n    - {name: cfg, mountPath: /cfg}\n    - {name: pw, mountPath: /pw}\n",
            "echo X=$(cat /cfg/sub/x.txt); echo P=$(cat /pw/pass); ls -lL /cfg/sub; ls -a /cfg; test -e /cfg/y || echo NO-Y; touch /pw/new 2>/dev/null || echo READ-ONLY",
        ));
        running_container(&cri, &agent, "files", "app").await;
        let out = printed(&agent, "default", &name).await;
        assert!(has(&out, "X=hello-cfg"), "{out:?}");
        assert!(has(&out, "P=s3cret"), "{out:?}");
        assert!(has(&out, "NO-Y"), "only the listed item: {out:?}");
        assert!(has(&out, "..data"), "kubelet's layout: {out:?}");
        assert!(
            has(&out, "READ-ONLY"),
            "API data volumes are read-only: {out:?}"
        );
        assert!(
            out.iter()
                .any(|l| l.starts_with("-r--------") && l.ends_with("x.txt")),
            "mode 0400: {out:?}"
        );

        // The ConfigMap changes: the running pod's file follows, swapped
        // in whole (the host side of the mount, as the container sees it).
        let uid = n.pod(&name).unwrap()["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string();
        let vol = agent
            .dir
            .path()
            .join("state/pods")
            .join(&uid)
            .join("volumes/kubernetes.io~configmap/cfg");
        assert_eq!(
            std::fs::read_to_string(vol.join("sub/x.txt")).unwrap(),
            "hello-cfg"
        );
        n.cp.kubectl_ok(&[
            "patch",
            "configmap",
            &cm,
            "-n",
            "default",
            "--type",
            "merge",
            "-p",
            r#"{"data":{"x":"hello-again"}}"#,
        ]);
        eventually("the file updated", Duration::from_secs(30), || async {
            (std::fs::read_to_string(vol.join("sub/x.txt")).ok()? == "hello-again").then_some(())
        })
        .await;
        let entries: Vec<String> = std::fs::read_dir(&vol)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(entries.len(), 3, "one ..<ts> dir, ..data, sub: {entries:?}");
        drop(n);
    });
}

/// A secret volume naming a Secret that does not exist: the pod waits
/// ContainerCreating with kubelet's FailedMount event, and runs once the
/// Secret is made.
#[test]
fn api_pod_with_a_missing_secret_waits_then_runs() {
    on_stack(async {
        let (agent, n) = ApiNode::start("e2e-volmissing");
        let cri = agent.stack.cri().await;
        let sec = format!("vol-late-{}", agent.node);
        let name = format!("late-{}", agent.node);
        let _made = Made(vec![("secret", sec.clone())]);
        n.cp.apply(&script_pod(
            "late",
            &agent.node,
            &format!(
                "  automountServiceAccountToken: false\n  volumes:\n  - name: pw\n    secret: {{secretName: {sec}}}\n"
            ),
            "    volumeMounts:\n    - {name: pw, mountPath: /pw}\n",
            "echo P=$(cat /pw/pass)",
        ));
        let want =
            format!("MountVolume.SetUp failed for volume \"pw\" : secret \"{sec}\" not found");
        let sel = format!("involvedObject.name={name}");
        eventually("a FailedMount event", Duration::from_secs(60), || async {
            let (_, out, _) =
                n.cp.kubectl(&["get", "events", "--field-selector", &sel, "-o", "json"]);
            let v: Value = serde_json::from_str(&out).ok()?;
            v["items"]
                .as_array()?
                .iter()
                .any(|e| e["reason"] == "FailedMount" && e["message"] == want.as_str())
                .then_some(())
        })
        .await;
        eventually(
            "Pending, waiting ContainerCreating",
            Duration::from_secs(30),
            || async {
                let st = n.pod(&name)?["status"].clone();
                (st["phase"] == "Pending"
                    && st["containerStatuses"][0]["state"]["waiting"]["reason"]
                        == "ContainerCreating")
                    .then_some(())
            },
        )
        .await;
        assert!(
            sandboxes(&cri, &agent, "late").await.is_empty(),
            "no sandbox before the volumes are set up"
        );
        n.cp.apply(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {sec}, namespace: default}}\nstringData: {{pass: at-last}}\n"
        ));
        running_container(&cri, &agent, "late", "app").await;
        let out = printed(&agent, "default", &name).await;
        assert!(has(&out, "P=at-last"), "{out:?}");
        drop(n);
    });
}

/// Standalone: a static pod mounts a ConfigMap from the manifest dir.
#[test]
fn static_pod_mounts_a_config_map_from_the_manifest_dir() {
    on_stack(async {
        let agent = Agent::start("e2e-volstatic");
        let cri = agent.stack.cri().await;
        agent.write_manifest(
            "objects.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: local-files}\ndata: {greeting: hi-from-dir}\n",
        );
        agent.write_manifest(
            "mounty.yaml",
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: mounty\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    image: {BUSYBOX}\n    command: [sh, -c, 'echo G=$(cat /cfg/greeting); echo END; sleep 3600']\n    volumeMounts: [{{name: cfg, mountPath: /cfg}}]\n  volumes: [{{name: cfg, configMap: {{name: local-files}}}}]\n"
            ),
        );
        running_container(&cri, &agent, "mounty", "app").await;
        let out = printed(&agent, "default", &format!("mounty-{}", agent.node)).await;
        assert!(has(&out, "G=hi-from-dir"), "{out:?}");
        agent.remove_manifest("mounty.yaml");
        agent.remove_manifest("objects.yaml");
    });
}

/// A bind mount made by the test, undone when dropped (also when the test
/// fails), before the agent's temp dir is removed.
struct BindMount(std::path::PathBuf);

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Standalone: something mounted under a pod's dir (as a CSI driver's
/// publish would be) when the pod goes: the pod is torn down, but its dir
/// and the data behind the mount stay, with kubelet's orphaned-pod error,
/// said once.
#[test]
fn a_pod_dir_still_holding_a_mount_is_never_deleted() {
    on_stack(async {
        let agent = Agent::start("e2e-volheld");
        let cri = agent.stack.cri().await;
        agent.write_manifest(
            "held.yaml",
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: held\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    image: {BUSYBOX}\n    command: [sh, -c, 'sleep 3600']\n    volumeMounts: [{{name: data, mountPath: /data}}]\n  volumes: [{{name: data, emptyDir: {{}}}}]\n"
            ),
        );
        running_container(&cri, &agent, "held", "app").await;
        let pods = agent.dir.path().join("state/pods");
        let dirs: Vec<_> = std::fs::read_dir(&pods)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(dirs.len(), 1, "{dirs:?}");
        let pod_dir = dirs[0].clone();
        let disk = agent.dir.path().join("disk");
        std::fs::create_dir_all(&disk).unwrap();
        std::fs::write(disk.join("user-data"), "precious").unwrap();
        let target = pod_dir.join("volumes/kubernetes.io~empty-dir/data/held");
        std::fs::create_dir_all(&target).unwrap();
        let ok = std::process::Command::new("mount")
            .arg("--bind")
            .arg(&disk)
            .arg(&target)
            .status()
            .unwrap()
            .success();
        assert!(ok, "needs root: tests run as root in CI");
        let _mount = BindMount(target.clone());

        agent.remove_manifest("held.yaml");
        eventually("the pod torn down", Duration::from_secs(60), || async {
            sandboxes(&cri, &agent, "held")
                .await
                .is_empty()
                .then_some(())
        })
        .await;
        let said = "volume paths are still present on disk";
        eventually(
            "the orphaned-pod error",
            Duration::from_secs(30),
            || async { agent.log().contains(said).then_some(()) },
        )
        .await;
        // Relists and re-syncs go on: the error is not repeated.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(agent.log().matches(said).count(), 1, "{}", agent.log());
        assert!(pod_dir.is_dir());
        assert_eq!(
            std::fs::read_to_string(target.join("user-data")).unwrap(),
            "precious"
        );
        assert_eq!(
            std::fs::read_to_string(disk.join("user-data")).unwrap(),
            "precious"
        );
    });
}

/// Objects a test makes (kind, name in default), deleted as the admin when
/// dropped, also when the test fails.
struct Made(Vec<(&'static str, String)>);

impl Drop for Made {
    fn drop(&mut self) {
        let cp = crate::cluster::ControlPlane::load();
        for (kind, name) in &self.0 {
            cp.kubectl(&["delete", kind, name, "-n", "default", "--ignore-not-found"]);
        }
    }
}
