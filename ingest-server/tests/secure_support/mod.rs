//! A private Mosquitto in the secure profile (`scripts/stack instance mqtts`):
//! users with random passwords, the ACL of deploy/mosquitto-acl.in, a TLS
//! listener with a locally made CA, and a plain listener with the same auth.
//! One per test, so the default `/telemetry` prefix of the ACL is private.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

/// A running secure broker; stopped and deleted on drop.
pub struct SecureBroker {
    pub dir: PathBuf,
    pub tls_port: u16,
    pub plain_port: u16,
    passwords: HashMap<String, String>,
}

/// A random hex string (not cryptographic; these are throw-away test users).
pub fn random_secret(tag: &str) -> String {
    format!("{tag}-{:016x}{:016x}", fastrand_u64(), fastrand_u64())
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

fn stack(args: &[&str]) -> std::process::Output {
    Command::new(test_support::repo_root().join("scripts/stack")).args(args).output().expect("run scripts/stack")
}

impl SecureBroker {
    /// Starts one with the users `ingest` and each of `devices`.
    pub fn start(devices: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(test_support::unique_name("private_mqtts"));
        std::fs::create_dir_all(&dir).expect("broker dir");
        let mut passwords = HashMap::new();
        let mut users = String::new();
        for user in std::iter::once(&"ingest").chain(devices) {
            let pw = random_secret("mqtt");
            users.push_str(&format!("{user} {pw}\n"));
            passwords.insert((*user).to_owned(), pw);
        }
        std::fs::write(dir.join("users"), users).expect("users file");
        let (tls_port, plain_port) = (test_support::free_port(), test_support::free_port());
        let out = stack(&[
            "instance",
            "mqtts",
            dir.to_str().expect("utf-8 temp dir"),
            &tls_port.to_string(),
            &plain_port.to_string(),
        ]);
        assert!(out.status.success(), "secure broker did not start: {}", String::from_utf8_lossy(&out.stderr));
        Self { dir, tls_port, plain_port, passwords }
    }

    /// The password of `user`.
    pub fn password(&self, user: &str) -> String {
        self.passwords[user].clone()
    }

    /// The CA that signed the broker's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("tls/ca.pem")
    }

    /// A client certificate and key signed by the same CA.
    pub fn client_cert(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("tls/client.pem"), self.dir.join("tls/client.key"))
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for SecureBroker {
    fn drop(&mut self) {
        let _ = stack(&["instance-stop", "mqtts", self.dir.to_str().unwrap_or("")]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA that did not sign the broker's certificate (openssl), in `dir`.
pub fn other_ca(dir: &std::path::Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("dir");
    let (key, pem) = (dir.join("other-ca.key"), dir.join("other-ca.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "30"])
        .args(["-subj", "/CN=not the broker's CA", "-addext", "basicConstraints=critical,CA:TRUE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&pem)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    pem
}

/// A private ClickHouse whose user `ingest` has `password`; stopped on drop.
pub struct SecureClickHouse {
    pub dir: PathBuf,
    pub http_port: u16,
}

impl SecureClickHouse {
    pub fn start(password: &str) -> Self {
        let dir = std::env::temp_dir().join(test_support::unique_name("private_ch_secure"));
        std::fs::create_dir_all(&dir).expect("clickhouse dir");
        std::fs::write(dir.join("ingest.password"), password).expect("password file");
        let http_port = test_support::free_port();
        let out = stack(&["instance", "clickhouse", dir.to_str().expect("utf-8"), &http_port.to_string()]);
        assert!(out.status.success(), "clickhouse did not start: {}", String::from_utf8_lossy(&out.stderr));
        Self { dir, http_port }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }
}

impl Drop for SecureClickHouse {
    fn drop(&mut self) {
        let _ = stack(&["instance-stop", "clickhouse", self.dir.to_str().unwrap_or("")]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
