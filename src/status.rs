//! Pod status, computed as kubelet computes it (phase, conditions, container
//! statuses with state / lastState / reason / restartCount, podIP), and the
//! board where workers publish it for `minilet get pods`.
//!
//! `compute` is pure; the board is an in-memory map (no lock is held across
//! an await).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};

use crate::cni::observe::{CniEvent, CniEvents, CniMetrics, NetworkStatusBoard};
use crate::locks::{read, write};
use crate::pod::lifecycle::{self, CState, ContainerObs, Memory, Observed, RestartPolicy, Waiting};
use crate::readiness::{AgentStatus, Readiness};
use crate::source::SourceError;

/// A Time from CRI nanoseconds; `None` for 0 (unset).
pub fn time(ns: i64) -> Option<Time> {
    (ns > 0)
        .then(|| jiff::Timestamp::from_nanosecond(i128::from(ns)).ok())
        .flatten()
        .map(Time)
}

fn qos_class(pod: &Pod) -> &'static str {
    let s = pod.spec.clone().unwrap_or_default();
    let all: Vec<&Container> = s
        .init_containers
        .iter()
        .flatten()
        .chain(s.containers.iter())
        .collect();
    let mut best_effort = true;
    let mut guaranteed = true;
    for c in all {
        let r = c.resources.clone().unwrap_or_default();
        let req = r.requests.unwrap_or_default();
        let lim = r.limits.unwrap_or_default();
        if !req.is_empty() || !lim.is_empty() {
            best_effort = false;
        }
        for res in ["cpu", "memory"] {
            match (req.get(res), lim.get(res)) {
                (_, None) => guaranteed = false,
                (Some(a), Some(b)) if a != b => guaranteed = false,
                _ => {}
            }
        }
    }
    match (best_effort, guaranteed) {
        (true, _) => "BestEffort",
        (_, true) => "Guaranteed",
        _ => "Burstable",
    }
}

fn terminated(c: &ContainerObs, runtime: &str) -> ContainerStateTerminated {
    let reason = if !c.reason.is_empty() {
        c.reason.clone()
    } else if c.exit_code == 0 {
        "Completed".into()
    } else {
        "Error".into()
    };
    ContainerStateTerminated {
        exit_code: c.exit_code,
        reason: Some(reason),
        message: (!c.message.is_empty()).then(|| c.message.clone()),
        started_at: time(c.started_at),
        finished_at: time(c.finished_at),
        container_id: Some(format!("{runtime}://{}", c.id)),
        signal: None,
    }
}

struct Ctx<'a> {
    pod: &'a Pod,
    obs: &'a Observed,
    mem: &'a Memory,
    runtime: &'a str,
    now: i64,
    /// The current (ready, matching) sandbox id, if any.
    sandbox: Option<&'a str>,
}

fn container_status(cx: &Ctx, c: &Container, init: bool, default_waiting: &str) -> ContainerStatus {
    let name = &c.name;
    // Instances of this container, newest first: in the current sandbox
    // first, then anywhere (a stopped pod keeps its last state).
    let mut instances: Vec<&ContainerObs> = cx
        .obs
        .containers
        .iter()
        .filter(|o| &o.name == name && o.init == init)
        .collect();
    instances.sort_by_key(|o| std::cmp::Reverse((o.created_at, o.restart_count)));
    let latest = instances.first().copied();
    // lastState: the newest dead instance before the latest (plan's garbage
    // rule keeps it in the runtime, so it survives an agent restart).
    let previous = instances
        .iter()
        .skip(1)
        .find(|o| o.state == CState::Exited)
        .copied();
    let waiting = |reason: String, message: Option<String>| ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason),
            message,
        }),
        ..Default::default()
    };
    // Volumes not set up: the container waits ContainerCreating with the
    // FailedMount message, whatever it waited for before.
    let volume_wait = cx.mem.volume_error.as_ref().map(|message| Waiting {
        reason: "ContainerCreating".into(),
        message: message.clone(),
    });
    let remembered = volume_wait.as_ref().or(cx.mem.waiting.get(name));
    let (state, last_state) = match latest {
        Some(o) if o.state == CState::Running => (
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: time(o.started_at),
                }),
                ..Default::default()
            },
            previous.map(|p| ContainerState {
                terminated: Some(terminated(p, cx.runtime)),
                ..Default::default()
            }),
        ),
        Some(o) if o.state == CState::Exited => {
            let term = ContainerState {
                terminated: Some(terminated(o, cx.runtime)),
                ..Default::default()
            };
            // An init container that succeeded is done, whatever the policy.
            let will_restart = !lifecycle::is_terminal(cx.pod, cx.obs)
                && (!init || o.exit_code != 0)
                && RestartPolicy::of(cx.pod).restarts(o.exit_code);
            if let Some(w) = remembered.filter(|_| will_restart) {
                (
                    waiting(w.reason.clone(), Some(w.message.clone())),
                    Some(term),
                )
            } else if let Some(at) =
                lifecycle::restart_at(o, cx.mem).filter(|at| will_restart && *at > cx.now)
            {
                let secs = (at - o.finished_at) / 1_000_000_000;
                let msg = format!(
                    "back-off {secs}s restarting failed container={name} pod={}_{}({})",
                    cx.pod.metadata.name.as_deref().unwrap_or_default(),
                    cx.pod.metadata.namespace.as_deref().unwrap_or_default(),
                    cx.pod.metadata.uid.as_deref().unwrap_or_default(),
                );
                (waiting("CrashLoopBackOff".into(), Some(msg)), Some(term))
            } else {
                (term, None)
            }
        }
        _ => {
            let (reason, message) = match remembered {
                Some(w) => (w.reason.clone(), Some(w.message.clone())),
                None => (default_waiting.to_string(), None),
            };
            (waiting(reason, message), None)
        }
    };
    let running_now = latest.is_some_and(|o| o.state == CState::Running);
    let in_current = latest.is_some_and(|o| Some(o.sandbox_id.as_str()) == cx.sandbox);
    ContainerStatus {
        name: name.clone(),
        image: c.image.clone().unwrap_or_default(),
        image_id: latest.map(|o| o.image_ref.clone()).unwrap_or_default(),
        container_id: latest.map(|o| format!("{}://{}", cx.runtime, o.id)),
        ready: running_now && in_current && !init,
        started: Some(running_now),
        restart_count: latest.map_or(0, |o| o.restart_count),
        state: Some(state),
        last_state: last_state.or(Some(ContainerState::default())),
        ..Default::default()
    }
}

