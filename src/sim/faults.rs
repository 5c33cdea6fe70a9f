//! Injected faults, set through `POST /_sim/faults`: an error rate with a status, added
//! latency (optionally only on some routes), per-user-per-step statuses, malformed JSON bodies,
//! connection resets, paging loops, token lifetime and revocation, the `Retry-After` form.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::RetryAfter;

/// A saga step whose CXone calls can be made to fail for one user (CONTRACT §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Step {
    /// UserHub search and user get, agent get, SCIM get/filter.
    Resolve,
    /// `PUT /agents/{id}`, SCIM PATCH/PUT.
    BlockLogin,
    /// `POST /agents/{id}/logout`.
    Logout,
    /// `DELETE /access-keys/{id}`.
    RevokeKeys,
    /// `DELETE /agents/{id}/skills`.
    UnassignSkills,
    /// `GET /contacts/completed`.
    Archive,
    /// UserHub deactivate.
    Delete,
}

impl Step {
    const ALL: [Step; 7] = [
        Self::Resolve,
        Self::BlockLogin,
        Self::Logout,
        Self::RevokeKeys,
        Self::UnassignSkills,
        Self::Archive,
        Self::Delete,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Resolve => "resolve",
            Self::BlockLogin => "block_login",
            Self::Logout => "logout",
            Self::RevokeKeys => "revoke_keys",
            Self::UnassignSkills => "unassign_skills",
            Self::Archive => "archive",
            Self::Delete => "delete",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|step| step.name() == name)
    }
}

/// What a user's step answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepFault {
    /// This HTTP status, with an error body.
    Status(u16),
    /// Deactivate answers 200 with the user in `notDeletedUserIds` (only for `delete`).
    Refuse,
}

/// The active faults; the default is none.
#[derive(Debug, Clone, Default)]
pub(crate) struct Faults {
    pub error_rate: f64,
    pub status: u16,
    pub latency: Duration,
    pub routes: Option<Vec<String>>,
    pub users: HashMap<String, HashMap<Step, StepFault>>,
    pub malformed_json: f64,
    pub reset_connections: f64,
    pub paging_loop: bool,
    pub token_ttl: Option<Duration>,
    pub retry_after: Option<RetryAfter>,
    /// Every 429 asks for this many seconds (e.g. an hour), whatever the bucket says.
    pub retry_after_secs: Option<u64>,
    /// The token endpoints answer this status (401: the key is refused; 503: an auth outage).
    pub token_status: Option<u16>,
}

/// A probability given as `true`/`false` or a number in 0..=1.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Rate {
    Flag(bool),
    Value(f64),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StepValue {
    Status(u16),
    Word(String),
}

/// The body of `POST /_sim/faults`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultsRequest {
    error_rate: Option<f64>,
    status: Option<u16>,
    latency_ms: Option<u64>,
    routes: Option<Vec<String>>,
    users: Option<HashMap<String, HashMap<String, StepValue>>>,
    malformed_json: Option<Rate>,
    reset_connections: Option<Rate>,
    paging_loop: Option<bool>,
    token_ttl_secs: Option<f64>,
    retry_after_secs: Option<u64>,
    token_status: Option<u16>,
    /// Not a fault but an action: invalidate every token issued so far.
    pub revoke_tokens: Option<bool>,
    retry_after: Option<RetryAfter>,
}

fn rate(name: &str, value: Option<Rate>) -> Result<f64, String> {
    match value {
        None | Some(Rate::Flag(false)) => Ok(0.0),
        Some(Rate::Flag(true)) => Ok(1.0),
        Some(Rate::Value(v)) if (0.0..=1.0).contains(&v) => Ok(v),
        Some(Rate::Value(v)) => Err(format!("{name} must be a boolean or in 0..=1, not {v}")),
    }
}

fn status(name: &str, value: u16) -> Result<u16, String> {
    if (100..=599).contains(&value) {
        Ok(value)
    } else {
        Err(format!(
            "{name} must be an HTTP status (100..=599), not {value}"
        ))
    }
}

