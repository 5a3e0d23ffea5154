//! Retry decisions (route -> **retry**/forward -> respond): whether another attempt may follow, which outcomes are retried and how long to back off.

use std::time::Duration;

use crate::tables::{RetryOn, RetryPolicy};

/// How one upstream attempt ended, before any byte of its response went downstream (after
/// that nothing is retried, so the caller never asks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Response headers arrived; `envoy_ratelimited` = the response carries `x-envoy-ratelimited`;
    /// `grpc_status` = the `grpc-status` of the response headers, when a gRPC condition asked.
    Response { status: u16, envoy_ratelimited: bool, grpc_status: Option<u32> },
    /// TCP (or later TLS) connect failed or timed out.
    ConnectFailure,
    /// The upstream disconnected or reset before response headers; `request_sent` = the request
    /// headers had been written (what `reset-before-request` distinguishes).
    Reset { request_sent: bool },
    /// HTTP/2 `REFUSED_STREAM`: the upstream guarantees it did not process the request.
    RefusedStream,
    PerTryTimeout,
    /// A circuit breaker refused the attempt; Envoy never retries this.
    Overflow,
}

/// Whether another attempt may follow the `attempts` made so far (`num_retries` is the budget
/// beyond the first). The forwarder stops on it, and the server decides by it whether the first
/// attempt may take the request's headers or must leave them for a retry.
pub fn may_follow(policy: Option<&RetryPolicy>, attempts: u32) -> bool {
    policy.is_some_and(|policy| attempts <= policy.num_retries)
}

/// Envoy's `retry_on` semantics (`retry_state_impl.cc`): whether this outcome may be retried,
/// leaving the retry budget (num_retries, circuit breaker, body buffer) to the caller.
pub fn is_retriable(policy: &RetryPolicy, outcome: &AttemptOutcome) -> bool {
    let on = &policy.retry_on;
    // `5xx`, `gateway-error` and `reset` all cover "no response at all".
    let no_response = on.server_error_5xx || on.gateway_error || on.reset;
    match *outcome {
        AttemptOutcome::Overflow => false,
        AttemptOutcome::Response { envoy_ratelimited: true, .. } => on.envoy_ratelimited,
        AttemptOutcome::Response { status, envoy_ratelimited: false, grpc_status } => {
            (on.server_error_5xx && (500..600).contains(&status))
                || (on.gateway_error && matches!(status, 502..=504))
                || (on.retriable_4xx && status == 409)
                || (on.retriable_status_codes && policy.retriable_status_codes.contains(&status))
                || grpc_status.is_some_and(|code| grpc_retriable(on, code))
        }
        AttemptOutcome::ConnectFailure => no_response || on.connect_failure || on.reset_before_request,
        AttemptOutcome::Reset { request_sent } => no_response || (on.reset_before_request && !request_sent),
        AttemptOutcome::RefusedStream => no_response || on.refused_stream,
        // Envoy turns a per-try timeout into a local reset of the attempt.
        AttemptOutcome::PerTryTimeout => no_response,
    }
}

/// gRPC status codes that `retry_on` names (`grpc/status.h`).
fn grpc_retriable(on: &RetryOn, code: u32) -> bool {
    match code {
        1 => on.grpc_cancelled,
        4 => on.grpc_deadline_exceeded,
        8 => on.grpc_resource_exhausted,
        13 => on.grpc_internal,
        14 => on.grpc_unavailable,
        _ => false,
    }
}

