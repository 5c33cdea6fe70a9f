//! The trust boundary (CONTRACT §2): a message an HRIS published is data, never instructions.
//! The worker's own republications (parks, delays, holds, hand-overs, rescues, replays,
//! guard releases) carry control headers (`x-offboard-*`) with an HMAC-SHA256 over them and
//! the body, under a key only this deployment has; on intake, control headers whose signature
//! does not verify are removed before anything reads them, and `x-delivery-count` is believed
//! only on a broker redelivery (the broker sets it then; on a first delivery it can only come
//! from the publisher).

use base64::Engine;
use hmac::{Hmac, Mac};
use lapin::BasicProperties;
use lapin::types::{FieldTable, ShortString};
use sha2::{Digest, Sha256};

use super::headers;

/// The header carrying the signature: `v1=<base64>`.
pub const SIGNATURE: &str = "x-offboard-signature";
/// Prefix of every control header.
pub const PREFIX: &str = "x-offboard-";

/// The deployment's key for signing control headers (`amqp.control_key`, or one kept in the
/// bucket). Never printed.
#[derive(Clone)]
pub struct ControlKey([u8; 32]);

impl std::fmt::Debug for ControlKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlKey([REDACTED])")
    }
}

impl ControlKey {
    /// Derives a key from any secret material (a configured string or stored random bytes).
    pub fn derive(material: &[u8]) -> Self {
        let mut mac = hmac(b"cxone-offboard control headers v1");
        mac.update(material);
        Self(mac.finalize().into_bytes().into())
    }

    /// Fresh random material for a new deployment's stored key.
    pub fn generate_material() -> Vec<u8> {
        let a = uuid::Uuid::new_v4();
        let b = uuid::Uuid::new_v4();
        [a.as_bytes().as_slice(), b.as_bytes().as_slice()].concat()
    }

    fn mac(&self, table: &FieldTable, body: &[u8]) -> Vec<u8> {
        let mut mac = hmac(&self.0);
        mac.update(b"v1\n");
        mac.update(hex::encode(Sha256::digest(body)).as_bytes());
        mac.update(b"\n");
        let mut names: Vec<&str> = table
            .inner()
            .keys()
            .map(|k| k.as_str())
            .filter(|k| k.starts_with(PREFIX) && *k != SIGNATURE)
            .collect();
        names.sort_unstable();
        for name in names {
            let value = headers::get_str(Some(table), name).unwrap_or_default();
            mac.update(name.as_bytes());
            mac.update(b"=");
            mac.update(value.as_bytes());
            mac.update(b"\n");
        }
        mac.finalize().into_bytes().to_vec()
    }

    /// Signs the control headers of `table` (after every change to them).
    pub fn sign(&self, table: &mut FieldTable, body: &[u8]) {
        let sig = base64::engine::general_purpose::STANDARD.encode(self.mac(table, body));
        headers::set_str(table, SIGNATURE, &format!("v1={sig}"));
    }

    /// Do the control headers of `table` carry this deployment's signature?
    pub fn verify(&self, table: Option<&FieldTable>, body: &[u8]) -> bool {
        let Some(table) = table else {
            return false;
        };
        let Some(sig) = headers::get_str(Some(table), SIGNATURE) else {
            return false;
        };
        let Some(b64) = sig.strip_prefix("v1=") else {
            return false;
        };
        let Ok(given) = base64::engine::general_purpose::STANDARD.decode(b64) else {
            return false;
        };
        constant_time_eq(&self.mac(table, body), &given)
    }

    /// The properties of a delivery as the worker may read them: control headers kept only
    /// when signed by this deployment; `x-delivery-count` only on a broker redelivery. Returns
    /// the names of what was removed.
    pub fn sanitize(
        &self,
        properties: &BasicProperties,
        body: &[u8],
        redelivered: bool,
    ) -> (BasicProperties, Vec<String>) {
        let Some(table) = properties.headers().as_ref() else {
            return (properties.clone(), Vec::new());
        };
        let trusted = self.verify(Some(table), body);
        let mut removed = Vec::new();
        let kept: std::collections::BTreeMap<ShortString, lapin::types::AMQPValue> = table
            .inner()
            .iter()
            .filter(|(k, _)| {
                let name = k.as_str();
                let drop = (name.starts_with(PREFIX) && !trusted)
                    || (name == headers::DELIVERY_COUNT && !redelivered);
                if drop {
                    removed.push(name.to_owned());
                }
                !drop
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if removed.is_empty() {
            return (properties.clone(), removed);
        }
        (
            properties.clone().with_headers(FieldTable::from(kept)),
            removed,
        )
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hmac(key: &[u8]) -> Hmac<Sha256> {
    #[allow(clippy::expect_used)]
    <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(table: FieldTable) -> BasicProperties {
        BasicProperties::default().with_headers(table)
    }

    #[test]
    fn signed_control_headers_survive_and_forged_ones_are_removed() {
        let key = ControlKey::derive(b"deployment secret");
        let body = br#"{"id":"e1"}"#;
        let mut own = FieldTable::default();
        headers::set_int(&mut own, "x-offboard-park-count", 2);
        headers::set_str(&mut own, "x-offboard-guard-released", "by alice");
        headers::set_str(&mut own, "x-custom", "kept");
        key.sign(&mut own, body);
        let (p, removed) = key.sanitize(&props(own.clone()), body, false);
        assert!(removed.is_empty());
        assert_eq!(
            headers::get_int(p.headers().as_ref(), "x-offboard-park-count"),
            Some(2)
        );

        // The same headers from a publisher without the key.
        let mut forged = own.clone();
        headers::set_str(&mut forged, SIGNATURE, "v1=AAAA");
        let (p, removed) = key.sanitize(&props(forged), body, false);
        assert_eq!(
            removed,
            vec![
                "x-offboard-guard-released",
                "x-offboard-park-count",
                "x-offboard-signature"
            ]
        );
        assert_eq!(
            headers::get_str(p.headers().as_ref(), "x-custom").as_deref(),
            Some("kept")
        );
        assert_eq!(headers::get_str(p.headers().as_ref(), SIGNATURE), None);

        // A signature over another body, or another key, does not verify either.
        assert!(!key.verify(Some(&own), b"{}"));
        assert!(!ControlKey::derive(b"other").verify(Some(&own), body));
        // A changed header breaks it.
        let mut edited = own.clone();
        headers::set_int(&mut edited, "x-offboard-park-count", 0);
        assert!(!key.verify(Some(&edited), body));
    }

    #[test]
    fn the_delivery_count_is_believed_only_on_a_redelivery() {
        let key = ControlKey::derive(b"k");
        let mut t = FieldTable::default();
        headers::set_int(&mut t, headers::DELIVERY_COUNT, 4);
        let (p, removed) = key.sanitize(&props(t.clone()), b"x", false);
        assert_eq!(removed, vec![headers::DELIVERY_COUNT]);
        assert_eq!(
            headers::get_int(p.headers().as_ref(), headers::DELIVERY_COUNT),
            None
        );
        let (p, removed) = key.sanitize(&props(t), b"x", true);
        assert!(removed.is_empty());
        assert_eq!(
            headers::get_int(p.headers().as_ref(), headers::DELIVERY_COUNT),
            Some(4)
        );
    }
}
