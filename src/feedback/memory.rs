//! Feedback on the memory engine: the same sorted sets and indexes as
//! Redis, pruned on write and filtered by time on read.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::engine::EngineResult;
use crate::engine::memory::MemoryEngine;
use crate::events::EventBody;
use crate::feedback::{
    FeedbackWrite, Group, Rating, SAMPLES_PER_GROUP, Sample, TemplateCursor, TemplateOrder,
    confidence,
};
use crate::types::Id;
use crate::usage::Tier;

/// Quality scores, their indexes, and template ratings.
#[derive(Debug, Default)]
pub struct FeedbackTable {
    samples: HashMap<Group, BTreeSet<Sample>>,
    /// Workflow → `(stage, tier)` → latest score time (ms).
    stages: HashMap<Id, HashMap<(Id, Tier), i64>>,
    /// Template → `(good, bad)`.
    templates: BTreeMap<Id, (u64, u64)>,
}

impl MemoryEngine {
    pub async fn record_feedback(&self, write: &FeedbackWrite) -> EngineResult<()> {
        self.write(|s| {
            let table = &mut s.feedback;
            let cutoff = write.cutoff_ms;
            let samples = table.samples.entry(write.group.clone()).or_default();
            samples.insert((write.ts_ms, write.member.clone()));
            *samples = samples.split_off(&(cutoff, String::new()));
            while samples.len() > SAMPLES_PER_GROUP {
                samples.pop_first();
            }
            let g = &write.group;
            let stages = table.stages.entry(g.workflow.clone()).or_default();
            let last = stages
                .entry((g.stage.clone(), g.tier))
                .or_insert(write.ts_ms);
            *last = (*last).max(write.ts_ms);
            stages.retain(|_, ts| *ts >= cutoff);
            // Groups nobody scored for the whole window go, as their keys
            // expire on Redis.
            table
                .samples
                .retain(|_, set| set.last().is_some_and(|(ts, _)| *ts >= cutoff));
            table.stages.retain(|_, stages| !stages.is_empty());
            s.events.append(write.event.clone());
        });
        Ok(())
    }

    pub async fn feedback_samples(
        &self,
        groups: &[Group],
        since_ms: i64,
    ) -> EngineResult<Vec<Vec<Sample>>> {
        let state = self.lock();
        Ok(groups
            .iter()
            .map(|g| {
                state
                    .feedback
                    .samples
                    .get(g)
                    .map(|set| set.range((since_ms, String::new())..).cloned().collect())
                    .unwrap_or_default()
            })
            .collect())
    }

    pub async fn feedback_groups(
        &self,
        workflow: Option<&Id>,
        since_ms: i64,
    ) -> EngineResult<Vec<Group>> {
        let state = self.lock();
        let mut out = Vec::new();
        for (wf, stages) in &state.feedback.stages {
            if workflow.is_some_and(|w| w != wf) {
                continue;
            }
            for ((stage, tier), last) in stages {
                if *last >= since_ms {
                    out.push(Group {
                        workflow: wf.clone(),
                        stage: stage.clone(),
                        tier: *tier,
                    });
                }
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
        Ok(self.write(|s| {
            let counts = s.feedback.templates.entry(id.clone()).or_default();
            match rating {
                Rating::Good => counts.0 += 1,
                Rating::Bad => counts.1 += 1,
            }
            let counts = *counts;
            s.events.append(event);
            counts
        }))
    }

    pub async fn template_counts(&self, id: &Id) -> EngineResult<(u64, u64)> {
        Ok(self
            .lock()
            .feedback
            .templates
            .get(id)
            .copied()
            .unwrap_or_default())
    }

    pub async fn list_templates(
        &self,
        order: TemplateOrder,
        cursor: Option<TemplateCursor>,
        limit: usize,
    ) -> EngineResult<(Vec<(Id, u64, u64)>, Option<TemplateCursor>)> {
        let state = self.lock();
        let all = state
            .feedback
            .templates
            .iter()
            .map(|(id, (g, b))| (id.clone(), *g, *b));
        match order {
            TemplateOrder::TemplateId => {
                let after = match cursor {
                    Some(TemplateCursor::After(id)) => Some(id),
                    _ => None,
                };
                let mut page: Vec<(Id, u64, u64)> = all
                    .filter(|(id, _, _)| after.as_ref().is_none_or(|a| id > a))
                    .take(limit + 1)
                    .collect();
                let more = page.len() > limit;
                page.truncate(limit);
                let next = more
                    .then(|| {
                        page.last()
                            .map(|(id, _, _)| TemplateCursor::After(id.clone()))
                    })
                    .flatten();
                Ok((page, next))
            }
            TemplateOrder::Confidence | TemplateOrder::ConfidenceAscending => {
                let mut rows: Vec<(Id, u64, u64)> = all.collect();
                // Sorted-set order: by score, ties by member; reversed for `confidence`.
                rows.sort_by(|a, b| {
                    confidence(a.1, a.2)
                        .total_cmp(&confidence(b.1, b.2))
                        .then_with(|| a.0.cmp(&b.0))
                });
                if order == TemplateOrder::Confidence {
                    rows.reverse();
                }
                let offset = match cursor {
                    Some(TemplateCursor::Offset(n)) => n,
                    _ => 0,
                };
                let page: Vec<(Id, u64, u64)> =
                    rows.iter().skip(offset).take(limit).cloned().collect();
                let next = (offset + page.len() < rows.len())
                    .then_some(TemplateCursor::Offset(offset + page.len()));
                Ok((page, next))
            }
        }
    }
}
