//! Evidence in S3: the interaction archive (CXone completed contacts streamed as NDJSON into a
//! multipart upload, SHA-256 over the whole object, flat memory whatever the history size) and
//! the write-once audit manifest with a hash chain over the step records.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::cxone::Cxone;
use crate::saga::journal::{ArchiveRecord, FinalStatus, Journal, ManifestRecord, StepName};
use crate::saga::{Run, StepError, StepResult};
use crate::store::{Part, Store, StoreError, Write};

/// Multipart part size: S3's minimum (5 MiB) for all parts but the last, to keep memory flat.
pub const PART_SIZE: usize = 5 * 1024 * 1024;

pub const NDJSON: &str = "application/x-ndjson";

pub fn archive_key(external_id: &str, saga_id: &str) -> String {
    format!("archives/{external_id}/{saga_id}/interactions.ndjson")
}

pub fn manifest_key(external_id: &str, saga_id: &str) -> String {
    format!("manifests/{external_id}/{saga_id}.json")
}

pub fn rescind_manifest_key(external_id: &str, saga_id: &str) -> String {
    format!("manifests/{external_id}/{saga_id}.rescind.json")
}

/// Streams NDJSON into the store: one PUT when it stays small, multipart when it grows.
pub struct ArchiveWriter<'a, S: Store> {
    store: &'a S,
    key: String,
    buffer: Vec<u8>,
    upload: Option<String>,
    parts: Vec<Part>,
    hasher: Sha256,
    records: u64,
    bytes: u64,
}

impl<'a, S: Store> ArchiveWriter<'a, S> {
    /// Aborts any upload a crashed run left behind for `key`, then starts afresh.
    pub async fn begin(store: &'a S, key: String) -> Result<Self, StoreError> {
        for stale in store.pending_uploads(&key).await? {
            warn!(%key, "aborting a stale multipart upload from an earlier run");
            store.abort_upload(&key, &stale).await?;
        }
        Ok(Self {
            store,
            key,
            // Grows with the history: thousands of sagas may hold a writer at once while their
            // page requests wait for the quota, and most histories are a few kilobytes.
            buffer: Vec::new(),
            upload: None,
            parts: Vec::new(),
            hasher: Sha256::new(),
            records: 0,
            bytes: 0,
        })
    }

    /// Appends one record as a line.
    pub async fn push(&mut self, record: &[u8]) -> Result<(), StoreError> {
        self.buffer.extend_from_slice(record);
        self.buffer.push(b'\n');
        self.records += 1;
        if self.buffer.len() >= PART_SIZE {
            self.flush_part().await?;
        }
        Ok(())
    }

    async fn flush_part(&mut self) -> Result<(), StoreError> {
        let upload = match &self.upload {
            Some(u) => u.clone(),
            None => {
                let u = self.store.start_upload(&self.key, NDJSON).await?;
                self.upload = Some(u.clone());
                u
            }
        };
        // The next part's buffer starts small: only one full part is in memory at a time.
        let chunk = std::mem::take(&mut self.buffer);
        self.hasher.update(&chunk);
        self.bytes += chunk.len() as u64;
        let number = i32::try_from(self.parts.len() + 1).unwrap_or(i32::MAX);
        let part = self
            .store
            .upload_part(&self.key, &upload, number, Bytes::from(chunk))
            .await?;
        self.parts.push(part);
        Ok(())
    }

    /// Completes the object; returns (hex sha256, records, bytes).
    pub async fn finish(mut self) -> Result<(String, u64, u64), StoreError> {
        if self.upload.is_none() {
            let body = std::mem::take(&mut self.buffer);
            self.hasher.update(&body);
            self.bytes = body.len() as u64;
            self.store
                .put(&self.key, Bytes::from(body), NDJSON, Write::Always)
                .await?;
        } else {
            if !self.buffer.is_empty() {
                self.flush_part().await?;
            }
            let upload = self.upload.clone().unwrap_or_default();
            self.store
                .complete_upload(&self.key, &upload, std::mem::take(&mut self.parts))
                .await?;
        }
        let sha = hex::encode(self.hasher.clone().finalize());
        Ok((sha, self.records, self.bytes))
    }

    /// Gives up: no object, no orphaned parts.
    pub async fn abort(self) {
        if let Some(upload) = &self.upload
            && let Err(e) = self.store.abort_upload(&self.key, upload).await
        {
            warn!(error = %e, key = %self.key, "could not abort the multipart upload; the next run will");
        }
    }
}

