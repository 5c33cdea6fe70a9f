//! The S3 bucket: client construction from settings (AWS chain, or a local endpoint with
//! path-style addressing) and the checks `check` runs.

use anyhow::Context;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::Region;

use crate::config::S3Settings;

/// Builds an S3 client. Credentials come from the standard AWS chain.
pub async fn client(settings: &S3Settings) -> Client {
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(Region::new(settings.region.clone()))
        .load()
        .await;
    let mut builder = aws_sdk_s3::config::Builder::from(&shared);
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.endpoint_url(endpoint).force_path_style(true);
    }
    Client::from_conf(builder.build())
}

/// Confirms the bucket exists and these credentials can reach it.
pub async fn check_bucket(client: &Client, bucket: &str) -> anyhow::Result<()> {
    client
        .head_bucket()
        .bucket(bucket)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{}", describe_sdk_error(&e)))
        .with_context(|| format!("bucket `{bucket}` is not reachable"))?;
    Ok(())
}

/// A one-line description of an SDK error: HTTP status and service code when there is one.
pub fn describe_sdk_error<E>(
    err: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> String
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_sdk_s3::error::SdkError;
    match err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            format!(
                "HTTP {}: {} ({})",
                service.raw().status().as_u16(),
                e.message().unwrap_or("service error"),
                e.code().unwrap_or("no code")
            )
        }
        SdkError::TimeoutError(_) => "timed out".to_owned(),
        SdkError::DispatchFailure(_) => format!(
            "request could not be sent: {}",
            aws_sdk_s3::error::DisplayErrorContext(err)
        ),
        SdkError::ResponseError(_) => "unreadable response".to_owned(),
        SdkError::ConstructionFailure(_) => "request could not be built".to_owned(),
        _ => "unknown S3 error".to_owned(),
    }
}
