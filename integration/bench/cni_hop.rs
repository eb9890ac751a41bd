//! Benchmark: the delegating CNI hop (runtime → `minilet-cni` → agent socket
//! → chain → back) against running the same chain in-process, per ADD and
//! per DEL, for a real bridge + host-local + portmap chain and for a cheap
//! loopback-only one. See integration/bench/README.md.
//!
//! Runs as root (netns, a bridge, iptables). Not a pass/fail test: it prints
//! a table, whether the target is met, and JSON; it exits non-zero only when
//! a run is broken (errors, leftovers).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use minilet::cni::cache::ResultCache;
use minilet::cni::chain::{Attachment, CniRunner};
use minilet::cni::config::{NetworkStore, load_dir};
use minilet::cni::delegate::{AgentRequest, AgentResponse};
use minilet::cni::exec::{Command as CniCommand, ProcessExec};
use minilet::cni::install;
use minilet::cni::observe::{CniEvents, CniMetrics, NetworkStatusBoard};
use minilet::cni::server::{self, CniHandler, PodNetworkInfo, PodNetworkLookup};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

/// The benchmark's own networks, bridge and subnet, so it collides neither
/// with the e2e suite's `minilet0` nor with the static_pods bench's
/// `mlbench0`.
const NET_NAME: &str = "minilet-hop";
const LO_NET_NAME: &str = "minilet-hop-lo";
const BRIDGE: &str = "minihop0";
const SUBNET: &str = "10.249.0.0/16";
const SUBNET_PREFIX: &str = "10.249.";
/// Every netns the bench makes is `hop-N`.
const NETNS_PREFIX: &str = "hop-";
const NETNS_DIR: &str = "/var/run/netns";
/// The runtime's cniVersion (what `install::runtime_conflist` says).
const RUNTIME_CNI_VERSION: &str = "1.0.0";
const DEFAULT_ITERS: usize = 100;
const WARMUP: usize = 5;
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// After this many failed operations the run stops (it is broken anyway).
const MAX_PROBLEMS: usize = 5;

/// The target: hop − direct, p50 of ADD.
const TARGET_OVERHEAD_MS: f64 = 2.0;

fn main() -> ExitCode {
    common::main("cni_hop", run)
}

// ---------------------------------------------------------------- host

