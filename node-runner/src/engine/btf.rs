//! A small reader of the kernel's BTF for what the engine needs beyond aya: struct member
//! offsets (to read a task's parent without CO-RE), the names of BTF functions, and the
//! arguments of functions and raw tracepoints (how many, and which are kernel addresses).

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;
const KIND_PTR: u32 = 2;
const KIND_STRUCT: u32 = 4;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_TYPE_TAG: u32 = 18;

/// The typedef BTF gives each raw tracepoint: a pointer to its probe's prototype, whose first
/// argument is the tracepoint's private data (not an argument a program sees).
const RAW_TP_PREFIX: &str = "btf_trace_";

/// What one argument of a function or raw tracepoint holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgKind {
    /// A number (or anything that is not a pointer).
    Value,
    /// An address in the kernel: showing it would undo KASLR.
    KernelPointer,
    /// An address in the calling process (BTF's `__user` type tag).
    UserPointer,
}

/// Parsed BTF: struct members by struct name, function names, argument kinds.
#[derive(Debug, Default)]
pub struct BtfIndex {
    structs: HashMap<String, Vec<(String, u32)>>,
    functions: Vec<String>,
    /// The arguments of each function of `functions` (same order).
    signatures: Vec<Box<[ArgKind]>>,
    /// The arguments of each raw tracepoint, by tracepoint name.
    raw_tracepoints: HashMap<String, Box<[ArgKind]>>,
}

/// One BTF type, as much as the argument kinds need: its kind, name, `type` field, and where
/// its extra records start.
#[derive(Clone, Copy)]
struct TypeRec {
    kind: u32,
    name_off: u32,
    ty: u32,
    at: usize,
    vlen: usize,
}

/// The types of a BTF blob by id (id 0 is `void`).
struct Types<'a> {
    recs: Vec<TypeRec>,
    bytes: &'a [u8],
}

impl Types<'_> {
    fn get(&self, id: u32) -> Option<&TypeRec> {
        self.recs.get((id as usize).checked_sub(1)?)
    }

    /// Follows typedefs and qualifiers (at most 32, BTF may not loop) to the type they name.
    fn strip(&self, mut id: u32) -> Option<&TypeRec> {
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.ty
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Whether a pointer's target carries the `user` type tag (before any other type).
    fn user_tagged(&self, mut id: u32, name: &impl Fn(u32) -> String) -> bool {
        for _ in 0..32 {
            let Some(t) = self.get(id) else { return false };
            match t.kind {
                KIND_TYPE_TAG if name(t.name_off) == "user" => return true,
                KIND_TYPE_TAG | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT => id = t.ty,
                _ => return false,
            }
        }
        false
    }

    fn arg_kind(&self, id: u32, name: &impl Fn(u32) -> String) -> ArgKind {
        match self.strip(id) {
            Some(t) if t.kind == KIND_PTR => {
                if self.user_tagged(t.ty, name) {
                    ArgKind::UserPointer
                } else {
                    ArgKind::KernelPointer
                }
            }
            _ => ArgKind::Value,
        }
    }

    /// The argument kinds of a function prototype.
    fn proto_args(&self, proto: &TypeRec, name: &impl Fn(u32) -> String) -> Option<Vec<ArgKind>> {
        (0..proto.vlen)
            .map(|p| {
                let ty = u32_at(self.bytes, proto.at + p * 8 + 4)?;
                Some(self.arg_kind(ty, name))
            })
            .collect()
    }
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
}

