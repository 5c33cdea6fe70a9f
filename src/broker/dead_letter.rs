//! Dead-lettering by the worker: a copy of the original message, with headers saying why,
//! published (confirmed) to the dead-letter exchange before the original is acked.

use chrono::Utc;
use lapin::BasicProperties;

use serde::{Deserialize, Serialize};

use super::control::ControlKey;
use super::headers;
use super::publisher::{PublishError, Publisher};

/// `x-offboard-error-class` values (CONTRACT §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorClass {
    /// The message is not a valid event; no CXone call was made.
    Invalid,
    /// CXone or S3 answered with an error that retrying cannot fix.
    Permanent,
    /// Transient errors outlasted every retry and delay.
    Exhausted,
    /// The mass-deletion guard stopped it.
    Guard,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Permanent => "permanent",
            Self::Exhausted => "exhausted",
            Self::Guard => "guard",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "invalid" => Some(Self::Invalid),
            "permanent" => Some(Self::Permanent),
            "exhausted" => Some(Self::Exhausted),
            "guard" => Some(Self::Guard),
            _ => None,
        }
    }
}

impl From<crate::saga::FailureClass> for ErrorClass {
    fn from(c: crate::saga::FailureClass) -> Self {
        match c {
            crate::saga::FailureClass::Invalid => Self::Invalid,
            crate::saga::FailureClass::Permanent => Self::Permanent,
            crate::saga::FailureClass::Exhausted => Self::Exhausted,
            crate::saga::FailureClass::Guard => Self::Guard,
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a message is being dead-lettered. `message` must carry no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub class: ErrorClass,
    pub message: String,
    pub step: Option<String>,
    pub saga_id: Option<String>,
}

/// Most bytes of `x-offboard-error` (CONTRACT §5).
pub const MAX_ERROR_BYTES: usize = 1024;

/// The original message as received, enough to re-publish it faithfully.
#[derive(Debug, Clone)]
pub struct Original<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub properties: &'a BasicProperties,
    pub body: &'a [u8],
}

/// The properties of the dead-letter copy: the original ones plus the `x-offboard-*` headers,
/// signed.
pub fn dead_letter_properties(
    original: &Original<'_>,
    why: &DeadLetter,
    control: &ControlKey,
) -> BasicProperties {
    let mut table = headers::for_republish(original.properties.headers().as_ref());
    headers::set_str(&mut table, headers::ERROR_CLASS, why.class.as_str());
    headers::set_str(
        &mut table,
        headers::ERROR,
        &headers::truncate_bytes(&why.message, MAX_ERROR_BYTES),
    );
    if let Some(step) = &why.step {
        headers::set_str(&mut table, headers::STEP, step);
    }
    if let Some(saga) = &why.saga_id {
        headers::set_str(&mut table, headers::SAGA_ID, saga);
    }
    headers::set_str(
        &mut table,
        headers::DEAD_LETTERED_AT,
        &Utc::now().to_rfc3339(),
    );
    if headers::get_str(Some(&table), headers::ORIGINAL_EXCHANGE).is_none() {
        headers::set_str(&mut table, headers::ORIGINAL_EXCHANGE, original.exchange);
        headers::set_str(
            &mut table,
            headers::ORIGINAL_ROUTING_KEY,
            original.routing_key,
        );
    }
    control.sign(&mut table, original.body);
    original.properties.clone().with_headers(table)
}

/// Publishes the dead-letter copy and waits for the broker's confirm.
pub async fn publish(
    publisher: &Publisher,
    dead_letter_exchange: &str,
    original: &Original<'_>,
    why: &DeadLetter,
    control: &ControlKey,
) -> Result<(), PublishError> {
    let props = dead_letter_properties(original, why, control);
    let routing_key = if original.routing_key.is_empty() {
        "dead"
    } else {
        original.routing_key
    };
    publisher
        .publish(
            dead_letter_exchange,
            routing_key,
            original.body,
            props,
            true,
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;

    #[test]
    fn headers_are_added_and_originals_kept() {
        let mut h = FieldTable::default();
        headers::set_str(&mut h, "x-custom", "kept");
        let props = BasicProperties::default()
            .with_headers(h)
            .with_content_type("application/json".into());
        let original = Original {
            exchange: "hr.events",
            routing_key: "employee.terminated",
            properties: &props,
            body: b"{}",
        };
        let why = DeadLetter {
            class: ErrorClass::Invalid,
            message: "x".repeat(5000),
            step: Some("block_login".into()),
            saga_id: None,
        };
        let key = ControlKey::derive(b"test");
        let out = dead_letter_properties(&original, &why, &key);
        assert!(key.verify(out.headers().as_ref(), b"{}"));
        let t = out.headers().as_ref();
        assert_eq!(headers::get_str(t, "x-custom").as_deref(), Some("kept"));
        assert_eq!(
            headers::get_str(t, headers::ERROR_CLASS).as_deref(),
            Some("invalid")
        );
        assert!(headers::get_str(t, headers::ERROR).expect("error").len() <= MAX_ERROR_BYTES);
        assert_eq!(
            headers::get_str(t, headers::STEP).as_deref(),
            Some("block_login")
        );
        assert_eq!(
            headers::get_str(t, headers::ORIGINAL_ROUTING_KEY).as_deref(),
            Some("employee.terminated")
        );
        assert_eq!(
            out.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
    }
}
