//! Event decoding: any bytes give a validated event or an `InvalidEvent`, never a panic; an
//! accepted event's external id obeys the contract alphabet.
#![no_main]

use cxone_offboard::event::{Limits, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = parse(data, Limits::default()) {
        let id = event.employee().external_id.as_str();
        assert!(!id.is_empty() && id.len() <= 128);
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || "._@+-".contains(c)));
        assert!(id != "." && id != "..");
    }
});
