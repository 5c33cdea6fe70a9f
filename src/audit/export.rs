//! `evidence export` (CONTRACT §12): one row per saga whose event arrived in a period, read
//! through the per-day index (`index/days/YYYY-MM-DD/<saga_id>`, written by every saga), so a
//! period costs one LIST per day and one GET per saga of that period — never the journals of
//! other periods.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, NaiveDate, SecondsFormat, Utc};
use futures_util::{StreamExt as _, stream};
use serde::Serialize;

use crate::saga::journal::{self, Journal, SagaState, StepName};
use crate::store::{Store, StoreError, keys};

/// `[since, until)`; no `since` = from the first day the index knows.
#[derive(Debug, Clone, Copy)]
pub struct Period {
    pub since: Option<DateTime<Utc>>,
    pub until: DateTime<Utc>,
}

impl Period {
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.since.is_none_or(|s| t >= s) && t < self.until
    }

    /// The UTC days the period touches, when it has a start.
    fn days(&self) -> Option<Vec<NaiveDate>> {
        let since = self.since?;
        let last = (self.until - Duration::microseconds(1)).date_naive();
        let mut day = since.date_naive();
        let mut days = Vec::new();
        while day <= last {
            days.push(day);
            day = day.succ_opt()?;
        }
        Some(days)
    }
}

/// Saga ids of the sagas whose event arrived in `period`, from the day index only (a saga
/// whose day entry is missing — written before the index existed — needs `evidence backfill`).
pub async fn sagas_in<S: Store>(store: &S, period: &Period) -> Result<Vec<String>, StoreError> {
    let prefixes: Vec<String> = match period.days() {
        Some(days) => days.into_iter().map(keys::day_prefix).collect(),
        None => vec![keys::DAYS.to_owned()],
    };
    let listed: Vec<Result<Vec<String>, StoreError>> = stream::iter(prefixes)
        .map(|p| async move { store.list(&p).await })
        .buffered(8)
        .collect()
        .await;
    let mut ids = Vec::new();
    for keys in listed {
        for key in keys? {
            if let Some(id) = key.rsplit('/').next()
                && !id.is_empty()
            {
                ids.push(id.to_owned());
            }
        }
    }
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// One row of the export (CONTRACT §12), in column order.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    pub saga_id: String,
    pub external_id: String,
    pub event_id: String,
    pub reason: Option<String>,
    pub effective_at: Option<String>,
    pub received_at: String,
    pub revoked_at: Option<String>,
    pub verified_at: Option<String>,
    pub completed_at: Option<String>,
    pub status: String,
    pub time_to_revoke_secs: Option<f64>,
    pub sla_due_at: Option<String>,
    pub sla_met: Option<bool>,
    pub manifest_uri: Option<String>,
    pub manifest_sha256: Option<String>,
    pub manifest_verified: Option<bool>,
}

/// The column names, in order.
pub const COLUMNS: [&str; 16] = [
    "saga_id",
    "external_id",
    "event_id",
    "reason",
    "effective_at",
    "received_at",
    "revoked_at",
    "verified_at",
    "completed_at",
    "status",
    "time_to_revoke_secs",
    "sla_due_at",
    "sla_met",
    "manifest_uri",
    "manifest_sha256",
    "manifest_verified",
];

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The status column: the final status when there is one, else the state (`RUNNING`,
/// `PARKED`, `HANDED_OVER`, `HELD`, `SCHEDULED`, `CANCELLED`).
pub fn status_of(j: &Journal) -> String {
    match j.status {
        Some(s) => s.as_str().to_owned(),
        None => serde_json::to_value(j.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_ascii_uppercase))
            .unwrap_or_default(),
    }
}

/// When the SLA clock started: `effective_at`, else the arrival.
pub fn clock_start(j: &Journal) -> DateTime<Utc> {
    match &j.sla {
        Some(s) => s.due_at - Duration::seconds(i64::try_from(s.revoke_within_secs).unwrap_or(0)),
        None => j.created_at,
    }
}

