//! kubelet's hard eviction thresholds (`evictionHard`): the signals the
//! node's pressure conditions compare against and its allocatable
//! subtracts. minilet evicts no pods (yet); it reports the pressure as
//! kubelet does, so the scheduler and the taint controller react the same.
//!
//! As kubelet before `mergeDefaultEvictionSettings`: with no `evictionHard`
//! the defaults hold (memory.available<100Mi, nodefs.available<10%,
//! nodefs.inodesFree<5%); a config that sets `evictionHard` sets every
//! signal it uses, and a signal it leaves out is off.
//!
//! Side effects: none.

use std::collections::BTreeMap;

/// One threshold: a quantity, or a percentage of the capacity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Threshold {
    Off,
    Amount(u64),
    Percent(f64),
}

impl Threshold {
    /// How much of `capacity` the threshold holds back.
    pub fn amount(&self, capacity: u64) -> u64 {
        match *self {
            Threshold::Off => 0,
            Threshold::Amount(n) => n.min(capacity),
            Threshold::Percent(p) => ((capacity as f64) * p / 100.0) as u64,
        }
    }

    /// Whether `available` of `capacity` is below the threshold.
    pub fn breached(&self, available: u64, capacity: u64) -> bool {
        match self {
            Threshold::Off => false,
            _ => capacity > 0 && available < self.amount(capacity),
        }
    }
}

/// The thresholds minilet reports on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvictionHard {
    pub memory_available: Threshold,
    pub nodefs_available: Threshold,
    pub nodefs_inodes_free: Threshold,
}

impl Default for EvictionHard {
    fn default() -> Self {
        EvictionHard {
            memory_available: Threshold::Amount(100 * 1024 * 1024),
            nodefs_available: Threshold::Percent(10.0),
            nodefs_inodes_free: Threshold::Percent(5.0),
        }
    }
}

/// Signals kubelet knows that minilet does not report on (no separate
/// image filesystem, no PID threshold): accepted, with a warning.
const UNUSED_SIGNALS: [&str; 3] = ["imagefs.available", "imagefs.inodesFree", "pid.available"];

/// Parse kubelet's `evictionHard` map. `Err` is the reason for one bad
/// entry; the `Vec` holds warnings for signals minilet does not use.
pub fn parse(map: &BTreeMap<String, String>) -> Result<(EvictionHard, Vec<String>), String> {
    let mut out = EvictionHard {
        memory_available: Threshold::Off,
        nodefs_available: Threshold::Off,
        nodefs_inodes_free: Threshold::Off,
    };
    let mut warnings = vec![];
    for (signal, value) in map {
        let t = threshold(value, signal == "nodefs.inodesFree")
            .ok_or_else(|| format!("{signal}: {value:?} is not a quantity or a percentage"))?;
        match signal.as_str() {
            "memory.available" => out.memory_available = t,
            "nodefs.available" => out.nodefs_available = t,
            "nodefs.inodesFree" => out.nodefs_inodes_free = t,
            s if UNUSED_SIGNALS.contains(&s) => warnings.push(format!(
                "evictionHard signal {s} is accepted but not used by minilet"
            )),
            s => return Err(format!("unknown eviction signal {s:?}")),
        }
    }
    Ok((out, warnings))
}

fn threshold(value: &str, count: bool) -> Option<Threshold> {
    let v = value.trim();
    if let Some(p) = v.strip_suffix('%') {
        let p: f64 = p.trim().parse().ok()?;
        return (0.0..=100.0).contains(&p).then_some(Threshold::Percent(p));
    }
    let n = if count {
        v.parse::<u64>().ok()?
    } else {
        u64::try_from(crate::pod::spec::parse_bytes(v)?).ok()?
    };
    Some(Threshold::Amount(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_kubelets_and_a_set_map_replaces_them() {
        let d = EvictionHard::default();
        assert!(d.nodefs_available.breached(9, 100));
        assert!(!d.nodefs_available.breached(10, 100));
        assert_eq!(d.memory_available.amount(1 << 40), 100 << 20);
        let (e, w) = parse(&map(&[
            ("nodefs.available", "1%"),
            ("imagefs.available", "15%"),
        ]))
        .unwrap();
        assert_eq!(e.nodefs_available, Threshold::Percent(1.0));
        assert_eq!(e.memory_available, Threshold::Off);
        assert!(!e.memory_available.breached(0, 100));
        assert_eq!(w.len(), 1);
        let (e, _) = parse(&map(&[
            ("memory.available", "1Gi"),
            ("nodefs.inodesFree", "1000"),
        ]))
        .unwrap();
        assert_eq!(e.memory_available, Threshold::Amount(1 << 30));
        assert_eq!(e.nodefs_inodes_free, Threshold::Amount(1000));
    }

    #[test]
    fn bad_entries_are_named() {
        assert_eq!(
            parse(&map(&[("memory.available", "lots")])).unwrap_err(),
            "memory.available: \"lots\" is not a quantity or a percentage"
        );
        assert_eq!(
            parse(&map(&[("nodefs.available", "120%")])).unwrap_err(),
            "nodefs.available: \"120%\" is not a quantity or a percentage"
        );
        assert_eq!(
            parse(&map(&[("disk.free", "1%")])).unwrap_err(),
            "unknown eviction signal \"disk.free\""
        );
    }
}