/// The `archive` step.
pub(crate) async fn archive_step<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
    lookback_days: u32,
) -> Result<StepResult, StepError> {
    let Some(agent_id) = run.stored.journal.employee.agent_id else {
        return Ok(StepResult::Skipped("no agent record".to_owned()));
    };
    let cxone = run.deps.cxone.clone();
    let store = run.deps.store.clone();
    let external_id = run.stored.journal.employee.external_id.clone();
    let key = archive_key(&external_id, &run.stored.journal.saga_id);
    let end = Utc::now();
    let start = end - chrono::Duration::days(i64::from(lookback_days));
    let mut writer = ArchiveWriter::begin(store.as_ref(), key.clone()).await?;
    let mut next: Option<url::Url> = None;
    // Loop detection keeps a hash per page link, not the link: flat memory for long histories.
    let mut seen: HashSet<u64> = HashSet::new();
    let mut last_renewal = std::time::Instant::now();
    let result: Result<(), StepError> = async {
        loop {
            let page = cxone
                .contacts_page(agent_id, start, end, next.as_ref())
                .await?;
            for record in &page.records {
                writer.push(record.get().as_bytes()).await?;
            }
            match page.next {
                Some(url) if page.records.is_empty() => {
                    return Err(StepError::Permanent(format!(
                        "CXone returned an empty page with a next link ({})",
                        url.path()
                    )));
                }
                Some(url) => {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    std::hash::Hash::hash(url.as_str(), &mut h);
                    if !seen.insert(std::hash::Hasher::finish(&h)) {
                        return Err(StepError::Permanent(
                            "CXone paging loops: _links.next repeats an earlier page".to_owned(),
                        ));
                    }
                    next = Some(url);
                }
                None => return Ok(()),
            }
            // Long archives keep the saga's lease alive.
            if last_renewal.elapsed() > Duration::from_secs(60) {
                run.checkpoint().await?;
                last_renewal = std::time::Instant::now();
            }
        }
    }
    .await;
    if let Err(e) = result {
        writer.abort().await;
        return Err(e);
    }
    let (sha256, records, bytes) = writer.finish().await?;
    info!(records, bytes, "interaction history archived");
    let uri = format!("s3://{}/{key}", run.deps.settings.s3.bucket);
    run.stored.journal.archive = Some(ArchiveRecord {
        uri,
        key,
        sha256,
        records,
        bytes,
    });
    Ok(StepResult::Done(Some(format!(
        "{records} contacts, {bytes} bytes"
    ))))
}

/// The status the saga will end with, as the manifest states it.
pub fn final_status(journal: &Journal) -> FinalStatus {
    journal.status.unwrap_or_else(|| {
        if journal.step(StepName::Delete).status == crate::saga::journal::StepStatus::Done {
            FinalStatus::Deleted
        } else {
            FinalStatus::DeactivatedOnly
        }
    })
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Canonical JSON (sorted keys, no whitespace): what the hash chain hashes.
pub fn canonical(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let inner: Vec<String> = keys
                .into_iter()
                .map(|k| {
                    format!(
                        "{}:{}",
                        serde_json::to_string(k).unwrap_or_default(),
                        canonical(&map[k])
                    )
                })
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(canonical).collect();
            format!("[{}]", inner.join(","))
        }
        other => other.to_string(),
    }
}

/// The chain: `h0 = sha256("cxone-offboard:" + saga_id)`, `hi = sha256(h(i-1) + canonical(step_i))`.
pub fn hash_chain(saga_id: &str, steps: &[Value]) -> Vec<String> {
    let mut prev = hex::encode(Sha256::digest(format!("cxone-offboard:{saga_id}")));
    let mut out = Vec::with_capacity(steps.len());
    for step in steps {
        let mut h = Sha256::new();
        h.update(prev.as_bytes());
        h.update(canonical(step).as_bytes());
        prev = hex::encode(h.finalize());
        out.push(prev.clone());
    }
    out
}