/// Runs `ip ARGS`; its stderr on failure.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The bench's netns left in /var/run/netns.
fn our_netns() -> Vec<String> {
    fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(NETNS_PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

/// Leftovers of an interrupted earlier run: its netns and its bridge.
fn repair() {
    let stale = our_netns();
    if !stale.is_empty() {
        eprintln!(
            "cni_hop: removing {} netns an earlier run left",
            stale.len()
        );
    }
    for ns in stale {
        let _ = ip(&["netns", "del", &ns]);
    }
    if link_exists(BRIDGE) {
        eprintln!("cni_hop: removing bridge {BRIDGE} an earlier run left");
        let _ = ip(&["link", "del", BRIDGE]);
    }
}

/// Removes the bridge (and any netns still there) however the run ends.
struct HostGuard;

impl Drop for HostGuard {
    fn drop(&mut self) {
        for ns in our_netns() {
            let _ = ip(&["netns", "del", &ns]);
        }
        if link_exists(BRIDGE) {
            let _ = ip(&["link", "del", BRIDGE]);
        }
    }
}

// ---------------------------------------------------------------- chains

/// One network under test.
struct Chain {
    key: &'static str,
    title: String,
    ifname: &'static str,
    /// What the container's IP on `ifname` starts with.
    ip_prefix: &'static str,
    conflist: Value,
}

/// The bridge + host-local + portmap chain of config/cni/10-bridge.conflist
/// with the bench's own name, bridge, a /16 subnet and host-local state in
/// `data_dir`.
fn bridge_chain(data_dir: &Path) -> Result<Chain> {
    let path = common::repo().join("config/cni/10-bridge.conflist");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut v: Value = serde_json::from_str(&text)?;
    v["name"] = json!(NET_NAME);
    let plugins = v["plugins"]
        .as_array_mut()
        .ok_or_else(|| anyhow!("{}: no plugins", path.display()))?;
    for p in plugins.iter_mut().filter(|p| p["type"] == "bridge") {
        p["bridge"] = json!(BRIDGE);
        p["ipam"]["ranges"] = json!([[{ "subnet": SUBNET }]]);
        p["ipam"]["dataDir"] = json!(data_dir);
    }
    // "bridge (host-local, ipMasq) + portmap": the plugins, IPAM in brackets.
    let types: Vec<String> = plugins
        .iter()
        .map(|p| {
            let ty = p["type"].as_str().unwrap_or("?");
            let mut extra: Vec<&str> = p["ipam"]["type"].as_str().into_iter().collect();
            if p["ipMasq"] == true {
                extra.push("ipMasq");
            }
            if extra.is_empty() {
                ty.to_owned()
            } else {
                format!("{ty} ({})", extra.join(", "))
            }
        })
        .collect();
    Ok(Chain {
        key: "bridge",
        title: types.join(" + "),
        ifname: "eth0",
        ip_prefix: SUBNET_PREFIX,
        conflist: v,
    })
}

/// The cheap chain: Debian's `loopback` alone (it always answers for `lo`,
/// so that is the interface name).
fn loopback_chain() -> Chain {
    Chain {
        key: "loopback",
        title: "loopback".into(),
        ifname: "lo",
        ip_prefix: "127.",
        conflist: json!({
            "cniVersion": "1.0.0",
            "name": LO_NET_NAME,
            "plugins": [{ "type": "loopback" }],
        }),
    }
}

/// Whether a CNI result holds an IP starting with `prefix` on `ifname`.
fn check_result(result: &Value, ifname: &str, prefix: &str) -> Result<()> {
    let ifaces = result["interfaces"].as_array().cloned().unwrap_or_default();
    let found = result["ips"].as_array().is_some_and(|ips| {
        ips.iter().any(|ip| {
            let on_if = ip["interface"]
                .as_u64()
                .and_then(|i| ifaces.get(i as usize))
                .is_some_and(|i| i["name"] == ifname);
            on_if
                && ip["address"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(prefix))
        })
    });
    if !found {
        bail!("result has no {prefix}* IP on {ifname}: {result}");
    }
    Ok(())
}

// ---------------------------------------------------------------- agent

/// The agent holds no pods here: the runtime's runtimeConfig is used, no
/// extra networks, as for a pod the agent does not know.
struct NoPods;

impl PodNetworkLookup for NoPods {
    fn pod_network_info(&self, _pod_uid: &str) -> Option<PodNetworkInfo> {
        None
    }
}

/// The agent side, in the bench process: one runner (shared by the direct
/// calls and the socket server, so both use the same plugin VERSION cache
/// and result cache) and the server on its socket.
struct Agent {
    handler: Arc<CniHandler<ProcessExec>>,
    socket: PathBuf,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start_agent(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    chain: &Chain,
    plugin_dir: &Path,
) -> Result<Agent> {
    let conf_dir = dir.join("net.d");
    fs::create_dir_all(&conf_dir)?;
    fs::write(
        conf_dir.join(format!("10-{}.conflist", chain.key)),
        serde_json::to_vec_pretty(&chain.conflist)?,
    )?;
    let set = load_dir(&conf_dir);
    if let Some((path, e)) = set.errors.first() {
        bail!("CNI config {}: {e}", path.display());
    }
    if set.default.is_none() {
        bail!("no network in {}", conf_dir.display());
    }
    let exec = ProcessExec::new(vec![plugin_dir.to_path_buf()], PLUGIN_TIMEOUT);
    let runner = Arc::new(CniRunner::new(
        exec,
        Arc::new(NetworkStore::new(set)),
        ResultCache::new(dir.join("cache")),
        Arc::new(CniMetrics::new()),
    ));
    let handler = Arc::new(CniHandler {
        runner,
        pods: Arc::new(NoPods),
        events: Arc::new(CniEvents::new()),
        status: Arc::new(NetworkStatusBoard::new()),
    });
    let socket = dir.join("cni.sock");
    let listener = {
        let _enter = rt.enter();
        server::bind(&socket).with_context(|| format!("binding {}", socket.display()))?
    };
    let cancel = CancellationToken::new();
    let task = rt.spawn(server::serve(listener, handler.clone(), cancel.clone()));
    Ok(Agent {
        handler,
        socket,
        cancel,
        task,
    })
}

// ---------------------------------------------------------------- one pod

/// One sandbox as the runtime would describe it.
struct Pod {
    name: String,
    container_id: String,
    uid: String,
    netns: String,
}

impl Pod {
    fn new(seed: u64, n: usize) -> Pod {
        let name = format!("{NETNS_PREFIX}{n}");
        Pod {
            container_id: format!("{seed:016x}{:048x}", n),
            uid: format!(
                "{:08x}-0000-4000-8000-{:012x}",
                seed as u32,
                n as u64 & 0xffff_ffff_ffff
            ),
            netns: format!("{NETNS_DIR}/{name}"),
            name,
        }
    }

    fn args(&self) -> Vec<(String, String)> {
        [
            ("IgnoreUnknown", "1"),
            ("K8S_POD_NAMESPACE", "bench"),
            ("K8S_POD_NAME", &self.name),
            ("K8S_POD_UID", &self.uid),
            ("K8S_POD_INFRA_CONTAINER_ID", &self.container_id),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn attachment(&self, ifname: &str) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            netns: self.netns.clone(),
            ifname: ifname.to_owned(),
            args: self.args(),
            capability_args: Map::new(),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Direct,
    Socket,
    Hop,
}

const MODES: [Mode; 3] = [Mode::Direct, Mode::Socket, Mode::Hop];

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Socket => "socket",
            Mode::Hop => "hop",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct (in-process chain)",
            Mode::Socket => "socket (bench as plugin → agent → chain)",
            Mode::Hop => "hop (runtime → minilet-cni → agent → chain)",
        }
    }
}

/// What the runtime execs and hands the plugin.
struct Runtime {
    /// The release binary, copied under the name `minilet-cni`.
    plugin: PathBuf,
    /// The per-plugin config libcni builds from `install::runtime_conflist`:
    /// the plugin's object with the list's `name` and `cniVersion` injected
    /// (no `runtimeConfig`: no port mappings).
    plugin_conf: Value,
}

impl Runtime {
    fn new(plugin: PathBuf, socket: &Path) -> Result<Runtime> {
        let list: Value = serde_json::from_slice(&install::runtime_conflist(socket, None))?;
        let mut conf = list["plugins"][0].clone();
        if !conf.is_object() {
            bail!("runtime_conflist has no plugin: {list}");
        }
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        Ok(Runtime {
            plugin,
            plugin_conf: conf,
        })
    }

    /// Execs the plugin like libcni: the bench's environment plus the CNI
    /// variables, the config on stdin. Returns spawn → exit in ms.
    fn exec(
        &self,
        command: &str,
        pod: Option<(&Pod, &str)>,
        stdin: &[u8],
    ) -> Result<(f64, Output)> {
        let mut cmd = Command::new(&self.plugin);
        cmd.env("CNI_COMMAND", command)
            .env("CNI_PATH", self.plugin.parent().unwrap_or(Path::new("/")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((pod, ifname)) = pod {
            let args: Vec<String> = pod.args().iter().map(|(k, v)| format!("{k}={v}")).collect();
            cmd.env("CNI_CONTAINERID", &pod.container_id)
                .env("CNI_NETNS", &pod.netns)
                .env("CNI_IFNAME", ifname)
                .env("CNI_ARGS", args.join(";"));
        }
        let start = Instant::now();
        let mut child = cmd.spawn().context("spawning minilet-cni")?;
        let mut input = child.stdin.take().expect("stdin is piped");
        // Small enough for the pipe buffer: never blocks.
        match input.write_all(stdin) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
            _ => {}
        }
        drop(input);
        let out = child.wait_with_output()?;
        let took = ms(start.elapsed());
        if !out.status.success() {
            bail!(
                "minilet-cni {command} exited {}: stdout {:?} stderr {:?}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok((took, out))
    }

    fn stdin(&self, prev_result: Option<&Value>) -> Vec<u8> {
        let mut conf = self.plugin_conf.clone();
        if let Some(prev) = prev_result {
            conf["prevResult"] = prev.clone();
        }
        serde_json::to_vec(&conf).expect("JSON serialises")
    }
}

/// ADD then DEL in-process on the runner; (add ms, del ms).
fn run_direct(
    rt: &tokio::runtime::Runtime,
    agent: &Agent,
    chain: &Chain,
    pod: &Pod,
) -> Result<(f64, f64)> {
    let runner = &agent.handler.runner;
    let att = pod.attachment(chain.ifname);
    let start = Instant::now();
    let r = rt.block_on(runner.add("", &att));
    let add = ms(start.elapsed());
    let result = r.map_err(|e| anyhow!("ADD: {}", minilet::error_chain(&e)))?;
    let checked = check_result(&result, chain.ifname, chain.ip_prefix);
    let start = Instant::now();
    let r = rt.block_on(runner.del("", &att));
    let del = ms(start.elapsed());
    r.map_err(|e| anyhow!("DEL: {}", minilet::error_chain(&e)))?;
    checked?;
    Ok((add, del))
}

/// One request over the agent socket, the bench acting as the plugin.
fn exchange(socket: &Path, req: &AgentRequest) -> Result<AgentResponse> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(PLUGIN_TIMEOUT))?;
    s.write_all(&serde_json::to_vec(req)?)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    let resp: AgentResponse = serde_json::from_slice(&reply)
        .with_context(|| format!("agent answer {:?}", String::from_utf8_lossy(&reply)))?;
    if let Some(e) = resp.error {
        bail!("{} failed: {e}", req.command);
    }
    Ok(resp)
}

/// ADD then DEL over the socket, without the plugin process.
fn run_socket(agent: &Agent, chain: &Chain, pod: &Pod) -> Result<(f64, f64)> {
    let mut req = AgentRequest {
        command: CniCommand::Add,
        container_id: pod.container_id.clone(),
        netns: pod.netns.clone(),
        ifname: chain.ifname.to_owned(),
        args: pod.args(),
        runtime_config: Map::new(),
        cni_version: RUNTIME_CNI_VERSION.into(),
        prev_result: None,
    };
    let start = Instant::now();
    let r = exchange(&agent.socket, &req);
    let add = ms(start.elapsed());
    let result = r?
        .result
        .ok_or_else(|| anyhow!("ADD answered without a result"))?;
    let checked = check_result(&result, chain.ifname, chain.ip_prefix);
    req.command = CniCommand::Del;
    req.prev_result = Some(result);
    let start = Instant::now();
    let r = exchange(&agent.socket, &req);
    let del = ms(start.elapsed());
    r?;
    checked?;
    Ok((add, del))
}

/// ADD then DEL through the plugin process, as the runtime runs them.
fn run_hop(runtime: &Runtime, chain: &Chain, pod: &Pod) -> Result<(f64, f64)> {
    let (add, out) = runtime.exec("ADD", Some((pod, chain.ifname)), &runtime.stdin(None))?;
    let result: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "ADD printed {:?}",
            String::from_utf8_lossy(&out.stdout).trim()
        )
    })?;
    let checked = check_result(&result, chain.ifname, chain.ip_prefix);
    // DEL carries the runtime's cached result as prevResult, like libcni.
    let (del, _) = runtime.exec(
        "DEL",
        Some((pod, chain.ifname)),
        &runtime.stdin(Some(&result)),
    )?;
    checked?;
    Ok((add, del))
}

