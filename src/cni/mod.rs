//! CNI: minilet runs the network plugin chains itself.
//!
//! The runtime execs minilet's delegating plugin (`delegate`), which forwards
//! the request over a root-only unix socket to the agent (`server`); the agent
//! runs the chains of its own networks (`config`: the config dir, watched;
//! `chain`: ADD/DEL/CHECK/STATUS/GC; `version`: result conversion; `cache`:
//! libcni's result cache) by exec'ing real plugins (`exec`), attaching the
//! extra networks a pod's annotations ask for (`podnet`), and reports what it
//! did (`observe`: metrics, events, network status). `tool` is the same
//! machinery as a command (`minilet cni`), like cnitool; `local` is it run
//! by the delegating plugin itself for DEL and CHECK when the agent is down.

pub mod cache;
pub mod chain;
pub mod config;
pub mod delegate;
pub mod exec;
#[cfg(test)]
pub mod fake;
pub mod install;
pub mod local;
pub mod observe;
pub mod pod_cidr;
pub mod podnet;
pub mod server;
pub mod tool;
pub mod version;

#[cfg(test)]
mod real_tests;
