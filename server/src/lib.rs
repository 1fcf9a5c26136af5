//! Nexus server: the thread-per-core io_uring server (issue 3).
//!
//! Not built yet: this crate holds the workspace slot so that the layout, lints and CI are
//! in place. It depends on `nexus-protocol`, which implements PROTOCOL.md without IO.
