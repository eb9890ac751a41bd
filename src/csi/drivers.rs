//! The registry of known CSI drivers, by name: where each one listens, and
//! what it said about itself when it was (re)discovered: GetPluginInfo,
//! GetPluginCapabilities, Probe, NodeGetInfo, NodeGetCapabilities and,
//! when it offers the Controller service, ControllerGetCapabilities.
//!
//! Drivers come from minilet's `csiDrivers` (known from the start,
//! discovered on first use) or from kubelet's plugin registration
//! (`registration.rs`; discovered before they are accepted, gone when
//! their registration socket goes). Side effects: the discovery RPCs; the
//! map itself sits behind a mutex never held across an await.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::client::{CsiClient, Timeouts};
use super::error::{Call, CsiError};
use super::proto::csi;
use crate::config::CsiDriverConfig;

/// Whether `s` is a valid CSI driver name (the rule GetPluginInfo's name
/// follows): at most 63 characters of letters, digits, '-' and '.',
/// starting and ending with a letter or digit.
pub fn is_driver_name(s: &str) -> bool {
    let b = s.as_bytes();
    let edge = |c: &u8| c.is_ascii_alphanumeric();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            b.len() <= 63
                && edge(first)
                && edge(last)
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'.')
        }
        _ => false,
    }
}

/// GetPluginCapabilities, as flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginCapabilities {
    /// CONTROLLER_SERVICE: the plugin serves Controller on this endpoint.
    pub controller_service: bool,
    /// VOLUME_ACCESSIBILITY_CONSTRAINTS: volumes have topology.
    pub accessibility_constraints: bool,
}

/// NodeGetCapabilities, as flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeCapabilities {
    /// STAGE_UNSTAGE_VOLUME: NodeStageVolume before NodePublishVolume.
    pub stage_unstage_volume: bool,
    /// GET_VOLUME_STATS: NodeGetVolumeStats is served.
    pub get_volume_stats: bool,
    pub expand_volume: bool,
    pub volume_condition: bool,
    pub single_node_multi_writer: bool,
    /// VOLUME_MOUNT_GROUP: the driver applies fsGroup itself.
    pub volume_mount_group: bool,
}

/// ControllerGetCapabilities, as flags (all false without the service).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControllerCapabilities {
    /// CREATE_DELETE_VOLUME: dynamic provisioning.
    pub create_delete_volume: bool,
    /// PUBLISH_UNPUBLISH_VOLUME: ControllerPublishVolume before staging.
    pub publish_unpublish_volume: bool,
    pub publish_readonly: bool,
    pub expand_volume: bool,
    pub single_node_multi_writer: bool,
}

/// What a driver said about itself at discovery.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriverInfo {
    /// GetPluginInfo name (checked to be the name it is known by).
    pub name: String,
    pub vendor_version: String,
    pub manifest: BTreeMap<String, String>,
    pub plugin: PluginCapabilities,
    pub node: NodeCapabilities,
    pub controller: ControllerCapabilities,
    /// NodeGetInfo: the driver's id for this node.
    pub node_id: String,
    /// NodeGetInfo: 0 means no limit.
    pub max_volumes_per_node: i64,
    /// NodeGetInfo: this node's topology segments.
    pub topology: BTreeMap<String, String>,
    /// Probe: false while the plugin says it is still starting.
    pub ready: bool,
}

impl DriverInfo {
    /// The capabilities it has, by their CSI names, for people to read.
    pub fn capability_names(&self) -> Vec<&'static str> {
        let flags = [
            (self.plugin.controller_service, "CONTROLLER_SERVICE"),
            (
                self.plugin.accessibility_constraints,
                "VOLUME_ACCESSIBILITY_CONSTRAINTS",
            ),
            (self.node.stage_unstage_volume, "STAGE_UNSTAGE_VOLUME"),
            (self.node.get_volume_stats, "GET_VOLUME_STATS"),
            (self.node.expand_volume, "NODE_EXPAND_VOLUME"),
            (self.node.volume_condition, "VOLUME_CONDITION"),
            (
                self.node.single_node_multi_writer,
                "SINGLE_NODE_MULTI_WRITER",
            ),
            (self.node.volume_mount_group, "VOLUME_MOUNT_GROUP"),
            (self.controller.create_delete_volume, "CREATE_DELETE_VOLUME"),
            (
                self.controller.publish_unpublish_volume,
                "PUBLISH_UNPUBLISH_VOLUME",
            ),
            (self.controller.publish_readonly, "PUBLISH_READONLY"),
            (self.controller.expand_volume, "EXPAND_VOLUME"),
        ];
        flags
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect()
    }
}

