//! v2 field paths, as analysts write them in mapping files.
//!
//! Absolute: `PID-5`, `PID-5.1`, `PID-3[*]`, `PID-3[2].4.1`, `OBX[*]-5`, `NTE[*]-3`.
//! Relative (inside a datatype map, to the value the map was applied to): `1`, `4.2`.
//!
//! - A segment occurrence `[*]` iterates every occurrence in scope; `[n]` picks one;
//!   without it, the first occurrence in scope.
//! - A field repetition `[*]` iterates every repetition; `[n]` picks one; without it, the
//!   first repetition.

use std::fmt;

/// Which occurrences or repetitions a path selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selector {
    /// The n-th (1-based).
    Index(usize),
    /// Every one.
    All,
}

/// A parsed path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Path {
    /// Starts at a segment.
    Absolute {
        /// Segment id.
        segment: String,
        /// Occurrence of the segment.
        occurrence: Selector,
        /// Field number (1-based).
        field: usize,
        /// Repetition of the field.
        repetition: Selector,
        /// Component, when given.
        component: Option<usize>,
        /// Subcomponent, when given.
        subcomponent: Option<usize>,
    },
    /// Relative to the value a datatype map works on: up to two levels below it.
    Relative {
        /// First level (component of a field value, or subcomponent of a component value).
        first: usize,
        /// Second level (subcomponent), when given.
        second: Option<usize>,
    },
}

impl Path {
    /// True when the path may yield several values.
    pub fn iterates(&self) -> bool {
        matches!(
            self,
            Path::Absolute { occurrence: Selector::All, .. } | Path::Absolute { repetition: Selector::All, .. }
        )
    }

    /// Parses a path; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Path, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty path".to_string());
        }
        if text.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            let mut parts = text.split('.');
            let first = number(parts.next().unwrap_or(""), text)?;
            let second = parts.next().map(|part| number(part, text)).transpose()?;
            if parts.next().is_some() {
                return Err(format!("`{text}`: a relative path has at most two levels (component.subcomponent)"));
            }
            return Ok(Path::Relative { first, second });
        }
        let (segment_part, rest) =
            text.split_once('-').ok_or_else(|| format!("`{text}`: expected SEG-FIELD, e.g. PID-5.1"))?;
        let (segment, occurrence) = selector_suffix(segment_part, text)?;
        if segment.len() != 3 || !segment.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()) {
            return Err(format!("`{text}`: `{segment}` is not a segment id (three capitals or digits)"));
        }
        let mut levels = rest.split('.');
        let (field_text, repetition) = selector_suffix(levels.next().unwrap_or(""), text)?;
        let field = number(field_text, text)?;
        let component = levels.next().map(|part| number(part, text)).transpose()?;
        let subcomponent = levels.next().map(|part| number(part, text)).transpose()?;
        if levels.next().is_some() {
            return Err(format!("`{text}`: too many levels; the deepest is SEG-FIELD.COMPONENT.SUBCOMPONENT"));
        }
        Ok(Path::Absolute { segment: segment.to_string(), occurrence, field, repetition, component, subcomponent })
    }
}

fn number(text: &str, whole: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(value) if value >= 1 => Ok(value),
        _ => Err(format!("`{whole}`: `{text}` is not a position (1, 2, ...)")),
    }
}

/// Splits `NAME[sel]` into the name and its selector (first occurrence when absent).
fn selector_suffix<'a>(part: &'a str, whole: &str) -> Result<(&'a str, Selector), String> {
    let Some(open) = part.find('[') else {
        return Ok((part, Selector::Index(1)));
    };
    let inner = part[open + 1..].strip_suffix(']').ok_or_else(|| format!("`{whole}`: `[` without a closing `]`"))?;
    let selector = if inner == "*" { Selector::All } else { Selector::Index(number(inner, whole)?) };
    Ok((&part[..open], selector))
}

impl fmt::Display for Path {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Relative { first, second: None } => write!(formatter, "{first}"),
            Path::Relative { first, second: Some(second) } => write!(formatter, "{first}.{second}"),
            Path::Absolute { segment, occurrence, field, repetition, component, subcomponent } => {
                write!(formatter, "{segment}")?;
                if let Selector::All = occurrence {
                    write!(formatter, "[*]")?;
                } else if let Selector::Index(index @ 2..) = occurrence {
                    write!(formatter, "[{index}]")?;
                }
                write!(formatter, "-{field}")?;
                match repetition {
                    Selector::All => write!(formatter, "[*]")?,
                    Selector::Index(index @ 2..) => write!(formatter, "[{index}]")?,
                    Selector::Index(_) => {}
                }
                if let Some(component) = component {
                    write!(formatter, ".{component}")?;
                }
                if let Some(subcomponent) = subcomponent {
                    write!(formatter, ".{subcomponent}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_absolute_paths() {
        let path = Path::parse("PID-3[*].4.1").unwrap();
        assert_eq!(
            path,
            Path::Absolute {
                segment: "PID".into(),
                occurrence: Selector::Index(1),
                field: 3,
                repetition: Selector::All,
                component: Some(4),
                subcomponent: Some(1)
            }
        );
        assert!(path.iterates());
        assert_eq!(path.to_string(), "PID-3[*].4.1");
        assert_eq!(Path::parse("OBX[*]-5").unwrap().to_string(), "OBX[*]-5");
        assert_eq!(Path::parse("ZP1-2[2]").unwrap().to_string(), "ZP1-2[2]");
        assert!(!Path::parse("PID-5.1").unwrap().iterates());
    }

    #[test]
    fn parses_relative_paths() {
        assert_eq!(Path::parse("4.2").unwrap(), Path::Relative { first: 4, second: Some(2) });
        assert_eq!(Path::parse("1").unwrap(), Path::Relative { first: 1, second: None });
    }

    #[test]
    fn explains_bad_paths() {
        assert!(Path::parse("PID5").unwrap_err().contains("SEG-FIELD"));
        assert!(Path::parse("pid-5").unwrap_err().contains("segment id"));
        assert!(Path::parse("PID-0").unwrap_err().contains("position"));
        assert!(Path::parse("PID-3[x]").unwrap_err().contains("position"));
        assert!(Path::parse("PID-3[1").unwrap_err().contains("closing"));
        assert!(Path::parse("PID-1.2.3.4").unwrap_err().contains("too many"));
        assert!(Path::parse("1.2.3").unwrap_err().contains("two levels"));
    }
}
