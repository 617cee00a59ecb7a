//! The network hooks on the running kernel: packets of a known shape sent over a veth pair
//! whose far end lives in a network namespace the test makes, counted by XDP, tc, cgroup_skb
//! and sock_ops, and checked against the kernel's own interface counters. Needs root and
//! iproute2's `ip`.

mod common;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    process::Command,
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::util::KernelVersion;
use common::*;
use fathom_crds::{result::ResultData, verdict::Reason};
use fathom_node::{
    EngineError,
    engine::{
        plan::{self, Scope},
        render::cgroup_id,
        session::{EngineOptions, Session},
    },
};

type Job = Box<dyn FnOnce() + Send>;

/// A thread in a network namespace of its own; what it runs (and every process it starts)
/// lives there. The namespace, and the veth end in it, go when it is dropped.
struct NetNs {
    tx: Option<mpsc::Sender<Job>>,
    handle: Option<JoinHandle<()>>,
    tid: i32,
}

impl NetNs {
    fn new() -> NetNs {
        let (tx, rx) = mpsc::channel::<Job>();
        let (tid_tx, tid_rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            // SAFETY: unshare(2) and gettid(2) on this thread only.
            #[allow(unsafe_code, reason = "a network namespace for this thread")]
            let (rc, tid) = unsafe { (libc::unshare(libc::CLONE_NEWNET), libc::gettid()) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            );
            tid_tx.send(tid).expect("tid");
            for job in rx {
                job();
            }
        });
        let tid = tid_rx.recv().expect("the namespace thread starts");
        NetNs {
            tx: Some(tx),
            handle: Some(handle),
            tid,
        }
    }

    /// Runs `f` in the namespace and returns what it returns.
    fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = mpsc::channel();
        self.tx
            .as_ref()
            .expect("open")
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .expect("the namespace thread runs");
        rx.recv().expect("the job finishes")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2's ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn no_ipv6(dev: &str) {
    // No router solicitations or neighbour discovery: the only packets are the test's.
    let p = format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6");
    if std::path::Path::new(&p).exists() {
        std::fs::write(&p, "1").expect("disable IPv6");
    }
}

const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);

/// A veth pair: `host` here at 10.201.0.1, `peer` in `ns` at 10.201.0.2, with static
/// neighbour entries so that no ARP crosses it either.
struct Veth {
    host: String,
    ns: NetNs,
}

impl Veth {
    fn new() -> Veth {
        static N: AtomicU32 = AtomicU32::new(0);
        let host = format!(
            "fxh{}n{}",
            std::process::id() % 10000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let peer = format!("{host}p");
        let ns = NetNs::new();
        ip(&[
            "link",
            "add",
            &host,
            "address",
            "02:00:0a:c9:00:01",
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "address",
            "02:00:0a:c9:00:02",
        ]);
        ip(&["link", "set", &peer, "netns", &ns.tid.to_string()]);
        no_ipv6(&host);
        ip(&["addr", "add", "10.201.0.1/24", "dev", &host]);
        ip(&[
            "neigh",
            "replace",
            "10.201.0.2",
            "lladdr",
            "02:00:0a:c9:00:02",
            "dev",
            &host,
            "nud",
            "permanent",
        ]);
        ip(&["link", "set", &host, "up"]);
        let p = peer.clone();
        ns.run(move || {
            no_ipv6(&p);
            ip(&["link", "set", "lo", "up"]);
            ip(&["addr", "add", "10.201.0.2/24", "dev", &p]);
            ip(&[
                "neigh",
                "replace",
                "10.201.0.1",
                "lladdr",
                "02:00:0a:c9:00:01",
                "dev",
                &p,
                "nud",
                "permanent",
            ]);
            ip(&["link", "set", &p, "up"]);
        });
        Veth { host, ns }
    }

    /// A counter of the host end, from sysfs (`rx_packets`, `tx_bytes`, …).
    fn stat(&self, name: &str) -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{}/statistics/{name}", self.host))
            .expect("interface statistics")
            .trim()
            .parse()
            .expect("a number")
    }

