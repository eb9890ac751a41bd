//! The plugin against the fake driver and host: call order, once-per-node
//! staging, restarts, failures, volume_context, fsGroup, records.

use std::sync::Arc;

use futures::future::BoxFuture;

use k8s_openapi::api::core::v1::{PersistentVolume, Pod, Secret};

use super::fake::{FakeClaims, FakeDriver, FakeHost};
use super::state::{self, PublishData, StageData};
use super::*;
use crate::objects::{ObjectStore, Objects};

struct World {
    root: tempfile::TempDir,
    host: Arc<FakeHost>,
    driver: Arc<FakeDriver>,
    claims: Arc<FakeClaims>,
    objects: ObjectStore,
}

const STAGING: Capabilities = Capabilities {
    stage_unstage: true,
    single_node_multi_writer: false,
    volume_mount_group: false,
};

fn world(caps: Capabilities) -> World {
    let host = Arc::new(FakeHost::default());
    World {
        root: tempfile::tempdir().unwrap(),
        driver: Arc::new(FakeDriver::new(host.clone(), caps)),
        host,
        claims: Arc::new(FakeClaims::default()),
        objects: ObjectStore::default(),
    }
}

impl World {
    /// A new plugin instance on the same root and driver (an agent restart).
    fn plugin(&self) -> CsiPlugin {
        CsiPlugin::new(
            self.root.path().to_path_buf(),
            "node1".into(),
            self.driver.clone(),
            self.claims.clone(),
            Arc::new(self.objects.clone()),
            self.host.clone(),
        )
    }

    fn bind(&self, claim: &str, pv_yaml: &str) {
        let pv: PersistentVolume = crate::yaml::from_str(pv_yaml).unwrap();
        crate::locks::lock(&self.claims.bound)
            .insert(("default".into(), claim.into()), Arc::new(pv));
    }

    fn pod_dir(&self, uid: &str) -> PathBuf {
        self.root.path().join("pods").join(uid)
    }

    fn vol_dir(&self, uid: &str, name: &str) -> PathBuf {
        self.pod_dir(uid)
            .join("volumes/kubernetes.io~csi")
            .join(name)
    }

    async fn set_up(&self, plugin: &CsiPlugin, p: &Pod) -> Result<PathBuf, VolumeError> {
        let uid = p.metadata.uid.clone().unwrap();
        let v = &p.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0];
        plugin.set_up(p, v, &self.pod_dir(&uid)).await
    }
}

fn pod(uid: &str, extra: &str, volume: &str) -> Pod {
    crate::yaml::from_str(&format!(
        "metadata: {{name: web-{uid}, namespace: default, uid: {uid}}}\nspec:\n  containers: []\n{extra}  volumes: [{volume}]\n"
    ))
    .unwrap()
}

fn claim_pod(uid: &str) -> Pod {
    pod(
        uid,
        "",
        "{name: data, persistentVolumeClaim: {claimName: c1}}",
    )
}

const PV: &str = "metadata: {name: pv1}\nspec:\n  accessModes: [ReadWriteOnce]\n  mountOptions: [noatime]\n  csi: {driver: d.example, volumeHandle: vol-1, fsType: ext4, volumeAttributes: {tier: fast}}\n";

fn staging(w: &World) -> PathBuf {
    state::staging_path(w.root.path(), "d.example", "vol-1")
}

