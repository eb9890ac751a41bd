//! The merger of pod sources: several sources (the manifest dir, the API
//! server) each publish their own snapshot; the pod manager sees one,
//! their union, with the names of the sources that have not listed yet.
//! That "sources synced" gate is what keeps an agent that restarts while
//! the API server is away from tearing down the API's pods: a pod the
//! runtime holds and no *synced* source wants may still be wanted by a
//! source that has not spoken.
//!
//! A source publishes `None` until its first complete listing, then
//! `Some(snapshot)` on every change (level-triggered, the whole set). A
//! source that loses its server keeps publishing its last snapshot.
//!
//! Side effects: none (a task that forwards watch values).

use tokio::sync::watch;
use tracing::warn;

use super::{Snapshot, SourceError};

/// One source's side of the merger.
pub struct Source {
    pub name: String,
    feed: Feed,
}

enum Feed {
    /// `None` until the source's first complete listing.
    Listing(watch::Receiver<Option<Snapshot>>),
    /// A source whose first listing was done before it was added (the
    /// manifest dir, scanned before anything starts).
    Listed(watch::Receiver<Snapshot>),
}

impl Source {
    /// A source that publishes whole snapshots from the start.
    pub fn listed(name: &str, rx: watch::Receiver<Snapshot>) -> Source {
        Source {
            name: name.to_string(),
            feed: Feed::Listed(rx),
        }
    }

    fn current(&mut self) -> Option<Snapshot> {
        match &mut self.feed {
            Feed::Listing(rx) => rx.borrow_and_update().clone(),
            Feed::Listed(rx) => Some(rx.borrow_and_update().clone()),
        }
    }

    /// Waits for a change; `true` when the source has ended.
    async fn ended(&mut self) -> bool {
        match &mut self.feed {
            Feed::Listing(rx) => rx.changed().await.is_err(),
            Feed::Listed(rx) => rx.changed().await.is_err(),
        }
    }
}

/// A new source channel: the sender for the source, the `Source` for the merger.
pub fn channel(name: &str) -> (watch::Sender<Option<Snapshot>>, Source) {
    let (tx, rx) = watch::channel(None);
    (
        tx,
        Source {
            name: name.to_string(),
            feed: Feed::Listing(rx),
        },
    )
}

/// The union of the sources' snapshots (pure). A uid two sources both
/// claim goes to the first source listed, with an error naming both.
pub fn merged(states: &[(&str, Option<&Snapshot>)]) -> Snapshot {
    let mut out = Snapshot::default();
    for (name, state) in states {
        let Some(snap) = state else {
            out.pending_sources.push(name.to_string());
            continue;
        };
        out.errors.extend(snap.errors.iter().cloned());
        for (file, objects) in &snap.objects {
            out.objects
                .entry(file.clone())
                .or_insert_with(|| objects.clone());
        }
        for (uid, pod) in &snap.pods {
            match out.pods.get(uid) {
                Some(first) => out.errors.push(SourceError {
                    file: pod.source.clone(),
                    message: format!(
                        "pod uid {uid} is already taken by {} from {}: ignored",
                        first.name(),
                        first.source
                    ),
                }),
                None => {
                    out.pods.insert(uid.clone(), pod.clone());
                }
            }
        }
    }
    out
}

fn merge_now(sources: &mut [Source]) -> Snapshot {
    let states: Vec<(String, Option<Snapshot>)> = sources
        .iter_mut()
        .map(|s| (s.name.clone(), s.current()))
        .collect();
    let refs: Vec<(&str, Option<&Snapshot>)> = states
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_ref()))
        .collect();
    merged(&refs)
}

/// The first merged snapshot, for the manager's channel.
pub fn first(sources: &mut [Source]) -> Snapshot {
    merge_now(sources)
}

/// Forward the union of `sources` to `out` on every change, until the
/// manager hangs up. A source that ends keeps its last snapshot in the union.
pub async fn run(mut sources: Vec<Source>, out: watch::Sender<Snapshot>) {
    let mut live: Vec<usize> = (0..sources.len()).collect();
    loop {
        let merged = merge_now(&mut sources);
        out.send_if_modified(|cur| {
            let changed = *cur != merged;
            if changed {
                *cur = merged;
            }
            changed
        });
        if live.is_empty() {
            out.closed().await;
            return;
        }
        let ended = {
            let changes = sources
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| live.contains(i))
                .map(|(i, s)| Box::pin(async move { (i, s.ended().await) }));
            tokio::select! {
                ((i, ended), _, _) = futures::future::select_all(changes) => ended.then_some(i),
                _ = out.closed() => return,
            }
        };
        if let Some(i) = ended {
            warn!(source = %sources[i].name, "pod source ended; its last snapshot stays");
            live.retain(|&j| j != i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::DesiredPod;
    use k8s_openapi::api::core::v1::Pod;
    use std::sync::Arc;

    fn snap(uids: &[(&str, &str)], source: &str) -> Snapshot {
        let mut s = Snapshot::default();
        for (uid, name) in uids {
            let mut pod = Pod::default();
            pod.metadata.name = Some(name.to_string());
            pod.metadata.uid = Some(uid.to_string());
            s.pods.insert(
                uid.to_string(),
                Arc::new(DesiredPod {
                    pod,
                    source: source.into(),
                }),
            );
        }
        s
    }

    #[test]
    fn a_source_that_has_not_listed_holds_the_gate() {
        let file = snap(&[("u1", "a")], "file");
        let m = merged(&[("file", Some(&file)), ("api", None)]);
        assert_eq!(m.pods.len(), 1);
        assert_eq!(m.pending_sources, vec!["api".to_string()]);
        assert!(!m.synced());
        let api = snap(&[("u2", "b")], "api");
        let m = merged(&[("file", Some(&file)), ("api", Some(&api))]);
        assert!(m.synced());
        assert_eq!(m.pods.keys().collect::<Vec<_>>(), ["u1", "u2"]);
    }

    #[test]
    fn a_uid_claimed_twice_goes_to_the_first_source_with_an_error() {
        let file = snap(&[("u1", "a")], "file");
        let api = snap(&[("u1", "b")], "api");
        let m = merged(&[("file", Some(&file)), ("api", Some(&api))]);
        assert_eq!(m.pods["u1"].name(), "a");
        assert_eq!(m.errors.len(), 1);
        assert!(m.errors[0].message.contains("already taken by a"));
    }

    #[tokio::test]
    async fn the_merger_forwards_changes_and_keeps_an_ended_source() {
        let (ftx, f) = channel("file");
        let (atx, a) = channel("api");
        let mut sources = vec![f, a];
        let (out, mut rx) = watch::channel(first(&mut sources));
        assert_eq!(rx.borrow().pending_sources.len(), 2);
        let task = tokio::spawn(run(sources, out));
        ftx.send(Some(snap(&[("u1", "a")], "file"))).unwrap();
        atx.send(Some(snap(&[("u2", "b")], "api"))).unwrap();
        drop(atx);
        loop {
            rx.changed().await.unwrap();
            let s = rx.borrow_and_update().clone();
            if s.synced() && s.pods.len() == 2 {
                break;
            }
        }
        drop(ftx);
        drop(rx);
        task.await.unwrap();
    }
}
