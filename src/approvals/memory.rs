//! Approvals on the memory engine: records plus ordered indexes, like Redis.
//!
//! Every transition runs inside one [`MemoryEngine::write`] closure, which
//! checks the status, applies the change, moves index entries and appends
//! the event under one lock: the memory twin of the Redis scripts.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::time::Duration;

use uuid::Uuid;

use crate::approvals::{
    Approval, ApprovalResponse, ApprovalStatus, Created, NewApproval, Settled, Settlement,
};
use crate::engine::EngineResult;
use crate::engine::memory::{MemoryEngine, MemoryState};
use crate::events::EventBody;

/// A stored request and what the Redis engine keeps in its hash.
#[derive(Debug, Clone)]
struct Entry {
    approval: Approval,
    /// When the record disappears (its lifetime, then its retention).
    purge_ms: i64,
    /// Stored if the request times out.
    timeout_response: ApprovalResponse,
    expired_event: EventBody,
    /// The idempotency key that created it, which lives as long as it does.
    idempotency_key: Option<String>,
}

/// A remembered `Idempotency-Key`.
#[derive(Debug, Clone)]
struct Claim {
    fingerprint: String,
    request_id: Uuid,
    expires_ms: i64,
}

/// Approval requests and their indexes.
#[derive(Debug, Default)]
pub struct ApprovalTable {
    records: HashMap<Uuid, Entry>,
    /// `(expires_at ms, id)` of pending requests: the sweeper's queue.
    deadlines: BTreeSet<(i64, Uuid)>,
    /// Every retained request, oldest first (UUIDv7 order).
    all: BTreeSet<Uuid>,
    /// Retained requests per status, oldest first.
    by_status: HashMap<ApprovalStatus, BTreeSet<Uuid>>,
    /// `(purge ms, id)` of settled requests, for pruning.
    purge_due: BTreeSet<(i64, Uuid)>,
    /// Idempotency claims by hashed key.
    idempotency: HashMap<String, Claim>,
}

impl ApprovalTable {
    fn live(&self, id: Uuid, now_ms: i64) -> Option<&Entry> {
        self.records.get(&id).filter(|e| e.purge_ms > now_ms)
    }

    fn status_index(&mut self, status: ApprovalStatus) -> &mut BTreeSet<Uuid> {
        self.by_status.entry(status).or_default()
    }

    /// Moves a pending request to `status`; returns the settled record.
    /// The caller appends the event in the same critical section.
    fn settle(
        &mut self,
        id: Uuid,
        status: ApprovalStatus,
        response: ApprovalResponse,
        now_ms: i64,
        retention: Duration,
    ) -> Option<Approval> {
        let purge_ms = now_ms + retention.as_millis() as i64;
        let entry = self.records.get_mut(&id)?;
        let deadline = entry.approval.deadline_ms();
        entry.approval.request.status = status;
        entry.approval.response = Some(response);
        entry.purge_ms = purge_ms;
        let settled = entry.approval.clone();
        if let Some(key) = entry.idempotency_key.clone() {
            if let Some(claim) = self.idempotency.get_mut(&key) {
                claim.expires_ms = purge_ms;
            }
        }
        self.deadlines.remove(&(deadline, id));
        self.status_index(ApprovalStatus::Pending).remove(&id);
        self.status_index(status).insert(id);
        self.purge_due.insert((purge_ms, id));
        Some(settled)
    }

    /// Applies a request's prepared timeout; returns its event.
    fn expire(&mut self, id: Uuid, now_ms: i64, retention: Duration) -> Option<EventBody> {
        let entry = self.records.get(&id)?;
        let (response, event) = (entry.timeout_response.clone(), entry.expired_event.clone());
        self.settle(id, ApprovalStatus::Timeout, response, now_ms, retention)?;
        Some(event)
    }

    /// Forgets a request entirely.
    fn remove(&mut self, id: Uuid) {
        if let Some(entry) = self.records.remove(&id) {
            self.deadlines.remove(&(entry.approval.deadline_ms(), id));
            self.purge_due.remove(&(entry.purge_ms, id));
        }
        self.all.remove(&id);
        for index in self.by_status.values_mut() {
            index.remove(&id);
        }
    }
}

fn emit(state: &mut MemoryState, event: EventBody) {
    state.events.append(event);
}

