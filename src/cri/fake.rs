//! A hand-written in-memory runtime for unit tests of one module: it keeps
//! sandboxes, containers and images in a map, records every call with the
//! time it was made, lets a test script failures, container exits and slow
//! calls. Its timestamps come from a `FakeClock` that follows tokio's
//! (pausable) time, the same clock the worker under test reads, so backoffs
//! measured against the fake's `finished_at` mean what they mean on a node.
//! Never used end to end.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{CriError, Labels, Result, Runtime, api};
use crate::clock::Clock;

/// Wall time that advances with tokio's clock: paused in
/// `#[tokio::test(start_paused = true)]`, so simulated minutes cost nothing.
#[derive(Debug)]
pub struct FakeClock {
    base_ns: i64,
    start: tokio::time::Instant,
}

impl Default for FakeClock {
    fn default() -> Self {
        FakeClock {
            // A plausible wall time, far from 0 (0 means "unset" in CRI).
            base_ns: 1_800_000_000 * 1_000_000_000,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for FakeClock {
    fn now_ns(&self) -> i64 {
        self.base_ns + self.start.elapsed().as_nanos() as i64
    }
}

/// A scripted failure: calls of `method` whose argument starts with `arg`.
struct Fault {
    method: String,
    arg: String,
    message: String,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// The last timestamp handed out: stamps are strictly increasing.
    last_stamp: i64,
    sandboxes: Vec<api::PodSandboxStatus>,
    containers: Vec<(api::ContainerStatus, String)>,
    images: HashSet<String>,
    calls: Vec<(i64, String)>,
    /// Method name → message of a `Rejected` error for its next call.
    fail_next: HashMap<String, String>,
    /// Methods whose next call panics (a bug in the caller's task).
    panic_next: HashSet<String>,
    /// Failures of every matching call, until cleared.
    faults: Vec<Fault>,
    /// Container name → (how long its process runs after a start, exit code).
    exit_after: HashMap<String, (Duration, i32)>,
    /// Container names whose process survives StopContainer (which still
    /// answers OK), as an unkillable process or a lagging runtime does.
    ignore_stop: HashSet<String>,
    /// Sandboxes stop being ready this long after they were made.
    sandbox_dies_after: Option<Duration>,
    /// Each mutating call takes this long (tokio time).
    latency: Duration,
    in_flight: usize,
    peak_in_flight: usize,
    /// Images that pull only with these (username, password).
    private: HashMap<String, (String, String)>,
    /// Every PullImage: image and the (username, password) it carried.
    pull_auths: Vec<(String, Option<(String, String)>)>,
}

impl State {
    fn stamp(&mut self, clock: &FakeClock) -> i64 {
        self.last_stamp = clock.now_ns().max(self.last_stamp + 1);
        self.last_stamp
    }
    /// Processes scripted with `exit_after` that are due by `now` exit, at
    /// the time they were due.
    fn apply_exits(&mut self, now: i64) {
        if let Some(after) = self.sandbox_dies_after {
            for sb in self.sandboxes.iter_mut() {
                if sb.created_at + after.as_nanos() as i64 <= now {
                    sb.state = api::PodSandboxState::SandboxNotready as i32;
                }
            }
        }
        for (c, _) in self.containers.iter_mut() {
            let name = c.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or("");
            let Some(&(after, code)) = self.exit_after.get(name) else {
                continue;
            };
            let due = c.started_at + after.as_nanos() as i64;
            if c.state == api::ContainerState::ContainerRunning as i32 && due <= now {
                exit(c, code, due);
            }
        }
    }
}

fn exit(c: &mut api::ContainerStatus, code: i32, at: i64) {
    c.state = api::ContainerState::ContainerExited as i32;
    c.exit_code = code;
    c.finished_at = at;
    c.reason = if code == 0 { "Completed" } else { "Error" }.into();
}

/// The fake. Every call is stamped with its clock's time.
#[derive(Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
    clock: Arc<FakeClock>,
}

/// Counts a mutating call in flight while it lives.
struct InFlight<'a>(&'a FakeRuntime);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().in_flight -= 1;
    }
}

