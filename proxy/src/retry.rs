//! Retry decisions (route -> **retry**/forward -> respond): which attempt outcomes are retried and how long to back off.

use std::time::Duration;

use crate::tables::RetryPolicy;

/// How one upstream attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Response { status: u16, envoy_ratelimited: bool },
    ConnectFailure,
    Reset { request_sent: bool },
    RefusedStream,
    PerTryTimeout,
    Overflow,
}

pub fn is_retriable(policy: &RetryPolicy, outcome: &AttemptOutcome) -> bool {
    let _ = (policy, outcome);
    false
}

/// Fully jittered exponential back-off: uniform in [0, min((2^n - 1) * base, max)) for retry n >= 1.
pub fn backoff(policy: &RetryPolicy, retry_number: u32, random: u64) -> Duration {
    let _ = (retry_number, random);
    policy.base_interval
}
