//! Integration tests of the CXone simulator: every endpoint driven over real HTTP against a
//! simulator bound in-process on 127.0.0.1:0.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use cxone_offboard::sim::{RetryAfter, SimOptions, SimServer, spawn};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const API: &str = "/inContactAPI/services/v31.0";

struct TestSim {
    server: SimServer,
    http: reqwest::Client,
    token: String,
}

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn start(opts: SimOptions) -> TestSim {
    let server = spawn(opts, any_port()).await.expect("simulator starts");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let mut sim = TestSim {
        server,
        http,
        token: String::new(),
    };
    sim.token = sim.access_key_token("sim-key", "sim-secret").await;
    sim
}

async fn default_sim() -> TestSim {
    start(SimOptions::default()).await
}

impl TestSim {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base_url())
    }

    async fn access_key_token(&self, id: &str, secret: &str) -> String {
        let response = self
            .http
            .post(self.url("/authentication/v1/token/access-key"))
            .json(&json!({"accessKeyId": id, "accessKeySecret": secret}))
            .send()
            .await
            .expect("token request");
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.expect("token body");
        body["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    /// An authenticated request; `body` is sent as JSON when given.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> reqwest::Response {
        let mut request = self
            .http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
            .header("Accept", "application/json");
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.expect("request is answered")
    }

    async fn json(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let response = self.call(method, path, body).await;
        let status = response.status();
        let text = response.text().await.expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("JSON body ({e}): {text}"))
        };
        (status, value)
    }

    async fn control(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("control request");
        let status = response.status();
        (status, response.json().await.expect("control JSON"))
    }

    async fn user(&self, external_id: &str) -> Value {
        let (status, body) = self
            .control(Method::GET, &format!("/_sim/users/{external_id}"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn faults(&self, faults: Value) {
        let (status, body) = self
            .control(Method::POST, "/_sim/faults", Some(faults))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    async fn stats(&self) -> Value {
        self.control(Method::GET, "/_sim/stats", None).await.1
    }
}

fn jwt_payload(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("JWT has a payload");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url payload");
    serde_json::from_slice(&raw).expect("JSON payload")
}

#[tokio::test]
async fn sim_discovery_and_access_key_token() {
    let sim = default_sim().await;
    let base = sim.server.base_url();
    let openid: Value = sim
        .http
        .get(sim.url("/.well-known/openid-configuration"))
        .send()
        .await
        .expect("openid")
        .json()
        .await
        .expect("json");
    assert_eq!(openid["issuer"], base);
    assert_eq!(openid["token_endpoint"], format!("{base}/auth/token"));

    let response = sim
        .http
        .post(sim.url("/authentication/v1/token/access-key"))
        .json(&json!({"accessKeyId": "sim-key", "accessKeySecret": "sim-secret"}))
        .send()
        .await
        .expect("token");
    let token: Value = response.json().await.expect("json");
    assert_eq!(token["token_type"], "Bearer");
    assert_eq!(token["expires_in"], 3600);
    let claims = jwt_payload(token["id_token"].as_str().expect("id_token"));
    let tenant = claims["tenantId"]
        .as_str()
        .expect("tenantId claim")
        .to_owned();
    assert_eq!(claims["iss"], base);
    assert!(claims["exp"].as_i64().expect("exp") > Utc::now().timestamp());

    let cxone: Value = sim
        .http
        .get(sim.url(&format!(
            "/.well-known/cxone-configuration?tenantId={tenant}"
        )))
        .send()
        .await
        .expect("cxone-configuration")
        .json()
        .await
        .expect("json");
    assert_eq!(cxone["api_endpoint"], base);
    assert_eq!(cxone["auth_endpoint"], base);
    assert_eq!(cxone["area"], "na1");
    assert_eq!(cxone["tenantId"], tenant.as_str());
    let missing = sim
        .http
        .get(sim.url("/.well-known/cxone-configuration"))
        .send()
        .await
        .expect("answer");
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);

    let wrong = sim
        .http
        .post(sim.url("/authentication/v1/token/access-key"))
        .json(&json!({"accessKeyId": "sim-key", "accessKeySecret": "nope"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let garbage = sim
        .http
        .post(sim.url("/authentication/v1/token/access-key"))
        .body("{not json")
        .send()
        .await
        .expect("answer");
    assert_eq!(garbage.status(), StatusCode::BAD_REQUEST);
    let body: Value = garbage.json().await.expect("JSON error");
    assert!(body["error_description"].is_string());
}

#[tokio::test]
async fn sim_password_grant() {
    let sim = default_sim().await;
    let post = |body: &'static str| {
        sim.http
            .post(sim.url("/auth/token"))
            .basic_auth("any-client", Some("any-secret"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    let response = post("grant_type=password&username=sim-key&password=sim-secret")
        .await
        .expect("token");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    let token = body["access_token"].as_str().expect("token");
    assert!(jwt_payload(body["id_token"].as_str().expect("id_token"))["tenantId"].is_string());
    let agent = sim
        .http
        .get(sim.url(&format!("{API}/agents/1001")))
        .bearer_auth(token)
        .send()
        .await
        .expect("agent");
    assert_eq!(agent.status(), StatusCode::OK);

    let wrong = post("grant_type=password&username=sim-key&password=bad")
        .await
        .expect("answer");
    assert_eq!(wrong.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        wrong.json::<Value>().await.expect("json")["error"],
        "invalid_grant"
    );
    let grant = post("grant_type=client_credentials").await.expect("answer");
    assert_eq!(grant.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        grant.json::<Value>().await.expect("json")["error"],
        "unsupported_grant_type"
    );
}

#[tokio::test]
async fn sim_requires_bearer_token_and_json_accept() {
    let sim = default_sim().await;
    let url = sim.url(&format!("{API}/agents/1001"));
    let none = sim.http.get(&url).send().await.expect("answer");
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    let unknown = sim
        .http
        .get(&url)
        .bearer_auth("made-up")
        .send()
        .await
        .expect("answer");
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        unknown.json::<Value>().await.expect("json")["error"],
        "invalid_token"
    );
    let html = sim
        .http
        .get(&url)
        .bearer_auth(&sim.token)
        .header("Accept", "text/html")
        .send()
        .await
        .expect("answer");
    assert_eq!(html.status(), StatusCode::NOT_ACCEPTABLE);
    let any = sim
        .http
        .get(&url)
        .bearer_auth(&sim.token)
        .header("Accept", "*/*")
        .send()
        .await
        .expect("answer");
    assert_eq!(any.status(), StatusCode::OK);
    let stats = sim.stats().await;
    let route = &stats["by_route"][format!(
        "GET {}/agents/{{agentId}}",
        "/inContactAPI/services/{version}"
    )];
    assert_eq!(route["401"], 2);
    assert_eq!(route["406"], 1);
    assert_eq!(route["200"], 1);
    assert_eq!(stats["total"], 4);
}

#[tokio::test]
async fn sim_tokens_expire_and_can_be_revoked() {
    let sim = start(SimOptions {
        token_ttl: Duration::from_millis(400),
        ..SimOptions::default()
    })
    .await;
    let path = format!("{API}/agents/1001");
    assert_eq!(
        sim.call(Method::GET, &path, None).await.status(),
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let expired = sim.call(Method::GET, &path, None).await;
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
    assert!(expired.headers().contains_key("www-authenticate"));

    // A longer lifetime set at runtime, then revocation of everything issued.
    sim.faults(json!({"token_ttl_secs": 60})).await;
    let fresh = sim.access_key_token("sim-key", "sim-secret").await;
    let sim = TestSim {
        token: fresh,
        ..sim
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        sim.call(Method::GET, &path, None).await.status(),
        StatusCode::OK
    );
    sim.faults(json!({"revoke_tokens": true})).await;
    assert_eq!(
        sim.call(Method::GET, &path, None).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn sim_userhub_search_get_deactivate_revive() {
    let sim = default_sim().await;
    let search = |filter: Value| {
        sim.json(
            Method::POST,
            "/user-management/v2/users/search",
            Some(json!({"filter": filter, "skip": 0, "top": 2})),
        )
    };
    let (status, found) = search(json!({"externalIdentity": ["E000007"]})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(found["totalRecords"], 1);
    let user = found["users"][0].clone();
    assert_eq!(user["externalIdentity"], "E000007");
    assert_eq!(user["userName"], "user7@sim.example");
    assert_eq!(user["emailAddress"], "user7@sim.example");
    assert_eq!(user["status"], "ACTIVE");
    let id = user["id"].as_str().expect("id").to_owned();
    assert_eq!(
        search(json!({"userName": ["user7@sim.example"]})).await.1["users"][0]["id"],
        id
    );
    assert_eq!(
        search(json!({"emailAddress": ["USER7@sim.example"]}))
            .await
            .1["users"][0]["id"],
        id
    );
    let (status, none) = search(json!({"externalIdentity": ["E999999"]})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(none["users"], json!([]));
    assert_eq!(
        search(json!({"favouriteColour": ["blue"]})).await.0,
        StatusCode::BAD_REQUEST
    );

    let (status, got) = sim
        .json(
            Method::GET,
            &format!("/user-management/v3/users/{id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["user"]["externalIdentity"], "E000007");
    let missing = format!("/user-management/v3/users/{}", uuid::Uuid::nil());
    assert_eq!(
        sim.json(Method::GET, &missing, None).await.0,
        StatusCode::NOT_FOUND
    );

    let (status, result) = sim
        .json(
            Method::POST,
            "/user-management/v1/users/deactivate",
            Some(json!({"userIds": [id]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(result["notDeletedUserIds"], json!([]));
    let deleted = search(json!({"externalIdentity": ["E000007"]})).await.1;
    assert_eq!(deleted["users"][0]["status"], "DELETED");
    assert!(deleted["users"][0]["deletedDate"].is_string());
    let control = sim.user("E000007").await;
    assert_eq!(control["status"], "DELETED");
    assert_eq!(
        control["writes"]["POST /user-management/v1/users/deactivate"],
        1
    );
    // The agent record survives the soft delete.
    assert_eq!(
        sim.json(Method::GET, &format!("{API}/agents/{id}"), None)
            .await
            .0,
        StatusCode::OK
    );

    let (status, revived) = sim
        .json(
            Method::POST,
            &format!("/user-management/v1/users/{id}/revive"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(revived, json!({"success": true, "uuid": id}));
    assert_eq!(sim.user("E000007").await["status"], "ACTIVE");

    // A user configured as refusing stays ACTIVE and is reported.
    let (status, created) = sim
        .control(
            Method::POST,
            "/_sim/users",
            Some(json!({"external_id": "IDP-1", "refuse_delete": true})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let idp = created["user_id"].as_str().expect("user_id").to_owned();
    let (_, refused) = sim
        .json(
            Method::POST,
            "/user-management/v1/users/deactivate",
            Some(json!({"userIds": [idp]})),
        )
        .await;
    assert_eq!(refused["notDeletedUserIds"], json!([idp]));
    assert_eq!(sim.user("IDP-1").await["status"], "ACTIVE");
}

#[tokio::test]
async fn sim_agents_get_and_put() {
    let sim = default_sim().await;
    let (status, by_number) = sim
        .json(Method::GET, &format!("{API}/agents/1003"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let agent = &by_number["agents"][0];
    assert_eq!(agent["agentId"], 1003);
    assert_eq!(agent["isActive"], true);
    let user_id = agent["userID"].as_str().expect("userID");
    // Any version string works, and the UUID resolves to the same agent.
    let (status, by_uuid) = sim
        .json(
            Method::GET,
            &format!("/inContactAPI/services/v12.0/agents/{user_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(by_uuid["agents"][0]["agentId"], 1003);
    assert_eq!(
        sim.json(Method::GET, &format!("{API}/agents/99999"), None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        sim.json(Method::GET, &format!("{API}/agents/not-an-id"), None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    let (status, updated) = sim
        .json(
            Method::PUT,
            &format!("{API}/agents/1003"),
            Some(json!({"agent": {"isActive": false, "terminationDate": "2026-03-01T00:00:00Z"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(updated["agents"][0]["isActive"], false);
    assert_eq!(
        updated["agents"][0]["terminationDate"],
        "2026-03-01T00:00:00Z"
    );
    let control = sim.user("E000003").await;
    assert_eq!(control["agent_active"], false);
    assert_eq!(
        control["writes"]["PUT /inContactAPI/services/{version}/agents/{agentId}"],
        1
    );
    let (_, undone) = sim
        .json(
            Method::PUT,
            &format!("{API}/agents/1003"),
            Some(json!({"agent": {"isActive": true}})),
        )
        .await;
    assert_eq!(undone["agents"][0]["isActive"], true);
    assert!(undone["agents"][0].get("terminationDate").is_none());
    assert_eq!(
        sim.json(
            Method::PUT,
            &format!("{API}/agents/1003"),
            Some(json!({"isActive": false}))
        )
        .await
        .0,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn sim_skills_get_delete_post() {
    let sim = default_sim().await;
    let path = format!("{API}/agents/1004/skills");
    let (status, skills) = sim.json(Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    let assignments = skills["agentSkillAssignments"].as_array().expect("list");
    assert_eq!(assignments.len(), 2);
    assert_eq!(assignments[0]["skillId"], 11);
    assert!(assignments[0]["agentProficiencyValue"].is_number());

    let (status, removed) = sim
        .json(
            Method::DELETE,
            &path,
            Some(json!({"skills": [{"skillId": 11}, {"skillId": 77}]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(removed["resultSet"]["errorCount"], 1);
    assert_eq!(
        removed["resultSet"]["skillResults"][0],
        json!({"skillId": 11, "success": true})
    );
    assert_eq!(removed["resultSet"]["skillResults"][1]["success"], false);
    assert!(removed["resultSet"]["skillResults"][1]["error"].is_string());
    assert_eq!(
        sim.user("E000004").await["skills"],
        json!([{"skillId": 12, "proficiency": 3}])
    );
    assert_eq!(
        sim.json(Method::DELETE, &path, None).await.0,
        StatusCode::BAD_REQUEST
    );

    let (status, added) = sim
        .json(
            Method::POST,
            &path,
            Some(json!({"skills": [{"skillId": 11, "isActive": true, "proficiency": 2}]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(added["resultSet"]["errorCount"], 0);
    assert_eq!(
        sim.user("E000004").await["skills"],
        json!([{"skillId": 11, "proficiency": 2}, {"skillId": 12, "proficiency": 3}])
    );
}

#[tokio::test]
async fn sim_logout_and_states() {
    let sim = default_sim().await;
    let states = format!("{API}/agents/1005/states");
    let (status, body) = sim.json(Method::GET, &states, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["agentStates"][0]["agentStateName"], "Available");
    assert!(body["agentStates"][0].get("contactId").is_none());

    let (status, _) = sim
        .control(
            Method::POST,
            "/_sim/users/E000005/state",
            Some(json!({"state": "InboundContact"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = sim.json(Method::GET, &states, None).await;
    assert_eq!(body["agentStates"][0]["agentStateName"], "InboundContact");
    assert!(body["agentStates"][0]["contactId"].is_number());

    for _ in 0..2 {
        let response = sim
            .call(Method::POST, &format!("{API}/agents/1005/logout"), None)
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    let (_, body) = sim.json(Method::GET, &states, None).await;
    assert_eq!(body["agentStates"][0]["agentStateName"], "LoggedOut");
    let control = sim.user("E000005").await;
    assert_eq!(control["logged_in"], false);
    assert_eq!(control["agent_state"], "LoggedOut");
    assert_eq!(
        control["writes"]["POST /inContactAPI/services/{version}/agents/{agentId}/logout"],
        2
    );
}

#[tokio::test]
async fn sim_access_keys_list_and_delete() {
    let sim = default_sim().await;
    let (status, list) = sim
        .json(
            Method::GET,
            &format!("{API}/access-keys?agentId=1006"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let key = list["accessKeys"][0]["accessKeyId"]
        .as_str()
        .expect("key")
        .to_owned();
    assert_eq!(list["accessKeys"][0]["isActive"], true);
    assert_eq!(sim.user("E000006").await["access_keys"], json!([key]));

    let delete = format!("{API}/access-keys/{key}");
    assert_eq!(
        sim.call(Method::DELETE, &delete, None).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        sim.json(Method::DELETE, &delete, None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        sim.json(Method::DELETE, &format!("{API}/access-keys/NOPE"), None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (_, list) = sim
        .json(
            Method::GET,
            &format!("{API}/access-keys?agentId=1006"),
            None,
        )
        .await;
    assert_eq!(list["accessKeys"], json!([]));
    assert_eq!(sim.user("E000006").await["access_keys"], json!([]));
    assert_eq!(
        sim.json(Method::GET, &format!("{API}/access-keys"), None)
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
}

fn date(value: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(value.as_str().expect("date string"))
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

#[tokio::test]
async fn sim_contacts_paging_walk_of_10000() {
    let sim = default_sim().await;
    let (status, created) = sim
        .control(
            Method::POST,
            "/_sim/users",
            Some(json!({"external_id": "BIG-1", "interactions": 10_000})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let agent = created["agent_id"].as_u64().expect("agent_id");
    let end = Utc::now() + chrono::Duration::minutes(1);
    let start = end - chrono::Duration::days(365);
    let first = format!(
        "{}{API}/contacts/completed?agentId={agent}&startDate={}&endDate={}&top=500",
        sim.server.base_url(),
        start.to_rfc3339(),
        end.to_rfc3339()
    );
    let mut seen = std::collections::HashSet::new();
    let mut next = Some(first.replace('+', "%2B"));
    let mut pages = 0;
    while let Some(url) = next.take() {
        let body: Value = sim
            .http
            .get(&url)
            .bearer_auth(&sim.token)
            .send()
            .await
            .expect("page")
            .json()
            .await
            .expect("JSON page");
        pages += 1;
        assert_eq!(body["totalRecords"], 10_000);
        let contacts = body["completedContacts"].as_array().expect("contacts");
        assert!(contacts.len() <= 100, "top is clamped to 100");
        for contact in contacts {
            assert!(
                seen.insert(contact["contactId"].as_u64().expect("contactId")),
                "duplicate contact"
            );
            let at = date(&contact["contactStartDate"]);
            assert!(at >= start && at < end, "{at} outside the range");
            assert!(date(&contact["contactEndDate"]) > at);
            assert_eq!(contact["agentId"], agent);
            for field in [
                "masterContactId",
                "skillId",
                "mediaTypeId",
                "fromAddr",
                "toAddr",
            ] {
                assert!(!contact[field].is_null(), "{field} missing");
            }
        }
        next = body["_links"]["next"].as_str().map(str::to_owned);
        assert!(pages <= 100, "paging does not end");
    }
    assert_eq!(pages, 100);
    assert_eq!(seen.len(), 10_000);

    // A narrower window holds exactly the contacts whose start lies in it.
    let window_start = end - chrono::Duration::days(200);
    let window_end = end - chrono::Duration::days(100);
    let path = format!(
        "{API}/contacts/completed?agentId={agent}&startDate={}&endDate={}&skip=0&top=100",
        window_start.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
        window_end.format("%Y-%m-%dT%H:%M:%S%.3fZ")
    );
    let (status, page) = sim.json(Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    let total = page["totalRecords"].as_u64().expect("total");
    assert!(
        (3_000..=3_700).contains(&total),
        "100 of 300 days hold about a third: {total}"
    );
    for contact in page["completedContacts"].as_array().expect("contacts") {
        let at = date(&contact["contactStartDate"]);
        assert!(at >= window_start && at < window_end);
    }
    let bad = format!("{API}/contacts/completed?agentId={agent}&startDate=yesterday");
    assert_eq!(
        sim.json(Method::GET, &bad, None).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        sim.json(Method::GET, &format!("{API}/contacts/completed"), None)
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        sim.json(
            Method::GET,
            &format!("{API}/contacts/completed?agentId=5"),
            None
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn sim_seeded_users_have_their_interactions() {
    let sim = start(SimOptions {
        users: 100_000,
        interactions_per_user: 1_000_000,
        ..SimOptions::default()
    })
    .await;
    assert_eq!(sim.user("E100000").await["interactions"], 1_000_000);
    let (status, page) = sim
        .json(
            Method::GET,
            &format!("{API}/contacts/completed?agentId=101000&skip=999990"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["totalRecords"], 1_000_000);
    assert_eq!(
        page["completedContacts"]
            .as_array()
            .expect("contacts")
            .len(),
        10
    );
    assert!(page["_links"].get("next").is_none());
}

#[tokio::test]
async fn sim_scim_users() {
    let sim = default_sim().await;
    let scim = |method: Method, path: String, body: Option<Value>| {
        let mut request = sim
            .http
            .request(method, sim.url(&path))
            .bearer_auth(&sim.token)
            .header("Accept", "application/scim+json");
        if let Some(body) = body {
            request = request
                .header("Content-Type", "application/scim+json")
                .body(body.to_string());
        }
        request.send()
    };
    let response = scim(
        Method::GET,
        "/scim/v2/Users?filter=externalId%20eq%20%22E000008%22".into(),
        None,
    )
    .await
    .expect("filter");
    assert_eq!(response.status(), StatusCode::OK);
    let list: Value = response.json().await.expect("json");
    assert_eq!(list["totalResults"], 1);
    let resource = &list["Resources"][0];
    assert_eq!(resource["externalId"], "E000008");
    assert_eq!(resource["active"], true);
    let id = resource["id"].as_str().expect("id").to_owned();
    assert_ne!(json!(id), sim.user("E000008").await["user_id"]);

    let none: Value = scim(
        Method::GET,
        "/scim/v2/Users?filter=externalId eq \"E999999\"".into(),
        None,
    )
    .await
    .expect("filter")
    .json()
    .await
    .expect("json");
    assert_eq!(none["totalResults"], 0);
    let bad = scim(
        Method::GET,
        "/scim/v2/Users?filter=title co \"x\"".into(),
        None,
    )
    .await
    .expect("answer");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        bad.json::<Value>().await.expect("json")["scimType"],
        "invalidFilter"
    );

    let got = scim(Method::GET, format!("/scim/v2/Users/{id}"), None)
        .await
        .expect("get");
    assert_eq!(got.status(), StatusCode::OK);
    let etag = got.headers()["etag"].to_str().expect("etag").to_owned();

    let patch = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "Replace", "path": "active", "value": false}],
    });
    let stale = sim
        .http
        .patch(sim.url(&format!("/scim/v2/Users/{id}")))
        .bearer_auth(&sim.token)
        .header("If-Match", "W/\"999\"")
        .body(patch.to_string())
        .send()
        .await
        .expect("answer");
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
    let patched = sim
        .http
        .patch(sim.url(&format!("/scim/v2/Users/{id}")))
        .bearer_auth(&sim.token)
        .header("If-Match", etag)
        .body(patch.to_string())
        .send()
        .await
        .expect("patch");
    assert_eq!(patched.status(), StatusCode::OK);
    assert_eq!(
        patched.json::<Value>().await.expect("json")["active"],
        false
    );
    assert_eq!(sim.user("E000008").await["scim_active"], false);

    let mut whole = resource.clone();
    whole["active"] = json!(true);
    let put = scim(Method::PUT, format!("/scim/v2/Users/{id}"), Some(whole))
        .await
        .expect("put");
    assert_eq!(put.status(), StatusCode::OK);
    assert_eq!(sim.user("E000008").await["scim_active"], true);

    let delete = scim(Method::DELETE, format!("/scim/v2/Users/{id}"), None)
        .await
        .expect("answer");
    assert_eq!(delete.status(), StatusCode::METHOD_NOT_ALLOWED);
    let error: Value = delete.json().await.expect("json");
    assert_eq!(error["status"], "405");
    assert_eq!(
        error["schemas"][0],
        "urn:ietf:params:scim:api:messages:2.0:Error"
    );

    let missing = scim(
        Method::GET,
        format!("/scim/v2/Users/{}", uuid::Uuid::nil()),
        None,
    )
    .await
    .expect("answer");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        missing.json::<Value>().await.expect("json")["status"],
        "404"
    );
    let garbage = sim
        .http
        .patch(sim.url(&format!("/scim/v2/Users/{id}")))
        .bearer_auth(&sim.token)
        .body("{")
        .send()
        .await
        .expect("answer");
    assert_eq!(garbage.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        garbage.json::<Value>().await.expect("json")["scimType"],
        "invalidSyntax"
    );
}

#[tokio::test]
async fn sim_control_api_users_stats_reset() {
    let sim = default_sim().await;
    let user = sim.user("E000001").await;
    for field in [
        "user_id",
        "agent_id",
        "external_id",
        "status",
        "agent_active",
        "scim_active",
        "skills",
        "logged_in",
        "agent_state",
        "access_keys",
        "interactions",
        "writes",
    ] {
        assert!(user.get(field).is_some(), "{field} missing");
    }
    assert_eq!(user["agent_id"], 1001);
    assert_eq!(user["interactions"], 20);
    assert_eq!(user["skills"].as_array().expect("skills").len(), 2);
    assert_eq!(user["logged_in"], true);
    assert_eq!(user["agent_state"], "Available");
    assert_eq!(
        sim.control(Method::GET, "/_sim/users/E000101", None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    let new = json!({
        "external_id": "NEW-1", "interactions": 3, "state": "OutboundContact",
        "skills": [{"skillId": 42, "proficiency": 1}],
    });
    let (status, created) = sim
        .control(Method::POST, "/_sim/users", Some(new.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["interactions"], 3);
    assert_eq!(created["agent_state"], "OutboundContact");
    assert_eq!(
        created["skills"],
        json!([{"skillId": 42, "proficiency": 1}])
    );
    assert_eq!(
        sim.control(Method::POST, "/_sim/users", Some(new)).await.0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        sim.control(
            Method::POST,
            "/_sim/users",
            Some(json!({"external_id": "E000002"}))
        )
        .await
        .0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        sim.control(
            Method::POST,
            "/_sim/users/NEW-1/state",
            Some(json!({"state": "Napping"}))
        )
        .await
        .0,
        StatusCode::BAD_REQUEST
    );

    sim.json(Method::GET, &format!("{API}/agents/1001"), None)
        .await;
    sim.json(Method::GET, &format!("{API}/agents/1001"), None)
        .await;
    sim.json(Method::GET, &format!("{API}/agents/5"), None)
        .await;
    sim.json(
        Method::POST,
        "/user-management/v2/users/search",
        Some(json!({"filter": {}})),
    )
    .await;
    let stats = sim.stats().await;
    assert_eq!(stats["total"], 4);
    assert_eq!(stats["throttled"], 0);
    assert_eq!(
        stats["by_route"]["GET /inContactAPI/services/{version}/agents/{agentId}"],
        json!({"200": 2, "404": 1})
    );
    assert_eq!(
        stats["by_route"]["POST /user-management/v2/users/search"],
        json!({"200": 1})
    );
    assert_eq!(
        stats["by_route"]["POST /authentication/v1/token/access-key"],
        json!({"200": 1})
    );

    sim.json(
        Method::PUT,
        &format!("{API}/agents/1001"),
        Some(json!({"agent": {"isActive": false}})),
    )
    .await;
    sim.faults(json!({"error_rate": 0.5})).await;
    let (status, _) = sim.control(Method::POST, "/_sim/reset", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sim.user("E000001").await["agent_active"], true);
    assert_eq!(
        sim.control(Method::GET, "/_sim/users/NEW-1", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        sim.stats().await,
        json!({"total": 0, "throttled": 0, "by_route": {}, "in_flight": {}})
    );
    assert_eq!(
        sim.control(Method::GET, "/_sim/faults", None).await.1["error_rate"],
        0.0
    );
    // Tokens survive a reset.
    assert_eq!(
        sim.call(Method::GET, &format!("{API}/agents/1001"), None)
            .await
            .status(),
        StatusCode::OK
    );
}

async fn throttled_retry_after(form: RetryAfter) -> Option<String> {
    let sim = start(SimOptions {
        rate_limit: Some(1.0),
        burst: 2,
        retry_after: form,
        ..SimOptions::default()
    })
    .await;
    let path = format!("{API}/agents/1001");
    assert_eq!(
        sim.call(Method::GET, &path, None).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        sim.call(Method::GET, &path, None).await.status(),
        StatusCode::OK
    );
    let throttled = sim.call(Method::GET, &path, None).await;
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    let header = throttled
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let stats = sim.stats().await;
    assert_eq!(stats["throttled"], 1);
    assert_eq!(stats["total"], 3);
    assert_eq!(
        stats["by_route"]["GET /inContactAPI/services/{version}/agents/{agentId}"]["429"],
        1
    );
    // The control API is never throttled.
    for _ in 0..5 {
        assert_eq!(
            sim.control(Method::GET, "/_sim/stats", None).await.0,
            StatusCode::OK
        );
    }
    header
}

#[tokio::test]
async fn sim_throttling_with_retry_after_seconds() {
    let header = throttled_retry_after(RetryAfter::Seconds)
        .await
        .expect("Retry-After");
    assert_eq!(header, "1");
}

#[tokio::test]
async fn sim_throttling_with_retry_after_http_date() {
    let header = throttled_retry_after(RetryAfter::HttpDate)
        .await
        .expect("Retry-After");
    let at = httpdate::parse_http_date(&header).expect("an HTTP-date");
    assert!(at > SystemTime::now() - Duration::from_secs(1));
    assert!(at < SystemTime::now() + Duration::from_secs(5));
}

#[tokio::test]
async fn sim_throttling_without_retry_after() {
    assert_eq!(throttled_retry_after(RetryAfter::None).await, None);
}

#[tokio::test]
async fn sim_throttling_recovers_and_form_changes_at_runtime() {
    let sim = start(SimOptions {
        rate_limit: Some(5.0),
        burst: 1,
        ..SimOptions::default()
    })
    .await;
    let path = format!("{API}/agents/1001");
    assert_eq!(
        sim.call(Method::GET, &path, None).await.status(),
        StatusCode::OK
    );
    sim.faults(json!({"retry_after": "none"})).await;
    let throttled = sim.call(Method::GET, &path, None).await;
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(throttled.headers().get("retry-after").is_none());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        sim.call(Method::GET, &path, None).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn sim_fault_error_rate_status_and_routes() {
    let sim = default_sim().await;
    sim.faults(json!({
        "error_rate": 1.0, "status": 502,
        "routes": ["GET /inContactAPI/services/{version}/agents/{agentId}/skills"],
    }))
    .await;
    let (status, body) = sim
        .json(Method::GET, &format!("{API}/agents/1001/skills"), None)
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body["error"].is_string());
    assert_eq!(
        sim.json(Method::GET, &format!("{API}/agents/1001"), None)
            .await
            .0,
        StatusCode::OK
    );
    sim.faults(json!({"error_rate": 1.0})).await;
    assert_eq!(
        sim.json(Method::GET, &format!("{API}/agents/1001"), None)
            .await
            .0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    sim.faults(json!({})).await;
    assert_eq!(
        sim.json(Method::GET, &format!("{API}/agents/1001"), None)
            .await
            .0,
        StatusCode::OK
    );
    let (status, body) = sim
        .control(Method::POST, "/_sim/faults", Some(json!({"bogus": 1})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error_description"].is_string());
    assert_eq!(
        sim.control(Method::POST, "/_sim/faults", Some(json!({"error_rate": 3})))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn sim_fault_latency() {
    let sim = default_sim().await;
    sim.faults(json!({"latency_ms": 300})).await;
    let began = std::time::Instant::now();
    assert_eq!(
        sim.call(Method::GET, &format!("{API}/agents/1001"), None)
            .await
            .status(),
        StatusCode::OK
    );
    assert!(began.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn sim_fault_per_user_steps() {
    let sim = default_sim().await;
    sim.faults(json!({"users": {
        "E000007": {"delete": 403, "logout": 500, "archive": 504, "revoke_keys": 409,
                    "unassign_skills": 503, "block_login": 400},
        "E000009": {"delete": "refuse", "resolve": 500},
    }}))
    .await;
    let id7 = sim.user("E000007").await["user_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let key7 = sim.user("E000007").await["access_keys"][0]
        .as_str()
        .expect("key")
        .to_owned();
    let deactivate = |id: String| {
        sim.json(
            Method::POST,
            "/user-management/v1/users/deactivate",
            Some(json!({"userIds": [id]})),
        )
    };
    assert_eq!(deactivate(id7.clone()).await.0, StatusCode::FORBIDDEN);
    assert_eq!(sim.user("E000007").await["status"], "ACTIVE");
    assert_eq!(
        sim.call(Method::POST, &format!("{API}/agents/1007/logout"), None)
            .await
            .status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        sim.call(
            Method::GET,
            &format!("{API}/contacts/completed?agentId=1007"),
            None
        )
        .await
        .status(),
        StatusCode::GATEWAY_TIMEOUT
    );
    assert_eq!(
        sim.call(Method::DELETE, &format!("{API}/access-keys/{key7}"), None)
            .await
            .status(),
        StatusCode::CONFLICT
    );
    assert_eq!(
        sim.call(
            Method::DELETE,
            &format!("{API}/agents/1007/skills"),
            Some(json!({"skills": [{"skillId": 11}]}))
        )
        .await
        .status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        sim.call(
            Method::PUT,
            &format!("{API}/agents/1007"),
            Some(json!({"agent": {"isActive": false}}))
        )
        .await
        .status(),
        StatusCode::BAD_REQUEST
    );
    let user7 = sim.user("E000007").await;
    assert_eq!(user7["writes"], json!({}));
    assert_eq!(user7["logged_in"], true);
    // Other users and other steps are untouched.
    assert_eq!(
        sim.call(Method::POST, &format!("{API}/agents/1008/logout"), None)
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        sim.call(Method::GET, &format!("{API}/agents/1007"), None)
            .await
            .status(),
        StatusCode::OK
    );

    let id9 = sim.user("E000009").await["user_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (status, refused) = deactivate(id9.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(refused["notDeletedUserIds"], json!([id9]));
    assert_eq!(sim.user("E000009").await["status"], "ACTIVE");
    let search = sim
        .json(
            Method::POST,
            "/user-management/v2/users/search",
            Some(json!({"filter": {"externalIdentity": ["E000009"]}})),
        )
        .await;
    assert_eq!(search.0, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        sim.call(Method::GET, &format!("{API}/agents/1009"), None)
            .await
            .status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
}

#[tokio::test]
async fn sim_fault_malformed_json() {
    let sim = default_sim().await;
    sim.faults(json!({"malformed_json": true})).await;
    let response = sim
        .call(Method::GET, &format!("{API}/agents/1001"), None)
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.expect("body");
    assert!(
        serde_json::from_str::<Value>(&text).is_err(),
        "body should be invalid: {text}"
    );
    sim.faults(json!({"malformed_json": 0.0})).await;
    assert_eq!(
        sim.json(Method::GET, &format!("{API}/agents/1001"), None)
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn sim_fault_connection_reset() {
    let sim = default_sim().await;
    sim.faults(json!({"reset_connections": 1.0})).await;
    let result = sim
        .http
        .get(sim.url(&format!("{API}/agents/1001")))
        .bearer_auth(&sim.token)
        .send()
        .await;
    let error = result.expect_err("the connection is dropped without an answer");
    assert!(error.status().is_none());
    let stats = sim.stats().await;
    assert_eq!(
        stats["by_route"]["GET /inContactAPI/services/{version}/agents/{agentId}"]["reset"],
        1
    );
    sim.faults(json!({})).await;
    assert_eq!(
        sim.call(Method::GET, &format!("{API}/agents/1001"), None)
            .await
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn sim_fault_paging_loop() {
    let sim = default_sim().await;
    sim.faults(json!({"paging_loop": true})).await;
    let (_, page) = sim
        .json(
            Method::GET,
            &format!("{API}/contacts/completed?agentId=1001&top=5"),
            None,
        )
        .await;
    assert_eq!(page["_links"]["next"], page["_links"]["self"]);
    sim.faults(json!({})).await;
    let (_, page) = sim
        .json(
            Method::GET,
            &format!("{API}/contacts/completed?agentId=1001&top=5&skip=15"),
            None,
        )
        .await;
    assert!(
        page["_links"].get("next").is_none(),
        "last page has no next"
    );
}

#[tokio::test]
async fn sim_http_correctness() {
    let sim = default_sim().await;
    let unknown = sim
        .http
        .get(sim.url("/no/such/route"))
        .send()
        .await
        .expect("answer");
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert!(unknown.json::<Value>().await.expect("JSON 404")["error"].is_string());
    let wrong = sim
        .http
        .patch(sim.url(&format!("{API}/agents/1001/logout")))
        .bearer_auth(&sim.token)
        .send()
        .await
        .expect("answer");
    assert_eq!(wrong.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(wrong.json::<Value>().await.expect("JSON 405")["error"].is_string());
    for (method, path) in [
        (Method::POST, "/user-management/v2/users/search".to_owned()),
        (
            Method::POST,
            "/user-management/v1/users/deactivate".to_owned(),
        ),
        (Method::PUT, format!("{API}/agents/1001")),
        (Method::POST, format!("{API}/agents/1001/skills")),
    ] {
        let response = sim
            .http
            .request(method, sim.url(&path))
            .bearer_auth(&sim.token)
            .header("Content-Type", "application/json")
            .body("{\"filter\": [")
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        assert!(response.json::<Value>().await.expect("JSON 400")["error_description"].is_string());
    }
    let odd = sim
        .http
        .get(sim.url(&format!("{API}/contacts/completed?agentId=%FF%FE&skip=-1")))
        .bearer_auth(&sim.token)
        .send()
        .await
        .expect("answer");
    assert_eq!(odd.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn sim_shutdown_stops_serving() {
    let sim = default_sim().await;
    let url = sim.url("/_sim/stats");
    let TestSim { server, .. } = sim;
    server.shutdown().await;
    let client = reqwest::Client::new();
    assert!(client.get(&url).send().await.is_err());
}

/// Runs every `curl` line of docs/simulator.md (against this test's port) and checks it succeeds.
#[tokio::test]
async fn sim_doc_curl_examples_work() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("curl is not installed; skipping");
        return;
    }
    let sim = start(SimOptions::default()).await;
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/simulator.md"))
        .expect("docs/simulator.md");
    let mut script = String::from("set -eu\n");
    let mut in_block = false;
    let mut count = 0;
    for line in doc.lines() {
        if line.starts_with("```") {
            in_block = line.trim() == "```sh";
            continue;
        }
        if in_block && !line.contains("cargo run") && !line.trim_start().starts_with('#') {
            script.push_str(&line.replace("http://127.0.0.1:8088", &sim.server.base_url()));
            script.push('\n');
            count += line.matches("curl ").count();
        }
    }
    assert!(count >= 5, "the doc shows curl examples");
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .await
        .expect("sh runs");
    assert!(
        output.status.success(),
        "doc examples failed:\n{script}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
