//! `reconcile` (CONTRACT §12): the leavers nobody told us about. Pages through every CXone
//! user (UserHub search), compares the ACTIVE ones with the roster of people who should have
//! access and with the sagas this tool completed:
//! - `leaver`: ACTIVE, has an external id, not on the roster;
//! - `reactivated`: the same, and a saga of this tool offboarded them (someone re-enabled the
//!   account by hand);
//! - `unmatched`: ACTIVE without a usable external id (service accounts): listed, never acted on.
//!
//! `--publish` sends an `employee.terminated` event for each leaver and reactivated user
//! through `hr.events`, so the mass-deletion guard and every safety rule apply as to any other
//! termination.

use std::collections::BTreeSet;

use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::{StreamExt as _, stream};
use serde::Serialize;
use serde_json::json;

use crate::cxone::{Client, CxoneError, User};
use crate::event::ExternalId;
use crate::saga::journal::{self, FinalStatus, SagaState};
use crate::store::{Store, StoreError, keys};

/// The `source` of the events `--publish` sends.
pub const SOURCE: &str = "cxone-offboard://reconcile";
/// Their `data.reason`.
pub const REASON: &str = "reconciliation";
/// Users per UserHub page (its maximum).
const PAGE: u64 = 100;

/// The people who should have access: external ids from the roster's `external_id` column.
#[derive(Debug, Clone, Default)]
pub struct Roster {
    pub ids: BTreeSet<String>,
}

/// Parses a roster CSV: a header row with an `external_id` column (any case, any position).
/// A row without a value is an error naming its line: a silently short roster would offboard
/// people who should stay.
pub fn parse_roster(bytes: &[u8]) -> Result<Roster, String> {
    let mut reader = ::csv::ReaderBuilder::new()
        .trim(::csv::Trim::All)
        .flexible(true)
        .from_reader(bytes);
    let headers = reader
        .headers()
        .map_err(|e| format!("reading the header row: {e}"))?
        .clone();
    let column = headers
        .iter()
        .position(|h| {
            h.trim_start_matches('\u{feff}')
                .eq_ignore_ascii_case("external_id")
        })
        .ok_or_else(|| {
            format!(
                "the header row has no `external_id` column (it has: {})",
                headers.iter().collect::<Vec<_>>().join(", ")
            )
        })?;
    let mut ids = BTreeSet::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let record = record.map_err(|e| format!("line {line}: {e}"))?;
        if record.iter().all(str::is_empty) {
            continue;
        }
        let id = record.get(column).unwrap_or_default();
        if id.is_empty() {
            return Err(format!("line {line}: external_id is empty"));
        }
        ids.insert(id.to_owned());
    }
    Ok(Roster { ids })
}

/// One CXone user the reconciliation reports.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    pub external_id: Option<String>,
    pub user_id: String,
    pub username: Option<String>,
    pub email: Option<String>,
    pub status: String,
    /// `reactivated`: the completed saga that had offboarded the user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saga_id: Option<String>,
    /// Why an account is `unmatched` when it has an external id we cannot use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Findings {
    pub leaver: Vec<Finding>,
    pub reactivated: Vec<Finding>,
    pub unmatched: Vec<Finding>,
    /// Users read from CXone, all statuses.
    #[serde(skip)]
    pub users_read: usize,
}

fn finding(u: &User, saga_id: Option<String>, note: Option<String>) -> Finding {
    Finding {
        external_id: u
            .external_identity
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        user_id: u.id.clone(),
        username: u.user_name.clone(),
        email: u.email_address.clone(),
        status: u.status.clone(),
        saga_id,
        note,
    }
}

/// Every UserHub user, page by page. `progress(read, total)` after each page.
pub async fn all_users(
    client: &Client,
    progress: impl Fn(u64, u64),
) -> Result<Vec<User>, CxoneError> {
    let mut users = Vec::new();
    let mut skip = 0u64;
    loop {
        let (total, page) = client.users_page(skip, PAGE).await?;
        let n = page.len() as u64;
        users.extend(page);
        skip += n;
        progress(skip, total);
        if n == 0 || skip >= total {
            break;
        }
    }
    Ok(users)
}

