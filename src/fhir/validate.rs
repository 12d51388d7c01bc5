//! Validation of produced resources against fhir-sdk's typed models.
//!
//! A resource is deserialized into the model and serialized back. The models drop unknown
//! elements silently, so any difference between the two JSON values means the resource had
//! something invalid: an unknown element, a bad code in a required binding, a wrong type.

use serde_json::Value;

/// Checks one resource; the error names the first element that does not survive.
pub fn validate_resource(resource: &Value) -> Result<(), String> {
    let model: fhir_sdk::r4b::resources::Resource =
        serde_json::from_value(resource.clone()).map_err(|error| error.to_string())?;
    let round_trip = serde_json::to_value(&model).map_err(|error| error.to_string())?;
    match first_difference(resource, &round_trip, String::new()) {
        None => Ok(()),
        Some(path) => Err(format!("element `{path}` is not valid FHIR R4 here and would be lost")),
    }
}

/// The path of the first place where `original` has something `round_trip` does not.
fn first_difference(original: &Value, round_trip: &Value, path: String) -> Option<String> {
    match (original, round_trip) {
        (Value::Object(left), Value::Object(right)) => {
            for (key, left_value) in left {
                let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match right.get(key) {
                    Some(right_value) => {
                        if let Some(found) = first_difference(left_value, right_value, child) {
                            return Some(found);
                        }
                    }
                    None => return Some(child),
                }
            }
            None
        }
        (Value::Array(left), Value::Array(right)) => {
            for (index, left_value) in left.iter().enumerate() {
                let child = format!("{path}[{index}]");
                match right.get(index) {
                    Some(right_value) => {
                        if let Some(found) = first_difference(left_value, right_value, child) {
                            return Some(found);
                        }
                    }
                    None => return Some(child),
                }
            }
            None
        }
        (Value::Number(left), Value::Number(right)) => (left.as_f64() != right.as_f64()).then_some(path),
        (Value::String(left), Value::String(right)) => (left != right && !same_instant(left, right)).then_some(path),
        (left, right) => (left != right).then_some(path),
    }
}

/// The models re-serialize date-times in their own canonical form (`Z` for a zero offset,
/// their own fraction digits): two texts naming the same instant are the same value.
fn same_instant(left: &str, right: &str) -> bool {
    match (left.parse::<jiff::Timestamp>(), right.parse::<jiff::Timestamp>()) {
        (Ok(left_instant), Ok(right_instant)) => left_instant == right_instant,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_a_valid_patient() {
        let patient = json!({
            "resourceType": "Patient",
            "id": "p1",
            "identifier": [{"system": "urn:oid:1.2.3", "value": "123"}],
            "name": [{"family": "Doe", "given": ["Jane"]}],
            "gender": "female",
            "birthDate": "1970-01"
        });
        validate_resource(&patient).unwrap();
    }

    #[test]
    fn zero_offsets_and_fractions_are_not_differences() {
        let observation = json!({
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "code": {"text": "x"},
            "effectiveDateTime": "2024-01-02T03:04:05+00:00",
            "issued": "2024-01-02T03:04:05.120+00:00"
        });
        validate_resource(&observation).unwrap();
    }

    #[test]
    fn names_unknown_elements_and_bad_codes() {
        let unknown = json!({"resourceType": "Patient", "id": "p1", "nickname": "JJ"});
        assert!(validate_resource(&unknown).unwrap_err().contains("nickname"));
        let bad_code = json!({"resourceType": "Patient", "id": "p1", "gender": "F"});
        assert!(validate_resource(&bad_code).is_err());
        let bad_date = json!({"resourceType": "Patient", "id": "p1", "birthDate": "1970-13-01"});
        assert!(validate_resource(&bad_date).is_err());
    }
}
