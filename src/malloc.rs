//! The C allocator's settings for a long-running agent. glibc's malloc
//! gives threads that allocate at the same time arenas of their own (up to
//! eight per core), and keeps what is freed inside them: a burst of work on
//! the runtime's worker and blocking threads (decoding 30 pods' watch
//! events, their status patches) leaves several partly used arenas behind,
//! several MiB of RSS the agent never uses again. minilet allocates little
//! and rarely contends, so it caps the arenas at two and hands free pages
//! back to the kernel after bursts (`trim`).
//!
//! Side effects: glibc tunables and `malloc_trim`; nothing on other libcs
//! (musl's allocator returns memory by itself).

/// The arena cap: the main arena and one more, so the two runtime workers
/// do not serialise on one lock.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENA_MAX: libc::c_int = 2;

/// Cap glibc's arenas. Call first thing in `main`, before any thread is
/// started (arenas already made are not merged).
#[allow(unsafe_code)]
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; it is called before
    // any other thread exists, and an unknown parameter is an error return.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
    }
}

/// Give free heap pages back to the kernel (all arenas, also the middle of
/// the heap). Cheap on a heap this size; the agent calls it every half
/// minute and after bursts of pod work.
#[allow(unsafe_code)]
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the arenas' own locks; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}
