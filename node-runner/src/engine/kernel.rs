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

/// Why the kernel refuses to load BPF programs although the capability check passed, or None
/// when it loads them: a two-instruction socket filter (`r0 = 0; exit`) is loaded and closed.
/// A seccomp filter (a container runtime's default profile), an LSM policy or a sysctl can
/// refuse `bpf(BPF_PROG_LOAD)` with EPERM whatever the capabilities; without this check the
/// refusal surfaced later, inside the loader, under a misleading name.
pub fn load_refusal() -> Option<String> {
    // struct bpf_insn: code, dst_reg:4 | src_reg:4, off, imm.
    let insns: [u64; 2] = [
        0xb7, // BPF_ALU64 | BPF_MOV | BPF_K: r0 = 0
        0x95, // BPF_JMP | BPF_EXIT
    ];
    let license = c"GPL";
    // The first fields of union bpf_attr for BPF_PROG_LOAD; the rest stays zero.
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        rest: [u64; 16],
    }
    let attr = ProgLoad {
        prog_type: 1, // BPF_PROG_TYPE_SOCKET_FILTER
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        rest: [0; 16],
    };
    const BPF_PROG_LOAD: libc::c_long = 5;
    // SAFETY: attr is a valid, zero-padded bpf_attr prefix of the size passed; the pointers
    // in it outlive the call.
    #[expect(unsafe_code, reason = "bpf(2): loading the probe program")]
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoad,
            std::mem::size_of::<ProgLoad>() as libc::c_uint,
        )
    };
    if fd >= 0 {
        // SAFETY: fd is the program's descriptor, owned here and closed once.
        #[expect(unsafe_code, reason = "close(2) of the probe program")]
        unsafe {
            libc::close(fd as libc::c_int)
        };
        return None;
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => Some(format!(
            "the kernel refuses to load any BPF program (bpf(BPF_PROG_LOAD): {err}) although this process has CAP_BPF and CAP_PERFMON: a seccomp profile, an LSM policy or kernel.unprivileged_bpf_disabled stands in the way; allow bpf() in that policy, or give the runner an Unconfined seccomp profile (Helm: runner.seccompProfile=Unconfined; docs/install.md)"
        )),
        // Any other answer (an old kernel's EINVAL, say) is not a refusal: the real load
        // reports its own error.
        _ => None,
    }
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
