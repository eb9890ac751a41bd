#!/usr/bin/env bash
# integration/control-plane.sh: a real Kubernetes control plane (etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler) on loopback, for
# the tests of minilet's API server mode. Everything it runs lives under
# ONE run dir, ${MINILET_STACK_DIR:-<repo>/integration/.run}/cp (or
# $MINILET_CP_DIR, as a sourced RUN/cp/env sets it).
#
#   build   build kube-apiserver, kube-scheduler, kube-controller-manager,
#           kubectl and kubelet from Debian's own `kubernetes` source package,
#           once per machine, into a cache OUTSIDE the checkout,
#           /var/cache/minilet/kubernetes/<version>/bin (MINILET_CP_CACHE
#           overrides the parent). The cache is written atomically (built in
#           a temp dir, then renamed), so a killed build leaves none.
#   up      build if needed, make a CA and certs, start etcd on
#           127.0.0.1:12379, kube-apiserver on 127.0.0.1:6443, the
#           controller manager and the scheduler, wait until all answer,
#           write RUN/cp/env. Idempotent.
#   down    stop every component (TERM, then KILL) and remove the run dir:
#           etcd data, certs, logs. The binary cache stays. Idempotent, also
#           when nothing was ever up.
#   status  one line per component; exit 0 only when all are up.
#   env     print the path of RUN/cp/env (after `up`).
#   node-kubeconfig NODE OUT
#           write a kubeconfig (0600, self-contained) for the identity of the
#           kubelet of node NODE: a client cert CN=system:node:NODE,
#           O=system:nodes signed by the CA.
#   bootstrap-kubeconfig OUT [ID.SECRET]
#           write a kubeconfig (0600) holding a bootstrap token for a node's
#           TLS bootstrap (--bootstrap-kubeconfig): the token (random, or the
#           one given) as a bootstrap-token Secret in kube-system, valid 24 h,
#           in kubeadm's group system:bootstrappers:kubeadm:default-node-token,
#           and, once, kubeadm's RBAC: that group may create CSRs and has
#           them approved (nodeclient), nodes have their renewals approved
#           (selfnodeclient). The controller manager signs them with the CA.
#   stop NAME / start NAME
#           one component alone (etcd, kube-apiserver, ...), for the tests
#           of an API server that goes away and comes back.
#
# Any failure prints ONE line "control-plane: FAILED (<step>): ..." and exits
# non-zero, with the tail of the failing component's log before it.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
# shellcheck source=integration/lib.sh
. "$REPO/integration/lib.sh"
fail_report control-plane

# MINILET_CP_DIR (from a sourced RUN/cp/env) names the run dir itself.
STACK_RUN=$(realpath -m "${MINILET_STACK_DIR:-$REPO/integration/.run}")
RUN=$(realpath -m "${MINILET_CP_DIR:-$STACK_RUN/cp}")

# The Kubernetes version we build, and the Debian source package it is in.
KUBE_VERSION=1.20.2
CACHE_ROOT=$(realpath -m "${MINILET_CP_CACHE:-/var/cache/minilet/kubernetes}")
BIN=$CACHE_ROOT/$KUBE_VERSION/bin
COMPONENTS=(kube-apiserver kube-scheduler kube-controller-manager kubectl kubelet)
BUILD_PACKAGES=(golang-go rsync make dpkg-dev golang-github-modern-go-reflect2-dev)
RUN_PACKAGES=(etcd-server openssl curl)
SRC_LIST=/etc/apt/sources.list.d/minilet-deb-src.sources

# Loopback only by default. etcd off its default ports: a system etcd may
# hold them. A second control plane (integration/cluster.sh's) runs beside
# the tests' one with MINILET_CP_ADDRESS, the address kube-apiserver binds
# and advertises (its Docker network's gateway, which node containers
# reach), and MINILET_CP_PORT_OFFSET, added to every port. `up` records
# both in RUN/settings, so later commands on that run dir use them too.
if [[ -z ${MINILET_CP_ADDRESS:-}${MINILET_CP_PORT_OFFSET:-} && -f $RUN/settings ]]; then
  # shellcheck source=/dev/null
  . "$RUN/settings"
