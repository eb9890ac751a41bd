//! Test doubles: a CSI driver that records every node call, keeps the
//! spec's order rules (publish of a staging driver's volume before it is
//! staged is FailedPrecondition; undo calls are idempotent) and can be told
//! to fail a call; a host whose mount table is what that driver mounted;
//! a claim resolver from a map.
//!
//! Side effects: the driver creates and removes publish target dirs, as a
//! real driver does.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::PersistentVolume;

use super::node::*;
use super::{ChangePolicy, ClaimResolver, HostFs};
use crate::locks::lock;
use crate::volume::resolve::{ClaimError, ResolvedClaim};

/// One recorded call.
#[derive(Clone, Debug, PartialEq)]
pub enum Recorded {
    Stage(StageRequest),
    Unstage(UnstageRequest),
    Publish(PublishRequest),
    Unpublish(UnpublishRequest),
}

impl Recorded {
    pub fn call(&self) -> Call {
        match self {
            Recorded::Stage(_) => Call::NodeStageVolume,
            Recorded::Unstage(_) => Call::NodeUnstageVolume,
            Recorded::Publish(_) => Call::NodePublishVolume,
            Recorded::Unpublish(_) => Call::NodeUnpublishVolume,
        }
    }
}

/// The host: mount points are what the fake driver mounted.
#[derive(Default)]
pub struct FakeHost {
    pub mounts: Mutex<BTreeSet<PathBuf>>,
    pub ownership: Mutex<Vec<(PathBuf, u32, bool, ChangePolicy)>>,
}

impl HostFs for FakeHost {
    fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
        Ok(lock(&self.mounts).contains(path))
    }
    fn set_ownership(&self, dir: &Path, gid: u32, ro: bool, p: ChangePolicy) -> io::Result<()> {
        lock(&self.ownership).push((dir.to_path_buf(), gid, ro, p));
        Ok(())
    }
}

pub struct FakeDriver {
    pub caps: Mutex<Capabilities>,
    pub policy: Mutex<DriverPolicy>,
    pub calls: Mutex<Vec<(String, Recorded)>>,
    /// Calls that fail, with this code, until removed.
    pub fail: Mutex<HashMap<Call, tonic::Code>>,
    pub host: Arc<FakeHost>,
    /// Volumes the driver has staged, by id.
    staged: Mutex<BTreeMap<String, PathBuf>>,
}

impl FakeDriver {
    pub fn new(host: Arc<FakeHost>, caps: Capabilities) -> FakeDriver {
        FakeDriver {
            caps: Mutex::new(caps),
            policy: Mutex::new(DriverPolicy::default()),
            calls: Mutex::default(),
            fail: Mutex::default(),
            host,
            staged: Mutex::default(),
        }
    }

    /// The recorded calls' names, in order.
    pub fn names(&self) -> Vec<Call> {
        lock(&self.calls).iter().map(|(_, r)| r.call()).collect()
    }

    pub fn count(&self, call: Call) -> usize {
        self.names().into_iter().filter(|c| *c == call).count()
    }

