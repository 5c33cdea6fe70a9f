//! The CloudEvents HTTP binding (v1.0): structured mode (`application/cloudevents+json`, or
//! `application/json` without `ce-` headers, as the broker accepts it), binary mode (`ce-*`
//! headers, the data as an `application/json` body) and batch mode
//! (`application/cloudevents-batch+json`). Every event ends up as the structured JSON the
//! worker consumes and passes [`Rules::parse`] — one definition of a valid event.

use axum::http::HeaderMap;
use percent_encoding::percent_decode_str;
use serde_json::{Map, Value};

use crate::event::{Event, InvalidEvent, Rules};

/// How the request carries its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Structured,
    Binary,
    Batch,
}

/// The media type of `content-type`, lower-cased, without parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let ct = headers
        .get(axum::http::header::CONTENT_TYPE)?
        .to_str()
        .ok()?;
    Some(
        ct.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase(),
    )
}

/// The mode of a request; `Err` carries the media type that is not ours (a 415).
pub fn mode(headers: &HeaderMap) -> Result<Mode, String> {
    let binary = headers.contains_key("ce-specversion");
    match media_type(headers).as_deref() {
        Some("application/cloudevents+json") => Ok(Mode::Structured),
        Some("application/cloudevents-batch+json") => Ok(Mode::Batch),
        Some("application/json") if binary => Ok(Mode::Binary),
        Some("application/json") => Ok(Mode::Structured),
        Some(other) => Err(other.to_owned()),
        None => Err("(none)".to_owned()),
    }
}

/// An event ready to publish: the structured JSON, its routing key and what it means.
#[derive(Debug, Clone)]
pub struct Ready {
    pub body: Vec<u8>,
    pub routing_key: &'static str,
    pub event: Event,
}

/// Why a request's events are invalid (a 400): the field, and which member of a batch.
#[derive(Debug, Clone)]
pub struct Invalid {
    pub index: Option<usize>,
    pub error: InvalidEvent,
}

impl Invalid {
    fn at(index: Option<usize>, field: &str, reason: impl Into<String>) -> Self {
        Self {
            index,
            error: InvalidEvent::new(field, reason),
        }
    }

    /// The field as a path into the request body (`[2].data.employee.external_id` in a batch).
    pub fn field(&self) -> String {
        match self.index {
            Some(i) => format!("[{i}].{}", self.error.field),
            None => self.error.field.clone(),
        }
    }
}

fn ready(body: Vec<u8>, rules: &Rules, index: Option<usize>) -> Result<Ready, Invalid> {
    let event = rules
        .parse(&body)
        .map_err(|error| Invalid { index, error })?;
    Ok(Ready {
        routing_key: event.type_name(),
        body,
        event,
    })
}

/// The events of a request, all valid, or the first that is not.
pub fn events(
    mode: Mode,
    headers: &HeaderMap,
    body: &[u8],
    rules: &Rules,
) -> Result<Vec<Ready>, Invalid> {
    match mode {
        Mode::Structured => Ok(vec![ready(body.to_vec(), rules, None)?]),
        Mode::Binary => Ok(vec![ready(
            binary_to_structured(headers, body)?,
            rules,
            None,
        )?]),
        Mode::Batch => {
            let items: Vec<Value> = serde_json::from_slice(body).map_err(|e| {
                Invalid::at(
                    None,
                    "(body)",
                    format!("is not a JSON array of events: {e}"),
                )
            })?;
            if items.is_empty() {
                return Err(Invalid::at(None, "(body)", "the batch holds no event"));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    if !item.is_object() {
                        return Err(Invalid::at(Some(i), "(event)", "must be a JSON object"));
                    }
                    let bytes = serde_json::to_vec(&item).unwrap_or_default();
                    ready(bytes, rules, Some(i))
                })
                .collect()
        }
    }
}

