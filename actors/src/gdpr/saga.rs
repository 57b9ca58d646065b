//! The GdprCoordinator: one persisted saga per deletion request.
//!
//! A saga is a list of steps ([`DeletionStep::plan`]) kept in the store with its state after
//! every step (`save_saga` is a compare-and-set, so two coordinators never both advance one).
//! Every step is idempotent, so a crash anywhere is recovered by running the unfinished step
//! again: at start the coordinator resumes every saga still running. A failed step is retried
//! with capped backoff until it succeeds; the verification sweep sends the saga back to the
//! erasure steps when any store still holds something of the person.
//!
//! The saga must find the person in every store after a restart, so it keeps their identifiers
//! sealed with the store's data key, and drops them in its last step.
//!
//! With several replicas, one runs a saga at a time: it holds a lease in the saga's state,
//! renewed by every save. Every replica's refresh looks at running sagas; a lease whose holder
//! has no recent membership heartbeat (it died or left), or that has expired, is taken over, so
//! a dead replica's saga is resumed elsewhere.

use super::destinations::ErasureDestinations;
use super::{erase_ack_key, Erasures, ERASE_ACKS, SUPPRESSED};
use crate::identity::IdentityIndex;
use crate::profile::CONSENT_HISTORY;
use crate::reverse_etl::{FAILED, FIELDS, SENT};
use crate::segments::engine::{EXITS, MEMBERS, SCHEDULES};
use cohort_adapters::crypto::Envelope;
use cohort_adapters::warehouse::raw_mentioning;
use cohort_adapters::{all_documents, EventBus, Layer, OperationalStore, QueryValue, StoreErrorKind, Warehouse};
use cohort_messages::cluster::{RoutedChange, RoutedKind};
use cohort_messages::msgs::{DeletionRequest, GdprMsg, ProfilesMsg, WarehouseMsg};
use cohort_messages::{
    DeletionState, DeletionStep, ErasureTarget, NewAuditEntry, ProfileId, SagaLease, SagaRecord, SagaStatus, StepState,
    StepStatus, DELETION_SAGA,
};
use cohort_supervisors::{Metrics, Slot};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// Document collections that hold per-profile state, keyed by something containing the id.
const PROFILE_DOCUMENTS: &[&str] = &[CONSENT_HISTORY, MEMBERS, EXITS, SCHEDULES, SENT, FAILED, FIELDS];

#[derive(Debug, Clone)]
pub struct GdprSettings {
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// A step still running after this long counts as failed (and is tried again).
    pub step_timeout: Duration,
    /// How often suppressions and erasures written by other replicas are picked up.
    pub refresh_interval: Duration,
    /// How long a saga stays this replica's after a save (longer than `step_timeout`).
    pub lease: Duration,
    /// A lease holder without a membership heartbeat this recent is dead: its saga is taken
    /// over at once instead of when the lease expires.
    pub member_ttl: Duration,
}

pub struct GdprArgs {
    pub store: Arc<dyn OperationalStore>,
    pub bus: Arc<dyn EventBus>,
    pub warehouse: Option<Arc<dyn Warehouse>>,
    pub directory: Slot<ProfilesMsg>,
    /// The warehouse sink, asked to relay before the warehouse is erased.
    pub warehouse_sink: Slot<WarehouseMsg>,
    pub index: Arc<IdentityIndex>,
    pub erasures: Arc<Erasures>,
    pub envelope: Arc<Envelope>,
    pub destinations: ErasureDestinations,
    pub metrics: Metrics,
    pub settings: GdprSettings,
    /// This replica's name in saga leases.
    pub owner: String,
    /// Cluster mode: live actors are on the replicas owning their partitions, so the erasure is
    /// sent through `cdp.processed.events` and each owner confirms it.
    pub routed: bool,
}

pub struct GdprState {
    args: GdprArgs,
    /// Sagas whose lease this replica holds (released at shutdown).
    held: HashSet<String>,
    /// Sagas with an `Advance` already on its way (a timer or a message), so a refresh does not
    /// start a second chain for them.
    scheduled: HashSet<String>,
    timer: Option<tokio::task::JoinHandle<()>>,
}

pub struct GdprCoordinator;

/// What one step achieved.
enum Outcome {
    Done(Value),
    Skipped(Value),
}

/// Why a step must run again.
enum StepError {
    Retry(String),
    /// The sweep found something: these profiles (new ones included) go through erasure again.
    Remnants {
        found: Value,
        profiles: Vec<ProfileId>,
    },
}

