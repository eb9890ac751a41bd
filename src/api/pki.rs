//! The node's certificates on disk, in kubelet's layout under the cert
//! dir (`--cert-dir`, default `<stateDir>/pki`), for the client pair
//! (`kubelet-client-*`) and the serving pair (`kubelet-server-*`) alike:
//!
//! - `kubelet-client-<YYYY-MM-DD-HH-MM-SS>.pem`: an issued certificate and
//!   its private key in one file, 0600;
//! - `kubelet-client-current.pem`: a symlink to the one in use, swapped by
//!   rename, so a reader sees the old pair or the new one, never half;
//! - `kubelet-client.key.tmp`: the key of a request still in flight, kept
//!   so that an agent killed while it waits asks again with the same key
//!   (and so the same CSR name) instead of piling up requests;
//! - `kubelet.crt` / `kubelet.key`: the self-signed serving pair used
//!   until (or unless) the cluster issues one.
//!
//! Also the kubeconfig kubelet writes after a bootstrap (server and CA of
//! the bootstrap kubeconfig, the current pair as credentials), and the
//! rotation deadline: a random point between 70 % and 90 % of the
//! certificate's lifetime, as kubelet's certificate manager picks it.
//!
//! Side effects: files in the cert dir and the kubeconfig file.

use std::path::{Path, PathBuf};

use rcgen::KeyPair;

/// Which of the node's two pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pair {
    /// The client certificate the agent talks to the API server with.
    Client,
    /// The kubelet API's serving certificate.
    Server,
}

impl Pair {
    fn stem(self) -> &'static str {
        match self {
            Pair::Client => "kubelet-client",
            Pair::Server => "kubelet-server",
        }
    }

    /// The symlink to the pair in use (`kubelet-client-current.pem`).
    pub fn current_name(self) -> String {
        format!("{}-current.pem", self.stem())
    }

    /// The key of a request in flight (`kubelet-client.key.tmp`).
    pub fn pending_name(self) -> String {
        format!("{}.key.tmp", self.stem())
    }
}

/// Why the cert dir or the kubeconfig could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A certificate (or its key) that does not parse.
    #[error("{}: {reason}", path.display())]
    Bad { path: PathBuf, reason: String },
    /// The certificate is not for the key it was asked with.
    #[error("{what}: the certificate's public key is not the node's key")]
    KeyMismatch { what: String },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// What the code needs of a certificate: validity (unix seconds), subject
/// common name and the raw public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub not_before: i64,
    pub not_after: i64,
    pub common_name: String,
    pub public_key: Vec<u8>,
}

