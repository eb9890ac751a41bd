//! Wall-clock time behind a seam. Every lifecycle decision compares times
//! the runtime reports (CRI nanoseconds since the epoch: created, started,
//! finished) with "now"; taking "now" from a `Clock` lets tests run the
//! worker and the fake runtime on one clock they control (tokio's paused
//! time, see `cri::fake::FakeClock`), so backoffs can be tested in simulated
//! minutes. No side effects.

/// Where "now" comes from, in CRI's unit (ns since the epoch).
pub trait Clock: Send + Sync + 'static {
    fn now_ns(&self) -> i64;
}

/// The host's wall clock: what the runtime stamps its objects with.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64)
    }
}
