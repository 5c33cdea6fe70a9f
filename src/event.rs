//! Termination events as HRIS publish them (CloudEvents 1.0, structured JSON), parsed into
//! validated types: once an [`Event`] exists, every field in it obeys CONTRACT §3.

use chrono::{DateTime, FixedOffset, Utc};
use serde::Serialize;
use serde_json::Value;

/// Largest accepted event body (CONTRACT §5).
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

pub const TYPE_TERMINATED: &str = "employee.terminated";
pub const TYPE_RESCINDED: &str = "employee.termination_rescinded";

/// Why an event was rejected: the field (as a JSON path) and a readable reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidEvent {
    pub field: String,
    pub reason: String,
}

impl InvalidEvent {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

macro_rules! bounded_string {
    ($(#[$meta:meta])* $name:ident, $max:expr) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const MAX_LEN: usize = $max;

            pub fn parse(field: &str, value: &str) -> Result<Self, InvalidEvent> {
                let len = value.chars().count();
                if len == 0 || len > Self::MAX_LEN {
                    return Err(InvalidEvent::new(
                        field,
                        format!("must be 1-{} characters, got {len}", Self::MAX_LEN),
                    ));
                }
                if value.chars().any(char::is_control) {
                    return Err(InvalidEvent::new(field, "must not contain control characters"));
                }
                Ok(Self(value.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

bounded_string!(
    /// CloudEvents `id`: the idempotency key, 1-128 characters.
    EventId,
    128
);
bounded_string!(
    /// CloudEvents `source`, 1-256 characters.
    Source,
    256
);

/// The employee's HR id: 1-128 characters of `[A-Za-z0-9._@+-]`, never `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ExternalId(String);

impl ExternalId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(field: &str, value: &str) -> Result<Self, InvalidEvent> {
        if value.is_empty() || value.len() > Self::MAX_LEN {
            return Err(InvalidEvent::new(
                field,
                format!("must be 1-{} characters", Self::MAX_LEN),
            ));
        }
        if let Some(bad) = value.chars().find(|c| !Self::allowed(*c)) {
            return Err(InvalidEvent::new(
                field,
                format!("character {bad:?} is not allowed (only A-Z a-z 0-9 . _ @ + -)"),
            ));
        }
        if value == "." || value == ".." {
            return Err(InvalidEvent::new(field, "must not be a relative path"));
        }
        Ok(Self(value.to_owned()))
    }

    fn allowed(c: char) -> bool {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '+' | '-')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ExternalId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who is leaving. The external id is authoritative; username and email are fallbacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Employee {
    pub external_id: ExternalId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

/// Per-event options, defaults applied (CONTRACT §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Options {
    pub terminate_sessions: bool,
    pub archive_interactions: bool,
    pub archive_lookback_days: u32,
    pub delete_user: bool,
    pub dry_run: bool,
}

impl Options {
    pub fn defaults(archive_lookback_days: u32) -> Self {
        Self {
            terminate_sessions: true,
            archive_interactions: true,
            archive_lookback_days,
            delete_user: true,
            dry_run: false,
        }
    }
}

/// `employee.terminated`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Termination {
    pub employee: Employee,
    pub effective_at: Option<DateTime<FixedOffset>>,
    pub reason: Option<String>,
    pub options: Options,
    /// Name of an HRIS endpoint in configuration; never a URL (resolved by the notify step).
    pub notify: Option<String>,
}

/// `employee.termination_rescinded`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rescind {
    pub employee: Employee,
    pub terminated_event_id: Option<EventId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    Terminate(Termination),
    Rescind(Rescind),
}

/// A validated event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub id: EventId,
    pub source: Source,
    pub time: Option<DateTime<FixedOffset>>,
    pub command: Command,
}

/// Namespace of saga ids (UUID v5 over `source` + `id`).
const SAGA_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x2b8e_51c0_7d3a_4f69_b1e4_93c2_6a0d_7f18);

/// The saga id of the event `event_id` from `source`: the same for every redelivery and
/// re-publication.
pub fn saga_id(source: &str, event_id: &str) -> String {
    uuid::Uuid::new_v5(&SAGA_NAMESPACE, format!("{source}\n{event_id}").as_bytes()).to_string()
}

impl Event {
    /// This event's saga id (a rescind's own id; its termination's is
    /// `saga_id(source, terminated_event_id)`).
    pub fn saga_id(&self) -> String {
        saga_id(self.source.as_str(), self.id.as_str())
    }

    pub fn employee(&self) -> &Employee {
        match &self.command {
            Command::Terminate(t) => &t.employee,
            Command::Rescind(r) => &r.employee,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self.command {
            Command::Terminate(_) => TYPE_TERMINATED,
            Command::Rescind(_) => TYPE_RESCINDED,
        }
    }
}

/// Parsing knobs that come from configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    pub default_lookback_days: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: MAX_EVENT_BYTES,
            default_lookback_days: 365,
        }
    }
}

/// Checks an AMQP `content-type`: JSON or CloudEvents JSON, parameters allowed, absent allowed
/// (many publishers never set it; the body must still be JSON).
pub fn check_content_type(content_type: Option<&str>) -> Result<(), InvalidEvent> {
    let Some(ct) = content_type else {
        return Ok(());
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/cloudevents+json" | "application/json" => Ok(()),
        _ => Err(InvalidEvent::new(
            "content_type",
            format!(
                "`{}` is not application/cloudevents+json or application/json",
                truncate(ct, 100)
            ),
        )),
    }
}

/// One definition of a valid event for every way in (the broker consumer and the HTTP
/// intake): the body rules of [`parse`] plus what depends on configuration.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub limits: Limits,
    /// The configured HRIS endpoints (`hris.endpoints.<name>`): `notify` must name one.
    pub endpoints: std::collections::BTreeSet<String>,
}

