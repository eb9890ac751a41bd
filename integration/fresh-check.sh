#!/usr/bin/env bash
# integration/fresh-check.sh: a first run on a clean machine, on this one.
# test.sh (and so CI) runs it before anything else. In new mount, PID and
# network namespaces, the host paths the scripts touch are made ABSENT
# (nothing an earlier run left there is visible), with a run dir of its own:
#
#   /run/netns (= /var/run/netns), /run/containerd, /var/lib/cni, /etc/cni,
#   /opt/cni
#
# and then it runs what a first `integration/test.sh` runs before the Rust
# steps: `stack.sh down` (test.sh's EXIT trap, when `up` failed early),
# test.sh's netns count, `stack.sh up` (registry, images built from
# scratch, containerd, smoke container), the count again, and `stack.sh
# down` with a netns left hidden under `ip netns`'s bind of /run/netns and
# a Docker engine's containerd beside the stack.
# Any of them failing fails this check loudly, with one line naming it.
# The PID namespace hides every other containerd (so `down` sweeps as on
# a machine of its own) and the network namespace keeps the sweep, the
# registry's port and the iptables rules away from the host's.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"
# shellcheck source=integration/lib.sh
. integration/lib.sh
fail_report fresh-check

HIDE=(/run/netns /run/containerd /var/lib/cni /etc/cni /opt/cni)

if [[ ${1:-} != --inside ]]; then
  step root
  ((EUID == 0)) || die "must run as root (namespaces, mounts)"
  step unshare
  t0=$SECONDS
  unshare --mount --propagation private --pid --fork --mount-proc --net \
    "$REPO/integration/fresh-check.sh" --inside || exit $? # it said why
  echo "fresh-check: ok: a first run gets through stack up and down with ${HIDE[*]} absent ($((SECONDS - t0)) s)" >&2
  exit 0
fi

RUN_DIR=$(mktemp -d /tmp/minilet-fresh.XXXXXX)
export MINILET_STACK_DIR=$RUN_DIR
log=$RUN_DIR.log
SAVED=() # hide()'s binds of the original parents, while it works
# On the way out, whatever happened: nothing of ours stays (the PID
# namespace's end kills any process left; the mounts go with the mount
# namespace; this takes the run dir and hide()'s mount points). A saved
# parent is unmounted and only rmdir'ed, never removed recursively.
finish() {
  local rc=$? s
  for s in "${SAVED[@]}"; do
    umount -l "$s" 2>/dev/null || true
    rmdir "$s" 2>/dev/null || true
  done
  ((rc == 0)) || integration/stack.sh down >>"$log" 2>&1 || true
  rm -rf --one-file-system "$RUN_DIR"
  ((rc != 0)) || rm -f "$log"
  exit "$rc"
}
trap finish EXIT

# hide PATH: make PATH absent in this mount namespace. A tmpfs goes over
# its parent and every other entry of the parent is bound back, so only
# PATH is gone.
hide() {
  local path=$1 parent entry name saved
  [[ -e $path || -L $path ]] || return 0
  parent=$(dirname "$path")
  saved=$(mktemp -d /tmp/minilet-fresh-parent.XXXXXX)
  SAVED+=("$saved")
  mount --rbind "$parent" "$saved"
  mount -t tmpfs -o mode=0755 fresh "$parent"
  for entry in "$saved"/* "$saved"/.[!.]*; do
    [[ -e $entry || -L $entry ]] || continue
    name=${entry##*/}
    [[ $parent/$name == "$path" ]] && continue
    if [[ -L $entry ]]; then
      cp -P "$entry" "$parent/$name"
    elif [[ -d $entry ]]; then
      # mount(8) itself may have made some (/run/mount for its utab).
      mkdir -p "$parent/$name"
      mount --rbind "$entry" "$parent/$name"
    else
      [[ -e $parent/$name ]] || touch "$parent/$name"
      mount --bind "$entry" "$parent/$name"
    fi
  done
  umount -l "$saved"
  rmdir "$saved"
  SAVED=("${SAVED[@]/"$saved"/}")
}

# absent_all: every hidden path is still absent, or names the first that is not.
absent_all() {
  local p
  for p in "${HIDE[@]}"; do
    [[ -e $p ]] && { echo "$p"; return; }
  done
  return 0
}

step "hide host paths"
for p in "${HIDE[@]}"; do hide "$p"; done
left=$(absent_all)
[[ -z $left ]] || die "$left is still visible after hiding it"
[[ ! -e /var/run/netns ]] || die "/var/run/netns is still visible"
ip link set lo up

# Quiet on success: each step's output goes to the log, shown on failure.
quiet() {
  if ! "$@" >>"$log" 2>&1; then
    tail -n 5 "$log" >&2
    die "$* failed (log $log)"
  fi
}

step "down before any up";  quiet integration/stack.sh down
step "netns count (fresh)"; n=$(netns_count)
[[ $n == 0 ]] || die "netns count on a fresh machine is $n, not 0"
step "stack up";            quiet integration/stack.sh up
step "stack status";        quiet integration/stack.sh status
step "netns count (up)";    n=$(netns_count)
[[ $n == 0 ]] || die "netns count with the stack up and no pods is $n, not 0"
# A runtime netns made before `ip netns` bound /run/netns over itself is
# hidden below that bind (rm: EBUSY); down must still remove it.
step "netns under ip's bind"
# `up` made /run/netns ip's shared bind of itself (here on this namespace's
# own tmpfs /run), so no later bind hides the stack's netns. Lift it to get
# the order a machine can still have (a netns first, ip's bind after).
umount /run/netns
mkdir -p /run/netns
touch /run/netns/cni-fresh-check
mount --bind /proc/self/ns/net /run/netns/cni-fresh-check
ip netns add minilet-fresh-check
ip netns delete minilet-fresh-check
# And a Docker engine's containerd beside us (its config disables CRI):
# it runs no CNI, so down must sweep all the same.
step "docker's containerd"
mkdir -p "$RUN_DIR/docker"
printf 'version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n' >"$RUN_DIR/docker/containerd.toml"
printf '#!/bin/sh\nsleep 600\n' >"$RUN_DIR/docker/containerd"
chmod +x "$RUN_DIR/docker/containerd"
"$RUN_DIR/docker/containerd" --config "$RUN_DIR/docker/containerd.toml" &
step "stack down";          quiet integration/stack.sh down
[[ ! -e /run/netns/cni-fresh-check ]] || die "down left /run/netns/cni-fresh-check (under ip's bind)"
! grep -q cni-fresh-check /proc/self/mountinfo || die "down left the cni-fresh-check netns mounted"
[[ ! -e /run/netns ]] || die "down left /run/netns behind: the next run would not be a first run"
step "nothing left"
status=$(integration/stack.sh status 2>&1 || true)
[[ $status != *": up"* ]] || die "still up after down: ${status//$'\n'/; }"
