#!/usr/bin/env bash
# integration/image.sh: minilet's container image, made on this machine
# with no registry: nothing is pulled, the base comes from Debian's packages.
#
#   base    debootstrap Debian 12 (bookworm, minbase) with what the agent
#           needs at run time, `docker import` it as minilet-base:bookworm-<hash>
#           (<hash> = the recipe's hash, also in the label
#           io.minilet.base.recipe) and tag it minilet-base:bookworm. Reused
#           when an image of the same recipe exists. Prints the image name.
#   build   base, then the shipped binary (integration/build-release.sh), then
#           `docker build` of the Dockerfile FROM that base. Prints the image
#           name (MINILET_IMAGE, default minilet:dev).
#   node-base
#           the same for the kind-style cluster's node base
#           (minilet-node-base:bookworm-<hash>): minbase + containerd, runc,
#           the CNI plugins, iptables, iproute2, procps. Prints the image name.
#           integration/cluster.sh builds the node image FROM it.
#
# MINILET_DEBIAN_MIRROR (default: the Debian archive this host's apt uses,
# read from /etc/apt/sources.list{,.d/}) is where debootstrap fetches packages; MINILET_BASE_REBUILD=1 rebuilds the base even
# when it is cached (e.g. to pick up security updates). The rootfs is built
# under /var/cache/minilet/image (the .deb cache stays there, so a rebuild
# downloads nothing it already has), never in the checkout.
#
# Any failure prints ONE line "image: FAILED (<step>): ..." and exits non-zero.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
CACHE=/var/cache/minilet/image
SUITE=bookworm
# The archive apt already uses here (deb822 "URIs:" or one-line "deb URI"
# entries), so the base comes from the same place as the host's packages.
apt_mirror() {
  local f m
  for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    m=$(awk '
      /^Types:/ { deb = ($0 ~ /(^|[[:space:]])deb([[:space:]]|$)/) }
      /^URIs:/ && deb && $2 ~ /\/debian\/?$/ { print $2; exit }
      /^deb[[:space:]]/ { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i ~ /\/debian\/?$/) { print $i; exit } }
    ' "$f")
    if [[ -n $m ]]; then
      echo "$m"
      return 0
    fi
  done
  return 0
}
MIRROR=${MINILET_DEBIAN_MIRROR:-$(apt_mirror)}
BASE_REPO=minilet-base
NODE_BASE_REPO=minilet-node-base
IMAGE=${MINILET_IMAGE:-minilet:dev}
RECIPE_LABEL=io.minilet.base.recipe
# What the agent execs at run time, beside itself: the CNI plugins its
# chains name (bridge, host-local, portmap, firewall, ...: Debian's
# containernetworking-plugins, in /usr/lib/cni) and iptables, which portmap,
# firewall and bridge's ipMasq call. It dials only unix sockets and the
# runtime pulls images on the host, so no ca-certificates.
PACKAGES=(iptables containernetworking-plugins)
# A cluster node runs its own runtime: containerd and runc beside the agent,
# iproute2 for the routes to the other nodes' pod CIDRs, procps for ps/pkill
# in its entrypoint and for a user's `docker exec`.
NODE_PACKAGES=(containerd runc containernetworking-plugins iptables iproute2 procps)

# shellcheck source=integration/lib.sh
. "$REPO/integration/lib.sh"
# Any failure: one line "image: FAILED (<step>): ..." on stderr.
fail_report image
BASE_IMG=
exec 3>&2
say() { printf 'image: %s\n' "$*" >&3; }

# debootstrap is not on a fresh machine: install it (and nothing else).
ensure_debootstrap() {
  STEP="apt debootstrap"
  command -v debootstrap >/dev/null && return
  say "apt: installing debootstrap"
  mkdir -p "$CACHE"
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
  } >>"$CACHE/apt.log" 2>&1 || die "apt-get failed installing debootstrap (see $CACHE/apt.log)"
  command -v debootstrap >/dev/null || die "debootstrap not found after installing it"
}

