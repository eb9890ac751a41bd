//! The result cache: what a successful ADD returned, kept on disk per
//! (network name, container id, ifname) so DEL, CHECK and GC can pass it as
//! `prevResult` — also after an agent restart. An entry without `result` is
//! pending: written before ADD's plugins run (see `chain`).
//!
//! The layout is libcni's (`<cniCacheDir>/results/<net>-<containerid>-<ifname>`
//! holding a `cniCacheV1` object), so tools that read libcni caches read ours.
//!
//! Operations on one container are serialised across processes (the agent,
//! and the delegating plugin running DEL or CHECK itself while the agent is
//! down) by a per-container lock: an exclusive `flock` on
//! `<dir>/locks/<container id>`, a file that exists only while it is held.
//!
//! Side effects: creates `<dir>/results`, writes files there atomically
//! (temp file + rename), reads and removes them; creates, locks and removes
//! the lock files in `<dir>/locks`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The `kind` of libcni's cache format.
pub const CACHE_KIND: &str = "cniCacheV1";

/// Why a cache operation failed. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Creating, writing, renaming, reading, listing or removing failed.
    #[error("result cache {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The entry could not be encoded as JSON.
    #[error("encoding result cache entry {}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The blocking task writing the entry died (panicked).
    #[error("writing result cache {}", path.display())]
    Writer {
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
    /// The file is not a cache entry we can read.
    #[error("result cache {} is corrupt", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A container id that can't name a lock file (not a CNI identifier).
    #[error("container id {container_id:?} can't name a lock file")]
    BadContainerId { container_id: String },
}

/// A held per-container lock (see the module header). Dropping it removes
/// the lock file, then releases the lock: a waiter that then gets the lock
/// on the removed file notices and locks the path afresh.
#[derive(Debug)]
pub struct ContainerLock {
    path: PathBuf,
    _file: nix::fcntl::Flock<std::fs::File>,
}

impl Drop for ContainerLock {
    fn drop(&mut self) {
        // Unlink while still holding it; the flock goes with the fd after.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How long a waiter sleeps between two tries of a busy lock. Contention is
/// rare (the agent and a plugin running without it), so polling keeps the
/// waiting cancellable without parking a thread in `flock`.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// One try at a container's lock file.
enum Attempt {
    Locked(ContainerLock),
    /// Someone else holds it.
    Busy,
    /// We locked a file its holder had removed: try the path again.
    Stale,
}

fn try_lock_file(path: &Path) -> Result<Attempt, CacheError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    lock_opened(path, file)
}

/// Locks `file`, opened at `path`: it counts only if `path` still names it.
fn lock_opened(path: &Path, file: std::fs::File) -> Result<Attempt, CacheError> {
    use nix::fcntl::{Flock, FlockArg};
    use std::os::unix::fs::MetadataExt;
    let io = |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(f) => f,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(Attempt::Busy),
        Err((_, nix::errno::Errno::EINTR)) => return Ok(Attempt::Stale),
        Err((_, e)) => return Err(io(e.into())),
    };
    let ours = file.metadata().map_err(io)?;
    match std::fs::metadata(path) {
        Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => {
            Ok(Attempt::Locked(ContainerLock {
                path: path.to_path_buf(),
                _file: file,
            }))
        }
        Ok(_) => Ok(Attempt::Stale),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Attempt::Stale),
        Err(e) => Err(io(e)),
    }
}

/// One cached attachment, in libcni's field names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedAttachment {
    pub kind: String,
    pub container_id: String,
    /// The network config list the ADD ran with (base64 in the file).
    #[serde(with = "base64_bytes")]
    pub config: Vec<u8>,
    pub if_name: String,
    pub network_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub netns: String,
    /// CNI_ARGS as `[[key, value], ...]`.
    #[serde(default)]
    pub cni_args: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub capability_args: Map<String, Value>,
    /// The final result of the chain's ADD; `null` (absent in the file)
    /// while the ADD is pending: the write-ahead entry.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub result: Value,
}

/// The cache directory (`cniCacheDir`); entries live in its `results/`.
#[derive(Clone, Debug)]
pub struct ResultCache {
    dir: PathBuf,
}

