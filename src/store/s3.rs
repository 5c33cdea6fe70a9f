//! The real bucket through the AWS SDK: every request bounded in time and counted by
//! operation, every error classified once and described in one line.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::config::Region;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures_util::FutureExt;

use super::{Object, Part, Store, StoreError, Write, keys};
use crate::config::S3Settings;
use crate::metrics::Metrics;

/// Builds an S3 client. Credentials come from the standard AWS chain; against a local endpoint
/// (`s3.endpoint`) the EC2 instance-metadata provider is left out, so a laptop without
/// credentials gets an answer at once instead of a metadata probe timing out first.
pub async fn client(settings: &S3Settings) -> aws_sdk_s3::Client {
    let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(settings.connect_timeout_secs))
        .read_timeout(Duration::from_secs(settings.read_timeout_secs))
        .operation_attempt_timeout(Duration::from_secs(settings.attempt_timeout_secs))
        .operation_timeout(Duration::from_secs(settings.operation_timeout_secs))
        .build();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(Region::new(settings.region.clone()))
        .timeout_config(timeouts);
    if settings.endpoint.is_some() {
        use aws_config::meta::credentials::CredentialsProviderChain;
        let chain = CredentialsProviderChain::first_try(
            "environment",
            aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
        )
        .or_else(
            "profile",
            aws_config::profile::ProfileFileCredentialsProvider::builder().build(),
        );
        loader = loader.credentials_provider(chain);
    }
    let shared = loader.load().await;
    // Objects are read without the SDK's response checksum check: an S3-compatible server
    // that updates an object's body and its stored checksum in two steps (s3s-fs) leaves them
    // apart when a writer dies in between, and the SDK then refuses every read of that
    // journal for ever. Evidence carries its own SHA-256, which `verify` checks end to end;
    // writes still send a SHA-256 the server verifies.
    let mut builder = aws_sdk_s3::config::Builder::from(&shared)
        .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired);
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.endpoint_url(endpoint).force_path_style(true);
    }
    aws_sdk_s3::Client::from_conf(builder.build())
}

/// Confirms the bucket exists and these credentials can reach it.
pub async fn check_bucket(client: &aws_sdk_s3::Client, bucket: &str) -> Result<(), String> {
    client
        .head_bucket()
        .bucket(bucket)
        .send()
        .boxed()
        .await
        .map(|_| ())
        .map_err(|e| match &e {
            aws_sdk_s3::error::SdkError::ServiceError(s) if s.raw().status().as_u16() == 404 => {
                format!("bucket `{bucket}` does not exist (HTTP 404)")
            }
            aws_sdk_s3::error::SdkError::ServiceError(s) if s.raw().status().as_u16() == 403 => {
                format!("access to bucket `{bucket}` denied (HTTP 403): check the credentials")
            }
            _ => format!("bucket `{bucket}`: {}", describe_sdk_error(&e)),
        })
}

type SdkError<E> = aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>;

/// The innermost cause of an error chain: usually the one that says what happened.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() {
            cause = text;
        }
        source = s.source();
    }
    cause
}

