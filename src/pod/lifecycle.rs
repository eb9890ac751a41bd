//! The pod lifecycle: one pure step, `plan(desired, observed, memory, now)`,
//! that says what to do next. The worker executes the returned `Action`,
//! observes the runtime again and asks again (level-triggered): a crashed
//! agent resumes from whatever the runtime holds, because nothing here
//! depends on which event happened, only on what is.
//!
//! Every decision lives here: restart and pull policies (typed), the
//! volume stage (volumes set up before the sandbox and before any container
//! starts, torn down after the sandbox is removed), and every backoff (crash
//! loop, image pull, volume set-up, sandbox creation, container start,
//! repeated stops and removals) as a pure function of times the worker
//! remembers in `Memory` and times the runtime reports. No I/O here;
//! everything is table-tested.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};

use super::spec;

/// A sandbox as the runtime reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxObs {
    pub id: String,
    pub ready: bool,
    pub attempt: u32,
    /// Nanoseconds since the epoch.
    pub created_at: i64,
    /// `io.minilet.sandbox-hash` of the spec it was made from.
    pub hash: String,
    pub ip: String,
}

/// A container's runtime state (CRI ContainerState).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CState {
    Created,
    Running,
    Exited,
    Unknown,
}

/// A container as the runtime reports it (ListContainers + ContainerStatus).
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerObs {
    pub id: String,
    pub name: String,
    pub sandbox_id: String,
    pub init: bool,
    pub state: CState,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    /// Nanoseconds since the epoch (0 = unset).
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub restart_count: i32,
    pub hash: String,
    pub image: String,
    pub image_ref: String,
    /// The pod's grace period when the container was made (kubelet's
    /// annotation), for stopping pods no source describes any more.
    pub grace_period: Option<i64>,
}

impl ContainerObs {
    fn is_live(&self) -> bool {
        matches!(self.state, CState::Running | CState::Unknown)
    }
}

/// The pod's volumes as the worker sees them (the runtime knows nothing
/// of them): whether the volume stage set them up for the pod's current
/// spec (in this agent's life), and whether anything of the pod is left on
/// disk (its pod dir).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VolumesObs {
    pub set_up: bool,
    pub on_disk: bool,
}

/// Everything the runtime holds for one pod, and its volumes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    pub sandboxes: Vec<SandboxObs>,
    pub containers: Vec<ContainerObs>,
    pub volumes: VolumesObs,
}

impl Observed {
    /// The newest instance of a named container, in any sandbox.
    pub fn latest(&self, name: &str, init: bool) -> Option<&ContainerObs> {
        self.newest(name, init, None)
    }
    /// The newest instance of a named container in `sandbox` (`None`: any).
    pub fn newest(&self, name: &str, init: bool, sandbox: Option<&str>) -> Option<&ContainerObs> {
        self.containers
            .iter()
            .filter(|c| c.name == name && c.init == init)
            .filter(|c| sandbox.is_none_or(|s| c.sandbox_id == s))
            .max_by_key(|c| (c.created_at, c.restart_count))
    }
    fn latest_in(&self, sandbox: &str, name: &str, init: bool) -> Option<&ContainerObs> {
        self.newest(name, init, Some(sandbox))
    }
}

/// The pod's restartPolicy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// The pod's policy; absent counts as Always (the API server's default).
    /// Other values never reach a worker (validation rejects them); should
    /// one slip through it counts as Always, which keeps containers running.
    pub fn of(pod: &Pod) -> Self {
        match pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) {
            Some("Never") => RestartPolicy::Never,
            Some("OnFailure") => RestartPolicy::OnFailure,
            _ => RestartPolicy::Always,
        }
    }
    /// kubelet's restart rule for a container that exited with `exit_code`.
    pub fn restarts(self, exit_code: i32) -> bool {
        match self {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => exit_code != 0,
            RestartPolicy::Always => true,
        }
    }
}

/// A container's imagePullPolicy, with kubelet's defaulting (`spec::pull_policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn of(c: &Container) -> Self {
        match spec::pull_policy(c) {
            "Always" => PullPolicy::Always,
            "Never" => PullPolicy::Never,
            _ => PullPolicy::IfNotPresent,
        }
    }
}

/// Why a container is waiting, kept by the worker between steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

/// A doubling backoff's first delay and cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub start: Duration,
    pub max: Duration,
}

/// CrashLoopBackOff (kubelet: 10 s doubling to 5 min).
pub const CRASH_BACKOFF: Schedule = Schedule {
    start: Duration::from_secs(10),
    max: Duration::from_secs(300),
};
/// A container that ran this long clean resets its backoff (kubelet).
pub const CRASH_BACKOFF_RESET: Duration = Duration::from_secs(600);
/// Image pulls that failed, ErrImageNeverPull, InvalidImageName (kubelet's
/// image backoff).
pub const PULL_BACKOFF: Schedule = Schedule {
    start: Duration::from_secs(10),
    max: Duration::from_secs(300),
};
pub const SANDBOX_BACKOFF: Schedule = Schedule {
    start: Duration::from_secs(1),
    max: Duration::from_secs(60),
};
/// CreateContainerConfigError, CreateContainerError, RunContainerError:
/// kubelet retries a failing pod on its 10 s re-sync; the first retries come
/// sooner, for failures a moment cures (a volume directory, a busy runtime).
pub const START_BACKOFF: Schedule = Schedule {
    start: Duration::from_secs(1),
    max: Duration::from_secs(10),
};
/// Setting up a pod's volumes again after a failure (a missing Secret, a
/// CSI driver that is down, a claim not bound yet): kubelet's volume
/// operations back off from 500 ms (`initialDurationBeforeRetry`), and it
/// re-syncs a pod whose volumes are not ready every 10 s.
pub const VOLUME_BACKOFF: Schedule = Schedule {
    start: Duration::from_millis(500),
    max: Duration::from_secs(10),
};
/// Repeating a stop or a removal (of a container, a sandbox or the pod's
/// volumes) that failed, or that the runtime answered but did not carry out.
pub const RUNTIME_OP_BACKOFF: Schedule = Schedule {
    start: Duration::from_secs(1),
    max: Duration::from_secs(60),
};

/// Next delay of a doubling backoff.
pub fn next_delay(current: Duration, start: Duration, max: Duration) -> Duration {
    if current.is_zero() {
        start
    } else {
        (current * 2).min(max)
    }
}

fn ns(d: Duration) -> i64 {
    d.as_nanos() as i64
}

/// A remembered retry: the delay it waited last, and the time (ns since the
/// epoch) before which it must not run again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    pub delay: Duration,
    pub until: i64,
}

