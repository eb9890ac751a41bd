//! The API server client and the node's identity, as kubelet has them:
//! credentials from `--kubeconfig` (kubelet's flag); without it, the
//! in-cluster service account when its environment is there
//! (KUBERNETES_SERVICE_HOST and the token file: kubelet has no in-cluster
//! mode, but minilet run as a pod of a kind-style cluster needs one, and
//! that environment is never there by accident); without either, static
//! pods only (`connect` returns `None`).
//!
//! Credentials are loaded and checked before anything starts: a kubeconfig
//! that is missing, unreadable or incomplete is one startup error naming
//! the file. The server itself may be away at start (kubelet starts anyway
//! and so do we): `/version` and discovery are asked once at connect and
//! again by `refresh` when the server answers later.
//!
//! With `--bootstrap-kubeconfig` (TLS bootstrap, `api::bootstrap`) the
//! client's credentials live in a `ClientSlot`: the `--kubeconfig` written
//! by an earlier bootstrap when its certificate is still valid, else none
//! yet. The client hands every request to the credentials in use; a
//! request made while there are none waits for them a few seconds, then
//! fails as if the server were away: the API tasks start as usual and
//! retry, while static pods run.
//!
//! Side effects: reads the kubeconfig (and the files it names) or the
//! service account files; GET /version, /api, /apis.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use tracing::{info, warn};

use crate::config::Config;
use crate::locks::lock;

/// Where the in-cluster service account token lives (client-go's path).
pub const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Why the API server client could not be set up. Each is one startup line.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig file could not be read or parsed.
    #[error("kubeconfig {}: cannot load it", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    /// The kubeconfig was read but holds no usable context, cluster or
    /// credentials (a missing CA file, a bad server URL...).
    #[error("kubeconfig {}: invalid", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    /// The in-cluster environment is there but incomplete.
    #[error("in-cluster config (KUBERNETES_SERVICE_HOST is set)")]
    InCluster {
        #[source]
        source: kube::config::InClusterError,
    },
    /// `--bootstrap-kubeconfig` names no usable cluster.
    #[error("bootstrap kubeconfig {}: {reason}", path.display())]
    Bootstrap { path: PathBuf, reason: String },
    /// The HTTP client could not be built: the TLS identity (client
    /// certificate and key) or the CA roots are unreadable or bad.
    #[error("{credentials}: cannot build a client for {server}")]
    Build {
        /// "kubeconfig PATH" or "in-cluster config".
        credentials: String,
        server: String,
        #[source]
        source: kube::Error,
    },
}

/// Where the credentials come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credentials {
    /// `--kubeconfig PATH`.
    Kubeconfig(PathBuf),
    /// The pod's service account (KUBERNETES_SERVICE_HOST + token file).
    InCluster,
}

/// The mode the environment selects: a kubeconfig flag wins; the
/// in-cluster environment next; else `None` (static pods only). Pure, so
/// the rule is tested without an environment.
pub fn credentials(
    kubeconfig: Option<&Path>,
    service_host: Option<&str>,
    token_present: bool,
) -> Option<Credentials> {
    match (kubeconfig, service_host) {
        (Some(p), _) => Some(Credentials::Kubeconfig(p.to_path_buf())),
        (None, Some(h)) if !h.is_empty() && token_present => Some(Credentials::InCluster),
        _ => None,
    }
}

/// How long the server keeps one watch request open; the watcher then
/// resumes from its last resourceVersion (no relist). Short enough that a
/// watch never sits silent past `READ_TIMEOUT`.
pub const WATCH_TIMEOUT_SECS: u32 = 60;
/// A connection that delivers nothing for this long is dropped (kube-rs'
/// default is 295 s). kubelet gets the same from HTTP/2 health pings: a
/// connection that died without a reset (the node cut off from the network)
/// would otherwise hold the node's watches for minutes after it is back.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(75);

/// A watch of minilet's: the server ends it after `WATCH_TIMEOUT_SECS`.
pub fn watch_config() -> kube::runtime::watcher::Config {
    kube::runtime::watcher::Config::default().timeout(WATCH_TIMEOUT_SECS)
}

/// Loads a kube-rs client config from `creds`: every file it names read
/// and checked now, with minilet's read timeout.
pub async fn load(creds: &Credentials) -> Result<kube::Config, ClientError> {
    let mut config = load_credentials(creds).await?;
    config.read_timeout = Some(READ_TIMEOUT);
    Ok(config)
}

