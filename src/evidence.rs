//! Evidence in S3, knowing nothing of the saga: the interaction archive (records streamed as
//! NDJSON into a multipart upload that can be resumed from a checkpoint, with a SHA-256 over
//! the whole object whose state survives a crash) and the write-once audit manifest (a hash
//! chain over its steps plus a SHA-256 over the whole canonical document).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::digest::generic_array::GenericArray;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::store::{Part, Store, StoreError};

/// Multipart part size: S3's minimum (5 MiB) for all parts but the last, to keep memory flat.
pub const PART_SIZE: usize = 5 * 1024 * 1024;

pub const NDJSON: &str = "application/x-ndjson";

/// The version of manifests this build writes. Version 1 (earlier builds) chained the steps
/// only; version 2 also hashes the whole document (`integrity`).
pub const MANIFEST_VERSION: u64 = 2;

/// SHA-256 whose state can be saved between parts and resumed in another process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hasher {
    state: [u32; 8],
    pending: Vec<u8>,
    len: u64,
}

/// A [`Hasher`]'s state as it is kept in a journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashState {
    /// The eight state words, big-endian, hex.
    pub state: String,
    /// Bytes not yet making a whole 64-byte block, hex.
    pub pending: String,
    /// Bytes hashed so far.
    pub len: u64,
}

const H0: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

impl Default for Hasher {
    fn default() -> Self {
        Self {
            state: H0,
            pending: Vec::with_capacity(64),
            len: 0,
        }
    }
}

impl Hasher {
    fn compress(state: &mut [u32; 8], block: &[u8]) {
        sha2::compress256(state, std::slice::from_ref(GenericArray::from_slice(block)));
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if !self.pending.is_empty() {
            let take = (64 - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() < 64 {
                return;
            }
            let block = std::mem::take(&mut self.pending);
            Self::compress(&mut self.state, &block);
        }
        let mut chunks = data.chunks_exact(64);
        for block in &mut chunks {
            Self::compress(&mut self.state, block);
        }
        self.pending.extend_from_slice(chunks.remainder());
    }

    /// The digest, hex.
    pub fn finish_hex(&self) -> String {
        let mut state = self.state;
        let mut tail = self.pending.clone();
        tail.push(0x80);
        while tail.len() % 64 != 56 {
            tail.push(0);
        }
        tail.extend_from_slice(&(self.len.wrapping_mul(8)).to_be_bytes());
        for block in tail.chunks_exact(64) {
            Self::compress(&mut state, block);
        }
        let bytes: Vec<u8> = state.iter().flat_map(|w| w.to_be_bytes()).collect();
        hex::encode(bytes)
    }

    pub fn save(&self) -> HashState {
        let bytes: Vec<u8> = self.state.iter().flat_map(|w| w.to_be_bytes()).collect();
        HashState {
            state: hex::encode(bytes),
            pending: hex::encode(&self.pending),
            len: self.len,
        }
    }

    pub fn restore(saved: &HashState) -> Option<Self> {
        let bytes = hex::decode(&saved.state).ok()?;
        let pending = hex::decode(&saved.pending).ok()?;
        if bytes.len() != 32 || pending.len() >= 64 || saved.len % 64 != pending.len() as u64 {
            return None;
        }
        let mut state = [0u32; 8];
        for (w, chunk) in state.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        Some(Self {
            state,
            pending,
            len: saved.len,
        })
    }
}

/// Hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Where a multipart archive upload stands after its last finished part: enough to continue
/// it in another process without listing uploads or starting over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadState {
    pub upload_id: String,
    pub parts: Vec<Part>,
    pub hash: HashState,
    pub records: u64,
    pub bytes: u64,
}

/// What a finished archive is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSummary {
    pub sha256: String,
    pub records: u64,
    pub bytes: u64,
}

/// Streams NDJSON into the store: one PUT when it stays small, multipart when it grows.
/// Parts are cut at page boundaries ([`ArchiveWriter::page_done`]), so a saved
/// [`UploadState`] plus the next page to fetch is a complete resume point.
pub struct ArchiveWriter<'a, S: Store> {
    store: &'a S,
    key: String,
    buffer: Vec<u8>,
    upload: Option<String>,
    parts: Vec<Part>,
    hasher: Hasher,
    records: u64,
    bytes: u64,
}

