//! `check`: verifies configuration, broker, bucket and CXone access, one line each.

use std::process::ExitCode;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use super::{Cli, Failure};
use crate::config::Settings;

struct Report {
    failed: bool,
}

impl Report {
    fn line(&mut self, what: &str, result: Result<String, String>) {
        match result {
            Ok(detail) => println!("{what:<8} ok    {detail}"),
            Err(detail) => {
                self.failed = true;
                println!("{what:<8} FAIL  {detail}");
            }
        }
    }
}

pub async fn run(cli: &Cli) -> Result<ExitCode, Failure> {
    let settings = match super::load_settings(cli) {
        Ok(s) => s,
        Err(f) => {
            println!("{:<8} FAIL  {:#}", "config", f.error);
            return Ok(ExitCode::from(super::EXIT_USAGE));
        }
    };
    // One line per check on stdout; library logs (lapin reports a refused connection as a log
    // line of its own) only when asked for with RUST_LOG.
    let mut log = settings.log.clone();
    log.filter = "off".to_owned();
    crate::telemetry::init(&log);
    let mut report = Report { failed: false };
    report.line("config", Ok(settings.summary()));
    report.line("broker", check_broker(&settings).await);
    let bucket = check_s3(&settings).await;
    let reachable = bucket.is_ok();
    report.line("s3", bucket);
    if reachable {
        check_store(&settings, &mut report).await;
    }
    report.line("cxone", check_cxone(&settings).await);
    match crate::cxone::quota::check(&settings.cxone).await {
        Ok(None) => {}
        Ok(Some(line)) => report.line("quota", Ok(line)),
        Err(e) => report.line("quota", Err(e)),
    }
    Ok(if report.failed {
        ExitCode::from(super::EXIT_FAILURE)
    } else {
        ExitCode::SUCCESS
    })
}

async fn check_broker(settings: &Settings) -> Result<String, String> {
    let amqp = &settings.amqp;
    let conn = crate::broker::connect(amqp, "check")
        .await
        .map_err(|e| format!("{e:#}"))?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| format!("opening a channel: {e}"))?;
    let passive = QueueDeclareOptions::default().passive();
    let detail = match channel
        .queue_declare(
            amqp.requests_queue.as_str().into(),
            passive,
            FieldTable::default(),
        )
        .await
    {
        Ok(q) => format!(
            "{}: queue {} has {} messages, {} consumers",
            amqp.redacted_url(),
            amqp.requests_queue,
            q.message_count(),
            q.consumer_count()
        ),
        Err(_) => format!(
            "{}: queue {} not declared yet (the worker declares it at start)",
            amqp.redacted_url(),
            amqp.requests_queue
        ),
    };
    let _ = conn.close(200, "check done".into()).await;
    Ok(detail)
}

async fn check_s3(settings: &Settings) -> Result<String, String> {
    let client = crate::store::client(&settings.s3).await;
    let at = settings
        .s3
        .endpoint
        .as_deref()
        .map(|e| format!(" at {e}"))
        .unwrap_or_default();
    crate::store::check_bucket(&client, &settings.s3.bucket)
        .await
        .map(|()| format!("bucket {}{at}", settings.s3.bucket))
        .map_err(|e| match at.is_empty() {
            true => e,
            false => format!("{e} (endpoint{at})"),
        })
}

/// What the worker relies on from the store: conditional writes (fencing, the guard and
/// write-once manifests), multipart uploads (archives), Object Lock when configured.
async fn check_store(settings: &Settings, report: &mut Report) {
    let store = crate::store::S3::new(&settings.s3).await;
    let caps = crate::store::probe_capabilities(&store).await;
    let missing: Vec<String> = [&caps.create_only, &caps.compare_and_swap]
        .into_iter()
        .filter_map(|r| r.clone().err())
        .collect();
    report.line(
        "s3 cas",
        if missing.is_empty() {
            Ok("conditional writes honoured (`If-None-Match: *` and `If-Match`)".to_owned())
        } else {
            Err(format!(
                "{} — the worker will not start on this store (fencing, the guard and \
                 write-once manifests depend on conditional writes)",
                missing.join("; ")
            ))
        },
    );
    report.line(
        "s3 multi",
        caps.multipart
            .map(|()| "multipart upload, complete and abort work".to_owned()),
    );
    if settings.s3.object_lock_mode.is_some() {
        report.line(
            "s3 lock",
            match store.object_lock_enabled().await {
                Ok(true) => Ok("Object Lock enabled on the bucket".to_owned()),
                Ok(false) => Err(format!(
                    "s3.object_lock_mode is set but bucket `{}` has no Object Lock",
                    settings.s3.bucket
                )),
                Err(e) => Err(format!("Object Lock cannot be read: {e}")),
            },
        );
    }
}

async fn check_cxone(settings: &Settings) -> Result<String, String> {
    let client = crate::cxone::Client::new(&settings.cxone, crate::metrics::Metrics::new())
        .map_err(|e| format!("{e:#}"))?;
    let endpoints = client.connect().await.map_err(|e| e.to_string())?;
    Ok(format!(
        "token ok; API {}; SCIM {}",
        endpoints.api_base, endpoints.scim_base
    ))
}
