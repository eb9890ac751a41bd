//! From a pod's `persistentVolumeClaim` volume to the PersistentVolume it is
//! bound to: the lookup the CSI volume plugin asks before it stages a
//! claim's volume. Standalone, `provision::Claims` answers (the binder's
//! view, and ControllerPublishVolume when the driver wants it); in API
//! server mode [`LookupResolver`] reads the claim and the volume through
//! the object lookup (the cluster's controllers bind, provision and
//! attach).
//!
//! Errors read like kubelet's and the scheduler's
//! (`persistentvolumeclaim "x" not found`,
//! `PersistentVolumeClaim "x" is not bound`), so a pod's reason says what
//! it waits for.
//!
//! Side effects: none here (lookups; see `provision` for the standalone one).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};

use crate::objects::{LookupError, ObjectLookup};

/// A claim and what it is bound to.
#[derive(Clone, Debug)]
pub struct ResolvedClaim {
    pub claim: Arc<PersistentVolumeClaim>,
    pub volume: Arc<PersistentVolume>,
    /// ControllerPublishVolume's publish_context (empty when the driver
    /// does not publish, and in API server mode).
    pub publish_context: BTreeMap<String, String>,
}

/// Why a claim's volume cannot be had now. All are retried by the caller
/// (the claim may appear, bind, or its driver come back).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// No such claim in the pod's namespace.
    #[error("persistentvolumeclaim {name:?} not found")]
    NotFound { namespace: String, name: String },
    /// The claim exists but is not Bound; `reason` says what it waits for.
    #[error("PersistentVolumeClaim {name:?} is not bound{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    NotBound {
        namespace: String,
        name: String,
        reason: Option<String>,
    },
    /// The claim names a volume that does not exist.
    #[error("persistentvolume {volume:?} (of claim {claim:?}) not found")]
    VolumeNotFound { claim: String, volume: String },
    /// The object source cannot answer now.
    #[error(transparent)]
    Lookup(LookupError),
    /// ControllerPublishVolume failed.
    #[error("ControllerPublishVolume of volume {volume:?} on driver {driver:?}: {message}")]
    Publish {
        driver: String,
        volume: String,
        message: String,
    },
}

/// The seam the CSI volume plugin calls.
pub trait ClaimResolver: Send + Sync {
    /// The volume bound to claim `name` in `namespace`, published to this
    /// node when its driver needs that. `readonly`: the pod's volume says
    /// readOnly (passed to ControllerPublishVolume). Idempotent.
    fn resolve<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        readonly: bool,
    ) -> BoxFuture<'a, Result<ResolvedClaim, ClaimError>>;
}

/// The claim's bound volume name, or why it has none.
pub fn bound_volume(
    pvc: &PersistentVolumeClaim,
    reason: Option<String>,
) -> Result<String, ClaimError> {
    let phase = pvc.status.as_ref().and_then(|s| s.phase.as_deref());
    let volume = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|v| !v.is_empty());
    match (phase, volume) {
        (Some("Bound"), Some(v)) => Ok(v),
        _ => Err(ClaimError::NotBound {
            namespace: pvc.metadata.namespace.clone().unwrap_or_default(),
            name: pvc.metadata.name.clone().unwrap_or_default(),
            reason,
        }),
    }
}

/// API server mode: the claim and volume as the cluster has them.
pub struct LookupResolver {
    pub objects: Arc<dyn ObjectLookup>,
}

impl ClaimResolver for LookupResolver {
    fn resolve<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        _readonly: bool,
    ) -> BoxFuture<'a, Result<ResolvedClaim, ClaimError>> {
        Box::pin(async move {
            let claim = match self.objects.persistent_volume_claim(namespace, name).await {
                Ok(c) => c,
                Err(LookupError::NotFound(_)) => {
                    return Err(ClaimError::NotFound {
                        namespace: namespace.into(),
                        name: name.into(),
                    });
                }
                Err(e) => return Err(ClaimError::Lookup(e)),
            };
            let volume = bound_volume(&claim, None)?;
            let pv = match self.objects.persistent_volume(&volume).await {
                Ok(v) => v,
                Err(LookupError::NotFound(_)) => {
                    return Err(ClaimError::VolumeNotFound {
                        claim: name.into(),
                        volume,
                    });
                }
                Err(e) => return Err(ClaimError::Lookup(e)),
            };
            Ok(ResolvedClaim {
                claim,
                volume: pv,
                publish_context: BTreeMap::new(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{ObjectStore, Objects};

    #[tokio::test]
    async fn api_mode_reads_the_claim_and_its_volume() {
        let store = ObjectStore::default();
        let mut o = Objects::default();
        let claim = |phase: &str, volume: &str| -> Arc<PersistentVolumeClaim> {
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "data", "namespace": "default"},
                    "spec": {"volumeName": volume},
                    "status": {"phase": phase},
                }))
                .unwrap(),
            )
        };
        o.claims
            .insert(("default".into(), "data".into()), claim("Pending", ""));
        store.replace(o.clone());
        let r = LookupResolver {
            objects: Arc::new(store.clone()),
        };
        let e = r.resolve("default", "nope", false).await.unwrap_err();
        assert_eq!(e.to_string(), "persistentvolumeclaim \"nope\" not found");
        let e = r.resolve("default", "data", false).await.unwrap_err();
        assert_eq!(e.to_string(), "PersistentVolumeClaim \"data\" is not bound");
        o.claims
            .insert(("default".into(), "data".into()), claim("Bound", "pv1"));
        store.replace(o.clone());
        let e = r.resolve("default", "data", false).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "persistentvolume \"pv1\" (of claim \"data\") not found"
        );
        o.volumes.insert(
            (String::new(), "pv1".into()),
            Arc::new(
                serde_json::from_value(serde_json::json!({"metadata": {"name": "pv1"}})).unwrap(),
            ),
        );
        store.replace(o);
        let got = r.resolve("default", "data", false).await.unwrap();
        assert_eq!(got.volume.metadata.name.as_deref(), Some("pv1"));
        assert!(got.publish_context.is_empty());
    }
}
