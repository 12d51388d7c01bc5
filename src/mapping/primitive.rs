//! v2 text → FHIR primitive values (`as:` in a rule).
//!
//! Dates and times: a v2 DTM (`YYYY[MM[DD[HH[MM[SS[.S…]]]]]][±ZZZZ]`) keeps its precision.
//! Year, month and day precision stay `YYYY`, `YYYY-MM`, `YYYY-MM-DD`. A time of day needs
//! an offset in FHIR: the value's own offset when it has one, otherwise the sender's IANA
//! zone at that local time (DST-aware) — never the server's zone. FHIR has no hour or
//! minute precision, so those are completed with zeros.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use serde_json::Value;

/// FHIR primitive types a rule can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// string (escapes decoded)
    String,
    /// code (trimmed, inner blanks collapsed)
    Code,
    /// id
    Id,
    /// uri
    Uri,
    /// markdown
    Markdown,
    /// date
    Date,
    /// dateTime
    DateTime,
    /// instant (needs seconds)
    Instant,
    /// time
    Time,
    /// decimal
    Decimal,
    /// integer
    Integer,
    /// positiveInt
    PositiveInt,
    /// unsignedInt
    UnsignedInt,
    /// boolean (Y/N, T/F, true/false, 1/0)
    Boolean,
    /// base64Binary from text that already is base64 (an ED with encoding `Base64`): checked
    Base64Binary,
    /// base64Binary made by encoding the text (its UTF-8 bytes), e.g. a TX/FT document
    Base64Text,
}

impl Kind {
    /// Parses an `as:` value.
    pub fn parse(name: &str) -> Option<Kind> {
        Some(match name {
            "string" => Kind::String,
            "code" => Kind::Code,
            "id" => Kind::Id,
            "uri" | "url" | "canonical" | "oid" => Kind::Uri,
            "markdown" => Kind::Markdown,
            "date" => Kind::Date,
            "dateTime" => Kind::DateTime,
            "instant" => Kind::Instant,
            "time" => Kind::Time,
            "decimal" => Kind::Decimal,
            "integer" => Kind::Integer,
            "positiveInt" => Kind::PositiveInt,
            "unsignedInt" => Kind::UnsignedInt,
            "boolean" => Kind::Boolean,
            "base64Binary" => Kind::Base64Binary,
            "base64Text" => Kind::Base64Text,
            _ => return None,
        })
    }

    /// Converts text. `Err` says why the text is not a valid value of this kind.
    pub fn convert(self, text: &str, zone: &TimeZone) -> Result<Value, String> {
        let trimmed = text.trim();
        match self {
            Kind::String | Kind::Markdown => Ok(Value::String(text.trim_end().to_string())),
            Kind::Code => Ok(Value::String(trimmed.split_whitespace().collect::<Vec<_>>().join(" "))),
            Kind::Id => {
                let valid = (1..=64).contains(&trimmed.len())
                    && trimmed.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
                if valid {
                    Ok(Value::String(trimmed.to_string()))
                } else {
                    Err(format!("`{trimmed}` is not a FHIR id"))
                }
            }
            Kind::Uri => {
                if trimmed.contains(char::is_whitespace) {
                    Err(format!("`{trimmed}` is not a URI (contains blanks)"))
                } else {
                    Ok(Value::String(trimmed.to_string()))
                }
            }
            Kind::Date => Timestamp::parse(trimmed).map(|stamp| Value::String(stamp.date())),
            Kind::DateTime => {
                Timestamp::parse(trimmed).and_then(|stamp| stamp.date_time(zone, false)).map(Value::String)
            }
            Kind::Instant => Timestamp::parse(trimmed).and_then(|stamp| stamp.date_time(zone, true)).map(Value::String),
            Kind::Time => time_of_day(trimmed).map(Value::String),
            Kind::Decimal => decimal(trimmed),
            Kind::Integer | Kind::PositiveInt | Kind::UnsignedInt => {
                let number: i64 = trimmed.parse().map_err(|_| format!("`{trimmed}` is not an integer"))?;
                let minimum = match self {
                    Kind::PositiveInt => 1,
                    Kind::UnsignedInt => 0,
                    _ => i64::from(i32::MIN),
                };
                if number < minimum || number > i64::from(i32::MAX) {
                    return Err(format!("`{trimmed}` is out of range for {self:?}"));
                }
                Ok(Value::from(number))
            }
            Kind::Boolean => match trimmed.to_ascii_uppercase().as_str() {
                "Y" | "YES" | "T" | "TRUE" | "1" => Ok(Value::Bool(true)),
                "N" | "NO" | "F" | "FALSE" | "0" => Ok(Value::Bool(false)),
                _ => Err(format!("`{trimmed}` is not a boolean (Y/N)")),
            },
            Kind::Base64Binary => {
                let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
                match BASE64.decode(&compact) {
                    Ok(bytes) if !bytes.is_empty() => Ok(Value::String(compact)),
                    _ => Err("the value is not base64".to_string()),
                }
            }
            Kind::Base64Text => Ok(Value::String(BASE64.encode(text.trim_end()))),
        }
    }
}