impl Backoff {
    /// The backoff after one more attempt at `now`: the next delay of `schedule`.
    pub fn after(prev: Option<Backoff>, schedule: Schedule, now: i64) -> Backoff {
        let delay = next_delay(
            prev.map_or(Duration::ZERO, |b| b.delay),
            schedule.start,
            schedule.max,
        );
        Backoff {
            delay,
            until: now + ns(delay),
        }
    }
}

/// `Err(until)` while a remembered backoff holds.
fn due(backoff: Option<&Backoff>, now: i64) -> Result<(), i64> {
    match backoff {
        Some(b) if b.until > now => Err(b.until),
        _ => Ok(()),
    }
}

/// A runtime call on one object that the worker must not repeat in a tight
/// loop when it fails or does not take effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    StopContainer,
    RemoveContainer,
    /// StartContainer of a container found Created (see `Action::StartCreated`).
    StartCreated,
    StopSandbox,
    RemoveSandbox,
    /// The volume stage's tear-down (object id `""`: the pod's volumes).
    TearDownVolumes,
}

/// What the worker remembers that the runtime cannot tell it: backoffs and
/// the last failure of each step. Lost on agent restart; the crash backoff
/// is then rebuilt from the runtime (`crash_delay`), the others start over.
#[derive(Clone, Debug, Default)]
pub struct Memory {
    /// Per container name: the restart count that began its current crash
    /// series (see `crash_delay`). Absent: the series began at 0.
    pub crash_series: HashMap<String, i32>,
    /// Image pull backoff per image (`""` for a container without one).
    pub pull_backoff: HashMap<String, Backoff>,
    /// Container creation/start backoff per container name.
    pub start_backoff: HashMap<String, Backoff>,
    /// Sandbox creation backoff.
    pub sandbox_backoff: Option<Backoff>,
    /// Stops and removals per (call, object id): every attempt counts, so a
    /// call the runtime answers but does not carry out is not repeated at once.
    pub ops: HashMap<(Op, String), Backoff>,
    /// Last failure per container name (ErrImagePull, CreateContainerError…).
    pub waiting: HashMap<String, Waiting>,
    /// Last sandbox failure (shown as the pod's message).
    pub sandbox_error: Option<String>,
    /// Volume set-up backoff, after a failed `SetUpVolumes`.
    pub volume_backoff: Option<Backoff>,
    /// The last volume set-up failure, kubelet's FailedMount text (shown
    /// on the containers waiting for it); `None` once set up.
    pub volume_error: Option<String>,
    /// Tear-down left the pod dir in place because something is still
    /// mounted under it (logged once): nothing more to do, the worker ends
    /// without deleting it.
    pub volumes_left: bool,
}

impl Memory {
    /// Note an attempt of `op` on `id` at `now`; returns the backoff now in force.
    pub fn attempted(&mut self, op: Op, id: &str, now: i64) -> Backoff {
        let key = (op, id.to_string());
        let b = Backoff::after(self.ops.get(&key).copied(), RUNTIME_OP_BACKOFF, now);
        self.ops.insert(key, b);
        b
    }
    /// Whether `op` was tried on `id` (and the object is still in the state
    /// the call would change).
    pub fn tried(&self, op: Op, id: &str) -> bool {
        self.ops.contains_key(&(op, id.to_string()))
    }
    /// Forget the backoffs of calls whose object left the state they act
    /// on (a stopped container, a removed one, a stopped sandbox…), and the
    /// sandbox backoff once a sandbox has stayed ready as long as its cap.
    pub fn forget_settled(&mut self, obs: &Observed, now: i64) {
        if obs
            .sandboxes
            .iter()
            .any(|s| s.ready && now - s.created_at >= ns(SANDBOX_BACKOFF.max))
        {
            self.sandbox_backoff = None;
        }
        let container = |id: &str| obs.containers.iter().find(|c| c.id == id);
        let sandbox = |id: &str| obs.sandboxes.iter().find(|s| s.id == id);
        self.ops.retain(|(op, id), _| match op {
            Op::StopContainer => container(id).is_some_and(ContainerObs::is_live),
            Op::RemoveContainer | Op::StartCreated => container(id).is_some(),
            Op::StopSandbox => sandbox(id).is_some_and(|s| s.ready),
            Op::RemoveSandbox => sandbox(id).is_some(),
            Op::TearDownVolumes => obs.volumes.on_disk,
        });
    }
}

fn ran_long(c: &ContainerObs) -> bool {
    c.finished_at.saturating_sub(c.started_at) >= ns(CRASH_BACKOFF_RESET)
}

/// The restart count that began the crash series `prev` belongs to. A run
/// of ten clean minutes begins a new series; without memory (a restarted
/// agent) the series is taken to begin at 0, so the backoff is rebuilt from
/// the restart count the runtime records.
pub fn crash_series(prev: &ContainerObs, mem: &Memory) -> i32 {
    if ran_long(prev) {
        return prev.restart_count;
    }
    mem.crash_series
        .get(&prev.name)
        .copied()
        .unwrap_or(0)
        .min(prev.restart_count)
}

/// CrashLoopBackOff: how long after `prev` finished its restart must wait.
/// The first crash of a series restarts at once (kubelet), the next ones
/// wait 10 s, 20 s, 40 s … capped at 300 s.
pub fn crash_delay(prev: &ContainerObs, mem: &Memory) -> Duration {
    let restarts = prev.restart_count - crash_series(prev, mem);
    (0..restarts.clamp(0, 64)).fold(Duration::ZERO, |d, _| {
        next_delay(d, CRASH_BACKOFF.start, CRASH_BACKOFF.max)
    })
}

/// When a crashed container may start again (CrashLoopBackOff), or `None` for now.
pub fn restart_at(c: &ContainerObs, mem: &Memory) -> Option<i64> {
    let delay = crash_delay(c, mem);
    (!delay.is_zero()).then(|| c.finished_at + ns(delay))
}

/// The crash series the instance started after `prev` belongs to: `prev`'s
/// own when it ran the same spec, a new one (beginning with this instance)
/// when the spec changed, as kubelet keys its backoff by the container hash.
pub fn series_after_restart(prev: &ContainerObs, want_hash: &str, mem: &Memory) -> i32 {
    if prev.hash == want_hash {
        crash_series(prev, mem)
    } else {
        prev.restart_count + 1
    }
}

/// The image backoff key of a container: its image, `""` when it has none
/// (so a container without an image backs off like any other).
pub fn pull_key(c: &Container) -> &str {
    c.image.as_deref().unwrap_or_default()
}

