//! The S3 bucket: journals, archives and manifests. The saga sees the [`Store`] trait; [`S3`]
//! is the real implementation (AWS chain, or a local endpoint with path-style addressing) and
//! [`Memory`] the fake for unit tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;

use anyhow::Context;
use aws_sdk_s3::config::Region;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures_util::FutureExt;

use crate::config::S3Settings;

/// Conditional-write precondition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Unconditional.
    Always,
    /// Only if the key does not exist (`If-None-Match: *`).
    Create,
    /// Only if the object still has this ETag (`If-Match`).
    Replace(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The precondition failed: someone else wrote first (HTTP 412 or 409).
    #[error("precondition failed on {key}: it was changed or created by someone else")]
    Conflict { key: String },
    /// Timeouts, 5xx, throttling, connection failures.
    #[error("S3 {op} {key}: {message}")]
    Transient {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("S3 {op} {key}: {message}")]
    Permanent {
        op: &'static str,
        key: String,
        message: String,
    },
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }
}

/// An object and its ETag.
#[derive(Debug, Clone)]
pub struct Object {
    pub body: Bytes,
    pub etag: String,
}

/// A finished part of a multipart upload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Part {
    pub number: i32,
    pub etag: String,
    /// Base64 SHA-256 of the part, as S3 reports it.
    pub checksum_sha256: Option<String>,
}

/// The bucket operations the saga and the CLI need.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Object>, StoreError>> + Send;
    /// Writes and returns the new ETag.
    fn put(
        &self,
        key: &str,
        body: Bytes,
        content_type: &str,
        write: Write,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;
    /// Writes evidence once (`If-None-Match: *`), under Object Lock retention when configured.
    fn put_evidence(
        &self,
        key: &str,
        body: Bytes,
        content_type: &str,
    ) -> impl Future<Output = Result<String, StoreError>> + Send {
        self.put(key, body, content_type, Write::Create)
    }
    /// Keys under `prefix`, in key order.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn start_upload(
        &self,
        key: &str,
        content_type: &str,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;
    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> impl Future<Output = Result<Part, StoreError>> + Send;
    fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<Part>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn abort_upload(
        &self,
        key: &str,
        upload_id: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Unfinished multipart uploads for exactly `key`.
    fn pending_uploads(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
}

/// Builds an S3 client. Credentials come from the standard AWS chain.
pub async fn client(settings: &S3Settings) -> aws_sdk_s3::Client {
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(Region::new(settings.region.clone()))
        .load()
        .await;
    let mut builder = aws_sdk_s3::config::Builder::from(&shared);
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.endpoint_url(endpoint).force_path_style(true);
    }
    aws_sdk_s3::Client::from_conf(builder.build())
}

/// Confirms the bucket exists and these credentials can reach it.
pub async fn check_bucket(client: &aws_sdk_s3::Client, bucket: &str) -> anyhow::Result<()> {
    client
        .head_bucket()
        .bucket(bucket)
        .send()
        .boxed()
        .await
        .map_err(|e| anyhow::anyhow!("{}", describe_sdk_error(&e)))
        .with_context(|| format!("bucket `{bucket}` is not reachable"))?;
    Ok(())
}

type SdkError<E> = aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>;

/// A one-line description of an SDK error: HTTP status and service code when there is one.
pub fn describe_sdk_error<E>(err: &SdkError<E>) -> String
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    match err {
        aws_sdk_s3::error::SdkError::ServiceError(service) => {
            let e = service.err();
            format!(
                "HTTP {}: {} ({})",
                service.raw().status().as_u16(),
                e.message().unwrap_or("service error"),
                e.code().unwrap_or("no code")
            )
        }
        aws_sdk_s3::error::SdkError::TimeoutError(_) => "timed out".to_owned(),
        aws_sdk_s3::error::SdkError::DispatchFailure(_) => format!(
            "request could not be sent: {}",
            aws_sdk_s3::error::DisplayErrorContext(err)
        ),
        aws_sdk_s3::error::SdkError::ResponseError(_) => "unreadable response".to_owned(),
        aws_sdk_s3::error::SdkError::ConstructionFailure(_) => {
            "request could not be built".to_owned()
        }
        _ => "unknown S3 error".to_owned(),
    }
}

fn classify<E>(op: &'static str, key: &str, err: &SdkError<E>) -> StoreError
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    let message = describe_sdk_error(err);
    let status = match err {
        aws_sdk_s3::error::SdkError::ServiceError(s) => Some(s.raw().status().as_u16()),
        _ => None,
    };
    match status {
        Some(412) | Some(409) => StoreError::Conflict {
            key: key.to_owned(),
        },
        Some(s) if s == 408 || s == 429 || s >= 500 => StoreError::Transient {
            op,
            key: key.to_owned(),
            message,
        },
        Some(_) => StoreError::Permanent {
            op,
            key: key.to_owned(),
            message,
        },
        None => StoreError::Transient {
            op,
            key: key.to_owned(),
            message,
        },
    }
}

