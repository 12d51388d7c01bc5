//! The conversion report: what an analyst needs to know about one converted message.

use std::fmt;

use serde::Serialize;

/// A rule that could not produce its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// `file:line` of the rule.
    pub rule: String,
    /// Why.
    pub reason: String,
}

/// A code that a vocabulary map does not know.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VocabularyMiss {
    /// `file:line` of the rule.
    pub rule: String,
    /// Vocabulary name.
    pub vocab: String,
    /// The code received.
    pub code: String,
}

/// Report of one conversion.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Message map used.
    pub message_map: String,
    /// Time zone applied to timestamps without offset.
    pub timezone: String,
    /// Fields that carried data no rule read (`PID-12`, `ZPI-2`).
    pub unused_fields: Vec<String>,
    /// Rules that failed.
    pub failures: Vec<Failure>,
    /// Codes no vocabulary map knew.
    pub vocabulary_misses: Vec<VocabularyMiss>,
    /// Other remarks (e.g. a resource without a business key).
    pub notes: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(formatter, "message map: {} (time zone {})", self.message_map, self.timezone)?;
        if self.unused_fields.is_empty() {
            writeln!(formatter, "fields with data no rule used: none")?;
        } else {
            writeln!(formatter, "fields with data no rule used: {}", self.unused_fields.join(", "))?;
        }
        for failure in &self.failures {
            writeln!(formatter, "rule failed: {}: {}", failure.rule, failure.reason)?;
        }
        for miss in &self.vocabulary_misses {
            writeln!(formatter, "vocabulary miss: {} has no entry for `{}` ({})", miss.vocab, miss.code, miss.rule)?;
        }
        for note in &self.notes {
            writeln!(formatter, "note: {note}")?;
        }
        Ok(())
    }
}
