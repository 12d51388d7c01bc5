//! FHIR R4 knowledge the gateway needs outside the mapping language: deterministic ids,
//! resource validation against the fhir-sdk models, and OperationOutcome.
//!
//! A leaf module: imports nothing from the rest of the crate. We emit and advertise R4
//! (4.0.1) JSON; validation uses fhir-sdk's R4B models, which match R4 for every resource
//! type the gateway produces.

pub mod ids;
pub mod validate;

/// The FHIR version the gateway emits.
pub const FHIR_VERSION: &str = "4.0.1";
