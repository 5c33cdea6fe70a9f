//! `status`: layoff-day progress from the saga journals of a period (read through the day
//! index) and the broker's queue depths — never the workers' memory, so any machine with the
//! same configuration sees the same picture. This module is the pure part: what the journals
//! say, counted.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::export::{row, status_of};
use crate::saga::journal::{Journal, SagaState};

/// The window the revocation rate is measured over, once the run is that old.
pub const RATE_WINDOW_SECS: f64 = 60.0;

/// Where the sagas of the period stand.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Progress {
    pub sagas: usize,
    /// By final status, or by state while unfinished (`RUNNING`, `PARKED`, `HANDED_OVER`…).
    pub by_status: BTreeMap<String, usize>,
    /// Access not yet removed (running, parked, waiting in the work queue).
    pub revoking: usize,
    /// Access removed and verified; skills, archive, deletion, manifest still to do.
    pub housekeeping: usize,
    /// Finished (completed, compensated, planned, cancelled).
    pub done: usize,
    pub held: usize,
    pub scheduled: usize,
    pub failed: usize,
    /// Sagas whose access is gone (`revoked_at` set).
    pub revoked: usize,
    /// Revocations per second over the last minute (or since the first event, when younger).
    pub revocations_per_sec: f64,
    /// Seconds until every saga still revoking is revoked at that pace.
    pub eta_secs: Option<f64>,
    pub time_to_revoke_p50_secs: Option<f64>,
    pub time_to_revoke_p99_secs: Option<f64>,
    pub sla_met: usize,
    pub sla_breached: usize,
    /// Not revoked, not yet breached, due within the hour.
    pub sla_due_within_hour: usize,
    /// Up to ten held and ten failed sagas: (saga id, external id).
    pub held_sagas: Vec<(String, String)>,
    pub failed_sagas: Vec<(String, String)>,
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Counts `journals` at `now`.
pub fn progress(journals: &[Journal], now: DateTime<Utc>) -> Progress {
    let mut p = Progress {
        sagas: journals.len(),
        ..Progress::default()
    };
    let mut ttr = Vec::new();
    let mut first_arrival: Option<DateTime<Utc>> = None;
    let mut recent = 0usize;
    let window_start = now - chrono::Duration::milliseconds((RATE_WINDOW_SECS * 1000.0) as i64);
    for j in journals {
        *p.by_status.entry(status_of(j)).or_default() += 1;
        first_arrival = Some(first_arrival.map_or(j.created_at, |f| f.min(j.created_at)));
        let r = row(j, "", now);
        match r.sla_met {
            Some(true) => p.sla_met += 1,
            Some(false) => p.sla_breached += 1,
            None => {
                if j.sla
                    .as_ref()
                    .is_some_and(|s| s.due_at - now <= chrono::Duration::hours(1))
                {
                    p.sla_due_within_hour += 1;
                }
            }
        }
        if let Some(t) = r.time_to_revoke_secs {
            ttr.push(t);
        }
        if let Some(at) = j.revoked_at {
            p.revoked += 1;
            if at > window_start {
                recent += 1;
            }
        }
        let ids = (j.saga_id.clone(), j.employee.external_id.clone());
        match j.state {
            s if s.is_final() => p.done += 1,
            SagaState::Held => {
                p.held += 1;
                if p.held_sagas.len() < 10 {
                    p.held_sagas.push(ids);
                }
            }
            SagaState::Scheduled => p.scheduled += 1,
            SagaState::Failed => {
                p.failed += 1;
                if p.failed_sagas.len() < 10 {
                    p.failed_sagas.push(ids);
                }
            }
            SagaState::HandedOver => p.housekeeping += 1,
            _ if j.revoked_at.is_some() => p.housekeeping += 1,
            _ => p.revoking += 1,
        }
    }
    ttr.sort_by(f64::total_cmp);
    p.time_to_revoke_p50_secs = percentile(&ttr, 0.50);
    p.time_to_revoke_p99_secs = percentile(&ttr, 0.99);
    let age = first_arrival.map_or(0.0, |f| (now - f).num_milliseconds() as f64 / 1000.0);
    p.revocations_per_sec = if age >= RATE_WINDOW_SECS {
        recent as f64 / RATE_WINDOW_SECS
    } else if age > 0.0 {
        p.revoked as f64 / age
    } else {
        0.0
    };
    p.eta_secs = match (p.revoking, p.revocations_per_sec) {
        (0, _) => Some(0.0),
        (n, rate) if rate > 0.0 => Some(n as f64 / rate),
        _ => None,
    };
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::journal::FinalStatus;

    fn journal(n: usize, now: DateTime<Utc>) -> Journal {
        let event = crate::event::Rules::default()
            .parse(
                serde_json::json!({
                    "specversion": "1.0", "id": format!("e{n}"), "source": "hris://t",
                    "type": "employee.terminated",
                    "data": {"employee": {"external_id": format!("E{n:06}")}}
                })
                .to_string()
                .as_bytes(),
            )
            .expect("event");
        Journal::new(
            &event.saga_id(),
            &event,
            now - chrono::Duration::seconds(120),
        )
    }

    #[test]
    fn stages_rates_and_percentiles() {
        let now = Utc::now();
        let mut js: Vec<Journal> = (0..10).map(|n| journal(n, now)).collect();
        // 0..4 done (revoked 100 s after arrival: 20 s ago), 4..6 handed over (revoked 10 s
        // ago), 6 held, 7 failed, 8..10 still revoking.
        for j in &mut js[0..4] {
            j.revoked_at = Some(now - chrono::Duration::seconds(20));
            j.state = SagaState::Completed;
            j.status = Some(FinalStatus::Deleted);
        }
        for j in &mut js[4..6] {
            j.revoked_at = Some(now - chrono::Duration::seconds(10));
            j.state = SagaState::HandedOver;
        }
        js[6].state = SagaState::Held;
        js[7].state = SagaState::Failed;
        js[7].status = Some(FinalStatus::Failed);
        let p = progress(&js, now);
        assert_eq!(
            (p.done, p.housekeeping, p.held, p.failed, p.revoking),
            (4, 2, 1, 1, 2)
        );
        assert_eq!(p.revoked, 6);
        assert_eq!(p.by_status["DELETED"], 4);
        assert_eq!(p.by_status["HANDED_OVER"], 2);
        // Two minutes old: the rate is over the last minute (6 revocations).
        assert!(
            (p.revocations_per_sec - 0.1).abs() < 1e-9,
            "{}",
            p.revocations_per_sec
        );
        // 2 still revoking (held and failed do not count) at 0.1/s.
        assert!((p.eta_secs.expect("eta") - 20.0).abs() < 1e-9);
        assert_eq!(p.time_to_revoke_p50_secs, Some(100.0));
        assert_eq!(p.time_to_revoke_p99_secs, Some(110.0));
        assert_eq!(p.held_sagas[0].1, "E000006");
        assert_eq!(p.failed_sagas[0].1, "E000007");
    }

    #[test]
    fn nothing_revoked_has_no_eta_and_nothing_left_is_done() {
        let now = Utc::now();
        let p = progress(&[journal(1, now)], now);
        assert_eq!((p.revoking, p.eta_secs), (1, None));
        let p = progress(&[], now);
        assert_eq!(p.eta_secs, Some(0.0));
    }
}
