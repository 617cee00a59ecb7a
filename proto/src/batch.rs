//! Event batches: the events of one `NodeReport` by column ([`v1::EventBatch`]).
//!
//! A map per event made every event a handful of allocations on both sides of the wire; by
//! column, each distinct string (field names, and values such as a comm or a path that repeat
//! across a batch) travels and is decoded once, and the rest is packed integers. The
//! collector keeps batches as they came and renders only the events someone reads
//! ([`EventBatch::record`]).

use std::collections::{BTreeMap, HashMap};

use fathom_crds::result::EventRecord;

use crate::v1::EventBatch;

/// Why a batch cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error(
        "event_batch has {cells} cells for {events} events of {fields} fields; it needs events × fields"
    )]
    CellCount {
        cells: usize,
        events: usize,
        fields: usize,
    },
    #[error("event_batch cell {index} points at value {cell} of {values}")]
    CellOutOfRange {
        index: usize,
        cell: u32,
        values: usize,
    },
    #[error("event_batch names field {0:?} twice")]
    DuplicateField(String),
}

impl EventBatch {
    /// The batch of `records`, in their order.
    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a EventRecord>) -> EventBatch {
        let mut batch = EventBatch::default();
        let mut field_index: HashMap<&'a str, usize> = HashMap::new();
        let mut value_index: HashMap<&'a str, u32> = HashMap::new();
        // Cells of each event, by field index, before the field count is known.
        let mut rows: Vec<Vec<(usize, u32)>> = Vec::new();
        for record in records {
            batch.time_ns.push(record.time_ns);
            let mut row = Vec::with_capacity(record.fields.len());
            for (name, value) in &record.fields {
                let next = field_index.len();
                let field = *field_index.entry(name.as_str()).or_insert_with(|| {
                    batch.fields.push(name.clone());
                    next
                });
                let next = value_index.len() as u32;
                let value = *value_index.entry(value.as_str()).or_insert_with(|| {
                    batch.values.push(value.clone());
                    next
                });
                row.push((field, value + 1));
            }
            rows.push(row);
        }
        let width = batch.fields.len();
        batch.cells = vec![0; rows.len() * width];
        for (i, row) in rows.into_iter().enumerate() {
            for (field, cell) in row {
                batch.cells[i * width + field] = cell;
            }
        }
        batch
    }

    /// Events in the batch (whether or not it is valid: see [`EventBatch::check`]).
    pub fn len(&self) -> usize {
        self.time_ns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.time_ns.is_empty()
    }

    /// Checks lengths and indices, so that [`EventBatch::record`] can read any event.
    pub fn check(&self) -> Result<(), BatchError> {
        let (events, fields, values) = (self.len(), self.fields.len(), self.values.len());
        if self.cells.len() != events * fields {
            return Err(BatchError::CellCount {
                cells: self.cells.len(),
                events,
                fields,
            });
        }
        if let Some((index, &cell)) = self
            .cells
            .iter()
            .enumerate()
            .find(|(_, c)| **c as usize > values)
        {
            return Err(BatchError::CellOutOfRange {
                index,
                cell,
                values,
            });
        }
        let mut seen = std::collections::HashSet::with_capacity(fields);
        if let Some(twice) = self.fields.iter().find(|f| !seen.insert(f.as_str())) {
            return Err(BatchError::DuplicateField(twice.clone()));
        }
        Ok(())
    }

    /// Event `i` of a checked batch.
    ///
    /// # Panics
    /// When `i` is out of range or the batch was not [checked](EventBatch::check).
    pub fn record(&self, i: usize) -> EventRecord {
        let width = self.fields.len();
        let fields: BTreeMap<String, String> = self.cells[i * width..(i + 1) * width]
            .iter()
            .zip(&self.fields)
            .filter(|(cell, _)| **cell != 0)
            .map(|(cell, name)| (name.clone(), self.values[*cell as usize - 1].clone()))
            .collect();
        EventRecord {
            time_ns: self.time_ns[i],
            fields,
        }
    }

    /// Every event of a checked batch, in order.
    pub fn records(&self) -> impl Iterator<Item = EventRecord> + '_ {
        (0..self.len()).map(|i| self.record(i))
    }

    /// Appends the events of `other` (checked) after this batch's (checked).
    pub fn append(&mut self, other: &EventBatch) {
        if other.is_empty() {
            return;
        }
        if self.is_empty() {
            *self = other.clone();
            return;
        }
        // Columns: this batch's, then those only `other` has.
        let old_width = self.fields.len();
        let column: Vec<usize> = other
            .fields
            .iter()
            .map(|name| match self.fields.iter().position(|f| f == name) {
                Some(j) => j,
                None => {
                    self.fields.push(name.clone());
                    self.fields.len() - 1
                }
            })
            .collect();
        let width = self.fields.len();
        if width != old_width {
            let mut cells = vec![0; self.len() * width];
            for (i, row) in self.cells.chunks(old_width.max(1)).enumerate() {
                cells[i * width..i * width + row.len()].copy_from_slice(row);
            }
            self.cells = cells;
        }
        let mut index: HashMap<&str, u32> = HashMap::new();
        for (i, v) in self.values.iter().enumerate() {
            index.entry(v.as_str()).or_insert(i as u32 + 1);
        }
        let mut remap = vec![0u32; other.values.len() + 1];
        let mut added = Vec::new();
        for (i, v) in other.values.iter().enumerate() {
            remap[i + 1] = match index.get(v.as_str()) {
                Some(&cell) => cell,
                None => {
                    added.push(v.clone());
                    let cell = (self.values.len() + added.len()) as u32;
                    index.insert(v.as_str(), cell);
                    cell
                }
            };
        }
        self.values.extend(added);
        let other_width = other.fields.len();
        for (i, &time_ns) in other.time_ns.iter().enumerate() {
            self.time_ns.push(time_ns);
            let start = self.cells.len();
            self.cells.resize(start + width, 0);
            for (j, &cell) in other.cells[i * other_width..(i + 1) * other_width]
                .iter()
                .enumerate()
            {
                self.cells[start + column[j]] = remap[cell as usize];
            }
        }
    }

    /// Drops the first `n` events (all of them when `n` is more).
    pub fn drop_front(&mut self, n: usize) {
        let n = n.min(self.len());
        self.time_ns.drain(..n);
        self.cells.drain(..n * self.fields.len());
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn event(time_ns: u64, fields: &[(&str, &str)]) -> EventRecord {
        EventRecord {
            time_ns,
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn repeated_strings_travel_once_and_missing_fields_stay_missing() {
        let events = vec![
            event(1, &[("comm", "nginx"), ("pid", "7")]),
            event(2, &[("comm", "nginx"), ("path", "/etc/hosts")]),
            event(3, &[]),
        ];
        let batch = EventBatch::from_records(&events);
        assert_eq!(batch.fields, ["comm", "pid", "path"]);
        assert_eq!(batch.values, ["nginx", "7", "/etc/hosts"]);
        assert_eq!(batch.cells, [1, 2, 0, 1, 0, 3, 0, 0, 0]);
        batch.check().expect("valid");
        assert_eq!(batch.records().collect::<Vec<_>>(), events);
    }

    #[test]
    fn bad_lengths_and_indices_are_named() {
        let good = EventBatch::from_records(&[event(1, &[("comm", "a")])]);
        let mut short = good.clone();
        short.cells.clear();
        assert_eq!(
            short.check(),
            Err(BatchError::CellCount {
                cells: 0,
                events: 1,
                fields: 1
            })
        );
        let mut far = good.clone();
        far.cells[0] = 2;
        assert_eq!(
            far.check(),
            Err(BatchError::CellOutOfRange {
                index: 0,
                cell: 2,
                values: 1
            })
        );
        let mut twice = good;
        twice.fields.push("comm".into());
        twice.cells.push(1);
        assert_eq!(
            twice.check(),
            Err(BatchError::DuplicateField("comm".into()))
        );
    }

    #[test]
    fn appended_batches_read_as_one_and_dropping_keeps_the_newest() {
        let a = [event(1, &[("comm", "a")]), event(2, &[("comm", "b")])];
        let b = [
            event(3, &[("pid", "9"), ("comm", "b")]),
            event(4, &[("path", "a")]),
        ];
        let mut batch = EventBatch::from_records(&a);
        batch.append(&EventBatch::from_records(&b));
        batch.check().expect("valid");
        let all: Vec<EventRecord> = a.iter().chain(&b).cloned().collect();
        assert_eq!(batch.records().collect::<Vec<_>>(), all);
        assert_eq!(batch.values, ["a", "b", "9"], "values are shared");
        batch.drop_front(3);
        batch.check().expect("valid");
        assert_eq!(batch.records().collect::<Vec<_>>(), all[3..]);
        batch.drop_front(5);
        assert!(batch.is_empty());
    }

    proptest! {
        #[test]
        fn any_two_batches_append_to_their_events_in_order(
            first in prop::collection::vec(
                (any::<u64>(), prop::collection::btree_map("[a-c]", "[x-z]{0,2}", 0..3)),
                0..8,
            ),
            second in prop::collection::vec(
                (any::<u64>(), prop::collection::btree_map("[b-d]", "[x-z]{0,2}", 0..3)),
                0..8,
            ),
            dropped in 0usize..20,
        ) {
            let records = |v: Vec<(u64, BTreeMap<String, String>)>| -> Vec<EventRecord> {
                v.into_iter().map(|(time_ns, fields)| EventRecord { time_ns, fields }).collect()
            };
            let (first, second) = (records(first), records(second));
            let mut batch = EventBatch::from_records(&first);
            batch.append(&EventBatch::from_records(&second));
            prop_assert!(batch.check().is_ok());
            let all: Vec<EventRecord> = first.into_iter().chain(second).collect();
            prop_assert_eq!(batch.records().collect::<Vec<_>>(), all.clone());
            batch.drop_front(dropped);
            prop_assert!(batch.check().is_ok());
            prop_assert_eq!(
                batch.records().collect::<Vec<_>>(),
                all[dropped.min(all.len())..].to_vec()
            );
        }

        #[test]
        fn any_events_survive_a_batch(
            events in prop::collection::vec(
                (any::<u64>(), prop::collection::btree_map("[a-c]{1,2}", "[x-z]{0,3}", 0..4)),
                0..20,
            )
        ) {
            let events: Vec<EventRecord> = events
                .into_iter()
                .map(|(time_ns, fields)| EventRecord { time_ns, fields })
                .collect();
            let batch = EventBatch::from_records(&events);
            prop_assert!(batch.check().is_ok());
            prop_assert_eq!(batch.records().collect::<Vec<_>>(), events);
        }
    }
}
