//! Shell-style globs over client ids: `*` (any run, also empty), `?` (one
//! character), `[abc]`, `[a-z]`, `[!a-z]` / `[^a-z]` (one character in or
//! not in the set; a `]` right after the opening bracket is literal). Client
//! ids are `[A-Za-z0-9_.-]`, so no escape is needed.

use std::fmt;

/// A compiled glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    text: String,
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Char(char),
    AnyOne,
    AnyRun,
    Class { negated: bool, ranges: Vec<(char, char)> },
}

/// Why a glob does not compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobError(String);

impl fmt::Display for GlobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GlobError {}

/// Whether `text` uses any glob syntax (`*`, `?` or `[`).
#[must_use]
pub fn is_glob(text: &str) -> bool {
    text.contains(['*', '?', '['])
}

impl Glob {
    /// Compiles `text`.
    ///
    /// # Errors
    /// An unclosed `[` class or an empty one.
    pub fn new(text: &str) -> Result<Self, GlobError> {
        let chars: Vec<char> = text.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '*' => tokens.push(Token::AnyRun),
                '?' => tokens.push(Token::AnyOne),
                '[' => {
                    let (token, next) = class(&chars, i + 1)
                        .ok_or_else(|| GlobError(format!("{text:?}: unclosed or empty [ ] in the glob")))?;
                    tokens.push(token);
                    i = next;
                    continue;
                }
                c => tokens.push(Token::Char(c)),
            }
            i += 1;
        }
        Ok(Self { text: text.to_owned(), tokens })
    }

    /// Whether the whole of `name` matches.
    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        // Greedy with one backtrack point: the most recent `*`.
        let (mut t, mut n) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while n < name.len() {
            match self.tokens.get(t) {
                Some(Token::AnyRun) => {
                    star = Some((t, n));
                    t += 1;
                }
                Some(token) if token.matches_one(name[n]) => {
                    t += 1;
                    n += 1;
                }
                _ => match star {
                    Some((st, sn)) => {
                        t = st + 1;
                        n = sn + 1;
                        star = Some((st, sn + 1));
                    }
                    None => return false,
                },
            }
        }
        self.tokens[t..].iter().all(|token| *token == Token::AnyRun)
    }

    /// The glob as written.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl Token {
    fn matches_one(&self, c: char) -> bool {
        match self {
            Token::Char(x) => *x == c,
            Token::AnyOne => true,
            Token::AnyRun => false,
            Token::Class { negated, ranges } => ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated,
        }
    }
}

/// The class starting after a `[` at `start`: the token and the index after its `]`.
fn class(chars: &[char], start: usize) -> Option<(Token, usize)> {
    let mut i = start;
    let negated = matches!(chars.get(i), Some('!' | '^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let first = i;
    loop {
        let c = *chars.get(i)?;
        if c == ']' && i > first {
            return Some((Token::Class { negated, ranges }, i + 1));
        }
        if chars.get(i + 1) == Some(&'-') && chars.get(i + 2).is_some_and(|&hi| hi != ']') {
            ranges.push((c, chars[i + 2]));
            i += 3;
        } else {
            ranges.push((c, c));
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(glob: &str, name: &str) -> bool {
        Glob::new(glob).unwrap().matches(name)
    }

    #[test]
    fn stars_and_question_marks() {
        assert!(m("edge-*", "edge-1"));
        assert!(m("edge-*", "edge-"));
        assert!(!m("edge-*", "edg-1"));
        assert!(m("*", ""));
        assert!(m("*-1", "a-b-1"));
        assert!(!m("*-1", "a-b-12"));
        assert!(m("a*b*c", "aXXbYYbZc"));
        assert!(!m("a*b*c", "aXXbYYcZ"));
        assert!(m("edge-?", "edge-7"));
        assert!(!m("edge-?", "edge-17"));
        assert!(m("**x", "abx"));
        assert!(m("plain", "plain"));
        assert!(!m("plain", "plain2"));
    }

    #[test]
    fn classes_ranges_and_negation() {
        assert!(m("edge-[12]", "edge-2"));
        assert!(!m("edge-[12]", "edge-3"));
        assert!(m("edge-[0-9][0-9]", "edge-42"));
        assert!(!m("edge-[0-9][0-9]", "edge-4a"));
        assert!(m("edge-[!0-9]", "edge-x"));
        assert!(!m("edge-[^0-9]", "edge-5"));
        assert!(m("x[]a]", "x]"), "a ] first in the class is literal");
        assert!(m("x[a-]", "x-"), "a - last in the class is literal");
        assert!(m("site-[a-c]*", "site-b.edge-3"));
    }

    #[test]
    fn unclosed_classes_are_errors() {
        assert!(Glob::new("edge-[12").is_err());
        assert!(Glob::new("edge-[]").is_err());
        assert!(Glob::new("edge-[!").is_err());
        assert_eq!(Glob::new("a*").unwrap().as_str(), "a*");
    }

    #[test]
    fn glob_syntax_is_recognised() {
        assert!(is_glob("a*") && is_glob("a?") && is_glob("a[1]"));
        assert!(!is_glob("edge-1.site_2"));
    }
}
