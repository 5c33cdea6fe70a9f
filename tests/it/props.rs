//! Property tests of event validation and the CSV importer (issue 11). `PROPTEST_CASES` sets the
//! number of cases (256 by default; `make reliability` runs 10,000).

use cxone_offboard::event::{self, Limits};
use cxone_offboard::hr_export::{read_csv, read_jsonl};
use proptest::prelude::*;
use serde_json::json;

fn event_with(id: &str, external_id: &str) -> Vec<u8> {
    serde_json::to_vec(&crate::helpers::termination(id, external_id)).expect("json")
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '+' | '-')
}

proptest! {
    /// Any bytes: an answer, never a panic; deterministic.
    #[test]
    fn parse_never_panics_on_bytes(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let a = event::parse(&body, Limits::default());
        let b = event::parse(&body, Limits::default());
        prop_assert_eq!(a, b);
    }

    /// JSON-shaped noise: arbitrary values in every field.
    #[test]
    fn parse_never_panics_on_json(
        id in any::<String>(),
        ext in any::<String>(),
        ty in prop_oneof![Just("employee.terminated".to_owned()), Just("employee.termination_rescinded".to_owned()), any::<String>()],
        time in any::<String>(),
        lookback in any::<i64>(),
    ) {
        let body = serde_json::to_vec(&json!({
            "specversion": "1.0", "id": id, "source": "s", "type": ty, "time": time,
            "data": {"employee": {"external_id": ext}, "options": {"archive_lookback_days": lookback}}
        })).expect("json");
        let _ = event::parse(&body, Limits::default());
    }

    /// Every id of the allowed alphabet (except `.` and `..`) is accepted and kept as is.
    #[test]
    fn valid_external_ids_are_accepted(ext in "[A-Za-z0-9._@+-]{1,128}") {
        prop_assume!(ext != "." && ext != "..");
        let e = event::parse(&event_with("p-1", &ext), Limits::default());
        prop_assert!(e.is_ok(), "{ext:?}: {e:?}");
        let e = e.expect("ok");
        prop_assert_eq!(e.employee().external_id.as_str(), ext.as_str());
    }

    /// One character outside the alphabet anywhere makes the event invalid, naming the field.
    #[test]
    fn any_other_character_in_an_external_id_is_rejected(
        head in "[A-Za-z0-9]{0,20}",
        bad in any::<char>().prop_filter("not allowed", |c| !allowed(*c)),
        tail in "[A-Za-z0-9]{0,20}",
    ) {
        let ext = format!("{head}{bad}{tail}");
        let err = event::parse(&event_with("p-1", &ext), Limits::default());
        prop_assert!(err.is_err(), "{ext:?} accepted");
        prop_assert_eq!(err.expect_err("invalid").field, "data.employee.external_id");
    }

    /// Event ids: 1-128 characters without control characters.
    #[test]
    fn event_ids_are_bounded_and_free_of_control_characters(id in any::<String>()) {
        let ok = event::parse(&event_with(&id, "E1"), Limits::default()).is_ok();
        let n = id.chars().count();
        let expect = (1..=128).contains(&n) && !id.chars().any(char::is_control);
        prop_assert_eq!(ok, expect, "{:?}", id);
    }

    /// The size limit holds whatever the content.
    #[test]
    fn bodies_over_the_limit_are_rejected(max in 16usize..512, pad in 0usize..600) {
        let body = event_with(&"x".repeat(pad.min(128)), "E1");
        let limits = Limits { max_bytes: max, ..Limits::default() };
        let r = event::parse(&body, limits);
        if body.len() > max {
            prop_assert_eq!(r.expect_err("too big").field, "body");
        }
    }

    /// The CSV importer on arbitrary bytes: no panic, and whatever it calls ready is a valid event.
    #[test]
    fn csv_importer_only_emits_valid_events(text in proptest::collection::vec(any::<u8>(), 0..1024)) {
        if let Ok(rows) = read_csv(&text, "hris://p", "2026-01-01T00:00:00Z", &event::Rules::default()) {
            for row in rows.into_iter().flatten() {
                prop_assert!(event::parse(&row.body, Limits::default()).is_ok());
            }
        }
        for row in read_jsonl(&text, &event::Rules::default()).into_iter().flatten() {
            prop_assert!(event::parse(&row.body, Limits::default()).is_ok());
        }
    }

    /// Well-formed CSV rows: one event per row, the id stable for the same row, bad ids reported
    /// on their own line.
    #[test]
    fn csv_rows_map_one_to_one(
        ids in proptest::collection::vec(prop_oneof!["[A-Za-z0-9]{1,12}", "[a-z/%?#.]{1,6}"], 1..20),
    ) {
        let mut text = String::from("external_id,reason\n");
        for id in &ids {
            text.push_str(&format!("{id},involuntary\n"));
        }
        let a = read_csv(text.as_bytes(), "hris://p", "2026-01-01T00:00:00Z", &event::Rules::default()).expect("header");
        let b = read_csv(text.as_bytes(), "hris://p", "2026-01-01T00:00:00Z", &event::Rules::default()).expect("header");
        prop_assert_eq!(a.len(), ids.len());
        for ((row, again), id) in a.iter().zip(&b).zip(&ids) {
            let valid = event::parse(&event_with("x", id), Limits::default()).is_ok();
            match (row, again) {
                (Ok(r), Ok(s)) => {
                    prop_assert!(valid, "{id:?} imported");
                    prop_assert_eq!(&r.body, &s.body, "stable event id");
                }
                (Err(e), Err(_)) => {
                    prop_assert!(!valid, "{id:?} refused: {e:?}");
                    prop_assert_eq!(e.field.as_str(), "external_id");
                }
                _ => prop_assert!(false, "nondeterministic"),
            }
        }
    }
}