impl BtfIndex {
    /// Parses a BTF blob (little-endian, as on x86_64 and arm64).
    pub fn parse(data: &[u8]) -> Option<BtfIndex> {
        if u16::from_le_bytes(data.get(0..2)?.try_into().ok()?) != MAGIC {
            return None;
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types = data.get(hdr_len + type_off..hdr_len + type_off + type_len)?;
        let strings = data.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
        let name = |off: u32| -> String {
            let s = strings.get(off as usize..).unwrap_or_default();
            let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        };
        let mut idx = BtfIndex::default();
        let mut recs = Vec::new();
        let mut func_protos = Vec::new();
        let mut i = 0;
        while i + 12 <= types.len() {
            let name_off = u32_at(types, i)?;
            let info = u32_at(types, i + 4)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 != 0;
            let ty = u32_at(types, i + 8)?;
            i += 12;
            recs.push(TypeRec {
                kind,
                name_off,
                ty,
                at: i,
                vlen,
            });
            let extra = match kind {
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 | 19 => vlen * 12,
                6 | 13 => vlen * 8,
                _ => 0,
            };
            if kind == KIND_STRUCT {
                let mut members = Vec::with_capacity(vlen);
                for m in 0..vlen {
                    let at = i + m * 12;
                    let mname = u32_at(types, at)?;
                    let off = u32_at(types, at + 8)?;
                    let bits = if kind_flag { off & 0x00ff_ffff } else { off };
                    members.push((name(mname), bits));
                }
                let n = name(name_off);
                if !n.is_empty() {
                    idx.structs.entry(n).or_insert(members);
                }
            } else if kind == KIND_FUNC {
                func_protos.push((name(name_off), ty));
            }
            i += extra;
        }
        let t = Types { recs, bytes: types };
        let signature = |id: u32| {
            t.strip(id)
                .filter(|p| p.kind == KIND_FUNC_PROTO)
                .and_then(|p| t.proto_args(p, &name))
        };
        func_protos.sort_by(|a, b| a.0.cmp(&b.0));
        func_protos.dedup_by(|a, b| a.0 == b.0);
        for (f, proto) in func_protos {
            let args = signature(proto).unwrap_or_default();
            idx.functions.push(f);
            idx.signatures.push(args.into_boxed_slice());
        }
        for r in &t.recs {
            if r.kind != KIND_TYPEDEF {
                continue;
            }
            let n = name(r.name_off);
            let Some(tp) = n.strip_prefix(RAW_TP_PREFIX) else {
                continue;
            };
            let Some(ptr) = t.strip(r.ty).filter(|p| p.kind == KIND_PTR) else {
                continue;
            };
            if let Some(mut args) = signature(ptr.ty).filter(|a| !a.is_empty()) {
                args.remove(0);
                idx.raw_tracepoints
                    .insert(tp.to_string(), args.into_boxed_slice());
            }
        }
        Some(idx)
    }

    /// The byte offset of `member` in `struct name`.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Option<u32> {
        self.structs
            .get(strukt)?
            .iter()
            .find(|(n, _)| n == member)
            .map(|(_, bits)| bits / 8)
    }

    /// Function names BTF describes (what fentry/fexit attach to).
    pub fn functions(&self) -> &[String] {
        &self.functions
    }

    /// The arguments of kernel function `name`, when BTF describes it.
    pub fn function_args(&self, name: &str) -> Option<&[ArgKind]> {
        let i = self
            .functions
            .binary_search_by(|f| f.as_str().cmp(name))
            .ok()?;
        self.signatures.get(i).map(|a| &a[..])
    }

    /// The arguments a raw tracepoint's program sees, when BTF describes it.
    pub fn raw_tracepoint_args(&self, name: &str) -> Option<&[ArgKind]> {
        self.raw_tracepoints.get(name).map(|a| &a[..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernel_describes_task_struct() {
        let data = std::fs::read("/sys/kernel/btf/vmlinux")
            .expect("kernel BTF (DEVELOPERS.md: this machine has it)");
        let idx = BtfIndex::parse(&data).expect("parses");
        let parent = idx
            .member_offset("task_struct", "real_parent")
            .expect("real_parent");
        let tgid = idx.member_offset("task_struct", "tgid").expect("tgid");
        assert!(parent > 0 && tgid > 0 && parent != tgid);
        assert!(idx.functions().iter().any(|f| f == "vfs_read"));
        assert_eq!(idx.member_offset("task_struct", "no_such_member"), None);
    }

    #[test]
    fn arguments_are_counted_and_kernel_addresses_told_apart() {
        let data = std::fs::read("/sys/kernel/btf/vmlinux").expect("kernel BTF");
        let idx = BtfIndex::parse(&data).expect("parses");
        // sys_enter(struct pt_regs *regs, long id): the tracepoint's data pointer is not one.
        assert_eq!(
            idx.raw_tracepoint_args("sys_enter"),
            Some(&[ArgKind::KernelPointer, ArgKind::Value][..])
        );
        // kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)
        let kfree = idx.raw_tracepoint_args("kfree_skb").expect("kfree_skb");
        assert!(kfree.len() >= 3, "{kfree:?}");
        assert_eq!(kfree[..2], [ArgKind::KernelPointer, ArgKind::KernelPointer]);
        assert_eq!(kfree[2], ArgKind::Value);
        // vfs_read(struct file *, char __user *, size_t, loff_t *)
        let read = idx.function_args("vfs_read").expect("vfs_read");
        assert_eq!(read.len(), 4);
        assert_eq!(read[0], ArgKind::KernelPointer);
        assert_ne!(read[1], ArgKind::Value);
        assert_eq!(read[2], ArgKind::Value);
        assert_eq!(idx.function_args("no_such_function_anywhere"), None);
    }

    #[test]
    fn garbage_is_not_btf() {
        assert!(BtfIndex::parse(b"not btf at all, clearly").is_none());
        assert!(BtfIndex::parse(&[0x9f, 0xeb, 1, 0]).is_none());
    }
}