impl MemoryEngine {
    pub async fn create_approval(&self, new: NewApproval) -> EngineResult<Created> {
        Ok(self.write(|s| {
            let now_ms = new.approval.request.created_at.timestamp_millis();
            let purge_ms = now_ms + new.lifetime.as_millis() as i64;
            let id = new.approval.id();
            let table = &mut s.approvals;
            if let Some(claim) = &new.idempotency {
                let previous = table
                    .idempotency
                    .get(&claim.key)
                    .filter(|c| c.expires_ms > now_ms);
                if let Some(previous) = previous {
                    if previous.fingerprint != claim.fingerprint {
                        return Created::KeyReused;
                    }
                    if let Some(entry) = table.live(previous.request_id, now_ms) {
                        return Created::Existing(entry.approval.clone());
                    }
                }
                table.idempotency.insert(
                    claim.key.clone(),
                    Claim {
                        fingerprint: claim.fingerprint.clone(),
                        request_id: id,
                        expires_ms: purge_ms,
                    },
                );
            }
            table.records.insert(
                id,
                Entry {
                    approval: new.approval.clone(),
                    purge_ms,
                    timeout_response: new.timeout_response,
                    expired_event: new.expired_event,
                    idempotency_key: new.idempotency.map(|c| c.key),
                },
            );
            table.deadlines.insert((new.approval.deadline_ms(), id));
            table.all.insert(id);
            table.status_index(ApprovalStatus::Pending).insert(id);
            emit(s, new.requested_event);
            Created::New(new.approval)
        }))
    }

    pub async fn get_approval(&self, id: Uuid) -> EngineResult<Option<Approval>> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        Ok(self
            .lock()
            .approvals
            .live(id, now_ms)
            .map(|e| e.approval.clone()))
    }

    pub async fn settle_approval(&self, settlement: Settlement) -> EngineResult<Settled> {
        Ok(self.write(|s| {
            let Settlement {
                request_id: id,
                status,
                response,
                event,
                now_ms,
                retention,
            } = settlement;
            let table = &mut s.approvals;
            let Some(entry) = table.live(id, now_ms) else {
                return Settled::Missing;
            };
            if !entry.approval.is_pending() {
                return Settled::Lost(entry.approval.clone());
            }
            if now_ms >= entry.approval.deadline_ms() {
                // The deadline passed before this decision arrived: the
                // timeout wins, whether or not a sweeper got to it yet.
                let Some(expired) = table.expire(id, now_ms, retention) else {
                    return Settled::Missing;
                };
                let current = table.records[&id].approval.clone();
                emit(s, expired);
                return Settled::Lost(current);
            }
            match table.settle(id, status, response, now_ms, retention) {
                Some(settled) => {
                    emit(s, event);
                    Settled::Won(settled)
                }
                None => Settled::Missing,
            }
        }))
    }

    pub async fn approval_page(
        &self,
        status: Option<ApprovalStatus>,
        after: Option<Uuid>,
        count: usize,
    ) -> EngineResult<Vec<(Uuid, Option<Approval>)>> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let state = self.lock();
        let table = &state.approvals;
        let empty = BTreeSet::new();
        let index = match status {
            None => &table.all,
            Some(status) => table.by_status.get(&status).unwrap_or(&empty),
        };
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(index
            .range((start, Bound::Unbounded))
            .take(count)
            .map(|id| (*id, table.live(*id, now_ms).map(|e| e.approval.clone())))
            .collect())
    }

    pub async fn sweep_expired_approvals(
        &self,
        now_ms: i64,
        limit: usize,
        retention: Duration,
    ) -> EngineResult<usize> {
        Ok(self.write(|s| {
            let due: Vec<(i64, Uuid)> = s
                .approvals
                .deadlines
                .iter()
                .take_while(|(deadline, _)| *deadline <= now_ms)
                .take(limit)
                .copied()
                .collect();
            for item in &due {
                let id = item.1;
                // Removing the deadline entry is the claim.
                if !s.approvals.deadlines.remove(item) {
                    continue;
                }
                let pending = s
                    .approvals
                    .live(id, now_ms)
                    .is_some_and(|e| e.approval.is_pending());
                if !pending {
                    s.approvals.remove(id);
                    continue;
                }
                if let Some(event) = s.approvals.expire(id, now_ms, retention) {
                    emit(s, event);
                }
            }
            due.len()
        }))
    }

    pub async fn prune_approvals(&self, now_ms: i64) -> EngineResult<()> {
        self.write(|s| {
            let table = &mut s.approvals;
            let old: Vec<Uuid> = table
                .purge_due
                .iter()
                .take_while(|(purge, _)| *purge <= now_ms)
                .map(|(_, id)| *id)
                .collect();
            for id in old {
                table.remove(id);
            }
            table
                .idempotency
                .retain(|_, claim| claim.expires_ms > now_ms);
        });
        Ok(())
    }

    pub async fn pending_approval_count(&self) -> EngineResult<u64> {
        let state = self.lock();
        Ok(state
            .approvals
            .by_status
            .get(&ApprovalStatus::Pending)
            .map_or(0, |index| index.len() as u64))
    }
}
