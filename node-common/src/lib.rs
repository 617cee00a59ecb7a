//! The contract between Fathom's kernel programs (`fathom-ebpf`) and user space.
//!
//! Everything here is `#[repr(C)]` plain data: the user space writes [`ProbeConfig`] and
//! [`StashConfig`] into the programs' read-only globals before loading, and reads
//! [`AggKey`]/[`AggValue`] map entries, [`Event`] ring-buffer records and the
//! [`counter`] slots back.
#![no_std]

/// Bits of [`ProbeConfig::key_mask`]: which parts of [`AggKey`] the kernel fills in.
/// Parts not selected stay zero, so entries that differ only there are merged in the kernel.
pub mod key {
    pub const PID: u32 = 1 << 0;
    pub const TID: u32 = 1 << 1;
    pub const COMM: u32 = 1 << 2;
    pub const CGROUP: u32 = 1 << 3;
    pub const KSTACK: u32 = 1 << 4;
    pub const USTACK: u32 = 1 << 5;
    pub const FIELD0: u32 = 1 << 6;
    pub const FIELD1: u32 = 1 << 7;
    pub const CPU: u32 = 1 << 8;
}

/// Where a number comes from, for a key field, a summed value or an entry/return pairing.
pub mod source {
    /// Nothing: reads as 0.
    pub const NONE: u32 = 0;
    /// A field of the tracepoint record: `offset`, `size` (1, 2, 4 or 8), `signed`.
    pub const TP_FIELD: u32 = 1;
    /// Argument `index` of the probed function (kprobe, uprobe, fentry) or raw tracepoint.
    pub const ARG: u32 = 2;
    /// The probed function's return value (kretprobe, uretprobe, fexit).
    pub const RET: u32 = 3;
    /// Nanoseconds since the matching entry probe fired (needs a stash).
    pub const LATENCY: u32 = 4;
    /// The value the entry probe stashed (needs a stash).
    pub const STASHED: u32 = 5;
    /// The current thread id.
    pub const TID: u32 = 6;
    /// The current process id (thread group id).
    pub const PID: u32 = 7;
    /// The parent's process id: `current->real_parent->tgid`, with the member offsets
    /// (`offset` = real_parent, `size` = tgid) taken from the kernel's BTF by user space.
    pub const PARENT_PID: u32 = 8;
}

/// How a string payload is found (file names, exec paths).
pub mod strsrc {
    pub const NONE: u32 = 0;
    /// A user-space pointer held in a tracepoint field at `offset`.
    pub const TP_USER_PTR: u32 = 1;
    /// A `__data_loc char[]` tracepoint field at `offset` (kernel memory in the record).
    pub const TP_DATA_LOC: u32 = 2;
    /// A user-space pointer in argument `offset` of the probed function.
    pub const ARG_USER_PTR: u32 = 3;
    /// A user-space pointer stashed by the entry probe (read at return time).
    pub const STASHED_USER_PTR: u32 = 4;
}

/// What a program does with a hit, [`ProbeConfig::value_kind`].
pub mod value {
    /// Count hits.
    pub const COUNT: u32 = 0;
    /// Count hits and sum `value_src`.
    pub const SUM: u32 = 1;
    /// Log2 histogram of `value_src` (the bucket goes into [`super::AggKey::bucket`]).
    pub const HIST: u32 = 2;
}

/// Slots of the per-CPU `COUNTERS` array.
pub mod counter {
    /// Hits that passed every filter.
    pub const HITS: u32 = 0;
    /// New aggregation keys dropped because the map was full.
    pub const MAP_FULL: u32 = 1;
    /// Events the ring buffer had no room for.
    pub const RINGBUF_LOST: u32 = 2;
    /// Hits dropped by the job's events-per-second limit.
    pub const RATE_LIMITED: u32 = 3;
    /// Stack walks that failed (stack map full or the walk faulted).
    pub const STACK_ERRORS: u32 = 4;
    /// Return probes that found no entry (the entry fired before attaching, or the stash was full).
    pub const STASH_MISSES: u32 = 5;
    /// Events written to the ring buffer.
    pub const EVENTS_EMITTED: u32 = 6;
    /// Hits rejected by a filter (pid, comm, cgroup).
    pub const FILTERED: u32 = 7;
    pub const COUNT: u32 = 8;
}

