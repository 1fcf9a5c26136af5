//! Nexus client: the pooled multiplexed client (issue 4).
//!
//! Not built yet: this crate holds the workspace slot so that the layout, lints and CI are
//! in place. It depends on `nexus-protocol`, which implements PROTOCOL.md without IO.
