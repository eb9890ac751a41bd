//! The test CSI driver for end-to-end tests: the harness lives with the
//! driver (integration/csi-driver, `minilet_test_csi::harness`) and is
//! shared with that crate's own tests. See there: start/stop/kill the
//! binary, faults.json, calls.jsonl, leftover mounts and loop devices.
//!
//! Declare the driver BEFORE the `Agent`, so the agent (dropped first)
//! tears its pods' volumes down while the driver still runs.
//!
//! The e2e run must have built the driver binary: `cargo test` at the
//! root does (it is a default workspace member); with `--test e2e` alone,
//! run `cargo build -p minilet-test-csi` first.

pub use minilet_test_csi::harness::{CSI_DRIVER, CsiDriver};
