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

/// Median round trips measured by `measure`.
#[derive(Debug, Clone, Copy)]
pub struct WakeupRoundTrips {
    /// The echo thread on the other core.
    pub cross_core: Duration,
    /// The echo thread on the same core.
    pub same_core: Duration,
    /// Time between round trips.
    pub gap: Duration,
    pub rounds: usize,
}

impl WakeupRoundTrips {
    /// The report's machine-line value, for threads on `home` and `other`.
    pub fn describe(&self, home: usize, other: usize) -> String {
        format!(
            "{} µs between cores {home} and {other}, {} µs within core {home} (median of {}, {} µs apart)",
            self.cross_core.as_micros(),
            self.same_core.as_micros(),
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
        cross_core: median_round_trip(home, other, gap, rounds)?,
        same_core: median_round_trip(home, home, gap, rounds)?,
        gap,
        rounds,
    })
}

fn median_round_trip(home: usize, echo_core: usize, gap: Duration, rounds: usize) -> io::Result<Duration> {
    let (mut near, mut far) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || -> io::Result<()> {
        pin_current_thread(echo_core)?;
        let mut byte = [0u8; 1];
        while far.read(&mut byte)? == 1 {
            far.write_all(&byte)?;
        }
        Ok(())
    });
    let timed = std::thread::spawn(move || -> io::Result<Vec<Duration>> {
        pin_current_thread(home)?;
        let mut byte = [0u8; 1];
        let mut trips = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            std::thread::sleep(gap);
            let sent = Instant::now();
            near.write_all(&byte)?;
            near.read_exact(&mut byte)?;
            trips.push(sent.elapsed());
        }
        // Dropping `near` ends the echo thread's loop.
        Ok(trips)
    });
    let mut trips = timed.join().map_err(|_| io::Error::other("the timing thread panicked"))??;
    echo.join().map_err(|_| io::Error::other("the echo thread panicked"))??;
    trips.sort_unstable();
    trips.get(trips.len() / 2).copied().ok_or_else(|| io::Error::other("no round trips measured"))
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
        assert!(trips.cross_core > Duration::ZERO && trips.same_core > Duration::ZERO, "{trips:?}");
        let cores = std::thread::available_parallelism()?.get();
        assert!(measure(0, cores, Duration::ZERO, 1).is_err(), "a core that does not exist is refused");
        Ok(())
    }
}
