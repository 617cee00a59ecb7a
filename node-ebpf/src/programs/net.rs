//! The network programs: XDP, tc (clsact ingress/egress), cgroup_skb and sock_ops.
//!
//! They only observe. XDP returns `XDP_PASS`, tc returns `TC_ACT_UNSPEC` (the "continue"
//! verdict: the next filter or the qdisc's default decides), cgroup_skb returns 1 (allow) and
//! sock_ops returns 1. A packet is parsed into a [`NetKey`] (interface, direction, family,
//! protocol, addresses, ports) and counted with its bytes in `NET_AGG`.

use aya_ebpf::{
    Global,
    bindings::{
        __sk_buff, BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RETRANS_CB, BPF_SOCK_OPS_RETRANS_CB_FLAG,
        BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, TC_ACT_UNSPEC,
        xdp_action::XDP_PASS, xdp_md,
    },
    helpers::generated::{
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_skb_cgroup_id, bpf_skb_load_bytes,
        bpf_xdp_load_bytes,
    },
    macros::{cgroup_skb, classifier, map, sock_ops, xdp},
    maps::{HashMap, LruHashMap, PerCpuHashMap},
    programs::{SkBuffContext, SockOpsContext, TcContext, XdpContext},
};
use fathom_common::{AggValue, NetConfig, NetKey, counter, filter, log2_bucket, net};

use super::{CGROUPS, EEXIST, bump};

#[unsafe(no_mangle)]
static NET_CONFIG: Global<NetConfig> = Global::new(NetConfig::EMPTY);

#[map]
static NET_AGG: PerCpuHashMap<NetKey, AggValue> = PerCpuHashMap::with_max_entries(16384, 0);
/// xdp/tc on target pods: a pod's cgroup by the index of its veth's host side (the pod of
/// a packet there, which has no socket yet on ingress).
#[map]
static IF_CGROUPS: HashMap<u32, u64> = HashMap::with_max_entries(1, 0);
/// sock_ops `lifetime`: when each open connection began (ns since boot), by its socket
/// cookie. Least recently used entries go first: a connection pushed out by as many newer
/// ones is forgotten (its close then counts as a stash miss), never the newest.
#[map]
static LIFE_STARTS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(1, 0);

/// The socket's cookie: unique while it lives, the same in each of its callbacks.
fn socket_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the helper takes the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }
}

/// TCP_CLOSE in `enum tcp_state`.
const TCP_CLOSE: u32 = 7;

