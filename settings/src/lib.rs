//! How both daemons are configured, in one place.
//!
//! A daemon reads one TOML file, then environment variables, then flags;
//! each later source overrides the earlier ones, key by key. Every key is
//! declared once, with [`settings!`]: its name (the TOML key; the flag is
//! `--` plus the name in kebab case), its type, its default, its environment
//! variable and its doc (which is also the flag's `--help` text). From that
//! one declaration the macro makes the configuration struct, its `Default`,
//! the clap overrides and the loader, so the file, the environment, the flags
//! and `--help` can never disagree about a key.
//!
//! Keys are flat (`mqtt_port`, not `[mqtt] port`) so that the file, the
//! environment and the flags name every setting the same way. Unknown keys
//! in the file are an error (a misspelt key silently taking its default is
//! the classic configuration bug).
//!
//! Secrets: a key `x_password` of type [`Secret`] can have a companion
//! `x_password_file` (listed in the macro's `secrets { .. }`); loading reads
//! the file into the secret, so passwords need not sit in the file, the
//! environment or the process list.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
pub use telemetry_link::Secret;
use telemetry_link::SecretFileError;

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("cannot parse {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: toml::de::Error,
    },
    /// A secret file could not be read (the error names the file, never its content).
    #[error("invalid setting `{key}`: {source}")]
    SecretFile {
        /// The key naming the file.
        key: &'static str,
        /// Why.
        source: telemetry_link::SecureError,
    },
    /// A value is out of range or malformed.
    #[error("invalid setting `{key}`: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

/// An [`ConfigError::Invalid`] for `key`.
#[must_use]
pub fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, reason: reason.into() }
}

/// Parses TOML text (missing keys take their defaults).
///
/// # Errors
/// Bad TOML, a value of the wrong type, or an unknown key.
pub fn from_toml<T: DeserializeOwned>(text: &str) -> Result<T, toml::de::Error> {
    toml::from_str(text)
}

/// Reads and parses a TOML file.
///
/// # Errors
/// An unreadable file, or what [`from_toml`] refuses.
pub fn from_file<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    from_toml(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })
}

/// Reads each `(key, file, secret)`'s file into its secret and clears the
/// file key (so a second call does nothing). A secret and its file both set
/// is an error: which one wins would be a guess.
///
/// # Errors
/// Both set, or an unreadable file.
pub fn resolve_secret_files<'a>(
    pairs: impl IntoIterator<Item = (&'static str, &'a mut PathBuf, &'a mut Secret)>,
) -> Result<(), ConfigError> {
    for (key, file, secret) in pairs {
        secret.take_from_file(file).map_err(|error| match error {
            SecretFileError::Both => invalid(key, error.to_string()),
            SecretFileError::Unreadable(source) => ConfigError::SecretFile { key, source },
        })?;
    }
    Ok(())
}

