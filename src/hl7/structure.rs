//! The structure check of the acknowledgment path, without building a message tree.
//!
//! `mllp::ingest` has always judged a message's structure by whether
//! `hl7_parser::Message::parse_with_lenient_newlines(text, true)` (hl7-parser 0.3.0) succeeds.
//! That call builds a `Vec` per segment, field, repetition, component and subcomponent, and
//! profiles of the listener showed the parse plus its malloc/free at 25–40% of its CPU, for an
//! answer that is only yes or no. [`check`] gives the same answer from the bytes alone.
//!
//! # What hl7-parser 0.3.0 accepts
//!
//! Read from its `src/parser/*.rs` and the nom 7.1.3 combinators they use:
//!
//! 1. `tag("MSH")`, a byte comparison. Anything else at offset 0 (including `msh`, a leading
//!    blank or a byte order mark, or an input shorter than 3 bytes) fails at position 0.
//! 2. `take_while_m_n(5, 5, is_ascii)`: the next five characters are taken as the field,
//!    component, repetition, escape and subcomponent separators. Any ASCII character
//!    qualifies: letters, digits, `\r`, `\n`, NUL, the same character twice. Fewer than five
//!    bytes left, or a non-ASCII character among them, fails at position 3 (where the
//!    separators start).
//! 3. Everything after that is parsed by nested nom `separated_list0`s (segments → fields →
//!    repetitions → components → subcomponents) around a `take_till` that never fails. A
//!    `separated_list0` treats an element that fails as the end of its list, and
//!    `parse_with_lenient_newlines` never asks for the input to be consumed to its end. So a
//!    segment with a bad name (`PI|`, `PIDX|`, `|x`), a segment name without a field separator
//!    (`EVN`), a blank line or any other damage after MSH only ends the parsed message early:
//!    the call still returns `Ok`. Escape sequences are not interpreted while parsing; they are
//!    ordinary subcomponent text. Lenient newlines change where segments split, never whether
//!    the parse succeeds.
//! 4. `ParseError::IncompleteInput` is never returned for a `&str`: the only `Incomplete` its
//!    `Span` produces comes from `split_at_position`, which the complete `take_till` it is
//!    called through turns into "take the rest".
//!
//! Points 1 and 2 are therefore the whole grammar that can fail, and [`check`] is just that,
//! returning the byte position hl7-parser reports. This is weaker than the name "structure
//! check" suggests; it is kept equal on purpose, so that switching to [`check`] changes no ACK.
//!
//! The tests below compare [`check`] with hl7-parser itself (built-in messages, an exhaustive
//! sweep over short headers, and the shared corpus with truncated and mutated variants). If
//! hl7-parser is upgraded and its grammar changes, those tests fail and this module must be
//! brought back in line before the upgrade ships.

/// The part of a received message whose structure is checked: blanks and byte order marks
/// before the MSH (which senders and MLLP framing leave behind) and line ends after the last
/// segment are not part of it. Both [`check`] and the hl7-parser fallback in
/// `mllp::ingest` see exactly this text, so their positions agree.
pub fn trim(text: &str) -> &str {
    let trimmed = text.trim_start_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    trimmed.trim_end_matches(['\r', '\n'])
}

