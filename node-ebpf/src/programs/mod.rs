//! The programs, their maps and the shared hit pipeline.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
};

use aya_ebpf::{
    EbpfContext, Global,
    bindings::{
        BPF_F_USER_STACK, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        bpf_raw_tracepoint_args, pt_regs,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes, bpf_probe_read_user_str_bytes, generated::bpf_get_stackid,
    },
    macros::{
        fentry, fexit, kprobe, kretprobe, lsm, map, perf_event, raw_tracepoint, tracepoint, uprobe,
        uretprobe,
    },
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
    programs::{
        FEntryContext, FExitContext, LsmContext, PerfEventContext, ProbeContext,
        RawTracePointContext, RetProbeContext, TracePointContext,
    },
};
use fathom_common::{
    AggKey, AggValue, Event, PAYLOAD_LEN, ProbeConfig, RateState, Source, Stash, StashConfig,
    compact, counter, filter, flags, key, log2_bucket, source, strsrc, value,
};

#[unsafe(no_mangle)]
static CONFIG: Global<ProbeConfig> = Global::new(ProbeConfig::EMPTY);

#[unsafe(no_mangle)]
static STASH_CONFIG: Global<StashConfig> = Global::new(StashConfig::EMPTY);

// Sizes here are defaults; the loader sets the real ones from the job's limits.
#[map]
static AGG: PerCpuHashMap<AggKey, AggValue> = PerCpuHashMap::with_max_entries(16384, 0);
#[map]
static AGG_TINY: PerCpuHashMap<[u64; compact::TINY_WORDS], AggValue> =
    PerCpuHashMap::with_max_entries(16384, 0);
#[map]
static AGG_SMALL: PerCpuHashMap<[u64; compact::WORDS], AggValue> =
    PerCpuHashMap::with_max_entries(16384, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(1024, 0);
#[map]
static STASH: HashMap<u64, Stash> = HashMap::with_max_entries(10240, 0);
#[map]
static RATE: Array<RateState> = Array::with_max_entries(1, 0);
#[map]
static PIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);
#[map]
static CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

/// Reads one field of a configuration global. Fields are read one at a time, with volatile
/// loads: copying a whole config would not fit the 512-byte stack, and a plain load of an
/// immutable static would be constant-folded to the compiled-in default.
macro_rules! cfg {
    ($global:ident, $ty:ty, $($field:tt)+) => {{
        let base: *const $ty = (&raw const $global).cast();
        // SAFETY: `Global<T>` is a transparent wrapper of an initialized `T`.
        #[allow(unused_unsafe, reason = "the macro is used both in and out of unsafe blocks")]
        let v = unsafe { core::ptr::read_volatile(&raw const (*base).$($field)+) };
        v
    }};
}
macro_rules! probe_cfg {
    ($($field:tt)+) => { cfg!(CONFIG, ProbeConfig, $($field)+) };
}
macro_rules! stash_cfg {
    ($($field:tt)+) => { cfg!(STASH_CONFIG, StashConfig, $($field)+) };
}

mod net;

const NS_PER_SEC: u64 = 1_000_000_000;
/// `-EEXIST`: another CPU inserted the same key first.
const EEXIST: i32 = -17;

/// What the hit pipeline needs from a program context; each attach kind answers what it can
/// and 0 for the rest (the loader only configures sources an attach kind provides).
trait Hook: EbpfContext {
    fn arg(&self, _n: u32) -> u64 {
        0
    }
    fn ret(&self) -> u64 {
        0
    }
    /// A field of the tracepoint record.
    fn record_field(&self, _offset: u32, _size: u32) -> u64 {
        0
    }
    /// A `__data_loc` string of the tracepoint record, copied into `buf`.
    fn record_str(&self, _offset: u32, _buf: &mut [u8]) -> usize {
        0
    }
    /// Stack walks are allowed for this program type.
    const STACKS: bool = true;
}

