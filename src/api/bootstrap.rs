//! TLS bootstrap and client certificate rotation, as kubelet does them
//! (`--bootstrap-kubeconfig`, `rotateCertificates`): the node makes a key,
//! sends a CertificateSigningRequest for the
//! `kubernetes.io/kube-apiserver-client-kubelet` signer with CN
//! `system:node:<name>` and O `system:nodes`, waits for the cluster to
//! approve and sign it, and puts the certificate in use (`api::pki`: the
//! cert dir, the kubeconfig it writes) without a restart: the API client's
//! credentials are swapped under it (`api::client::Credentials`).
//!
//! One task (`run`) does both jobs: with no valid certificate it asks with
//! the bootstrap kubeconfig's token; with one, it sleeps until kubelet's
//! rotation deadline (70–90 % of the lifetime) and asks with the node's own
//! certificate. A refused token, a denied request or a server away is one
//! clear warning and a retry with backoff; meanwhile nothing else waits on
//! it but the API tasks (static pods run).
//!
//! The CSR's name is a digest of the key, the subject and the usages
//! (kubelet's `node-csr-…`), and the key is on disk before the request is
//! sent: an agent killed while it waits finds its own request again.
//!
//! Side effects: CSR create and get (through `CsrApi`), the cert dir and the
//! kubeconfig file.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec, CertificateSigningRequestStatus,
};
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::KeyPair;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::pki::{self, CertInfo, PkiError};

/// The signer of kubelet client certificates.
pub const SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// kubelet's usages for its client certificate.
pub const USAGES: [&str; 3] = ["digital signature", "key encipherment", "client auth"];
/// The signer of kubelet serving certificates (`serverTLSBootstrap`).
pub const SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";
/// kubelet's usages for its serving certificate.
pub const SERVING_USAGES: [&str; 3] = ["digital signature", "key encipherment", "server auth"];

/// What a request asks for: the client pair, or the serving pair for the
/// node's names (DNS names and IP addresses, as subject alternative names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ask {
    pub pair: pki::Pair,
    pub names: Vec<String>,
}

impl Ask {
    pub fn client() -> Ask {
        Ask {
            pair: pki::Pair::Client,
            names: vec![],
        }
    }

    pub fn serving(names: Vec<String>) -> Ask {
        Ask {
            pair: pki::Pair::Server,
            names,
        }
    }

    fn signer(&self) -> &'static str {
        match self.pair {
            pki::Pair::Client => SIGNER,
            pki::Pair::Server => SERVING_SIGNER,
        }
    }

    fn usages(&self) -> &'static [&'static str; 3] {
        match self.pair {
            pki::Pair::Client => &USAGES,
            pki::Pair::Server => &SERVING_USAGES,
        }
    }
}
/// How often a request in flight is looked at.
const POLL: Duration = Duration::from_secs(2);
/// How long one request is waited for (kubelet: an hour).
const WAIT: Duration = Duration::from_secs(3600);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Why a certificate could not be had. Each is one warning, then a retry.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// 401: the credentials asked with are not accepted.
    #[error(
        "{credentials}: the API server refused them (Unauthorized: {message}); a bootstrap token that is wrong, expired or deleted?"
    )]
    Refused {
        credentials: String,
        message: String,
    },
    /// Any other failure of a request to the server.
    #[error("{credentials}: {verb} certificatesigningrequest {name}: {message}")]
    Api {
        credentials: String,
        verb: &'static str,
        name: String,
        message: String,
    },
    /// The cluster said no.
    #[error("certificatesigningrequest {name} is {condition}: {reason}: {message}")]
    Denied {
        name: String,
        condition: String,
        reason: String,
        message: String,
    },
    #[error(
        "certificatesigningrequest {name}: no certificate after {} s (approved: {approved}); are the cluster's csrapproving and csrsigning controllers running?",
        waited.as_secs()
    )]
    NotIssued {
        name: String,
        approved: bool,
        waited: Duration,
    },
    /// The issued certificate is not a usable PEM certificate.
    #[error("certificatesigningrequest {name}: {reason}")]
    BadCertificate { name: String, reason: String },
    #[error("cannot build the certificate signing request: {0}")]
    Csr(String),
    /// No valid certificate and nothing to ask for one with.
    #[error(
        "no valid client certificate in {} and no --bootstrap-kubeconfig to ask for one",
        cert_dir.display()
    )]
    NoCredentials { cert_dir: PathBuf },
}

