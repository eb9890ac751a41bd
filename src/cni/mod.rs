//! CNI: minilet runs the network plugin chains itself.
//!
//! The runtime execs minilet's delegating plugin (`delegate`), which forwards
//! the request over a root-only unix socket to the agent (`server`); the agent
//! runs the chain from its own config dir (`chain`, `config`) by exec'ing
//! real plugins (`exec`), and the plugin prints the final result.

pub mod cache;
pub mod chain;
pub mod config;
pub mod delegate;
pub mod exec;
pub mod fake;
pub mod install;
pub mod server;
