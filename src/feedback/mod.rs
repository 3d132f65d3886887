//! Quality feedback per workflow stage and tier, tier recommendations, and
//! template ratings.
//!
//! Agents score the output of a workflow stage run on a tier (0–1). The
//! scores of each `(workflow, stage, tier)` are kept for [`WINDOW`] — a
//! sorted set by time, pruned on every write and capped at
//! [`SAMPLES_PER_GROUP`], so every read is bounded — and indexes of which
//! stages of which workflows have recent feedback make `underperforming` a
//! read of those indexes, not a keyspace scan.
//!
//! Recommendations follow Attune's rules ([`recommend`]): with fewer than
//! [`MIN_SAMPLES`] scores keep the tier (confidence 0); an average below
//! [`LOW_QUALITY`] moves one tier up (premium stays premium, confidence
//! 1.0); an average above [`HIGH_QUALITY`] on capable or premium moves one
//! tier down only if the lower tier's own scores average above
//! [`LOWER_TIER_QUALITY`] (a lower tier with no scores cannot); otherwise
//! keep. Unless a
//! rule sets it, confidence is `min(samples / 20, 1)`.
//!
//! Templates collect `good`/`bad` ratings; their confidence is
//! `good / (good + bad)`, and 1.0 while unrated (as in Attune).

pub mod http;
pub mod memory;
mod redis;

use chrono::Duration as ChronoDuration;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::AppState;
use crate::auth::Identity;
use crate::engine::{Engine, EngineResult, dispatch};
use crate::error::{ApiError, ApiResult};
use crate::events::EventBody;
use crate::types::{Fraction, Id, JsonObject, rfc3339};
use crate::usage::Tier;

/// How long quality scores are kept.
pub const WINDOW: ChronoDuration = ChronoDuration::days(7);

/// Most scores kept per `(workflow, stage, tier)`; the oldest go first.
pub const SAMPLES_PER_GROUP: usize = 10_000;

/// Scores a tier needs before a recommendation moves it.
pub const MIN_SAMPLES: usize = 10;

/// Below this average a stage moves one tier up.
pub const LOW_QUALITY: f64 = 0.7;

/// Above this average a stage may move one tier down…
pub const HIGH_QUALITY: f64 = 0.9;

/// …if the lower tier's own average is above this.
pub const LOWER_TIER_QUALITY: f64 = 0.85;

/// One workflow stage on one tier: the unit scores are kept by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Group {
    pub workflow: Id,
    pub stage: Id,
    pub tier: Tier,
}

/// One stored score: `(time ms, "<uuid>|<score>")`, ordered like a Redis
/// sorted set (by time, then member).
pub type Sample = (i64, String);

fn sample_member(id: &str, score: f64) -> String {
    format!("{id}|{score}")
}

fn sample_score(member: &str) -> Option<f64> {
    member.rsplit_once('|').and_then(|(_, s)| s.parse().ok())
}

/// The body of `POST /v1/feedback` (unknown fields refused, as for usage).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackIn {
    pub workflow: Id,
    pub stage: Id,
    /// `cheap`, `capable` or `premium`, in any case.
    pub tier: Tier,
    /// 0.0–1.0.
    #[schema(value_type = f64, minimum = 0.0, maximum = 1.0)]
    pub quality_score: Fraction,
    /// Carried in the `feedback.recorded` event (at most 64 KiB, 32 levels deep).
    pub metadata: Option<JsonObject>,
    /// The agent giving the feedback; agent keys may only name agents in
    /// their scope, and keys limited to some agents must name one.
    pub agent_id: Option<Id>,
}

/// A recorded score.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FeedbackRecorded {
    /// Server-made UUIDv7.
    pub feedback_id: String,
    pub workflow: String,
    pub stage: String,
    pub tier: Tier,
    pub quality_score: f64,
    /// RFC 3339, UTC, milliseconds.
    pub recorded_at: String,
}

