//! The people-facing commands that talk to a running agent: `get pods`
//! (kubectl's columns, or a v1 PodList with `-o json`), `get pv,pvc`
//! (kubectl's columns, or a v1 List) and `logs` (reads the CRI log files
//! kubelet's layout puts under podLogsDir).
//!
//! Formatting is pure (`pod_row`, `pod_list`, `volumes_table`,
//! `volumes_list`, `parse_cri_line`); reading
//! and following files is the only I/O besides the control socket.

use std::io::{BufRead, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};

use crate::pod::spec;
use crate::status::BoardView;
use crate::volume::provision::VolumesView;

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
    since(
        pod.status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0),
        now,
    )
}

fn since(start: Option<jiff::Timestamp>, now: jiff::Timestamp) -> String {
    let Some(start) = start else {
        return "<unknown>".into();
    };
    let secs = (now.as_second() - start.as_second()).max(0);
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
    let mut out = String::new();
    if view.pods.is_empty() {
        out.push_str("No resources found.\n");
    } else {
        out.push_str(&columns(&rows));
    }
    if !view.errors.is_empty() {
        out.push_str("\nMANIFEST ERRORS\n");
        for e in &view.errors {
            out.push_str(&format!("{}: {}\n", e.file, e.message));
        }
    }
    out
}

