//! Nexus server: the thread-per-core io_uring server (issue 3).
//!
//! What is here so far are the pieces of the sources that need no IO runtime: paradata parsing
//! with the protocol's error codes, the deterministic `synthetic:` generator, and the
//! confinement of `file:` paths to the server root. The runtime, the stream engine and
//! `nexus serve` come with the rest of issue 3, on top of `nexus-protocol`.

pub mod paradata;
pub mod root;
pub mod synthetic;
