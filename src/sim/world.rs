//! The simulated tenant: users with their UserHub record, agent record, skills, session,
//! access keys and SCIM resource. Seeded users exist virtually until first touched, so a
//! simulator with 100,000 users starts instantly and holds only the users a test touched.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::contacts::History;

/// Agent ids are `AGENT_ID_BASE + n` for user number `n`.
pub(crate) const AGENT_ID_BASE: u64 = 1000;
/// Skills every seeded user holds: `(skillId, proficiency)`.
pub(crate) const SEED_SKILLS: [(i64, u8); 2] = [(11, 1), (12, 3)];

/// A real-time agent state (CXONE-API.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AgentState {
    LoggedOut,
    LoggedIn,
    Available,
    Unavailable,
    InboundContact,
    OutboundContact,
    InboundConsult,
    OutboundConsult,
    Dialer,
}

impl AgentState {
    const ALL: [AgentState; 9] = [
        Self::LoggedOut,
        Self::LoggedIn,
        Self::Available,
        Self::Unavailable,
        Self::InboundContact,
        Self::OutboundContact,
        Self::InboundConsult,
        Self::OutboundConsult,
        Self::Dialer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::LoggedOut => "LoggedOut",
            Self::LoggedIn => "LoggedIn",
            Self::Available => "Available",
            Self::Unavailable => "Unavailable",
            Self::InboundContact => "InboundContact",
            Self::OutboundContact => "OutboundContact",
            Self::InboundConsult => "InboundConsult",
            Self::OutboundConsult => "OutboundConsult",
            Self::Dialer => "Dialer",
        }
    }

    /// The numeric `agentStateId`.
    pub fn id(self) -> u8 {
        match self {
            Self::LoggedOut => 0,
            Self::Available => 1,
            Self::Unavailable => 2,
            Self::InboundContact => 3,
            Self::OutboundContact => 4,
            Self::InboundConsult => 5,
            Self::OutboundConsult => 6,
            Self::Dialer => 7,
            Self::LoggedIn => 8,
        }
    }

    /// Parses a state name, case-insensitively.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|state| state.name().eq_ignore_ascii_case(name))
    }

    /// True if the agent is on a live interaction in this state.
    pub fn on_interaction(self) -> bool {
        matches!(
            self,
            Self::InboundContact
                | Self::OutboundContact
                | Self::InboundConsult
                | Self::OutboundConsult
                | Self::Dialer
        )
    }
}

/// UserHub status of a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Active,
    Deleted,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Self::Active => "ACTIVE",
            Self::Deleted => "DELETED",
        }
    }
}

/// One assigned skill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Skill {
    pub proficiency: u8,
    pub is_active: bool,
}

/// Everything the simulator keeps about one user.
#[derive(Debug, Clone)]
pub(crate) struct User {
    pub index: u64,
    pub external_id: String,
    pub user_id: Uuid,
    pub scim_id: Uuid,
    pub status: Status,
    pub deleted_date: Option<DateTime<Utc>>,
    pub agent_active: bool,
    pub termination_date: Option<String>,
    pub team_id: u64,
    pub skills: BTreeMap<i64, Skill>,
    pub logged_in: bool,
    pub state: AgentState,
    pub state_since: DateTime<Utc>,
    pub access_keys: Vec<String>,
    pub interactions: u64,
    pub created: DateTime<Utc>,
    pub refuse_delete: bool,
    pub scim_active: bool,
    pub scim_version: u64,
    pub writes: BTreeMap<String, u64>,
    /// A created user may carry its own username and email (two users may share one, as two
    /// people can over time); others are `user{n}@sim.example`.
    pub user_name_override: Option<String>,
    pub email_override: Option<String>,
    /// Service accounts have no external id in UserHub (`external_id` is then only the
    /// simulator's handle for them).
    pub has_external_id: bool,
}

/// The UserHub id of the user with this external id (UUID v5).
pub(crate) fn user_uuid(external_id: &str) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("urn:cxone-sim:user:{external_id}").as_bytes(),
    )
}

/// The SCIM id of the user with this external id (UUID v5, different from the UserHub id).
pub(crate) fn scim_uuid(external_id: &str) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("urn:cxone-sim:scim:{external_id}").as_bytes(),
    )
}

