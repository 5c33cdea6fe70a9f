//! The S3 bucket: journals, archives, manifests and indexes. The saga sees the [`Store`] trait;
//! [`S3`] is the real implementation (AWS chain, or a local endpoint with path-style addressing)
//! and [`Memory`] the fake for unit tests. [`keys`] names every object.

pub mod keys;
mod memory;
mod s3;

use std::future::Future;

use bytes::Bytes;

pub use memory::Memory;
pub use s3::{
    Capabilities, S3, S3Op, check_bucket, client, describe_sdk_error, probe_capabilities,
};

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
    /// A multipart upload that no longer exists (completed, aborted or expired).
    #[error("S3 {op} {key}: the multipart upload no longer exists")]
    NoSuchUpload { op: &'static str, key: String },
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }

    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Conflict { .. })
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

/// The bucket operations the saga and the CLI need. No operation lists multipart uploads:
/// not every S3-compatible server has `ListMultipartUploads`, so upload ids are kept by whoever
/// starts an upload (the saga journal).
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
    /// Aborts one upload; an upload that is already gone counts as aborted.
    fn abort_upload(
        &self,
        key: &str,
        upload_id: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
