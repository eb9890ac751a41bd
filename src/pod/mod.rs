//! Pods: the per-pod worker (`worker`), its pure lifecycle step
//! (`lifecycle`), the CRI configs it builds (`spec`), and the manager that
//! keeps one worker per desired or adopted pod (`manager`).

pub mod lifecycle;
pub mod manager;
pub mod spec;
pub mod worker;