impl Hook for TracePointContext {
    fn record_field(&self, offset: u32, size: u32) -> u64 {
        // SAFETY: bpf_probe_read_kernel checks the address; the loader takes the offset and
        // size from the tracepoint's format file.
        let base = self.as_ptr() as *const u8;
        unsafe {
            let p = base.add(offset as usize);
            match size {
                1 => bpf_probe_read_kernel(p).map(|v: u8| v as u64),
                2 => bpf_probe_read_kernel(p as *const u16).map(|v| v as u64),
                4 => bpf_probe_read_kernel(p as *const u32).map(|v| v as u64),
                _ => bpf_probe_read_kernel(p as *const u64),
            }
            .unwrap_or(0)
        }
    }

    fn record_str(&self, offset: u32, buf: &mut [u8]) -> usize {
        let base = self.as_ptr() as *const u8;
        // A __data_loc field holds (length << 16 | offset from the record's start).
        let loc = self.record_field(offset, 4) as u32;
        let at = (loc & 0xffff) as usize;
        // SAFETY: checked kernel read inside the record.
        unsafe { bpf_probe_read_kernel_str_bytes(base.add(at), buf) }
            .map(|s| s.len())
            .unwrap_or(0)
    }
}

/// Reads argument `n` of a `pt_regs` context with constant offsets only, as the verifier wants.
fn regs_arg(regs: *mut pt_regs, n: u32) -> u64 {
    // SAFETY: regs is the program's context pointer.
    let r = unsafe { &*regs };
    match n {
        0 => r.rdi,
        1 => r.rsi,
        2 => r.rdx,
        3 => r.rcx,
        4 => r.r8,
        5 => r.r9,
        _ => 0,
    }
}

impl Hook for ProbeContext {
    fn arg(&self, n: u32) -> u64 {
        regs_arg(self.regs, n)
    }
}

impl Hook for RetProbeContext {
    fn ret(&self) -> u64 {
        self.ret::<u64>()
    }
}

/// Reads argument `n` of a BTF-typed context (fentry, fexit, LSM, raw tracepoint): an array
/// of u64. Read with a checked kernel read rather than a direct context access, so the
/// verifier and the raw-tracepoint attach check see no access past the hook's real argument
/// count for arguments the configuration never selects.
fn btf_arg(ctx: *mut c_void, n: u32) -> u64 {
    if n >= 12 {
        return 0;
    }
    let args = ctx as *const u64;
    // SAFETY: bpf_probe_read_kernel checks the address.
    unsafe { bpf_probe_read_kernel(args.add(n as usize)).unwrap_or(0) }
}

impl Hook for RawTracePointContext {
    fn arg(&self, n: u32) -> u64 {
        let args = self.as_ptr() as *const bpf_raw_tracepoint_args;
        btf_arg(args as *mut c_void, n)
    }
}

impl Hook for FEntryContext {
    fn arg(&self, n: u32) -> u64 {
        btf_arg(self.as_ptr(), n)
    }
}

impl Hook for FExitContext {
    fn arg(&self, n: u32) -> u64 {
        btf_arg(self.as_ptr(), n)
    }
    fn ret(&self) -> u64 {
        self.ret::<u64>().unwrap_or(0)
    }
}

impl Hook for PerfEventContext {}

impl Hook for LsmContext {
    fn arg(&self, n: u32) -> u64 {
        btf_arg(self.as_ptr(), n)
    }
    const STACKS: bool = false;
}

fn bump(slot: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *p += 1 }
    }
}

/// The numbers a hit carries besides its context.
struct Hit {
    pid: u32,
    tid: u32,
    now: u64,
    /// Nanoseconds since the entry probe, with a stash.
    latency: u64,
    /// The value the entry probe stashed.
    stashed: u64,
}

