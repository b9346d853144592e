//! `telemetry-ctl` against a private broker in the secure profile (TLS,
//! passwords, the ACL of deploy/mosquitto-acl.in): each refusal ends with
//! exit code 2 and a message that names its cause.

#[path = "../../ingest-server/tests/secure_support/mod.rs"]
mod secure_support;

use secure_support::SecureBroker;

const BIN: &str = env!("CARGO_BIN_EXE_telemetry-ctl");

/// Runs telemetry-ctl over TLS against `broker` as `user` with `password`
/// (in TELEMETRY_CTL_PASSWORD), trusting `ca`: the exit code and stderr.
async fn ctl(broker: &SecureBroker, ca: &std::path::Path, user: &str, password: &str, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(BIN)
        .args(["--mqtt-host", "127.0.0.1", "--mqtt-port", &broker.tls_port.to_string(), "--tls-ca"])
        .arg(ca)
        .args(["--username", user])
        .env("TELEMETRY_CTL_PASSWORD", password)
        .args(args)
        .output()
        .await
        .expect("run telemetry-ctl");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("$ telemetry-ctl (as {user}) {}\n{}{stderr}", args.join(" "), String::from_utf8_lossy(&out.stdout));
    (out.status.code().expect("exited"), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_by_a_secure_broker_are_named_and_exit_2() {
    let broker = SecureBroker::start(&["edge-1", "edge-2"]);
    let ca = broker.ca();
    let status = ["status", "--to", "edge-2", "--timeout", "3s"];

    let (code, stderr) = ctl(&broker, &ca, "edge-1", "not-the-password", &status).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("refused the connection: not authorised"), "{stderr}");

    // TLS and the login work; the ACL does not let a device command another.
    let (code, stderr) = ctl(&broker, &ca, "edge-1", &broker.password("edge-1"), &status).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("ACL does not let this user write /telemetry/cmd/<client_id>"), "{stderr}");

    let other = secure_support::other_ca(&broker.dir.join("other"));
    let (code, stderr) = ctl(&broker, &other, "edge-1", &broker.password("edge-1"), &status).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("TLS handshake with the broker at 127.0.0.1"), "{stderr}");
}