async fn load_credentials(creds: &Credentials) -> Result<kube::Config, ClientError> {
    match creds {
        Credentials::Kubeconfig(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| ClientError::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            let invalid = |source| ClientError::Invalid {
                path: path.clone(),
                source,
            };
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(invalid)
        }
        Credentials::InCluster => {
            kube::Config::incluster().map_err(|source| ClientError::InCluster { source })
        }
    }
}

/// What the server said about itself; filled at connect or later.
#[derive(Debug, Default)]
struct ServerInfo {
    /// gitVersion from /version, e.g. "v1.20.2".
    version: Option<String>,
    /// Every group/version the server serves ("v1", "events.k8s.io/v1").
    apis: Option<BTreeSet<String>>,
    /// APIs already reported missing (one line each, once).
    reported: BTreeSet<String>,
}

/// The client, the node's name and what the server serves. Cheap to clone.
#[derive(Clone)]
pub struct ApiClient {
    pub client: kube::Client,
    /// The Node this agent is (kubelet's node name; the Node authorizer
    /// lets it touch only objects of this node).
    pub node_name: String,
    /// The server URL, for messages.
    pub server: String,
    info: Arc<Mutex<ServerInfo>>,
    /// TLS bootstrap and rotation, when `--bootstrap-kubeconfig` is set:
    /// the agent runs `api::bootstrap::run` with it.
    pub certificates: Option<Arc<crate::api::bootstrap::Setup>>,
}

/// The credentials a bootstrapping node's client uses, swapped when a new
/// certificate is issued. Cheap to clone; every clone is the same slot.
#[derive(Clone)]
pub struct ClientSlot(Arc<tokio::sync::watch::Sender<Option<kube::Client>>>);

impl Default for ClientSlot {
    fn default() -> Self {
        ClientSlot(Arc::new(tokio::sync::watch::Sender::new(None)))
    }
}

impl ClientSlot {
    pub fn is_set(&self) -> bool {
        self.0.borrow().is_some()
    }

    /// The client with the credentials in use, if any yet.
    pub fn current(&self) -> Option<kube::Client> {
        self.0.borrow().clone()
    }

    /// Builds a client from `kubeconfig` and puts it in use. New
    /// connections present the new certificate; open ones finish with the
    /// old (still valid) one.
    pub async fn load(&self, kubeconfig: &Path) -> Result<(), ClientError> {
        let config = load(&Credentials::Kubeconfig(kubeconfig.to_path_buf())).await?;
        let server = config.cluster_url.to_string();
        let client = kube::Client::try_from(config).map_err(|e| ClientError::Build {
            credentials: format!("kubeconfig {}", kubeconfig.display()),
            server,
            source: e,
        })?;
        self.0.send_replace(Some(client));
        Ok(())
    }

    /// A client whose every request goes out with the credentials in use,
    /// waiting while there are none.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(SlotService(self.clone()), "default")
    }
}

/// How long a request waits for credentials before it fails (and its
/// caller retries as for a server away).
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The tower service behind `ClientSlot::client`.
#[derive(Clone)]
struct SlotService(ClientSlot);

impl tower::Service<http::Request<kube::client::Body>> for SlotService {
    type Response = http::Response<kube::client::Body>;
    type Error = kube::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, kube::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), kube::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let mut rx = (self.0).0.subscribe();
        Box::pin(async move {
            // Bounded: a caller that is not cancellable (a final flush at
            // shutdown) must not hang on a bootstrap that never succeeds.
            let client = match tokio::time::timeout(SLOT_WAIT, rx.wait_for(Option::is_some)).await {
                Ok(Ok(c)) => c.clone(),
                _ => None,
            };
            match client {
                Some(c) => c.send(req).await,
                None => Err(kube::Error::Service(
                    "no client certificate yet: the TLS bootstrap is still waiting (see its warnings)".into(),
                )),
            }
        })
    }
}

