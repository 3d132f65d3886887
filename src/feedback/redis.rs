//! Feedback on Redis: a sorted set of scores per `(workflow, stage, tier)`,
//! two sorted-set indexes of what has recent feedback, and a hash plus two
//! sorted sets for template ratings.
//!
//! Each write is one script, so a score, the pruning of its group and
//! indexes, and its event land together; a rating and its re-scored place
//! in the confidence index likewise.

use std::sync::LazyLock;

use redis::Script;

use crate::engine::redis::{RedisEngine, args, script};
use crate::engine::{EngineError, EngineResult};
use crate::events::EventBody;
use crate::feedback::{
    FeedbackWrite, Group, Rating, SAMPLES_PER_GROUP, Sample, TemplateCursor, TemplateOrder, WINDOW,
};
use crate::types::Id;
use crate::usage::Tier;

/// KEYS: 2 samples, 3 the workflow's stage index, 4 the workflow index.
/// ARGV: 2 ts ms, 3 member, 4 cutoff ms, 5 cap, 6 ttl ms, 7 `<stage>:<tier>`,
/// 8 workflow, 9 event, 10 event agent or ''.
static RECORD: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local cutoff = '(' .. ARGV[4]
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[5]) + 1))
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[3], 'GT', ARGV[2], ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', cutoff)
redis.call('PEXPIRE', KEYS[3], ARGV[6])
redis.call('ZADD', KEYS[4], 'GT', ARGV[2], ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', cutoff)
emit('feedback.recorded', ARGV[10], '', ARGV[9])
return 1
"#,
    )
});

/// KEYS: 2 template hash, 3 by-confidence, 4 by-id.
/// ARGV: 2 template id, 3 `good` or `bad`, 4 event.
///
/// The confidence is written with 17 significant digits so that Redis
/// stores exactly the double the memory engine computes.
static RATE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
local c = redis.call('HMGET', KEYS[2], 'good', 'bad')
local good, bad = tonumber(c[1] or '0'), tonumber(c[2] or '0')
redis.call('ZADD', KEYS[3], string.format('%.17g', good / (good + bad)), ARGV[2])
redis.call('ZADD', KEYS[4], 0, ARGV[2])
emit('feedback.recorded', '', '', ARGV[4])
return {good, bad}
"#,
    )
});

fn corrupt(what: &str) -> EngineError {
    EngineError::Corrupt(format!("feedback index: {what}"))
}

impl RedisEngine {
    pub async fn record_feedback(&self, write: &FeedbackWrite) -> EngineResult<()> {
        let g = &write.group;
        let keys = [
            self.keys
                .feedback_samples(&g.workflow, &g.stage, g.tier.as_str()),
            self.keys.feedback_stages(&g.workflow),
            self.keys.feedback_workflows(),
        ];
        let _: i64 = self
            .invoke(
                &RECORD,
                &keys,
                &args![
                    write.ts_ms,
                    write.member,
                    write.cutoff_ms,
                    SAMPLES_PER_GROUP,
                    WINDOW.num_milliseconds(),
                    format!("{}:{}", g.stage, g.tier),
                    g.workflow,
                    write.event.json,
                    write.event.agent_id.as_deref().unwrap_or(""),
                ],
            )
            .await?;
        Ok(())
    }

    pub async fn feedback_samples(
        &self,
        groups: &[Group],
        since_ms: i64,
    ) -> EngineResult<Vec<Vec<Sample>>> {
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for g in groups {
            pipe.cmd("ZRANGEBYSCORE")
                .arg(
                    self.keys
                        .feedback_samples(&g.workflow, &g.stage, g.tier.as_str()),
                )
                .arg(since_ms)
                .arg("+inf")
                .arg("WITHSCORES");
        }
        let mut conn = self.conn();
        let replies: Vec<Vec<(String, f64)>> = self.run(pipe.query_async(&mut conn)).await?;
        Ok(replies
            .into_iter()
            .map(|entries| entries.into_iter().map(|(m, ts)| (ts as i64, m)).collect())
            .collect())
    }

