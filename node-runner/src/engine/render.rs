//! Decoding what the kernel programs wrote into the results model: keys into named columns,
//! per-CPU values into rows and histograms, ring-buffer records into events.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::Path,
};

use fathom_common::{AggKey, AggValue, Event, NetKey, net};
use fathom_crds::result::{Bucket, EventRecord, Histogram, Row, top_rows};

use crate::engine::{
    plan::{CgroupView, Column, EventPart, JobPlan, KeyPart, NetPart, Render, ValueKind},
    symbols::{self, Symbols, comm_str},
};

/// Kernel stack frames by stack id, fetched by the caller from the stack map.
pub type StackFrames = HashMap<i32, Vec<u64>>;

/// Renders numbers by their column's rule.
pub fn render_number(v: u64, size_signed: bool, render: &Render) -> String {
    match render {
        Render::Unsigned => v.to_string(),
        Render::Signed => (v as i64).to_string(),
        Render::Symbolic(names) => names.get(&v).cloned().unwrap_or_else(|| {
            if size_signed {
                (v as i64).to_string()
            } else {
                v.to_string()
            }
        }),
        Render::Syscall => symbols::syscall_name(v),
        Render::Ipv4 => {
            let b = (v as u32).to_le_bytes();
            format!("{}.{}.{}.{}", b[0], b[1], b[2], b[3])
        }
        Render::Hex => format!("{v:#x}"),
    }
}

/// Interface names by index, from sysfs.
pub fn interface_names() -> HashMap<u32, String> {
    let Ok(dir) = fs::read_dir("/sys/class/net") else {
        return HashMap::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let index = fs::read_to_string(e.path().join("ifindex")).ok()?;
            Some((index.trim().parse().ok()?, name))
        })
        .collect()
}

/// An IP protocol by name (`non-ip` for a frame that is not IP).
pub fn protocol_name(family: u8, protocol: u8) -> String {
    if family == 0 {
        return "non-ip".into();
    }
    match protocol {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        p => p.to_string(),
    }
}

/// An address of a network key (network order; IPv4 in the first 4 bytes).
pub fn address(family: u8, bytes: &[u8; 16]) -> String {
    match family {
        net::IPV4 => std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string(),
        net::IPV6 => std::net::Ipv6Addr::from(*bytes).to_string(),
        _ => String::new(),
    }
}

/// Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup on a unified system,
/// /sys/fs/cgroup/unified on a hybrid one.
pub fn cgroup2_root() -> std::path::PathBuf {
    cgroup2_mount().unwrap_or_else(|| "/sys/fs/cgroup".into())
}

/// The mount point of the cgroup v2 hierarchy, `None` on a cgroup v1-only host.
pub fn cgroup2_mount() -> Option<std::path::PathBuf> {
    fs::read_to_string("/proc/mounts").ok().and_then(|m| {
        m.lines().find_map(|l| {
            let mut it = l.split_whitespace();
            let (_src, dir, fstype) = (it.next()?, it.next()?, it.next()?);
            (fstype == "cgroup2").then(|| std::path::PathBuf::from(dir))
        })
    })
}

/// Who a container cgroup belongs to in Kubernetes terms: the node runner knows it from the
/// assignment's target pods, the kernel only sees a cgroup id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupLabels {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// Resolves cgroup ids to paths (cgroup v2: the id is the directory's inode number), and to
/// the namespace, pod and container names the runner gave ([`Cgroups::set_labels`]).
#[derive(Default)]
pub struct Cgroups {
    paths: HashMap<u64, String>,
    scanned: bool,
    labels: HashMap<u64, CgroupLabels>,
}

impl Cgroups {
    /// Names the cgroups of target containers (replacing earlier names).
    pub fn set_labels(&mut self, labels: HashMap<u64, CgroupLabels>) {
        self.labels = labels;
    }

    /// The runner's names of a cgroup, if it gave some.
    pub fn labels(&self, id: u64) -> Option<&CgroupLabels> {
        self.labels.get(&id)
    }