/// A v2 DTM split into its parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timestamp {
    year: i16,
    month: Option<i8>,
    day: Option<i8>,
    hour: Option<i8>,
    minute: Option<i8>,
    second: Option<i8>,
    fraction: Option<String>,
    /// Offset in minutes, when the value carries one.
    offset_minutes: Option<i32>,
}

impl Timestamp {
    /// Parses a v2 DTM/TS value (`TS` components beyond the first are ignored by callers).
    pub fn parse(text: &str) -> Result<Timestamp, String> {
        let invalid = || format!("`{text}` is not a v2 date/time (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])");
        let (body, offset_minutes) = match text.find(['+', '-']) {
            Some(sign_position) => {
                let offset_text = &text[sign_position + 1..];
                if offset_text.len() != 4 || !offset_text.chars().all(|c| c.is_ascii_digit()) {
                    return Err(invalid());
                }
                let hours: i32 = offset_text[..2].parse().map_err(|_| invalid())?;
                let minutes: i32 = offset_text[2..].parse().map_err(|_| invalid())?;
                let sign = if text[sign_position..].starts_with('-') { -1 } else { 1 };
                (&text[..sign_position], Some(sign * (hours * 60 + minutes)))
            }
            None => (text, None),
        };
        let (digits, fraction) = match body.split_once('.') {
            Some((digits, fraction)) if !fraction.is_empty() && fraction.chars().all(|c| c.is_ascii_digit()) => {
                (digits, Some(fraction.to_string()))
            }
            Some(_) => return Err(invalid()),
            None => (body, None),
        };
        if !digits.chars().all(|c| c.is_ascii_digit()) || ![4, 6, 8, 10, 12, 14].contains(&digits.len()) {
            return Err(invalid());
        }
        if fraction.is_some() && digits.len() != 14 {
            return Err(invalid());
        }
        let part = |start: usize| -> Option<i8> { digits.get(start..start + 2).and_then(|two| two.parse().ok()) };
        let year: i16 = digits[..4].parse().map_err(|_| invalid())?;
        let stamp = Timestamp {
            year,
            month: part(4),
            day: part(6),
            hour: part(8),
            minute: part(10),
            second: part(12),
            fraction,
            offset_minutes,
        };
        stamp.check().map_err(|reason| format!("`{text}`: {reason}"))?;
        Ok(stamp)
    }

    fn check(&self) -> Result<(), String> {
        if self.year == 0 {
            return Err("year 0000 does not exist".to_string());
        }
        let date = jiff::civil::Date::new(self.year, self.month.unwrap_or(1), self.day.unwrap_or(1))
            .map_err(|_| "no such date".to_string())?;
        let _ = date;
        if self.hour.is_some_and(|hour| hour > 23)
            || self.minute.is_some_and(|minute| minute > 59)
            || self.second.is_some_and(|second| second > 59)
        {
            return Err("no such time of day".to_string());
        }
        Ok(())
    }

    /// FHIR `date`: precision kept (`1970`, `1970-01`, `1970-01-02`).
    pub fn date(&self) -> String {
        match (self.month, self.day) {
            (None, _) => format!("{:04}", self.year),
            (Some(month), None) => format!("{:04}-{month:02}", self.year),
            (Some(month), Some(day)) => format!("{:04}-{month:02}-{day:02}", self.year),
        }
    }

