//! The shutdown signal threaded through every task: set once, seen by all.

use tokio::sync::watch;

/// A receiver's side: cheap to clone, one per task.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// The sender's side, held by whoever decides the server stops.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// Resolves once shutdown has begun (at once if it already has).
    pub async fn wait(&mut self) {
        // An error means the trigger is gone, which also means "stop".
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }
}
