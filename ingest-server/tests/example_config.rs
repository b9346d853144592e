//! `deploy/ingest-server.example.toml` stays in step with the configuration:
//! it loads and validates, names every key (each key is a flag, so the flag
//! list is the key list), every key has a comment, every value in it is the
//! default, and the keys shown commented out are valid when uncommented
//! (checks shared with the agent's: `test_support::example_config`).

use std::path::PathBuf;

use clap::Args;
use ingest_server::config::{Config, Overrides};
use test_support::example_config::{keys_of, Example};

fn example_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/ingest-server.example.toml")
}

fn load() -> Config {
    Config::load(Some(&example_path()), Overrides::default()).expect("example config loads")
}

#[test]
fn the_example_config_loads_and_validates() {
    assert_eq!(load().clickhouse_database, "telemetry");
}

#[test]
fn the_example_config_names_every_key_with_its_default() {
    let keys = keys_of(&Overrides::augment_args(clap::Command::new("ingest-server")));
    Example::read(&example_path()).assert_names_exactly(&keys);
    // Every value shown is the default, so the file documents the defaults.
    assert_eq!(format!("{:?}", load()), format!("{:?}", Config::default()));
}

#[test]
fn the_commented_out_examples_are_valid_too() {
    let uncommented = Example::read(&example_path()).uncommented();
    let config = Config::from_toml(&uncommented).expect("uncommented example parses");
    config.validate().expect("uncommented example validates");
    assert_eq!(config.shared_group(), Some("ingest"));
}

#[test]
fn every_key_in_the_example_has_a_comment() {
    Example::read(&example_path()).assert_every_key_has_a_comment();
}