/// Everything one score adds to storage.
#[derive(Debug, Clone)]
pub struct FeedbackWrite {
    pub group: Group,
    pub ts_ms: i64,
    /// `<uuid>|<score>`.
    pub member: String,
    /// Scores older than this (ms) are dropped.
    pub cutoff_ms: i64,
    pub event: EventBody,
}

/// Quality statistics of a stage (one tier, or all of them).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct QualityStats {
    pub workflow: String,
    pub stage: String,
    /// Null when the statistics cover every tier.
    #[schema(required = true)]
    pub tier: Option<Tier>,
    /// Scores in the last 7 days.
    pub sample_count: u64,
    /// Null without scores.
    #[schema(required = true)]
    pub avg: Option<f64>,
    #[schema(required = true)]
    pub min: Option<f64>,
    #[schema(required = true)]
    pub max: Option<f64>,
    /// `(mean of the newer half − mean of the older half) / max(older mean,
    /// 0.1)`, by time; 0 with fewer than 4 scores.
    pub recent_trend: f64,
}

impl QualityStats {
    /// Statistics of `scores`, oldest first.
    pub fn of(workflow: &Id, stage: &Id, tier: Option<Tier>, scores: &[f64]) -> Self {
        let n = scores.len();
        let recent_trend = if n < 4 {
            0.0
        } else {
            let (older, newer) = scores.split_at(n / 2);
            let older_mean = exact_mean(older);
            to_12_places((exact_mean(newer) - older_mean) / older_mean.max(0.1))
        };
        let min = scores.iter().copied().reduce(f64::min);
        let max = scores.iter().copied().reduce(f64::max);
        Self {
            workflow: workflow.to_string(),
            stage: stage.to_string(),
            tier,
            sample_count: n as u64,
            // Rounding cannot carry the mean past a score: ten scores of
            // 0.6999999999996 average that, not 0.7.
            avg: min
                .zip(max)
                .map(|(min, max)| to_12_places(exact_mean(scores)).clamp(min, max)),
            min,
            max,
            recent_trend,
        }
    }

    fn avg_or_zero(&self) -> f64 {
        self.avg.unwrap_or(0.0)
    }
}

/// The mean of `scores`, from a compensated (Neumaier) sum. A plain sum
/// drifts by the last bits (ten scores of 0.9 add up to 9.000000000000002),
/// and even an exact sum of the binary scores is not the decimal one (six
/// of 0.57 and six of 0.83 average 0.6999999999999998): a mean exactly at a
/// rule's threshold would pass it or fall short of it. Scores are decimals
/// people send, so what is shown and compared is rounded to twelve decimal
/// places ([`to_12_places`]), which keeps every digit that means something
/// and drops the binary noise; the trend is computed from the unrounded
/// means and rounded once.
fn exact_mean(scores: &[f64]) -> f64 {
    let (mut sum, mut lost) = (0.0f64, 0.0f64);
    for &x in scores {
        let next = sum + x;
        lost += if sum.abs() >= x.abs() {
            (sum - next) + x
        } else {
            (x - next) + sum
        };
        sum = next;
    }
    (sum + lost) / scores.len() as f64
}

fn to_12_places(x: f64) -> f64 {
    (x * 1e12).round() / 1e12
}

/// A tier recommendation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Recommendation {
    pub current_tier: Tier,
    pub recommended_tier: Tier,
    /// 0–1.
    pub confidence: f64,
    /// Which rule decided, in words.
    pub reason: String,
    /// The current tier's statistics.
    pub stats: QualityStats,
}

