#!/usr/bin/env bash
# integration/image-test.sh: proves the Docker image. Builds the base
# (cached) and the image (integration/image.sh build), runs minilet from it
# against the real stack exactly as README.md's `docker run` line does
# (privileged, host network and PID, the host paths it shares with the
# runtime mounted at the same paths), and checks:
#   - a static pod runs, seen through CRI (ctr, by the pod's labels) and
#     through the agent's own control socket (`minilet get pods`, from the
#     host, where the paths are the same, and by docker exec);
#   - its emptyDir (medium: Memory), a tmpfs the agent mounts inside its
#     container, reaches the pod: the state dir's mount propagation works;
#   - the agent's logs come out of the container (`docker logs`);
#   - removing the manifest removes the pod and its netns; `docker stop`
#     stops the agent cleanly (exit 0), and nothing is left: no pod
#     container, no netns, no IP allocation, no tmpfs, no container, no
#     mount of ours.
# Runs against ${MINILET_STACK_DIR:-<repo>/integration/.run}; it starts the
# stack if it is not up. The stack is shared: run it while no other agent
# uses the runtime's CNI conf dir (CI runs it from test.sh).
#
# Any failure prints ONE line "image-test: FAILED (<step>): ..." and exits
# non-zero.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"

NAME=minilet-image-test
NODE=imgnode
POD=img-probe
POD_FULL=$POD-$NODE

# shellcheck source=integration/lib.sh
. "$REPO/integration/lib.sh"
# Any failure: one line "image-test: FAILED (<step>): ..." on stderr.
fail_report image-test
exec 3>&2
say() { printf 'image-test: %s\n' "$*" >&3; }


