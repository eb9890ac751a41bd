//! The generated CSI v1 and kubelet plugin-registration types, servers and
//! clients (build.rs compiles the repo's proto/).

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod csi {
    tonic::include_proto!("csi.v1");
}

pub mod registration {
    tonic::include_proto!("pluginregistration");
}