/// One step towards the desired state.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Converged (or backing off): nothing to do until something changes,
    /// or until the wall-clock time `until` (ns since the epoch).
    Wait {
        until: Option<i64>,
    },
    /// Run a new sandbox with this attempt number.
    CreateSandbox {
        attempt: u32,
    },
    /// Pull the image if the policy says so, then create and start the container.
    StartContainer {
        sandbox_id: String,
        name: String,
        init: bool,
        restart_count: i32,
    },
    /// Start a container found Created with the current spec in the current
    /// sandbox (the agent died between CreateContainer and StartContainer):
    /// adopt it instead of making a second one; its restart count stays.
    StartCreated {
        id: String,
        name: String,
    },
    /// Stop these containers with the pod's grace period.
    StopContainers {
        ids: Vec<String>,
    },
    RemoveContainers {
        ids: Vec<String>,
    },
    StopSandbox {
        id: String,
    },
    /// Removes the sandbox and (the runtime does this) its containers.
    RemoveSandbox {
        id: String,
    },
    /// The volume stage: set up every volume of the pod (before the
    /// sandbox; no container starts before it succeeded).
    SetUpVolumes,
    /// The volume stage's end, once the sandbox is removed: unmount and
    /// tear down the pod's volumes and remove its pod dir.
    TearDownVolumes,
    /// The pod is no longer desired and nothing of it is left: the worker ends.
    Finished,
}

/// restartPolicy Never and an init container failed: the pod failed.
pub fn init_failed(pod: &Pod, obs: &Observed) -> bool {
    RestartPolicy::of(pod) == RestartPolicy::Never
        && pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten())
            .any(|c| {
                obs.latest(&c.name, true)
                    .is_some_and(|o| o.state == CState::Exited && o.exit_code != 0)
            })
}

/// Whether initialisation is over in `sandbox` (`None`: in any): every init
/// container's newest instance there exited 0, or an app container was
/// made there (once one exists, init containers never run again).
pub fn initialised(pod: &Pod, obs: &Observed, sandbox: Option<&str>) -> bool {
    let Some(s) = pod.spec.as_ref() else {
        return true;
    };
    s.containers
        .iter()
        .any(|c| obs.newest(&c.name, false, sandbox).is_some())
        || s.init_containers.iter().flatten().all(|c| {
            obs.newest(&c.name, true, sandbox)
                .is_some_and(|p| p.state == CState::Exited && p.exit_code == 0)
        })
}

/// Whether the pod will never run a container again (phase Succeeded/Failed).
pub fn is_terminal(pod: &Pod, obs: &Observed) -> bool {
    let policy = RestartPolicy::of(pod);
    if policy == RestartPolicy::Always {
        return false;
    }
    if init_failed(pod, obs) {
        return true;
    }
    let s = pod.spec.clone().unwrap_or_default();
    !s.containers.is_empty()
        && s.containers.iter().all(|c| {
            obs.latest(&c.name, false).is_some_and(|o| {
                o.state == CState::Exited
                    && o.hash == spec::container_hash(c)
                    && !policy.restarts(o.exit_code)
            })
        })
}

/// The sandbox a pod uses: the newest ready one made from its current spec.
pub fn current_sandbox<'a>(pod: &Pod, obs: &'a Observed) -> Option<&'a SandboxObs> {
    let hash = spec::sandbox_hash(pod);
    obs.sandboxes
        .iter()
        .filter(|sb| sb.ready && sb.hash == hash)
        .max_by_key(|sb| sb.created_at)
}

/// What the garbage rule keeps of each container: its newest instance, and
/// its newest dead one, for logs and for lastState (kubelet keeps one dead
/// container per container, MaxPerPodContainer = 1).
pub fn kept(obs: &Observed) -> std::collections::HashSet<&str> {
    let key = |c: &ContainerObs| (c.created_at, c.restart_count);
    let mut newest: HashMap<(&str, bool), (&ContainerObs, Option<&ContainerObs>)> = HashMap::new();
    for c in &obs.containers {
        let dead = (c.state == CState::Exited).then_some(c);
        let e = newest.entry((&c.name, c.init)).or_insert((c, dead));
        if key(c) > key(e.0) {
            e.0 = c;
        }
        if let Some(d) = dead
            && e.1.is_none_or(|old| key(d) > key(old))
        {
            e.1 = Some(d);
        }
    }
    newest
        .into_values()
        .flat_map(|(n, d)| [Some(n.id.as_str()), d.map(|d| d.id.as_str())])
        .flatten()
        .collect()
}

/// `op` on those of `ids` whose backoff allows it now, built by `make`; a
/// `Wait` for the first to come due when none does; `None` for no ids.
fn gate(
    op: Op,
    ids: Vec<String>,
    mem: &Memory,
    now: i64,
    make: impl FnOnce(Vec<String>) -> Action,
) -> Option<Action> {
    if ids.is_empty() {
        return None;
    }
    let mut until: Option<i64> = None;
    let ready: Vec<String> = ids
        .into_iter()
        .filter(|id| match due(mem.ops.get(&(op, id.clone())), now) {
            Ok(()) => true,
            Err(u) => {
                until = Some(until.map_or(u, |w| w.min(u)));
                false
            }
        })
        .collect();
    Some(if ready.is_empty() {
        Action::Wait { until }
    } else {
        make(ready)
    })
}

/// `gate` for a call on one object.
fn gate_one(op: Op, id: &str, mem: &Memory, now: i64, make: fn(String) -> Action) -> Action {
    gate(op, vec![id.to_string()], mem, now, |mut ids| {
        make(ids.remove(0))
    })
    .unwrap_or(Action::Wait { until: None })
}

fn stop_sandbox(id: String) -> Action {
    Action::StopSandbox { id }
}

fn remove_sandbox(id: String) -> Action {
    Action::RemoveSandbox { id }
}

fn start_or_wait(
    sandbox: &str,
    c: &Container,
    init: bool,
    prev: Option<&ContainerObs>,
    mem: &Memory,
    now: i64,
) -> Result<Action, i64> {
    due(mem.pull_backoff.get(pull_key(c)), now)?;
    due(mem.start_backoff.get(&c.name), now)?;
    let same_spec_died =
        prev.filter(|p| p.state == CState::Exited && p.hash == spec::container_hash(c));
    if let Some(at) = same_spec_died
        .and_then(|p| restart_at(p, mem))
        .filter(|at| *at > now)
    {
        return Err(at);
    }
    Ok(Action::StartContainer {
        sandbox_id: sandbox.to_string(),
        name: c.name.clone(),
        init,
        restart_count: prev.map_or(0, |p| p.restart_count + 1),
    })
}

/// `SetUpVolumes`, or `Err(until)` while its backoff holds.
fn set_up_volumes(mem: &Memory, now: i64) -> Result<Action, i64> {
    due(mem.volume_backoff.as_ref(), now).map(|()| Action::SetUpVolumes)
}