/// The row of a journal, before its manifest is checked. `now` decides whether an unrevoked
/// saga has already missed its SLA (`sla_met` false) or may still make it (empty).
pub fn row(j: &Journal, bucket: &str, now: DateTime<Utc>) -> Row {
    let completed_at = (j.state == SagaState::Completed).then(|| {
        j.step(StepName::Outcome)
            .finished_at
            .unwrap_or(j.updated_at)
    });
    let sla_met = j.sla.as_ref().and_then(|s| match (s.met, j.revoked_at) {
        (Some(met), _) => Some(met),
        (None, Some(r)) => Some(r <= s.due_at),
        (None, None) if now > s.due_at => Some(false),
        (None, None) => None,
    });
    let ttr = j
        .revoked_at
        .map(|r| (r - clock_start(j)).num_milliseconds().max(0) as f64 / 1000.0);
    Row {
        saga_id: j.saga_id.clone(),
        external_id: j.employee.external_id.clone(),
        event_id: j.event.id.clone(),
        reason: j.event.reason.clone(),
        effective_at: j.event.effective_at.clone(),
        received_at: ts(j.created_at),
        revoked_at: j.revoked_at.map(ts),
        verified_at: j.verified_at.map(ts),
        completed_at: completed_at.map(ts),
        status: status_of(j),
        time_to_revoke_secs: ttr,
        sla_due_at: j.sla.as_ref().map(|s| ts(s.due_at)),
        sla_met,
        manifest_uri: j.manifest.as_ref().map(|m| keys::uri(bucket, &m.key)),
        manifest_sha256: j.manifest.as_ref().map(|m| m.sha256.clone()),
        manifest_verified: None,
    }
}

