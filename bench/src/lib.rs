//! Nexus bench: the side-by-side benchmarks (issue 6).
//!
//! Not built yet: this crate holds the workspace slot so that the layout, lints and CI are
//! in place. It depends on `nexus-protocol`, which implements PROTOCOL.md without IO.