#[tokio::test]
async fn one_stage_for_two_pods_a_publish_per_pod_and_unstage_after_the_last() {
    let w = world(STAGING);
    w.bind("c1", PV);
    let plugin = w.plugin();
    let a = w.set_up(&plugin, &claim_pod("ua")).await.unwrap();
    let b = w.set_up(&plugin, &claim_pod("ub")).await.unwrap();
    assert_eq!(a, w.vol_dir("ua", "pv1").join("mount"));
    assert_eq!(b, w.vol_dir("ub", "pv1").join("mount"));
    use Call::*;
    assert_eq!(
        w.driver.names(),
        [NodeStageVolume, NodePublishVolume, NodePublishVolume]
    );
    // Idempotent: set up again asks nothing of the driver.
    w.set_up(&plugin, &claim_pod("ua")).await.unwrap();
    assert_eq!(w.driver.names().len(), 3);

    plugin
        .tear_down("ua", &w.vol_dir("ua", "pv1"))
        .await
        .unwrap();
    assert_eq!(w.driver.count(NodeUnpublishVolume), 1);
    assert_eq!(w.driver.count(NodeUnstageVolume), 0, "pod ub still uses it");
    assert!(!w.vol_dir("ua", "pv1").exists());
    plugin
        .tear_down("ub", &w.vol_dir("ub", "pv1"))
        .await
        .unwrap();
    assert_eq!(
        w.driver.names()[3..],
        [NodeUnpublishVolume, NodeUnpublishVolume, NodeUnstageVolume]
    );
    assert!(!staging(&w).parent().unwrap().exists());
    assert!(!w.vol_dir("ub", "pv1").exists());
    assert!(crate::locks::lock(&w.host.mounts).is_empty());
    // Idempotent.
    plugin
        .tear_down("ub", &w.vol_dir("ub", "pv1"))
        .await
        .unwrap();
    assert_eq!(w.driver.names().len(), 6);
}

#[tokio::test]
async fn concurrent_set_up_and_tear_down_of_one_volume_do_not_race() {
    let w = world(STAGING);
    w.bind("c1", PV);
    let plugin = w.plugin();
    let (pa, pb) = (claim_pod("ua"), claim_pod("ub"));
    let (a, b) = tokio::join!(w.set_up(&plugin, &pa), w.set_up(&plugin, &pb));
    a.unwrap();
    b.unwrap();
    assert_eq!(w.driver.count(Call::NodeStageVolume), 1);
    assert_eq!(w.driver.count(Call::NodePublishVolume), 2);
    let (da, db) = (w.vol_dir("ua", "pv1"), w.vol_dir("ub", "pv1"));
    let (a, b) = tokio::join!(plugin.tear_down("ua", &da), plugin.tear_down("ub", &db));
    a.unwrap();
    b.unwrap();
    assert_eq!(w.driver.count(Call::NodeUnstageVolume), 1);
    assert_eq!(w.driver.names().last(), Some(&Call::NodeUnstageVolume));
    assert!(
        crate::locks::lock(&plugin.locks.0).is_empty(),
        "locks are dropped"
    );
}

#[tokio::test]
async fn a_restarted_agent_neither_stages_twice_nor_forgets_to_unstage() {
    let w = world(STAGING);
    w.bind("c1", PV);
    w.set_up(&w.plugin(), &claim_pod("ua")).await.unwrap();
    // Restart: a new plugin with nothing in memory.
    let plugin = w.plugin();
    w.set_up(&plugin, &claim_pod("ua")).await.unwrap();
    w.set_up(&plugin, &claim_pod("ub")).await.unwrap();
    assert_eq!(w.driver.count(Call::NodeStageVolume), 1);
    // A crash during teardown: unstage fails (the agent died in it).
    plugin
        .tear_down("ua", &w.vol_dir("ua", "pv1"))
        .await
        .unwrap();
    crate::locks::lock(&w.driver.fail).insert(Call::NodeUnstageVolume, tonic::Code::Unavailable);
    let e = plugin
        .tear_down("ub", &w.vol_dir("ub", "pv1"))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("UnmountDevice failed for volume \"pv1\" : rpc error: code = Unavailable"),
        "{e}"
    );
    // The pod's record stays until the unstage is done, so it resumes.
    assert!(w.vol_dir("ub", "pv1").join("vol_data.json").exists());
    crate::locks::lock(&w.driver.fail).clear();
    w.plugin()
        .tear_down("ub", &w.vol_dir("ub", "pv1"))
        .await
        .unwrap();
    assert_eq!(w.driver.count(Call::NodeUnstageVolume), 2);
    assert!(!staging(&w).parent().unwrap().exists());
    assert!(
        !w.pod_dir("ub")
            .join("volumes/kubernetes.io~csi/pv1")
            .exists()
    );
}