/// Checks a manifest's chain; `Err` says where it breaks.
pub fn verify_chain(manifest: &Value) -> Result<(), String> {
    let saga_id = manifest["saga_id"]
        .as_str()
        .ok_or("manifest has no saga_id")?;
    let steps = manifest["steps"]
        .as_array()
        .ok_or("manifest has no steps")?;
    let chain = manifest["hash_chain"]
        .as_array()
        .ok_or("manifest has no hash_chain")?;
    let computed = hash_chain(saga_id, steps);
    if chain.len() != computed.len() {
        return Err(format!(
            "hash_chain has {} links for {} steps",
            chain.len(),
            computed.len()
        ));
    }
    for (i, (have, want)) in chain.iter().zip(&computed).enumerate() {
        if have.as_str() != Some(want.as_str()) {
            let name = steps[i]["name"].as_str().unwrap_or("?");
            return Err(format!("hash chain breaks at step {i} ({name})"));
        }
    }
    if manifest["chain_head"].as_str() != computed.last().map(String::as_str) {
        return Err("chain_head does not match the last link".to_owned());
    }
    Ok(())
}

/// The manifest document of a saga at this point.
pub fn build_manifest(journal: &Journal, kind: &str, extra: Option<Value>) -> Value {
    let steps: Vec<Value> = journal
        .steps
        .iter()
        .map(|s| {
            json!({
                "name": s.name.as_str(),
                "status": s.status,
                "attempts": s.attempts,
                "started_at": s.started_at.map(ts),
                "finished_at": s.finished_at.map(ts),
                "detail": s.detail,
            })
        })
        .collect();
    let chain = hash_chain(&journal.saga_id, &steps);
    let calls: Vec<Value> = journal
        .calls
        .iter()
        .map(
            |c| json!({ "method": c.method, "route": c.route, "status": c.status, "at": ts(c.at), "count": c.count, "last_at": c.last_at.map(ts) }),
        )
        .collect();
    let mut m = json!({
        "manifest_version": 1,
        "kind": kind,
        "saga_id": journal.saga_id,
        "event": {
            "id": journal.event.id,
            "source": journal.event.source,
            "type": journal.event.kind,
            "time": journal.event.time,
            "effective_at": journal.event.effective_at,
            "reason": journal.event.reason,
            "options": journal.event.options,
        },
        "employee": {
            "external_id": journal.employee.external_id,
            "user_id": journal.employee.user_id,
            "agent_id": journal.employee.agent_id,
        },
        "status": final_status(journal).as_str(),
        "revoked_at": journal.revoked_at.map(ts),
        "steps": steps,
        "hash_chain": chain,
        "chain_head": chain.last(),
        "calls": calls,
        "compensating_records": {
            "user": journal.before.user,
            "agent_active": journal.before.agent.as_ref().map(|a| a.is_active),
            "agent": journal.before.agent,
            "scim": journal.before.scim,
            "skills": journal.before.skills,
            "access_key_ids": journal.before.access_keys.as_ref().map(|ks| ks.iter().map(|k| k.access_key_id.clone()).collect::<Vec<_>>()),
            "deleted_access_key_ids": journal.deleted_keys,
        },
        "archive": journal.archive.as_ref().map(|a| json!({
            "uri": a.uri, "sha256": a.sha256, "records": a.records, "bytes": a.bytes,
        })),
        "worker": {
            "version": crate::VERSION,
            "host": crate::hostname(),
        },
        "created_at": ts(journal.created_at),
        "written_at": ts(Utc::now()),
    });
    if let (Some(Value::Object(extra)), Value::Object(map)) = (extra, &mut m) {
        for (k, v) in extra {
            map.insert(k, v);
        }
    }
    m
}

/// Writes a manifest once. If one exists already (a crash after writing it), it must be this
/// saga's and intact; then it is kept and its hash returned.
pub async fn write_once<S: Store>(
    store: &S,
    key: &str,
    manifest: &Value,
) -> Result<String, StepError> {
    let body = serde_json::to_vec_pretty(manifest)
        .map_err(|e| StepError::Permanent(format!("manifest serialization: {e}")))?;
    let sha = hex::encode(Sha256::digest(&body));
    match store
        .put_evidence(key, Bytes::from(body), "application/json")
        .await
    {
        Ok(_) => Ok(sha),
        Err(StoreError::Conflict { .. }) => {
            let existing = store.get(key).await?.ok_or_else(|| {
                StepError::Transient(format!("manifest {key} conflicted but cannot be read"))
            })?;
            let value: Value = serde_json::from_slice(&existing.body).map_err(|e| {
                StepError::Permanent(format!("existing manifest {key} is not JSON: {e}"))
            })?;
            if value["saga_id"] != manifest["saga_id"]
                || value["event"]["id"] != manifest["event"]["id"]
            {
                return Err(StepError::Permanent(format!(
                    "a different manifest already exists at {key}"
                )));
            }
            verify_chain(&value).map_err(|e| {
                StepError::Permanent(format!("existing manifest {key} fails verification: {e}"))
            })?;
            info!(%key, "manifest already written by an earlier run; verified and kept");
            Ok(hex::encode(Sha256::digest(&existing.body)))
        }
        Err(e) => Err(e.into()),
    }
}

