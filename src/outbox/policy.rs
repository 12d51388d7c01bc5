//! Pure delivery rules: classification of answers, backoff with jitter, `Retry-After`,
//! and merging of several messages' Bundles into one transaction.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

/// Longest `Retry-After` honoured; a longer one is cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What to do after one delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx with every entry 2xx.
    Delivered,
    /// Timeout, connection error, 5xx, 429, 408 or 401 (after a token renewal): try again.
    Retry,
    /// Any other 4xx, or a 2xx whose transaction-response has a failed entry: dead letter.
    Reject,
}

/// Classifies an HTTP status. 401 is retried: a credential problem is the gateway's to
/// fix, not the Bundle's (the SMART client renews its token on the first 401).
pub fn classify(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        401 | 408 | 429 => Verdict::Retry,
        400..=499 => Verdict::Reject,
        _ => Verdict::Retry,
    }
}

/// For a 2xx answer: the first entry of a transaction-response whose status is not 2xx.
pub fn failed_entry(body: &Value) -> Option<String> {
    let entries = body.get("entry").and_then(Value::as_array)?;
    for entry in entries {
        let status = entry.pointer("/response/status").and_then(Value::as_str).unwrap_or("");
        let code = status.split_whitespace().next().unwrap_or("");
        if !code.starts_with('2') || code.len() != 3 {
            return Some(if status.is_empty() {
                "(entry without response.status)".to_string()
            } else {
                status.to_string()
            });
        }
    }
    None
}

/// Random bits without an extra crate: std's randomly keyed SipHash of a counter.
fn random_u64() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    hasher.finish()
}

/// Delay before attempt `attempts + 1` (after `attempts` failures, at least 1):
/// `initial × 2^(attempts−1)` capped at `max`, with "equal jitter" (between half and all of it).
pub fn backoff(attempts: u32, initial: Duration, max: Duration) -> Duration {
    let exponent = attempts.saturating_sub(1).min(30);
    let full = initial.saturating_mul(1u32 << exponent).min(max);
    let half = full / 2;
    let spread = (full - half).as_millis() as u64;
    let jitter = if spread == 0 { 0 } else { random_u64() % (spread + 1) };
    half + Duration::from_millis(jitter)
}

/// Parses `Retry-After`: delay-seconds or an HTTP-date (in the past = zero). Cut to
/// [`MAX_RETRY_AFTER`].
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
    }
    let date = jiff::fmt::rfc2822::parse(value).ok()?;
    let now = jiff::Timestamp::try_from(now).ok()?;
    let seconds = date.timestamp().as_second() - now.as_second();
    Some(Duration::from_secs(seconds.max(0) as u64).min(MAX_RETRY_AFTER))
}

/// Merges Bundles (queue order) into one transaction. A resource PUT by several keeps
/// only its last entry (a transaction may not touch one resource twice), at the position
/// of that last entry.
pub fn merge(bundles: &[Value], id: &str) -> Value {
    let mut entries: Vec<Option<Value>> = Vec::new();
    let mut position_of: HashMap<String, usize> = HashMap::new();
    let mut timestamp = None;
    for bundle in bundles {
        if let Some(stamp) = bundle.get("timestamp") {
            timestamp = Some(stamp.clone());
        }
        for entry in bundle.get("entry").and_then(Value::as_array).into_iter().flatten() {
            let key = entry
                .pointer("/request/url")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| entry.get("fullUrl").and_then(Value::as_str).map(str::to_string));
            if let Some(key) = key {
                if let Some(earlier) = position_of.insert(key, entries.len()) {
                    entries[earlier] = None;
                }
            }
            entries.push(Some(entry.clone()));
        }
    }
    let mut merged = json!({
        "resourceType": "Bundle",
        "id": id,
        "type": "transaction",
        "entry": entries.into_iter().flatten().collect::<Vec<_>>(),
    });
    if let Some(timestamp) = timestamp {
        merged["timestamp"] = timestamp;
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_once() {
        assert_eq!(classify(200), Verdict::Delivered);
        assert_eq!(classify(201), Verdict::Delivered);
        for status in [500, 502, 503, 504, 429, 408, 401] {
            assert_eq!(classify(status), Verdict::Retry, "{status}");
        }
        for status in [400, 403, 404, 409, 412, 422] {
            assert_eq!(classify(status), Verdict::Reject, "{status}");
        }
    }

    #[test]
    fn entry_statuses_are_checked() {
        let ok = json!({ "type": "transaction-response", "entry": [
            { "response": { "status": "200 OK" } }, { "response": { "status": "201" } } ] });
        assert_eq!(failed_entry(&ok), None);
        let bad = json!({ "entry": [ { "response": { "status": "200 OK" } }, { "response": { "status": "422 Unprocessable" } } ] });
        assert_eq!(failed_entry(&bad).unwrap(), "422 Unprocessable");
        assert_eq!(failed_entry(&json!({})), None);
    }

    #[test]
    fn backoff_doubles_within_jitter_bounds_and_is_capped() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for attempts in 1..=12u32 {
            let full = (initial * 2u32.pow(attempts - 1)).min(max);
            for _ in 0..50 {
                let delay = backoff(attempts, initial, max);
                assert!(delay >= full / 2 && delay <= full, "attempt {attempts}: {delay:?} vs {full:?}");
            }
        }
        assert!(backoff(u32::MAX, initial, max) <= max);
        let samples: std::collections::HashSet<Duration> = (0..20).map(|_| backoff(5, initial, max)).collect();
        assert!(samples.len() > 1, "jitter varies");
    }

    #[test]
    fn retry_after_in_seconds_and_as_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(retry_after("99999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-5", now), None);
    }

    #[test]
    fn merging_keeps_the_last_put_of_each_resource() {
        let first = json!({ "resourceType": "Bundle", "type": "transaction", "timestamp": "t1", "entry": [
            { "resource": { "resourceType": "Patient", "id": "p", "gender": "male" }, "request": { "method": "PUT", "url": "Patient/p" } },
            { "resource": { "resourceType": "Provenance", "id": "v1" }, "request": { "method": "PUT", "url": "Provenance/v1" } } ] });
        let second = json!({ "resourceType": "Bundle", "type": "transaction", "timestamp": "t2", "entry": [
            { "resource": { "resourceType": "Patient", "id": "p", "gender": "female" }, "request": { "method": "PUT", "url": "Patient/p" } },
            { "resource": { "resourceType": "Provenance", "id": "v2" }, "request": { "method": "PUT", "url": "Provenance/v2" } } ] });
        let merged = merge(&[first, second], "outbox-1-2");
        let urls: Vec<&str> =
            merged["entry"].as_array().unwrap().iter().map(|entry| entry["request"]["url"].as_str().unwrap()).collect();
        assert_eq!(urls, ["Provenance/v1", "Patient/p", "Provenance/v2"]);
        assert_eq!(merged["entry"][1]["resource"]["gender"], "female");
        assert_eq!(merged["type"], "transaction");
        assert_eq!(merged["timestamp"], "t2");
        assert_eq!(merged["id"], "outbox-1-2");
    }
}