#[tokio::test]
async fn after_a_reboot_a_recorded_stage_without_its_mount_is_staged_again() {
    let w = world(STAGING);
    w.bind("c1", PV);
    w.set_up(&w.plugin(), &claim_pod("ua")).await.unwrap();
    crate::locks::lock(&w.host.mounts).clear(); // mounts are gone
    w.set_up(&w.plugin(), &claim_pod("ua")).await.unwrap();
    assert_eq!(w.driver.count(Call::NodeStageVolume), 2);
    assert_eq!(w.driver.count(Call::NodePublishVolume), 2);
}

#[tokio::test]
async fn a_failing_stage_leaves_no_publish_and_tears_down_clean() {
    let w = world(STAGING);
    w.bind("c1", PV);
    let plugin = w.plugin();
    crate::locks::lock(&w.driver.fail).insert(Call::NodeStageVolume, tonic::Code::Unavailable);
    let e = w.set_up(&plugin, &claim_pod("ua")).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "MountVolume.MountDevice failed for volume \"pv1\" : rpc error: code = Unavailable desc = injected (NodeStageVolume to driver \"d.example\")"
    );
    assert_eq!(w.driver.names(), [Call::NodeStageVolume]);
    let g: StageData = state::read(staging(&w).parent().unwrap()).unwrap().unwrap();
    assert!(!g.staged, "recorded before the call, not marked staged");
    // The pod goes before the driver recovers: everything is undone.
    plugin
        .tear_down("ua", &w.vol_dir("ua", "pv1"))
        .await
        .unwrap();
    assert_eq!(
        w.driver.names()[1..],
        [Call::NodeUnpublishVolume, Call::NodeUnstageVolume]
    );
    assert!(!staging(&w).parent().unwrap().exists());
    assert!(!w.vol_dir("ua", "pv1").exists());
}

#[tokio::test]
async fn a_failing_publish_reads_like_kubelet_and_is_retried() {
    let w = world(STAGING);
    w.bind("c1", PV);
    let plugin = w.plugin();
    crate::locks::lock(&w.driver.fail)
        .insert(Call::NodePublishVolume, tonic::Code::ResourceExhausted);
    let e = w.set_up(&plugin, &claim_pod("ua")).await.unwrap_err();
    assert!(
        e.to_string().starts_with("MountVolume.SetUp failed for volume \"pv1\" : rpc error: code = ResourceExhausted desc = injected"),
        "{e}"
    );
    let rec: PublishData = state::read(&w.vol_dir("ua", "pv1")).unwrap().unwrap();
    assert!(!rec.published);
    crate::locks::lock(&w.driver.fail).clear();
    w.set_up(&plugin, &claim_pod("ua")).await.unwrap();
    use Call::*;
    assert_eq!(
        w.driver.names(),
        [NodeStageVolume, NodePublishVolume, NodePublishVolume]
    );
}

#[tokio::test]
async fn persistent_volumes_pass_their_fields_through() {
    let w = world(Capabilities {
        single_node_multi_writer: true,
        ..STAGING
    });
    w.bind(
        "c1",
        "metadata: {name: pv1}\nspec:\n  accessModes: [ReadWriteOncePod]\n  mountOptions: [noatime, discard]\n  csi:\n    driver: d.example\n    volumeHandle: vol-1\n    fsType: xfs\n    readOnly: true\n    volumeAttributes: {tier: fast}\n    nodeStageSecretRef: {name: stage, namespace: storage}\n    nodePublishSecretRef: {name: pub, namespace: storage}\n",
    );
    let mut objects = Objects::default();
    for (name, key) in [("stage", "s"), ("pub", "p")] {
        let s: Secret =
            crate::yaml::from_str(&format!("stringData: {{{key}: v-{name}}}\n")).unwrap();
        objects
            .secrets
            .insert(("storage".into(), name.into()), Arc::new(s));
    }
    w.objects.replace(objects);
    crate::locks::lock(&w.claims.publish_context).insert("devicePath".into(), "/dev/loop7".into());
    w.set_up(&w.plugin(), &claim_pod("ua")).await.unwrap();
    let calls = crate::locks::lock(&w.driver.calls).clone();
    let fake::Recorded::Stage(stage) = &calls[0].1 else {
        panic!("{calls:?}")
    };
    let fake::Recorded::Publish(publish) = &calls[1].1 else {
        panic!("{calls:?}")
    };
    let cap = VolumeCapability {
        access_mode: AccessMode::SingleNodeSingleWriter,
        fs_type: "xfs".into(),
        mount_flags: vec!["noatime".into(), "discard".into()],
        volume_mount_group: String::new(),
    };
    assert_eq!(calls[0].0, "d.example");
    assert_eq!(stage.volume_id, "vol-1");
    assert_eq!(stage.volume_capability, cap);
    assert_eq!(stage.staging_target_path, staging(&w));
    assert_eq!(stage.secrets.0["s"], "v-stage");
    assert_eq!(stage.publish_context["devicePath"], "/dev/loop7");
    assert_eq!(
        stage.volume_context,
        [("tier".to_string(), "fast".to_string())].into()
    );
    assert_eq!(publish.volume_capability, cap);
    assert!(publish.readonly);
    assert_eq!(
        publish.staging_target_path.as_deref(),
        Some(staging(&w).as_path())
    );
    assert_eq!(publish.secrets.0["p"], "v-pub");
    assert_eq!(publish.publish_context["devicePath"], "/dev/loop7");
    assert_eq!(publish.volume_context["tier"], "fast");
    // Standalone: pod info is passed, and this volume is not ephemeral.
    assert_eq!(
        publish.volume_context["csi.storage.k8s.io/ephemeral"],
        "false"
    );
    assert_eq!(publish.volume_context["csi.storage.k8s.io/pod.uid"], "ua");
}

