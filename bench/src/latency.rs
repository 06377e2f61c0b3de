//! Open-loop schedule and latency accounting.
//!
//! Every message has a *scheduled* send time, fixed before the run starts by
//! the offered rate: message `k` is due at `start + k / rate`. Latency is
//! measured from that scheduled time, not from the moment the sender got
//! around to writing it, so a stall in the sender or the server is charged to
//! every message that should have gone out during the stall (no coordinated
//! omission). Time is read from `CLOCK_MONOTONIC`, which is one clock for every
//! process on the host, so a payload stamped in one worker process can be
//! timed in another.
//!
//! Pure logic: no I/O, no executor; the clock is passed in, so the tests drive
//! it with synthetic times.

use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Nanoseconds on `CLOCK_MONOTONIC`, comparable across processes on one host.
pub fn monotonic_ns() -> u64 {
    let time = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    time.tv_sec() as u64 * 1_000_000_000 + time.tv_nsec() as u64
}

/// Highest latency a histogram records, in microseconds (one hour). Larger
/// values are clamped to it, so a pathological run still reports.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

/// A fixed-rate schedule: when message `k` is due.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub start_ns: u64,
    /// Nanoseconds between two consecutive messages (1e9 / rate).
    pub interval_ns: f64,
    /// How many messages the schedule holds (rate × duration).
    pub count: u64,
}

impl Schedule {
    pub fn new(start_ns: u64, rate_per_s: f64, duration_s: f64) -> Schedule {
        assert!(rate_per_s > 0.0, "a schedule needs a positive rate");
        let count = (rate_per_s * duration_s).floor() as u64;
        Schedule {
            start_ns,
            interval_ns: 1e9 / rate_per_s,
            count,
        }
    }

    /// The scheduled send time of message `k` (0-based).
    pub fn due_ns(&self, k: u64) -> u64 {
        self.start_ns + (k as f64 * self.interval_ns) as u64
    }

    /// How many messages are due at `now_ns` (all of `0..n` are), capped at
    /// `count`. The sender sends everything due, however late, in order.
    pub fn due_count(&self, now_ns: u64) -> u64 {
        if now_ns < self.start_ns {
            return 0;
        }
        let due = ((now_ns - self.start_ns) as f64 / self.interval_ns).floor() as u64 + 1;
        due.min(self.count)
    }
}

/// One latency histogram in microseconds, recorded from scheduled times.
#[derive(Clone, Debug)]
pub struct Latency {
    pub histogram: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            histogram: Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
                .expect("static histogram bounds are valid"),
        }
    }
}

impl Latency {
    /// Records the latency of an event at `now_ns` for a message scheduled at
    /// `scheduled_ns`. An event seen before its schedule (clock skew between
    /// cores is a few hundred ns at most) counts as 1 µs.
    pub fn record(&mut self, scheduled_ns: u64, now_ns: u64) {
        let us = now_ns.saturating_sub(scheduled_ns) / 1_000;
        self.histogram
            .saturating_record(us.clamp(1, LATENCY_US_MAX));
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    pub fn add(&mut self, other: &Latency) {
        self.histogram
            .add(&other.histogram)
            .expect("histograms share their bounds");
    }

    pub fn summary(&self) -> Summary {
        let h = &self.histogram;
        if h.is_empty() {
            return Summary::default();
        }
        Summary {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            count: h.len(),
        }
    }

    /// Hex of the HdrHistogram V2 encoding, to carry a histogram in JSON
    /// between a worker process and the coordinator.
    pub fn to_hex(&self) -> String {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(&self.histogram, &mut bytes)
            .expect("serializing into a Vec cannot fail");
        hex::encode(bytes)
    }

    pub fn from_hex(text: &str) -> anyhow::Result<Latency> {
        let bytes = hex::decode(text)?;
        let histogram: Histogram<u64> = Deserializer::new().deserialize(&mut bytes.as_slice())?;
        let mut latency = Latency::default();
        latency
            .histogram
            .add(&histogram)
            .map_err(|e| anyhow::anyhow!("histogram from a worker does not fit: {e:?}"))?;
        Ok(latency)
    }

    /// The percentile distribution in HdrHistogram's text format (`.hgrm`),
    /// in milliseconds like the tool that plots it expects.
    pub fn hgrm(&self) -> String {
        let mut out = String::from("       Value     Percentile TotalCount 1/(1-Percentile)\n\n");
        let h = &self.histogram;
        if h.is_empty() {
            return out;
        }
        for step in h.iter_quantiles(5) {
            let quantile = step.quantile_iterated_to();
            let inverse = if quantile < 1.0 {
                format!("{:.2}", 1.0 / (1.0 - quantile))
            } else {
                "inf".to_string()
            };
            out.push_str(&format!(
                "{:12.3} {:14.12} {:10} {:>14}\n",
                step.value_iterated_to() as f64 / 1000.0,
                quantile,
                step.count_since_last_iteration(),
                inverse
            ));
        }
        out.push_str(&format!(
            "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]\n#[Max     = {:12.3}, Total count    = {:12}]\n",
            h.mean() / 1000.0,
            h.stdev() / 1000.0,
            h.max() as f64 / 1000.0,
            h.len()
        ));
        out
    }
}

/// Percentiles of one latency, microseconds; the JSON report's shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub count: u64,
}