/// Loads the journals of `ids` (16 at a time), keeping those that arrived in `period`.
/// `progress` is called once per journal read.
pub async fn journals<S: Store>(
    store: &S,
    ids: Vec<String>,
    period: &Period,
    progress: impl Fn() + Sync,
) -> Result<Vec<Journal>, StoreError> {
    let progress = &progress;
    let loaded: Vec<Result<Option<journal::Stored>, StoreError>> = stream::iter(ids)
        .map(|id| async move {
            let r = journal::load(store, &id).await;
            progress();
            r
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut out = Vec::new();
    for r in loaded {
        if let Some(s) = r? {
            // The day index is by UTC day; the period may start or end mid-day.
            if period.contains(s.journal.created_at) {
                out.push(s.journal);
            }
        }
    }
    out.sort_by(|a, b| {
        a.created_at
            .cmp(&b.created_at)
            .then(a.saga_id.cmp(&b.saga_id))
    });
    Ok(out)
}

/// Counts for the report's header and the JSON document.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub sagas: usize,
    pub by_status: BTreeMap<String, usize>,
    pub sla_met: usize,
    pub sla_breached: usize,
    /// Not revoked yet and not yet due.
    pub sla_pending: usize,
    pub manifests_verified: usize,
    pub manifests_failed: usize,
    /// Sagas without a manifest (not finished, failed before it, dry runs).
    pub without_manifest: usize,
}

pub fn counts(rows: &[Row]) -> Counts {
    let mut c = Counts {
        sagas: rows.len(),
        ..Counts::default()
    };
    for r in rows {
        *c.by_status.entry(r.status.clone()).or_default() += 1;
        match r.sla_met {
            Some(true) => c.sla_met += 1,
            Some(false) => c.sla_breached += 1,
            None => c.sla_pending += 1,
        }
        match r.manifest_verified {
            Some(true) => c.manifests_verified += 1,
            Some(false) => c.manifests_failed += 1,
            None => c.without_manifest += 1,
        }
    }
    c
}

/// CSV with a header row.
pub fn csv(rows: &[Row]) -> anyhow::Result<Vec<u8>> {
    let mut w = ::csv::Writer::from_writer(Vec::new());
    w.write_record(COLUMNS)?;
    for r in rows {
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        let flag = |v: Option<bool>| v.map(|b| b.to_string()).unwrap_or_default();
        w.write_record([
            r.saga_id.clone(),
            r.external_id.clone(),
            r.event_id.clone(),
            opt(&r.reason),
            opt(&r.effective_at),
            r.received_at.clone(),
            opt(&r.revoked_at),
            opt(&r.verified_at),
            opt(&r.completed_at),
            r.status.clone(),
            r.time_to_revoke_secs
                .map(|s| format!("{s:.3}"))
                .unwrap_or_default(),
            opt(&r.sla_due_at),
            flag(r.sla_met),
            opt(&r.manifest_uri),
            opt(&r.manifest_sha256),
            flag(r.manifest_verified),
        ])?;
    }
    Ok(w.into_inner()?)
}

/// Picks `n` rows at random, reproducibly for a seed, in arrival order.
pub fn sample(rows: Vec<Row>, n: usize, seed: u64) -> Vec<Row> {
    use rand::SeedableRng as _;
    use rand::seq::IndexedRandom as _;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut picked: Vec<Row> = rows.choose_multiple(&mut rng, n).cloned().collect();
    picked.sort_by(|a, b| {
        a.received_at
            .cmp(&b.received_at)
            .then(a.saga_id.cmp(&b.saga_id))
    });
    picked
}

/// `evidence backfill`: writes the day and employee index entries of every journal that has
/// none (sagas from before the index). Returns (journals read, entries written).
pub async fn backfill<S: Store>(
    store: &S,
    progress: impl Fn() + Sync,
) -> Result<(usize, usize), StoreError> {
    let keys_listed = store.list(keys::SAGAS).await?;
    let ids: Vec<String> = keys_listed
        .iter()
        .filter_map(|k| keys::saga_of_journal(k))
        .map(str::to_owned)
        .collect();
    let progress = &progress;
    let results: Vec<Result<usize, StoreError>> = stream::iter(ids)
        .map(|id| async move {
            let written = match journal::load(store, &id).await? {
                Some(s) => {
                    let j = &s.journal;
                    journal::write_indexes(
                        store,
                        &j.employee.external_id,
                        &j.saga_id,
                        j.created_at,
                    )
                    .await?;
                    1
                }
                None => 0,
            };
            progress();
            Ok(written)
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut read = 0;
    for r in results {
        read += r?;
    }
    Ok((keys_listed.len(), read))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn a_period_touches_the_days_it_spans() {
        let p = Period {
            since: Some(at("2026-11-26T22:00:00Z")),
            until: at("2026-11-28T00:00:00Z"),
        };
        let days: Vec<String> = p
            .days()
            .expect("days")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(days, ["2026-11-26", "2026-11-27"]);
        assert!(p.contains(at("2026-11-27T23:59:59Z")));
        assert!(!p.contains(at("2026-11-28T00:00:00Z")));
        assert!(!p.contains(at("2026-11-26T21:59:59Z")));
    }

    /// Issue 19: a period costs what is in it. 20,000 sagas over 20 days; exporting one day
    /// lists that day's index once and reads that day's journals, nothing else.
    #[tokio::test]
    async fn one_day_out_of_twenty_thousand_reads_only_that_days_index_and_journals() {
        use crate::store::Memory;
        let store = Memory::default();
        let base = at("2026-11-01T00:00:00Z");
        let body = br#"{"specversion":"1.0","id":"e","source":"s","type":"employee.terminated",
                        "data":{"employee":{"external_id":"E1"}}}"#;
        let event = crate::event::parse(body, crate::event::Limits::default()).expect("event");
        for i in 0..20_000i64 {
            let created = base + Duration::days(i % 20) + Duration::seconds(i);
            let saga_id = uuid::Uuid::from_u128(i as u128).to_string();
            let mut stored = journal::Stored {
                journal: Journal::new(&saga_id, &event, created),
                etag: None,
            };
            journal::save(&store, &mut stored).await.expect("save");
            journal::write_indexes(&store, "E1", &saga_id, created)
                .await
                .expect("index");
        }
        let before = store.requests();
        let period = Period {
            since: Some(at("2026-11-07T00:00:00Z")),
            until: at("2026-11-08T00:00:00Z"),
        };
        let ids = sagas_in(&store, &period).await.expect("ids");
        let rows = journals(&store, ids, &period, || {})
            .await
            .expect("journals");
        assert_eq!(rows.len(), 1000);
        let after = store.requests();
        let delta =
            |op: &str| after.get(op).copied().unwrap_or(0) - before.get(op).copied().unwrap_or(0);
        assert_eq!(delta("LIST"), 1, "one LIST: that day's index");
        assert_eq!(delta("GET"), 1000, "one GET per saga of that day");
        assert_eq!(delta("PUT"), 0);
    }

    #[test]
    fn a_sample_is_reproducible_for_a_seed() {
        let rows: Vec<Row> = (0..100)
            .map(|i| Row {
                saga_id: format!("s{i:03}"),
                external_id: format!("E{i}"),
                event_id: format!("e{i}"),
                reason: None,
                effective_at: None,
                received_at: format!("2026-11-27T10:{:02}:00Z", i % 60),
                revoked_at: None,
                verified_at: None,
                completed_at: None,
                status: "DELETED".into(),
                time_to_revoke_secs: None,
                sla_due_at: None,
                sla_met: None,
                manifest_uri: None,
                manifest_sha256: None,
                manifest_verified: None,
            })
            .collect();
        let a = sample(rows.clone(), 25, 7);
        let b = sample(rows.clone(), 25, 7);
        let c = sample(rows, 25, 8);
        assert_eq!(a.len(), 25);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