/// Applies the recommendation rules to a tier's statistics and, for a
/// possible step down, the lower tier's.
pub fn recommend(
    current: Tier,
    stats: QualityStats,
    lower: Option<&QualityStats>,
) -> Recommendation {
    let n = stats.sample_count as usize;
    let avg = stats.avg_or_zero();
    let confidence = (n as f64 / (2 * MIN_SAMPLES) as f64).min(1.0);
    let (tier, confidence, reason) = if n < MIN_SAMPLES {
        (
            current,
            0.0,
            format!("insufficient data: {n} scores, {MIN_SAMPLES} needed"),
        )
    } else if avg < LOW_QUALITY {
        if current == Tier::Premium {
            (
                current,
                1.0,
                format!(
                    "average quality {} is below {LOW_QUALITY} but premium is the highest tier",
                    beside(avg, &[LOW_QUALITY])
                ),
            )
        } else {
            (
                current.up(),
                confidence,
                format!(
                    "average quality {} is below {LOW_QUALITY}: move one tier up",
                    beside(avg, &[LOW_QUALITY])
                ),
            )
        }
    } else if avg > HIGH_QUALITY && current != Tier::Cheap {
        let lower_tier = current
            .down()
            .expect("capable and premium have a lower tier");
        match lower.filter(|l| l.sample_count > 0) {
            Some(l) if l.avg_or_zero() > LOWER_TIER_QUALITY => (
                lower_tier,
                confidence,
                format!(
                    "average quality {} is above {HIGH_QUALITY} and {lower_tier} averages {} \
                     over {} scores: move one tier down",
                    beside(avg, &[HIGH_QUALITY]),
                    beside(l.avg_or_zero(), &[LOWER_TIER_QUALITY]),
                    l.sample_count
                ),
            ),
            Some(l) => (
                current,
                confidence,
                format!(
                    "average quality {} is above {HIGH_QUALITY} but {lower_tier} averages only \
                     {} (needs above {LOWER_TIER_QUALITY}): keep",
                    beside(avg, &[HIGH_QUALITY]),
                    beside(l.avg_or_zero(), &[LOWER_TIER_QUALITY])
                ),
            ),
            None => (
                current,
                confidence,
                format!(
                    "average quality {} is above {HIGH_QUALITY} but {lower_tier} has no \
                     scores of its own: keep",
                    beside(avg, &[HIGH_QUALITY])
                ),
            ),
        }
    } else {
        (
            current,
            confidence,
            format!(
                "average quality {} is acceptable: keep",
                beside(avg, &[LOW_QUALITY, HIGH_QUALITY])
            ),
        )
    };
    Recommendation {
        current_tier: current,
        recommended_tier: tier,
        confidence,
        reason,
        stats,
    }
}

/// A template's ratings.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct TemplateRating {
    pub template_id: String,
    pub good: u64,
    pub bad: u64,
    /// `good / (good + bad)`; 1.0 while unrated.
    pub confidence: f64,
}

impl TemplateRating {
    pub fn new(id: &Id, good: u64, bad: u64) -> Self {
        Self {
            template_id: id.to_string(),
            good,
            bad,
            confidence: confidence(good, bad),
        }
    }
}

/// `good / (good + bad)`, 1.0 while unrated. The Redis script computes
/// the same IEEE division, so both engines order templates identically.
pub fn confidence(good: u64, bad: u64) -> f64 {
    if good + bad == 0 {
        1.0
    } else {
        good as f64 / (good + bad) as f64
    }
}

/// A template rating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Rating {
    Good,
    Bad,
}

impl Rating {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Good => "good",
            Self::Bad => "bad",
        }
    }
}

/// How `GET /v1/templates` orders its page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ToSchema)]
pub enum TemplateOrder {
    /// By id (the default).
    #[default]
    #[serde(rename = "template_id")]
    TemplateId,
    /// Highest confidence first (ties: highest id first).
    #[serde(rename = "confidence")]
    Confidence,
    /// Lowest confidence first (ties: lowest id first).
    #[serde(rename = "-confidence")]
    ConfidenceAscending,
}

/// Where a templates page resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateCursor {
    /// After this id (`template_id` order).
    After(Id),
    /// After this many rows (confidence orders).
    Offset(usize),
}