impl CertInfo {
    /// Still usable at `now`.
    pub fn valid_at(&self, now: i64) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

/// The first certificate of a PEM bundle. `what` names it in errors.
pub fn parse_cert(pem: &[u8], what: &Path) -> Result<CertInfo, PkiError> {
    let bad = |reason: String| PkiError::Bad {
        path: what.to_path_buf(),
        reason,
    };
    let (_, block) = x509_parser::pem::parse_x509_pem(pem)
        .map_err(|e| bad(format!("no PEM certificate ({e})")))?;
    let cert = block
        .parse_x509()
        .map_err(|e| bad(format!("not an X.509 certificate ({e})")))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok(CertInfo {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        common_name,
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

/// The pair in use: its certificate's facts, or `None` when there is none
/// yet. A link to a missing or broken file is an error naming it.
pub fn current(dir: &Path, pair: Pair) -> Result<Option<CertInfo>, PkiError> {
    let path = dir.join(pair.current_name());
    match std::fs::read(&path) {
        Ok(bytes) => {
            let info = parse_cert(&bytes, &path)?;
            let key = key_of(&bytes, &path)?;
            if key.public_key_raw() != info.public_key.as_slice() {
                return Err(PkiError::KeyMismatch {
                    what: path.display().to_string(),
                });
            }
            Ok(Some(info))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PkiError::Io {
            action: "read",
            path,
            source,
        }),
    }
}

/// The private key of a PEM bundle (its first PRIVATE KEY block).
fn key_of(pem: &[u8], path: &Path) -> Result<KeyPair, PkiError> {
    let text = String::from_utf8_lossy(pem);
    let start = text
        .find("-----BEGIN PRIVATE KEY-----")
        .ok_or(PkiError::Bad {
            path: path.to_path_buf(),
            reason: "no PRIVATE KEY block".into(),
        })?;
    KeyPair::from_pem(&text[start..]).map_err(|e| PkiError::Bad {
        path: path.to_path_buf(),
        reason: format!("bad private key ({e})"),
    })
}

/// The key of the request in flight: the one kept from an earlier attempt,
/// else a new ECDSA P-256 key (kubelet's kind), written before it is used.
pub fn pending_key(dir: &Path, pair: Pair) -> Result<KeyPair, PkiError> {
    let path = dir.join(pair.pending_name());
    match std::fs::read(&path) {
        Ok(bytes) => return key_of(&bytes, &path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(PkiError::Io {
                action: "read",
                path,
                source,
            });
        }
    }
    let key = new_key(&path)?;
    crate::cni::cache::write_atomic(dir, &path, key.serialize_pem().as_bytes(), 0o600)
        .map_err(io("write", &path))?;
    Ok(key)
}

fn new_key(path: &Path) -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| PkiError::Bad {
        path: path.to_path_buf(),
        reason: format!("cannot generate a key ({e})"),
    })
}

/// The self-signed serving pair kubelet makes when the cluster issues
/// none: `kubelet.crt` and `kubelet.key` (0600), for `names` (DNS names or
/// IP addresses), valid a year; made again when missing or expired.
/// Returns the certificate's path.
pub fn self_signed(dir: &Path, names: &[String], now: i64) -> Result<PathBuf, PkiError> {
    let (crt, key_path) = (dir.join("kubelet.crt"), dir.join("kubelet.key"));
    if let Ok(bytes) = std::fs::read(&crt)
        && parse_cert(&bytes, &crt).is_ok_and(|c| c.valid_at(now))
        && key_path.exists()
    {
        return Ok(crt);
    }
    let bad = |e: rcgen::Error| PkiError::Bad {
        path: crt.clone(),
        reason: format!("cannot make a self-signed certificate ({e})"),
    };
    let key = new_key(&key_path)?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(bad)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let host = names.first().cloned().unwrap_or_default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{host}@{now}"));
    params.not_before = to_time(now - 60);
    params.not_after = to_time(now + 365 * 24 * 3600);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key).map_err(bad)?;
    crate::cni::cache::write_atomic(dir, &key_path, key.serialize_pem().as_bytes(), 0o600)
        .map_err(io("write", &key_path))?;
    crate::cni::cache::write_atomic(dir, &crt, cert.pem().as_bytes(), 0o600)
        .map_err(io("write", &crt))?;
    Ok(crt)
}

/// rcgen's time type from unix seconds (clamped to the epoch on error).
fn to_time(s: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(s).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Puts an issued certificate for `key` in use: checks it is for that key,
/// writes `kubelet-client-<time>.pem` (0600), swaps the current link, drops
/// the pending key and pairs older than the one before. Returns its facts.
pub fn install(
    dir: &Path,
    pair: Pair,
    cert_pem: &str,
    key: &KeyPair,
    now: i64,
) -> Result<CertInfo, PkiError> {
    let stamp = jiff::Timestamp::from_second(now)
        .map(|t| t.strftime("%Y-%m-%d-%H-%M-%S").to_string())
        .unwrap_or_else(|_| now.to_string());
    let name = format!("{}-{stamp}.pem", pair.stem());
    let path = dir.join(&name);
    let info = parse_cert(cert_pem.as_bytes(), &path)?;
    if info.public_key.as_slice() != key.public_key_raw() {
        return Err(PkiError::KeyMismatch {
            what: format!("the certificate issued for {}", info.common_name),
        });
    }
    let mut bundle = cert_pem.trim_end().to_string();
    bundle.push('\n');
    bundle.push_str(&key.serialize_pem());
    crate::cni::cache::write_atomic(dir, &path, bundle.as_bytes(), 0o600)
        .map_err(io("write", &path))?;
    let current = pair.current_name();
    let link = dir.join(&current);
    let previous = std::fs::read_link(&link).ok();
    let tmp = dir.join(format!(".{current}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&name, &tmp).map_err(io("symlink", &tmp))?;
    std::fs::rename(&tmp, &link).map_err(io("rename into place", &link))?;
    let pending = dir.join(pair.pending_name());
    match std::fs::remove_file(&pending) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(PkiError::Io {
                action: "remove",
                path: pending,
                source: e,
            });
        }
        _ => {}
    }
    prune(dir, pair, &name, previous.as_deref());
    Ok(info)
}

/// Removes issued pairs other than the current one and the one before it
/// (kept for a reader that still holds the old link).
fn prune(dir: &Path, pair: Pair, current: &str, previous: Option<&Path>) {
    let (prefix, link) = (format!("{}-", pair.stem()), pair.current_name());
    let keep_prev = previous
        .and_then(|p| p.file_name())
        .map(|n| n.to_os_string());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let s = name.to_string_lossy();
        let issued = s.starts_with(&prefix) && s.ends_with(".pem") && s != link;
        if issued && s != current && Some(&name) != keep_prev.as_ref() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// When to ask for the next certificate: `jitter` (in [0, 1)) of the way
/// between 70 % and 90 % of the lifetime, kubelet's window.
pub fn rotation_deadline(cert: &CertInfo, jitter: f64) -> i64 {
    let life = (cert.not_after - cert.not_before).max(0);
    let permille = 700 + (200.0 * jitter.clamp(0.0, 1.0)).floor().min(199.0) as i64;
    cert.not_before + life * permille / 1000
}

/// Where the cluster is, from the bootstrap kubeconfig, for the kubeconfig
/// written after the bootstrap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    pub server: String,
    /// The CA bundle, PEM, when the bootstrap kubeconfig had one.
    pub ca_pem: Option<Vec<u8>>,
    pub insecure: bool,
}

/// kubelet's written kubeconfig: one cluster, one user whose certificate
/// and key are both the current pair's link, one context. Mode 0600.
pub fn write_kubeconfig(path: &Path, cluster: &Cluster, pair: &Path) -> Result<(), PkiError> {
    use base64::Engine;
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut text = String::from(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: default-cluster\n  cluster:\n",
    );
    text.push_str(&format!("    server: {}\n", q(&cluster.server)));
    if let Some(ca) = &cluster.ca_pem {
        let data = base64::engine::general_purpose::STANDARD.encode(ca);
        text.push_str(&format!("    certificate-authority-data: {data}\n"));
    }
    if cluster.insecure {
        text.push_str("    insecure-skip-tls-verify: true\n");
    }
    let pair = q(&pair.display().to_string());
    text.push_str(&format!(
        "users:\n- name: default-auth\n  user:\n    client-certificate: {pair}\n    client-key: {pair}\ncontexts:\n- name: default-context\n  context:\n    cluster: default-cluster\n    user: default-auth\n    namespace: default\ncurrent-context: default-context\n"
    ));
    let dir = path.parent().unwrap_or(Path::new("."));
    crate::cni::cache::write_atomic(dir, path, text.as_bytes(), 0o600).map_err(io("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate for `key`, valid [nb, na], signed by a throwaway CA.
    pub(crate) fn issue(key: &KeyPair, cn: &str, nb: i64, na: i64) -> String {
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let issuer = rcgen::Issuer::new(rcgen::CertificateParams::default(), ca_key);
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.not_before = time::OffsetDateTime::from_unix_timestamp(nb).unwrap();
        p.not_after = time::OffsetDateTime::from_unix_timestamp(na).unwrap();
        p.signed_by(key, &issuer).unwrap().pem()
    }

    #[test]
    fn a_pending_key_is_kept_until_its_certificate_is_installed() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = pending_key(dir.path(), Pair::Client).unwrap();
        let k2 = pending_key(dir.path(), Pair::Client).unwrap();
        assert_eq!(
            k1.public_key_raw(),
            k2.public_key_raw(),
            "a restart asks with the same key"
        );
        assert_eq!(current(dir.path(), Pair::Client).unwrap(), None);
        let cert = issue(&k1, "system:node:n1", 1_000, 2_000);
        let info = install(dir.path(), Pair::Client, &cert, &k1, 1_500).unwrap();
        assert_eq!(info.common_name, "system:node:n1");
        assert_eq!((info.not_before, info.not_after), (1_000, 2_000));
        assert!(!dir.path().join(Pair::Client.pending_name()).exists());
        assert_eq!(
            current(dir.path(), Pair::Client).unwrap(),
            Some(info.clone())
        );
        use std::os::unix::fs::PermissionsExt;
        let target = std::fs::canonicalize(dir.path().join(Pair::Client.current_name())).unwrap();
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A new key next time.
        let k3 = pending_key(dir.path(), Pair::Client).unwrap();
        assert_ne!(k3.public_key_raw(), k1.public_key_raw());
    }

    #[test]
    fn a_certificate_for_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mine = pending_key(dir.path(), Pair::Client).unwrap();
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = issue(&other, "system:node:n1", 1_000, 2_000);
        let err = install(dir.path(), Pair::Client, &cert, &mine, 1_500).unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
        assert!(
            dir.path().join(Pair::Client.pending_name()).exists(),
            "the request's key stays"
        );
        assert_eq!(current(dir.path(), Pair::Client).unwrap(), None);
    }

    #[test]
    fn rotation_swaps_the_link_and_keeps_one_previous_pair() {
        let dir = tempfile::tempdir().unwrap();
        for (i, now) in [1_000i64, 2_000, 3_000].iter().enumerate() {
            let k = pending_key(dir.path(), Pair::Client).unwrap();
            let cert = issue(&k, "system:node:n1", *now, now + 10_000);
            let info = install(dir.path(), Pair::Client, &cert, &k, *now).unwrap();
            assert_eq!(info.not_before, *now, "round {i}");
        }
        let mut issued: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != &Pair::Client.current_name())
            .collect();
        issued.sort();
        assert_eq!(
            issued,
            vec![
                "kubelet-client-1970-01-01-00-33-20.pem",
                "kubelet-client-1970-01-01-00-50-00.pem"
            ]
        );
        assert_eq!(
            current(dir.path(), Pair::Client)
                .unwrap()
                .unwrap()
                .not_before,
            3_000
        );
    }

    #[test]
    fn a_broken_pair_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(Pair::Client.current_name()),
            "not a certificate",
        )
        .unwrap();
        let err = current(dir.path(), Pair::Client).unwrap_err().to_string();
        assert!(
            err.contains("kubelet-client-current.pem") && err.contains("no PEM certificate"),
            "{err}"
        );
    }

    #[test]
    fn the_serving_pair_has_its_own_files_and_a_self_signed_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["node-a".to_string(), "10.0.0.5".to_string()];
        let crt = self_signed(dir.path(), &names, 1_000_000).unwrap();
        let info = parse_cert(&std::fs::read(&crt).unwrap(), &crt).unwrap();
        assert!(info.common_name.starts_with("node-a@") && info.valid_at(1_000_000));
        let again = std::fs::read(&crt).unwrap();
        self_signed(dir.path(), &names, 1_000_100).unwrap();
        assert_eq!(std::fs::read(&crt).unwrap(), again, "kept while valid");
        self_signed(dir.path(), &names, 1_000_000 + 400 * 24 * 3600).unwrap();
        assert_ne!(
            std::fs::read(&crt).unwrap(),
            again,
            "made again once expired"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("kubelet.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let k = pending_key(dir.path(), Pair::Server).unwrap();
        install(
            dir.path(),
            Pair::Server,
            &issue(&k, "system:node:node-a", 0, 4_000_000_000),
            &k,
            1,
        )
        .unwrap();
        assert!(dir.path().join("kubelet-server-current.pem").exists());
        assert_eq!(
            current(dir.path(), Pair::Client).unwrap(),
            None,
            "the client pair is apart"
        );
        assert!(current(dir.path(), Pair::Server).unwrap().is_some());
    }

    #[test]
    fn the_deadline_is_between_70_and_90_percent_of_the_lifetime() {
        let c = CertInfo {
            not_before: 1_000,
            not_after: 2_000,
            common_name: String::new(),
            public_key: vec![],
        };
        assert_eq!(rotation_deadline(&c, 0.0), 1_700);
        assert_eq!(rotation_deadline(&c, 0.5), 1_800);
        assert_eq!(rotation_deadline(&c, 0.999_999), 1_899);
        assert!(c.valid_at(1_999) && !c.valid_at(2_000) && !c.valid_at(999));
    }

    #[test]
    fn the_written_kubeconfig_loads_with_the_pair_as_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let k = pending_key(dir.path(), Pair::Client).unwrap();
        install(
            dir.path(),
            Pair::Client,
            &issue(&k, "system:node:n1", 0, 4_000_000_000),
            &k,
            1,
        )
        .unwrap();
        let path = dir.path().join("kubelet.conf");
        let cluster = Cluster {
            server: "https://127.0.0.1:6443".into(),
            ca_pem: Some(issue(&k, "ca", 0, 4_000_000_000).into_bytes()),
            insecure: false,
        };
        write_kubeconfig(
            &path,
            &cluster,
            &dir.path().join(Pair::Client.current_name()),
        )
        .unwrap();
        let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
        let user = kc.auth_infos[0].auth_info.as_ref().unwrap();
        let pair = dir
            .path()
            .join(Pair::Client.current_name())
            .display()
            .to_string();
        assert_eq!(user.client_certificate.as_deref(), Some(pair.as_str()));
        assert_eq!(user.client_key.as_deref(), Some(pair.as_str()));
        let c = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(c.server.as_deref(), Some("https://127.0.0.1:6443"));
        assert!(c.certificate_authority_data.is_some());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
