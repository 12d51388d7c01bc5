//! Deterministic resource ids.
//!
//! An id is a SHA-256 of the resource type and the business key values (joined with the
//! unit separator), formatted as a UUID (version 8, "custom", RFC 9562). The same real-world
//! thing gets the same id in every message and on every re-run; different resource types
//! never share an id; and the id doubles as the bundle entry's `urn:uuid:` full URL.

use sha2::{Digest, Sha256};

/// The id of a resource of `resource_type` with business key `keys`.
pub fn resource_id(resource_type: &str, keys: &[String]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(resource_type.as_bytes());
    for key in keys {
        hasher.update([0x1f]);
        hasher.update(key.trim().as_bytes());
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_typed_and_key_sensitive() {
        let keys = vec!["HOSP".to_string(), "123".to_string()];
        let patient = resource_id("Patient", &keys);
        assert_eq!(patient, resource_id("Patient", &keys));
        assert_ne!(patient, resource_id("Encounter", &keys));
        assert_ne!(patient, resource_id("Patient", &["HOSP1".to_string(), "23".to_string()]));
        assert_eq!(patient.len(), 36);
        assert_eq!(&patient[14..15], "8");
    }
}
