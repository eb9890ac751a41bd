//! The people-facing commands that talk to a running agent: `get pods`
//! (kubectl's columns, or a v1 PodList with `-o json`) and `logs` (reads
//! the CRI log files kubelet's layout puts under podLogsDir).
//!
//! Formatting is pure (`pod_row`, `pod_list`, `parse_cri_line`); reading
//! and following files is the only I/O besides the control socket.

use std::io::{BufRead, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

use crate::pod::spec;
use crate::status::BoardView;

/// Errors of `minilet logs`.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("pod {0:?} not found")]
    NoPod(String),
    #[error("pod {pod} has several containers; choose one with -c: {choices}")]
    ChooseContainer { pod: String, choices: String },
    #[error("container {container:?} not found in pod {pod}")]
    NoContainer { pod: String, container: String },
    #[error("no log yet for container {container} of pod {pod} ({path})")]
    NoLog {
        pod: String,
        container: String,
        path: PathBuf,
    },
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn age(pod: &Pod, now: jiff::Timestamp) -> String {
    let Some(start) = pod.status.as_ref().and_then(|s| s.start_time.as_ref()) else {
        return "<unknown>".into();
    };
    let secs = (now.as_second() - start.0.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3600 * 3 => format!("{}m", s / 60),
        s if s < 86400 * 2 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// kubectl's STATUS column (its printPod logic, condensed).
pub fn status_column(pod: &Pod) -> String {
    let Some(st) = pod.status.as_ref() else {
        return "Unknown".into();
    };
    let mut reason = st
        .reason
        .clone()
        .or(st.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    let inits = st.init_container_statuses.clone().unwrap_or_default();
    let mut initializing = false;
    for (i, c) in inits.iter().enumerate() {
        let state = c.state.clone().unwrap_or_default();
        if let Some(t) = &state.terminated {
            if t.exit_code == 0 {
                continue;
            }
            reason = match &t.reason {
                Some(r) if !r.is_empty() => format!("Init:{r}"),
                _ => format!("Init:ExitCode:{}", t.exit_code),
            };
        } else if let Some(w) = state.waiting.as_ref().filter(|w| {
            w.reason
                .as_deref()
                .is_some_and(|r| !r.is_empty() && r != "PodInitializing")
        }) {
            reason = format!("Init:{}", w.reason.clone().unwrap_or_default());
        } else {
            reason = format!("Init:{i}/{}", inits.len());
        }
        initializing = true;
        break;
    }
    if !initializing {
        let mut has_running = false;
        for c in st.container_statuses.iter().flatten().rev() {
            let state = c.state.clone().unwrap_or_default();
            if let Some(r) = state
                .waiting
                .and_then(|w| w.reason)
                .filter(|r| !r.is_empty())
            {
                reason = r;
            } else if let Some(t) = state.terminated {
                reason = match t.reason {
                    Some(r) if !r.is_empty() => r,
                    _ => format!("ExitCode:{}", t.exit_code),
                };
            } else if state.running.is_some() && c.ready {
                has_running = true;
            }
        }
        if reason == "Completed" && has_running {
            reason = "Running".into();
        }
    }
    if pod.metadata.deletion_timestamp.is_some() {
        reason = "Terminating".into();
    }
    reason
}

/// One row of `minilet get pods`: NAME READY STATUS RESTARTS AGE IP.
pub fn pod_row(pod: &Pod, now: jiff::Timestamp) -> [String; 6] {
    let st = pod.status.clone().unwrap_or_default();
    let cs = st.container_statuses.clone().unwrap_or_default();
    let total = pod.spec.as_ref().map_or(cs.len(), |s| s.containers.len());
    let ready = cs.iter().filter(|c| c.ready).count();
    let restarts: i32 = cs.iter().map(|c| c.restart_count).sum();
    [
        pod.metadata.name.clone().unwrap_or_default(),
        format!("{ready}/{total}"),
        status_column(pod),
        restarts.to_string(),
        age(pod, now),
        st.pod_ip.unwrap_or_else(|| "<none>".into()),
    ]
}

/// The table kubectl prints, with manifest errors listed below it.
pub fn pods_table(view: &BoardView, now: jiff::Timestamp) -> String {
    let mut rows = vec![["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP"].map(String::from)];
    rows.extend(view.pods.iter().map(|p| pod_row(p, now)));
    let mut widths = [0usize; 6];
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    if view.pods.is_empty() {
        out.push_str("No resources found.\n");
    } else {
        for r in &rows {
            let line: Vec<String> = r
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(line.join("   ").trim_end());
            out.push('\n');
        }
    }
    if !view.errors.is_empty() {
        out.push_str("\nMANIFEST ERRORS\n");
        for e in &view.errors {
            out.push_str(&format!("{}: {}\n", e.file, e.message));
        }
    }
    out
}

fn ago(then: jiff::Timestamp, now: jiff::Timestamp) -> String {
    let secs = (now.as_second() - then.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3600 * 3 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

/// `kubectl get events`' columns: LAST SEEN TYPE REASON OBJECT MESSAGE.
pub fn events_table(view: &BoardView, now: jiff::Timestamp) -> String {
    if view.events.is_empty() {
        return "No events found.\n".into();
    }
    let mut rows = vec![["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"].map(String::from)];
    for e in &view.events {
        rows.push([
            ago(e.event.time, now),
            serde_json::to_value(e.event.kind)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            e.event.reason.clone(),
            format!("pod/{}", e.pod),
            e.event.message.clone(),
        ]);
    }
    let mut widths = [0usize; 4];
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let cells: Vec<String> = r[..4]
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(&format!("{}   {}\n", cells.join("   "), r[4]));
    }
    out
}

/// A v1 PodList, as `kubectl get pods -o json` prints.
pub fn pod_list(view: &BoardView) -> serde_json::Value {
    let items: Vec<serde_json::Value> = view
        .pods
        .iter()
        .map(|p| {
            let mut v = serde_json::to_value(p).unwrap_or_default();
            v["apiVersion"] = "v1".into();
            v["kind"] = "Pod".into();
            v
        })
        .collect();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "PodList",
        "metadata": {},
        "items": items,
    })
}

/// Find a pod by its full name (`web-node1`) or, for static pods, the
/// manifest name (`web`), optionally namespaced.
pub fn find_pod<'a>(view: &'a BoardView, name: &str, namespace: Option<&str>) -> Option<&'a Pod> {
    let ns_ok = |p: &Pod| namespace.is_none_or(|ns| p.metadata.namespace.as_deref() == Some(ns));
    let by = |f: &dyn Fn(&str) -> bool| {
        view.pods
            .iter()
            .find(|p| ns_ok(p) && p.metadata.name.as_deref().is_some_and(f))
    };
    by(&|n| n == name).or_else(|| {
        by(&|n| {
            n.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|node| !node.is_empty())
        })
    })
}

