//! The harness side, for tests (this crate's and minilet's e2e suite): start
//! the `minilet-test-csi` binary on a state dir of its own, point minilet at
//! its sockets, make calls fail or hang (faults.json), read what it was
//! asked (calls.jsonl), and check that nothing it made is left mounted or
//! attached. A missing binary is a test FAILURE, never a skip.
//!
//! Drop order matters: declare the driver BEFORE the `Agent`, so the agent
//! (dropped first) tears its pods' volumes down while the driver still runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::record::{Call, read_calls};

/// The driver's name (GetPluginInfo), unless a test picks another.
pub const CSI_DRIVER: &str = "csi.minilet.test";

/// How to start the driver.
#[derive(Clone)]
pub struct CsiOptions {
    pub name: String,
    pub node_id: String,
    /// Serve the registration socket `<dir>/<name>-reg.sock` here (minilet's
    /// `<root>/plugins_registry/`), as node-driver-registrar would.
    pub registration_dir: Option<PathBuf>,
    /// Offer PUBLISH_UNPUBLISH_VOLUME (ControllerPublish before stage).
    pub publish_unpublish: bool,
    /// The binary; default `driver_binary()`.
    pub binary: Option<PathBuf>,
}

impl CsiOptions {
    pub fn new(node_id: &str) -> CsiOptions {
        CsiOptions {
            name: CSI_DRIVER.into(),
            node_id: node_id.into(),
            registration_dir: None,
            publish_unpublish: true,
            binary: None,
        }
    }
}

/// A running (or stopped) driver process with its own dir.
pub struct CsiDriver {
    pub dir: tempfile::TempDir,
    pub options: CsiOptions,
    child: Option<Child>,
}

/// The driver binary: `$MINILET_TEST_CSI`, else next to the running test
/// binary's directory (target/debug/deps/<test> → target/debug).
pub fn driver_binary() -> PathBuf {
    if let Ok(p) = std::env::var("MINILET_TEST_CSI") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/e2e-<hash> → target/debug/minilet-test-csi
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("minilet-test-csi"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} is missing: `cargo build -p minilet-test-csi` (a root `cargo test` builds it)",
        bin.display()
    );
    bin
}

impl CsiDriver {
    pub fn start(node_id: &str) -> CsiDriver {
        CsiDriver::start_with(CsiOptions::new(node_id))
    }

    pub fn start_with(options: CsiOptions) -> CsiDriver {
        let dir = tempfile::Builder::new()
            .prefix("minilet-e2e-csi-")
            .tempdir()
            .unwrap();
        let mut d = CsiDriver {
            dir,
            options,
            child: None,
        };
        d.spawn();
        d
    }

    /// The CSI socket (what `csiDrivers[].endpoint` names).
    pub fn endpoint(&self) -> PathBuf {
        self.dir.path().join("csi.sock")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    /// The registration socket, when started with a registration dir.
    pub fn registration_socket(&self) -> Option<PathBuf> {
        self.options
            .registration_dir
            .as_ref()
            .map(|d| d.join(format!("{}-reg.sock", self.options.name)))
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("driver.log")).unwrap_or_default()
    }

    /// A MiniletConfiguration line naming this driver statically.
    pub fn config_line(&self) -> String {
        format!(
            "csiDrivers: [{{name: {}, endpoint: {}}}]",
            self.options.name,
            self.endpoint().display()
        )
    }

    /// Start the process (again) and wait until it listens.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "driver still running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("driver.log"))
            .unwrap();
        let mut cmd = Command::new(self.options.binary.clone().unwrap_or_else(driver_binary));
        cmd.arg("--endpoint")
            .arg(self.endpoint())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--driver-name", &self.options.name])
            .args(["--node-id", &self.options.node_id])
            .arg(format!(
                "--publish-unpublish={}",
                self.options.publish_unpublish
            ))
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(reg) = &self.options.registration_dir {
            cmd.arg("--registration-dir").arg(reg);
        }
        self.child = Some(cmd.spawn().expect("spawn minilet-test-csi"));
        // The registration socket is bound right after the CSI socket.
        let listening = |d: &CsiDriver| {
            d.endpoint().exists() && d.registration_socket().is_none_or(|r| r.exists())
        };
        let start = Instant::now();
        while !listening(self) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "minilet-test-csi did not listen on {}:\n{}",
                self.endpoint().display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9: the sockets stay behind, as a crashed driver's would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: the driver removes its sockets, keeps its state.
    /// Its exit status; None when it was not running.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("minilet-test-csi ignored SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every call the driver answered so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        read_calls(&self.state_dir().join("calls.jsonl"))
    }

    /// (method, code) of the calls naming `volume_id`, in order.
    pub fn calls_for(&self, volume_id: &str) -> Vec<(String, String)> {
        self.calls()
            .into_iter()
            .filter(|c| c.volume_id == volume_id)
            .map(|c| (c.method, c.code))
            .collect()
    }

    /// How many calls of `method` answered OK.
    pub fn ok_count(&self, method: &str) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.method == method && c.code == "OK")
            .count()
    }

    /// Replace faults.json, e.g.
    /// `json!({"NodeStageVolume": {"code": "Unavailable", "times": 2}})` or
    /// `json!({"NodePublishVolume": {"hang_ms": 30000}})`. Read on every call.
    pub fn set_faults(&self, faults: serde_json::Value) {
        let dir = self.state_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = dir.join(".faults.json.e2e");
        std::fs::write(&tmp, serde_json::to_vec(&faults).unwrap()).unwrap();
        std::fs::rename(&tmp, dir.join("faults.json")).unwrap();
    }

    pub fn clear_faults(&self) {
        let _ = std::fs::remove_file(self.state_dir().join("faults.json"));
    }

    /// The loop devices backed by this driver's disks (`losetup -a`).
    pub fn loop_devices(&self) -> Vec<String> {
        let out = Command::new("losetup").arg("-a").output().unwrap();
        let dir = self.dir.path().display().to_string();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&dir))
            .filter_map(|l| l.split_once(':').map(|(d, _)| d.to_string()))
            .collect()
    }

    /// Mount points of this driver's devices (stages and the bind mounts
    /// of publishes), from /proc/self/mountinfo.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let devices = self.loop_devices();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        info.lines()
            .filter_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let point = left.split(' ').nth(4)?;
                let source = right.split(' ').nth(1)?;
                devices
                    .iter()
                    .any(|d| d == source)
                    .then(|| PathBuf::from(point.replace("\\040", " ")))
            })
            .collect()
    }

    /// Assert the driver holds nothing on the host any more.
    pub fn assert_nothing_left(&self) {
        assert_eq!(self.mounts(), Vec::<PathBuf>::new(), "volume mounts left");
        assert_eq!(
            self.loop_devices(),
            Vec::<String>::new(),
            "loop devices left"
        );
    }
}

impl Drop for CsiDriver {
    /// Stop the process, then undo whatever of its volumes is still on the
    /// host (deepest mount first, then the loop devices), so a failed test
    /// leaks nothing into the next.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- minilet-test-csi log (last 60 lines) ----");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
        self.kill9();
        let mut mounts = self.mounts();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        for dev in self.loop_devices() {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
    }
}
