//! Parsing paradata (`scheme:body?key=value&...`) into what a source needs, with errors that
//! carry the protocol code to send: `unknown_source` names the known schemes, `bad_paradata`
//! names the bad part.

use nexus_protocol::ErrorCode;

/// A source's refusal: the code and message of the ERROR frame the client receives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct SourceError {
    /// The code from PROTOCOL.md.
    pub code: ErrorCode,
    /// Detail for the client and the log.
    pub message: String,
}

impl SourceError {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        SourceError {
            code,
            message: message.into(),
        }
    }

    /// A `bad_paradata` error.
    pub fn bad(message: impl Into<String>) -> Self {
        SourceError::new(ErrorCode::BAD_PARADATA, message)
    }
}

/// Paradata split into scheme, body and query parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paradata<'a> {
    /// Before the first `:`.
    pub scheme: &'a str,
    /// Between `:` and `?`.
    pub body: &'a str,
    /// `key=value` pairs after `?`, in order.
    pub params: Vec<(&'a str, &'a str)>,
}

impl<'a> Paradata<'a> {
    /// Splits `text`; `known` lists the registered schemes for the error message.
    pub fn parse(text: &'a str, known: &[&str]) -> Result<Paradata<'a>, SourceError> {
        Paradata::parse_for(text, known, "source")
    }

    /// [`parse`](Self::parse), where the schemes are those of a `kind` ("source", "sink").
    pub fn parse_for(
        text: &'a str,
        known: &[&str],
        kind: &str,
    ) -> Result<Paradata<'a>, SourceError> {
        let Some((scheme, rest)) = text.split_once(':') else {
            return Err(SourceError::new(
                ErrorCode::UNKNOWN_SOURCE,
                format!(
                    "paradata {text:?} has no scheme; known schemes: {}",
                    known.join(", ")
                ),
            ));
        };
        if !known.contains(&scheme) {
            return Err(SourceError::new(
                ErrorCode::UNKNOWN_SOURCE,
                format!(
                    "no {kind} for scheme {scheme:?}; known schemes: {}",
                    known.join(", ")
                ),
            ));
        }
        let (body, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut params = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(SourceError::bad(format!(
                    "parameter {pair:?} is not key=value"
                )));
            };
            params.push((key, value));
        }
        Ok(Paradata {
            scheme,
            body,
            params,
        })
    }

    /// The value of `key` parsed as a byte size, `None` when absent. A key given twice or a
    /// key not in `allowed` is an error, so typos do not pass silently.
    pub fn size_param(&self, key: &str, allowed: &[&str]) -> Result<Option<u64>, SourceError> {
        let mut found = None;
        for (k, v) in &self.params {
            if !allowed.contains(k) {
                return Err(SourceError::bad(format!(
                    "unknown parameter {k:?} for {}:; allowed: {}",
                    self.scheme,
                    allowed.join(", ")
                )));
            }
            if k == &key {
                if found.is_some() {
                    return Err(SourceError::bad(format!("parameter {key:?} given twice")));
                }
                found = Some(parse_size(v)?);
            }
        }
        Ok(found)
    }
}

/// A byte count as [`nexus_protocol::size::parse_size`] reads it, or `bad_paradata`.
pub fn parse_size(text: &str) -> Result<u64, SourceError> {
    nexus_protocol::size::parse_size(text).ok_or_else(|| {
        SourceError::bad(format!(
            "{text:?} is not a size like 1048576, 64KiB or 10GB"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["file", "synthetic"];

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("3MB").unwrap(), 3_000_000);
        assert_eq!(parse_size("16TiB").unwrap(), 16 << 40);
        for bad in [
            "",
            "GiB",
            "-1",
            "1.5GiB",
            "10gib",
            "99999999999999999999",
            "20000000TiB",
        ] {
            let err = parse_size(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::BAD_PARADATA, "{bad}");
        }
    }

    #[test]
    fn unknown_scheme_lists_the_known_ones() {
        let err = Paradata::parse("s3:bucket/key", KNOWN).unwrap_err();
        assert_eq!(err.code, ErrorCode::UNKNOWN_SOURCE);
        assert!(err.message.contains("file, synthetic"), "{err}");
        assert_eq!(
            Paradata::parse("noscheme", KNOWN).unwrap_err().code,
            ErrorCode::UNKNOWN_SOURCE
        );
    }

    #[test]
    fn body_and_params() {
        let p = Paradata::parse("file:a/b.bin?offset=10&length=1KiB", KNOWN).unwrap();
        assert_eq!((p.scheme, p.body), ("file", "a/b.bin"));
        let allowed = &["offset", "length"];
        assert_eq!(p.size_param("offset", allowed).unwrap(), Some(10));
        assert_eq!(p.size_param("length", allowed).unwrap(), Some(1024));
        let typo = Paradata::parse("file:x?ofset=1", KNOWN).unwrap();
        assert!(typo
            .size_param("offset", allowed)
            .unwrap_err()
            .message
            .contains("ofset"));
        let twice = Paradata::parse("file:x?offset=1&offset=2", KNOWN).unwrap();
        assert!(twice.size_param("offset", allowed).is_err());
        assert!(Paradata::parse("file:x?offset", KNOWN).is_err());
    }
}
