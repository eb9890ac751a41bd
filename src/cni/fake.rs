//! A hand-written `PluginExec` for unit tests of the chain and its users: it
//! records every call and scripts replies, without starting processes.
//! ADD answers with `prevResult` (or a fixed result) plus the plugin's name
//! appended to a `plugins` list, like `testdata/record.sh`; VERSION answers
//! 0.3.0…1.1.0 (or what `set_versions` says); DEL, CHECK, GC and STATUS
//! answer with nothing. Never used end to end.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

use super::exec::{Command, ExecError, PluginEnv, PluginError, PluginExec};

/// One recorded plugin run.
#[derive(Clone, Debug)]
pub struct Call {
    pub plugin: String,
    pub env: PluginEnv,
    /// The plugin's stdin, decoded.
    pub stdin: Value,
    /// When the run started (tokio's clock, so paused-time tests can compare).
    pub at: tokio::time::Instant,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    failures: HashMap<(String, Command), PluginError>,
    versions: HashMap<String, Vec<String>>,
    delay: Duration,
}

/// The fake executor.
#[derive(Default)]
pub struct FakeExec {
    state: Mutex<State>,
}

impl FakeExec {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every later `command` of `plugin` fail with `error`.
    pub fn fail(&self, plugin: &str, command: Command, error: PluginError) {
        let mut s = self.state.lock().unwrap();
        s.failures.insert((plugin.to_owned(), command), error);
    }

    /// Makes `plugin` answer VERSION with these supportedVersions.
    pub fn set_versions(&self, plugin: &str, versions: &[&str]) {
        let mut s = self.state.lock().unwrap();
        s.versions.insert(
            plugin.to_owned(),
            versions.iter().map(|v| v.to_string()).collect(),
        );
    }

    /// The calls so far other than VERSION, in order.
    pub fn op_calls(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.env.command != Command::Version)
            .collect()
    }

    /// Forgets all scripted failures.
    pub fn clear_failures(&self) {
        self.state.lock().unwrap().failures.clear();
    }

    /// Makes every run take `delay` (tokio time).
    pub fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    /// The calls so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }
}

impl PluginExec for FakeExec {
    async fn exec(
        &self,
        plugin_type: &str,
        env: &PluginEnv,
        stdin: &[u8],
    ) -> Result<Vec<u8>, ExecError> {
        let stdin: Value = serde_json::from_slice(stdin).unwrap_or(Value::Null);
        let (failure, delay) = {
            let mut s = self.state.lock().unwrap();
            s.calls.push(Call {
                plugin: plugin_type.to_owned(),
                env: env.clone(),
                stdin: stdin.clone(),
                at: tokio::time::Instant::now(),
            });
            (
                s.failures
                    .get(&(plugin_type.to_owned(), env.command))
                    .cloned(),
                s.delay,
            )
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(error) = failure {
            return Err(ExecError::Plugin {
                plugin: plugin_type.to_owned(),
                error,
            });
        }
        if env.command == Command::Version {
            let versions = self
                .state
                .lock()
                .unwrap()
                .versions
                .get(plugin_type)
                .cloned();
            let versions = versions.unwrap_or_else(|| {
                super::version::RESULT_VERSIONS
                    .iter()
                    .map(|v| v.to_string())
                    .collect()
            });
            let v = json!({"cniVersion": "1.1.0", "supportedVersions": versions});
            return Ok(serde_json::to_vec(&v).expect("JSON serialises"));
        }
        if env.command != Command::Add {
            return Ok(Vec::new());
        }
        let mut result = stdin.get("prevResult").cloned().unwrap_or_else(|| {
            json!({
                "cniVersion": stdin.get("cniVersion").cloned().unwrap_or(Value::Null),
                "interfaces": [{"name": env.ifname, "sandbox": env.netns}],
                "ips": [{"address": "10.1.2.3/24", "gateway": "10.1.2.1", "interface": 0}],
                "plugins": [],
            })
        });
        if let Some(Value::Array(list)) = result.get_mut("plugins") {
            list.push(Value::String(plugin_type.to_owned()));
        }
        Ok(serde_json::to_vec(&result).expect("JSON serialises"))
    }
}
