//! What this kernel offers: tracefs, BTF, kprobes, BPF LSM, kernel symbols, privileges.
//! Every path is a field so tests can point one at a missing file (E5).

use std::{collections::HashSet, fs, path::PathBuf, sync::OnceLock};

use aya::{Btf, BtfError};

use crate::engine::{btf::BtfIndex, tracefs::TraceFs};

/// The facts the feasibility check and the planner read about a kernel.
#[derive(Debug)]
pub struct Kernel {
    /// None when tracefs is neither mounted nor mountable (the reason is in `tracefs_error`).
    pub tracefs: Option<TraceFs>,
    pub tracefs_error: Option<String>,
    pub btf_path: PathBuf,
    pub kallsyms_path: PathBuf,
    pub lsm_path: PathBuf,
    pub lockdown_path: PathBuf,
    btf: OnceLock<Option<Btf>>,
    btf_index: OnceLock<Option<BtfIndex>>,
    kallsyms: OnceLock<HashSet<String>>,
}

impl Kernel {
    /// The running kernel; mounts tracefs when needed.
    pub fn running() -> Kernel {
        Kernel::mount_securityfs();
        let (tracefs, tracefs_error) = match TraceFs::locate_or_mount() {
            Ok(t) => (Some(t), None),
            Err(e) => (None, Some(e)),
        };
        Kernel {
            tracefs,
            tracefs_error,
            btf_path: "/sys/kernel/btf/vmlinux".into(),
            kallsyms_path: "/proc/kallsyms".into(),
            lsm_path: "/sys/kernel/security/lsm".into(),
            lockdown_path: "/sys/kernel/security/lockdown".into(),
            btf: OnceLock::new(),
            btf_index: OnceLock::new(),
            kallsyms: OnceLock::new(),
        }
    }

    /// Mounts securityfs when it is not (the LSM list and lockdown mode live there).
    fn mount_securityfs() {
        let dir = std::path::Path::new("/sys/kernel/security");
        if dir.is_dir()
            && fs::read_dir(dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false)
        {
            let _ = std::process::Command::new("mount")
                .args(["-t", "securityfs", "securityfs", "/sys/kernel/security"])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }

    /// The kernel release (`uname -r`).
    pub fn release() -> String {
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into())
    }

    pub fn has_btf(&self) -> bool {
        self.btf_path.is_file()
    }

    /// The kernel's BTF, parsed once.
    pub fn btf(&self) -> Option<&Btf> {
        self.btf
            .get_or_init(|| {
                if !self.has_btf() {
                    return None;
                }
                Btf::parse_file(&self.btf_path, aya::Endianness::default()).ok()
            })
            .as_ref()
    }

    /// Struct offsets and function names from BTF, parsed once.
    pub fn btf_index(&self) -> Option<&BtfIndex> {
        self.btf_index
            .get_or_init(|| {
                let data = fs::read(&self.btf_path).ok()?;
                BtfIndex::parse(&data)
            })
            .as_ref()
    }

    /// (task_struct.real_parent, task_struct.tgid) byte offsets, to read a parent's pid.
    pub fn task_offsets(&self) -> Option<(u32, u32)> {
        let idx = self.btf_index()?;
        Some((
            idx.member_offset("task_struct", "real_parent")?,
            idx.member_offset("task_struct", "tgid")?,
        ))
    }

    /// Whether BTF describes a function of this name (what fentry/fexit/LSM attach to).
    pub fn btf_has_function(&self, name: &str) -> Result<bool, BtfError> {
        match self.btf() {
            Some(btf) => match btf.id_by_type_name_kind(name, aya_obj::btf::BtfKind::Func) {
                Ok(_) => Ok(true),
                Err(BtfError::UnknownBtfTypeName { .. }) => Ok(false),
                Err(e) => Err(e),
            },
            None => Ok(false),
        }
    }

    /// Text symbols of the kernel (functions), from kallsyms.
    pub fn kernel_functions(&self) -> &HashSet<String> {
        self.kallsyms.get_or_init(|| {
            let text = fs::read_to_string(&self.kallsyms_path).unwrap_or_default();
            text.lines()
                .filter_map(|l| {
                    let mut it = l.split_whitespace();
                    let _addr = it.next()?;
                    let kind = it.next()?;
                    let name = it.next()?;
                    matches!(kind, "t" | "T").then(|| name.to_string())
                })
                .collect()
        })
    }

    pub fn has_kprobes(&self) -> bool {
        self.tracefs.as_ref().is_some_and(TraceFs::has_kprobes)
    }

    /// The active LSMs (`/sys/kernel/security/lsm`), when securityfs is readable.
    pub fn lsms(&self) -> Option<Vec<String>> {
        let text = fs::read_to_string(&self.lsm_path).ok()?;
        Some(text.trim().split(',').map(str::to_string).collect())
    }

    /// The lockdown mode in brackets, e.g. `integrity`, when the file is readable.
    pub fn lockdown(&self) -> Option<String> {
        let text = fs::read_to_string(&self.lockdown_path).ok()?;
        let start = text.find('[')?;
        let end = text[start..].find(']')?;
        Some(text[start + 1..start + end].to_string())
    }
}

/// Effective capabilities of this process, from /proc/self/status.
pub fn effective_caps() -> u64 {
    let text = fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Missing capabilities for loading tracing programs, by name (empty when allowed).
pub fn missing_capabilities(caps: u64) -> Vec<&'static str> {
    let has = |c: u32| caps & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) {
        return Vec::new();
    }
    let mut missing = Vec::new();
    if !has(CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) {
        missing.push("CAP_PERFMON");
    }
    missing
}

/// Whether `caps` may attach network programs (XDP, tc, cgroup hooks): CAP_NET_ADMIN, or
/// CAP_SYS_ADMIN.
pub fn may_attach_network(caps: u64) -> bool {
    caps & ((1u64 << CAP_NET_ADMIN) | (1u64 << CAP_SYS_ADMIN)) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_decoded() {
        assert!(missing_capabilities(1 << CAP_SYS_ADMIN).is_empty());
        assert!(missing_capabilities((1 << CAP_BPF) | (1 << CAP_PERFMON)).is_empty());
        assert_eq!(missing_capabilities(1 << CAP_BPF), vec!["CAP_PERFMON"]);
        assert_eq!(missing_capabilities(0), vec!["CAP_BPF", "CAP_PERFMON"]);
    }
}
