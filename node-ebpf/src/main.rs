//! Fathom's kernel programs.
//!
//! A handful of generic programs, one per attach kind and role, all configured at load time
//! through the read-only globals `CONFIG` and `STASH_CONFIG` (see `fathom_common`). A catalog
//! probe is a configuration of these programs, never new kernel code.
//!
//! Roles:
//! - *main* (`fathom_tp`, `fathom_kprobe`, …): filter, rate-limit, then aggregate into `AGG`
//!   and/or emit an `Event` into `EVENTS`. With `flags::PAIRED` it first looks up what the
//!   entry probe stashed (latency, a saved pointer) and skips hits with no entry.
//! - *stash* (`fathom_tp_stash`, `fathom_kprobe_stash`, …): remember the start time (and one
//!   value) under a key, for the main program at the return/completion point.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The events-per-second limit adds with BPF_XADD, reachable only through the intrinsic.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", expect(internal_features, reason = "atomic_xadd"))]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Built for the host only so that `cargo test --workspace` works; the real programs exist
    // only for the BPF target.
}
