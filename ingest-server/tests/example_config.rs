//! `deploy/ingest-server.example.toml` stays in step with the configuration:
//! it loads and validates, names every key (each key is a flag, so the flag
//! list is the key list), every value in it is the default, and the keys shown
//! commented out are valid when uncommented.

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::Args;
use ingest_server::config::{Config, Overrides};

fn example_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/ingest-server.example.toml")
}

/// Every configuration key, from the flags (one per key, named like it).
fn all_keys() -> BTreeSet<String> {
    Overrides::augment_args(clap::Command::new("ingest-server"))
        .get_arguments()
        .map(|a| a.get_id().as_str().to_owned())
        .filter(|id| id != "help" && id != "version")
        .collect()
}

fn key_of(line: &str) -> Option<String> {
    let (key, _) = line.split_once(" = ")?;
    key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_').then(|| key.to_owned())
}

/// Keys set in the file (`key = ...`) or shown commented out (`# key = ...`).
fn keys_in(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut set = BTreeSet::new();
    let mut commented = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            commented.extend(key_of(rest));
        } else {
            set.extend(key_of(line));
        }
    }
    (set, commented)
}

fn load(path: &std::path::Path) -> Config {
    let config = Config::from_file(path).expect("example config parses");
    config.validate().expect("example config validates");
    config
}

#[test]
fn the_example_config_loads_and_validates() {
    let config = load(&example_path());
    assert_eq!(config.clickhouse_database, "telemetry");
}

#[test]
fn the_example_config_names_every_key_with_its_default() {
    let text = std::fs::read_to_string(example_path()).expect("read example");
    let (set, commented) = keys_in(&text);
    let keys = all_keys();
    assert!(keys.len() > 20, "too few keys found: {keys:?}");
    let documented: BTreeSet<String> = set.union(&commented).cloned().collect();
    let missing: Vec<_> = keys.difference(&documented).collect();
    assert!(missing.is_empty(), "keys missing from the example: {missing:?}");
    let unknown: Vec<_> = documented.difference(&keys).collect();
    assert!(unknown.is_empty(), "example shows keys that do not exist: {unknown:?}");

    // Every value shown is the default, so the file documents the defaults.
    let loaded = load(&example_path());
    assert_eq!(format!("{loaded:?}"), format!("{:?}", Config::default()));
}

#[test]
fn the_commented_out_examples_are_valid_too() {
    let text = std::fs::read_to_string(example_path()).expect("read example");
    let uncommented: String = text
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if key_of(rest).is_some() => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let config = Config::from_toml(&uncommented).expect("uncommented example parses");
    config.validate().expect("uncommented example validates");
    assert_eq!(config.shared_group(), Some("ingest"));
}

#[test]
fn every_key_in_the_example_has_a_comment() {
    let text = std::fs::read_to_string(example_path()).expect("read example");
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if key_of(line).is_some() {
            assert!(i > 0 && lines[i - 1].starts_with('#'), "key without a comment above it: {line}");
        }
    }
}