// ---------------------------------------------------------------- stats

#[derive(Clone, Copy, Debug)]
struct Stats {
    p50: f64,
    p90: f64,
    p99: f64,
    mean: f64,
}

impl Stats {
    fn of(v: &[f64]) -> Option<Stats> {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        Some(Stats {
            p50: common::pct(&s, 50.0)?,
            p90: common::pct(&s, 90.0)?,
            p99: common::pct(&s, 99.0)?,
            mean: s.iter().sum::<f64>() / s.len() as f64,
        })
    }

    fn minus(self, o: Stats) -> Stats {
        Stats {
            p50: self.p50 - o.p50,
            p90: self.p90 - o.p90,
            p99: self.p99 - o.p99,
            mean: self.mean - o.mean,
        }
    }

    fn json(self) -> Value {
        json!({
            "p50_ms": common::round3(self.p50),
            "p90_ms": common::round3(self.p90),
            "p99_ms": common::round3(self.p99),
            "mean_ms": common::round3(self.mean),
        })
    }

    fn cells(s: Option<Stats>) -> String {
        match s {
            Some(s) => format!("{:>8.2}{:>8.2}{:>8.2}{:>8.2}", s.p50, s.p90, s.p99, s.mean),
            None => format!("{:>8}{:>8}{:>8}{:>8}", "-", "-", "-", "-"),
        }
    }
}

