//! A node-wide bound on the CRI calls that make the runtime do work: a
//! `Runtime` that wraps another and lets at most `limit` of them be in
//! flight at once, whichever pods they are for.
//!
//! Why: every pod's worker calls the runtime on its own, so a pod with 1,000
//! containers stopping at once (or 100 pods created at once) would put that
//! many calls on the runtime together; containerd 1.6's shim wedged under
//! that. The per-pod bound in the worker keeps one pod from flooding; this
//! one keeps the node's total finite, however many pods there are.
//!
//! Bounded: RunPodSandbox, StopPodSandbox, RemovePodSandbox,
//! CreateContainer, StartContainer, StopContainer, RemoveContainer (each
//! reaches a shim, a snapshotter or CNI). Not bounded: Version, the List and
//! Status calls and ImageStatus (answered from the runtime's in-memory
//! stores; the relist and status must stay live while slots are busy), and
//! PullImage (long-running, with no deadline: a slow registry must not hold
//! the node's container operations hostage).
//!
//! How it relates to the sandbox slots (`maxParallelSandboxCreations`,
//! `pod::worker::Shared::sandbox_slots`): each RunPodSandbox holds one
//! sandbox slot and, while the call runs, one slot here. Config validation
//! keeps the sandbox slots below this bound, so a burst of sandbox
//! creations can never take every slot: containers of pods whose sandbox is
//! ready, and stops of pods being deleted, always get through. No call made
//! while a slot is held waits for another slot (the CNI ADD inside
//! RunPodSandbox reaches the agent's CNI server, which makes no CRI call),
//! so the bound cannot deadlock.
//!
//! Side effects: none of its own; it forwards every call to the inner runtime.

use tokio::sync::Semaphore;

use super::{Labels, Result, Runtime, api};

/// A runtime whose work-doing calls share `limit` slots node-wide.
pub struct Bounded<R> {
    inner: R,
    slots: Semaphore,
    limit: usize,
}

impl<R: Runtime> Bounded<R> {
    /// `limit` is at least 1 (config validation); 0 is taken as 1.
    pub fn new(inner: R, limit: usize) -> Self {
        let limit = limit.max(1);
        Bounded {
            inner,
            slots: Semaphore::new(limit),
            limit,
        }
    }

    /// The bound.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The wrapped runtime.
    pub fn inner(&self) -> &R {
        &self.inner
    }

    /// Runs `call` holding one slot. The semaphore is never closed, so the
    /// acquire cannot fail; if it ever did, the call would run unbounded
    /// rather than not at all.
    async fn bounded<T>(&self, call: impl Future<Output = T>) -> T {
        let _slot = self.slots.acquire().await.ok();
        call.await
    }
}

impl<R: Runtime> Runtime for Bounded<R> {
    async fn version(&self) -> Result<(String, String)> {
        self.inner.version().await
    }

    async fn run_pod_sandbox(&self, config: api::PodSandboxConfig) -> Result<String> {
        self.bounded(self.inner.run_pod_sandbox(config)).await
    }

