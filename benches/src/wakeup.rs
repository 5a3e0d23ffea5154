//! The floor under every proxy's added latency here (report header): how long one round trip
//! between two threads takes when the other side sleeps, across the harness's two cores and
//! within one.
//!
//! In the paced run the proxy, the client and the backend mostly sleep between requests. Direct,
//! the client and the backend share the load core, so a request and its response are two
//! same-core wake-ups. Through a proxy on the other core, the request crosses cores four times
//! (client to proxy, proxy to backend and back, proxy to client), and each crossing wakes a
//! sleeping core. On a VM that costs far more than on bare metal, whatever the proxy does.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::measure::percentile;

/// Median round trips measured by `measure`, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct WakeupRoundTrips {
    /// The echo thread on the other core.
    pub cross_core_us: f64,
    /// The echo thread on the same core.
    pub same_core_us: f64,
    /// Time between round trips.
    pub gap: Duration,
    pub rounds: usize,
}

impl WakeupRoundTrips {
    /// The report's machine-line value, for threads on `home` and `other`.
    pub fn describe(&self, home: usize, other: usize) -> String {
        format!(
            "{:.0} µs between cores {home} and {other}, {:.0} µs within core {home} (median of {}, {} µs apart)",
            self.cross_core_us,
            self.same_core_us,
            self.rounds,
            self.gap.as_micros()
        )
    }
}

/// Round trips of one byte over a socket pair to an echo thread, `gap` apart (so both sides
/// are asleep when a byte arrives, as in the paced run), from a thread on `home` to one on
/// `other`, then to one on `home` itself.
pub fn measure(home: usize, other: usize, gap: Duration, rounds: usize) -> io::Result<WakeupRoundTrips> {
    Ok(WakeupRoundTrips {
        cross_core_us: median_round_trip_us(home, other, gap, rounds)?,
        same_core_us: median_round_trip_us(home, home, gap, rounds)?,
        gap,
        rounds,
    })
}

fn median_round_trip_us(home: usize, echo_core: usize, gap: Duration, rounds: usize) -> io::Result<f64> {
    let (mut near, mut far) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || -> io::Result<()> {
        pin_current_thread(echo_core)?;
        let mut byte = [0u8; 1];
        while far.read(&mut byte)? == 1 {
            far.write_all(&byte)?;
        }
        Ok(())
    });
    let timed = std::thread::spawn(move || -> io::Result<Vec<f64>> {
        pin_current_thread(home)?;
        let mut byte = [0u8; 1];
        let mut trips = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            std::thread::sleep(gap);
            let sent = Instant::now();
            near.write_all(&byte)?;
            near.read_exact(&mut byte)?;
            trips.push(sent.elapsed().as_secs_f64() * 1e6);
        }
        // Dropping `near` ends the echo thread's loop.
        Ok(trips)
    });
    let mut trips = timed.join().map_err(|_| io::Error::other("the timing thread panicked"))??;
    echo.join().map_err(|_| io::Error::other("the echo thread panicked"))??;
    if trips.is_empty() {
        return Err(io::Error::other("no round trips measured"));
    }
    trips.sort_by(f64::total_cmp);
    Ok(percentile(&trips, 50.0))
}

/// Binds the calling thread to one core.
fn pin_current_thread(core: usize) -> io::Result<()> {
    let mut cores = rustix::thread::CpuSet::new();
    cores.set(core);
    Ok(rustix::thread::sched_setaffinity(None, &cores)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_are_measured_on_the_cores_asked_for() -> io::Result<()> {
        let trips = measure(0, 0, Duration::from_micros(50), 50)?;
        assert!(trips.cross_core_us > 0.0 && trips.same_core_us > 0.0, "{trips:?}");
        let cores = std::thread::available_parallelism()?.get();
        assert!(measure(0, cores, Duration::ZERO, 1).is_err(), "a core that does not exist is refused");
        Ok(())
    }
}
