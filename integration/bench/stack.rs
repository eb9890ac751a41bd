//! What the benchmarks that run pods on the stack share: the stack's env
//! file (`integration/stack.sh up`), and finding and removing the pods of
//! a node label in the runtime.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;

use anyhow::{Result, anyhow};
use futures::StreamExt;
use minilet::cri::remote::RemoteRuntime;
use minilet::cri::{Labels, Runtime};
use minilet::labels;

/// What `integration/.run/env` says about the stack.
pub struct Stack {
    pub sock: String,
    pub runtime_conf_dir: PathBuf,
    pub runtime_bin_dir: PathBuf,
    pub busybox: String,
    pub plugin_dir: PathBuf,
}

pub fn load_stack() -> Result<Stack> {
    let path = std::env::var_os("MINILET_STACK_DIR")
        .map_or_else(
            || crate::common::repo().join("integration/.run"),
            PathBuf::from,
        )
        .join("env");
    let text = fs::read_to_string(&path).map_err(|e| {
        anyhow!(
            "stack not up: cannot read {} ({e}); run `integration/stack.sh up` first",
            path.display()
        )
    })?;
    let vars: HashMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
        .collect();
    let get = |k: &str| {
        vars.get(k)
            .map(|v| v.to_string())
            .ok_or_else(|| anyhow!("{} has no {k}", path.display()))
    };
    Ok(Stack {
        sock: get("CONTAINERD_SOCK")?,
        runtime_conf_dir: get("RUNTIME_CNI_CONF_DIR")?.into(),
        runtime_bin_dir: get("RUNTIME_CNI_BIN_DIR")?.into(),
        busybox: get("BUSYBOX_IMAGE")?,
        plugin_dir: get("CNI_PLUGIN_DIR")
            .unwrap_or_else(|_| "/usr/lib/cni".into())
            .into(),
    })
}

pub fn node_label(node: &str) -> Labels {
    Labels::from([(labels::MANAGED_BY_NODE.to_string(), node.to_string())])
}

/// Stop and remove every container and sandbox carrying `io.minilet.node=node`.
pub async fn teardown_node(rt: &RemoteRuntime, node: &str) -> Result<()> {
    let containers = rt.list_containers(node_label(node)).await?;
    let stops = futures::stream::iter(containers.iter().map(|c| async move {
        ok_gone(rt.stop_container(&c.id, 0).await)?;
        ok_gone(rt.remove_container(&c.id).await)
    }))
    .buffer_unordered(8)
    .collect::<Vec<_>>()
    .await;
    stops.into_iter().collect::<Result<()>>()?;
    let sandboxes = rt.list_pod_sandboxes(node_label(node)).await?;
    let stops = futures::stream::iter(sandboxes.iter().map(|s| async move {
        ok_gone(rt.stop_pod_sandbox(&s.id).await)?;
        ok_gone(rt.remove_pod_sandbox(&s.id).await)
    }))
    .buffer_unordered(8)
    .collect::<Vec<_>>()
    .await;
    stops.into_iter().collect::<Result<()>>()
}

fn ok_gone(r: minilet::cri::Result<()>) -> Result<()> {
    match r {
        Err(e) if e.is_not_found() => Ok(()),
        other => Ok(other?),
    }
}

/// Objects with the node label still in the runtime: (sandboxes, containers).
pub async fn leftovers(rt: &RemoteRuntime, node: &str) -> Result<(usize, usize)> {
    Ok((
        rt.list_pod_sandboxes(node_label(node)).await?.len(),
        rt.list_containers(node_label(node)).await?.len(),
    ))
}
