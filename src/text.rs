//! Text that comes from outside (an exchange's error strings, its messages) made safe to keep and pass on: bounded
//! in bytes, cut on a character boundary and marked where it was cut, and free of NUL and other control characters
//! (Postgres `text` cannot hold NUL; terminals and log readers should not meet escape sequences).
//!
//! A leaf: it knows nothing of where the text goes. `exchange` bounds error text where it is made, `store` cleans
//! every text it binds, `alert` bounds annotations.

use std::borrow::Cow;

/// The replacement for a character that may not be kept.
const REPLACEMENT: char = '\u{FFFD}';

/// `text` as it is if it fits in `max_bytes`, otherwise its longest prefix (on a character boundary) that fits
/// together with the marker `… [truncated, N bytes]`, N being the length of the whole text. The result never
/// exceeds `max_bytes`, except when `max_bytes` is smaller than the marker itself.
pub fn bounded(text: &str, max_bytes: usize) -> Cow<'_, str> {
    if text.len() <= max_bytes {
        return Cow::Borrowed(text);
    }
    let marker = format!("… [truncated, {} bytes]", text.len());
    let mut keep = max_bytes.saturating_sub(marker.len());
    while !text.is_char_boundary(keep) {
        keep -= 1;
    }
    Cow::Owned(format!("{}{marker}", &text[..keep]))
}

/// `text` with NUL and the other control characters replaced by U+FFFD, except tab, line feed and carriage return.
pub fn printable(text: &str) -> Cow<'_, str> {
    let kept = |character: char| !character.is_control() || matches!(character, '\t' | '\n' | '\r');
    if text.chars().all(kept) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(text.chars().map(|character| if kept(character) { character } else { REPLACEMENT }).collect())
}

/// Outside text made printable and bounded to `max_bytes`, owned. Only what is kept is cleaned, so a huge text
/// costs a cut, not a pass over all of it.
pub fn external(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        // Cleaning may lengthen it (a control byte becomes three), so it is bounded again.
        return bounded(&printable(text), max_bytes).into_owned();
    }
    let mut keep = max_bytes;
    while !text.is_char_boundary(keep) {
        keep -= 1;
    }
    let kept = printable(&text[..keep]);
    let marker = format!("… [truncated, {} bytes]", text.len());
    let mut keep = max_bytes.saturating_sub(marker.len()).min(kept.len());
    while !kept.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{marker}", &kept[..keep])
}

/// Declares a fieldless enum whose variants have fixed names, with `ALL` (declaration order), `as_str`, `parse`
/// and `Display` written once: `named_enum! { pub enum Color { Red => "red", Light => "light_blue" } }`. Variant
/// attributes and doc comments are kept; the enum's own attributes too.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$variant_meta:meta])* $variant:ident => $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl $name {
            pub const ALL: [$name; [$($text),+].len()] = [$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            pub fn parse(text: &str) -> Option<$name> {
                $name::ALL.into_iter().find(|value| value.as_str() == text)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use named_enum;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_as_it_is() {
        assert!(matches!(bounded("EService:Busy", 1024), Cow::Borrowed("EService:Busy")));
        assert!(matches!(printable("line\none\ttab\r"), Cow::Borrowed(_)));
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary_and_marked_with_its_length() {
        let text = format!("E{}", "é".repeat(450_000));
        let cut = bounded(&text, 1024);
        assert!(cut.len() <= 1024, "{}", cut.len());
        assert!(cut.starts_with("Eé"), "{cut}");
        assert!(cut.ends_with("… [truncated, 900001 bytes]"), "{cut}");
        // Every byte budget, including ones that fall inside a two-byte character.
        for max in 30..80 {
            let cut = bounded(&text, max);
            assert!(cut.len() <= max, "{max}: {}", cut.len());
        }
    }

    #[test]
    fn external_text_is_cleaned_and_cut_whatever_its_length() {
        let text = format!("E\0{}", "é".repeat(450_000));
        let kept = external(&text, 1024);
        assert!(kept.len() <= 1024, "{}", kept.len());
        assert!(kept.starts_with("E\u{FFFD}é") && kept.ends_with("… [truncated, 900002 bytes]"), "{kept}");
        // Short text that grows when cleaned stays within the bound.
        let controls = "\0".repeat(1000);
        let kept = external(&controls, 1024);
        assert!(kept.len() <= 1024 && kept.ends_with("… [truncated, 3000 bytes]"), "{kept}");
    }

    #[test]
    fn nul_and_escape_characters_are_replaced_but_line_breaks_stay() {
        assert_eq!(
            printable("EGeneral:Internal error:\0\u{1b}[31mred\n"),
            "EGeneral:Internal error:\u{FFFD}\u{FFFD}[31mred\n"
        );
        assert_eq!(external("a\0b", 1024), "a\u{FFFD}b");
    }
}
