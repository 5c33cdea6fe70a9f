//! The CSV (and JSON lines) importer: any bytes, no panic; every row it calls ready is an event
//! the worker accepts.
#![no_main]

use cxone_offboard::cli::publish::{read_csv, read_jsonl};
use cxone_offboard::event::{Limits, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(rows) = read_csv(data, "hris://fuzz", "2026-01-01T00:00:00Z", Limits::default()) {
        for row in rows.into_iter().flatten() {
            assert!(parse(&row.body, Limits::default()).is_ok());
        }
    }
    for row in read_jsonl(data, Limits::default()).into_iter().flatten() {
        assert!(parse(&row.body, Limits::default()).is_ok());
    }
});
