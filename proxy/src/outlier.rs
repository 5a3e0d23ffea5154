//! Outlier detection (forward -> **outlier** -> pick endpoint): Envoy's ejection of misbehaving hosts.
//!
//! The request path only bumps per-host atomics: the consecutive-failure counters and the
//! running interval's request and success counts. A consecutive-failure ejection is decided
//! inline when a counter reaches its threshold (Envoy posts it to its main thread). Everything
//! else happens in a sweep every `interval`, as on Envoy's interval timer: un-ejection (a host
//! stays ejected until the first sweep after `min(base x multiplier, max) + jitter` has passed),
//! success-rate and failure-percentage ejection over the interval that just ended, and the
//! decay of the ejection-time multiplier of hosts that stayed healthy for a whole interval.
//! Semantics follow `source/common/upstream/outlier_detection_impl.cc`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::lb::splitmix;
use crate::stats::{bump, ClusterCounters};
use crate::tables::OutlierDetection;
use crate::upstream::HostState;

/// What outlier detection learns from one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutlierSignal {
    /// The upstream answered with this status.
    Status(u16),
    /// Connect failure, reset or timeout: the error originated here, not at the upstream.
    LocalFailure,
}

/// One request in an interval counter (`requests << 32 | successes`, so that one atomic
/// add records both and one swap reads both consistently).
const REQUEST: u64 = 1 << 32;
const SUCCESS: u64 = 1;

/// A host's outlier state. It lives in `HostState`, so it survives table swaps that keep the host.
#[derive(Debug, Default)]
pub(crate) struct HostOutlier {
    /// Envoy's `FAILED_OUTLIER_CHECK` flag: the balancer skips the host while it is set.
    ejected: AtomicBool,
    consecutive_5xx: AtomicU32,
    consecutive_gateway_failure: AtomicU32,
    consecutive_local_origin_failure: AtomicU32,
    /// This interval's responses (a local failure counts as a 503 unless errors are split).
    external: AtomicU64,
    /// This interval's connection outcomes, only with `split_external_local_origin_errors`.
    local: AtomicU64,
    /// Changed only under `Detector::deciding`.
    ejection: Mutex<EjectionTimes>,
}

#[derive(Debug, Default)]
struct EjectionTimes {
    /// Envoy's `ejectTimeBackoff`: the ejection lasts `base x multiplier` (capped at max).
    multiplier: u32,
    ejected_at: Option<Instant>,
    unejected_at: Option<Instant>,
    jitter: Duration,
}

impl HostOutlier {
    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    fn times(&self) -> MutexGuard<'_, EjectionTimes> {
        self.ejection.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a host is ejected (Envoy's `OutlierEjectionType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EjectionKind {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
    SuccessRate,
    SuccessRateLocalOrigin,
    FailurePercentage,
    FailurePercentageLocalOrigin,
}

impl EjectionKind {
    /// The `enforcing_*` percentage of this kind.
    fn enforcing(self, config: &OutlierDetection) -> u32 {
        match self {
            Self::Consecutive5xx => config.enforcing_consecutive_5xx,
            Self::ConsecutiveGatewayFailure => config.enforcing_consecutive_gateway_failure,
            Self::ConsecutiveLocalOriginFailure => config.enforcing_consecutive_local_origin_failure,
            Self::SuccessRate => config.enforcing_success_rate,
            Self::SuccessRateLocalOrigin => config.enforcing_local_origin_success_rate,
            Self::FailurePercentage => config.enforcing_failure_percentage,
            Self::FailurePercentageLocalOrigin => config.enforcing_failure_percentage_local_origin,
        }
    }