/// Per-iteration samples of one chain, indexed by `Mode as usize`; only
/// iterations where every mode succeeded are kept, so they pair up.
#[derive(Default)]
struct Samples {
    add: [Vec<f64>; 3],
    del: [Vec<f64>; 3],
}

/// The numbers of one operation (ADD or DEL) of one chain.
struct OpStats {
    by_mode: [Option<Stats>; 3],
    overhead: Option<Stats>,
    paired: Option<Stats>,
}

impl OpStats {
    fn new(s: &[Vec<f64>; 3]) -> OpStats {
        let by_mode = [
            Stats::of(&s[Mode::Direct as usize]),
            Stats::of(&s[Mode::Socket as usize]),
            Stats::of(&s[Mode::Hop as usize]),
        ];
        let overhead = match (by_mode[Mode::Hop as usize], by_mode[Mode::Direct as usize]) {
            (Some(h), Some(d)) => Some(h.minus(d)),
            _ => None,
        };
        let diffs: Vec<f64> = s[Mode::Hop as usize]
            .iter()
            .zip(&s[Mode::Direct as usize])
            .map(|(h, d)| h - d)
            .collect();
        OpStats {
            by_mode,
            overhead,
            paired: Stats::of(&diffs),
        }
    }

    fn mode(&self, m: Mode) -> Option<Stats> {
        self.by_mode[m as usize]
    }

