//! Collecting the replies to one command: which targets answered, and what.

use std::collections::BTreeMap;

use serde_json::Value;
use telemetry_wire::{CommandError, ErrorKind, Reply};

/// What one agent answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The command was carried out; its result (`null` when the agent sent none).
    Ok(Value),
    /// The agent refused or failed it.
    Error(CommandError),
    /// Nothing arrived before the timeout.
    NoReply,
}

/// One target's line in the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The agent.
    pub client_id: String,
    /// Its answer.
    pub answer: Answer,
}

impl Outcome {
    /// Whether the command was carried out.
    #[must_use]
    pub fn is_ok(&self) -> bool {
        matches!(self.answer, Answer::Ok(_))
    }
}

/// The replies to command `id` from a fixed set of agents.
#[derive(Debug)]
pub struct Collector {
    id: String,
    answers: BTreeMap<String, Option<Answer>>,
}

impl Collector {
    /// Waits for replies to command `id` from each of `targets`.
    #[must_use]
    pub fn new(id: &str, targets: &[String]) -> Self {
        Self { id: id.to_owned(), answers: targets.iter().map(|t| (t.clone(), None)).collect() }
    }

    /// Takes `reply`, which arrived on the reply topic of `client_id` (the
    /// topic names the agent: under the broker's ACL only that agent may
    /// write it). Returns whether it was the first answer of a target to
    /// this command; replies to other commands, from other agents and
    /// repeats (a redelivered command is answered again) are ignored.
    pub fn offer(&mut self, client_id: &str, reply: Reply) -> bool {
        if reply.id.as_deref() != Some(self.id.as_str()) {
            return false;
        }
        let Some(slot @ None) = self.answers.get_mut(client_id) else { return false };
        *slot = Some(if reply.ok {
            Answer::Ok(reply.result.unwrap_or(Value::Null))
        } else {
            Answer::Error(
                reply
                    .error
                    .unwrap_or_else(|| CommandError::new(ErrorKind::Failed, "the agent sent ok=false and no error")),
            )
        });
        true
    }

    /// Targets still without an answer.
    #[must_use]
    pub fn missing(&self) -> usize {
        self.answers.values().filter(|a| a.is_none()).count()
    }

    /// Whether every target answered.
    #[must_use]
    pub fn done(&self) -> bool {
        self.missing() == 0
    }

    /// One outcome per target, sorted by client id.
    #[must_use]
    pub fn outcomes(self) -> Vec<Outcome> {
        self.answers
            .into_iter()
            .map(|(client_id, answer)| Outcome { client_id, answer: answer.unwrap_or(Answer::NoReply) })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(id: Option<&str>, client: &str, ok: bool) -> Reply {
        Reply {
            id: id.map(str::to_owned),
            client_id: client.into(),
            name: Some("flush".into()),
            ts_ms: 1,
            ok,
            result: ok.then(|| serde_json::json!({"client": client})),
            error: (!ok).then(|| CommandError::new(ErrorKind::BadArguments, "no")),
        }
    }

    #[test]
    fn only_first_replies_to_this_command_from_targets_count() {
        let targets = ["b".to_owned(), "a".to_owned(), "c".to_owned()];
        let mut c = Collector::new("ctl-1", &targets);
        assert_eq!(c.missing(), 3);
        assert!(!c.offer("a", reply(Some("ctl-0"), "a", false)), "another command's reply");
        assert!(!c.offer("a", reply(None, "a", false)), "a reply without an id");
        assert!(!c.offer("x", reply(Some("ctl-1"), "x", true)), "not a target");
        assert!(c.offer("a", reply(Some("ctl-1"), "a", true)));
        assert!(!c.offer("a", reply(Some("ctl-1"), "a", false)), "a repeat does not replace the first answer");
        assert!(c.offer("b", reply(Some("ctl-1"), "b", false)));
        assert!(!c.done());
        let outcomes = c.outcomes();
        let ids: Vec<&str> = outcomes.iter().map(|o| o.client_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"], "sorted by client id");
        assert_eq!(outcomes[0].answer, Answer::Ok(serde_json::json!({"client": "a"})));
        assert!(matches!(&outcomes[1].answer, Answer::Error(e) if e.kind == ErrorKind::BadArguments));
        assert_eq!(outcomes[2].answer, Answer::NoReply);
        assert!(outcomes[0].is_ok() && !outcomes[1].is_ok() && !outcomes[2].is_ok());
    }

    #[test]
    fn the_topic_names_the_agent_not_the_payload() {
        let mut c = Collector::new("ctl-1", &["a".to_owned()]);
        assert!(c.offer("a", reply(Some("ctl-1"), "someone-else", true)));
        assert!(c.done());
    }

    #[test]
    fn odd_replies_still_give_an_answer() {
        let mut c = Collector::new("i", &["a".to_owned(), "b".to_owned()]);
        let mut bare_ok = reply(Some("i"), "a", true);
        bare_ok.result = None;
        let mut bare_err = reply(Some("i"), "b", false);
        bare_err.error = None;
        assert!(c.offer("a", bare_ok) && c.offer("b", bare_err));
        let outcomes = c.outcomes();
        assert_eq!(outcomes[0].answer, Answer::Ok(Value::Null));
        assert!(matches!(&outcomes[1].answer, Answer::Error(e) if e.kind == ErrorKind::Failed));
    }
}