/// A cluster with one CSIDriver object (or none) and its attachments.
#[derive(Default)]
struct FakeCluster {
    driver: Option<DriverPolicy>,
    attachments: std::sync::Mutex<BTreeMap<String, cluster::Attachment>>,
}

impl cluster::Cluster for FakeCluster {
    fn driver<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<Option<DriverPolicy>, String>> {
        Box::pin(async move { Ok(self.driver) })
    }
    fn attachment<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<cluster::Attachment>, String>> {
        Box::pin(async move { Ok(crate::locks::lock(&self.attachments).get(name).cloned()) })
    }
}

#[tokio::test]
async fn in_a_cluster_a_volume_waits_for_its_attachment_and_gets_its_metadata() {
    let w = world(STAGING);
    w.bind("c1", PV);
    let c = Arc::new(FakeCluster::default());
    let plugin = w.plugin().with_cluster(c.clone());
    let id = state::attachment_id("vol-1", "d.example", "node1");
    // No CSIDriver object: attach required, no pod info (kubelet's defaults).
    let e = w.set_up(&plugin, &claim_pod("ua")).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "MountVolume.SetUp failed for volume \"pv1\" : volume \"vol-1\" of driver \"d.example\" is not attached to node \"node1\" yet: VolumeAttachment {id} not found"
        )
    );
    assert!(w.driver.names().is_empty(), "nothing staged before attach");
    crate::locks::lock(&c.attachments).insert(
        id.clone(),
        cluster::Attachment {
            attached: true,
            metadata: [("devicePath".to_string(), "/dev/loop3".to_string())].into(),
            ..Default::default()
        },
    );
    w.set_up(&plugin, &claim_pod("ua")).await.unwrap();
    let calls = crate::locks::lock(&w.driver.calls).clone();
    let fake::Recorded::Stage(stage) = &calls[0].1 else {
        panic!("{calls:?}")
    };
    assert_eq!(stage.publish_context["devicePath"], "/dev/loop3");
    let publish = &w.driver.publishes()[0];
    assert_eq!(publish.publish_context["devicePath"], "/dev/loop3");
    assert!(
        !publish
            .volume_context
            .contains_key("csi.storage.k8s.io/pod.uid"),
        "no podInfoOnMount without a CSIDriver object"
    );
}

#[tokio::test]
async fn a_csidriver_object_without_attach_gives_pod_info_and_no_wait() {
    let w = world(STAGING);
    w.bind("c1", PV);
    let c = Arc::new(FakeCluster {
        driver: Some(DriverPolicy {
            fs_group_policy: FsGroupPolicy::None,
            pod_info_on_mount: true,
            attach_required: false,
        }),
        ..Default::default()
    });
    let plugin = w.plugin().with_cluster(c);
    w.set_up(&plugin, &claim_pod("ub")).await.unwrap();
    let publish = &w.driver.publishes()[0];
    assert_eq!(publish.volume_context["csi.storage.k8s.io/pod.uid"], "ub");
    assert!(publish.publish_context.is_empty());
}

