//! CSI: the gRPC client minilet uses to talk to CSI drivers, the typed
//! errors their answers map to, the registry of known drivers, and kubelet's
//! plugin registration (a watcher on `<root>/plugins_registry/`).
//!
//! The wire types are generated from `proto/csi.proto` (CSI v1.12.0) and
//! `proto/pluginregistration.proto` (kubelet's registration API v1) by
//! build.rs, with clients and servers, as [`proto`]; the test driver crate
//! (integration/csi-driver) serves them too.
//!
//! - `client`: `CsiClient`, one driver's typed calls with timeouts.
//! - `error`: `CsiError` and `Call`; gRPC codes mapped once, `retryable()`.
//! - `drivers`: `Registry` of known drivers and `discover`.
//! - `controller`: the drivers' controller calls as `volume::provision`'s
//!   `Provisioner`.
//! - `node`: the drivers' node calls as `volume::csi`'s `NodeService`.
//! - `registration`: the `plugins_registry/` watcher and its handshake.

pub mod client;
pub mod controller;
pub mod drivers;
pub mod error;
#[cfg(test)]
pub(crate) mod fake;
pub mod node;
pub mod registration;

pub use client::{CsiClient, Timeouts, socket_path};
pub use drivers::{
    ControllerCapabilities, Driver, DriverInfo, NodeCapabilities, Origin, PluginCapabilities,
    Registry, discover, is_driver_name,
};
pub use error::{Call, CsiError};
pub use registration::{RegistrationError, registry_dir};

use std::sync::Arc;
use std::time::Duration;

/// How often the registration watcher rescans `plugins_registry/` besides
/// its inotify events (and so retries failed handshakes).
pub const REGISTRATION_RESCAN: Duration = Duration::from_secs(10);

/// The agent's registry: the config's `csiDrivers`, undiscovered (each is
/// discovered on first use). The lead's wiring runs, beside it,
/// `registration::watch(registry_dir(&cfg.state_dir), registry.clone(),
/// REGISTRATION_RESCAN, cancel)`.
pub fn registry_for(cfg: &crate::config::Config) -> Result<Arc<Registry>, CsiError> {
    let registry = Registry::new(Timeouts {
        operation: cfg.csi_operation_timeout,
        ..Timeouts::default()
    });
    registry.add_static(&cfg.csi_drivers)?;
    Ok(Arc::new(registry))
}

/// Generated code (prost messages, tonic clients and servers).
pub mod proto {
    /// CSI v1 (`package csi.v1`): Identity, Controller and Node services.
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod csi {
        tonic::include_proto!("csi.v1");
    }
    /// kubelet's plugin registration API v1 (`package pluginregistration`).
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod registration {
        tonic::include_proto!("pluginregistration");
    }
}