impl<'a, S: Store> ArchiveWriter<'a, S> {
    /// A new archive at `key` (an object already there is replaced when this one finishes).
    pub fn begin(store: &'a S, key: String) -> Self {
        Self {
            store,
            key,
            // Grows with the history: thousands of sagas may hold a writer at once while their
            // page requests wait for the quota, and most histories are a few kilobytes.
            buffer: Vec::new(),
            upload: None,
            parts: Vec::new(),
            hasher: Hasher::default(),
            records: 0,
            bytes: 0,
        }
    }

    /// Continues the upload a checkpoint describes. `None` when the state is unusable (then the
    /// caller aborts that upload and begins again).
    pub fn resume(store: &'a S, key: String, saved: &UploadState) -> Option<Self> {
        let hasher = Hasher::restore(&saved.hash)?;
        (hasher.len == saved.bytes).then(|| Self {
            store,
            key,
            buffer: Vec::new(),
            upload: Some(saved.upload_id.clone()),
            parts: saved.parts.clone(),
            hasher,
            records: saved.records,
            bytes: saved.bytes,
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Appends one record as a line.
    pub fn push(&mut self, record: &[u8]) {
        self.buffer.extend_from_slice(record);
        self.buffer.push(b'\n');
        self.records += 1;
    }

    /// Call after each page: uploads a part once a part's worth is buffered and returns the
    /// new resume point, to be saved with the next page's position.
    pub async fn page_done(&mut self) -> Result<Option<UploadState>, StoreError> {
        if self.buffer.len() < PART_SIZE {
            return Ok(None);
        }
        self.flush_part().await?;
        Ok(Some(self.state()))
    }

    fn state(&self) -> UploadState {
        UploadState {
            upload_id: self.upload.clone().unwrap_or_default(),
            parts: self.parts.clone(),
            hash: self.hasher.save(),
            records: self.records,
            bytes: self.bytes,
        }
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
        let number = i32::try_from(self.parts.len() + 1).unwrap_or(i32::MAX);
        let part = self
            .store
            .upload_part(&self.key, &upload, number, Bytes::from(chunk.clone()))
            .await;
        match part {
            Ok(part) => {
                self.hasher.update(&chunk);
                self.bytes += chunk.len() as u64;
                self.parts.push(part);
                Ok(())
            }
            Err(e) => {
                // Keep the bytes: a retry of this part sends them again.
                self.buffer = chunk;
                Err(e)
            }
        }
    }

    /// Completes the object.
    pub async fn finish(mut self) -> Result<ArchiveSummary, StoreError> {
        if self.upload.is_none() {
            let body = std::mem::take(&mut self.buffer);
            self.hasher.update(&body);
            self.bytes = body.len() as u64;
            self.store
                .put(
                    &self.key,
                    Bytes::from(body),
                    NDJSON,
                    crate::store::Write::Always,
                )
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
        Ok(ArchiveSummary {
            sha256: self.hasher.finish_hex(),
            records: self.records,
            bytes: self.bytes,
        })
    }

    /// Gives up on this upload: no object, no orphaned parts.
    pub async fn abort(self) {
        if let Some(upload) = &self.upload
            && let Err(e) = self.store.abort_upload(&self.key, upload).await
        {
            warn!(error = %e, key = %self.key, "could not abort the multipart upload");
        }
    }
}

/// Canonical JSON (sorted keys, no whitespace): what the hashes hash.
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
    let mut prev = sha256_hex(format!("cxone-offboard:{saga_id}").as_bytes());
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

/// The SHA-256 over the whole canonical document except its `integrity` member.
pub fn document_hash(manifest: &Value) -> String {
    let mut copy = manifest.clone();
    if let Value::Object(map) = &mut copy {
        map.remove("integrity");
    }
    sha256_hex(canonical(&copy).as_bytes())
}

/// Adds the hash chain over `steps` and the document hash to a manifest document that has a
/// `saga_id` and a `steps` array.
pub fn seal(mut manifest: Value) -> Value {
    let saga_id = manifest["saga_id"].as_str().unwrap_or_default().to_owned();
    let steps = manifest["steps"].as_array().cloned().unwrap_or_default();
    let chain = hash_chain(&saga_id, &steps);
    manifest["manifest_version"] = json!(MANIFEST_VERSION);
    manifest["chain_head"] = json!(chain.last());
    manifest["hash_chain"] = json!(chain);
    if let Value::Object(map) = &mut manifest {
        map.remove("integrity");
    }
    let hash = document_hash(&manifest);
    manifest["integrity"] = json!({
        "algorithm": "sha256",
        "covers": "the whole manifest in canonical JSON (sorted keys, no whitespace) without this member",
        "sha256": hash,
    });
    manifest
}

/// Checks a manifest: the chain over its steps and, from version 2 on, the hash over the whole
/// document. `Err` says where it breaks.
pub fn verify_manifest(manifest: &Value) -> Result<(), String> {
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
    let version = manifest["manifest_version"].as_u64().unwrap_or(1);
    if version >= 2 {
        let stated = manifest["integrity"]["sha256"]
            .as_str()
            .ok_or("manifest has no integrity hash")?;
        if stated != document_hash(manifest) {
            return Err(
                "the manifest was changed after it was written (its SHA-256 over the whole \
                 document does not match)"
                    .to_owned(),
            );
        }
    }
    Ok(())
}

/// Why a manifest could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteOnceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A different manifest is already at the key: evidence is never overwritten.
    #[error("a different manifest already exists at {key}: {why}")]
    Different { key: String, why: String },
}

/// Writes a manifest once and returns its SHA-256. If one exists already (a crash after
/// writing it), it is accepted only when it is byte for byte what this call would write.
pub async fn write_once<S: Store>(
    store: &S,
    key: &str,
    manifest: &Value,
) -> Result<String, WriteOnceError> {
    let body = serde_json::to_vec_pretty(manifest).map_err(|e| WriteOnceError::Different {
        key: key.to_owned(),
        why: format!("cannot serialize: {e}"),
    })?;
    let sha = sha256_hex(&body);
    match store
        .put_evidence(key, Bytes::from(body.clone()), "application/json")
        .await
    {
        Ok(_) => Ok(sha),
        Err(StoreError::Conflict { .. }) => {
            let existing = store.get(key).await?.ok_or_else(|| StoreError::Transient {
                op: "GET",
                key: key.to_owned(),
                message: "the manifest conflicted but cannot be read".to_owned(),
            })?;
            if existing.body.as_ref() != body.as_slice() {
                let why = match serde_json::from_slice::<Value>(&existing.body) {
                    Err(_) => "it is not JSON".to_owned(),
                    Ok(v) => match verify_manifest(&v) {
                        Err(e) => format!("it fails verification ({e})"),
                        Ok(()) => "its content differs from this saga's".to_owned(),
                    },
                };
                return Err(WriteOnceError::Different {
                    key: key.to_owned(),
                    why,
                });
            }
            info!(%key, "manifest already written by an earlier run; identical, kept");
            Ok(sha)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Memory;

    #[test]
    fn the_resumable_hasher_is_sha256_across_a_save_and_restore() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for cut in [0usize, 1, 63, 64, 65, 4097, 9_999, 10_000] {
            let mut h = Hasher::default();
            h.update(&data[..cut]);
            let saved = h.save();
            let mut resumed = Hasher::restore(&saved).expect("restores");
            resumed.update(&data[cut..]);
            assert_eq!(resumed.finish_hex(), sha256_hex(&data), "cut at {cut}");
        }
        assert_eq!(Hasher::default().finish_hex(), sha256_hex(b""));
        let mut bad = Hasher::default().save();
        bad.len = 5;
        assert!(Hasher::restore(&bad).is_none());
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let v = json!({"b": 1, "a": {"d": [1, {"z": null, "y": "x"}], "c": true}});
        assert_eq!(
            canonical(&v),
            r#"{"a":{"c":true,"d":[1,{"y":"x","z":null}]},"b":1}"#
        );
    }

    fn manifest() -> Value {
        seal(json!({
            "saga_id": "s1",
            "status": "DELETED",
            "employee": {"external_id": "E1"},
            "archive": {"sha256": "aa"},
            "steps": [
                {"name": "resolve", "status": "done"},
                {"name": "block_login", "status": "done"},
            ],
        }))
    }

    #[test]
    fn an_edited_step_breaks_the_chain() {
        let mut m = manifest();
        assert_eq!(verify_manifest(&m), Ok(()));
        m["steps"][1]["status"] = json!("skipped");
        assert_eq!(
            verify_manifest(&m).expect_err("tampered"),
            "hash chain breaks at step 1 (block_login)"
        );
    }

    #[test]
    fn edits_outside_the_steps_are_caught_too() {
        for (path, value) in [
            ("status", json!("COMPENSATED")),
            ("employee", json!({"external_id": "E2"})),
            ("archive", json!({"sha256": "bb"})),
        ] {
            let mut m = manifest();
            m[path] = value;
            let err = verify_manifest(&m).expect_err(path);
            assert!(
                err.contains("changed after it was written"),
                "{path}: {err}"
            );
        }
        // A version-1 manifest (steps only) still verifies by its chain.
        let mut v1 = manifest();
        v1["manifest_version"] = json!(1);
        if let Value::Object(m) = &mut v1 {
            m.remove("integrity");
        }
        assert_eq!(verify_manifest(&v1), Ok(()));
    }

    #[tokio::test]
    async fn small_archives_are_one_put_and_large_ones_multipart_resumable() {
        let store = Memory::default();
        let mut w = ArchiveWriter::begin(&store, "a/small".into());
        w.push(br#"{"contactId":1}"#);
        assert!(w.page_done().await.expect("page").is_none());
        let s = w.finish().await.expect("finish");
        assert_eq!((s.records, s.bytes), (1, 16));
        assert_eq!(s.sha256, sha256_hex(b"{\"contactId\":1}\n"));

        // A large archive, interrupted after its first part and resumed from the checkpoint.
        let line = vec![b'x'; 1000];
        let mut expected = Sha256::new();
        let mut w = ArchiveWriter::begin(&store, "a/big".into());
        let mut saved = None;
        let mut pages = 0;
        while saved.is_none() {
            for _ in 0..100 {
                w.push(&line);
                expected.update(&line);
                expected.update(b"\n");
            }
            pages += 1;
            saved = w.page_done().await.expect("page");
        }
        let saved = saved.expect("a part was cut");
        assert_eq!(saved.parts.len(), 1);
        drop(w); // the process dies here
        let mut w = ArchiveWriter::resume(&store, "a/big".into(), &saved).expect("resumes");
        for _ in 0..pages {
            for _ in 0..100 {
                w.push(&line);
                expected.update(&line);
                expected.update(b"\n");
            }
            w.page_done().await.expect("page");
        }
        let s = w.finish().await.expect("finish");
        assert_eq!(s.records, 2 * pages * 100);
        assert_eq!(s.sha256, hex::encode(expected.finalize()));
        let obj = store.get("a/big").await.expect("get").expect("exists");
        assert_eq!(obj.body.len() as u64, s.bytes);
        assert_eq!(s.sha256, sha256_hex(&obj.body));
        assert!(store.open_uploads().is_empty());
    }

    #[tokio::test]
    async fn manifests_are_written_once_and_only_an_identical_one_is_accepted() {
        let store = Memory::default();
        let m = manifest();
        let first = write_once(&store, "m/k.json", &m).await.expect("first");
        let again = write_once(&store, "m/k.json", &m).await.expect("identical");
        assert_eq!(first, again);
        // A valid manifest of the same saga but other content is refused: a re-run must write
        // exactly what the first run wrote, never a second version of the evidence.
        let mut other = m.clone();
        other["status"] = json!("DEACTIVATED_ONLY");
        let other = seal(other);
        assert!(matches!(
            write_once(&store, "m/k.json", &other).await,
            Err(WriteOnceError::Different { .. })
        ));
    }
}
