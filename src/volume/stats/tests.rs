use std::sync::Mutex;

use super::*;

/// Answers from tables; records the CSI calls.
#[derive(Default)]
struct FakeProbe {
    dirs: BTreeMap<PathBuf, Usage>,
    csi: BTreeMap<String, Usage>,
    calls: Mutex<Vec<(String, String, PathBuf, String)>>,
}

impl StatsProbe for FakeProbe {
    fn dir_usage(&self, dir: &Path, _budget: u64) -> Result<Usage, StatsError> {
        self.dirs.get(dir).copied().ok_or_else(|| StatsError::Io {
            action: "stat",
            path: dir.to_path_buf(),
            source: io::ErrorKind::NotFound.into(),
        })
    }
    fn csi_usage<'a>(
        &'a self,
        driver: &'a str,
        handle: &'a str,
        path: &'a Path,
        staging: &'a str,
    ) -> BoxFuture<'a, Result<Option<Usage>, StatsError>> {
        self.calls.lock().unwrap().push((
            driver.into(),
            handle.into(),
            path.to_path_buf(),
            staging.into(),
        ));
        let u = self.csi.get(handle).copied();
        Box::pin(async move { Ok(u) })
    }
}

struct FakeClaims(BTreeMap<(String, String), String>);

impl ClaimVolumes for FakeClaims {
    fn volume_name<'a>(
        &'a self,
        namespace: &'a str,
        claim: &'a str,
    ) -> BoxFuture<'a, Option<String>> {
        let v = self.0.get(&(namespace.into(), claim.into())).cloned();
        Box::pin(async move { v })
    }
}

fn usage(used: u64) -> Usage {
    Usage {
        capacity_bytes: 100,
        available_bytes: 100 - used,
        used_bytes: used,
        inodes: 10,
        inodes_free: 8,
        inodes_used: 2,
    }
}

fn pod() -> Pod {
    crate::yaml::from_str(
        "metadata: {name: p, namespace: ns, uid: u1}\n\
         spec:\n  containers: [{name: a, image: x}]\n  volumes:\n\
         \x20 - {name: scratch, emptyDir: {}}\n\
         \x20 - {name: data, persistentVolumeClaim: {claimName: c1}}\n\
         \x20 - {name: eph, csi: {driver: d.example}}\n\
         \x20 - {name: gone, persistentVolumeClaim: {claimName: unbound}}\n\
         \x20 - {name: unpublished, csi: {driver: d.example}}\n",
    )
    .unwrap()
}

fn publish(dir: &Path, handle: &str, published: bool) {
    std::fs::create_dir_all(dir.join(MOUNT)).unwrap();
    state::write(
        dir,
        &PublishData {
            spec_vol_id: dir.file_name().unwrap().to_string_lossy().into(),
            volume_handle: handle.into(),
            driver_name: "d.example".into(),
            node_name: "n".into(),
            attachment_id: "a".into(),
            lifecycle: state::Lifecycle::Persistent,
            staging_target_path: "/stage".into(),
            published,
        },
    )
    .unwrap();
}

#[tokio::test]
async fn collects_claims_pod_volumes_and_skips_the_rest() {
    let root = tempfile::tempdir().unwrap();
    let vols = root.path().join("pods/u1/volumes");
    let scratch = vols.join(EMPTY_DIR).join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    publish(&vols.join(PLUGIN_DIR).join("pv1"), "h1", true);
    publish(&vols.join(PLUGIN_DIR).join("eph"), "h2", true);
    publish(&vols.join(PLUGIN_DIR).join("unpublished"), "h3", false);
    let probe = FakeProbe {
        dirs: [(scratch.clone(), usage(7))].into(),
        csi: [("h1".to_string(), usage(50)), ("h2".to_string(), usage(3))].into(),
        ..Default::default()
    };
    let probe: Arc<FakeProbe> = Arc::new(probe);
    let claims = FakeClaims([(("ns".into(), "c1".into()), "pv1".into())].into());
    let dyn_probe: Arc<dyn StatsProbe> = probe.clone();
    let got = collect(root.path(), &[("u1".into(), pod())], &dyn_probe, &claims).await;
    let pv = |v: &str| Owner::PodVolume {
        namespace: "ns".into(),
        pod: "p".into(),
        volume: v.into(),
    };
    let want: BTreeMap<Owner, Usage> = [
        (
            Owner::Claim {
                namespace: "ns".into(),
                claim: "c1".into(),
            },
            usage(50),
        ),
        (pv("scratch"), usage(7)),
        (pv("eph"), usage(3)),
    ]
    .into();
    assert_eq!(got, want);
    // The unpublished volume was not asked about; the path is the mount.
    let calls = probe.calls.lock().unwrap();
    assert_eq!(calls.len(), 2);
    assert!(
        calls
            .iter()
            .all(|c| c.2.ends_with(MOUNT) && c.3 == "/stage")
    );
}