/// A one-line description of an SDK error, for operators: what failed, without the SDK's
/// debug structures (the whole chain is logged at debug level).
pub fn describe_sdk_error<E>(err: &SdkError<E>) -> String
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    tracing::debug!(error = %aws_sdk_s3::error::DisplayErrorContext(err), "S3 error");
    match err {
        aws_sdk_s3::error::SdkError::ServiceError(service) => {
            let e = service.err();
            let status = service.raw().status().as_u16();
            match (e.code(), e.message()) {
                (Some(code), Some(msg)) => format!("HTTP {status} {code}: {msg}"),
                (Some(code), None) => format!("HTTP {status} {code}"),
                (None, Some(msg)) => format!("HTTP {status}: {msg}"),
                (None, None) => format!("HTTP {status}"),
            }
        }
        aws_sdk_s3::error::SdkError::TimeoutError(_) => "timed out".to_owned(),
        aws_sdk_s3::error::SdkError::DispatchFailure(d) => {
            let full = aws_sdk_s3::error::DisplayErrorContext(err).to_string();
            if full.contains("credentials") || full.contains("no credentials") {
                "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, an AWS \
                 profile, or a role (IRSA on EKS)"
                    .to_owned()
            } else if d.is_timeout() {
                "timed out connecting to the S3 endpoint".to_owned()
            } else if d.is_io() {
                match std::error::Error::source(err) {
                    Some(s) => format!("cannot reach the S3 endpoint: {}", root_cause(s)),
                    None => "cannot reach the S3 endpoint".to_owned(),
                }
            } else {
                format!("request not sent: {}", root_cause(err))
            }
        }
        aws_sdk_s3::error::SdkError::ResponseError(_) => "unreadable answer from S3".to_owned(),
        aws_sdk_s3::error::SdkError::ConstructionFailure(_) => {
            let full = aws_sdk_s3::error::DisplayErrorContext(err).to_string();
            if full.contains("credentials") {
                "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, an AWS \
                 profile, or a role (IRSA on EKS)"
                    .to_owned()
            } else {
                format!("request could not be built: {}", root_cause(err))
            }
        }
        _ => format!("S3 error: {}", root_cause(err)),
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
    let code = match err {
        aws_sdk_s3::error::SdkError::ServiceError(s) => s.err().code().map(str::to_owned),
        _ => None,
    };
    if code.as_deref() == Some("NoSuchUpload") {
        return StoreError::NoSuchUpload {
            op,
            key: key.to_owned(),
        };
    }
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
        // No answer: timeouts, refused or reset connections. Missing credentials are not
        // worth retrying.
        None if message.starts_with("no AWS credentials") => StoreError::Permanent {
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

/// The S3 operations, as counted and labelled in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum S3Op {
    Get,
    Put,
    List,
    Delete,
    CreateMultipartUpload,
    UploadPart,
    CompleteMultipartUpload,
    AbortMultipartUpload,
}

impl S3Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Put => "PUT",
            Self::List => "LIST",
            Self::Delete => "DELETE",
            Self::CreateMultipartUpload => "CreateMultipartUpload",
            Self::UploadPart => "UploadPart",
            Self::CompleteMultipartUpload => "CompleteMultipartUpload",
            Self::AbortMultipartUpload => "AbortMultipartUpload",
        }
    }
}

/// The real bucket.
#[derive(Clone)]
pub struct S3 {
    client: aws_sdk_s3::Client,
    bucket: String,
    lock: Option<(aws_sdk_s3::types::ObjectLockMode, u32)>,
    /// Requests in flight at once. Thousands of sagas may reach a journal write together; each
    /// unbounded request would hold a connection and its buffers (the layoff benchmark's peak
    /// RSS), and the S3 server serves a queue no faster than a crowd.
    slots: Arc<tokio::sync::Semaphore>,
    counts: Arc<Mutex<BTreeMap<S3Op, u64>>>,
    metrics: Option<Metrics>,
}

impl std::fmt::Debug for S3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3")
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
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
            slots: Arc::new(tokio::sync::Semaphore::new(S3_MAX_IN_FLIGHT)),
            counts: Arc::default(),
            metrics: None,
        }
    }

    /// Counts every request in `metrics` (`offboard_s3_requests_total{operation}`).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// A request slot, held until the request (and its body) is done; counts the request.
    async fn slot(&self, op: S3Op) -> Option<tokio::sync::SemaphorePermit<'_>> {
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(op)
            .or_default() += 1;
        if let Some(m) = &self.metrics {
            m.s3_request(op.as_str());
        }
        // The semaphore is never closed.
        self.slots.acquire().await.ok()
    }

    /// Requests sent so far by this handle and its clones, by operation.
    pub fn request_counts(&self) -> BTreeMap<S3Op, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn uri(&self, key: &str) -> String {
        keys::uri(&self.bucket, key)
    }

    pub fn sdk(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// Is Object Lock enabled on the bucket?
    pub async fn object_lock_enabled(&self) -> Result<bool, String> {
        match self
            .client
            .get_object_lock_configuration()
            .bucket(&self.bucket)
            .send()
            .boxed()
            .await
        {
            Ok(out) => Ok(out
                .object_lock_configuration()
                .and_then(|c| c.object_lock_enabled())
                .is_some_and(|e| e.as_str() == "Enabled")),
            Err(aws_sdk_s3::error::SdkError::ServiceError(s))
                if matches!(s.raw().status().as_u16(), 404 | 400) =>
            {
                Ok(false)
            }
            Err(e) => Err(describe_sdk_error(&e)),
        }
    }
}

/// What a bucket does of what the worker relies on (`check`, and the worker's start-up).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// A second `If-None-Match: *` write of one key is refused.
    pub create_only: Result<(), String>,
    /// `If-Match` with a stale ETag is refused and with the current one accepted.
    pub compare_and_swap: Result<(), String>,
    /// Create, upload a part, complete; and abort another upload.
    pub multipart: Result<(), String>,
}