/// The external id of seeded user `n`.
pub(crate) fn seed_external_id(n: u64) -> String {
    format!("E{n:06}")
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl User {
    fn new(index: u64, external_id: String, interactions: u64, created: DateTime<Utc>) -> Self {
        Self {
            index,
            user_id: user_uuid(&external_id),
            scim_id: scim_uuid(&external_id),
            external_id,
            status: Status::Active,
            deleted_date: None,
            agent_active: true,
            termination_date: None,
            team_id: 100 + index % 5,
            skills: SEED_SKILLS
                .iter()
                .map(|&(id, proficiency)| {
                    (
                        id,
                        Skill {
                            proficiency,
                            is_active: true,
                        },
                    )
                })
                .collect(),
            logged_in: true,
            state: AgentState::Available,
            state_since: created,
            access_keys: vec![access_key_id(index)],
            interactions,
            created,
            refuse_delete: false,
            scim_active: true,
            scim_version: 1,
            writes: BTreeMap::new(),
            user_name_override: None,
            email_override: None,
            has_external_id: true,
        }
    }

    pub fn agent_id(&self) -> u64 {
        AGENT_ID_BASE + self.index
    }

    pub fn user_name(&self) -> String {
        self.user_name_override
            .clone()
            .unwrap_or_else(|| format!("user{}@sim.example", self.index))
    }

    pub fn email(&self) -> String {
        self.email_override
            .clone()
            .or_else(|| self.user_name_override.clone())
            .unwrap_or_else(|| format!("user{}@sim.example", self.index))
    }

    /// `externalIdentity` as UserHub shows it.
    pub fn external_identity(&self) -> Option<&str> {
        self.has_external_id.then_some(self.external_id.as_str())
    }

    /// An administrator sets the status by hand: `ACTIVE` re-enables the account (UserHub
    /// status and agent), `DELETED` deactivates it.
    pub fn set_status(&mut self, status: Status) {
        self.status = status;
        match status {
            Status::Active => {
                self.deleted_date = None;
                self.agent_active = true;
                self.scim_active = true;
            }
            Status::Deleted => {
                self.deleted_date = Some(Utc::now());
                self.agent_active = false;
            }
        }
    }

    pub fn first_name(&self) -> String {
        format!("User{}", self.index)
    }

    /// Counts one applied write under its `METHOD route-template`.
    pub fn count_write(&mut self, route: &str) {
        *self.writes.entry(route.to_owned()).or_insert(0) += 1;
    }

    /// Sets the real-time state; `LoggedOut` ends the session, any other state starts one.
    pub fn set_state(&mut self, state: AgentState) {
        self.state = state;
        self.logged_in = state != AgentState::LoggedOut;
        self.state_since = Utc::now();
    }

    pub fn history(&self) -> History {
        History {
            user_index: self.index,
            agent_id: self.agent_id(),
            team_id: self.team_id,
            count: self.interactions,
            created: self.created,
        }
    }

    /// The UserHub record (CXONE-API.md §2).
    pub fn userhub_view(&self) -> Value {
        let mut view = json!({
            "id": self.user_id,
            "userName": self.user_name(),
            "emailAddress": self.email(),
            "firstName": self.first_name(),
            "lastName": "Sim",
            "externalIdentity": self.external_identity(),
            "status": self.status.name(),
            "teamId": self.team_id,
            "createdDate": rfc3339(self.created),
        });
        if let (Some(at), Some(map)) = (self.deleted_date, view.as_object_mut()) {
            map.insert("deletedDate".to_owned(), json!(rfc3339(at)));
        }
        view
    }

    /// The agent record (CXONE-API.md §3).
    pub fn agent_view(&self) -> Value {
        let mut view = json!({
            "agentId": self.agent_id(),
            "userID": self.user_id,
            "userName": self.user_name(),
            "firstName": self.first_name(),
            "lastName": "Sim",
            "emailAddress": self.email(),
            "isActive": self.agent_active,
            "teamId": self.team_id,
            "externalIdentity": self.external_identity(),
        });
        if let (Some(date), Some(map)) = (&self.termination_date, view.as_object_mut()) {
            map.insert("terminationDate".to_owned(), json!(date));
        }
        view
    }

    /// The SCIM `User` resource (RFC 7643).
    pub fn scim_view(&self, base_url: &str) -> Value {
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "id": self.scim_id,
            "externalId": self.external_identity(),
            "userName": self.user_name(),
            "name": {"givenName": self.first_name(), "familyName": "Sim"},
            "emails": [{"value": self.email(), "type": "work", "primary": true}],
            "active": self.scim_active,
            "meta": {
                "resourceType": "User",
                "created": rfc3339(self.created),
                "location": format!("{base_url}/scim/v2/Users/{}", self.scim_id),
                "version": self.scim_etag(),
            },
        })
    }

    pub fn scim_etag(&self) -> String {
        format!("W/\"{}\"", self.scim_version)
    }

    /// The control-API view (CONTRACT §10) plus `writes`.
    pub fn control_view(&self) -> Value {
        json!({
            "user_id": self.user_id,
            "agent_id": self.agent_id(),
            "external_id": self.external_identity(),
            "handle": self.external_id,
            "user_name": self.user_name(),
            "email": self.email(),
            "scim_id": self.scim_id,
            "status": self.status.name(),
            "agent_active": self.agent_active,
            "scim_active": self.scim_active,
            "skills": self.skills.iter().map(|(id, skill)| json!({
                "skillId": id,
                "proficiency": skill.proficiency,
            })).collect::<Vec<_>>(),
            "logged_in": self.logged_in,
            "agent_state": self.state.name(),
            "access_keys": self.access_keys,
            "interactions": self.interactions,
            "refuse_delete": self.refuse_delete,
            "writes": self.writes,
        })
    }
}