#[test]
fn render_uses_kubelet_names_for_claims_only() {
    let board = StatsBoard::default();
    board.replace(
        [
            (
                Owner::Claim {
                    namespace: "ns".into(),
                    claim: "c\"1".into(),
                },
                usage(5),
            ),
            (
                Owner::PodVolume {
                    namespace: "ns".into(),
                    pod: "p".into(),
                    volume: "v".into(),
                },
                usage(9),
            ),
        ]
        .into(),
    );
    let text = board.render();
    assert!(text.contains("# TYPE kubelet_volume_stats_used_bytes gauge\n"));
    assert!(text.contains(
        "kubelet_volume_stats_used_bytes{namespace=\"ns\",persistentvolumeclaim=\"c\\\"1\"} 5\n"
    ));
    assert!(
        text.contains(
            "minilet_volume_stats_used_bytes{namespace=\"ns\",pod=\"p\",volume=\"v\"} 9\n"
        )
    );
    assert!(text.contains(
        "kubelet_volume_stats_inodes_free{namespace=\"ns\",persistentvolumeclaim=\"c\\\"1\"} 8\n"
    ));
    assert!(!text.contains("kubelet_volume_stats_used_bytes{namespace=\"ns\",pod="));
    assert_eq!(text.matches("# TYPE").count(), 12);
    board.replace(BTreeMap::new());
    assert_eq!(board.render(), "");
}

#[test]
fn walk_counts_blocks_and_inodes_without_following_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    std::fs::write(d.join("sub/f"), vec![1u8; 64 * 1024]).unwrap();
    std::fs::hard_link(d.join("sub/f"), d.join("link")).unwrap();
    // A symlink to a big tree outside: counted as itself, not followed.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("big"), vec![1u8; 1024 * 1024]).unwrap();
    std::os::unix::fs::symlink(outside.path(), d.join("out")).unwrap();
    let (bytes, inodes, complete) = walk(d, WALK_BUDGET).unwrap();
    assert!(complete);
    // top, sub, f (hard link once), out
    assert_eq!(inodes, 4);
    assert!((64 * 1024..1024 * 1024).contains(&bytes), "{bytes}");
}

#[test]
fn walk_stops_at_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..10 {
        std::fs::write(dir.path().join(i.to_string()), b"x").unwrap();
    }
    let (_, inodes, complete) = walk(dir.path(), 4).unwrap();
    assert!(!complete);
    assert_eq!(inodes, 4);
    assert!(walk(&dir.path().join("nope"), 4).is_err());
}

#[test]
fn csi_answer_is_read_by_unit() {
    use csi::volume_usage::Unit;
    let resp = csi::NodeGetVolumeStatsResponse {
        usage: vec![
            csi::VolumeUsage {
                available: 60,
                total: 100,
                used: 40,
                unit: Unit::Bytes as i32,
            },
            csi::VolumeUsage {
                available: 9,
                total: 10,
                used: -1,
                unit: Unit::Inodes as i32,
            },
        ],
        volume_condition: None,
    };
    assert_eq!(
        from_csi(&resp),
        Usage {
            capacity_bytes: 100,
            available_bytes: 60,
            used_bytes: 40,
            inodes: 10,
            inodes_free: 9,
            inodes_used: 0,
        }
    );
}

#[tokio::test(start_paused = true)]
async fn run_collects_each_period_until_cancelled() {
    let root = tempfile::tempdir().unwrap();
    let board = Board::default();
    let mut p = pod();
    p.metadata.uid = Some("u1".into());
    board.set_pod("u1", p);
    let scratch = root
        .path()
        .join("pods/u1/volumes")
        .join(EMPTY_DIR)
        .join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let probe = Arc::new(FakeProbe {
        dirs: [(scratch, usage(7))].into(),
        ..Default::default()
    });
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run(
        board.clone(),
        root.path().to_path_buf(),
        probe,
        Arc::new(FakeClaims(BTreeMap::new())),
        Duration::from_secs(60),
        cancel.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        board
            .volume_stats
            .render()
            .contains("volume=\"scratch\"} 7")
    );
    board.remove_pod("u1");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(board.volume_stats.render(), "");
    cancel.cancel();
    task.await.unwrap();
}

/// Real mount (tests run as root in CI): a tmpfs mounted below the dir
/// is not entered.
#[test]
fn walk_does_not_cross_a_mount_point() {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("mnt");
    std::fs::create_dir(&sub).unwrap();
    mount(
        Some("tmpfs"),
        &sub,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=4m"),
    )
    .expect("needs root: tests run as root in CI");
    let written = std::fs::write(sub.join("big"), vec![1u8; 1024 * 1024]);
    let walked = walk(dir.path(), WALK_BUDGET);
    umount2(&sub, MntFlags::MNT_DETACH).unwrap();
    written.unwrap();
    let (bytes, inodes, complete) = walked.unwrap();
    assert!(complete);
    assert_eq!(inodes, 1, "the mount point itself is not ours");
    assert!(bytes < 1024 * 1024, "{bytes}");
}
