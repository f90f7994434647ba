//! What `net-bench` records per measurement; the readings themselves (CPU time, load, idle
//! share, median and spread) are `splitvmm_tests::bench_stats`, shared with `blk-bench`.

/// One measurement of one side at one point.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Frames per second the side under test took (sink) or delivered (guest-to-guest).
    pub rate: f64,
    /// CPU time of the side under test per frame, in nanoseconds.
    pub cpu_ns: f64,
}
