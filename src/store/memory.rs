//! An in-memory bucket with S3's conditional-write semantics, for unit tests.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::{Object, Part, Store, StoreError, Write};

/// (key, parts by number) of an upload in progress.
type PendingUpload = (String, BTreeMap<i32, Bytes>);

#[derive(Debug, Default)]
pub struct Memory {
    objects: Mutex<BTreeMap<String, (Bytes, u64)>>,
    uploads: Mutex<BTreeMap<String, PendingUpload>>,
    counter: AtomicU64,
    /// Requests by operation (`GET`, `PUT`, `LIST`, …), as the S3 store counts them.
    requests: Mutex<BTreeMap<&'static str, u64>>,
    /// Writes to keys under this prefix fail as a flaky S3 would (a transient error), this
    /// many more times.
    failing: Mutex<Option<(String, u32)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Memory {
    fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn count(&self, op: &'static str) {
        *lock(&self.requests).entry(op).or_default() += 1;
    }

    pub fn keys(&self) -> Vec<String> {
        lock(&self.objects).keys().cloned().collect()
    }

    /// Requests so far, by operation.
    pub fn requests(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.requests).clone()
    }

    /// Upload ids still open.
    pub fn open_uploads(&self) -> Vec<String> {
        lock(&self.uploads).keys().cloned().collect()
    }

    /// Makes every write under `prefix` fail (transient) until called with `None`.
    pub fn fail_writes(&self, prefix: Option<&str>) {
        *lock(&self.failing) = prefix.map(|p| (p.to_owned(), u32::MAX));
    }

    /// Makes the next `n` writes under `prefix` fail (transient).
    pub fn fail_next_writes(&self, prefix: &str, n: u32) {
        *lock(&self.failing) = Some((prefix.to_owned(), n));
    }

    /// Replaces an object's body behind everyone's back (a tamperer, in tests).
    pub fn overwrite(&self, key: &str, body: Bytes) {
        let version = self.next();
        lock(&self.objects).insert(key.to_owned(), (body, version));
    }
}

impl Store for Memory {
    async fn get(&self, key: &str) -> Result<Option<Object>, StoreError> {
        self.count("GET");
        Ok(lock(&self.objects).get(key).map(|(b, v)| Object {
            body: b.clone(),
            etag: format!("\"{v}\""),
        }))
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        _content_type: &str,
        write: Write,
    ) -> Result<String, StoreError> {
        self.count("PUT");
        let fails = {
            let mut failing = lock(&self.failing);
            match failing.as_mut() {
                Some((prefix, left)) if key.starts_with(prefix.as_str()) && *left > 0 => {
                    *left -= 1;
                    true
                }
                _ => false,
            }
        };
        if fails {
            return Err(StoreError::Transient {
                op: "PUT",
                key: key.to_owned(),
                message: "injected failure".to_owned(),
            });
        }
        let version = self.next();
        let mut objects = lock(&self.objects);
        let current = objects.get(key).map(|(_, v)| format!("\"{v}\""));
        let ok = match (&write, &current) {
            (Write::Always, _) | (Write::Create, None) => true,
            (Write::Create, Some(_)) | (Write::Replace(_), None) => false,
            (Write::Replace(want), Some(have)) => want == have,
        };
        if !ok {
            return Err(StoreError::Conflict {
                key: key.to_owned(),
            });
        }
        objects.insert(key.to_owned(), (body, version));
        Ok(format!("\"{version}\""))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.count("LIST");
        Ok(lock(&self.objects)
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.count("DELETE");
        lock(&self.objects).remove(key);
        Ok(())
    }

    async fn start_upload(&self, key: &str, _content_type: &str) -> Result<String, StoreError> {
        self.count("CreateMultipartUpload");
        let id = format!("upload-{}", self.next());
        lock(&self.uploads).insert(id.clone(), (key.to_owned(), BTreeMap::new()));
        Ok(id)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<Part, StoreError> {
        self.count("UploadPart");
        let mut uploads = lock(&self.uploads);
        let (_, parts) = uploads
            .get_mut(upload_id)
            .ok_or_else(|| StoreError::NoSuchUpload {
                op: "UploadPart",
                key: key.to_owned(),
            })?;
        parts.insert(number, body);
        Ok(Part {
            number,
            etag: format!("\"p{number}\""),
            checksum_sha256: None,
        })
    }

    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<Part>,
    ) -> Result<(), StoreError> {
        self.count("CompleteMultipartUpload");
        let (_, stored) =
            lock(&self.uploads)
                .remove(upload_id)
                .ok_or_else(|| StoreError::NoSuchUpload {
                    op: "CompleteMultipartUpload",
                    key: key.to_owned(),
                })?;
        let mut body = Vec::new();
        for p in parts {
            let b = stored.get(&p.number).ok_or_else(|| StoreError::Permanent {
                op: "CompleteMultipartUpload",
                key: key.to_owned(),
                message: format!("InvalidPart {}", p.number),
            })?;
            body.extend_from_slice(b);
        }
        let version = self.next();
        lock(&self.objects).insert(key.to_owned(), (Bytes::from(body), version));
        Ok(())
    }

    async fn abort_upload(&self, _key: &str, upload_id: &str) -> Result<(), StoreError> {
        self.count("AbortMultipartUpload");
        lock(&self.uploads).remove(upload_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_has_s3_conditional_semantics() {
        let m = Memory::default();
        let e1 = m
            .put("k", Bytes::from_static(b"1"), "t", Write::Create)
            .await
            .expect("create");
        assert!(matches!(
            m.put("k", Bytes::from_static(b"2"), "t", Write::Create)
                .await,
            Err(StoreError::Conflict { .. })
        ));
        let e2 = m
            .put(
                "k",
                Bytes::from_static(b"3"),
                "t",
                Write::Replace(e1.clone()),
            )
            .await
            .expect("replace");
        assert!(matches!(
            m.put("k", Bytes::from_static(b"4"), "t", Write::Replace(e1))
                .await,
            Err(StoreError::Conflict { .. })
        ));
        let got = m.get("k").await.expect("get").expect("exists");
        assert_eq!(got.body, Bytes::from_static(b"3"));
        assert_eq!(got.etag, e2);
        assert_eq!(m.requests().get("PUT"), Some(&4));
    }
}
