//! Hostile payloads through a real client (`mosquitto_pub`) on a real broker:
//! garbage, empty, huge and wrong-version payloads on `<prefix>/client/x`.
//! Each is a counted rejection (dead letter) and good clients lose nothing.

mod harness;

use std::time::Duration;

use harness::{batches, range, Agent, Server, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_empty_huge_and_wrong_version_payloads_are_counted_and_good_data_flows() {
    let Some(world) = World::new() else { return };
    let mut config = world.config();
    config.max_payload_bytes = 1 << 20;
    let server = Server::start(config).await;
    let agent = Agent::connect(&world).await;
    let topic = format!("{}/client/x", world.prefix);
    let dir = std::env::temp_dir().join(test_support::unique_name("hostile"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = |name: &str, bytes: Vec<u8>| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write payload");
        path.to_str().expect("utf-8 path").to_owned()
    };
    // Good data before, between and after the bad.
    agent.publish(&batches("x", 1, 1, 100, 50)).await;
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    harness::mosquitto_pub(&world, &topic, &["-f", &file("garbage", garbage)]);
    harness::mosquitto_pub(&world, &topic, &["-n"]);
    let mut wrong_version = harness::batch("x", 1, 500, 510).encode();
    wrong_version[0] = 99;
    harness::mosquitto_pub(&world, &topic, &["-f", &file("wrong_version", wrong_version)]);
    // Over max_payload_bytes (1 MiB) and the MQTT packet limit the server
    // asks rumqttc for: must not wedge the subscription.
    let mut huge = harness::batch("x", 1, 600, 610).encode();
    huge.resize(2 << 20, 0);
    harness::mosquitto_pub(&world, &topic, &["-f", &file("huge", huge)]);
    // A forged reading count in a tiny payload (the fuzz finding, via MQTT).
    let mut forged = vec![1u8];
    forged.extend_from_slice(&1u64.to_le_bytes());
    forged.push(b'x');
    forged.extend_from_slice(&[0; 24]);
    forged.extend_from_slice(&(1u64 << 40).to_le_bytes());
    harness::mosquitto_pub(&world, &topic, &["-f", &file("forged_count", forged)]);
    agent.publish(&batches("x", 1, 101, 200, 50)).await;
    agent.flushed().await;
    let _ = std::fs::remove_dir_all(&dir);

    world.wait_stored(300, Duration::from_secs(60)).await;
    let m = &server.metrics;
    harness::wait_for("5 dead letters", Duration::from_secs(30), || m.dead_letters_total() == 5).await;
    for (reason, n) in [("unknown_version", 2), ("empty", 1), ("oversize", 1), ("truncated", 1)] {
        assert_eq!(m.dead_letters.get_or_create(&ingest_server::metrics::reason(reason)).get(), n, "{reason}");
    }
    agent.wait_acked("x", &[range(1, 1, 300)], Duration::from_secs(20)).await;
    harness::wait_for("all acked", Duration::from_secs(10), || m.unacked_messages.get() == 0).await;
    assert_eq!(world.count("SELECT count() FROM DB.readings").await, 300, "nothing lost, nothing extra");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_flood_is_refused_by_the_broker_or_dead_lettered_with_memory_bounded() {
    // 20 garbage publishes of just under the shipped broker's max_packet_size
    // (4 MiB) on client topics, and 3 over it. The broker refuses the large
    // ones, the server dead-letters the others (keeping 64 KiB of each),
    // never loses its connection, and stays within a memory bound; good
    // data keeps flowing.
    let Some(world) = World::new() else { return };
    let config = world.config();
    let server = harness::Binary::start(&config).await;
    let agent = Agent::connect(&world).await;
    let base_rss = server.peak_rss_mib();
    let dir = std::env::temp_dir().join(test_support::unique_name("flood"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = |name: &str, len: usize| {
        let path = dir.join(name);
        let bytes: Vec<u8> = (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();
        std::fs::write(&path, bytes).expect("write payload");
        path.to_str().expect("utf-8 path").to_owned()
    };
    let (at_limit, over) = (file("at_limit", (4 << 20) - 1024), file("over", 5 << 20));
    agent.publish(&batches("flood-good", 1, 1, 100, 50)).await;
    for i in 0..20 {
        harness::mosquitto_pub(&world, &format!("{}/client/flood-{i}", world.prefix), &["-f", &at_limit]);
    }
    for i in 0..3 {
        let out = std::process::Command::new("mosquitto_pub")
            .args(["-h", &world.stack.mqtt_host, "-p", &world.stack.mqtt_port.to_string()])
            .args(["-q", "1", "-t", &format!("{}/client/flood-over-{i}", world.prefix), "-f", &over])
            .output()
            .expect("run mosquitto_pub");
        eprintln!(
            "over the limit: mosquitto_pub exited {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    agent.publish(&batches("flood-good", 1, 101, 100, 50)).await;
    agent.flushed().await;
    let _ = std::fs::remove_dir_all(&dir);

    world.wait_stored(200, Duration::from_secs(60)).await;
    harness::wait_for_async("20 dead letters", Duration::from_secs(60), || async {
        world.count("SELECT count() FROM DB.ingest_errors").await == 20
    })
    .await;
    assert_eq!(
        world.count("SELECT count() FROM DB.ingest_errors WHERE client_id LIKE 'flood-over%'").await,
        0,
        "the broker refused the publishes over its limit"
    );
    assert_eq!(world.count("SELECT max(length(payload)) FROM DB.ingest_errors").await, 64 << 10, "64 KiB kept");
    agent.wait_acked("flood-good", &[range(1, 1, 200)], Duration::from_secs(20)).await;
    assert_eq!(server.metric("telemetry_ingest_mqtt_connection_errors_total").await, Some(0.0), "never disconnected");
    let peak = server.peak_rss_mib();
    eprintln!("ingest-server peak RSS: {base_rss} MiB before the flood, {peak} MiB after 20 x 4 MiB");
    assert!(peak < base_rss + 200, "memory bounded: peak {peak} MiB (from {base_rss} MiB)");
}
