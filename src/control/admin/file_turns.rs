//! The state files the admin thread keeps (the key store,
//! `revocations.json`, `key-dates.json`), written off it.
//!
//! Each write syncs the file and its directory. On a slow disk (a network
//! file system, a failing drive) that takes seconds, and on the admin
//! thread it held the whole admin port: `/healthz` went unanswered, so a
//! balancer took the relay out of rotation, for an operator's revocation
//! or account change. So each write runs on the admin executor's blocking
//! thread, and the admin thread answers meanwhile.
//!
//! Writes of one file keep the order they were asked in, and each writes
//! what the admin thread holds when its turn comes (not when it was
//! asked): the last write to end holds the latest state. While one is
//! queued or under way, the file on disk is older than the admin
//! thread's state, which [`FileTurns::busy`] tells the checks that read
//! the file back (another process's save, a file gone).

use std::cell::Cell;

/// One state file's writes, one at a time, in order.
#[derive(Debug)]
pub(super) struct FileTurns {
    order: glommio::sync::Semaphore,
    /// Writes asked for and not ended (waiting for their turn, or under way).
    asked: Cell<usize>,
}

impl Default for FileTurns {
    fn default() -> Self {
        FileTurns {
            order: glommio::sync::Semaphore::new(1),
            asked: Cell::new(0),
        }
    }
}

/// Counts one in `count` (a write asked for, a request being answered)
/// until it ends or is dropped.
pub(super) struct Counted<'a>(&'a Cell<usize>);

impl<'a> Counted<'a> {
    pub(super) fn new(count: &'a Cell<usize>) -> Counted<'a> {
        count.set(count.get() + 1);
        Counted(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

impl FileTurns {
    /// Whether a write is waiting for its turn or under way: the file on
    /// disk may be older than what the admin thread holds.
    pub(super) fn busy(&self) -> bool {
        self.asked.get() > 0
    }

    /// Once this file's earlier writes have ended: `make` builds the
    /// write from the admin thread's state as it is then, and the write
    /// runs on the blocking thread. Returns the write's result.
    pub(super) async fn write<J, T>(&self, make: impl FnOnce() -> J) -> T
    where
        J: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let _asked = Counted::new(&self.asked);
        // The semaphore is never closed: the admin thread owns it.
        let _turn = self.order.acquire_permit(1).await;
        let job = make();
        // This thread's work waits on the disk meanwhile: the watchdog
        // counts a reload or a stop that waits for it as alive.
        let _disk = crate::core::disk_wait::writing();
        glommio::executor().spawn_blocking(job).await
    }

    /// Waits for the writes asked for so far to end (the stop waits, so a
    /// change answered as saved is on disk before the process exits).
    pub(super) async fn settled(&self) {
        let _turn = self.order.acquire_permit(1).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;
    use std::sync::{Arc, Mutex};

    /// Two writes asked for while the first is under way: the second
    /// builds from the state when its turn comes, after the first ended,
    /// and the file reads busy until both have ended.
    #[test]
    fn writes_go_in_order_and_build_from_the_state_at_their_turn() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let turns = Rc::new(FileTurns::default());
                let state = Rc::new(Cell::new(1));
                let disk = Arc::new(Mutex::new(Vec::new()));
                let (release, held) = std::sync::mpsc::channel::<()>();
                let first = {
                    let (turns, state, disk) = (turns.clone(), state.clone(), disk.clone());
                    glommio::spawn_local(async move {
                        turns
                            .write(|| {
                                let v = state.get();
                                move || {
                                    held.recv().unwrap();
                                    disk.lock().unwrap().push(v);
                                }
                            })
                            .await
                    })
                };
                glommio::executor().yield_now().await;
                let second = {
                    let (turns, state, disk) = (turns.clone(), state.clone(), disk.clone());
                    glommio::spawn_local(async move {
                        turns
                            .write(|| {
                                let v = state.get();
                                move || disk.lock().unwrap().push(v)
                            })
                            .await
                    })
                };
                glommio::executor().yield_now().await;
                // Changed after the second was asked for, before its turn.
                state.set(2);
                assert!(turns.busy());
                release.send(()).unwrap();
                first.await;
                second.await;
                assert_eq!(*disk.lock().unwrap(), [1, 2]);
                assert!(!turns.busy());
                turns.settled().await;
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
