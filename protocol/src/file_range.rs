//! `file:PATH[?offset=N&length=M]` as a value (SOURCES.md, section 2): parsed and built in
//! this one place, by the server's file source, the client's resume and split, and the CLI.

use std::fmt;

use crate::size::parse_size;

/// A byte range of a file under a server's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRange {
    /// The path, relative to the server's root, as written.
    pub path: String,
    /// The first byte.
    pub offset: u64,
    /// How many bytes; `None`: to the end of the file.
    pub length: Option<u64>,
}

/// Why paradata is not a valid `file:` range. The message names the bad part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FileRangeError(pub String);

impl FileRange {
    /// The whole file at `path`.
    pub fn whole(path: impl Into<String>) -> FileRange {
        FileRange {
            path: path.into(),
            offset: 0,
            length: None,
        }
    }

    /// Parses `file:` paradata. Parameters other than `offset` and `length`, one given twice,
    /// one without `=`, and sizes that do not parse are errors naming them.
    pub fn parse(paradata: &str) -> Result<FileRange, FileRangeError> {
        let body = paradata
            .strip_prefix("file:")
            .ok_or_else(|| FileRangeError(format!("{paradata:?} is not file: paradata")))?;
        let (path, query) = body.split_once('?').unwrap_or((body, ""));
        let mut range = FileRange::whole(path);
        let (mut offset, mut length) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(FileRangeError(format!(
                    "parameter {pair:?} is not key=value"
                )));
            };
            let slot = match key {
                "offset" => &mut offset,
                "length" => &mut length,
                other => {
                    return Err(FileRangeError(format!(
                        "unknown parameter {other:?} for file:; allowed: offset, length"
                    )))
                }
            };
            if slot.is_some() {
                return Err(FileRangeError(format!("parameter {key:?} given twice")));
            }
            let size = parse_size(value).ok_or_else(|| {
                FileRangeError(format!(
                    "{value:?} is not a size like 1048576, 64KiB or 10GB"
                ))
            })?;
            *slot = Some(size);
        }
        range.offset = offset.unwrap_or(0);
        range.length = length;
        Ok(range)
    }

    /// The rest of this range once `received` bytes of it arrived; `None` if more arrived
    /// than it holds.
    pub fn after(&self, received: u64) -> Option<FileRange> {
        let offset = self.offset.checked_add(received)?;
        let length = match self.length {
            Some(length) => Some(length.checked_sub(received)?),
            None => None,
        };
        Some(FileRange {
            path: self.path.clone(),
            offset,
            length,
        })
    }

    /// `total` bytes from this range's offset, cut into at most `parts` ranges of about
    /// equal size, in order, none empty (one empty range when `total` is 0).
    pub fn split(&self, total: u64, parts: usize) -> Vec<FileRange> {
        let parts = parts.max(1) as u64;
        let stripe = total.div_ceil(parts).max(1);
        let mut out = Vec::new();
        let mut start = 0;
        while start < total || out.is_empty() {
            let len = stripe.min(total - start);
            out.push(FileRange {
                path: self.path.clone(),
                offset: self.offset + start,
                length: Some(len),
            });
            start += len.max(1);
        }
        out
    }
}

/// The paradata: `file:PATH`, with `offset` when not 0 and `length` when set.
impl fmt::Display for FileRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "file:{}", self.path)?;
        match (self.offset, self.length) {
            (0, None) => Ok(()),
            (offset, None) => write!(f, "?offset={offset}"),
            (0, Some(length)) => write!(f, "?length={length}"),
            (offset, Some(length)) => write!(f, "?offset={offset}&length={length}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_refuses_as_sources_md_says() {
        let r = FileRange::parse("file:a/b.bin?offset=1KiB&length=4096").unwrap();
        assert_eq!(
            (r.path.as_str(), r.offset, r.length),
            ("a/b.bin", 1024, Some(4096))
        );
        assert_eq!(FileRange::parse("file:x").unwrap(), FileRange::whole("x"));
        for bad in [
            "synthetic:1",
            "file:x?ofset=1",
            "file:x?offset=1&offset=2",
            "file:x?offset",
            "file:x?length=1.5KB",
        ] {
            assert!(FileRange::parse(bad).is_err(), "{bad}");
        }
        let err = FileRange::parse("file:x?mode=fast").unwrap_err();
        assert!(
            err.0.contains("mode") && err.0.contains("offset, length"),
            "{err}"
        );
    }

    #[test]
    fn resumes_and_splits() {
        let r = FileRange::parse("file:x?offset=1KiB&length=4096").unwrap();
        assert_eq!(
            r.after(24).unwrap().to_string(),
            "file:x?offset=1048&length=4072"
        );
        assert_eq!(r.after(4097), None);
        assert_eq!(
            FileRange::whole("x").after(100).unwrap().to_string(),
            "file:x?offset=100"
        );
        let parts = FileRange::whole("x").split(10, 3);
        let text: Vec<String> = parts.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            text,
            [
                "file:x?length=4",
                "file:x?offset=4&length=4",
                "file:x?offset=8&length=2"
            ]
        );
        assert_eq!(FileRange::whole("x").split(0, 4).len(), 1);
        assert_eq!(FileRange::whole("x").split(2, 8).len(), 2);
    }

    proptest! {
        /// Display and parse round-trip; split covers the range exactly, in order.
        #[test]
        fn round_trip_and_exact_split(
            path in "[a-z/._-]{1,20}",
            offset in 0u64..1 << 40,
            length in proptest::option::of(0u64..1 << 40),
            parts in 1usize..64,
        ) {
            let range = FileRange { path, offset, length };
            prop_assert_eq!(FileRange::parse(&range.to_string()).unwrap(), range.clone());
            let total = length.unwrap_or(12_345);
            let pieces = range.split(total, parts);
            let mut at = range.offset;
            for piece in &pieces {
                prop_assert_eq!(piece.offset, at);
                at += piece.length.unwrap();
            }
            prop_assert_eq!(at, range.offset + total);
            prop_assert!(pieces.len() <= parts);
        }
    }
}