impl FaultsRequest {
    /// Validates the request into the faults it sets (all others cleared).
    pub fn into_faults(self) -> Result<Faults, String> {
        let error_rate = match self.error_rate {
            None => 0.0,
            Some(v) if (0.0..=1.0).contains(&v) => v,
            Some(v) => return Err(format!("error_rate must be in 0..=1, not {v}")),
        };
        let mut users = HashMap::new();
        for (external_id, steps) in self.users.unwrap_or_default() {
            let mut parsed = HashMap::new();
            for (name, value) in steps {
                let step = Step::parse(&name).ok_or_else(|| {
                    format!(
                        "unknown step {name:?}; steps are {}",
                        Step::ALL.map(Step::name).join(", ")
                    )
                })?;
                let fault = match value {
                    StepValue::Status(code) => StepFault::Status(status(&name, code)?),
                    StepValue::Word(word) if word == "refuse" && step == Step::Delete => {
                        StepFault::Refuse
                    }
                    StepValue::Word(word) => {
                        return Err(format!(
                            "step {name} takes an HTTP status{}, not {word:?}",
                            if step == Step::Delete {
                                " or \"refuse\""
                            } else {
                                ""
                            }
                        ));
                    }
                };
                parsed.insert(step, fault);
            }
            users.insert(external_id, parsed);
        }
        let token_ttl = match self.token_ttl_secs {
            None => None,
            Some(secs) if (0.0..1e9).contains(&secs) => Some(Duration::from_secs_f64(secs)),
            Some(secs) => return Err(format!("token_ttl_secs must be >= 0, not {secs}")),
        };
        Ok(Faults {
            error_rate,
            status: status("status", self.status.unwrap_or(503))?,
            latency: Duration::from_millis(self.latency_ms.unwrap_or(0)),
            routes: self.routes,
            users,
            malformed_json: rate("malformed_json", self.malformed_json)?,
            reset_connections: rate("reset_connections", self.reset_connections)?,
            paging_loop: self.paging_loop.unwrap_or(false),
            token_ttl,
            retry_after: self.retry_after,
            retry_after_secs: self.retry_after_secs,
            token_status: self
                .token_status
                .map(|s| status("token_status", s))
                .transpose()?,
        })
    }
}

impl Faults {
    /// True if route-scoped faults apply to `route` (`METHOD template`): `routes` lists
    /// either that key or the bare template.
    pub fn applies_to(&self, route: &str) -> bool {
        match &self.routes {
            None => true,
            Some(routes) => {
                let template = route.split_once(' ').map_or(route, |(_, t)| t);
                routes.iter().any(|r| r == route || r == template)
            }
        }
    }

    /// The fault configured for this user's step, if any.
    pub fn step(&self, external_id: &str, step: Step) -> Option<StepFault> {
        self.users.get(external_id)?.get(&step).copied()
    }

    pub fn to_json(&self) -> Value {
        let users: BTreeMap<&String, BTreeMap<&str, Value>> = self
            .users
            .iter()
            .map(|(user, steps)| {
                let steps = steps
                    .iter()
                    .map(|(step, fault)| {
                        let value = match fault {
                            StepFault::Status(code) => json!(code),
                            StepFault::Refuse => json!("refuse"),
                        };
                        (step.name(), value)
                    })
                    .collect();
                (user, steps)
            })
            .collect();
        json!({
            "error_rate": self.error_rate,
            "status": self.status,
            "latency_ms": u64::try_from(self.latency.as_millis()).unwrap_or(u64::MAX),
            "routes": self.routes,
            "users": users,
            "malformed_json": self.malformed_json,
            "reset_connections": self.reset_connections,
            "paging_loop": self.paging_loop,
            "token_ttl_secs": self.token_ttl.map(|ttl| ttl.as_secs_f64()),
            "retry_after_secs": self.retry_after_secs,
            "token_status": self.token_status,
            "retry_after": self.retry_after.map(|form| match form {
                RetryAfter::Seconds => "seconds",
                RetryAfter::HttpDate => "http-date",
                RetryAfter::None => "none",
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Faults, String> {
        serde_json::from_str::<FaultsRequest>(body)
            .map_err(|e| e.to_string())?
            .into_faults()
    }

    #[test]
    fn empty_clears_everything() {
        let faults = parse("{}").expect("valid");
        assert_eq!(faults.error_rate, 0.0);
        assert_eq!(faults.status, 503);
        assert!(faults.users.is_empty());
        assert!(faults.applies_to("GET /x"));
    }

    #[test]
    fn steps_statuses_and_refusals_parse() {
        let faults =
            parse(r#"{"users": {"E000007": {"delete": "refuse", "logout": 403}}}"#).expect("valid");
        assert_eq!(
            faults.step("E000007", Step::Delete),
            Some(StepFault::Refuse)
        );
        assert_eq!(
            faults.step("E000007", Step::Logout),
            Some(StepFault::Status(403))
        );
        assert_eq!(faults.step("E000007", Step::Archive), None);
        assert!(parse(r#"{"users": {"E1": {"logout": "refuse"}}}"#).is_err());
        assert!(parse(r#"{"users": {"E1": {"fly": 500}}}"#).is_err());
    }

    #[test]
    fn bad_values_and_unknown_keys_are_refused() {
        assert!(parse(r#"{"error_rate": 2}"#).is_err());
        assert!(parse(r#"{"status": 42}"#).is_err());
        assert!(parse(r#"{"malformed_json": 1.5}"#).is_err());
        assert!(parse(r#"{"explode": true}"#).is_err());
        assert_eq!(
            parse(r#"{"malformed_json": true}"#).map(|f| f.malformed_json),
            Ok(1.0)
        );
    }

    #[test]
    fn routes_match_with_or_without_method() {
        let faults = parse(r#"{"routes": ["/a/{id}", "POST /b"]}"#).expect("valid");
        assert!(faults.applies_to("GET /a/{id}"));
        assert!(faults.applies_to("POST /b"));
        assert!(!faults.applies_to("GET /b"));
    }
}
