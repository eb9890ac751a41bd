#!/usr/bin/env bash
# integration/cluster.sh: a kind-style local cluster with minilet as the
# node agent: a real control plane on the host and N nodes as containers,
# each running its own containerd and minilet, joined by TLS bootstrap.
#
#   up [--nodes N] [--agent minilet|kubelet]
#       (default 1 node, minilet) build or reuse what is needed, then start:
#       - the control plane binaries (integration/control-plane.sh's cached
#         build) and the test images (integration/stack.sh's registry);
#       - the node image minilet-node:dev (FROM integration/image.sh
#         node-base; the shipped static minilet, integration/node/*, and the
#         busybox and pause images as an archive each node imports);
#       - a Docker network <name>-net; the control plane on its gateway
#         address (ports +100 from the tests' one, so both can run), with
#         --allocate-node-cidrs and the cluster signing CA;
#       - a bootstrap token, and N node containers <name>-node-1..N that
#         join with it: each asks for its client certificate through a CSR;
#       - RUN/kubeconfig for the user (kubectl --kubeconfig RUN/kubeconfig).
#       Waits until N nodes are Ready. Idempotent: running nodes are kept,
#       more are added, none removed. `--agent kubelet` runs kubelet v1.20.2
#       on the nodes instead (same image, same containerd): the baseline of
#       the cluster benchmark. kubelet writes the host's kernel tunables
#       (vm.overcommit_memory, kernel.panic, ...) through the node's
#       writable /proc/sys; the benchmark puts them back.
#   join NODE [--token ID.SECRET]
#       one more node, with the cluster's token or the one given (a token
#       the cluster does not know: the node's TLS bootstrap fails, and says
#       so in its log).
#   down    remove every node container, their volumes, the network and the
#           control plane, then CHECK that none is left (containers, volumes,
#           network, processes, mounts, the node containers' cgroups).
#   status  the control plane, then one line per node: container state,
#           address, Ready; exit 0 only when all are up and Ready.
#   kubeconfig   print the path of the user's kubeconfig.
#
# MINILET_CLUSTER_NAME (default minilet) prefixes every Docker object, all of
# which also carry the label io.minilet.cluster=<name>; MINILET_CLUSTER_DIR
# (default <repo>/integration/.cluster) is the run dir: control plane,
# tokens, kubeconfigs, logs. MINILET_STACK_DIR is the stack's (for the
# images; `up` runs integration/stack.sh up, which is idempotent).
#
# Why privileged-but-not---privileged: `docker run --privileged` fails on
# these machines (the engine asks for CAP_SYS_RESOURCE, which the host's
# bounding set lacks), so nodes get every capability but that one, no
# seccomp or AppArmor profile, writable /proc/sys, every device, a private
# cgroup namespace (the entrypoint mounts its cgroups writable), and tmpfs
# /run and /tmp.
#
# Any failure prints ONE line "cluster: FAILED (<step>): ..." and exits
# non-zero.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
# shellcheck source=integration/lib.sh
. "$REPO/integration/lib.sh"
fail_report cluster

