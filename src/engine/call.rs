//! One call as the engine sees it: its deadline, whether its caller is still waiting, and
//! the admission slot it holds until the last piece of its work (a queued backbone job
//! included) is gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;

use super::stats::Stats;

/// Why work for a call was dropped without being done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Abandoned {
    /// The call's deadline passed before the work started.
    #[error("the call's deadline passed before its backbone run started")]
    Deadline,
    /// The caller cancelled the call or went away.
    #[error("the call was cancelled")]
    Cancelled,
}

impl Abandoned {
    /// Its metric label.
    pub fn label(self) -> &'static str {
        match self {
            Abandoned::Deadline => "deadline",
            Abandoned::Cancelled => "cancelled",
        }
    }
}

/// A call in flight.
pub struct Call {
    deadline: Option<Instant>,
    cancelled: AtomicBool,
    stats: Arc<Stats>,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Call {
    /// A call that must be answered by `deadline`, holding admission `slot` while any of
    /// its work exists.
    pub fn new(
        deadline: Option<Instant>,
        slot: Option<OwnedSemaphorePermit>,
        stats: Arc<Stats>,
    ) -> Arc<Self> {
        stats.call_started();
        Arc::new(Call {
            deadline,
            cancelled: AtomicBool::new(false),
            stats,
            _slot: slot,
        })
    }

    /// Marks it cancelled: work not started yet is dropped.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Whether work for it should still be done; counts the drop when not.
    pub fn check(&self) -> Result<(), Abandoned> {
        // past its deadline is a deadline drop, whether or not the caller also left
        let reason = if self.deadline.is_some_and(|d| Instant::now() >= d) {
            Abandoned::Deadline
        } else if self.cancelled.load(Ordering::Relaxed) {
            Abandoned::Cancelled
        } else {
            return Ok(());
        };
        Err(reason)
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.stats.call_finished();
    }
}

/// Cancels its call when dropped before [`CancelOnDrop::finish`]: the gRPC handler holds
/// one, and tonic drops the handler when the client cancels or disconnects, so queued work
/// for a call nobody waits for is dropped instead of run.
pub struct CancelOnDrop(Option<Arc<Call>>);

impl CancelOnDrop {
    /// Guards `call`.
    pub fn new(call: &Arc<Call>) -> Self {
        CancelOnDrop(Some(call.clone()))
    }

    /// The call was answered; nothing to cancel.
    pub fn finish(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(call) = self.0.take() {
            call.cancel();
        }
    }
}

/// Reads a gRPC `grpc-timeout` header value ("<up to 8 digits><H|M|S|m|u|n>").
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_per_the_specification() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("30S"), Some(Duration::from_secs(30)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "10", "10s", "123456789S", "-1S", "1.5S", "10x"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_call_is_abandoned_once_cancelled_or_past_its_deadline() {
        let stats = Arc::new(Stats::default());
        let call = Call::new(None, None, stats.clone());
        assert_eq!(call.check(), Ok(()));
        assert_eq!(stats.snapshot().in_flight, 1);
        let guard = CancelOnDrop::new(&call);
        drop(guard);
        assert_eq!(call.check(), Err(Abandoned::Cancelled));
        let late = Call::new(Some(Instant::now()), None, stats.clone());
        assert_eq!(late.check(), Err(Abandoned::Deadline));
        let answered = Call::new(
            Some(Instant::now() + Duration::from_secs(60)),
            None,
            stats.clone(),
        );
        CancelOnDrop::new(&answered).finish();
        assert_eq!(answered.check(), Ok(()));
        drop((call, late, answered));
        assert_eq!(stats.snapshot().in_flight, 0);
    }
}
