//! HR exports (CSV with a header row, or JSON lines of CloudEvents) read into validated
//! termination events, each row checked exactly as the worker checks events. Used by
//! `publish`; kept out of the command so tests and other commands can read exports too.

use serde_json::{Map, Value, json};

use crate::event::{self, InvalidEvent, Rules};

/// Namespace of the event ids `publish` derives (UUID v5 over source + row).
const EVENT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f1d_2a90_c4b7_4e3a_8d55_0b9e_71c3_a2f4);

/// Default CloudEvents `source` of published rows.
pub const DEFAULT_SOURCE: &str = "cxone-offboard://publish";

/// Columns a CSV may have; only `external_id` is required.
pub const COLUMNS: [&str; 11] = [
    "external_id",
    "username",
    "email",
    "effective_at",
    "reason",
    "terminate_sessions",
    "archive_interactions",
    "archive_lookback_days",
    "delete_user",
    "dry_run",
    "notify",
];

/// One row that could not become an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    pub line: u64,
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for BadRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.field, self.reason)
    }
}

/// An event ready to publish.
#[derive(Debug, Clone)]
pub struct Ready {
    pub line: u64,
    pub routing_key: &'static str,
    pub body: Vec<u8>,
}

/// A header that cannot be read as the columns above.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("the CSV header cannot be read: {0}")]
    Unreadable(String),
    #[error("the CSV header has no `external_id` column (columns: {})", COLUMNS.join(", "))]
    NoExternalId,
    #[error("unknown CSV column `{0}` (columns: {cols})", cols = COLUMNS.join(", "))]
    Unknown(String),
    #[error("CSV column `{0}` appears twice")]
    Twice(String),
}

/// Reads a CSV export: each row becomes a validated event or a [`BadRow`].
pub fn read_csv(
    text: &[u8],
    source: &str,
    time: &str,
    rules: &Rules,
) -> Result<Vec<Result<Ready, BadRow>>, HeaderError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(text);
    let header = reader
        .headers()
        .map_err(|e| HeaderError::Unreadable(e.to_string()))?
        .clone();
    let mut columns: Vec<&'static str> = Vec::new();
    for name in header.iter() {
        let lower = name.trim_start_matches('\u{feff}').to_ascii_lowercase();
        let known = COLUMNS
            .iter()
            .find(|c| **c == lower)
            .ok_or_else(|| HeaderError::Unknown(name.to_owned()))?;
        if columns.contains(known) {
            return Err(HeaderError::Twice(name.to_owned()));
        }
        columns.push(known);
    }
    if !columns.contains(&"external_id") {
        return Err(HeaderError::NoExternalId);
    }
    let mut out = Vec::new();
    for record in reader.records() {
        match record {
            Ok(record) => {
                let line = record.position().map_or(0, |p| p.line());
                let cells: Vec<(&str, &str)> = columns
                    .iter()
                    .copied()
                    .zip(record.iter())
                    .filter(|(_, v)| !v.is_empty())
                    .collect();
                if cells.is_empty() {
                    continue; // a blank line
                }
                let content: Vec<&str> = record.iter().collect();
                out.push(row_event(
                    line,
                    &cells,
                    &content.join("\u{1f}"),
                    source,
                    time,
                    rules,
                ));
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                let reason = match e.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => format!("has {len} fields, the header has {expected_len}"),
                    csv::ErrorKind::Utf8 { .. } => "is not UTF-8".to_owned(),
                    _ => e.to_string(),
                };
                out.push(Err(BadRow {
                    line,
                    field: "row".to_owned(),
                    reason,
                }));
            }
        }
    }
    Ok(out)
}

/// The event id of a CSV row: the same row from the same source gives the same id.
pub fn row_event_id(source: &str, content: &str) -> String {
    uuid::Uuid::new_v5(&EVENT_NAMESPACE, format!("{source}\n{content}").as_bytes()).to_string()
}

fn row_event(
    line: u64,
    cells: &[(&str, &str)],
    content: &str,
    source: &str,
    time: &str,
    rules: &Rules,
) -> Result<Ready, BadRow> {
    let bad = |field: &str, reason: String| BadRow {
        line,
        field: field.to_owned(),
        reason,
    };
    let mut employee = Map::new();
    let mut data = Map::new();
    let mut options = Map::new();
    for (column, value) in cells {
        let v = (*value).to_owned();
        match *column {
            "external_id" | "username" | "email" => {
                employee.insert((*column).to_owned(), Value::String(v));
            }
            "effective_at" | "reason" | "notify" => {
                data.insert((*column).to_owned(), Value::String(v));
            }
            "archive_lookback_days" => {
                let days: u64 = value
                    .parse()
                    .map_err(|_| bad(column, format!("`{value}` is not a whole number of days")))?;
                options.insert((*column).to_owned(), json!(days));
            }
            flag => {
                let b = parse_bool(value)
                    .ok_or_else(|| bad(flag, format!("`{value}` is not true or false")))?;
                options.insert(flag.to_owned(), Value::Bool(b));
            }
        }
    }
    data.insert("employee".to_owned(), Value::Object(employee));
    if !options.is_empty() {
        data.insert("options".to_owned(), Value::Object(options));
    }
    let event = json!({
        "specversion": "1.0",
        "id": row_event_id(source, content),
        "source": source,
        "type": event::TYPE_TERMINATED,
        "time": time,
        "datacontenttype": "application/json",
        "data": data,
    });
    let body = serde_json::to_vec(&event).map_err(|e| bad("row", e.to_string()))?;
    rules
        .parse(&body)
        .map_err(|e| bad(&column_of(&e), e.reason))?;
    Ok(Ready {
        line,
        routing_key: event::TYPE_TERMINATED,
        body,
    })
}

