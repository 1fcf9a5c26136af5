//! Resuming a `file:` stream after a failure: the same file from the first byte not received.

use nexus_protocol::file_range::FileRange;

/// The paradata that continues `paradata` after `received` bytes arrived, for `file:` streams
/// (`file:PATH`, `file:PATH?offset=N&length=M`); `None` for other schemes or paradata the
/// server would refuse anyway. Pulling the result and appending it to what arrived gives the
/// same bytes as one complete pull.
pub fn resume_paradata(paradata: &str, received: u64) -> Option<String> {
    let range = FileRange::parse(paradata).ok()?;
    Some(range.after(received)?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_paradata_continues_after_the_received_bytes() {
        assert_eq!(
            resume_paradata("file:a/b.bin", 100).as_deref(),
            Some("file:a/b.bin?offset=100")
        );
        assert_eq!(
            resume_paradata("file:x?offset=1KiB&length=4096", 24).as_deref(),
            Some("file:x?offset=1048&length=4072")
        );
        assert_eq!(
            resume_paradata("file:x?length=10", 10).as_deref(),
            Some("file:x?offset=10&length=0")
        );
    }

    #[test]
    fn other_paradata_cannot_resume() {
        assert_eq!(resume_paradata("synthetic:1GiB", 5), None);
        assert_eq!(resume_paradata("file:x?length=10", 11), None);
        assert_eq!(resume_paradata("file:x?offset=abc", 0), None);
        assert_eq!(resume_paradata("file:x?mode=fast", 0), None);
    }
}