/// Bits of [`ProbeConfig::filter_flags`].
pub mod filter {
    pub const PID: u32 = 1 << 0;
    pub const COMM: u32 = 1 << 1;
    pub const CGROUP: u32 = 1 << 2;
    /// `ProbeConfig::match_src` must equal `ProbeConfig::match_value`.
    pub const FIELD: u32 = 1 << 3;
}

/// Bits of [`ProbeConfig::flags`].
pub mod flags {
    /// Aggregate into the `AGG` map.
    pub const AGGREGATE: u32 = 1 << 0;
    /// Write an [`super::Event`] to the `EVENTS` ring buffer.
    pub const EMIT: u32 = 1 << 1;
    /// Pair with the stash program: look up (and remove) the entry stashed under
    /// `StashConfig::exit_key_src`, skip the hit when there is none.
    pub const PAIRED: u32 = 1 << 2;
    /// Read the clock (rate limit, pairing, events); skipped otherwise, it costs a helper call.
    pub const TIME: u32 = 1 << 3;
    /// Read the task's comm (a comm key or filter, events); skipped otherwise.
    pub const COMM: u32 = 1 << 4;
    /// Aggregate into `AGG_SMALL` with the key packed by `ProbeConfig::compact_slots`
    /// (a 32-byte key hashes in about half the time of the full 64-byte [`super::AggKey`]).
    pub const COMPACT: u32 = 1 << 5;
}

/// A number's source: see [`source`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub kind: u32,
    /// Byte offset (tracepoint field) or argument index.
    pub offset: u32,
    /// 1, 2, 4 or 8 bytes; 0 means 8.
    pub size: u32,
    /// Sign-extend the value read.
    pub signed: u32,
}

/// Read-only configuration of the main (aggregate/emit) programs: global `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConfig {
    pub flags: u32,
    pub key_mask: u32,
    pub value_kind: u32,
    pub filter_flags: u32,
    pub key_fields: [Source; 2],
    pub value_src: Source,
    /// Where the event's string payload comes from (see [`strsrc`]); `kind == NONE`: no payload.
    pub str_kind: u32,
    pub str_offset: u32,
    /// Bytes of payload to copy, at most [`PAYLOAD_LEN`].
    pub str_max: u32,
    /// A second number recorded in each event (a return value, a parent pid).
    pub event_arg: Source,
    /// Hits allowed per second across all CPUs; 0 = unlimited.
    pub rate_limit: u64,
    /// With `filter::COMM`: the exact comm, NUL padded.
    pub comm: [u8; 16],
    /// With `filter::FIELD`: a number the hit must carry (a TCP state, an event type).
    pub match_src: Source,
    pub match_value: u64,
    /// Wake the consumer only once this many bytes wait in the ring buffer (it also polls
    /// on a timer); 0 wakes it for every event.
    pub wakeup_bytes: u64,
    /// With `flags::COMPACT`: the word of the packed key each [`compact`] part goes to
    /// ([`compact::NO_SLOT`]: not in the key).
    pub compact_slots: [u8; compact::PARTS],
    /// With `flags::COMPACT`: how many words the packed key uses (at most
    /// [`compact::TINY_WORDS`]: `AGG_TINY`, else `AGG_SMALL`).
    pub compact_words: u32,
    pub _pad: u32,
}

impl Source {
    pub const NONE: Self = Self {
        kind: source::NONE,
        offset: 0,
        size: 0,
        signed: 0,
    };
}

impl ProbeConfig {
    /// The value compiled into the object; the loader always overrides it.
    pub const EMPTY: Self = Self {
        flags: 0,
        key_mask: 0,
        value_kind: value::COUNT,
        filter_flags: 0,
        key_fields: [Source::NONE; 2],
        value_src: Source::NONE,
        str_kind: strsrc::NONE,
        str_offset: 0,
        str_max: 0,
        event_arg: Source::NONE,
        rate_limit: 0,
        comm: [0; 16],
        match_src: Source::NONE,
        match_value: 0,
        wakeup_bytes: 0,
        compact_slots: [compact::NO_SLOT; compact::PARTS],
        compact_words: 0,
        _pad: 0,
    };
}