fi
CP_ADDRESS=${MINILET_CP_ADDRESS:-127.0.0.1}
PORT_OFFSET=${MINILET_CP_PORT_OFFSET:-0}
[[ $CP_ADDRESS =~ ^[0-9]+(\.[0-9]+){3}$ ]] || die "MINILET_CP_ADDRESS is not an IPv4 address: $CP_ADDRESS"
[[ $PORT_OFFSET =~ ^[0-9]{1,4}$ ]] || die "MINILET_CP_PORT_OFFSET is not a number below 10000: $PORT_OFFSET"
ETCD_CLIENT=127.0.0.1:$((12379 + PORT_OFFSET))
ETCD_PEER=127.0.0.1:$((12380 + PORT_OFFSET))
API_PORT=$((6443 + PORT_OFFSET))
SERVER=https://$CP_ADDRESS:$API_PORT
KCM_PORT=$((10257 + PORT_OFFSET))
SCHED_PORT=$((10259 + PORT_OFFSET))
SERVICE_CIDR=10.96.0.0/16
CLUSTER_CIDR=10.244.0.0/16
SA_ISSUER=https://kubernetes.default.svc.cluster.local

PKI=$RUN/pki
CA_CRT=$PKI/ca.crt
CA_KEY=$PKI/ca.key
ADMIN_KUBECONFIG=$RUN/admin.kubeconfig
AUDIT_LOG=$RUN/audit.log
AUDIT_POLICY=$RUN/audit-policy.yaml
ENV_FILE=$RUN/env
# The components in start order; each has RUN/<name>.log and RUN/<name>.pid.
SERVICES=(etcd kube-apiserver kube-controller-manager kube-scheduler)

# fd 3 = the caller's stderr, so our one-line messages reach the user even
# from inside a step whose output goes to a log file.
exec 3>&2
say() { printf 'control-plane: %s\n' "$*" >&3; }


apt_() {
  DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 "$@"
}

# ensure_packages LOG PKG...: install the packages that are missing. The
# packages' own services (a system etcd on :2379) are kept from starting.
ensure_packages() {
  local log=$1 missing=() pkg st
  shift
  for pkg in "$@"; do
    st=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ $st == "install ok installed" ]] || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  say "apt: installing ${missing[*]}"
  local policy=/usr/sbin/policy-rc.d made_policy="" rc=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
  fi
  { apt_ update && apt_ install -y "${missing[@]}"; } >>"$log" 2>&1 || rc=$?
  [[ -n $made_policy ]] && rm -f "$policy"
  ((rc == 0)) || die "apt-get failed installing ${missing[*]} (see $log)"
}

# deb_src_entries: a deb-src stanza for every deb entry apt already uses
# (deb822 .sources files and one-line sources.list files), so
# `apt-get source` fetches from the same archive and suites.
deb_src_entries() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -e $f && $f != "$SRC_LIST" ]] || continue
    # Enabled stanzas whose Types include "deb", with Types set to deb-src.
    awk 'BEGIN { RS = ""; FS = "\n" }
      {
        deb = 0; off = 0; out = ""
        for (i = 1; i <= NF; i++) {
          line = $i
          if (line ~ /^#/) continue
          if (line ~ /^Types:/) { if (line ~ /[ \t]deb([ \t]|$)/) deb = 1; line = "Types: deb-src" }
          if (line ~ /^Enabled:[ \t]*no/) off = 1
          out = out line "\n"
        }
        if (deb && !off) printf "%s\n", out
      }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -e $f ]] || continue
    sed -n 's/^[[:space:]]*deb\([[:space:]]\)/deb-src\1/p' "$f"
  done
}

ensure_deb_src() {
  if apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Version:'; then return 0; fi
  local entries
  entries=$(deb_src_entries)
  [[ -n $entries ]] || die "no deb entry in /etc/apt/sources.list{,.d} to add a deb-src for"
  if grep -q '^deb-src' <<<"$entries"; then
    # One-line format: keep it a .list file.
    SRC_LIST=${SRC_LIST%.sources}.list
  fi
  printf '%s\n' "$entries" >"$SRC_LIST"
  apt_ update >>"$1" 2>&1 || die "apt-get update failed after adding $SRC_LIST (see $1)"
  apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Version:' ||
    die "no kubernetes source package in the archive apt uses (see $SRC_LIST)"
}

have_bins() {
  local c
  for c in "${COMPONENTS[@]}"; do [[ -x $BIN/$c ]] || return 1; done
}

