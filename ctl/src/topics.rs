//! The topics of the command protocol under one prefix (the agents'
//! `topic_prefix`, default `/telemetry`).

use crate::UsageError;

/// Topic names under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// The topics under `prefix`.
    ///
    /// # Errors
    /// A prefix with `+` or `#`, or one ending in `/` (the agents refuse
    /// those too).
    pub fn new(prefix: &str) -> Result<Self, UsageError> {
        if prefix.contains(['+', '#']) || prefix.ends_with('/') {
            return Err(UsageError(format!("--topic-prefix {prefix:?}: no wildcards and no trailing slash")));
        }
        Ok(Self { prefix: prefix.to_owned() })
    }

    /// `<prefix>/cmd/<client_id>`: where a command to `client_id` goes.
    #[must_use]
    pub fn command(&self, client_id: &str) -> String {
        format!("{}/cmd/{client_id}", self.prefix)
    }

    /// `<prefix>/cmd-reply/+`: every agent's replies.
    #[must_use]
    pub fn reply_filter(&self) -> String {
        format!("{}/cmd-reply/+", self.prefix)
    }

    /// `<prefix>/status/+`: every agent's retained status.
    #[must_use]
    pub fn status_filter(&self) -> String {
        format!("{}/status/+", self.prefix)
    }

    /// The client id of a reply topic, `None` for any other topic.
    #[must_use]
    pub fn reply_client<'a>(&self, topic: &'a str) -> Option<&'a str> {
        self.level_after(topic, "/cmd-reply/")
    }

    /// The client id of a status topic, `None` for any other topic.
    #[must_use]
    pub fn status_client<'a>(&self, topic: &'a str) -> Option<&'a str> {
        self.level_after(topic, "/status/")
    }

    fn level_after<'a>(&self, topic: &'a str, middle: &str) -> Option<&'a str> {
        let last = topic.strip_prefix(self.prefix.as_str())?.strip_prefix(middle)?;
        (!last.is_empty() && !last.contains('/')).then_some(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_formed_like_the_agents_and_parsed_back() {
        let t = Topics::new("/telemetry").unwrap();
        assert_eq!(t.command("edge-1"), "/telemetry/cmd/edge-1");
        assert_eq!(t.reply_filter(), "/telemetry/cmd-reply/+");
        assert_eq!(t.status_filter(), "/telemetry/status/+");
        assert_eq!(t.reply_client("/telemetry/cmd-reply/edge-1"), Some("edge-1"));
        assert_eq!(t.reply_client("/telemetry/cmd-reply/a/b"), None);
        assert_eq!(t.reply_client("/telemetry/cmd-reply/"), None);
        assert_eq!(t.reply_client("/other/cmd-reply/edge-1"), None);
        assert_eq!(t.status_client("/telemetry/status/edge-2"), Some("edge-2"));
        assert_eq!(t.status_client("/telemetry/cmd-reply/edge-2"), None);
    }

    #[test]
    fn wildcard_or_slash_ended_prefixes_are_refused() {
        for bad in ["/telemetry/", "/t/+", "#"] {
            assert!(Topics::new(bad).is_err(), "{bad}");
        }
        assert!(Topics::new("site-a/telemetry").is_ok());
    }
}
