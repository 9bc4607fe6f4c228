//! Which characters a text field may hold: the one rule for control
//! characters in names, comments and key text.
//!
//! A control character in a name or a comment is never intended: it hides text
//! in a terminal (`\x1b[…`), truncates at the first NUL in every C consumer
//! (sshd, useradd, syslog), or breaks a line where a reader expects one line.
//! keyhaven refuses such input with a field error instead of cleaning it
//! silently, so what is stored is exactly what the caller sent.
//!
//! * [`check_single_line`] — names, comments, account fields: no control
//!   character at all (C0 `U+0000`–`U+001F` including tab, CR and LF, DEL
//!   `U+007F`, C1 `U+0080`–`U+009F`), and neither Unicode line separator
//!   (`U+2028`, `U+2029`), which some readers treat as a line break.
//! * [`check_multi_line`] — key text and other line-oriented text: the same,
//!   except that LF and tab are allowed, and CR only as part of a CRLF line
//!   ending (a lone CR moves the cursor back and lets one line overwrite
//!   another on a terminal).
//!
//! Callers turn a [`ControlCharError`] into a field error on their own
//! attribute; its `Display` text is the message.

use std::fmt;

/// The first forbidden character found in a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlCharError {
    /// 1-based line it is on, for multi-line text; `None` for a single-line field.
    pub line: Option<usize>,
    /// The character.
    pub ch: char,
}

impl ControlCharError {
    fn what(&self) -> &'static str {
        match self.ch {
            '\u{2028}' => "a Unicode line separator",
            '\u{2029}' => "a Unicode paragraph separator",
            _ => "a control character",
        }
    }

    /// The problem without the line prefix, for callers that add their own
    /// (`contains a control character (U+0000); remove it`).
    pub fn reason(&self) -> String {
        format!("contains {} (U+{:04X}); remove it", self.what(), self.ch as u32)
    }
}

impl fmt::Display for ControlCharError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(n) => write!(f, "Line {n}: {}", self.reason()),
            None => write!(f, "C{}", &self.reason()[1..]),
        }
    }
}

impl std::error::Error for ControlCharError {}

/// Whether `c` is never allowed in text: Unicode category Cc (C0, DEL, C1)
/// or a Unicode line/paragraph separator.
fn forbidden(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// Check a single-line field (a name, a comment): see the module docs.
pub fn check_single_line(text: &str) -> Result<(), ControlCharError> {
    match text.chars().find(|c| forbidden(*c)) {
        Some(ch) => Err(ControlCharError { line: None, ch }),
        None => Ok(()),
    }
}

/// Check line-oriented text (key text, `authorized_keys`, sshd options): LF
/// and tab are allowed, CR only directly before LF or at the very end.
pub fn check_multi_line(text: &str) -> Result<(), ControlCharError> {
    let mut line = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let allowed = match c {
            '\n' => {
                line += 1;
                true
            }
            '\t' => true,
            '\r' => matches!(chars.peek(), Some('\n') | None),
            other => !forbidden(other),
        };
        if !allowed {
            return Err(ControlCharError { line: Some(line), ch: c });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_refuses_every_control_and_separator() {
        for c in (0u32..0x20).chain([0x7f, 0x80, 0x85, 0x9f, 0x2028, 0x2029]) {
            let ch = char::from_u32(c).unwrap();
            let e = check_single_line(&format!("ab{ch}cd")).expect_err(&format!("U+{c:04X}"));
            assert_eq!(e, ControlCharError { line: None, ch });
        }
        assert_eq!(
            check_single_line("a\0b").unwrap_err().to_string(),
            "Contains a control character (U+0000); remove it"
        );
        assert_eq!(
            check_single_line("a\u{2028}b").unwrap_err().to_string(),
            "Contains a Unicode line separator (U+2028); remove it"
        );
    }

    #[test]
    fn single_line_accepts_printable_unicode() {
        for ok in ["", "backup key", "Zoë's key (prod) — 2024", "δ/日本語/🔑", "a\u{a0}b", "x\u{200b}y"] {
            assert_eq!(check_single_line(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn multi_line_allows_lf_tab_and_crlf_only() {
        for ok in ["a\nb\n", "a\r\nb\r\n", "a\tb", "trailing\r", "", "\n\n\n"] {
            assert_eq!(check_multi_line(ok), Ok(()), "{ok:?}");
        }
        let e = check_multi_line("line one\nline\0two\n").unwrap_err();
        assert_eq!(e, ControlCharError { line: Some(2), ch: '\0' });
        assert_eq!(e.to_string(), "Line 2: contains a control character (U+0000); remove it");
        // A lone CR (not part of CRLF) is refused, on the line it is on.
        assert_eq!(check_multi_line("a\r\nb\rc").unwrap_err(), ControlCharError { line: Some(2), ch: '\r' });
        for (text, ch) in
            [("x\x1b[2Jy", '\x1b'), ("x\x7fy", '\x7f'), ("x\u{85}y", '\u{85}'), ("x\u{2029}y", '\u{2029}')]
        {
            assert_eq!(check_multi_line(text).unwrap_err(), ControlCharError { line: Some(1), ch }, "{text:?}");
        }
    }
}
