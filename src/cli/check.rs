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
    crate::telemetry::init(&settings.log);
    let mut report = Report { failed: false };
    report.line("config", Ok(settings.summary()));
    report.line("broker", check_broker(&settings).await);
    report.line("s3", check_s3(&settings).await);
    report.line("cxone", check_cxone(&settings).await);
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
        .map_err(|e| format!("{e:#}{at}"))
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
