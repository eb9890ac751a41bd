//! Tests against the real plugins of Debian's containernetworking-plugins in
//! /usr/lib/cni, in network namespaces the tests create. They need root and
//! FAIL (never skip) without it.
