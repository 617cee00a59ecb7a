//! Marker library so that `node-runner` can declare a build-dependency on this crate (which
//! makes cargo rebuild the runner when the kernel programs change); the programs are the
//! `fathom` binary, built for `bpfel-unknown-none` by `node-runner/build.rs`.
#![no_std]