#[tokio::test]
async fn a_missing_secret_is_a_mount_device_failure_before_any_call() {
    let w = world(STAGING);
    w.bind("c1", "metadata: {name: pv1}\nspec:\n  csi: {driver: d.example, volumeHandle: vol-1, nodeStageSecretRef: {name: gone, namespace: storage}}\n");
    let e = w.set_up(&w.plugin(), &claim_pod("ua")).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "MountVolume.MountDevice failed for volume \"pv1\" : fetching NodeStageSecretRef storage/gone failed: secret \"gone\" not found"
    );
    assert!(w.driver.names().is_empty());
}

#[tokio::test]
async fn inline_ephemeral_volumes_are_published_only_with_pod_info() {
    let w = world(STAGING);
    *crate::locks::lock(&w.driver.policy) = DriverPolicy {
        fs_group_policy: FsGroupPolicy::File,
        pod_info_on_mount: false,
        attach_required: false,
    };
    let p = pod(
        "ue",
        "  serviceAccountName: robot\n",
        "{name: scratch, csi: {driver: d.example, volumeAttributes: {size: 1Gi}}}",
    );
    let plugin = w.plugin();
    let target = w.set_up(&plugin, &p).await.unwrap();
    assert_eq!(target, w.vol_dir("ue", "scratch").join("mount"));
    assert_eq!(w.driver.names(), [Call::NodePublishVolume]);
    let req = &w.driver.publishes()[0];
    assert_eq!(
        req.volume_id,
        format!("csi-{}", state::sha256_hex(b"uescratch"))
    );
    assert_eq!(req.staging_target_path, None);
    assert_eq!(
        req.volume_capability.access_mode,
        AccessMode::SingleNodeWriter
    );
    let want: BTreeMap<String, String> = [
        ("size", "1Gi"),
        ("csi.storage.k8s.io/ephemeral", "true"),
        ("csi.storage.k8s.io/pod.name", "web-ue"),
        ("csi.storage.k8s.io/pod.namespace", "default"),
        ("csi.storage.k8s.io/pod.uid", "ue"),
        ("csi.storage.k8s.io/serviceAccount.name", "robot"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(req.volume_context, want);
    let rec: PublishData = state::read(&w.vol_dir("ue", "scratch")).unwrap().unwrap();
    assert_eq!(rec.lifecycle, state::Lifecycle::Ephemeral);
    assert_eq!(rec.staging_target_path, "");
    plugin
        .tear_down("ue", &w.vol_dir("ue", "scratch"))
        .await
        .unwrap();
    assert_eq!(
        w.driver.names(),
        [Call::NodePublishVolume, Call::NodeUnpublishVolume]
    );
    assert!(!w.vol_dir("ue", "scratch").exists());
}

#[test]
fn fs_group_policy_table() {
    use FsGroupPolicy::*;
    let rwo = vec!["ReadWriteOnce".to_string()];
    let rwx = vec!["ReadWriteMany".to_string()];
    // (policy, fsType, PV access modes (None inline), readOnly, changes ownership)
    type Row<'a> = (FsGroupPolicy, &'a str, Option<&'a [String]>, bool, bool);
    let table: [Row; 9] = [
        (ReadWriteOnceWithFsType, "ext4", Some(&rwo), false, true),
        (ReadWriteOnceWithFsType, "", Some(&rwo), false, false),
        (ReadWriteOnceWithFsType, "ext4", Some(&rwx), false, false),
        (ReadWriteOnceWithFsType, "ext4", Some(&[]), false, false),
        (ReadWriteOnceWithFsType, "ext4", Option::None, false, true), // inline: RWO
        (ReadWriteOnceWithFsType, "ext4", Some(&rwo), true, false),
        (File, "", Some(&rwx), false, true),
        (File, "", Some(&rwx), true, false),
        (None, "ext4", Some(&rwo), false, false),
    ];
    for (policy, fs_type, modes, ro, want) in table {
        assert_eq!(
            applies_fs_group(policy, fs_type, modes, ro),
            want,
            "{policy:?} {fs_type:?} {modes:?} ro={ro}"
        );
    }
}

#[tokio::test]
async fn fs_group_is_applied_per_policy_or_left_to_the_driver() {
    let sc = "  securityContext: {fsGroup: 2000, fsGroupChangePolicy: OnRootMismatch}\n";
    // Default policy, ext4 + RWO: the agent changes ownership.
    let w = world(STAGING);
    w.bind("c1", PV);
    let p = pod(
        "uf",
        sc,
        "{name: data, persistentVolumeClaim: {claimName: c1}}",
    );
    let target = w.set_up(&w.plugin(), &p).await.unwrap();
    assert_eq!(
        *crate::locks::lock(&w.host.ownership),
        [(target, 2000, false, ChangePolicy::OnRootMismatch)]
    );
    // Policy None: never.
    let w = world(STAGING);
    w.bind("c1", PV);
    crate::locks::lock(&w.driver.policy).fs_group_policy = FsGroupPolicy::None;
    w.set_up(&w.plugin(), &p).await.unwrap();
    assert!(crate::locks::lock(&w.host.ownership).is_empty());
    // VOLUME_MOUNT_GROUP: the driver is told, the agent does not chown.
    let w = world(Capabilities {
        volume_mount_group: true,
        ..STAGING
    });
    w.bind("c1", PV);
    w.set_up(&w.plugin(), &p).await.unwrap();
    assert!(crate::locks::lock(&w.host.ownership).is_empty());
    assert_eq!(
        w.driver.publishes()[0].volume_capability.volume_mount_group,
        "2000"
    );
}

#[tokio::test]
async fn records_hold_kubelets_keys() {
    let w = world(STAGING);
    w.bind("c1", PV);
    w.set_up(&w.plugin(), &claim_pod("ua")).await.unwrap();
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p.join("vol_data.json")).unwrap()).unwrap()
    };
    let pod_rec = read(w.vol_dir("ua", "pv1"));
    assert_eq!(
        pod_rec,
        serde_json::json!({
            "specVolID": "pv1",
            "volumeHandle": "vol-1",
            "driverName": "d.example",
            "nodeName": "node1",
            "attachmentID": state::attachment_id("vol-1", "d.example", "node1"),
            "volumeLifecycleMode": "Persistent",
            "stagingTargetPath": staging(&w).to_string_lossy(),
            "published": "true",
        })
    );
    let global = read(staging(&w).parent().unwrap().to_path_buf());
    assert_eq!(
        global,
        serde_json::json!({"volumeHandle": "vol-1", "driverName": "d.example", "staged": "true"})
    );
    // Staged and published: one name in the node's volumesInUse.
    assert_eq!(
        state::volumes_in_use(w.root.path()),
        ["kubernetes.io/csi/d.example^vol-1"]
    );
}