impl Rules {
    pub fn from_settings(settings: &crate::config::Settings) -> Self {
        Self {
            limits: Limits {
                max_bytes: settings.worker.max_event_bytes,
                default_lookback_days: settings.worker.archive_lookback_days,
            },
            endpoints: settings.hris.endpoints.keys().cloned().collect(),
        }
    }

    /// Decodes and validates one event.
    pub fn parse(&self, body: &[u8]) -> Result<Event, InvalidEvent> {
        let event = parse(body, self.limits)?;
        self.check(&event)?;
        Ok(event)
    }

    /// A message as the broker delivered it: content type, then body.
    pub fn parse_message(
        &self,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Event, InvalidEvent> {
        check_content_type(content_type)?;
        self.parse(body)
    }

    /// The rules that depend on configuration.
    pub fn check(&self, event: &Event) -> Result<(), InvalidEvent> {
        if let Command::Terminate(t) = &event.command
            && let Some(name) = &t.notify
            && !self.endpoints.contains(name)
        {
            let shown = truncate(name, 64);
            let known = if self.endpoints.is_empty() {
                "none is configured".to_owned()
            } else {
                format!(
                    "configured: {}",
                    self.endpoints
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Err(InvalidEvent::new(
                "data.notify",
                format!(
                    "`{shown}` is not a configured HRIS endpoint ({known}); it must be a name, never a URL"
                ),
            ));
        }
        Ok(())
    }
}

/// Decodes and validates one message body (the configuration-free rules; see [`Rules`]).
pub fn parse(body: &[u8], limits: Limits) -> Result<Event, InvalidEvent> {
    if body.len() > limits.max_bytes {
        return Err(InvalidEvent::new(
            "body",
            format!(
                "{} bytes is over the {} byte limit",
                body.len(),
                limits.max_bytes
            ),
        ));
    }
    let text = std::str::from_utf8(body)
        .map_err(|e| InvalidEvent::new("body", format!("not UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(InvalidEvent::new("body", "is empty"));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| InvalidEvent::new("body", format!("not JSON: {e}")))?;
    let root = value.as_object().ok_or_else(|| {
        InvalidEvent::new("body", "must be a JSON object (structured CloudEvent)")
    })?;

    let specversion = req_str(root, "specversion", "specversion")?;
    if specversion != "1.0" {
        return Err(InvalidEvent::new(
            "specversion",
            format!("must be \"1.0\", got {:?}", truncate(specversion, 20)),
        ));
    }
    let id = EventId::parse("id", req_str(root, "id", "id")?)?;
    let source = Source::parse("source", req_str(root, "source", "source")?)?;
    let ty = req_str(root, "type", "type")?;
    let time = opt_time(root, "time", "time")?;
    if let Some(dct) = root.get("datacontenttype")
        && !dct.is_null()
    {
        let dct = dct
            .as_str()
            .ok_or_else(|| InvalidEvent::new("datacontenttype", "must be a string"))?;
        check_content_type(Some(dct))
            .map_err(|e| InvalidEvent::new("datacontenttype", e.reason))?;
    }
    let data = root
        .get("data")
        .ok_or_else(|| InvalidEvent::new("data", "is required"))?
        .as_object()
        .ok_or_else(|| InvalidEvent::new("data", "must be an object"))?;

    let command = match ty {
        TYPE_TERMINATED => Command::Terminate(parse_termination(data, limits)?),
        TYPE_RESCINDED => Command::Rescind(parse_rescind(data)?),
        other => {
            return Err(InvalidEvent::new(
                "type",
                format!(
                    "unknown type {:?} (expected {TYPE_TERMINATED} or {TYPE_RESCINDED})",
                    truncate(other, 80)
                ),
            ));
        }
    };
    Ok(Event {
        id,
        source,
        time,
        command,
    })
}

type Object = serde_json::Map<String, Value>;

fn parse_employee(data: &Object) -> Result<Employee, InvalidEvent> {
    let employee = data
        .get("employee")
        .ok_or_else(|| InvalidEvent::new("data.employee", "is required"))?
        .as_object()
        .ok_or_else(|| InvalidEvent::new("data.employee", "must be an object"))?;
    let external_id = ExternalId::parse(
        "data.employee.external_id",
        req_str(employee, "external_id", "data.employee.external_id")?,
    )?;
    let username = opt_str(employee, "username", "data.employee.username", 256)?;
    let email = opt_str(employee, "email", "data.employee.email", 256)?;
    if let Some(e) = &email
        && !looks_like_email(e)
    {
        return Err(InvalidEvent::new(
            "data.employee.email",
            "is not an email address",
        ));
    }
    Ok(Employee {
        external_id,
        username,
        email,
    })
}

fn parse_termination(data: &Object, limits: Limits) -> Result<Termination, InvalidEvent> {
    let employee = parse_employee(data)?;
    let effective_at = opt_time(data, "effective_at", "data.effective_at")?;
    let reason = opt_str(data, "reason", "data.reason", 64)?;
    if let Some(r) = &reason
        && !r
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '))
    {
        return Err(InvalidEvent::new(
            "data.reason",
            "may hold letters, digits, space, '_', '-' and '.'",
        ));
    }
    let mut options = Options::defaults(limits.default_lookback_days);
    if let Some(raw) = data.get("options")
        && !raw.is_null()
    {
        let o = raw
            .as_object()
            .ok_or_else(|| InvalidEvent::new("data.options", "must be an object"))?;
        let flag = |key: &str, default: bool| -> Result<bool, InvalidEvent> {
            match o.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(InvalidEvent::new(
                    format!("data.options.{key}"),
                    "must be true or false",
                )),
            }
        };
        options.terminate_sessions = flag("terminate_sessions", options.terminate_sessions)?;
        options.archive_interactions = flag("archive_interactions", options.archive_interactions)?;
        options.delete_user = flag("delete_user", options.delete_user)?;
        options.dry_run = flag("dry_run", options.dry_run)?;
        match o.get("archive_lookback_days") {
            None | Some(Value::Null) => {}
            Some(v) => {
                let days = v
                    .as_u64()
                    .filter(|d| (1..=3650).contains(d))
                    .ok_or_else(|| {
                        InvalidEvent::new(
                            "data.options.archive_lookback_days",
                            "must be a whole number of days from 1 to 3650",
                        )
                    })?;
                options.archive_lookback_days = days as u32;
            }
        }
    }
    let notify = opt_str(data, "notify", "data.notify", 256)?;
    Ok(Termination {
        employee,
        effective_at,
        reason,
        options,
        notify,
    })
}

fn parse_rescind(data: &Object) -> Result<Rescind, InvalidEvent> {
    let employee = parse_employee(data)?;
    let terminated_event_id = match data.get("terminated_event_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(EventId::parse("data.terminated_event_id", s)?),
        Some(_) => {
            return Err(InvalidEvent::new(
                "data.terminated_event_id",
                "must be a string",
            ));
        }
    };
    Ok(Rescind {
        employee,
        terminated_event_id,
    })
}

fn req_str<'a>(obj: &'a Object, key: &str, field: &str) -> Result<&'a str, InvalidEvent> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(InvalidEvent::new(field, "is required")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(InvalidEvent::new(field, "must be a string")),
    }
}

fn opt_str(
    obj: &Object,
    key: &str,
    field: &str,
    max: usize,
) -> Result<Option<String>, InvalidEvent> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let len = s.chars().count();
            if len == 0 || len > max {
                return Err(InvalidEvent::new(
                    field,
                    format!("must be 1-{max} characters"),
                ));
            }
            if s.chars().any(char::is_control) {
                return Err(InvalidEvent::new(
                    field,
                    "must not contain control characters",
                ));
            }
            Ok(Some(s.clone()))
        }
        Some(_) => Err(InvalidEvent::new(field, "must be a string")),
    }
}

