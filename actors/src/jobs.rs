//! The JobScheduler: Airflow's role inside Cohort. Jobs run on cron schedules (UTC, with a
//! seconds field); each occurrence runs once across all replicas, because a replica must first
//! create the occurrence's run record (`job:NAME:DUE`) and the store refuses a second create
//! (`save_saga` is a compare-and-set starting at version 1). The run records are the history.
//!
//! Occurrences missed while no replica ran are skipped, as cron does; a run that was cut short
//! by a crash stays `running` in the history.

use chrono::{DateTime, SecondsFormat, Utc};
use cohort_adapters::{OperationalStore, StoreErrorKind};
use cohort_messages::msgs::{JobRun, JobRunStatus, JobStatus, JobsMsg};
use cohort_messages::{SagaRecord, SagaStatus};
use cohort_supervisors::Metrics;
use futures::future::BoxFuture;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// `SagaRecord::kind` of job runs.
pub const JOB_RUN: &str = "job_run";

/// What a job does: a future giving a summary (counts, no personal data) or an error.
pub type JobFn = Arc<dyn Fn() -> BoxFuture<'static, Result<Value, String>> + Send + Sync>;

#[derive(Clone)]
pub struct JobSpec {
    pub name: String,
    /// The cron expression as configured (shown by the API).
    pub expr: String,
    pub schedule: cron::Schedule,
    pub run: JobFn,
}

impl JobSpec {
    /// A job on a cron schedule: `sec min hour day-of-month month day-of-week [year]`, UTC.
    pub fn new(name: &str, expr: &str, run: JobFn) -> Result<Self, String> {
        let schedule = cron::Schedule::from_str(expr).map_err(|e| format!("`{expr}` is not a cron schedule: {e}"))?;
        Ok(Self { name: name.to_string(), expr: expr.to_string(), schedule, run })
    }
}

pub struct JobSchedulerArgs {
    pub store: Arc<dyn OperationalStore>,
    pub metrics: Metrics,
    /// This replica's name in run records.
    pub owner: String,
    pub jobs: Vec<JobSpec>,
}

pub struct JobSchedulerState {
    args: JobSchedulerArgs,
    next: HashMap<String, DateTime<Utc>>,
    running: HashSet<String>,
    last: HashMap<String, JobRun>,
    timer: Option<tokio::task::JoinHandle<()>>,
}

pub struct JobScheduler;

