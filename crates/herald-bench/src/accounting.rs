//! Delivery accounting: which sequence numbers a subscriber received on a
//! channel (to count lost and duplicated deliveries), and latency histograms
//! (recorded by workers, shipped to the coordinator, merged there).
//!
//! Nothing here does I/O, so every rule is unit-tested directly.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use serde::{Deserialize, Serialize};

/// A publish that takes longer than this counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How many failure messages a run keeps to show.
const ERROR_SAMPLES: usize = 1;

/// Failures recorded by the in-flight requests.
#[derive(Default)]
pub(crate) struct Failures {
    pub(crate) errors: u64,
    pub(crate) samples: Vec<String>,
    pub(crate) failed: BTreeMap<String, Vec<u64>>,
}

impl Failures {
    pub(crate) fn record(&mut self, channel: &str, sequence: u64, error: String) {
        self.errors += 1;
        if self.samples.len() < ERROR_SAMPLES {
            self.samples.push(error);
        }
        self.failed.entry(channel.to_owned()).or_default().push(sequence);
    }
}

/// The shared record of failed publishes.
pub(crate) type SharedFailures = Arc<Mutex<Failures>>;

pub(crate) fn lock_failures(failures: &SharedFailures) -> std::sync::MutexGuard<'_, Failures> {
    failures.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Lowest latency a histogram tells apart, in microseconds.
const HISTOGRAM_LOW_MICROS: u64 = 1;
/// Highest latency a histogram records, in microseconds (60 s); larger values
/// are clamped to it rather than lost.
pub const HISTOGRAM_HIGH_MICROS: u64 = 60_000_000;
/// Significant decimal digits a histogram keeps.
const HISTOGRAM_SIGNIFICANT_DIGITS: u8 = 3;

/// What recording one sequence number found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// First time this sequence number arrived.
    New,
    /// It had arrived before.
    Duplicate,
    /// It is at or above the tracker's limit: no publisher could have sent it.
    OutOfRange,
}

/// The sequence numbers one subscriber received on one channel.
///
/// A bitset whose leading words are dropped once every bit in them is set, so
/// a subscriber that misses nothing holds at most a word or two however long
/// the run; only an unfilled gap keeps memory, bounded by `limit` bits.
#[derive(Debug, Clone)]
pub struct SequenceTracker {
    /// Sequence numbers at or above this are refused without allocating: the
    /// publisher never sends that many, and a corrupt number must not make
    /// the bitset grow without bound.
    limit: u64,
    /// How many leading words were dropped; every sequence number below
    /// `compacted_words * 64` has been received.
    compacted_words: u64,
    /// The bits from `compacted_words * 64` on.
    words: VecDeque<u64>,
    /// Distinct sequence numbers received below `limit`.
    distinct: u64,
    duplicates: u64,
    out_of_range: u64,
}

/// The final accounting of one tracker against what was published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceReport {
    /// Deliveries that should have arrived.
    pub expected: u64,
    /// Distinct expected deliveries that arrived.
    pub received: u64,
    /// Expected deliveries that never arrived.
    pub lost: u64,
    /// Deliveries that arrived more than once, counting each repeat.
    pub duplicated: u64,
    /// Deliveries of sequence numbers that were never published.
    pub out_of_range: u64,
}

impl SequenceTracker {
    /// A tracker that accepts sequence numbers `0..limit`.
    pub fn new(limit: u64) -> Self {
        SequenceTracker {
            limit,
            compacted_words: 0,
            words: VecDeque::new(),
            distinct: 0,
            duplicates: 0,
            out_of_range: 0,
        }
    }

    pub fn record(&mut self, sequence: u64) -> Recorded {
        if sequence >= self.limit {
            self.out_of_range += 1;
            return Recorded::OutOfRange;
        }
        let word = sequence / 64;
        let bit = 1u64 << (sequence % 64);
        if word < self.compacted_words {
            self.duplicates += 1;
            return Recorded::Duplicate;
        }
        let index = usize::try_from(word - self.compacted_words).expect("below `limit`, which fits in memory");
        if index >= self.words.len() {
            self.words.resize(index + 1, 0);
        }
        if self.words[index] & bit != 0 {
            self.duplicates += 1;
            return Recorded::Duplicate;
        }
        self.words[index] |= bit;
        self.distinct += 1;
        while self.words.front() == Some(&u64::MAX) {
            self.words.pop_front();
            self.compacted_words += 1;
        }
        Recorded::New
    }

    /// Distinct sequence numbers received so far (below the limit).
    pub fn distinct(&self) -> u64 {
        self.distinct
    }

