//! Nothing here: the suite is `tests/cluster.rs`, run against a real cluster (see README.md).
