//! Faults on command: `<state>/faults.json` maps a CSI method name to what
//! the next calls of it do, re-read on every call:
//!
//! ```json
//! {"NodeStageVolume":   {"code": "Unavailable", "times": 2},
//!  "NodePublishVolume": {"hang_ms": 30000},
//!  "CreateVolume":      {"code": "Internal", "after": true, "message": "lost"}}
//! ```
//!
//! `code` fails the call with that gRPC code (its name, as tonic or the spec
//! spells it); `hang_ms` delays it first; `after` does the work before
//! failing (an answer lost on the way); `times` limits how many calls are hit
//! (counted down in the file; absent = every call).
//!
//! Side effects: reads the file, rewrites it when `times` counts down.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::state::write_atomic;

/// What to do to one method's calls.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hang_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub after: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u32>,
}

/// The fault one call gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub hang: Option<Duration>,
    /// The code to fail with, and its message.
    pub fail: Option<(tonic::Code, String)>,
    /// Fail after doing the work rather than before.
    pub after: bool,
}

/// A gRPC code by name: "Unavailable", "FAILED_PRECONDITION", "failedprecondition".
pub fn parse_code(name: &str) -> Option<tonic::Code> {
    use tonic::Code::*;
    let key: String = name
        .chars()
        .filter(|c| *c != '_')
        .collect::<String>()
        .to_ascii_lowercase();
    Some(match key.as_str() {
        "ok" => Ok,
        "cancelled" | "canceled" => Cancelled,
        "unknown" => Unknown,
        "invalidargument" => InvalidArgument,
        "deadlineexceeded" => DeadlineExceeded,
        "notfound" => NotFound,
        "alreadyexists" => AlreadyExists,
        "permissiondenied" => PermissionDenied,
        "resourceexhausted" => ResourceExhausted,
        "failedprecondition" => FailedPrecondition,
        "aborted" => Aborted,
        "outofrange" => OutOfRange,
        "unimplemented" => Unimplemented,
        "internal" => Internal,
        "unavailable" => Unavailable,
        "dataloss" => DataLoss,
        "unauthenticated" => Unauthenticated,
        _ => return None,
    })
}

/// The control file of one state dir.
pub struct Faults {
    path: PathBuf,
    // Read-count-down-write is one step for concurrent calls.
    lock: Mutex<()>,
}

impl Faults {
    pub fn new(state_dir: &Path) -> Faults {
        Faults {
            path: state_dir.join("faults.json"),
            lock: Mutex::new(()),
        }
    }

    /// The fault for this call of `method`, if any (counting it down).
    /// A file that does not parse hits nothing, with a warning.
    pub fn take(&self, method: &str) -> Option<Hit> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let text = std::fs::read(&self.path).ok()?;
        let mut all: BTreeMap<String, Fault> = match serde_json::from_slice(&text) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "faults file ignored");
                return None;
            }
        };
        let fault = all.get_mut(method)?;
        match &mut fault.times {
            Some(0) => return None,
            Some(n) => *n -= 1,
            None => {}
        }
        let hit = Hit {
            hang: fault.hang_ms.map(Duration::from_millis),
            fail: fault.code.as_deref().map(|c| {
                let code = parse_code(c).unwrap_or(tonic::Code::Internal);
                let msg = fault
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("injected fault: {method} {c}"));
                (code, msg)
            }),
            after: fault.after,
        };
        if fault.times.is_some() {
            let bytes = serde_json::to_vec_pretty(&all).unwrap_or_default();
            if let Err(e) = write_atomic(&self.path, &bytes) {
                tracing::warn!(error = %e, "cannot count the fault down");
            }
        }
        Some(hit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_parse_in_either_spelling() {
        assert_eq!(parse_code("Unavailable"), Some(tonic::Code::Unavailable));
        assert_eq!(
            parse_code("FAILED_PRECONDITION"),
            Some(tonic::Code::FailedPrecondition)
        );
        assert_eq!(parse_code("nope"), None);
    }

    #[test]
    fn times_count_down_and_other_methods_pass() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("faults.json"),
            r#"{"NodeStageVolume": {"code": "Unavailable", "times": 2},
                "NodePublishVolume": {"hang_ms": 5}}"#,
        )
        .unwrap();
        let f = Faults::new(dir.path());
        for _ in 0..2 {
            let hit = f.take("NodeStageVolume").unwrap();
            assert_eq!(hit.fail.unwrap().0, tonic::Code::Unavailable);
        }
        assert_eq!(f.take("NodeStageVolume"), None);
        assert_eq!(f.take("NodeUnstageVolume"), None);
        // No count: every call hangs.
        for _ in 0..3 {
            let hit = f.take("NodePublishVolume").unwrap();
            assert_eq!(hit.hang, Some(Duration::from_millis(5)));
            assert_eq!(hit.fail, None);
        }
    }

    #[test]
    fn no_file_or_a_bad_one_hits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = Faults::new(dir.path());
        assert_eq!(f.take("Probe"), None);
        std::fs::write(dir.path().join("faults.json"), "{not json").unwrap();
        assert_eq!(f.take("Probe"), None);
    }
}
