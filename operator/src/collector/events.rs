//! The events a job keeps: its last N, and those new since watchers were last updated.
//!
//! Reports bring events in batches ([`EventBatch`]); a window keeps the batches as they came
//! (shared, not copied, between the two windows of a job) and renders events only when
//! someone reads them — once a second for the TraceResult, once an update for watchers —
//! never per event accepted.

use std::{collections::VecDeque, sync::Arc};

use fathom_crds::result::EventRecord;
use fathom_proto::v1::EventBatch;

/// The newest events of a stream of checked batches, at most a bound.
#[derive(Debug, Default)]
pub struct EventWindow {
    /// Batches, oldest first, each with the index of its first event still kept.
    chunks: VecDeque<(Arc<EventBatch>, usize)>,
    len: usize,
}

impl EventWindow {
    /// Events kept.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a [checked](EventBatch::check) batch's events, then keeps the newest `bound`.
    pub fn push(&mut self, batch: Arc<EventBatch>, bound: usize) {
        if batch.is_empty() {
            return;
        }
        self.len += batch.len();
        self.chunks.push_back((batch, 0));
        self.bound(bound);
    }

    /// Keeps the newest `bound` events.
    pub fn bound(&mut self, bound: usize) {
        while self.len > bound {
            let Some((batch, start)) = self.chunks.front_mut() else {
                break;
            };
            let kept = batch.len() - *start;
            let excess = self.len - bound;
            if kept <= excess {
                self.len -= kept;
                self.chunks.pop_front();
            } else {
                *start += excess;
                self.len -= excess;
            }
        }
    }

    /// The events kept, oldest first.
    pub fn records(&self) -> Vec<EventRecord> {
        let mut out = Vec::with_capacity(self.len);
        for (batch, start) in &self.chunks {
            out.extend((*start..batch.len()).map(|i| batch.record(i)));
        }
        out
    }

    /// The events kept, oldest first, leaving the window empty.
    pub fn take(&mut self) -> Vec<EventRecord> {
        let out = self.records();
        self.chunks.clear();
        self.len = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(times: std::ops::Range<u64>) -> Arc<EventBatch> {
        let records: Vec<EventRecord> = times
            .map(|t| EventRecord {
                time_ns: t,
                fields: [("n".to_string(), t.to_string())].into(),
            })
            .collect();
        Arc::new(EventBatch::from_records(&records))
    }

    fn times(w: &EventWindow) -> Vec<u64> {
        w.records().iter().map(|e| e.time_ns).collect()
    }

    #[test]
    fn keeps_the_newest_events_across_batches() {
        let mut w = EventWindow::default();
        w.push(batch(0..3), 4);
        w.push(batch(3..5), 4);
        assert_eq!(times(&w), [1, 2, 3, 4]);
        w.push(batch(5..15), 4);
        assert_eq!(times(&w), [11, 12, 13, 14]);
        assert_eq!(w.records()[0].fields["n"], "11");
        w.bound(1);
        assert_eq!(times(&w), [14]);
        assert_eq!(w.take().len(), 1);
        assert!(w.is_empty());
        assert!(w.records().is_empty());
    }

    #[test]
    fn a_bound_of_zero_keeps_nothing() {
        let mut w = EventWindow::default();
        w.push(batch(0..3), 0);
        assert_eq!(w.len(), 0);
        assert!(w.records().is_empty());
    }
}
