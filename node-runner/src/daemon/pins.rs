//! What the runner leaves in bpffs: one directory per running assignment,
//! `/sys/fs/bpf/fathom/<assignment-uid>/`, so that a restarted runner knows what it was
//! running. The engine (built [`with_pin_root`](crate::engine::session::Engine::with_pin_root)) pins
//! each session's links and maps there, in a directory named by the record of what it runs
//! (`record-<digest of spec, scope, sizes and programs>/`), so the probes keep counting
//! while no runner runs and the next runner resumes them (RELIABILITY T2). At start the
//! runner keeps the directories of the assignments it still wants and removes the others
//! with everything pinned in them (T1): a pinned link whose pin is removed and which no
//! process holds is detached, and its programs and maps are freed.

use std::{
    collections::BTreeSet,
    fs, io,
    path::{Path, PathBuf},
};

/// Where bpffs is mounted on a node.
pub const BPFFS: &str = "/sys/fs/bpf";
/// The runner's directory in bpffs.
pub const PIN_ROOT: &str = "/sys/fs/bpf/fathom";

/// The runner's pin directory.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

/// What [`Pins::sweep`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Directories of wanted assignments, kept.
    pub kept: Vec<String>,
    /// Directories of assignments no longer wanted, removed with their pins.
    pub removed: Vec<String>,
}

/// Whether `uid` can name a directory: a Kubernetes uid (letters, digits, `-`), nothing that
/// walks out of the root.
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 128
        && uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

impl Pins {
    /// The host's pin directory.
    pub fn host() -> Pins {
        Pins::at(PIN_ROOT)
    }

    /// A pin directory elsewhere (tests use a private directory in bpffs).
    pub fn at(root: impl Into<PathBuf>) -> Pins {
        Pins { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of an assignment.
    pub fn dir(&self, uid: &str) -> io::Result<PathBuf> {
        if !valid_uid(uid) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{uid:?} is not an assignment uid"),
            ));
        }
        Ok(self.root.join(uid))
    }

    /// Marks assignment `uid` as running here (creates its directory; idempotent).
    pub fn mark(&self, uid: &str) -> io::Result<PathBuf> {
        let dir = self.dir(uid)?;
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Removes assignment `uid`'s directory and what is pinned in it; absent is fine.
    pub fn remove(&self, uid: &str) -> io::Result<()> {
        match fs::remove_dir_all(self.dir(uid)?) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The assignments with a directory.
    pub fn marked(&self) -> io::Result<BTreeSet<String>> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
            Err(e) => return Err(e),
        };
        let mut uids = BTreeSet::new();
        for e in entries {
            let e = e?;
            if e.file_type()?.is_dir() {
                uids.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(uids)
    }

    /// At start: keeps the directories of `wanted` assignments, removes every other one
    /// (whatever its name) with its pins.
    pub fn sweep(&self, wanted: &BTreeSet<String>) -> io::Result<Swept> {
        let mut swept = Swept::default();
        for uid in self.marked()? {
            if wanted.contains(&uid) && valid_uid(&uid) {
                swept.kept.push(uid);
            } else {
                fs::remove_dir_all(self.root.join(&uid))?;
                swept.removed.push(uid);
            }
        }
        Ok(swept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_pin_dirs_are_removed_and_wanted_ones_kept() {
        let root = std::env::temp_dir().join(format!("fathom-pins-{}", std::process::id()));
        let pins = Pins::at(&root);
        assert!(pins.marked().unwrap().is_empty(), "no root yet is no pins");
        pins.mark("aaaa-1").unwrap();
        pins.mark("aaaa-1").unwrap();
        pins.mark("bbbb-2").unwrap();
        fs::create_dir_all(root.join("bbbb-2/inner")).unwrap();
        fs::create_dir_all(root.join("not a uid")).unwrap();
        let swept = pins.sweep(&BTreeSet::from(["aaaa-1".to_string()])).unwrap();
        assert_eq!(swept.kept, vec!["aaaa-1"]);
        assert_eq!(swept.removed, vec!["bbbb-2", "not a uid"]);
        assert_eq!(
            pins.marked().unwrap(),
            BTreeSet::from(["aaaa-1".to_string()])
        );
        pins.remove("aaaa-1").unwrap();
        pins.remove("aaaa-1").unwrap();
        assert!(pins.marked().unwrap().is_empty());
        assert!(pins.mark("../etc").is_err());
        fs::remove_dir_all(&root).unwrap();
    }
}
