#!/usr/bin/env bash
# The full test suite, as CI runs it: bring the real stack and a real
# Kubernetes control plane up (installing and building what is missing),
# check formatting and lints, run the unit tests and the
# end-to-end tests against the real containerd, CNI plugins and registry,
# then take the stack down and check nothing leaked. Any failure, including
# a stack that can't come up, fails the run with ONE last line
# "test: FAILED (<step>): ..." naming the step: nothing is skipped, and
# nothing fails silently.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"
# shellcheck source=integration/lib.sh
. integration/lib.sh
# The failure line is printed after the stack is down, so it is the last.
fail_report test defer
trap fail_print EXIT

# Rust's own tools: a minimal rustup profile has no rustfmt or clippy.
rust_tools() {
  command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) first"
  local missing=() c
  for c in fmt clippy; do
    cargo "$c" --version >/dev/null 2>&1 || missing+=("$c")
  done
  ((${#missing[@]})) || return 0
  command -v rustup >/dev/null || die "cargo ${missing[*]} missing and no rustup to add them"
  echo "test: adding rust components ${missing[*]/fmt/rustfmt}" >&2
  rustup component add "${missing[@]/fmt/rustfmt}"
}

step root;          ((EUID == 0)) || die "must run as root (containerd, netns, mounts)"
step "rust tools";  rust_tools
step "fresh check"; integration/fresh-check.sh
step "stack up";    integration/stack.sh up
# Whatever happens next, leave no process, mount or netns behind; a down
# that fails (something leaked) fails the run.
stack_down() {
  local rc=$?
  if ! integration/stack.sh down; then
    rc=1
    [[ -n $FAIL_LINE ]] || FAIL_LINE="test: FAILED (stack down): integration/stack.sh down found leftovers"
  fi
  fail_print
  exit "$rc"
}
trap stack_down EXIT
# The real API server the API server mode tests talk to (stack.sh down, in
# the trap, takes it down too); building it is cached outside the checkout.
step "control plane up"; integration/control-plane.sh up
step "netns count"; netns_before=$(netns_count)
step fmt;           cargo fmt --all -- --check
step clippy;        cargo clippy --all-targets -- -D warnings
# Unit tests in parallel; the end-to-end suite serialises itself. Benches
# are type-checked by clippy above and run with `cargo bench`, not here.
# The CSI e2e tests run the test driver's binary (integration/csi-driver).
step "test driver"; cargo build -p minilet-test-csi
step tests;         cargo test --features fault-injection --lib --bins --tests  # e2e needs the fault hook
step "release binary"; integration/build-release.sh >/dev/null  # the shipped binary: fails if test-only code is in it
step "image test";  integration/image-test.sh  # the Docker image, run against the stack
step "netns leak";  netns_after=$(netns_count)
[[ $netns_after == "$netns_before" ]] || die "netns leaked: $netns_before before, $netns_after after"