/// A container in the current sandbox that was created but never started:
/// start it if it has the current spec and no start of it failed yet (the
/// agent died in between), else remove it so a new one can be made.
fn created(p: &ContainerObs, c: &Container, mem: &Memory, now: i64) -> Action {
    if p.hash == spec::container_hash(c) && !mem.tried(Op::StartCreated, &p.id) {
        return Action::StartCreated {
            id: p.id.clone(),
            name: p.name.clone(),
        };
    }
    gate_one(Op::RemoveContainer, &p.id, mem, now, |id| {
        Action::RemoveContainers { ids: vec![id] }
    })
}

/// The next step for one pod. `desired` is `None` when no source wants the
/// pod any more; `now` is wall-clock ns since the epoch.
pub fn plan(desired: Option<&Pod>, obs: &Observed, mem: &Memory, now: i64) -> Action {
    let live: Vec<String> = obs
        .containers
        .iter()
        .filter(|c| c.is_live())
        .map(|c| c.id.clone())
        .collect();
    let stop = |ids: Vec<String>| {
        gate(Op::StopContainer, ids, mem, now, |ids| {
            Action::StopContainers { ids }
        })
    };
    let Some(pod) = desired else {
        // Termination, kubelet's order: stop containers (grace period), stop
        // the sandbox (network torn down), then remove what is left.
        if let Some(a) = stop(live) {
            return a;
        }
        if let Some(sb) = obs.sandboxes.iter().find(|s| s.ready) {
            return gate_one(Op::StopSandbox, &sb.id, mem, now, stop_sandbox);
        }
        let all = obs.containers.iter().map(|c| c.id.clone()).collect();
        if let Some(a) = gate(Op::RemoveContainer, all, mem, now, |ids| {
            Action::RemoveContainers { ids }
        }) {
            return a;
        }
        if let Some(sb) = obs.sandboxes.first() {
            return gate_one(Op::RemoveSandbox, &sb.id, mem, now, remove_sandbox);
        }
        // Volumes last: nothing of the pod uses them any more.
        if obs.volumes.on_disk && !mem.volumes_left {
            return gate_one(Op::TearDownVolumes, "", mem, now, |_| {
                Action::TearDownVolumes
            });
        }
        return Action::Finished;
    };

    let s = pod.spec.clone().unwrap_or_default();
    let policy = RestartPolicy::of(pod);
    let current = current_sandbox(pod, obs);
    let terminal = is_terminal(pod, obs);

    let Some(current) = current else {
        // No usable sandbox: kill what is left of the pod, then make a new one
        // (unless the pod is done, where the sandbox stays stopped).
        if let Some(a) = stop(live) {
            return a;
        }
        if let Some(sb) = obs.sandboxes.iter().find(|sb| sb.ready) {
            return gate_one(Op::StopSandbox, &sb.id, mem, now, stop_sandbox);
        }
        if terminal {
            return Action::Wait { until: None };
        }
        // kubelet waits for the pod's volumes before it makes a sandbox.
        if !obs.volumes.set_up {
            return set_up_volumes(mem, now)
                .unwrap_or_else(|until| Action::Wait { until: Some(until) });
        }
        if let Err(until) = due(mem.sandbox_backoff.as_ref(), now) {
            return Action::Wait { until: Some(until) };
        }
        let attempt = obs
            .sandboxes
            .iter()
            .map(|sb| sb.attempt + 1)
            .max()
            .unwrap_or(0);
        return Action::CreateSandbox { attempt };
    };

    // Leftovers of older sandboxes: stop their containers and the sandboxes.
    let stale_live: Vec<String> = obs
        .containers
        .iter()
        .filter(|c| c.sandbox_id != current.id && live.contains(&c.id))
        .map(|c| c.id.clone())
        .collect();
    if let Some(a) = stop(stale_live) {
        return a;
    }
    if let Some(sb) = obs
        .sandboxes
        .iter()
        .find(|sb| sb.ready && sb.id != current.id)
    {
        return gate_one(Op::StopSandbox, &sb.id, mem, now, stop_sandbox);
    }

    let mut wake: Option<i64> = None;
    let mut wait_until = |t: i64| wake = Some(wake.map_or(t, |w: i64| w.min(t)));

    // No container starts before its volumes are set up (again, after an
    // agent restart); the rest (garbage, a finished pod's sandbox) goes on.
    let volumes_ready = obs.volumes.set_up;
    if !volumes_ready && !terminal {
        match set_up_volumes(mem, now) {
            Ok(a) => return a,
            Err(until) => wait_until(until),
        }
    }

    // Init containers, one by one; each must exit 0 before the next. Once an
    // app container exists in this sandbox, initialisation is over.
    let apps_started = s
        .containers
        .iter()
        .any(|c| obs.latest_in(&current.id, &c.name, false).is_some());
    if volumes_ready && !apps_started && !terminal {
        for c in s.init_containers.iter().flatten() {
            let prev = obs.latest_in(&current.id, &c.name, true);
            match prev {
                Some(p) if p.state == CState::Exited && p.exit_code == 0 => continue,
                Some(p) if p.is_live() => return Action::Wait { until: None },
                Some(p) if p.state == CState::Created => return created(p, c, mem, now),
                Some(_) if policy == RestartPolicy::Never => break,
                _ => {}
            }
            let prev = prev.or_else(|| obs.latest(&c.name, true));
            return match start_or_wait(&current.id, c, true, prev, mem, now) {
                Ok(a) => a,
                Err(until) => Action::Wait { until: Some(until) },
            };
        }
    }

    if volumes_ready && !terminal && initialised(pod, obs, Some(&current.id)) {
        for c in &s.containers {
            let want_hash = spec::container_hash(c);
            let prev = obs.latest_in(&current.id, &c.name, false);
            match prev {
                Some(p) if p.is_live() => {
                    if p.hash != want_hash {
                        // The spec changed: replace this container only.
                        match stop(vec![p.id.clone()]) {
                            Some(Action::Wait { until: Some(u) }) => wait_until(u),
                            Some(a) => return a,
                            None => {}
                        }
                    }
                    continue;
                }
                Some(p) if p.state == CState::Created => match created(p, c, mem, now) {
                    Action::Wait { until: Some(u) } => {
                        wait_until(u);
                        continue;
                    }
                    a => return a,
                },
                Some(p) if p.hash == want_hash && !policy.restarts(p.exit_code) => {
                    continue;
                }
                _ => {}
            }
            let prev = prev.or_else(|| obs.latest(&c.name, false));
            match start_or_wait(&current.id, c, false, prev, mem, now) {
                Ok(a) => return a,
                Err(until) => wait_until(until),
            }
        }
    }

    // Garbage: dead instances beyond what `kept` keeps, and sandboxes that
    // are stopped, superseded and hold nothing kept.
    let keep = kept(obs);
    let old: Vec<String> = obs
        .containers
        .iter()
        .filter(|c| c.state == CState::Exited && !keep.contains(c.id.as_str()))
        .map(|c| c.id.clone())
        .collect();
    match gate(Op::RemoveContainer, old, mem, now, |ids| {
        Action::RemoveContainers { ids }
    }) {
        Some(Action::Wait { until: Some(u) }) => wait_until(u),
        Some(a) => return a,
        None => {}
    }
    if let Some(sb) = obs.sandboxes.iter().find(|sb| {
        !sb.ready
            && sb.id != current.id
            && sb.created_at < current.created_at
            && !obs
                .containers
                .iter()
                .any(|c| c.sandbox_id == sb.id && keep.contains(c.id.as_str()))
    }) {
        match gate_one(Op::RemoveSandbox, &sb.id, mem, now, remove_sandbox) {
            Action::Wait { until: Some(u) } => wait_until(u),
            a => return a,
        }
    }

    if terminal {
        // Nothing will run again: release the network (kubelet stops the
        // sandbox of a finished pod); containers stay for logs and status.
        return match gate_one(Op::StopSandbox, &current.id, mem, now, stop_sandbox) {
            Action::Wait { until: Some(u) } => {
                wait_until(u);
                Action::Wait { until: wake }
            }
            a => a,
        };
    }
    Action::Wait { until: wake }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;
    /// Volumes set up, and so on disk.
    const UP: VolumesObs = VolumesObs {
        set_up: true,
        on_disk: true,
    };

    fn pod(policy: &str, inits: &[&str], apps: &[&str]) -> Pod {
        let c = |n: &&str| Container {
            name: n.to_string(),
            image: Some("img:1".into()),
            ..Default::default()
        };
        Pod {
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                restart_policy: Some(policy.into()),
                init_containers: Some(inits.iter().map(c).collect()),
                containers: apps.iter().map(c).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn sb(p: &Pod, id: &str, ready: bool, created: i64) -> SandboxObs {
        SandboxObs {
            id: id.into(),
            ready,
            attempt: 0,
            created_at: created,
            hash: spec::sandbox_hash(p),
            ip: "10.0.0.2".into(),
        }
    }

    fn ctr(
        p: &Pod,
        sandbox: &str,
        name: &str,
        init: bool,
        state: CState,
        exit: i32,
        t: i64,
    ) -> ContainerObs {
        let s = p.spec.as_ref().unwrap();
        let spec_c = s
            .init_containers
            .iter()
            .flatten()
            .chain(s.containers.iter())
            .find(|c| c.name == name)
            .unwrap();
        ContainerObs {
            id: format!("{name}@{t}"),
            name: name.into(),
            sandbox_id: sandbox.into(),
            init,
            state,
            exit_code: exit,
            reason: String::new(),
            message: String::new(),
            created_at: t,
            started_at: t,
            finished_at: if state == CState::Exited { t + S } else { 0 },
            restart_count: 0,
            hash: spec::container_hash(spec_c),
            image: "img:1".into(),
            image_ref: String::new(),
            grace_period: None,
        }
    }

    fn start(name: &str, init: bool, rc: i32) -> Action {
        Action::StartContainer {
            sandbox_id: "s1".into(),
            name: name.into(),
            init,
            restart_count: rc,
        }
    }

    #[test]
    fn table() {
        use CState::*;
        let always = pod("Always", &["init"], &["app"]);
        let never = pod("Never", &[], &["app"]);
        let onfail = pod("OnFailure", &[], &["app"]);
        let mem = Memory::default();
        let now = 100 * S;
        let cases: Vec<(&str, Option<&Pod>, Observed, Action)> = vec![
            (
                "nothing yet: volumes first",
                Some(&always),
                Observed::default(),
                Action::SetUpVolumes,
            ),
            (
                "volumes set up: make a sandbox",
                Some(&always),
                Observed {
                    volumes: UP,
                    ..Default::default()
                },
                Action::CreateSandbox { attempt: 0 },
            ),
            (
                "sandbox up but volumes not set up (agent restarted): volumes before any container",
                Some(&always),
                Observed {
                    sandboxes: vec![sb(&always, "s1", true, S)],
                    containers: vec![ctr(&always, "s1", "init", true, Exited, 0, 2 * S)],
                    ..Default::default()
                },
                Action::SetUpVolumes,
            ),
            (
                "a crashed container is not restarted before its volumes",
                Some(&always),
                Observed {
                    sandboxes: vec![sb(&always, "s1", true, S)],
                    containers: vec![ctr(&always, "s1", "app", false, Exited, 1, 3 * S)],
                    ..Default::default()
                },
                Action::SetUpVolumes,
            ),
            (
                "finished pod: no volumes set up for it",
                Some(&never),
                Observed {
                    sandboxes: vec![sb(&never, "s1", false, S)],
                    containers: vec![ctr(&never, "s1", "app", false, Exited, 0, 3 * S)],
                    ..Default::default()
                },
                Action::Wait { until: None },
            ),
            (
                "sandbox up: first init container",
                Some(&always),
                Observed {
                    volumes: UP,
                    sandboxes: vec![sb(&always, "s1", true, S)],
                    containers: vec![],
                },
                start("init", true, 0),
            ),
            (
                "init running: wait for it",
                Some(&always),
                Observed {
                    volumes: UP,
                    sandboxes: vec![sb(&always, "s1", true, S)],
                    containers: vec![ctr(&always, "s1", "init", true, Running, 0, 2 * S)],
                },
                Action::Wait { until: None },
            ),
            (
                "init done: app starts",
                Some(&always),
                Observed {
                    volumes: UP,
                    sandboxes: vec![sb(&always, "s1", true, S)],
                    containers: vec![ctr(&always, "s1", "init", true, Exited, 0, 2 * S)],
                },
                start("app", false, 0),
            ),
            (
                "init failed under Always: restarted",
                Some(&always),
                Observed {
                    volumes: UP,
                    sandboxes: vec![sb(&always, "s1", true, S)],
                    containers: vec![ctr(&always, "s1", "init", true, Exited, 1, 2 * S)],
                },
                start("init", true, 1),
            ),
            (
                "app running: converged",
                Some(&always),
                Observed {
                    volumes: UP,
                    sandboxes: vec![sb(&always, "s1", true, S)],
                    containers: vec![
                        ctr(&always, "s1", "init", true, Exited, 0, 2 * S),
                        ctr(&always, "s1", "app", false, Running, 0, 3 * S),
                    ],
                },
                Action::Wait { until: None },
            ),
            (
                "app exited under Always: restarted",
                Some(&always),
                Observed {
                    volumes: UP,
                    sandboxes: vec![sb(&always, "s1", true, S)],
                    containers: vec![ctr(&always, "s1", "app", false, Exited, 0, 3 * S)],
                },
                start("app", false, 1),
            ),
            (
                "OnFailure and exit 0: done, sandbox stopped",
                Some(&onfail),
                Observed {
                    volumes: UP,
                    sandboxes: vec![sb(&onfail, "s1", true, S)],
                    containers: vec![ctr(&onfail, "s1", "app", false, Exited, 0, 3 * S)],
                },
                Action::StopSandbox { id: "s1".into() },
            ),
            (
                "OnFailure and exit 2: restarted",
                Some(&onfail),
                Observed {
                    volumes: UP,
                    sandboxes: vec![sb(&onfail, "s1", true, S)],
                    containers: vec![ctr(&onfail, "s1", "app", false, Exited, 2, 3 * S)],
                },
                start("app", false, 1),
            ),
            (
                "Never, finished, sandbox stopped: stays done",
                Some(&never),
                Observed {
                    volumes: UP,
                    sandboxes: vec![sb(&never, "s1", false, S)],
                    containers: vec![ctr(&never, "s1", "app", false, Exited, 1, 3 * S)],
                },
                Action::Wait { until: None },
            ),
            (
                "sandbox died under Always: a new one",
                Some(&always),
                Observed {
                    volumes: UP,
                    sandboxes: vec![sb(&always, "s1", false, S)],
                    containers: vec![ctr(&always, "s1", "app", false, Exited, 137, 3 * S)],
                },
                Action::CreateSandbox { attempt: 1 },
            ),
            (
                "deleted: containers stopped first",
                None,
                Observed {
                    volumes: UP,
                    sandboxes: vec![sb(&always, "s1", true, S)],
                    containers: vec![ctr(&always, "s1", "app", false, Running, 0, 3 * S)],
                },
                Action::StopContainers {
                    ids: vec![format!("app@{}", 3 * S)],
                },
            ),
            (
                "deleted: then the sandbox stops",
                None,
                Observed {
                    volumes: UP,
                    sandboxes: vec![sb(&always, "s1", true, S)],
                    containers: vec![ctr(&always, "s1", "app", false, Exited, 0, 3 * S)],
                },
                Action::StopSandbox { id: "s1".into() },
            ),
            (
                "deleted: then containers are removed",
                None,
                Observed {
                    volumes: UP,
                    sandboxes: vec![sb(&always, "s1", false, S)],
                    containers: vec![ctr(&always, "s1", "app", false, Exited, 0, 3 * S)],
                },
                Action::RemoveContainers {
                    ids: vec![format!("app@{}", 3 * S)],
                },
            ),
            (
                "deleted: then the sandbox is removed",
                None,
                Observed {
                    volumes: UP,
                    sandboxes: vec![sb(&always, "s1", false, S)],
                    containers: vec![],
                },
                Action::RemoveSandbox { id: "s1".into() },
            ),
            (
                "deleted and gone: finished",
                None,
                Observed::default(),
                Action::Finished,
            ),
            (
                "deleted, sandbox removed, volumes on disk: torn down",
                None,
                Observed {
                    volumes: UP,
                    ..Default::default()
                },
                Action::TearDownVolumes,
            ),
            (
                "deleted: volumes stay until the sandbox is removed",
                None,
                Observed {
                    volumes: UP,
                    sandboxes: vec![sb(&always, "s1", false, S)],
                    containers: vec![],
                },
                Action::RemoveSandbox { id: "s1".into() },
            ),
            (
                "two ready sandboxes after a crash: the older one is stopped",
                Some(&always),
                Observed {
                    volumes: UP,
                    sandboxes: vec![sb(&always, "s0", true, S), sb(&always, "s1", true, 2 * S)],
                    containers: vec![],
                },
                Action::StopSandbox { id: "s0".into() },
            ),
        ];
        for (what, desired, obs, want) in cases {
            assert_eq!(plan(desired, &obs, &mem, now), want, "{what}");
        }
    }

    #[test]
    fn the_volume_stage_backs_off_and_ends() {
        let p = pod("Always", &[], &["app"]);
        let mem = Memory {
            volume_backoff: Some(Backoff::after(None, VOLUME_BACKOFF, 10 * S)),
            ..Default::default()
        };
        let not_set_up = Observed::default();
        // A failed set-up waits for its backoff: no sandbox meanwhile.
        assert_eq!(
            plan(Some(&p), &not_set_up, &mem, 10 * S),
            Action::Wait {
                until: Some(10 * S + S / 2)
            }
        );
        assert_eq!(
            plan(Some(&p), &not_set_up, &mem, 10 * S + S / 2),
            Action::SetUpVolumes
        );
        // With a sandbox, garbage is still collected meanwhile.
        let dead0 = ctr(&p, "s1", "app", false, CState::Exited, 1, 2 * S);
        let mut dead1 = ctr(&p, "s1", "app", false, CState::Exited, 1, 3 * S);
        dead1.restart_count = 1;
        let mut dead2 = ctr(&p, "s1", "app", false, CState::Exited, 1, 4 * S);
        dead2.restart_count = 2;
        let obs = Observed {
            sandboxes: vec![sb(&p, "s1", true, S)],
            containers: vec![dead0.clone(), dead1.clone(), dead2],
            ..Default::default()
        };
        assert_eq!(
            plan(Some(&p), &obs, &mem, 10 * S),
            Action::RemoveContainers {
                ids: vec![dead0.id, dead1.id]
            }
        );
        // Tear-down: retried with backoff, then finished once the dir is
        // gone, or once it was left in place (mounts under it).
        let on_disk = Observed {
            volumes: VolumesObs {
                set_up: false,
                on_disk: true,
            },
            ..Default::default()
        };
        let mut mem = Memory::default();
        assert_eq!(plan(None, &on_disk, &mem, 10 * S), Action::TearDownVolumes);
        mem.attempted(Op::TearDownVolumes, "", 10 * S);
        assert_eq!(
            plan(None, &on_disk, &mem, 10 * S),
            Action::Wait {
                until: Some(11 * S)
            }
        );
        assert_eq!(plan(None, &on_disk, &mem, 11 * S), Action::TearDownVolumes);
        mem.forget_settled(&Observed::default(), 12 * S);
        assert!(mem.ops.is_empty(), "gone from disk: the backoff goes");
        mem.volumes_left = true;
        assert_eq!(plan(None, &on_disk, &mem, 12 * S), Action::Finished);
    }

    #[test]
    fn spec_change_replaces_only_that_container() {
        let old = pod("Always", &[], &["a", "b"]);
        let mut new = old.clone();
        new.spec.as_mut().unwrap().containers[1].image = Some("img:2".into());
        let obs = Observed {
            volumes: UP,
            sandboxes: vec![sb(&old, "s1", true, S)],
            containers: vec![
                ctr(&old, "s1", "a", false, CState::Running, 0, 2 * S),
                ctr(&old, "s1", "b", false, CState::Running, 0, 3 * S),
            ],
        };
        let a = plan(Some(&new), &obs, &Memory::default(), 10 * S);
        assert_eq!(
            a,
            Action::StopContainers {
                ids: vec![format!("b@{}", 3 * S)]
            }
        );
        let mut obs2 = obs.clone();
        obs2.containers[1].state = CState::Exited;
        obs2.containers[1].finished_at = 4 * S;
        let a = plan(Some(&new), &obs2, &Memory::default(), 10 * S);
        assert_eq!(a, start("b", false, 1), "new spec starts without backoff");
    }

    #[test]
    fn crash_loop_backoff_waits_then_restarts() {
        let p = pod("Always", &[], &["app"]);
        let mut obs = Observed {
            volumes: UP,
            sandboxes: vec![sb(&p, "s1", true, S)],
            containers: vec![ctr(&p, "s1", "app", false, CState::Exited, 1, 3 * S)],
        };
        // Restart count 2, no memory (as after an agent restart): the third
        // crash of its series waits 20 s.
        obs.containers[0].restart_count = 2;
        let mem = Memory::default();
        let finished = obs.containers[0].finished_at;
        assert_eq!(
            plan(Some(&p), &obs, &mem, finished + 5 * S),
            Action::Wait {
                until: Some(finished + 20 * S)
            }
        );
        assert_eq!(
            plan(Some(&p), &obs, &mem, finished + 21 * S),
            start("app", false, 3)
        );
        // Ten minutes of clean running resets the backoff.
        obs.containers[0].finished_at = obs.containers[0].started_at + 601 * S;
        assert_eq!(
            plan(Some(&p), &obs, &mem, obs.containers[0].finished_at + S),
            start("app", false, 3)
        );
    }

    #[test]
    fn pull_backoff_waits() {
        let p = pod("Always", &[], &["app"]);
        let obs = Observed {
            volumes: UP,
            sandboxes: vec![sb(&p, "s1", true, S)],
            containers: vec![],
        };
        let mut mem = Memory::default();
        mem.pull_backoff.insert(
            "img:1".into(),
            Backoff {
                delay: Duration::from_secs(10),
                until: 50 * S,
            },
        );
        assert_eq!(
            plan(Some(&p), &obs, &mem, 40 * S),
            Action::Wait {
                until: Some(50 * S)
            }
        );
        assert_eq!(plan(Some(&p), &obs, &mem, 51 * S), start("app", false, 0));
    }

    #[test]
    fn garbage_keeps_the_newest_dead_instance_for_last_state() {
        let p = pod("Always", &[], &["app"]);
        let mut dead1 = ctr(&p, "s1", "app", false, CState::Exited, 1, 5 * S);
        dead1.restart_count = 1;
        let mut running = ctr(&p, "s1", "app", false, CState::Running, 0, 7 * S);
        running.restart_count = 2;
        let dead0 = ctr(&p, "s1", "app", false, CState::Exited, 1, 3 * S);
        let obs = Observed {
            volumes: UP,
            sandboxes: vec![sb(&p, "s1", true, S)],
            containers: vec![dead1.clone(), running.clone()],
        };
        assert_eq!(
            plan(Some(&p), &obs, &Memory::default(), 10 * S),
            Action::Wait { until: None },
            "the previous attempt stays while its successor runs"
        );
        let obs = Observed {
            volumes: UP,
            sandboxes: vec![sb(&p, "s1", true, S)],
            containers: vec![dead0, dead1, running],
        };
        assert_eq!(
            plan(Some(&p), &obs, &Memory::default(), 10 * S),
            Action::RemoveContainers {
                ids: vec![format!("app@{}", 3 * S)]
            },
            "only the newest dead instance is kept"
        );
    }

    #[test]
    fn an_old_sandbox_holding_the_previous_attempt_stays() {
        let p = pod("Always", &[], &["app"]);
        let old = ctr(&p, "s0", "app", false, CState::Exited, 137, 2 * S);
        let mut new = ctr(&p, "s1", "app", false, CState::Running, 0, 6 * S);
        new.restart_count = 1;
        let mut obs = Observed {
            volumes: UP,
            sandboxes: vec![sb(&p, "s0", false, S), sb(&p, "s1", true, 5 * S)],
            containers: vec![old, new],
        };
        assert_eq!(
            plan(Some(&p), &obs, &Memory::default(), 10 * S),
            Action::Wait { until: None }
        );
        // Once the new sandbox has its own dead instance, the old one goes.
        let mut dead = ctr(&p, "s1", "app", false, CState::Exited, 1, 7 * S);
        dead.restart_count = 1;
        obs.containers[1].restart_count = 2;
        obs.containers[1].created_at = 8 * S;
        obs.containers.push(dead);
        assert_eq!(
            plan(Some(&p), &obs, &Memory::default(), 10 * S),
            Action::RemoveContainers {
                ids: vec![format!("app@{}", 2 * S)]
            }
        );
        obs.containers.remove(0);
        assert_eq!(
            plan(Some(&p), &obs, &Memory::default(), 10 * S),
            Action::RemoveSandbox { id: "s0".into() }
        );
    }

    #[test]
    fn crash_backoff_is_rebuilt_from_the_restart_count() {
        let p = pod("Always", &[], &["app"]);
        let mut c = ctr(&p, "s1", "app", false, CState::Exited, 1, 3 * S);
        let mem = Memory::default();
        let waits: Vec<u64> = (0..9)
            .map(|rc| {
                c.restart_count = rc;
                crash_delay(&c, &mem).as_secs()
            })
            .collect();
        assert_eq!(waits, vec![0, 10, 20, 40, 80, 160, 300, 300, 300]);
        // Ten clean minutes begin a new series at this instance...
        c.restart_count = 7;
        c.finished_at = c.started_at + 600 * S;
        assert_eq!(crash_delay(&c, &mem), Duration::ZERO);
        let mut mem = Memory::default();
        mem.crash_series.insert(
            "app".into(),
            series_after_restart(
                &c,
                &spec::container_hash(&p.spec.as_ref().unwrap().containers[0]),
                &Memory::default(),
            ),
        );
        // ...so its successor's quick crash waits 10 s, not 300 s.
        c.restart_count = 8;
        c.finished_at = c.started_at + S;
        assert_eq!(crash_delay(&c, &mem), Duration::from_secs(10));
        // A new spec begins a new series with the instance it starts.
        let mut changed = c.clone();
        changed.hash = "old-spec".into();
        assert_eq!(series_after_restart(&changed, &c.hash, &mem), 9);
    }

    #[test]
    fn a_created_container_is_adopted_once() {
        let p = pod("Always", &["init"], &["app"]);
        let init_done = ctr(&p, "s1", "init", true, CState::Exited, 0, 2 * S);
        let mut made = ctr(&p, "s1", "app", false, CState::Created, 0, 3 * S);
        made.restart_count = 4;
        let obs = Observed {
            volumes: UP,
            sandboxes: vec![sb(&p, "s1", true, S)],
            containers: vec![init_done.clone(), made.clone()],
        };
        let adopt = Action::StartCreated {
            id: made.id.clone(),
            name: "app".into(),
        };
        let mut mem = Memory::default();
        assert_eq!(plan(Some(&p), &obs, &mem, 10 * S), adopt);
        // Its start failed: remove it (then a new one is made).
        mem.attempted(Op::StartCreated, &made.id, 10 * S);
        let remove = Action::RemoveContainers {
            ids: vec![made.id.clone()],
        };
        assert_eq!(plan(Some(&p), &obs, &mem, 11 * S), remove);
        // Made from another spec: removed, not started.
        let mut stale = made.clone();
        stale.hash = "old".into();
        let obs2 = Observed {
            volumes: UP,
            sandboxes: obs.sandboxes.clone(),
            containers: vec![init_done, stale],
        };
        assert_eq!(plan(Some(&p), &obs2, &Memory::default(), 10 * S), remove);
        // An init container is adopted the same way.
        let init_made = ctr(&p, "s1", "init", true, CState::Created, 0, 2 * S);
        let obs3 = Observed {
            volumes: UP,
            sandboxes: obs.sandboxes.clone(),
            containers: vec![init_made.clone()],
        };
        assert_eq!(
            plan(Some(&p), &obs3, &Memory::default(), 10 * S),
            Action::StartCreated {
                id: init_made.id,
                name: "init".into()
            }
        );
    }

    #[test]
    fn repeated_runtime_calls_wait_for_their_backoff() {
        let p = pod("Always", &[], &["app"]);
        let running = ctr(&p, "s1", "app", false, CState::Running, 0, 3 * S);
        let obs = Observed {
            volumes: UP,
            sandboxes: vec![sb(&p, "s1", true, S)],
            containers: vec![running.clone()],
        };
        let mut mem = Memory::default();
        let stop = Action::StopContainers {
            ids: vec![running.id.clone()],
        };
        assert_eq!(plan(None, &obs, &mem, 10 * S), stop);
        // A stop was sent and the container still runs: not again at once.
        let b = mem.attempted(Op::StopContainer, &running.id, 10 * S);
        assert_eq!(b.delay, RUNTIME_OP_BACKOFF.start);
        assert_eq!(
            plan(None, &obs, &mem, 10 * S),
            Action::Wait {
                until: Some(11 * S)
            }
        );
        assert_eq!(plan(None, &obs, &mem, 11 * S), stop);
        assert_eq!(
            mem.attempted(Op::StopContainer, &running.id, 11 * S).delay,
            2 * RUNTIME_OP_BACKOFF.start
        );
        // Stopped at last: the memory of it goes.
        let mut stopped = obs.clone();
        stopped.containers[0].state = CState::Exited;
        mem.forget_settled(&stopped, 12 * S);
        assert!(mem.ops.is_empty());
        // The same for the sandbox.
        mem.attempted(Op::StopSandbox, "s1", 12 * S);
        assert_eq!(
            plan(None, &stopped, &mem, 12 * S),
            Action::Wait {
                until: Some(13 * S)
            }
        );
    }

    #[test]
    fn a_container_without_an_image_backs_off_like_any_other() {
        let mut p = pod("Always", &[], &["app"]);
        p.spec.as_mut().unwrap().containers[0].image = None;
        let obs = Observed {
            volumes: UP,
            sandboxes: vec![sb(&p, "s1", true, S)],
            containers: vec![],
        };
        let mut mem = Memory::default();
        mem.pull_backoff.insert(
            pull_key(&p.spec.as_ref().unwrap().containers[0]).to_string(),
            Backoff::after(None, PULL_BACKOFF, 10 * S),
        );
        assert_eq!(
            plan(Some(&p), &obs, &mem, 15 * S),
            Action::Wait {
                until: Some(20 * S)
            }
        );
        // A start failure (CreateContainerConfigError…) likewise.
        let p = pod("Always", &[], &["app"]);
        let mut mem = Memory::default();
        mem.start_backoff
            .insert("app".into(), Backoff::after(None, START_BACKOFF, 10 * S));
        assert_eq!(
            plan(Some(&p), &obs, &mem, 10 * S),
            Action::Wait {
                until: Some(11 * S)
            }
        );
    }

    #[test]
    fn policies_are_typed_with_kubelet_defaults() {
        let mut p = pod("Always", &[], &["app"]);
        p.spec.as_mut().unwrap().restart_policy = None;
        assert_eq!(RestartPolicy::of(&p), RestartPolicy::Always);
        assert_eq!(
            RestartPolicy::of(&pod("OnFailure", &[], &[])),
            RestartPolicy::OnFailure
        );
        assert!(!RestartPolicy::OnFailure.restarts(0) && RestartPolicy::OnFailure.restarts(2));
        assert!(!RestartPolicy::Never.restarts(1) && RestartPolicy::Always.restarts(0));
        let c = |image: &str, policy: Option<&str>| Container {
            image: Some(image.into()),
            image_pull_policy: policy.map(Into::into),
            ..Default::default()
        };
        assert_eq!(PullPolicy::of(&c("busybox", None)), PullPolicy::Always);
        assert_eq!(
            PullPolicy::of(&c("busybox:1", None)),
            PullPolicy::IfNotPresent
        );
        assert_eq!(
            PullPolicy::of(&c("busybox:1", Some("Never"))),
            PullPolicy::Never
        );
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let mut d = Duration::ZERO;
        let mut seen = vec![];
        for _ in 0..7 {
            d = next_delay(d, CRASH_BACKOFF.start, CRASH_BACKOFF.max);
            seen.push(d.as_secs());
        }
        assert_eq!(seen, vec![10, 20, 40, 80, 160, 300, 300]);
    }
}
