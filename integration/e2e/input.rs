//! Bad input that must stop at the static pod source: pods the API server
//! would refuse, and a YAML alias bomb. Each is listed against its file in
//! `minilet get pods` while a good pod in another file runs, and never
//! reaches the runtime.

use std::time::Duration;

use crate::harness::*;
use crate::{BUSYBOX, containers, on_stack, running_container, sandboxes, sleeper};

/// The agent's peak and current resident memory, in KiB (VmHWM, VmRSS).
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[test]
fn a_pod_the_api_server_would_refuse_is_listed_and_never_run() {
    on_stack(async {
        let agent = Agent::start("e2e-invalid");
        let cri = agent.stack.cri().await;
        agent.write_manifest(
            "bad.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\nspec:\n  terminationGracePeriodSeconds: -1\n  containers:\n  - name: main\n    ports: [{containerPort: 70000}]\n    volumeMounts: [{name: data, mountPath: /data}]\n  volumes: [{name: data, nfs: {server: nfs.example, path: /x}}]\n",
        );
        agent.write_manifest("good.yaml", &sleeper("good", &[("app", "sleep 3600")]));

        running_container(&cri, &agent, "good", "app").await;
        let table = eventually("bad.yaml listed", Duration::from_secs(10), || async {
            let t = agent.get_pods();
            t.contains("bad.yaml").then_some(t)
        })
        .await;
        let line = table.lines().find(|l| l.contains("bad.yaml")).unwrap();
        for want in [
            "pod default/bad-e2e-invalid is invalid",
            "spec.volumes[0].nfs: Unsupported value: \"nfs\"",
            "spec.containers[0].image: Required value",
            "spec.containers[0].ports[0].containerPort: Invalid value: 70000",
            "spec.terminationGracePeriodSeconds: Invalid value: -1",
        ] {
            assert!(line.contains(want), "{want:?} in {line}");
        }
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("good-") && l.contains("Running")),
            "{table}"
        );
        // Refused at the source: no sandbox was ever made for it.
        assert!(sandboxes(&cri, &agent, "bad").await.is_empty());
        assert!(containers(&cri, &agent, "bad").await.is_empty());
    });
}

#[test]
fn a_yaml_alias_bomb_is_one_error_and_memory_stays_flat() {
    on_stack(async {
        let mut agent = Agent::start("e2e-bomb");
        let cri = agent.stack.cri().await;
        agent.write_manifest("good.yaml", &sleeper("good", &[("app", "sleep 3600")]));
        running_container(&cri, &agent, "good", "app").await;
        let pid = agent.pid().expect("agent running");
        let (_, before) = rss_kib(pid);

        // ~2 MiB of text: a thousand 1 KiB strings, each named by a hundred
        // aliases, so 100 MiB of args once expanded.
        let mut bomb = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bomb\nspec:\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    env:\n"
        );
        let big = "x".repeat(1024);
        for i in 0..1000 {
            bomb.push_str(&format!("    - {{name: V{i}, value: &a{i} {big}}}\n"));
        }
        let refs: Vec<String> = (0..100_000).map(|i| format!("*a{}", i % 1000)).collect();
        bomb.push_str(&format!("    args: [{}]\n", refs.join(", ")));
        assert!(bomb.len() > 1_500_000, "{} bytes", bomb.len());
        agent.write_manifest("bomb.yaml", &bomb);

        let table = eventually("bomb.yaml listed", Duration::from_secs(20), || async {
            let t = agent.get_pods();
            t.contains("bomb.yaml").then_some(t)
        })
        .await;
        let line = table.lines().find(|l| l.contains("bomb.yaml")).unwrap();
        assert!(
            line.contains("document 1: too large once expanded (aliases included)"),
            "{line}"
        );
        let (peak, after) = rss_kib(pid);
        eprintln!("agent RSS before the bomb {before} KiB, after {after} KiB, peak {peak} KiB");
        // The text is read, the expansion never is.
        assert!(
            peak < before + 64 * 1024,
            "peak {peak} KiB, before {before} KiB"
        );

        // Removing it leaves nothing held, and the good pod ran throughout.
        agent.remove_manifest("bomb.yaml");
        eventually(
            "bomb.yaml's error gone",
            Duration::from_secs(10),
            || async { (!agent.get_pods().contains("bomb.yaml")).then_some(()) },
        )
        .await;
        let (_, settled) = rss_kib(pid);
        eprintln!("agent RSS after removal {settled} KiB");
        assert!(
            settled < before + 16 * 1024,
            "{settled} KiB, before {before} KiB"
        );
        assert!(sandboxes(&cri, &agent, "bomb").await.is_empty());
        let cs = containers(&cri, &agent, "good").await;
        assert!(cs.iter().all(|c| c.metadata.as_ref().unwrap().attempt == 0));
        assert!(agent.is_running());
    });
}