fn opt_time(
    obj: &Object,
    key: &str,
    field: &str,
) -> Result<Option<DateTime<FixedOffset>>, InvalidEvent> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(s)
            .map(Some)
            .map_err(|e| InvalidEvent::new(field, format!("not an RFC 3339 timestamp: {e}"))),
        Some(_) => Err(InvalidEvent::new(field, "must be an RFC 3339 string")),
    }
}

fn looks_like_email(s: &str) -> bool {
    match s.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty() && !domain.is_empty() && !domain.contains('@') && !s.contains(' ')
        }
        None => false,
    }
}

/// Cuts a string to at most `max` characters (for error messages).
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}

/// Is the effective date in the future relative to `now`?
pub fn is_future(effective_at: Option<DateTime<FixedOffset>>, now: DateTime<Utc>) -> bool {
    effective_at.is_some_and(|t| t.with_timezone(&Utc) > now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid() -> Value {
        json!({
            "specversion": "1.0",
            "id": "3f0c9a9e-6a1b-4b8e-9a55-1d2f3c4b5a69",
            "source": "hris://workday/acme",
            "type": "employee.terminated",
            "time": "2026-11-22T10:00:00Z",
            "data": {
                "employee": { "external_id": "E000042", "username": "jane@acme.example", "email": "jane@acme.example" },
                "effective_at": "2026-11-22T17:00:00+01:00",
                "reason": "involuntary",
                "options": { "terminate_sessions": true, "archive_interactions": true,
                             "archive_lookback_days": 30, "delete_user": false, "dry_run": false },
                "notify": "workday",
                "unknown_field": { "is": "ignored" }
            }
        })
    }

    fn parse_value(v: &Value) -> Result<Event, InvalidEvent> {
        parse(&serde_json::to_vec(v).expect("json"), Limits::default())
    }

    #[test]
    fn the_contract_example_parses() {
        let e = parse_value(&valid()).expect("valid");
        assert_eq!(e.id.as_str(), "3f0c9a9e-6a1b-4b8e-9a55-1d2f3c4b5a69");
        let Command::Terminate(t) = &e.command else {
            panic!("termination expected");
        };
        assert_eq!(t.employee.external_id.as_str(), "E000042");
        assert_eq!(t.options.archive_lookback_days, 30);
        assert!(!t.options.delete_user);
        assert_eq!(t.notify.as_deref(), Some("workday"));
        assert_eq!(
            t.effective_at.map(|d| d.with_timezone(&Utc).to_rfc3339()),
            Some("2026-11-22T16:00:00+00:00".to_owned())
        );
    }

    #[test]
    fn options_default_when_absent() {
        let mut v = valid();
        v["data"].as_object_mut().expect("obj").remove("options");
        let e = parse(
            &serde_json::to_vec(&v).expect("json"),
            Limits {
                max_bytes: MAX_EVENT_BYTES,
                default_lookback_days: 90,
            },
        )
        .expect("valid");
        let Command::Terminate(t) = e.command else {
            panic!("termination expected");
        };
        assert_eq!(t.options, Options::defaults(90));
    }

    #[test]
    fn rescind_parses() {
        let v = json!({"specversion": "1.0", "id": "r1", "source": "s", "type": TYPE_RESCINDED,
            "data": {"employee": {"external_id": "E1"}, "terminated_event_id": "abc"}});
        let e = parse_value(&v).expect("valid");
        assert!(matches!(
            e.command,
            Command::Rescind(Rescind {
                terminated_event_id: Some(_),
                ..
            })
        ));
    }

    #[test]
    fn invalid_events_name_the_field() {
        type Mutation = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("specversion", Box::new(|v| v["specversion"] = json!("0.3"))),
            ("id", Box::new(|v| v["id"] = json!(""))),
            ("id", Box::new(|v| v["id"] = json!("x".repeat(129)))),
            ("id", Box::new(|v| v["id"] = json!(5))),
            (
                "source",
                Box::new(|v| {
                    v.as_object_mut().expect("o").remove("source");
                }),
            ),
            ("type", Box::new(|v| v["type"] = json!("employee.hired"))),
            ("time", Box::new(|v| v["time"] = json!("yesterday"))),
            ("data", Box::new(|v| v["data"] = json!("x"))),
            (
                "data.employee",
                Box::new(|v| {
                    v["data"].as_object_mut().expect("o").remove("employee");
                }),
            ),
            (
                "data.employee.external_id",
                Box::new(|v| v["data"]["employee"]["external_id"] = json!("../x")),
            ),
            (
                "data.employee.external_id",
                Box::new(|v| v["data"]["employee"]["external_id"] = json!("a/b")),
            ),
            (
                "data.employee.external_id",
                Box::new(|v| v["data"]["employee"]["external_id"] = json!("%2e%2e")),
            ),
            (
                "data.employee.external_id",
                Box::new(|v| v["data"]["employee"]["external_id"] = json!("a?b")),
            ),
            (
                "data.employee.external_id",
                Box::new(|v| v["data"]["employee"]["external_id"] = json!("..")),
            ),
            (
                "data.employee.external_id",
                Box::new(|v| v["data"]["employee"]["external_id"] = json!("a\u{0}b")),
            ),
            (
                "data.employee.email",
                Box::new(|v| v["data"]["employee"]["email"] = json!("nope")),
            ),
            (
                "data.effective_at",
                Box::new(|v| v["data"]["effective_at"] = json!("2026-13-01")),
            ),
            (
                "data.options.dry_run",
                Box::new(|v| v["data"]["options"]["dry_run"] = json!("yes")),
            ),
            (
                "data.options.archive_lookback_days",
                Box::new(|v| v["data"]["options"]["archive_lookback_days"] = json!(-1)),
            ),
            ("data.notify", Box::new(|v| v["data"]["notify"] = json!(7))),
        ];
        for (field, mutate) in cases {
            let mut v = valid();
            mutate(&mut v);
            let err = parse_value(&v).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn raw_bodies_that_are_not_events() {
        let limits = Limits::default();
        assert_eq!(parse(b"", limits).expect_err("empty").field, "body");
        assert_eq!(parse(b"{", limits).expect_err("json").field, "body");
        assert_eq!(parse(b"[1]", limits).expect_err("array").field, "body");
        assert_eq!(
            parse(&[0xff, 0xfe], limits).expect_err("utf8").field,
            "body"
        );
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(
            parse(deep.as_bytes(), limits).expect_err("deep").field,
            "body"
        );
        let big = vec![b' '; MAX_EVENT_BYTES + 1];
        assert!(
            parse(&big, limits)
                .expect_err("big")
                .reason
                .contains("limit")
        );
    }

    #[test]
    fn content_types() {
        assert!(check_content_type(None).is_ok());
        assert!(check_content_type(Some("application/json")).is_ok());
        assert!(check_content_type(Some("application/cloudevents+json; charset=utf-8")).is_ok());
        assert!(check_content_type(Some("text/plain")).is_err());
        assert!(check_content_type(Some("application/xml")).is_err());
    }
}