impl ResultCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn results_dir(&self) -> PathBuf {
        self.dir.join("results")
    }

    /// The file of one attachment. Callers validate the three parts (no
    /// `/`), as the chain does before any plugin runs.
    pub fn path(&self, network: &str, container_id: &str, ifname: &str) -> PathBuf {
        self.results_dir()
            .join(format!("{network}-{container_id}-{ifname}"))
    }

    /// Writes an entry atomically: a reader sees the old file or the new one.
    pub async fn save(&self, entry: &CachedAttachment) -> Result<(), CacheError> {
        let path = self.path(&entry.network_name, &entry.container_id, &entry.if_name);
        let bytes = serde_json::to_vec(entry).map_err(|source| CacheError::Encode {
            path: path.clone(),
            source,
        })?;
        let dir = self.results_dir();
        let writer_path = path.clone();
        tokio::task::spawn_blocking(move || {
            write_atomic(&dir, &writer_path, &bytes, 0o600).map_err(|source| CacheError::Io {
                path: writer_path,
                source,
            })
        })
        .await
        .map_err(|source| CacheError::Writer { path, source })?
    }

    /// Reads an entry; `None` when there is none.
    pub async fn load(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<CachedAttachment>, CacheError> {
        let path = self.path(network, container_id, ifname);
        match tokio::fs::read(&path).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| CacheError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CacheError::Io { path, source }),
        }
    }

    /// Removes an entry; a missing one is fine (DEL is idempotent).
    pub async fn remove(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Result<(), CacheError> {
        let path = self.path(network, container_id, ifname);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CacheError::Io { path, source }),
        }
    }

    /// How long ago an entry was last written; `None` without one.
    pub async fn age(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Option<std::time::Duration> {
        let m = tokio::fs::metadata(self.path(network, container_id, ifname))
            .await
            .ok()?;
        Some(m.modified().ok()?.elapsed().unwrap_or_default())
    }

    fn lock_path(&self, container_id: &str) -> Result<PathBuf, CacheError> {
        if !super::config::is_identifier(container_id) {
            return Err(CacheError::BadContainerId {
                container_id: container_id.to_owned(),
            });
        }
        Ok(self.dir.join("locks").join(container_id))
    }

    /// Waits for and takes the lock of `container_id`, held until the guard
    /// drops. Not reentrant: callers serialise their own tasks first.
    pub async fn lock(&self, container_id: &str) -> Result<ContainerLock, CacheError> {
        let path = self.lock_path(container_id)?;
        loop {
            match try_lock_file(&path)? {
                Attempt::Locked(l) => return Ok(l),
                Attempt::Stale => {}
                Attempt::Busy => tokio::time::sleep(LOCK_POLL).await,
            }
        }
    }

    /// The lock of `container_id` if nobody holds it; `None` when busy.
    pub fn try_lock(&self, container_id: &str) -> Result<Option<ContainerLock>, CacheError> {
        let path = self.lock_path(container_id)?;
        loop {
            match try_lock_file(&path)? {
                Attempt::Locked(l) => return Ok(Some(l)),
                Attempt::Stale => {}
                Attempt::Busy => return Ok(None),
            }
        }
    }

    /// Removes the lock files nobody holds: a process killed while holding
    /// a lock leaves its file behind (harmless, but it would stay forever
    /// once nothing touches its container again). Returns the container ids
    /// whose files went.
    pub fn remove_idle_locks(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.dir.join("locks")) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for name in rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
        {
            // Taking it and letting it go removes the file.
            if let Ok(Some(lock)) = self.try_lock(&name) {
                drop(lock);
                removed.push(name);
            }
        }
        removed.sort();
        removed
    }

    /// Every readable entry of kind `cniCacheV1`, for GC: files that are not
    /// entries (temp files, other kinds, corrupt ones) are skipped.
    pub async fn list(&self) -> Result<Vec<CachedAttachment>, CacheError> {
        let dir = self.results_dir();
        let mut rd = match tokio::fs::read_dir(&dir).await {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(CacheError::Io { path: dir, source }),
        };
        let mut out = Vec::new();
        loop {
            let entry = match rd.next_entry().await {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(source) => return Err(CacheError::Io { path: dir, source }),
            };
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let Ok(bytes) = tokio::fs::read(entry.path()).await else {
                continue;
            };
            if let Ok(e) = serde_json::from_slice::<CachedAttachment>(&bytes)
                && e.kind == CACHE_KIND
            {
                out.push(e);
            }
        }
        out.sort_by(|a, b| {
            (&a.network_name, &a.container_id, &a.if_name).cmp(&(
                &b.network_name,
                &b.container_id,
                &b.if_name,
            ))
        });
        Ok(out)
    }
}

