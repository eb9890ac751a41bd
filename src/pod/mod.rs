//! Pods: the per-pod worker, its lifecycle and the CRI configs it builds.
