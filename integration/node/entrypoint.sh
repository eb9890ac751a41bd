#!/usr/bin/env bash
# minilet-node: PID 1 of a cluster node container (integration/cluster.sh).
# Prepares the container as a node (cgroups, mounts, forwarding, masquerade),
# starts containerd, imports the node image's images, then runs minilet in
# API server mode: TLS bootstrap with /etc/minilet/bootstrap-kubeconfig
# (mounted by cluster.sh) into /var/lib/minilet/kubeconfig (a volume, so a
# restarted node reuses its certificate). TERM stops minilet, then
# containerd. Every step is idempotent: `docker start` of a killed node
# runs it again over the state the volumes kept.
#
# MINILET_CLUSTER_CIDR (default 10.244.0.0/16): traffic from pods to
# anything outside it is masqueraded to the node's address.
# MINILET_NODE_AGENT=kubelet runs kubelet v1.20.2 instead (the cluster
# benchmark's baseline): containerd then runs the CNI config it renders from
# the podCIDR kubelet hands it (conf_template), as kubeadm nodes do.
set -euo pipefail

say() { printf 'minilet-node: %s\n' "$*" >&2; }
fail() {
  say "FAILED: $*"
  exit 1
}

CLUSTER_CIDR=${MINILET_CLUSTER_CIDR:-10.244.0.0/16}
AGENT=${MINILET_NODE_AGENT:-minilet}
[[ $AGENT == minilet || $AGENT == kubelet ]] || fail "MINILET_NODE_AGENT must be minilet or kubelet, not $AGENT"
SOCK=/run/containerd/containerd.sock

# The node runs in a private cgroup namespace (cluster.sh: --cgroupns
# private), so /proc/self/cgroup says "/" for every hierarchy. Docker mounts
# them read-only; on cgroup v1, mount each one afresh, writable: a cgroup
# mount made inside the namespace is rooted at this container's cgroup, so
# the pods' cgroups nest under the node's (and go with it), and runc's view
# of the paths (/proc/self/cgroup) and of the mounts agree.
own_cgroups() {
  [[ -f /sys/fs/cgroup/cgroup.controllers ]] && return 0 # v2: the namespace does it
  local id ctrls path dir c
  mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
  while IFS=: read -r id ctrls path; do
    [[ -n $ctrls ]] || continue # a hybrid host's v2 line
    [[ $path == / ]] || fail "cgroup $ctrls is at $path, not /: run the node with --cgroupns private"
    dir=/sys/fs/cgroup/${ctrls#name=}
    mkdir -p "$dir"
    if [[ $ctrls == name=* ]]; then
      mount -t cgroup -o "none,$ctrls" cgroup "$dir"
    else
      mount -t cgroup -o "$ctrls" cgroup "$dir"
      # cpu -> cpu,cpuacct, as the host has them.
      if [[ $ctrls == *,* ]]; then
        for c in ${ctrls//,/ }; do [[ -e /sys/fs/cgroup/$c ]] || ln -s "$ctrls" "/sys/fs/cgroup/$c"; done
      fi
    fi
  done </proc/self/cgroup
}

# overlayfs where the kernel mounts it over the containerd volume's fs,
# else native (copies; slower but works everywhere).
snapshotter() {
  local t=/var/lib/containerd/.overlay-probe
  rm -rf "$t"
  mkdir -p "$t"/{l,u,w,m}
  if mount -t overlay overlay -o "lowerdir=$t/l,upperdir=$t/u,workdir=$t/w" "$t/m" 2>/dev/null; then
    umount "$t/m"
    rm -rf "$t"
    echo overlayfs
  else
    rm -rf "$t"
    echo native
  fi
}

start_containerd() {
  local snap cfg=/run/containerd-config.toml
  snap=$(snapshotter)
  {
    if [[ $AGENT == kubelet ]]; then
      sed 's|^\( *\)conf_dir = .*|&\n\1conf_template = "/etc/containerd/kubelet-cni.template"|' /etc/containerd/config.toml
    else
      cat /etc/containerd/config.toml
    fi
    printf '\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "%s"\n' "$snap"
  } >"$cfg"
  mkdir -p /run/containerd
  containerd --config "$cfg" >>/var/log/containerd.log 2>&1 &
  CONTAINERD=$!
  local i
  for ((i = 0; i < 300; i++)); do
    ctr --address "$SOCK" version >/dev/null 2>&1 && break
    kill -0 "$CONTAINERD" 2>/dev/null || fail "containerd exited: $(tail -n 3 /var/log/containerd.log)"
    sleep 0.1
  done
  ctr --address "$SOCK" version >/dev/null 2>&1 || fail "containerd did not answer in 30 s"
  say "containerd up ($snap snapshotter)"
}

# stop_all [CODE]: minilet first (it may still be talking to containerd).
stop_all() {
  say "stopping"
  [[ -n ${MINILET:-} ]] && kill -TERM "$MINILET" 2>/dev/null && wait "$MINILET" 2>/dev/null
  [[ -n ${CONTAINERD:-} ]] && kill -TERM "$CONTAINERD" 2>/dev/null && wait "$CONTAINERD" 2>/dev/null
  exit "${1:-0}"
}
trap stop_all TERM INT

# Mount propagation for pods' volumes (Bidirectional, HostToContainer).
mount --make-rshared /
own_cgroups
sysctl -qw net.ipv4.ip_forward=1
# Pod traffic to outside the cluster's pod network leaves as the node.
iptables -t nat -C POSTROUTING -s "$CLUSTER_CIDR" ! -d "$CLUSTER_CIDR" -j MASQUERADE 2>/dev/null ||
  iptables -t nat -A POSTROUTING -s "$CLUSTER_CIDR" ! -d "$CLUSTER_CIDR" -j MASQUERADE
start_containerd
ctr --address "$SOCK" -n k8s.io images import /usr/share/minilet/images.tar >/dev/null ||
  fail "importing the node image's images failed"
[[ -f /etc/minilet/bootstrap-kubeconfig ]] ||
  fail "no /etc/minilet/bootstrap-kubeconfig (integration/cluster.sh mounts it)"
if [[ $AGENT == kubelet ]]; then
  kubelet --config /etc/kubernetes/kubelet.yaml \
    --bootstrap-kubeconfig /etc/minilet/bootstrap-kubeconfig \
    --kubeconfig /var/lib/minilet/kubelet.kubeconfig --cert-dir /var/lib/minilet/kubelet-pki \
    --root-dir /var/lib/minilet/kubelet \
    --container-runtime=remote --container-runtime-endpoint="unix://$SOCK" \
    --pod-infra-container-image=localhost:5000/pause:3.9 --oom-score-adj=0 --v=1 \
    "$@" >>/var/log/kubelet.log 2>&1 &
else
  minilet --config /etc/minilet/minilet.yaml \
    --kubeconfig /var/lib/minilet/kubeconfig \
    --bootstrap-kubeconfig /etc/minilet/bootstrap-kubeconfig \
    "$@" &
fi
MINILET=$!
say "$AGENT started (pid $MINILET) as node $(hostname)"
# Either exiting ends the node (docker's restart policy, or the user, decides).
wait -n "$MINILET" "$CONTAINERD" || true
say "minilet or containerd exited; stopping the node"
stop_all 1
