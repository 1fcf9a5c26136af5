//! Showing text that came from a peer. Messages, names, reasons and paradata arrive from the
//! other end; printed raw, an escape sequence in them can retitle or clear a terminal, move
//! its cursor, or forge a log line with a carriage return or newline (PROTOCOL.md, section 3).

use std::fmt;

/// Displays a peer's string with every control character escaped: C0 (`\n`, `\r`, ESC, ...),
/// DEL, C1, and the Unicode controls that reorder text (bidirectional overrides and
/// isolates). Backslashes are doubled, so the escapes cannot be forged. Everything else is
/// shown as it is.
#[derive(Debug, Clone, Copy)]
pub struct Printable<'a>(pub &'a str);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut plain = 0;
        for (at, c) in self.0.char_indices() {
            let escape = match c {
                '\\' => Some("\\\\".to_string()),
                '\n' => Some("\\n".to_string()),
                '\r' => Some("\\r".to_string()),
                '\t' => Some("\\t".to_string()),
                c if c.is_control() => Some(format!("\\x{:02x}", c as u32)),
                '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' => {
                    Some(format!("\\u{{{:04x}}}", c as u32))
                }
                _ => None,
            };
            if let Some(escape) = escape {
                f.write_str(&self.0[plain..at])?;
                f.write_str(&escape)?;
                plain = at + c.len_utf8();
            }
        }
        f.write_str(&self.0[plain..])
    }
}

#[cfg(test)]
mod tests {
    use super::Printable;

    #[test]
    fn terminal_controls_are_escaped_and_text_is_not() {
        let hostile = "no\x1b]0;owned\x07 \x1b[2J\rfake line\nnext \u{9b}31m \u{202e}txt.exe \\x1b";
        let shown = Printable(hostile).to_string();
        assert!(
            !shown.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{shown}"
        );
        assert_eq!(
            shown,
            "no\\x1b]0;owned\\x07 \\x1b[2J\\rfake line\\nnext \\x9b31m \\u{202e}txt.exe \\\\x1b"
        );
        assert_eq!(
            Printable("plain/path.bin é 漢字").to_string(),
            "plain/path.bin é 漢字"
        );
    }
}
