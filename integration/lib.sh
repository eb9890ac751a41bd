# integration/lib.sh: sourced by test.sh, run.sh and fresh-check.sh (not
# run on its own). One failure report for every script, and the host
# probes they share, written so that they work on a machine nothing has run
# on yet: a probe of a path that does not exist yet answers "none", it
# never fails.

# step NAME: the step a failure is reported against.
STEP=init
step() { STEP=$1; }

# fail_report PREFIX: from here on any failing command ends the script with
# ONE line on stderr, "PREFIX: FAILED (<step>): line N: <command> (exit N)".
# With `fail_report PREFIX defer` the line is only recorded, and a later
# `fail_print` (from an EXIT trap, after cleanup) prints it last.
FAIL_LINE=""
fail_report() {
  FAIL_PREFIX=$1
  FAIL_DEFER=${2:-}
  set -E
  trap '_on_err $? $LINENO "$BASH_COMMAND"' ERR
}
_on_err() {
  local rc=$1 line=$2 cmd=$3
  # Only the main shell reports; a failing $(...) is reported by its caller.
  [[ $BASHPID == "$$" ]] || exit "$rc"
  FAIL_LINE="$FAIL_PREFIX: FAILED ($STEP): line $line: $cmd (exit $rc)"
  [[ -n $FAIL_DEFER ]] || fail_print
  exit "$rc"
}
fail_print() {
  if [[ -n $FAIL_LINE ]]; then printf '%s\n' "$FAIL_LINE" >&2; fi
  return 0
}
# die MESSAGE: fail the current step with a message of our own.
die() {
  FAIL_LINE="$FAIL_PREFIX: FAILED ($STEP): $*"
  [[ -n $FAIL_DEFER ]] || fail_print
  exit 1
}

# netns_count: how many runtime netns files (/var/run/netns/cni-*) exist.
# /var/run/netns only appears with the first sandbox: absent means 0.
netns_count() {
  local n=0 f
  for f in /var/run/netns/cni-*; do
    [[ -e $f ]] && n=$((n + 1))
  done
  echo "$n"
}

# wait_for SECONDS CMD...: run CMD until it succeeds; 1 after SECONDS.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
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