macro_rules! net_cfg {
    ($($field:tt)+) => { cfg!(NET_CONFIG, NetConfig, $($field)+) };
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_HLEN: u32 = 14;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;

/// Bytes of a packet, read through the kernel's checked copy helpers (a single parser for
/// every hook, no direct packet access for the verifier to bound).
trait Packet {
    fn read<const N: usize>(&self, offset: u32) -> Option<[u8; N]>;
    /// The packet's length as the hook sees it (XDP and tc from the link-layer header,
    /// cgroup_skb from the network header).
    fn len(&self) -> u32;

    fn u8_at(&self, offset: u32) -> Option<u8> {
        self.read::<1>(offset).map(|b| b[0])
    }
    fn be16_at(&self, offset: u32) -> Option<u16> {
        self.read::<2>(offset).map(u16::from_be_bytes)
    }
}

struct Xdp(*mut xdp_md);

impl Packet for Xdp {
    fn read<const N: usize>(&self, offset: u32) -> Option<[u8; N]> {
        let mut buf = [0u8; N];
        // SAFETY: the helper bounds the copy by the packet and by `N`.
        let r = unsafe { bpf_xdp_load_bytes(self.0, offset, buf.as_mut_ptr().cast(), N as u32) };
        (r == 0).then_some(buf)
    }
    fn len(&self) -> u32 {
        // SAFETY: the program's context.
        unsafe { ((*self.0).data_end - (*self.0).data) as u32 }
    }
}

struct Skb(*mut __sk_buff);

impl Packet for Skb {
    fn read<const N: usize>(&self, offset: u32) -> Option<[u8; N]> {
        let mut buf = [0u8; N];
        // SAFETY: the helper bounds the copy by the packet and by `N`.
        let r = unsafe {
            bpf_skb_load_bytes(
                self.0 as *const _,
                offset,
                buf.as_mut_ptr().cast(),
                N as u32,
            )
        };
        (r == 0).then_some(buf)
    }
    fn len(&self) -> u32 {
        // SAFETY: the program's context.
        unsafe { (*self.0).len }
    }
}

impl Skb {
    fn protocol(&self) -> u16 {
        // SAFETY: the program's context; the field holds a big-endian ethertype.
        u16::from_be(unsafe { (*self.0).protocol } as u16)
    }
    fn ifindex(&self) -> u32 {
        // SAFETY: the program's context.
        unsafe { (*self.0).ifindex }
    }
}

/// Fills the family, protocol, addresses and ports of the network header at `l3` (the
/// parts the job keys by); a frame that is not IP keeps family 0.
fn parse_l3<P: Packet>(p: &P, l3: u32, ethertype: u16, mask: u32, k: &mut NetKey) {
    let l4 = match ethertype {
        ETH_P_IP => {
            let Some(vihl) = p.u8_at(l3) else { return };
            k.family = net::IPV4;
            let protocol = p.u8_at(l3 + 9).unwrap_or(0);
            if mask & net::key::PROTOCOL != 0 {
                k.protocol = protocol;
            }
            if mask & net::key::SADDR != 0
                && let Some(a) = p.read::<4>(l3 + 12)
            {
                k.saddr[..4].copy_from_slice(&a);
            }
            if mask & net::key::DADDR != 0
                && let Some(a) = p.read::<4>(l3 + 16)
            {
                k.daddr[..4].copy_from_slice(&a);
            }
            // A later fragment carries no transport header.
            let frag = p.be16_at(l3 + 6).unwrap_or(0);
            if frag & 0x1fff != 0 {
                return;
            }
            (protocol, l3 + u32::from(vihl & 0x0f) * 4)
        }
        ETH_P_IPV6 => {
            k.family = net::IPV6;
            let protocol = p.u8_at(l3 + 6).unwrap_or(0);
            if mask & net::key::PROTOCOL != 0 {
                k.protocol = protocol;
            }
            if mask & net::key::SADDR != 0
                && let Some(a) = p.read::<16>(l3 + 8)
            {
                k.saddr = a;
            }
            if mask & net::key::DADDR != 0
                && let Some(a) = p.read::<16>(l3 + 24)
            {
                k.daddr = a;
            }
            // Extension headers are not walked: their ports stay 0.
            (protocol, l3 + 40)
        }
        _ => return,
    };
    let (protocol, at) = l4;
    if mask & (net::key::SPORT | net::key::DPORT) != 0
        && matches!(protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
    {
        if mask & net::key::SPORT != 0 {
            k.sport = p.be16_at(at).unwrap_or(0);
        }
        if mask & net::key::DPORT != 0 {
            k.dport = p.be16_at(at + 2).unwrap_or(0);
        }
    }
}

/// The ethertype and network-header offset of a frame with a link-layer header: Ethernet,
/// or one 802.1Q tag.
fn parse_l2<P: Packet>(p: &P) -> (u16, u32) {
    match p.be16_at(12) {
        Some(ETH_P_8021Q) => (p.be16_at(16).unwrap_or(0), ETH_HLEN + 4),
        Some(t) => (t, ETH_HLEN),
        None => (0, 0),
    }
}

/// Counts one packet (or socket event) of `bytes` under `k`, unless the cgroup filter
/// drops it; `hist_of` is the number a histogram buckets.
fn count(mut k: NetKey, cgroup: u64, bytes: u64, hist_of: u64) {
    let mask = net_cfg!(key_mask);
    if net_cfg!(filter_flags) & filter::CGROUP != 0 {
        // SAFETY: plain map lookup.
        if unsafe { CGROUPS.get(&cgroup) }.is_none() {
            bump(counter::FILTERED);
            return;
        }
    }
    if mask & net::key::CGROUP != 0 {
        k.cgroup = cgroup;
    }
    if mask & net::key::DIRECTION == 0 {
        k.direction = 0;
    } else if net_cfg!(pod_view) != 0 {
        k.direction = match k.direction {
            net::INGRESS => net::EGRESS,
            net::EGRESS => net::INGRESS,
            d => d,
        };
    }
    if mask & net::key::IFINDEX == 0 {
        k.ifindex = 0;
    }
    if mask & (net::key::PROTOCOL | net::key::SADDR | net::key::DADDR) == 0 {
        k.family = 0;
    }
    match net_cfg!(value_kind) {
        net::value::BYTES_HIST | net::value::MICROS_HIST => k.bucket = log2_bucket(hist_of),
        _ => {}
    }
    bump(counter::HITS);
    for _ in 0..2 {
        if let Some(v) = NET_AGG.get_ptr_mut(&k) {
            // SAFETY: per-CPU value, no other writer on this CPU.
            unsafe {
                (*v).count += 1;
                (*v).sum = (*v).sum.wrapping_add(bytes);
            }
            return;
        }
        let first = AggValue {
            count: 1,
            sum: bytes,
        };
        match NET_AGG.insert(&k, &first, BPF_NOEXIST as u64) {
            Ok(()) => return,
            Err(EEXIST) => continue,
            Err(_) => {
                bump(counter::MAP_FULL);
                return;
            }
        }
    }
}

/// The pod cgroup of a target pod's veth, when the job traces pods' interfaces.
fn pod_of(ifindex: u32) -> Option<u64> {
    // SAFETY: plain map lookup; the value is copied.
    unsafe { IF_CGROUPS.get(&ifindex) }.copied()
}

fn on_l2_packet<P: Packet>(p: &P, ifindex: u32, direction: u8, cgroup: u64) {
    let mask = net_cfg!(key_mask);
    let mut k = NetKey {
        ifindex,
        direction,
        ..NetKey::default()
    };
    let (ethertype, l3) = parse_l2(p);
    parse_l3(p, l3, ethertype, mask, &mut k);
    let len = p.len() as u64;
    count(k, cgroup, len, len);
}

fn on_tc(ctx: &TcContext, direction: u8) -> i32 {
    let skb = Skb(ctx.skb.skb);
    let ifindex = skb.ifindex();
    let cgroup = if net_cfg!(key_mask) & net::key::CGROUP != 0 {
        // SAFETY: the program's context; 0 when the packet has no socket yet.
        pod_of(ifindex).unwrap_or_else(|| unsafe { bpf_skb_cgroup_id(skb.0) })
    } else {
        0
    };
    on_l2_packet(&skb, ifindex, direction, cgroup);
    TC_ACT_UNSPEC
}

fn on_cgroup_skb(ctx: &SkBuffContext, direction: u8) -> i32 {
    let skb = Skb(ctx.skb.skb);
    let mask = net_cfg!(key_mask);
    let mut k = NetKey {
        ifindex: skb.ifindex(),
        direction,
        ..NetKey::default()
    };
    // cgroup_skb sees the packet from its network header on.
    parse_l3(&skb, 0, skb.protocol(), mask, &mut k);
    // SAFETY: the program's context.
    let cgroup = unsafe { bpf_skb_cgroup_id(skb.0) };
    let len = skb.len() as u64;
    count(k, cgroup, len, len);
    1
}

#[xdp]
pub fn fathom_xdp(ctx: XdpContext) -> u32 {
    let p = Xdp(ctx.ctx);
    // SAFETY: the program's context.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let cgroup = if net_cfg!(key_mask) & net::key::CGROUP != 0 {
        pod_of(ifindex).unwrap_or(0)
    } else {
        0
    };
    on_l2_packet(&p, ifindex, net::INGRESS, cgroup);
    XDP_PASS
}

#[classifier]
pub fn fathom_tc_ingress(ctx: TcContext) -> i32 {
    on_tc(&ctx, net::INGRESS)
}

#[classifier]
pub fn fathom_tc_egress(ctx: TcContext) -> i32 {
    on_tc(&ctx, net::EGRESS)
}

#[cgroup_skb]
pub fn fathom_cgroup_skb_ingress(ctx: SkBuffContext) -> i32 {
    on_cgroup_skb(&ctx, net::INGRESS)
}

#[cgroup_skb]
pub fn fathom_cgroup_skb_egress(ctx: SkBuffContext) -> i32 {
    on_cgroup_skb(&ctx, net::EGRESS)
}

/// TCP connections: asks the kernel for the callbacks the job counts when a connection is
/// made, then counts them: RTT samples, retransmits, or (`lifetime`) each connection as it
/// closes, with the microseconds since its handshake ended. Setting callback flags changes no
/// packet; it only adds calls.
#[sock_ops]
pub fn fathom_sock_ops(ctx: SockOpsContext) -> u32 {
    let event = net_cfg!(sock_event);
    let wanted = match event {
        net::sock::RTT => BPF_SOCK_OPS_RTT_CB_FLAG,
        net::sock::RETRANSMIT => BPF_SOCK_OPS_RETRANS_CB_FLAG,
        net::sock::LIFETIME => BPF_SOCK_OPS_STATE_CB_FLAG,
        _ => return 1,
    };
    let op = ctx.op();
    let mut lifetime_us = 0;
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB
        | BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let lifetime = event == net::sock::LIFETIME;
            // A lifetime runs from the handshake's end, on either side, to the close (as
            // tcplife's): a connect that never completes is no connection to time.
            if lifetime && op == BPF_SOCK_OPS_TCP_CONNECT_CB {
                return 1;
            }
            let _ = ctx.set_cb_flags((ctx.cb_flags() | wanted) as i32);
            if lifetime {
                // SAFETY: a helper without arguments.
                let now = unsafe { bpf_ktime_get_ns() };
                let _ = LIFE_STARTS.insert(&socket_cookie(&ctx), &now, BPF_ANY as u64);
            }
            return 1;
        }
        BPF_SOCK_OPS_RTT_CB if event == net::sock::RTT => {}
        BPF_SOCK_OPS_RETRANS_CB if event == net::sock::RETRANSMIT => {}
        // args[0] is the old state, args[1] the new one.
        BPF_SOCK_OPS_STATE_CB if event == net::sock::LIFETIME && ctx.arg(1) == TCP_CLOSE => {
            let key = socket_cookie(&ctx);
            // SAFETY: plain map lookup; the value is copied out before the entry goes.
            let Some(start) = (unsafe { LIFE_STARTS.get(&key) }).copied() else {
                // Opened before the job attached (or forgotten): no lifetime to give.
                bump(counter::STASH_MISSES);
                return 1;
            };
            let _ = LIFE_STARTS.remove(&key);
            // SAFETY: a helper without arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            lifetime_us = now.saturating_sub(start) / 1000;
        }
        _ => return 1,
    }
    let mask = net_cfg!(key_mask);
    let mut k = NetKey {
        protocol: IPPROTO_TCP,
        ..NetKey::default()
    };
    // The local end is the source. `local_port` is in host order; `remote_port` holds the
    // network-order port in its upper 16 bits on little-endian machines (an ntohl gives it).
    if ctx.family() == 2 {
        k.family = net::IPV4;
        if mask & net::key::SADDR != 0 {
            k.saddr[..4].copy_from_slice(&ctx.local_ip4().to_ne_bytes());
        }
        if mask & net::key::DADDR != 0 {
            k.daddr[..4].copy_from_slice(&ctx.remote_ip4().to_ne_bytes());
        }
    } else {
        k.family = net::IPV6;
        if mask & net::key::SADDR != 0 {
            k.saddr = words_bytes(ctx.local_ip6());
        }
        if mask & net::key::DADDR != 0 {
            k.daddr = words_bytes(ctx.remote_ip6());
        }
    }
    if mask & net::key::SPORT != 0 {
        k.sport = ctx.local_port() as u16;
    }
    if mask & net::key::DPORT != 0 {
        k.dport = u32::from_be(ctx.remote_port()) as u16;
    }
    if mask & net::key::PROTOCOL == 0 {
        k.protocol = 0;
    }
    // SAFETY: the program's context; `srtt_us` holds the smoothed RTT << 3.
    let srtt_us = u64::from(unsafe { (*ctx.ops).srtt_us } >> 3);
    let (value, hist_of) = match event {
        net::sock::RTT => (srtt_us, srtt_us),
        net::sock::LIFETIME => (lifetime_us, lifetime_us),
        _ => (0, srtt_us),
    };
    count(k, 0, value, hist_of);
    1
}

fn words_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let x = w[i].to_ne_bytes();
        b[i * 4] = x[0];
        b[i * 4 + 1] = x[1];
        b[i * 4 + 2] = x[2];
        b[i * 4 + 3] = x[3];
        i += 1;
    }
    b
}
