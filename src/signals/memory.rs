//! Signals on the memory engine: the Redis layout, in ordered sets.
//!
//! Every operation first prunes the expiry queue, and so does the signals
//! sweeper every sweep interval, so expired signals leave every index (and
//! free their memory) soon after they expire; reads also check expiry
//! themselves, so nothing expired is ever returned.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::agents::IndexCursor;
use crate::engine::EngineResult;
use crate::engine::memory::MemoryEngine;
use crate::events::EventBody;
use crate::signals::{
    InboxAnswer, InboxQuery, LIST_SCAN_BUDGET, RECEIPT_TTL, Signal, SignalFilter, SignalRecord,
    live_only,
};
use crate::types::Id;

/// A stored signal.
#[derive(Debug)]
struct Entry {
    record: SignalRecord,
    /// Agents that consumed this broadcast (empty for targeted signals);
    /// dropped with the signal when it expires.
    consumed_by: HashSet<Id>,
}

/// `(created ms, signal id)`: the order of every index, oldest first.
type Position = (i64, String);

/// Signals and their indexes.
#[derive(Debug, Default)]
pub struct SignalTable {
    signals: HashMap<String, Entry>,
    /// Every live signal.
    all: BTreeSet<Position>,
    /// Live broadcasts.
    broadcasts: BTreeSet<Position>,
    /// Live targeted signals per target agent.
    inboxes: HashMap<Id, BTreeSet<Position>>,
    /// `(expires ms, signal id)` of every live signal.
    expiry: BTreeSet<(i64, String)>,
    /// What consuming reads with an `Idempotency-Key` took, by agent and key.
    receipts: HashMap<(Id, String), Receipt>,
    /// `(expires ms, agent, key)` of every receipt.
    receipt_expiry: BTreeSet<(i64, Id, String)>,
}

/// The answer a consuming read kept for its retries.
#[derive(Debug)]
struct Receipt {
    fingerprint: String,
    signals: Vec<Signal>,
}

impl SignalTable {
    /// Drops every signal and receipt whose expiry has passed.
    fn prune(&mut self, now_ms: i64) {
        self.prune_some(now_ms, usize::MAX);
    }

    /// Drops up to `limit` signals and receipts whose expiry has passed;
    /// returns how many.
    fn prune_some(&mut self, now_ms: i64, limit: usize) -> usize {
        let mut dropped = 0;
        while dropped < limit {
            match self.expiry.first() {
                Some((expires, _)) if *expires <= now_ms => {}
                _ => break,
            }
            let (_, id) = self.expiry.pop_first().expect("checked above");
            self.remove(&id);
            dropped += 1;
        }
        while dropped < limit {
            match self.receipt_expiry.first() {
                Some((expires, ..)) if *expires <= now_ms => {}
                _ => break,
            }
            let (_, agent, key) = self.receipt_expiry.pop_first().expect("checked above");
            self.receipts.remove(&(agent, key));
            dropped += 1;
        }
        dropped
    }

    /// Removes one signal from storage and every index.
    fn remove(&mut self, id: &str) {
        let Some(entry) = self.signals.remove(id) else {
            return;
        };
        let r = &entry.record;
        let position = (r.created_ms, r.signal_id.clone());
        self.all.remove(&position);
        self.expiry.remove(&(r.expires_ms, r.signal_id.clone()));
        match &r.target_agent {
            None => {
                self.broadcasts.remove(&position);
            }
            Some(target) => {
                if let Some(inbox) = self.inboxes.get_mut(target) {
                    inbox.remove(&position);
                    if inbox.is_empty() {
                        self.inboxes.remove(target);
                    }
                }
            }
        }
    }

    /// `agent`'s inbox, oldest first, as `(created ms, id)`: its targeted
    /// signals merged with the broadcasts it has not consumed.
    fn inbox_entries(&self, agent: &Id) -> Vec<(i64, String)> {
        let mut targeted = self.inboxes.get(agent).into_iter().flatten().peekable();
        let mut broadcasts = self
            .broadcasts
            .iter()
            .filter(|(_, id)| {
                self.signals
                    .get(id)
                    .is_some_and(|e| !e.consumed_by.contains(agent))
            })
            .peekable();
        let merged = std::iter::from_fn(|| match (targeted.peek(), broadcasts.peek()) {
            (Some(t), Some(b)) if t <= b => targeted.next(),
            (Some(_), Some(_)) => broadcasts.next(),
            (Some(_), None) => targeted.next(),
            (None, _) => broadcasts.next(),
        });
        merged.cloned().collect()
    }
}

fn matches(record: &SignalRecord, signal_type: Option<&Id>, source: Option<&Id>) -> bool {
    signal_type.is_none_or(|t| *t == record.signal_type)
        && source.is_none_or(|s| *s == record.source_agent)
}

impl MemoryEngine {
    /// Frees up to `limit` expired signals and receipts (the sweeper's
    /// work: otherwise they would wait for the next signal operation);
    /// returns how many.
    pub fn prune_signals(&self, now_ms: i64, limit: usize) -> usize {
        self.write(|s| s.signals.prune_some(now_ms, limit))
    }

    /// Signals held, expired ones not yet freed included.
    pub fn stored_signals(&self) -> usize {
        self.lock().signals.signals.len()
    }