/// Writes `bytes` to `path` via a temp file in `dir` (same file system, so
/// the rename is atomic), fsynced before the rename; creates `dir`.
pub(crate) fn write_atomic(
    dir: &Path,
    path: &Path,
    bytes: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // `mode` above is filtered by the umask; set it exactly.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Standard base64 (RFC 4648, with padding), as Go encodes `[]byte` in JSON.
mod base64_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(input: &[u8]) -> String {
        let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub fn decode(input: &str) -> Option<Vec<u8>> {
        let input = input.as_bytes();
        if !input.len().is_multiple_of(4) {
            return None;
        }
        let mut out = Vec::with_capacity(input.len() / 4 * 3);
        for (ci, chunk) in input.chunks(4).enumerate() {
            let last = ci == input.len() / 4 - 1;
            let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
            if pad > 2 || (pad > 0 && !last) {
                return None;
            }
            let mut n = 0u32;
            for &c in &chunk[..4 - pad] {
                let v = ALPHABET.iter().position(|&a| a == c)? as u32;
                n = (n << 6) | v;
            }
            n <<= 6 * pad as u32;
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&bytes[..3 - pad]);
        }
        Some(out)
    }

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        decode(&s).ok_or_else(|| D::Error::custom("invalid base64"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, enc) in cases {
            assert_eq!(base64_bytes::encode(plain.as_bytes()), enc);
            assert_eq!(base64_bytes::decode(enc).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(
            base64_bytes::decode(&base64_bytes::encode(&all)).unwrap(),
            all
        );
        for bad in ["Zg=", "Z===", "Zg==Zm8=", "Zm9*"] {
            assert!(base64_bytes::decode(bad).is_none(), "{bad}");
        }
    }

    fn entry(cid: &str) -> CachedAttachment {
        CachedAttachment {
            kind: CACHE_KIND.into(),
            container_id: cid.into(),
            config: br#"{"name":"net"}"#.to_vec(),
            if_name: "eth0".into(),
            network_name: "net".into(),
            netns: "/var/run/netns/x".into(),
            cni_args: vec![("K8S_POD_NAME".into(), "p".into())],
            capability_args: serde_json::json!({"portMappings": []})
                .as_object()
                .unwrap()
                .clone(),
            result: serde_json::json!({"cniVersion": "1.0.0", "ips": []}),
        }
    }

    #[tokio::test]
    async fn container_lock_excludes_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        // Two caches on one dir stand for two processes: flock excludes
        // across open files, so this is what another process would meet.
        let (a, b) = (ResultCache::new(dir.path()), ResultCache::new(dir.path()));
        let lock_file = dir.path().join("locks/c1");
        let held = a.lock("c1").await.unwrap();
        assert!(lock_file.exists());
        assert!(b.try_lock("c1").unwrap().is_none(), "busy while held");
        assert!(b.try_lock("c2").unwrap().is_some(), "other containers free");
        let waiter = tokio::spawn(async move { b.lock("c1").await.unwrap() });
        tokio::time::sleep(LOCK_POLL * 4).await;
        assert!(!waiter.is_finished(), "the waiter waits");
        drop(held);
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        // The waiter locked the path afresh (the first holder removed its
        // file), so a third party is excluded by the same file.
        assert!(lock_file.exists());
        assert!(a.try_lock("c1").unwrap().is_none());
        drop(second);
        assert!(!lock_file.exists(), "no lock file outlives its lock");
        assert!(a.try_lock("c1").unwrap().is_some());
        assert!(matches!(
            a.try_lock("../escape"),
            Err(CacheError::BadContainerId { .. })
        ));
    }

    #[test]
    fn a_lock_won_on_a_removed_file_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c1");
        // The waiter opened the file, then its holder removed it (and maybe
        // a third party made a new one) before the waiter's flock succeeded.
        let opened = std::fs::File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            lock_opened(&path, opened).unwrap(),
            Attempt::Stale
        ));
        let opened = std::fs::File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "").unwrap();
        assert!(matches!(
            lock_opened(&path, opened).unwrap(),
            Attempt::Stale
        ));
        let opened = std::fs::File::open(&path).unwrap();
        assert!(matches!(
            lock_opened(&path, opened).unwrap(),
            Attempt::Locked(_)
        ));
    }

    #[tokio::test]
    async fn save_load_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ResultCache::new(dir.path());
        assert!(cache.load("net", "c1", "eth0").await.unwrap().is_none());
        assert!(cache.list().await.unwrap().is_empty());
        cache.save(&entry("c1")).await.unwrap();
        cache.save(&entry("c2")).await.unwrap();

        let path = dir.path().join("results/net-c1-eth0");
        let raw: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        // libcni's field names and encodings.
        assert_eq!(raw["kind"], "cniCacheV1");
        assert_eq!(raw["containerId"], "c1");
        assert_eq!(raw["config"], "eyJuYW1lIjoibmV0In0=");
        assert_eq!(raw["ifName"], "eth0");
        assert_eq!(raw["networkName"], "net");
        assert_eq!(raw["cniArgs"], serde_json::json!([["K8S_POD_NAME", "p"]]));
        assert_eq!(
            raw["capabilityArgs"],
            serde_json::json!({"portMappings": []})
        );
        assert_eq!(raw["result"]["cniVersion"], "1.0.0");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        assert_eq!(
            cache.load("net", "c1", "eth0").await.unwrap().unwrap(),
            entry("c1")
        );
        std::fs::write(dir.path().join("results/junk"), "x").unwrap();
        std::fs::write(dir.path().join("results/.net-c3-eth0.tmp1"), "x").unwrap();
        let ids: Vec<_> = cache
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.container_id)
            .collect();
        assert_eq!(ids, ["c1", "c2"]);

        cache.remove("net", "c1", "eth0").await.unwrap();
        cache.remove("net", "c1", "eth0").await.unwrap();
        assert!(cache.load("net", "c1", "eth0").await.unwrap().is_none());
        assert!(matches!(cache.load("net", "junk", "x").await, Ok(None)));
        std::fs::write(cache.path("net", "c9", "eth0"), "{").unwrap();
        assert!(matches!(
            cache.load("net", "c9", "eth0").await,
            Err(CacheError::Corrupt { .. })
        ));
    }
}