    fn enforced_counter(self, counters: &ClusterCounters) -> &AtomicU64 {
        match self {
            Self::Consecutive5xx => &counters.ejections_enforced_consecutive_5xx,
            Self::ConsecutiveGatewayFailure => &counters.ejections_enforced_consecutive_gateway_failure,
            Self::ConsecutiveLocalOriginFailure => &counters.ejections_enforced_consecutive_local_origin_failure,
            Self::SuccessRate | Self::SuccessRateLocalOrigin => &counters.ejections_enforced_success_rate,
            Self::FailurePercentage | Self::FailurePercentageLocalOrigin => {
                &counters.ejections_enforced_failure_percentage
            }
        }
    }
}

/// One cluster's detector: its settings and the lock that makes ejection decisions atomic.
#[derive(Debug)]
pub(crate) struct Detector {
    pub config: OutlierDetection,
    /// Held while deciding: how many hosts are ejected must not change under a decision.
    deciding: Mutex<()>,
    /// Set when a table swap replaced the cluster: its sweeps stop (the new cluster state,
    /// which keeps the same hosts, sweeps them from then on).
    retired: AtomicBool,
}

impl Detector {
    pub fn new(config: OutlierDetection) -> Self {
        Self { config, deciding: Mutex::new(()), retired: AtomicBool::new(false) }
    }

    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    fn decide(&self) -> MutexGuard<'_, ()> {
        self.deciding.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Feeds one attempt's result (Envoy's `putResult` / `putHttpResponseCode`).
    pub fn record(&self, hosts: &[Arc<HostState>], host: &HostState, signal: OutlierSignal, counters: &ClusterCounters, random: u64) {
        let config = &self.config;
        let state = &host.outlier;
        match signal {
            OutlierSignal::LocalFailure if config.split_external_local_origin_errors => {
                state.local.fetch_add(REQUEST, Ordering::Relaxed);
                let failures = state.consecutive_local_origin_failure.fetch_add(1, Ordering::Relaxed) + 1;
                if failures == config.consecutive_local_origin_failure {
                    self.on_consecutive(hosts, host, EjectionKind::ConsecutiveLocalOriginFailure, counters, random);
                }
            }
            // Envoy maps a connect failure to 503 and a timeout to 504: both gateway errors.
            OutlierSignal::LocalFailure => self.record_status(hosts, host, 503, counters, random),
            OutlierSignal::Status(status) => {
                if config.split_external_local_origin_errors {
                    // The connection worked: a local-origin success.
                    state.local.fetch_add(REQUEST | SUCCESS, Ordering::Relaxed);
                    state.consecutive_local_origin_failure.store(0, Ordering::Relaxed);
                }
                self.record_status(hosts, host, status, counters, random);
            }
        }
    }

    fn record_status(&self, hosts: &[Arc<HostState>], host: &HostState, status: u16, counters: &ClusterCounters, random: u64) {
        let config = &self.config;
        let state = &host.outlier;
        if status < 500 {
            state.external.fetch_add(REQUEST | SUCCESS, Ordering::Relaxed);
            state.consecutive_5xx.store(0, Ordering::Relaxed);
            state.consecutive_gateway_failure.store(0, Ordering::Relaxed);
            return;
        }
        state.external.fetch_add(REQUEST, Ordering::Relaxed);
        if matches!(status, 502..=504) {
            let failures = state.consecutive_gateway_failure.fetch_add(1, Ordering::Relaxed) + 1;
            if failures == config.consecutive_gateway_failure {
                self.on_consecutive(hosts, host, EjectionKind::ConsecutiveGatewayFailure, counters, random);
            }
        } else {
            state.consecutive_gateway_failure.store(0, Ordering::Relaxed);
        }
        let errors = state.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        if errors == config.consecutive_5xx {
            self.on_consecutive(hosts, host, EjectionKind::Consecutive5xx, counters, random);
        }
    }

    /// A consecutive counter hit its threshold exactly. An already ejected host is left alone
    /// (its counters keep climbing past the threshold and are reset on un-ejection);
    /// otherwise the ejection is attempted and that one counter starts over.
    fn on_consecutive(&self, hosts: &[Arc<HostState>], host: &HostState, kind: EjectionKind, counters: &ClusterCounters, random: u64) {
        let _deciding = self.decide();
        if host.outlier.is_ejected() {
            return;
        }
        self.eject(hosts, host, kind, counters, random, Instant::now());
        let counter = match kind {
            EjectionKind::Consecutive5xx => &host.outlier.consecutive_5xx,
            EjectionKind::ConsecutiveGatewayFailure => &host.outlier.consecutive_gateway_failure,
            _ => &host.outlier.consecutive_local_origin_failure,
        };
        counter.store(0, Ordering::Relaxed);
    }

