//! A hand-written in-memory runtime for unit tests of one module: it keeps
//! sandboxes, containers and images in a map, records every call, lets a
//! test script failures and container exits. Never used end to end.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::{CriError, Labels, Result, Runtime, api};

#[derive(Default)]
struct State {
    next_id: u64,
    now: i64,
    sandboxes: Vec<api::PodSandboxStatus>,
    containers: Vec<(api::ContainerStatus, String)>,
    images: HashSet<String>,
    calls: Vec<String>,
    /// Method name → message of a `Rejected` error for its next call.
    fail_next: HashMap<String, String>,
    /// Methods whose next call panics (a bug in the caller's task).
    panic_next: HashSet<String>,
}

/// The fake. Timestamps advance by one second per mutating call.
#[derive(Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
}

fn matches(labels: &HashMap<String, String>, selector: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl FakeRuntime {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn with_images(images: &[&str]) -> Self {
        let f = Self::default();
        f.state.lock().unwrap().images = images.iter().map(|s| s.to_string()).collect();
        f
    }
    /// Every call so far, as "Method arg".
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }
    pub fn clear_calls(&self) {
        self.state.lock().unwrap().calls.clear();
    }
    /// The next call of `method` fails with a permanent error.
    pub fn fail_next(&self, method: &str, message: &str) {
        self.state
            .lock()
            .unwrap()
            .fail_next
            .insert(method.to_string(), message.to_string());
    }
    /// The next call of `method` panics, as a bug on the caller's path would.
    pub fn panic_next(&self, method: &str) {
        self.state
            .lock()
            .unwrap()
            .panic_next
            .insert(method.to_string());
    }
    /// The container's process exits with `code`.
    pub fn exit_container(&self, id: &str, code: i32) {
        let mut s = self.state.lock().unwrap();
        s.now += 1;
        let now = s.now;
        if let Some((c, _)) = s.containers.iter_mut().find(|(c, _)| c.id == id) {
            c.state = api::ContainerState::ContainerExited as i32;
            c.exit_code = code;
            c.finished_at = now * 1_000_000_000;
            c.reason = if code == 0 { "Completed" } else { "Error" }.into();
        }
    }
    pub fn sandboxes(&self) -> Vec<api::PodSandboxStatus> {
        self.state.lock().unwrap().sandboxes.clone()
    }
    pub fn containers(&self) -> Vec<api::ContainerStatus> {
        let s = self.state.lock().unwrap();
        s.containers.iter().map(|(c, _)| c.clone()).collect()
    }

    fn begin(&self, method: &str, arg: &str) -> Result<std::sync::MutexGuard<'_, State>> {
        let mut s = self.state.lock().unwrap();
        s.calls
            .push(format!("{method} {arg}").trim_end().to_string());
        s.now += 1;
        if s.panic_next.remove(method) {
            // Not while holding the lock: the fake must outlive the panic.
            drop(s);
            panic!("fake runtime: scripted panic in {method}");
        }
        if let Some(message) = s.fail_next.remove(method) {
            return Err(CriError::Rejected {
                op: "fake",
                message: message.clone(),
                source: tonic::Status::unknown(message),
            });
        }
        Ok(s)
    }
}

fn not_found(op: &'static str, id: &str) -> CriError {
    CriError::NotFound {
        op,
        id: id.to_string(),
    }
}

impl Runtime for FakeRuntime {
    async fn version(&self) -> Result<(String, String)> {
        let _state = self.begin("Version", "")?;
        Ok(("fake".into(), "0.0.0".into()))
    }