fn condition(kind: &str, ok: bool, reason: Option<&str>, now: &Option<Time>) -> PodCondition {
    PodCondition {
        type_: kind.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: if ok { None } else { reason.map(str::to_string) },
        last_transition_time: now.clone(),
        ..Default::default()
    }
}

/// kubelet's status for this pod, from what the runtime holds and what the
/// worker remembers.
pub fn compute(pod: &Pod, obs: &Observed, mem: &Memory, runtime: &str, now: i64) -> PodStatus {
    let s = pod.spec.clone().unwrap_or_default();
    let policy = RestartPolicy::of(pod);
    let current = lifecycle::current_sandbox(pod, obs);
    let cx = Ctx {
        pod,
        obs,
        mem,
        runtime,
        now,
        sandbox: current.map(|sb| sb.id.as_str()),
    };
    let inits: Vec<ContainerStatus> = s
        .init_containers
        .iter()
        .flatten()
        .map(|c| container_status(&cx, c, true, "PodInitializing"))
        .collect();
    let inits_done = lifecycle::initialised(pod, obs, None);
    let app_default = if inits_done {
        "ContainerCreating"
    } else {
        "PodInitializing"
    };
    let apps: Vec<ContainerStatus> = s
        .containers
        .iter()
        .map(|c| container_status(&cx, c, false, app_default))
        .collect();

    let init_failed = lifecycle::init_failed(pod, obs);
    // kubelet's getPhase over the app containers' latest instances.
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for c in &s.containers {
        match obs.latest(&c.name, false) {
            Some(o) if o.state == CState::Running => running += 1,
            Some(o) if o.state == CState::Exited => {
                stopped += 1;
                if o.exit_code == 0 {
                    succeeded += 1;
                }
            }
            _ => waiting += 1,
        }
    }
    let phase = if init_failed {
        "Failed"
    } else if !inits_done || waiting > 0 {
        "Pending"
    } else if running > 0 {
        "Running"
    } else if stopped > 0 {
        match policy {
            RestartPolicy::Always => "Running",
            _ if stopped == succeeded => "Succeeded",
            RestartPolicy::Never => "Failed",
            RestartPolicy::OnFailure => "Running",
        }
    } else {
        "Pending"
    };
    let all_ready = !apps.is_empty() && apps.iter().all(|c| c.ready);
    let seen = time(now);
    let mut conditions = vec![
        condition("PodReadyToStartContainers", current.is_some(), None, &seen),
        condition(
            "Initialized",
            inits_done,
            Some("ContainersNotInitialized"),
            &seen,
        ),
        condition("Ready", all_ready, Some("ContainersNotReady"), &seen),
        condition(
            "ContainersReady",
            all_ready,
            Some("ContainersNotReady"),
            &seen,
        ),
        condition("PodScheduled", true, None, &seen),
    ];
    for c in &mut conditions {
        if c.status == "False" && c.reason.is_some() {
            let names: Vec<&str> = if c.type_ == "Initialized" {
                inits
                    .iter()
                    .filter(|st| st.state.as_ref().is_none_or(|s| s.terminated.is_none()))
                    .map(|st| st.name.as_str())
                    .collect()
            } else {
                apps.iter()
                    .filter(|st| !st.ready)
                    .map(|st| st.name.as_str())
                    .collect()
            };
            c.message = Some(format!(
                "containers with unready status: [{}]",
                names.join(" ")
            ));
        }
    }
    let ip = current.map(|sb| sb.ip.clone()).filter(|ip| !ip.is_empty());
    let start = obs
        .sandboxes
        .iter()
        .map(|sb| sb.created_at)
        .min()
        .and_then(time);
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conditions),
        message: mem.sandbox_error.clone(),
        reason: mem
            .sandbox_error
            .as_ref()
            .map(|_| "SandboxError".to_string()),
        pod_ip: ip.clone(),
        pod_ips: ip.map(|ip| vec![PodIP { ip }]),
        start_time: start,
        qos_class: Some(qos_class(pod).into()),
        init_container_statuses: (!inits.is_empty()).then_some(inits),
        container_statuses: Some(apps),
        ..Default::default()
    }
}

