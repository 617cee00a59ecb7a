//! The collector: node runners stream their reports here over gRPC (`fathom.v1.Collector`),
//! the operator merges them per job and writes the job's TraceResult; clients watch a job's
//! merged result live (`fathom.v1.Results`).
//!
//! - [`merge`]: the merge core, pure: accept or reject a report, replace (never add), merge
//!   across nodes with coverage and loss;
//! - [`pacing`]: writes each job's TraceResult status at most once a second (and once at the
//!   end), only when it changed;
//! - [`auth`]: which node a stream speaks for (TokenReview of the runner's projected token);
//! - [`server`]: the tonic services, TLS and keepalive.
//!
//! Only the leader merges and writes: the server runs on every replica, and a follower
//! answers `UNAVAILABLE` so that runners reconnect until they reach the leader (through the
//! Service, whose endpoints are the ready replicas).

pub mod auth;
pub mod events;
pub mod merge;
pub mod pacing;
pub mod server;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use fathom_proto::v1;
use tokio::sync::watch;

pub use merge::{Accept, ExpectedAssignment, JobInfo, MergeState, Merged};

/// A job's latest update for watchers: a `watch` channel holds only the newest, so a slow
/// watcher skips to it instead of queueing (events of skipped updates are lost to it).
pub type UpdateTx = watch::Sender<Option<Arc<v1::ResultUpdate>>>;

/// The collector's shared state: the merge, and the watchers' channels.
#[derive(Debug, Default)]
pub struct Collector {
    state: Mutex<MergeState>,
    watchers: Mutex<HashMap<String, (UpdateTx, u64)>>,
}

impl Collector {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The merge state, locked.
    pub fn state(&self) -> MutexGuard<'_, MergeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn watchers(&self) -> MutexGuard<'_, HashMap<String, (UpdateTx, u64)>> {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets what the operator knows of a job (the reconciler calls it with the assignments
    /// it listed).
    pub fn set_job(&self, info: JobInfo) {
        self.state().set_job(info);
    }

    /// Forgets a deleted job.
    pub fn forget_job(&self, uid: &str) {
        self.state().forget_job(uid);
        self.watchers().remove(uid);
    }

    /// Accepts or rejects one report from a stream authenticated as `peer_node`.
    pub fn accept(&self, peer_node: &str, report: &v1::NodeReport) -> Accept {
        self.state().accept(peer_node, report)
    }

    /// The merge of job `uid`.
    pub fn merged(&self, uid: &str) -> Option<Merged> {
        self.state().merged(uid)
    }

    /// Duplicates discarded so far.
    pub fn duplicates_discarded(&self) -> u64 {
        self.state().duplicates_discarded()
    }

    /// Whether the collector holds reports of `run` of job `uid`: then the TraceResult's
    /// status is the collector's to write.
    pub fn has_reports(&self, uid: &str, run: u64) -> bool {
        self.state().has_reports(uid, run)
    }

    /// A receiver of job `uid`'s updates, and the first update to send (with the events
    /// the operator keeps).
    pub fn subscribe(
        &self,
        uid: &str,
    ) -> Option<(
        watch::Receiver<Option<Arc<v1::ResultUpdate>>>,
        v1::ResultUpdate,
    )> {
        let merged = self.merged(uid)?;
        let events = merged.data.events.clone();
        let mut first = update_of(merged, Vec::new());
        first.events = events.into_iter().map(Into::into).collect();
        let mut watchers = self.watchers();
        let (tx, _) = watchers
            .entry(uid.to_string())
            .or_insert_with(|| (watch::channel(None).0, 0));
        let mut rx = tx.subscribe();
        rx.mark_unchanged();
        Some((rx, first))
    }

    /// Sends every job's watchers an update when its merge changed since the last one.
    /// Returns how many updates went out.
    pub fn publish(&self) -> usize {
        let uids: Vec<String> = self.watchers().keys().cloned().collect();
        let mut sent = 0;
        for uid in uids {
            let (version, events) = {
                let mut state = self.state();
                (state.version(&uid), state.take_new_events(&uid))
            };
            let mut watchers = self.watchers();
            let Some((tx, published)) = watchers.get_mut(&uid) else {
                continue;
            };
            if tx.receiver_count() == 0 {
                watchers.remove(&uid);
                continue;
            }
            if *published == version {
                continue;
            }
            drop(watchers);
            let Some(merged) = self.merged(&uid) else {
                continue;
            };
            let update = Arc::new(update_of(merged, events));
            if let Some((tx, published)) = self.watchers().get_mut(&uid) {
                *published = version;
                tx.send_replace(Some(update));
                sent += 1;
            }
        }
        sent
    }
}

/// A merged result as a [`v1::ResultUpdate`]: the aggregate without events, plus `events`.
pub fn update_of(
    merged: Merged,
    events: Vec<fathom_crds::result::EventRecord>,
) -> v1::ResultUpdate {
    let mut data = merged.data;
    data.events.clear();
    v1::ResultUpdate {
        job_uid: merged.job.uid,
        run: merged.run,
        result: Some(data.into()),
        coverage: Some(merged.coverage),
        counters: Some(merged.counters),
        events: events.into_iter().map(Into::into).collect(),
        r#final: merged.finished,
    }
}