/// What the server says about one request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Answer {
    pub approved: bool,
    /// (condition type, reason, message) of a Denied or Failed condition.
    pub refused: Option<(String, String, String)>,
    /// The issued certificate, PEM.
    pub certificate: Option<String>,
}

/// A failed call: 401, 404, 409, or anything else with its message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    Unauthorized(String),
    NotFound,
    AlreadyExists,
    Other(String),
}

/// The CSR calls the flow makes: the seam unit tests fake.
pub trait CsrApi: Send + Sync {
    fn create(&self, csr: CertificateSigningRequest) -> BoxFuture<'_, Result<(), CallError>>;
    fn get(&self, name: &str) -> BoxFuture<'_, Result<Answer, CallError>>;
}

/// `CsrApi` over a kube client.
pub struct KubeCsrApi(pub kube::Client);

fn call_error(e: kube::Error) -> CallError {
    match e {
        kube::Error::Api(s) if s.code == 401 => CallError::Unauthorized(s.message),
        kube::Error::Api(s) if s.code == 404 => CallError::NotFound,
        kube::Error::Api(s) if s.code == 409 => CallError::AlreadyExists,
        other => CallError::Other(crate::api::client::describe(&other)),
    }
}

/// What a CSR's status says.
pub fn answer_of(status: Option<&CertificateSigningRequestStatus>) -> Answer {
    let mut a = Answer::default();
    let Some(st) = status else {
        return a;
    };
    for c in st.conditions.iter().flatten() {
        if c.status != "True" && !c.status.is_empty() {
            continue;
        }
        match c.type_.as_str() {
            "Approved" => a.approved = true,
            "Denied" | "Failed" => {
                a.refused = Some((
                    c.type_.clone(),
                    c.reason.clone().unwrap_or_default(),
                    c.message.clone().unwrap_or_default(),
                ))
            }
            _ => {}
        }
    }
    a.certificate = st
        .certificate
        .as_ref()
        .filter(|c| !c.0.is_empty())
        .map(|c| String::from_utf8_lossy(&c.0).into_owned());
    a
}

impl CsrApi for KubeCsrApi {
    fn create(&self, csr: CertificateSigningRequest) -> BoxFuture<'_, Result<(), CallError>> {
        Box::pin(async move {
            let api: Api<CertificateSigningRequest> = Api::all(self.0.clone());
            api.create(&PostParams::default(), &csr)
                .await
                .map(|_| ())
                .map_err(call_error)
        })
    }

    fn get(&self, name: &str) -> BoxFuture<'_, Result<Answer, CallError>> {
        let name = name.to_string();
        Box::pin(async move {
            let api: Api<CertificateSigningRequest> = Api::all(self.0.clone());
            let csr = api.get(&name).await.map_err(call_error)?;
            Ok(answer_of(csr.status.as_ref()))
        })
    }
}

/// kubelet's CSR name: `node-csr-` and a digest of the public key, the
/// subject, the names and the usages, so the same key always asks under
/// one name.
pub fn csr_name(key: &KeyPair, node: &str, ask: &Ask) -> String {
    use base64::Engine;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA512_256);
    let mut part = |b: &[u8]| {
        ctx.update(&(b.len() as u64).to_be_bytes());
        ctx.update(b);
    };
    part(key.public_key_raw());
    part(format!("system:node:{node}").as_bytes());
    part(b"system:nodes");
    for n in &ask.names {
        part(n.as_bytes());
    }
    for u in ask.usages() {
        part(u.as_bytes());
    }
    let sum = ctx.finish();
    format!(
        "node-csr-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sum.as_ref())
    )
}

