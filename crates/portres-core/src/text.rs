//! Text that comes from other users (command lines, process names) made safe to print.

use std::borrow::Cow;
use std::fmt::Write;

/// Escapes control characters (C0, DEL, C1, and the Unicode line and paragraph separators and
/// bidirectional overrides) so that text from another user's process cannot move a terminal's
/// cursor, change its colours, reorder what is shown or forge a line of a log: newline becomes
/// `\n`, tab `\t`, the rest `\u{XX}`. Printable text, backslashes included, is kept as it is, so
/// applying it twice changes nothing more.
pub fn printable(text: &str) -> Cow<'_, str> {
    let bad = |c: char| {
        c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}')
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
    };
    if !text.chars().any(bad) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if bad(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_once() {
        let evil = "a\u{1b}[2J\nINFO forged\u{7}\u{9b}b\\x";
        let p = printable(evil);
        assert_eq!(p, "a\\u{1b}[2J\\nINFO forged\\u{7}\\u{9b}b\\x");
        assert_eq!(printable(&p), p);
        assert!(matches!(printable("plain ok"), Cow::Borrowed(_)));
    }
}