/// The CSV column an event field came from (`data.employee.email` -> `email`).
fn column_of(e: &InvalidEvent) -> String {
    e.field.rsplit('.').next().unwrap_or(&e.field).to_owned()
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "yes" | "y" | "1" => Some(true),
        "false" | "no" | "n" | "0" => Some(false),
        _ => None,
    }
}

/// Reads JSON lines: each non-blank line must be a valid CloudEvent and is published as-is.
pub fn read_jsonl(text: &[u8], rules: &Rules) -> Vec<Result<Ready, BadRow>> {
    let mut out = Vec::new();
    for (i, raw) in text.split(|b| *b == b'\n').enumerate() {
        let line = i as u64 + 1;
        let trimmed = raw.trim_ascii();
        if trimmed.is_empty() {
            continue;
        }
        out.push(match rules.parse(trimmed) {
            Ok(e) => Ok(Ready {
                line,
                routing_key: e.type_name(),
                body: trimmed.to_vec(),
            }),
            Err(e) => Err(BadRow {
                line,
                field: e.field,
                reason: e.reason,
            }),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(text: &str) -> Vec<Result<Ready, BadRow>> {
        read_csv(
            text.as_bytes(),
            "src",
            "2026-01-01T00:00:00Z",
            &Rules::default(),
        )
        .expect("header")
    }

    #[test]
    fn rows_become_valid_events_with_stable_ids() {
        let rows = csv("external_id,email,delete_user,archive_lookback_days\n\
                        E1,a@b.example,no,30\nE2,,,\n");
        assert_eq!(rows.len(), 2);
        let first = rows[0].as_ref().expect("valid");
        assert_eq!(first.line, 2);
        let v: Value = serde_json::from_slice(&first.body).expect("json");
        assert_eq!(v["data"]["employee"]["external_id"], "E1");
        assert_eq!(v["data"]["options"]["delete_user"], false);
        assert_eq!(v["data"]["options"]["archive_lookback_days"], 30);
        let again = csv("external_id,email,delete_user,archive_lookback_days\n\
                         E1,a@b.example,no,30\n");
        let v2: Value =
            serde_json::from_slice(&again[0].as_ref().expect("valid").body).expect("json");
        assert_eq!(v["id"], v2["id"]);
        let second: Value =
            serde_json::from_slice(&rows[1].as_ref().expect("valid").body).expect("json");
        assert_ne!(v["id"], second["id"]);
    }

    #[test]
    fn bad_rows_name_line_and_field() {
        let rows = csv("external_id,email,dry_run,effective_at\n\
                        E1,,,\n\
                        E 2,,,\n\
                        E3,not-an-email,,\n\
                        E4,,maybe,\n\
                        E5,,,yesterday\n\
                        E6,too,many,fields,here\n");
        let bad: Vec<String> = rows
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(|b| format!("{}:{}", b.line, b.field))
            .collect();
        assert_eq!(
            bad,
            [
                "3:external_id",
                "4:email",
                "5:dry_run",
                "6:effective_at",
                "7:row"
            ]
        );
    }

    #[test]
    fn headers_are_checked() {
        let limits = &Rules::default();
        assert!(matches!(
            read_csv(b"email\nx@y.example\n", "s", "t", limits),
            Err(HeaderError::NoExternalId)
        ));
        assert!(matches!(
            read_csv(b"external_id,emial\nE1,x\n", "s", "t", limits),
            Err(HeaderError::Unknown(_))
        ));
    }

    #[test]
    fn jsonl_lines_are_validated() {
        let good = r#"{"specversion":"1.0","id":"1","source":"s","type":"employee.terminated","data":{"employee":{"external_id":"E1"}}}"#;
        let text = format!("{good}\n\n{{\"specversion\":\"1.0\"}}\n");
        let rows = read_jsonl(text.as_bytes(), &Rules::default());
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].as_ref().expect("valid").body, good.as_bytes());
        assert_eq!(rows[1].as_ref().expect_err("invalid").line, 3);
    }
}