    /// Envoy's `ejectHost`: within `max_ejection_percent` (or the one host that
    /// `always_eject_one_host` allows), ejected with the kind's enforcing chance. Caller holds
    /// `deciding`.
    fn eject(&self, hosts: &[Arc<HostState>], host: &HostState, kind: EjectionKind, counters: &ClusterCounters, random: u64, now: Instant) {
        let config = &self.config;
        let active = hosts.iter().filter(|h| h.outlier.is_ejected()).count();
        if !ejection_allowed(active, hosts.len(), config) {
            bump(&counters.ejections_overflow);
            return;
        }
        if random % 100 >= u64::from(kind.enforcing(config)) {
            return;
        }
        let base = config.base_ejection_time;
        let max = config.max_ejection_time;
        let jitter_ms = u64::try_from(config.max_ejection_time_jitter.as_millis()).unwrap_or(u64::MAX);
        let mut times = host.outlier.times();
        times.ejected_at = Some(now);
        times.jitter = Duration::from_millis(splitmix(random) % jitter_ms.saturating_add(1));
        // Grows while an ejection would still be shorter than max + base (Envoy's bound).
        if base.saturating_mul(times.multiplier) < max.saturating_add(base) {
            times.multiplier += 1;
        }
        host.outlier.ejected.store(true, Ordering::Relaxed);
        bump(&counters.ejections_enforced_total);
        bump(kind.enforced_counter(counters));
        tracing::info!(upstream = %host.addr, ?kind, multiplier = times.multiplier, "outlier detection ejected host");
    }

    /// Envoy's `onIntervalTimer`.
    pub fn sweep(&self, hosts: &[Arc<HostState>], counters: &ClusterCounters, now: Instant) {
        let config = &self.config;
        let _deciding = self.decide();
        let mut external = Vec::with_capacity(hosts.len());
        let mut local = Vec::with_capacity(hosts.len());
        for host in hosts {
            let state = &host.outlier;
            if state.is_ejected() {
                let mut times = state.times();
                let ejected_for = times.ejected_at.map_or(Duration::MAX, |at| now.saturating_duration_since(at));
                if ejection_over(config, times.multiplier, times.jitter, ejected_for) {
                    state.ejected.store(false, Ordering::Relaxed);
                    // Fresh counters: a host one error short of a threshold is not re-ejected at once.
                    state.consecutive_5xx.store(0, Ordering::Relaxed);
                    state.consecutive_gateway_failure.store(0, Ordering::Relaxed);
                    state.consecutive_local_origin_failure.store(0, Ordering::Relaxed);
                    times.unejected_at = Some(now);
                    tracing::info!(upstream = %host.addr, "outlier detection returned host to service");
                }
            }
            external.push(interval_sample(state.external.swap(0, Ordering::Relaxed)));
            local.push(interval_sample(state.local.swap(0, Ordering::Relaxed)));
        }
        let passes = [
            (external, EjectionKind::SuccessRate, EjectionKind::FailurePercentage),
            (local, EjectionKind::SuccessRateLocalOrigin, EjectionKind::FailurePercentageLocalOrigin),
        ];
        for (samples, success_rate_kind, failure_percentage_kind) in passes {
            let samples: Vec<Option<Sample>> = samples
                .into_iter()
                .zip(hosts)
                .map(|(sample, host)| sample.filter(|_| !host.outlier.is_ejected()))
                .collect();
            let detected = detect(&samples, config);
            let by_kind = [(detected.success_rate, success_rate_kind), (detected.failure_percentage, failure_percentage_kind)];
            for (indexes, kind) in by_kind {
                for index in indexes {
                    // Envoy would eject a host found by both detectors twice; once is enough.
                    if !hosts[index].outlier.is_ejected() {
                        self.eject(hosts, &hosts[index], kind, counters, rand::random(), now);
                    }
                }
            }
        }
        for host in hosts.iter().filter(|host| !host.outlier.is_ejected()) {
            let mut times = host.outlier.times();
            let healthy_for_an_interval =
                times.unejected_at.is_some_and(|at| now.saturating_duration_since(at) >= config.interval);
            if healthy_for_an_interval {
                times.multiplier = times.multiplier.saturating_sub(1);
            }
        }
    }
}

/// Envoy: eject while `100 x (ejected + 1) / hosts <= min(max_ejection_percent, 100)`;
/// `always_eject_one_host` allows the first ejection regardless.
pub(crate) fn ejection_allowed(ejected: usize, hosts: usize, config: &OutlierDetection) -> bool {
    if hosts == 0 {
        return false;
    }
    let max_percent = f64::from(config.max_ejection_percent.min(100));
    let percent = 100.0 * (ejected + 1) as f64 / hosts as f64;
    percent <= max_percent || (config.always_eject_one_host && ejected == 0)
}