/// The request object for `key`.
pub fn csr_object(
    key: &KeyPair,
    node: &str,
    ask: &Ask,
) -> Result<CertificateSigningRequest, BootstrapError> {
    // IP addresses among the names become IP SANs, the rest DNS SANs.
    let mut params = rcgen::CertificateParams::new(ask.names.clone())
        .map_err(|e| BootstrapError::Csr(e.to_string()))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("system:node:{node}"));
    let pem = params
        .serialize_request(key)
        .and_then(|r| r.pem())
        .map_err(|e| BootstrapError::Csr(e.to_string()))?;
    Ok(CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(csr_name(key, node, ask)),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(pem.into_bytes()),
            signer_name: ask.signer().into(),
            usages: Some(ask.usages().iter().map(|u| u.to_string()).collect()),
            ..Default::default()
        },
        status: None,
    })
}

/// One request: sent (or found again), then waited on until the cluster
/// issues or refuses it. Returns the certificate, PEM. `credentials` names
/// what the request is made with, in errors.
pub async fn request(
    api: &dyn CsrApi,
    key: &KeyPair,
    node: &str,
    ask: &Ask,
    credentials: &str,
    poll: Duration,
    wait: Duration,
) -> Result<String, BootstrapError> {
    let csr = csr_object(key, node, ask)?;
    let name = csr.metadata.name.clone().unwrap_or_default();
    let failed = |verb: &'static str, e: CallError| match e {
        CallError::Unauthorized(message) => BootstrapError::Refused {
            credentials: credentials.to_string(),
            message,
        },
        other => BootstrapError::Api {
            credentials: credentials.to_string(),
            verb,
            name: name.clone(),
            message: match other {
                CallError::NotFound => "not found".into(),
                CallError::AlreadyExists => "already exists".into(),
                CallError::Other(m) | CallError::Unauthorized(m) => m,
            },
        },
    };
    match api.create(csr).await {
        // Our key's name: the request an earlier run of ours sent.
        Ok(()) | Err(CallError::AlreadyExists) => {}
        Err(e) => return Err(failed("create", e)),
    }
    info!(csr = %name, signer = ask.signer(), "certificate signing request sent; waiting for it to be approved and signed");
    let started = tokio::time::Instant::now();
    let mut approved = false;
    loop {
        match api.get(&name).await {
            Ok(a) => {
                if let Some((condition, reason, message)) = a.refused {
                    return Err(BootstrapError::Denied {
                        name,
                        condition,
                        reason,
                        message,
                    });
                }
                if let Some(cert) = a.certificate {
                    return Ok(cert);
                }
                approved = a.approved;
            }
            Err(e @ CallError::Unauthorized(_)) => return Err(failed("get", e)),
            // A server away for a moment: keep waiting.
            Err(e) => {
                warn!(csr = %name, error = %failed("get", e), "certificate signing request: looking again")
            }
        }
        if started.elapsed() >= wait {
            return Err(BootstrapError::NotIssued {
                name,
                approved,
                waited: wait,
            });
        }
        // A request nobody approves within a minute (a serving CSR waits
        // for an admin) is looked at less often.
        let slow = started.elapsed() > Duration::from_secs(60);
        tokio::time::sleep(if slow { poll * 15 } else { poll }).await;
    }
}

