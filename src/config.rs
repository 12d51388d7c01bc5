//! The configuration file: composes each module's `Config` into one YAML schema.
//!
//! Loading has three layers, later ones winning: the file (or the embedded defaults when
//! there is none), `HL7GW_<SECTION>__<KEY>` environment variables, then command-line
//! flags. Unknown keys are rejected with their name wherever they come from. `validate`
//! is pure; the I/O (files, sockets, database) happens when the gateway starts.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::setting::Invalid;
use crate::{auth, http, mapping, mllp, outbox};

/// The only configuration format version this build reads.
pub const VERSION: u32 = 1;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "HL7GW_";

/// Environment variables with the prefix that are not config keys.
const ENV_NOT_KEYS: [&str; 1] = ["HL7GW_CONFIG"];

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Format version; must be 1.
    pub version: u32,
    /// Directory of the SQLite database (journal, resources, outbox).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// MLLP listener.
    #[serde(default)]
    pub mllp: mllp::Config,
    /// HTTP server (health, metrics, FHIR API).
    #[serde(default)]
    pub http: http::Config,
    /// Mapping files and time zone.
    #[serde(default)]
    pub mappings: mapping::Config,
    /// Bearer-token auth of the FHIR and admin APIs; absent = open, allowed only when
    /// `http.listen` is a loopback address.
    #[serde(default)]
    pub auth: Option<auth::Config>,
    /// Push of transaction Bundles to a central FHIR server; absent = no push.
    #[serde(default)]
    pub aggregator: Option<outbox::Config>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

impl Default for Config {
    fn default() -> Self {
        Config {
            version: VERSION,
            data_dir: default_data_dir(),
            mllp: mllp::Config::default(),
            http: http::Config::default(),
            mappings: mapping::Config::default(),
            auth: None,
            aggregator: None,
        }
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Data directory.
    pub data_dir: PathBuf,
    /// MLLP settings.
    pub mllp: mllp::Settings,
    /// HTTP settings.
    pub http: http::Settings,
    /// Where mappings come from.
    pub mappings: mapping::Sources,
    /// Token verification; `None` = open API (loopback only).
    pub auth: Option<auth::Settings>,
    /// Aggregator push; `None` = no push.
    pub aggregator: Option<outbox::Settings>,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML is malformed or has unknown or mistyped keys (the message has the line).
    #[error("config {origin}: {message}")]
    Parse {
        /// The file, or the file plus environment overrides.
        origin: String,
        /// serde's message, with line and column for a file.
        message: String,
    },
    /// An environment override names no key.
    #[error("environment variable {variable}: {reason}")]
    Environment {
        /// The variable.
        variable: String,
        /// What is wrong.
        reason: String,
    },
    /// A value is unusable.
    #[error("config {0}")]
    Invalid(#[from] Invalid),
}

/// Flags that override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--mllp-listen`.
    pub mllp_listen: Option<String>,
    /// `--http-listen`.
    pub http_listen: Option<String>,
    /// `--mappings`.
    pub mappings_dir: Option<PathBuf>,
}

/// Loads the file (or the embedded defaults), applies environment overrides from
/// `environment` and then the flags.
pub fn load(
    path: Option<&Path>,
    environment: impl IntoIterator<Item = (String, String)>,
    overrides: &Overrides,
) -> Result<Config, Error> {
    let text = match path {
        Some(path) => {
            Some(std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?)
        }
        None => None,
    };
    let origin = path.map_or_else(|| "defaults".to_string(), |path| path.display().to_string());
    // Parse the file on its own first, so that its errors carry line and column.
    let mut config = match &text {
        Some(text) => serde_saphyr::from_str::<Config>(text)
            .map_err(|error| Error::Parse { origin: origin.clone(), message: error.to_string() })?,
        None => Config::default(),
    };

    let mut variables: Vec<(String, String)> = environment
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX) && !ENV_NOT_KEYS.contains(&name.as_str()))
        .collect();
    variables.sort();
    if !variables.is_empty() {
        let mut tree = match &text {
            Some(text) => serde_saphyr::from_str::<Value>(text)
                .map_err(|error| Error::Parse { origin: origin.clone(), message: error.to_string() })?,
            None => Value::Object(Map::from_iter([("version".to_string(), Value::from(VERSION))])),
        };
        if tree.is_null() {
            tree = Value::Object(Map::new());
        }
        for (variable, value) in &variables {
            apply_environment(&mut tree, variable, value)?;
        }
        config = serde_json::from_value::<Config>(tree).map_err(|error| Error::Parse {
            origin: format!("{origin} with {ENV_PREFIX} environment overrides"),
            message: error.to_string(),
        })?;
    }

    if let Some(data_dir) = &overrides.data_dir {
        config.data_dir = data_dir.clone();
    }
    if let Some(listen) = &overrides.mllp_listen {
        config.mllp.listen = listen.clone();
    }
    if let Some(listen) = &overrides.http_listen {
        config.http.listen = listen.clone();
    }
    if let Some(folder) = &overrides.mappings_dir {
        config.mappings.dir = Some(folder.clone());
    }
    Ok(config)
}

