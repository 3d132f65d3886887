//! Every Redis key the service uses, built in one place.
//!
//! All keys start with `{prefix}:` — the braces are a Redis Cluster hash
//! tag. Several operations touch many keys atomically in one Lua script
//! (an agent's record, its indexes and the event log, for instance), and a
//! script may only touch keys of one slot; tagging the whole keyspace with
//! the prefix keeps every script legal on Cluster. The cost is that one
//! deployment lives in one slot; run several deployments (prefixes) to
//! spread load across a cluster.
//!
//! Client-supplied parts of keys are always [`Id`]s, which cannot contain
//! `:`, `*`, `{`, `}` or whitespace, so no key can collide or glob.

use chrono::NaiveDate;

use crate::types::Id;

/// Builds keys for one deployment prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    /// `{prefix}`, with the hash-tag braces.
    tag: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            tag: format!("{{{prefix}}}"),
        }
    }

    fn key(&self, rest: &str) -> String {
        self.key_of(&[rest])
    }

    /// `{prefix}:` followed by `parts`, in one allocation (agent keys are
    /// built on every heartbeat).
    fn key_of(&self, parts: &[&str]) -> String {
        let len = self.tag.len() + 1 + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut key = String::with_capacity(len);
        key.push_str(&self.tag);
        key.push(':');
        for part in parts {
            key.push_str(part);
        }
        key
    }

    /// Every key of this deployment matches this pattern (tests, cleanup).
    pub fn pattern(&self) -> String {
        format!("{}:*", self.tag.replace('{', "\\{").replace('}', "\\}"))
    }

    // ---- operations -----------------------------------------------------

    /// The event log: one Redis Stream, trimmed to `--stream-max-len`.
    pub fn events(&self) -> String {
        self.key("events")
    }

    /// Stream of the wake-up keys of the log's events, under the same ids:
    /// the log's name plus `:wakes`, which is how the scripts' `emit`
    /// derives it from the log's key.
    pub fn event_wakes(&self) -> String {
        format!("{}:wakes", self.events())
    }

    /// Hash `version → applied-at` of applied keyspace migrations.
    pub fn migrations(&self) -> String {
        self.key("migrations")
    }

    /// List with one entry per migration application (audit trail; lets
    /// tests prove each migration ran exactly once).
    pub fn migrations_log(&self) -> String {
        self.key("migrations:log")
    }

    /// Short-lived lock held while migrations are applied.
    pub fn migrations_lock(&self) -> String {
        self.key("migrations:lock")
    }

    /// The secret used to HMAC `user_id`s, created by a migration and shared
    /// by all replicas so that the same user hashes the same everywhere.
    pub fn user_hmac_secret(&self) -> String {
        self.key("secret:user-hmac")
    }

    // ---- agents -----------------------------------------------------------

    /// Hash holding one agent's record; expires after the retention period.
    pub fn agent(&self, id: &Id) -> String {
        self.key_of(&["agent:", id.as_str()])
    }

    /// Sorted set of non-terminal agents (up, late or down), scored by last
    /// beat (ms): the index behind `stale`.
    pub fn agents_active(&self) -> String {
        self.key("agents:active")
    }

    /// Sorted set of non-terminal agents that are not down yet, scored by the
    /// moment they stop being alive (`last_beat + ttl`, ms): `up` is above
    /// now, `late` at or below.
    pub fn agents_late_due(&self) -> String {
        self.key("agents:late-due")
    }

    /// Sorted set of non-terminal agents that are not down yet, scored by the
    /// moment they go down (`last_beat + ttl + grace`, ms): the sweeper's queue.
    pub fn agents_down_due(&self) -> String {
        self.key("agents:down-due")
    }

    /// Sorted set of agents that went down, scored by last beat (ms).
    pub fn agents_down(&self) -> String {
        self.key("agents:down")
    }

    /// Sorted set of agents with a terminal status, scored by last beat (ms).
    pub fn agents_finished(&self) -> String {
        self.key("agents:finished")
    }

    /// Hash `run key → run JSON` of agent runs (for `performance`); a run
    /// key is `{agent}/{start ms}`, with `/2`, `/3`, … for further runs
    /// started in the same millisecond.
    pub fn runs(&self) -> String {
        self.key("runs")
    }

    /// Sorted set of run keys scored by start time (ms).
    pub fn runs_by_start(&self) -> String {
        self.key("runs:by-start")
    }

    // ---- signals ----------------------------------------------------------

    /// Prefix of the per-signal keys; the signal scripts complete it with a
    /// server-made UUIDv7:
    /// - `…signal:<id>` — hash of one signal: `type`, `source`, `target`
    ///   (empty for a broadcast), `created` and `expires` (ms), and `json`
    ///   (the signal as served). `PEXPIREAT` its expiry.
    /// - `…signal:<id>:consumed` — set of the agent ids that consumed this
    ///   broadcast. `PEXPIREAT` the broadcast's expiry, so the markers go
    ///   exactly when the broadcast does.
    pub fn signal_prefix(&self) -> String {
        self.key("signal:")
    }

    /// Sorted set of the live signals targeted at one agent, scored by
    /// creation (ms); expires with the last of them.
    pub fn inbox(&self, agent: &Id) -> String {
        self.key(&format!("inbox:{agent}"))
    }

    /// What a consuming read with an `Idempotency-Key` took from `agent`'s
    /// inbox: a string, the read's query and a newline, then the signals'
    /// JSON as a JSON array of strings. Expires after
    /// [`crate::signals::RECEIPT_TTL`]. The client's key goes in as its
    /// SHA-256, so key names hold only what the service made.
    pub fn signal_receipt(&self, agent: &Id, key: &str) -> String {
        let digest = crate::types::sha256_hex(key);
        self.key(&format!("receipt:{agent}:{digest}"))
    }

    /// Where `agent`'s walk over the broadcasts starts, for reads and
    /// clears with these `type` and `source` filters: a string of lines
    /// `<score> <id>`, the first a broadcast up to which (in index order)
    /// every broadcast is settled for the agent and the filters — consumed
    /// by it, expired, or not matching — but those on the lines after it:
    /// up to a hundred it matched and has not consumed, oldest first.
    /// Inbox reads and clears go over those, then start after the first
    /// line, and move it forward; it expires a day (the longest a signal
    /// lives) after its last move, when every broadcast it covers has
    /// expired too. Without it (a new agent or filter) a walk starts at the
    /// first broadcast, which is only slower. Versions before the listed
    /// lines kept a start alone, under `seen:`, and go on using that: they
    /// would take this value's start and skip its list. Ids hold no
    /// `:`, so `settled:<agent>:<type>:<source>` (empty for no filter) names
    /// one agent and pair of filters.
    pub fn broadcasts_seen(
        &self,
        agent: &Id,
        signal_type: Option<&Id>,
        source: Option<&Id>,
    ) -> String {
        match (signal_type, source) {
            (None, None) => self.key(&format!("settled:{agent}")),
            _ => self.key(&format!(
                "settled:{agent}:{}:{}",
                signal_type.map_or("", Id::as_str),
                source.map_or("", Id::as_str)
            )),
        }
    }

    /// Prefix of [`Keys::inbox`] keys, completed with a target agent id by
    /// the scripts that drop expired signals from every inbox.
    pub fn inbox_prefix(&self) -> String {
        self.key("inbox:")
    }

    /// Sorted set of the live broadcasts, scored by creation (ms); expires
    /// with the last of them.
    pub fn signals_broadcast(&self) -> String {
        self.key("signals:broadcast")
    }

    /// Sorted set of every live signal, scored by creation (ms): the index
    /// behind `GET /v1/signals`. Expires with the last of them.
    pub fn signals_all(&self) -> String {
        self.key("signals:all")
    }

    /// Sorted set of every live signal, scored by expiry (ms), whose members
    /// say where the signal is indexed: `<id>` for a broadcast,
    /// `<id>/<target>` for a targeted signal. Signal operations drop what is
    /// due from every index. Expires with the last of them.
    pub fn signals_expiry(&self) -> String {
        self.key("signals:expiry")
    }

    // ---- approvals --------------------------------------------------------

    /// Hash holding one approval request and its response. Pending requests
    /// expire after their timeout plus the retention (a backstop: a sweeper
    /// settles them long before); settled ones `--approval-retention-seconds`
    /// after settling.
    pub fn approval(&self, id: &uuid::Uuid) -> String {
        self.key(&format!("approval:{id}"))
    }

    /// Sorted set of pending requests scored by `expires_at` (ms): the
    /// sweepers' queue. Removing a member is the claim to time it out.
    pub fn approvals_deadlines(&self) -> String {
        self.key("approvals:deadlines")
    }

    /// Sorted set of every retained request, all with score 0, so ordered by
    /// request id (UUIDv7: creation order) for `ZRANGEBYLEX` paging.
    pub fn approvals_all(&self) -> String {
        self.key("approvals:all")
    }

    /// Like [`Keys::approvals_all`], for the requests in one status
    /// (`pending`, `approved`, `rejected`, `timeout`, `cancelled`).
    pub fn approvals_by_status(&self, status: &str) -> String {
        self.key(&format!("approvals:status:{status}"))
    }

    /// Sorted set of settled requests scored by the end of their retention
    /// (ms), for pruning the indexes.
    pub fn approvals_purge_due(&self) -> String {
        self.key("approvals:purge-due")
    }

    /// String `<body fingerprint> <request id>` remembering one
    /// `Idempotency-Key`; `digest` is a server-made hex hash of the caller's
    /// key name and the header, never the header itself. Lives as long as
    /// the request it created.
    pub fn approval_idempotency(&self, digest: &str) -> String {
        self.key(&format!("approvals:idem:{digest}"))
    }

    // ---- usage ------------------------------------------------------------

    /// Hash of one UTC day's usage aggregates (`calls`, `cost`,
    /// `tier:cheap:cost`, `wf:<workflow>:calls`, …; money in integer
    /// nano-dollars), incremented at write time so summaries read one hash
    /// per day instead of every record. Expires `retention` after the day.
    pub fn usage_day(&self, day: NaiveDate) -> String {
        self.key(&format!("usage:day:{}", day.format("%Y-%m-%d")))
    }

    /// Sorted set of one UTC day's newest usage records (JSON), scored by
    /// their time (ms) and capped, for `recent`. Expires with the day hash.
    pub fn usage_recent(&self, day: NaiveDate) -> String {
        self.key(&format!("usage:recent:{}", day.format("%Y-%m-%d")))
    }

    /// Marker that a client-chosen usage record id was counted; `SET NX`
    /// in the same script as the aggregates, expiring after the retention.
    /// `claim` is a server-made hex hash of the caller's key name and the
    /// id (`usage::claim_of`), never the id itself.
    pub fn usage_seen(&self, claim: &str) -> String {
        self.key(&format!("usage:seen:{claim}"))
    }

    // ---- feedback ---------------------------------------------------------

    /// Sorted set of quality scores of one workflow stage on one tier,
    /// scored by time (ms), members `<uuid>|<score>`; pruned to 7 days and capped.
    pub fn feedback_samples(&self, workflow: &Id, stage: &Id, tier: &str) -> String {
        self.key(&format!("feedback:samples:{workflow}:{stage}:{tier}"))
    }

    /// Sorted set of `<stage>:<tier>` pairs of one workflow that have
    /// feedback, scored by their latest sample (ms): the index behind
    /// `underperforming`.
    pub fn feedback_stages(&self, workflow: &Id) -> String {
        self.key(&format!("feedback:stages:{workflow}"))
    }

    /// Sorted set of workflows with feedback, scored by their latest sample (ms).
    pub fn feedback_workflows(&self) -> String {
        self.key("feedback:workflows")
    }

    /// Hash `good`, `bad` of one template's ratings.
    pub fn template(&self, id: &Id) -> String {
        self.key(&format!("template:{id}"))
    }

    /// Sorted set of rated templates scored by confidence.
    pub fn templates_by_confidence(&self) -> String {
        self.key("templates:by-confidence")
    }

    /// Sorted set of rated templates, all scored 0, for listing by id (`ZRANGEBYLEX`).
    pub fn templates_by_id(&self) -> String {
        self.key("templates:by-id")
    }

    /// Prefix for other domains' keys, which build theirs with [`Keys::sub`].
    pub fn sub(&self, rest: &str) -> String {
        self.key(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_carries_the_hash_tag() {
        let keys = Keys::new("attune");
        let id = Id::new("agent-1").unwrap();
        for key in [keys.events(), keys.agent(&id), keys.agents_down_due()] {
            assert!(key.starts_with("{attune}:"), "{key}");
        }
        assert_eq!(keys.pattern(), "\\{attune\\}:*");
    }
}
