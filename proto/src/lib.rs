//! Fathom's gRPC contract, package `fathom.v1` (`fathom/v1/fathom.proto`, DESIGN.md §3):
//!
//! - `Collector.Report(stream NodeReport) returns (stream ReportAck)`: node runner → operator,
//!   cumulative reports per assignment, replaced by higher `seq`;
//! - `Results.Watch(JobRef) returns (stream ResultUpdate)`: a job's merged result and live
//!   events, for `kubectl fathom`.
//!
//! [`v1`] is generated at build time (build.rs: protox, then tonic-prost-build) and never
//! edited; the .proto is its documentation. This crate adds the limits both sides apply and
//! the conversions between the wire's results messages and the results model of
//! [`fathom_crds::result`] (`From` one way, `From`/`TryFrom` back: enums from the wire may
//! hold values this build does not know).

mod batch;
mod convert;

pub use batch::BatchError;
pub use convert::ConversionError;

/// The generated messages, enums, clients and servers of package `fathom.v1`.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/fathom.v1.rs"));
}

/// The largest message the operator accepts (and a runner or client should send), encoded:
/// tonic's default decoding limit, stated so both sides configure the same number.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The most events one `NodeReport` carries; more wait for the next report.
pub const MAX_EVENTS_PER_REPORT: usize = 1000;

/// The encoded `FileDescriptorSet` of `fathom/v1/fathom.proto`, with its comments: for gRPC
/// server reflection, and the test that every message and field is documented.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fathom_descriptor.bin"));

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message;
    use prost_types::{DescriptorProto, FileDescriptorSet};

    use super::*;

    const PROTO_TEXT: &str = include_str!("../fathom/v1/fathom.proto");

    /// Source paths (descriptor.proto field numbers) of everything the .proto declares.
    fn declared_paths(set: &FileDescriptorSet) -> Vec<(String, Vec<i32>)> {
        fn message(out: &mut Vec<(String, Vec<i32>)>, m: &DescriptorProto, path: Vec<i32>) {
            let name = m.name().to_string();
            out.push((name.clone(), path.clone()));
            for (i, f) in m.field.iter().enumerate() {
                let mut p = path.clone();
                p.extend([2, i as i32]);
                out.push((format!("{name}.{}", f.name()), p));
            }
            for (i, n) in m.nested_type.iter().enumerate() {
                // Map fields' entry types are synthesized: they have no source of their own.
                if !n.options.as_ref().is_some_and(|o| o.map_entry()) {
                    let mut p = path.clone();
                    p.extend([3, i as i32]);
                    message(out, n, p);
                }
            }
        }
        let file = set
            .file
            .iter()
            .find(|f| f.name() == "fathom/v1/fathom.proto")
            .expect("fathom.proto in the set");
        let mut out = Vec::new();
        for (i, m) in file.message_type.iter().enumerate() {
            message(&mut out, m, vec![4, i as i32]);
        }
        for (i, e) in file.enum_type.iter().enumerate() {
            out.push((e.name().to_string(), vec![5, i as i32]));
            for (j, v) in e.value.iter().enumerate() {
                out.push((v.name().to_string(), vec![5, i as i32, 2, j as i32]));
            }
        }
        for (i, s) in file.service.iter().enumerate() {
            out.push((s.name().to_string(), vec![6, i as i32]));
            for (j, m) in s.method.iter().enumerate() {
                out.push((
                    format!("{}.{}", s.name(), m.name()),
                    vec![6, i as i32, 2, j as i32],
                ));
            }
        }
        out
    }

    #[test]
    fn every_message_field_enum_value_and_rpc_is_documented() {
        let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("descriptor set decodes");
        let file = set
            .file
            .iter()
            .find(|f| f.name() == "fathom/v1/fathom.proto")
            .expect("fathom.proto in the set");
        let documented: BTreeSet<Vec<i32>> = file
            .source_code_info
            .as_ref()
            .expect("source info kept")
            .location
            .iter()
            .filter(|l| l.leading_comments().trim().len() > 3)
            .map(|l| l.path.clone())
            .collect();
        let declared = declared_paths(&set);
        assert!(declared.len() > 100, "walked the file: {}", declared.len());
        let undocumented: Vec<&str> = declared
            .iter()
            .filter(|(_, path)| !documented.contains(path))
            .map(|(name, _)| name.as_str())
            .collect();
        assert!(
            undocumented.is_empty(),
            "without a comment: {undocumented:?}"
        );
    }

    /// The .proto's comments as one line of words.
    fn proto_prose() -> String {
        PROTO_TEXT
            .lines()
            .filter_map(|l| l.trim().strip_prefix("//"))
            .flat_map(str::split_whitespace)
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn the_limits_the_proto_states_are_the_constants() {
        let prose = proto_prose();
        assert_eq!(MAX_MESSAGE_BYTES, 4_194_304);
        assert!(prose.contains("at most 4 MiB (4,194,304 bytes, the constant MAX_MESSAGE_BYTES"));
        assert_eq!(MAX_EVENTS_PER_REPORT, 1000);
        assert!(prose.contains("at most 1,000 (MAX_EVENTS_PER_REPORT)"));
    }

    #[test]
    fn services_live_in_package_fathom_v1() {
        assert_eq!(v1::collector_server::SERVICE_NAME, "fathom.v1.Collector");
        assert_eq!(v1::results_server::SERVICE_NAME, "fathom.v1.Results");
    }
}