NAME=${MINILET_CLUSTER_NAME:-minilet}
[[ $NAME =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || die "MINILET_CLUSTER_NAME is not a DNS label: $NAME"
RUN=$(realpath -m "${MINILET_CLUSTER_DIR:-$REPO/integration/.cluster}")
NET=$NAME-net
LABEL=io.minilet.cluster=$NAME
NODE_IMAGE=${MINILET_NODE_IMAGE:-minilet-node:dev}
CTX=/var/cache/minilet/image/node-context
PORT_OFFSET=100
CP=(env "MINILET_CP_DIR=$RUN/cp" "$REPO/integration/control-plane.sh")
STACK=(env "MINILET_STACK_DIR=${MINILET_STACK_DIR:-$REPO/integration/.run}" "$REPO/integration/stack.sh")
USER_KUBECONFIG=$RUN/kubeconfig
BOOTSTRAP=$RUN/bootstrap.kubeconfig
READY_TIMEOUT=${MINILET_CLUSTER_READY_TIMEOUT:-120}
AGENT=minilet

exec 3>&2
say() { printf 'cluster: %s\n' "$*" >&3; }

kubectl_() { "$KUBECTL" --kubeconfig "$USER_KUBECONFIG" "$@"; }

node_name() { echo "$NAME-node-$1"; }

# --- images ----------------------------------------------------------------

# The test images, out of the stack's containerd, as one archive.
export_images() {
  step "images"
  "${STACK[@]}" up >>"$RUN/stack.log" 2>&1 || die "integration/stack.sh up failed (see $RUN/stack.log)"
  local env
  env=$("${STACK[@]}" env)
  # shellcheck source=/dev/null
  . "$env"
  local sock=${CONTAINERD_SOCK#unix://}
  ctr --address "$sock" -n k8s.io images export "$CTX/images.tar.new" "$BUSYBOX_IMAGE" "$PAUSE_IMAGE" ||
    die "exporting $BUSYBOX_IMAGE and $PAUSE_IMAGE from the stack's containerd failed"
  mv -f "$CTX/images.tar.new" "$CTX/images.tar"
}

build_node_image() {
  step "node image"
  mkdir -p "$CTX"
  export_images
  local base bin
  step "node image: base"
  base=$("$REPO/integration/image.sh" node-base)
  step "node image: release binary"
  bin=$("$REPO/integration/build-release.sh")
  step "node image: docker build"
  cp -f "$bin" "$CTX/minilet"
  cp -f "$MINILET_CP_BIN/kubelet" "$CTX/kubelet"
  cp -f "$REPO"/integration/node/{Dockerfile,entrypoint.sh,containerd.toml,minilet.yaml,10-pods.conflist,kubelet.yaml,kubelet-cni.template} "$CTX/"
  local out
  out=$(DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=$base" -t "$NODE_IMAGE" "$CTX" 2>&1) ||
    die "docker build of the node image failed: $(tail -n3 <<<"$out" | tr '\n' ' ')"
  docker image prune -f --filter label=io.minilet.image=node >/dev/null
  say "node image: $NODE_IMAGE from $base"
}

# --- network and control plane -----------------------------------------------

ensure_network() {
  step "network"
  if ! docker network inspect "$NET" >/dev/null 2>&1; then
    docker network create --label "$LABEL" "$NET" >/dev/null
  fi
  GATEWAY=$(docker network inspect -f '{{ range .IPAM.Config }}{{ .Gateway }}{{ end }}' "$NET")
  [[ $GATEWAY =~ ^[0-9.]+$ ]] || die "network $NET has no IPv4 gateway (got '$GATEWAY')"
}

control_plane_up() {
  step "control plane"
  mkdir -p "$RUN"
  MINILET_CP_ADDRESS=$GATEWAY MINILET_CP_PORT_OFFSET=$PORT_OFFSET "${CP[@]}" up 2>&1 |
    sed 's/^/  /' >&3 || die "the control plane did not come up"
  load_cp
  cp -f "$MINILET_CP_ADMIN_KUBECONFIG" "$USER_KUBECONFIG.new"
  chmod 600 "$USER_KUBECONFIG.new"
  mv -f "$USER_KUBECONFIG.new" "$USER_KUBECONFIG"
  if [[ ! -s $BOOTSTRAP ]]; then
    "${CP[@]}" bootstrap-kubeconfig "$BOOTSTRAP.new" || die "making the bootstrap token failed"
    mv -f "$BOOTSTRAP.new" "$BOOTSTRAP"
  fi
}

# --- nodes -------------------------------------------------------------------

# start_node NODE KUBECONFIG: the node container, unless it exists (then
# started if stopped). AGENT (minilet, or kubelet for the benchmark's
# baseline) is the node agent it runs.
start_node() {
  local node=$1 kc=$2 state extra=()
  step "node $node"
  state=$(docker inspect -f '{{ .State.Status }}' "$node" 2>/dev/null || true)
  case $state in
  running) return 0 ;;
  "") ;;
  *)
    docker start "$node" >/dev/null
    return 0
    ;;
  esac
  if [[ $AGENT == kubelet ]]; then
    # kubelet's OOM watcher reads the kernel log; without it kubelet exits.
    extra+=(--device /dev/kmsg)
    save_sysctls
  fi
  local v
  for v in containerd state; do
    docker volume create --label "$LABEL" "$node-$v" >/dev/null
  done
  docker run -d --name "$node" --hostname "$node" --label "$LABEL" \
    --network "$NET" \
    --cap-add ALL --cap-drop SYS_RESOURCE \
    --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
    --security-opt systempaths=unconfined --device-cgroup-rule 'a *:* rwm' \
    --cgroupns private \
    --tmpfs /run:exec --tmpfs /tmp \
    -v "$node-containerd:/var/lib/containerd" -v "$node-state:/var/lib/minilet" \
    -v "$kc:/etc/minilet/bootstrap-kubeconfig:ro" \
    -e "MINILET_CLUSTER_CIDR=${MINILET_CP_CLUSTER_CIDR:-10.244.0.0/16}" \
    -e "MINILET_NODE_AGENT=$AGENT" --label "io.minilet.node-agent=$AGENT" "${extra[@]}" \
    "$NODE_IMAGE" >/dev/null
  docker inspect -f '{{ .Id }}' "$node" >"$RUN/nodes/$node.id"
}

ready_nodes() {
  kubectl_ get nodes -o jsonpath='{range .items[*]}{.metadata.name}{" "}{range .status.conditions[?(@.type=="Ready")]}{.status}{end}{"\n"}{end}' 2>/dev/null |
    awk '$2 == "True" { print $1 }'
}

# wait_ready NODE...: each of them Ready in the API.
wait_ready() {
  step "nodes Ready"
  local deadline=$((SECONDS + READY_TIMEOUT)) missing n ready
  while :; do
    ready=" $(ready_nodes | tr '\n' ' ') "
    missing=()
    for n in "$@"; do [[ $ready == *" $n "* ]] || missing+=("$n"); done
    ((${#missing[@]} == 0)) && return 0
    if ((SECONDS >= deadline)); then
      for n in "${missing[@]}"; do
        say "node $n not Ready; last lines of its log:"
        docker logs --tail 8 "$n" 2>&1 | sed 's/^/  | /' >&3 || true
      done
      die "not Ready ${READY_TIMEOUT}s after start: ${missing[*]}"
    fi
    sleep 0.5
  done
}

cmd_up() {
  local nodes=1
  while (($#)); do
    case $1 in
    --nodes)
      nodes=${2:-}
      shift 2 || die "--nodes needs a number"
      ;;
    --agent)
      AGENT=${2:-}
      shift 2 || die "--agent needs minilet or kubelet"
      ;;
    *) die "unknown argument: $1 (usage: up [--nodes N] [--agent minilet|kubelet])" ;;
    esac
  done
  [[ $nodes =~ ^[1-9][0-9]?$ ]] || die "--nodes must be 1..99, not $nodes"
  [[ $AGENT == minilet || $AGENT == kubelet ]] || die "--agent must be minilet or kubelet, not $AGENT"
  step docker
  docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"
  ((EUID == 0)) || die "must run as root (the control plane's packages, the stack, docker)"
  mkdir -p "$RUN/nodes"
  local t0=$SECONDS
  ensure_network
  control_plane_up
  build_node_image
  local i names=()
  for ((i = 1; i <= nodes; i++)); do
    names+=("$(node_name "$i")")
    start_node "${names[-1]}" "$BOOTSTRAP"
  done
  local t1=$SECONDS
  wait_ready "${names[@]}"
  say "up: ${#names[@]} node(s) Ready ($((SECONDS - t1)) s after their start, $((SECONDS - t0)) s in all); kubectl --kubeconfig $USER_KUBECONFIG get nodes"
}

cmd_join() {
  local node=${1:-} token=""
  shift || true
  [[ $node =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || die "usage: join NODE [--token ID.SECRET] (NODE a DNS label)"
  if [[ ${1:-} == --token ]]; then
    token=${2:-}
    [[ -n $token ]] || die "--token needs ID.SECRET"
  fi
  [[ -s $BOOTSTRAP ]] || die "no cluster in $RUN: run integration/cluster.sh up first"
  load_cp
  local kc=$BOOTSTRAP
  if [[ -n $token ]]; then
    kc=$RUN/nodes/$node.bootstrap.kubeconfig
    (umask 077 && sed "s|^\( *token: \).*|\1$token|" "$BOOTSTRAP" >"$kc")
  fi
  mkdir -p "$RUN/nodes"
  ensure_network
  start_node "$node" "$kc"
  say "join: $node started"
}

load_cp() {
  local env
  env=$("${CP[@]}" env 2>/dev/null) || die "no control plane in $RUN/cp: run integration/cluster.sh up first"
  # shellcheck source=/dev/null
  . "$env"
  KUBECTL=$MINILET_CP_BIN/kubectl
}

# Host kernel tunables kubelet v1.20 sets at start (container manager's
# setupKernelTunables): those of vm and kernel are not per network
# namespace, so a kubelet node writes the host's. Saved before the first
# kubelet node starts, put back by `down`.
SYSCTLS=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys)
save_sysctls() {
  [[ -s $RUN/host-sysctls ]] && return 0
  local f
  for f in "${SYSCTLS[@]}"; do echo "$f $(<"/proc/sys/$f")"; done >"$RUN/host-sysctls.new"
  mv -f "$RUN/host-sysctls.new" "$RUN/host-sysctls"
}
restore_sysctls() {
  [[ -s $RUN/host-sysctls ]] || return 0
  local f v
  while read -r f v; do
    echo "$v" >"/proc/sys/$f" || die "cannot put /proc/sys/$f back to $v"
  done <"$RUN/host-sysctls"
}

# --- down ----------------------------------------------------------------------

cmd_down() {
  step "down: containers"
  local ids=() id f
  mapfile -t ids < <(docker ps -aq --filter "label=$LABEL")
  ((${#ids[@]} == 0)) || docker rm -f -v "${ids[@]}" >/dev/null
  step "down: volumes"
  mapfile -t ids < <(docker volume ls -q --filter "label=$LABEL")
  ((${#ids[@]} == 0)) || docker volume rm -f "${ids[@]}" >/dev/null
  step "down: control plane"
  if [[ -d $RUN/cp ]]; then
    "${CP[@]}" down 2>&1 | sed 's/^/  /' >&3 || die "control plane down failed"
  fi
  step "down: network"
  docker network rm "$NET" >/dev/null 2>&1 || true
  step "down: host sysctls"
  restore_sysctls
  step "down: check"
  local left=()
  [[ -z $(docker ps -aq --filter "label=$LABEL") ]] || left+=("containers: $(docker ps -a --filter "label=$LABEL" --format '{{ .Names }}' | tr '\n' ' ')")
  [[ -z $(docker volume ls -q --filter "label=$LABEL") ]] || left+=("volumes: $(docker volume ls -q --filter "label=$LABEL" | tr '\n' ' ')")
  docker network inspect "$NET" >/dev/null 2>&1 && left+=("network $NET")
  local pids
  pids=$(pgrep -f -- "$RUN/" || true)
  [[ -z $pids ]] || left+=("processes: $pids")
  awk -v d="$RUN/" 'index($5, d) == 1 { f = 1 } END { exit !f }' /proc/self/mountinfo && left+=("mounts under $RUN")
  # A node's pods' cgroups nest under its container's (the entrypoint binds
  # them there): none may outlive the container.
  for f in "$RUN"/nodes/*.id; do
    [[ -e $f ]] || continue
    id=$(<"$f")
    compgen -G "/sys/fs/cgroup/*/docker/$id" >/dev/null && left+=("cgroups of $(basename "$f" .id): /sys/fs/cgroup/*/docker/$id")
  done
  local f v
  if [[ -s $RUN/host-sysctls ]]; then
    while read -r f v; do
      [[ $(<"/proc/sys/$f") == "$v" ]] || left+=("/proc/sys/$f is $(<"/proc/sys/$f"), was $v")
    done <"$RUN/host-sysctls"
  fi
  ((${#left[@]} == 0)) || die "left behind: ${left[*]}"
  rm -rf "$RUN"
  say "down: nothing left"
}

cmd_status() {
  step status
  local rc=0
  if ! "${CP[@]}" status 2>/dev/null; then
    echo "control plane: down"
    return 3
  fi
  load_cp
  local ready node state ip
  ready=" $(ready_nodes | tr '\n' ' ') "
  while read -r node; do
    [[ -n $node ]] || continue
    state=$(docker inspect -f '{{ .State.Status }}' "$node")
    ip=$(docker inspect -f "{{ with index .NetworkSettings.Networks \"$NET\" }}{{ .IPAddress }}{{ end }}" "$node")
    if [[ $ready == *" $node "* ]]; then
      echo "$node: $state, ${ip:-no address}, Ready"
    else
      echo "$node: $state, ${ip:-no address}, not Ready"
      rc=3
    fi
  done < <(docker ps -a --filter "label=$LABEL" --format '{{ .Names }}' | sort)
  return "$rc"
}

case ${1:-} in
up) cmd_up "${@:2}" ;;
join) cmd_join "${@:2}" ;;
down) cmd_down ;;
status) cmd_status || exit $? ;;
kubeconfig)
  [[ -s $USER_KUBECONFIG ]] || die "no $USER_KUBECONFIG: run integration/cluster.sh up first"
  echo "$USER_KUBECONFIG"
  ;;
*)
  echo "usage: $0 up [--nodes N] [--agent minilet|kubelet]|join NODE [--token ID.SECRET]|down|status|kubeconfig   (run dir: $RUN)" >&2
  exit 2
  ;;
esac
