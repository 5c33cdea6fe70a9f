//! Reading and writing AMQP message headers as plain Rust values.

use lapin::types::{AMQPValue, FieldTable, ShortString};

pub const ERROR_CLASS: &str = "x-offboard-error-class";
pub const ERROR: &str = "x-offboard-error";
pub const STEP: &str = "x-offboard-step";
pub const SAGA_ID: &str = "x-offboard-saga-id";
pub const DEAD_LETTERED_AT: &str = "x-offboard-dead-lettered-at";
pub const ORIGINAL_EXCHANGE: &str = "x-offboard-original-exchange";
pub const ORIGINAL_ROUTING_KEY: &str = "x-offboard-original-routing-key";
pub const REPLAY_COUNT: &str = "x-offboard-replay-count";
pub const DELIVERY_COUNT: &str = "x-delivery-count";
/// Times a message was parked after transient failures (its retry budget).
pub const PARK_COUNT: &str = "x-offboard-park-count";
pub const PARK_REASON: &str = "x-offboard-park-reason";
/// Set by `guard release` on messages an operator let through the mass-deletion guard.
pub const GUARD_RELEASED: &str = "x-offboard-guard-released";
/// When the guard held the message.
pub const HELD_AT: &str = "x-offboard-held-at";
/// Times a message waited for another delivery holding its saga.
pub const LEASE_WAITS: &str = "x-offboard-lease-waits";

/// Headers that describe one attempt or one failure: a copy that starts afresh (a replay, a
/// hand-over to the next stage) drops them, so it gets a new retry budget and current facts.
pub const PER_ATTEMPT: [&str; 9] = [
    PARK_COUNT,
    PARK_REASON,
    LEASE_WAITS,
    ERROR_CLASS,
    ERROR,
    STEP,
    SAGA_ID,
    DEAD_LETTERED_AT,
    GUARD_RELEASED,
];

/// `table` without the [`PER_ATTEMPT`] headers and without `x-delivery-count`.
pub fn fresh(table: Option<&FieldTable>) -> FieldTable {
    let base = for_republish(table);
    FieldTable::from(
        base.inner()
            .iter()
            .filter(|(k, _)| !PER_ATTEMPT.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<std::collections::BTreeMap<_, _>>(),
    )
}

/// A header as text, whatever AMQP string type carried it.
pub fn get_str(table: Option<&FieldTable>, key: &str) -> Option<String> {
    let value = table?.inner().get(key)?;
    value_to_string(value)
}

pub fn value_to_string(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::ByteArray(b) => Some(String::from_utf8_lossy(b.as_slice()).into_owned()),
        other => get_int_value(other).map(|i| i.to_string()),
    }
}

/// A header as an integer, whatever AMQP integer type (or numeric string) carried it.
pub fn get_int(table: Option<&FieldTable>, key: &str) -> Option<i64> {
    let value = table?.inner().get(key)?;
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        other => get_int_value(other),
    }
}

fn get_int_value(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortUInt(i) => Some(i64::from(*i)),
        AMQPValue::LongInt(i) => Some(i64::from(*i)),
        AMQPValue::LongUInt(i) => Some(i64::from(*i)),
        AMQPValue::LongLongInt(i) => Some(*i),
        AMQPValue::Timestamp(t) => i64::try_from(*t).ok(),
        _ => None,
    }
}

/// The headers of a delivery, for a message published anew: without `x-delivery-count`, which
/// the broker sets on redelivery. Copied into a fresh message it would make the copy look
/// redelivered (and, at the rescue threshold, be rescued again at once).
pub fn for_republish(table: Option<&FieldTable>) -> FieldTable {
    let Some(table) = table else {
        return FieldTable::default();
    };
    FieldTable::from(
        table
            .inner()
            .iter()
            .filter(|(k, _)| k.as_str() != DELIVERY_COUNT)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<std::collections::BTreeMap<_, _>>(),
    )
}

pub fn set_str(table: &mut FieldTable, key: &str, value: &str) {
    table.insert(
        ShortString::from(key),
        AMQPValue::LongString(value.as_bytes().to_vec().into()),
    );
}

pub fn set_int(table: &mut FieldTable, key: &str, value: i64) {
    table.insert(ShortString::from(key), AMQPValue::LongLongInt(value));
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate_bytes(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_republished_copy_does_not_carry_the_delivery_count() {
        let mut t = FieldTable::default();
        set_int(&mut t, DELIVERY_COUNT, 3);
        set_str(&mut t, ORIGINAL_EXCHANGE, "hr.events");
        let fresh = for_republish(Some(&t));
        assert_eq!(get_int(Some(&fresh), DELIVERY_COUNT), None);
        assert_eq!(
            get_str(Some(&fresh), ORIGINAL_EXCHANGE).as_deref(),
            Some("hr.events")
        );
        assert!(for_republish(None).inner().is_empty());
    }

    #[test]
    fn roundtrip() {
        let mut t = FieldTable::default();
        set_str(&mut t, ERROR_CLASS, "invalid");
        set_int(&mut t, REPLAY_COUNT, 3);
        assert_eq!(get_str(Some(&t), ERROR_CLASS).as_deref(), Some("invalid"));
        assert_eq!(get_int(Some(&t), REPLAY_COUNT), Some(3));
        assert_eq!(get_int(Some(&t), "missing"), None);
        assert_eq!(get_str(None, ERROR_CLASS), None);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let s = "é".repeat(1000);
        let t = truncate_bytes(&s, 1024);
        assert!(t.len() <= 1024);
        assert!(t.ends_with("..."));
        assert_eq!(truncate_bytes("short", 1024), "short");
    }
}
