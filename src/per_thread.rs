//! State an owner keeps per thread (a worker thread's Diia pool, its Redis lane, its log
//! buffer), dropped with the owner: one [`PerThread`] over the `thread_local` crate instead
//! of a `thread_local!` registry keyed by a global owner id, whose entries outlived their
//! owner for as long as the thread ran.
//!
//! The crate recycles a thread's slot for the next thread that starts after it ended; a
//! value left there belongs to the ended thread (a connection driven by its runtime, lines
//! it logged), so the new thread never uses it as its own: it is handed to `make`, which
//! keeps it (a log buffer whose lines are still to be written) or drops it (a pool).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use thread_local::ThreadLocal;

/// One value per thread for one owner; every value drops when the owner does.
///
/// Access takes the slot's lock, uncontended except while [`PerThread::retain`] visits it
/// (the log writer's swap): no allocation after a thread's first use.
pub struct PerThread<T: Send> {
    slots: ThreadLocal<Mutex<Slot<T>>>,
}

struct Slot<T> {
    /// The serial of the thread that made `value` (0: none yet).
    thread: u64,
    /// Whether that thread still runs.
    alive: Option<Arc<AtomicBool>>,
    value: Option<T>,
}

/// This thread's identity: serials are never reused, unlike the crate's slot indices.
struct Mark {
    serial: Cell<u64>,
    alive: Arc<AtomicBool>,
}

impl Drop for Mark {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Release);
    }
}

thread_local! {
    static THIS: Mark = Mark {
        serial: Cell::new(0),
        alive: Arc::new(AtomicBool::new(true)),
    };
}

/// This thread's serial; `None` while the thread is being torn down.
fn serial() -> Option<u64> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    THIS.try_with(|mark| {
        if mark.serial.get() == 0 {
            mark.serial.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        mark.serial.get()
    })
    .ok()
}

/// A lock whose holders never leave a value half-updated: a poisoned one is consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T: Send> Default for PerThread<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Send> PerThread<T> {
    /// No values yet.
    #[must_use]
    pub fn new() -> Self {
        Self {
            slots: ThreadLocal::new(),
        }
    }

    /// Runs `use_value` with this thread's value, made first by `make` when the thread has
    /// none: `make` is handed what an ended thread left in the slot this thread reuses, if
    /// anything. `use_value` gets `None` only while the thread is being torn down. It must
    /// not reach this same `PerThread` again (the slot is locked while it runs).
    pub fn with<R>(
        &self,
        make: impl FnOnce(Option<T>) -> T,
        use_value: impl FnOnce(Option<&mut T>) -> R,
    ) -> R {
        let Some(me) = serial() else {
            return use_value(None);
        };
        let mut slot = lock(self.slots.get_or(Self::empty));
        let value = match slot.value.take() {
            Some(value) if slot.thread == me => value,
            left => {
                slot.thread = me;
                slot.alive = THIS.try_with(|mark| Arc::clone(&mark.alive)).ok();
                make(left)
            }
        };
        use_value(Some(slot.value.insert(value)))
    }

    /// Runs `use_value` with this thread's value if it has one (never makes one).
    pub fn peek<R>(&self, use_value: impl FnOnce(Option<&mut T>) -> R) -> R {
        let Some(slot) = serial().and_then(|me| Some((me, self.slots.get()?))) else {
            return use_value(None);
        };
        let (me, slot) = slot;
        let mut slot = lock(slot);
        let mine = slot.thread == me;
        use_value(slot.value.as_mut().filter(|_| mine))
    }

    /// Visits every thread's value with whether its thread still runs; drops those for which
    /// `keep` says false. From any thread.
    pub fn retain(&self, mut keep: impl FnMut(&mut T, bool) -> bool) {
        for slot in &self.slots {
            let mut slot = lock(slot);
            let alive = slot
                .alive
                .as_ref()
                .is_some_and(|alive| alive.load(Ordering::Acquire));
            if let Some(value) = slot.value.as_mut()
                && !keep(value, alive)
            {
                slot.value = None;
            }
        }
    }

    /// How many threads hold a value.
    #[must_use]
    pub fn len(&self) -> usize {
        (&self.slots)
            .into_iter()
            .filter(|slot| lock(slot).value.is_some())
            .count()
    }

    /// Whether no thread holds a value.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn empty() -> Mutex<Slot<T>> {
        Mutex::new(Slot {
            thread: 0,
            alive: None,
            value: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its drops.
    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn every_value_drops_with_its_owner_including_other_threads_values() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let owner = PerThread::new();
        // All threads alive at once, so none inherits another's slot.
        let made = std::sync::Barrier::new(4);
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    owner.with(|_| Counted(Arc::clone(&dropped)), |_| ());
                    made.wait();
                });
            }
            owner.with(|_| Counted(Arc::clone(&dropped)), |_| ());
            made.wait();
            assert_eq!(owner.len(), 4);
        });
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            0,
            "kept after the threads ended"
        );
        drop(owner);
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            4,
            "all dropped with the owner"
        );
    }

    #[test]
    fn each_thread_gets_one_value_of_its_own() {
        let owner = PerThread::new();
        let made = AtomicUsize::new(0);
        let all_done = std::sync::Barrier::new(4);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        owner.with(
                            |_| {
                                made.fetch_add(1, Ordering::SeqCst);
                                0_u32
                            },
                            |count| *count.expect("running") += 1,
                        );
                    }
                    all_done.wait();
                    let mine = owner.peek(|count| count.copied());
                    assert_eq!(mine, Some(100), "no other thread's increments");
                });
            }
        });
        assert_eq!(made.load(Ordering::SeqCst), 4, "made once per thread");
        let mut seen = Vec::new();
        owner.retain(|count, _| {
            seen.push(*count);
            true
        });
        assert_eq!(seen, [100; 4]);
    }

    #[test]
    fn a_thread_never_takes_an_ended_threads_value_as_its_own() {
        let owner = Arc::new(PerThread::new());
        let first = Arc::clone(&owner);
        // A joined thread has run its thread-local destructors (a scoped one may not yet).
        std::thread::spawn(move || first.with(|_| 7_u32, |_| ()))
            .join()
            .expect("thread");
        owner.retain(|_, alive| {
            assert!(!alive, "its thread ended");
            true
        });
        // The next thread may be given the same slot: the leftover goes to `make`.
        let left = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut left = None;
                    owner.with(
                        |leftover| {
                            left = leftover;
                            1
                        },
                        |value| assert_eq!(value.copied(), Some(1)),
                    );
                    left
                })
                .join()
                .expect("thread")
        });
        assert!(matches!(left, None | Some(7)));
        assert_eq!(
            owner.peek(|value| value.copied()),
            None,
            "nothing made here"
        );
    }

    #[test]
    fn retain_drops_what_it_is_told_to() {
        let owner = PerThread::new();
        owner.with(|_| 1_u32, |_| ());
        owner.retain(|_, alive| !alive);
        assert!(owner.is_empty());
        assert_eq!(
            owner.with(|left| left.unwrap_or(2), |v| v.copied()),
            Some(2)
        );
    }
}
