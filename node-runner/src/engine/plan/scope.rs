//! Which tasks a job's probes observe on this node: the plan's [`Scope`], and the cgroup filter
//! bit it turns on.

use std::{collections::BTreeSet, fmt};

use fathom_common::filter;

/// The reason a job limited to targets attaches nothing on a node.
pub const NOTHING_ATTACHED: &str = "no target pod of this job runs on this node: nothing attached";

/// Which tasks a job's probes observe on this node. There is no default and no "empty means
/// everything": whoever plans a job names its scope, and only [`Scope::Node`] sees the whole
/// node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every task of the node: `fathom run`, or a ClusterTraceJob's node-wide assignment
    /// (`spec.nodeWide`).
    Node,
    /// Only the tasks of these cgroups, enforced in the kernel by the cgroup filter: how a
    /// namespaced job sees only its own pods.
    Cgroups(CgroupSet),
    /// The job is limited to targets and none of them has a cgroup on this node: nothing is
    /// loaded or attached, and the result stays empty ([`NOTHING_ATTACHED`] says why).
    Nothing,
}

impl Scope {
    /// The scope of a job limited to `ids` (its target pods' cgroups on this node): those
    /// cgroups, or [`Scope::Nothing`] when there are none — never the whole node.
    pub fn targets(ids: impl IntoIterator<Item = u64>) -> Scope {
        match CgroupSet::new(ids) {
            Some(set) => Scope::Cgroups(set),
            None => Scope::Nothing,
        }
    }

    /// Whether the probes attach at all.
    pub fn attaches(&self) -> bool {
        !matches!(self, Scope::Nothing)
    }

    /// The cgroup ids the kernel filter admits; empty unless the scope is a cgroup set.
    pub fn cgroup_ids(&self) -> Vec<u64> {
        match self {
            Scope::Cgroups(set) => set.ids().collect(),
            Scope::Node | Scope::Nothing => Vec::new(),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Node => f.write_str("the whole node"),
            Scope::Cgroups(set) if set.count() == 1 => f.write_str("1 cgroup"),
            Scope::Cgroups(set) => write!(f, "{} cgroups", set.count()),
            Scope::Nothing => f.write_str(NOTHING_ATTACHED),
        }
    }
}

/// A non-empty set of cgroup ids: the only way to build a [`Scope::Cgroups`], so a cgroup
/// scope always admits at least one cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupSet(BTreeSet<u64>);

impl CgroupSet {
    /// The set of `ids`; `None` when there are none.
    pub fn new(ids: impl IntoIterator<Item = u64>) -> Option<CgroupSet> {
        let set: BTreeSet<u64> = ids.into_iter().collect();
        (!set.is_empty()).then_some(CgroupSet(set))
    }

    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().copied()
    }

    /// How many cgroups: at least 1.
    pub fn count(&self) -> usize {
        self.0.len()
    }
}

/// `flags` with the cgroup filter bit on exactly when `scope` is a cgroup set.
pub fn scope_filter_flags(flags: u32, scope: &Scope) -> u32 {
    match scope {
        Scope::Cgroups(_) => flags | filter::CGROUP,
        Scope::Node | Scope::Nothing => flags & !filter::CGROUP,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_target_set_is_nothing_never_the_node() {
        let scope = Scope::targets(Vec::new());
        assert_eq!(scope, Scope::Nothing);
        assert!(!scope.attaches());
        assert!(scope.cgroup_ids().is_empty());
        assert_eq!(scope.to_string(), NOTHING_ATTACHED);
        assert!(CgroupSet::new(Vec::new()).is_none());
    }

    #[test]
    fn a_target_set_keeps_each_cgroup_once() {
        let scope = Scope::targets([7, 3, 7]);
        assert!(scope.attaches());
        assert_eq!(scope.cgroup_ids(), vec![3, 7]);
        assert_eq!(scope.to_string(), "2 cgroups");
        assert_eq!(Scope::targets([9]).to_string(), "1 cgroup");
    }

    #[test]
    fn the_cgroup_filter_is_on_exactly_for_a_cgroup_set() {
        let other = filter::PID | filter::COMM;
        let set = Scope::targets([1]);
        assert_eq!(scope_filter_flags(other, &set), other | filter::CGROUP);
        for scope in [Scope::Node, Scope::Nothing] {
            assert_eq!(scope_filter_flags(other | filter::CGROUP, &scope), other);
            assert_eq!(scope_filter_flags(other, &scope), other);
        }
    }
}