fn read_source<C: Hook>(ctx: &C, src: &Source, hit: &Hit) -> u64 {
    let raw = match src.kind {
        source::TP_FIELD => ctx.record_field(src.offset, src.size),
        source::ARG => ctx.arg(src.offset),
        source::RET => ctx.ret(),
        source::LATENCY => hit.latency,
        source::STASHED => hit.stashed,
        source::TID => hit.tid as u64,
        source::PID => hit.pid as u64,
        source::PARENT_PID => return parent_pid(src.offset, src.size),
        _ => 0,
    };
    if src.signed != 0 {
        // Sign-extend from the field's width so negative values stay negative as i64.
        match src.size {
            1 => raw as u8 as i8 as i64 as u64,
            2 => raw as u16 as i16 as i64 as u64,
            4 => raw as u32 as i32 as i64 as u64,
            _ => raw,
        }
    } else {
        raw
    }
}

/// `current->real_parent->tgid`, with offsets from BTF.
fn parent_pid(parent_offset: u32, tgid_offset: u32) -> u64 {
    // SAFETY: checked kernel reads through the current task pointer.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let Ok(parent) =
            bpf_probe_read_kernel(task.add(parent_offset as usize) as *const *const u8)
        else {
            return 0;
        };
        bpf_probe_read_kernel(parent.add(tgid_offset as usize) as *const u32)
            .map(|v| v as u64)
            .unwrap_or(0)
    }
}

/// The pid, comm and cgroup filters; true when the hit passes.
fn passes_filters(filter_flags: u32, pid: u32, comm: &[u8; 16]) -> bool {
    if filter_flags & filter::PID != 0 {
        // SAFETY: plain map lookup; the value is not used.
        if unsafe { PIDS.get(&pid) }.is_none() {
            return false;
        }
    }
    if filter_flags & filter::COMM != 0 {
        let mut i = 0;
        while i < 16 {
            if comm[i] != probe_cfg!(comm[i]) {
                return false;
            }
            if comm[i] == 0 {
                break;
            }
            i += 1;
        }
    }
    if filter_flags & filter::CGROUP != 0 {
        // SAFETY: helper without arguments.
        let cg = unsafe { bpf_get_current_cgroup_id() };
        // SAFETY: plain map lookup.
        if unsafe { CGROUPS.get(&cg) }.is_none() {
            return false;
        }
    }
    true
}

/// The job's events-per-second limit across all CPUs: true when the hit may go on.
fn within_rate(limit: u64, now: u64) -> bool {
    if limit == 0 {
        return true;
    }
    let Some(state) = RATE.get_ptr_mut(0) else {
        return true;
    };
    let second = now / NS_PER_SEC;
    // SAFETY: one global entry; concurrent CPUs may race on the reset, which can admit at
    // most one extra hit per CPU per second; the count itself is added atomically.
    unsafe {
        if (*state).second != second {
            (*state).second = second;
            (*state).count = 0;
        }
        if (*state).count >= limit {
            return false;
        }
        // The result is unused, so this is BPF_XADD, which every kernel we support has.
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*state).count, 1);
    }
    true
}

fn stack_id<C: Hook>(ctx: &C, user: bool) -> i32 {
    if !C::STACKS {
        return -1;
    }
    let flags = if user { BPF_F_USER_STACK as u64 } else { 0 };
    // SAFETY: helper called with the program's context and a stack map.
    let id = unsafe { bpf_get_stackid(ctx.as_ptr(), (&raw const STACKS) as *mut c_void, flags) };
    if id < 0 {
        bump(counter::STACK_ERRORS);
    }
    id as i32
}

