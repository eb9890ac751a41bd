//! Tests against the real plugins of Debian's containernetworking-plugins in
//! /usr/lib/cni, in network namespaces the tests create. They need root and
//! FAIL (never skip) without it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command as Proc;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::cache::ResultCache;
use super::chain::{Attachment, CniRunner};
use super::config::{NetworkConfigList, NetworkSet, NetworkStore};
use super::exec::ProcessExec;
use super::observe::{CniEvents, CniMetrics, NetworkStatusBoard};
use super::server::{CniHandler, PodNetworkInfo, PodNetworkLookup};

const PLUGINS: &str = "/usr/lib/cni";

/// Runs a command; (success, stdout + stderr).
fn sh(args: &[&str]) -> (bool, String) {
    let out = Proc::new(args[0]).args(&args[1..]).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A random-enough id per test (tests run in parallel, in one process).
fn uniq(tag: &str) -> (String, u64) {
    use std::hash::{BuildHasher, RandomState};
    let r = RandomState::new().hash_one((std::process::id(), tag));
    (format!("{:08x}", r as u32), r)
}

/// Everything a test created on the host, removed even when it panics:
/// each attachment's plugins get a DEL (IPAM leases, iptables, ifb), then
/// the netns and bridges go.
#[derive(Default)]
struct HostGuard {
    netns: Vec<String>,
    bridges: Vec<String>,
    /// (network, container id, ifname, netns path, runtimeConfig): portmap
    /// removes its rules only when told the port mappings again.
    attachments: Vec<(NetworkConfigList, String, String, String, Value)>,
}

impl HostGuard {
    fn netns(&mut self, name: &str) -> String {
        self.netns.push(name.to_owned());
        let (ok, out) = sh(&["ip", "netns", "add", name]);
        assert!(ok, "ip netns add {name} (needs root): {out}");
        format!("/var/run/netns/{name}")
    }
}

impl Drop for HostGuard {
    fn drop(&mut self) {
        use std::io::Write;
        use std::process::Stdio;
        for (net, cid, ifname, netns, rc) in self.attachments.iter().rev() {
            for p in net.plugins.iter().rev() {
                let mut conf = p.raw.clone();
                conf.insert("name".into(), net.name.clone().into());
                conf.insert("cniVersion".into(), net.cni_version.clone().into());
                conf.insert("runtimeConfig".into(), rc.clone());
                let child = Proc::new(format!("{PLUGINS}/{}", p.plugin_type))
                    .env("CNI_COMMAND", "DEL")
                    .env("CNI_CONTAINERID", cid)
                    .env("CNI_NETNS", netns)
                    .env("CNI_IFNAME", ifname)
                    .env("CNI_PATH", PLUGINS)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn();
                if let Ok(mut child) = child {
                    let _ = child
                        .stdin
                        .take()
                        .unwrap()
                        .write_all(&serde_json::to_vec(&conf).unwrap());
                    let _ = child.wait();
                }
            }
        }
        for ns in &self.netns {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        for br in &self.bridges {
            let _ = sh(&["ip", "link", "del", br]);
        }
    }
}

fn parse(list: Value) -> NetworkConfigList {
    super::config::parse(
        &serde_json::to_vec(&list).unwrap(),
        true,
        Path::new("real.conflist"),
    )
    .unwrap()
}

fn store(nets: &[&NetworkConfigList]) -> Arc<NetworkStore> {
    let mut set = NetworkSet::default();
    for n in nets {
        set.default.get_or_insert(n.name.clone());
        set.networks.insert(n.name.clone(), (*n).clone());
    }
    Arc::new(NetworkStore::new(set))
}

/// bridge + host-local (+ the given extra plugins) on a bridge and /24 of
/// the test's own; host-local keeps its leases in `data`.
fn bridge_net(
    name: &str,
    bridge: &str,
    subnet: &str,
    data: &Path,
    extra: Vec<Value>,
) -> NetworkConfigList {
    let mut plugins = vec![json!({
        "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
        "capabilities": {"ips": true},
        "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                 "routes": [{"dst": "0.0.0.0/0"}], "dataDir": data}
    })];
    plugins.extend(extra);
    parse(json!({"cniVersion": "1.0.0", "name": name, "plugins": plugins}))
}

fn args(cid: &str, uid: &str) -> Vec<(String, String)> {
    [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", "default"),
        ("K8S_POD_NAME", "web"),
        ("K8S_POD_UID", uid),
        ("K8S_POD_INFRA_CONTAINER_ID", cid),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The host-side veth of the attachment on `ifname` (from its result).
fn host_veth(result: &Value, bridge: &str) -> String {
    result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] != bridge && i.get("sandbox").is_none())
        .and_then(|i| i["name"].as_str())
        .expect("host veth in result")
        .to_owned()
}

/// The container IP (no prefix) on the interface the result names `ifname`.
fn container_ip(result: &Value, ifname: &str) -> String {
    let ifaces = result["interfaces"].as_array().unwrap();
    let idx = ifaces.iter().position(|i| i["name"] == ifname).unwrap();
    let ip = result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|ip| ip["interface"] == idx)
        .expect("an IP on the interface");
    ip["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned()
}

struct OnePod(String, PodNetworkInfo);
impl PodNetworkLookup for OnePod {
    fn pod_network_info(&self, uid: &str) -> Option<PodNetworkInfo> {
        (uid == self.0).then(|| self.1.clone())
    }
}

/// Two pods on a bridge + host-local + tuning + portmap + bandwidth chain
/// reach each other; the first one also gets an extra network (its own
/// bridge, a static IP and a MAC from the selection) through the handler;
/// tuning's sysctl and MAC, bandwidth's tbf and portmap's rule are on the
/// host for real, and everything is gone after DEL.
#[tokio::test]
async fn bridge_pods_reach_each_other_with_tuning_bandwidth_and_an_extra_network() {
    let (id, r) = uniq("reach");
    let (o2, o3) = (200 + (r >> 32) % 50, (r >> 40) % 250);
    let (br, br2) = (format!("mla{id}"), format!("mlb{id}"));
    let data = tempfile::tempdir().unwrap();
    let host_port = 20000 + (r >> 48) % 20000;
    let mut guard = HostGuard::default();
    guard.bridges = vec![br.clone(), br2.clone()];
    let net = bridge_net(
        &format!("mlt-{id}"),
        &br,
        &format!("10.{o2}.{o3}.0/24"),
        data.path(),
        vec![
            json!({"type": "tuning", "capabilities": {"mac": true},
                   "sysctl": {"net.ipv4.conf.eth0.arp_ignore": "1"}}),
            json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
            json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}),
            // A Docker engine's FORWARD policy DROP (with bridge netfilter
            // on) would drop the pings between the pods otherwise.
            json!({"type": "firewall"}),
        ],
    );
    let extra = bridge_net(
        &format!("mlx-{id}"),
        &br2,
        &format!("10.{o2}.{}.0/24", o3 + 1),
        data.path(),
        vec![json!({"type": "tuning", "capabilities": {"mac": true}})],
    );
    let (ns_a, ns_b) = (format!("mltest-a-{id}"), format!("mltest-b-{id}"));
    let (path_a, path_b) = (guard.netns(&ns_a), guard.netns(&ns_b));
    let (cid_a, cid_b) = (format!("mltest-a-{id}"), format!("mltest-b-{id}"));
    guard.attachments.push((
        net.clone(),
        cid_a.clone(),
        "eth0".into(),
        path_a.clone(),
        json!({"portMappings": [{"hostPort": host_port, "containerPort": 80, "protocol": "tcp"}]}),
    ));
    guard.attachments.push((
        extra.clone(),
        cid_a.clone(),
        "net1".into(),
        path_a.clone(),
        json!({}),
    ));
    guard.attachments.push((
        net.clone(),
        cid_b.clone(),
        "eth0".into(),
        path_b.clone(),
        json!({}),
    ));

    let cache = tempfile::tempdir().unwrap();
    let runner = Arc::new(CniRunner::new(
        ProcessExec::new(vec![PLUGINS.into()], Duration::from_secs(30)),
        store(&[&net, &extra]),
        ResultCache::new(cache.path()),
        Arc::new(CniMetrics::new()),
    ));
    let static_ip = format!("10.{o2}.{}.77", o3 + 1);
    let mac = "02:42:0a:00:00:77";
    let uid = format!("uid-{id}");
    let annotations: BTreeMap<String, String> = [
        (
            super::podnet::NETWORKS_ANNOTATION.to_string(),
            json!([{"name": extra.name, "ips": [format!("{static_ip}/24")], "mac": mac}])
                .to_string(),
        ),
        (
            super::podnet::INGRESS_BANDWIDTH_ANNOTATION.to_string(),
            "1M".to_string(),
        ),
        (
            super::podnet::EGRESS_BANDWIDTH_ANNOTATION.to_string(),
            "2M".to_string(),
        ),
    ]
    .into();
    let handler = CniHandler {
        runner: runner.clone(),
        pods: Arc::new(OnePod(
            uid.clone(),
            PodNetworkInfo {
                port_mappings: vec![super::server::PortMapping {
                    host_port: host_port as i32,
                    container_port: 80,
                    protocol: "tcp".into(),
                    host_ip: String::new(),
                }],
                annotations,
            },
        )),
        events: Arc::new(CniEvents::new()),
        status: Arc::new(NetworkStatusBoard::new()),
    };
    let req = |command, cid: &str, netns: &str| super::delegate::AgentRequest {
        command,
        container_id: cid.into(),
        netns: netns.into(),
        ifname: "eth0".into(),
        args: args(cid, &uid),
        runtime_config: Default::default(),
        cni_version: "1.0.0".into(),
        prev_result: None,
    };
    use super::exec::Command;
    let ra = handler
        .process(&req(Command::Add, &cid_a, &path_a))
        .await
        .unwrap()
        .unwrap();
    let rb = runner
        .add(
            "",
            &Attachment {
                container_id: cid_b.clone(),
                netns: path_b.clone(),
                ifname: "eth0".into(),
                args: args(&cid_b, "uid-b"),
                capability_args: Default::default(),
            },
        )
        .await
        .unwrap();
    let (ip_a, ip_b) = (container_ip(&ra, "eth0"), container_ip(&rb, "eth0"));

    // Connectivity over the bridge, both ways.
    for (ns, ip) in [(&ns_a, &ip_b), (&ns_b, &ip_a)] {
        let (ok, out) = sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "/bin/busybox",
            "ping",
            "-c",
            "1",
            "-W",
            "3",
            ip,
        ]);
        assert!(ok, "ping {ip} from {ns}: {out}");
    }
    // tuning: the sysctl inside the netns.
    let (_, v) = sh(&[
        "ip",
        "netns",
        "exec",
        &ns_a,
        "cat",
        "/proc/sys/net/ipv4/conf/eth0/arp_ignore",
    ]);
    assert_eq!(v.trim(), "1");
    // The extra network: net1 with the requested MAC and static IP.
    let (_, link) = sh(&["ip", "-n", &ns_a, "link", "show", "net1"]);
    assert!(link.contains(mac), "{link}");
    let (_, addr) = sh(&["ip", "-n", &ns_a, "-4", "addr", "show", "net1"]);
    assert!(addr.contains(&format!("{static_ip}/24")), "{addr}");
    let status = handler.status.get(&uid).unwrap();
    assert_eq!(status.len(), 2);
    assert_eq!(
        (status[1].interface.as_str(), status[1].mac.as_str()),
        ("net1", mac)
    );
    assert_eq!(status[1].ips, [static_ip.as_str()]);
    assert_eq!(status[0].ips, [ip_a.as_str()]);
    // bandwidth: tbf on the host veth (ingress) and on an ifb (egress).
    let veth_a = host_veth(&ra, &br);
    let (_, q) = sh(&["tc", "qdisc", "show", "dev", &veth_a]);
    assert!(q.contains("tbf"), "no tbf on {veth_a}: {q}");
    assert!(q.contains("rate 1Mbit"), "{q}");
    // portmap: a DNAT rule for the host port.
    let dport = format!("--dport {host_port}");
    let (_, nat) = sh(&["iptables", "-t", "nat", "-S"]);
    assert!(nat.contains(&dport), "portmap rule for {host_port}");
    // Timings per network in the pod's events; metrics for each plugin.
    let ev = handler.events.events(&uid);
    assert!(
        ev[0].message.starts_with("ADD bridge "),
        "{}",
        ev[0].message
    );
    assert!(ev[0].message.contains("bandwidth "), "{}", ev[0].message);
    let text = runner.metrics().render();
    assert!(
        text.contains(&format!(
            "minilet_cni_plugin_operations_total{{network=\"{}\",plugin=\"bandwidth\",command=\"ADD\",result=\"success\"}} 2",
            net.name
        )),
        "{text}"
    );
    // CHECK: the extra network's chain (bridge, host-local, tuning) passes.
    let a_net1 = Attachment {
        container_id: cid_a.clone(),
        netns: path_a.clone(),
        ifname: "net1".into(),
        args: args(&cid_a, &uid),
        capability_args: Default::default(),
    };
    runner.check(&extra.name, &a_net1).await.unwrap();
    // The default chain: bridge and tuning pass; Debian's portmap 1.1.1
    // fails its own CHECK on hosts without an IPv6 nat chain ("could not
    // check ipv6 dnat"), a plugin bug that must come through as its error.
    match handler.process(&req(Command::Check, &cid_a, &path_a)).await {
        Ok(_) => {}
        Err(e) => assert!(e.msg.contains("ipv6 dnat"), "{e:?}"),
    }
    let checks: Vec<_> = runner
        .metrics()
        .snapshot()
        .into_iter()
        .filter(|(k, v)| k.command == "CHECK" && k.result == "success" && v.count > 0)
        .map(|(k, _)| format!("{}/{}", k.network, k.plugin))
        .collect();
    for want in [
        format!("{}/bridge", net.name),
        format!("{}/tuning", net.name),
    ] {
        assert!(checks.contains(&want), "{checks:?}");
    }

    // DEL: everything the plugins made is gone.
    let leases = |net: &NetworkConfigList| -> Vec<String> {
        std::fs::read_dir(data.path().join(&net.name))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("10."))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(leases(&net).len(), 2);
    assert_eq!(leases(&extra), [static_ip.as_str()]);
    handler
        .process(&req(Command::Del, &cid_a, &path_a))
        .await
        .unwrap();
    runner
        .del(
            "",
            &Attachment {
                container_id: cid_b.clone(),
                netns: path_b.clone(),
                ifname: "eth0".into(),
                args: args(&cid_b, "uid-b"),
                capability_args: Default::default(),
            },
        )
        .await
        .unwrap();
    assert!(leases(&net).is_empty() && leases(&extra).is_empty());
    assert!(
        !sh(&["ip", "link", "show", &veth_a]).0,
        "veth {veth_a} removed"
    );
    let (_, nat) = sh(&["iptables", "-t", "nat", "-S"]);
    assert!(!nat.contains(&dport), "portmap rule removed");
    assert!(runner.cache().list().await.unwrap().is_empty());
    assert!(handler.status.get(&uid).is_none());
    // DEL again, and once the netns is gone: still fine.
    let _ = sh(&["ip", "netns", "del", &ns_b]);
    runner
        .del(
            "",
            &Attachment {
                container_id: cid_b.clone(),
                netns: path_b.clone(),
                ifname: "eth0".into(),
                args: args(&cid_b, "uid-b"),
                capability_args: Default::default(),
            },
        )
        .await
        .unwrap();
    handler
        .process(&req(Command::Del, &cid_a, &path_a))
        .await
        .unwrap();
}