/// The real bucket.
#[derive(Clone, Debug)]
pub struct S3 {
    client: aws_sdk_s3::Client,
    bucket: String,
    lock: Option<(aws_sdk_s3::types::ObjectLockMode, u32)>,
    /// Requests in flight at once. Thousands of sagas may reach a journal write together; each
    /// unbounded request would hold a connection and its buffers (the layoff benchmark's peak
    /// RSS), and the S3 server serves a queue no faster than a crowd.
    slots: std::sync::Arc<tokio::sync::Semaphore>,
}

/// See [`S3::slots`].
const S3_MAX_IN_FLIGHT: usize = 64;

impl S3 {
    pub async fn new(settings: &S3Settings) -> Self {
        let lock = match (&settings.object_lock_mode, settings.object_lock_days) {
            (Some(mode), Some(days)) => {
                Some((aws_sdk_s3::types::ObjectLockMode::from(mode.as_str()), days))
            }
            _ => None,
        };
        Self {
            client: client(settings).await,
            bucket: settings.bucket.clone(),
            lock,
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(S3_MAX_IN_FLIGHT)),
        }
    }

    /// A request slot; held until the request (and its body) is done.
    async fn slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        // The semaphore is never closed.
        self.slots.acquire().await.ok()
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn uri(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    pub fn sdk(&self) -> &aws_sdk_s3::Client {
        &self.client
    }
}

impl Store for S3 {
    async fn get(&self, key: &str) -> Result<Option<Object>, StoreError> {
        let _slot = self.slot().await;
        let result = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .boxed()
            .await;
        match result {
            Ok(out) => {
                let etag = out.e_tag().unwrap_or_default().to_owned();
                let body = out
                    .body
                    .collect()
                    .await
                    .map_err(|e| StoreError::Transient {
                        op: "GET",
                        key: key.to_owned(),
                        message: format!("reading the body: {e}"),
                    })?
                    .into_bytes();
                Ok(Some(Object { body, etag }))
            }
            Err(e) => {
                if let aws_sdk_s3::error::SdkError::ServiceError(s) = &e
                    && (s.err().is_no_such_key() || s.raw().status().as_u16() == 404)
                {
                    return Ok(None);
                }
                Err(classify("GET", key, &e))
            }
        }
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        content_type: &str,
        write: Write,
    ) -> Result<String, StoreError> {
        let _slot = self.slot().await;
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .body(ByteStream::from(body));
        match write {
            Write::Always => {}
            Write::Create => req = req.if_none_match("*"),
            Write::Replace(etag) => req = req.if_match(etag),
        }
        req.send()
            .boxed()
            .await
            .map(|out| out.e_tag().unwrap_or_default().to_owned())
            .map_err(|e| classify("PUT", key, &e))
    }

