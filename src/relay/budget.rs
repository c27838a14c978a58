//! A budget of bytes held at once (`max_in_flight_bytes`), shared by the relay's ingress
//! (callbacks being read, checked and stored) and its pull side (answers not yet sent):
//! a share is taken without waiting, or refused, and given back when its permit drops.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes are counted in KiB (a semaphore counts in `u32`).
const UNIT: usize = 1024;

/// A byte budget; cheap to share (`Arc` inside).
#[derive(Clone, Debug)]
pub struct ByteBudget {
    permits: Arc<Semaphore>,
    units: u32,
}

impl ByteBudget {
    /// A budget of `bytes` (at least one unit).
    #[must_use]
    pub fn new(bytes: usize) -> Self {
        let units = (bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Self {
            permits: Arc::new(Semaphore::new(units)),
            units: u32::try_from(units).unwrap_or(u32::MAX),
        }
    }

    /// A share of `bytes` (rounded up to a unit, at most the whole budget, so that one
    /// request always fits), or `None` while the budget is taken.
    #[must_use]
    pub fn try_take(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let units = u32::try_from(bytes.div_ceil(UNIT).max(1))
            .unwrap_or(u32::MAX)
            .min(self.units);
        Arc::clone(&self.permits).try_acquire_many_owned(units).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_refused_while_taken_and_one_always_fits() {
        let budget = ByteBudget::new(10 * UNIT);
        let first = budget.try_take(6 * UNIT);
        assert!(first.is_some());
        assert!(budget.try_take(5 * UNIT).is_none(), "11 KiB of 10 KiB");
        assert!(budget.try_take(4 * UNIT).is_some());
        drop(first);
        // Larger than the whole budget: it takes all of it, not never.
        let all = budget.try_take(100 * UNIT);
        assert!(all.is_some());
        assert!(budget.try_take(1).is_none());
        drop(all);
        assert!(budget.try_take(1).is_some());
    }
}