impl TemplateCursor {
    pub fn encode(&self) -> String {
        use base64::Engine as _;
        let raw = match self {
            Self::After(id) => format!("id:{id}"),
            Self::Offset(n) => format!("offset:{n}"),
        };
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    pub fn decode(field: &str, raw: &str, order: TemplateOrder) -> ApiResult<Self> {
        use base64::Engine as _;
        let bad = || {
            ApiError::invalid(
                field,
                "is not a cursor returned by this endpoint for this order",
            )
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(raw)
            .map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        match (order, text.split_once(':')) {
            (TemplateOrder::TemplateId, Some(("id", id))) => {
                Ok(Self::After(Id::new(id).map_err(|_| bad())?))
            }
            (
                TemplateOrder::Confidence | TemplateOrder::ConfidenceAscending,
                Some(("offset", n)),
            ) => {
                // No cursor of ours is past u32::MAX rows; a larger one
                // would overflow the range arithmetic downstream.
                let n: u32 = n.parse().map_err(|_| bad())?;
                Ok(Self::Offset(n as usize))
            }
            _ => Err(bad()),
        }
    }
}

impl Engine {
    /// Stores a score, prunes its group and indexes, and emits the event.
    pub async fn record_feedback(&self, write: &FeedbackWrite) -> EngineResult<()> {
        dispatch!(self, record_feedback(write))
    }

    /// The scores of each group since `since_ms`, oldest first.
    pub async fn feedback_samples(
        &self,
        groups: &[Group],
        since_ms: i64,
    ) -> EngineResult<Vec<Vec<Sample>>> {
        dispatch!(self, feedback_samples(groups, since_ms))
    }

    /// The groups with scores since `since_ms`, of one workflow or all.
    pub async fn feedback_groups(
        &self,
        workflow: Option<&Id>,
        since_ms: i64,
    ) -> EngineResult<Vec<Group>> {
        dispatch!(self, feedback_groups(workflow, since_ms))
    }

    /// Adds a rating and returns the template's `(good, bad)`.
    pub async fn rate_template(
        &self,
        id: &Id,
        rating: Rating,
        event: EventBody,
    ) -> EngineResult<(u64, u64)> {
        dispatch!(self, rate_template(id, rating, event))
    }

    /// A template's `(good, bad)`; zeros if it was never rated.
    pub async fn template_counts(&self, id: &Id) -> EngineResult<(u64, u64)> {
        dispatch!(self, template_counts(id))
    }

    /// One page of rated templates as `(id, good, bad)`.
    pub async fn list_templates(
        &self,
        order: TemplateOrder,
        cursor: Option<TemplateCursor>,
        limit: usize,
    ) -> EngineResult<(Vec<(Id, u64, u64)>, Option<TemplateCursor>)> {
        dispatch!(self, list_templates(order, cursor, limit))
    }
}

/// Validates and stores one score.
pub async fn record_feedback(
    state: &AppState,
    caller: &Identity,
    req: FeedbackIn,
) -> ApiResult<FeedbackRecorded> {
    caller.ensure_may_write_for(req.agent_id.as_ref(), "agent_id")?;
    let now = state.clock.now();
    let id = uuid::Uuid::now_v7().to_string();
    let score = req.quality_score.get();
    let event = EventBody::new(
        "feedback.recorded",
        &caller.name,
        req.agent_id.as_ref(),
        now,
        serde_json::json!({
            "kind": "quality",
            "feedback_id": id,
            "workflow": req.workflow,
            "stage": req.stage,
            "tier": req.tier,
            "quality_score": score,
            "metadata": req.metadata,
        }),
    );
    let write = FeedbackWrite {
        member: sample_member(&id, score),
        group: Group {
            workflow: req.workflow.clone(),
            stage: req.stage.clone(),
            tier: req.tier,
        },
        ts_ms: now.timestamp_millis(),
        cutoff_ms: (now - WINDOW).timestamp_millis(),
        event,
    };
    state.engine.record_feedback(&write).await?;
    Ok(FeedbackRecorded {
        feedback_id: id,
        workflow: req.workflow.to_string(),
        stage: req.stage.to_string(),
        tier: req.tier,
        quality_score: score,
        recorded_at: rfc3339(now),
    })
}

fn window_start(state: &AppState) -> i64 {
    (state.clock.now() - WINDOW).timestamp_millis()
}

/// Scores of several groups merged in time order.
fn merged_scores(mut samples: Vec<Vec<Sample>>) -> Vec<f64> {
    let mut all: Vec<Sample> = samples.drain(..).flatten().collect();
    all.sort();
    all.iter().filter_map(|(_, m)| sample_score(m)).collect()
}

/// Statistics of one stage on one tier, or on every tier.
pub async fn quality_stats(
    state: &AppState,
    workflow: &Id,
    stage: &Id,
    tier: Option<Tier>,
) -> ApiResult<QualityStats> {
    let tiers = tier.map_or(Tier::ALL.to_vec(), |t| vec![t]);
    let groups: Vec<Group> = tiers
        .into_iter()
        .map(|tier| Group {
            workflow: workflow.clone(),
            stage: stage.clone(),
            tier,
        })
        .collect();
    let samples = state
        .engine
        .feedback_samples(&groups, window_start(state))
        .await?;
    Ok(QualityStats::of(
        workflow,
        stage,
        tier,
        &merged_scores(samples),
    ))
}

/// Recommends a tier for a stage now on `current`.
pub async fn recommendation(
    state: &AppState,
    workflow: &Id,
    stage: &Id,
    current: Tier,
) -> ApiResult<Recommendation> {
    let stats = quality_stats(state, workflow, stage, Some(current)).await?;
    let lower = match current.down() {
        Some(lower) if stats.avg.is_some_and(|a| a > HIGH_QUALITY) => {
            Some(quality_stats(state, workflow, stage, Some(lower)).await?)
        }
        _ => None,
    };
    Ok(recommend(current, stats, lower.as_ref()))
}

/// Where a page of underperforming stages resumes: after the row with this
/// place in their order (average, then workflow, stage and tier).
#[derive(Debug, Clone, PartialEq)]
pub struct StageCursor {
    avg: f64,
    workflow: String,
    stage: String,
    tier: Option<Tier>,
}

impl StageCursor {
    fn of(row: &QualityStats) -> Self {
        Self {
            avg: row.avg_or_zero(),
            workflow: row.workflow.clone(),
            stage: row.stage.clone(),
            tier: row.tier,
        }
    }

    /// Whether `row` comes after this place in the order.
    fn precedes(&self, row: &QualityStats) -> bool {
        stage_order(
            (self.avg, &self.workflow, &self.stage, self.tier),
            (row.avg_or_zero(), &row.workflow, &row.stage, row.tier),
        )
        .is_lt()
    }

    pub fn encode(&self) -> String {
        use base64::Engine as _;
        let tier = self.tier.map_or("", Tier::as_str);
        let raw = format!(
            "stage:{:016x}:{}:{}:{tier}",
            self.avg.to_bits(),
            self.workflow,
            self.stage
        );
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    pub fn decode(field: &str, raw: &str) -> ApiResult<Self> {
        use base64::Engine as _;
        let bad = || ApiError::invalid(field, "is not a cursor returned by this endpoint");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(raw)
            .map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let parts: Vec<&str> = text.split(':').collect();
        let ["stage", avg, workflow, stage, tier] = parts[..] else {
            return Err(bad());
        };
        let avg = u64::from_str_radix(avg, 16).map_err(|_| bad())?;
        let tier = match tier {
            "" => None,
            name => Some(Tier::parse(name).ok_or_else(bad)?),
        };
        Ok(Self {
            avg: f64::from_bits(avg),
            workflow: Id::new(workflow).map_err(|_| bad())?.to_string(),
            stage: Id::new(stage).map_err(|_| bad())?.to_string(),
            tier,
        })
    }
}

/// The order of underperforming stages: worst average first, then by
/// workflow, stage and tier.
fn stage_order(
    a: (f64, &String, &String, Option<Tier>),
    b: (f64, &String, &String, Option<Tier>),
) -> std::cmp::Ordering {
    a.0.total_cmp(&b.0)
        .then_with(|| (a.1, a.2, a.3).cmp(&(b.1, b.2, b.3)))
}

/// Stages (per tier) whose average is below `threshold` with at least
/// `min_samples` scores, worst first: up to `limit` after `cursor`, and
/// where the next page starts when more follow.
pub async fn underperforming(
    state: &AppState,
    workflow: Option<&Id>,
    threshold: f64,
    min_samples: usize,
    cursor: Option<&StageCursor>,
    limit: usize,
) -> ApiResult<(Vec<QualityStats>, Option<StageCursor>)> {
    let since = window_start(state);
    let groups = state.engine.feedback_groups(workflow, since).await?;
    let samples = state.engine.feedback_samples(&groups, since).await?;
    let mut rows: Vec<QualityStats> = groups
        .iter()
        .zip(samples)
        .map(|(g, s)| {
            QualityStats::of(&g.workflow, &g.stage, Some(g.tier), &merged_scores(vec![s]))
        })
        .filter(|s| s.sample_count as usize >= min_samples && s.avg_or_zero() < threshold)
        .filter(|s| cursor.is_none_or(|c| c.precedes(s)))
        .collect();
    rows.sort_by(|a, b| {
        stage_order(
            (a.avg_or_zero(), &a.workflow, &a.stage, a.tier),
            (b.avg_or_zero(), &b.workflow, &b.stage, b.tier),
        )
    });
    let next = (rows.len() > limit).then(|| StageCursor::of(&rows[limit - 1]));
    rows.truncate(limit);
    Ok((rows, next))
}

/// Adds a rating to a template, given by `agent` if named (a key limited
/// to some agents must name one of them, as for every feedback).
pub async fn rate_template(
    state: &AppState,
    caller: &Identity,
    id: &Id,
    rating: Rating,
    agent: Option<&Id>,
) -> ApiResult<TemplateRating> {
    caller.ensure_may_write_for(agent, "agent_id")?;
    let event = EventBody::new(
        "feedback.recorded",
        &caller.name,
        agent,
        state.clock.now(),
        serde_json::json!({ "kind": "template", "template_id": id, "rating": rating }),
    );
    let (good, bad) = state.engine.rate_template(id, rating, event).await?;
    Ok(TemplateRating::new(id, good, bad))
}

/// `value` with two decimals for a sentence that compares it with the
/// `thresholds`, or in full where two decimals would land on the other side
/// of one, or on it (0.6999999999996 is not "0.70 is below 0.7").
fn beside(value: f64, thresholds: &[f64]) -> String {
    let short = format!("{value:.2}");
    let rounded: f64 = short.parse().unwrap_or(value);
    if thresholds
        .iter()
        .all(|t| rounded.partial_cmp(t) == value.partial_cmp(t))
    {
        short
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(scores: &[f64]) -> QualityStats {
        let id = Id::new("x").unwrap();
        QualityStats::of(&id, &id, Some(Tier::Capable), scores)
    }

    /// The reason never says a number is below a threshold it rounds to.
    #[test]
    fn reasons_show_averages_that_agree_with_their_rule() {
        let below = recommend(Tier::Cheap, stats(&[0.6999999999996; 10]), None);
        assert_eq!(below.recommended_tier, Tier::Capable);
        assert!(
            below
                .reason
                .starts_with("average quality 0.6999999999996 is below 0.7"),
            "{}",
            below.reason
        );
        let plain = recommend(Tier::Cheap, stats(&[0.5; 10]), None);
        assert!(
            plain
                .reason
                .starts_with("average quality 0.50 is below 0.7"),
            "{}",
            plain.reason
        );
    }

    #[test]
    fn trend_compares_the_newer_half_with_the_older() {
        assert_eq!(stats(&[0.1, 0.9, 0.9]).recent_trend, 0.0);
        let s = stats(&[0.5, 0.5, 0.75, 0.75]);
        assert!((s.recent_trend - 0.5).abs() < 1e-12);
        // The older mean is floored at 0.1.
        let s = stats(&[0.0, 0.0, 0.2, 0.2]);
        assert!((s.recent_trend - 2.0).abs() < 1e-12);
        // An odd count puts the middle score in the newer half.
        let s = stats(&[0.4, 0.4, 0.6, 0.6, 0.6]);
        assert!((s.recent_trend - 0.5).abs() < 1e-12);
    }

    /// Ten scores of 0.9 average 0.9, which is not above 0.9 (a plain sum
    /// gave 0.9000000000000001 and recommended a step down).
    #[test]
    fn a_mean_at_a_threshold_is_the_threshold() {
        assert_eq!(stats(&[0.9; 10]).avg, Some(0.9));
        assert_eq!(stats(&[0.85; 10]).avg, Some(0.85));
        assert_eq!(stats(&[0.1; 10]).avg, Some(0.1));
        assert_eq!(stats(&[0.7; 7]).avg, Some(0.7));
        let r = recommend(Tier::Capable, stats(&[0.9; 10]), Some(&stats(&[0.86; 10])));
        assert_eq!(r.recommended_tier, Tier::Capable, "{}", r.reason);
        // Means whose decimal value is a threshold, though their binary
        // sums are not: each rule's "below" or "above" is strict.
        let mixed = |parts: &[(usize, f64)]| -> Vec<f64> {
            parts
                .iter()
                .flat_map(|&(n, x)| std::iter::repeat_n(x, n))
                .collect()
        };
        let at_07 = stats(&mixed(&[(6, 0.57), (6, 0.83)]));
        assert_eq!(at_07.avg, Some(0.7));
        assert_eq!(
            recommend(Tier::Cheap, at_07, None).recommended_tier,
            Tier::Cheap
        );
        let at_09 = stats(&mixed(&[(1, 0.54), (12, 0.93)]));
        assert_eq!(at_09.avg, Some(0.9));
        let lower_085 = stats(&mixed(&[(7, 0.81), (4, 0.92)]));
        assert_eq!(lower_085.avg, Some(0.85));
        let r = recommend(Tier::Capable, at_09, Some(&stats(&[0.95; 10])));
        assert_eq!(r.recommended_tier, Tier::Capable, "{}", r.reason);
        let r = recommend(Tier::Capable, stats(&[0.95; 10]), Some(&lower_085));
        assert_eq!(r.recommended_tier, Tier::Capable, "{}", r.reason);
    }

    /// Rounding drops binary noise, never a digit a client sent: a mean is
    /// never outside the scores it averages, and the trend is rounded once,
    /// from the unrounded means.
    #[test]
    fn rounding_keeps_the_mean_within_the_scores_and_the_trend_exact() {
        let just_below = stats(&[0.6999999999996; 10]);
        assert_eq!(just_below.avg, Some(0.6999999999996));
        let r = recommend(Tier::Cheap, just_below, None);
        assert_eq!(r.recommended_tier, Tier::Capable, "{}", r.reason);
        let just_above = stats(&[0.9000000000004; 10]);
        assert_eq!(just_above.avg, Some(0.9000000000004));
        let r = recommend(Tier::Capable, just_above, Some(&stats(&[0.95; 10])));
        assert_eq!(r.recommended_tier, Tier::Cheap, "{}", r.reason);
        assert_eq!(stats(&[0.1, 0.9, 0.3, 0.5]).recent_trend, -0.2);
        let rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 0.01];
        assert_eq!(stats(&rising).recent_trend, 1.222222222222);
    }

    #[test]
    fn samples_round_trip_their_scores() {
        let m = sample_member("0190-ab", 0.123456789);
        assert_eq!(sample_score(&m), Some(0.123456789));
        assert_eq!(sample_score("garbage"), None);
    }

    #[test]
    fn confidence_is_the_share_of_good_ratings() {
        assert_eq!(confidence(0, 0), 1.0);
        assert_eq!(confidence(3, 1), 0.75);
        assert_eq!(confidence(0, 2), 0.0);
    }

    #[test]
    fn template_cursors_belong_to_their_order() {
        let c = TemplateCursor::Offset(40);
        assert_eq!(
            TemplateCursor::decode("cursor", &c.encode(), TemplateOrder::Confidence).unwrap(),
            c
        );
        assert!(TemplateCursor::decode("cursor", &c.encode(), TemplateOrder::TemplateId).is_err());
        assert!(TemplateCursor::decode("cursor", "%%", TemplateOrder::TemplateId).is_err());
    }
}
