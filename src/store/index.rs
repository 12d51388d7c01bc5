//! Index extraction: turning a resource into search index rows by its search parameter
//! definitions, and the value conversions shared with search (string normalization, FHIR
//! date ranges, reference parsing).

use serde_json::Value;

use super::params::{self, ParamType};

/// Smallest and largest instants, for open period ends.
pub const MIN_US: i64 = i64::MIN;
/// See [`MIN_US`].
pub const MAX_US: i64 = i64::MAX;

/// One index row, before it is written.
#[derive(Clone, Debug, PartialEq)]
pub enum Row {
    /// `idx_string`: normalized and exact text.
    String {
        /// Qualified parameter key (`Patient.family`).
        key: String,
        /// Lowercased, accents removed.
        norm: String,
        /// As written.
        exact: String,
    },
    /// `idx_token`: system, code and display text (normalized).
    Token {
        /// Qualified parameter key.
        key: String,
        /// Code system (or ContactPoint system), if any.
        system: Option<String>,
        /// Code, identifier value, boolean, ...
        code: Option<String>,
        /// Display / text, normalized, for `:text`.
        text: Option<String>,
    },
    /// `idx_date`: inclusive range in µs.
    Date {
        /// Qualified parameter key.
        key: String,
        /// First µs covered.
        low: i64,
        /// Last µs covered.
        high: i64,
    },
    /// `idx_reference`: target type and id.
    Reference {
        /// Qualified parameter key.
        key: String,
        /// Target resource type.
        target_type: String,
        /// Target id.
        target_id: String,
    },
    /// `idx_number`: numbers and quantities.
    Number {
        /// Qualified parameter key.
        key: String,
        /// The value.
        value: f64,
        /// Quantity system.
        system: Option<String>,
        /// Quantity code, or unit when no code.
        code: Option<String>,
    },
}

/// The key under which index rows of `name` on `resource_type` are stored.
pub fn key(resource_type: &str, name: &str) -> String {
    format!("{resource_type}.{name}")
}

/// The key of a reference parameter's `identifier` tokens (for `:identifier`).
pub fn identifier_key(resource_type: &str, name: &str) -> String {
    format!("{resource_type}.{name}:identifier")
}

/// Every index row of `resource` by the definitions of its type.
pub fn extract(resource: &Value) -> Vec<Row> {
    let resource_type = resource.get("resourceType").and_then(Value::as_str).unwrap_or("");
    let mut rows = Vec::new();
    for (param, expression) in params::compiled_for(resource_type) {
        let key = key(resource_type, &param.name);
        for value in expression.evaluate(resource) {
            match param.kind {
                ParamType::String => strings(&key, value, &mut rows),
                ParamType::Token | ParamType::Uri => tokens(&key, value, &mut rows),
                ParamType::Date => {
                    if let Some((low, high)) = date_value(value) {
                        rows.push(Row::Date { key: key.clone(), low, high });
                    }
                }
                ParamType::Reference => {
                    let reference = value.get("reference").and_then(Value::as_str).unwrap_or("");
                    if let Some((target_type, target_id)) = parse_reference(reference) {
                        rows.push(Row::Reference {
                            key: key.clone(),
                            target_type: target_type.to_string(),
                            target_id: target_id.to_string(),
                        });
                    }
                    if let Some(identifier) = value.get("identifier") {
                        tokens(&identifier_key(resource_type, &param.name), identifier, &mut rows);
                    }
                }
                ParamType::Quantity | ParamType::Number => numbers(&key, value, &mut rows),
            }
        }
    }
    rows.dedup();
    rows
}

fn push_string(key: &str, text: &str, rows: &mut Vec<Row>) {
    if !text.trim().is_empty() {
        rows.push(Row::String { key: key.to_string(), norm: normalize(text), exact: text.to_string() });
    }
}