impl StashConfig {
    /// The value compiled into the object; the loader always overrides it.
    pub const EMPTY: Self = Self {
        key_src: Source::NONE,
        exit_key_src: Source::NONE,
        value_src: Source::NONE,
        filter_flags: 0,
        _pad: 0,
    };
}

/// Read-only configuration of the entry programs that stash a start time for a return probe:
/// global `STASH_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StashConfig {
    /// What identifies the pairing: `source::TID` (same thread), or a field (a pid woken up, a request pointer).
    pub key_src: Source,
    /// What the exit probe uses to find the entry; same kinds as `key_src`.
    pub exit_key_src: Source,
    /// A number to keep with the start time (a user pointer to a file name).
    pub value_src: Source,
    pub filter_flags: u32,
    pub _pad: u32,
}

/// An aggregation key. Unselected parts are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AggKey {
    pub pid: u32,
    pub tid: u32,
    pub cgroup: u64,
    pub kstack: i32,
    pub ustack: i32,
    pub fields: [u64; 2],
    pub cpu: u32,
    /// Log2 bucket for histograms: bucket b holds values in [2^(b-1), 2^b), bucket 0 holds 0.
    pub bucket: u32,
    pub comm: [u8; 16],
}

/// An aggregation value (per CPU; user space adds the CPUs up).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AggValue {
    pub count: u64,
    pub sum: u64,
}

/// The state of the events-per-second limit (one global entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    pub second: u64,
    pub count: u64,
}

/// What an entry probe keeps for its return probe.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stash {
    pub start_ns: u64,
    pub value: u64,
}

/// Maximum bytes of string payload carried by an [`Event`].
pub const PAYLOAD_LEN: usize = 256;

/// One record of the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    pub cgroup: u64,
    pub pid: u32,
    pub tid: u32,
    pub cpu: u32,
    pub payload_len: u32,
    /// `ProbeConfig::value_src` as read for this hit.
    pub value: u64,
    /// `ProbeConfig::event_arg` as read for this hit.
    pub arg: u64,
    pub fields: [u64; 2],
    pub comm: [u8; 16],
    pub payload: [u8; PAYLOAD_LEN],
}

/// Packed aggregation keys: the parts of an [`AggKey`] a job uses, one 64-bit word each, in
/// [`compact::WORDS`] words. The same functions pack in the kernel and unpack in user space.
pub mod compact {
    use super::{AggKey, key};

    /// Words of a packed key (`AGG_SMALL`); keys of at most [`TINY_WORDS`] go to `AGG_TINY`,
    /// whose 16-byte key hashes faster still.
    pub const WORDS: usize = 4;
    pub const TINY_WORDS: usize = 2;
    /// Parts of a key: comm (2 words), pid|tid, cgroup, kstack|ustack, field 0, field 1,
    /// cpu|bucket.
    pub const PARTS: usize = 8;
    pub const NO_SLOT: u8 = 0xff;

    /// The slot of each part for this key mask and how many words they take, or None when
    /// they do not fit in `WORDS`.
    pub fn slots(mask: u32, histogram: bool) -> Option<([u8; PARTS], usize)> {
        let needed = [
            mask & key::COMM != 0,
            mask & key::COMM != 0,
            mask & (key::PID | key::TID) != 0,
            mask & key::CGROUP != 0,
            mask & (key::KSTACK | key::USTACK) != 0,
            mask & key::FIELD0 != 0,
            mask & key::FIELD1 != 0,
            mask & key::CPU != 0 || histogram,
        ];
        let mut slots = [NO_SLOT; PARTS];
        let mut next = 0u8;
        let mut i = 0;
        while i < PARTS {
            if needed[i] {
                if next as usize >= WORDS {
                    return None;
                }
                slots[i] = next;
                next += 1;
            }
            i += 1;
        }
        Some((slots, next as usize))
    }