#[tokio::test]
async fn drivers_without_staging_publish_directly_and_never_unstage() {
    let w = world(Capabilities::default());
    w.bind("c1", PV);
    let plugin = w.plugin();
    w.set_up(&plugin, &claim_pod("ua")).await.unwrap();
    assert_eq!(w.driver.publishes()[0].staging_target_path, None);
    let in_use = ["kubernetes.io/csi/d.example^vol-1".to_string()];
    assert_eq!(state::volumes_in_use(w.root.path()), in_use, "published");
    plugin
        .tear_down("ua", &w.vol_dir("ua", "pv1"))
        .await
        .unwrap();
    assert_eq!(
        w.driver.names(),
        [Call::NodePublishVolume, Call::NodeUnpublishVolume]
    );
    assert!(!w.root.path().join("plugins").exists());
    assert!(state::volumes_in_use(w.root.path()).is_empty());
}

#[tokio::test]
async fn unknown_volumes_and_recordless_dirs() {
    let w = world(STAGING);
    w.bind(
        "c1",
        "metadata: {name: pv-host}\nspec:\n  hostPath: {path: /tmp}\n",
    );
    let e = w.set_up(&w.plugin(), &claim_pod("ua")).await.unwrap_err();
    assert!(e.to_string().contains("is not a CSI volume"), "{e}");
    // A dir with no record and no mount: just removed.
    let dir = w.vol_dir("ua", "left");
    std::fs::create_dir_all(dir.join("mount")).unwrap();
    w.plugin().tear_down("ua", &dir).await.unwrap();
    assert!(!dir.exists());
    // Mounted with no record: refused, nothing removed.
    std::fs::create_dir_all(dir.join("mount")).unwrap();
    crate::locks::lock(&w.host.mounts).insert(dir.join("mount"));
    let e = w.plugin().tear_down("ua", &dir).await.unwrap_err();
    assert!(e.to_string().contains("cannot tell which driver"), "{e}");
    assert!(dir.join("mount").exists());
}

