#!/usr/bin/env bash
# integration/stack.sh: the real node stack that minilet's end-to-end tests
# run against, all under ONE run dir (${MINILET_STACK_DIR:-<repo>/integration/.run}).
#
#   up      install what is missing (apt), start a local registry on
#           127.0.0.1:5000, build and push a busybox and a pause image (cached
#           in the registry storage), start a second registry on
#           127.0.0.1:5001 that requires a login (htpasswd) holding the same
#           busybox as localhost:5001/private/busybox:1.36 (for the
#           imagePullSecrets tests; NOT pre-pulled), start a private
#           containerd with its own config, socket, root and state, pre-pull
#           both images of the first registry into the k8s.io namespace,
#           write RUN/env. Idempotent.
#   down    stop everything (the control plane of integration/control-plane.sh
#           first) and leave no process, mount, netns or bridge behind; the
#           registries' storage (the image cache) stays. Idempotent.
#   status  one line per component; exit 0 only when all are up.
#   env     print the path of RUN/env (after `up`).
#
# MINILET_SNAPSHOTTER=overlayfs|native forces the snapshotter; by default
# `up` probes overlayfs on the run dir's filesystem and falls back to native.
#
# Side effects outside the run dir, undone by `down`: netns files under
# /var/run/netns (containerd 1.6's CRI puts them there), the CNI bridge, the
# host-local IPAM dir and CNI-* iptables chains made for our pods (the
# firewall plugin's CNI-FORWARD and CNI-ADMIN too; a Docker engine's rules
# are left exactly as they were, and checked to be), the
# /k8s.io parent cgroups, and the dirs containerd 1.6 hard-codes under
# /run/containerd (s/ for shim sockets, fifo/, runc/). CRI's runc state is
# kept under the run dir (runtime option Root). Shared state (all cni-*
# netns, CNI-* chains, /run/containerd) is only swept when no other
# CRI containerd runs on the machine (a Docker engine's does not count).
#
# Any failure prints ONE line "stack: FAILED (<step>): ..." and exits non-zero:
# CI must fail, never skip, when the stack can't come up.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
RUN=$(realpath -m "${MINILET_STACK_DIR:-$REPO/integration/.run}")

REGISTRY_ADDR=127.0.0.1:5000
REGISTRY=localhost:5000
BUSYBOX_IMAGE=$REGISTRY/busybox:1.36
PAUSE_IMAGE=$REGISTRY/pause:3.9
# The registry that wants a login, for pulls with imagePullSecrets.
AUTH_REGISTRY_ADDR=127.0.0.1:5001
AUTH_REGISTRY=localhost:5001
AUTH_IMAGE=$AUTH_REGISTRY/private/busybox:1.36
AUTH_USER=minilet
AUTH_PASS=minilet-pass
CNI_PLUGIN_DIR=/usr/lib/cni
IMAGE_PATH_ENV=PATH=/bin:/usr/bin:/sbin:/usr/sbin
# Namespace for the CRI-less smoke test, kept apart from CRI's k8s.io.
CHECK_NS=minilet-stack-check

# protobuf-compiler, gcc and libc6-dev are for building minilet itself (the
# CRI protos; rustc links with cc, and the static build needs libc.a);
# e2fsprogs, util-linux and mount are the test CSI driver's mkfs, losetup
# and mount.
PACKAGES=(containerd runc containernetworking-plugins docker-registry skopeo
  umoci busybox-static iproute2 iptables protobuf-compiler curl gcc libc6-dev
  apache2-utils e2fsprogs util-linux mount)

CD_DIR=$RUN/containerd
CD_CONFIG=$CD_DIR/config.toml
CD_PIDFILE=$RUN/containerd.pid
CD_LOG=$RUN/containerd.log
SOCK=$CD_DIR/containerd.sock
HOSTS_DIR=$CD_DIR/certs.d
RUNC_ROOT=$RUN/runc
REG_DIR=$RUN/registry
REG_CONFIG=$REG_DIR/config.yml
REG_PIDFILE=$RUN/registry.pid
REG_LOG=$RUN/registry.log
AREG_DIR=$RUN/registry-auth
AREG_CONFIG=$AREG_DIR/config.yml
AREG_PIDFILE=$RUN/registry-auth.pid
AREG_LOG=$RUN/registry-auth.log
IMG_DIR=$RUN/images
CNI_BIN=$RUN/cni/bin
CNI_CONF=$RUN/cni/net.d
ENV_FILE=$RUN/env
SNAPSHOTTER_FILE=$RUN/snapshotter

STEP=init

# fd 3 = the caller's stderr, so our one-line messages reach the user even
# from inside a step whose output goes to a log file.
exec 3>&2
say() { printf 'stack: %s\n' "$*" >&3; }
die() {
  printf 'stack: FAILED (%s): %s\n' "$STEP" "$*" >&3
  exit 1
}
on_err() {
  local rc=$1 line=$2 cmd=$3
  # Only the main shell reports; a failing $(...) is reported by its caller.
  [[ $BASHPID == "$$" ]] || exit "$rc"
  printf 'stack: FAILED (%s): line %s: %s (exit %s)\n' "$STEP" "$line" "$cmd" "$rc" >&3
  exit "$rc"
}
trap 'on_err $? $LINENO "$BASH_COMMAND"' ERR

# wait_for SECONDS CMD...: poll CMD every 0.1 s until it succeeds.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