    async fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
        self.bounded(self.inner.stop_pod_sandbox(id)).await
    }

    async fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        self.bounded(self.inner.remove_pod_sandbox(id)).await
    }

    async fn pod_sandbox_status(&self, id: &str) -> Result<api::PodSandboxStatus> {
        self.inner.pod_sandbox_status(id).await
    }

    async fn list_pod_sandboxes(&self, labels: Labels) -> Result<Vec<api::PodSandbox>> {
        self.inner.list_pod_sandboxes(labels).await
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: api::ContainerConfig,
        sandbox_config: api::PodSandboxConfig,
    ) -> Result<String> {
        self.bounded(
            self.inner
                .create_container(sandbox_id, config, sandbox_config),
        )
        .await
    }

    async fn start_container(&self, id: &str) -> Result<()> {
        self.bounded(self.inner.start_container(id)).await
    }

    async fn stop_container(&self, id: &str, timeout: i64) -> Result<()> {
        self.bounded(self.inner.stop_container(id, timeout)).await
    }

    async fn remove_container(&self, id: &str) -> Result<()> {
        self.bounded(self.inner.remove_container(id)).await
    }

    async fn list_containers(&self, labels: Labels) -> Result<Vec<api::Container>> {
        self.inner.list_containers(labels).await
    }

    async fn container_status(&self, id: &str) -> Result<api::ContainerStatus> {
        self.inner.container_status(id).await
    }

    async fn image_status(&self, image: &str) -> Result<Option<api::Image>> {
        self.inner.image_status(image).await
    }

    async fn pull_image(
        &self,
        image: &str,
        auth: Option<api::AuthConfig>,
        sandbox_config: api::PodSandboxConfig,
    ) -> Result<String> {
        self.inner.pull_image(image, auth, sandbox_config).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::cri::fake::FakeRuntime;

    /// The fake runtime behind a probe: each call takes `LATENCY` (paused
    /// time) and counts itself in flight, so the test sees the peak number
    /// of calls the runtime had at once, by kind.
    #[derive(Default)]
    struct Probe {
        fake: FakeRuntime,
        now: [AtomicUsize; 2],
        peak: [AtomicUsize; 2],
    }

    const LATENCY: Duration = Duration::from_millis(100);
    const WORK: usize = 0;
    const READ: usize = 1;

    impl Probe {
        async fn call<T>(&self, kind: usize, f: impl Future<Output = T>) -> T {
            let n = self.now[kind].fetch_add(1, Ordering::SeqCst) + 1;
            self.peak[kind].fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(LATENCY).await;
            let out = f.await;
            self.now[kind].fetch_sub(1, Ordering::SeqCst);
            out
        }
        /// Peak in flight of (work-doing calls, reads), then reset.
        fn take_peaks(&self) -> (usize, usize) {
            (
                self.peak[WORK].swap(0, Ordering::SeqCst),
                self.peak[READ].swap(0, Ordering::SeqCst),
            )
        }
    }

    impl Runtime for Probe {
        async fn version(&self) -> Result<(String, String)> {
            self.call(READ, self.fake.version()).await
        }
        async fn run_pod_sandbox(&self, config: api::PodSandboxConfig) -> Result<String> {
            self.call(WORK, self.fake.run_pod_sandbox(config)).await
        }
        async fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
            self.call(WORK, self.fake.stop_pod_sandbox(id)).await
        }
        async fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
            self.call(WORK, self.fake.remove_pod_sandbox(id)).await
        }
        async fn pod_sandbox_status(&self, id: &str) -> Result<api::PodSandboxStatus> {
            self.call(READ, self.fake.pod_sandbox_status(id)).await
        }
        async fn list_pod_sandboxes(&self, labels: Labels) -> Result<Vec<api::PodSandbox>> {
            self.call(READ, self.fake.list_pod_sandboxes(labels)).await
        }
        async fn create_container(
            &self,
            sandbox_id: &str,
            config: api::ContainerConfig,
            sandbox_config: api::PodSandboxConfig,
        ) -> Result<String> {
            let f = self
                .fake
                .create_container(sandbox_id, config, sandbox_config);
            self.call(WORK, f).await
        }
        async fn start_container(&self, id: &str) -> Result<()> {
            self.call(WORK, self.fake.start_container(id)).await
        }
        async fn stop_container(&self, id: &str, timeout: i64) -> Result<()> {
            self.call(WORK, self.fake.stop_container(id, timeout)).await
        }
        async fn remove_container(&self, id: &str) -> Result<()> {
            self.call(WORK, self.fake.remove_container(id)).await
        }
        async fn list_containers(&self, labels: Labels) -> Result<Vec<api::Container>> {
            self.call(READ, self.fake.list_containers(labels)).await
        }
        async fn container_status(&self, id: &str) -> Result<api::ContainerStatus> {
            self.call(READ, self.fake.container_status(id)).await
        }
        async fn image_status(&self, image: &str) -> Result<Option<api::Image>> {
            self.call(READ, self.fake.image_status(image)).await
        }
        async fn pull_image(
            &self,
            image: &str,
            auth: Option<api::AuthConfig>,
            sandbox_config: api::PodSandboxConfig,
        ) -> Result<String> {
            self.call(READ, self.fake.pull_image(image, auth, sandbox_config))
                .await
        }
    }

    fn container(i: usize) -> api::ContainerConfig {
        api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: format!("c{i}"),
                attempt: 0,
            }),
            ..Default::default()
        }
    }

    /// Runs `n` copies of `op(i)` at once, as 1,000 containers of one pod
    /// (or many pods) would, and returns their results.
    async fn all_at_once<T, F>(n: usize, op: impl Fn(usize) -> F) -> Vec<T>
    where
        F: Future<Output = T>,
    {
        futures::future::join_all((0..n).map(op)).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_containers_at_once_never_exceed_the_node_bound() {
        const LIMIT: usize = 8;
        const N: usize = 1000;
        let rt = Arc::new(Bounded::new(Probe::default(), LIMIT));
        let sandbox = rt
            .run_pod_sandbox(api::PodSandboxConfig::default())
            .await
            .unwrap();
        rt.inner().take_peaks();

        let ids: Vec<String> = all_at_once(N, |i| {
            rt.create_container(&sandbox, container(i), api::PodSandboxConfig::default())
        })
        .await
        .into_iter()
        .collect::<Result<_>>()
        .unwrap();
        assert_eq!(rt.inner().take_peaks().0, LIMIT, "CreateContainer");

        let started = all_at_once(N, |i| rt.start_container(&ids[i])).await;
        assert!(started.iter().all(Result::is_ok));
        assert_eq!(rt.inner().take_peaks().0, LIMIT, "StartContainer");

        // The case that wedged containerd 1.6's shim: all stopped at once.
        let t = tokio::time::Instant::now();
        let stopped = all_at_once(N, |i| rt.stop_container(&ids[i], 30)).await;
        assert!(stopped.iter().all(Result::is_ok));
        assert_eq!(rt.inner().take_peaks().0, LIMIT, "StopContainer");
        // The bound queues, it does not serialise: N/LIMIT rounds.
        assert_eq!(t.elapsed(), LATENCY * (N / LIMIT) as u32);

        let removed = all_at_once(N, |i| rt.remove_container(&ids[i])).await;
        assert!(removed.iter().all(Result::is_ok));
        assert_eq!(rt.inner().take_peaks().0, LIMIT, "RemoveContainer");
        assert!(rt.inner().fake.containers().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn different_calls_and_pods_share_one_bound() {
        const LIMIT: usize = 4;
        let rt = Bounded::new(Probe::default(), LIMIT);
        let sandbox = rt
            .run_pod_sandbox(api::PodSandboxConfig::default())
            .await
            .unwrap();
        rt.inner().take_peaks();
        let sandboxes = all_at_once(10, |_| rt.run_pod_sandbox(api::PodSandboxConfig::default()));
        let containers = all_at_once(10, |i| {
            rt.create_container(&sandbox, container(i), api::PodSandboxConfig::default())
        });
        let stops = all_at_once(10, |i| {
            rt.stop_pod_sandbox(if i == 0 { &sandbox } else { "gone" })
        });
        let _ = tokio::join!(sandboxes, containers, stops);
        assert_eq!(rt.inner().take_peaks().0, LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn reads_and_pulls_pass_while_every_slot_is_busy() {
        let rt = Bounded::new(Probe::default(), 2);
        let sandbox = rt
            .run_pod_sandbox(api::PodSandboxConfig::default())
            .await
            .unwrap();
        let busy = all_at_once(20, |i| {
            rt.create_container(&sandbox, container(i), api::PodSandboxConfig::default())
        });
        let reads = async {
            let t = tokio::time::Instant::now();
            let (l, s, i, p) = tokio::join!(
                rt.list_containers(Labels::new()),
                rt.pod_sandbox_status(&sandbox),
                rt.image_status("busybox"),
                rt.pull_image("busybox", None, api::PodSandboxConfig::default()),
            );
            assert!(l.is_ok() && s.is_ok() && i.is_ok() && p.is_ok());
            t.elapsed()
        };
        let (_, waited) = tokio::join!(busy, reads);
        assert_eq!(waited, LATENCY, "reads did not queue behind 20 creations");
        assert_eq!(rt.inner().take_peaks(), (2, 4));
    }

    #[test]
    fn a_zero_limit_still_lets_calls_through() {
        assert_eq!(Bounded::new(FakeRuntime::new(), 0).limit(), 1);
    }
}