/// Where the cluster is and how it is trusted, from a kubeconfig's current
/// context (for the kubeconfig a bootstrap writes).
pub fn cluster_of(path: &Path) -> Result<crate::api::pki::Cluster, ClientError> {
    let bad = |reason: String| ClientError::Bootstrap {
        path: path.to_path_buf(),
        reason,
    };
    let kc = Kubeconfig::read_from(path).map_err(|source| ClientError::Kubeconfig {
        path: path.to_path_buf(),
        source,
    })?;
    let context = kc
        .current_context
        .as_deref()
        .and_then(|name| kc.contexts.iter().find(|c| c.name == name))
        .or(kc.contexts.first())
        .and_then(|c| c.context.as_ref());
    let cluster = match context {
        Some(ctx) => kc.clusters.iter().find(|c| c.name == ctx.cluster),
        None => kc.clusters.first(),
    }
    .and_then(|c| c.cluster.as_ref())
    .ok_or_else(|| bad("no cluster in its current context".into()))?;
    let server = cluster
        .server
        .clone()
        .ok_or_else(|| bad("its cluster has no server".into()))?;
    let ca_pem = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(data), _) => {
            use base64::Engine;
            Some(
                base64::engine::general_purpose::STANDARD
                    .decode(data.trim())
                    .map_err(|e| bad(format!("certificate-authority-data is not base64 ({e})")))?,
            )
        }
        (None, Some(file)) => Some(std::fs::read(file).map_err(|e| {
            bad(format!(
                "certificate-authority {file}: cannot read it ({e})"
            ))
        })?),
        (None, None) => None,
    };
    Ok(crate::api::pki::Cluster {
        server,
        ca_pem,
        insecure: cluster.insecure_skip_tls_verify.unwrap_or(false),
    })
}

/// Whether `path` is a kubeconfig whose client certificate is valid at
/// `now` (kubelet's test before it bootstraps again).
pub fn has_valid_certificate(path: &Path, now: i64) -> bool {
    certificate_of(path).is_some_and(|c| c.valid_at(now))
}

/// The client certificate a kubeconfig's current user presents, if it has
/// one that parses.
pub fn certificate_of(path: &Path) -> Option<crate::api::pki::CertInfo> {
    let kc = Kubeconfig::read_from(path).ok()?;
    let user = kc
        .current_context
        .as_deref()
        .and_then(|name| kc.contexts.iter().find(|c| c.name == name))
        .and_then(|c| c.context.as_ref())
        .and_then(|c| c.user.clone());
    let auth = kc
        .auth_infos
        .iter()
        .find(|a| user.as_deref().is_none_or(|u| a.name == u))
        .and_then(|a| a.auth_info.as_ref());
    let pem = match auth {
        Some(a) => match (&a.client_certificate_data, &a.client_certificate) {
            (Some(data), _) => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(data.trim())
                    .ok()
            }
            (None, Some(file)) => std::fs::read(file).ok(),
            (None, None) => None,
        },
        None => None,
    };
    pem.and_then(|p| crate::api::pki::parse_cert(&p, path).ok())
}

/// TLS bootstrap mode: the client over a `ClientSlot`, filled now from
/// `--kubeconfig` when its certificate is valid, else by the bootstrap.
async fn connect_bootstrapping(cfg: &Config, bootstrap: &Path) -> Result<ApiClient, ClientError> {
    let kubeconfig = cfg.kubeconfig.clone().unwrap_or_default();
    let cluster = cluster_of(bootstrap)?;
    let bconfig = load(&Credentials::Kubeconfig(bootstrap.to_path_buf())).await?;
    let bclient = kube::Client::try_from(bconfig).map_err(|e| ClientError::Build {
        credentials: format!("bootstrap kubeconfig {}", bootstrap.display()),
        server: cluster.server.clone(),
        source: e,
    })?;
    let slot = ClientSlot::default();
    let now = jiff::Timestamp::now().as_second();
    if has_valid_certificate(&kubeconfig, now)
        && let Err(e) = slot.load(&kubeconfig).await
    {
        warn!(error = %crate::error_chain(&e), "the written kubeconfig does not load; bootstrapping again");
    }
    if slot.is_set() {
        info!(kubeconfig = %kubeconfig.display(), "client certificate from an earlier bootstrap is valid: using it");
    } else {
        info!(bootstrap_kubeconfig = %bootstrap.display(), server = %cluster.server, "no valid client certificate: TLS bootstrap; the API tasks wait for it, static pods run");
    }
    let server = cluster.server.clone();
    let setup = crate::api::bootstrap::Setup {
        node: cfg.node_name.clone(),
        cert_dir: cfg.cert_dir.clone(),
        kubeconfig,
        cluster,
        bootstrap: Some(crate::api::bootstrap::BootstrapClient {
            path: bootstrap.to_path_buf(),
            client: bclient,
        }),
        rotate: cfg.rotate_certificates,
        credentials: slot.clone(),
    };
    Ok(ApiClient {
        client: slot.client(),
        node_name: cfg.node_name.clone(),
        server,
        info: Arc::default(),
        certificates: Some(Arc::new(setup)),
    })
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("node_name", &self.node_name)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// Sets up the API client from `cfg`, or `None` for static pods only.
/// Fails only on bad credentials; an unreachable server is logged and
/// left to the tasks that use the client (they retry).
pub async fn connect(cfg: &Config) -> Result<Option<ApiClient>, ClientError> {
    // kube-rs builds rustls with the process-wide provider: ring is the one
    // compiled in. Err means one is installed already, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(bootstrap) = &cfg.bootstrap_kubeconfig {
        let api = connect_bootstrapping(cfg, bootstrap).await?;
        let ready = api
            .certificates
            .as_ref()
            .is_some_and(|c| c.credentials.is_set());
        if ready && let Err(e) = api.refresh().await {
            warn!(server = %api.server, error = %describe(&e), "api server not reachable yet; the node and pod tasks retry");
        }
        return Ok(Some(api));
    }
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
    let token = Path::new(SERVICE_ACCOUNT_TOKEN).exists();
    let Some(creds) = credentials(cfg.kubeconfig.as_deref(), host.as_deref(), token) else {
        info!("no --kubeconfig and no in-cluster service account: static pods only");
        return Ok(None);
    };
    let config = load(&creds).await?;
    let server = config.cluster_url.to_string();
    let source = match &creds {
        Credentials::Kubeconfig(p) => format!("kubeconfig {}", p.display()),
        Credentials::InCluster => "in-cluster config".into(),
    };
    // Building reads the client certificate and key: a missing key file is
    // a startup error here, not a TLS failure later.
    let client = kube::Client::try_from(config).map_err(|e| ClientError::Build {
        credentials: source.clone(),
        server: server.clone(),
        source: e,
    })?;
    let api = ApiClient {
        client,
        node_name: cfg.node_name.clone(),
        server,
        info: Arc::default(),
        certificates: None,
    };
    if let Err(e) = api.refresh().await {
        warn!(server = %api.server, credentials = %source, error = %describe(&e), "api server not reachable yet; the node and pod tasks retry");
    }
    Ok(Some(api))
}

