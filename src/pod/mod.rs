//! Pods: the per-pod worker (`worker`), its pure lifecycle step
//! (`lifecycle`), the CRI configs it builds (`spec`), and the manager that
//! keeps one worker per desired or adopted pod (`manager`); the objects a
//! pod's containers use, fetched before a config is built (`objects`).

pub mod lifecycle;
pub mod manager;
pub mod objects;
pub mod spec;
pub mod worker;
