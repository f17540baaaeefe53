//! Graceful drain: stop accepting, let requests in flight finish up to a deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// Drain signal and in-flight request tracking.
#[derive(Debug, Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    draining: watch::Sender<bool>,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// Held while a request is in flight; dropping it lets a drain finish.
#[derive(Debug)]
pub struct InFlight(Arc<Inner>);

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// Not draining, nothing in flight.
    pub fn new() -> Drain {
        Drain {
            inner: Arc::new(Inner {
                draining: watch::Sender::new(false),
                in_flight: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }

    /// Starts draining: listeners stop accepting and connections close when idle.
    pub fn trigger(&self) {
        self.inner.draining.send_replace(true);
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        *self.inner.draining.borrow()
    }

    /// Resolves when a drain starts.
    pub async fn signaled(&self) {
        let mut rx = self.inner.draining.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Marks one request in flight.
    pub fn enter(&self) -> InFlight {
        self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.inner.clone())
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    /// Waits until nothing is in flight or `deadline` passes; true if idle.
    pub async fn wait_idle(&self, deadline: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.inner.idle.notified();
                if self.in_flight() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(deadline, wait).await.is_ok()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