    /// FHIR `dateTime` (or `instant` when `instant` is set, which needs a time of day).
    pub fn date_time(&self, zone: &TimeZone, instant: bool) -> Result<String, String> {
        let Some(hour) = self.hour else {
            if instant {
                return Err(format!("{} has no time of day; an instant needs one", self.date()));
            }
            return Ok(self.date());
        };
        let (mut year, mut month, mut day) = (self.year, self.month.unwrap_or(1), self.day.unwrap_or(1));
        let (mut hour, mut minute) = (hour, self.minute.unwrap_or(0));
        let second = self.second.unwrap_or(0);
        let fraction = self.fraction.as_ref().map(|digits| format!(".{digits}")).unwrap_or_default();
        let offset_minutes = match self.offset_minutes {
            Some(offset) => offset,
            None => {
                let local = DateTime::new(year, month, day, hour, minute, second, 0)
                    .map_err(|error| format!("invalid date/time: {error}"))?;
                // Ambiguous local times (the hour repeated when DST ends) take the first
                // occurrence; times in the gap when DST starts move forward past it.
                let zoned =
                    local.to_zoned(zone.clone()).map_err(|error| format!("cannot place in time zone: {error}"))?;
                (year, month, day) = (zoned.year(), zoned.month(), zoned.day());
                (hour, minute) = (zoned.hour(), zoned.minute());
                zoned.offset().seconds() / 60
            }
        };
        let sign = if offset_minutes < 0 { '-' } else { '+' };
        let absolute = offset_minutes.abs();
        Ok(format!(
            "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{fraction}{sign}{:02}:{:02}",
            absolute / 60,
            absolute % 60
        ))
    }
}

