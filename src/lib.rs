//! hl7-fhir-gateway: an on-premise bridge from HL7 v2 feeds to FHIR R4.
pub mod hl7;
