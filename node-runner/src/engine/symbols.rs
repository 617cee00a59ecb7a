//! Turning numbers into names: kernel addresses (kallsyms), user addresses (blazesym, ELF and
//! DWARF of the process's mappings), syscall numbers, pids.

use std::{collections::HashMap, fs, num::NonZeroU32};

use blazesym::{
    Pid,
    symbolize::{Input, Symbolized, Symbolizer, source},
};

use crate::engine::syscall_table::SYSCALLS_X86_64;

/// Kernel symbols from /proc/kallsyms, sorted by address.
pub struct KernelSymbols {
    syms: Vec<(u64, String)>,
}

/// How a kernel frame below every known symbol shows.
pub const UNKNOWN_KERNEL_FRAME: &str = "[unknown]";

impl KernelSymbols {
    pub fn load() -> KernelSymbols {
        let text = fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        KernelSymbols::parse(&text)
    }

    pub fn parse(text: &str) -> KernelSymbols {
        let mut syms: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let addr = u64::from_str_radix(it.next()?, 16).ok()?;
                let kind = it.next()?;
                let name = it.next()?;
                (addr != 0 && matches!(kind, "t" | "T" | "w" | "W"))
                    .then(|| (addr, name.to_string()))
            })
            .collect();
        syms.sort_unstable_by_key(|(a, _)| *a);
        KernelSymbols { syms }
    }

    /// The function containing `addr`, or the address in hex.
    pub fn name(&self, addr: u64) -> String {
        match self.syms.partition_point(|(a, _)| *a <= addr) {
            // Never the address itself: results can be read by people a kernel address must
            // not reach (it would undo KASLR).
            0 => UNKNOWN_KERNEL_FRAME.to_string(),
            i => self.syms[i - 1].1.clone(),
        }
    }
}

/// One executable mapping of a process (from /proc/PID/maps).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub file_offset: u64,
    pub path: String,
}

/// The file-backed mappings of a live process.
pub fn read_maps(pid: u32) -> Option<Vec<Mapping>> {
    let text = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    Some(parse_maps(&text))
}

/// Parses /proc/PID/maps, keeping file-backed mappings.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (range, _perms, off, _dev, _inode) =
                (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
            let path = it.next()?;
            if !path.starts_with('/') {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(a, 16).ok()?,
                end: u64::from_str_radix(b, 16).ok()?,
                file_offset: u64::from_str_radix(off, 16).ok()?,
                path: path.to_string(),
            })
        })
        .collect()
}

/// Symbolizes stacks of kernel and user space, caching per (pid, address). Processes that
/// may exit before their stacks are read are [`Symbols::remember`]ed while they run: their
/// mappings are kept, and their addresses are resolved in the files afterwards.
pub struct Symbols {
    kernel: Option<KernelSymbols>,
    user: Symbolizer,
    cache: HashMap<(u32, u64), String>,
    maps: HashMap<u32, Vec<Mapping>>,
}

impl Default for Symbols {
    fn default() -> Self {
        Symbols::new()
    }
}

impl Symbols {
    pub fn new() -> Symbols {
        Symbols {
            kernel: None,
            user: Symbolizer::new(),
            cache: HashMap::new(),
            maps: HashMap::new(),
        }
    }

    /// Keeps the mappings of `pid` (if it is alive and not yet known) for later.
    pub fn remember(&mut self, pid: u32) {
        if pid != 0
            && !self.maps.contains_key(&pid)
            && let Some(m) = read_maps(pid)
        {
            self.maps.insert(pid, m);
        }
    }

    /// Resolves `addr` of an exited process through its remembered mappings.
    fn resolve_remembered(&self, pid: u32, addr: u64) -> Option<String> {
        let m = self
            .maps
            .get(&pid)?
            .iter()
            .find(|m| addr >= m.start && addr < m.end)?;
        let offset = addr - m.start + m.file_offset;
        let src = source::Source::Elf(source::Elf::new(&m.path));
        match self
            .user
            .symbolize_single(&src, Input::FileOffset(offset))
            .ok()?
        {
            Symbolized::Sym(s) => Some(s.name.to_string()),
            Symbolized::Unknown(_) => None,
        }
    }