    pub fn publishes(&self) -> Vec<PublishRequest> {
        lock(&self.calls)
            .iter()
            .filter_map(|(_, r)| match r {
                Recorded::Publish(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    fn err(driver: &str, call: Call, code: tonic::Code, message: &str) -> NodeError {
        NodeError::Rpc {
            driver: driver.into(),
            call,
            code,
            message: message.into(),
        }
    }

    /// Record, yield (so concurrent callers interleave here, as over gRPC),
    /// then the scripted failure if any.
    async fn enter(&self, driver: &str, r: Recorded) -> Result<(), NodeError> {
        let call = r.call();
        lock(&self.calls).push((driver.to_string(), r));
        tokio::task::yield_now().await;
        match lock(&self.fail).get(&call) {
            Some(code) => Err(Self::err(driver, call, *code, "injected")),
            None => Ok(()),
        }
    }
}

impl NodeService for FakeDriver {
    fn capabilities<'a>(&'a self, _d: &'a str) -> BoxFuture<'a, Result<Capabilities, NodeError>> {
        let caps = *lock(&self.caps);
        Box::pin(async move { Ok(caps) })
    }
    fn policy<'a>(&'a self, _d: &'a str) -> BoxFuture<'a, Result<DriverPolicy, NodeError>> {
        let p = *lock(&self.policy);
        Box::pin(async move { Ok(p) })
    }
    fn node_stage<'a>(
        &'a self,
        d: &'a str,
        req: &'a StageRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            self.enter(d, Recorded::Stage(req.clone())).await?;
            if !req.staging_target_path.is_dir() {
                return Err(Self::err(
                    d,
                    Call::NodeStageVolume,
                    tonic::Code::InvalidArgument,
                    "no staging dir",
                ));
            }
            let mut staged = lock(&self.staged);
            match staged.get(&req.volume_id) {
                Some(p) if *p != req.staging_target_path => {
                    return Err(Self::err(
                        d,
                        Call::NodeStageVolume,
                        tonic::Code::AlreadyExists,
                        "staged elsewhere",
                    ));
                }
                _ => {}
            }
            staged.insert(req.volume_id.clone(), req.staging_target_path.clone());
            lock(&self.host.mounts).insert(req.staging_target_path.clone());
            Ok(())
        })
    }
    fn node_unstage<'a>(
        &'a self,
        d: &'a str,
        req: &'a UnstageRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            self.enter(d, Recorded::Unstage(req.clone())).await?;
            lock(&self.staged).remove(&req.volume_id);
            lock(&self.host.mounts).remove(&req.staging_target_path);
            Ok(())
        })
    }
    fn node_publish<'a>(
        &'a self,
        d: &'a str,
        req: &'a PublishRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            self.enter(d, Recorded::Publish(req.clone())).await?;
            let staged = lock(&self.staged).get(&req.volume_id).cloned();
            if req.staging_target_path.is_some() && req.staging_target_path != staged {
                return Err(Self::err(
                    d,
                    Call::NodePublishVolume,
                    tonic::Code::FailedPrecondition,
                    "not staged",
                ));
            }
            // The CO makes the parent, the driver the target.
            std::fs::create_dir_all(&req.target_path).map_err(|e| {
                Self::err(
                    d,
                    Call::NodePublishVolume,
                    tonic::Code::Internal,
                    &e.to_string(),
                )
            })?;
            lock(&self.host.mounts).insert(req.target_path.clone());
            Ok(())
        })
    }
    fn node_unpublish<'a>(
        &'a self,
        d: &'a str,
        req: &'a UnpublishRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            self.enter(d, Recorded::Unpublish(req.clone())).await?;
            lock(&self.host.mounts).remove(&req.target_path);
            // The spec: the driver deletes the target it made.
            let _ = std::fs::remove_dir(&req.target_path);
            Ok(())
        })
    }
}

/// Claims → PVs, by (namespace, claim); a publish_context for every PV.
#[derive(Default)]
pub struct FakeClaims {
    pub bound: Mutex<BTreeMap<(String, String), Arc<PersistentVolume>>>,
    pub publish_context: Mutex<BTreeMap<String, String>>,
}

impl ClaimResolver for FakeClaims {
    fn resolve<'a>(
        &'a self,
        ns: &'a str,
        claim: &'a str,
        _readonly: bool,
    ) -> BoxFuture<'a, Result<ResolvedClaim, ClaimError>> {
        let r = lock(&self.bound)
            .get(&(ns.to_string(), claim.to_string()))
            .cloned()
            .map(|volume| ResolvedClaim {
                claim: Default::default(),
                volume,
                publish_context: lock(&self.publish_context).clone(),
            })
            .ok_or_else(|| ClaimError::NotFound {
                namespace: ns.into(),
                name: claim.into(),
            });
        Box::pin(async move { r })
    }
}
