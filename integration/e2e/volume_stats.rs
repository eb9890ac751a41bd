//! Volume stats through the real binary and the real test driver: a pod
//! with a dynamically provisioned claim and an emptyDir writes 5 MiB to
//! each; within one `volumeStatsAggPeriod` (2s here) `minilet get metrics`
//! shows kubelet's `kubelet_volume_stats_used_bytes` for the claim (from
//! NodeGetVolumeStats) and `minilet_volume_stats_used_bytes` for the
//! emptyDir (the du walk), both at least 5 MiB.

use std::time::Duration;

use crate::csi_driver::CsiDriver;
use crate::harness::*;
use crate::{BUSYBOX, on_stack, running_container};

const MIB5: u64 = 5 * 1024 * 1024;

/// The value of the sample `series` (name and labels) in `text`.
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn volume_stats_of_a_claim_and_an_empty_dir_are_in_get_metrics() {
    on_stack(async {
        let driver = CsiDriver::start("e2e-vstats");
        let agent = Agent::start_with(
            "e2e-vstats",
            Options {
                minilet_config: vec![driver.config_line()],
                kubelet_config: vec!["volumeStatsAggPeriod: 2s".into()],
                ..Default::default()
            },
        );
        let cri = agent.stack.cri().await;
        agent.write_manifest("storage.yaml", &crate::csi::storage("data"));
        agent.write_manifest(
            "writer.yaml",
            &format!(
                "apiVersion: v1
kind: Pod
metadata: {{name: writer}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {BUSYBOX}
    command: [sh, -c, 'dd if=/dev/urandom of=/data/f bs=1M count=5; dd if=/dev/urandom of=/scratch/f bs=1M count=5; sync; sleep 3600']
    volumeMounts: [{{name: data, mountPath: /data}}, {{name: scratch, mountPath: /scratch}}]
  volumes:
  - {{name: data, persistentVolumeClaim: {{claimName: data}}}}
  - {{name: scratch, emptyDir: {{}}}}
"
            ),
        );
        running_container(&cri, &agent, "writer", "app").await;
        let claim =
            "kubelet_volume_stats_used_bytes{namespace=\"default\",persistentvolumeclaim=\"data\"}";
        let scratch = format!(
            "minilet_volume_stats_used_bytes{{namespace=\"default\",pod=\"writer-{}\",volume=\"scratch\"}}",
            agent.node
        );
        let text = eventually(
            "get metrics shows 5 MiB used in the claim and the emptyDir",
            Duration::from_secs(60),
            || async {
                let (_, text, _) = agent.cli(&["get", "metrics"]);
                (sample(&text, claim)? >= MIB5 && sample(&text, &scratch)? >= MIB5).then_some(text)
            },
        )
        .await;
        for gauge in [
            "capacity_bytes",
            "available_bytes",
            "inodes",
            "inodes_free",
            "inodes_used",
        ] {
            let series = format!(
                "kubelet_volume_stats_{gauge}{{namespace=\"default\",persistentvolumeclaim=\"data\"}}"
            );
            assert!(sample(&text, &series).is_some(), "{series} in {text}");
        }
        // The claim's capacity is the driver's file system (32 MiB asked).
        let capacity = sample(
            &text,
            "kubelet_volume_stats_capacity_bytes{namespace=\"default\",persistentvolumeclaim=\"data\"}",
        )
        .unwrap_or_default();
        assert!((MIB5..=32 * 1024 * 1024).contains(&capacity), "{text}");
        assert!(driver.ok_count("NodeGetVolumeStats") >= 1);

        // The pod goes: its series go with it at the next round.
        agent.remove_manifest("writer.yaml");
        eventually(
            "the claim's series are gone",
            Duration::from_secs(60),
            || async {
                let (_, text, _) = agent.cli(&["get", "metrics"]);
                (!text.contains("persistentvolumeclaim=\"data\"")).then_some(())
            },
        )
        .await;
        agent.remove_manifest("storage.yaml");
        eventually("the volume is deleted", Duration::from_secs(60), || async {
            (driver.ok_count("DeleteVolume") >= 1).then_some(())
        })
        .await;
        driver.assert_nothing_left();
    });
}
