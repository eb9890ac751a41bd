//! The rules against the in-memory host: codes, order and idempotency.

use std::collections::BTreeMap;
use std::path::Path;

use tonic::Code;

use super::*;
use crate::backend::fake::Fake;

struct T {
    driver: Driver<Fake>,
    _dir: tempfile::TempDir,
}

fn driver(publish_unpublish: bool) -> T {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        name: "csi.minilet.test".into(),
        node_id: "node-1".into(),
        state_dir: dir.path().to_path_buf(),
        publish_unpublish,
    };
    T {
        driver: Driver::new(config, Fake::default()),
        _dir: dir,
    }
}

fn cap() -> Capability {
    Capability::default()
}

fn create(d: &Driver<Fake>, name: &str, bytes: u64) -> Result<Volume, DriverError> {
    d.create_volume(&CreateRequest {
        name: name.into(),
        required_bytes: bytes,
        capabilities: vec![cap()],
        ..CreateRequest::default()
    })
}

fn stage_req(id: &str, path: &str) -> StageRequest {
    StageRequest {
        volume_id: id.into(),
        staging_path: path.into(),
        capability: Some(cap()),
        publish_context: BTreeMap::new(),
    }
}

fn publish_req(id: &str, staging: &str, target: &str) -> PublishRequest {
    PublishRequest {
        volume_id: id.into(),
        staging_path: staging.into(),
        target_path: target.into(),
        capability: Some(cap()),
        ..PublishRequest::default()
    }
}

/// A volume created and its staging dir made (as the CO makes it).
fn volume(d: &Driver<Fake>) -> String {
    d.backend().make_dir(Path::new("/stage/a")).unwrap();
    d.backend().make_dir(Path::new("/stage/b")).unwrap();
    create(d, "pvc-1", 0).unwrap().id
}

fn code<T: std::fmt::Debug>(r: Result<T, DriverError>) -> Code {
    r.map_or_else(|e| e.code(), |_| Code::Ok)
}

#[test]
fn create_is_idempotent_by_name_and_refuses_another_size() {
    let t = driver(false);
    let d = &t.driver;
    let a = create(d, "pvc-1", 32 << 20).unwrap();
    let b = create(d, "pvc-1", 32 << 20).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.capacity_bytes, 32 << 20);
    assert_eq!(d.backend().host().disks.len(), 1);
    assert_eq!(code(create(d, "pvc-1", 1 << 30)), Code::AlreadyExists);
    let other = create(d, "pvc-2", 0).unwrap();
    assert_ne!(other.id, a.id);
    assert_eq!(other.capacity_bytes, DEFAULT_BYTES);
}

#[test]
fn create_checks_its_fields() {
    let t = driver(false);
    let d = &t.driver;
    assert_eq!(code(create(d, "", 0)), Code::InvalidArgument);
    let no_caps = CreateRequest {
        name: "x".into(),
        ..CreateRequest::default()
    };
    assert_eq!(code(d.create_volume(&no_caps)), Code::InvalidArgument);
    let block = CreateRequest {
        name: "x".into(),
        capabilities: vec![Capability {
            block: true,
            ..cap()
        }],
        ..CreateRequest::default()
    };
    assert_eq!(code(d.create_volume(&block)), Code::InvalidArgument);
    let tiny = CreateRequest {
        name: "x".into(),
        required_bytes: 1,
        limit_bytes: 1 << 20,
        capabilities: vec![cap()],
        ..CreateRequest::default()
    };
    assert_eq!(code(d.create_volume(&tiny)), Code::OutOfRange);
}

#[test]
fn delete_of_unknown_is_ok_and_of_staged_is_refused() {
    let t = driver(false);
    let d = &t.driver;
    assert_eq!(code(d.delete_volume("vol-nope")), Code::Ok);
    assert_eq!(code(d.delete_volume("")), Code::InvalidArgument);
    let id = volume(d);
    d.node_stage(&stage_req(&id, "/stage/a")).unwrap();
    assert_eq!(code(d.delete_volume(&id)), Code::FailedPrecondition);
    d.node_unstage(&id, Path::new("/stage/a")).unwrap();
    d.delete_volume(&id).unwrap();
    assert!(d.backend().host().disks.is_empty());
    assert_eq!(code(d.delete_volume(&id)), Code::Ok);
}

#[test]
fn publish_before_stage_is_failed_precondition() {
    let t = driver(false);
    let d = &t.driver;
    let id = volume(d);
    let r = d.node_publish(&publish_req(&id, "/stage/a", "/pods/1/mount"));
    assert_eq!(code(r), Code::FailedPrecondition);
    // No staging path at all: the same (this driver stages).
    let r = d.node_publish(&publish_req(&id, "", "/pods/1/mount"));
    assert_eq!(code(r), Code::FailedPrecondition);
    assert!(d.backend().host().mounts.is_empty());
}

