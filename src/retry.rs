//! The one retry policy of my-claw's outbound calls (WhatsApp Graph API, Nextcloud Talk bot
//! API, Z.ai) and of the inbound queue's transient failures: exponential backoff with a cap,
//! and a server-given delay (`Retry-After`) honoured up to that cap. It knows no protocol:
//! callers say, per error, whether and when to try again.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, SystemTime};

/// Exponential backoff: `base`, then doubled for each further try, never above `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// The wait after failed try number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << exponent).min(self.cap)
    }
}

/// What a caller decides about one failed try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not worth another try (a bad request, an expired token).
    Stop,
    /// Try again after the backoff, or after `at_least` when the server said how long to
    /// wait (whichever is longer).
    Retry { at_least: Option<Duration> },
}

/// Runs `attempt` up to `max_attempts` times (the first included), sleeping between tries
/// as `backoff` and each error's verdict say. A server asking for a longer wait than
/// `backoff.cap` ends the retries: nobody waits inline for that long, and the error is
/// returned for the caller to report. `what` names the call in logs (a constant, never
/// personal data); errors are logged with `Debug` escaping so their text cannot forge lines.
pub async fn run<T, E, F, Fut>(
    what: &'static str,
    max_attempts: u32,
    backoff: Backoff,
    mut attempt: F,
    verdict: impl Fn(&E) -> Verdict,
) -> Result<T, E>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let max_attempts = max_attempts.max(1);
    let mut n = 1;
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let wait = match verdict(&error) {
            Verdict::Retry { at_least } if n < max_attempts => {
                wait_before_retry(backoff, n, at_least)
            }
            _ => None,
        };
        let Some(wait) = wait else {
            tracing::warn!(attempt = n, error = ?error.to_string(), "{what}: failed");
            return Err(error);
        };
        tracing::warn!(attempt = n, error = ?error.to_string(), ?wait, "{what}: failed, retrying");
        tokio::time::sleep(wait).await;
        n += 1;
    }
}

/// The wait before the try after failed try `attempt`, or `None` when the server asks for
/// more than the cap.
pub fn wait_before_retry(
    backoff: Backoff,
    attempt: u32,
    server_delay: Option<Duration>,
) -> Option<Duration> {
    let own = backoff.delay(attempt);
    match server_delay {
        Some(asked) if asked > backoff.cap => None,
        Some(asked) => Some(own.max(asked)),
        None => Some(own),
    }
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP date (RFC 9110 §10.2.3). A date in
/// the past means "now". Anything else is ignored (`None`).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(at.timestamp().max(0) as u64);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The `Retry-After` of an HTTP response, if it has a readable one.
pub fn retry_after_header(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const BACKOFF: Backoff = Backoff { base: Duration::from_secs(1), cap: Duration::from_secs(30) };

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(BACKOFF.delay(1), Duration::from_secs(1));
        assert_eq!(BACKOFF.delay(3), Duration::from_secs(4));
        assert_eq!(BACKOFF.delay(6), Duration::from_secs(30));
        assert_eq!(BACKOFF.delay(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn server_delay_is_honoured_up_to_the_cap() {
        assert_eq!(
            wait_before_retry(BACKOFF, 1, Some(Duration::from_secs(7))),
            Some(Duration::from_secs(7))
        );
        // The server's delay is a minimum: our own backoff may be longer.
        assert_eq!(
            wait_before_retry(BACKOFF, 4, Some(Duration::from_secs(2))),
            Some(Duration::from_secs(8))
        );
        assert_eq!(wait_before_retry(BACKOFF, 1, Some(Duration::from_secs(31))), None);
    }

    #[test]
    fn retry_after_values() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // 1994-11-06 08:49:37 GMT
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    /// Millisecond waits: tokio's paused clock needs a feature this crate does not enable.
    const FAST: Backoff =
        Backoff { base: Duration::from_millis(1), cap: Duration::from_millis(30) };

    #[tokio::test]
    async fn run_retries_until_success_and_waits_as_asked() {
        let tries = AtomicU32::new(0);
        let started = std::time::Instant::now();
        let result: Result<u32, String> = run(
            "test call",
            4,
            FAST,
            || async {
                match tries.fetch_add(1, Ordering::SeqCst) {
                    0 => Err("busy".to_string()),
                    1 => Err("slow down".to_string()),
                    n => Ok(n),
                }
            },
            |e| match e.as_str() {
                "slow down" => Verdict::Retry { at_least: Some(Duration::from_millis(20)) },
                _ => Verdict::Retry { at_least: None },
            },
        )
        .await;
        assert_eq!(result, Ok(2));
        // 1 ms of backoff, then the server's 20 ms (longer than the 2 ms backoff).
        assert!(started.elapsed() >= Duration::from_millis(21), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn run_stops_on_a_final_error_or_a_too_long_server_delay() {
        let tries = AtomicU32::new(0);
        let result: Result<(), String> = run(
            "test call",
            5,
            FAST,
            || async {
                tries.fetch_add(1, Ordering::SeqCst);
                Err("expired".to_string())
            },
            |_| Verdict::Stop,
        )
        .await;
        assert!(result.is_err());
        assert_eq!(tries.swap(0, Ordering::SeqCst), 1);
        let result: Result<(), String> = run(
            "test call",
            5,
            FAST,
            || async {
                tries.fetch_add(1, Ordering::SeqCst);
                Err("come back in an hour".to_string())
            },
            |_| Verdict::Retry { at_least: Some(Duration::from_secs(3600)) },
        )
        .await;
        assert!(result.is_err());
        assert_eq!(tries.swap(0, Ordering::SeqCst), 1);
        let result: Result<(), String> = run(
            "test call",
            3,
            FAST,
            || async {
                tries.fetch_add(1, Ordering::SeqCst);
                Err("down".to_string())
            },
            |_| Verdict::Retry { at_least: None },
        )
        .await;
        assert!(result.is_err());
        assert_eq!(tries.load(Ordering::SeqCst), 3, "max_attempts counts the first try");
    }
}