impl Capabilities {
    /// Fencing, the guard and write-once manifests depend on both conditional writes.
    pub fn conditional_writes(&self) -> Result<(), String> {
        self.create_only.clone()?;
        self.compare_and_swap.clone()
    }
}

/// Probes a store with throwaway objects under `check/` (removed afterwards).
pub async fn probe_capabilities<S: Store>(store: &S) -> Capabilities {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let key = format!("{}{id}", keys::PROBES);
    let body = || Bytes::from_static(b"cxone-offboard capability probe");
    let create_only = async {
        store
            .put(&key, body(), "text/plain", Write::Create)
            .await
            .map_err(|e| format!("writing a probe object failed: {e}"))?;
        match store.put(&key, body(), "text/plain", Write::Create).await {
            Err(StoreError::Conflict { .. }) => Ok(()),
            Ok(_) => Err(
                "the store ignores `If-None-Match: *`: a second create of the same \
                          key was accepted"
                    .to_owned(),
            ),
            Err(e) => Err(format!("a conditional create failed: {e}")),
        }
    }
    .await;
    let compare_and_swap = async {
        let etag = store
            .put(&key, body(), "text/plain", Write::Always)
            .await
            .map_err(|e| format!("writing a probe object failed: {e}"))?;
        match store
            .put(
                &key,
                body(),
                "text/plain",
                Write::Replace("\"0000-stale-etag\"".to_owned()),
            )
            .await
        {
            Err(StoreError::Conflict { .. }) => {}
            Ok(_) => {
                return Err(
                    "the store ignores `If-Match`: a write with a stale ETag was \
                            accepted"
                        .to_owned(),
                );
            }
            Err(e) => return Err(format!("a conditional replace failed: {e}")),
        }
        store
            .put(&key, body(), "text/plain", Write::Replace(etag))
            .await
            .map(|_| ())
            .map_err(|e| format!("`If-Match` with the current ETag was refused: {e}"))
    }
    .await;
    let mp_key = format!("{key}.multipart");
    let multipart = async {
        let upload = store
            .start_upload(&mp_key, "text/plain")
            .await
            .map_err(|e| format!("CreateMultipartUpload: {e}"))?;
        let part = store
            .upload_part(&mp_key, &upload, 1, body())
            .await
            .map_err(|e| format!("UploadPart: {e}"))?;
        store
            .complete_upload(&mp_key, &upload, vec![part])
            .await
            .map_err(|e| format!("CompleteMultipartUpload: {e}"))?;
        let other = store
            .start_upload(&mp_key, "text/plain")
            .await
            .map_err(|e| format!("CreateMultipartUpload: {e}"))?;
        store
            .abort_upload(&mp_key, &other)
            .await
            .map_err(|e| format!("AbortMultipartUpload: {e}"))
    }
    .await;
    let _ = store.delete(&key).await;
    let _ = store.delete(&mp_key).await;
    Capabilities {
        create_only,
        compare_and_swap,
        multipart,
    }
}

impl Store for S3 {
    async fn get(&self, key: &str) -> Result<Option<Object>, StoreError> {
        let _slot = self.slot(S3Op::Get).await;
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
                        message: format!("reading the body: {}", root_cause(&e)),
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
        let _slot = self.slot(S3Op::Put).await;
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
        let _slot = self.slot(S3Op::Put).await;
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
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let _slot = self.slot(S3Op::List).await;
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .boxed()
                .await
                .map_err(|e| classify("LIST", prefix, &e))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        Ok(keys)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let _slot = self.slot(S3Op::Delete).await;
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
        let _slot = self.slot(S3Op::CreateMultipartUpload).await;
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
        let _slot = self.slot(S3Op::UploadPart).await;
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
        let _slot = self.slot(S3Op::CompleteMultipartUpload).await;
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
        let _slot = self.slot(S3Op::AbortMultipartUpload).await;
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
                StoreError::NoSuchUpload { .. } => Ok(()),
                StoreError::Permanent { message, .. } if message.contains("NoSuchUpload") => Ok(()),
                other => Err(other),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Memory;

    #[tokio::test]
    async fn the_memory_store_has_every_capability() {
        let caps = probe_capabilities(&Memory::default()).await;
        assert_eq!(caps.conditional_writes(), Ok(()));
        assert_eq!(caps.multipart, Ok(()));
    }
}
