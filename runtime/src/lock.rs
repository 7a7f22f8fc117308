//! Locks that outlive a panicking holder.
//!
//! A panic while a lock is held (a bug, never input: nothing from the wire
//! reaches a panicking call) poisons a `std` lock. Everything Weir keeps
//! behind a lock stays consistent between statements — counters, maps of
//! held deliveries, caches — so the data is used as it is rather than
//! turning one panic into a panic in every later caller.
//!
//! A leaf: it imports nothing of the crate.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locking of a `Mutex` that ignores poisoning (see the [module](self)).
pub trait Unpoisoned<T: ?Sized> {
    /// The guard, poisoned or not.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> Unpoisoned<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Read and write locking of an `RwLock` that ignores poisoning (see the
/// [module](self)).
pub trait UnpoisonedRw<T: ?Sized> {
    /// A read guard, poisoned or not.
    fn read_locked(&self) -> RwLockReadGuard<'_, T>;
    /// A write guard, poisoned or not.
    fn write_locked(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> UnpoisonedRw<T> for RwLock<T> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T> {
        self.read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_locked(&self) -> RwLockWriteGuard<'_, T> {
        self.write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_gives_its_data() {
        let shared = std::sync::Arc::new(Mutex::new(1));
        let holder = shared.clone();
        let panicked = std::thread::spawn(move || {
            let _guard = holder.locked();
            panic!("while holding the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(shared.lock().is_err(), "the lock is poisoned");
        *shared.locked() += 1;
        assert_eq!(*shared.locked(), 2);
        let rw = RwLock::new(5);
        *rw.write_locked() += 1;
        assert_eq!(*rw.read_locked(), 6);
    }
}