# Turns the debootstrapped tree into the base's filesystem: no package lists,
# caches, docs or logs (the image never runs apt), no machine identity.
trim_rootfs() {
  local r=$1
  chroot "$r" apt-get clean
  rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/* "$r"/var/cache/debconf/*-old \
    "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/usr/share/locale/* \
    "$r"/var/log/* "$r"/tmp/* "$r"/root/.bash_history
  : >"$r/etc/machine-id"
  # The image reads the host's resolver and hostname at run time.
  rm -f "$r/etc/resolv.conf" "$r/etc/hostname"
}

# The cache key: everything that decides what goes into the base.
recipe_hash() {
  {
    declare -f trim_rootfs
    echo "$SUITE minbase $MIRROR ${PACKAGES[*]} $(uname -m)"
    # The agent's base keeps the hash it always had; others add their repo.
    [[ $BASE_REPO == minilet-base ]] || echo "$BASE_REPO"
  } | sha256sum | cut -c1-16
}

base_image() { echo "$BASE_REPO:$SUITE-$(recipe_hash)"; }

# Unmount whatever debootstrap left mounted under the rootfs (it mounts
# /proc and /sys there while it configures packages).
umount_under() {
  local root=$1 m
  awk -v root="$root" '{ if ($5 == root || index($5, root "/") == 1) print length($5) "\t" $5 }' \
    /proc/self/mountinfo | sort -rn | cut -f2- | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
}

cmd_base() {
  STEP="base: docker"
  docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"
  local img hash
  img=$(base_image)
  hash=$(recipe_hash)
  if [[ -z ${MINILET_BASE_REBUILD:-} ]] &&
    [[ $(docker image inspect -f "{{ index .Config.Labels \"$RECIPE_LABEL\" }}" "$img" 2>/dev/null) == "$hash" ]]; then
    docker tag "$img" "$BASE_REPO:$SUITE"
    say "base: $img already built (recipe $hash, cached)"
    BASE_IMG=$img
    return
  fi
  ensure_debootstrap
  STEP="base: debootstrap, log $CACHE/debootstrap.log"
  local rootfs=$CACHE/rootfs-$BASE_REPO
  mkdir -p "$CACHE/debs"
  umount_under "$rootfs"
  rm -rf "$rootfs"
  local t0=$SECONDS include
  include=$(
    IFS=,
    echo "${PACKAGES[*]}"
  )
  [[ -n $MIRROR ]] || die "no Debian archive in apt's sources to debootstrap from: set MINILET_DEBIAN_MIRROR"
  say "base: debootstrap $SUITE (minbase + ${PACKAGES[*]}) from $MIRROR"
  # In a private mount namespace: the /proc and /sys it mounts in the rootfs
  # go away with it, even when it fails half-way.
  unshare --mount --propagation private \
    debootstrap --variant=minbase --include="$include" --cache-dir="$CACHE/debs" \
    "$SUITE" "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1
  STEP="base: trim rootfs"
  umount_under "$rootfs"
  trim_rootfs "$rootfs"
  STEP="base: docker import"
  tar --numeric-owner --xattrs -C "$rootfs" -c . |
    docker import \
      --change "LABEL $RECIPE_LABEL=$hash" \
      --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase + ${PACKAGES[*]}, made by minilet integration/image.sh\"" \
      --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
      --change 'CMD ["/bin/bash"]' \
      - "$img" >/dev/null
  docker tag "$img" "$BASE_REPO:$SUITE"
  rm -rf "$rootfs"
  # Bases of older recipes (untagged now), unless an image builds on them.
  # Images built FROM a base inherit its label: hence dangling only.
  local old
  for old in $(docker image ls -q --filter "label=$RECIPE_LABEL" --filter dangling=true); do
    docker rmi "$old" >/dev/null 2>&1 || true
  done
  STEP="base: check"
  local out
  out=$(docker run --rm --network none "$img" sh -c 'test -x /usr/lib/cni/bridge && iptables -V') ||
    die "the base image does not run: $out"
  say "base: $img built in $((SECONDS - t0)) s ($out, $(docker image inspect -f '{{ .Size }}' "$img" | numfmt --to=iec))"
  BASE_IMG=$img
}

cmd_build() {
  local bin
  cmd_base
  STEP="build: release binary"
  bin=$(integration/build-release.sh)
  # The Dockerfile copies target/minilet; with CARGO_TARGET_DIR elsewhere the
  # binary is put there, so the build context is always the repo (and
  # .dockerignore keeps it to that binary and config/).
  if [[ $bin != "$REPO/target/minilet" ]]; then
    mkdir -p "$REPO/target"
    cp -f "$bin" "$REPO/target/minilet"
  fi
  STEP="build: docker build"
  local out
  out=$(DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=$BASE_IMG" -t "$IMAGE" "$REPO" 2>&1) ||
    die "docker build failed: $(tail -n3 <<<"$out" | tr '\n' ' ')"
  # The image this tag had before, if nothing else uses it.
  docker image prune -f --filter label=io.minilet.image=agent >/dev/null
  say "build: $IMAGE from $BASE_IMG ($(docker image inspect -f '{{ .Size }}' "$IMAGE" | numfmt --to=iec))"
}

cd "$REPO"
case ${1:-} in
  base)
    cmd_base
    echo "$BASE_IMG"
    ;;
  build)
    cmd_build
    echo "$IMAGE"
    ;;
  node-base)
    BASE_REPO=$NODE_BASE_REPO
    PACKAGES=("${NODE_PACKAGES[@]}")
    cmd_base
    echo "$BASE_IMG"
    ;;
  *)
    echo "usage: $0 base|build|node-base" >&2
    exit 2
    ;;
esac