    fn scan(&mut self) {
        self.scanned = true;
        let root = cgroup2_root();
        let root = root.as_path();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            if let Ok(meta) = fs::metadata(&dir) {
                use std::os::unix::fs::MetadataExt;
                let rel = dir.strip_prefix(root).unwrap_or(&dir).display().to_string();
                self.paths.insert(meta.ino(), format!("/{rel}"));
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
        }
    }

    /// The cgroup path of an id, or the id.
    pub fn path(&mut self, id: u64) -> String {
        if !self.paths.contains_key(&id) && !self.scanned {
            self.scan();
        }
        self.paths
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    /// The Kubernetes view of a cgroup path: (pod uid, container id), when it is a pod's.
    pub fn kube_parts(path: &str) -> (Option<String>, Option<String>) {
        let mut pod = None;
        let mut container = None;
        for part in path.split('/') {
            let part = part.trim_end_matches(".slice").trim_end_matches(".scope");
            if let Some(i) = part.find("-pod") {
                pod = Some(part[i + 4..].replace('_', "-"));
            } else if let Some(uid) = part.strip_prefix("pod") {
                pod = Some(uid.to_string());
            }
            for prefix in ["cri-containerd-", "crio-", "docker-", "containerd-"] {
                if let Some(id) = part.strip_prefix(prefix) {
                    container = Some(id.chars().take(12).collect());
                }
            }
            if pod.is_some()
                && container.is_none()
                && part.len() == 64
                && part.chars().all(|c| c.is_ascii_hexdigit())
            {
                container = Some(part[..12].to_string());
            }
        }
        (pod, container)
    }
}

/// The cgroup (v2) id of a cgroup directory: its inode number.
pub fn cgroup_id(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(dir)?.ino())
}

/// Everything needed to turn keys into text.
pub struct Renderer<'a> {
    pub plan: &'a JobPlan,
    pub node: &'a str,
    pub stacks: &'a StackFrames,
    pub symbols: &'a mut Symbols,
    pub cgroups: &'a mut Cgroups,
}