# build_kubernetes: the binaries into $BIN, unless they are already there.
# One build at a time per machine (flock); the loser of a race finds the
# cache made and returns.
build_kubernetes() {
  have_bins && return 0
  step build
  mkdir -p "$CACHE_ROOT"
  exec 9>"$CACHE_ROOT/.build.lock"
  flock 9
  if have_bins; then exec 9>&-; return 0; fi
  local log=$CACHE_ROOT/build-$KUBE_VERSION.log
  : >"$log"
  step "build: packages"
  ensure_packages "$log" "${BUILD_PACKAGES[@]}"
  step "build: deb-src"
  ensure_deb_src "$log"
  local ver
  ver=$(apt-cache showsrc kubernetes | sed -n 's/^Version: //p' | sort -V | tail -1)
  [[ ${ver%%-*} == *"$KUBE_VERSION"* ]] ||
    die "the archive's kubernetes source is $ver, not $KUBE_VERSION"
  step "build: source"
  # Leftovers of a killed build: ours to remove (we hold the lock).
  rm -rf "$CACHE_ROOT"/.tmp-*
  local tmp
  tmp=$(mktemp -d "$CACHE_ROOT/.tmp-$KUBE_VERSION.XXXXXX")
  say "building Kubernetes $KUBE_VERSION (Debian source $ver) in $tmp, log $log; this takes a while"
  local started=$SECONDS
  (cd "$tmp" && apt-get source --download-only "kubernetes=$ver") >>"$log" 2>&1 ||
    die "apt-get source kubernetes=$ver failed (see $log)"
  local dsc
  dsc=$(echo "$tmp"/kubernetes_*.dsc)
  [[ -f $dsc ]] || die "no .dsc downloaded in $tmp"
  dpkg-source -x "$dsc" "$tmp/src" >>"$log" 2>&1 || die "dpkg-source -x failed (see $log)"
  # The vendored reflect2 1.0.1 crashes under Go >= 1.18 when encoding maps;
  # Debian's packaged 1.0.2 does not.
  local r2=$tmp/src/vendor/github.com/modern-go/reflect2
  local deb_r2=/usr/share/gocode/src/github.com/modern-go/reflect2
  [[ -d $r2 && -d $deb_r2 ]] || die "reflect2 missing: $r2 or $deb_r2"
  rm -rf "$r2" && cp -rL "$deb_r2" "$r2"
  step "build: make"
  mkdir -p "$tmp/home"
  (cd "$tmp/src" && HOME=$tmp/home GOPATH="" GOPROXY=off GOFLAGS="" CGO_ENABLED=0 \
    GOCACHE=$tmp/home/go-cache make WHAT="${COMPONENTS[*]/#/cmd/}") >>"$log" 2>&1 ||
    die "make failed (see the tail of $log)"
  step "build: install"
  mkdir -p "$tmp/bin"
  local c out=$tmp/src/_output/local/bin/linux/amd64
  [[ -d $out ]] || out=$tmp/src/_output/bin
  for c in "${COMPONENTS[@]}"; do
    [[ -x $out/$c ]] || die "make left no $c in $out"
    cp "$out/$c" "$tmp/bin/$c"
  done
  "$tmp/bin/kube-apiserver" --version >>"$log" 2>&1 || die "the built kube-apiserver does not run"
  mkdir -p "$CACHE_ROOT/$KUBE_VERSION"
  rm -rf "$BIN"
  mv -T "$tmp/bin" "$BIN"
  rm -rf "$tmp"
  exec 9>&-
  say "built Kubernetes $KUBE_VERSION into $BIN in $((SECONDS - started)) s"
}

cmd_build() {
  build_kubernetes
  say "binaries: $BIN"
}


# --- certificates ----------------------------------------------------------