/// A binary-mode request as the structured event it stands for: each `ce-<name>` header is
/// the attribute `<name>` (percent-decoded, CloudEvents HTTP binding §3.1.3.2), the content
/// type is `datacontenttype`, the body is `data`.
fn binary_to_structured(headers: &HeaderMap, body: &[u8]) -> Result<Vec<u8>, Invalid> {
    let mut event = Map::new();
    for (name, value) in headers {
        let Some(attr) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let field = attr.to_owned();
        let text = value
            .to_str()
            .map_err(|_| Invalid::at(None, &field, "header is not text"))?;
        let decoded = percent_decode_str(text)
            .decode_utf8()
            .map_err(|_| Invalid::at(None, &field, "is not UTF-8 after percent-decoding"))?;
        if attr == "data" || attr == "data_base64" {
            return Err(Invalid::at(
                None,
                &field,
                "is not an attribute; send data as the body",
            ));
        }
        event.insert(attr.to_owned(), Value::String(decoded.into_owned()));
    }
    if let Some(ct) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        event.insert("datacontenttype".to_owned(), Value::String(ct.to_owned()));
    }
    let data: Value = serde_json::from_slice(body)
        .map_err(|e| Invalid::at(None, "data", format!("the body is not JSON: {e}")))?;
    event.insert("data".to_owned(), data);
    Ok(serde_json::to_vec(&Value::Object(event)).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    const EVENT: &str = r#"{"specversion":"1.0","id":"e1","source":"hris://x","type":"employee.terminated","data":{"employee":{"external_id":"E1"}}}"#;

    #[test]
    fn the_three_modes_give_the_same_event() {
        let rules = Rules::default();
        let structured = events(
            Mode::Structured,
            &headers(&[("content-type", "application/cloudevents+json")]),
            EVENT.as_bytes(),
            &rules,
        )
        .expect("structured");
        let h = headers(&[
            ("content-type", "application/json"),
            ("ce-specversion", "1.0"),
            ("ce-id", "e1"),
            ("ce-source", "hris%3A%2F%2Fx"),
            ("ce-type", "employee.terminated"),
        ]);
        assert_eq!(mode(&h), Ok(Mode::Binary));
        let binary = events(
            Mode::Binary,
            &h,
            br#"{"employee":{"external_id":"E1"}}"#,
            &rules,
        )
        .expect("binary");
        let batch = events(
            Mode::Batch,
            &headers(&[("content-type", "application/cloudevents-batch+json")]),
            format!("[{EVENT}]").as_bytes(),
            &rules,
        )
        .expect("batch");
        for e in [&structured[0], &binary[0], &batch[0]] {
            assert_eq!(e.event.saga_id(), structured[0].event.saga_id());
            assert_eq!(e.routing_key, "employee.terminated");
        }
    }

    #[test]
    fn a_bad_batch_member_is_named_by_its_index() {
        let bad = EVENT.replace("E1", "E 1");
        let err = events(
            Mode::Batch,
            &HeaderMap::new(),
            format!("[{EVENT},{bad}]").as_bytes(),
            &Rules::default(),
        )
        .expect_err("invalid");
        assert_eq!(err.field(), "[1].data.employee.external_id");
    }

    #[test]
    fn other_media_types_are_not_ours() {
        assert_eq!(
            mode(&headers(&[("content-type", "text/plain")])),
            Err("text/plain".to_owned())
        );
        assert!(mode(&HeaderMap::new()).is_err());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn any_mode() -> impl Strategy<Value = Mode> {
            prop_oneof![
                Just(Mode::Structured),
                Just(Mode::Binary),
                Just(Mode::Batch)
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Any body with any `ce-` headers is an answer (events or a named field), never a
            /// panic; and what is accepted is exactly what the worker's parser accepts.
            #[test]
            fn any_request_is_parsed_or_refused_with_a_field(
                m in any_mode(),
                body in prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..300),
                    "[\\[\\]{}\",:a-z0-9 ]{0,200}".prop_map(String::into_bytes),
                    Just(EVENT.as_bytes().to_vec()),
                    Just(format!("[{EVENT},{EVENT}]").into_bytes()),
                ],
                attrs in proptest::collection::vec(("[a-z]{1,12}", "[ -~]{0,40}"), 0..6),
            ) {
                let mut h = HeaderMap::new();
                for (k, v) in &attrs {
                    if let (Ok(name), Ok(value)) = (
                        axum::http::HeaderName::from_bytes(format!("ce-{k}").as_bytes()),
                        HeaderValue::from_str(v),
                    ) {
                        h.insert(name, value);
                    }
                }
                let rules = Rules::default();
                match events(m, &h, &body, &rules) {
                    Ok(ready) => {
                        prop_assert!(!ready.is_empty());
                        for r in &ready {
                            prop_assert!(rules.parse(&r.body).is_ok());
                        }
                    }
                    Err(invalid) => prop_assert!(!invalid.field().is_empty()),
                }
            }

            /// In a batch of valid events with one broken member, the error names that member.
            #[test]
            fn the_broken_member_of_a_batch_is_the_one_named(n in 1usize..8, bad in 0usize..8) {
                let bad = bad % n;
                let members: Vec<String> = (0..n)
                    .map(|i| {
                        let e = EVENT.replace("\"e1\"", &format!("\"e{i}\""));
                        if i == bad { e.replace("\"E1\"", "\"\"") } else { e }
                    })
                    .collect();
                let body = format!("[{}]", members.join(","));
                let err = events(Mode::Batch, &HeaderMap::new(), body.as_bytes(), &Rules::default())
                    .expect_err("one member is invalid");
                prop_assert_eq!(err.index, Some(bad));
            }
        }
    }
}
