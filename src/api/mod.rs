//! API server mode: minilet as a node of a Kubernetes cluster. The client
//! and the node's identity (`client`), TLS bootstrap and certificate
//! rotation (`bootstrap`) with the certificates on disk (`pki`), the Node
//! object, its status and its
//! Lease (`node`), the pods bound to this node as a pod source (`pods`),
//! pod status written to the status subresource (`status_writer`), mirror
//! pods for static pods (`mirror`), the objects pods use, watched
//! (`objects`), events (`events`), the CSIDriver objects and
//! VolumeAttachments the CSI volume plugin reads (`csi_objects`), and the
//! node's CSINode (`csi_node`), and routes to the other nodes' pod CIDRs
//! (`routes`, MiniletConfiguration `nodeRoutes`).
//!
//! Everything here talks to the server through kube-rs; the pod path sees
//! only the seams (`source::merge`, `sink`, `objects::ObjectLookup`).

pub mod bootstrap;
pub mod client;
pub mod csi_node;
pub mod csi_objects;
pub mod events;
pub mod machine;
pub mod mirror;
pub mod node;
pub mod objects;
pub mod pki;
pub mod pod_api;
pub mod pods;
pub mod routes;
pub mod status_writer;
pub mod tokens;