/// Tells whether `hl7_parser::Message::parse_with_lenient_newlines(text, true)` succeeds,
/// without parsing: `Err` carries the byte position its `ParseError::FailedToParse` would
/// report (0 when the text does not start with `MSH`, 3 when the five separator characters
/// after it are missing or not all ASCII). See the module documentation for why that is all
/// it can fail on. Pass text that went through [`trim`], as the acknowledgment path does.
pub fn check(text: &str) -> Result<(), usize> {
    let bytes = text.as_bytes();
    if !bytes.starts_with(b"MSH") {
        return Err(0);
    }
    // Five bytes that are all ASCII are five ASCII characters, which is what hl7-parser's
    // `take_while_m_n(5, 5, |c| c.is_ascii())` asks for.
    match bytes.get(3..8) {
        Some(separators) if separators.is_ascii() => Ok(()),
        _ => Err(3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hl7_parser::parser::ParseError;
    use std::path::{Path, PathBuf};

    /// What hl7-parser says about `text`: the failure position, or `None` for
    /// `IncompleteInput` (which [`check`] assumes never happens, so it shows up as a mismatch).
    fn reference(text: &str) -> Result<(), Option<usize>> {
        match hl7_parser::Message::parse_with_lenient_newlines(text, true) {
            Ok(_) => Ok(()),
            Err(ParseError::FailedToParse { position, .. }) => Err(Some(position)),
            Err(ParseError::IncompleteInput(_)) => Err(None),
        }
    }

    fn agrees(text: &str) -> bool {
        check(text).map_err(Some) == reference(text)
    }

    /// Asserts that [`check`] gives `expected` and that hl7-parser gives the same.
    fn assert_check(text: &str, expected: Result<(), usize>) {
        assert_eq!(check(text), expected, "check({text:?})");
        assert_eq!(reference(text), expected.map_err(Some), "hl7-parser on {text:?}");
    }

    const ADT: &str = "MSH|^~\\&|EPIC|HOSP|GW|C|20240102||ADT^A01|1|P|2.5.1\rEVN|A01|20240102\r\
                       PID|1||123^^^H^MR~456^^^H^PI||Doe^John^^^^||19700101|M\rPV1|1|I|W^1^A";

    #[test]
    fn sound_messages_pass() {
        assert_check(ADT, Ok(()));
        assert_check("MSH|^~\\&", Ok(()));
        assert_check("MSH|^~\\&|", Ok(()));
        assert_check("MSH|^~\\&|A|B|C|D|2024||ORU^R01|9|P|2.3||||||8859/1\rOBX|1|TX|||a&b~c^d|", Ok(()));
    }

    #[test]
    fn lenient_newlines_cr_lf_and_crlf_all_pass() {
        for newline in ["\r", "\n", "\r\n", "\n\r"] {
            let text = ADT.replace('\r', newline);
            assert_check(&text, Ok(()));
        }
        assert_check("MSH|^~\\&|A\rEVN|x\nPID|1\r\nPV1|1", Ok(()));
    }

    #[test]
    fn empty_and_short_inputs_fail_where_hl7_parser_does() {
        assert_check("", Err(0));
        assert_check("M", Err(0));
        assert_check("MS", Err(0));
        assert_check("MSH", Err(3));
        assert_check("MSH|", Err(3));
        assert_check("MSH|^~\\", Err(3));
        assert_check("MSH|^~\\&", Ok(()));
    }

    #[test]
    fn text_not_starting_with_msh_fails_at_zero() {
        for text in ["PID|1||123", "msh|^~\\&|A", "MSX|^~\\&|A", " MSH|^~\\&|A", "\u{feff}MSH|^~\\&|A", "\rMSH|^~\\&"] {
            assert_check(text, Err(0));
        }
        assert_check("ÄSH|^~\\&|A", Err(0));
    }

    #[test]
    fn non_ascii_separators_fail_at_three() {
        for text in ["MSH¦^~\\&¦A", "MSH|^~\\§|A", "MSH|^~é|A", "MSH|\u{fffd}~\\&|A", "MSHé", "MSH|^~\\\u{10348}"]
        {
            assert_check(text, Err(3));
        }
        // The separators are the five characters right after MSH; non-ASCII text later is fine.
        assert_check("MSH|^~\\&é", Ok(()));
        assert_check("MSH|^~\\&|Müller", Ok(()));
    }

    #[test]
    fn unusual_separators_pass_when_ascii() {
        let texts = [
            "MSH#$%@!#A#B",         // another separator set, used consistently
            "MSH|^~\\&#|A",         // a fifth encoding character (truncation character, v2.7)
            "MSH|^~|A|B|ADT^A01|1", // only two encoding characters: the field separator is taken too
            "MSH|||||||",           // every separator the same
            "MSHabcde|x",           // letters
            "MSH\r\n\r\n\r",        // line ends
            "MSH\0\0\0\0\0",        // NUL bytes
            "MSH^~\\&|",            // field separator missing: `^` is taken for it
        ];
        for text in texts {
            assert_check(text, Ok(()));
        }
    }

    #[test]
    fn damage_after_the_separators_passes_as_in_hl7_parser() {
        // hl7-parser stops at the first segment it cannot read and still succeeds.
        let texts = [
            "MSH|^~\\&|A\rPI|1",               // short segment name
            "MSH|^~\\&|A\rPIDX|1",             // long segment name
            "MSH|^~\\&|A\r|1|2",               // no segment name
            "MSH|^~\\&|A\rEVN",                // name without a field separator
            "MSH|^~\\&|A\rEVN\rPID|1",         // ... followed by a sound segment
            "MSH|^~\\&|A\r\rPID|1",            // blank line
            "MSH|^~\\&|A\n\n\nPID|1",          // blank lines, LF
            "MSH|^~\\&|A\rÄBC|1",              // non-ASCII alphanumeric name
            "MSH|^~\\&|A\r123|1",              // digits
            "MSH|^~\\&|A\rPID^1",              // wrong separator after the name
            "MSH|^~\\&|A\r{\"resourceType\"}", // not HL7 at all
            "MSH|^~\\&|A\0\u{7}\u{fffd}",      // control characters and a replacement character
        ];
        for text in texts {
            assert_check(text, Ok(()));
        }
    }

    #[test]
    fn escape_sequences_are_plain_text() {
        let texts = [
            "MSH|^~\\&|A\rOBX|1|FT|||a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\.br\\g",
            "MSH|^~\\&|A\rOBX|1|FT|||\\X0D0A\\\\H\\bold\\N\\",
            "MSH|^~\\&|A\rOBX|1|FT|||unterminated \\F",
            "MSH|^~\\&|A\rOBX|1|FT|||\\",
            "MSH|^~!&|A\rNTE|1||x!F!y!S!z", // another escape character
            "MSH|^~\\&|A\\F\\B|C",          // an escape inside MSH
        ];
        for text in texts {
            assert_check(text, Ok(()));
        }
    }

    #[test]
    fn trim_removes_leading_blanks_and_trailing_line_ends_only() {
        assert_eq!(trim(" \t\r\n\u{feff}MSH|^~\\&|A\r\n\r"), "MSH|^~\\&|A");
        assert_eq!(trim("MSH|^~\\&|A| \r"), "MSH|^~\\&|A| ");
        assert_eq!(trim("\r\n"), "");
        assert_eq!(check(trim("\u{feff}  MSH|^~\\&\r")), Ok(()));
    }

    /// Every header of up to 9 characters over an alphabet chosen around the grammar's edges:
    /// the `MSH` tag (and near misses), ASCII separators, line ends and a two-byte character.
    #[test]
    fn matches_hl7_parser_on_every_short_header() {
        let alphabet = ['|', 'a', '\r', '\n', 'é'];
        let mut tails = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..6 {
            last = last.iter().flat_map(|tail| alphabet.iter().map(move |c| format!("{tail}{c}"))).collect();
            tails.extend(last.iter().cloned());
        }
        let mut mismatches = Vec::new();
        for head in ["MSH", "MS", "MSX", "msh", "", "é"] {
            for tail in &tails {
                let text = format!("{head}{tail}");
                if !agrees(&text) {
                    mismatches.push(text);
                }
            }
        }
        assert!(mismatches.is_empty(), "check differs from hl7-parser on {mismatches:?}");
    }

    #[test]
    fn matches_hl7_parser_on_mutated_built_in_messages() {
        let messages = [ADT, "MSH|^~\\&|A|B|C|D|2024||ORU^R01|9|P|2.3\nOBX|1|TX|||a&b~c^d\\T\\|\r\n"];
        let mut mismatches = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            for variant in variants(message.as_bytes(), index as u64) {
                let text = String::from_utf8_lossy(&variant);
                let trimmed = trim(&text);
                if !agrees(trimmed) {
                    mismatches.push(trimmed.to_string());
                }
            }
        }
        assert!(mismatches.is_empty(), "check differs from hl7-parser on {mismatches:?}");
    }

    /// Every file of the shared corpus (`../shared/corpus`), each message in it, and truncated
    /// and mutated variants of both, prepared the way `mllp::ingest` prepares a frame: bytes
    /// decoded lossily to UTF-8, then [`trim`]. [`check`] must agree with hl7-parser on each.
    #[test]
    fn matches_hl7_parser_on_the_shared_corpus_and_its_mutations() {
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/corpus"));
        if !root.is_dir() {
            if std::env::var("REQUIRE_SHARED_CORPUS").is_ok_and(|value| value == "1") {
                panic!("REQUIRE_SHARED_CORPUS=1 but the shared corpus is missing at {}", root.display());
            }
            eprintln!("SKIPPED: ../shared/corpus not found");
            return;
        }
        let files = files_under(root);
        assert!(!files.is_empty(), "no file under {}", root.display());
        let (mut compared, mut refused) = (0usize, 0usize);
        let mut mismatches = Vec::new();
        for (index, file) in files.iter().enumerate() {
            let bytes = std::fs::read(file).unwrap_or_else(|error| panic!("{}: {error}", file.display()));
            let mut inputs = vec![bytes.clone()];
            inputs.extend(crate::hl7::split::split_messages(&bytes).into_iter().map(|message| message.bytes));
            for (number, input) in inputs.iter().enumerate() {
                for variant in variants(input, ((index as u64) << 16) | number as u64) {
                    let text = String::from_utf8_lossy(&variant);
                    let trimmed = trim(&text);
                    compared += 1;
                    if check(trimmed).is_err() {
                        refused += 1;
                    }
                    if !agrees(trimmed) {
                        let start: String = trimmed.chars().take(80).collect();
                        mismatches.push(format!("{} (variant of input {number}): {start:?}", file.display()));
                    }
                }
            }
        }
        eprintln!("{compared} inputs from {} corpus files compared, {refused} refused", files.len());
        assert!(mismatches.is_empty(), "check differs from hl7-parser on:\n{}", mismatches.join("\n"));
        assert!(refused > 0 && refused < compared, "the variants must include sound and refused inputs");
    }

    /// Every file under `root`, sorted (all of them: a JSON or Markdown file is simply one
    /// more input hl7-parser refuses).
    fn files_under(root: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let mut directories = vec![root.to_path_buf()];
        while let Some(directory) = directories.pop() {
            let entries =
                std::fs::read_dir(&directory).unwrap_or_else(|error| panic!("{}: {error}", directory.display()));
            for entry in entries {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    directories.push(path);
                } else {
                    files.push(path);
                }
            }
        }
        files.sort();
        files
    }

    /// `input` itself, truncated at several offsets, and with bytes replaced by separators,
    /// line ends and bytes that decode to non-ASCII characters. Deterministic for a `seed`.
    /// Half of the replacements land in the first 12 bytes from `MSH` (the only bytes
    /// hl7-parser can fail on), the others anywhere.
    fn variants(input: &[u8], seed: u64) -> Vec<Vec<u8>> {
        // Single bytes (`\xc3` and `\xff` decode to U+FFFD), then longer replacements.
        const BYTES: &[u8] = b"|^~\\&#\r\n \0Ma\xc3\xff";
        const LONGER: [&str; 3] = ["\r\n", "é", "\u{feff}"];
        let mut variants = vec![input.to_vec()];
        let length = input.len();
        let mut cuts: Vec<usize> = (0..=12).collect();
        cuts.extend([length / 4, length / 2, length * 3 / 4, length.saturating_sub(1)]);
        for cut in cuts {
            if let Some(prefix) = input.get(..cut) {
                variants.push(prefix.to_vec());
            }
        }
        if length == 0 {
            return variants;
        }
        let header = input.windows(3).position(|window| window == b"MSH").unwrap_or(0);
        let mut random = Xorshift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        for round in 0..24 {
            let mut variant = input.to_vec();
            for _ in 0..1 + random.below(3) {
                let position = if round % 2 == 0 { header + random.below(12) } else { random.below(length) };
                let choice = random.below(BYTES.len() + LONGER.len());
                let replacement = match BYTES.get(choice..choice + 1) {
                    Some(byte) => byte,
                    None => LONGER.get(choice - BYTES.len()).map_or(&b"|"[..], |text| text.as_bytes()),
                };
                let end = (position + 1).min(variant.len());
                if position < end {
                    variant.splice(position..end, replacement.iter().copied());
                }
            }
            variants.push(variant);
        }
        variants
    }

    /// A xorshift64 generator: enough to spread mutations, with no dependency.
    struct Xorshift(u64);

    impl Xorshift {
        /// A number in `0..bound` (`bound` > 0).
        fn below(&mut self, bound: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % bound as u64) as usize
        }
    }
}
