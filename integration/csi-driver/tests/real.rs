//! The real driver binary on this host, called over real gRPC: loop devices,
//! ext4, bind mounts. Needs root; FAILS (never skips) without it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use minilet_test_csi::backend::mount_points;
use minilet_test_csi::client::connect;
use minilet_test_csi::harness::{CsiDriver, CsiOptions};
use minilet_test_csi::proto::csi::{
    self as pb, controller_client::ControllerClient, identity_client::IdentityClient,
    node_client::NodeClient,
};
use minilet_test_csi::proto::registration::{
    InfoRequest, RegistrationStatus, registration_client::RegistrationClient,
};
use minilet_test_csi::record::read_calls;
use tonic::transport::Channel;

fn start() -> (CsiDriver, tempfile::TempDir) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the real driver test needs root (loop devices, mounts)"
    );
    let registry = tempfile::tempdir().unwrap();
    let mut options = CsiOptions::new("node-t");
    options.registration_dir = Some(registry.path().to_path_buf());
    options.binary = Some(env!("CARGO_BIN_EXE_minilet-test-csi").into());
    (CsiDriver::start_with(options), registry)
}

fn path(d: &CsiDriver, p: &str) -> PathBuf {
    d.dir.path().join(p)
}

async fn channel(d: &CsiDriver) -> Channel {
    connect(&d.endpoint()).await.unwrap()
}

/// Mount points under `dir`.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    mount_points(&info)
        .into_iter()
        .filter(|m| m.starts_with(&dir))
        .collect()
}

fn mount_cap() -> pb::VolumeCapability {
    use pb::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn stage(
    id: &str,
    path: &Path,
    context: &std::collections::HashMap<String, String>,
) -> pb::NodeStageVolumeRequest {
    pb::NodeStageVolumeRequest {
        volume_id: id.into(),
        publish_context: context.clone(),
        staging_target_path: path.display().to_string(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    }
}

fn publish(id: &str, staging: &Path, target: &Path) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    }
}

fn unpublish(id: &str, target: &Path) -> pb::NodeUnpublishVolumeRequest {
    pb::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    }
}