/// The access key id of user number `index` (one key per user).
pub(crate) fn access_key_id(index: u64) -> String {
    format!("SIMAK{index:010}")
}

/// The user number an access key id belongs to.
pub(crate) fn parse_access_key_id(id: &str) -> Option<u64> {
    let digits = id.strip_prefix("SIMAK")?;
    if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Reverse index from the seeded users' UUIDs to their numbers.
pub(crate) struct SeedIndex {
    users: HashMap<Uuid, u64>,
    scim: HashMap<Uuid, u64>,
}

impl SeedIndex {
    pub fn build(users: u64) -> Self {
        let capacity = usize::try_from(users).unwrap_or(0);
        let mut index = Self {
            users: HashMap::with_capacity(capacity),
            scim: HashMap::with_capacity(capacity),
        };
        for n in 1..=users {
            let external_id = seed_external_id(n);
            index.users.insert(user_uuid(&external_id), n);
            index.scim.insert(scim_uuid(&external_id), n);
        }
        index
    }
}

impl Status {
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_uppercase().as_str() {
            "ACTIVE" => Some(Self::Active),
            "DELETED" => Some(Self::Deleted),
            _ => None,
        }
    }
}

/// Error of [`World::create`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum CreateError {
    #[error("user {0} already exists")]
    Exists(String),
    #[error("external_id must be 1 to 64 printable characters")]
    BadExternalId,
}

/// All users, seeded and created.
pub(crate) struct World {
    seeded: u64,
    interactions: u64,
    epoch: DateTime<Utc>,
    users: HashMap<u64, User>,
    custom_ids: HashMap<String, u64>,
    custom_uuids: HashMap<Uuid, u64>,
    custom_scim: HashMap<Uuid, u64>,
    /// Created users by lowercase username and by lowercase email.
    custom_names: HashMap<String, Vec<u64>>,
    custom_emails: HashMap<String, Vec<u64>>,
    customs: u64,
}

impl World {
    pub fn new(seeded: u64, interactions: u64, epoch: DateTime<Utc>) -> Self {
        Self {
            seeded,
            interactions,
            epoch,
            users: HashMap::new(),
            custom_ids: HashMap::new(),
            custom_uuids: HashMap::new(),
            custom_scim: HashMap::new(),
            custom_names: HashMap::new(),
            custom_emails: HashMap::new(),
            customs: 0,
        }
    }

    /// Number of users, seeded and created; user numbers are `1..=count()`.
    pub fn count(&self) -> u64 {
        self.seeded + self.customs
    }

