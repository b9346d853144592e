//! `--to`: which agents a command goes to. Entries are client ids or globs;
//! globs are resolved against the client ids discovered from the agents'
//! retained status messages.

use std::collections::BTreeSet;

use crate::glob::{is_glob, Glob};
use crate::UsageError;

/// One `--to` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A client id, used as given.
    Id(String),
    /// A glob over the discovered client ids.
    Glob(Glob),
}

/// The parsed `--to` entries, in the order given, duplicates kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets(Vec<Target>);

impl Targets {
    /// Parses `--to` values: each may hold several entries separated by
    /// commas (spaces around them are ignored, empty entries skipped).
    ///
    /// # Errors
    /// No entry at all, an id that is not a valid client id (1 to 64 of
    /// `A-Z a-z 0-9 _ . -`, so never `+`, `#` or `/`), or a bad glob.
    pub fn parse<S: AsRef<str>>(values: &[S]) -> Result<Self, UsageError> {
        let mut targets = Vec::new();
        for entry in values.iter().flat_map(|v| v.as_ref().split(',')).map(str::trim).filter(|e| !e.is_empty()) {
            if is_glob(entry) {
                let glob = Glob::new(entry).map_err(|e| UsageError(format!("--to {e}")))?;
                targets.push(Target::Glob(glob));
            } else {
                telemetry_wire::batch::validate_client_id(entry)
                    .map_err(|e| UsageError(format!("--to {entry:?} is not a client id: {}", detail(&e))))?;
                targets.push(Target::Id(entry.to_owned()));
            }
        }
        if targets.is_empty() {
            return Err(UsageError("--to names no client id".into()));
        }
        Ok(Self(targets))
    }

    /// Whether any entry is a glob (and so needs discovery).
    #[must_use]
    pub fn has_globs(&self) -> bool {
        self.0.iter().any(|t| matches!(t, Target::Glob(_)))
    }

    /// The client ids to command, sorted and without duplicates: every plain
    /// id, and every `discovered` id that a glob matches.
    ///
    /// # Errors
    /// A glob that matches no discovered client id (each such glob is named).
    pub fn resolve(&self, discovered: &BTreeSet<String>) -> Result<Vec<String>, UsageError> {
        let mut ids = BTreeSet::new();
        let mut unmatched = Vec::new();
        for target in &self.0 {
            match target {
                Target::Id(id) => {
                    ids.insert(id.clone());
                }
                Target::Glob(glob) => {
                    let mut any = false;
                    for id in discovered.iter().filter(|id| glob.matches(id)) {
                        any = true;
                        ids.insert(id.clone());
                    }
                    if !any {
                        unmatched.push(format!("{:?}", glob.as_str()));
                    }
                }
            }
        }
        if !unmatched.is_empty() {
            let seen = match discovered.len() {
                0 => "no agent status was found".to_owned(),
                1 => "1 agent status was found".to_owned(),
                n => format!("{n} agent statuses were found"),
            };
            return Err(UsageError(format!("--to {} matches no client id ({seen})", unmatched.join(", "))));
        }
        Ok(ids.into_iter().collect())
    }
}

/// The text of a client-id error without its decoder framing.
fn detail(error: &telemetry_wire::DecodeError) -> String {
    match error {
        telemetry_wire::DecodeError::InvalidHeader(why) => why.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discovered(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn entries_split_on_commas_and_repeat() {
        let t = Targets::parse(&["edge-1, edge-2", "edge-3,", "site-*"]).unwrap();
        assert_eq!(t.0.len(), 4);
        assert!(t.has_globs());
        let plain = Targets::parse(&["a,b"]).unwrap();
        assert!(!plain.has_globs());
        assert_eq!(plain.resolve(&BTreeSet::new()).unwrap(), ["a", "b"], "plain ids need no discovery");
    }

    #[test]
    fn bad_ids_and_empty_lists_are_usage_errors() {
        for bad in ["a/b", "edge+", "#", "a b", "x".repeat(65).as_str()] {
            let e = Targets::parse(&[bad]).unwrap_err().0;
            assert!(e.contains("is not a client id"), "{bad}: {e}");
        }
        assert!(Targets::parse(&[" , "]).unwrap_err().0.contains("no client id"));
        assert!(Targets::parse::<&str>(&[]).is_err());
        assert!(Targets::parse(&["edge-[1"]).unwrap_err().0.contains("unclosed"));
    }

    #[test]
    fn globs_resolve_against_discovered_ids_sorted_and_deduplicated() {
        let seen = discovered(&["edge-2", "edge-1", "edge-10", "other"]);
        let t = Targets::parse(&["edge-?", "edge-1", "zz-9"]).unwrap();
        assert_eq!(t.resolve(&seen).unwrap(), ["edge-1", "edge-2", "zz-9"]);
        let all = Targets::parse(&["edge-*"]).unwrap();
        assert_eq!(all.resolve(&seen).unwrap(), ["edge-1", "edge-10", "edge-2"]);
    }

    #[test]
    fn a_glob_matching_nothing_is_an_error_naming_it() {
        let seen = discovered(&["edge-1"]);
        let e = Targets::parse(&["edge-*,site-*", "x?"]).unwrap().resolve(&seen).unwrap_err().0;
        assert!(e.contains(r#""site-*", "x?""#) && !e.contains("edge-*"), "{e}");
        assert!(e.contains("1 agent status was found"), "{e}");
        let e = Targets::parse(&["*"]).unwrap().resolve(&BTreeSet::new()).unwrap_err().0;
        assert!(e.contains("no agent status was found"), "{e}");
    }
}