/// Asks for a certificate with `api` and puts it in use: the pending key,
/// the request, the cert dir. Returns the new certificate's facts.
pub async fn obtain(
    api: &dyn CsrApi,
    credentials: &str,
    setup: &Setup,
    now: impl Fn() -> i64,
) -> Result<CertInfo, BootstrapError> {
    let ask = Ask::client();
    let key = pki::pending_key(&setup.cert_dir, ask.pair)?;
    let cert = request(api, &key, &setup.node, &ask, credentials, POLL, WAIT).await?;
    let name = csr_name(&key, &setup.node, &ask);
    let info =
        pki::install(&setup.cert_dir, ask.pair, &cert, &key, now()).map_err(|e| match e {
            PkiError::Bad { reason, .. } => BootstrapError::BadCertificate { name, reason },
            other => BootstrapError::Pki(other),
        })?;
    pki::write_kubeconfig(
        &setup.kubeconfig,
        &setup.cluster,
        &setup.cert_dir.join(pki::Pair::Client.current_name()),
    )?;
    Ok(info)
}

/// The bootstrap credentials: their kubeconfig file and a client built
/// from it.
pub struct BootstrapClient {
    pub path: PathBuf,
    pub client: kube::Client,
}

/// Everything the task needs.
pub struct Setup {
    pub node: String,
    pub cert_dir: PathBuf,
    /// `--kubeconfig`: written after each new certificate.
    pub kubeconfig: PathBuf,
    /// Where the cluster is (from the bootstrap kubeconfig).
    pub cluster: pki::Cluster,
    pub bootstrap: Option<BootstrapClient>,
    /// kubelet `rotateCertificates`: renew before expiry. Without it a
    /// certificate is replaced only once it has expired (through the
    /// bootstrap credentials, as kubelet does at a start).
    pub rotate: bool,
    /// The API client's credentials, swapped after each new certificate.
    pub credentials: crate::api::client::ClientSlot,
}

fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// A number in [0, 1) from the system's random source.
fn jitter() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    f64::from(u32::from_be_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

/// When the task next asks, for a valid `cert`: the rotation deadline, or
/// its expiry without rotation. The fault-injection build can bring it
/// forward (MINILET_FAULT_ROTATE_AFTER_SECS, from notBefore + 5 min, the
/// signer's backdate) so a test sees a rotation in seconds.
fn next_ask(cert: &CertInfo, rotate: bool) -> i64 {
    #[cfg(feature = "fault-injection")]
    if let Some(s) = std::env::var("MINILET_FAULT_ROTATE_AFTER_SECS")
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
    {
        return cert.not_before + 300 + s;
    }
    if rotate {
        pki::rotation_deadline(cert, jitter())
    } else {
        cert.not_after
    }
}

/// The bootstrap and rotation task; runs until `cancel`.
pub async fn run(setup: Arc<Setup>, cancel: CancellationToken) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let now = unix_now();
        let current = match pki::current(&setup.cert_dir, pki::Pair::Client) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "the current client certificate is unusable; asking for a new one");
                None
            }
        }
        // A --kubeconfig with a valid certificate of its own (not one of
        // the cert dir's) is used as it is until its renewal, which then
        // moves it into the cert dir.
        .or_else(|| {
            setup
                .credentials
                .is_set()
                .then(|| crate::api::client::certificate_of(&setup.kubeconfig))
                .flatten()
        })
        .filter(|c| c.valid_at(now));
        let ask_with: Result<(Box<dyn CsrApi>, String), BootstrapError> = match &current {
            Some(cert) => {
                if !setup.credentials.is_set() {
                    // Valid on disk but not in use yet: the kubeconfig was
                    // lost or broken; write it again and use it.
                    let pair = setup.cert_dir.join(pki::Pair::Client.current_name());
                    let loaded =
                        match pki::write_kubeconfig(&setup.kubeconfig, &setup.cluster, &pair) {
                            Ok(()) => setup
                                .credentials
                                .load(&setup.kubeconfig)
                                .await
                                .map_err(|e| crate::error_chain(&e)),
                            Err(e) => Err(crate::error_chain(&e)),
                        };
                    if let Err(e) = loaded {
                        warn!(error = %e, "the issued certificate cannot be put in use");
                    }
                }
                let at = next_ask(cert, setup.rotate);
                let wait = Duration::from_secs(at.saturating_sub(now).max(0) as u64);
                info!(not_after = %stamp(cert.not_after), next_request_in_s = wait.as_secs(), "client certificate in use");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                match setup.credentials.current() {
                    Some(client) if unix_now() < cert.not_after => Ok((
                        Box::new(KubeCsrApi(client)) as Box<dyn CsrApi>,
                        format!(
                            "the node's client certificate ({})",
                            setup.kubeconfig.display()
                        ),
                    )),
                    _ => bootstrap_api(&setup),
                }
            }
            None => bootstrap_api(&setup),
        };
        let result = match ask_with {
            // A request may wait long for its approval: shutdown must not.
            Ok((api, credentials)) => tokio::select! {
                _ = cancel.cancelled() => return,
                r = obtain(api.as_ref(), &credentials, &setup, unix_now) => r,
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(cert) => {
                info!(subject = %cert.common_name, not_after = %stamp(cert.not_after), kubeconfig = %setup.kubeconfig.display(), "client certificate issued");
                if let Err(e) = setup.credentials.load(&setup.kubeconfig).await {
                    warn!(error = %crate::error_chain(&e), "the issued certificate cannot be put in use");
                }
                backoff = Duration::from_secs(1);
            }
            Err(e) => {
                warn!(error = %crate::error_chain(&e), retry_in = ?backoff, "client certificate: no new certificate yet");
                if !back_off(&mut backoff, &cancel).await {
                    return;
                }
            }
        }
    }
}

