//! Service account tokens for projected volumes, through the TokenRequest
//! API (`serviceaccounts/<name>/token`; the Node authorizer allows it for a
//! service account of a pod bound to this node, with the token bound to
//! that pod's name and uid). Tokens are cached per request and refreshed as
//! kubelet's token manager does: once 80% of their lifetime has passed, or
//! 24 h after they were issued, whichever comes first; if a refresh fails
//! while the cached token is still valid, the cached one is served.
//!
//! Side effects: create requests to the API server (`get`).

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::warn;

use crate::locks::lock;

/// kubelet's `maxTTL`: a token older than this is refreshed whatever its
/// expiry.
pub const MAX_TTL: jiff::SignedDuration = jiff::SignedDuration::from_hours(24);

/// What a token is requested for (the cache key).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub namespace: String,
    pub service_account: String,
    pub audiences: Vec<String>,
    /// Requested lifetime (a projected volume's `expirationSeconds`,
    /// default 3600; the server may grant another).
    pub expiration_seconds: i64,
    pub pod_name: String,
    pub pod_uid: String,
}

/// A token the server issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub token: String,
    pub expires: jiff::Timestamp,
    /// The lifetime the server granted (its `spec.expirationSeconds`).
    pub lifetime_seconds: i64,
}

impl Token {
    /// When it was issued (kubelet: expiry minus the granted lifetime).
    pub fn issued(&self) -> jiff::Timestamp {
        self.expires
            .saturating_sub(jiff::SignedDuration::from_secs(self.lifetime_seconds))
            .unwrap_or(self.expires)
    }
}

/// kubelet's `requiresRefresh` (without its jitter): past 80% of the
/// lifetime, or older than 24 h, or expired.
pub fn requires_refresh(now: jiff::Timestamp, t: &Token) -> bool {
    let issued = t.issued();
    let age_limit = issued.saturating_add(MAX_TTL).unwrap_or(t.expires);
    let early = jiff::SignedDuration::from_secs(t.lifetime_seconds * 20 / 100);
    let refresh_at = t.expires.saturating_sub(early).unwrap_or(t.expires);
    now >= t.expires || now > age_limit || now > refresh_at
}

/// Why a token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "request a token for service account {namespace}/{service_account}: {}",
        crate::error_chain(cause)
    )]
    Request {
        namespace: String,
        service_account: String,
        /// Not a `#[source]`: its chain is in the message already.
        cause: kube::Error,
    },
    #[error("the server returned no token for service account {namespace}/{service_account}")]
    Empty {
        namespace: String,
        service_account: String,
    },
}

/// The token fetcher with its cache.
pub struct Tokens {
    client: Client,
    cache: Mutex<HashMap<TokenKey, Token>>,
}

impl Tokens {
    pub fn new(client: Client) -> Self {
        Tokens {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// A valid token for `key`: the cached one unless it needs a refresh.
    pub async fn get(&self, key: &TokenKey) -> Result<Token, TokenError> {
        let now = jiff::Timestamp::now();
        let cached = lock(&self.cache).get(key).cloned();
        if let Some(t) = &cached
            && !requires_refresh(now, t)
        {
            return Ok(t.clone());
        }
        match self.request(key).await {
            Ok(t) => {
                lock(&self.cache).insert(key.clone(), t.clone());
                Ok(t)
            }
            Err(e) => match cached {
                Some(t) if now < t.expires => {
                    warn!(error = %e, "token refresh failed; serving the cached token");
                    Ok(t)
                }
                _ => Err(e),
            },
        }
    }

    /// Forget the tokens of a pod that is gone.
    pub fn forget_pod(&self, pod_uid: &str) {
        lock(&self.cache).retain(|k, _| k.pod_uid != pod_uid);
    }

    async fn request(&self, key: &TokenKey) -> Result<Token, TokenError> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &key.namespace);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: key.audiences.clone(),
                expiration_seconds: Some(key.expiration_seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(key.pod_name.clone()),
                    uid: Some(key.pod_uid.clone()),
                }),
            },
            ..Default::default()
        };
        let got = api
            .create_token_request(&key.service_account, &PostParams::default(), &req)
            .await
            .map_err(|cause| TokenError::Request {
                namespace: key.namespace.clone(),
                service_account: key.service_account.clone(),
                cause,
            })?;
        let status =
            got.status
                .filter(|s| !s.token.is_empty())
                .ok_or_else(|| TokenError::Empty {
                    namespace: key.namespace.clone(),
                    service_account: key.service_account.clone(),
                })?;
        Ok(Token {
            token: status.token,
            expires: status.expiration_timestamp.0,
            lifetime_seconds: got
                .spec
                .expiration_seconds
                .unwrap_or(key.expiration_seconds),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn refresh_at_80_percent_of_the_lifetime_or_after_a_day() {
        // An hour-long token issued at 0: refreshed after 48 minutes.
        let hour = Token {
            token: "t".into(),
            expires: at(3600),
            lifetime_seconds: 3600,
        };
        assert_eq!(hour.issued(), at(0));
        assert!(!requires_refresh(at(0), &hour));
        assert!(!requires_refresh(at(2880), &hour));
        assert!(requires_refresh(at(2881), &hour));
        assert!(requires_refresh(at(4000), &hour), "expired");
        // A week-long token: the 24 h cap comes first.
        let week = Token {
            token: "t".into(),
            expires: at(7 * 86400),
            lifetime_seconds: 7 * 86400,
        };
        assert!(!requires_refresh(at(86400), &week));
        assert!(requires_refresh(at(86401), &week));
    }
}