impl ApiClient {
    /// A client for tests and tools that build their own kube::Client.
    pub fn new(client: kube::Client, node_name: impl Into<String>) -> Self {
        ApiClient {
            client,
            node_name: node_name.into(),
            server: String::new(),
            info: Arc::default(),
            certificates: None,
        }
    }

    /// GET /version and discovery, unless already known. Logs the server
    /// version in one line the first time it is learnt.
    pub async fn refresh(&self) -> Result<(), kube::Error> {
        if lock(&self.info).apis.is_some() {
            return Ok(());
        }
        let version = self.client.apiserver_version().await?;
        let mut apis: BTreeSet<String> = self
            .client
            .list_core_api_versions()
            .await?
            .versions
            .into_iter()
            .collect();
        for group in self.client.list_api_groups().await?.groups {
            apis.extend(group.versions.into_iter().map(|v| v.group_version));
        }
        info!(server = %self.server, version = %version.git_version, platform = %version.platform, apis = apis.len(), "api server connected");
        let mut info = lock(&self.info);
        info.version = Some(version.git_version);
        info.apis = Some(apis);
        Ok(())
    }

    /// The server's version ("v1.20.2"), once known.
    pub fn server_version(&self) -> Option<String> {
        lock(&self.info).version.clone()
    }

    /// Whether the server is known to lack `api` (a group/version such as
    /// "events.k8s.io/v1", or "v1"). Says so in one line the first time;
    /// the caller says what it does instead. Unknown discovery (the server
    /// was never reached) counts as present: the call itself will tell.
    pub fn server_lacks(&self, api: &str) -> bool {
        let mut info = lock(&self.info);
        let lacks = info.apis.as_ref().is_some_and(|apis| !apis.contains(api));
        if lacks && info.reported.insert(api.to_string()) {
            let version = info.version.clone().unwrap_or_default();
            warn!(server_version = %version, api, "the api server lacks this API");
        }
        lacks
    }

    /// Test hook: pretend discovery found `apis`.
    #[cfg(test)]
    pub(crate) fn set_discovery(&self, version: &str, apis: &[&str]) {
        let mut info = lock(&self.info);
        info.version = Some(version.into());
        info.apis = Some(apis.iter().map(|s| s.to_string()).collect());
    }
}

/// A kube error in one line, without kube's Debug dump: the server's
/// reason and message for API errors, the cause chain otherwise.
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => {
            let reason = if s.reason.is_empty() {
                format!("HTTP {}", s.code)
            } else {
                s.reason.clone()
            };
            format!("{reason}: {}", s.message)
        }
        other => {
            let mut msg = String::new();
            let mut cur: Option<&dyn std::error::Error> = Some(other);
            while let Some(c) = cur {
                // kube and hyper often print their cause in their own
                // message too: say each part once.
                let part = c.to_string();
                if !msg.contains(&part) {
                    if !msg.is_empty() {
                        msg.push_str(": ");
                    }
                    msg.push_str(&part);
                }
                cur = c.source();
            }
            msg
        }
    }
}