    pub async fn feedback_groups(
        &self,
        workflow: Option<&Id>,
        since_ms: i64,
    ) -> EngineResult<Vec<Group>> {
        let mut conn = self.conn();
        let workflows: Vec<Id> = match workflow {
            Some(w) => vec![w.clone()],
            None => {
                let names: Vec<String> = self
                    .run(
                        redis::cmd("ZRANGEBYSCORE")
                            .arg(self.keys.feedback_workflows())
                            .arg(since_ms)
                            .arg("+inf")
                            .query_async(&mut conn),
                    )
                    .await?;
                names
                    .into_iter()
                    .map(|n| Id::new(n).map_err(|e| corrupt(&e)))
                    .collect::<EngineResult<_>>()?
            }
        };
        if workflows.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for w in &workflows {
            pipe.cmd("ZRANGEBYSCORE")
                .arg(self.keys.feedback_stages(w))
                .arg(since_ms)
                .arg("+inf");
        }
        let replies: Vec<Vec<String>> = self.run(pipe.query_async(&mut conn)).await?;
        let mut out = Vec::new();
        for (workflow, members) in workflows.into_iter().zip(replies) {
            for member in members {
                let (stage, tier) = member.rsplit_once(':').ok_or_else(|| corrupt(&member))?;
                out.push(Group {
                    workflow: workflow.clone(),
                    stage: Id::new(stage).map_err(|e| corrupt(&e))?,
                    tier: Tier::parse(tier).ok_or_else(|| corrupt(tier))?,
                });
            }
        }
        Ok(out)
    }

    pub async fn rate_template(
        &self,
        id: &Id,
        rating: Rating,
        event: EventBody,
    ) -> EngineResult<(u64, u64)> {
        let keys = [
            self.keys.template(id),
            self.keys.templates_by_confidence(),
            self.keys.templates_by_id(),
        ];
        self.invoke(&RATE, &keys, &args![id, rating.as_str(), event.json])
            .await
    }

    pub async fn template_counts(&self, id: &Id) -> EngineResult<(u64, u64)> {
        let mut conn = self.conn();
        let (good, bad): (Option<u64>, Option<u64>) = self
            .run(
                redis::cmd("HMGET")
                    .arg(self.keys.template(id))
                    .arg("good")
                    .arg("bad")
                    .query_async(&mut conn),
            )
            .await?;
        Ok((good.unwrap_or(0), bad.unwrap_or(0)))
    }

    pub async fn list_templates(
        &self,
        order: TemplateOrder,
        cursor: Option<TemplateCursor>,
        limit: usize,
    ) -> EngineResult<(Vec<(Id, u64, u64)>, Option<TemplateCursor>)> {
        let mut conn = self.conn();
        let (ids, next): (Vec<String>, Option<TemplateCursor>) = match order {
            TemplateOrder::TemplateId => {
                let start = match &cursor {
                    Some(TemplateCursor::After(id)) => format!("({id}"),
                    _ => "-".to_owned(),
                };
                let mut ids: Vec<String> = self
                    .run(
                        redis::cmd("ZRANGEBYLEX")
                            .arg(self.keys.templates_by_id())
                            .arg(start)
                            .arg("+")
                            .arg("LIMIT")
                            .arg(0)
                            .arg(limit + 1)
                            .query_async(&mut conn),
                    )
                    .await?;
                let more = ids.len() > limit;
                ids.truncate(limit);
                let next = match (more, ids.last()) {
                    (true, Some(last)) => Some(TemplateCursor::After(
                        Id::new(last.as_str()).map_err(|e| corrupt(&e))?,
                    )),
                    _ => None,
                };
                (ids, next)
            }
            TemplateOrder::Confidence | TemplateOrder::ConfidenceAscending => {
                let offset = match cursor {
                    Some(TemplateCursor::Offset(n)) => n,
                    _ => 0,
                };
                let command = if order == TemplateOrder::Confidence {
                    "ZREVRANGE"
                } else {
                    "ZRANGE"
                };
                let mut ids: Vec<String> = self
                    .run(
                        redis::cmd(command)
                            .arg(self.keys.templates_by_confidence())
                            .arg(offset)
                            .arg(offset + limit)
                            .query_async(&mut conn),
                    )
                    .await?;
                let more = ids.len() > limit;
                ids.truncate(limit);
                (
                    ids.clone(),
                    more.then_some(TemplateCursor::Offset(offset + ids.len())),
                )
            }
        };
        if ids.is_empty() {
            return Ok((Vec::new(), next));
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            let id = Id::new(id.as_str()).map_err(|e| corrupt(&e))?;
            pipe.cmd("HMGET")
                .arg(self.keys.template(&id))
                .arg("good")
                .arg("bad");
        }
        let counts: Vec<(Option<u64>, Option<u64>)> = self.run(pipe.query_async(&mut conn)).await?;
        let rows = ids
            .into_iter()
            .zip(counts)
            .map(|(id, (g, b))| {
                Ok((
                    Id::new(id).map_err(|e| corrupt(&e))?,
                    g.unwrap_or(0),
                    b.unwrap_or(0),
                ))
            })
            .collect::<EngineResult<_>>()?;
        Ok((rows, next))
    }
}