/// Rows as kubectl aligns them: each column as wide as its widest cell,
/// three spaces between columns.
fn columns<R: AsRef<[String]>>(rows: &[R]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for r in rows {
        for (i, cell) in r.as_ref().iter().enumerate() {
            if widths.len() <= i {
                widths.push(0);
            }
            widths[i] = widths[i].max(cell.len());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .as_ref()
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// kubectl's short access modes (RWO, ROX, RWX, RWOP), comma-joined.
fn access_modes(modes: Option<&Vec<String>>) -> String {
    modes
        .into_iter()
        .flatten()
        .map(|m| match m.as_str() {
            "ReadWriteOnce" => "RWO",
            "ReadOnlyMany" => "ROX",
            "ReadWriteMany" => "RWX",
            "ReadWriteOncePod" => "RWOP",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn storage(
    q: Option<
        &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    >,
) -> String {
    q.and_then(|c| c.get("storage"))
        .map(|q| q.0.clone())
        .unwrap_or_default()
}

/// One row of `get pv`: NAME CAPACITY ACCESS MODES RECLAIM POLICY STATUS
/// CLAIM STORAGECLASS REASON AGE.
pub fn pv_row(pv: &PersistentVolume, now: jiff::Timestamp) -> Vec<String> {
    let spec = pv.spec.clone().unwrap_or_default();
    let st = pv.status.clone().unwrap_or_default();
    let claim = spec
        .claim_ref
        .as_ref()
        .map(|r| {
            format!(
                "{}/{}",
                r.namespace.as_deref().unwrap_or_default(),
                r.name.as_deref().unwrap_or_default()
            )
        })
        .unwrap_or_default();
    vec![
        pv.metadata.name.clone().unwrap_or_default(),
        storage(spec.capacity.as_ref()),
        access_modes(spec.access_modes.as_ref()),
        spec.persistent_volume_reclaim_policy
            .unwrap_or_else(|| "Retain".into()),
        st.phase.unwrap_or_default(),
        claim,
        spec.storage_class_name.unwrap_or_default(),
        st.reason.unwrap_or_default(),
        since(pv.metadata.creation_timestamp.as_ref().map(|t| t.0), now),
    ]
}

/// One row of `get pvc`: NAME STATUS VOLUME CAPACITY ACCESS MODES
/// STORAGECLASS AGE (NAMESPACE first when `namespaced`).
pub fn pvc_row(pvc: &PersistentVolumeClaim, now: jiff::Timestamp, namespaced: bool) -> Vec<String> {
    let spec = pvc.spec.clone().unwrap_or_default();
    let st = pvc.status.clone().unwrap_or_default();
    let mut row = Vec::new();
    if namespaced {
        row.push(pvc.metadata.namespace.clone().unwrap_or_default());
    }
    row.extend([
        pvc.metadata.name.clone().unwrap_or_default(),
        st.phase.clone().unwrap_or_default(),
        spec.volume_name.unwrap_or_default(),
        storage(st.capacity.as_ref()),
        access_modes(st.access_modes.as_ref()),
        spec.storage_class_name.unwrap_or_default(),
        since(pvc.metadata.creation_timestamp.as_ref().map(|t| t.0), now),
    ]);
    row
}

/// Which of `get pv,pvc` to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeKinds {
    pub pv: bool,
    pub pvc: bool,
}

/// kubectl's tables for `get pv`, `get pvc` or `get pv,pvc` (names
/// prefixed with their kind when both are shown, as kubectl does), then
/// why claims wait.
pub fn volumes_table(view: &VolumesView, kinds: VolumeKinds, now: jiff::Timestamp) -> String {
    let both = kinds.pv && kinds.pvc;
    let prefix = |row: &mut Vec<String>, at: usize, kind: &str| {
        if both {
            row[at] = format!("{kind}/{}", row[at]);
        }
    };
    let mut tables = Vec::new();
    if kinds.pv && !view.volumes.is_empty() {
        let mut rows = vec![
            [
                "NAME",
                "CAPACITY",
                "ACCESS MODES",
                "RECLAIM POLICY",
                "STATUS",
                "CLAIM",
                "STORAGECLASS",
                "REASON",
                "AGE",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for pv in &view.volumes {
            let mut row = pv_row(pv, now);
            prefix(&mut row, 0, "persistentvolume");
            rows.push(row);
        }
        tables.push(columns(&rows));
    }
    if kinds.pvc && !view.claims.is_empty() {
        let namespaced = view
            .claims
            .iter()
            .any(|c| c.metadata.namespace.as_deref() != Some("default"));
        let mut head = vec![
            "NAME",
            "STATUS",
            "VOLUME",
            "CAPACITY",
            "ACCESS MODES",
            "STORAGECLASS",
            "AGE",
        ];
        if namespaced {
            head.insert(0, "NAMESPACE");
        }
        let mut rows = vec![head.into_iter().map(String::from).collect::<Vec<_>>()];
        for c in &view.claims {
            let mut row = pvc_row(c, now, namespaced);
            prefix(&mut row, usize::from(namespaced), "persistentvolumeclaim");
            rows.push(row);
        }
        tables.push(columns(&rows));
    }
    let mut out = if tables.is_empty() {
        "No resources found.\n".to_string()
    } else {
        tables.join("\n")
    };
    if kinds.pvc && !view.waiting.is_empty() {
        out.push_str("\nWAITING\n");
        for (claim, why) in &view.waiting {
            out.push_str(&format!("persistentvolumeclaim/{claim}: {why}\n"));
        }
    }
    out
}

/// A v1 List of the PVs and/or PVCs, as `kubectl get pv,pvc -o json`.
pub fn volumes_list(view: &VolumesView, kinds: VolumeKinds) -> serde_json::Value {
    let item = |v: serde_json::Value, kind: &str| {
        let mut v = v;
        v["apiVersion"] = "v1".into();
        v["kind"] = kind.into();
        v
    };
    let mut items = Vec::new();
    if kinds.pv {
        items.extend(view.volumes.iter().map(|pv| {
            item(
                serde_json::to_value(pv).unwrap_or_default(),
                "PersistentVolume",
            )
        }));
    }
    if kinds.pvc {
        items.extend(view.claims.iter().map(|c| {
            item(
                serde_json::to_value(c).unwrap_or_default(),
                "PersistentVolumeClaim",
            )
        }));
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {"resourceVersion": ""},
        "items": items,
    })
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

    /// A header line's cells (they may hold single spaces).
    fn header(line: &str) -> Vec<&str> {
        line.split("   ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect()
    }

    #[test]
    fn pv_and_pvc_tables_have_kubectl_columns() {
        let now: jiff::Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        let view: VolumesView = serde_json::from_value(serde_json::json!({
            "volumes": [{
                "metadata": {"name": "pvc-1", "creationTimestamp": "2026-12-01T11:00:00Z"},
                "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce", "ReadOnlyMany"],
                         "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "fast",
                         "claimRef": {"namespace": "default", "name": "data"}},
                "status": {"phase": "Bound"},
            }],
            "claims": [{
                "metadata": {"name": "data", "namespace": "default", "creationTimestamp": "2026-12-01T11:59:00Z"},
                "spec": {"volumeName": "pvc-1", "storageClassName": "fast"},
                "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"]},
            }, {
                "metadata": {"name": "logs", "namespace": "default"},
                "spec": {"storageClassName": "fast"},
                "status": {"phase": "Pending"},
            }],
            "waiting": {"default/logs": "waiting for first consumer to be created before binding"},
        }))
        .unwrap();
        let pv = volumes_table(
            &view,
            VolumeKinds {
                pv: true,
                pvc: false,
            },
            now,
        );
        let lines: Vec<&str> = pv.lines().collect();
        assert_eq!(
            header(lines[0]),
            [
                "NAME",
                "CAPACITY",
                "ACCESS MODES",
                "RECLAIM POLICY",
                "STATUS",
                "CLAIM",
                "STORAGECLASS",
                "REASON",
                "AGE"
            ]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "pvc-1",
                "1Gi",
                "RWO,ROX",
                "Delete",
                "Bound",
                "default/data",
                "fast",
                "60m"
            ]
        );
        let pvc = volumes_table(
            &view,
            VolumeKinds {
                pv: false,
                pvc: true,
            },
            now,
        );
        let lines: Vec<&str> = pvc.lines().collect();
        assert_eq!(
            header(lines[0]),
            [
                "NAME",
                "STATUS",
                "VOLUME",
                "CAPACITY",
                "ACCESS MODES",
                "STORAGECLASS",
                "AGE"
            ]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["data", "Bound", "pvc-1", "1Gi", "RWO", "fast", "60s"]
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["logs", "Pending", "fast", "<unknown>"]
        );
        assert!(
            pvc.contains("WAITING\npersistentvolumeclaim/default/logs: waiting for first consumer")
        );
        let both = volumes_table(
            &view,
            VolumeKinds {
                pv: true,
                pvc: true,
            },
            now,
        );
        assert!(both.contains("persistentvolume/pvc-1 "));
        assert!(both.contains("persistentvolumeclaim/data "));
        let list = volumes_list(
            &view,
            VolumeKinds {
                pv: true,
                pvc: true,
            },
        );
        assert_eq!(list["kind"], "List");
        assert_eq!(list["items"][0]["kind"], "PersistentVolume");
        assert_eq!(list["items"][1]["kind"], "PersistentVolumeClaim");
        assert_eq!(list["items"].as_array().unwrap().len(), 3);
        let empty = volumes_table(
            &VolumesView::default(),
            VolumeKinds {
                pv: true,
                pvc: true,
            },
            now,
        );
        assert_eq!(empty, "No resources found.\n");
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
