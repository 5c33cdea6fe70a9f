//! `archive`: the agent's completed contacts (`/contacts/completed`, `_links.next` paging)
//! streamed as NDJSON into S3. A large history is a multipart upload whose resume point (upload
//! id, finished parts, hash state, next page) is saved in the journal after every part: a
//! redelivery continues where the last part ended instead of starting over, and never needs
//! `ListMultipartUploads`. One delivery archives for at most `worker.archive_slice_secs`, then
//! continues in a fresh delivery, so no delivery outlives the broker's `consumer_timeout`.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tracing::{info, warn};

use super::super::journal::{ArchiveProgress, ArchiveRecord};
use super::{Run, StepError, StepResult};
use crate::cxone::Cxone;
use crate::evidence::ArchiveWriter;
use crate::store::{Store, StoreError, keys};

/// A long archive renews the saga's lease at least this often.
const RENEW_EVERY: Duration = Duration::from_secs(60);

pub(super) async fn run<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
) -> Result<StepResult, StepError> {
    let options = &run.termination.options;
    if !options.archive_interactions {
        return Ok(StepResult::Skipped("archive_interactions=false".to_owned()));
    }
    let lookback_days = options.archive_lookback_days;
    let Some(agent_id) = run.journal().employee.agent_id else {
        return Ok(StepResult::Skipped("no agent record".to_owned()));
    };
    if run.plan {
        return plan(run, agent_id, lookback_days).await;
    }
    let cxone = run.cxone.clone();
    let store = run.deps.store.clone();
    let slice = Duration::from_secs(run.deps.settings.worker.archive_slice_secs);
    let key = keys::archive(&run.journal().employee.external_id, &run.journal().saga_id);
    let (mut writer, start, end, mut next) = match run.journal().archive_progress.clone() {
        Some(p) if p.key == key => {
            match ArchiveWriter::resume(store.as_ref(), key.clone(), &p.upload) {
                Some(w) => {
                    info!(
                        parts = p.upload.parts.len(),
                        records = p.upload.records,
                        "continuing the archive upload"
                    );
                    let next = p.next.as_deref().and_then(|n| url::Url::parse(n).ok());
                    (w, p.start, p.end, next)
                }
                None => {
                    warn!(
                        "the saved archive progress is unusable; aborting that upload and starting over"
                    );
                    store.abort_upload(&key, &p.upload.upload_id).await?;
                    run.journal_mut().archive_progress = None;
                    fresh(store.as_ref(), &key, lookback_days)
                }
            }
        }
        _ => fresh(store.as_ref(), &key, lookback_days),
    };
    // Loop detection keeps a hash per page link, not the link: flat memory for long histories.
    let mut seen: HashSet<u64> = HashSet::new();
    let mut renewed = tokio::time::Instant::now();
    loop {
        let page = cxone
            .contacts_page(agent_id, start, end, next.as_ref())
            .await?;
        for record in &page.records {
            writer.push(record.get().as_bytes());
        }
        let following = match page.next {
            Some(url) if page.records.is_empty() => {
                writer.abort().await;
                run.journal_mut().archive_progress = None;
                return Err(StepError::Permanent(format!(
                    "CXone returned an empty page with a next link ({})",
                    url.path()
                )));
            }
            Some(url) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                std::hash::Hash::hash(url.as_str(), &mut h);
                if !seen.insert(std::hash::Hasher::finish(&h)) {
                    writer.abort().await;
                    run.journal_mut().archive_progress = None;
                    return Err(StepError::Permanent(
                        "CXone paging loops: _links.next repeats an earlier page".to_owned(),
                    ));
                }
                Some(url)
            }
            None => None,
        };
        let part = match writer.page_done().await {
            Ok(part) => part,
            Err(StoreError::NoSuchUpload { .. }) => return Err(upload_vanished(run).await),
            Err(e) => return Err(e.into()),
        };
        if let Some(upload) = part {
            run.journal_mut().archive_progress = Some(ArchiveProgress {
                key: key.clone(),
                start,
                end,
                next: following.as_ref().map(|u| u.to_string()),
                upload,
            });
            run.save().await?;
            renewed = tokio::time::Instant::now();
            if following.is_some() && run.started.elapsed() >= slice {
                return Err(StepError::Slice);
            }
        } else if renewed.elapsed() >= RENEW_EVERY {
            // Keeps the lease alive; the saved resume point does not move between parts.
            run.save().await?;
            renewed = tokio::time::Instant::now();
        }
        match following {
            Some(url) => next = Some(url),
            None => break,
        }
    }
    let summary = match writer.finish().await {
        Ok(s) => s,
        Err(StoreError::NoSuchUpload { .. }) => return Err(upload_vanished(run).await),
        Err(e) => return Err(e.into()),
    };
    info!(
        records = summary.records,
        bytes = summary.bytes,
        "interaction history archived"
    );
    let uri = keys::uri(&run.deps.settings.s3.bucket, &key);
    let j = run.journal_mut();
    j.archive_progress = None;
    j.archive = Some(ArchiveRecord {
        uri,
        key,
        sha256: summary.sha256,
        records: summary.records,
        bytes: summary.bytes,
    });
    Ok(StepResult::Done(Some(format!(
        "{} contacts, {} bytes",
        summary.records, summary.bytes
    ))))
}

type Start<'a, S> = (
    ArchiveWriter<'a, S>,
    chrono::DateTime<Utc>,
    chrono::DateTime<Utc>,
    Option<url::Url>,
);

/// A new archive of the last `lookback_days`, up to now.
fn fresh<'a, S: Store>(store: &'a S, key: &str, lookback_days: u32) -> Start<'a, S> {
    let end = Utc::now();
    let start = end - chrono::Duration::days(i64::from(lookback_days));
    (
        ArchiveWriter::begin(store, key.to_owned()),
        start,
        end,
        None,
    )
}

/// The upload is gone (expired by a lifecycle rule, or completed just before a crash): start
/// the archive again on the next try.
async fn upload_vanished<C: Cxone, S: Store>(run: &mut Run<'_, C, S>) -> StepError {
    run.journal_mut().archive_progress = None;
    if let Err(e) = run.save().await {
        return e.into();
    }
    StepError::Transient(
        "the multipart upload no longer exists; the archive starts over".to_owned(),
    )
}

async fn plan<C: Cxone, S: Store>(
    run: &mut Run<'_, C, S>,
    agent_id: i64,
    lookback_days: u32,
) -> Result<StepResult, StepError> {
    let end = Utc::now();
    let start = end - chrono::Duration::days(i64::from(lookback_days));
    let page = run.cxone.contacts_page(agent_id, start, end, None).await?;
    let count = page.total.unwrap_or(page.records.len() as u64);
    Ok(StepResult::Planned(
        format!("would archive {count} contacts from the last {lookback_days} days"),
        json!({ "action": "archive", "contacts": count, "lookback_days": lookback_days }),
    ))
}