fn unstage(id: &str, staging: &Path) -> pb::NodeUnstageVolumeRequest {
    pb::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_keeps_its_data_across_unstage_and_restage_and_leaves_nothing() {
    let (mut d, _registry) = start();
    let ch = channel(&d).await;
    let mut identity = IdentityClient::new(ch.clone());
    let mut controller = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch);

    let info = identity
        .get_plugin_info(pb::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.minilet.test");
    let node_id = node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .node_id;
    assert_eq!(node_id, "node-t");

    // The registration socket answers like node-driver-registrar's.
    let reg_sock = d.registration_socket().unwrap();
    let mut reg = RegistrationClient::new(connect(&reg_sock).await.unwrap());
    let plugin = reg.get_info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(plugin.r#type, "CSIPlugin");
    assert_eq!(plugin.name, "csi.minilet.test");
    assert_eq!(PathBuf::from(&plugin.endpoint), d.endpoint());
    assert_eq!(plugin.supported_versions, ["1.0.0"]);
    reg.notify_registration_status(RegistrationStatus {
        plugin_registered: true,
        error: String::new(),
    })
    .await
    .unwrap();

    let create = pb::CreateVolumeRequest {
        name: "pvc-real".into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 32 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        ..Default::default()
    };
    let vol = controller
        .create_volume(create.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    // Idempotent by name.
    let again = controller
        .create_volume(create)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, vol.volume_id);
    let id = vol.volume_id;

    let context = controller
        .controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: node_id.clone(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;

    // Publish before stage: refused.
    let staging_a = path(&d, "plugins/stage-a");
    let staging_b = path(&d, "plugins/stage-b");
    std::fs::create_dir_all(&staging_a).unwrap();
    std::fs::create_dir_all(&staging_b).unwrap();
    std::fs::create_dir_all(path(&d, "pods/1")).unwrap();
    std::fs::create_dir_all(path(&d, "pods/2")).unwrap();
    let target1 = path(&d, "pods/1/mount");
    let target2 = path(&d, "pods/2/mount");
    let err = node
        .node_publish_volume(publish(&id, &staging_a, &target1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    // Stage (twice: idempotent) and publish; write through the target.
    for _ in 0..2 {
        node.node_stage_volume(stage(&id, &staging_a, &context))
            .await
            .unwrap();
    }
    assert_eq!(d.loop_devices().len(), 1);
    for _ in 0..2 {
        node.node_publish_volume(publish(&id, &staging_a, &target1))
            .await
            .unwrap();
    }
    assert_eq!(mounts_under(d.dir.path()).len(), 2, "stage + one publish");
    std::fs::write(target1.join("hello"), "kept").unwrap();
    let stats = node
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target1.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stats.usage[0].total > 20 << 20, "{stats:?}");

    // Staged elsewhere while staged: refused.
    let err = node
        .node_stage_volume(stage(&id, &staging_b, &context))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    for _ in 0..2 {
        node.node_unpublish_volume(unpublish(&id, &target1))
            .await
            .unwrap();
    }
    assert!(!target1.exists(), "the target is removed");
    for _ in 0..2 {
        node.node_unstage_volume(unstage(&id, &staging_a))
            .await
            .unwrap();
    }
    assert_eq!(mounts_under(d.dir.path()), Vec::<PathBuf>::new());
    assert_eq!(d.loop_devices(), Vec::<String>::new());

    // A driver restart in between: state is on disk.
    assert!(d.terminate().unwrap().success());
    d.spawn();
    let ch = channel(&d).await;
    let mut controller = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch);

    // Re-stage elsewhere, publish on another target: the data is there.
    node.node_stage_volume(stage(&id, &staging_b, &context))
        .await
        .unwrap();
    node.node_publish_volume(publish(&id, &staging_b, &target2))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(target2.join("hello")).unwrap(),
        "kept"
    );
    node.node_unpublish_volume(unpublish(&id, &target2))
        .await
        .unwrap();
    node.node_unstage_volume(unstage(&id, &staging_b))
        .await
        .unwrap();
    controller
        .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: node_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    assert_eq!(mounts_under(d.dir.path()), Vec::<PathBuf>::new());
    assert_eq!(d.loop_devices(), Vec::<String>::new());
    assert_eq!(
        std::fs::read_dir(d.state_dir().join("disks"))
            .unwrap()
            .count(),
        0,
        "the disk file is gone"
    );

    // The call log tells the order.
    let calls = read_calls(&d.state_dir().join("calls.jsonl"));
    let node_calls: Vec<(&str, &str)> = calls
        .iter()
        .filter(|c| c.method.starts_with("Node") && c.volume_id == id)
        .map(|c| (c.method.as_str(), c.code.as_str()))
        .collect();
    assert_eq!(
        node_calls,
        [
            ("NodePublishVolume", "FailedPrecondition"),
            ("NodeStageVolume", "OK"),
            ("NodeStageVolume", "OK"),
            ("NodePublishVolume", "OK"),
            ("NodePublishVolume", "OK"),
            ("NodeGetVolumeStats", "OK"),
            ("NodeStageVolume", "FailedPrecondition"),
            ("NodeUnpublishVolume", "OK"),
            ("NodeUnpublishVolume", "OK"),
            ("NodeUnstageVolume", "OK"),
            ("NodeUnstageVolume", "OK"),
            ("NodeStageVolume", "OK"),
            ("NodePublishVolume", "OK"),
            ("NodeUnpublishVolume", "OK"),
            ("NodeUnstageVolume", "OK"),
        ]
    );
    assert!(
        calls
            .iter()
            .any(|c| c.method == "NotifyRegistrationStatus" && c.message == "registered")
    );
    d.terminate();
    assert!(
        !d.endpoint().exists() && !reg_sock.exists(),
        "sockets removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_fail_and_hang_calls_on_command_and_ephemeral_volumes_leave_nothing() {
    let (d, _registry) = start();
    let mut node = NodeClient::new(channel(&d).await);
    std::fs::write(
        d.state_dir().join("faults.json"),
        r#"{"NodePublishVolume": {"code": "Unavailable", "times": 1},
            "NodeGetInfo": {"hang_ms": 3000}}"#,
    )
    .unwrap();

    std::fs::create_dir_all(path(&d, "pods/e")).unwrap();
    let target = path(&d, "pods/e/vol");
    let req = pb::NodePublishVolumeRequest {
        volume_context: [
            (
                "csi.storage.k8s.io/ephemeral".to_string(),
                "true".to_string(),
            ),
            ("csi.storage.k8s.io/pod.name".to_string(), "p".to_string()),
        ]
        .into(),
        ..publish("csi-eph-1", Path::new(""), &target)
    };
    let err = node.node_publish_volume(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(mounts_under(d.dir.path()), Vec::<PathBuf>::new());
    node.node_publish_volume(req).await.unwrap();
    std::fs::write(target.join("f"), "x").unwrap();
    assert_eq!(d.loop_devices().len(), 1);

    // A hung call: the client gives up, the driver records it cancelled.
    let mut hung = node.clone();
    let r = tokio::time::timeout(
        Duration::from_millis(300),
        hung.node_get_info(pb::NodeGetInfoRequest {}),
    )
    .await;
    assert!(r.is_err(), "NodeGetInfo should hang");

    // Read-only: a second ephemeral volume whose target refuses writes.
    let ro_target = path(&d, "pods/e/ro");
    let ro = pb::NodePublishVolumeRequest {
        volume_context: [(
            "csi.storage.k8s.io/ephemeral".to_string(),
            "true".to_string(),
        )]
        .into(),
        readonly: true,
        ..publish("csi-eph-ro", Path::new(""), &ro_target)
    };
    node.node_publish_volume(ro).await.unwrap();
    let err = std::fs::write(ro_target.join("f"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");
    node.node_unpublish_volume(unpublish("csi-eph-ro", &ro_target))
        .await
        .unwrap();

    for _ in 0..2 {
        node.node_unpublish_volume(unpublish("csi-eph-1", &target))
            .await
            .unwrap();
    }
    assert_eq!(mounts_under(d.dir.path()), Vec::<PathBuf>::new());
    assert_eq!(d.loop_devices(), Vec::<String>::new());
    assert!(!target.exists());

    let start = Instant::now();
    let calls = loop {
        let calls = read_calls(&d.state_dir().join("calls.jsonl"));
        if calls.iter().any(|c| c.method == "NodeGetInfo") {
            break calls;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{calls:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let info = calls.iter().find(|c| c.method == "NodeGetInfo").unwrap();
    assert_eq!(info.code, "Cancelled", "{info:?}");
}