fn aggregate<C: Hook>(ctx: &C, hit: &Hit, comm: &[u8; 16]) {
    let mask = probe_cfg!(key_mask);
    let mut add = 0;
    let mut bucket = 0;
    match probe_cfg!(value_kind) {
        value::SUM => add = read_source(ctx, &probe_cfg!(value_src), hit),
        value::HIST => bucket = log2_bucket(read_source(ctx, &probe_cfg!(value_src), hit)),
        _ => {}
    }
    let pid = if mask & key::PID != 0 { hit.pid } else { 0 };
    let tid = if mask & key::TID != 0 { hit.tid } else { 0 };
    let cgroup = || {
        if mask & key::CGROUP != 0 {
            // SAFETY: helper without arguments.
            unsafe { bpf_get_current_cgroup_id() }
        } else {
            0
        }
    };
    let kstack = || {
        if mask & key::KSTACK != 0 {
            stack_id(ctx, false)
        } else {
            0
        }
    };
    let ustack = || {
        if mask & key::USTACK != 0 {
            stack_id(ctx, true)
        } else {
            0
        }
    };
    let field = |i: usize, bit: u32| {
        if mask & bit != 0 {
            read_source(ctx, &probe_cfg!(key_fields[i]), hit)
        } else {
            0
        }
    };
    let cpu = || {
        if mask & key::CPU != 0 {
            // SAFETY: helper without arguments.
            unsafe { bpf_get_smp_processor_id() }
        } else {
            0
        }
    };
    if probe_cfg!(flags) & flags::COMPACT != 0 {
        // Only the parts the job keys by, straight into their words (compact::pack's layout).
        let slots = probe_cfg!(compact_slots);
        let mut w = [0u64; compact::WORDS];
        let mut put = |slot: u8, v: u64| match slot {
            0 => w[0] = v,
            1 => w[1] = v,
            2 => w[2] = v,
            3 => w[3] = v,
            _ => {}
        };
        if slots[0] != compact::NO_SLOT {
            let mut lo = [0u8; 8];
            let mut hi = [0u8; 8];
            lo.copy_from_slice(&comm[..8]);
            hi.copy_from_slice(&comm[8..]);
            put(slots[0], u64::from_ne_bytes(lo));
            put(slots[1], u64::from_ne_bytes(hi));
        }
        if slots[2] != compact::NO_SLOT {
            put(slots[2], ((pid as u64) << 32) | tid as u64);
        }
        if slots[3] != compact::NO_SLOT {
            put(slots[3], cgroup());
        }
        if slots[4] != compact::NO_SLOT {
            put(
                slots[4],
                ((kstack() as u32 as u64) << 32) | ustack() as u32 as u64,
            );
        }
        if slots[5] != compact::NO_SLOT {
            put(slots[5], field(0, key::FIELD0));
        }
        if slots[6] != compact::NO_SLOT {
            put(slots[6], field(1, key::FIELD1));
        }
        if slots[7] != compact::NO_SLOT {
            put(slots[7], ((cpu() as u64) << 32) | bucket as u64);
        }
        if probe_cfg!(compact_words) as usize <= compact::TINY_WORDS {
            add_to(&AGG_TINY, &[w[0], w[1]], add);
        } else {
            add_to(&AGG_SMALL, &w, add);
        }
    } else {
        let k = AggKey {
            pid,
            tid,
            cgroup: cgroup(),
            kstack: kstack(),
            ustack: ustack(),
            fields: [field(0, key::FIELD0), field(1, key::FIELD1)],
            cpu: cpu(),
            bucket,
            comm: if mask & key::COMM != 0 {
                *comm
            } else {
                [0; 16]
            },
        };
        add_to(&AGG, &k, add);
    }
}

/// Adds one hit (and `add`) to the entry of `k`, creating it when new; a full map is counted.
#[inline(always)]
fn add_to<K>(map: &PerCpuHashMap<K, AggValue>, k: &K, add: u64) {
    for _ in 0..2 {
        if let Some(v) = map.get_ptr_mut(k) {
            // SAFETY: per-CPU value, no other writer on this CPU.
            unsafe {
                (*v).count += 1;
                (*v).sum = (*v).sum.wrapping_add(add);
            }
            return;
        }
        let first = AggValue { count: 1, sum: add };
        match map.insert(k, &first, BPF_NOEXIST as u64) {
            Ok(()) => return,
            // Inserted meanwhile (this key on another CPU's slot): add to it on the next turn.
            Err(EEXIST) => continue,
            Err(_) => {
                bump(counter::MAP_FULL);
                return;
            }
        }
    }
}