/// Fully jittered exponential back-off: uniform in [0, min((2^n - 1) * base, max)) for retry
/// n >= 1, drawn from `random`. Retry 0 (the first attempt) does not wait.
pub fn backoff(policy: &RetryPolicy, retry_number: u32, random: u64) -> Duration {
    let base = policy.base_interval.as_nanos();
    // Past 2^64 - 1 the cap has long been reached; clamping the exponent avoids overflow.
    let multiplier = (1u128 << retry_number.min(64)) - 1;
    let ceiling = base.saturating_mul(multiplier).min(policy.max_interval.as_nanos());
    if ceiling == 0 {
        return Duration::ZERO;
    }
    let nanos = u128::from(random) % ceiling;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(retry_on: RetryOn) -> RetryPolicy {
        RetryPolicy {
            retry_on,
            num_retries: 1,
            per_try_timeout: None,
            retriable_status_codes: Vec::new(),
            base_interval: Duration::from_millis(25),
            max_interval: Duration::from_millis(250),
            avoid_previous_hosts: false,
            host_selection_retry_max_attempts: 1,
        }
    }

    #[test]
    fn another_attempt_follows_while_the_budget_lasts() {
        let mut two_retries = policy(RetryOn::default());
        two_retries.num_retries = 2;
        assert!(!may_follow(None, 1), "no policy: one attempt");
        assert!(may_follow(Some(&two_retries), 1) && may_follow(Some(&two_retries), 2));
        assert!(!may_follow(Some(&two_retries), 3), "the first attempt and two retries");
        two_retries.num_retries = 0;
        assert!(!may_follow(Some(&two_retries), 1), "a policy without retries allows one attempt");
    }

    fn response(status: u16) -> AttemptOutcome {
        AttemptOutcome::Response { status, envoy_ratelimited: false, grpc_status: None }
    }

    fn grpc(code: u32) -> AttemptOutcome {
        AttemptOutcome::Response { status: 200, envoy_ratelimited: false, grpc_status: Some(code) }
    }

    const NO_RESPONSE: [AttemptOutcome; 5] = [
        AttemptOutcome::ConnectFailure,
        AttemptOutcome::Reset { request_sent: true },
        AttemptOutcome::Reset { request_sent: false },
        AttemptOutcome::RefusedStream,
        AttemptOutcome::PerTryTimeout,
    ];

    #[test]
    fn nothing_is_retried_without_conditions() {
        let none = policy(RetryOn::default());
        for outcome in NO_RESPONSE.into_iter().chain([response(503), response(409), AttemptOutcome::Overflow]) {
            assert!(!is_retriable(&none, &outcome), "{outcome:?}");
        }
    }

    #[test]
    fn five_xx_covers_every_5xx_and_every_missing_response() {
        let five_xx = policy(RetryOn { server_error_5xx: true, ..RetryOn::default() });
        for status in [500, 503, 504, 599] {
            assert!(is_retriable(&five_xx, &response(status)), "{status}");
        }
        for status in [200, 404, 409, 429] {
            assert!(!is_retriable(&five_xx, &response(status)), "{status}");
        }
        for outcome in NO_RESPONSE {
            assert!(is_retriable(&five_xx, &outcome), "{outcome:?}");
        }
        assert!(!is_retriable(&five_xx, &AttemptOutcome::Overflow));
    }

    #[test]
    fn gateway_error_is_502_to_504_plus_resets() {
        let gateway = policy(RetryOn { gateway_error: true, ..RetryOn::default() });
        assert!(!is_retriable(&gateway, &response(500)));
        for status in [502, 503, 504] {
            assert!(is_retriable(&gateway, &response(status)), "{status}");
        }
        assert!(!is_retriable(&gateway, &response(505)));
        for outcome in NO_RESPONSE {
            assert!(is_retriable(&gateway, &outcome), "{outcome:?}");
        }
    }

    #[test]
    fn retriable_4xx_is_409_only() {
        let four = policy(RetryOn { retriable_4xx: true, ..RetryOn::default() });
        assert!(is_retriable(&four, &response(409)));
        for status in [400, 404, 429, 503] {
            assert!(!is_retriable(&four, &response(status)), "{status}");
        }
    }

    #[test]
    fn retriable_status_codes_need_the_condition() {
        let mut listed = policy(RetryOn::default());
        listed.retriable_status_codes = vec![418];
        assert!(!is_retriable(&listed, &response(418)));
        listed.retry_on.retriable_status_codes = true;
        assert!(is_retriable(&listed, &response(418)));
        assert!(!is_retriable(&listed, &response(419)));
    }

    #[test]
    fn narrow_conditions_cover_only_their_failure() {
        let connect = policy(RetryOn { connect_failure: true, ..RetryOn::default() });
        assert!(is_retriable(&connect, &AttemptOutcome::ConnectFailure));
        assert!(!is_retriable(&connect, &AttemptOutcome::Reset { request_sent: true }));
        assert!(!is_retriable(&connect, &response(503)));

        let before = policy(RetryOn { reset_before_request: true, ..RetryOn::default() });
        assert!(is_retriable(&before, &AttemptOutcome::Reset { request_sent: false }));
        assert!(is_retriable(&before, &AttemptOutcome::ConnectFailure));
        assert!(!is_retriable(&before, &AttemptOutcome::Reset { request_sent: true }));

        let refused = policy(RetryOn { refused_stream: true, ..RetryOn::default() });
        assert!(is_retriable(&refused, &AttemptOutcome::RefusedStream));
        assert!(!is_retriable(&refused, &AttemptOutcome::Reset { request_sent: true }));
        assert!(!is_retriable(&refused, &AttemptOutcome::PerTryTimeout));

        let reset = policy(RetryOn { reset: true, ..RetryOn::default() });
        for outcome in NO_RESPONSE {
            assert!(is_retriable(&reset, &outcome), "{outcome:?}");
        }
        assert!(!is_retriable(&reset, &response(503)));
    }

    #[test]
    fn ratelimited_responses_need_envoy_ratelimited() {
        let limited = AttemptOutcome::Response { status: 503, envoy_ratelimited: true, grpc_status: None };
        let five_xx = policy(RetryOn { server_error_5xx: true, ..RetryOn::default() });
        assert!(!is_retriable(&five_xx, &limited));
        let ratelimited = policy(RetryOn { envoy_ratelimited: true, ..RetryOn::default() });
        assert!(is_retriable(&ratelimited, &limited));
        assert!(is_retriable(&ratelimited, &AttemptOutcome::Response { status: 429, envoy_ratelimited: true, grpc_status: None }));
    }

    #[test]
    fn overflow_is_never_retried() {
        let all = policy(RetryOn {
            server_error_5xx: true,
            gateway_error: true,
            reset: true,
            reset_before_request: true,
            connect_failure: true,
            retriable_4xx: true,
            refused_stream: true,
            retriable_status_codes: true,
            envoy_ratelimited: true,
            grpc_cancelled: true,
            grpc_deadline_exceeded: true,
            grpc_resource_exhausted: true,
            grpc_unavailable: true,
            grpc_internal: true,
        });
        assert!(!is_retriable(&all, &AttemptOutcome::Overflow));
    }

    #[test]
    fn grpc_conditions_match_their_status_code_only() {
        let none = RetryOn::default();
        let cases = [
            (1, RetryOn { grpc_cancelled: true, ..none }),
            (4, RetryOn { grpc_deadline_exceeded: true, ..none }),
            (8, RetryOn { grpc_resource_exhausted: true, ..none }),
            (13, RetryOn { grpc_internal: true, ..none }),
            (14, RetryOn { grpc_unavailable: true, ..none }),
        ];
        for (code, on) in cases {
            assert!(on.any_grpc());
            let single = policy(on);
            for other in 0..=16 {
                assert_eq!(is_retriable(&single, &grpc(other)), other == code, "condition for {code}, status {other}");
            }
            assert!(!is_retriable(&single, &response(503)), "a gRPC condition is not 5xx");
        }
        let five_xx = policy(RetryOn { server_error_5xx: true, ..RetryOn::default() });
        assert!(!is_retriable(&five_xx, &grpc(14)), "grpc-status 14 on a 200 is not a 5xx");
        let limited = AttemptOutcome::Response { status: 200, envoy_ratelimited: true, grpc_status: Some(14) };
        assert!(!is_retriable(&policy(RetryOn { grpc_unavailable: true, ..RetryOn::default() }), &limited));
    }

    #[test]
    fn backoff_ranges_follow_envoy_defaults() {
        let defaults = policy(RetryOn::default());
        let ms = Duration::from_millis;
        for (retry, ceiling) in [(1, ms(25)), (2, ms(75)), (3, ms(175)), (4, ms(250)), (10, ms(250)), (200, ms(250))] {
            assert_eq!(backoff(&defaults, retry, 0), Duration::ZERO);
            let largest = backoff(&defaults, retry, u64::MAX);
            assert!(largest < ceiling, "retry {retry}: {largest:?} not below {ceiling:?}");
            let ceiling_nanos = u64::try_from(ceiling.as_nanos()).unwrap();
            assert_eq!(backoff(&defaults, retry, ceiling_nanos - 1), ceiling - Duration::from_nanos(1));
            assert_eq!(backoff(&defaults, retry, ceiling_nanos), Duration::ZERO, "wraps at the ceiling");
        }
        assert_eq!(backoff(&defaults, 0, 12345), Duration::ZERO);
    }
}
