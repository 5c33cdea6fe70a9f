//! Standard Webhooks verification (<https://www.standardwebhooks.com>): `webhook-id`,
//! `webhook-timestamp` (Unix seconds) and `webhook-signature` — a space-separated list of
//! `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, several during a secret
//! rotation. Compared in constant time; a timestamp further than the tolerance from now is
//! refused (replays of captured requests).

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// At most this many signatures in `webhook-signature` (a rotation needs two).
pub const MAX_SIGNATURES: usize = 8;
/// At most this long a `webhook-signature` header.
pub const MAX_SIGNATURE_HEADER: usize = 2048;

/// Why a request's signature was refused (a 401). Never says which part of a signature was
/// wrong beyond what the sender can already see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    Missing(&'static str),
    Malformed(&'static str),
    Stale,
    Mismatch,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing(h) => write!(f, "the {h} header is missing"),
            Self::Malformed(h) => write!(f, "the {h} header is malformed"),
            Self::Stale => write!(f, "webhook-timestamp is too far from now"),
            Self::Mismatch => write!(f, "no v1 signature matches the body"),
        }
    }
}

/// One source's key and clock tolerance.
#[derive(Clone)]
pub struct Verifier {
    key: Vec<u8>,
    tolerance_secs: i64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("tolerance_secs", &self.tolerance_secs)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new(key: Vec<u8>, tolerance_secs: u64) -> Self {
        Self {
            key,
            tolerance_secs: i64::try_from(tolerance_secs).unwrap_or(i64::MAX),
        }
    }

    /// Checks the three headers against `body` at Unix time `now`.
    pub fn verify(
        &self,
        id: Option<&str>,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<(), Refused> {
        let id = id.ok_or(Refused::Missing("webhook-id"))?;
        let ts_text = timestamp.ok_or(Refused::Missing("webhook-timestamp"))?;
        let signature = signature.ok_or(Refused::Missing("webhook-signature"))?;
        if id.is_empty() || id.len() > 256 {
            return Err(Refused::Malformed("webhook-id"));
        }
        let ts: i64 = ts_text
            .trim()
            .parse()
            .map_err(|_| Refused::Malformed("webhook-timestamp"))?;
        if now.abs_diff(ts) > self.tolerance_secs.unsigned_abs() {
            return Err(Refused::Stale);
        }
        // A rotation needs two or three signatures; a header with hundreds is an attack on
        // the CPU, refused before any hashing.
        if signature.len() > MAX_SIGNATURE_HEADER
            || signature.split_whitespace().count() > MAX_SIGNATURES
        {
            return Err(Refused::Malformed("webhook-signature"));
        }
        // The body is hashed once; each candidate is compared against a copy of that state
        // (constant time, `verify_slice`).
        let mac = self.mac(id, ts_text.trim(), body);
        let mut any = false;
        for candidate in signature.split_whitespace() {
            let Some(b64) = candidate.strip_prefix("v1,") else {
                // Other schemes (v1a: asymmetric) are not ours; skip them.
                continue;
            };
            any = true;
            let Ok(given) = base64::engine::general_purpose::STANDARD.decode(b64) else {
                continue;
            };
            if mac.clone().verify_slice(&given).is_ok() {
                return Ok(());
            }
        }
        if any {
            Err(Refused::Mismatch)
        } else {
            Err(Refused::Malformed("webhook-signature"))
        }
    }

    fn mac(&self, id: &str, ts: &str, body: &[u8]) -> HmacSha256 {
        // HMAC takes keys of any length.
        let mut mac = HmacSha256::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(ts.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// `v1,<base64>` for `body` (what a sender computes; used by tests and the docs' example).
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self
            .mac(id, &timestamp.to_string(), body)
            .finalize()
            .into_bytes();
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(tag)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification (its reference test vector).
    #[test]
    fn the_specification_example_verifies() {
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .expect("key");
        let v = Verifier::new(key, 300);
        let body = br#"{"test": 2432232314}"#;
        let sig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(
            v.verify(
                Some("msg_p5jXN8AQM9LWM0D4loKWxJek"),
                Some("1614265330"),
                Some(sig),
                body,
                1_614_265_330
            ),
            Ok(())
        );
        assert_eq!(
            v.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, body),
            sig
        );
    }

    #[test]
    fn rotation_stale_tampered_and_missing() {
        let v = Verifier::new(b"0123456789abcdef".to_vec(), 300);
        let old = Verifier::new(b"fedcba9876543210".to_vec(), 300);
        let body = b"{}";
        let now = 1_800_000_000;
        let good = v.sign("m1", now, body);
        let both = format!("{} {good}", old.sign("m1", now, body));
        assert_eq!(
            v.verify(Some("m1"), Some(&now.to_string()), Some(&both), body, now),
            Ok(())
        );
        assert_eq!(
            v.verify(Some("m1"), Some(&now.to_string()), Some(&good), b"{ }", now),
            Err(Refused::Mismatch)
        );
        assert_eq!(
            v.verify(
                Some("m1"),
                Some(&now.to_string()),
                Some(&good),
                body,
                now + 301
            ),
            Err(Refused::Stale)
        );
        assert_eq!(
            v.verify(Some("m2"), Some(&now.to_string()), Some(&good), body, now),
            Err(Refused::Mismatch)
        );
        assert_eq!(
            v.verify(None, Some("1"), Some(&good), body, now),
            Err(Refused::Missing("webhook-id"))
        );
        assert_eq!(
            v.verify(
                Some("m1"),
                Some(&now.to_string()),
                Some("v2,abc"),
                body,
                now
            ),
            Err(Refused::Malformed("webhook-signature"))
        );
    }

    #[test]
    fn a_future_or_absurd_timestamp_is_stale_and_never_overflows() {
        let v = Verifier::new(b"0123456789abcdef".to_vec(), 300);
        let now = 1_800_000_000_i64;
        for ts in [now + 301, i64::MIN, i64::MAX, -now] {
            let sig = v.sign("m1", ts, b"{}");
            assert_eq!(
                v.verify(Some("m1"), Some(&ts.to_string()), Some(&sig), b"{}", now),
                Err(Refused::Stale),
                "{ts}"
            );
        }
    }

    #[test]
    fn a_flood_of_signatures_is_refused_before_hashing() {
        let v = Verifier::new(b"0123456789abcdef".to_vec(), 300);
        let now = 1_800_000_000_i64;
        let good = v.sign("m1", now, b"{}");
        let flood = format!("{} {good}", ["v1,AAAA"; MAX_SIGNATURES].join(" "));
        assert_eq!(
            v.verify(Some("m1"), Some(&now.to_string()), Some(&flood), b"{}", now),
            Err(Refused::Malformed("webhook-signature"))
        );
        // A rotation's handful still verifies.
        let few = format!("{} {good}", ["v1,AAAA"; MAX_SIGNATURES - 1].join(" "));
        assert_eq!(
            v.verify(Some("m1"), Some(&now.to_string()), Some(&few), b"{}", now),
            Ok(())
        );
    }
}