# pids_of COMM_GLOB NEEDLE: pids whose process name matches COMM_GLOB and
# whose command line contains NEEDLE. Matching the name too keeps us from
# ever touching a shell whose command line merely mentions the run dir.
pids_of() {
  local glob=$1 needle=$2 dir pid comm cmd
  for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    [[ $pid == "$$" ]] && continue
    { read -r comm <"$dir/comm"; } 2>/dev/null || continue
    # shellcheck disable=SC2053 # glob match on purpose
    [[ $comm == $glob ]] || continue
    cmd=$(tr '\0' ' ' <"$dir/cmdline" 2>/dev/null) || continue
    [[ $cmd == *"$needle"* ]] && echo "$pid"
  done
  return 0
}

alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

# stop_pids SECONDS PID...: TERM, wait, then KILL.
stop_pids() {
  local grace=$1 pid
  shift
  (($#)) || return 0
  kill -TERM "$@" 2>/dev/null || true
  local deadline=$((SECONDS + grace))
  for pid in "$@"; do
    while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
  for pid in "$@"; do
    wait_for 5 eval "! kill -0 $pid 2>/dev/null" || true
  done
}

containerd_pids() { pids_of containerd "--config $CD_CONFIG"; }
registry_pids() { pids_of docker-registry "serve $REG_CONFIG"; }
auth_registry_pids() { pids_of docker-registry "serve $AREG_CONFIG"; }
shim_pids() { pids_of 'containerd-shim*' "-address $SOCK"; }
ctr_() { timeout 30 ctr --address "$SOCK" "$@"; }
containerd_answers() { [[ -S $SOCK ]] && timeout 5 ctr --address "$SOCK" version >/dev/null 2>&1; }
registry_answers() { curl -fsS -m 2 -o /dev/null "http://$REGISTRY_ADDR/v2/" 2>/dev/null; }
# It answers with the login, and refuses without.
auth_registry_answers() {
  curl -fsS -m 2 -o /dev/null -u "$AUTH_USER:$AUTH_PASS" "http://$AUTH_REGISTRY_ADDR/v2/" 2>/dev/null &&
    [[ $(curl -sS -m 2 -o /dev/null -w '%{http_code}' "http://$AUTH_REGISTRY_ADDR/v2/" 2>/dev/null) == 401 ]]
}
snapshotter() { cat "$SNAPSHOTTER_FILE" 2>/dev/null || echo overlayfs; }

# json_strings KEY FILE...: every "KEY": "value" string in the files.
json_strings() {
  local key=$1
  shift
  (($#)) || return 0
  grep -ho "\"$key\"[[:space:]]*:[[:space:]]*\"[^\"]*\"" "$@" 2>/dev/null | sed 's/.*"\([^"]*\)"$/\1/' | sort -u
}

# CNI configs whose leftovers (bridge, host-local IPAM dir) are ours: the
# repo's example, and whatever the tests put into the runtime's conf dir.
our_cni_confs() {
  local f
  for f in "$REPO/config/cni/10-bridge.conflist" "$CNI_CONF"/*.conf "$CNI_CONF"/*.conflist; do
    [[ -f $f ]] && echo "$f"
  done
  return 0
}

# Bridges our CNI configs create (minilet0 when the example is absent).
bridge_names() {
  local confs
  mapfile -t confs < <(our_cni_confs)
  [[ -f $REPO/config/cni/10-bridge.conflist ]] || echo minilet0
  json_strings bridge "${confs[@]}"
  # The e2e suite's and the benchmarks' chains live in temp dirs of their
  # own; their bridges (integration/e2e/harness.rs, integration/bench/) are
  # made on this host all the same.
  echo minie2e0
  echo mlbench0
}

# Network names under which host-local keeps IPAM state in /var/lib/cni/networks.
network_names() {
  local confs
  mapfile -t confs < <(our_cni_confs)
  json_strings name "${confs[@]}"
  # The e2e suite keeps host-local's state in its temp dir; the benchmark's
  # network keeps it in the default /var/lib/cni/networks.
  echo minilet-bench
}

# ---------------------------------------------------------------- up steps

ensure_packages() {
  STEP="apt packages"
  local missing=() pkg st
  for pkg in "${PACKAGES[@]}"; do
    st=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ $st == "install ok installed" ]] || missing+=("$pkg")
  done
  if ((${#missing[@]} == 0)); then
    say "apt: all ${#PACKAGES[@]} packages present"
    return
  fi
  say "apt: installing ${missing[*]}"
  # Keep the packages' own services (a system containerd, a registry on
  # :5000) from starting: they would clash with ours.
  local policy=/usr/sbin/policy-rc.d made_policy=""
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
  fi
  local rc=0
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  } >>"$RUN/apt.log" 2>&1 || rc=$?
  [[ -n $made_policy ]] && rm -f "$policy"
  ((rc == 0)) || die "apt-get failed installing ${missing[*]} (see $RUN/apt.log)"
}

preflight() {
  STEP=preflight
  ((EUID == 0)) || die "must run as root (containerd, mounts, netns)"
  # unix socket paths are limited to 108 bytes; ".ttrpc" is appended to one.
  ((${#SOCK} + 7 < 108)) || die "run dir $RUN is too long for a unix socket path; set MINILET_STACK_DIR shorter"
  local sys_sock=/run/containerd/containerd.sock
  [[ $(realpath -m "$SOCK") != "$(realpath -m "$sys_sock")" ]] ||
    die "private containerd socket $SOCK would clash with the system one"
  case $RUN/ in
    /run/containerd/* | /var/lib/containerd/* | /var/run/containerd/*)
      die "run dir $RUN overlaps a system containerd's root/state" ;;
  esac
  local cmd
  for cmd in containerd ctr runc containerd-shim-runc-v2 docker-registry skopeo umoci busybox ip iptables protoc curl cc htpasswd mkfs.ext4 losetup; do
    command -v "$cmd" >/dev/null || die "command $cmd not found after installing packages"
  done
  [[ -x $CNI_PLUGIN_DIR/bridge && -x $CNI_PLUGIN_DIR/host-local && -x $CNI_PLUGIN_DIR/loopback ]] ||
    die "CNI plugins missing in $CNI_PLUGIN_DIR"
}

# Negative oom_score_adj is refused on these machines; the CRI sandbox asks
# for -998, so containerd must be told to clamp it. Report which case we're in.
check_oom() {
  STEP="oom_score_adj check"
  if sh -c 'echo -998 >/proc/self/oom_score_adj' 2>/dev/null; then
    say "oom: negative oom_score_adj allowed here; restrict_oom_score_adj = true set anyway"
  else
    say "oom: negative oom_score_adj is refused here; handled by restrict_oom_score_adj = true"
  fi
}

# Can we mount overlayfs on the filesystem holding the run dir?
check_overlay() {
  STEP="overlayfs check"
  if [[ -n ${MINILET_SNAPSHOTTER:-} ]]; then
    [[ $MINILET_SNAPSHOTTER == overlayfs || $MINILET_SNAPSHOTTER == native ]] ||
      die "MINILET_SNAPSHOTTER must be overlayfs or native, not '$MINILET_SNAPSHOTTER'"
    echo "$MINILET_SNAPSHOTTER" >"$SNAPSHOTTER_FILE"
    say "snapshotter: $MINILET_SNAPSHOTTER (forced by MINILET_SNAPSHOTTER)"
    return
  fi
  local d=$RUN/.overlay-check ok=1
  rm -rf "$d"
  mkdir -p "$d"/{lower,upper,work,merged}
  echo lower >"$d/lower/f"
  try_mount() { mount -t overlay overlay -o "lowerdir=$d/lower,upperdir=$d/upper,workdir=$d/work" "$d/merged" 2>/dev/null; }
  if try_mount || { modprobe overlay 2>/dev/null && try_mount; }; then
    if [[ $(cat "$d/merged/f") == lower ]] && echo upper >"$d/merged/g" 2>/dev/null; then ok=0; fi
    umount "$d/merged" || umount -l "$d/merged"
  fi
  rm -rf "$d"
  if ((ok == 0)); then
    echo overlayfs >"$SNAPSHOTTER_FILE"
    say "snapshotter: overlayfs works on $(df --output=fstype "$RUN" | tail -n1)"
  else
    echo native >"$SNAPSHOTTER_FILE"
    say "snapshotter: overlayfs does NOT work on $(df --output=fstype "$RUN" | tail -n1); falling back to native"
  fi
}

# serve_registry NAME ADDR DIR PIDFILE LOG [HTPASSWD]: a docker-registry on
# ADDR with its config and storage under DIR, behind an htpasswd login when
# HTPASSWD is given. Kept when it runs with the same config and answers.
serve_registry() {
  local name=$1 addr=$2 dir=$3 pidfile=$4 log=$5 htpasswd=${6:-}
  local config=$dir/config.yml answers=registry_answers
  [[ -z $htpasswd ]] || answers=auth_registry_answers
  mkdir -p "$dir/storage"
  {
    cat <<EOF
# written by integration/stack.sh
version: 0.1
log:
  level: warn
  fields:
    service: minilet-stack-$name
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: $addr
EOF
    if [[ -n $htpasswd ]]; then
      cat <<EOF
auth:
  htpasswd:
    realm: minilet-stack
    path: $htpasswd
EOF
    fi
  } >"$config.new"
  local pids changed=""
  cmp -s "$config.new" "$config" || changed=1
  mv -f "$config.new" "$config"
  mapfile -t pids < <(pids_of docker-registry "serve $config")
  if ((${#pids[@]})) && [[ -z $changed ]] && $answers; then
    echo "${pids[0]}" >"$pidfile"
    say "$name: already up (pid ${pids[0]})"
    return
  fi
  ((${#pids[@]} == 0)) || stop_pids 5 "${pids[@]}"
  if ss -Hltn "sport = :${addr##*:}" | grep -q .; then
    die "port ${addr##*:} is already taken by another process: $(ss -Hltnp "sport = :${addr##*:}" | head -n1)"
  fi
  # 3>&-: a daemon must not hold our message fd, or `stack.sh up | tail`
  # would never see EOF.
  setsid docker-registry serve "$config" >>"$log" 2>&1 </dev/null 3>&- &
  local pid=$!
  echo "$pid" >"$pidfile"
  wait_for 20 $answers ||
    die "$name did not answer http://$addr/v2/ within 20 s: $(tail -n1 "$log" 2>/dev/null)"
  alive "$pid" || die "$name exited: $(tail -n1 "$log")"
  say "$name: up on $addr (pid $pid), storage $dir/storage"
}

start_registry() {
  STEP=registry
  serve_registry registry "$REGISTRY_ADDR" "$REG_DIR" "$REG_PIDFILE" "$REG_LOG"
}

# The registry with a login: bcrypt htpasswd (the only kind it accepts).
start_auth_registry() {
  STEP="auth registry"
  mkdir -p "$AREG_DIR"
  local pw=$AREG_DIR/htpasswd
  if ! htpasswd -vb "$pw" "$AUTH_USER" "$AUTH_PASS" >/dev/null 2>&1; then
    htpasswd -Bbn "$AUTH_USER" "$AUTH_PASS" >"$pw.new"
    mv -f "$pw.new" "$pw"
  fi
  serve_registry auth-registry "$AUTH_REGISTRY_ADDR" "$AREG_DIR" "$AREG_PIDFILE" "$AREG_LOG" "$pw"
}

# The test image's rootfs: static busybox plus a link for every applet, the
# dirs ordinary commands expect, and minimal passwd/group files.
populate_rootfs() {
  local r=$1 bb path name
  bb=$(dpkg -L busybox-static | grep -E '/s?bin/busybox$' | head -n1)
  [[ -n $bb && -x $bb ]] || die "busybox-static binary not found"
  ldd "$bb" >/dev/null 2>&1 && die "$bb is dynamically linked"
  mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc,root,var/www,var/run,proc,sys,dev,run,tmp}
  chmod 1777 "$r/tmp"
  chmod 700 "$r/root"
  install -m 0755 "$bb" "$r/bin/busybox"
  # Each applet at its usual place (/usr/bin/env, /sbin/ip, ...)...
  while read -r path; do
    [[ -n $path && ! -e $r/$path && ! -L $r/$path ]] && ln -s /bin/busybox "$r/$path"
  done < <("$bb" --list-full)
  # ...and every name `busybox --list` prints also in /bin.
  while read -r name; do
    [[ -n $name && $name != busybox && ! -e $r/bin/$name && ! -L $r/bin/$name ]] && ln -s busybox "$r/bin/$name"
  done < <("$bb" --list)
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$r/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$r/etc/group"
  printf 'hosts: files dns\n' >"$r/etc/nsswitch.conf"
}

# Builds both images into one OCI layout with umoci and pushes them.
build_images() {
  local layout=$IMG_DIR/oci bundle=$IMG_DIR/bundle
  rm -rf "$layout" "$bundle"
  mkdir -p "$IMG_DIR"
  umoci init --layout "$layout"
  umoci new --image "$layout:busybox"
  umoci unpack --image "$layout:busybox" "$bundle"
  populate_rootfs "$bundle/rootfs"
  umoci repack --image "$layout:busybox" "$bundle"
  umoci config --image "$layout:busybox" --config.env "$IMAGE_PATH_ENV" \
    --config.workingdir / --config.cmd sh
  umoci config --image "$layout:busybox" --tag pause \
    --config.cmd sleep --config.cmd infinity
  rm -rf "$bundle"
  skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$layout:busybox" "docker://$BUSYBOX_IMAGE"
  skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$layout:pause" "docker://$PAUSE_IMAGE"
}

registry_has() { # REF (localhost:5000/name:tag)
  local ref=${1#"$REGISTRY"/}
  curl -fsS -m 5 -o /dev/null \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://$REGISTRY_ADDR/v2/${ref%%:*}/manifests/${ref##*:}" 2>/dev/null
}

images() {
  STEP="build images"
  # The cache key: the recipe itself and the busybox binary it packs.
  local recipe
  recipe=$({
    declare -f build_images populate_rootfs
    echo "$IMAGE_PATH_ENV $BUSYBOX_IMAGE $PAUSE_IMAGE"
    sha256sum /bin/busybox
  } | sha256sum | cut -d' ' -f1)
  if [[ $(cat "$IMG_DIR/recipe" 2>/dev/null) == "$recipe" ]] &&
    registry_has "$BUSYBOX_IMAGE" && registry_has "$PAUSE_IMAGE"; then
    say "images: $BUSYBOX_IMAGE and $PAUSE_IMAGE already in the registry (cached)"
    return
  fi
  # Not under `||`: that would switch off set -e inside build_images.
  STEP="build images, log $IMG_DIR.log"
  build_images >>"$IMG_DIR.log" 2>&1
  STEP="build images"
  if ! registry_has "$BUSYBOX_IMAGE" || ! registry_has "$PAUSE_IMAGE"; then
    die "images pushed but the registry does not serve them"
  fi
  echo "$recipe" >"$IMG_DIR/recipe"
  say "images: built and pushed $BUSYBOX_IMAGE and $PAUSE_IMAGE"
}

# The same busybox in the login registry, copied whenever the digests differ.
auth_image() {
  STEP="auth image"
  local creds=$AUTH_USER:$AUTH_PASS src dst
  src=$(skopeo inspect --tls-verify=false --format '{{.Digest}}' "docker://$BUSYBOX_IMAGE" 2>/dev/null) ||
    die "no $BUSYBOX_IMAGE to copy"
  dst=$(skopeo inspect --tls-verify=false --creds "$creds" --format '{{.Digest}}' "docker://$AUTH_IMAGE" 2>/dev/null) || dst=""
  if [[ $src == "$dst" ]]; then
    say "images: $AUTH_IMAGE already in the login registry (cached)"
    return
  fi
  skopeo --insecure-policy copy -q --src-tls-verify=false --dest-tls-verify=false \
    --dest-creds "$creds" "docker://$BUSYBOX_IMAGE" "docker://$AUTH_IMAGE" >>"$IMG_DIR.log" 2>&1 ||
    die "skopeo could not push $AUTH_IMAGE (see $IMG_DIR.log)"
  skopeo inspect --tls-verify=false --creds "$creds" "docker://$AUTH_IMAGE" >/dev/null 2>&1 ||
    die "pushed $AUTH_IMAGE but the login registry does not serve it"
  if skopeo inspect --tls-verify=false --no-creds "docker://$AUTH_IMAGE" >/dev/null 2>&1; then
    die "the login registry serves $AUTH_IMAGE without a login"
  fi
  say "images: pushed $AUTH_IMAGE (login $AUTH_USER)"
}

# toml_set FILE SECTION KEY VALUE: set KEY = VALUE (raw TOML) inside
# [SECTION] ("" = top level), adding the key or the section when missing.
toml_set() {
  local file=$1 sec=$2 key=$3 val=$4
  [[ -n $sec ]] && sec="[$sec]"
  awk -v sec="$sec" -v key="$key" -v val="$val" '
    function emit() { print key " = " val; done = 1 }
    BEGIN { inside = (sec == ""); done = 0 }
    /^[[:space:]]*\[/ {
      h = $0; gsub(/^[[:space:]]+|[[:space:]]+$/, "", h)
      if (inside && !done) emit()
      inside = (h == sec)
      print; next
    }
    inside && !done && $0 ~ ("^[[:space:]]*" key "[[:space:]]*=") {
      match($0, /^[[:space:]]*/); printf "%s", substr($0, 1, RLENGTH); emit(); next
    }
    { print }
    END { if (!done) { if (!inside) { print ""; print sec } emit() } }
  ' "$file" >"$file.tmp"
  mv -f "$file.tmp" "$file"
}

write_containerd_config() {
  STEP="containerd config"
  mkdir -p "$CD_DIR/root" "$CD_DIR/state" "$CD_DIR/opt" "$RUNC_ROOT" "$CNI_BIN" "$CNI_CONF"
  # Plain-HTTP pulls from the local registries (CRI PullImage and the
  # sandbox image; the login one with the credentials CRI is given).
  local r
  for r in "$REGISTRY" "$AUTH_REGISTRY"; do
    mkdir -p "$HOSTS_DIR/$r"
    cat >"$HOSTS_DIR/$r/hosts.toml" <<EOF
server = "http://$r"

[host."http://$r"]
  capabilities = ["pull", "resolve"]
EOF
  done
  # The runtime's CNI bin dir: Debian's plugins, plus whatever the tests add.
  local p
  for p in "$CNI_PLUGIN_DIR"/*; do
    [[ -x $p ]] && ln -sfn "$p" "$CNI_BIN/${p##*/}"
  done

  local f=$CD_CONFIG.new cri='plugins."io.containerd.grpc.v1.cri"' q='"'
  containerd config default >"$f"
  toml_set "$f" "" root "$q$CD_DIR/root$q"
  toml_set "$f" "" state "$q$CD_DIR/state$q"
  toml_set "$f" grpc address "$q$SOCK$q"
  toml_set "$f" grpc tcp_address '""'
  toml_set "$f" ttrpc address "$q$SOCK.ttrpc$q"
  toml_set "$f" debug address '""'
  toml_set "$f" metrics address '""'
  toml_set "$f" 'plugins."io.containerd.internal.v1.opt"' path "$q$CD_DIR/opt$q"
  toml_set "$f" "$cri" restrict_oom_score_adj true
  toml_set "$f" "$cri" sandbox_image "$q$PAUSE_IMAGE$q"
  toml_set "$f" "$cri" disable_tcp_service true
  toml_set "$f" "$cri.containerd" snapshotter "$q$(snapshotter)$q"
  toml_set "$f" "$cri.containerd.runtimes.runc.options" Root "$q$RUNC_ROOT$q"
  toml_set "$f" "$cri.registry" config_path "$q$HOSTS_DIR$q"
  toml_set "$f" "$cri.cni" bin_dir "$q$CNI_BIN$q"
  toml_set "$f" "$cri.cni" conf_dir "$q$CNI_CONF$q"
  toml_set "$f" "$cri.cni" max_conf_num 1

  # Check what containerd itself reads back, not just our text edits.
  local dump
  dump=$(containerd --config "$f" config dump 2>&1) || die "containerd rejects $f: ${dump##*$'\n'}"
  local want
  for want in "restrict_oom_score_adj = true" "sandbox_image = \"$PAUSE_IMAGE\"" \
    "address = \"$SOCK\"" "config_path = \"$HOSTS_DIR\"" "bin_dir = \"$CNI_BIN\"" \
    "conf_dir = \"$CNI_CONF\"" "max_conf_num = 1" "snapshotter = \"$(snapshotter)\""; do
    grep -qF "$want" <<<"$dump" || die "containerd config lacks '$want' after editing $f"
  done
  grep -q '^root = "/var/lib/containerd"\|^state = "/run/containerd"' <<<"$dump" &&
    die "containerd config still points root/state at the system paths"
  STEP="oom_score_adj check"
  grep -qF "restrict_oom_score_adj = true" <<<"$dump" ||
    die "oom_score_adj trap not handled: restrict_oom_score_adj is not true"
  STEP="containerd config"
}

start_containerd() {
  STEP=containerd
  local changed="" pids
  cmp -s "$CD_CONFIG.new" "$CD_CONFIG" || changed=1
  mv -f "$CD_CONFIG.new" "$CD_CONFIG"
  mapfile -t pids < <(containerd_pids)
  if ((${#pids[@]})) && [[ -z $changed ]] && containerd_answers; then
    echo "${pids[0]}" >"$CD_PIDFILE"
    say "containerd: already up (pid ${pids[0]})"
    return
  fi
  if ((${#pids[@]})); then
    say "containerd: config changed or not answering; restarting pid ${pids[*]}"
    stop_pids 10 "${pids[@]}"
  fi
  # A socket nobody serves is stale; one that answers belongs to someone else.
  if [[ -S $SOCK ]]; then
    if containerd_answers; then die "another containerd already serves $SOCK"; fi
    rm -f "$SOCK" "$SOCK.ttrpc"
  fi
  setsid containerd --config "$CD_CONFIG" >>"$CD_LOG" 2>&1 </dev/null 3>&- &
  local pid=$!
  echo "$pid" >"$CD_PIDFILE"
  local t0=$SECONDS
  until containerd_answers; do
    alive "$pid" || die "containerd exited: $(tail -n1 "$CD_LOG")"
    ((SECONDS - t0 < 30)) || die "containerd did not answer on $SOCK within 30 s (see $CD_LOG)"
    sleep 0.1
  done
  say "containerd: up (pid $pid), socket $SOCK"
}

# CRI-less health check: the plugins we depend on loaded, and a container
# runs from our image with the runtime and snapshotter we configured.
check_containerd() {
  STEP="containerd health"
  local plugins snap
  snap=$(snapshotter)
  plugins=$(ctr_ plugins ls) || die "ctr plugins ls failed"
  local want
  for want in "io.containerd.grpc.v1 cri" "io.containerd.snapshotter.v1 $snap" "io.containerd.runtime.v2 task"; do
    awk -v t="${want% *}" -v i="${want#* }" '$1 == t && $2 == i && $NF == "ok" { f = 1 } END { exit !f }' <<<"$plugins" ||
      die "containerd plugin '$want' is not ok (see $CD_LOG)"
  done
  ctr_ -n "$CHECK_NS" images pull --plain-http --snapshotter "$snap" "$BUSYBOX_IMAGE" >>"$RUN/pull.log" 2>&1 ||
    die "pull of $BUSYBOX_IMAGE into namespace $CHECK_NS failed (see $RUN/pull.log)"
  local id=smoke-$$ out
  out=$(ctr_ -n "$CHECK_NS" run --rm --snapshotter "$snap" --runc-root "$RUNC_ROOT" --fifo-dir "$RUN/fifo" "$BUSYBOX_IMAGE" "$id" \
    sh -c 'mkdir -p /tmp/d && echo ok >/tmp/d/f && cat /tmp/d/f && true' 2>&1) ||
    die "smoke container failed: ${out##*$'\n'}"
  [[ $out == ok ]] || die "smoke container printed '$out', expected 'ok'"
  say "containerd: healthy (cri, $snap snapshotter, runc smoke container ok)"
}

prepull() {
  STEP="pre-pull images"
  local ref snap
  snap=$(snapshotter)
  for ref in "$BUSYBOX_IMAGE" "$PAUSE_IMAGE"; do
    ctr_ -n k8s.io images pull --plain-http --snapshotter "$snap" "$ref" >>"$RUN/pull.log" 2>&1 ||
      die "pull of $ref into k8s.io failed (see $RUN/pull.log)"
  done
  local listed
  listed=$(ctr_ -n k8s.io images ls -q)
  for ref in "$BUSYBOX_IMAGE" "$PAUSE_IMAGE"; do
    grep -qxF "$ref" <<<"$listed" || die "$ref not listed in k8s.io after pull"
  done
  say "images: $BUSYBOX_IMAGE and $PAUSE_IMAGE present in containerd namespace k8s.io"
}

write_env() {
  STEP="env file"
  {
    echo "# written by integration/stack.sh up; source it"
    printf 'export MINILET_STACK_DIR=%q\n' "$RUN"
    printf 'export CONTAINERD_SOCK=%q\n' "unix://$SOCK"
    printf 'export RUNTIME_CNI_CONF_DIR=%q\n' "$CNI_CONF"
    printf 'export RUNTIME_CNI_BIN_DIR=%q\n' "$CNI_BIN"
    printf 'export REGISTRY=%q\n' "$REGISTRY"
    printf 'export BUSYBOX_IMAGE=%q\n' "$BUSYBOX_IMAGE"
    printf 'export PAUSE_IMAGE=%q\n' "$PAUSE_IMAGE"
    printf 'export MINILET_AUTH_REGISTRY=%q\n' "$AUTH_REGISTRY"
    printf 'export MINILET_AUTH_IMAGE=%q\n' "$AUTH_IMAGE"
    printf 'export MINILET_AUTH_USER=%q\n' "$AUTH_USER"
    printf 'export MINILET_AUTH_PASS=%q\n' "$AUTH_PASS"
    printf 'export CNI_PLUGIN_DIR=%q\n' "$CNI_PLUGIN_DIR"
    printf 'export CONTAINERD_SNAPSHOTTER=%q\n' "$(snapshotter)"
  } >"$ENV_FILE.new"
  mv -f "$ENV_FILE.new" "$ENV_FILE"
}

# Make /run/netns the shared bind of itself that `ip netns add` makes, now,
# while no runtime netns is mounted under it: the first `ip netns add`
# later (a root test, the user) would otherwise bind over the pods' netns
# files and hide them (teardown: umount "not mounted", rm EBUSY). Nothing
# if it is a mount point already or something is mounted under it.
bind_netns_dir() {
  STEP=netns
  mkdir -p /run/netns
  if awk '$5 == "/run/netns" || index($5, "/run/netns/") == 1 { f = 1 } END { exit !f }' /proc/self/mountinfo; then
    return 0
  fi
  mount --bind /run/netns /run/netns && mount --make-shared /run/netns ||
    die "cannot make /run/netns a shared bind of itself (as ip netns does)"
}

cmd_up() {
  local t0=$SECONDS
  mkdir -p "$RUN"
  ensure_packages
  preflight
  check_oom
  check_overlay
  start_registry
  start_auth_registry
  images
  auth_image
  write_containerd_config
  bind_netns_dir
  start_containerd
  check_containerd
  prepull
  write_env
  say "up: stack ready in $((SECONDS - t0)) s; source $ENV_FILE"
}

# -------------------------------------------------------------- down steps

mounts_under() { # mount points at or below $1, deepest first
  awk -v root="$1" '{
      p = $5; gsub(/\\040/, " ", p)
      if (p == root || index(p, root "/") == 1) print length(p) "\t" p
    }' /proc/self/mountinfo | sort -rn | cut -f2-
}

# Whether containerd process PID runs the CRI plugin (and so CNI): false
# only when its config (--config, or the default path) says
# disabled_plugins = ["cri"], as Docker's own containerd does. An
# unreadable config counts as CRI, the safe side.
runs_cri() {
  local pid=$1 conf=/etc/containerd/config.toml arg prev=""
  while IFS= read -r -d '' arg; do
    [[ $prev == --config || $prev == -c ]] && conf=$arg
    [[ $arg == --config=* ]] && conf=${arg#--config=}
    prev=$arg
  done <"/proc/$pid/cmdline" 2>/dev/null || return 0
  [[ $conf == /* ]] || conf=/proc/$pid/cwd/$conf
  [[ -r $conf ]] || return 0
  ! grep -Eq '^[[:space:]]*disabled_plugins[[:space:]]*=.*"(io\.containerd\.grpc\.v1\.)?cri"' "$conf"
}

# Other CRI containerd daemons (not ours) are running: then leave shared
# netns / iptables state alone except what we can attribute to ours. A
# Docker engine's containerd runs no CRI and no CNI: it does not count.
foreign_containerd() {
  local pid ours
  ours=" $(containerd_pids | tr '\n' ' ') "
  for pid in $(pids_of containerd ""); do
    [[ $ours == *" $pid "* ]] && continue
    runs_cri "$pid" && return 0
  done
  return 1
}

# The host's rules that are not CNI's (Docker's, the user's), without
# counters: what removing the CNI chains must leave exactly as it was.
other_rules() {
  local save
  for save in iptables-save ip6tables-save; do
    command -v "$save" >/dev/null || continue
    "$save" 2>/dev/null | grep -v -e '^#' -e 'CNI-' | sed 's/ \[[0-9]*:[0-9]*\]$//' || true
  done
}

# Every CNI-* chain (bridge ipMasq, portmap, the firewall plugin's
# CNI-FORWARD/CNI-ADMIN) and the rules jumping to them, in v4 and v6.
remove_cni_iptables() {
  local ipt table rule chain
  for ipt in iptables ip6tables; do
    command -v "$ipt-save" >/dev/null || continue
    for table in nat filter; do
      # Rules jumping into CNI chains first, then the chains themselves.
      while read -r rule; do
        [[ -n $rule ]] || continue
        eval "$ipt -w -t $table -D ${rule#-A }" 2>/dev/null || true
      done < <("$ipt-save" -t "$table" 2>/dev/null | grep -E '^-A [A-Z]+ .*-j CNI-' || true)
      for chain in $("$ipt-save" -t "$table" 2>/dev/null | sed -n 's/^:\(CNI-[^ ]*\) .*/\1/p'); do
        "$ipt" -w -t "$table" -F "$chain" 2>/dev/null || true
      done
      for chain in $("$ipt-save" -t "$table" 2>/dev/null | sed -n 's/^:\(CNI-[^ ]*\) .*/\1/p'); do
        "$ipt" -w -t "$table" -X "$chain" 2>/dev/null || true
      done
    done
  done
}

# CNI-* chains still there after remove_cni_iptables, one line.
cni_chains_left() {
  local save
  for save in iptables-save ip6tables-save; do
    command -v "$save" >/dev/null || continue
    "$save" 2>/dev/null | sed -n 's/^:\(CNI-[^ ]*\) .*/\1/p' || true
  done | sort -u | tr '\n' ' '
}

# `ip netns` bind-mounts /run/netns over itself. A runtime netns mounted
# before that is hidden below the bind: umount says "not mounted" and rm
# fails with EBUSY. Lift the bind (lazily) so they show again, but only
# when nothing but cni-* netns is mounted on it: the user's own `ip netns`
# namespaces stay. ip(8) makes the bind again when it next needs it.
lift_netns_bind() {
  local id
  id=$(awk '$5 == "/run/netns" { id = $1 } END { print id }' /proc/self/mountinfo)
  [[ -n $id ]] || return 1
  if awk -v id="$id" '$2 == id && $5 !~ /^\/run\/netns\/cni-/ { f = 1 } END { exit !f }' /proc/self/mountinfo; then
    return 1
  fi
  umount -l /run/netns
}

cmd_down() {
  STEP=down
  # First the control plane on this run dir, so one down cleans all; if it
  # fails, the rest still goes down and the failure is reported at the end.
  local cp_down=ok
  MINILET_STACK_DIR=$RUN MINILET_CP_DIR=$RUN/cp "$REPO/integration/control-plane.sh" down || cp_down=""
  local killed_tasks=0 netns=() ns c
  # 1. Leftover tasks/containers, through containerd while it still answers.
  if containerd_answers; then
    for ns in $(ctr_ namespaces ls -q 2>/dev/null); do
      for c in $(ctr_ -n "$ns" containers ls -q 2>/dev/null); do
        mapfile -t -O "${#netns[@]}" netns < <(ctr_ -n "$ns" containers info "$c" 2>/dev/null |
          grep -o '/var/run/netns/cni-[0-9a-f-]*\|/run/netns/cni-[0-9a-f-]*' | sort -u)
        ctr_ -n "$ns" tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
        ctr_ -n "$ns" tasks delete -f "$c" >/dev/null 2>&1 || true
        ctr_ -n "$ns" containers delete "$c" >/dev/null 2>&1 || true
        killed_tasks=$((killed_tasks + 1))
      done
    done
  fi
  # 2. Our containerd.
  local cd_pids
  mapfile -t cd_pids < <(containerd_pids)
  stop_pids 10 "${cd_pids[@]}"
  # 3. Containers runc still knows whose bundle is ours (CRI ones live under
  #    our runc root, `ctr run` ones under the default one), then our shims.
  local root id
  for root in "$RUNC_ROOT"/*/ /run/containerd/runc/*/; do
    [[ -d $root ]] || continue
    for id in $(runc --root "$root" list 2>/dev/null | awk -v r="$RUN/" 'NR > 1 && index($4, r) == 1 { print $1 }'); do
      runc --root "$root" kill --all "$id" KILL >/dev/null 2>&1 || true
      runc --root "$root" delete --force "$id" >/dev/null 2>&1 || true
      killed_tasks=$((killed_tasks + 1))
    done
  done
  local shims
  mapfile -t shims < <(shim_pids)
  stop_pids 3 "${shims[@]}"
  # 4. The registries.
  local reg_pids
  mapfile -t reg_pids < <(registry_pids; auth_registry_pids)
  stop_pids 5 "${reg_pids[@]}"
  # 5. Mounts under the run dir, deepest first.
  local mnts=0 m
  for _ in 1 2 3; do
    local any=""
    while read -r m; do
      [[ -n $m ]] || continue
      any=1
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
      mnts=$((mnts + 1))
    done < <(mounts_under "$RUN")
    [[ -n $any ]] || break
  done
  # 6. Network namespaces: ours for sure, all cni-* when no other containerd runs.
  local foreign=""
  foreign_containerd && foreign=1
  if [[ -z $foreign ]]; then
    for m in /var/run/netns/cni-*; do [[ -e $m ]] && netns+=("$m"); done
  fi
  local removed_ns=0 busy
  for _ in 1 2; do
    busy=()
    for m in "${netns[@]}"; do
      m=/var/run/netns/${m##*/}
      [[ -e $m ]] || continue
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
      if rm -f "$m" 2>/dev/null; then removed_ns=$((removed_ns + 1)); else busy+=("$m"); fi
    done
    ((${#busy[@]})) && [[ -z $foreign ]] && lift_netns_bind || break
  done
  # Leave /var/run/netns as a fresh machine has it (absent) when nothing is
  # left in it; containerd and ip(8) make it again on demand.
  if [[ -z $foreign && -d /run/netns ]] && ! compgen -G '/run/netns/*' >/dev/null; then
    lift_netns_bind || true
    rmdir /run/netns 2>/dev/null || true
  fi
  # 7. The bridge, IPAM state and iptables chains of our CNI config.
  local br net extra=""
  for br in $(bridge_names); do
    if ip link show "$br" >/dev/null 2>&1; then
      ip link delete "$br" && extra+=", bridge $br"
    fi
  done
  if [[ -z $foreign ]]; then
    for net in $(network_names); do
      if [[ -n $net && -d /var/lib/cni/networks/$net ]]; then
        rm -rf "/var/lib/cni/networks/${net:?}" && extra+=", ipam $net"
      fi
    done
    local others
    others=$(other_rules)
    remove_cni_iptables
    [[ -z $(cni_chains_left) ]] || die "iptables chains left: $(cni_chains_left)"
    [[ $(other_rules) == "$others" ]] || die "removing the CNI chains changed other iptables rules"
    # containerd 1.6 hard-codes /run/containerd/{s,fifo,runc} for shim
    # sockets, client fifos and default runc state: drop them once empty.
    if [[ -d /run/containerd ]]; then
      find /run/containerd -depth -type d -empty -delete 2>/dev/null || true
    fi
    # The per-namespace parent cgroups containerd made (pods without a
    # cgroup_parent go to /k8s.io/<id>); rmdir only removes empty ones.
    local cg
    for cg in /sys/fs/cgroup/*/k8s.io /sys/fs/cgroup/*/"$CHECK_NS"; do
      if [[ -d $cg ]]; then find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
    done
  else
    extra+=", kept cni-* netns/iptables of another containerd"
  fi
  rm -f "$CD_PIDFILE" "$REG_PIDFILE" "$AREG_PIDFILE" "$SOCK" "$SOCK.ttrpc" "$ENV_FILE"

  # Verify.
  local left=()
  mapfile -t -O 0 left < <(containerd_pids; shim_pids; registry_pids; auth_registry_pids)
  ((${#left[@]} == 0)) || die "processes left: ${left[*]}"
  [[ -n $cp_down ]] || die "integration/control-plane.sh down failed (its line above says why)"
  [[ -z $(mounts_under "$RUN") ]] || die "mounts left under $RUN: $(mounts_under "$RUN" | tr '\n' ' ')"
  for m in "${netns[@]}"; do
    [[ ! -e /var/run/netns/${m##*/} ]] || die "netns left: $m"
  done
  say "down: stopped containerd(${#cd_pids[@]}) shims(${#shims[@]}) registries(${#reg_pids[@]}), $killed_tasks containers, $mnts unmounts, $removed_ns netns$extra; nothing left under $RUN"
}

cmd_status() {
  STEP=status
  local pids rc=0
  mapfile -t pids < <(registry_pids)
  if ((${#pids[@]})) && registry_answers; then
    echo "registry: up (pid ${pids[0]}, http://$REGISTRY_ADDR)"
  else
    echo "registry: down"
    rc=3
  fi
  mapfile -t pids < <(auth_registry_pids)
  if ((${#pids[@]})) && auth_registry_answers; then
    echo "auth-registry: up (pid ${pids[0]}, http://$AUTH_REGISTRY_ADDR, login $AUTH_USER)"
  else
    echo "auth-registry: down"
    rc=3
  fi
  mapfile -t pids < <(containerd_pids)
  if ((${#pids[@]})) && containerd_answers; then
    echo "containerd: up (pid ${pids[0]}, unix://$SOCK, snapshotter $(snapshotter))"
  else
    echo "containerd: down"
    rc=3
  fi
  return "$rc"
}

cmd_env() {
  STEP="env"
  [[ -f $ENV_FILE ]] || die "no $ENV_FILE: run integration/stack.sh up first"
  echo "$ENV_FILE"
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status || exit $? ;;
  env) cmd_env ;;
  *)
    echo "usage: $0 up|down|status|env   (run dir: $RUN)" >&2
    exit 2
    ;;
esac