/// One event of a pod, as `minilet get events` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EventView {
    pub namespace: String,
    pub pod: String,
    #[serde(flatten)]
    pub event: CniEvent,
}

/// What `minilet get pods` shows: every pod the workers know, plus the
/// sources' errors, the pods' events and the metrics text.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BoardView {
    pub pods: Vec<Pod>,
    pub errors: Vec<SourceError>,
    /// kubelet `podLogsDir`, so `minilet logs` can find the files.
    pub pod_logs_dir: String,
    #[serde(default)]
    pub events: Vec<EventView>,
    /// Prometheus text exposition of the agent's counters.
    #[serde(default)]
    pub metrics: String,
    /// Whether the agent has caught up with the node (`minilet get ready`).
    #[serde(default)]
    pub agent: AgentStatus,
}

/// What the CNI server records per pod and per plugin, shared with status.
#[derive(Clone, Default)]
pub struct CniBoards {
    pub events: Arc<CniEvents>,
    pub network_status: Arc<NetworkStatusBoard>,
    pub metrics: Arc<CniMetrics>,
}

/// Shared status of all pods, written by workers, read by the control socket.
#[derive(Clone, Default)]
pub struct Board {
    inner: Arc<RwLock<BoardInner>>,
    pub cni: CniBoards,
    pub readiness: Arc<Readiness>,
    /// The last volume stats round (`volume::stats`).
    pub volume_stats: Arc<crate::volume::stats::StatsBoard>,
}

#[derive(Default)]
struct BoardInner {
    pods: BTreeMap<String, Pod>,
    errors: Vec<SourceError>,
}