    /// `n` UDP datagrams of `size` bytes from the peer to the host's `port`, all received.
    fn udp_to_host(&self, port: u16, n: usize, size: usize) {
        let rx = UdpSocket::bind(SocketAddrV4::new(HOST_IP, port)).expect("bind on the host");
        rx.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        self.ns.run(move || {
            let tx = UdpSocket::bind(SocketAddrV4::new(PEER_IP, 0)).expect("bind in the ns");
            for _ in 0..n {
                tx.send_to(&vec![7u8; size], SocketAddrV4::new(HOST_IP, port))
                    .expect("send");
            }
        });
        let mut buf = vec![0u8; 65536];
        for i in 0..n {
            let got = rx
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i}: {e}"));
            assert_eq!(got, size);
        }
    }

    /// `n` UDP datagrams of `size` bytes from the host to the peer's `port`, all received.
    fn udp_to_peer(&self, port: u16, n: usize, size: usize) {
        let (ready_tx, ready_rx) = mpsc::channel();
        let receiver = {
            let (done_tx, done_rx) = mpsc::channel();
            let ready = ready_tx.clone();
            self.ns
                .tx
                .as_ref()
                .expect("open")
                .send(Box::new(move || {
                    let rx = UdpSocket::bind(SocketAddrV4::new(PEER_IP, port)).expect("bind");
                    rx.set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("timeout");
                    ready.send(()).expect("ready");
                    let mut buf = vec![0u8; 65536];
                    let mut got = 0;
                    while got < n && rx.recv(&mut buf).is_ok() {
                        got += 1;
                    }
                    done_tx.send(got).expect("done");
                }))
                .expect("the namespace thread runs");
            done_rx
        };
        ready_rx.recv().expect("the receiver is bound");
        let tx = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).expect("bind on the host");
        for _ in 0..n {
            tx.send_to(&vec![7u8; size], SocketAddrV4::new(PEER_IP, port))
                .expect("send");
        }
        assert_eq!(receiver.recv().expect("the receiver ends"), n);
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host])
            .output();
    }
}

fn start_yaml(yaml: &str) -> Result<Session, EngineError> {
    start_with(yaml, EngineOptions::default())
}

