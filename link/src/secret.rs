//! [`Secret`]: a password that never prints. Shared by both daemons'
//! configurations, so neither `Debug` output, logs nor `--help` show one.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use crate::SecureError;

/// Why a password could not be taken from its `*_password_file`.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// Both the password and its file are set: which one wins would be a guess.
    #[error("set either the password or its file, not both")]
    Both,
    /// The file cannot be read (the error names the file, never its content).
    #[error(transparent)]
    Unreadable(#[from] SecureError),
}

/// A secret (password): never printed by `Debug`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

/// Serialised redacted (`"<redacted>"`, or `""` when unset), so a
/// configuration can be shown (e.g. to an operator's `status` command)
/// without its passwords.
impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "<redacted>" })
    }
}

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for handing to a client library.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether it is empty (no password).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// When `file` names a file, reads the secret from it (see
    /// [`crate::read_secret_file`]) and clears `file`, so a second call does
    /// nothing. An empty `file` leaves the secret as it is.
    ///
    /// # Errors
    /// The secret is set as well, or the file cannot be read.
    pub fn take_from_file(&mut self, file: &mut PathBuf) -> Result<(), SecretFileError> {
        let path = std::mem::take(file);
        if path.as_os_str().is_empty() {
            return Ok(());
        }
        if !self.is_empty() {
            return Err(SecretFileError::Both);
        }
        self.0 = crate::read_secret_file(&path)?;
        Ok(())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "Secret(\"\")" } else { "Secret(***)" })
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_comes_from_its_file_once_and_never_from_both() {
        let path = std::env::temp_dir().join(format!("secret-test-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").unwrap();
        let mut secret = Secret::default();
        let mut file = path.clone();
        secret.take_from_file(&mut file).unwrap();
        assert_eq!((secret.expose(), file.as_os_str().is_empty()), ("s3cret", true));
        let mut again = path.clone();
        assert!(matches!(secret.take_from_file(&mut again), Err(SecretFileError::Both)));
        let mut none = PathBuf::new();
        Secret::new("x").take_from_file(&mut none).unwrap();
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_secret_never_prints_its_value() {
        let s: Secret = "hunter2".parse().unwrap();
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(format!("{:?}", Secret::default()), "Secret(\"\")");
    }
}
