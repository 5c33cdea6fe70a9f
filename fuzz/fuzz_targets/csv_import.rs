//! The CSV (and JSON lines) importer: any bytes, no panic; every row it calls ready is an event
//! the worker accepts.
#![no_main]

use cxone_offboard::event::Rules;
use cxone_offboard::hr_export::{read_csv, read_jsonl};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rules = Rules::default();
    if let Ok(rows) = read_csv(data, "hris://fuzz", "2026-01-01T00:00:00Z", &rules) {
        for row in rows.into_iter().flatten() {
            assert!(rules.parse(&row.body).is_ok());
        }
    }
    for row in read_jsonl(data, &rules).into_iter().flatten() {
        assert!(rules.parse(&row.body).is_ok());
    }
});