/// The `manifest` step.
pub(crate) async fn manifest_step<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
) -> Result<StepResult, StepError> {
    let key = manifest_key(
        &run.stored.journal.employee.external_id,
        &run.stored.journal.saga_id,
    );
    // Calls made since the last checkpoint belong in the manifest too.
    let pending: Vec<_> = run
        .calls
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
        .collect();
    run.stored.journal.calls.extend(pending);
    let manifest = build_manifest(&run.stored.journal, "termination", None);
    let sha256 = write_once(run.deps.store.as_ref(), &key, &manifest).await?;
    run.stored.journal.manifest = Some(ManifestRecord {
        uri: format!("s3://{}/{key}", run.deps.settings.s3.bucket),
        key,
        sha256,
    });
    Ok(StepResult::Done(None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Memory;

    #[test]
    fn canonical_json_sorts_keys() {
        let v = json!({"b": 1, "a": {"d": [1, {"z": null, "y": "x"}], "c": true}});
        assert_eq!(
            canonical(&v),
            r#"{"a":{"c":true,"d":[1,{"y":"x","z":null}]},"b":1}"#
        );
    }

    #[test]
    fn an_edited_step_breaks_the_chain() {
        let steps = vec![
            json!({"name": "resolve", "status": "done"}),
            json!({"name": "block_login", "status": "done"}),
        ];
        let chain = hash_chain("s1", &steps);
        let mut m =
            json!({"saga_id": "s1", "steps": steps, "hash_chain": chain, "chain_head": chain[1]});
        assert!(verify_chain(&m).is_ok());
        m["steps"][1]["status"] = json!("skipped");
        assert_eq!(
            verify_chain(&m).expect_err("tampered"),
            "hash chain breaks at step 1 (block_login)"
        );
    }

    #[tokio::test]
    async fn small_archives_are_one_put_and_large_ones_multipart() {
        let store = Memory::default();
        let mut w = ArchiveWriter::begin(&store, "a/small".into())
            .await
            .expect("begin");
        w.push(br#"{"contactId":1}"#).await.expect("push");
        let (sha, records, bytes) = w.finish().await.expect("finish");
        assert_eq!(records, 1);
        assert_eq!(bytes, 16);
        assert_eq!(sha, hex::encode(Sha256::digest(b"{\"contactId\":1}\n")));

        let mut w = ArchiveWriter::begin(&store, "a/big".into())
            .await
            .expect("begin");
        let line = vec![b'x'; 1000];
        let mut expected = Sha256::new();
        for _ in 0..20_000 {
            w.push(&line).await.expect("push");
            expected.update(&line);
            expected.update(b"\n");
        }
        let (sha, records, bytes) = w.finish().await.expect("finish");
        assert_eq!(records, 20_000);
        assert_eq!(bytes, 20_000 * 1001);
        assert_eq!(sha, hex::encode(expected.finalize()));
        let obj = store.get("a/big").await.expect("get").expect("exists");
        assert_eq!(obj.body.len() as u64, bytes);
        assert!(
            store
                .pending_uploads("a/big")
                .await
                .expect("list")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn empty_history_is_an_empty_object() {
        let store = Memory::default();
        let w = ArchiveWriter::begin(&store, "a/empty".into())
            .await
            .expect("begin");
        let (_, records, bytes) = w.finish().await.expect("finish");
        assert_eq!((records, bytes), (0, 0));
        assert!(store.get("a/empty").await.expect("get").is_some());
    }

    #[tokio::test]
    async fn manifests_are_written_once() {
        let store = Memory::default();
        let steps = vec![json!({"name": "resolve"})];
        let chain = hash_chain("s", &steps);
        let m = json!({"saga_id": "s", "event": {"id": "e"}, "steps": steps, "hash_chain": chain, "chain_head": chain[0]});
        let first = write_once(&store, "m/k.json", &m).await.expect("first");
        let mut other = m.clone();
        other["written_at"] = json!("later");
        let second = write_once(&store, "m/k.json", &other)
            .await
            .expect("second");
        assert_eq!(first, second, "the first manifest is kept");
        let mut foreign = m.clone();
        foreign["saga_id"] = json!("t");
        assert!(write_once(&store, "m/k.json", &foreign).await.is_err());
    }
}