/// The server's answer code of an API error (404, 409, 403...).
pub fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_then_in_cluster_then_static_only() {
        let p = Path::new("/etc/kubernetes/kubelet.conf");
        assert_eq!(
            credentials(Some(p), Some("10.96.0.1"), true),
            Some(Credentials::Kubeconfig(p.into()))
        );
        assert_eq!(
            credentials(None, Some("10.96.0.1"), true),
            Some(Credentials::InCluster)
        );
        // Half an in-cluster environment is not one.
        assert_eq!(credentials(None, Some("10.96.0.1"), false), None);
        assert_eq!(credentials(None, Some(""), true), None);
        assert_eq!(credentials(None, None, true), None);
    }

    #[tokio::test]
    async fn a_bad_kubeconfig_is_one_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.conf");
        let err = load(&Credentials::Kubeconfig(missing.clone()))
            .await
            .unwrap_err();
        assert!(
            crate::error_chain(&err)
                .starts_with(&format!("kubeconfig {}: cannot load it", missing.display())),
            "{err}"
        );

        let garbage = dir.path().join("garbage.conf");
        std::fs::write(&garbage, "clusters: [unclosed\n").unwrap();
        let err = load(&Credentials::Kubeconfig(garbage.clone()))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Kubeconfig { .. }), "{err:?}");

        // No current context.
        let noctx = dir.path().join("noctx.conf");
        std::fs::write(&noctx, "apiVersion: v1\nkind: Config\n").unwrap();
        let err = load(&Credentials::Kubeconfig(noctx)).await.unwrap_err();
        assert!(matches!(err, ClientError::Invalid { .. }), "{err:?}");

        // Parses, but names a client key that is not there: connect fails
        // before any request.
        let nokey = dir.path().join("nokey.conf");
        std::fs::write(
            &nokey,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443', insecure-skip-tls-verify: true}}]\n\
             contexts: [{name: c, context: {cluster: k, user: u}}]\n\
             users: [{name: u, user: {client-certificate: /nonexistent.crt, client-key: /nonexistent.key}}]\n",
        )
        .unwrap();
        let mut cfg = Config::default_for("n1");
        cfg.kubeconfig = Some(nokey.clone());
        let err = connect(&cfg).await.unwrap_err();
        assert!(
            err.to_string()
                == format!(
                    "kubeconfig {}: cannot build a client for https://127.0.0.1:6443/",
                    nokey.display()
                ),
            "{}",
            crate::error_chain(&err)
        );
        assert!(
            crate::error_chain(&err).contains("/nonexistent"),
            "{}",
            crate::error_chain(&err)
        );
    }

    #[tokio::test]
    async fn an_unreachable_server_is_described_in_one_line() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Nothing listens on port 1 of loopback.
        let client =
            kube::Client::try_from(kube::Config::new("https://127.0.0.1:1".parse().unwrap()))
                .unwrap();
        let e = client.apiserver_version().await.unwrap_err();
        let msg = describe(&e);
        assert!(msg.contains("onnection refused"), "{msg}");
        assert_eq!(msg.matches("onnection refused").count(), 1, "{msg}");
        assert_eq!(status_code(&e), None);
        let forbidden = kube::Error::Api(Box::new(
            kube::core::Status::failure("nodes \"x\" is forbidden", "Forbidden").with_code(403),
        ));
        assert_eq!(describe(&forbidden), "Forbidden: nodes \"x\" is forbidden");
        assert_eq!(status_code(&forbidden), Some(403));
    }

    #[tokio::test]
    async fn server_lacks_reads_discovery_and_assumes_presence_before_it() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let api = ApiClient::new(client, "n1");
        assert!(!api.server_lacks("events.k8s.io/v1"), "unknown = present");
        api.set_discovery(
            "v1.20.2",
            &["v1", "events.k8s.io/v1", "coordination.k8s.io/v1"],
        );
        assert!(!api.server_lacks("events.k8s.io/v1"));
        assert!(api.server_lacks("resource.k8s.io/v1"));
        assert!(
            api.server_lacks("resource.k8s.io/v1"),
            "still lacking, said once"
        );
        assert_eq!(api.server_version().as_deref(), Some("v1.20.2"));
    }
}