impl Renderer<'_> {
    fn cgroup_cell(&mut self, view: CgroupView, id: u64) -> String {
        if let Some(l) = self.cgroups.labels(id) {
            return match view {
                CgroupView::Id => self.cgroups.path(id),
                CgroupView::Namespace => l.namespace.clone(),
                CgroupView::Pod => l.pod.clone(),
                CgroupView::Container => l.container.clone(),
            };
        }
        let path = self.cgroups.path(id);
        match view {
            CgroupView::Id => path,
            CgroupView::Namespace => String::new(),
            CgroupView::Pod => Cgroups::kube_parts(&path).0.unwrap_or_default(),
            CgroupView::Container => Cgroups::kube_parts(&path).1.unwrap_or_default(),
        }
    }

    fn column(&mut self, c: &Column, k: &AggKey) -> String {
        match &c.part {
            KeyPart::Node => self.node.to_string(),
            KeyPart::Pid => k.pid.to_string(),
            KeyPart::Tid => k.tid.to_string(),
            KeyPart::Comm => comm_str(&k.comm),
            KeyPart::Cpu => k.cpu.to_string(),
            KeyPart::Cgroup(view) => self.cgroup_cell(*view, k.cgroup),
            KeyPart::Kstack => match self.stacks.get(&k.kstack) {
                Some(frames) if k.kstack >= 0 => self.symbols.kernel_stack(frames),
                _ => "[no kernel stack]".into(),
            },
            KeyPart::Ustack => match self.stacks.get(&k.ustack) {
                Some(frames) if k.ustack >= 0 => self.symbols.user_stack(k.pid, frames),
                _ => "[no user stack]".into(),
            },
            KeyPart::Field(i) => render_number(k.fields[*i], false, &c.render),
            // Not a part of a tracing key.
            KeyPart::Net(_) => String::new(),
        }
    }

    fn net_column(&mut self, c: &Column, k: &NetKey, interfaces: &HashMap<u32, String>) -> String {
        let part = match &c.part {
            KeyPart::Node => return self.node.to_string(),
            KeyPart::Net(p) => *p,
            _ => return String::new(),
        };
        match part {
            NetPart::Interface => interfaces
                .get(&k.ifindex)
                .cloned()
                .unwrap_or_else(|| format!("if{}", k.ifindex)),
            NetPart::Direction => match k.direction {
                net::INGRESS => "ingress".into(),
                net::EGRESS => "egress".into(),
                _ => String::new(),
            },
            NetPart::Protocol => protocol_name(k.family, k.protocol),
            NetPart::Saddr => address(k.family, &k.saddr),
            NetPart::Daddr => address(k.family, &k.daddr),
            NetPart::Sport => k.sport.to_string(),
            NetPart::Dport => k.dport.to_string(),
            NetPart::Cgroup(view) => self.cgroup_cell(view, k.cgroup),
        }
    }

    /// Rows or histograms from a network probe's map entries.
    pub fn aggregate_net(
        &mut self,
        entries: &[(NetKey, AggValue)],
    ) -> (
        Vec<Row>,
        Option<fathom_crds::result::OtherRow>,
        Vec<Histogram>,
        bool,
    ) {
        let interfaces = interface_names();
        let plan = self.plan;
        let keyed: Vec<_> = entries
            .iter()
            .map(|(k, v)| {
                let keys = plan
                    .columns
                    .iter()
                    .map(|c| (c.name.clone(), self.net_column(c, k, &interfaces)))
                    .collect();
                (keys, k.bucket, *v)
            })
            .collect();
        self.aggregate_keyed(keyed)
    }

    /// The visible columns of a key.
    pub fn keys(&mut self, k: &AggKey) -> BTreeMap<String, String> {
        let plan = self.plan;
        plan.columns
            .iter()
            .map(|c| (c.name.clone(), self.column(c, k)))
            .collect()
    }

    /// Rows (count/sum) or histograms from the kernel map's entries.
    pub fn aggregate(
        &mut self,
        entries: &[(AggKey, AggValue)],
    ) -> (
        Vec<Row>,
        Option<fathom_crds::result::OtherRow>,
        Vec<Histogram>,
        bool,
    ) {
        let keyed: Vec<_> = entries
            .iter()
            .map(|(k, v)| (self.keys(k), k.bucket, *v))
            .collect();
        self.aggregate_keyed(keyed)
    }

    /// Rows or histograms from entries whose keys are rendered: (columns, bucket, value).
    fn aggregate_keyed(
        &mut self,
        entries: Vec<(BTreeMap<String, String>, u32, AggValue)>,
    ) -> (
        Vec<Row>,
        Option<fathom_crds::result::OtherRow>,
        Vec<Histogram>,
        bool,
    ) {
        let plan = self.plan;
        match plan.value {
            ValueKind::Count | ValueKind::Sum => {
                let mut merged: BTreeMap<BTreeMap<String, String>, u64> = BTreeMap::new();
                for (keys, _, v) in entries {
                    let value = if plan.value == ValueKind::Sum {
                        v.sum
                    } else {
                        v.count
                    };
                    *merged.entry(keys).or_default() += value;
                }
                let rows: Vec<Row> = merged
                    .into_iter()
                    .map(|(keys, value)| Row { keys, value })
                    .collect();
                let truncated = rows.len() > plan.top;
                let (rows, other) = top_rows(rows, plan.top);
                (rows, other, Vec::new(), truncated)
            }
            ValueKind::Hist => {
                let mut groups: BTreeMap<BTreeMap<String, String>, BTreeMap<u32, u64>> =
                    BTreeMap::new();
                for (keys, bucket, v) in entries {
                    *groups.entry(keys).or_default().entry(bucket).or_default() += v.count;
                }
                let mut hists: Vec<Histogram> = groups
                    .into_iter()
                    .map(|(keys, buckets)| histogram(keys, &buckets))
                    .collect();
                hists.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.keys.cmp(&b.keys)));
                let truncated = hists.len() > plan.top;
                hists.truncate(plan.top);
                (Vec::new(), None, hists, truncated)
            }
        }
    }

    /// One ring-buffer record as an event.
    pub fn event(&mut self, e: &Event) -> EventRecord {
        let plan = self.plan;
        let Some(ev) = &plan.events else {
            return EventRecord::default();
        };
        let mut fields = BTreeMap::new();
        for (name, part) in &ev.columns {
            let v = match part {
                EventPart::Pid => e.pid.to_string(),
                EventPart::Tid => e.tid.to_string(),
                EventPart::Ppid => {
                    symbols::ppid(e.pid).map_or_else(|| "?".into(), |p| p.to_string())
                }
                EventPart::Comm => comm_str(&e.comm),
                EventPart::Cpu => e.cpu.to_string(),
                EventPart::Cgroup => self.cgroups.path(e.cgroup),
                EventPart::Value(r) => render_number(e.value, true, r),
                EventPart::Arg(r) => render_number(e.arg, true, r),
                EventPart::Field(i, r) => render_number(e.fields[*i], false, r),
                EventPart::Payload => {
                    if ev.payload {
                        let len = (e.payload_len as usize).min(e.payload.len());
                        comm_str(&e.payload[..len])
                    } else {
                        "<not captured: set spec.events.payload: true>".into()
                    }
                }
            };
            fields.insert(name.clone(), v);
        }
        EventRecord {
            time_ns: e.ts_ns,
            fields,
        }
    }
}