impl From<cohort_adapters::StoreError> for StepError {
    fn from(e: cohort_adapters::StoreError) -> Self {
        StepError::Retry(e.to_string())
    }
}

fn saga_id() -> String {
    format!("del_{}", uuid::Uuid::now_v7().simple())
}

fn state_of(saga: &SagaRecord) -> Result<DeletionState, String> {
    serde_json::from_value(saga.state.clone())
        .map_err(|e| format!("saga {} has an unreadable state: {e}", saga.saga_id))
}

/// Capped exponential backoff by attempt (1-based).
fn backoff(s: &GdprSettings, attempts: u32) -> Duration {
    s.retry_initial.saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1).min(16))).min(s.retry_max)
}

impl GdprState {
    /// Persists a new saga: the person's identifiers sealed, their hashes for suppression.
    async fn create(&self, request: DeletionRequest) -> Result<SagaRecord, String> {
        let a = &self.args;
        let now = chrono::Utc::now();
        let target_json =
            serde_json::to_string(&request.target).map_err(|e| format!("cannot encode the target: {e}"))?;
        let mut hashes: Vec<String> = request.target.identifiers.iter().map(|i| a.erasures.hash(i)).collect();
        hashes.sort();
        hashes.dedup();
        let state = DeletionState {
            regulation: request.regulation,
            profile_id: request.profile_id.clone(),
            profiles: request.target.profiles.clone(),
            identifier_hashes: hashes,
            sealed_target: Some(a.envelope.seal(&target_json)),
            requested_by: request.requested_by,
            requested_at: now,
            steps: DeletionStep::plan(request.regulation).into_iter().map(StepState::pending).collect(),
            completed_at: None,
            lease: Some(self.lease_from(now, Duration::ZERO)),
            owners: vec![a.owner.clone()],
        };
        let saga = SagaRecord {
            saga_id: saga_id(),
            kind: DELETION_SAGA.into(),
            subject: request.profile_id.to_string(),
            status: SagaStatus::Running,
            version: 1,
            state: serde_json::to_value(&state).map_err(|e| format!("cannot encode the saga: {e}"))?,
            created_at: now,
            updated_at: now,
        };
        a.store.save_saga(&saga).await.map_err(|e| e.to_string())?;
        a.metrics.gdpr_saga_leases.with_label_values(&["acquired"]).inc();
        a.metrics.gdpr_sagas.with_label_values(&[request.regulation.as_str(), "requested"]).inc();
        tracing::info!(saga_id = %saga.saga_id, profile_id = %request.profile_id, regulation = request.regulation.as_str(), "deletion saga requested");
        Ok(saga)
    }

    /// This replica's lease from `now`, covering a wait of `extra` before the next step.
    fn lease_from(&self, now: chrono::DateTime<chrono::Utc>, extra: Duration) -> SagaLease {
        let span = chrono::Duration::from_std(self.args.settings.lease + extra).unwrap_or(chrono::Duration::MAX);
        SagaLease { owner: self.args.owner.clone(), until: now.checked_add_signed(span).unwrap_or(now) }
    }