    fn json(&self) -> Value {
        let j = |s: Option<Stats>| s.map_or(Value::Null, Stats::json);
        json!({
            "direct": j(self.mode(Mode::Direct)),
            "socket": j(self.mode(Mode::Socket)),
            "hop": j(self.mode(Mode::Hop)),
            "overhead": j(self.overhead),
            "overhead_paired": j(self.paired),
        })
    }
}

// ---------------------------------------------------------------- run

struct Ctx<'a> {
    rt: &'a tokio::runtime::Runtime,
    seed: u64,
    counter: usize,
    problems: Vec<String>,
    /// Process start alone: `minilet-cni` VERSION, and `/bin/true`.
    version_exec: Vec<f64>,
    true_exec: Vec<f64>,
}

/// One mode on a fresh netns; cleans up after itself even on failure.
fn one(
    ctx: &mut Ctx,
    agent: &Agent,
    runtime: &Runtime,
    chain: &Chain,
    mode: Mode,
) -> Result<(f64, f64)> {
    let pod = Pod::new(ctx.seed, ctx.counter);
    ctx.counter += 1;
    ip(&["netns", "add", &pod.name])?;
    let r = match mode {
        Mode::Direct => run_direct(ctx.rt, agent, chain, &pod),
        Mode::Socket => run_socket(agent, chain, &pod),
        Mode::Hop => run_hop(runtime, chain, &pod),
    };
    if r.is_err() {
        // Whatever got attached: best effort, through the runner.
        let _ = ctx
            .rt
            .block_on(agent.handler.runner.del("", &pod.attachment(chain.ifname)));
    }
    let d = ip(&["netns", "del", &pod.name]);
    let v = r?;
    d?;
    Ok(v)
}