/// The completed saga of this tool that offboarded `external_id`, if any.
async fn offboarded_by<S: Store>(
    store: &S,
    external_id: &str,
) -> Result<Option<String>, StoreError> {
    let prefix = keys::employee_index_prefix(external_id);
    let mut latest: Option<(DateTime<Utc>, String)> = None;
    for key in store.list(&prefix).await? {
        let Some(saga_id) = key.strip_prefix(&prefix) else {
            continue;
        };
        let Some(stored) = journal::load(store, saga_id).await? else {
            continue;
        };
        let j = stored.journal;
        let offboarded = j.state == SagaState::Completed
            && matches!(
                j.status,
                Some(FinalStatus::Deleted | FinalStatus::DeactivatedOnly)
            );
        if offboarded && latest.as_ref().is_none_or(|(t, _)| j.updated_at > *t) {
            latest = Some((j.updated_at, j.saga_id.clone()));
        }
    }
    Ok(latest.map(|(_, id)| id))
}

/// Sorts the ACTIVE users into the three findings.
pub async fn classify<S: Store>(
    store: &S,
    users: &[User],
    roster: &Roster,
) -> Result<Findings, StoreError> {
    let mut findings = Findings {
        users_read: users.len(),
        ..Findings::default()
    };
    let mut candidates = Vec::new();
    for u in users
        .iter()
        .filter(|u| u.status.eq_ignore_ascii_case("ACTIVE"))
    {
        let ext = u
            .external_identity
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        match ext {
            None => findings.unmatched.push(finding(u, None, None)),
            Some(id) if roster.ids.contains(id) => {}
            Some(id) => match ExternalId::parse("externalIdentity", id) {
                Ok(_) => candidates.push((u, id.to_owned())),
                // An event could not carry it: listed, never acted on.
                Err(e) => findings.unmatched.push(finding(
                    u,
                    None,
                    Some(format!("external id not usable in an event: {}", e.reason)),
                )),
            },
        }
    }
    let sagas: Vec<Result<Option<String>, StoreError>> = stream::iter(&candidates)
        .map(|(_, id)| offboarded_by(store, id))
        .buffered(16)
        .collect()
        .await;
    for ((u, _), saga) in candidates.iter().zip(sagas) {
        match saga? {
            Some(saga_id) => findings.reactivated.push(finding(u, Some(saga_id), None)),
            None => findings.leaver.push(finding(u, None, None)),
        }
    }
    Ok(findings)
}

/// The event `--publish` sends for one finding. Its id is fixed per employee and UTC day, so
/// running the reconciliation twice in a day offboards once (the saga id follows the event).
pub fn termination_event(external_id: &str, now: DateTime<Utc>) -> serde_json::Value {
    json!({
        "specversion": "1.0",
        "id": format!("reconcile-{}-{}", now.format("%Y%m%d"), external_id),
        "source": SOURCE,
        "type": "employee.terminated",
        "time": now.to_rfc3339_opts(SecondsFormat::Secs, true),
        "datacontenttype": "application/json",
        "data": {
            "employee": { "external_id": external_id },
            "reason": REASON,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_roster_takes_the_external_id_column_wherever_it_is() {
        let r = parse_roster(b"name,External_ID\nAda,E1\nBob , E2 \n\n").expect("roster");
        assert_eq!(r.ids.iter().cloned().collect::<Vec<_>>(), ["E1", "E2"]);
    }

    #[test]
    fn a_roster_without_the_column_or_with_a_blank_id_is_refused() {
        let e = parse_roster(b"name,id\nAda,E1\n").expect_err("no column");
        assert!(e.contains("external_id"), "{e}");
        let e = parse_roster(b"external_id,name\n,Ada\n").expect_err("blank");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn the_event_is_a_valid_termination() {
        let v = termination_event("E000042", Utc::now());
        let body = serde_json::to_vec(&v).expect("json");
        let e = crate::event::parse(&body, crate::event::Limits::default()).expect("valid");
        assert_eq!(e.employee().external_id.as_str(), "E000042");
    }
}