/// The three latencies of the ✓ / ✓✓ chain, and the harness's own lag.
#[derive(Clone, Debug, Default)]
pub struct ChainLatency {
    /// Scheduled send → server ack (✓) at the sender.
    pub ack: Latency,
    /// Scheduled send → the message arriving at the recipient.
    pub deliver: Latency,
    /// Scheduled send → the delivered receipt (✓✓) at the sender.
    pub receipt: Latency,
    /// Scheduled send → the harness queuing it for its link: how far
    /// behind its own schedule the harness ran. Every latency above
    /// includes this; a tail here is the harness's, not the server's.
    pub send_lag: Latency,
}

impl ChainLatency {
    /// Each latency with its name in the report (`latency_us.<name>`) and
    /// its histogram file (`<name>.hgrm`).
    pub fn named(&self) -> [(&'static str, &Latency); 4] {
        [
            ("ack", &self.ack),
            ("deliver", &self.deliver),
            ("receipt", &self.receipt),
            ("send_lag", &self.send_lag),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn schedule_spaces_messages_by_the_rate() {
        let schedule = Schedule::new(10 * MS, 1000.0, 2.0);
        assert_eq!(schedule.count, 2000);
        assert_eq!(schedule.due_ns(0), 10 * MS);
        assert_eq!(schedule.due_ns(1), 11 * MS);
        assert_eq!(schedule.due_ns(1000), 1010 * MS);
        assert_eq!(schedule.due_count(9 * MS), 0);
        assert_eq!(schedule.due_count(10 * MS), 1);
        assert_eq!(schedule.due_count(12 * MS + 500_000), 3);
        assert_eq!(schedule.due_count(u64::MAX / 2), 2000);
    }

    /// A sender that stalls for 100 ms at 1000 msg/s must see the stall in
    /// about 100 messages' latency, not in one: the synthetic clock replays
    /// an open-loop sender that sends every due message when it wakes up,
    /// and a server that answers 50 µs after each send.
    #[test]
    fn stalled_sender_is_charged_for_every_message_it_delayed() {
        let schedule = Schedule::new(0, 1000.0, 1.0);
        let mut latency = Latency::default();
        let mut sent = 0u64;
        // The sender wakes every millisecond except during 300..400 ms.
        let mut now = 0u64;
        while sent < schedule.count {
            let stalled = (300 * MS..400 * MS).contains(&now);
            if !stalled {
                let due = schedule.due_count(now);
                while sent < due {
                    let answer_ns = now + 50_000;
                    latency.record(schedule.due_ns(sent), answer_ns);
                    sent += 1;
                }
            }
            now += MS;
        }
        let summary = latency.summary();
        assert_eq!(summary.count, 1000);
        // Message 300 was due at 300 ms and sent at 400 ms.
        assert!(
            summary.max >= 100_000 && summary.max <= 100_100,
            "{summary:?}"
        );
        // About 10% of the messages waited: p90 stays small, p99 does not.
        assert!(summary.p50 <= 60, "{summary:?}");
        assert!(summary.p99 >= 80_000, "{summary:?}");
        // The closed-loop view (time from actual send) would have shown 50 µs
        // for every message; the scheduled-time view must not.
        assert!(summary.p999 > 1_000, "{summary:?}");
    }

    #[test]
    fn event_before_schedule_counts_as_one_microsecond() {
        let mut latency = Latency::default();
        latency.record(5 * MS, 4 * MS);
        assert_eq!(latency.summary().max, 1);
    }

    #[test]
    fn histogram_round_trips_through_hex() {
        let mut latency = Latency::default();
        for us in [10u64, 200, 3_000, 40_000] {
            latency.record(0, us * 1_000);
        }
        let back = Latency::from_hex(&latency.to_hex()).unwrap();
        assert_eq!(back.summary(), latency.summary());
        assert!(back.hgrm().contains("Total count    =            4"));
    }
}