/// The CRI log file of a container's current instance.
pub fn log_file(
    view: &BoardView,
    pod: &Pod,
    container: Option<&str>,
) -> Result<PathBuf, LogsError> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec_names: Vec<String> = pod
        .spec
        .iter()
        .flat_map(|s| {
            s.init_containers
                .iter()
                .flatten()
                .chain(s.containers.iter())
        })
        .map(|c| c.name.clone())
        .collect();
    let apps: Vec<String> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
        .collect();
    let container = match container {
        Some(c) if spec_names.iter().any(|n| n == c) => c.to_string(),
        Some(c) => {
            return Err(LogsError::NoContainer {
                pod: name,
                container: c.into(),
            });
        }
        None if apps.len() == 1 => apps[0].clone(),
        None => {
            return Err(LogsError::ChooseContainer {
                pod: name,
                choices: apps.join(" "),
            });
        }
    };
    let st = pod.status.clone().unwrap_or_default();
    let restart = st
        .init_container_statuses
        .iter()
        .flatten()
        .chain(st.container_statuses.iter().flatten())
        .find(|c| c.name == container)
        .map_or(0, |c| c.restart_count);
    let dir = spec::log_directory(
        Path::new(&view.pod_logs_dir),
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        &name,
        pod.metadata.uid.as_deref().unwrap_or_default(),
    );
    let path = dir.join(spec::log_path(&container, restart));
    if !path.exists() {
        return Err(LogsError::NoLog {
            pod: name,
            container,
            path,
        });
    }
    Ok(path)
}

/// One CRI log line: `<RFC3339Nano> <stream> <P|F> <content>` → (content, full line?).
pub fn parse_cri_line(line: &str) -> Option<(&str, bool)> {
    let mut parts = line.splitn(4, ' ');
    let (_ts, _stream, tag) = (parts.next()?, parts.next()?, parts.next()?);
    let content = parts.next().unwrap_or("");
    Some((content, tag != "P"))
}