    /// Makes sure this replica holds the saga's lease for at least one more step. `Err(wait)`:
    /// another replica holds it (or just took it); look again after `wait`.
    async fn hold(&mut self, saga: &mut SagaRecord, state: &mut DeletionState) -> Result<(), Result<Duration, String>> {
        let a = &self.args;
        let now = chrono::Utc::now();
        if let Some(lease) = state.held_elsewhere(&a.owner, now) {
            let ttl = chrono::Duration::from_std(a.settings.member_ttl).unwrap_or(chrono::Duration::MAX);
            let alive = crate::cluster::is_alive(a.store.as_ref(), &lease.owner, now, ttl)
                .await
                .map_err(|e| Err(e.to_string()))?;
            if alive {
                a.metrics.gdpr_saga_leases.with_label_values(&["held_elsewhere"]).inc();
                self.held.remove(&saga.saga_id);
                // Look again when the lease may have run out, or its holder may have died.
                let left = (lease.until - now).to_std().unwrap_or_default().min(a.settings.member_ttl);
                return Err(Ok(left + Duration::from_millis(100)));
            }
        }
        let step = chrono::Duration::from_std(a.settings.step_timeout).unwrap_or(chrono::Duration::MAX);
        let mine_long_enough =
            state.lease.as_ref().is_some_and(|l| l.owner == a.owner && l.until.signed_duration_since(now) > step);
        if mine_long_enough {
            self.held.insert(saga.saga_id.clone());
            return Ok(());
        }
        let previous = state.lease.as_ref().map(|l| l.owner.clone());
        state.lease = Some(self.lease_from(now, Duration::ZERO));
        let a = &self.args;
        let outcome = match previous {
            Some(p) if p == a.owner => None,
            Some(_) => Some("taken_over"),
            None => Some("acquired"),
        };
        if outcome.is_some() && state.owners.last() != Some(&a.owner) {
            state.owners.push(a.owner.clone());
        }
        saga.version += 1;
        saga.updated_at = now;
        saga.state = serde_json::to_value(&*state).map_err(|e| Err(format!("cannot encode the saga: {e}")))?;
        match a.store.save_saga(saga).await {
            Ok(()) => {
                if let Some(outcome) = outcome {
                    a.metrics.gdpr_saga_leases.with_label_values(&[outcome]).inc();
                    if outcome == "taken_over" {
                        tracing::warn!(saga_id = %saga.saga_id, owner = %a.owner, "deletion saga taken over from a replica whose lease expired");
                    }
                }
                self.held.insert(saga.saga_id.clone());
                Ok(())
            }
            // Another replica saved it first: see who holds it now.
            Err(e) if e.kind == StoreErrorKind::Conflict => Err(Ok(Duration::from_millis(100))),
            Err(e) => Err(Err(e.to_string())),
        }
    }

    /// Gives up the leases this replica holds, so a rolling restart hands sagas over at once.
    async fn release_leases(&mut self) {
        let a = &self.args;
        for saga_id in std::mem::take(&mut self.held) {
            let Ok(Some(mut saga)) = a.store.load_saga(&saga_id).await else { continue };
            let Ok(mut state) = state_of(&saga) else { continue };
            if saga.status != SagaStatus::Running || state.lease.as_ref().is_none_or(|l| l.owner != a.owner) {
                continue;
            }
            state.lease = None;
            saga.version += 1;
            saga.updated_at = chrono::Utc::now();
            let Ok(value) = serde_json::to_value(&state) else { continue };
            saga.state = value;
            if a.store.save_saga(&saga).await.is_ok() {
                a.metrics.gdpr_saga_leases.with_label_values(&["released"]).inc();
                tracing::info!(saga_id = %saga_id, "deletion saga lease released at shutdown");
            }
        }
    }

    fn target(&self, state: &DeletionState) -> Result<Option<ErasureTarget>, String> {
        let Some(sealed) = &state.sealed_target else { return Ok(None) };
        let json = self.args.envelope.open(sealed).map_err(|e| format!("cannot open the saga's target: {e}"))?;
        serde_json::from_str(&json).map(Some).map_err(|e| format!("the saga's target is unreadable: {e}"))
    }

