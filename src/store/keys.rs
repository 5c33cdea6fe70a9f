//! Every key of the bucket layout (CONTRACT §6 and the internal ones), in one place.
//!
//! External ids are validated (`[A-Za-z0-9._@+-]`, never `.` or `..`) before they reach a key,
//! and saga ids are UUIDs, so no key built here can escape its prefix.

use chrono::NaiveDate;

/// Prefix of every saga journal.
pub const SAGAS: &str = "sagas/";
/// The mass-deletion guard's sliding window (one object, compare-and-swap).
pub const GUARD_WINDOW: &str = "guard/window.json";
/// The key that signs the worker's own control headers when `amqp.control_key` is unset.
pub const CONTROL_KEY: &str = "control/header-signing-key";
/// Prefix of the objects `check` writes to probe the store.
pub const PROBES: &str = "check/";
/// Prefix of the per-day index (`index/days/2026-11-27/<saga_id>`).
pub const DAYS: &str = "index/days/";

/// `sagas/{saga_id}.json`: the journal.
pub fn journal(saga_id: &str) -> String {
    format!("{SAGAS}{saga_id}.json")
}

/// The saga id of a journal key, if it is one.
pub fn saga_of_journal(key: &str) -> Option<&str> {
    key.strip_prefix(SAGAS)?.strip_suffix(".json")
}

/// `archives/{external_id}/{saga_id}/interactions.ndjson`.
pub fn archive(external_id: &str, saga_id: &str) -> String {
    format!("archives/{external_id}/{saga_id}/interactions.ndjson")
}

/// `manifests/{external_id}/{saga_id}.json`: written once.
pub fn manifest(external_id: &str, saga_id: &str) -> String {
    format!("manifests/{external_id}/{saga_id}.json")
}

/// `manifests/{external_id}/{saga_id}.rescind.json`: the second manifest of a rescind.
pub fn rescind_manifest(external_id: &str, saga_id: &str) -> String {
    format!("manifests/{external_id}/{saga_id}.rescind.json")
}

/// The per-employee index entry that lets a rescind find the sagas of an employee.
pub fn employee_index(external_id: &str, saga_id: &str) -> String {
    format!("{}{saga_id}", employee_index_prefix(external_id))
}

pub fn employee_index_prefix(external_id: &str) -> String {
    format!("index/employees/{external_id}/")
}

/// The per-day index entry (by the day the event arrived, UTC): what `evidence export` and
/// `saga list --since` read instead of every journal.
pub fn day_index(day: NaiveDate, saga_id: &str) -> String {
    format!("{}{saga_id}", day_prefix(day))
}

pub fn day_prefix(day: NaiveDate) -> String {
    format!("{DAYS}{}/", day.format("%Y-%m-%d"))
}

/// A rescind without a `terminated_event_id` that found no saga of the employee yet.
pub fn pending_rescind(external_id: &str) -> String {
    format!("rescinds/by-employee/{external_id}.json")
}

/// An `s3://bucket/key` URI.
pub fn uri(bucket: &str, key: &str) -> String {
    format!("s3://{bucket}/{key}")
}

/// Splits an `s3://bucket/key` URI.
pub fn parse_uri(uri: &str) -> Option<(&str, &str)> {
    let rest = uri.strip_prefix("s3://")?;
    let (bucket, key) = rest.split_once('/')?;
    (!bucket.is_empty() && !key.is_empty()).then_some((bucket, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_the_contract_layout() {
        assert_eq!(journal("s1"), "sagas/s1.json");
        assert_eq!(saga_of_journal("sagas/s1.json"), Some("s1"));
        assert_eq!(saga_of_journal("index/x"), None);
        assert_eq!(archive("E1", "s1"), "archives/E1/s1/interactions.ndjson");
        assert_eq!(manifest("E1", "s1"), "manifests/E1/s1.json");
        let day = NaiveDate::from_ymd_opt(2026, 11, 27).expect("date");
        assert_eq!(day_index(day, "s1"), "index/days/2026-11-27/s1");
        assert_eq!(parse_uri("s3://b/k/x.json"), Some(("b", "k/x.json")));
        assert_eq!(parse_uri("s3://b/"), None);
        assert_eq!(parse_uri("http://b/k"), None);
    }
}