    async fn put_evidence(
        &self,
        key: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<String, StoreError> {
        let Some((mode, days)) = &self.lock else {
            return self.put(key, body, content_type, Write::Create).await;
        };
        let _slot = self.slot().await;
        let until = chrono::Utc::now() + chrono::Duration::days(i64::from(*days));
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .if_none_match("*")
            .object_lock_mode(mode.clone())
            .object_lock_retain_until_date(aws_sdk_s3::primitives::DateTime::from_secs(
                until.timestamp(),
            ))
            .body(ByteStream::from(body))
            .send()
            .boxed()
            .await
            .map(|out| out.e_tag().unwrap_or_default().to_owned())
            .map_err(|e| classify("PUT", key, &e))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let _slot = self.slot().await;
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("LIST", prefix, &e))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
        }
        Ok(keys)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let _slot = self.slot().await;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .boxed()
            .await
            .map(|_| ())
            .map_err(|e| classify("DELETE", key, &e))
    }

    async fn start_upload(&self, key: &str, content_type: &str) -> Result<String, StoreError> {
        let _slot = self.slot().await;
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .boxed()
            .await
            .map_err(|e| classify("CreateMultipartUpload", key, &e))?;
        out.upload_id()
            .map(str::to_owned)
            .ok_or_else(|| StoreError::Permanent {
                op: "CreateMultipartUpload",
                key: key.to_owned(),
                message: "no upload id in the answer".to_owned(),
            })
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<Part, StoreError> {
        let _slot = self.slot().await;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .body(ByteStream::from(body))
            .send()
            .boxed()
            .await
            .map_err(|e| classify("UploadPart", key, &e))?;
        Ok(Part {
            number,
            etag: out.e_tag().unwrap_or_default().to_owned(),
            checksum_sha256: out.checksum_sha256().map(str::to_owned),
        })
    }

    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<Part>,
    ) -> Result<(), StoreError> {
        let _slot = self.slot().await;
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .into_iter()
                    .map(|p| {
                        let mut b = CompletedPart::builder().part_number(p.number).e_tag(p.etag);
                        if let Some(c) = p.checksum_sha256 {
                            b = b.checksum_sha256(c);
                        }
                        b.build()
                    })
                    .collect(),
            ))
            .build();
        let result = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(completed)
            .send()
            .boxed()
            .await;
        match result {
            Ok(_) => Ok(()),
            // S3 reports a failed completion as `200` with an `<Error>` body; anything else
            // with 200 completed. Some S3-compatible servers (moto) name the root element
            // differently, which the SDK cannot parse even though the object exists.
            Err(aws_sdk_s3::error::SdkError::ServiceError(s))
                if s.raw().status().as_u16() == 200
                    && s.raw()
                        .body()
                        .bytes()
                        .is_some_and(|b| !String::from_utf8_lossy(b).contains("<Error>")) =>
            {
                Ok(())
            }
            Err(e) => Err(classify("CompleteMultipartUpload", key, &e)),
        }
    }

    async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        let _slot = self.slot().await;
        let result = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .boxed()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => match classify("AbortMultipartUpload", key, &e) {
                // Already gone counts as aborted.
                StoreError::Permanent { message, .. } if message.contains("NoSuchUpload") => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn pending_uploads(&self, key: &str) -> Result<Vec<String>, StoreError> {
        let _slot = self.slot().await;
        let out = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(key)
            .send()
            .boxed()
            .await
            .map_err(|e| classify("ListMultipartUploads", key, &e))?;
        Ok(out
            .uploads()
            .iter()
            .filter(|u| u.key() == Some(key))
            .filter_map(|u| u.upload_id().map(str::to_owned))
            .collect())
    }
}

/// (key, parts by number) of an upload in progress.
type PendingUpload = (String, BTreeMap<i32, Bytes>);

/// An in-memory bucket with S3's conditional-write semantics, for unit tests.
#[derive(Debug, Default)]
pub struct Memory {
    objects: Mutex<BTreeMap<String, (Bytes, u64)>>,
    uploads: Mutex<BTreeMap<String, PendingUpload>>,
    counter: std::sync::atomic::AtomicU64,
}

impl Memory {
    fn next(&self) -> u64 {
        self.counter
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1
    }

    pub fn keys(&self) -> Vec<String> {
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

impl Store for Memory {
    async fn get(&self, key: &str) -> Result<Option<Object>, StoreError> {
        let objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        Ok(objects.get(key).map(|(b, v)| Object {
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
        let version = self.next();
        let mut objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        let current = objects.get(key).map(|(_, v)| format!("\"{v}\""));
        let ok = match (&write, &current) {
            (Write::Always, _) => true,
            (Write::Create, None) => true,
            (Write::Create, Some(_)) => false,
            (Write::Replace(want), Some(have)) => want == have,
            (Write::Replace(_), None) => false,
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
        Ok(self
            .keys()
            .into_iter()
            .filter(|k| k.starts_with(prefix))
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        Ok(())
    }

    async fn start_upload(&self, key: &str, _content_type: &str) -> Result<String, StoreError> {
        let id = format!("upload-{}", self.next());
        self.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), (key.to_owned(), BTreeMap::new()));
        Ok(id)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<Part, StoreError> {
        let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        let (_, parts) = uploads
            .get_mut(upload_id)
            .ok_or_else(|| StoreError::Permanent {
                op: "UploadPart",
                key: key.to_owned(),
                message: "NoSuchUpload".to_owned(),
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
        let (_, stored) = self
            .uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(upload_id)
            .ok_or_else(|| StoreError::Permanent {
                op: "CompleteMultipartUpload",
                key: key.to_owned(),
                message: "NoSuchUpload".to_owned(),
            })?;
        let mut body = Vec::new();
        for p in parts {
            if let Some(b) = stored.get(&p.number) {
                body.extend_from_slice(b);
            }
        }
        let version = self.next();
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned(), (Bytes::from(body), version));
        Ok(())
    }

    async fn abort_upload(&self, _key: &str, upload_id: &str) -> Result<(), StoreError> {
        self.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(upload_id);
        Ok(())
    }

    async fn pending_uploads(&self, key: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, (k, _))| k == key)
            .map(|(id, _)| id.clone())
            .collect())
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
    }
}
