//! What the Node says about this machine, read from the machine the way
//! kubelet (through cAdvisor) reads it: online CPUs, MemTotal, the state
//! dir's filesystem, the kernel release, the OS image, the machine, system
//! and boot ids, and the node's address (--node-ip, else the source address
//! of the default route). Also the samples the pressure conditions use.
//!
//! Side effects: reads /proc, /sys, /etc files and statvfs(2); opens (and
//! connects, which sends nothing) a UDP socket to find the default route's
//! source address.

use std::net::{IpAddr, UdpSocket};
use std::path::Path;

use tracing::warn;

use super::node::{NodeFacts, Sample};
use crate::config::Config;

/// What minilet reports as kubeletVersion (kubectl's VERSION column): the
/// Kubernetes release whose API types it is built with (k8s-openapi's
/// `v1_33`), with minilet's own version as the pre-release part, so
/// version parsers see a valid semver and people see it is not kubelet.
pub const KUBELET_VERSION: &str = concat!("v1.33.0-minilet.", env!("CARGO_PKG_VERSION"));

/// The machine's facts for `cfg`'s node; `runtime` is CRI Version's
/// (name, version). Unreadable facts are empty (and warned about), never
/// an error: a Node with an empty machineID is better than no Node.
pub fn gather(cfg: &Config, runtime: (&str, &str)) -> NodeFacts {
    let (fs_bytes, _, _, _) = statvfs(&cfg.state_dir).unwrap_or_default();
    let internal_ip = cfg.node_ip.or_else(default_route_source);
    if internal_ip.is_none() {
        warn!("no --node-ip and no default route: the Node gets no InternalIP");
    }
    NodeFacts {
        node_name: cfg.node_name.clone(),
        cpus: online_cpus(),
        memory_bytes: meminfo("MemTotal:").unwrap_or(0),
        ephemeral_storage_bytes: fs_bytes,
        max_pods: cfg.max_pods,
        eviction: cfg.eviction_hard,
        kernel_version: read_trim("/proc/sys/kernel/osrelease"),
        os_image: os_image(),
        architecture: go_arch(std::env::consts::ARCH).to_string(),
        machine_id: read_trim("/etc/machine-id"),
        system_uuid: read_trim("/sys/class/dmi/id/product_uuid"),
        boot_id: read_trim("/proc/sys/kernel/random/boot_id"),
        container_runtime_version: format!(
            "{}://{}",
            if runtime.0.is_empty() {
                "cri"
            } else {
                runtime.0
            },
            runtime.1
        ),
        kubelet_version: KUBELET_VERSION.into(),
        internal_ip,
        hostname: cfg.node_name.clone(),
    }
}

/// A pressure sample now: MemAvailable and the state dir's filesystem.
pub fn sample(state_dir: &Path) -> Sample {
    let (fs_capacity, fs_available, inodes, inodes_free) = statvfs(state_dir).unwrap_or_default();
    Sample {
        memory_available: meminfo("MemAvailable:"),
        memory_total: meminfo("MemTotal:").unwrap_or_default(),
        fs_capacity,
        fs_available,
        inodes,
        inodes_free,
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Go's GOARCH names, which kubernetes.io/arch and nodeInfo use.
pub fn go_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        other => other,
    }
}

/// The CPUs in /sys/devices/system/cpu/online ("0-3,6"), else what the
/// process may use.
fn online_cpus() -> u32 {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| count_cpu_list(&s))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32))
}

/// Counts a kernel CPU list such as "0-3,6".
pub fn count_cpu_list(s: &str) -> Option<u32> {
    let mut n = 0;
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u32>().ok()?.checked_sub(a.parse::<u32>().ok()?)? + 1,
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

/// A /proc/meminfo field in bytes.
fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text, field)
}

pub fn parse_meminfo(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// PRETTY_NAME of os-release, as kubelet reports osImage.
fn os_image() -> String {
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    pretty_name(&text).unwrap_or_else(|| "Linux".into())
}

pub fn pretty_name(os_release: &str) -> Option<String> {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches(['"', '\'']).to_string())
        .filter(|v| !v.is_empty())
}

/// (capacity bytes, available bytes, inodes, free inodes) of the
/// filesystem holding `path` (kubelet's nodefs: its root dir).
fn statvfs(path: &Path) -> Option<(u64, u64, u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let frag = st.fragment_size() as u64;
    Some((
        st.blocks() as u64 * frag,
        st.blocks_available() as u64 * frag,
        st.files() as u64,
        st.files_available() as u64,
    ))
}

/// The source address the kernel picks for the default route (IPv4, else
/// IPv6): connecting a UDP socket sends nothing but routes it.
fn default_route_source() -> Option<IpAddr> {
    [
        ("0.0.0.0:0", "8.8.8.8:53"),
        ("[::]:0", "[2001:4860:4860::8888]:53"),
    ]
    .iter()
    .find_map(|(bind, to)| {
        let s = UdpSocket::bind(bind).ok()?;
        s.connect(to).ok()?;
        let ip = s.local_addr().ok()?.ip();
        (!ip.is_unspecified() && !ip.is_loopback()).then_some(ip)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_files_parse_as_the_kernel_writes_them() {
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-3,6,8-9"), Some(7));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("x"), None);
        assert_eq!(count_cpu_list(""), None);
        let mi = "MemTotal:        4030680 kB\nMemFree: 100 kB\nMemAvailable:    2000000 kB\n";
        assert_eq!(parse_meminfo(mi, "MemTotal:"), Some(4030680 * 1024));
        assert_eq!(parse_meminfo(mi, "MemAvailable:"), Some(2000000 * 1024));
        assert_eq!(parse_meminfo(mi, "Nope:"), None);
        assert_eq!(
            pretty_name("NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n").as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(pretty_name("NAME=x\n"), None);
        assert_eq!(go_arch("x86_64"), "amd64");
        assert_eq!(go_arch("aarch64"), "arm64");
        assert!(KUBELET_VERSION.starts_with("v1.33.0-minilet."));
    }

    #[test]
    fn gather_reads_this_machine() {
        let mut cfg = Config::default_for("n1");
        cfg.state_dir = std::env::temp_dir();
        cfg.node_ip = Some("10.1.2.3".parse().unwrap());
        let f = gather(&cfg, ("containerd", "1.6.20"));
        assert!(f.cpus >= 1 && f.memory_bytes > 0 && f.ephemeral_storage_bytes > 0);
        assert_eq!(f.container_runtime_version, "containerd://1.6.20");
        assert_eq!(f.internal_ip, cfg.node_ip, "--node-ip wins");
        assert!(!f.kernel_version.is_empty());
        let s = sample(&cfg.state_dir);
        assert!(s.memory_available.is_some() && s.fs_capacity > 0);
    }
}
