#!/usr/bin/env bash
# The full test suite, as CI runs it: bring the real stack up (installing
# what is missing), check formatting and lints, run the unit tests and the
# end-to-end tests against the real containerd, CNI plugins and registry,
# then take the stack down and check nothing leaked. Any failure, including
# a stack that can't come up, fails the run: nothing is skipped.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"

[[ $(id -u) == 0 ]] || { echo "test.sh: must run as root (containerd, netns, mounts)" >&2; exit 1; }

integration/stack.sh up
# Whatever happens next, leave no process, mount or netns behind.
trap 'integration/stack.sh down' EXIT

netns_before=$(find /var/run/netns -maxdepth 1 -name 'cni-*' 2>/dev/null | wc -l)

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# Unit tests in parallel; the end-to-end suite serialises itself. Benches
# are type-checked by clippy above and run with `cargo bench`, not here.
cargo test --lib --bins --tests
integration/image-test.sh # the Docker image, run against the stack

netns_after=$(find /var/run/netns -maxdepth 1 -name 'cni-*' 2>/dev/null | wc -l)
if [[ $netns_after != "$netns_before" ]]; then
  echo "test.sh: netns leaked: $netns_before before, $netns_after after" >&2
  exit 1
fi