# issue NAME SUBJECT EXT: RUN/pki/NAME.{key,crt}, an ECDSA P-256 key and a
# cert for SUBJECT signed by the CA, with the extensions in EXT (openssl
# config lines). Kept when they exist already and the CA signed them.
issue() {
  local name=$1 subj=$2 ext=$3
  if [[ -s $PKI/$name.key ]] && openssl verify -CAfile "$CA_CRT" "$PKI/$name.crt" >/dev/null 2>&1; then
    return 0
  fi
  (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/$name.key.new")
  openssl req -new -key "$PKI/$name.key.new" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  printf '%s\n' "$ext" >"$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$CA_CRT" -CAkey "$CA_KEY" -CAcreateserial \
    -days 3650 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt.new" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
  mv -f "$PKI/$name.key.new" "$PKI/$name.key"
  mv -f "$PKI/$name.crt.new" "$PKI/$name.crt"
}

CLIENT_EXT='basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth'

make_pki() {
  step certificates
  local EXTRA_SAN=""
  [[ $CP_ADDRESS == 127.0.0.1 ]] || EXTRA_SAN="IP:$CP_ADDRESS,"
  mkdir -p "$PKI"
  chmod 700 "$PKI"
  if [[ ! -s $CA_CRT || ! -s $CA_KEY ]]; then
    rm -f "$PKI"/*
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$CA_KEY")
    openssl req -x509 -new -key "$CA_KEY" -sha256 -days 3650 -subj "/CN=minilet-cp-ca" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
      -addext "subjectKeyIdentifier=hash" -out "$CA_CRT" 2>/dev/null
  fi
  issue apiserver "/CN=kube-apiserver" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=${EXTRA_SAN}IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  issue admin "/O=system:masters/CN=kubernetes-admin" "$CLIENT_EXT"
  issue apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$CLIENT_EXT"
  issue controller-manager "/CN=system:kube-controller-manager" "$CLIENT_EXT"
  issue scheduler "/CN=system:kube-scheduler" "$CLIENT_EXT"
  # Service account tokens: RSA, what every client expects.
  if [[ ! -s $PKI/sa.key || ! -s $PKI/sa.pub ]]; then
    (umask 077 && openssl genrsa -out "$PKI/sa.key.new" 2048 2>/dev/null)
    openssl rsa -in "$PKI/sa.key.new" -pubout -out "$PKI/sa.pub" 2>/dev/null
    mv -f "$PKI/sa.key.new" "$PKI/sa.key"
  fi
}

# kubeconfig OUT USER CRT KEY: a self-contained kubeconfig (CA, cert and key
# embedded), mode 0600.
kubeconfig() {
  kubeconfig_for "$1" "$2" "    client-certificate-data: $(base64 -w0 "$3")
    client-key-data: $(base64 -w0 "$4")"
}

# kubeconfig_for OUT USER CREDENTIALS: a kubeconfig for the control plane
# with the CA embedded and CREDENTIALS (the lines under `user:`), 0600.
kubeconfig_for() {
  local out=$1 user=$2 creds=$3
  (
    umask 077
    cat >"$out.new" <<KC
apiVersion: v1
kind: Config
clusters:
- name: minilet-cp
  cluster:
    server: $SERVER
    certificate-authority-data: $(base64 -w0 "$CA_CRT")
users:
- name: $user
  user:
$creds
contexts:
- name: $user@minilet-cp
  context:
    cluster: minilet-cp
    user: $user
current-context: $user@minilet-cp
KC
  )
  chmod 600 "$out.new"
  mv -f "$out.new" "$out"
}

write_configs() {
  step "configs"
  kubeconfig "$ADMIN_KUBECONFIG" kubernetes-admin "$PKI/admin.crt" "$PKI/admin.key"
  kubeconfig "$RUN/controller-manager.kubeconfig" system:kube-controller-manager \
    "$PKI/controller-manager.crt" "$PKI/controller-manager.key"
  kubeconfig "$RUN/scheduler.kubeconfig" system:kube-scheduler "$PKI/scheduler.crt" "$PKI/scheduler.key"
  # Every request once, at Metadata level (who, what, which verb): its
  # ResponseComplete event (long-running watches also log ResponseStarted).
  cat >"$AUDIT_POLICY" <<'POLICY'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
POLICY
}

# --- processes -------------------------------------------------------------

# pids_of COMM NEEDLE: pids whose process name is COMM (the kernel keeps 15
# characters of it) and whose command line contains NEEDLE. Matching the
# name too keeps us from ever touching a shell that merely mentions the
# run dir.
pids_of() {
  local want=${1:0:15} needle=$2 dir pid comm cmd
  for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    [[ $pid == "$$" ]] && continue
    { read -r comm <"$dir/comm"; } 2>/dev/null || continue
    [[ $comm == "$want" ]] || continue
    cmd=$(tr '\0' ' ' <"$dir/cmdline" 2>/dev/null) || continue
    [[ $cmd == *"$needle"* ]] && echo "$pid"
  done
  return 0
}
# Each component's command line names a file under RUN/.
service_pids() { pids_of "$1" "$RUN/"; }



# log_tail NAME: the last lines of the component's log, to the caller's
# stderr, before the failure line.
log_tail() {
  local log=$RUN/$1.log
  [[ -s $log ]] || return 0
  printf 'control-plane: last lines of %s:\n' "$log" >&3
  tail -n 15 "$log" | sed 's/^/  | /' >&3
}

# fail_service NAME MESSAGE
fail_service() {
  log_tail "$1"
  die "$2"
}

curl_ok() { curl -fsS -m 3 -o /dev/null "$@" 2>/dev/null; }

# healthy NAME: the component answers its health endpoint.
healthy() {
  case $1 in
  etcd) curl_ok "http://$ETCD_CLIENT/health" ;;
  kube-apiserver)
    curl_ok --cacert "$CA_CRT" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "$SERVER/readyz"
    ;;
  kube-controller-manager) curl_ok -k "https://127.0.0.1:$KCM_PORT/healthz" ;;
  kube-scheduler) curl_ok -k "https://127.0.0.1:$SCHED_PORT/healthz" ;;
  esac
}

# service_args NAME: the command line arguments of NAME, into ARGS.
service_args() {
  ARGS=()
  case $1 in
  etcd)
    ARGS+=(--name=minilet-cp --data-dir="$RUN/etcd")
    ARGS+=(--listen-client-urls="http://$ETCD_CLIENT" --advertise-client-urls="http://$ETCD_CLIENT")
    ARGS+=(--listen-peer-urls="http://$ETCD_PEER" --initial-advertise-peer-urls="http://$ETCD_PEER")
    ARGS+=(--initial-cluster="minilet-cp=http://$ETCD_PEER" --initial-cluster-state=new)
    ARGS+=(--log-outputs=stderr)
    ;;
  kube-apiserver)
    ARGS+=(--etcd-servers="http://$ETCD_CLIENT")
    ARGS+=(--bind-address="$CP_ADDRESS" --advertise-address="$CP_ADDRESS" --secure-port="$API_PORT")
    ARGS+=(--insecure-port=0 --cert-dir="$RUN/apiserver-certs")
    ARGS+=(--tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key")
    ARGS+=(--client-ca-file="$CA_CRT")
    ARGS+=("--authorization-mode=Node,RBAC" --enable-admission-plugins=NodeRestriction)
    ARGS+=(--enable-bootstrap-token-auth=true)
    ARGS+=(--service-account-issuer="$SA_ISSUER")
    ARGS+=(--service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key")
    ARGS+=(--service-cluster-ip-range="$SERVICE_CIDR" --endpoint-reconciler-type=none)
    ARGS+=(--kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt")
    ARGS+=(--kubelet-client-key="$PKI/apiserver-kubelet-client.key")
    ARGS+=("--kubelet-preferred-address-types=InternalIP,Hostname")
    ARGS+=(--audit-log-path="$AUDIT_LOG" --audit-policy-file="$AUDIT_POLICY")
    ARGS+=(--allow-privileged=true --profiling=false)
    ;;
  kube-controller-manager)
    ARGS+=(--kubeconfig="$RUN/controller-manager.kubeconfig")
    ARGS+=(--authentication-kubeconfig="$RUN/controller-manager.kubeconfig")
    ARGS+=(--authorization-kubeconfig="$RUN/controller-manager.kubeconfig")
    ARGS+=(--bind-address=127.0.0.1 --secure-port="$KCM_PORT" --port=0 --cert-dir="$RUN/kcm-certs")
    ARGS+=(--leader-elect=false)
    ARGS+=(--cluster-signing-cert-file="$CA_CRT" --cluster-signing-key-file="$CA_KEY")
    ARGS+=(--allocate-node-cidrs=true --cluster-cidr="$CLUSTER_CIDR" --node-cidr-mask-size=24)
    ARGS+=(--service-cluster-ip-range="$SERVICE_CIDR")
    ARGS+=(--service-account-private-key-file="$PKI/sa.key" --root-ca-file="$CA_CRT")
    ARGS+=(--use-service-account-credentials=true)
    ARGS+=('--controllers=*,bootstrapsigner,tokencleaner')
    ARGS+=(--profiling=false)
    ;;
  kube-scheduler)
    ARGS+=(--kubeconfig="$RUN/scheduler.kubeconfig")
    ARGS+=(--authentication-kubeconfig="$RUN/scheduler.kubeconfig")
    ARGS+=(--authorization-kubeconfig="$RUN/scheduler.kubeconfig")
    ARGS+=(--bind-address=127.0.0.1 --secure-port="$SCHED_PORT" --port=0 --cert-dir="$RUN/scheduler-certs")
    ARGS+=(--leader-elect=false --profiling=false)
    ;;
  esac
}

service_ports() {
  case $1 in
  etcd) echo "${ETCD_CLIENT##*:} ${ETCD_PEER##*:}" ;;
  kube-apiserver) echo "$API_PORT" ;;
  kube-controller-manager) echo "$KCM_PORT" ;;
  kube-scheduler) echo "$SCHED_PORT" ;;
  esac
}

service_bin() {
  case $1 in
  etcd) command -v etcd || echo /usr/bin/etcd ;;
  *) echo "$BIN/$1" ;;
  esac
}

# start_service NAME SECONDS: start it unless it runs and answers already,
# then wait up to SECONDS for its health endpoint.
start_service() {
  local name=$1 grace=$2 pids
  step "start $name"
  mapfile -t pids < <(service_pids "$name")
  if ((${#pids[@]})) && healthy "$name"; then
    say "$name: already up (pid ${pids[0]})"
    return 0
  fi
  # A stray one that does not answer: replace it.
  stop_pids 10 "${pids[@]}"
  # A port someone else holds would make their server answer our health
  # check.
  local port
  for port in $(service_ports "$name"); do
    if ss -Hltn "sport = :$port" | grep -q .; then
      die "port $port for $name is already taken: $(ss -Hltnp "sport = :$port" | head -n1)"
    fi
  done
  local bin
  service_args "$name"
  bin=$(service_bin "$name")
  [[ $name == etcd ]] || ARGS=(--v=1 "${ARGS[@]}")
  mkdir -p "$RUN/apiserver-certs" "$RUN/kcm-certs" "$RUN/scheduler-certs"
  {
    printf '=== %s: %s\n' "$(date -u +%FT%TZ)" "$bin ${ARGS[*]}"
  } >>"$RUN/$name.log"
  # Own session, stdin from /dev/null: it outlives us and our terminal; it
  # must not hold our message fd (3), or `up | tail` would never see EOF.
  setsid "$bin" "${ARGS[@]}" </dev/null >>"$RUN/$name.log" 2>&1 3>&- 9>&- &
  local pid=$!
  echo "$pid" >"$RUN/$name.pid"
  local deadline=$((SECONDS + grace))
  until healthy "$name"; do
    alive "$pid" || fail_service "$name" "$name exited during start (log $RUN/$name.log)"
    ((SECONDS < deadline)) ||
      fail_service "$name" "$name not healthy after ${grace}s (log $RUN/$name.log)"
    sleep 0.3
  done
  say "$name: up (pid $pid)"
}

write_env() {
  step "env file"
  {
    echo "# written by integration/control-plane.sh up; source it"
    printf 'export MINILET_CP_DIR=%q\n' "$RUN"
    printf 'export MINILET_CP_SERVER=%q\n' "$SERVER"
    printf 'export MINILET_CP_CA=%q\n' "$CA_CRT"
    printf 'export MINILET_CP_CA_KEY=%q\n' "$CA_KEY"
    printf 'export MINILET_CP_ADMIN_KUBECONFIG=%q\n' "$ADMIN_KUBECONFIG"
    printf 'export MINILET_CP_BIN=%q\n' "$BIN"
    printf 'export MINILET_CP_AUDIT_LOG=%q\n' "$AUDIT_LOG"
    printf 'export MINILET_CP_VERSION=%q\n' "$KUBE_VERSION"
    printf 'export MINILET_CP_SERVICE_CIDR=%q\n' "$SERVICE_CIDR"
    printf 'export MINILET_CP_CLUSTER_CIDR=%q\n' "$CLUSTER_CIDR"
  } >"$ENV_FILE.new"
  mv -f "$ENV_FILE.new" "$ENV_FILE"
}

cmd_up() {
  step "packages"
  mkdir -p "$RUN"
  printf 'MINILET_CP_ADDRESS=%q\nMINILET_CP_PORT_OFFSET=%q\n' "$CP_ADDRESS" "$PORT_OFFSET" >"$RUN/settings"
  ensure_packages "$RUN/apt.log" "${RUN_PACKAGES[@]}"
  build_kubernetes
  make_pki
  write_configs
  start_service etcd 30
  start_service kube-apiserver 90
  start_service kube-controller-manager 60
  start_service kube-scheduler 60
  wait_default_service_account 60
  write_env
  say "up: $SERVER, env $ENV_FILE"
}

# The ServiceAccount admission refuses every pod of a namespace until the
# controller-manager has made its "default" ServiceAccount: a test that
# creates a pod right after a fresh `up` would fail on that, not on the node.
wait_default_service_account() {
  local grace=$1 deadline
  step "default service account"
  deadline=$((SECONDS + grace))
  until "$BIN/kubectl" --kubeconfig "$ADMIN_KUBECONFIG" -n default get serviceaccount default >/dev/null 2>&1; do
    ((SECONDS < deadline)) ||
      die "no ServiceAccount default/default ${grace}s after kube-controller-manager started (log $RUN/kube-controller-manager.log)"
    sleep 0.5
  done
}

cmd_down() {
  step down
  local name pids left=()
  # Reverse start order: nothing is left without the API server it needs.
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
    name=${SERVICES[i]}
    mapfile -t pids < <(service_pids "$name")
    if [[ -s $RUN/$name.pid ]]; then
      local p
      p=$(<"$RUN/$name.pid")
      [[ -d /proc/$p ]] && [[ $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) == *"$RUN/"* ]] && pids+=("$p")
    fi
    stop_pids 15 "${pids[@]}"
  done
  for name in "${SERVICES[@]}"; do
    mapfile -t pids < <(service_pids "$name")
    ((${#pids[@]} == 0)) || left+=("$name (pid ${pids[*]})")
  done
  ((${#left[@]} == 0)) || die "still running after KILL: ${left[*]}"
  rm -rf "$RUN"
  say "down"
}

cmd_status() {
  step status
  local name pids rc=0
  for name in "${SERVICES[@]}"; do
    mapfile -t pids < <(service_pids "$name")
    if ((${#pids[@]})) && healthy "$name"; then
      case $name in
      etcd) echo "etcd: up (pid ${pids[0]}, http://$ETCD_CLIENT)" ;;
      kube-apiserver) echo "kube-apiserver: up (pid ${pids[0]}, $SERVER)" ;;
      *) echo "$name: up (pid ${pids[0]})" ;;
      esac
    else
      echo "$name: down"
      rc=3
    fi
  done
  return "$rc"
}

cmd_env() {
  step env
  [[ -f $ENV_FILE ]] || die "no $ENV_FILE: run integration/control-plane.sh up first"
  echo "$ENV_FILE"
}

# node-kubeconfig NODE OUT: the kubelet identity of NODE, signed by the CA.
cmd_node_kubeconfig() {
  step node-kubeconfig
  local node=${1:-} out=${2:-}
  [[ -n $node && -n $out ]] || die "usage: $0 node-kubeconfig NODE OUT"
  [[ $node =~ ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$ ]] || die "not a valid node name: $node"
  [[ -s $CA_CRT && -s $CA_KEY ]] || die "no CA in $PKI: run integration/control-plane.sh up first"
  local tmp
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064 # expand now: tmp is local
  trap "rm -rf '$tmp'" EXIT
  (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/key")
  openssl req -new -key "$tmp/key" -subj "/O=system:nodes/CN=system:node:$node" -out "$tmp/csr" 2>/dev/null
  printf '%s\n' "$CLIENT_EXT" >"$tmp/ext"
  openssl x509 -req -in "$tmp/csr" -CA "$CA_CRT" -CAkey "$CA_KEY" -CAcreateserial \
    -CAserial "$tmp/srl" -days 3650 -sha256 -extfile "$tmp/ext" -out "$tmp/crt" 2>/dev/null
  kubeconfig "$out" "system:node:$node" "$tmp/crt" "$tmp/key"
}

# kubeadm's bindings for TLS bootstrap and client certificate rotation.
BOOTSTRAP_GROUP=system:bootstrappers:kubeadm:default-node-token
bootstrap_rbac() {
  local g=$BOOTSTRAP_GROUP
  {
    binding kubeadm:kubelet-bootstrap system:node-bootstrapper "$g"
    binding kubeadm:node-autoapprove-bootstrap \
      system:certificates.k8s.io:certificatesigningrequests:nodeclient "$g"
    binding kubeadm:node-autoapprove-certificate-rotation \
      system:certificates.k8s.io:certificatesigningrequests:selfnodeclient system:nodes
  } | "$BIN/kubectl" --kubeconfig "$ADMIN_KUBECONFIG" apply -f - >/dev/null
}

# binding NAME CLUSTERROLE GROUP: one ClusterRoleBinding document.
binding() {
  cat <<YAML
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "$1"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "$2"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "$3"}]
YAML
}

# bootstrap-kubeconfig OUT [ID.SECRET]: a bootstrap token and its kubeconfig.
cmd_bootstrap_kubeconfig() {
  step bootstrap-kubeconfig
  local out=${1:-} token=${2:-} id secret expires
  [[ -n $out ]] || die "usage: $0 bootstrap-kubeconfig OUT [ID.SECRET]"
  [[ -s $CA_CRT && -s $ADMIN_KUBECONFIG ]] || die "no control plane in $RUN: run integration/control-plane.sh up first"
  if [[ -z $token ]]; then
    token="$(openssl rand -hex 3).$(openssl rand -hex 8)"
  fi
  [[ $token =~ ^([a-z0-9]{6})\.([a-z0-9]{16})$ ]] || die "not a bootstrap token (ID.SECRET, [a-z0-9]{6}.[a-z0-9]{16}): $token"
  id=${BASH_REMATCH[1]} secret=${BASH_REMATCH[2]}
  expires=$(date -u -d '+24 hours' +%Y-%m-%dT%H:%M:%SZ)
  bootstrap_rbac || die "kubectl apply of the bootstrap RBAC failed"
  "$BIN/kubectl" --kubeconfig "$ADMIN_KUBECONFIG" apply -f - >/dev/null <<YAML || die "kubectl apply of the bootstrap token failed"
apiVersion: v1
kind: Secret
metadata: {name: bootstrap-token-$id, namespace: kube-system}
type: bootstrap.kubernetes.io/token
stringData:
  token-id: "$id"
  token-secret: "$secret"
  expiration: "$expires"
  usage-bootstrap-authentication: "true"
  usage-bootstrap-signing: "true"
  auth-extra-groups: "$BOOTSTRAP_GROUP"
YAML
  kubeconfig_for "$out" tls-bootstrap-token-user "    token: $id.$secret"
}

# stop NAME / start NAME: one component, for the outage tests (the API
# server away for a minute); `start` reuses the certs and configs of `up`.
cmd_stop_one() {
  step "stop ${1:-}"
  local name=${1:-} pids
  [[ " ${SERVICES[*]} " == *" $name "* ]] || die "usage: $0 stop ${SERVICES[*]// /|}"
  mapfile -t pids < <(service_pids "$name")
  stop_pids 15 "${pids[@]}"
  say "$name: stopped"
}

cmd_start_one() {
  local name=${1:-}
  [[ " ${SERVICES[*]} " == *" $name "* ]] || die "usage: $0 start ${SERVICES[*]// /|}"
  [[ -s $CA_CRT ]] || die "no CA in $PKI: run integration/control-plane.sh up first"
  start_service "$name" 90
}

case ${1:-} in
build) cmd_build ;;
stop) cmd_stop_one "${2:-}" ;;
start) cmd_start_one "${2:-}" ;;
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status || exit $? ;;
env) cmd_env ;;
node-kubeconfig) cmd_node_kubeconfig "${@:2}" ;;
bootstrap-kubeconfig) cmd_bootstrap_kubeconfig "${@:2}" ;;
*)
  echo "usage: $0 build|up|down|status|env|node-kubeconfig NODE OUT|bootstrap-kubeconfig OUT [ID.SECRET]|stop NAME|start NAME   (run dir: $RUN)" >&2
  exit 2
  ;;
esac