STEP=stack
out=$(integration/stack.sh up 2>&1) || die "stack.sh up failed: ${out##*$'\n'}"
# shellcheck disable=SC1091
. "$(integration/stack.sh env)"
SOCK=${CONTAINERD_SOCK#unix://}
D=$MINILET_STACK_DIR/image-test
STATE=$D/state
LOGS=$D/logs
MANIFESTS=$D/manifests
CONF=$D/config
NETNS=/var/run/netns
XTABLES_LOCK=/run/xtables.lock
ctr_() { timeout 30 ctr --address "$SOCK" -n k8s.io "$@"; }
# The pod's containers (its sandbox and its container) by label, through
# CRI's namespace.
pod_containers() { ctr_ containers ls -q "labels.\"io.kubernetes.pod.name\"==$POD_FULL"; }
no_pod_containers() { [[ -z $(pod_containers 2>/dev/null) ]]; }

STEP="build image"
# image.sh prints its own one-line failure.
IMAGE=$(integration/image.sh build) || exit

# ------------------------------------------------------------ host paths
STEP="host paths"
# Bind mounts with propagation need a shared source mount; on a host whose
# / is shared (systemd) they already are, elsewhere (this VM) we make the
# dir a shared mount of itself, as `ip netns add` does for /var/run/netns.
MADE_MOUNTS=()
ensure_shared() {
  local dir=$1 prop real
  mkdir -p "$dir"
  prop=$(findmnt -n -o PROPAGATION --target "$dir")
  [[ $prop == shared* ]] && return
  if ! mountpoint -q "$dir"; then
    # A bind over the dir would hide what is already mounted below it (a
    # running pod's netns): its runtime could then never unmount it.
    real=$(realpath "$dir")
    if awk -v d="$real/" 'index($5, d) == 1 { f = 1 } END { exit !f }' /proc/self/mountinfo; then
      die "$dir is not a shared mount and has mounts below it (netns of running pods?); cannot make it shared safely"
    fi
    mount --bind "$dir" "$dir"
    MADE_MOUNTS+=("$dir")
  fi
  mount --make-shared "$dir"
}

cleanup() {
  local rc=$?
  trap - ERR
  set +e
  rm -f "$MANIFESTS/$POD.yaml"
  if [[ $(docker inspect -f '{{ .State.Running }}' "$NAME" 2>/dev/null) == true ]]; then
    # Let the agent take its pod down before it goes (best effort).
    wait_for 60 no_pod_containers
  fi
  docker rm -f "$NAME" >/dev/null 2>&1
  local m
  for m in "${MADE_MOUNTS[@]}"; do
    # /var/run/netns stays a shared mount (as after `ip netns add`):
    # unmounting it would hide the netns of pods that still run.
    [[ $m == "$NETNS" ]] && continue
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
  done
  exit "$rc"
}
trap cleanup EXIT

docker rm -f "$NAME" >/dev/null 2>&1 || true
# A pod of a run that died half-way would pass for ours: refuse to guess.
[[ -z $(pod_containers) ]] ||
  die "pod $POD_FULL of an earlier run is still in the runtime; remove it (integration/stack.sh down) first"
# Mounts an earlier run left (its state dir, an emptyDir), deepest first.
awk -v d="$D" '$5 == d || index($5, d "/") == 1 { print length($5) "\t" $5 }' /proc/self/mountinfo |
  sort -rn | cut -f2- | while read -r m; do umount "$m" || umount -l "$m"; done
rm -rf "$D"
mkdir -p "$STATE" "$LOGS" "$MANIFESTS" "$CONF"
ensure_shared "$STATE"
ensure_shared "$NETNS"
# iptables' lock, shared with the host's iptables users (Docker, the
# runtime); docker would make a missing bind source a directory.
[[ -e $XTABLES_LOCK ]] || : >"$XTABLES_LOCK"
mkdir -p /var/lib/cni

cat >"$CONF/minilet.yaml" <<EOF
# Written by integration/image-test.sh for the stack at $MINILET_STACK_DIR.
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
staticPodPath: $MANIFESTS
containerRuntimeEndpoint: $CONTAINERD_SOCK
podLogsDir: $LOGS
---
apiVersion: minilet.io/v1alpha1
kind: MiniletConfiguration
stateDir: $STATE
# The image's own: config/cni and Debian's plugins (also on the host at
# /usr/lib/cni).
cniConfDir: /etc/minilet/net.d
cniBinDirs: [/usr/lib/cni]
runtimeCNIConfDir: $RUNTIME_CNI_CONF_DIR
runtimeCNIBinDir: $RUNTIME_CNI_BIN_DIR
EOF

# ------------------------------------------------------------ the agent
STEP="privileges"
# --privileged asks for every capability; where the host's bounding set
# lacks one (these VMs lack SYS_RESOURCE, which is also why they refuse a
# negative oom_score_adj) runc fails with "unable to apply caps". Then the
# same privileges short of those capabilities, spelled out.
CAP_NAMES=(CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID
  SETPCAP LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW
  IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT
  SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE
  AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM
  BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE)
missing_caps() {
  local bnd last i
  bnd=$((16#$(awk '$1 == "CapBnd:" { print $2 }' /proc/self/status)))
  last=$(cat /proc/sys/kernel/cap_last_cap)
  for ((i = 0; i <= last && i < ${#CAP_NAMES[@]}; i++)); do
    (((bnd >> i) & 1)) || echo "${CAP_NAMES[i]}"
  done
}
if out=$(docker run --rm --privileged --network none "$IMAGE" --version 2>&1); then
  PRIV_ARGS=(--privileged)
  say "privileges: --privileged"
else
  [[ $out == *"unable to apply caps"* ]] || die "docker run --privileged failed: ${out%%$'\n'*}"
  mapfile -t missing < <(missing_caps)
  ((${#missing[@]})) || die "docker run --privileged cannot apply caps, yet the bounding set lacks none"
  PRIV_ARGS=(--cap-add ALL --security-opt seccomp=unconfined --security-opt apparmor=unconfined
    --security-opt systempaths=unconfined)
  for c in "${missing[@]}"; do PRIV_ARGS+=(--cap-drop "$c"); done
  say "privileges: --privileged cannot apply caps here (bounding set lacks ${missing[*]}): using ${PRIV_ARGS[*]}"
fi

STEP="docker run"
# The same paths inside and out: the runtime (on the host) dials the agent's
# CNI socket in the state dir, execs the minilet-cni the agent copies into
# its bin dir, bind-mounts the emptyDirs the agent makes, and gives the agent
# netns paths under /var/run/netns.
#   state dir  rshared: the agent's tmpfs emptyDirs must reach the host
#   netns      rslave: netns the runtime mounts later must reach the agent
#   /var/lib/cni  host-local's IP allocations, which must outlive the container
RUN_ARGS=(
  -d --name "$NAME" "${PRIV_ARGS[@]}" --network host --pid host
  -v "$SOCK:$SOCK"
  -v "$RUNTIME_CNI_CONF_DIR:$RUNTIME_CNI_CONF_DIR"
  -v "$RUNTIME_CNI_BIN_DIR:$RUNTIME_CNI_BIN_DIR"
  -v "$STATE:$STATE:rshared"
  -v "$LOGS:$LOGS"
  -v /var/lib/cni:/var/lib/cni
  -v "$NETNS:$NETNS:rslave"
  -v "$XTABLES_LOCK:$XTABLES_LOCK"
  -v "$MANIFESTS:$MANIFESTS:ro"
  -v "$CONF:$CONF:ro"
  "$IMAGE" --config "$CONF/minilet.yaml" --hostname-override "$NODE"
)
out=$(docker run "${RUN_ARGS[@]}" 2>&1) || die "${out%%$'\n'*}"

STEP="agent started"
agent_logs() { docker logs "$NAME" 2>&1; }
agent_up() {
  [[ $(docker inspect -f '{{ .State.Running }}' "$NAME") == true ]] ||
    die "the agent's container exited: $(agent_logs | tail -n1)"
  agent_logs | grep -q 'minilet started'
}
wait_for 30 agent_up || die "no 'minilet started' in docker logs within 30 s: $(agent_logs | tail -n1)"
[[ -x $RUNTIME_CNI_BIN_DIR/minilet-cni ]] || die "the agent did not install minilet-cni into $RUNTIME_CNI_BIN_DIR"

# ------------------------------------------------------------ a pod
STEP="pod running"
cat >"$MANIFESTS/$POD.yaml.tmp" <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $POD
spec:
  terminationGracePeriodSeconds: 10
  containers:
  - name: probe
    image: $BUSYBOX_IMAGE
    imagePullPolicy: IfNotPresent
    command: [sh, -c, 'trap "exit 0" TERM; if grep -q " /data tmpfs " /proc/mounts; then echo emptydir-tmpfs-ok; else echo emptydir-not-tmpfs; fi; sleep 3600 & wait']
    volumeMounts:
    - {name: data, mountPath: /data}
  volumes:
  - name: data
    emptyDir: {medium: Memory}
EOF
mv "$MANIFESTS/$POD.yaml.tmp" "$MANIFESTS/$POD.yaml"

# The probe container's task RUNNING and the sandbox's too.
pod_running() {
  local ids id running=0
  mapfile -t ids < <(pod_containers)
  ((${#ids[@]} == 2)) || return 1
  for id in "${ids[@]}"; do
    ctr_ tasks ls | awk -v id="$id" '$1 == id && $3 == "RUNNING" { f = 1 } END { exit !f }' || return 1
    running=$((running + 1))
  done
  ((running == 2))
}
wait_for 60 pod_running ||
  die "pod $POD_FULL not running through CRI within 60 s: $(agent_logs | grep -i -m1 'error\|warn' || agent_logs | tail -n1)"

sandbox=$(ctr_ containers ls -q "labels.\"io.kubernetes.pod.name\"==$POD_FULL,labels.\"io.cri-containerd.kind\"==sandbox")
[[ -n $sandbox ]] || die "no sandbox container labelled for $POD_FULL"
netns=$(ctr_ containers info "$sandbox" | grep -o '/var/run/netns/cni-[0-9a-f-]*' | head -n1)
[[ -n $netns && -e $netns ]] || die "sandbox $sandbox has no netns under $NETNS"

STEP="get pods"
# The agent's control socket, from the host through the same path and from
# the image's own CLI.
get_pods() { "$@" --config "$CONF/minilet.yaml" get pods 2>&1; }
# NAME READY STATUS RESTARTS AGE IP: running, with the IP its CNI ADD gave.
shows_running() {
  get_pods "$@" | awk -v p="$POD_FULL" '$1 == p && $2 == "1/1" && $3 == "Running" && $6 ~ /^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$/ { f = 1 } END { exit !f }'
}
wait_for 20 shows_running target/minilet ||
  die "minilet get pods (host) does not show $POD_FULL 1/1 Running with an IP: $(get_pods target/minilet | tr '\n' ' ')"
shows_running docker exec "$NAME" minilet ||
  die "minilet get pods (docker exec) does not show $POD_FULL 1/1 Running with an IP: $(get_pods docker exec "$NAME" minilet | tr '\n' ' ')"

pod_ip=$(get_pods target/minilet | awk -v p="$POD_FULL" '$1 == p { print $6 }')
STEP="IP allocation on the host"
# host-local keeps it in /var/lib/cni, which must be the host's: else it
# would die with the container and the next agent could hand it out twice.
compgen -G "/var/lib/cni/networks/*/$pod_ip" >/dev/null ||
  die "no host-local allocation of $pod_ip under the host's /var/lib/cni/networks"

STEP="emptyDir propagation"
probe_log() { cat "$LOGS"/default_"$POD_FULL"_*/probe/0.log 2>/dev/null; }
wait_for 20 eval 'probe_log | grep -q emptydir-' || die "no output from the probe container under $LOGS"
probe_log | grep -q emptydir-tmpfs-ok ||
  die "the pod's Memory emptyDir is not a tmpfs: the agent's mount did not reach the host ($(probe_log | tail -n1))"

STEP="agent logs"
logs=$(agent_logs)
for want in 'minilet started' 'container runtime connected' 'pod added' 'sandbox ready' 'starting container'; do
  grep -q "$want" <<<"$logs" || die "docker logs lacks '$want'"
done
grep -q "$POD_FULL" <<<"$logs" || die "docker logs never names the pod $POD_FULL"

# ------------------------------------------------------------ teardown
STEP="pod removed"
rm -f "$MANIFESTS/$POD.yaml"
wait_for 60 no_pod_containers || die "pod $POD_FULL still has containers 60 s after its manifest went"
wait_for 10 eval "[[ ! -e $netns ]]" || die "netns $netns left after the pod was removed"
agent_logs | grep -q 'pod removed' || die "docker logs lacks 'pod removed'"

STEP="docker stop"
docker stop -t 30 "$NAME" >/dev/null
code=$(docker inspect -f '{{ .State.ExitCode }}' "$NAME")
[[ $code == 0 ]] || die "the agent exited $code on SIGTERM: $(agent_logs | tail -n1)"
agent_logs | grep -q 'minilet stopped' || die "docker logs lacks 'minilet stopped'"
docker rm "$NAME" >/dev/null

STEP="nothing left"
docker ps -a --format '{{ .Names }}' | grep -qx "$NAME" && die "container $NAME still listed"
[[ -z $(pod_containers) ]] || die "pod containers left: $(pod_containers | tr '\n' ' ')"
[[ ! -e $netns ]] || die "netns $netns left"
# host-local's allocation, made through the container's /var/lib/cni mount.
for f in /var/lib/cni/networks/*/"$pod_ip"; do
  [[ ! -e $f ]] || die "IP $pod_ip still allocated: $f"
done
left=$(awk -v root="$STATE/" 'index($5, root) == 1 { print $5 }' /proc/self/mountinfo)
[[ -z $left ]] || die "mounts left under $STATE: $left"

say "ok: $IMAGE ran $POD_FULL (CRI running, get pods 1/1 Running at $pod_ip, Memory emptyDir a tmpfs, agent logs in docker logs), removed it and stopped cleanly; nothing left (IP released)"
