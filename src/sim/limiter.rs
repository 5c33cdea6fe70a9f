//! The token bucket behind `429 Too Many Requests`: `rate` tokens per second up to `burst`.

use std::time::{Duration, Instant, SystemTime};

use axum::http::HeaderValue;

use super::RetryAfter;

/// A token bucket.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket; a `burst` of 0 is treated as 1.
    pub fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    pub fn refill(&mut self) {
        self.tokens = self.burst;
        self.last = Instant::now();
    }

    /// Takes one token, or says how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                ((1.0 - self.tokens) / self.rate).max(0.0),
            ))
        }
    }
}

/// The `Retry-After` value for a wait, in the configured form (`None`: no header).
pub(crate) fn retry_after(form: RetryAfter, wait: Duration) -> Option<HeaderValue> {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let secs = secs.max(1);
    match form {
        RetryAfter::Seconds => Some(HeaderValue::from(secs)),
        RetryAfter::HttpDate => {
            let at = SystemTime::now() + Duration::from_secs(secs);
            HeaderValue::from_str(&httpdate::fmt_http_date(at)).ok()
        }
        RetryAfter::None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_admits_its_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::new(10.0, 3);
        bucket.last = start;
        for _ in 0..3 {
            assert!(bucket.try_take(start).is_ok());
        }
        let wait = bucket.try_take(start).expect_err("bucket is empty");
        assert!(wait <= Duration::from_millis(100) && wait > Duration::from_millis(90));
        assert!(bucket.try_take(start + Duration::from_millis(100)).is_ok());
        assert!(bucket.try_take(start + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn retry_after_takes_each_form() {
        let wait = Duration::from_millis(1200);
        assert_eq!(
            retry_after(RetryAfter::Seconds, wait),
            Some(HeaderValue::from(2u64))
        );
        assert_eq!(
            retry_after(RetryAfter::Seconds, Duration::ZERO),
            Some(HeaderValue::from(1u64))
        );
        let date = retry_after(RetryAfter::HttpDate, wait).expect("a date");
        let parsed = httpdate::parse_http_date(date.to_str().expect("ascii")).expect("http-date");
        assert!(parsed > SystemTime::now());
        assert_eq!(retry_after(RetryAfter::None, wait), None);
    }
}