    /// The user numbered `index`, materializing a seeded user on first touch.
    pub fn user(&mut self, index: u64) -> Option<&mut User> {
        if index == 0 || index > self.count() {
            return None;
        }
        let (seeded, interactions, epoch) = (self.seeded, self.interactions, self.epoch);
        if index <= seeded {
            Some(
                self.users.entry(index).or_insert_with(|| {
                    User::new(index, seed_external_id(index), interactions, epoch)
                }),
            )
        } else {
            self.users.get_mut(&index)
        }
    }

    pub fn by_external_id(&self, external_id: &str) -> Option<u64> {
        if let Some(&index) = self.custom_ids.get(external_id) {
            return Some(index);
        }
        let digits = external_id.strip_prefix('E')?;
        if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = digits.parse().ok()?;
        (n >= 1 && n <= self.seeded && seed_external_id(n) == external_id).then_some(n)
    }

    /// Every user whose `userName` is `name`, case-insensitively.
    pub fn by_user_name(&self, name: &str) -> Vec<u64> {
        self.by_name_or_email(name, &self.custom_names, |u| u.user_name_override.is_some())
    }

    /// Every user whose `emailAddress` is `email`, case-insensitively.
    pub fn by_email(&self, email: &str) -> Vec<u64> {
        self.by_name_or_email(email, &self.custom_emails, |u| {
            u.email_override.is_some() || u.user_name_override.is_some()
        })
    }

    fn by_name_or_email(
        &self,
        value: &str,
        custom: &HashMap<String, Vec<u64>>,
        overridden: impl Fn(&User) -> bool,
    ) -> Vec<u64> {
        let mut out: Vec<u64> = custom
            .get(&value.to_ascii_lowercase())
            .cloned()
            .unwrap_or_default();
        if let Some(n) = self.by_default_name(value)
            && !self.users.get(&n).is_some_and(&overridden)
            && !out.contains(&n)
        {
            out.push(n);
        }
        out.sort_unstable();
        out
    }

    /// The user whose default name (`user{n}@sim.example`) this is.
    fn by_default_name(&self, name: &str) -> Option<u64> {
        let lower = name.to_ascii_lowercase();
        let digits = lower.strip_prefix("user")?.strip_suffix("@sim.example")?;
        if digits.is_empty()
            || digits.starts_with('0')
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let n: u64 = digits.parse().ok()?;
        (n >= 1 && n <= self.count()).then_some(n)
    }

    /// Has user `n` an external id in UserHub (service accounts have none)?
    pub fn has_external_id(&self, n: u64) -> bool {
        self.users.get(&n).is_none_or(|u| u.has_external_id)
    }

    pub fn by_user_uuid(&self, seeds: &SeedIndex, id: Uuid) -> Option<u64> {
        seeds
            .users
            .get(&id)
            .or_else(|| self.custom_uuids.get(&id))
            .copied()
    }

    pub fn by_scim_id(&self, seeds: &SeedIndex, id: Uuid) -> Option<u64> {
        seeds
            .scim
            .get(&id)
            .or_else(|| self.custom_scim.get(&id))
            .copied()
    }

