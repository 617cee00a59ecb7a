//! A small reader of the kernel's BTF for what the engine needs beyond aya: struct member
//! offsets (to read a task's parent without CO-RE) and the names of BTF functions.

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_FUNC: u32 = 12;

/// Parsed BTF: struct members by struct name, function names.
#[derive(Debug, Default)]
pub struct BtfIndex {
    structs: HashMap<String, Vec<(String, u32)>>,
    functions: Vec<String>,
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
        let mut i = 0;
        while i + 12 <= types.len() {
            let name_off = u32_at(types, i)?;
            let info = u32_at(types, i + 4)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 != 0;
            i += 12;
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
                idx.functions.push(name(name_off));
            }
            i += extra;
        }
        idx.functions.sort();
        idx.functions.dedup();
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
    fn garbage_is_not_btf() {
        assert!(BtfIndex::parse(b"not btf at all, clearly").is_none());
        assert!(BtfIndex::parse(&[0x9f, 0xeb, 1, 0]).is_none());
    }
}