#[tokio::test]
async fn sweep_unstages_only_volumes_no_pod_record_names() {
    let w = world(STAGING);
    w.bind("c1", PV);
    w.bind(
        "c2",
        "metadata: {name: pv2}\nspec:\n  csi: {driver: d.example, volumeHandle: vol-2}\n",
    );
    let plugin = w.plugin();
    w.set_up(&plugin, &claim_pod("ua")).await.unwrap();
    let p2 = pod(
        "ub",
        "",
        "{name: data, persistentVolumeClaim: {claimName: c2}}",
    );
    w.set_up(&plugin, &p2).await.unwrap();
    // Pod ub's dir vanishes behind the agent's back.
    crate::locks::lock(&w.host.mounts).remove(&w.vol_dir("ub", "pv2").join("mount"));
    std::fs::remove_dir_all(w.pod_dir("ub")).unwrap();
    assert_eq!(w.plugin().sweep().await.unwrap(), 1);
    let unstaged: Vec<_> = crate::locks::lock(&w.driver.calls)
        .iter()
        .filter_map(|(_, r)| match r {
            fake::Recorded::Unstage(u) => Some(u.volume_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(unstaged, ["vol-2"]);
    assert!(staging(&w).exists(), "vol-1 is still used by pod ua");
    assert_eq!(w.plugin().sweep().await.unwrap(), 0);
}

#[tokio::test]
async fn a_failing_unpublish_keeps_everything_for_the_retry() {
    let w = world(STAGING);
    w.bind("c1", PV);
    let plugin = w.plugin();
    w.set_up(&plugin, &claim_pod("ua")).await.unwrap();
    crate::locks::lock(&w.driver.fail)
        .insert(Call::NodeUnpublishVolume, tonic::Code::DeadlineExceeded);
    let e = plugin
        .tear_down("ua", &w.vol_dir("ua", "pv1"))
        .await
        .unwrap_err();
    assert!(
        e.to_string().starts_with(
            "UnmountVolume.TearDown failed for volume \"pv1\" : rpc error: code = DeadlineExceeded"
        ),
        "{e}"
    );
    assert_eq!(
        w.driver.count(Call::NodeUnstageVolume),
        0,
        "never unstage under a publish"
    );
    assert!(w.vol_dir("ua", "pv1").join("vol_data.json").exists());
    crate::locks::lock(&w.driver.fail).clear();
    plugin
        .tear_down("ua", &w.vol_dir("ua", "pv1"))
        .await
        .unwrap();
    assert_eq!(w.driver.names().last(), Some(&Call::NodeUnstageVolume));
}

#[tokio::test]
async fn a_record_of_another_volume_is_never_overwritten() {
    let w = world(STAGING);
    w.bind("c1", PV);
    let plugin = w.plugin();
    w.set_up(&plugin, &claim_pod("ua")).await.unwrap();
    // The PV is recreated under its name with another handle.
    w.bind("c1", &PV.replace("vol-1", "vol-9"));
    crate::locks::lock(&w.host.mounts).clear();
    let e = w.set_up(&plugin, &claim_pod("ua")).await.unwrap_err();
    assert!(e.to_string().contains("it must be torn down first"), "{e}");
    let rec: PublishData = state::read(&w.vol_dir("ua", "pv1")).unwrap().unwrap();
    assert_eq!(rec.volume_handle, "vol-1");
}