/// Whether an ejection of `ejected_for` so far has run its course:
/// `min(base x multiplier, max) + jitter`.
fn ejection_over(config: &OutlierDetection, multiplier: u32, jitter: Duration, ejected_for: Duration) -> bool {
    let length = config.base_ejection_time.saturating_mul(multiplier).min(config.max_ejection_time);
    length.saturating_add(jitter) <= ejected_for
}

/// One host's requests over the last interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sample {
    /// Percent of requests that succeeded.
    pub success_rate: f64,
    pub volume: u64,
}

fn interval_sample(counts: u64) -> Option<Sample> {
    let requests = counts >> 32;
    let successes = counts & u64::from(u32::MAX);
    (requests > 0).then(|| Sample { success_rate: successes as f64 * 100.0 / requests as f64, volume: requests })
}

/// Host indexes that the two statistical detectors flag.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Detected {
    pub success_rate: Vec<usize>,
    pub failure_percentage: Vec<usize>,
}

/// Envoy's `processSuccessRateEjections` over one interval. `samples` has one entry per host
/// of the cluster; `None` for ejected hosts and hosts without requests.
///
/// - Nothing when the cluster has fewer hosts than both minimums.
/// - Success rate: over hosts with at least `success_rate_request_volume` requests, if there
///   are `success_rate_minimum_hosts` of them, flags every host below
///   `mean - success_rate_stdev_factor / 1000 x stdev` (population standard deviation).
/// - Failure percentage: over hosts with at least `failure_percentage_request_volume`
///   requests, if there are `failure_percentage_minimum_hosts` of them, flags every host whose
///   failure percentage is at least `failure_percentage_threshold`.
pub(crate) fn detect(samples: &[Option<Sample>], config: &OutlierDetection) -> Detected {
    let mut detected = Detected::default();
    let hosts = samples.len() as u64;
    if hosts < u64::from(config.success_rate_minimum_hosts) && hosts < u64::from(config.failure_percentage_minimum_hosts) {
        return detected;
    }
    let with_volume = |volume: u32| -> Vec<(usize, f64)> {
        samples
            .iter()
            .enumerate()
            .filter_map(|(index, sample)| sample.filter(|s| s.volume >= u64::from(volume)).map(|s| (index, s.success_rate)))
            .collect()
    };
    let success_rate_hosts = with_volume(config.success_rate_request_volume);
    if !success_rate_hosts.is_empty() && success_rate_hosts.len() as u64 >= u64::from(config.success_rate_minimum_hosts) {
        let count = success_rate_hosts.len() as f64;
        let mean = success_rate_hosts.iter().map(|(_, rate)| rate).sum::<f64>() / count;
        let variance = success_rate_hosts.iter().map(|(_, rate)| (rate - mean).powi(2)).sum::<f64>() / count;
        let threshold = mean - f64::from(config.success_rate_stdev_factor) / 1000.0 * variance.sqrt();
        detected.success_rate = success_rate_hosts.iter().filter(|(_, rate)| *rate < threshold).map(|(index, _)| *index).collect();
    }
    let failure_percentage_hosts = with_volume(config.failure_percentage_request_volume);
    if !failure_percentage_hosts.is_empty()
        && failure_percentage_hosts.len() as u64 >= u64::from(config.failure_percentage_minimum_hosts)
    {
        let threshold = f64::from(config.failure_percentage_threshold);
        detected.failure_percentage =
            failure_percentage_hosts.iter().filter(|(_, rate)| 100.0 - rate >= threshold).map(|(index, _)| *index).collect();
    }
    detected
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envoy_defaults() -> OutlierDetection {
        OutlierDetection::default()
    }

    fn samples(rates: &[(f64, u64)]) -> Vec<Option<Sample>> {
        rates.iter().map(|&(success_rate, volume)| Some(Sample { success_rate, volume })).collect()
    }

    #[test]
    fn success_rate_follows_envoys_worked_example() {
        // outlier_detection_impl.cc: {50, 100, 100, 100, 100} -> mean 90, stdev 20, threshold 52.
        let found = detect(&samples(&[(50.0, 100), (100.0, 100), (100.0, 100), (100.0, 100), (100.0, 100)]), &envoy_defaults());
        assert_eq!(found.success_rate, vec![0]);
        // {60, 100, ...}: mean 92, stdev 16, threshold 92 - 1.9 x 16 = 61.6.
        let found = detect(&samples(&[(60.0, 100), (100.0, 100), (100.0, 100), (100.0, 100), (100.0, 100)]), &envoy_defaults());
        assert_eq!(found.success_rate, vec![0]);
        let mut lenient = envoy_defaults();
        lenient.success_rate_stdev_factor = 2500;
        let found = detect(&samples(&[(60.0, 100), (100.0, 100), (100.0, 100), (100.0, 100), (100.0, 100)]), &lenient);
        assert!(found.success_rate.is_empty(), "92 - 2.5 x 16 = 52 < 60");
    }

    #[test]
    fn success_rate_needs_minimum_hosts_with_request_volume() {
        let config = envoy_defaults();
        let low_volume = samples(&[(0.0, 100), (100.0, 100), (100.0, 100), (100.0, 100), (100.0, 99)]);
        assert!(detect(&low_volume, &config).success_rate.is_empty(), "only 4 hosts reach 100 requests");
        let mut ejected = samples(&[(0.0, 100), (100.0, 100), (100.0, 100), (100.0, 100), (100.0, 100)]);
        ejected[4] = None;
        assert!(detect(&ejected, &config).success_rate.is_empty(), "an ejected host does not count");
        let four_hosts = samples(&[(0.0, 500), (100.0, 500), (100.0, 500), (100.0, 500)]);
        assert_eq!(detect(&four_hosts, &config), Detected::default(), "fewer hosts than both minimums");
    }

    #[test]
    fn failure_percentage_flags_hosts_at_or_above_the_threshold() {
        let mut config = envoy_defaults();
        config.failure_percentage_minimum_hosts = 2;
        config.success_rate_minimum_hosts = 100;
        let found = detect(&samples(&[(15.0, 50), (16.0, 50), (100.0, 50)]), &config);
        assert_eq!(found.failure_percentage, vec![0], "85% failures is at the threshold, 84% is not");
        assert!(found.success_rate.is_empty());
        let found = detect(&samples(&[(0.0, 49), (100.0, 50)]), &config);
        assert!(found.failure_percentage.is_empty(), "one host below the request volume leaves one: below the minimum");
    }

    #[test]
    fn max_ejection_percent_is_computed_as_envoy_does() {
        let mut config = envoy_defaults();
        // 10% of 5 hosts: (0 + 1) / 5 = 20% > 10%, so not even one host.
        assert!(!ejection_allowed(0, 5, &config));
        assert!(ejection_allowed(0, 10, &config));
        assert!(!ejection_allowed(1, 10, &config));
        config.always_eject_one_host = true;
        assert!(ejection_allowed(0, 5, &config));
        assert!(!ejection_allowed(1, 5, &config));
        config.max_ejection_percent = 250;
        assert!(ejection_allowed(4, 5, &config), "capped at 100%");
        config.max_ejection_percent = 34;
        config.always_eject_one_host = false;
        assert!(ejection_allowed(0, 3, &config) && !ejection_allowed(1, 3, &config), "66.7% > 34%");
    }

    #[test]
    fn ejection_length_is_base_times_multiplier_capped_plus_jitter() {
        let config = envoy_defaults();
        let s = Duration::from_secs;
        assert!(!ejection_over(&config, 1, Duration::ZERO, s(29)));
        assert!(ejection_over(&config, 1, Duration::ZERO, s(30)));
        assert!(!ejection_over(&config, 3, Duration::ZERO, s(89)));
        assert!(!ejection_over(&config, 11, Duration::ZERO, s(299)), "capped at max_ejection_time");
        assert!(ejection_over(&config, 11, Duration::ZERO, s(300)));
        assert!(!ejection_over(&config, 1, s(5), s(34)));
    }

    #[test]
    fn interval_counts_pack_requests_and_successes() {
        assert_eq!(interval_sample(0), None);
        assert_eq!(interval_sample(4 * REQUEST + 3 * SUCCESS), Some(Sample { success_rate: 75.0, volume: 4 }));
    }
}