    #[inline(always)]
    fn part(k: &AggKey, p: usize) -> u64 {
        let c = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&k.comm[at..at + 8]);
            u64::from_ne_bytes(b)
        };
        match p {
            0 => c(0),
            1 => c(8),
            2 => ((k.pid as u64) << 32) | k.tid as u64,
            3 => k.cgroup,
            4 => ((k.kstack as u32 as u64) << 32) | k.ustack as u32 as u64,
            5 => k.fields[0],
            6 => k.fields[1],
            _ => ((k.cpu as u64) << 32) | k.bucket as u64,
        }
    }

    /// Packs the parts of `k` into their slots (constant indices only, for the verifier).
    #[inline(always)]
    pub fn pack(k: &AggKey, slots: &[u8; PARTS]) -> [u64; WORDS] {
        let mut w = [0u64; WORDS];
        let mut p = 0;
        while p < PARTS {
            let v = part(k, p);
            match slots[p] {
                0 => w[0] = v,
                1 => w[1] = v,
                2 => w[2] = v,
                3 => w[3] = v,
                _ => {}
            }
            p += 1;
        }
        w
    }

    /// The key `pack` packed (parts not in the key are zero).
    pub fn unpack(w: &[u64; WORDS], slots: &[u8; PARTS]) -> AggKey {
        let get = |p: usize| match slots[p] {
            s if (s as usize) < WORDS => w[s as usize],
            _ => 0,
        };
        let mut k = AggKey::default();
        k.comm[..8].copy_from_slice(&get(0).to_ne_bytes());
        k.comm[8..].copy_from_slice(&get(1).to_ne_bytes());
        k.pid = (get(2) >> 32) as u32;
        k.tid = get(2) as u32;
        k.cgroup = get(3);
        k.kstack = (get(4) >> 32) as u32 as i32;
        k.ustack = get(4) as u32 as i32;
        k.fields = [get(5), get(6)];
        k.cpu = (get(7) >> 32) as u32;
        k.bucket = get(7) as u32;
        k
    }
}

/// Network hooks (XDP, tc, cgroup_skb, sock_ops): packets and TCP socket events, keyed by
/// [`NetKey`] in the `NET_AGG` map and configured by the global `NET_CONFIG`. The programs
/// only observe: XDP passes, tc continues, cgroup hooks allow.
pub mod net {
    /// Bits of [`super::NetConfig::key_mask`]: which parts of [`super::NetKey`] the kernel
    /// fills in (the rest stay zero and merge).
    pub mod key {
        pub const IFINDEX: u32 = 1 << 0;
        pub const DIRECTION: u32 = 1 << 1;
        pub const PROTOCOL: u32 = 1 << 2;
        pub const SADDR: u32 = 1 << 3;
        pub const DADDR: u32 = 1 << 4;
        pub const SPORT: u32 = 1 << 5;
        pub const DPORT: u32 = 1 << 6;
        /// The socket's cgroup (cgroup_skb, tc egress): the pod.
        pub const CGROUP: u32 = 1 << 7;
    }

    /// [`super::NetKey::direction`].
    pub const INGRESS: u8 = 1;
    pub const EGRESS: u8 = 2;

    /// [`super::NetKey::family`]: 0 for a frame that is not IP (ARP, LLDP).
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;

    /// [`super::NetConfig::value_kind`]. Every entry counts hits in `count` and adds bytes
    /// (packets) or microseconds (RTT samples) to `sum`.
    pub mod value {
        /// Packets (or socket events) and their bytes.
        pub const COUNT: u32 = 0;
        /// A log2 histogram of packet sizes in `NetKey::bucket`.
        pub const BYTES_HIST: u32 = 1;
        /// A log2 histogram of microseconds (sock_ops: the smoothed RTT, or a connection's
        /// lifetime).
        pub const MICROS_HIST: u32 = 2;
    }

    /// [`super::NetConfig::sock_event`]: what a sock_ops program counts.
    pub mod sock {
        /// Each RTT sample of an established TCP connection.
        pub const RTT: u32 = 1;
        /// Each retransmitted segment (SYNs included).
        pub const RETRANSMIT: u32 = 2;
        /// Each connection when it closes, with its lifetime in microseconds.
        pub const LIFETIME: u32 = 3;
    }
}

/// Read-only configuration of the network programs: global `NET_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    pub key_mask: u32,
    pub value_kind: u32,
    pub sock_event: u32,
    /// [`filter::CGROUP`]: only sockets of the job's cgroups (cgroup_skb, sock_ops).
    pub filter_flags: u32,
    /// Non-zero when xdp/tc run on the host side of target pods' veths: directions are then
    /// named from the pod's side (what the host side receives, the pod sent: egress).
    pub pod_view: u32,
}

