//! One smoke test per service of `scripts/stack`: each answers a real client.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use test_support::{stack, unique_name, Service};

#[tokio::test]
async fn mosquitto_routes_a_qos1_message_back_to_its_subscriber() {
    let Some(stack) = stack(&[Service::Mqtt]) else { return };
    let topic = format!("{}/smoke", test_support::topic_prefix());
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new(unique_name("smoke"), &stack.mqtt_host, stack.mqtt_port), 8);
    client.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
    let received = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await.expect("broker reachable") {
                Event::Incoming(Packet::SubAck(_)) => {
                    client.publish(&topic, QoS::AtLeastOnce, false, b"ping".to_vec()).await.unwrap();
                }
                Event::Incoming(Packet::Publish(p)) => return p.payload,
                _ => {}
            }
        }
    })
    .await
    .expect("round trip within 10 s");
    assert_eq!(&received[..], b"ping");
}

#[tokio::test]
async fn postgres_answers_a_query() {
    let Some(stack) = stack(&[Service::Postgres]) else { return };
    let (client, conn) = tokio_postgres::connect(&stack.pg_url("postgres"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let row = client.query_one("SELECT 1::int4 + 1, current_setting('server_version_num')::int4", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    assert!(row.get::<_, i32>(1) >= 150_000, "PostgreSQL 15 or later");
}

#[tokio::test]
async fn clickhouse_answers_select_1_through_the_clickhouse_crate() {
    let Some(stack) = stack(&[Service::ClickHouse]) else { return };
    // Debian's ClickHouse 18.16 lacks the column metadata validation needs.
    let client = clickhouse::Client::default().with_url(&stack.ch_url).with_validation(false);
    let one: u8 = client.query("SELECT 1").fetch_one().await.unwrap();
    assert_eq!(one, 1);
}