    /// Accounts for the run: `published` sequence numbers `0..published`
    /// were sent, of which those in `failed` were refused by the server (so
    /// they are not expected, and not lost if they never come).
    pub fn finish(&self, published: u64, failed: &[u64]) -> SequenceReport {
        let received_below_published = self.count_below(published);
        let failed_received = failed
            .iter()
            .filter(|&&sequence| sequence < published && self.contains(sequence))
            .count() as u64;
        let failed_in_range = failed.iter().filter(|&&sequence| sequence < published).count() as u64;
        let expected = published - failed_in_range;
        let received = received_below_published - failed_received;
        SequenceReport {
            expected,
            received,
            lost: expected - received,
            duplicated: self.duplicates,
            out_of_range: self.out_of_range + (self.distinct - received_below_published),
        }
    }

    fn contains(&self, sequence: u64) -> bool {
        let word = sequence / 64;
        if word < self.compacted_words {
            return true;
        }
        let index = (word - self.compacted_words) as usize;
        self.words
            .get(index)
            .is_some_and(|bits| bits & (1u64 << (sequence % 64)) != 0)
    }

    /// Distinct sequence numbers received that are below `bound`.
    fn count_below(&self, bound: u64) -> u64 {
        let mut count = (self.compacted_words * 64).min(bound);
        for (offset, bits) in self.words.iter().enumerate() {
            let start = (self.compacted_words + offset as u64) * 64;
            if start >= bound {
                break;
            }
            let bits = if bound - start >= 64 {
                *bits
            } else {
                bits & ((1u64 << (bound - start)) - 1)
            };
            count += u64::from(bits.count_ones());
        }
        count
    }
}

/// Delivery counts summed over subscribers and workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryTally {
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_range: u64,
    /// Text frames that were neither a control frame nor a delivery carrying
    /// a bench payload (or binary frames).
    pub malformed: u64,
}

impl DeliveryTally {
    pub fn add_sequences(&mut self, report: &SequenceReport) {
        self.expected += report.expected;
        self.received += report.received;
        self.lost += report.lost;
        self.duplicated += report.duplicated;
        self.out_of_range += report.out_of_range;
    }

    pub fn add(&mut self, other: &DeliveryTally) {
        self.expected += other.expected;
        self.received += other.received;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.out_of_range += other.out_of_range;
        self.malformed += other.malformed;
    }
}

/// A latency histogram in microseconds with the bench's fixed bounds.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(
        HISTOGRAM_LOW_MICROS,
        HISTOGRAM_HIGH_MICROS,
        HISTOGRAM_SIGNIFICANT_DIGITS,
    )
    .expect("the fixed histogram bounds are valid")
}

/// Records a latency in microseconds, clamped into the histogram's range so
/// that a clock step or an enormous stall is still counted.
pub fn record_micros(histogram: &mut Histogram<u64>, micros: u64) {
    histogram.saturating_record(micros.clamp(HISTOGRAM_LOW_MICROS, HISTOGRAM_HIGH_MICROS));
}

/// A histogram as base64 of its V2 serialization, to travel in a JSON line.
pub fn encode_histogram(histogram: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(histogram, &mut bytes)
        .expect("serializing into a Vec cannot fail for a histogram within its bounds");
    BASE64.encode(bytes)
}

/// The inverse of [`encode_histogram`].
pub fn decode_histogram(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = BASE64.decode(text)?;
    let histogram: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|error| anyhow::anyhow!("invalid histogram: {error:?}"))?;
    Ok(histogram)
}

/// Adds `source` into `target`. Both have the bench's bounds, so this only
/// fails on a histogram that did not come from [`new_histogram`].
pub fn merge_histogram(target: &mut Histogram<u64>, source: &Histogram<u64>) -> anyhow::Result<()> {
    target
        .add(source)
        .map_err(|error| anyhow::anyhow!("cannot merge histograms: {error:?}"))
}