fn matches(labels: &HashMap<String, String>, selector: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn name_of(c: &api::ContainerStatus) -> &str {
    c.metadata.as_ref().map_or("", |m| m.name.as_str())
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
    /// The clock the fake stamps its objects with; give the code under test
    /// the same one.
    pub fn clock(&self) -> Arc<FakeClock> {
        self.clock.clone()
    }
    /// Every call so far, as "Method arg".
    pub fn calls(&self) -> Vec<String> {
        let s = self.state.lock().unwrap();
        s.calls.iter().map(|(_, c)| c.clone()).collect()
    }
    /// Every call so far with the clock's time when it was made.
    pub fn calls_at(&self) -> Vec<(i64, String)> {
        self.state.lock().unwrap().calls.clone()
    }
    /// How many calls so far start with `prefix` (e.g. "StopContainer").
    pub fn count(&self, prefix: &str) -> usize {
        let s = self.state.lock().unwrap();
        s.calls
            .iter()
            .filter(|(_, c)| c.starts_with(prefix))
            .count()
    }
    pub fn clear_calls(&self) {
        self.state.lock().unwrap().calls.clear();
    }
    /// `image` pulls only with these credentials (a registry behind auth).
    pub fn private_image(&self, image: &str, username: &str, password: &str) {
        self.state.lock().unwrap().private.insert(
            image.to_string(),
            (username.to_string(), password.to_string()),
        );
    }
    /// Every PullImage so far: the image and the (username, password) sent.
    pub fn pull_auths(&self) -> Vec<(String, Option<(String, String)>)> {
        self.state.lock().unwrap().pull_auths.clone()
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
    /// Every call of `method` whose argument starts with `arg` fails, until
    /// `clear_faults`.
    pub fn fail_always(&self, method: &str, arg: &str, message: &str) {
        self.state.lock().unwrap().faults.push(Fault {
            method: method.into(),
            arg: arg.into(),
            message: message.into(),
        });
    }
    pub fn clear_faults(&self) {
        self.state.lock().unwrap().faults.clear();
    }
    /// Processes of containers named `name` exit with `code` `after` their
    /// start (checked against the clock on every call).
    pub fn exit_after(&self, name: &str, after: Duration, code: i32) {
        self.state
            .lock()
            .unwrap()
            .exit_after
            .insert(name.into(), (after, code));
    }
    /// Every sandbox stops being ready `after` it was made (its pause
    /// process dies), as a broken network or runtime handler does.
    pub fn sandboxes_die_after(&self, after: Duration) {
        self.state.lock().unwrap().sandbox_dies_after = Some(after);
    }
    /// StopContainer answers OK for containers named `name` but leaves them running.
    pub fn ignore_stop(&self, name: &str) {
        self.state.lock().unwrap().ignore_stop.insert(name.into());
    }
    /// Every mutating call takes `d` of tokio time, so calls can overlap;
    /// the peak of calls in flight is counted afresh from here.
    pub fn set_latency(&self, d: Duration) {
        let mut s = self.state.lock().unwrap();
        s.latency = d;
        s.peak_in_flight = s.in_flight;
    }
    /// The most mutating calls that were in flight at once.
    pub fn peak_in_flight(&self) -> usize {
        self.state.lock().unwrap().peak_in_flight
    }
    /// The container's process exits with `code`, now.
    pub fn exit_container(&self, id: &str, code: i32) {
        let mut s = self.state.lock().unwrap();
        let now = s.stamp(&self.clock);
        if let Some((c, _)) = s.containers.iter_mut().find(|(c, _)| c.id == id) {
            exit(c, code, now);
        }
    }
    pub fn sandboxes(&self) -> Vec<api::PodSandboxStatus> {
        self.state.lock().unwrap().sandboxes.clone()
    }
    pub fn containers(&self) -> Vec<api::ContainerStatus> {
        let mut s = self.state.lock().unwrap();
        let now = self.clock.now_ns();
        s.apply_exits(now);
        s.containers.iter().map(|(c, _)| c.clone()).collect()
    }

    /// Count a mutating call in flight and let it take the scripted latency.
    async fn enter(&self) -> InFlight<'_> {
        let latency = {
            let mut s = self.state.lock().unwrap();
            s.in_flight += 1;
            s.peak_in_flight = s.peak_in_flight.max(s.in_flight);
            s.latency
        };
        let guard = InFlight(self);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        guard
    }

    fn begin(&self, method: &str, arg: &str) -> Result<std::sync::MutexGuard<'_, State>> {
        let mut s = self.state.lock().unwrap();
        let now = s.stamp(&self.clock);
        s.apply_exits(now);
        s.calls
            .push((now, format!("{method} {arg}").trim_end().to_string()));
        if s.panic_next.remove(method) {
            // Not while holding the lock: the fake must outlive the panic.
            drop(s);
            panic!("fake runtime: scripted panic in {method}");
        }
        let scripted = s.fail_next.remove(method).or_else(|| {
            s.faults
                .iter()
                .find(|f| f.method == method && arg.starts_with(&f.arg))
                .map(|f| f.message.clone())
        });
        if let Some(message) = scripted {
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
        let _in_flight = self.enter().await;
        let mut s = self.begin("RunPodSandbox", &name)?;
        s.next_id += 1;
        let id = format!("sb{}", s.next_id);
        let now = s.last_stamp;
        let ip = format!("10.0.0.{}", s.next_id);
        s.sandboxes.push(api::PodSandboxStatus {
            id: id.clone(),
            metadata: config.metadata,
            state: api::PodSandboxState::SandboxReady as i32,
            created_at: now,
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
        let _in_flight = self.enter().await;
        let mut s = self.begin("StopPodSandbox", id)?;
        let now = s.last_stamp;
        let sb = s.sandboxes.iter_mut().find(|sb| sb.id == id);
        let Some(sb) = sb else {
            return Err(not_found("StopPodSandbox", id));
        };
        sb.state = api::PodSandboxState::SandboxNotready as i32;
        for (c, sandbox) in s.containers.iter_mut() {
            if sandbox == id && c.state == api::ContainerState::ContainerRunning as i32 {
                exit(c, 137, now);
            }
        }
        Ok(())
    }

    async fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        let _in_flight = self.enter().await;
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
        let _in_flight = self.enter().await;
        let mut s = self.begin("CreateContainer", &name)?;
        if !s.sandboxes.iter().any(|sb| sb.id == sandbox_id) {
            return Err(not_found("CreateContainer", sandbox_id));
        }
        s.next_id += 1;
        let id = format!("c{}", s.next_id);
        let now = s.last_stamp;
        let status = api::ContainerStatus {
            id: id.clone(),
            metadata: config.metadata,
            state: api::ContainerState::ContainerCreated as i32,
            created_at: now,
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
        let _in_flight = self.enter().await;
        let mut s = self.begin("StartContainer", id)?;
        let now = s.last_stamp;
        let (c, _) = s
            .containers
            .iter_mut()
            .find(|(c, _)| c.id == id)
            .ok_or_else(|| not_found("StartContainer", id))?;
        c.state = api::ContainerState::ContainerRunning as i32;
        c.started_at = now;
        Ok(())
    }

    async fn stop_container(&self, id: &str, timeout: i64) -> Result<()> {
        let _in_flight = self.enter().await;
        let mut s = self.begin("StopContainer", &format!("{id} grace={timeout}"))?;
        let now = s.last_stamp;
        let State {
            containers,
            ignore_stop,
            ..
        } = &mut *s;
        let (c, _) = containers
            .iter_mut()
            .find(|(c, _)| c.id == id)
            .ok_or_else(|| not_found("StopContainer", id))?;
        if c.state == api::ContainerState::ContainerRunning as i32
            && !ignore_stop.contains(name_of(c))
        {
            exit(c, 137, now);
        }
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<()> {
        let _in_flight = self.enter().await;
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
        auth: Option<api::AuthConfig>,
        _sandbox_config: api::PodSandboxConfig,
    ) -> Result<String> {
        let _in_flight = self.enter().await;
        let mut s = self.begin("PullImage", image)?;
        let user = auth
            .as_ref()
            .map(|a| (a.username.clone(), a.password.clone()));
        s.pull_auths.push((image.to_string(), user.clone()));
        if let Some(want) = s.private.get(image)
            && user.as_ref() != Some(want)
        {
            // What a registry behind auth answers, through containerd.
            return Err(CriError::Rejected {
                op: "fake",
                message: "401 Unauthorized".into(),
                source: tonic::Status::unknown("401 Unauthorized"),
            });
        }
        if image.is_empty() {
            // What containerd answers for an empty reference.
            return Err(CriError::Rejected {
                op: "fake",
                message: "invalid reference format".into(),
                source: tonic::Status::invalid_argument("invalid reference format"),
            });
        }
        s.images.insert(image.to_string());
        Ok(format!("sha256:{image}"))
    }
}