fn row(r: &ResultData, keys: &[(&str, &str)]) -> u64 {
    r.rows
        .iter()
        .filter(|row| {
            keys.iter()
                .all(|(k, v)| row.keys.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|row| row.value)
        .sum()
}

fn total(r: &ResultData) -> u64 {
    r.rows.iter().map(|row| row.value).sum::<u64>() + r.other.as_ref().map_or(0, |o| o.value)
}

/// Ethernet + IPv4 + UDP headers.
const L2_UDP: u64 = 14 + 20 + 8;
const L3_UDP: u64 = 20 + 8;

#[test]
fn xdp_counts_each_received_packet_by_protocol_source_and_port_as_the_interface_does() {
    let _k = KernelTest::begin();
    let v = Veth::new();
    let (n, size, port) = (50, 100, 5301);
    let by = "aggregate: { by: [interface, direction, protocol, saddr, daddr, dport] }";
    let s = start_yaml(&format!(
        "probe: {{ network: {{ hook: xdp, interface: {} }} }}\n{by}",
        v.host
    ))
    .expect("XDP attaches to a veth");
    let rx_before = v.stat("rx_packets");
    v.udp_to_host(port, n, size);
    let rx = v.stat("rx_packets") - rx_before;
    let r = s.stop().expect("stops");
    let want = [
        ("interface", v.host.as_str()),
        ("direction", "ingress"),
        ("protocol", "udp"),
        ("saddr", "10.201.0.2"),
        ("daddr", "10.201.0.1"),
        ("dport", "5301"),
    ];
    assert_eq!(row(&r, &want), n as u64, "{:?}", r.rows);
    assert_eq!(
        rx, n as u64,
        "the interface received only the test's packets"
    );
    assert_eq!(total(&r), rx, "XDP saw every packet the interface counted");
    assert_eq!(r.totals.hits, rx);
}

#[test]
fn xdp_sums_bytes_of_the_frames() {
    let _k = KernelTest::begin();
    let v = Veth::new();
    let (n, size) = (20, 333);
    let s = start_yaml(&format!(
        "probe: {{ network: {{ hook: xdp, interface: {} }} }}\naggregate: {{ by: [dport], value: sum(bytes) }}",
        v.host
    ))
    .expect("attaches");
    v.udp_to_host(5302, n, size);
    let r = s.stop().expect("stops");
    // Whole frames, Ethernet header included (the veth's rx_bytes is no oracle for bytes: it
    // leaves the header out on some paths and counts it on others).
    assert_eq!(
        row(&r, &[("dport", "5302")]),
        n as u64 * (L2_UDP + size as u64)
    );
    assert_eq!(total(&r), n as u64 * (L2_UDP + size as u64), "{:?}", r.rows);
}

#[test]
fn tc_counts_both_directions_on_an_interface_or_refuses_without_tcx() {
    let _k = KernelTest::begin();
    let v = Veth::new();
    let yaml = format!(
        "probe: {{ network: {{ hook: tc, interface: {} }} }}\naggregate: {{ by: [direction, protocol, dport], value: sum(bytes) }}",
        v.host
    );
    if KernelVersion::current().expect("kernel version") < KernelVersion::new(6, 6, 0) {
        match start_yaml(&yaml) {
            Err(EngineError::NotFeasible(verdict)) => {
                let p = verdict.first_problem().expect("a problem");
                assert_eq!(p.reason, Some(Reason::AttachKindUnsupported));
                assert!(p.message.contains("TCX"), "{}", p.message);
            }
            other => panic!(
                "tc must be refused before Linux 6.6: {:?}",
                other.map(|_| ())
            ),
        }
        return;
    }
    let s = start_yaml(&yaml).expect("tc attaches through TCX");
    let (rx0, tx0) = (v.stat("rx_bytes"), v.stat("tx_bytes"));
    v.udp_to_host(5303, 30, 64);
    v.udp_to_peer(5304, 40, 200);
    let (rx, tx) = (v.stat("rx_bytes") - rx0, v.stat("tx_bytes") - tx0);
    let r = s.stop().expect("stops");
    let ingress = row(
        &r,
        &[
            ("direction", "ingress"),
            ("protocol", "udp"),
            ("dport", "5303"),
        ],
    );
    let egress = row(
        &r,
        &[
            ("direction", "egress"),
            ("protocol", "udp"),
            ("dport", "5304"),
        ],
    );
    assert_eq!(ingress, 30 * (L2_UDP + 64));
    assert_eq!(egress, 40 * (L2_UDP + 200));
    assert_eq!(row(&r, &[("direction", "ingress")]), rx, "{:?}", r.rows);
    assert_eq!(row(&r, &[("direction", "egress")]), tx, "{:?}", r.rows);
}

#[test]
fn cgroup_skb_counts_the_packets_of_the_jobs_cgroups_only() {
    let _k = KernelTest::begin();
    let v = Veth::new();
    // This process in a cgroup of its own (its sockets are made after the move), and an
    // empty cgroup beside it.
    let mine = MovedTo::new("mine");
    let empty = MovedTo::empty("empty");
    let spec = spec(
        "probe: { network: { hook: cgroupSkb } }\naggregate: { by: [direction, protocol, saddr, dport] }",
    );
    let p = plan::plan(&spec, kernel(), Scope::targets([mine.id])).expect("plans");
    let s = Session::start(p, kernel(), EngineOptions::default()).expect("attaches");
    let other = plan::plan(&spec, kernel(), Scope::targets([empty.id])).expect("plans");
    let other = Session::start(other, kernel(), EngineOptions::default()).expect("attaches");
    v.udp_to_host(5305, 25, 10);
    let r = s.stop().expect("stops");
    let nobody = other.stop().expect("stops");
    drop(mine);
    let egress = row(
        &r,
        &[
            ("direction", "egress"),
            ("protocol", "udp"),
            ("saddr", "10.201.0.2"),
            ("dport", "5305"),
        ],
    );
    let ingress = row(
        &r,
        &[
            ("direction", "ingress"),
            ("protocol", "udp"),
            ("saddr", "10.201.0.2"),
            ("dport", "5305"),
        ],
    );
    assert_eq!(
        (egress, ingress),
        (25, 25),
        "both ends are this process's sockets: {:?}",
        r.rows
    );
    assert_eq!(
        row(&nobody, &[("dport", "5305")]),
        0,
        "the empty cgroup's job sees none of them: {:?}",
        nobody.rows
    );
    assert!(nobody.totals.filtered >= 50, "{:?}", nobody.totals);
}

/// A cgroup v2 directory made for a test, with this process moved into it (and back to where
/// it was on drop), or left empty.
struct MovedTo {
    id: u64,
    dir: std::path::PathBuf,
    back: Option<std::path::PathBuf>,
}

impl MovedTo {
    fn empty(tag: &str) -> MovedTo {
        let root = fathom_node::engine::render::cgroup2_root();
        let dir = root.join(format!("fathom-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).expect("a cgroup for the test");
        MovedTo {
            id: cgroup_id(&dir).expect("its id"),
            dir,
            back: None,
        }
    }

    fn new(tag: &str) -> MovedTo {
        let mut m = MovedTo::empty(tag);
        let text = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        let now = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup v2 line");
        let root = fathom_node::engine::render::cgroup2_root();
        m.back = Some(root.join(now.trim_start_matches('/')));
        std::fs::write(m.dir.join("cgroup.procs"), std::process::id().to_string())
            .expect("move this process");
        m
    }
}

impl Drop for MovedTo {
    fn drop(&mut self) {
        if let Some(back) = &self.back {
            let _ = std::fs::write(back.join("cgroup.procs"), std::process::id().to_string());
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn cgroup_skb_sums_network_layer_bytes() {
    let _k = KernelTest::begin();
    let v = Veth::new();
    let s = start_yaml(
        "probe: { network: { hook: cgroupSkb, direction: egress } }\naggregate: { by: [direction, dport], value: sum(bytes) }",
    )
    .expect("attaches");
    v.udp_to_peer(5306, 12, 500);
    let r = s.stop().expect("stops");
    assert_eq!(
        row(&r, &[("direction", "egress"), ("dport", "5306")]),
        12 * (L3_UDP + 500)
    );
    assert_eq!(row(&r, &[("direction", "ingress")]), 0, "egress only");
}

/// A TCP echo over the veth: the peer connects to the host's `port` and sends 20 rounds of
/// 1000 bytes, each echoed back.
fn tcp_echo(v: &Veth, port: u16) {
    let listener = TcpListener::bind(SocketAddrV4::new(HOST_IP, port)).expect("listen");
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => c.write_all(&buf[..n]).expect("echo"),
            }
        }
    });
    v.ns.run(move || {
        let mut c = TcpStream::connect(SocketAddrV4::new(HOST_IP, port)).expect("connect");
        let mut buf = [0u8; 1000];
        for _ in 0..20 {
            c.write_all(&[1u8; 1000]).expect("send");
            c.read_exact(&mut buf).expect("echo back");
        }
    });
    server.join().expect("server");
}

#[test]
fn sock_ops_samples_the_rtt_of_a_tcp_connection() {
    let _k = KernelTest::begin();
    let v = Veth::new();
    let s = start_yaml("probe: { catalog: tcp-rtt }").expect("attaches");
    tcp_echo(&v, 5307);
    let r = s.stop().expect("stops");
    assert_eq!(r.keys, vec!["daddr".to_string(), "dport".to_string()]);
    let h = r
        .histograms
        .iter()
        .find(|h| h.keys.get("daddr").map(String::as_str) == Some("10.201.0.1"))
        .unwrap_or_else(|| panic!("a histogram for the connection: {:?}", r.histograms));
    assert_eq!(h.keys["dport"], "5307");
    assert!(
        h.count >= 10,
        "an RTT sample per acknowledged round trip: {h:?}"
    );
    // A veth round trip is well under a second.
    assert!(
        h.buckets.iter().all(|b| b.count == 0 || b.low < 1_000_000),
        "{h:?}"
    );
}

#[test]
fn sock_ops_for_target_cgroups_sees_only_their_connections() {
    let _k = KernelTest::begin();
    let v = Veth::new();
    let mine = MovedTo::new("sockops");
    let empty = MovedTo::empty("sockops-empty");
    let spec = spec("probe: { catalog: tcp-rtt }");
    // sock_ops has no filter: it attaches to the cgroups themselves.
    let p = plan::plan(&spec, kernel(), Scope::targets([mine.id])).expect("plans");
    let s = Session::start(p, kernel(), EngineOptions::default()).expect("attaches");
    let other = plan::plan(&spec, kernel(), Scope::targets([empty.id])).expect("plans");
    let other = Session::start(other, kernel(), EngineOptions::default()).expect("attaches");
    tcp_echo(&v, 5308);
    let r = s.stop().expect("stops");
    let nobody = other.stop().expect("stops");
    drop(mine);
    let h = r
        .histograms
        .iter()
        .find(|h| h.keys.get("dport").map(String::as_str) == Some("5308"))
        .unwrap_or_else(|| panic!("this cgroup's connection: {:?}", r.histograms));
    assert!(h.count >= 10, "{h:?}");
    assert!(
        nobody.histograms.is_empty(),
        "the empty cgroup's job saw connections: {:?}",
        nobody.histograms
    );
}

/// `tcp-life`: each connection once, as it closes, with the microseconds since its handshake
/// ended.
/// The workload's 6 loopback connects to its own listener are exactly 6 lifetimes under the
/// listener's port (the active sides), each well under a second; the passive sides are
/// counted under the clients' ports.
#[test]
fn sock_ops_times_each_connection_from_established_to_closed() {
    let _k = KernelTest::begin();
    let s = start_yaml("probe: { catalog: tcp-life }").expect("attaches");
    let out = workload(&comm("life"), "connect", 6, None);
    let r = s.stop().expect("stops");
    let port = out
        .lines()
        .find_map(|l| l.strip_prefix("port "))
        .expect("port line");
    assert_eq!(r.keys, vec!["daddr".to_string(), "dport".to_string()]);
    let loopback = |h: &&fathom_crds::result::Histogram| {
        h.keys.get("daddr").map(String::as_str) == Some("127.0.0.1")
    };
    let active = r
        .histograms
        .iter()
        .filter(loopback)
        .find(|h| h.keys["dport"] == port)
        .unwrap_or_else(|| panic!("the connections to {port}: {:?}", r.histograms));
    assert_eq!(active.count, 6, "{active:?}");
    assert!(
        active
            .buckets
            .iter()
            .all(|b| b.count == 0 || b.low < 1_000_000),
        "a loopback connect, accept and close take well under a second: {active:?}"
    );
    let passive: u64 = r
        .histograms
        .iter()
        .filter(loopback)
        .filter(|h| h.keys["dport"] != port)
        .map(|h| h.count)
        .sum();
    assert!(passive >= 6, "the accepted sides: {:?}", r.histograms);
}

#[test]
fn network_specs_name_the_field_and_the_fix() {
    let bad = [
        (
            "{ network: { hook: xdp } }\naggregate: { by: [pid] }",
            "spec.aggregate.by[0]",
        ),
        (
            "{ network: { hook: xdp, direction: egress } }",
            "spec.probe.network.direction",
        ),
        (
            "{ network: { hook: cgroupSkb, interface: eth0 } }",
            "spec.probe.network.interface",
        ),
        (
            "{ network: { hook: sockOps, event: drops } }",
            "spec.probe.network.event",
        ),
        ("{ network: { hook: bridge } }", "spec.probe.network.hook"),
        (
            "{ network: { hook: tc, interface: eth0 } }\naggregate: { value: hist(rtt) }",
            "spec.aggregate.value",
        ),
    ];
    for (probe, field) in bad {
        let s: fathom_crds::TraceJobSpec =
            serde_yaml::from_str(&format!("probe: {probe}")).expect("parses");
        let errors = s.validate().expect_err(probe);
        assert!(
            errors.iter().any(|e| e.field == field),
            "{probe}: {errors:?}"
        );
    }
    // An interface that does not exist is the node's verdict, before anything loads.
    match start_yaml("probe: { network: { hook: xdp, interface: fathom-nope0 } }") {
        Err(EngineError::NotFeasible(v)) => {
            let p = v.first_problem().expect("a problem");
            assert_eq!(p.reason, Some(Reason::SymbolNotFound));
            assert!(p.message.contains("fathom-nope0"), "{}", p.message);
        }
        other => panic!(
            "a missing interface is not feasible: {:?}",
            other.map(|_| ())
        ),
    }
}