/// The process-start floor of the hop: `minilet-cni` answering VERSION
/// itself (no stdin read, no socket), and `/bin/true`.
fn exec_floor(ctx: &mut Ctx, runtime: &Runtime, keep: bool) -> Result<()> {
    let (took, out) = runtime.exec("VERSION", None, b"")?;
    if !String::from_utf8_lossy(&out.stdout).contains("supportedVersions") {
        bail!(
            "minilet-cni VERSION printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let start = Instant::now();
    let status = Command::new("/bin/true").status()?;
    let t = ms(start.elapsed());
    if !status.success() {
        bail!("/bin/true exited {status}");
    }
    if keep {
        ctx.version_exec.push(took);
        ctx.true_exec.push(t);
    }
    Ok(())
}

/// All iterations of one chain (fewer when the run had to stop early).
fn bench_chain(
    ctx: &mut Ctx,
    work: &Path,
    chain: &Chain,
    plugin: &Path,
    plugin_dir: &Path,
    iters: usize,
) -> Result<Samples> {
    let dir = work.join(chain.key);
    let agent = start_agent(ctx.rt, &dir, chain, plugin_dir)?;
    let runtime = Runtime::new(plugin.to_path_buf(), &agent.socket)?;
    let mut samples = Samples::default();
    eprintln!(
        "cni_hop: chain {}: {WARMUP} warm-up + {iters} iterations of direct/socket/hop ADD+DEL",
        chain.key
    );
    for i in 0..WARMUP + iters {
        let keep = i >= WARMUP;
        let mut row = [(0.0, 0.0); 3];
        let mut ok = true;
        // Rotate the order so drift and cache effects hit every mode alike.
        for k in 0..MODES.len() {
            let mode = MODES[(i + k) % MODES.len()];
            match one(ctx, &agent, &runtime, chain, mode) {
                Ok(v) => row[mode as usize] = v,
                Err(e) => {
                    ok = false;
                    ctx.problems
                        .push(format!("{} {} iteration {i}: {e:#}", chain.key, mode.key()));
                }
            }
        }
        if let Err(e) = exec_floor(ctx, &runtime, keep) {
            ctx.problems.push(format!("exec floor: {e:#}"));
        }
        if ok && keep {
            for (m, (a, d)) in row.iter().enumerate() {
                samples.add[m].push(*a);
                samples.del[m].push(*d);
            }
        }
        if ctx.problems.len() >= MAX_PROBLEMS {
            ctx.problems.push("stopped early: too many errors".into());
            break;
        }
    }
    // Leak checks of the agent side, then stop it.
    match ctx.rt.block_on(agent.handler.runner.cache().list()) {
        Ok(left) if !left.is_empty() => ctx.problems.push(format!(
            "{}: {} attachments left in the result cache",
            chain.key,
            left.len()
        )),
        Ok(_) => {}
        Err(e) => ctx
            .problems
            .push(format!("{}: cannot list the result cache: {e}", chain.key)),
    }
    agent.cancel.cancel();
    let stopped = ctx
        .rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), agent.task).await });
    if !matches!(stopped, Ok(Ok(()))) {
        ctx.problems
            .push(format!("{}: the agent server did not stop", chain.key));
    }
    Ok(samples)
}

/// Host-local's reservations left in its data dir (one file per IP).
fn leaked_ips(data_dir: &Path) -> Vec<String> {
    fs::read_dir(data_dir.join(NET_NAME))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "lock" && !n.starts_with("last_reserved_ip"))
                .collect()
        })
        .unwrap_or_default()
}