    /// Runs the next unfinished step of a saga and saves the result. Returns when to advance
    /// again: now, after a backoff, or never (finished, gone or not ours).
    async fn advance(&mut self, saga_id: &str) -> Result<Option<Duration>, String> {
        let a = &self.args;
        let Some(mut saga) = a.store.load_saga(saga_id).await.map_err(|e| e.to_string())? else { return Ok(None) };
        if saga.kind != DELETION_SAGA || saga.status != SagaStatus::Running {
            return Ok(None);
        }
        let mut state = state_of(&saga)?;
        match self.hold(&mut saga, &mut state).await {
            Ok(()) => {}
            Err(Ok(wait)) => return Ok(Some(wait)),
            Err(Err(e)) => return Err(e),
        }
        let Some(i) = state.steps.iter().position(|s| !s.is_finished()) else {
            self.held.remove(saga_id);
            return self.finish(saga, state).await.map(|()| None);
        };
        let mut target = self.target(&state)?;
        let step = state.steps[i].step;
        let now = chrono::Utc::now();
        state.steps[i].attempts += 1;
        state.steps[i].started_at.get_or_insert(now);
        let run = self.run(step, &saga.saga_id, &mut state, target.as_mut());
        let timeout = self.args.settings.step_timeout;
        let result = match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(StepError::Retry(format!("no result within {} s", timeout.as_secs()))),
        };
        let a = &self.args;
        let mut again = Some(Duration::ZERO);
        match result {
            Ok(outcome) => {
                let s = &mut state.steps[i];
                (s.status, s.detail) = match outcome {
                    Outcome::Done(d) => (StepStatus::Done, d),
                    Outcome::Skipped(d) => (StepStatus::Skipped, d),
                };
                s.finished_at = Some(chrono::Utc::now());
                s.last_error = None;
                tracing::info!(saga_id, step = step.as_str(), attempts = s.attempts, "deletion step done");
            }
            Err(e) => {
                a.metrics.gdpr_step_failures.with_label_values(&[step.as_str()]).inc();
                let message = match e {
                    StepError::Retry(m) => m,
                    StepError::Remnants { found, profiles } => {
                        // Something came back (or was missed): erase again, these profiles too.
                        if let Some(t) = target.as_mut() {
                            for p in profiles {
                                if !t.profiles.contains(&p) {
                                    t.profiles.push(p.clone());
                                    state.profiles.push(p);
                                }
                            }
                            let json =
                                serde_json::to_string(t).map_err(|e| format!("cannot encode the target: {e}"))?;
                            state.sealed_target = Some(a.envelope.seal(&json));
                        }
                        for s in state.steps.iter_mut().take(i).filter(|s| s.step != DeletionStep::Suppress) {
                            s.status = StepStatus::Pending;
                        }
                        format!("remnants found, erasing again: {found}")
                    }
                };
                let s = &mut state.steps[i];
                s.status = StepStatus::Retrying;
                tracing::warn!(saga_id, step = step.as_str(), attempts = s.attempts, error = %message, "deletion step failed; will retry");
                s.last_error = Some(message);
                again = Some(backoff(&a.settings, s.attempts));
            }
        }
        let now = chrono::Utc::now();
        // The lease covers the wait before the next attempt, so nobody takes a saga that backs off.
        state.lease = Some(self.lease_from(now, again.unwrap_or_default()));
        saga.version += 1;
        saga.updated_at = now;
        saga.state = serde_json::to_value(&state).map_err(|e| format!("cannot encode the saga: {e}"))?;
        match self.args.store.save_saga(&saga).await {
            Ok(()) => Ok(again),
            // Another coordinator took it over (this one outlived its lease): it carries on.
            Err(e) if e.kind == StoreErrorKind::Conflict => {
                self.held.remove(saga_id);
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    async fn finish(&self, mut saga: SagaRecord, mut state: DeletionState) -> Result<(), String> {
        let a = &self.args;
        let now = chrono::Utc::now();
        state.completed_at = Some(now);
        state.lease = None;
        saga.status = SagaStatus::Completed;
        saga.version += 1;
        saga.updated_at = now;
        saga.state = serde_json::to_value(&state).map_err(|e| format!("cannot encode the saga: {e}"))?;
        match a.store.save_saga(&saga).await {
            Ok(()) => {}
            Err(e) if e.kind == StoreErrorKind::Conflict => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
        let secs = (now - state.requested_at).num_milliseconds().max(0) as f64 / 1000.0;
        let regulation = state.regulation.as_str();
        a.metrics.gdpr_saga_duration.with_label_values(&[regulation]).observe(secs);
        a.metrics.gdpr_sagas.with_label_values(&[regulation, "completed"]).inc();
        tracing::info!(saga_id = %saga.saga_id, regulation, duration_secs = secs, "deletion saga completed");
        Ok(())
    }

    async fn run(
        &self,
        step: DeletionStep,
        saga_id: &str,
        state: &mut DeletionState,
        target: Option<&mut ErasureTarget>,
    ) -> Result<Outcome, StepError> {
        let a = &self.args;
        let store = a.store.as_ref();
        if step == DeletionStep::Release {
            return self.release(saga_id, state).await;
        }
        if step == DeletionStep::Audit {
            return self.audit(saga_id, state).await;
        }
        let Some(target) = target else {
            return Err(StepError::Retry("the saga no longer holds its target; it cannot run this step".into()));
        };
        match step {
            DeletionStep::Suppress => {
                let permanent = state.regulation.suppresses();
                a.erasures.record_suppression(store, saga_id, &state.identifier_hashes, permanent).await?;
                if permanent {
                    let value = serde_json::to_vec(&json!({ "saga_id": saga_id, "suppressed": true }))
                        .map_err(|e| StepError::Retry(e.to_string()))?;
                    let records: Vec<(String, Option<Vec<u8>>)> = state
                        .identifier_hashes
                        .iter()
                        .map(|h| (format!("suppress:{h}"), Some(value.clone())))
                        .collect();
                    a.bus.publish_gdpr(&records).await?;
                }
                Ok(Outcome::Done(json!({ "identifiers": state.identifier_hashes.len(), "permanent": permanent })))
            }
            DeletionStep::StopActor => {
                a.erasures.record_erased(store, saga_id, &target.profiles).await?;
                let confirmed =
                    if a.routed { Some(self.erase_at_owners(saga_id, &target.profiles).await?) } else { None };
                let directory =
                    a.directory.get().ok_or_else(|| StepError::Retry("profile directory is not running".into()))?;
                let profiles = target.profiles.clone();
                let stopped = directory
                    .call(|reply| ProfilesMsg::Erase { profiles, reply }, Some(Duration::from_secs(30)))
                    .await
                    .map_err(|e| StepError::Retry(format!("profile directory did not answer: {e}")))?;
                let stopped = match stopped {
                    ractor::rpc::CallResult::Success(n) => n,
                    _ => return Err(StepError::Retry("profile directory did not answer".into())),
                };
                a.index.forget(&target.profiles, &target.identifiers);
                let mut done = json!({ "actors_stopped": stopped, "profiles": target.profiles.len() });
                if let Some(n) = confirmed {
                    done["owners_confirmed"] = json!(n);
                }
                Ok(Outcome::Done(done))
            }
            DeletionStep::OperationalStore => Ok(Outcome::Done(json!(store.erase_person(target).await?))),
            DeletionStep::Documents => {
                let mut removed = 0u64;
                for collection in PROFILE_DOCUMENTS {
                    let keys = person_documents(store, collection, target).await?;
                    removed += keys.len() as u64;
                    if !keys.is_empty() {
                        store.put_documents(collection, keys.into_iter().map(|k| (k, None)).collect()).await?;
                    }
                }
                let held = crate::reverse_etl::erase_held(store, target, false).await?;
                Ok(Outcome::Done(json!({ "documents": removed, "held_jobs": held })))
            }
            DeletionStep::EventLog => {
                let counts = a.bus.erase_person(target).await?;
                let note = if a.bus.name() == "kafka" {
                    "Kafka topics are append-only: the person's raw records expire with each topic's retention"
                } else {
                    "embedded journal"
                };
                Ok(Outcome::Done(json!({ "erased": counts, "note": note })))
            }
            DeletionStep::Warehouse => {
                let Some(w) = &a.warehouse else {
                    return Ok(Outcome::Skipped(json!({ "note": "no warehouse configured" })));
                };
                // Raw payloads read before the suppression began may still be staged or in the
                // outbox: a flush and a relay put them where the deletes below find them.
                self.flush_and_relay().await?;
                // The tables may not exist yet (nothing relayed so far): then there is nothing to
                // delete, but the statements need them.
                w.ensure_schema().await?;
                // The Bronze rows about to go, recorded first so Gate 2 knows other students'
                // Silver rows that shared them lost their payload on purpose.
                let mut bronze: Vec<u64> = Vec::new();
                let silver = w.table(cohort_adapters::Layer::Silver);
                for p in &target.profiles {
                    let sql = format!("SELECT raw_seq FROM {silver} WHERE profile_id = @p AND raw_seq IS NOT NULL");
                    let params = [("p".to_string(), cohort_adapters::QueryValue::String(p.as_str().to_string()))];
                    let found = w.query(&sql, &params).await?;
                    bronze.extend(found.rows.iter().filter_map(|r| {
                        r.first().and_then(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))
                    }));
                }
                let mentioning = raw_mentioning(w.as_ref(), target, |p| self.open_raw(p)).await?;
                bronze.extend(&mentioning);
                crate::quality::record_erased_bronze(store, &bronze).await?;
                let mut rows = 0;
                for p in &target.profiles {
                    let outcome = w.delete_profile(p).await?;
                    rows += outcome.rows_deleted;
                    if outcome.retry_later {
                        return Err(StepError::Retry(format!("warehouse: {}", outcome.detail)));
                    }
                }
                // Payloads of theirs no Silver row points at (refused elements, say).
                let outcome = w.delete_raw(&mentioning).await?;
                if outcome.retry_later {
                    return Err(StepError::Retry(format!("warehouse: {}", outcome.detail)));
                }
                rows += outcome.rows_deleted;
                Ok(Outcome::Done(json!({ "rows_deleted": rows, "backend": w.backend() })))
            }
            DeletionStep::DeadLetters => {
                Ok(Outcome::Done(json!({ "dead_letters": cohort_adapters::erase_dead_letters(store, target).await? })))
            }
            DeletionStep::Tombstones => {
                let records: Vec<(String, Option<Vec<u8>>)> =
                    target.profiles.iter().map(|p| (p.to_string(), None)).collect();
                let written = a.bus.publish_gdpr(&records).await?;
                if written == 0 {
                    return Ok(Outcome::Skipped(json!({ "note": "no compacted topics on this bus" })));
                }
                Ok(Outcome::Done(json!({ "tombstones": written, "topic": "cdp.gdpr" })))
            }
            DeletionStep::Destinations => {
                if !a.destinations.any() {
                    return Ok(Outcome::Skipped(json!({ "note": "no destination with a deletion API configured" })));
                }
                Ok(Outcome::Done(a.destinations.erase(target).await.map_err(StepError::Retry)?))
            }
            DeletionStep::FeatureStores => {
                // The feature job's snapshots; Cohort keeps no vector store.
                let keys = person_documents(store, crate::features::FEATURES, target).await?;
                let removed = keys.len();
                if !keys.is_empty() {
                    store
                        .put_documents(crate::features::FEATURES, keys.into_iter().map(|k| (k, None)).collect())
                        .await?;
                }
                Ok(Outcome::Done(json!({ "feature_snapshots": removed, "vector_store": "none" })))
            }
            DeletionStep::Verify => self.verify(state, target).await,
            DeletionStep::Audit | DeletionStep::Release => Err(StepError::Retry("unreachable step".into())),
        }
    }

    /// A Bronze payload as text: opened when the warehouse keeps them sealed.
    fn open_raw(&self, payload: &str) -> String {
        if cohort_adapters::crypto::is_sealed(payload) {
            self.args.envelope.open(payload).unwrap_or_default()
        } else {
            payload.to_string()
        }
    }

    async fn flush_and_relay(&self) -> Result<(), StepError> {
        let a = &self.args;
        let wait = Some(Duration::from_secs(60));
        let directory = a.directory.get().ok_or_else(|| StepError::Retry("profile directory is not running".into()))?;
        match directory.call(|r| ProfilesMsg::Flush { reply: Some(r) }, wait).await {
            Ok(ractor::rpc::CallResult::Success(Ok(_))) => {}
            Ok(ractor::rpc::CallResult::Success(Err(e))) => return Err(StepError::Retry(format!("flush failed: {e}"))),
            _ => return Err(StepError::Retry("profile directory did not answer a flush".into())),
        }
        let sink = a.warehouse_sink.get().ok_or_else(|| StepError::Retry("warehouse sink is not running".into()))?;
        match sink.call(|r| WarehouseMsg::Relay { reply: Some(r) }, wait).await {
            Ok(ractor::rpc::CallResult::Success(Ok(_))) => Ok(()),
            Ok(ractor::rpc::CallResult::Success(Err(e))) => {
                Err(StepError::Retry(format!("warehouse relay failed: {e}")))
            }
            _ => Err(StepError::Retry("warehouse sink did not answer a relay".into())),
        }
    }

    /// Queries every store for the person. Suppression-only sagas check the suppression instead.
    async fn verify(&self, state: &DeletionState, target: &ErasureTarget) -> Result<Outcome, StepError> {
        let a = &self.args;
        let store = a.store.as_ref();
        if !state.regulation.deletes() {
            let keys = state.identifier_hashes.clone();
            let found = store.get_documents(SUPPRESSED, &keys).await?;
            let missing = found.iter().filter(|d| d.is_none()).count();
            if missing > 0 {
                return Err(StepError::Retry(format!("{missing} suppression entries are missing")));
            }
            return Ok(Outcome::Done(json!({ "suppressed_identifiers": keys.len() })));
        }
        let mut checked = vec!["operational_store", "event_log", "documents", "identity_index"];
        let mut found = serde_json::Map::new();
        let counts = store.person_remnants(target).await?;
        if counts.total() > 0 {
            found.insert("operational_store".into(), json!(counts));
        }
        let counts = a.bus.person_remnants(target).await?;
        if counts.total() > 0 {
            found.insert("event_log".into(), json!(counts));
        }
        let mut documents = 0;
        for collection in PROFILE_DOCUMENTS.iter().chain([&crate::features::FEATURES]) {
            documents += person_documents(store, collection, target).await?.len();
        }
        documents += usize::try_from(crate::reverse_etl::erase_held(store, target, true).await?).unwrap_or(usize::MAX);
        if documents > 0 {
            found.insert("documents".into(), json!(documents));
        }
        // Someone's identifier owned again (an event that slipped past suppression): that
        // profile is the person too.
        let mut owners = Vec::new();
        for id in &target.identifiers {
            if let Some(owner) = a.index.owner(id).await? {
                owners.push(owner);
            }
        }
        if !owners.is_empty() {
            found.insert("identity_index".into(), json!(owners.len()));
        }
        if let Some(w) = &a.warehouse {
            checked.push("warehouse");
            w.ensure_schema().await?;
            let rows = warehouse_rows(w.as_ref(), &target.profiles).await?
                + raw_mentioning(w.as_ref(), target, |p| self.open_raw(p)).await?.len() as u64;
            if rows > 0 {
                found.insert("warehouse".into(), json!(rows));
            }
        }
        if !found.is_empty() {
            return Err(StepError::Remnants { found: Value::Object(found), profiles: owners });
        }
        Ok(Outcome::Done(json!({ "remnants": 0, "checked": checked })))
    }

    /// Who asked, when, and how much was removed where: counts only, never personal data.
    /// Cluster mode: sends the erasure to each profile's partition and waits until every owner
    /// has confirmed it, so no flush of theirs can write the profile back after the store is
    /// erased. A partition between owners is confirmed by the one that takes it over.
    async fn erase_at_owners(&self, saga_id: &str, profiles: &[ProfileId]) -> Result<usize, StepError> {
        let a = &self.args;
        let request = format!("{saga_id}/{}", uuid::Uuid::new_v4().simple());
        let change = |p: &ProfileId| RoutedChange {
            profile_id: p.clone(),
            change: RoutedKind::Erase { request: request.clone() },
        };
        a.bus.publish_routed(&profiles.iter().map(change).collect::<Vec<_>>()).await?;
        let keys: Vec<String> = profiles.iter().map(|p| erase_ack_key(&request, p)).collect();
        // Within the step's own timeout, so this step answers instead of being cut off.
        let deadline = tokio::time::Instant::now() + a.settings.step_timeout / 2;
        loop {
            let confirmed = a.store.get_documents(ERASE_ACKS, &keys).await?.iter().filter(|d| d.is_some()).count();
            let expired = tokio::time::Instant::now() >= deadline;
            if confirmed == keys.len() || expired {
                a.store.put_documents(ERASE_ACKS, keys.iter().map(|k| (k.clone(), None)).collect()).await?;
            }
            if confirmed == keys.len() {
                return Ok(confirmed);
            }
            if expired {
                return Err(StepError::Retry(format!(
                    "{confirmed} of {} profile owners confirmed the erasure; it is sent again",
                    keys.len()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn audit(&self, saga_id: &str, state: &DeletionState) -> Result<Outcome, StepError> {
        let deleted: serde_json::Map<String, Value> = state
            .steps
            .iter()
            .filter(|s| s.is_finished())
            .map(|s| (s.step.as_str().to_string(), s.detail.clone()))
            .collect();
        let entry = NewAuditEntry {
            at: chrono::Utc::now(),
            actor: state.requested_by.clone(),
            action: "gdpr.deletion".into(),
            subject: state.profile_id.to_string(),
            detail: json!({
                "saga_id": saga_id,
                "regulation": state.regulation,
                "requested_at": state.requested_at,
                "profiles": state.profiles,
                "deleted": deleted,
            }),
        };
        // The audit log is append-only: a retried step after a crash may append twice, which
        // the saga id makes recognisable.
        let ids = self.args.store.append_audit(vec![entry]).await?;
        Ok(Outcome::Done(json!({ "audit_id": ids.first() })))
    }

    async fn release(&self, saga_id: &str, state: &mut DeletionState) -> Result<Outcome, StepError> {
        let a = &self.args;
        let lifted = !state.regulation.suppresses();
        if lifted {
            let ended = a.erasures.lift_suppression(a.store.as_ref(), saga_id, &state.identifier_hashes).await?;
            let records: Vec<(String, Option<Vec<u8>>)> =
                ended.iter().map(|h| (format!("suppress:{h}"), None)).collect();
            a.bus.publish_gdpr(&records).await?;
        }
        state.sealed_target = None;
        Ok(Outcome::Done(json!({ "target_dropped": true, "suppression_lifted": lifted })))
    }

    /// Starts the `Advance` chain of every saga still running (after a restart, or one another
    /// replica left behind), and loads suppressions recorded elsewhere.
    async fn refresh(&mut self, myself: &ActorRef<GdprMsg>) -> Result<(), String> {
        let a = &self.args;
        a.erasures.load(a.store.as_ref()).await.map_err(|e| e.to_string())?;
        let mut after: Option<String> = None;
        loop {
            let page = a.store.list_sagas(after.as_deref(), 200).await.map_err(|e| e.to_string())?;
            let full = page.len() == 200;
            for saga in &page {
                if saga.kind == DELETION_SAGA
                    && saga.status == SagaStatus::Running
                    && self.scheduled.insert(saga.saga_id.clone())
                {
                    tracing::info!(saga_id = %saga.saga_id, "resuming deletion saga");
                    let _ = myself.send_message(GdprMsg::Advance { saga_id: saga.saga_id.clone() });
                }
            }
            after = page.last().map(|s| s.saga_id.clone());
            if !full {
                return Ok(());
            }
        }
    }
}

/// Keys of a collection's documents that belong to one of the person's profiles.
async fn person_documents(
    store: &dyn OperationalStore,
    collection: &str,
    target: &ErasureTarget,
) -> Result<Vec<String>, cohort_adapters::StoreError> {
    Ok(all_documents(store, collection, "")
        .await?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| target.names_profile(k))
        .collect())
}

/// Silver and Gold rows still held for these profiles.
async fn warehouse_rows(w: &dyn Warehouse, profiles: &[ProfileId]) -> Result<u64, cohort_adapters::StoreError> {
    if profiles.is_empty() {
        return Ok(0);
    }
    let names: Vec<String> = (0..profiles.len()).map(|i| format!("@p{i}")).collect();
    let params: Vec<(String, QueryValue)> =
        profiles.iter().enumerate().map(|(i, p)| (format!("p{i}"), QueryValue::String(p.to_string()))).collect();
    let mut rows = 0;
    for layer in [Layer::Silver, Layer::Gold] {
        let sql = format!("SELECT COUNT(*) AS n FROM {} WHERE profile_id IN ({})", w.table(layer), names.join(", "));
        let result = w.query(&sql, &params).await?;
        rows += result.rows.first().and_then(|r| r.first()).and_then(Value::as_u64).unwrap_or(0);
    }
    Ok(rows)
}

impl Actor for GdprCoordinator {
    type Msg = GdprMsg;
    type State = GdprState;
    type Arguments = GdprArgs;

    async fn pre_start(&self, myself: ActorRef<GdprMsg>, args: GdprArgs) -> Result<GdprState, ActorProcessingErr> {
        let every = args.settings.refresh_interval;
        let timer = myself.send_interval(every, || GdprMsg::Refresh);
        let _ = myself.send_message(GdprMsg::Refresh);
        Ok(GdprState { args, held: HashSet::new(), scheduled: HashSet::new(), timer: Some(timer) })
    }

    async fn post_stop(&self, _myself: ActorRef<GdprMsg>, state: &mut GdprState) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.timer.take() {
            t.abort();
        }
        // Best effort and bounded: an unreleased lease only delays the takeover until it expires.
        let _ = tokio::time::timeout(Duration::from_secs(5), state.release_leases()).await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<GdprMsg>,
        msg: GdprMsg,
        state: &mut GdprState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GdprMsg::RequestDeletion { request, reply } => {
                let created = state.create(request).await;
                if let Ok(saga) = &created {
                    state.scheduled.insert(saga.saga_id.clone());
                    let _ = myself.send_message(GdprMsg::Advance { saga_id: saga.saga_id.clone() });
                }
                let _ = reply.send(created);
            }
            GdprMsg::Advance { saga_id } => match state.advance(&saga_id).await {
                Ok(Some(after)) if after.is_zero() => {
                    let _ = myself.send_message(GdprMsg::Advance { saga_id });
                }
                Ok(Some(after)) => {
                    let id = saga_id.clone();
                    myself.send_after(after, move || GdprMsg::Advance { saga_id: id });
                }
                Ok(None) => {
                    state.scheduled.remove(&saga_id);
                }
                Err(e) => {
                    // The store itself failed (loading or saving the saga): try again later.
                    tracing::warn!(saga_id = %saga_id, error = %e, "deletion saga could not advance; will retry");
                    let after = state.args.settings.retry_max;
                    let id = saga_id.clone();
                    myself.send_after(after, move || GdprMsg::Advance { saga_id: id });
                }
            },
            GdprMsg::Refresh => {
                if let Err(e) = state.refresh(&myself).await {
                    tracing::warn!(error = %e, "GDPR refresh failed; next interval retries");
                }
            }
        }
        Ok(())
    }
}
