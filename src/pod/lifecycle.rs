//! The pod lifecycle: one pure step, `plan(desired, observed, memory, now)`,
//! that says what to do next. The worker executes the returned `Action`,
//! observes the runtime again and asks again (level-triggered): a crashed
//! agent resumes from whatever the runtime holds, because nothing here
//! depends on which event happened, only on what is.
//!
//! No I/O here; everything is table-tested.

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

/// Everything the runtime holds for one pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    pub sandboxes: Vec<SandboxObs>,
    pub containers: Vec<ContainerObs>,
}

impl Observed {
    /// The newest instance of a named container, in any sandbox.
    pub fn latest(&self, name: &str, init: bool) -> Option<&ContainerObs> {
        self.containers
            .iter()
            .filter(|c| c.name == name && c.init == init)
            .max_by_key(|c| (c.created_at, c.restart_count))
    }
    fn latest_in(&self, sandbox: &str, name: &str, init: bool) -> Option<&ContainerObs> {
        self.containers
            .iter()
            .filter(|c| c.sandbox_id == sandbox && c.name == name && c.init == init)
            .max_by_key(|c| (c.created_at, c.restart_count))
    }
}

/// Why a container is waiting, kept by the worker between steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

/// What the worker remembers that the runtime cannot tell it: backoffs and
/// the last failure of each step. Lost on agent restart, which only means a
/// backoff starts over.
#[derive(Clone, Debug, Default)]
pub struct Memory {
    /// CrashLoopBackOff delay per container name (0 = next restart immediate).
    pub crash_delay: HashMap<String, Duration>,
    /// Image pull backoff: image → (delay, not before, wall ns).
    pub pull_backoff: HashMap<String, (Duration, i64)>,
    /// Sandbox creation backoff: (delay, not before, wall ns).
    pub sandbox_backoff: Option<(Duration, i64)>,
    /// Last failure per container name (ErrImagePull, CreateContainerError…).
    pub waiting: HashMap<String, Waiting>,
    /// Last sandbox failure (shown as the pod's message).
    pub sandbox_error: Option<String>,
}

pub const CRASH_BACKOFF_START: Duration = Duration::from_secs(10);
pub const CRASH_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A container that ran this long clean resets its backoff (kubelet).
pub const CRASH_BACKOFF_RESET: Duration = Duration::from_secs(600);
pub const PULL_BACKOFF_START: Duration = Duration::from_secs(10);
pub const PULL_BACKOFF_MAX: Duration = Duration::from_secs(300);
pub const SANDBOX_BACKOFF_START: Duration = Duration::from_secs(1);
pub const SANDBOX_BACKOFF_MAX: Duration = Duration::from_secs(60);

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
    /// Stop these containers with the pod's grace period, in parallel.
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
    /// The pod is no longer desired and nothing of it is left: the worker ends.
    Finished,
}