/// A histogram from log2 bucket counts (bucket b holds [2^(b-1), 2^b); bucket 0 holds 0).
pub fn histogram(keys: BTreeMap<String, String>, buckets: &BTreeMap<u32, u64>) -> Histogram {
    let bounds = |b: u32| -> (u64, u64) {
        match b {
            0 => (0, 1),
            64.. => (1 << 63, u64::MAX),
            b => (1u64 << (b - 1), 1u64 << b),
        }
    };
    let (Some(first), Some(last)) = (buckets.keys().next(), buckets.keys().last()) else {
        return Histogram {
            keys,
            buckets: Vec::new(),
            count: 0,
        };
    };
    // Keep empty buckets between the first and last so the shape reads like bpftrace's hist().
    let out: Vec<Bucket> = (*first..=*last)
        .map(|b| {
            let (low, high) = bounds(b);
            Bucket {
                low,
                high,
                count: buckets.get(&b).copied().unwrap_or(0),
            }
        })
        .collect();
    Histogram {
        keys,
        count: out.iter().map(|b| b.count).sum(),
        buckets: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_render_by_rule() {
        assert_eq!(render_number(u64::MAX, true, &Render::Signed), "-1");
        assert_eq!(render_number(0x0100007f, false, &Render::Ipv4), "127.0.0.1");
        assert_eq!(render_number(257, false, &Render::Syscall), "openat");
        let names = BTreeMap::from([(2, "NOT_SPECIFIED".to_string())]);
        assert_eq!(
            render_number(2, false, &Render::Symbolic(names.clone())),
            "NOT_SPECIFIED"
        );
        assert_eq!(render_number(7, false, &Render::Symbolic(names)), "7");
    }

    #[test]
    fn histograms_fill_gaps_and_use_log2_bounds() {
        let h = histogram(BTreeMap::new(), &BTreeMap::from([(1, 3), (4, 2)]));
        let bounds: Vec<(u64, u64, u64)> =
            h.buckets.iter().map(|b| (b.low, b.high, b.count)).collect();
        assert_eq!(bounds, vec![(1, 2, 3), (2, 4, 0), (4, 8, 0), (8, 16, 2)]);
        assert_eq!(h.count, 5);
    }

    #[test]
    fn kube_cgroup_paths_are_parsed() {
        let (pod, c) = Cgroups::kube_parts(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b_3c4d.slice/cri-containerd-0123456789abcdef0123.scope",
        );
        assert_eq!(pod.as_deref(), Some("1a2b-3c4d"));
        assert_eq!(c.as_deref(), Some("0123456789ab"));
        assert_eq!(
            Cgroups::kube_parts("/user.slice/session-1.scope"),
            (None, None)
        );
    }
}
