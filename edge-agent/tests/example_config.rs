//! `deploy/edge-agent.example.toml` stays in step with the configuration:
//! it loads and validates, names every key (each key is a flag, so the flag
//! list is the key list), every key has a comment, and every value in it is
//! the default (checks shared with the ingest server's: `test_support::example_config`).

use std::path::PathBuf;

use clap::Args;
use edge_agent::config::{Config, Overrides};
use test_support::example_config::{keys_of, Example};

fn example_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/edge-agent.example.toml")
}

fn load() -> Config {
    Config::load(Some(&example_path()), Overrides::default()).expect("example config loads")
}

#[test]
fn the_example_config_loads_and_validates() {
    assert_eq!(load().client_id, "edge-1");
}

#[test]
fn the_example_config_names_every_key_with_its_default() {
    let keys = keys_of(&Overrides::augment_args(clap::Command::new("edge-agent")));
    Example::read(&example_path()).assert_names_exactly(&keys);
    // Every value shown is the default, so the file documents the defaults.
    assert_eq!(format!("{:?}", load()), format!("{:?}", Config::default()));
}

#[test]
fn every_key_in_the_example_has_a_comment() {
    Example::read(&example_path()).assert_every_key_has_a_comment();
}