/// Writes a script plugin that answers VERSION and DEL like a good one
/// and does `add` on ADD.
fn bad_plugin(dir: &Path, name: &str, add: &str) {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\ncat >/dev/null\ncase \"$CNI_COMMAND\" in\nVERSION) echo '{{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"1.0.0\"]}}'; exit 0;;\nADD) {add};;\n*) exit 0;;\nesac\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A real bridge first, then a plugin that hangs, one that fails with an
/// error object, one that prints garbage, and a missing one: each ADD fails
/// with a clear error and leaves no veth, lease or cache entry behind.
#[tokio::test]
async fn failing_plugins_after_a_real_bridge_leave_nothing_behind() {
    let (id, r) = uniq("fail");
    let (o2, o3) = (200 + (r >> 32) % 50, (r >> 40) % 250);
    let br = format!("mlf{id}");
    let data = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    bad_plugin(bin.path(), "hang", "sleep 300");
    bad_plugin(
        bin.path(),
        "fail",
        r#"echo '{"cniVersion":"1.0.0","code":105,"msg":"quota exceeded","details":"pod limit 0"}'; exit 1"#,
    );
    bad_plugin(bin.path(), "garbage", "echo 'this is not json'; exit 0");
    let mut guard = HostGuard::default();
    guard.bridges = vec![br.clone()];
    let ns = format!("mltest-f-{id}");
    let path = guard.netns(&ns);
    let cases = [
        ("hang", "timed out after 1s"),
        ("fail", "quota exceeded"),
        ("garbage", "this is not json"),
        ("missing", "plugin missing not found"),
    ];
    for (i, (plugin, want)) in cases.into_iter().enumerate() {
        let net = bridge_net(
            &format!("mlf{i}-{id}"),
            &br,
            &format!("10.{o2}.{o3}.0/24"),
            data.path(),
            vec![json!({"type": plugin})],
        );
        let cid = format!("mltest-f{i}-{id}");
        guard.attachments.push((
            net.clone(),
            cid.clone(),
            "eth0".into(),
            path.clone(),
            json!({}),
        ));
        let cache = tempfile::tempdir().unwrap();
        let runner = CniRunner::new(
            ProcessExec::new(
                vec![bin.path().into(), PLUGINS.into()],
                Duration::from_secs(1),
            ),
            store(&[&net]),
            ResultCache::new(cache.path()),
            Arc::new(CniMetrics::new()),
        );
        let att = Attachment {
            container_id: cid.clone(),
            netns: path.clone(),
            ifname: "eth0".into(),
            args: args(&cid, "u"),
            capability_args: Default::default(),
        };
        let start = std::time::Instant::now();
        let err = runner.add("", &att).await.unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{plugin}: no hang"
        );
        let pe = err.to_plugin_error();
        assert!(
            pe.msg.contains(want) || pe.details.contains(want),
            "{plugin}: {pe:?}"
        );
        if plugin == "fail" {
            assert_eq!((pe.code, pe.details.as_str()), (105, "pod limit 0"));
        }
        // Nothing leaks: no port on the bridge, no lease, no cache entry,
        // and eth0 is gone from the netns.
        let (_, ports) = sh(&["ip", "link", "show", "master", &br]);
        assert!(
            ports.trim().is_empty(),
            "{plugin}: bridge ports left: {ports}"
        );
        let leases: Vec<_> = std::fs::read_dir(data.path().join(&net.name))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            leases
                .iter()
                .all(|n| !n.to_string_lossy().starts_with("10.")),
            "{plugin}: leases left: {leases:?}"
        );
        assert!(runner.cache().list().await.unwrap().is_empty(), "{plugin}");
        assert!(
            !sh(&["ip", "-n", &ns, "link", "show", "eth0"]).0,
            "{plugin}"
        );
    }
}

// The crash between a plugin's ADD and the cache write is tested end to end
// with the real binary and the fault hook: integration/e2e/cni.rs,
// `kill9_between_add_and_cache_write_is_collected`.