fn emit<C: Hook>(ctx: &C, hit: &Hit, comm: &[u8; 16]) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        bump(counter::RINGBUF_LOST);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at reserved ring-buffer memory the size of an Event; every field is
    // written before submit.
    unsafe {
        (*e).ts_ns = hit.now;
        (*e).cgroup = bpf_get_current_cgroup_id();
        (*e).pid = hit.pid;
        (*e).tid = hit.tid;
        (*e).cpu = bpf_get_smp_processor_id();
        (*e).value = read_source(ctx, &probe_cfg!(value_src), hit);
        (*e).arg = read_source(ctx, &probe_cfg!(event_arg), hit);
        (*e).fields = [
            read_source(ctx, &probe_cfg!(key_fields[0]), hit),
            read_source(ctx, &probe_cfg!(key_fields[1]), hit),
        ];
        (*e).comm = *comm;
        let payload = &mut (*e).payload;
        let str_max = probe_cfg!(str_max) as usize;
        let max = if str_max < PAYLOAD_LEN {
            str_max
        } else {
            PAYLOAD_LEN
        };
        let buf = &mut payload[..max];
        let str_offset = probe_cfg!(str_offset);
        let len = match probe_cfg!(str_kind) {
            strsrc::TP_USER_PTR => {
                let ptr = ctx.record_field(str_offset, 8) as *const u8;
                bpf_probe_read_user_str_bytes(ptr, buf)
                    .map(|s| s.len())
                    .unwrap_or(0)
            }
            strsrc::TP_DATA_LOC => ctx.record_str(str_offset, buf),
            strsrc::ARG_USER_PTR => {
                let ptr = ctx.arg(str_offset) as *const u8;
                bpf_probe_read_user_str_bytes(ptr, buf)
                    .map(|s| s.len())
                    .unwrap_or(0)
            }
            strsrc::STASHED_USER_PTR => {
                bpf_probe_read_user_str_bytes(hit.stashed as *const u8, buf)
                    .map(|s| s.len())
                    .unwrap_or(0)
            }
            _ => 0,
        };
        (*e).payload_len = len as u32;
    }
    // Batched wakeups: one per `wakeup_bytes` of waiting events instead of one per event.
    let wakeup = probe_cfg!(wakeup_bytes);
    let flags = if wakeup == 0 || EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= wakeup {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags as u64);
    bump(counter::EVENTS_EMITTED);
}

/// The main role: filters, pairing, rate limit, then aggregate and/or emit.
fn on_hit<C: Hook>(ctx: &C) -> u32 {
    let cfg_flags = probe_cfg!(flags);
    let pid_tgid = bpf_get_current_pid_tgid();
    let now = if cfg_flags & flags::TIME != 0 {
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    let mut hit = Hit {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        now,
        latency: 0,
        stashed: 0,
    };
    let comm = if cfg_flags & flags::COMM != 0 {
        bpf_get_current_comm().unwrap_or([0; 16])
    } else {
        [0; 16]
    };
    if !passes_filters(probe_cfg!(filter_flags), hit.pid, &comm) {
        bump(counter::FILTERED);
        return 0;
    }
    if probe_cfg!(filter_flags) & filter::FIELD != 0
        && read_source(ctx, &probe_cfg!(match_src), &hit) != probe_cfg!(match_value)
    {
        bump(counter::FILTERED);
        return 0;
    }
    if cfg_flags & flags::PAIRED != 0 {
        let k = read_source(ctx, &stash_cfg!(exit_key_src), &hit);
        // SAFETY: the value is copied out before the entry is removed.
        let Some(stash) = (unsafe { STASH.get(&k) }).copied() else {
            bump(counter::STASH_MISSES);
            return 0;
        };
        let _ = STASH.remove(&k);
        hit.latency = now.saturating_sub(stash.start_ns);
        hit.stashed = stash.value;
    }
    if !within_rate(probe_cfg!(rate_limit), now) {
        bump(counter::RATE_LIMITED);
        return 0;
    }
    bump(counter::HITS);
    if cfg_flags & flags::AGGREGATE != 0 {
        aggregate(ctx, &hit, &comm);
    }
    if cfg_flags & flags::EMIT != 0 {
        emit(ctx, &hit, &comm);
    }
    0
}

/// The stash role: remember when (and one value) for the main program's pairing.
fn on_entry<C: Hook>(ctx: &C) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let hit = Hit {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        now,
        latency: 0,
        stashed: 0,
    };
    let filter_flags = stash_cfg!(filter_flags);
    if filter_flags != 0 {
        let comm = bpf_get_current_comm().unwrap_or([0; 16]);
        if !passes_filters(filter_flags, hit.pid, &comm) {
            return 0;
        }
    }
    let k = read_source(ctx, &stash_cfg!(key_src), &hit);
    let stash = Stash {
        start_ns: now,
        value: read_source(ctx, &stash_cfg!(value_src), &hit),
    };
    if STASH.insert(&k, &stash, 0).is_err() {
        bump(counter::STASH_MISSES);
    }
    0
}