/// Declares a daemon's configuration: the struct, its `Default`, the clap
/// overrides (one optional flag per key, each also read from its environment
/// variable; clap gives the flag precedence over the variable) and the
/// loader.
///
/// ```text
/// settings! {
///     /// The configuration (doc of the struct).
///     pub struct Config;
///     /// The overrides (doc of the clap struct).
///     pub struct Overrides;
///     secrets { mqtt_password_file => mqtt_password }
///     /// Doc of the key, also its --help text.
///     mqtt_port: u16 = 1883, env "APP_MQTT_PORT";
///     listen: Vec<String> = vec![], env "APP_LISTEN", arg(value_delimiter = ',');
/// }
/// ```
///
/// The calling crate depends on `serde` and `clap` (with `derive` and
/// `env`) and defines `fn validate(&self) -> Result<(), ConfigError>` on
/// the struct: [`load`](#method.load) calls it after every layer is applied
/// and before the secret files are read.
#[macro_export]
macro_rules! settings {
    (
        $(#[doc = $config_doc:literal])*
        pub struct $config:ident;
        $(#[doc = $overrides_doc:literal])*
        pub struct $overrides:ident;
        secrets { $( $file:ident => $secret:ident ),* $(,)? }
        $( $(#[doc = $doc:literal])* $name:ident : $ty:ty = $default:expr, env $env:literal $(, arg($($arg:tt)*))? ; )*
    ) => {
        $(#[doc = $config_doc])*
        #[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $config {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl Default for $config {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        $(#[doc = $overrides_doc])*
        #[derive(Debug, Default, clap::Args)]
        pub struct $overrides {
            $( $(#[doc = $doc])* #[arg(long, env = $env, hide_env_values = true $(, $($arg)*)?)] pub $name: Option<$ty>, )*
        }

        impl $config {
            /// Applies every override that is set.
            pub fn apply(&mut self, overrides: $overrides) {
                $( if let Some(v) = overrides.$name { self.$name = v; } )*
            }

            /// Parses TOML text (missing keys take their defaults).
            ///
            /// # Errors
            /// Bad TOML, a value of the wrong type, or an unknown key.
            pub fn from_toml(text: &str) -> Result<Self, $crate::toml::de::Error> {
                $crate::from_toml(text)
            }

            /// Reads a TOML file (missing keys take their defaults).
            ///
            /// # Errors
            /// An unreadable file, bad TOML, an unknown key.
            pub fn from_file(path: &std::path::Path) -> Result<Self, $crate::ConfigError> {
                $crate::from_file(path)
            }

            /// Defaults, then `file` (if any), then `overrides`; validated,
            /// with the secret files read.
            ///
            /// # Errors
            /// An unreadable or invalid file, an invalid value, an
            /// unreadable secret file.
            pub fn load(
                file: Option<&std::path::Path>,
                overrides: $overrides,
            ) -> Result<Self, $crate::ConfigError> {
                let mut config = match file {
                    Some(path) => Self::from_file(path)?,
                    None => Self::default(),
                };
                config.apply(overrides);
                config.validate()?;
                config.resolve_secrets()?;
                Ok(config)
            }

            /// Reads every secret file into its secret and clears the file
            /// key (a second call does nothing); both set is an error.
            ///
            /// # Errors
            /// Both set, or an unreadable file.
            pub fn resolve_secrets(&mut self) -> Result<(), $crate::ConfigError> {
                $crate::resolve_secret_files([
                    $( (stringify!($file), &mut self.$file, &mut self.$secret), )*
                ])
            }
        }
    };
}

#[doc(hidden)]
pub use toml;

#[cfg(test)]
mod tests {
    use super::{invalid, ConfigError, Secret};
    use std::path::PathBuf;

    settings! {
        /// A test configuration.
        pub struct Config;
        /// Its overrides.
        pub struct Overrides;
        secrets { password_file => password }
        /// A port.
        port: u16 = 1883, env "SETTINGS_TEST_PORT";
        /// Names, comma-separated as a flag.
        names: Vec<String> = vec!["a".into()], env "SETTINGS_TEST_NAMES", arg(value_delimiter = ',');
        /// A password.
        password: Secret = Secret::default(), env "SETTINGS_TEST_PASSWORD";
        /// Its file.
        password_file: PathBuf = PathBuf::new(), env "SETTINGS_TEST_PASSWORD_FILE";
    }

    impl Config {
        fn validate(&self) -> Result<(), ConfigError> {
            if self.port == 0 {
                return Err(invalid("port", "must not be 0"));
            }
            Ok(())
        }
    }

    fn overrides(args: &[&str]) -> Overrides {
        use clap::{Args, FromArgMatches};
        let command = Overrides::augment_args(clap::Command::new("t"));
        let matches = command.try_get_matches_from(std::iter::once("t").chain(args.iter().copied())).unwrap();
        Overrides::from_arg_matches(&matches).unwrap()
    }

    fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("settings-test-{}-{}", std::process::id(), line!()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn defaults_then_file_then_flags() {
        let dir = temp_dir();
        let file = write(&dir, "a.toml", "port = 2000\nnames = [\"x\", \"y\"]\n");
        assert_eq!(Config::default().port, 1883);
        assert_eq!(Config::from_toml("port = 5").unwrap().port, 5);
        let from_file = Config::load(Some(&file), overrides(&[])).unwrap();
        assert_eq!((from_file.port, from_file.names.clone()), (2000, vec!["x".to_owned(), "y".to_owned()]));
        let flagged = Config::load(Some(&file), overrides(&["--port", "3000", "--names", "p,q"])).unwrap();
        assert_eq!((flagged.port, flagged.names), (3000, vec!["p".to_owned(), "q".to_owned()]));
    }

    #[test]
    fn unknown_keys_bad_values_and_missing_files_are_named() {
        let dir = temp_dir();
        let unknown = write(&dir, "u.toml", "prot = 1\n");
        let err = Config::load(Some(&unknown), overrides(&[])).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }) && err.to_string().contains("prot"), "{err}");
        let zero = Config::load(None, overrides(&["--port", "0"])).unwrap_err();
        assert_eq!(zero.to_string(), "invalid setting `port`: must not be 0");
        let missing = Config::load(Some(&dir.join("missing.toml")), overrides(&[])).unwrap_err();
        assert!(matches!(missing, ConfigError::Read { .. }), "{missing}");
    }

    #[test]
    fn a_secret_file_fills_its_secret_and_both_set_is_refused() {
        let dir = temp_dir();
        let secret = write(&dir, "pw", "hunter2\n");
        let path = secret.display().to_string();
        let config = Config::load(None, overrides(&["--password-file", &path])).unwrap();
        assert_eq!(config.password.expose(), "hunter2");
        assert!(config.password_file.as_os_str().is_empty());
        let both = Config::load(None, overrides(&["--password-file", &path, "--password", "x"])).unwrap_err();
        assert!(matches!(both, ConfigError::Invalid { key: "password_file", .. }), "{both}");
    }
}