/// The percentiles a report shows, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// How many values the histogram holds.
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// Reads the percentiles of a microsecond histogram, converted to
    /// milliseconds; all zero when the histogram is empty.
    pub fn from_micros(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Percentiles::default();
        }
        let millis = |micros: u64| micros as f64 / 1_000.0;
        Percentiles {
            count: histogram.len(),
            p50: millis(histogram.value_at_quantile(0.50)),
            p90: millis(histogram.value_at_quantile(0.90)),
            p99: millis(histogram.value_at_quantile(0.99)),
            p999: millis(histogram.value_at_quantile(0.999)),
            max: millis(histogram.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records `arrivals` into a tracker of `limit` and accounts for
    /// `published` with `failed` refused, checking the report.
    fn check(limit: u64, arrivals: &[u64], published: u64, failed: &[u64], expected: SequenceReport) {
        let mut tracker = SequenceTracker::new(limit);
        for &sequence in arrivals {
            tracker.record(sequence);
        }
        assert_eq!(tracker.finish(published, failed), expected, "arrivals {arrivals:?}");
    }

    fn report(expected: u64, received: u64, lost: u64, duplicated: u64, out_of_range: u64) -> SequenceReport {
        SequenceReport {
            expected,
            received,
            lost,
            duplicated,
            out_of_range,
        }
    }

    #[test]
    fn sequence_accounting() {
        check(10, &[0, 1, 2, 3], 4, &[], report(4, 4, 0, 0, 0));
        check(10, &[], 4, &[], report(4, 0, 4, 0, 0));
        check(10, &[0, 1, 3], 4, &[], report(4, 3, 1, 0, 0));
        check(10, &[0, 1, 1, 2, 3, 3, 3], 4, &[], report(4, 4, 0, 3, 0));
        check(10, &[3, 2, 1, 0], 4, &[], report(4, 4, 0, 0, 0));
        // At or above the limit: refused outright.
        check(10, &[0, 10, 99, u64::MAX], 1, &[], report(1, 1, 0, 0, 3));
        // Below the limit but never published.
        check(10, &[0, 1, 5], 2, &[], report(2, 2, 0, 0, 1));
        // A refused publish is neither expected nor lost, and still fine if it came.
        check(10, &[0, 2], 3, &[1], report(2, 2, 0, 0, 0));
        check(10, &[0, 1, 2], 3, &[1], report(2, 2, 0, 0, 0));
        check(10, &[0], 3, &[1], report(2, 1, 1, 0, 0));
    }

    #[test]
    fn full_words_are_compacted_and_still_count() {
        let mut tracker = SequenceTracker::new(1_000_000);
        for sequence in 0..10_000 {
            assert_eq!(tracker.record(sequence), Recorded::New);
        }
        assert!(tracker.words.len() <= 1, "{} words kept", tracker.words.len());
        assert_eq!(tracker.record(5), Recorded::Duplicate, "below the compacted mark");
        assert_eq!(tracker.record(9_999), Recorded::Duplicate);
        assert_eq!(tracker.distinct(), 10_000);
        assert_eq!(tracker.finish(10_000, &[]), report(10_000, 10_000, 0, 2, 0));
        assert_eq!(tracker.finish(9_990, &[]), report(9_990, 9_990, 0, 2, 10));
        assert_eq!(tracker.finish(10_050, &[]), report(10_050, 10_000, 50, 2, 0));
    }

    #[test]
    fn a_gap_keeps_the_words_after_it() {
        let mut tracker = SequenceTracker::new(1_000);
        for sequence in (0..200).filter(|&sequence| sequence != 70) {
            tracker.record(sequence);
        }
        assert_eq!(tracker.compacted_words, 1, "the word holding 70 stays");
        assert_eq!(tracker.finish(200, &[]), report(200, 199, 1, 0, 0));
        assert_eq!(tracker.record(70), Recorded::New);
        assert_eq!(tracker.compacted_words, 3);
        assert_eq!(tracker.finish(200, &[]), report(200, 200, 0, 0, 0));
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut histogram = new_histogram();
        for micros in 1..=1_000u64 {
            record_micros(&mut histogram, micros * 1_000);
        }
        let percentiles = Percentiles::from_micros(&histogram);
        let close = |actual: f64, wanted: f64| (actual - wanted).abs() <= wanted * 0.001 + 0.001;
        assert_eq!(percentiles.count, 1_000);
        assert!(close(percentiles.p50, 500.0), "{percentiles:?}");
        assert!(close(percentiles.p90, 900.0), "{percentiles:?}");
        assert!(close(percentiles.p99, 990.0), "{percentiles:?}");
        assert!(close(percentiles.p999, 999.0), "{percentiles:?}");
        assert!(close(percentiles.max, 1_000.0), "{percentiles:?}");
        assert_eq!(Percentiles::from_micros(&new_histogram()), Percentiles::default());
    }

    #[test]
    fn out_of_range_latencies_are_clamped_not_lost() {
        let mut histogram = new_histogram();
        record_micros(&mut histogram, 0);
        record_micros(&mut histogram, u64::MAX);
        assert_eq!(histogram.len(), 2);
        assert!(histogram.max() >= HISTOGRAM_HIGH_MICROS);
    }

    #[test]
    fn histograms_survive_encoding_and_merge() {
        let mut first = new_histogram();
        let mut second = new_histogram();
        for micros in [100, 200, 300] {
            record_micros(&mut first, micros);
        }
        for micros in [5_000, 7_000] {
            record_micros(&mut second, micros);
        }
        let mut merged = decode_histogram(&encode_histogram(&first)).expect("round trip");
        assert_eq!(merged, first);
        merge_histogram(
            &mut merged,
            &decode_histogram(&encode_histogram(&second)).expect("round trip"),
        )
        .expect("same bounds");
        assert_eq!(merged.len(), 5);
        assert_eq!(merged.min(), 100);
        assert!(merged.equivalent(merged.max(), 7_000));
        assert_eq!(merged.value_at_quantile(0.5), 300);
        assert!(decode_histogram("not base64!").is_err());
        assert!(decode_histogram("AAAA").is_err());
    }
}