// Thin wrappers: one per attach kind and role.

#[tracepoint]
pub fn fathom_tp(ctx: TracePointContext) -> u32 {
    on_hit(&ctx)
}

#[tracepoint]
pub fn fathom_tp_stash(ctx: TracePointContext) -> u32 {
    on_entry(&ctx)
}

#[raw_tracepoint]
pub fn fathom_raw_tp(ctx: RawTracePointContext) -> i32 {
    on_hit(&ctx) as i32
}

#[kprobe]
pub fn fathom_kprobe(ctx: ProbeContext) -> u32 {
    on_hit(&ctx)
}

#[kprobe]
pub fn fathom_kprobe_stash(ctx: ProbeContext) -> u32 {
    on_entry(&ctx)
}

#[kretprobe]
pub fn fathom_kretprobe(ctx: RetProbeContext) -> u32 {
    on_hit(&ctx)
}

#[uprobe]
pub fn fathom_uprobe(ctx: ProbeContext) -> u32 {
    on_hit(&ctx)
}

#[uprobe]
pub fn fathom_uprobe_stash(ctx: ProbeContext) -> u32 {
    on_entry(&ctx)
}

#[uretprobe]
pub fn fathom_uretprobe(ctx: RetProbeContext) -> u32 {
    on_hit(&ctx)
}

#[fentry]
pub fn fathom_fentry(ctx: FEntryContext) -> u32 {
    on_hit(&ctx)
}

#[fentry]
pub fn fathom_fentry_stash(ctx: FEntryContext) -> u32 {
    on_entry(&ctx)
}

#[fexit]
pub fn fathom_fexit(ctx: FExitContext) -> u32 {
    on_hit(&ctx)
}

#[perf_event]
pub fn fathom_profile(ctx: PerfEventContext) -> u32 {
    on_hit(&ctx)
}

/// Observe-only LSM program: counts the hook and returns 0, which on the kernel's
/// modify-return trampoline means "no decision": the hook's default (and the other LSMs) then
/// decide, as without the program. A non-zero verdict of an earlier program ends the chain
/// before this one runs, so the `ret` argument it could pass through is always 0 here.
/// Proven on `task_prctl`, whose default is -ENOSYS (kernel_functions.rs, docs/tenancy.md).
#[lsm]
pub fn fathom_lsm(ctx: LsmContext) -> i32 {
    on_hit(&ctx);
    0
}

/// Never loads: it writes through a map lookup result without a null check, which the
/// verifier rejects. It exists so tests can prove that a verifier rejection is reported with
/// its log (RELIABILITY E4); no plan ever selects it.
#[tracepoint]
pub fn fathom_verifier_canary(_ctx: TracePointContext) -> u32 {
    let key: u64 = 0;
    // SAFETY: deliberately unchecked — a hash-map lookup may return null and the verifier
    // refuses the program for it, so it never runs.
    unsafe {
        let p = aya_ebpf::helpers::generated::bpf_map_lookup_elem(
            (&raw const STASH) as *mut c_void,
            (&raw const key) as *const c_void,
        ) as *mut u64;
        core::ptr::write_volatile(p, 1);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