impl NetConfig {
    /// The value compiled into the object; the loader always overrides it.
    pub const EMPTY: Self = Self {
        key_mask: 0,
        value_kind: net::value::COUNT,
        sock_event: 0,
        filter_flags: 0,
        pod_view: 0,
    };
}

/// A network aggregation key. Addresses are in network order, IPv4 in the first 4 bytes;
/// ports in host order. Unselected parts are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetKey {
    pub ifindex: u32,
    pub direction: u8,
    pub family: u8,
    /// The IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6).
    pub protocol: u8,
    pub _pad: u8,
    pub sport: u16,
    pub dport: u16,
    pub bucket: u32,
    pub cgroup: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// Names of the programs, maps and globals in the object, shared so they cannot drift.
pub mod names {
    pub const CONFIG: &str = "CONFIG";
    pub const STASH_CONFIG: &str = "STASH_CONFIG";
    pub const AGG: &str = "AGG";
    pub const AGG_SMALL: &str = "AGG_SMALL";
    pub const AGG_TINY: &str = "AGG_TINY";
    pub const COUNTERS: &str = "COUNTERS";
    pub const EVENTS: &str = "EVENTS";
    pub const STACKS: &str = "STACKS";
    pub const STASH: &str = "STASH";
    pub const RATE: &str = "RATE";
    pub const PIDS: &str = "PIDS";
    pub const CGROUPS: &str = "CGROUPS";
    pub const NET_CONFIG: &str = "NET_CONFIG";
    pub const NET_AGG: &str = "NET_AGG";
    pub const IF_CGROUPS: &str = "IF_CGROUPS";
    pub const LIFE_STARTS: &str = "LIFE_STARTS";
}

/// Log2 bucket of `v`: 0 for 0, else 1 + floor(log2(v)) (so bucket b covers [2^(b-1), 2^b)).
#[inline(always)]
pub fn log2_bucket(v: u64) -> u32 {
    64 - v.leading_zeros()
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain data with no padding-sensitive invariants;
    // every bit pattern is a valid value.
    #[expect(
        unsafe_code,
        reason = "aya::Pod is an unsafe marker trait for plain map data"
    )]
    mod impls {
        use super::super::*;
        unsafe impl aya::Pod for ProbeConfig {}
        unsafe impl aya::Pod for StashConfig {}
        unsafe impl aya::Pod for AggKey {}
        unsafe impl aya::Pod for AggValue {}
        unsafe impl aya::Pod for RateState {}
        unsafe impl aya::Pod for Stash {}
        unsafe impl aya::Pod for Event {}
        unsafe impl aya::Pod for NetConfig {}
        unsafe impl aya::Pod for NetKey {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_buckets_match_bpftrace_hist_edges() {
        assert_eq!(log2_bucket(0), 0);
        assert_eq!(log2_bucket(1), 1);
        assert_eq!(log2_bucket(2), 2);
        assert_eq!(log2_bucket(3), 2);
        assert_eq!(log2_bucket(4), 3);
        assert_eq!(log2_bucket(u64::MAX), 64);
    }

    #[test]
    fn compact_keys_round_trip_the_parts_they_hold() {
        let mut k = AggKey::default();
        k.comm[..4].copy_from_slice(b"bash");
        k.pid = 42;
        k.tid = 43;
        k.kstack = -14;
        k.ustack = 7;
        let mask = key::COMM | key::PID | key::TID | key::KSTACK | key::USTACK;
        let (slots, words) = compact::slots(mask, false).expect("fits in 4 words");
        assert_eq!(words, 4);
        assert_eq!(compact::unpack(&compact::pack(&k, &slots), &slots), k);
        // Parts outside the mask do not survive.
        let (slots, words) = compact::slots(key::COMM, true).expect("fits");
        assert_eq!(words, 3);
        k.bucket = 9;
        let back = compact::unpack(&compact::pack(&k, &slots), &slots);
        assert_eq!((back.comm, back.bucket, back.pid), (k.comm, 9, 0));
        assert!(compact::slots(key::COMM | key::PID | key::CGROUP | key::FIELD0, false).is_none());
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<AggKey>(), 64);
        assert_eq!(core::mem::size_of::<Event>(), 80 + PAYLOAD_LEN);
        assert_eq!(core::mem::size_of::<NetKey>(), 56);
    }
}
