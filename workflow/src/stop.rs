//! Stopping the workflow, and per-try deadlines.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, Receiver, Sender};
use parking_lot::Mutex;

/// Set once, seen everywhere: waits wake at once (a channel whose sender is dropped, and an
/// eventfd for threads that wait in `poll`).
#[derive(Debug)]
pub struct Stop {
    flag: AtomicBool,
    sender: Mutex<Option<Sender<()>>>,
    receiver: Receiver<()>,
    fd: OwnedFd,
}

impl Stop {
    /// Not stopped.
    pub fn new() -> std::io::Result<Stop> {
        let (sender, receiver) = bounded(0);
        let fd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        Ok(Stop {
            flag: AtomicBool::new(false),
            sender: Mutex::new(Some(sender)),
            receiver,
            fd,
        })
    }

    /// Stops: every wait returns.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.sender.lock().take();
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Waits `timeout` or until stopped; true when stopped.
    pub fn wait(&self, timeout: Duration) -> bool {
        select! {
            recv(self.receiver) -> _ => true,
            default(timeout) => self.is_stopped(),
        }
    }

    /// Disconnected once stopped: for `select!` with other channels.
    pub fn receiver(&self) -> &Receiver<()> {
        &self.receiver
    }

    /// Readable once stopped: for `poll` with other descriptors.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Calls a function when a deadline passes or the workflow stops, unless dropped first.
/// Dropping it waits for the call to finish when it already began.
pub struct Watchdog {
    done: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Watches until `deadline`.
    pub fn start(stop: &Stop, deadline: Instant, fire: impl FnOnce() + Send + 'static) -> Watchdog {
        let (done, finished) = bounded::<()>(0);
        let stopped = stop.receiver().clone();
        let thread = std::thread::Builder::new()
            .name("nexus-watchdog".into())
            .spawn(move || {
                let wait = deadline.saturating_duration_since(Instant::now());
                select! {
                    recv(finished) -> _ => {},
                    recv(stopped) -> _ => fire(),
                    default(wait) => fire(),
                }
            })
            .ok();
        Watchdog {
            done: Some(done),
            thread,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_watchdog_fires_at_its_deadline_and_not_after_drop() {
        let stop = Stop::new().unwrap();
        let (tx, rx) = bounded(1);
        let _w = Watchdog::start(&stop, Instant::now(), move || {
            let _ = tx.send(());
        });
        rx.recv().unwrap();
        let fired = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&fired);
        let w = Watchdog::start(
            &stop,
            Instant::now() + Duration::from_secs(3600),
            move || f.store(true, Ordering::SeqCst),
        );
        drop(w);
        assert!(!fired.load(Ordering::SeqCst));
    }

    #[test]
    fn stopping_wakes_waits_and_watchdogs() {
        let stop = Stop::new().unwrap();
        let (tx, rx) = bounded(1);
        let _w = Watchdog::start(
            &stop,
            Instant::now() + Duration::from_secs(3600),
            move || {
                let _ = tx.send(());
            },
        );
        stop.stop();
        rx.recv().unwrap();
        assert!(stop.wait(Duration::from_secs(3600)));
        assert!(stop.is_stopped());
    }
}