    pub async fn send_signal(&self, record: SignalRecord, event: EventBody) -> EngineResult<()> {
        self.write(|s| {
            let now_ms = record.created_ms;
            let t = &mut s.signals;
            t.prune(now_ms);
            let position = (record.created_ms, record.signal_id.clone());
            t.all.insert(position.clone());
            t.expiry
                .insert((record.expires_ms, record.signal_id.clone()));
            match &record.target_agent {
                None => {
                    t.broadcasts.insert(position);
                }
                Some(target) => {
                    t.inboxes
                        .entry(target.clone())
                        .or_default()
                        .insert(position);
                }
            }
            t.signals.insert(
                record.signal_id.clone(),
                Entry {
                    record,
                    consumed_by: HashSet::new(),
                },
            );
            s.events.append(event);
        });
        Ok(())
    }

    pub async fn read_inbox(
        &self,
        agent: &Id,
        query: &InboxQuery,
        now_ms: i64,
    ) -> EngineResult<InboxAnswer> {
        // One critical section: two consumers never both receive the same
        // targeted signal, and an agent never receives a broadcast twice.
        Ok(self.write(|s| {
            let t = &mut s.signals;
            t.prune(now_ms);
            let receipt = query.receipt().map(|key| (agent.clone(), key.to_owned()));
            if let Some(kept) = receipt.as_ref().and_then(|r| t.receipts.get(r)) {
                return if kept.fingerprint == query.fingerprint() {
                    InboxAnswer::Signals(live_only(kept.signals.clone(), now_ms))
                } else {
                    InboxAnswer::KeyReused
                };
            }
            let after = query.after.as_ref().map(|c| (c.score, c.member.as_str()));
            let picked: Vec<String> = t
                .inbox_entries(agent)
                .into_iter()
                .filter(|(score, id)| after.is_none_or(|a| (*score, id.as_str()) > a))
                .map(|(_, id)| id)
                .filter(|id| {
                    t.signals.get(id).is_some_and(|e| {
                        e.record.is_live(now_ms)
                            && matches(&e.record, query.signal_type.as_ref(), query.source.as_ref())
                    })
                })
                .take(query.limit)
                .collect();
            let mut out = Vec::with_capacity(picked.len());
            for id in picked {
                let Some(entry) = t.signals.get_mut(&id) else {
                    continue;
                };
                out.push(entry.record.view());
                if query.consume {
                    if entry.record.target_agent.is_some() {
                        t.remove(&id);
                    } else {
                        entry.consumed_by.insert(agent.clone());
                    }
                }
            }
            if let Some((agent, key)) = receipt.filter(|_| !out.is_empty()) {
                let expires = now_ms.saturating_add(RECEIPT_TTL.as_millis() as i64);
                t.receipt_expiry
                    .insert((expires, agent.clone(), key.clone()));
                let kept = Receipt {
                    fingerprint: query.fingerprint(),
                    signals: out.clone(),
                };
                t.receipts.insert((agent, key), kept);
            }
            InboxAnswer::Signals(out)
        }))
    }

    pub async fn list_signals(
        &self,
        filter: &SignalFilter,
        now_ms: i64,
        cursor: Option<IndexCursor>,
        limit: usize,
    ) -> EngineResult<(Vec<Signal>, Option<IndexCursor>)> {
        Ok(self.write(|s| {
            let t = &mut s.signals;
            t.prune(now_ms);
            let empty = BTreeSet::new();
            let index = match &filter.target {
                Some(target) => t.inboxes.get(target).unwrap_or(&empty),
                None => &t.all,
            };
            let start = match &cursor {
                Some(c) => std::ops::Bound::Excluded((c.score, c.member.clone())),
                None => std::ops::Bound::Unbounded,
            };
            let mut out = Vec::new();
            let mut last = None;
            let mut next = None;
            for (examined, (created, id)) in
                index.range((start, std::ops::Bound::Unbounded)).enumerate()
            {
                if examined == LIST_SCAN_BUDGET {
                    // A long run that matches little: a short page that
                    // goes on after the last entry examined.
                    next =
                        index
                            .range(..(*created, id.clone()))
                            .next_back()
                            .map(|(score, member)| IndexCursor {
                                score: *score,
                                member: member.clone(),
                            });
                    break;
                }
                let Some(entry) = t.signals.get(id) else {
                    continue;
                };
                let r = &entry.record;
                let target = r.target_agent.as_ref().map(Id::as_str);
                if !r.is_live(now_ms)
                    || !filter.matches(r.signal_type.as_str(), r.source_agent.as_str(), target)
                {
                    continue;
                }
                if out.len() == limit {
                    // Another match follows: the page ends at the last one taken.
                    next = last.take();
                    break;
                }
                out.push(r.view());
                last = Some(IndexCursor {
                    score: *created,
                    member: id.clone(),
                });
            }
            (out, next)
        }))
    }

    pub async fn clear_inbox(
        &self,
        agent: &Id,
        signal_type: Option<&Id>,
        now_ms: i64,
        event: EventBody,
    ) -> EngineResult<u64> {
        Ok(self.write(|s| {
            let t = &mut s.signals;
            t.prune(now_ms);
            let mut cleared = 0;
            for (_, id) in t.inbox_entries(agent) {
                let Some(entry) = t.signals.get_mut(&id) else {
                    continue;
                };
                if !matches(&entry.record, signal_type, None) {
                    continue;
                }
                cleared += 1;
                if entry.record.target_agent.is_some() {
                    t.remove(&id);
                } else {
                    entry.consumed_by.insert(agent.clone());
                }
            }
            if cleared > 0 {
                s.events.append(event);
            }
            cleared
        }))
    }
}