/// A v2 NM: optional sign, digits, optional fraction; no exponent, no thousands separator.
/// Whole numbers stay whole (`180`, not `180.0`). Known limit: trailing zeros of a fraction
/// (`82.50`) are not kept, as JSON numbers here are binary floating point.
fn decimal(text: &str) -> Result<Value, String> {
    let invalid = || format!("`{text}` is not a decimal");
    let unsigned = text.strip_prefix(['+', '-']).unwrap_or(text);
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let digits_only = |part: &str| part.chars().all(|c| c.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits_only(whole) || !digits_only(fraction) {
        return Err(invalid());
    }
    if !unsigned.contains('.') {
        if let Ok(number) = text.trim_start_matches('+').parse::<i64>() {
            return Ok(Value::from(number));
        }
    }
    let number: f64 = text.parse().map_err(|_| invalid())?;
    serde_json::Number::from_f64(number).map(Value::Number).ok_or_else(invalid)
}

fn time_of_day(text: &str) -> Result<String, String> {
    let digits: String = text.chars().take_while(|c| c.is_ascii_digit()).collect();
    let parts = |start: usize| digits.get(start..start + 2).and_then(|two| two.parse::<u8>().ok());
    match (digits.len(), parts(0), parts(2), parts(4)) {
        (2, Some(hour), _, _) if hour < 24 => Ok(format!("{hour:02}:00:00")),
        (4, Some(hour), Some(minute), _) if hour < 24 && minute < 60 => Ok(format!("{hour:02}:{minute:02}:00")),
        (6, Some(hour), Some(minute), Some(second)) if hour < 24 && minute < 60 && second < 60 => {
            Ok(format!("{hour:02}:{minute:02}:{second:02}"))
        }
        _ => Err(format!("`{text}` is not a v2 time (HH[MM[SS]])")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chicago() -> TimeZone {
        TimeZone::get("America/Chicago").unwrap()
    }

    #[test]
    fn base64_encodes_text_and_checks_encoded_values() {
        let zone = chicago();
        assert_eq!(Kind::Base64Text.convert("", &zone).unwrap(), "");
        assert_eq!(Kind::Base64Text.convert("f", &zone).unwrap(), "Zg==");
        assert_eq!(Kind::Base64Text.convert("fo", &zone).unwrap(), "Zm8=");
        assert_eq!(Kind::Base64Text.convert("foobar", &zone).unwrap(), "Zm9vYmFy");
        assert_eq!(Kind::Base64Text.convert("Zoë\n", &zone).unwrap(), "Wm/Dqw==");
        assert_eq!(Kind::Base64Binary.convert(" Zm9v\nYmFy ", &zone).unwrap(), "Zm9vYmFy");
        assert!(Kind::Base64Binary.convert("<Base64 encoded>", &zone).is_err());
        assert!(Kind::Base64Binary.convert("Zm9", &zone).is_err());
    }

    #[test]
    fn dates_keep_their_precision() {
        let zone = chicago();
        assert_eq!(Kind::Date.convert("1970", &zone).unwrap(), "1970");
        assert_eq!(Kind::Date.convert("197001", &zone).unwrap(), "1970-01");
        assert_eq!(Kind::Date.convert("19700102", &zone).unwrap(), "1970-01-02");
        assert_eq!(Kind::Date.convert("197001021530", &zone).unwrap(), "1970-01-02");
        assert_eq!(Kind::DateTime.convert("19700102", &zone).unwrap(), "1970-01-02");
    }

    #[test]
    fn times_without_offset_use_the_sender_zone_with_dst() {
        let zone = chicago();
        assert_eq!(Kind::DateTime.convert("20240115083000", &zone).unwrap(), "2024-01-15T08:30:00-06:00");
        assert_eq!(Kind::DateTime.convert("20240715083000", &zone).unwrap(), "2024-07-15T08:30:00-05:00");
        assert_eq!(Kind::DateTime.convert("202407150830", &zone).unwrap(), "2024-07-15T08:30:00-05:00");
        assert_eq!(Kind::DateTime.convert("2024071508", &zone).unwrap(), "2024-07-15T08:00:00-05:00");
    }

    #[test]
    fn dst_gap_moves_forward_and_overlap_takes_the_first() {
        let zone = chicago();
        assert_eq!(Kind::DateTime.convert("20240310023000", &zone).unwrap(), "2024-03-10T03:30:00-05:00");
        assert_eq!(Kind::DateTime.convert("20241103013000", &zone).unwrap(), "2024-11-03T01:30:00-05:00");
    }

    #[test]
    fn explicit_offsets_and_fractions_are_kept() {
        let zone = chicago();
        assert_eq!(Kind::DateTime.convert("20240715083000.123+0200", &zone).unwrap(), "2024-07-15T08:30:00.123+02:00");
        assert_eq!(Kind::Instant.convert("20240715083000-0330", &zone).unwrap(), "2024-07-15T08:30:00-03:30");
        assert!(Kind::Instant.convert("20240715", &zone).is_err());
    }

    #[test]
    fn bad_dates_are_errors() {
        let zone = chicago();
        for text in ["0000", "20240230", "2024011", "20240101250000", "abc", "20240101+05"] {
            assert!(Kind::DateTime.convert(text, &zone).is_err(), "{text}");
        }
    }

    #[test]
    fn numbers_booleans_codes() {
        let zone = TimeZone::UTC;
        assert_eq!(Kind::Decimal.convert(" 12.5 ", &zone).unwrap(), serde_json::json!(12.5));
        assert_eq!(Kind::Decimal.convert("180", &zone).unwrap().to_string(), "180");
        assert_eq!(Kind::Decimal.convert("-0.25", &zone).unwrap(), serde_json::json!(-0.25));
        for bad in ["12,5", "1e3", ".", "", "+-1", "1.2.3"] {
            assert!(Kind::Decimal.convert(bad, &zone).is_err(), "{bad}");
        }
        assert_eq!(Kind::PositiveInt.convert("3", &zone).unwrap(), serde_json::json!(3));
        assert!(Kind::PositiveInt.convert("0", &zone).is_err());
        assert_eq!(Kind::Boolean.convert("y", &zone).unwrap(), serde_json::json!(true));
        assert_eq!(Kind::Code.convert("  in  progress ", &zone).unwrap(), "in progress");
        assert_eq!(Kind::Time.convert("0830", &zone).unwrap(), "08:30:00");
        assert!(Kind::Id.convert("a b", &zone).is_err());
    }
}