fn strings(key: &str, value: &Value, rows: &mut Vec<Row>) {
    match value {
        Value::String(text) => push_string(key, text, rows),
        Value::Object(object) => {
            // HumanName, Address and anything else with text parts: index each part.
            for field in [
                "family",
                "given",
                "prefix",
                "suffix",
                "text",
                "line",
                "city",
                "district",
                "state",
                "postalCode",
                "country",
            ] {
                match object.get(field) {
                    Some(Value::String(text)) => push_string(key, text, rows),
                    Some(Value::Array(items)) => {
                        for item in items.iter().filter_map(Value::as_str) {
                            push_string(key, item, rows);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn text_of(value: Option<&Value>) -> Option<String> {
    value.and_then(Value::as_str).filter(|text| !text.is_empty()).map(normalize)
}

fn string_of(value: Option<&Value>) -> Option<String> {
    value.and_then(Value::as_str).filter(|text| !text.is_empty()).map(str::to_string)
}

fn tokens(key: &str, value: &Value, rows: &mut Vec<Row>) {
    let mut push = |system: Option<String>, code: Option<String>, text: Option<String>| {
        if system.is_some() || code.is_some() || text.is_some() {
            rows.push(Row::Token { key: key.to_string(), system, code, text });
        }
    };
    match value {
        Value::String(text) => push(None, Some(text.clone()), None),
        Value::Bool(flag) => push(None, Some(flag.to_string()), None),
        Value::Number(number) => push(None, Some(number.to_string()), None),
        Value::Object(object) => {
            if let Some(codings) = object.get("coding").and_then(Value::as_array) {
                // CodeableConcept: each coding, and its text.
                for coding in codings {
                    push(
                        string_of(coding.get("system")),
                        string_of(coding.get("code")),
                        text_of(coding.get("display")),
                    );
                }
                if let Some(text) = text_of(object.get("text")) {
                    push(None, None, Some(text));
                }
            } else if object.contains_key("value") {
                // Identifier or ContactPoint.
                let text = object.get("type").and_then(|kind| text_of(kind.get("text")));
                push(string_of(object.get("system")), string_of(object.get("value")), text);
            } else if object.contains_key("code") || object.contains_key("system") {
                // Coding.
                push(string_of(object.get("system")), string_of(object.get("code")), text_of(object.get("display")));
            } else if let Some(text) = text_of(object.get("text")) {
                push(None, None, Some(text));
            }
        }
        _ => {}
    }
}

fn numbers(key: &str, value: &Value, rows: &mut Vec<Row>) {
    match value {
        Value::Number(number) => {
            if let Some(value) = number.as_f64() {
                rows.push(Row::Number { key: key.to_string(), value, system: None, code: None });
            }
        }
        Value::Object(object) => {
            if let Some(number) = object.get("value").and_then(Value::as_f64) {
                let code = string_of(object.get("code")).or_else(|| string_of(object.get("unit")));
                rows.push(Row::Number {
                    key: key.to_string(),
                    value: number,
                    system: string_of(object.get("system")),
                    code,
                });
            }
        }
        _ => {}
    }
}

/// The µs range of a date, dateTime, instant, Period or Timing value.
fn date_value(value: &Value) -> Option<(i64, i64)> {
    match value {
        Value::String(text) => parse_date_range(text),
        Value::Object(object) => {
            if object.contains_key("start") || object.contains_key("end") {
                let low = match object.get("start").and_then(Value::as_str) {
                    Some(start) => parse_date_range(start)?.0,
                    None => MIN_US,
                };
                let high = match object.get("end").and_then(Value::as_str) {
                    Some(end) => parse_date_range(end)?.1,
                    None => MAX_US,
                };
                Some((low, high))
            } else if let Some(events) = object.get("event").and_then(Value::as_array) {
                // Timing: the span of its events.
                let ranges: Vec<(i64, i64)> =
                    events.iter().filter_map(Value::as_str).filter_map(parse_date_range).collect();
                let low = ranges.iter().map(|range| range.0).min()?;
                let high = ranges.iter().map(|range| range.1).max()?;
                Some((low, high))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// `Type/id` from a literal reference: relative (`Patient/1`), absolute URL ending in
/// `Type/id` (with or without `/_history/n`). `urn:uuid:`, `#contained` and anything else
/// give `None`.
pub fn parse_reference(reference: &str) -> Option<(&str, &str)> {
    if reference.starts_with("urn:") || reference.starts_with('#') {
        return None;
    }
    let mut reference = reference.trim_end_matches('/');
    if let Some(index) = reference.find("/_history/") {
        reference = &reference[..index];
    }
    let mut parts = reference.rsplit('/');
    let id = parts.next()?;
    let kind = parts.next()?;
    let valid_type =
        kind.starts_with(|c: char| c.is_ascii_uppercase()) && kind.chars().all(|c| c.is_ascii_alphanumeric());
    let valid_id =
        !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    (valid_type && valid_id).then_some((kind, id))
}

/// Lowercases and removes the accents of Latin letters, for accent- and
/// case-insensitive string search.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        for lower in c.to_lowercase() {
            match strip_accent(lower) {
                Some(plain) => out.push_str(plain),
                None if is_combining_mark(lower) => {}
                None => out.push(lower),
            }
        }
    }
    out
}

fn is_combining_mark(c: char) -> bool {
    ('\u{300}'..='\u{36f}').contains(&c)
}

/// The unaccented form of a lowercase Latin letter (Latin-1 and Latin Extended-A).
fn strip_accent(c: char) -> Option<&'static str> {
    Some(match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' | 'ą' => "a",
        'æ' => "ae",
        'ç' | 'ć' | 'ĉ' | 'ċ' | 'č' => "c",
        'ď' | 'đ' => "d",
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ĕ' | 'ė' | 'ę' | 'ě' => "e",
        'ĝ' | 'ğ' | 'ġ' | 'ģ' => "g",
        'ĥ' | 'ħ' => "h",
        'ì' | 'í' | 'î' | 'ï' | 'ĩ' | 'ī' | 'ĭ' | 'į' | 'ı' => "i",
        'ĵ' => "j",
        'ķ' => "k",
        'ĺ' | 'ļ' | 'ľ' | 'ŀ' | 'ł' => "l",
        'ñ' | 'ń' | 'ņ' | 'ň' => "n",
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ŏ' | 'ő' => "o",
        'œ' => "oe",
        'ŕ' | 'ŗ' | 'ř' => "r",
        'ś' | 'ŝ' | 'ş' | 'š' => "s",
        'ß' => "ss",
        'ţ' | 'ť' | 'ŧ' => "t",
        'ù' | 'ú' | 'û' | 'ü' | 'ũ' | 'ū' | 'ŭ' | 'ů' | 'ű' | 'ų' => "u",
        'ŵ' => "w",
        'ý' | 'ÿ' | 'ŷ' => "y",
        'ź' | 'ż' | 'ž' => "z",
        'þ' => "th",
        'ð' => "d",
        _ => return None,
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

const DAY_US: i64 = 86_400_000_000;

fn digits(text: &str, count: usize) -> Option<i64> {
    if text.len() == count && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse().ok()
    } else {
        None
    }
}

/// The inclusive µs range a FHIR date, dateTime or instant covers at its precision:
/// `2020` the whole year, `2020-03` the month, `2020-03-04` the day, `2020-03-04T10:00`
/// the minute, with seconds the second (or the fraction given). Without a time zone the
/// value is taken as UTC. `None` when malformed.
pub fn parse_date_range(text: &str) -> Option<(i64, i64)> {
    let text = text.trim();
    let (date, time) = match text.split_once('T') {
        Some((date, time)) => (date, Some(time)),
        None => (text, None),
    };
    let mut parts = date.split('-');
    let year = digits(parts.next()?, 4)?;
    let month = parts.next().map(|month| digits(month, 2)).unwrap_or(Some(0))?;
    let day = parts.next().map(|day| digits(day, 2)).unwrap_or(Some(0))?;
    if parts.next().is_some() || month > 12 || (month == 0 && day != 0) {
        return None;
    }
    if month == 0 {
        let low = days_from_civil(year, 1, 1) * DAY_US;
        return Some((low, days_from_civil(year + 1, 1, 1) * DAY_US - 1));
    }
    if day == 0 {
        let low = days_from_civil(year, month, 1) * DAY_US;
        return Some((low, low + days_in_month(year, month) * DAY_US - 1));
    }
    if day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let day_start = days_from_civil(year, month, day) * DAY_US;
    let Some(time) = time else {
        return Some((day_start, day_start + DAY_US - 1));
    };
    // Split off the zone.
    let (clock, offset_us) = if let Some(clock) = time.strip_suffix('Z') {
        (clock, 0)
    } else if let Some(index) = time.rfind(['+', '-']) {
        let (clock, zone) = time.split_at(index);
        let sign = if zone.starts_with('-') { -1 } else { 1 };
        let (hours, minutes) = zone[1..].split_once(':')?;
        let hours = digits(hours, 2)?;
        let minutes = digits(minutes, 2)?;
        if hours > 14 || minutes > 59 {
            return None;
        }
        (clock, sign * (hours * 3600 + minutes * 60) * 1_000_000)
    } else {
        (time, 0)
    };
    let mut fields = clock.split(':');
    let hour = digits(fields.next()?, 2)?;
    let minute = digits(fields.next()?, 2)?;
    let second_text = fields.next();
    if fields.next().is_some() || hour > 23 || minute > 59 {
        return None;
    }
    let base = day_start + (hour * 3600 + minute * 60) * 1_000_000 - offset_us;
    let Some(second_text) = second_text else {
        return Some((base, base + 60_000_000 - 1));
    };
    let (whole, fraction) = match second_text.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (second_text, None),
    };
    let second = digits(whole, 2)?;
    if second > 60 {
        return None;
    }
    let low = base + second * 1_000_000;
    let Some(fraction) = fraction else {
        return Some((low, low + 999_999));
    };
    if fraction.is_empty() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let used = &fraction[..fraction.len().min(6)];
    let scale = 10i64.pow(6 - used.len() as u32);
    let micros: i64 = used.parse().ok()?;
    let low = low + micros * scale;
    Some((low, low + scale - 1))
}

/// A FHIR instant with microseconds, in UTC: `2026-11-29T20:00:00.123456Z`.
pub fn format_instant(us: i64) -> String {
    let days = us.div_euclid(DAY_US);
    let in_day = us.rem_euclid(DAY_US);
    // civil_from_days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let seconds = in_day / 1_000_000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60,
        in_day % 1_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn date_ranges_follow_precision() {
        let day = parse_date_range("2020-03-04").unwrap();
        assert_eq!(format_instant(day.0), "2020-03-04T00:00:00.000000Z");
        assert_eq!(format_instant(day.1), "2020-03-04T23:59:59.999999Z");
        let month = parse_date_range("2020-02").unwrap();
        assert_eq!(format_instant(month.1), "2020-02-29T23:59:59.999999Z");
        let year = parse_date_range("2021").unwrap();
        assert_eq!(format_instant(year.0), "2021-01-01T00:00:00.000000Z");
        assert_eq!(format_instant(year.1), "2021-12-31T23:59:59.999999Z");
        let minute = parse_date_range("2020-03-04T10:30+02:00").unwrap();
        assert_eq!(format_instant(minute.0), "2020-03-04T08:30:00.000000Z");
        assert_eq!(format_instant(minute.1), "2020-03-04T08:30:59.999999Z");
        let milli = parse_date_range("2020-03-04T10:30:05.123Z").unwrap();
        assert_eq!(format_instant(milli.0), "2020-03-04T10:30:05.123000Z");
        assert_eq!(format_instant(milli.1), "2020-03-04T10:30:05.123999Z");
        assert_eq!(
            parse_date_range("2020-03-04T10:30:05").unwrap().0,
            parse_date_range("2020-03-04T10:30:05Z").unwrap().0
        );
        for bad in ["", "20", "2020-13", "2020-02-30", "2020-1-01", "2020-01-01T25:00", "2020-01-01T10:00+2", "abc"] {
            assert_eq!(parse_date_range(bad), None, "{bad}");
        }
        assert_eq!(format_instant(0), "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn references_and_normalization() {
        assert_eq!(parse_reference("Patient/123"), Some(("Patient", "123")));
        assert_eq!(parse_reference("http://x/fhir/Patient/1/_history/2"), Some(("Patient", "1")));
        assert_eq!(parse_reference("urn:uuid:abc"), None);
        assert_eq!(parse_reference("123"), None);
        assert_eq!(normalize("Müller-ÉÇØ Straße"), "muller-eco strasse");
        assert_eq!(normalize("Jose\u{301}"), "jose");
    }

    fn rows_of(resource: Value) -> Vec<Row> {
        extract(&resource)
    }

    #[test]
    fn extracts_every_index_type() {
        let rows = rows_of(json!({"resourceType": "Patient", "id": "p",
            "identifier": [{"system": "urn:mrn", "value": "42"}],
            "name": [{"family": "Ölsen", "given": ["Anna"], "prefix": ["Dr"]}],
            "address": [{"line": ["1 Main"], "city": "Köln", "postalCode": "5000"}],
            "birthDate": "1980-05", "active": true, "gender": "female",
            "telecom": [{"system": "phone", "value": "555"}]}));
        let has = |row: Row| assert!(rows.contains(&row), "missing {row:?} in {rows:?}");
        has(Row::Token {
            key: "Patient.identifier".into(),
            system: Some("urn:mrn".into()),
            code: Some("42".into()),
            text: None,
        });
        has(Row::String { key: "Patient.family".into(), norm: "olsen".into(), exact: "Ölsen".into() });
        has(Row::String { key: "Patient.name".into(), norm: "dr".into(), exact: "Dr".into() });
        has(Row::String { key: "Patient.address".into(), norm: "1 main".into(), exact: "1 Main".into() });
        has(Row::String { key: "Patient.address-city".into(), norm: "koln".into(), exact: "Köln".into() });
        has(Row::Token { key: "Patient.active".into(), system: None, code: Some("true".into()), text: None });
        has(Row::Token {
            key: "Patient.phone".into(),
            system: Some("phone".into()),
            code: Some("555".into()),
            text: None,
        });
        let (low, high) = parse_date_range("1980-05").unwrap();
        has(Row::Date { key: "Patient.birthdate".into(), low, high });

        let rows = rows_of(json!({"resourceType": "Observation", "id": "o",
            "code": {"coding": [{"system": "http://loinc.org", "code": "1-8", "display": "Glucose"}], "text": "Blood sugar"},
            "subject": {"reference": "Patient/p", "identifier": {"system": "urn:mrn", "value": "42"}},
            "effectivePeriod": {"start": "2020-01-01"},
            "valueQuantity": {"value": 5.5, "system": "http://unitsofmeasure.org", "code": "mmol/L"}}));
        let has = |row: Row| assert!(rows.contains(&row), "missing {row:?} in {rows:?}");
        has(Row::Token {
            key: "Observation.code".into(),
            system: Some("http://loinc.org".into()),
            code: Some("1-8".into()),
            text: Some("glucose".into()),
        });
        has(Row::Token { key: "Observation.code".into(), system: None, code: None, text: Some("blood sugar".into()) });
        has(Row::Reference { key: "Observation.subject".into(), target_type: "Patient".into(), target_id: "p".into() });
        has(Row::Reference { key: "Observation.patient".into(), target_type: "Patient".into(), target_id: "p".into() });
        has(Row::Token {
            key: "Observation.patient:identifier".into(),
            system: Some("urn:mrn".into()),
            code: Some("42".into()),
            text: None,
        });
        has(Row::Date { key: "Observation.date".into(), low: parse_date_range("2020-01-01").unwrap().0, high: MAX_US });
        has(Row::Number {
            key: "Observation.value-quantity".into(),
            value: 5.5,
            system: Some("http://unitsofmeasure.org".into()),
            code: Some("mmol/L".into()),
        });
    }
}