/// Asks a driver about itself (the calls in the module header). The name
/// it reports must be the one it is known by.
pub async fn discover(client: &CsiClient) -> Result<DriverInfo, CsiError> {
    let bad = |call, reason: String| CsiError::BadAnswer {
        driver: client.driver().to_string(),
        call,
        reason,
    };
    let info = client.get_plugin_info(csi::GetPluginInfoRequest {}).await?;
    if info.name != client.driver() {
        return Err(bad(
            Call::GetPluginInfo,
            format!("the driver calls itself {:?}", info.name),
        ));
    }
    let plugin = plugin_capabilities(
        &client
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await?,
    );
    // The spec: an unset `ready` means ready.
    let ready = client
        .probe(csi::ProbeRequest {})
        .await?
        .ready
        .unwrap_or(true);
    let node_info = client.node_get_info(csi::NodeGetInfoRequest {}).await?;
    if node_info.node_id.is_empty() {
        return Err(bad(Call::NodeGetInfo, "empty node_id".to_string()));
    }
    let node = node_capabilities(
        &client
            .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
            .await?,
    );
    let controller = if plugin.controller_service {
        controller_capabilities(
            &client
                .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
                .await?,
        )
    } else {
        ControllerCapabilities::default()
    };
    Ok(DriverInfo {
        name: info.name,
        vendor_version: info.vendor_version,
        manifest: info.manifest.into_iter().collect(),
        plugin,
        node,
        controller,
        node_id: node_info.node_id,
        max_volumes_per_node: node_info.max_volumes_per_node,
        topology: node_info
            .accessible_topology
            .map(|t| t.segments.into_iter().collect())
            .unwrap_or_default(),
        ready,
    })
}

fn plugin_capabilities(r: &csi::GetPluginCapabilitiesResponse) -> PluginCapabilities {
    use csi::plugin_capability::{Type, service};
    let mut caps = PluginCapabilities::default();
    for c in &r.capabilities {
        if let Some(Type::Service(s)) = &c.r#type {
            match service::Type::try_from(s.r#type) {
                Ok(service::Type::ControllerService) => caps.controller_service = true,
                Ok(service::Type::VolumeAccessibilityConstraints) => {
                    caps.accessibility_constraints = true;
                }
                _ => {}
            }
        }
    }
    caps
}

fn node_capabilities(r: &csi::NodeGetCapabilitiesResponse) -> NodeCapabilities {
    use csi::node_service_capability::{Type, rpc::Type as Rpc};
    let mut caps = NodeCapabilities::default();
    for c in &r.capabilities {
        let Some(Type::Rpc(rpc)) = &c.r#type else {
            continue;
        };
        match Rpc::try_from(rpc.r#type) {
            Ok(Rpc::StageUnstageVolume) => caps.stage_unstage_volume = true,
            Ok(Rpc::GetVolumeStats) => caps.get_volume_stats = true,
            Ok(Rpc::ExpandVolume) => caps.expand_volume = true,
            Ok(Rpc::VolumeCondition) => caps.volume_condition = true,
            Ok(Rpc::SingleNodeMultiWriter) => caps.single_node_multi_writer = true,
            Ok(Rpc::VolumeMountGroup) => caps.volume_mount_group = true,
            Ok(Rpc::Unknown) | Err(_) => {}
        }
    }
    caps
}

fn controller_capabilities(r: &csi::ControllerGetCapabilitiesResponse) -> ControllerCapabilities {
    use csi::controller_service_capability::{Type, rpc::Type as Rpc};
    let mut caps = ControllerCapabilities::default();
    for c in &r.capabilities {
        let Some(Type::Rpc(rpc)) = &c.r#type else {
            continue;
        };
        match Rpc::try_from(rpc.r#type) {
            Ok(Rpc::CreateDeleteVolume) => caps.create_delete_volume = true,
            Ok(Rpc::PublishUnpublishVolume) => caps.publish_unpublish_volume = true,
            Ok(Rpc::PublishReadonly) => caps.publish_readonly = true,
            Ok(Rpc::ExpandVolume) => caps.expand_volume = true,
            Ok(Rpc::SingleNodeMultiWriter) => caps.single_node_multi_writer = true,
            _ => {}
        }
    }
    caps
}

/// Where a driver became known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// minilet `csiDrivers`.
    Config,
    /// kubelet's plugin registration, through this registration socket.
    Registration { socket: PathBuf },
}

/// One driver as the registry knows it.
#[derive(Clone, Debug)]
pub struct Driver {
    pub client: CsiClient,
    pub origin: Origin,
    /// From the last successful discovery; `None` until then.
    pub info: Option<Arc<DriverInfo>>,
    /// Why the last discovery failed, cleared by a good one.
    pub last_error: Option<String>,
}

