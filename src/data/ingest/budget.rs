//! The worker's memory for publish bodies in flight (`--body-memory`).
//!
//! Each body may hold its first [`FREE_BYTES`] without asking; what it holds beyond that is
//! drawn from one budget shared by every publish of the worker, as the bytes arrive, and
//! given back when the request is answered. A body that finds the budget spent is answered 503
//! with `Retry-After` at once, and nothing of it is stored.
//!
//! So slow clients sending large bodies hold at most the budget (plus the free part of each
//! connection, bounded by the connection cap), and while they hold it, ordinary publishes (a
//! few events, under the free part) still pass: only other large bodies are turned away.

use std::sync::Arc;

use tokio::sync::Semaphore;

/// Bytes of each body that do not count against the budget: a request of a few events (a
/// CloudEvent is typically well under 1 KiB). 16 KiB × the default 4096 connections is 64 MiB,
/// the most that connections waiting in their bodies can hold outside the budget.
pub const FREE_BYTES: usize = 16 * 1024;

/// The shared budget.
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl BodyBudget {
    pub fn new(total: usize) -> BodyBudget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        BodyBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// The budget of one request's body, empty so far.
    pub fn hold(&self) -> BodyHold {
        BodyHold {
            bytes: self.bytes.clone(),
            total: self.total,
            held: 0,
        }
    }

    /// Bytes of the budget not held by any body now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }
}

/// What one body holds of the budget; given back when dropped (the request was answered).
pub struct BodyHold {
    bytes: Arc<Semaphore>,
    total: usize,
    held: usize,
}

/// The budget is spent: other bodies hold it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the worker's memory for request bodies in flight ({total} bytes) is in use")]
pub struct Spent {
    pub total: usize,
}

impl BodyHold {
    /// Accounts for a body that has grown to `len` bytes. A single body larger than the whole
    /// budget is capped at the budget, so it can pass when nothing else holds any (its size
    /// is bounded by `maxRequestBytes` anyway).
    pub fn grow_to(&mut self, len: usize) -> Result<(), Spent> {
        let want = len.saturating_sub(FREE_BYTES).min(self.total);
        let Some(more) = want.checked_sub(self.held).filter(|m| *m > 0) else {
            return Ok(());
        };
        let spent = || Spent { total: self.total };
        let permits = u32::try_from(more).map_err(|_| spent())?;
        let permit = self.bytes.try_acquire_many(permits).map_err(|_| spent())?;
        permit.forget(); // given back in Drop
        self.held += more;
        Ok(())
    }
}

impl Drop for BodyHold {
    fn drop(&mut self) {
        self.bytes.add_permits(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_bodies_are_free_and_large_ones_share_the_budget() {
        let budget = BodyBudget::new(100_000);
        let mut small = budget.hold();
        small.grow_to(FREE_BYTES).unwrap();
        assert_eq!(budget.available(), 100_000);

        let mut a = budget.hold();
        a.grow_to(FREE_BYTES + 60_000).unwrap();
        a.grow_to(FREE_BYTES + 70_000).unwrap(); // only the growth is drawn
        assert_eq!(budget.available(), 30_000);
        let mut b = budget.hold();
        assert_eq!(
            b.grow_to(FREE_BYTES + 40_000),
            Err(Spent { total: 100_000 })
        );
        // A small body still passes while the large ones hold the budget.
        let mut c = budget.hold();
        assert_eq!(c.grow_to(2_000), Ok(()));
        drop(a);
        assert_eq!(budget.available(), 100_000);
        b.grow_to(FREE_BYTES + 40_000).unwrap();
        drop(b);
        assert_eq!(budget.available(), 100_000);
    }

    #[test]
    fn a_body_larger_than_the_budget_takes_all_of_it_when_free() {
        let budget = BodyBudget::new(1000);
        let mut huge = budget.hold();
        huge.grow_to(FREE_BYTES + 5000).unwrap();
        assert_eq!(budget.available(), 0);
        let mut other = budget.hold();
        assert!(other.grow_to(FREE_BYTES + 1).is_err());
        drop(huge);
        assert_eq!(budget.available(), 1000);
    }
}
