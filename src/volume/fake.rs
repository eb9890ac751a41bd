//! A fake external volume plugin (tests only): handles inline `csi`
//! volumes under the plugin dir `fake~csi`, makes `<dir>/mount` on set-up
//! and removes the volume dir on tear-down, records every call, and can be
//! told to fail either. No mounts.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Pod, Volume};

use super::{External, VolumeError};

/// Called with each call's text as it is made ("set_up a"), so a test can
/// see what else had happened by then.
pub type Witness = Box<dyn Fn(&str) + Send + Sync>;

#[derive(Default)]
pub struct FakeExternal {
    calls: Mutex<Vec<String>>,
    set_up_error: Mutex<String>,
    tear_down_error: Mutex<String>,
    witness: Mutex<Option<Witness>>,
}

impl FakeExternal {
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    /// Fail every set-up with this reason ("" to stop failing).
    pub fn fail_set_up(&self, reason: &str) {
        *self.set_up_error.lock().unwrap() = reason.to_string();
    }
    /// Fail every tear-down with this reason ("" to stop failing).
    pub fn fail_tear_down(&self, reason: &str) {
        *self.tear_down_error.lock().unwrap() = reason.to_string();
    }
    pub fn witness(&self, w: Witness) {
        *self.witness.lock().unwrap() = Some(w);
    }
    fn record(&self, call: String) {
        if let Some(w) = &*self.witness.lock().unwrap() {
            w(&call);
        }
        self.calls.lock().unwrap().push(call);
    }
}

impl External for FakeExternal {
    fn plugin_dir(&self) -> &'static str {
        "fake~csi"
    }

    fn handles(&self, _pod: &Pod, volume: &Volume) -> bool {
        volume.csi.is_some()
    }

    fn set_up<'a>(
        &'a self,
        _pod: &'a Pod,
        volume: &'a Volume,
        pod_dir: &'a Path,
    ) -> BoxFuture<'a, Result<PathBuf, VolumeError>> {
        Box::pin(async move {
            self.record(format!("set_up {}", volume.name));
            let reason = self.set_up_error.lock().unwrap().clone();
            if !reason.is_empty() {
                return Err(VolumeError::SetUp {
                    volume: volume.name.clone(),
                    reason,
                });
            }
            let dir = pod_dir
                .join("volumes")
                .join(self.plugin_dir())
                .join(&volume.name)
                .join("mount");
            fs::create_dir_all(&dir).map_err(|e| VolumeError::SetUp {
                volume: volume.name.clone(),
                reason: e.to_string(),
            })?;
            Ok(dir)
        })
    }

    fn tear_down<'a>(
        &'a self,
        pod_uid: &'a str,
        volume_dir: &'a Path,
    ) -> BoxFuture<'a, Result<(), VolumeError>> {
        Box::pin(async move {
            let name = volume_dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            self.record(format!("tear_down {pod_uid} {name}"));
            let reason = self.tear_down_error.lock().unwrap().clone();
            if !reason.is_empty() {
                return Err(VolumeError::TearDown {
                    volume: name,
                    reason,
                });
            }
            fs::remove_dir_all(volume_dir).map_err(|e| VolumeError::TearDown {
                volume: name,
                reason: e.to_string(),
            })
        })
    }
}
