//! What the edge agent and the ingest server share to reach their services:
//! broker security, secrets, error classes and the retry policy.
//!
//! # Layout
//! - [`install_crypto_provider`]: makes rustls' *ring* provider the process
//!   default (rumqttc is built with `use-rustls-no-provider`, so nothing else
//!   picks one; aws-lc is not built at all).
//! - [`TlsFiles`] / [`transport`]: a rumqttc TLS transport from a CA file and
//!   an optional client certificate + key, all PEM. Bad files are start-up
//!   errors naming the file, not a failure inside the event loop later.
//! - [`read_secret_file`]: a password from a file (one trailing newline
//!   stripped), for `*_password_file` keys.
//! - [`classify`]: sorts connection errors into "the broker refused us"
//!   (credentials, authorisation, TLS trust) and transient ones, so that the
//!   daemons log a refusal clearly and back off for longer instead of
//!   hammering the broker with the same wrong password.
//! - [`Reconnect`]: the one reconnect policy of both daemons, on the one
//!   retry schedule [`backoff`] (also used for Postgres and ClickHouse).
//!
//! # Invariants
//! No function here puts a secret into an error, a `Debug` output or a log:
//! errors name files and reasons, never contents.

mod secret;

pub use secret::{Secret, SecretFileError};

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{ConnectReturnCode, ConnectionError, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS setting or a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds no usable item of the expected kind.
    #[error("{path}: no {what} found (expected PEM)")]
    Pem {
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
    },
    /// rustls refused the configuration (e.g. a key that does not match).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// Only one of client certificate and key is set.
    #[error("a client certificate needs both mqtt_client_cert_file and mqtt_client_key_file")]
    HalfClientAuth,
}

/// Installs rustls' ring provider as the process default. Idempotent: a
/// provider already installed (by an earlier call or a test) is kept.
pub fn install_crypto_provider() {
    // Err means one is installed already, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The PEM files of a TLS connection to the broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s) that sign the broker's certificate.
    pub ca: PathBuf,
    /// Client certificate chain, for brokers that require one.
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key.
    pub client_key: Option<PathBuf>,
}

