//! A future that finishes even when whoever awaits it goes away.
//!
//! A coalescing leader runs its call (the fleet lookup, the Diia call) in its own request
//! task: handing it to a spawned task costs a wake-up of another task, often on the other
//! thread, tens of µs on a busy box. But a single-use barcode must never be left
//! half-called, so when the request is dropped mid-call (the client hung up, its deadline
//! passed) the rest of the call is spawned and finishes on its own, filling the cache for
//! the next request as a spawned leader always did.

use std::pin::Pin;
use std::task::{Context, Poll};

/// Polled in place by its awaiter; spawned on the current runtime if dropped unfinished.
#[must_use = "a Detachable does nothing until awaited or dropped"]
pub struct Detachable<T: Send + 'static> {
    /// `None` once finished.
    work: Option<Pin<Box<dyn Future<Output = T> + Send>>>,
}

impl<T: Send + 'static> Detachable<T> {
    /// Wraps `work`; nothing runs until the value is polled or dropped.
    pub fn new(work: impl Future<Output = T> + Send + 'static) -> Self {
        Self {
            work: Some(Box::pin(work)),
        }
    }
}

impl<T: Send + 'static> Future for Detachable<T> {
    type Output = T;

    /// Polling again after it finished stays pending (as a fused future would).
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let Some(work) = self.work.as_mut() else {
            return Poll::Pending;
        };
        let output = std::task::ready!(work.as_mut().poll(cx));
        self.work = None;
        Poll::Ready(output)
    }
}

impl<T: Send + 'static> Drop for Detachable<T> {
    fn drop(&mut self) {
        // Outside a runtime (it is shutting down) there is nowhere left to finish it.
        if let Some(work) = self.work.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            drop(runtime.spawn(work));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn awaited_work_runs_in_place_once() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&runs);
        let thread = std::thread::current().id();
        let output = Detachable::new(async move {
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::current().id()
        })
        .await;
        assert_eq!(output, thread, "ran on the awaiting task's thread");
        tokio::task::yield_now().await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    // A paused clock: the 1 ms give-up and the 20 ms of work are ordered by tokio time
    // alone, not by how busy the machine is.
    #[tokio::test(start_paused = true)]
    async fn work_dropped_midway_still_finishes() {
        let (finished_tx, finished_rx) = tokio::sync::oneshot::channel();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let work = Detachable::new(async move {
            let _ = started_tx.send(());
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = finished_tx.send("done");
        });
        // The awaiter gives up after the work started (a client that hung up).
        let abandoned = tokio::time::timeout(Duration::from_millis(1), work).await;
        assert!(abandoned.is_err(), "the awaiter must time out first");
        started_rx.await.expect("the work started in place");
        let finished = tokio::time::timeout(Duration::from_secs(5), finished_rx).await;
        assert_eq!(finished.expect("finished in time").expect("sent"), "done");
    }

    #[tokio::test]
    async fn work_never_polled_still_runs_when_dropped() {
        let (finished_tx, finished_rx) = tokio::sync::oneshot::channel();
        drop(Detachable::new(async move {
            let _ = finished_tx.send(7);
        }));
        let finished = tokio::time::timeout(Duration::from_secs(5), finished_rx).await;
        assert_eq!(finished.expect("finished in time").expect("sent"), 7);
    }
}