/// The known drivers, by name. Shared (`Arc`) by the registration
/// watcher, the volume plugin and `doctor`.
#[derive(Debug)]
pub struct Registry {
    timeouts: Timeouts,
    drivers: Mutex<BTreeMap<String, Driver>>,
    /// Bumped after every change of the drivers or what they said.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Registry {
    pub fn new(timeouts: Timeouts) -> Registry {
        Registry {
            timeouts,
            drivers: Mutex::new(BTreeMap::new()),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Sees every later change (a driver registered, discovered, gone).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The timeouts clients of this registry get.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Driver>> {
        // A panic elsewhere cannot leave the map half-updated (every update
        // is one insert or remove), so a poisoned lock is still usable.
        self.drivers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds the `csiDrivers` of the config, undiscovered: the drivers may
    /// start after the agent; `driver` discovers them on first use.
    pub fn add_static(&self, list: &[CsiDriverConfig]) -> Result<(), CsiError> {
        for d in list {
            let client = CsiClient::new(&d.name, &d.endpoint, self.timeouts)?;
            self.lock().insert(
                d.name.clone(),
                Driver {
                    client,
                    origin: Origin::Config,
                    info: None,
                    last_error: None,
                },
            );
        }
        self.changed();
        Ok(())
    }

    /// Discovers the driver at `endpoint` and, when that works, makes it
    /// known as `name` (replacing an earlier registration of the name, as
    /// kubelet does for a re-registering plugin). A name from `csiDrivers`
    /// cannot be taken over by a registration.
    pub async fn register(
        &self,
        name: &str,
        endpoint: &str,
        origin: Origin,
    ) -> Result<Arc<DriverInfo>, CsiError> {
        if origin != Origin::Config
            && self
                .lock()
                .get(name)
                .is_some_and(|d| d.origin == Origin::Config)
        {
            return Err(CsiError::Configured {
                driver: name.to_string(),
            });
        }
        let client = CsiClient::new(name, endpoint, self.timeouts)?;
        let info = Arc::new(discover(&client).await?);
        self.lock().insert(
            name.to_string(),
            Driver {
                client,
                origin,
                info: Some(info.clone()),
                last_error: None,
            },
        );
        self.changed();
        Ok(info)
    }

    /// Forgets a driver registered through `socket` (its registration
    /// socket went away). A driver since re-registered through another
    /// socket, or from `csiDrivers`, stays. Returns whether one went.
    pub fn deregister(&self, name: &str, socket: &Path) -> bool {
        let mut drivers = self.lock();
        let ours = drivers.get(name).is_some_and(
            |d| matches!(&d.origin, Origin::Registration { socket: s } if s == socket),
        );
        if ours {
            drivers.remove(name);
            drop(drivers);
            self.changed();
        }
        ours
    }

    /// What `name` said at its last discovery, without calling it (`None`:
    /// unknown, or not discovered yet). For synchronous checks such as
    /// "can this driver provision".
    pub fn info(&self, name: &str) -> Option<Arc<DriverInfo>> {
        self.lock().get(name).and_then(|d| d.info.clone())
    }

    /// The client for `name`, without discovery.
    pub fn client(&self, name: &str) -> Result<CsiClient, CsiError> {
        self.lock()
            .get(name)
            .map(|d| d.client.clone())
            .ok_or_else(|| CsiError::UnknownDriver {
                driver: name.to_string(),
            })
    }

    /// The client and discovered facts for `name`, discovering it first if
    /// that has not worked yet (a `csiDrivers` entry whose driver started
    /// late).
    pub async fn driver(&self, name: &str) -> Result<(CsiClient, Arc<DriverInfo>), CsiError> {
        let (client, info) = {
            let drivers = self.lock();
            let d = drivers.get(name).ok_or_else(|| CsiError::UnknownDriver {
                driver: name.to_string(),
            })?;
            (d.client.clone(), d.info.clone())
        };
        match info {
            Some(info) => Ok((client, info)),
            None => Ok((client, self.refresh(name).await?)),
        }
    }

    /// Discovers a known driver again and records the outcome.
    pub async fn refresh(&self, name: &str) -> Result<Arc<DriverInfo>, CsiError> {
        let client = self.client(name)?;
        let outcome = discover(&client).await.map(Arc::new);
        let mut drivers = self.lock();
        // Only if it is still the same registration (same endpoint).
        if let Some(d) = drivers.get_mut(name)
            && d.client.endpoint() == client.endpoint()
        {
            match &outcome {
                Ok(info) => {
                    let new = d.info.as_deref() != Some(info.as_ref());
                    d.info = Some(info.clone());
                    d.last_error = None;
                    if new {
                        drop(drivers);
                        self.changed();
                    }
                }
                Err(e) => d.last_error = Some(e.to_string()),
            }
        }
        outcome
    }

    /// Every known driver, by name.
    pub fn list(&self) -> Vec<(String, Driver)> {
        self.lock()
            .iter()
            .map(|(name, d)| (name.clone(), d.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::fake::{FakeDriver, serve_driver};
    use super::*;

    #[test]
    fn driver_names_follow_the_spec() {
        for ok in ["a", "hostpath.csi.k8s.io", "Ebs.CSI.aws.com", "a-b.c9"] {
            assert!(is_driver_name(ok), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in ["", "-a", "a.", "a_b", "a/b", long.as_str()] {
            assert!(!is_driver_name(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn registration_fills_the_registry_from_the_driver() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeDriver::block_storage("test.csi.minilet.io");
        let sock = serve_driver(dir.path(), fake.clone()).await;
        let registry = Registry::new(Timeouts::default());
        let origin = Origin::Registration {
            socket: dir.path().join("reg.sock"),
        };
        let info = registry
            .register(
                "test.csi.minilet.io",
                sock.to_str().unwrap(),
                origin.clone(),
            )
            .await
            .unwrap();
        assert_eq!(info.vendor_version, "0.1.0");
        assert_eq!(info.node_id, "node-1");
        assert_eq!(info.max_volumes_per_node, 16);
        assert_eq!(
            info.topology
                .get("topology.minilet.io/node")
                .map(String::as_str),
            Some("node-1")
        );
        assert!(info.ready);
        assert!(info.plugin.controller_service);
        assert!(info.node.stage_unstage_volume);
        assert!(info.node.get_volume_stats);
        assert!(!info.node.volume_mount_group);
        assert!(info.controller.create_delete_volume);
        assert!(info.controller.publish_unpublish_volume);
        assert_eq!(
            fake.calls(),
            [
                "GetPluginInfo",
                "GetPluginCapabilities",
                "Probe",
                "NodeGetInfo",
                "NodeGetCapabilities",
                "ControllerGetCapabilities",
            ]
        );
        let (client, got) = registry.driver("test.csi.minilet.io").await.unwrap();
        assert_eq!(got, info);
        assert_eq!(registry.info("test.csi.minilet.io"), Some(info.clone()));
        assert_eq!(client.driver(), "test.csi.minilet.io");
        // Another socket's disappearance does not remove it; its own does,
        // and says so to subscribers (the CSINode task).
        let changes = registry.subscribe();
        assert!(!registry.deregister("test.csi.minilet.io", Path::new("/other.sock")));
        assert!(!changes.has_changed().unwrap());
        assert!(registry.deregister("test.csi.minilet.io", &dir.path().join("reg.sock")));
        assert!(changes.has_changed().unwrap());
        assert!(matches!(
            registry.driver("test.csi.minilet.io").await,
            Err(CsiError::UnknownDriver { .. })
        ));
    }

    #[tokio::test]
    async fn a_node_only_driver_gets_no_controller_call() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeDriver::node_only("node.csi");
        let sock = serve_driver(dir.path(), fake.clone()).await;
        let registry = Registry::new(Timeouts::default());
        let info = registry
            .register("node.csi", sock.to_str().unwrap(), Origin::Config)
            .await
            .unwrap();
        assert!(!info.plugin.controller_service);
        assert_eq!(info.controller, ControllerCapabilities::default());
        assert!(!info.node.stage_unstage_volume);
        assert!(
            !fake
                .calls()
                .contains(&"ControllerGetCapabilities".to_string())
        );
    }

    #[tokio::test]
    async fn a_driver_with_another_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = serve_driver(dir.path(), FakeDriver::block_storage("real.csi")).await;
        let registry = Registry::new(Timeouts::default());
        let err = registry
            .register("other.csi", sock.to_str().unwrap(), Origin::Config)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "CSI driver other.csi: GetPluginInfo: the driver calls itself \"real.csi\""
        );
        assert!(registry.list().is_empty());
    }

    #[tokio::test]
    async fn a_static_driver_is_discovered_on_first_use() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = format!("unix://{}", dir.path().join("csi.sock").display());
        let registry = Registry::new(Timeouts {
            connect: Duration::from_secs(1),
            info: Duration::from_secs(2),
            operation: Duration::from_secs(2),
        });
        registry
            .add_static(&[CsiDriverConfig {
                name: "late.csi".into(),
                endpoint,
            }])
            .unwrap();
        // Not started yet: unavailable, retryable, recorded.
        assert!(registry.info("late.csi").is_none());
        let err = registry.driver("late.csi").await.unwrap_err();
        assert!(matches!(err, CsiError::Unavailable { .. }), "{err}");
        assert!(err.retryable());
        assert!(registry.list()[0].1.last_error.is_some());
        serve_driver(dir.path(), FakeDriver::block_storage("late.csi")).await;
        let (_, info) = registry.driver("late.csi").await.unwrap();
        assert_eq!(info.name, "late.csi");
        assert!(registry.list()[0].1.last_error.is_none());
    }
}