/// The run record id of one occurrence: sorts by job, then time.
pub fn run_id(job: &str, due: DateTime<Utc>) -> String {
    format!("job:{job}:{}", due.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn record(run: &JobRun, version: u64) -> Result<SagaRecord, String> {
    Ok(SagaRecord {
        saga_id: run.run_id.clone(),
        kind: JOB_RUN.into(),
        subject: run.job.clone(),
        status: match run.status {
            JobRunStatus::Running => SagaStatus::Running,
            JobRunStatus::Succeeded => SagaStatus::Completed,
            JobRunStatus::Failed => SagaStatus::Failed,
        },
        version,
        state: serde_json::to_value(run).map_err(|e| format!("cannot encode a job run: {e}"))?,
        created_at: run.started_at,
        updated_at: run.finished_at.unwrap_or(run.started_at),
    })
}

/// The stored runs of a job, oldest first, after `after` (a run id), at most `limit`.
pub async fn job_runs(
    store: &dyn OperationalStore,
    job: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<JobRun>, cohort_adapters::StoreError> {
    let prefix = format!("job:{job}:");
    let start = after.filter(|a| a.starts_with(&prefix)).unwrap_or(&prefix).to_string();
    let page = store.list_sagas(Some(&start), limit).await?;
    Ok(page
        .into_iter()
        .take_while(|s| s.saga_id.starts_with(&prefix))
        .filter(|s| s.kind == JOB_RUN)
        .filter_map(|s| serde_json::from_value(s.state).ok())
        .collect())
}

impl JobSchedulerState {
    fn spec(&self, job: &str) -> Option<&JobSpec> {
        self.args.jobs.iter().find(|j| j.name == job)
    }

    /// Creates the occurrence's run record; `None` when another replica already has it.
    async fn claim(&self, job: &str, due: DateTime<Utc>) -> Result<Option<JobRun>, String> {
        let run = JobRun {
            job: job.to_string(),
            run_id: run_id(job, due),
            due,
            owner: self.args.owner.clone(),
            status: JobRunStatus::Running,
            started_at: Utc::now(),
            finished_at: None,
            error: None,
            detail: Value::Null,
        };
        match self.args.store.save_saga(&record(&run, 1)?).await {
            Ok(()) => Ok(Some(run)),
            Err(e) if e.kind == StoreErrorKind::Conflict => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Runs a claimed occurrence off the actor; its end comes back as `Finished`.
    fn start(&mut self, myself: &ActorRef<JobsMsg>, run: JobRun, reply: Option<RpcReplyPort<Result<JobRun, String>>>) {
        let Some(work) = self.spec(&run.job).map(|s| (s.run)()) else { return };
        self.running.insert(run.job.clone());
        let (store, me) = (self.args.store.clone(), myself.clone());
        tokio::spawn(async move {
            let mut run = run;
            // In a task of its own: a job that panics is a failed run, not one that never ends
            // (its `running` mark would refuse every later run until a restart).
            match tokio::spawn(work).await {
                Ok(Ok(detail)) => {
                    run.status = JobRunStatus::Succeeded;
                    run.detail = detail;
                }
                Ok(Err(e)) => {
                    run.status = JobRunStatus::Failed;
                    run.error = Some(e);
                }
                Err(e) => {
                    run.status = JobRunStatus::Failed;
                    run.error = Some(format!("the job stopped abnormally: {e}"));
                }
            }
            run.finished_at = Some(Utc::now());
            let saved = match record(&run, 2) {
                Ok(r) => store.save_saga(&r).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            if let Err(e) = saved {
                tracing::warn!(job = %run.job, error = %e, "job run finished but its record was not updated");
            }
            if let Some(reply) = reply {
                let _ = reply.send(Ok(run.clone()));
            }
            let _ = me.send_message(JobsMsg::Finished { run: Box::new(run) });
        });
    }

    async fn tick(&mut self, myself: &ActorRef<JobsMsg>) {
        let now = Utc::now();
        let due: Vec<(String, DateTime<Utc>)> = self
            .next
            .iter()
            .filter(|(job, at)| **at <= now && !self.running.contains(*job))
            .map(|(j, at)| (j.clone(), *at))
            .collect();
        for (job, at) in due {
            if let Some(next) = self.spec(&job).and_then(|s| s.schedule.after(&now).next()) {
                self.next.insert(job.clone(), next);
            }
            match self.claim(&job, at).await {
                Ok(Some(run)) => {
                    tracing::info!(job = %job, due = %at, "scheduled job started");
                    self.start(myself, run, None);
                }
                Ok(None) => {
                    self.args.metrics.job_runs.with_label_values(&[&job, "elsewhere"]).inc();
                    tracing::debug!(job = %job, due = %at, "another replica runs this occurrence");
                }
                Err(e) => {
                    self.args.metrics.job_runs.with_label_values(&[&job, "not_started"]).inc();
                    tracing::warn!(job = %job, error = %e, "scheduled job not started: its run record could not be created");
                }
            }
        }
    }
}

impl Actor for JobScheduler {
    type Msg = JobsMsg;
    type State = JobSchedulerState;
    type Arguments = JobSchedulerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<JobsMsg>,
        args: JobSchedulerArgs,
    ) -> Result<JobSchedulerState, ActorProcessingErr> {
        let now = Utc::now();
        let next = args.jobs.iter().filter_map(|j| Some((j.name.clone(), j.schedule.after(&now).next()?))).collect();
        let timer = myself.send_interval(Duration::from_millis(250), || JobsMsg::Tick);
        Ok(JobSchedulerState { args, next, running: HashSet::new(), last: HashMap::new(), timer: Some(timer) })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<JobsMsg>,
        state: &mut JobSchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.timer.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<JobsMsg>,
        msg: JobsMsg,
        state: &mut JobSchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            JobsMsg::Tick => state.tick(&myself).await,
            JobsMsg::RunNow { job, reply } => {
                if state.spec(&job).is_none() {
                    let _ = reply.send(Err(format!("no job `{job}`")));
                } else if state.running.contains(&job) {
                    let _ = reply.send(Err(format!("`{job}` is running already")));
                } else {
                    match state.claim(&job, Utc::now()).await {
                        Ok(Some(run)) => state.start(&myself, run, Some(reply)),
                        Ok(None) => {
                            let _ = reply.send(Err(format!("`{job}` was just started elsewhere")));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
            }
            JobsMsg::Finished { run } => {
                let m = &state.args.metrics;
                let secs = run.finished_at.map_or(0.0, |f| (f - run.started_at).num_milliseconds() as f64 / 1000.0);
                m.job_duration.with_label_values(&[&run.job]).observe(secs);
                let outcome = if run.status == JobRunStatus::Succeeded { "succeeded" } else { "failed" };
                m.job_runs.with_label_values(&[&run.job, outcome]).inc();
                if run.status == JobRunStatus::Succeeded {
                    m.job_last_success.with_label_values(&[&run.job]).set(Utc::now().timestamp());
                    tracing::info!(job = %run.job, duration_secs = secs, "scheduled job succeeded");
                } else {
                    tracing::warn!(job = %run.job, error = run.error.as_deref().unwrap_or(""), "scheduled job failed");
                }
                state.running.remove(&run.job);
                state.last.insert(run.job.clone(), *run);
            }
            JobsMsg::List(reply) => {
                let list = state
                    .args
                    .jobs
                    .iter()
                    .map(|j| JobStatus {
                        name: j.name.clone(),
                        schedule: j.expr.clone(),
                        next_run: state.next.get(&j.name).copied(),
                        running: state.running.contains(&j.name),
                        last_run: state.last.get(&j.name).cloned(),
                    })
                    .collect();
                let _ = reply.send(list);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A job that panics is a failed run, and the next run of it starts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_that_panics_fails_its_run_and_can_run_again() {
        let store: Arc<dyn OperationalStore> = cohort_adapters::EmbeddedStore::in_memory().unwrap();
        let run: JobFn = Arc::new(|| Box::pin(async { panic!("injected job panic") }));
        let spec = JobSpec::new("flaky", "0 0 3 * * *", run).unwrap();
        let args = JobSchedulerArgs { store, metrics: Metrics::new().unwrap(), owner: "test".into(), jobs: vec![spec] };
        let (jobs, _) = Actor::spawn(None, JobScheduler, args).await.unwrap();
        for _ in 0..2 {
            let run = ractor::call_t!(jobs, |reply| JobsMsg::RunNow { job: "flaky".into(), reply }, 10_000).unwrap();
            let run = run.unwrap();
            assert_eq!(run.status, JobRunStatus::Failed, "{run:?}");
            assert!(run.error.unwrap_or_default().contains("abnormally"));
            // `Finished` reaches the scheduler right after the reply.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        jobs.stop(None);
    }
}
