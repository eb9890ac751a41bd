//! Registry credentials from a pod's imagePullSecrets, matched to an image
//! as kubelet's credential keyring does: `kubernetes.io/dockerconfigjson`
//! (`{"auths": {...}}`) and `kubernetes.io/dockercfg` (the map itself)
//! secrets; keys with or without a scheme, with a path or a port, `*`
//! globs per host label; `auth` (base64 `user:pass`) or
//! `username`/`password`. Every key that matches the image gives its
//! credentials, longest key first; the puller tries each in turn.
//!
//! Pure: no I/O. A secret that does not parse is skipped with its reason.

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;
use std::collections::BTreeMap;

use super::api;

/// A secret that holds no usable registry config.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KeyringError {
    #[error("secret {secret:?}: {key} is not a docker config: {reason}")]
    BadConfig {
        secret: String,
        key: &'static str,
        reason: String,
    },
    #[error("secret {secret:?}: credentials for {registry:?}: auth is not base64 user:password")]
    BadAuth { secret: String, registry: String },
}

#[derive(Deserialize, Default)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

#[derive(Deserialize)]
struct ConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

/// One credential for the registry keys it was given under.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Cred {
    /// The schemeless key, `host[:port][/path]`.
    key: String,
    username: String,
    password: String,
}

/// All credentials of a pod's pull secrets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keyring {
    creds: Vec<Cred>,
}

const DOCKER_CONFIG_JSON: &str = ".dockerconfigjson";
const DOCKER_CFG: &str = ".dockercfg";
/// kubelet's name for Docker Hub's credentials key.
const DEFAULT_REGISTRY: &str = "index.docker.io";

impl Keyring {
    /// Read the secrets kubelet reads (by type and key); the errors say
    /// which ones were of no use.
    pub fn from_secrets<'a>(
        secrets: impl IntoIterator<Item = &'a Secret>,
    ) -> (Keyring, Vec<KeyringError>) {
        let mut ring = Keyring::default();
        let mut errors = Vec::new();
        for s in secrets {
            let name = s.metadata.name.clone().unwrap_or_default();
            let data = |k: &str| s.data.as_ref()?.get(k).map(|b| b.0.as_slice());
            let parsed = match s.type_.as_deref() {
                Some("kubernetes.io/dockerconfigjson") => {
                    data(DOCKER_CONFIG_JSON).filter(|b| !b.is_empty()).map(|b| {
                        serde_json::from_slice::<ConfigJson>(b)
                            .map(|c| c.auths)
                            .map_err(|e| (DOCKER_CONFIG_JSON, e))
                    })
                }
                Some("kubernetes.io/dockercfg") => data(DOCKER_CFG)
                    .filter(|b| !b.is_empty())
                    .map(|b| serde_json::from_slice(b).map_err(|e| (DOCKER_CFG, e))),
                _ => None,
            };
            match parsed {
                None => {}
                Some(Err((key, e))) => errors.push(KeyringError::BadConfig {
                    secret: name,
                    key,
                    reason: e.to_string(),
                }),
                Some(Ok(entries)) => {
                    for (registry, entry) in entries {
                        match cred(&registry, entry) {
                            Some(c) => ring.creds.push(c),
                            None => errors.push(KeyringError::BadAuth {
                                secret: name.clone(),
                                registry,
                            }),
                        }
                    }
                }
            }
        }
        // Longest key first (kubelet sorts its index in reverse); stable,
        // so equal keys keep the order of the secrets.
        ring.creds.sort_by(|a, b| b.key.cmp(&a.key));
        (ring, errors)
    }

    /// The credentials to try for `image`, in order; empty: pull anonymously.
    pub fn lookup(&self, image: &str) -> Vec<api::AuthConfig> {
        let repo = repository(image);
        let mut hits: Vec<&Cred> = self
            .creds
            .iter()
            .filter(|c| urls_match(&c.key, &repo))
            .collect();
        if hits.is_empty() && is_default_registry(&repo) {
            hits = self
                .creds
                .iter()
                .filter(|c| c.key == DEFAULT_REGISTRY)
                .collect();
        }
        hits.into_iter()
            .map(|c| api::AuthConfig {
                username: c.username.clone(),
                password: c.password.clone(),
                // No server address: containerd drops credentials whose
                // address does not parse as a URL with its host (a bare
                // `localhost:5001`, a glob), and the match is made here.
                ..Default::default()
            })
            .collect()
    }
}

fn cred(registry: &str, e: Entry) -> Option<Cred> {
    let (username, password) = match e.auth.as_deref().filter(|a| !a.is_empty()) {
        Some(auth) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .ok()?;
            let text = String::from_utf8(bytes).ok()?;
            let (u, p) = text.split_once(':')?;
            (u.to_string(), p.to_string())
        }
        None => (
            e.username.unwrap_or_default(),
            e.password.unwrap_or_default(),
        ),
    };
    Some(Cred {
        key: normalize_key(registry),
        username,
        password,
    })
}

/// kubelet's keyring key: scheme dropped, a `/v1/` or `/v2/` path taken
/// as the host alone (as the docker client does), a lone `/` dropped.
fn normalize_key(registry: &str) -> String {
    let k = registry
        .strip_prefix("https://")
        .or_else(|| registry.strip_prefix("http://"))
        .unwrap_or(registry);
    let (host, path) = match k.find('/') {
        Some(i) => (&k[..i], &k[i..]),
        None => (k, ""),
    };
    let path = path
        .strip_prefix("/v1/")
        .or_else(|| path.strip_prefix("/v2/"))
        .map_or(path, |rest| &path[path.len() - rest.len() - 1..]);
    if path.is_empty() || path == "/" {
        host.to_string()
    } else {
        format!("{host}{path}")
    }
}

