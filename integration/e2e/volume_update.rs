//! A configMap update reaching a running container atomically, standalone:
//! the ConfigMap comes from the manifest dir and is rewritten several
//! times; a reader in the container reads its two keys (which always
//! agree) hundreds of times through `..data`, as a consumer that wants a
//! consistent view does, and must see each new value and never a mix.

use std::time::Duration;

use crate::harness::*;
use crate::{BUSYBOX, on_stack, running_container};

fn config_map(n: u32) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: pair}}\ndata: {{a: \"{n}\", b: \"{n}\"}}\n"
    )
}

/// Reads a and b from one resolution of `..data` (cd into it: the
/// timestamped dir the symlink named then), every few ms; says SEEN=<a>
/// when the value changes, MISMATCH when a and b differ, READS=<n> every
/// 100 reads. A dir swapped away and removed mid-read gives empty reads,
/// which are skipped: that is a retry, not a mix.
const READER: &str = r#"i=0; last=""
while true; do
  if cd /cfg/..data 2>/dev/null; then
    a=$(cat a 2>/dev/null); b=$(cat b 2>/dev/null); cd /
    if [ -n "$a" ] && [ -n "$b" ]; then
      [ "$a" = "$b" ] || echo "MISMATCH a=$a b=$b"
      [ "$a" = "$last" ] || { echo "SEEN=$a"; last=$a; }
      i=$((i+1)); [ $((i % 100)) -eq 0 ] && echo "READS=$i"
    fi
  fi
  usleep 5000
done
"#;

fn reader_pod() -> String {
    let script: String = READER.lines().map(|l| format!("      {l}\n")).collect();
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: reader}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {BUSYBOX}
    command:
    - sh
    - -c
    - |
{script}    volumeMounts: [{{name: cfg, mountPath: /cfg}}]
  volumes: [{{name: cfg, configMap: {{name: pair}}}}]
"
    )
}

/// Every line container `app` of static pod `name` printed so far.
fn output(agent: &Agent, name: &str) -> Vec<String> {
    first_log_lines(agent, "default", &format!("{name}-{}", agent.node)).unwrap_or_default()
}

fn reads(out: &[String]) -> u64 {
    out.iter()
        .filter_map(|l| l.strip_prefix("READS="))
        .filter_map(|n| n.parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_config_map_update_reaches_a_running_container_atomically() {
    on_stack(async {
        let agent = Agent::start_with(
            "e2e-cmupdate",
            Options {
                kubelet_config: vec!["syncFrequency: 2s".into()],
                ..Default::default()
            },
        );
        let cri = agent.stack.cri().await;
        agent.write_manifest("pair.yaml", &config_map(1));
        agent.write_manifest("reader.yaml", &reader_pod());
        let container = running_container(&cri, &agent, "reader", "app").await;
        eventually("the reader saw 1", Duration::from_secs(30), || async {
            output(&agent, "reader")
                .iter()
                .any(|l| l == "SEEN=1")
                .then_some(())
        })
        .await;
        for n in 2..=5 {
            agent.write_manifest("pair.yaml", &config_map(n));
            let want = format!("SEEN={n}");
            eventually(
                &format!("the reader saw {n}"),
                Duration::from_secs(40),
                || async {
                    let out = output(&agent, "reader");
                    assert!(
                        !out.iter().any(|l| l.starts_with("MISMATCH")),
                        "a mix of old and new: {out:?}"
                    );
                    out.contains(&want).then_some(())
                },
            )
            .await;
        }
        // Keep reading across the last swap's cleanup for a while.
        let at_last = reads(&output(&agent, "reader"));
        eventually("200 more reads", Duration::from_secs(30), || async {
            (reads(&output(&agent, "reader")) >= at_last + 200).then_some(())
        })
        .await;
        let out = output(&agent, "reader");
        assert!(
            !out.iter().any(|l| l.starts_with("MISMATCH")),
            "a mix of old and new: {out:?}"
        );
        assert!(reads(&out) >= 300, "hundreds of reads: {}", reads(&out));
        let seen: Vec<&str> = out.iter().filter_map(|l| l.strip_prefix("SEEN=")).collect();
        assert_eq!(seen, ["1", "2", "3", "4", "5"], "each value, in order");
        // The same container saw every update: no restart was needed.
        let now = running_container(&cri, &agent, "reader", "app").await;
        assert_eq!(now.id, container.id);
        agent.remove_manifest("reader.yaml");
        agent.remove_manifest("pair.yaml");
    });
}
