//! Conversions between the wire's messages and the results model of [`fathom_crds`]: field
//! for field, so that a result survives `crds → proto → bytes → proto → crds` unchanged.
//!
//! Toward the wire every conversion is total (`From`). Back, the results messages are total
//! too (an absent `totals` is all zeros, as proto3 reads any absent field), while enums are
//! `TryFrom`: a peer built from a newer .proto may send values this build does not know.

use fathom_crds::{
    assignment::AssignmentPhase,
    result::{
        Bucket, Budget, Degradation, EventRecord, Histogram, OtherRow, ResultData, Row, Totals,
    },
    verdict::{ProbeVerdict, Reason, Verdict},
};

use crate::v1;

/// A message from the wire that the results model cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    #[error(
        "{field} = {value} is not a value this build knows; is the peer built from a newer fathom.proto?"
    )]
    UnknownEnumValue { field: &'static str, value: i32 },
    #[error("{field} is unspecified; the sender must set it")]
    Unspecified { field: &'static str },
}

impl ConversionError {
    /// A stable category for metrics and gRPC status codes: the sender sent something
    /// invalid.
    pub fn category(&self) -> &'static str {
        "InvalidArgument"
    }
}

impl From<ConversionError> for tonic::Status {
    fn from(e: ConversionError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

// Results: toward the wire.

impl From<ResultData> for v1::ResultData {
    fn from(r: ResultData) -> Self {
        v1::ResultData {
            probe: r.probe,
            value: r.value,
            keys: r.keys,
            rows: r.rows.into_iter().map(Into::into).collect(),
            other: r.other.map(Into::into),
            histograms: r.histograms.into_iter().map(Into::into).collect(),
            events: r.events.into_iter().map(Into::into).collect(),
            totals: Some(r.totals.into()),
            budget: r.budget.map(Into::into),
            stopped_reason: r.stopped_reason,
            degraded: r.degraded.into_iter().map(Into::into).collect(),
            truncated: r.truncated,
            elapsed_seconds: r.elapsed_seconds,
        }
    }
}

impl From<Row> for v1::Row {
    fn from(r: Row) -> Self {
        v1::Row {
            keys: r.keys,
            value: r.value,
        }
    }
}

impl From<OtherRow> for v1::OtherRow {
    fn from(o: OtherRow) -> Self {
        v1::OtherRow {
            rows: o.rows,
            value: o.value,
        }
    }
}

impl From<Histogram> for v1::Histogram {
    fn from(h: Histogram) -> Self {
        v1::Histogram {
            keys: h.keys,
            buckets: h.buckets.into_iter().map(Into::into).collect(),
            count: h.count,
        }
    }
}

impl From<Bucket> for v1::Bucket {
    fn from(b: Bucket) -> Self {
        v1::Bucket {
            low: b.low,
            high: b.high,
            count: b.count,
        }
    }
}

impl From<EventRecord> for v1::Event {
    fn from(e: EventRecord) -> Self {
        v1::Event {
            time_ns: e.time_ns,
            fields: e.fields,
        }
    }
}

impl From<Totals> for v1::Totals {
    fn from(t: Totals) -> Self {
        v1::Totals {
            hits: t.hits,
            distinct_keys: t.distinct_keys,
            events_emitted: t.events_emitted,
            events_delivered: t.events_delivered,
            events_lost: t.events_lost,
            events_dropped: t.events_dropped,
            map_full: t.map_full,
            rate_limited: t.rate_limited,
            stack_errors: t.stack_errors,
            unpaired: t.unpaired,
            filtered: t.filtered,
        }
    }
}

impl From<Degradation> for v1::Degradation {
    fn from(d: Degradation) -> Self {
        v1::Degradation {
            reason: d.reason,
            message: d.message,
        }
    }
}

impl From<Budget> for v1::Budget {
    fn from(b: Budget) -> Self {
        v1::Budget {
            cpu_ns: b.cpu_ns,
            runs: b.runs,
            cpu_percent: b.cpu_percent,
            events_per_second: b.events_per_second,
            memlock_bytes: b.memlock_bytes,
        }
    }
}

// Results: from the wire.

impl From<v1::ResultData> for ResultData {
    fn from(r: v1::ResultData) -> Self {
        ResultData {
            probe: r.probe,
            value: r.value,
            keys: r.keys,
            rows: r.rows.into_iter().map(Into::into).collect(),
            other: r.other.map(Into::into),
            histograms: r.histograms.into_iter().map(Into::into).collect(),
            events: r.events.into_iter().map(Into::into).collect(),
            totals: r.totals.map(Into::into).unwrap_or_default(),
            budget: r.budget.map(Into::into),
            stopped_reason: r.stopped_reason,
            degraded: r.degraded.into_iter().map(Into::into).collect(),
            truncated: r.truncated,
            elapsed_seconds: r.elapsed_seconds,
        }
    }
}

impl From<v1::Row> for Row {
    fn from(r: v1::Row) -> Self {
        Row {
            keys: r.keys,
            value: r.value,
        }
    }
}

impl From<v1::OtherRow> for OtherRow {
    fn from(o: v1::OtherRow) -> Self {
        OtherRow {
            rows: o.rows,
            value: o.value,
        }
    }
}

impl From<v1::Histogram> for Histogram {
    fn from(h: v1::Histogram) -> Self {
        Histogram {
            keys: h.keys,
            buckets: h.buckets.into_iter().map(Into::into).collect(),
            count: h.count,
        }
    }
}

impl From<v1::Bucket> for Bucket {
    fn from(b: v1::Bucket) -> Self {
        Bucket {
            low: b.low,
            high: b.high,
            count: b.count,
        }
    }
}

impl From<v1::Event> for EventRecord {
    fn from(e: v1::Event) -> Self {
        EventRecord {
            time_ns: e.time_ns,
            fields: e.fields,
        }
    }
}

impl From<v1::Totals> for Totals {
    fn from(t: v1::Totals) -> Self {
        Totals {
            hits: t.hits,
            distinct_keys: t.distinct_keys,
            events_emitted: t.events_emitted,
            events_delivered: t.events_delivered,
            events_lost: t.events_lost,
            events_dropped: t.events_dropped,
            map_full: t.map_full,
            rate_limited: t.rate_limited,
            stack_errors: t.stack_errors,
            unpaired: t.unpaired,
            filtered: t.filtered,
        }
    }
}

impl From<v1::Degradation> for Degradation {
    fn from(d: v1::Degradation) -> Self {
        Degradation {
            reason: d.reason,
            message: d.message,
        }
    }
}

impl From<v1::Budget> for Budget {
    fn from(b: v1::Budget) -> Self {
        Budget {
            cpu_ns: b.cpu_ns,
            runs: b.runs,
            cpu_percent: b.cpu_percent,
            events_per_second: b.events_per_second,
            memlock_bytes: b.memlock_bytes,
        }
    }
}

// Counters: one definition of which totals they repeat.

impl v1::Counters {
    /// A node's counters: its result's totals, and the events the runner could not send.
    pub fn from_totals(t: &Totals, transport_dropped: u64) -> v1::Counters {
        v1::Counters {
            hits: t.hits,
            map_full: t.map_full,
            ringbuf_lost: t.events_lost,
            rate_limited: t.rate_limited,
            user_dropped: t.events_dropped,
            transport_dropped,
        }
    }
}

// Assignment state and verdicts.

impl From<AssignmentPhase> for v1::AssignmentPhase {
    fn from(p: AssignmentPhase) -> Self {
        use v1::AssignmentPhase as W;
        match p {
            AssignmentPhase::Pending => W::Pending,
            AssignmentPhase::Attaching => W::Attaching,
            AssignmentPhase::Attached => W::Attached,
            AssignmentPhase::Succeeded => W::Succeeded,
            AssignmentPhase::Stopped => W::Stopped,
            AssignmentPhase::Failed => W::Failed,
            AssignmentPhase::NotFeasible => W::NotFeasible,
        }
    }
}

impl TryFrom<v1::AssignmentPhase> for AssignmentPhase {
    type Error = ConversionError;

    fn try_from(p: v1::AssignmentPhase) -> Result<Self, Self::Error> {
        use v1::AssignmentPhase as W;
        Ok(match p {
            W::Unspecified => return Err(ConversionError::Unspecified { field: "phase" }),
            W::Pending => AssignmentPhase::Pending,
            W::Attaching => AssignmentPhase::Attaching,
            W::Attached => AssignmentPhase::Attached,
            W::Succeeded => AssignmentPhase::Succeeded,
            W::Stopped => AssignmentPhase::Stopped,
            W::Failed => AssignmentPhase::Failed,
            W::NotFeasible => AssignmentPhase::NotFeasible,
        })
    }
}

impl v1::AssignmentState {
    /// The phase, as the results model knows it (the raw field may hold any `i32`).
    pub fn assignment_phase(&self) -> Result<AssignmentPhase, ConversionError> {
        v1::AssignmentPhase::try_from(self.phase)
            .map_err(|_| ConversionError::UnknownEnumValue {
                field: "phase",
                value: self.phase,
            })?
            .try_into()
    }
}

impl From<Reason> for v1::Reason {
    fn from(r: Reason) -> Self {
        use v1::Reason as W;
        match r {
            Reason::BTFUnavailable => W::BtfUnavailable,
            Reason::SymbolNotFound => W::SymbolNotFound,
            Reason::BinaryNotFound => W::BinaryNotFound,
            Reason::AttachKindUnsupported => W::AttachKindUnsupported,
            Reason::KernelLockdown => W::KernelLockdown,
            Reason::PermissionDenied => W::PermissionDenied,
            Reason::FilesystemUnavailable => W::FilesystemUnavailable,
            Reason::VerifierRejected => W::VerifierRejected,
            Reason::InvalidForProbe => W::InvalidForProbe,
            Reason::PolicyDenied => W::PolicyDenied,
            Reason::NodeBudget => W::NodeBudget,
        }
    }
}

/// `None` for `REASON_UNSPECIFIED` (a feasible probe has no reason).
fn reason_from_wire(value: i32) -> Result<Option<Reason>, ConversionError> {
    use v1::Reason as W;
    let w = W::try_from(value).map_err(|_| ConversionError::UnknownEnumValue {
        field: "reason",
        value,
    })?;
    Ok(Some(match w {
        W::Unspecified => return Ok(None),
        W::BtfUnavailable => Reason::BTFUnavailable,
        W::SymbolNotFound => Reason::SymbolNotFound,
        W::BinaryNotFound => Reason::BinaryNotFound,
        W::AttachKindUnsupported => Reason::AttachKindUnsupported,
        W::KernelLockdown => Reason::KernelLockdown,
        W::PermissionDenied => Reason::PermissionDenied,
        W::FilesystemUnavailable => Reason::FilesystemUnavailable,
        W::VerifierRejected => Reason::VerifierRejected,
        W::InvalidForProbe => Reason::InvalidForProbe,
        W::PolicyDenied => Reason::PolicyDenied,
        W::NodeBudget => Reason::NodeBudget,
    }))
}

impl From<ProbeVerdict> for v1::ProbeVerdict {
    fn from(p: ProbeVerdict) -> Self {
        v1::ProbeVerdict {
            probe: p.probe,
            feasible: p.feasible,
            reason: p
                .reason
                .map_or(v1::Reason::Unspecified, v1::Reason::from)
                .into(),
            message: p.message,
        }
    }
}

impl TryFrom<v1::ProbeVerdict> for ProbeVerdict {
    type Error = ConversionError;

    fn try_from(p: v1::ProbeVerdict) -> Result<Self, Self::Error> {
        Ok(ProbeVerdict {
            probe: p.probe,
            feasible: p.feasible,
            reason: reason_from_wire(p.reason)?,
            message: p.message,
        })
    }
}

impl From<Verdict> for v1::Verdict {
    fn from(v: Verdict) -> Self {
        v1::Verdict {
            feasible: v.feasible,
            probes: v.probes.into_iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<v1::Verdict> for Verdict {
    type Error = ConversionError;

    fn try_from(v: v1::Verdict) -> Result<Self, Self::Error> {
        Ok(Verdict {
            feasible: v.feasible,
            probes: v
                .probes
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
        })
    }
}

// Job kinds: the resources' `kind` strings.

impl v1::JobKind {
    /// The Kubernetes kind: `TraceJob` or `ClusterTraceJob`; `None` when unspecified.
    pub fn kube_kind(self) -> Option<&'static str> {
        match self {
            v1::JobKind::Unspecified => None,
            v1::JobKind::TraceJob => Some("TraceJob"),
            v1::JobKind::ClusterTraceJob => Some("ClusterTraceJob"),
        }
    }

    /// The kind of a Kubernetes kind name (as in a `JobRef` of fathom-crds).
    pub fn from_kube_kind(kind: &str) -> Option<v1::JobKind> {
        [v1::JobKind::TraceJob, v1::JobKind::ClusterTraceJob]
            .into_iter()
            .find(|k| k.kube_kind() == Some(kind))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::{collection::vec, option, prelude::*};
    use prost::Message;

    use super::*;

    fn text() -> impl Strategy<Value = String> {
        // Any Unicode, as rendered keys (comm, file names, symbols) can hold.
        ".{0,12}"
    }

    fn keys() -> impl Strategy<Value = BTreeMap<String, String>> {
        proptest::collection::btree_map(text(), text(), 0..4)
    }

    fn float() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(0.0),
            0.0..1e12f64,
            any::<f64>().prop_filter("finite", |f| f.is_finite())
        ]
    }

    fn totals() -> impl Strategy<Value = Totals> {
        (any::<[u64; 11]>()).prop_map(|t| Totals {
            hits: t[0],
            distinct_keys: t[1],
            events_emitted: t[2],
            events_delivered: t[3],
            events_lost: t[4],
            events_dropped: t[5],
            map_full: t[6],
            rate_limited: t[7],
            stack_errors: t[8],
            unpaired: t[9],
            filtered: t[10],
        })
    }

    fn result() -> impl Strategy<Value = ResultData> {
        let row = (keys(), any::<u64>()).prop_map(|(keys, value)| Row { keys, value });
        let bucket = any::<[u64; 3]>().prop_map(|[low, high, count]| Bucket { low, high, count });
        let histogram =
            (keys(), vec(bucket, 0..4), any::<u64>()).prop_map(|(keys, buckets, count)| {
                Histogram {
                    keys,
                    buckets,
                    count,
                }
            });
        let event =
            (any::<u64>(), keys()).prop_map(|(time_ns, fields)| EventRecord { time_ns, fields });
        let budget = (any::<u64>(), any::<u64>(), float(), float(), any::<u64>()).prop_map(
            |(cpu_ns, runs, cpu_percent, events_per_second, memlock_bytes)| Budget {
                cpu_ns,
                runs,
                cpu_percent,
                events_per_second,
                memlock_bytes,
            },
        );
        let degradation =
            (text(), text()).prop_map(|(reason, message)| Degradation { reason, message });
        let other = any::<[u64; 2]>().prop_map(|[rows, value]| OtherRow { rows, value });
        (
            (text(), text(), vec(text(), 0..4), vec(row, 0..4)),
            (option::of(other), vec(histogram, 0..3), vec(event, 0..3)),
            (totals(), option::of(budget), option::of(text())),
            (vec(degradation, 0..3), any::<bool>(), float()),
        )
            .prop_map(
                |(
                    (probe, value, keys, rows),
                    (other, histograms, events),
                    (totals, budget, stopped_reason),
                    (degraded, truncated, elapsed_seconds),
                )| ResultData {
                    probe,
                    value,
                    keys,
                    rows,
                    other,
                    histograms,
                    events,
                    totals,
                    budget,
                    stopped_reason,
                    degraded,
                    truncated,
                    elapsed_seconds,
                },
            )
    }

    const REASONS: [Reason; 11] = [
        Reason::BTFUnavailable,
        Reason::SymbolNotFound,
        Reason::BinaryNotFound,
        Reason::AttachKindUnsupported,
        Reason::KernelLockdown,
        Reason::PermissionDenied,
        Reason::FilesystemUnavailable,
        Reason::VerifierRejected,
        Reason::InvalidForProbe,
        Reason::PolicyDenied,
        Reason::NodeBudget,
    ];

    fn verdict() -> impl Strategy<Value = Verdict> {
        let probe = (text(), any::<bool>(), option::of(0..REASONS.len()), text()).prop_map(
            |(probe, feasible, reason, message)| ProbeVerdict {
                probe,
                feasible,
                reason: reason.map(|i| REASONS[i]),
                message,
            },
        );
        (any::<bool>(), vec(probe, 0..4))
            .prop_map(|(feasible, probes)| Verdict { feasible, probes })
    }

    proptest! {
        #[test]
        fn results_round_trip_through_the_wire(r in result()) {
            let bytes = v1::ResultData::from(r.clone()).encode_to_vec();
            let back = ResultData::from(v1::ResultData::decode(bytes.as_slice()).expect("decodes"));
            prop_assert_eq!(back, r);
        }

        #[test]
        fn verdicts_round_trip_through_the_wire(v in verdict()) {
            let bytes = v1::Verdict::from(v.clone()).encode_to_vec();
            let wire = v1::Verdict::decode(bytes.as_slice()).expect("decodes");
            prop_assert_eq!(Verdict::try_from(wire).expect("converts"), v);
        }

        #[test]
        fn counters_repeat_the_totals_they_name(t in totals(), dropped in any::<u64>()) {
            let c = v1::Counters::from_totals(&t, dropped);
            prop_assert_eq!(
                [c.hits, c.map_full, c.ringbuf_lost, c.rate_limited, c.user_dropped, c.transport_dropped],
                [t.hits, t.map_full, t.events_lost, t.rate_limited, t.events_dropped, dropped]
            );
        }
    }

    #[test]
    fn every_phase_round_trips_and_unspecified_is_an_error() {
        for p in [
            AssignmentPhase::Pending,
            AssignmentPhase::Attaching,
            AssignmentPhase::Attached,
            AssignmentPhase::Succeeded,
            AssignmentPhase::Stopped,
            AssignmentPhase::Failed,
            AssignmentPhase::NotFeasible,
        ] {
            let state = v1::AssignmentState {
                phase: v1::AssignmentPhase::from(p).into(),
                ..Default::default()
            };
            assert_eq!(state.assignment_phase(), Ok(p));
        }
        let unset = v1::AssignmentState::default();
        assert_eq!(
            unset.assignment_phase(),
            Err(ConversionError::Unspecified { field: "phase" })
        );
        let newer = v1::AssignmentState {
            phase: 42,
            ..Default::default()
        };
        assert_eq!(
            newer.assignment_phase(),
            Err(ConversionError::UnknownEnumValue {
                field: "phase",
                value: 42
            })
        );
    }

    #[test]
    fn an_unknown_reason_is_an_error_not_a_guess() {
        let wire = v1::ProbeVerdict {
            probe: "kprobe:x".into(),
            reason: 99,
            ..Default::default()
        };
        let err = ProbeVerdict::try_from(wire).expect_err("unknown reason");
        assert_eq!(
            err,
            ConversionError::UnknownEnumValue {
                field: "reason",
                value: 99
            }
        );
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn an_absent_totals_reads_as_zeros() {
        let r = ResultData::from(v1::ResultData::default());
        assert_eq!(r, ResultData::default());
    }

    #[test]
    fn job_kinds_name_the_resources() {
        for kind in ["TraceJob", "ClusterTraceJob"] {
            let k = v1::JobKind::from_kube_kind(kind).expect("known kind");
            assert_eq!(k.kube_kind(), Some(kind));
        }
        assert_eq!(v1::JobKind::from_kube_kind("Pod"), None);
        assert_eq!(v1::JobKind::Unspecified.kube_kind(), None);
    }
}