    /// By numeric agent id or user UUID, as `GET /agents/{userId}` accepts both.
    /// The seed index is only consulted (and built) for a UUID reference.
    pub fn by_agent_ref<'s>(
        &self,
        seeds: impl FnOnce() -> &'s SeedIndex,
        reference: &str,
    ) -> Option<u64> {
        if let Ok(agent_id) = reference.parse::<u64>() {
            return self.by_agent_id(agent_id);
        }
        let id = Uuid::parse_str(reference).ok()?;
        self.by_user_uuid(seeds(), id)
    }

    pub fn by_agent_id(&self, agent_id: u64) -> Option<u64> {
        let index = agent_id.checked_sub(AGENT_ID_BASE)?;
        (index >= 1 && index <= self.count()).then_some(index)
    }

    pub fn by_access_key(&self, id: &str) -> Option<u64> {
        let index = parse_access_key_id(id)?;
        (index >= 1 && index <= self.count()).then_some(index)
    }

    /// Gives a created user its own username and email.
    pub fn rename(&mut self, index: u64, user_name: Option<String>, email: Option<String>) {
        if let Some(name) = &user_name {
            self.custom_names
                .entry(name.to_ascii_lowercase())
                .or_default()
                .push(index);
        }
        if let Some(email) = email.as_ref().or(user_name.as_ref()) {
            self.custom_emails
                .entry(email.to_ascii_lowercase())
                .or_default()
                .push(index);
        }
        if let Some(user) = self.users.get_mut(&index) {
            user.user_name_override = user_name;
            user.email_override = email;
        }
    }

    /// Creates a service account: a user without an external id, addressed by a handle.
    pub fn create_without_external_id(
        &mut self,
        interactions: Option<u64>,
    ) -> Result<&mut User, CreateError> {
        let handle = format!("svc-{}", self.seeded + self.customs + 1);
        let user = self.create(&handle, interactions)?;
        user.has_external_id = false;
        Ok(user)
    }

    /// Creates a user outside the seeded range; it gets the next user number.
    pub fn create(
        &mut self,
        external_id: &str,
        interactions: Option<u64>,
    ) -> Result<&mut User, CreateError> {
        if external_id.is_empty()
            || external_id.len() > 64
            || external_id
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(CreateError::BadExternalId);
        }
        if self.by_external_id(external_id).is_some() {
            return Err(CreateError::Exists(external_id.to_owned()));
        }
        self.customs += 1;
        let index = self.seeded + self.customs;
        let user = User::new(
            index,
            external_id.to_owned(),
            interactions.unwrap_or(self.interactions),
            Utc::now(),
        );
        self.custom_ids.insert(external_id.to_owned(), index);
        self.custom_uuids.insert(user.user_id, index);
        self.custom_scim.insert(user.scim_id, index);
        Ok(self.users.entry(index).or_insert(user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> World {
        World::new(100, 20, Utc::now())
    }

    #[test]
    fn seeded_users_resolve_by_every_key() {
        let mut world = world();
        let seeds = SeedIndex::build(100);
        assert_eq!(world.by_external_id("E000007"), Some(7));
        assert_eq!(world.by_external_id("E0000007"), None);
        assert_eq!(world.by_external_id("E000101"), None);
        assert_eq!(world.by_user_name("USER7@sim.example"), vec![7]);
        assert!(world.by_user_name("user07@sim.example").is_empty());
        let user = world.user(7).expect("seeded user 7").clone();
        assert_eq!(world.by_user_uuid(&seeds, user.user_id), Some(7));
        assert_eq!(world.by_scim_id(&seeds, user.scim_id), Some(7));
        assert_ne!(user.user_id, user.scim_id);
        assert_eq!(world.by_agent_ref(|| &seeds, "1007"), Some(7));
        assert_eq!(
            world.by_agent_ref(|| &seeds, &user.user_id.to_string()),
            Some(7)
        );
        assert_eq!(world.by_agent_ref(|| &seeds, "999"), None);
        assert_eq!(world.by_access_key(&user.access_keys[0]), Some(7));
    }

    #[test]
    fn created_users_follow_the_seeded_ones() {
        let mut world = world();
        let user = world.create("X-1", Some(5)).expect("created");
        assert_eq!(user.index, 101);
        assert_eq!(user.agent_id(), 1101);
        assert!(matches!(
            world.create("X-1", None),
            Err(CreateError::Exists(_))
        ));
        assert!(matches!(
            world.create("E000001", None),
            Err(CreateError::Exists(_))
        ));
        assert!(matches!(
            world.create("", None),
            Err(CreateError::BadExternalId)
        ));
        assert_eq!(world.by_external_id("X-1"), Some(101));
        assert_eq!(world.by_user_name("user101@sim.example"), vec![101]);
        // Two people may share a username over time.
        world.rename(101, Some("jane@acme.example".into()), None);
        let second = world.create("X-2", None).expect("created").index;
        world.rename(second, Some("Jane@acme.example".into()), None);
        assert_eq!(world.by_user_name("jane@ACME.example"), vec![101, 102]);
        assert_eq!(world.by_email("jane@acme.example"), vec![101, 102]);
        assert!(world.by_user_name("user101@sim.example").is_empty());
        let svc = world.create_without_external_id(None).expect("created");
        assert_eq!(svc.external_identity(), None);
    }

    #[test]
    fn agent_states_parse_case_insensitively() {
        assert_eq!(
            AgentState::parse("inboundcontact"),
            Some(AgentState::InboundContact)
        );
        assert!(AgentState::InboundContact.on_interaction());
        assert!(!AgentState::Available.on_interaction());
        assert_eq!(AgentState::parse("Busy"), None);
    }
}