    /// A kernel stack (leaf first, as the kernel gives it) as folded frames, root first.
    pub fn kernel_stack(&mut self, frames: &[u64]) -> String {
        let k = self.kernel.get_or_insert_with(KernelSymbols::load);
        frames
            .iter()
            .rev()
            .map(|a| k.name(*a))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// A user stack of process `pid` (leaf first) as folded frames, root first. Frames that
    /// cannot be resolved (the process exited, no symbols) show as hex addresses.
    pub fn user_stack(&mut self, pid: u32, frames: &[u64]) -> String {
        let mut names = Vec::with_capacity(frames.len());
        let missing: Vec<u64> = frames
            .iter()
            .copied()
            .filter(|a| !self.cache.contains_key(&(pid, *a)))
            .collect();
        if !missing.is_empty() {
            let resolved = NonZeroU32::new(pid).and_then(|p| {
                let src = source::Source::Process(source::Process::new(Pid::Pid(p)));
                self.user.symbolize(&src, Input::AbsAddr(&missing)).ok()
            });
            for (i, a) in missing.iter().enumerate() {
                let name = match resolved.as_ref().and_then(|r| r.get(i)) {
                    Some(Symbolized::Sym(s)) => s.name.to_string(),
                    _ => self
                        .resolve_remembered(pid, *a)
                        .unwrap_or_else(|| format!("{a:#x}")),
                };
                self.cache.insert((pid, *a), name);
            }
        }
        for a in frames.iter().rev() {
            names.push(self.cache[&(pid, *a)].clone());
        }
        names.join(";")
    }
}

/// The name of an x86_64 syscall number, or the number.
pub fn syscall_name(nr: u64) -> String {
    SYSCALLS_X86_64
        .binary_search_by_key(&nr, |(n, _)| u64::from(*n))
        .map(|i| SYSCALLS_X86_64[i].1.to_string())
        .unwrap_or_else(|_| nr.to_string())
}

/// The parent pid of a live process.
pub fn ppid(pid: u32) -> Option<u32> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// A NUL-padded kernel comm as text.
pub fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kallsyms_lookup_finds_the_containing_function() {
        let k = KernelSymbols::parse(
            "ffffffff81000000 T _stext\nffffffff81001000 t do_thing\nffffffff81002000 D some_data\nffffffff81003000 T other\n",
        );
        assert_eq!(k.name(0xffffffff81001010), "do_thing");
        assert_eq!(
            k.name(0xffffffff81002010),
            "do_thing",
            "data symbols are skipped"
        );
        assert_eq!(k.name(0xffffffff81003000), "other");
        assert_eq!(k.name(0x10), UNKNOWN_KERNEL_FRAME);
    }

    #[test]
    fn maps_keep_file_backed_mappings() {
        let m = parse_maps(
            "55d0c0a00000-55d0c0a01000 r-xp 00001000 fe:01 123 /usr/bin/true\n7ffd1000-7ffd2000 rw-p 00000000 00:00 0 [stack]\n",
        );
        assert_eq!(
            m,
            vec![Mapping {
                start: 0x55d0c0a00000,
                end: 0x55d0c0a01000,
                file_offset: 0x1000,
                path: "/usr/bin/true".into()
            }]
        );
    }

    #[test]
    fn syscall_names() {
        assert_eq!(syscall_name(0), "read");
        assert_eq!(syscall_name(257), "openat");
        assert_eq!(syscall_name(99999), "99999");
    }

    #[test]
    fn user_stacks_of_this_process_resolve() {
        let addr = syscall_name as *const () as u64;
        let mut s = Symbols::new();
        let stack = s.user_stack(std::process::id(), &[addr]);
        assert!(stack.contains("syscall_name"), "{stack}");
    }
}
