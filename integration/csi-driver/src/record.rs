//! The call log: one JSON line per CSI call in `<state>/calls.jsonl`, written
//! when the call returns, so end-to-end tests can assert what the agent
//! asked and in which order.
//!
//! Side effects: appends to that file (one write per line, O_APPEND, so
//! lines of concurrent calls never interleave).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One finished call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Call {
    /// The gRPC method name, e.g. "NodeStageVolume".
    pub method: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub volume_id: String,
    /// CreateVolume's name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub staging_path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target_path: String,
    /// NodePublishVolume: the pod named in volume_context
    /// (`csi.storage.k8s.io/pod.name`), when the CO passed pod info.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod: String,
    /// The gRPC code's name: "OK", "NotFound", "FailedPrecondition", …
    pub code: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Unix time in milliseconds when the call arrived and returned.
    pub start_ms: u64,
    pub end_ms: u64,
}

/// Appends calls to the log.
pub struct Recorder {
    path: PathBuf,
    // One writer at a time keeps the file's order the order of `record`s.
    lock: Mutex<()>,
}

impl Recorder {
    pub fn new(state_dir: &Path) -> Recorder {
        Recorder {
            path: state_dir.join("calls.jsonl"),
            lock: Mutex::new(()),
        }
    }

    /// Append one call. A log that can't be written is reported, not fatal:
    /// the call itself has already been answered.
    pub fn record(&self, call: &Call) {
        let mut line = serde_json::to_vec(call).unwrap_or_default();
        line.push(b'\n');
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(&line));
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot record call");
        }
    }
}

/// Read a call log (unparseable lines are skipped).
pub fn read_calls(path: &Path) -> Vec<Call> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_append_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let r = Recorder::new(dir.path());
        for m in ["NodeStageVolume", "NodePublishVolume"] {
            r.record(&Call {
                method: m.into(),
                volume_id: "v".into(),
                code: "OK".into(),
                ..Call::default()
            });
        }
        let calls = read_calls(&dir.path().join("calls.jsonl"));
        let methods: Vec<_> = calls.iter().map(|c| c.method.as_str()).collect();
        assert_eq!(methods, ["NodeStageVolume", "NodePublishVolume"]);
        assert_eq!(calls[0].volume_id, "v");
    }
}