impl TlsFiles {
    /// The files named by a daemon's `mqtt_tls`, `mqtt_ca_file`,
    /// `mqtt_client_cert_file` and `mqtt_client_key_file` settings (an empty
    /// path means "not set"); `None` when TLS is off.
    #[must_use]
    pub fn from_settings(tls: bool, ca: &Path, client_cert: &Path, client_key: &Path) -> Option<Self> {
        let set = |p: &Path| (!p.as_os_str().is_empty()).then(|| p.to_owned());
        tls.then(|| Self { ca: ca.to_owned(), client_cert: set(client_cert), client_key: set(client_key) })
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, SecureError> {
    let bytes = std::fs::read(path).map_err(|source| SecureError::Read { path: path.to_owned(), source })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(SecureError::Pem { path: path.to_owned(), what: "certificate" });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, SecureError> {
    let bytes = std::fs::read(path).map_err(|source| SecureError::Read { path: path.to_owned(), source })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| SecureError::Pem { path: path.to_owned(), what: "private key" })
}

/// A rustls client configuration (ring provider, TLS 1.2 and 1.3) that
/// trusts exactly the certificates in `files.ca`.
///
/// # Errors
/// Unreadable or empty PEM files, a key that does not match its
/// certificate, or only one of certificate and key.
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, SecureError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(&files.ca)? {
        roots.add(cert)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match (&files.client_cert, &files.client_key) {
        (Some(cert), Some(key)) => builder.with_client_auth_cert(certificates(cert)?, private_key(key)?)?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(SecureError::HalfClientAuth),
    };
    Ok(Arc::new(config))
}

/// The rumqttc transport for `files`.
///
/// # Errors
/// See [`client_config`].
pub fn transport(files: &TlsFiles) -> Result<Transport, SecureError> {
    Ok(Transport::tls_with_config(TlsConfiguration::Rustls(client_config(files)?)))
}

/// Reads a secret from `path`: the whole file minus one trailing newline
/// (`\n` or `\r\n`), so `echo secret > file` works.
///
/// # Errors
/// The file cannot be read or is not UTF-8 (the error names the file only).
pub fn read_secret_file(path: &Path) -> Result<String, SecureError> {
    let read_err = |source| SecureError::Read { path: path.to_owned(), source };
    let bytes = std::fs::read(path).map_err(read_err)?;
    let mut text = String::from_utf8(bytes)
        .map_err(|_| read_err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8")))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

/// What a failed connection attempt means for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The broker answered and refused us (bad credentials, not authorised,
    /// client id refused): retrying soon cannot help, back off long.
    Refused(&'static str),
    /// The TLS handshake failed (untrusted certificate, wrong host name,
    /// client certificate refused): a configuration problem, back off long.
    Tls,
    /// Network trouble, broker down or restarting: retry with the usual backoff.
    Transient,
}

impl Failure {
    /// Shortest delay before the next attempt after this failure.
    #[must_use]
    pub fn min_delay(self) -> Duration {
        match self {
            Self::Refused(_) | Self::Tls => Duration::from_secs(2),
            Self::Transient => Duration::ZERO,
        }
    }

    /// Whether the failure is a refusal or a TLS failure.
    #[must_use]
    pub fn is_permanent(self) -> bool {
        !matches!(self, Self::Transient)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused(why) => write!(f, "the broker refused the connection: {why}"),
            Self::Tls => f.write_str("TLS handshake with the broker failed (check mqtt_ca_file, the broker's certificate and host name, and the client certificate)"),
            Self::Transient => f.write_str("cannot reach the broker"),
        }
    }
}

/// The one retry schedule of both daemons (broker, Postgres, ClickHouse):
/// exponential from `min` to `max`, with jitter, without an attempt limit.
#[must_use]
pub fn backoff(min: Duration, max: Duration) -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The reconnect policy of both daemons: exponential backoff with jitter
/// between `min` and `max` after a transient error; a refusal or TLS
/// failure waits at least its [`Failure::min_delay`], doubling each time it
/// repeats, up to [`Reconnect::MAX_REFUSAL_DELAY`]. A successful connection
/// starts over.
#[derive(Debug)]
pub struct Reconnect {
    min: Duration,
    max: Duration,
    delays: backon::ExponentialBackoff,
    errors_in_a_row: u32,
}

impl Reconnect {
    /// The longest wait after a repeated refusal.
    pub const MAX_REFUSAL_DELAY: Duration = Duration::from_secs(60);

    /// A policy backing off from `min` to `max` after transient errors.
    #[must_use]
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, delays: Self::delays(min, max), errors_in_a_row: 0 }
    }

    fn delays(min: Duration, max: Duration) -> backon::ExponentialBackoff {
        backoff(min, max)
    }

    /// The broker accepted the connection: the next error starts over.
    pub fn connected(&mut self) {
        self.delays = Self::delays(self.min, self.max);
        self.errors_in_a_row = 0;
    }

    /// Errors since the last successful connection.
    #[must_use]
    pub fn errors_in_a_row(&self) -> u32 {
        self.errors_in_a_row
    }

    /// After `error`: what it means, and how long to wait before the next attempt.
    pub fn after(&mut self, error: &ConnectionError) -> (Failure, Duration) {
        self.errors_in_a_row = self.errors_in_a_row.saturating_add(1);
        let failure = classify(error);
        let mut delay = self.delays.next().unwrap_or(self.max);
        if failure.is_permanent() {
            // Same cause, same answer: wait longer each time (2 s, 4 s, ... 60 s).
            let long = failure.min_delay().saturating_mul(1 << self.errors_in_a_row.min(6).saturating_sub(1));
            delay = delay.max(long.min(Self::MAX_REFUSAL_DELAY));
        }
        (failure, delay)
    }
}

/// Sorts a connection error; see [`Failure`].
#[must_use]
pub fn classify(error: &ConnectionError) -> Failure {
    match error {
        ConnectionError::ConnectionRefused(code) => Failure::Refused(match code {
            ConnectReturnCode::BadUserNamePassword => {
                "bad user name or password (check mqtt_username and mqtt_password)"
            }
            ConnectReturnCode::NotAuthorized => {
                "not authorised (check mqtt_username, mqtt_password and the broker's ACL)"
            }
            ConnectReturnCode::BadClientId => "client id rejected",
            ConnectReturnCode::RefusedProtocolVersion => "protocol version refused",
            ConnectReturnCode::ServiceUnavailable | ConnectReturnCode::Success => "service unavailable",
        }),
        ConnectionError::Tls(_) => Failure::Tls,
        // rustls reports handshake failures through the stream as io errors
        // that wrap a rustls::Error.
        ConnectionError::Io(io) if io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) => Failure::Tls,
        _ => Failure::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_back_off_longer_than_network_errors() {
        let refused = classify(&ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword));
        assert!(matches!(refused, Failure::Refused(why) if why.contains("password")));
        assert!(refused.min_delay() >= Duration::from_secs(1));
        let io = classify(&ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)));
        assert_eq!(io, Failure::Transient);
        assert_eq!(io.min_delay(), Duration::ZERO);
    }

    #[test]
    fn repeated_refusals_wait_longer_each_time_and_a_connection_starts_over() {
        let mut policy = Reconnect::new(Duration::from_millis(100), Duration::from_secs(5));
        let refused = ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized);
        let waits: Vec<Duration> = (0..8).map(|_| policy.after(&refused).1).collect();
        assert_eq!(waits[0], Duration::from_secs(2));
        assert_eq!(waits[1], Duration::from_secs(4));
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), Reconnect::MAX_REFUSAL_DELAY);
        assert_eq!(policy.errors_in_a_row(), 8);
        policy.connected();
        let io = ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let (failure, wait) = policy.after(&io);
        assert_eq!(failure, Failure::Transient);
        assert!(
            wait <= Duration::from_millis(200),
            "a network error after a connection backs off from the minimum: {wait:?}"
        );
    }

    #[test]
    fn a_rustls_error_inside_io_is_a_tls_failure() {
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert_eq!(classify(&ConnectionError::Io(io)), Failure::Tls);
    }

    #[test]
    fn secret_files_lose_one_trailing_newline_only() {
        let dir = std::env::temp_dir().join(format!("telemetry_link_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pw");
        std::fs::write(&path, "s3cret \r\n").unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), "s3cret ");
        std::fs::write(&path, "a\n\n").unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), "a\n");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn missing_and_empty_pem_files_name_the_file() {
        let files = TlsFiles { ca: "/nonexistent/ca.pem".into(), ..TlsFiles::default() };
        let error = client_config(&files).unwrap_err().to_string();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
        let dir = std::env::temp_dir().join(format!("telemetry_link_pem_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let error = client_config(&TlsFiles { ca: ca.clone(), ..TlsFiles::default() }).unwrap_err();
        assert!(matches!(error, SecureError::Pem { what: "certificate", .. }), "{error}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
