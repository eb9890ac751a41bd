#!/usr/bin/env bash
# The main job: bring the local node stack up if it is not (containerd, a
# registry on 127.0.0.1:5000, Debian's CNI plugins), build minilet, and run
# it in the foreground on the example manifests in manifests/.
#
# In another terminal:  target/minilet --config integration/.run/minilet/minilet.yaml get pods
# Ctrl-C stops minilet and leaves the pods running (as kubelet does);
# `integration/stack.sh down` removes everything. A failure before minilet
# starts prints ONE line "run: FAILED (<step>): ..." naming the step.
#
# `integration/run.sh --cluster` also brings up the test control plane
# (integration/control-plane.sh: a real kube-apiserver v1.20 on loopback)
# and runs minilet as a node of it, with a kubelet's identity
# (system:node:<name>): kubectl sees the node, its mirror pods, and runs pods
# on it. Other arguments go to minilet.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"
# shellcheck source=integration/lib.sh
. integration/lib.sh
fail_report run

CLUSTER=
if [[ ${1:-} == --cluster ]]; then
  CLUSTER=1
  shift
fi

step "stack up"; integration/stack.sh up
# shellcheck disable=SC1090
step "stack env"; . "$(integration/stack.sh env)"
step build;       BIN=$(integration/build-release.sh)

step config
DIR=$MINILET_STACK_DIR/minilet
mkdir -p "$DIR"
cat >"$DIR/minilet.yaml" <<CONFIG
# Written by integration/run.sh for the local stack; see config/minilet.yaml.
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
staticPodPath: $REPO/manifests
containerRuntimeEndpoint: $CONTAINERD_SOCK
podLogsDir: $DIR/logs
---
apiVersion: minilet.io/v1alpha1
kind: MiniletConfiguration
stateDir: $DIR/state
cniConfDir: $REPO/config/cni
cniBinDirs: [$CNI_PLUGIN_DIR]
runtimeCNIConfDir: $RUNTIME_CNI_CONF_DIR
runtimeCNIBinDir: $RUNTIME_CNI_BIN_DIR
CONFIG

ARGS=()
if [[ -n $CLUSTER ]]; then
  step "control plane up"; integration/control-plane.sh up
  step "control plane env"
  # shellcheck disable=SC1090
  . "$(integration/control-plane.sh env)"
  step "node identity"
  NODE=$(tr '[:upper:]' '[:lower:]' </proc/sys/kernel/hostname)
  integration/control-plane.sh node-kubeconfig "$NODE" "$DIR/node.kubeconfig"
  ARGS=(--kubeconfig "$DIR/node.kubeconfig" --hostname-override "$NODE")
  echo "minilet: joining $MINILET_CP_SERVER as node $NODE; kubectl as the admin:"
  echo "  $MINILET_CP_BIN/kubectl --kubeconfig $MINILET_CP_ADMIN_KUBECONFIG get nodes -o wide"
fi

step minilet
echo "minilet: running on manifests/ — in another terminal:"
echo "  $BIN --config $DIR/minilet.yaml get pods"
exec "$BIN" --config "$DIR/minilet.yaml" "${ARGS[@]}" "$@"
