//! Checks that a daemon's example configuration file (`deploy/*.example.toml`)
//! stays in step with its configuration: it names every key (each key is a
//! flag, so the flag list is the key list) and no other, every key has a
//! comment above it, and the keys shown commented out (`# key = value`) are
//! valid when uncommented. Both daemons' tests use it, with their own
//! `Config` for loading.

use std::collections::BTreeSet;
use std::path::Path;

/// An example configuration file's text.
#[derive(Debug, Clone)]
pub struct Example {
    /// The whole file.
    pub text: String,
}

/// The key a line `key = value` sets, if it is one.
fn key_of(line: &str) -> Option<String> {
    let (key, _) = line.split_once(" = ")?;
    key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_').then(|| key.to_owned())
}

/// Every configuration key of a daemon, from its clap overrides (one flag
/// per key, named like it).
#[must_use]
pub fn keys_of(command: &clap::Command) -> BTreeSet<String> {
    command
        .get_arguments()
        .map(|a| a.get_id().as_str().to_owned())
        .filter(|id| id != "help" && id != "version")
        .collect()
}

impl Example {
    /// Reads the file.
    ///
    /// # Panics
    /// When it cannot be read.
    #[must_use]
    pub fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Self { text }
    }

    /// Keys set in the file (`key = ...`) and keys shown commented out (`# key = ...`).
    #[must_use]
    pub fn keys(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut set = BTreeSet::new();
        let mut commented = BTreeSet::new();
        for line in self.text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                commented.extend(key_of(rest));
            } else {
                set.extend(key_of(line));
            }
        }
        (set, commented)
    }

    /// The file with every commented-out key line uncommented.
    #[must_use]
    pub fn uncommented(&self) -> String {
        self.text
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if key_of(rest).is_some() => rest,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Asserts that the file shows (set or commented out) exactly `keys`.
    ///
    /// # Panics
    /// When a key is missing or unknown, or `keys` looks too short to be real.
    pub fn assert_names_exactly(&self, keys: &BTreeSet<String>) {
        assert!(keys.len() > 20, "too few keys found: {keys:?}");
        let (set, commented) = self.keys();
        let documented: BTreeSet<String> = set.union(&commented).cloned().collect();
        let missing: Vec<_> = keys.difference(&documented).collect();
        assert!(missing.is_empty(), "keys missing from the example: {missing:?}");
        let unknown: Vec<_> = documented.difference(keys).collect();
        assert!(unknown.is_empty(), "example shows keys that do not exist: {unknown:?}");
    }

    /// Asserts that every key line (set, not commented out) has a comment above it.
    ///
    /// # Panics
    /// At the first key without one.
    pub fn assert_every_key_has_a_comment(&self) {
        let lines: Vec<&str> = self.text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if key_of(line).is_some() {
                assert!(i > 0 && lines[i - 1].starts_with('#'), "key without a comment above it: {line}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Example;

    const TEXT: &str = "# The port.\nport = 1\n# name = \"x\"\nbad line\n";

    #[test]
    fn set_and_commented_keys_are_told_apart() {
        let example = Example { text: TEXT.to_owned() };
        let (set, commented) = example.keys();
        assert_eq!(set.into_iter().collect::<Vec<_>>(), ["port"]);
        assert_eq!(commented.into_iter().collect::<Vec<_>>(), ["name"]);
        assert_eq!(example.uncommented(), "# The port.\nport = 1\nname = \"x\"\nbad line");
        example.assert_every_key_has_a_comment();
    }

    #[test]
    #[should_panic(expected = "key without a comment above it: port = 1")]
    fn a_key_without_a_comment_is_found() {
        Example { text: "port = 1\n".to_owned() }.assert_every_key_has_a_comment();
    }
}
