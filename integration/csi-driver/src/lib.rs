//! minilet-test-csi: the CSI driver minilet's tests run against. A real
//! block-storage driver in miniature: CreateVolume makes a sparse file,
//! NodeStageVolume attaches it as a loop device, formats it on first use and
//! mounts it at the staging path, NodePublishVolume bind-mounts it into the
//! target, and the reverse calls undo exactly that. It keeps the CSI spec's
//! rules on call order and idempotency, records every call in
//! `<state>/calls.jsonl` and fails or hangs calls as `<state>/faults.json`
//! says. A test tool: not part of the agent.

pub mod backend;
pub mod client;
pub mod driver;
pub mod faults;
pub mod harness;
pub mod proto;
pub mod record;
pub mod serve;
pub mod service;
pub mod state;