#[test]
fn unknown_volumes_are_not_found_and_missing_fields_invalid() {
    let t = driver(false);
    let d = &t.driver;
    volume(d);
    assert_eq!(
        code(d.node_stage(&stage_req("vol-x", "/stage/a"))),
        Code::NotFound
    );
    assert_eq!(
        code(d.node_publish(&publish_req("vol-x", "/stage/a", "/t"))),
        Code::NotFound
    );
    assert_eq!(
        code(d.node_unpublish("vol-x", Path::new("/t"))),
        Code::NotFound
    );
    assert_eq!(
        code(d.node_unstage("vol-x", Path::new("/stage/a"))),
        Code::NotFound
    );
    assert_eq!(
        code(d.node_stage(&stage_req("", "/s"))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(d.node_stage(&stage_req("v", ""))),
        Code::InvalidArgument
    );
    let no_cap = StageRequest {
        capability: None,
        ..stage_req("v", "/s")
    };
    assert_eq!(code(d.node_stage(&no_cap)), Code::InvalidArgument);
    assert_eq!(
        code(d.node_unpublish("v", Path::new(""))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(d.volume_stats("v", Path::new(""))),
        Code::InvalidArgument
    );
}

#[test]
fn stage_and_publish_twice_make_one_device_and_one_mount_each() {
    let t = driver(false);
    let d = &t.driver;
    let id = volume(d);
    for _ in 0..2 {
        d.node_stage(&stage_req(&id, "/stage/a")).unwrap();
    }
    for _ in 0..2 {
        d.node_publish(&publish_req(&id, "/stage/a", "/pods/1/mount"))
            .unwrap();
    }
    assert_eq!(d.backend().count("attach"), 1);
    assert_eq!(d.backend().count("mkfs"), 1);
    assert_eq!(d.backend().count("mount"), 1);
    assert_eq!(d.backend().count("bind"), 1);
    // The same target read-only is another publish: refused.
    let ro = PublishRequest {
        read_only: true,
        ..publish_req(&id, "/stage/a", "/pods/1/mount")
    };
    assert_eq!(code(d.node_publish(&ro)), Code::AlreadyExists);
}

#[test]
fn stage_at_another_path_or_with_another_fs_is_refused() {
    let t = driver(false);
    let d = &t.driver;
    let id = volume(d);
    d.node_stage(&stage_req(&id, "/stage/a")).unwrap();
    assert_eq!(
        code(d.node_stage(&stage_req(&id, "/stage/b"))),
        Code::FailedPrecondition
    );
    let xfs = StageRequest {
        capability: Some(Capability {
            fs_type: "xfs".into(),
            ..cap()
        }),
        ..stage_req(&id, "/stage/a")
    };
    assert_eq!(code(d.node_stage(&xfs)), Code::AlreadyExists);
    // Publishing from the other path is refused too.
    let r = d.node_publish(&publish_req(&id, "/stage/b", "/t"));
    assert_eq!(code(r), Code::FailedPrecondition);
}

#[test]
fn a_missing_staging_dir_is_the_cos_bug() {
    let t = driver(false);
    let d = &t.driver;
    let id = volume(d);
    let r = d.node_stage(&stage_req(&id, "/stage/never-made"));
    assert_eq!(code(r), Code::FailedPrecondition);
    assert!(d.backend().host().loops.is_empty());
}

#[test]
fn unstage_while_published_is_refused_and_the_reverse_order_leaves_nothing() {
    let t = driver(false);
    let d = &t.driver;
    let id = volume(d);
    d.node_stage(&stage_req(&id, "/stage/a")).unwrap();
    d.node_publish(&publish_req(&id, "/stage/a", "/pods/1/mount"))
        .unwrap();
    d.node_publish(&publish_req(&id, "/stage/a", "/pods/2/mount"))
        .unwrap();
    assert_eq!(
        code(d.node_unstage(&id, Path::new("/stage/a"))),
        Code::FailedPrecondition
    );
    for target in ["/pods/1/mount", "/pods/2/mount"] {
        for _ in 0..2 {
            d.node_unpublish(&id, Path::new(target)).unwrap();
        }
    }
    for _ in 0..2 {
        d.node_unstage(&id, Path::new("/stage/a")).unwrap();
    }
    let h = d.backend().host();
    assert!(h.mounts.is_empty(), "{:?}", h.mounts);
    assert!(h.loops.is_empty(), "{:?}", h.loops);
    assert!(!h.dirs.contains(Path::new("/pods/1/mount")));
    // Formatted once, still formatted: a re-stage keeps the data.
    assert_eq!(h.filesystems.len(), 1);
}

#[test]
fn restage_after_unstage_does_not_format_again() {
    let t = driver(false);
    let d = &t.driver;
    let id = volume(d);
    d.node_stage(&stage_req(&id, "/stage/a")).unwrap();
    d.node_unstage(&id, Path::new("/stage/a")).unwrap();
    d.node_stage(&stage_req(&id, "/stage/b")).unwrap();
    assert_eq!(d.backend().count("mkfs"), 1);
    assert_eq!(d.backend().count("attach"), 2);
    // Unstage at a path it is not staged at: OK, and nothing undone.
    d.node_unstage(&id, Path::new("/stage/a")).unwrap();
    assert_eq!(d.backend().host().loops.len(), 1);
}

#[test]
fn controller_publish_gates_stage_when_attach_is_on() {
    let t = driver(true);
    let d = &t.driver;
    let id = volume(d);
    assert_eq!(
        code(d.node_stage(&stage_req(&id, "/stage/a"))),
        Code::FailedPrecondition
    );
    let req = ControllerPublishRequest {
        volume_id: id.clone(),
        node_id: "node-1".into(),
        capability: Some(cap()),
        read_only: false,
    };
    let context = d.controller_publish(&req).unwrap();
    assert_eq!(d.controller_publish(&req).unwrap(), context);
    let ro = ControllerPublishRequest {
        read_only: true,
        ..req.clone()
    };
    assert_eq!(code(d.controller_publish(&ro)), Code::AlreadyExists);
    let elsewhere = ControllerPublishRequest {
        node_id: "node-2".into(),
        ..req.clone()
    };
    assert_eq!(code(d.controller_publish(&elsewhere)), Code::NotFound);
    // The context must be passed through to NodeStageVolume.
    assert_eq!(
        code(d.node_stage(&stage_req(&id, "/stage/a"))),
        Code::InvalidArgument
    );
    let passed = StageRequest {
        publish_context: context,
        ..stage_req(&id, "/stage/a")
    };
    d.node_stage(&passed).unwrap();
    assert_eq!(
        code(d.controller_unpublish(&id, "node-1")),
        Code::FailedPrecondition
    );
    d.node_unstage(&id, Path::new("/stage/a")).unwrap();
    d.controller_unpublish(&id, "node-1").unwrap();
    d.controller_unpublish(&id, "node-1").unwrap();
    d.delete_volume(&id).unwrap();
}

#[test]
fn ephemeral_volumes_come_and_go_with_their_publish() {
    let t = driver(true);
    let d = &t.driver;
    let req = PublishRequest {
        volume_context: BTreeMap::from([(EPHEMERAL_KEY.to_string(), "true".to_string())]),
        ..publish_req("csi-abc", "", "/pods/1/vol")
    };
    for _ in 0..2 {
        d.node_publish(&req).unwrap();
    }
    {
        let h = d.backend().host();
        assert_eq!(h.loops.len(), 1);
        assert_eq!(h.mounts.len(), 2, "private stage + target");
        assert_eq!(h.disks.len(), 1);
    }
    for _ in 0..2 {
        d.node_unpublish("csi-abc", Path::new("/pods/1/vol"))
            .unwrap();
    }
    let h = d.backend().host();
    assert!(h.mounts.is_empty() && h.loops.is_empty() && h.disks.is_empty());
    assert_eq!(h.calls.iter().filter(|c| *c == "mkfs").count(), 1);
}

#[test]
fn stats_need_a_known_mounted_path() {
    let t = driver(false);
    let d = &t.driver;
    let id = volume(d);
    assert_eq!(
        code(d.volume_stats(&id, Path::new("/stage/a"))),
        Code::NotFound
    );
    d.node_stage(&stage_req(&id, "/stage/a")).unwrap();
    d.node_publish(&publish_req(&id, "/stage/a", "/t")).unwrap();
    assert_eq!(d.volume_stats(&id, Path::new("/t")).unwrap().used_bytes, 40);
    assert_eq!(
        code(d.volume_stats(&id, Path::new("/other"))),
        Code::NotFound
    );
}

#[test]
fn a_restarted_driver_remembers_and_does_not_stage_twice() {
    let t = driver(false);
    let id = volume(&t.driver);
    t.driver.node_stage(&stage_req(&id, "/stage/a")).unwrap();
    let host = std::mem::take(&mut *t.driver.backend().host());
    let again = Driver::new(t.driver.config.clone(), Fake(std::sync::Mutex::new(host)));
    again.node_stage(&stage_req(&id, "/stage/a")).unwrap();
    assert_eq!(again.backend().count("attach"), 1);
    assert_eq!(again.backend().count("mount"), 1);
    assert_eq!(
        code(again.node_stage(&stage_req(&id, "/stage/b"))),
        Code::FailedPrecondition
    );
}