/// `serverTLSBootstrap`: the kubelet API's serving certificate from the
/// `kubernetes.io/kubelet-serving` signer, asked for with the node's own
/// client (`client`) for `names`, and renewed at kubelet's deadline. The
/// cluster must approve it (v1.20's controller manager approves only client
/// certificates: an admin or an approver does); until it does, the
/// self-signed pair (`pki::self_signed`) is there to serve with. Runs until
/// `cancel`.
pub async fn run_serving(
    client: kube::Client,
    node: String,
    cert_dir: PathBuf,
    names: Vec<String>,
    cancel: CancellationToken,
) {
    if let Err(e) = pki::self_signed(&cert_dir, &names, unix_now()) {
        warn!(error = %crate::error_chain(&e), "no self-signed serving certificate");
    }
    let ask = Ask::serving(names);
    let api = KubeCsrApi(client);
    let mut backoff = Duration::from_secs(1);
    loop {
        let now = unix_now();
        if let Ok(Some(cert)) = pki::current(&cert_dir, ask.pair)
            && cert.valid_at(now)
        {
            let wait = Duration::from_secs(next_ask(&cert, true).saturating_sub(now).max(0) as u64);
            info!(not_after = %stamp(cert.not_after), next_request_in_s = wait.as_secs(), "serving certificate in use");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let result = async {
            let key = pki::pending_key(&cert_dir, ask.pair)?;
            let pem = request(
                &api,
                &key,
                &node,
                &ask,
                "the node's client credentials",
                POLL,
                WAIT,
            )
            .await?;
            Ok::<_, BootstrapError>(pki::install(&cert_dir, ask.pair, &pem, &key, unix_now())?)
        };
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = result => r,
        };
        match result {
            Ok(cert) => {
                info!(subject = %cert.common_name, not_after = %stamp(cert.not_after), "serving certificate issued");
                backoff = Duration::from_secs(1);
            }
            Err(e) => {
                warn!(error = %crate::error_chain(&e), retry_in = ?backoff, "serving certificate: none issued yet");
                if !back_off(&mut backoff, &cancel).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps `backoff`, then doubles it (capped); false when cancelled first.
async fn back_off(backoff: &mut Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => return false,
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    true
}

fn bootstrap_api(setup: &Setup) -> Result<(Box<dyn CsrApi>, String), BootstrapError> {
    match &setup.bootstrap {
        Some(b) => Ok((
            Box::new(KubeCsrApi(b.client.clone())),
            format!("bootstrap kubeconfig {}", b.path.display()),
        )),
        None => Err(BootstrapError::NoCredentials {
            cert_dir: setup.cert_dir.clone(),
        }),
    }
}

fn stamp(s: i64) -> String {
    jiff::Timestamp::from_second(s)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A CSR API that answers from a script: each `get` pops the next
    /// answer (the last one repeats).
    #[derive(Default)]
    struct FakeCsrs {
        create: Mutex<Vec<Result<(), CallError>>>,
        answers: Mutex<Vec<Result<Answer, CallError>>>,
        created: Mutex<Vec<CertificateSigningRequest>>,
        gets: Mutex<Vec<String>>,
    }

    impl CsrApi for FakeCsrs {
        fn create(&self, csr: CertificateSigningRequest) -> BoxFuture<'_, Result<(), CallError>> {
            self.created.lock().unwrap().push(csr);
            let r = self.create.lock().unwrap().pop().unwrap_or(Ok(()));
            Box::pin(async move { r })
        }
        fn get(&self, name: &str) -> BoxFuture<'_, Result<Answer, CallError>> {
            self.gets.lock().unwrap().push(name.to_string());
            let mut a = self.answers.lock().unwrap();
            let r = if a.len() > 1 {
                a.remove(0)
            } else {
                a[0].clone()
            };
            Box::pin(async move { r })
        }
    }

    fn key() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_request_is_kubelets() {
        let k = key();
        let client = Ask::client();
        let csr = csr_object(&k, "node-a", &client).unwrap();
        assert_eq!(
            csr.spec.signer_name,
            "kubernetes.io/kube-apiserver-client-kubelet"
        );
        assert_eq!(
            csr.spec.usages.as_deref().unwrap(),
            ["digital signature", "key encipherment", "client auth"]
        );
        let name = csr.metadata.name.unwrap();
        assert!(name.starts_with("node-csr-") && name.len() <= 253, "{name}");
        assert_eq!(
            name,
            csr_name(&k, "node-a", &client),
            "the same key, the same name"
        );
        assert_ne!(name, csr_name(&key(), "node-a", &client));
        assert_ne!(name, csr_name(&k, "node-b", &client));
        let pem = String::from_utf8(csr.spec.request.0).unwrap();
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{pem}"
        );
        // The subject, as the signer and the approver read it.
        use x509_parser::prelude::FromDer;
        let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let (_, req) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&block.contents)
                .unwrap();
        let subject = &req.certification_request_info.subject;
        let cn: Vec<_> = subject
            .iter_common_name()
            .map(|a| a.as_str().unwrap())
            .collect();
        let o: Vec<_> = subject
            .iter_organization()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!((cn, o), (vec!["system:node:node-a"], vec!["system:nodes"]));
        assert_eq!(
            req.certification_request_info
                .subject_pki
                .subject_public_key
                .data
                .as_ref(),
            k.public_key_raw()
        );
    }

    #[test]
    fn the_serving_request_names_the_node_and_its_addresses() {
        let k = key();
        let ask = Ask::serving(vec!["node-a".into(), "10.0.0.5".into()]);
        let csr = csr_object(&k, "node-a", &ask).unwrap();
        assert_eq!(csr.spec.signer_name, "kubernetes.io/kubelet-serving");
        assert_eq!(
            csr.spec.usages.as_deref().unwrap(),
            ["digital signature", "key encipherment", "server auth"]
        );
        assert_ne!(
            csr.metadata.name,
            Some(csr_name(&k, "node-a", &Ask::client()))
        );
        use x509_parser::prelude::FromDer;
        let (_, block) = x509_parser::pem::parse_x509_pem(&csr.spec.request.0).unwrap();
        let (_, req) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&block.contents)
                .unwrap();
        let sans: Vec<String> = req
            .requested_extensions()
            .into_iter()
            .flatten()
            .filter_map(|e| match e {
                x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) => Some(
                    san.general_names
                        .iter()
                        .map(|g| g.to_string())
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .flatten()
            .collect();
        // x509-parser prints an IP SAN as hex octets: 10.0.0.5.
        assert_eq!(sans, vec!["DNSName(node-a)", "IPAddress(0a:00:00:05)"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_is_waited_on_until_signed() {
        let k = key();
        let api = FakeCsrs::default();
        *api.answers.lock().unwrap() = vec![
            Ok(Answer::default()),
            Ok(Answer {
                approved: true,
                ..Default::default()
            }),
            Ok(Answer {
                approved: true,
                certificate: Some("PEM".into()),
                ..Default::default()
            }),
        ];
        let cert = request(
            &api,
            &k,
            "n",
            &Ask::client(),
            "bootstrap kubeconfig /b",
            MS,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        assert_eq!(cert, "PEM");
        assert_eq!(api.gets.lock().unwrap().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_sent_before_a_restart_is_found_again() {
        let k = key();
        let api = FakeCsrs::default();
        *api.create.lock().unwrap() = vec![Err(CallError::AlreadyExists)];
        *api.answers.lock().unwrap() = vec![Ok(Answer {
            certificate: Some("PEM".into()),
            ..Default::default()
        })];
        let cert = request(
            &api,
            &k,
            "n",
            &Ask::client(),
            "c",
            MS,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        assert_eq!(cert, "PEM");
        assert_eq!(
            api.gets.lock().unwrap()[0],
            csr_name(&k, "n", &Ask::client())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wrong_token_is_one_clear_error() {
        let api = FakeCsrs::default();
        *api.create.lock().unwrap() = vec![Err(CallError::Unauthorized("Unauthorized".into()))];
        let err = request(
            &api,
            &key(),
            "n",
            &Ask::client(),
            "bootstrap kubeconfig /etc/b.conf",
            MS,
            MS,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("bootstrap kubeconfig /etc/b.conf: the API server refused them")
                && err.contains("bootstrap token that is wrong, expired or deleted"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_denied_request_and_one_never_signed_say_so() {
        let api = FakeCsrs::default();
        *api.answers.lock().unwrap() = vec![Ok(Answer {
            refused: Some((
                "Denied".into(),
                "AdminSaysNo".into(),
                "not this node".into(),
            )),
            ..Default::default()
        })];
        let err = request(&api, &key(), "n", &Ask::client(), "c", MS, MS)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is Denied: AdminSaysNo: not this node"),
            "{err}"
        );

        let api = FakeCsrs::default();
        *api.answers.lock().unwrap() = vec![
            Err(CallError::Other("connection refused".into())),
            Ok(Answer {
                approved: true,
                ..Default::default()
            }),
        ];
        let err = request(
            &api,
            &key(),
            "n",
            &Ask::client(),
            "c",
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("no certificate after 5 s (approved: true)"),
            "{err}"
        );
    }

    #[test]
    fn the_status_is_read_as_kubelet_reads_it() {
        use k8s_openapi::api::certificates::v1::CertificateSigningRequestCondition as C;
        let cond = |t: &str, s: &str| C {
            type_: t.into(),
            status: s.into(),
            reason: Some("R".into()),
            message: Some("M".into()),
            ..Default::default()
        };
        let st = CertificateSigningRequestStatus {
            conditions: Some(vec![cond("Approved", "True")]),
            certificate: Some(ByteString(vec![])),
        };
        assert_eq!(
            answer_of(Some(&st)),
            Answer {
                approved: true,
                ..Default::default()
            },
            "an empty certificate is none yet"
        );
        let st = CertificateSigningRequestStatus {
            conditions: Some(vec![cond("Approved", "True"), cond("Failed", "True")]),
            certificate: None,
        };
        assert_eq!(
            answer_of(Some(&st)).refused,
            Some(("Failed".into(), "R".into(), "M".into()))
        );
        assert_eq!(answer_of(None), Answer::default());
    }
}