impl Board {
    pub fn set_pod(&self, uid: &str, pod: Pod) {
        write(&self.inner).pods.insert(uid.to_string(), pod);
    }
    pub fn remove_pod(&self, uid: &str) {
        write(&self.inner).pods.remove(uid);
    }
    pub fn set_errors(&self, errors: Vec<SourceError>) {
        write(&self.inner).errors = errors;
    }
    /// The pods on the board, by uid.
    pub fn pods(&self) -> Vec<(String, Pod)> {
        read(&self.inner)
            .pods
            .iter()
            .map(|(uid, p)| (uid.clone(), p.clone()))
            .collect()
    }
    /// Uids of the pods on the board.
    pub fn uids(&self) -> Vec<String> {
        read(&self.inner).pods.keys().cloned().collect()
    }
    pub fn view(&self, pod_logs_dir: &str) -> BoardView {
        let inner = read(&self.inner);
        let mut events: Vec<EventView> = inner
            .pods
            .iter()
            .flat_map(|(uid, p)| {
                self.cni
                    .events
                    .events(uid)
                    .into_iter()
                    .map(|event| EventView {
                        namespace: p.metadata.namespace.clone().unwrap_or_default(),
                        pod: p.metadata.name.clone().unwrap_or_default(),
                        event,
                    })
            })
            .collect();
        events.sort_by_key(|e| e.event.time);
        let mut pods: Vec<Pod> = inner.pods.values().cloned().collect();
        pods.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        BoardView {
            pods,
            errors: inner.errors.clone(),
            pod_logs_dir: pod_logs_dir.to_string(),
            events,
            metrics: self.cni.metrics.render() + &self.volume_stats.render(),
            agent: self.readiness.status(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::lifecycle::SandboxObs;
    use crate::pod::spec;

    const S: i64 = 1_000_000_000;

    fn pod(policy: &str) -> Pod {
        crate::yaml::from_str(&format!(
            "metadata: {{name: p, namespace: default, uid: u}}\nspec:\n  restartPolicy: {policy}\n  initContainers: [{{name: i, image: x}}]\n  containers: [{{name: a, image: x}}]\n"
        ))
        .unwrap()
    }

    fn obs(p: &Pod, states: &[(&str, bool, CState, i32, i32)]) -> Observed {
        let s = p.spec.as_ref().unwrap();
        Observed {
            volumes: lifecycle::VolumesObs {
                set_up: true,
                on_disk: true,
            },
            sandboxes: vec![SandboxObs {
                id: "s".into(),
                ready: true,
                attempt: 0,
                created_at: S,
                hash: spec::sandbox_hash(p),
                ip: "10.1.0.5".into(),
            }],
            containers: states
                .iter()
                .enumerate()
                .map(|(i, (name, init, st, code, rc))| {
                    let c = s
                        .init_containers
                        .iter()
                        .flatten()
                        .chain(&s.containers)
                        .find(|c| &c.name == name)
                        .unwrap();
                    ContainerObs {
                        id: format!("{name}{i}"),
                        name: name.to_string(),
                        sandbox_id: "s".into(),
                        init: *init,
                        state: *st,
                        exit_code: *code,
                        reason: String::new(),
                        message: String::new(),
                        created_at: (i as i64 + 2) * S,
                        started_at: (i as i64 + 2) * S,
                        finished_at: if *st == CState::Exited {
                            (i as i64 + 3) * S
                        } else {
                            0
                        },
                        restart_count: *rc,
                        hash: spec::container_hash(c),
                        image: "x".into(),
                        image_ref: "sha256:x".into(),
                        grace_period: None,
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn phases() {
        use CState::*;
        let mem = Memory::default();
        let cases = [
            ("Always", vec![], "Pending"),
            ("Always", vec![("i", true, Running, 0, 0)], "Pending"),
            (
                "Always",
                vec![("i", true, Exited, 0, 0), ("a", false, Running, 0, 0)],
                "Running",
            ),
            (
                "Never",
                vec![("i", true, Exited, 0, 0), ("a", false, Exited, 0, 0)],
                "Succeeded",
            ),
            (
                "Never",
                vec![("i", true, Exited, 0, 0), ("a", false, Exited, 3, 0)],
                "Failed",
            ),
            ("Never", vec![("i", true, Exited, 1, 0)], "Failed"),
            (
                "OnFailure",
                vec![("i", true, Exited, 0, 0), ("a", false, Exited, 3, 0)],
                "Running",
            ),
        ];
        for (policy, states, want) in cases {
            let p = pod(policy);
            let st = compute(&p, &obs(&p, &states), &mem, "containerd", 10 * S);
            assert_eq!(st.phase.as_deref(), Some(want), "{policy} {states:?}");
        }
    }

    #[test]
    fn running_pod_is_ready_with_ip_and_last_state() {
        use CState::*;
        let p = pod("Always");
        let o = obs(
            &p,
            &[
                ("i", true, Exited, 0, 0),
                ("a", false, Exited, 1, 0),
                ("a", false, Running, 0, 1),
            ],
        );
        let st = compute(&p, &o, &Memory::default(), "containerd", 10 * S);
        assert_eq!(st.pod_ip.as_deref(), Some("10.1.0.5"));
        let a = &st.container_statuses.as_ref().unwrap()[0];
        assert!(a.ready);
        assert_eq!(a.restart_count, 1);
        assert_eq!(a.container_id.as_deref(), Some("containerd://a2"));
        let last = a.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!((last.exit_code, last.reason.as_deref()), (1, Some("Error")));
        let ready = st
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
    }

    #[test]
    fn crash_loop_and_pull_errors_show_as_waiting() {
        use CState::*;
        let p = pod("Always");
        let o = obs(&p, &[("i", true, Exited, 0, 0), ("a", false, Exited, 1, 2)]);
        // Restart count 2: the third crash of its series waits 20 s.
        let mem = Memory::default();
        let st = compute(&p, &o, &mem, "containerd", 5 * S);
        let a = &st.container_statuses.as_ref().unwrap()[0];
        let w = a.state.as_ref().unwrap().waiting.as_ref().unwrap();
        assert_eq!(w.reason.as_deref(), Some("CrashLoopBackOff"));
        assert!(a.last_state.as_ref().unwrap().terminated.is_some());

        let o = obs(&p, &[("i", true, Exited, 0, 0)]);
        let mut mem = Memory::default();
        mem.waiting.insert(
            "a".into(),
            lifecycle::Waiting {
                reason: "ErrImagePull".into(),
                message: "not found".into(),
            },
        );
        let st = compute(&p, &o, &mem, "containerd", 5 * S);
        let w = st.container_statuses.unwrap()[0]
            .state
            .clone()
            .unwrap()
            .waiting
            .unwrap();
        assert_eq!(w.reason.as_deref(), Some("ErrImagePull"));
    }
}