/// The repository an image is pulled from, as kubelet's `ParseImageName`
/// gives it: no tag or digest, Docker Hub names spelled out.
pub fn repository(image: &str) -> String {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last_slash = no_digest.rfind('/').map_or(0, |i| i + 1);
    let no_tag = match no_digest[last_slash..].find(':') {
        Some(i) => &no_digest[..last_slash + i],
        None => no_digest,
    };
    let (first, rest) = no_tag.split_once('/').unwrap_or(("", no_tag));
    let has_registry =
        !first.is_empty() && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_registry {
        no_tag.to_string()
    } else if first.is_empty() {
        format!("docker.io/library/{rest}")
    } else {
        format!("docker.io/{no_tag}")
    }
}

fn is_default_registry(repo: &str) -> bool {
    matches!(
        repo.split('/').next(),
        Some("docker.io" | "index.docker.io")
    )
}

/// kubelet's `URLsMatch`: same port, same number of host labels, each
/// label matching as a glob, and the key's path a prefix of the image's.
fn urls_match(key: &str, repo: &str) -> bool {
    let split = |s: &str| -> (String, String, String) {
        let (host, path) = match s.find('/') {
            Some(i) => (&s[..i], &s[i..]),
            None => (s, ""),
        };
        let (host, port) = host.split_once(':').unwrap_or((host, ""));
        (host.to_string(), port.to_string(), path.to_string())
    };
    let (kh, kp, kpath) = split(key);
    let (rh, rp, rpath) = split(repo);
    let (kparts, rparts): (Vec<_>, Vec<_>) = (kh.split('.').collect(), rh.split('.').collect());
    kp == rp
        && kparts.len() == rparts.len()
        && rpath.starts_with(&kpath)
        && kparts.iter().zip(&rparts).all(|(g, t)| glob(g, t))
}

/// `*` (any run of characters) and `?` (one) as Go's `filepath.Match`
/// within a host label.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    fn go(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| go(rest, &t[i..])),
            Some(('?', rest)) => !t.is_empty() && go(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    go(&p, &t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn secret(name: &str, type_: &str, key: &str, json: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            type_: Some(type_.into()),
            data: Some(BTreeMap::from([(
                key.to_string(),
                ByteString(json.as_bytes().to_vec()),
            )])),
            ..Default::default()
        }
    }

    fn users(ring: &Keyring, image: &str) -> Vec<String> {
        ring.lookup(image).into_iter().map(|a| a.username).collect()
    }

    #[test]
    fn repository_names_like_parse_image_name() {
        let cases = [
            ("busybox", "docker.io/library/busybox"),
            ("busybox:1.36", "docker.io/library/busybox"),
            ("me/app:v1", "docker.io/me/app"),
            (
                "localhost:5001/private/busybox:1.36",
                "localhost:5001/private/busybox",
            ),
            ("reg.example.com/a/b@sha256:00", "reg.example.com/a/b"),
            ("localhost/x", "localhost/x"),
        ];
        for (image, want) in cases {
            assert_eq!(repository(image), want, "{image}");
        }
    }

    #[test]
    fn keys_match_like_kubelets_keyring() {
        // user:pass in base64 is dXNlcjpwYXNz.
        let json = r#"{"auths": {
            "https://localhost:5001": {"auth": "dXNlcjpwYXNz"},
            "localhost:5001/private": {"username": "deep", "password": "p"},
            "*.example.com": {"username": "glob", "password": "p"},
            "https://index.docker.io/v1/": {"username": "hub", "password": "p"}
        }}"#;
        let (ring, errors) = Keyring::from_secrets([&secret(
            "pull",
            "kubernetes.io/dockerconfigjson",
            ".dockerconfigjson",
            json,
        )]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            users(&ring, "localhost:5001/private/busybox:1.36"),
            ["deep", "user"],
            "longest key first, then the host's"
        );
        assert_eq!(users(&ring, "localhost:5001/public/x"), ["user"]);
        assert!(
            users(&ring, "localhost:5000/private/x").is_empty(),
            "port differs"
        );
        assert_eq!(users(&ring, "reg.example.com/x"), ["glob"]);
        assert!(
            users(&ring, "a.reg.example.com/x").is_empty(),
            "label count differs"
        );
        assert_eq!(users(&ring, "busybox"), ["hub"]);
        let auth = &ring.lookup("localhost:5001/public/x")[0];
        assert_eq!(
            (auth.username.as_str(), auth.password.as_str()),
            ("user", "pass")
        );
    }

    #[test]
    fn dockercfg_and_bad_secrets() {
        let old = secret(
            "old",
            "kubernetes.io/dockercfg",
            ".dockercfg",
            r#"{"reg.local:443": {"username": "u", "password": "p"}}"#,
        );
        let broken = secret(
            "broken",
            "kubernetes.io/dockerconfigjson",
            ".dockerconfigjson",
            "{",
        );
        let bad_auth = secret(
            "bad-auth",
            "kubernetes.io/dockerconfigjson",
            ".dockerconfigjson",
            r#"{"auths": {"x.io": {"auth": "!!"}}}"#,
        );
        let opaque = secret("opaque", "Opaque", ".dockerconfigjson", "{");
        let (ring, errors) = Keyring::from_secrets([&old, &broken, &bad_auth, &opaque]);
        assert_eq!(users(&ring, "reg.local:443/app"), ["u"]);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(matches!(errors[1], KeyringError::BadAuth { .. }));
    }
}
