//! Timing helper shared by the benches.

use std::time::{Duration, Instant};

/// One warm-up call of `f`, then the median duration of `runs` calls.
pub fn median_of(runs: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}