fn print_lines<R: BufRead + Seek>(reader: &mut R, out: &mut impl Write) -> std::io::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') {
            // A half-written line: step back, it is read again on the next poll.
            reader.seek(std::io::SeekFrom::Current(-(n as i64)))?;
            return Ok(());
        }
        if let Some((content, full)) = parse_cri_line(line.trim_end_matches('\n')) {
            out.write_all(content.as_bytes())?;
            if full {
                out.write_all(b"\n")?;
            }
        }
    }
}

/// Print a CRI log file; with `follow`, keep printing what is appended.
pub fn print_log(path: &Path, follow: bool, out: &mut impl Write) -> Result<(), LogsError> {
    let io = |source| LogsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut reader = std::io::BufReader::new(file);
    loop {
        let pos = reader.stream_position().map_err(io)?;
        print_lines(&mut reader, out).map_err(io)?;
        out.flush().map_err(io)?;
        if !follow {
            return Ok(());
        }
        let now = reader.stream_position().map_err(io)?;
        if now == pos {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceError;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-n1", "namespace": "default", "uid": "u1"},
            "spec": {"containers": [{"name": "app"}], "initContainers": [{"name": "init"}]},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn status_column_like_kubectl() {
        let cases = [
            (
                serde_json::json!({"phase": "Pending", "initContainerStatuses": [{"name": "init", "ready": false, "restartCount": 0, "image": "", "imageID": "", "state": {"running": {}}}]}),
                "Init:0/1",
            ),
            (
                serde_json::json!({"phase": "Running", "initContainerStatuses": [{"name": "init", "ready": false, "restartCount": 0, "image": "", "imageID": "", "state": {"terminated": {"exitCode": 0}}}],
               "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "", "imageID": "", "state": {"running": {}}}]}),
                "Running",
            ),
            (
                serde_json::json!({"phase": "Running", "containerStatuses": [{"name": "app", "ready": false, "restartCount": 3, "image": "", "imageID": "", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}),
                "CrashLoopBackOff",
            ),
            (
                serde_json::json!({"phase": "Succeeded", "containerStatuses": [{"name": "app", "ready": false, "restartCount": 0, "image": "", "imageID": "", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}),
                "Completed",
            ),
        ];
        for (st, want) in cases {
            assert_eq!(status_column(&pod(st)), want);
        }
    }

    #[test]
    fn table_has_kubectl_columns_and_errors() {
        let view = BoardView {
            pods: vec![pod(
                serde_json::json!({"phase": "Running", "podIP": "10.1.0.2",
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": 2, "image": "", "imageID": "", "state": {"running": {}}}]}),
            )],
            errors: vec![SourceError {
                file: "/m/bad.yaml".into(),
                message: "line 2 column 1: mapping values are not allowed".into(),
            }],
            pod_logs_dir: "/var/log/pods".into(),
            ..Default::default()
        };
        let t = pods_table(&view, jiff::Timestamp::now());
        let mut lines = t.lines();
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP"]
        );
        let row: Vec<_> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            row,
            ["web-n1", "1/1", "Running", "2", "<unknown>", "10.1.0.2"]
        );
        assert!(t.contains("/m/bad.yaml: line 2 column 1"));
        let list = pod_list(&view);
        assert_eq!(list["kind"], "PodList");
        assert_eq!(list["items"][0]["kind"], "Pod");
    }

    #[test]
    fn cri_log_lines() {
        assert_eq!(
            parse_cri_line("2026-11-27T21:19:40.359340801Z stdout F hello world"),
            Some(("hello world", true))
        );
        assert_eq!(
            parse_cri_line("2026-11-27T21:19:40Z stderr P part"),
            Some(("part", false))
        );
        assert_eq!(
            parse_cri_line("2026-11-27T21:19:40Z stdout F "),
            Some(("", true))
        );
        let mut out = Vec::new();
        let mut input = std::io::Cursor::new("t stdout P a\nt stdout F b\nt stdout F c\npartial");
        print_lines(&mut input, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "ab\nc\n");
    }

    #[test]
    fn finds_static_pods_by_manifest_name() {
        let view = BoardView {
            pods: vec![pod(serde_json::json!({}))],
            ..Default::default()
        };
        assert!(find_pod(&view, "web-n1", None).is_some());
        assert!(find_pod(&view, "web", Some("default")).is_some());
        assert!(find_pod(&view, "we", None).is_none());
        assert!(find_pod(&view, "web", Some("kube-system")).is_none());
    }
}