/// Sets the key named by `HL7GW_SECTION__KEY` in the YAML tree. The value is read as a
/// YAML scalar, so numbers and booleans keep their type.
fn apply_environment(tree: &mut Value, variable: &str, value: &str) -> Result<(), Error> {
    let environment_error =
        |reason: &str| Error::Environment { variable: variable.to_string(), reason: reason.to_string() };
    let path: Vec<String> = variable[ENV_PREFIX.len()..].split("__").map(|part| part.to_ascii_lowercase()).collect();
    if path.iter().any(String::is_empty) {
        return Err(environment_error("expected HL7GW_<SECTION>__<KEY>, e.g. HL7GW_MLLP__LISTEN"));
    }
    let parsed = match serde_saphyr::from_str::<Value>(value) {
        Ok(Value::Object(_)) | Ok(Value::Array(_)) | Ok(Value::Null) | Err(_) => Value::String(value.to_string()),
        Ok(scalar) => scalar,
    };
    let mut node = tree;
    for (index, key) in path.iter().enumerate() {
        let Value::Object(mapping) = node else {
            return Err(environment_error("a parent of this key is not a section"));
        };
        if index == path.len() - 1 {
            mapping.insert(key.clone(), parsed);
            return Ok(());
        }
        node = mapping.entry(key.clone()).or_insert_with(|| Value::Object(Map::new()));
        if node.is_null() {
            *node = Value::Object(Map::new());
        }
    }
    Ok(())
}

impl Config {
    /// Checks every section without touching files, sockets or the database.
    pub fn validate(&self) -> Result<Settings, Invalid> {
        if self.version != VERSION {
            return Err(Invalid::new("version", format!("must be {VERSION}, found {}", self.version)));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(Invalid::new("data_dir", "must not be empty"));
        }
        let http = self.http.validate()?;
        let auth = self.auth.as_ref().map(auth::Config::validate).transpose()?;
        if auth.is_none() && !http.listen.ip().is_loopback() {
            return Err(Invalid::new(
                "http.listen",
                format!(
                    "{} is not a loopback address, and the FHIR and admin APIs have no auth configured; \
                     add an `auth` section (issuer, audience, jwks_file or jwks_url) or listen on 127.0.0.1",
                    http.listen
                ),
            ));
        }
        Ok(Settings {
            data_dir: self.data_dir.clone(),
            mllp: self.mllp.validate()?,
            http,
            mappings: self.mappings.validate()?,
            auth,
            aggregator: self.aggregator.as_ref().map(outbox::Config::validate).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    fn no_environment() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn no_file_means_embedded_defaults() {
        let config = load(None, no_environment(), &Overrides::default()).unwrap();
        let settings = config.validate().unwrap();
        assert_eq!(settings.data_dir, PathBuf::from("./data"));
        assert_eq!(settings.mllp.listen.to_string(), "0.0.0.0:2575");
        assert_eq!(settings.http.listen.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn an_open_api_is_refused_off_loopback() {
        let file = write("version: 1\nhttp:\n  listen: 0.0.0.0:8080\n");
        let config = load(Some(file.path()), no_environment(), &Overrides::default()).unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("http.listen") && error.contains("auth"), "{error}");
        let file = write("version: 1\nhttp:\n  listen: \"[::1]:8080\"\n");
        let config = load(Some(file.path()), no_environment(), &Overrides::default()).unwrap();
        config.validate().unwrap();
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/docker/config.example.yaml");
        let config = load(Some(Path::new(example)), no_environment(), &Overrides::default()).unwrap();
        config.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let file = write("version: 1\nmllp:\n  listen: 0.0.0.0:2575\n  max_conections: 5\n");
        let error = load(Some(file.path()), no_environment(), &Overrides::default()).unwrap_err().to_string();
        assert!(error.contains("max_conections"), "{error}");
        assert!(error.contains("line 4"), "{error}");
    }

    #[test]
    fn version_is_required_and_checked() {
        let file = write("data_dir: /tmp/x\n");
        let error = load(Some(file.path()), no_environment(), &Overrides::default()).unwrap_err().to_string();
        assert!(error.contains("version"), "{error}");
        let file = write("version: 2\n");
        let config = load(Some(file.path()), no_environment(), &Overrides::default()).unwrap();
        assert_eq!(config.validate().unwrap_err().key, "version");
    }

    #[test]
    fn environment_overrides_file_and_flags_override_both() {
        let file = write("version: 1\nmllp:\n  listen: 0.0.0.0:2575\n  max_connections: 5\n");
        let environment = vec![
            ("HL7GW_MLLP__MAX_CONNECTIONS".to_string(), "7".to_string()),
            ("HL7GW_MLLP__LISTEN".to_string(), "127.0.0.1:3000".to_string()),
            ("HL7GW_DATA_DIR".to_string(), "/var/lib/hl7gw".to_string()),
            ("HL7GW_CONFIG".to_string(), "ignored".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let overrides = Overrides { mllp_listen: Some("127.0.0.1:4000".to_string()), ..Overrides::default() };
        let config = load(Some(file.path()), environment, &overrides).unwrap();
        assert_eq!(config.mllp.max_connections, 7);
        assert_eq!(config.mllp.listen, "127.0.0.1:4000");
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/hl7gw"));
    }

    #[test]
    fn the_aggregator_endpoint_can_come_from_the_environment() {
        let environment =
            vec![("HL7GW_AGGREGATOR__ENDPOINT".to_string(), "https://central.example.org/fhir".to_string())];
        let settings = load(None, environment, &Overrides::default()).unwrap().validate().unwrap();
        assert_eq!(settings.aggregator.unwrap().endpoint.as_str(), "https://central.example.org/fhir");
        assert!(load(None, no_environment(), &Overrides::default()).unwrap().validate().unwrap().aggregator.is_none());
    }

    #[test]
    fn environment_without_a_file_and_unknown_environment_keys() {
        let environment = vec![("HL7GW_MLLP__IDLE_TIMEOUT_SECS".to_string(), "30".to_string())];
        let config = load(None, environment, &Overrides::default()).unwrap();
        assert_eq!(config.mllp.idle_timeout_secs, 30);

        let environment = vec![("HL7GW_MLLP__LISTN".to_string(), "x".to_string())];
        let error = load(None, environment, &Overrides::default()).unwrap_err().to_string();
        assert!(error.contains("listn"), "{error}");
    }
}