/// Whether the pod will never run a container again (phase Succeeded/Failed).
pub fn is_terminal(pod: &Pod, obs: &Observed) -> bool {
    let s = pod.spec.clone().unwrap_or_default();
    let policy = s.restart_policy.as_deref().unwrap_or("Always");
    if policy == "Always" {
        return false;
    }
    // An init container that failed under Never fails the pod.
    if policy == "Never"
        && s.init_containers.iter().flatten().any(|c| {
            obs.latest(&c.name, true)
                .is_some_and(|o| o.state == CState::Exited && o.exit_code != 0)
        })
    {
        return true;
    }
    !s.containers.is_empty()
        && s.containers.iter().all(|c| {
            obs.latest(&c.name, false).is_some_and(|o| {
                o.state == CState::Exited
                    && o.hash == spec::container_hash(c)
                    && (policy == "Never" || o.exit_code == 0)
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

/// kubelet's restart rule for a container that exited with `exit_code`.
pub fn should_restart(policy: &str, exit_code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

/// When a crashed container may start again (CrashLoopBackOff), or `None` for now.
pub fn restart_at(c: &ContainerObs, mem: &Memory) -> Option<i64> {
    let ran = c.finished_at.saturating_sub(c.started_at);
    if ran >= ns(CRASH_BACKOFF_RESET) {
        return None;
    }
    let delay = mem.crash_delay.get(&c.name).copied().unwrap_or_default();
    (!delay.is_zero()).then(|| c.finished_at + ns(delay))
}

fn start_or_wait(
    sandbox: &str,
    c: &Container,
    init: bool,
    prev: Option<&ContainerObs>,
    mem: &Memory,
    now: i64,
) -> Result<Action, i64> {
    if let Some(&(_, until)) = c.image.as_ref().and_then(|i| mem.pull_backoff.get(i))
        && until > now
    {
        return Err(until);
    }
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

/// The next step for one pod. `desired` is `None` when no source wants the
/// pod any more; `now` is wall-clock ns since the epoch.
pub fn plan(desired: Option<&Pod>, obs: &Observed, mem: &Memory, now: i64) -> Action {
    let live: Vec<String> = obs
        .containers
        .iter()
        .filter(|c| matches!(c.state, CState::Running | CState::Unknown))
        .map(|c| c.id.clone())
        .collect();
    let Some(pod) = desired else {
        // Termination, kubelet's order: stop containers (grace period), stop
        // the sandbox (network torn down), then remove what is left.
        if !live.is_empty() {
            return Action::StopContainers { ids: live };
        }
        if let Some(sb) = obs.sandboxes.iter().find(|s| s.ready) {
            return Action::StopSandbox { id: sb.id.clone() };
        }
        if !obs.containers.is_empty() {
            return Action::RemoveContainers {
                ids: obs.containers.iter().map(|c| c.id.clone()).collect(),
            };
        }
        if let Some(sb) = obs.sandboxes.first() {
            return Action::RemoveSandbox { id: sb.id.clone() };
        }
        return Action::Finished;
    };

    let s = pod.spec.clone().unwrap_or_default();
    let policy = s.restart_policy.as_deref().unwrap_or("Always");
    let current = current_sandbox(pod, obs);
    let terminal = is_terminal(pod, obs);

    let Some(current) = current else {
        // No usable sandbox: kill what is left of the pod, then make a new one
        // (unless the pod is done, where the sandbox stays stopped).
        if !live.is_empty() {
            return Action::StopContainers { ids: live };
        }
        if let Some(sb) = obs.sandboxes.iter().find(|sb| sb.ready) {
            return Action::StopSandbox { id: sb.id.clone() };
        }
        if terminal {
            return Action::Wait { until: None };
        }
        if let Some((_, until)) = mem.sandbox_backoff.filter(|(_, until)| *until > now) {
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
    if !stale_live.is_empty() {
        return Action::StopContainers { ids: stale_live };
    }
    if let Some(sb) = obs
        .sandboxes
        .iter()
        .find(|sb| sb.ready && sb.id != current.id)
    {
        return Action::StopSandbox { id: sb.id.clone() };
    }

    let mut wake: Option<i64> = None;
    let mut wait_until = |t: i64| wake = Some(wake.map_or(t, |w: i64| w.min(t)));

    // Init containers, one by one; each must exit 0 before the next. Once an
    // app container exists in this sandbox, initialisation is over.
    let apps_started = s
        .containers
        .iter()
        .any(|c| obs.latest_in(&current.id, &c.name, false).is_some());
    if !apps_started && !terminal {
        for c in s.init_containers.iter().flatten() {
            let prev = obs.latest_in(&current.id, &c.name, true);
            match prev.map(|p| (p.state, p.exit_code)) {
                Some((CState::Exited, 0)) => continue,
                Some((CState::Running | CState::Unknown, _)) => {
                    return Action::Wait { until: None };
                }
                Some((CState::Created, _)) => {
                    return Action::RemoveContainers {
                        ids: vec![prev.unwrap().id.clone()],
                    };
                }
                Some((CState::Exited, _)) if policy == "Never" => break,
                _ => {}
            }
            let prev = prev.or_else(|| obs.latest(&c.name, true));
            return match start_or_wait(&current.id, c, true, prev, mem, now) {
                Ok(a) => a,
                Err(until) => Action::Wait { until: Some(until) },
            };
        }
    }

    if !terminal {
        let inits_done = apps_started
            || s.init_containers.iter().flatten().all(|c| {
                obs.latest_in(&current.id, &c.name, true)
                    .is_some_and(|p| p.state == CState::Exited && p.exit_code == 0)
            });
        if inits_done {
            for c in &s.containers {
                let want_hash = spec::container_hash(c);
                let prev = obs.latest_in(&current.id, &c.name, false);
                match prev {
                    Some(p) if p.state == CState::Running || p.state == CState::Unknown => {
                        if p.hash != want_hash {
                            // The spec changed: replace this container only.
                            return Action::StopContainers {
                                ids: vec![p.id.clone()],
                            };
                        }
                        continue;
                    }
                    Some(p) if p.state == CState::Created => {
                        // Created but never started (e.g. the agent died in
                        // between): remove it and create it afresh.
                        return Action::RemoveContainers {
                            ids: vec![p.id.clone()],
                        };
                    }
                    Some(p) if p.hash == want_hash && !should_restart(policy, p.exit_code) => {
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
    }

    // Garbage: older dead instances (the newest of each name stays, for
    // logs and lastState), and sandboxes that are stopped and superseded.
    let old: Vec<String> = obs
        .containers
        .iter()
        .filter(|c| c.state == CState::Exited)
        .filter(|c| {
            obs.containers
                .iter()
                .any(|n| n.name == c.name && n.init == c.init && n.created_at > c.created_at)
        })
        .map(|c| c.id.clone())
        .collect();
    if !old.is_empty() {
        return Action::RemoveContainers { ids: old };
    }
    if let Some(sb) = obs
        .sandboxes
        .iter()
        .find(|sb| !sb.ready && sb.id != current.id && sb.created_at < current.created_at)
    {
        // The newest dead instances may live there; they move to "latest in
        // the current sandbox" once the current sandbox has its own.
        let holds_latest = obs.containers.iter().any(|c| {
            c.sandbox_id == sb.id && obs.latest(&c.name, c.init).is_some_and(|l| l.id == c.id)
        });
        if !holds_latest {
            return Action::RemoveSandbox { id: sb.id.clone() };
        }
    }

    if terminal {
        // Nothing will run again: release the network (kubelet stops the
        // sandbox of a finished pod); containers stay for logs and status.
        return Action::StopSandbox {
            id: current.id.clone(),
        };
    }
    Action::Wait { until: wake }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

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
                "nothing yet: make a sandbox",
                Some(&always),
                Observed::default(),
                Action::CreateSandbox { attempt: 0 },
            ),
            (
                "sandbox up: first init container",
                Some(&always),
                Observed {
                    sandboxes: vec![sb(&always, "s1", true, S)],
                    containers: vec![],
                },
                start("init", true, 0),
            ),
            (
                "init running: wait for it",
                Some(&always),
                Observed {
                    sandboxes: vec![sb(&always, "s1", true, S)],
                    containers: vec![ctr(&always, "s1", "init", true, Running, 0, 2 * S)],
                },
                Action::Wait { until: None },
            ),
            (
                "init done: app starts",
                Some(&always),
                Observed {
                    sandboxes: vec![sb(&always, "s1", true, S)],
                    containers: vec![ctr(&always, "s1", "init", true, Exited, 0, 2 * S)],
                },
                start("app", false, 0),
            ),
            (
                "init failed under Always: restarted",
                Some(&always),
                Observed {
                    sandboxes: vec![sb(&always, "s1", true, S)],
                    containers: vec![ctr(&always, "s1", "init", true, Exited, 1, 2 * S)],
                },
                start("init", true, 1),
            ),
            (
                "app running: converged",
                Some(&always),
                Observed {
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
                    sandboxes: vec![sb(&always, "s1", true, S)],
                    containers: vec![ctr(&always, "s1", "app", false, Exited, 0, 3 * S)],
                },
                start("app", false, 1),
            ),
            (
                "OnFailure and exit 0: done, sandbox stopped",
                Some(&onfail),
                Observed {
                    sandboxes: vec![sb(&onfail, "s1", true, S)],
                    containers: vec![ctr(&onfail, "s1", "app", false, Exited, 0, 3 * S)],
                },
                Action::StopSandbox { id: "s1".into() },
            ),
            (
                "OnFailure and exit 2: restarted",
                Some(&onfail),
                Observed {
                    sandboxes: vec![sb(&onfail, "s1", true, S)],
                    containers: vec![ctr(&onfail, "s1", "app", false, Exited, 2, 3 * S)],
                },
                start("app", false, 1),
            ),
            (
                "Never, finished, sandbox stopped: stays done",
                Some(&never),
                Observed {
                    sandboxes: vec![sb(&never, "s1", false, S)],
                    containers: vec![ctr(&never, "s1", "app", false, Exited, 1, 3 * S)],
                },
                Action::Wait { until: None },
            ),
            (
                "sandbox died under Always: a new one",
                Some(&always),
                Observed {
                    sandboxes: vec![sb(&always, "s1", false, S)],
                    containers: vec![ctr(&always, "s1", "app", false, Exited, 137, 3 * S)],
                },
                Action::CreateSandbox { attempt: 1 },
            ),
            (
                "deleted: containers stopped first",
                None,
                Observed {
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
                    sandboxes: vec![sb(&always, "s1", true, S)],
                    containers: vec![ctr(&always, "s1", "app", false, Exited, 0, 3 * S)],
                },
                Action::StopSandbox { id: "s1".into() },
            ),
            (
                "deleted: then containers are removed",
                None,
                Observed {
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
                "two ready sandboxes after a crash: the older one is stopped",
                Some(&always),
                Observed {
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
    fn spec_change_replaces_only_that_container() {
        let old = pod("Always", &[], &["a", "b"]);
        let mut new = old.clone();
        new.spec.as_mut().unwrap().containers[1].image = Some("img:2".into());
        let obs = Observed {
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
            sandboxes: vec![sb(&p, "s1", true, S)],
            containers: vec![ctr(&p, "s1", "app", false, CState::Exited, 1, 3 * S)],
        };
        obs.containers[0].restart_count = 2;
        let mut mem = Memory::default();
        mem.crash_delay
            .insert("app".into(), Duration::from_secs(20));
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
            sandboxes: vec![sb(&p, "s1", true, S)],
            containers: vec![],
        };
        let mut mem = Memory::default();
        mem.pull_backoff
            .insert("img:1".into(), (Duration::from_secs(10), 50 * S));
        assert_eq!(
            plan(Some(&p), &obs, &mem, 40 * S),
            Action::Wait {
                until: Some(50 * S)
            }
        );
        assert_eq!(plan(Some(&p), &obs, &mem, 51 * S), start("app", false, 0));
    }

    #[test]
    fn older_dead_instances_are_collected() {
        let p = pod("Always", &[], &["app"]);
        let mut second = ctr(&p, "s1", "app", false, CState::Running, 0, 5 * S);
        second.restart_count = 1;
        let obs = Observed {
            sandboxes: vec![sb(&p, "s1", true, S)],
            containers: vec![
                ctr(&p, "s1", "app", false, CState::Exited, 1, 3 * S),
                second,
            ],
        };
        assert_eq!(
            plan(Some(&p), &obs, &Memory::default(), 10 * S),
            Action::RemoveContainers {
                ids: vec![format!("app@{}", 3 * S)]
            }
        );
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let mut d = Duration::ZERO;
        let mut seen = vec![];
        for _ in 0..7 {
            d = next_delay(d, CRASH_BACKOFF_START, CRASH_BACKOFF_MAX);
            seen.push(d.as_secs());
        }
        assert_eq!(seen, vec![10, 20, 40, 80, 160, 300, 300]);
    }
}