/// NAT rules naming one of this run's containers (bridge's ipMasq rules
/// carry the container id in their comment).
fn leaked_nat_rules(seed: u64) -> Option<usize> {
    let out = Command::new("iptables")
        .args(["-t", "nat", "-S"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| {
        let id = format!("{seed:016x}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&id))
            .count()
    })
}

fn veths_on_bridge() -> usize {
    fs::read_dir(Path::new("/sys/class/net").join(BRIDGE).join("brif")).map_or(0, |d| d.count())
}

fn run() -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root (netns, bridge, iptables)");
    }
    let iters: usize = common::env_positive("BENCH_ITERS", DEFAULT_ITERS)?;
    let plugin_dir = std::env::var_os("CNI_PLUGIN_DIR")
        .map_or_else(|| PathBuf::from("/usr/lib/cni"), PathBuf::from);
    for p in ["bridge", "host-local", "portmap", "loopback"] {
        if !plugin_dir.join(p).is_file() {
            bail!(
                "{} missing (Debian: apt-get install containernetworking-plugins)",
                plugin_dir.join(p).display()
            );
        }
    }
    let bin = common::minilet_binary("cni_hop")?;
    let bin_bytes = fs::metadata(&bin)?.len();
    let out = common::target_dir().join("bench-cni-hop");
    fs::create_dir_all(&out)?;
    let work = tempfile::Builder::new()
        .prefix("minilet-cni-hop-")
        .tempdir()
        .context("creating a work dir")?;
    // The runtime's bin dir: the binary under the plugin's name, copied as
    // `install` does.
    let bin_dir = work.path().join("bin");
    fs::create_dir_all(&bin_dir)?;
    let plugin = bin_dir.join(install::PLUGIN_NAME);
    fs::copy(&bin, &plugin).with_context(|| format!("copying {}", bin.display()))?;

    repair();
    let _host = HostGuard;
    // Like the agent: two workers.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
        .context("starting tokio")?;
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id());
    let mut ctx = Ctx {
        rt: &rt,
        seed,
        counter: 0,
        problems: vec![],
        version_exec: vec![],
        true_exec: vec![],
    };
    let data_dir = work.path().join("host-local");
    let chains = [bridge_chain(&data_dir)?, loopback_chain()];
    let mut results = vec![];
    for chain in &chains {
        let s = bench_chain(&mut ctx, work.path(), chain, &plugin, &plugin_dir, iters)?;
        results.push(s);
        if ctx.problems.len() >= MAX_PROBLEMS {
            break;
        }
    }

    // Leftovers on the host.
    let ips = leaked_ips(&data_dir);
    if !ips.is_empty() {
        ctx.problems.push(format!(
            "host-local still holds {} IPs: {}",
            ips.len(),
            ips.join(" ")
        ));
    }
    let veths = veths_on_bridge();
    if veths != 0 {
        ctx.problems
            .push(format!("{veths} interfaces still on bridge {BRIDGE}"));
    }
    match leaked_nat_rules(seed) {
        Some(0) | None => {}
        Some(n) => ctx
            .problems
            .push(format!("{n} iptables nat rules of this run left")),
    }
    let netns = our_netns();
    if !netns.is_empty() {
        ctx.problems
            .push(format!("netns left: {}", netns.join(" ")));
    }
    if link_exists(BRIDGE)
        && let Err(e) = ip(&["link", "del", BRIDGE])
    {
        ctx.problems.push(format!("removing the bridge: {e:#}"));
    }

    // Report.
    let version = Stats::of(&ctx.version_exec);
    let true_exec = Stats::of(&ctx.true_exec);
    let mut chains_json = Map::new();
    let mut all_met = true;
    let mut verdicts = vec![];
    println!();
    println!(
        "CNI delegating hop vs the same chain in-process: {iters} iterations (+{WARMUP} warm-up) per chain, \
         modes rotated per iteration, a fresh netns per ADD; minilet {:.1} MiB ({})",
        bin_bytes as f64 / (1024.0 * 1024.0),
        bin.display()
    );
    for (chain, s) in chains.iter().zip(&results) {
        let add = OpStats::new(&s.add);
        let del = OpStats::new(&s.del);
        let n = s.add[0].len();
        println!();
        println!(
            "chain {:?}: {}, ifname {}, {n} paired iterations",
            chain.key, chain.title, chain.ifname
        );
        println!(
            "{:<46}{:^32}   {:^32}",
            "", "------------ ADD (ms) ----------", "------------ DEL (ms) ----------"
        );
        println!(
            "{:<46}{:>8}{:>8}{:>8}{:>8}   {:>8}{:>8}{:>8}{:>8}",
            "", "p50", "p90", "p99", "mean", "p50", "p90", "p99", "mean"
        );
        let row = |label: &str, a: Option<Stats>, d: Option<Stats>| {
            println!("{label:<46}{}   {}", Stats::cells(a), Stats::cells(d));
        };
        // Labels carry multi-byte arrows: pad by chars, not bytes.
        let pad = |l: &str| {
            format!(
                "{l}{}",
                " ".repeat(46usize.saturating_sub(l.chars().count()))
            )
        };
        for m in MODES {
            row(&pad(m.label()), add.mode(m), del.mode(m));
        }
        row(&pad("overhead (hop − direct)"), add.overhead, del.overhead);
        row(
            &pad("overhead, paired per iteration"),
            add.paired,
            del.paired,
        );
        let over = add.overhead.map(|o| o.p50);
        let met = over.is_some_and(|o| o <= TARGET_OVERHEAD_MS);
        all_met &= met;
        let verdict = if met { "MET" } else { "NOT MET" };
        verdicts.push(format!("{} {verdict}", chain.key));
        println!(
            "{}: ADD overhead p50 {} (paired {}): overhead p50 ≤ {TARGET_OVERHEAD_MS} ms: {verdict}",
            chain.key,
            over.map_or_else(|| "-".into(), |o| format!("{o:.2} ms")),
            add.paired
                .map_or_else(|| "-".into(), |p| format!("{:.2} ms", p.p50)),
        );
        if let (Some(d), Some(so), Some(h), Some(v)) = (
            add.mode(Mode::Direct),
            add.mode(Mode::Socket),
            add.mode(Mode::Hop),
            version,
        ) {
            println!(
                "{}: ADD p50 breakdown: socket + agent handler (socket − direct) {:.2} ms; \
                 plugin process (hop − socket) {:.2} ms, of which exec of minilet-cni alone (VERSION) {:.2} ms",
                chain.key,
                so.p50 - d.p50,
                h.p50 - so.p50,
                v.p50
            );
        }
        chains_json.insert(
            chain.key.into(),
            json!({
                "title": chain.title,
                "ifname": chain.ifname,
                "iterations": n,
                "add": add.json(),
                "del": del.json(),
                "overhead_p50_ms": over.map(common::round3),
                "target_met": met,
            }),
        );
    }
    println!();
    println!(
        "process start: exec minilet-cni VERSION {}; exec /bin/true {} (ms: p50 p90 p99 mean)",
        Stats::cells(version).trim_start(),
        Stats::cells(true_exec).trim_start()
    );
    let overall = if all_met && !results.is_empty() {
        "MET"
    } else {
        "NOT MET"
    };
    println!(
        "target: overhead p50 ≤ {TARGET_OVERHEAD_MS} ms: {overall} ({})",
        verdicts.join(", ")
    );
    for p in &ctx.problems {
        println!("problem: {p}");
    }
    let j = |s: Option<Stats>| s.map_or(Value::Null, Stats::json);
    let report = json!({
        "iterations": iters,
        "warmup": WARMUP,
        "binary": bin.display().to_string(),
        "binary_bytes": bin_bytes,
        "plugin_dir": plugin_dir.display().to_string(),
        "chains": chains_json,
        "exec": {
            "minilet_cni_version": j(version),
            "bin_true": j(true_exec),
        },
        "target": {
            "overhead_p50_limit_ms": TARGET_OVERHEAD_MS,
            "met": all_met && !results.is_empty(),
        },
        "problems": ctx.problems,
    });
    let line = serde_json::to_string(&report)?;
    let json_path = out.join("result.json");
    fs::write(&json_path, format!("{line}\n"))?;
    println!("JSON: {line}");
    println!("(also written to {})", json_path.display());
    let ok = ctx.problems.is_empty();
    drop(rt);
    drop(work);
    // Not pass/fail on the target; only a broken run exits non-zero.
    Ok(ok)
}