    async fn run_pod_sandbox(&self, config: api::PodSandboxConfig) -> Result<String> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let mut s = self.begin("RunPodSandbox", &name)?;
        s.next_id += 1;
        let id = format!("sb{}", s.next_id);
        let now = s.now;
        let ip = format!("10.0.0.{}", s.next_id);
        s.sandboxes.push(api::PodSandboxStatus {
            id: id.clone(),
            metadata: config.metadata,
            state: api::PodSandboxState::SandboxReady as i32,
            created_at: now * 1_000_000_000,
            network: Some(api::PodSandboxNetworkStatus {
                ip,
                ..Default::default()
            }),
            labels: config.labels,
            annotations: config.annotations,
            ..Default::default()
        });
        Ok(id)
    }

    async fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
        let mut s = self.begin("StopPodSandbox", id)?;
        let now = s.now;
        let sb = s.sandboxes.iter_mut().find(|sb| sb.id == id);
        let Some(sb) = sb else {
            return Err(not_found("StopPodSandbox", id));
        };
        sb.state = api::PodSandboxState::SandboxNotready as i32;
        for (c, sandbox) in s.containers.iter_mut() {
            if sandbox == id && c.state == api::ContainerState::ContainerRunning as i32 {
                c.state = api::ContainerState::ContainerExited as i32;
                c.exit_code = 137;
                c.finished_at = now * 1_000_000_000;
            }
        }
        Ok(())
    }

    async fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        let mut s = self.begin("RemovePodSandbox", id)?;
        let before = s.sandboxes.len();
        s.sandboxes.retain(|sb| sb.id != id);
        if s.sandboxes.len() == before {
            return Err(not_found("RemovePodSandbox", id));
        }
        s.containers.retain(|(_, sandbox)| sandbox != id);
        Ok(())
    }

    async fn pod_sandbox_status(&self, id: &str) -> Result<api::PodSandboxStatus> {
        let s = self.begin("PodSandboxStatus", id)?;
        s.sandboxes
            .iter()
            .find(|sb| sb.id == id)
            .cloned()
            .ok_or_else(|| not_found("PodSandboxStatus", id))
    }

    async fn list_pod_sandboxes(&self, labels: Labels) -> Result<Vec<api::PodSandbox>> {
        let s = self.begin("ListPodSandbox", "")?;
        Ok(s.sandboxes
            .iter()
            .filter(|sb| matches(&sb.labels, &labels))
            .map(|sb| api::PodSandbox {
                id: sb.id.clone(),
                metadata: sb.metadata.clone(),
                state: sb.state,
                created_at: sb.created_at,
                labels: sb.labels.clone(),
                annotations: sb.annotations.clone(),
                runtime_handler: String::new(),
            })
            .collect())
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: api::ContainerConfig,
        _sandbox_config: api::PodSandboxConfig,
    ) -> Result<String> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let mut s = self.begin("CreateContainer", &name)?;
        if !s.sandboxes.iter().any(|sb| sb.id == sandbox_id) {
            return Err(not_found("CreateContainer", sandbox_id));
        }
        s.next_id += 1;
        let id = format!("c{}", s.next_id);
        let now = s.now;
        let status = api::ContainerStatus {
            id: id.clone(),
            metadata: config.metadata,
            state: api::ContainerState::ContainerCreated as i32,
            created_at: now * 1_000_000_000,
            image: config.image,
            labels: config.labels,
            annotations: config.annotations,
            mounts: config.mounts,
            log_path: config.log_path,
            ..Default::default()
        };
        s.containers.push((status, sandbox_id.to_string()));
        Ok(id)
    }

    async fn start_container(&self, id: &str) -> Result<()> {
        let mut s = self.begin("StartContainer", id)?;
        let now = s.now;
        let (c, _) = s
            .containers
            .iter_mut()
            .find(|(c, _)| c.id == id)
            .ok_or_else(|| not_found("StartContainer", id))?;
        c.state = api::ContainerState::ContainerRunning as i32;
        c.started_at = now * 1_000_000_000;
        Ok(())
    }

    async fn stop_container(&self, id: &str, timeout: i64) -> Result<()> {
        let mut s = self.begin("StopContainer", &format!("{id} grace={timeout}"))?;
        let now = s.now;
        let (c, _) = s
            .containers
            .iter_mut()
            .find(|(c, _)| c.id == id)
            .ok_or_else(|| not_found("StopContainer", id))?;
        if c.state == api::ContainerState::ContainerRunning as i32 {
            c.state = api::ContainerState::ContainerExited as i32;
            c.exit_code = 137;
            c.finished_at = now * 1_000_000_000;
        }
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<()> {
        let mut s = self.begin("RemoveContainer", id)?;
        let before = s.containers.len();
        s.containers.retain(|(c, _)| c.id != id);
        if s.containers.len() == before {
            return Err(not_found("RemoveContainer", id));
        }
        Ok(())
    }

    async fn list_containers(&self, labels: Labels) -> Result<Vec<api::Container>> {
        let s = self.begin("ListContainers", "")?;
        Ok(s.containers
            .iter()
            .filter(|(c, _)| matches(&c.labels, &labels))
            .map(|(c, sandbox)| api::Container {
                id: c.id.clone(),
                pod_sandbox_id: sandbox.clone(),
                metadata: c.metadata.clone(),
                image: c.image.clone(),
                image_ref: String::new(),
                state: c.state,
                created_at: c.created_at,
                labels: c.labels.clone(),
                annotations: c.annotations.clone(),
                ..Default::default()
            })
            .collect())
    }

    async fn container_status(&self, id: &str) -> Result<api::ContainerStatus> {
        let s = self.begin("ContainerStatus", id)?;
        s.containers
            .iter()
            .find(|(c, _)| c.id == id)
            .map(|(c, _)| c.clone())
            .ok_or_else(|| not_found("ContainerStatus", id))
    }

    async fn image_status(&self, image: &str) -> Result<Option<api::Image>> {
        let s = self.begin("ImageStatus", image)?;
        Ok(s.images.contains(image).then(|| api::Image {
            id: format!("sha256:{image}"),
            ..Default::default()
        }))
    }

    async fn pull_image(
        &self,
        image: &str,
        _sandbox_config: api::PodSandboxConfig,
    ) -> Result<String> {
        let mut s = self.begin("PullImage", image)?;
        s.images.insert(image.to_string());
        Ok(format!("sha256:{image}"))
    }
}
