//! Where the session's task runs: on the caller's thread while the caller
//! waits for completions, and on a keeper thread while it does not.
//!
//! Why not a session thread of its own: with one, every completion woke the
//! caller's thread and every resubmission woke the session's, and the
//! session had moved on to the next read's data before the caller could
//! hand back the buffer it had just finished with. Data then landed in a
//! buffer last touched 16 MiB earlier: the kernel's copy out of the socket
//! cost twice what it costs into a cache-warm one. Driven from the caller's
//! `reap`, a finished read's buffer is resubmitted before the next read's
//! data is taken in, and nothing crosses threads on the hot path.
//!
//! A current-thread tokio runtime lets any thread drive it by calling
//! `Runtime::block_on`, one at a time: the caller does so in `reap`. The
//! keeper covers the gaps (answering the target's NOP-Ins, our keepalives,
//! command timeouts, reconnects, commands submitted by a caller that is busy
//! elsewhere): once the caller has not waited for [`IDLE`], the keeper drives
//! the runtime until the caller next wants it back.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio::sync::Notify;

/// How long the caller may go without waiting before the keeper takes over.
pub const IDLE: Duration = Duration::from_millis(10);

pub struct Runner {
    rt: Arc<Runtime>,
    shared: Arc<Shared>,
    keeper: Option<JoinHandle<()>>,
}

struct Shared {
    epoch: Instant,
    /// The caller is inside `block_on`.
    caller_waiting: AtomicBool,
    /// When the caller last left `block_on`, in ns since `epoch`.
    caller_left: AtomicU64,
    /// The keeper is driving the runtime (or about to).
    keeper_driving: AtomicBool,
    /// Tells a driving keeper to give the runtime back.
    release: Notify,
    stop: AtomicBool,
}

impl Shared {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

impl Runner {
    pub fn new(name: String) -> std::io::Result<Self> {
        let rt = Arc::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        );
        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            caller_waiting: AtomicBool::new(false),
            caller_left: AtomicU64::new(0),
            keeper_driving: AtomicBool::new(false),
            release: Notify::new(),
            stop: AtomicBool::new(false),
        });
        let keeper = {
            let (rt, shared) = (rt.clone(), shared.clone());
            std::thread::Builder::new()
                .name(name)
                .spawn(move || keep(&rt, &shared))?
        };
        Ok(Self {
            rt,
            shared,
            keeper: Some(keeper),
        })
    }

    /// Starts `task` on the runtime; it runs whenever someone drives it.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt.spawn(task)
    }

    /// Drives the runtime on this thread until `f` completes.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        let s = &self.shared;
        s.caller_waiting.store(true, SeqCst);
        // Paired with the keeper's store-then-load: either it sees us
        // waiting and stands down, or we see it driving and release it.
        if s.keeper_driving.load(SeqCst) {
            s.release.notify_one();
        }
        // Also on unwinding, or the keeper would never drive again.
        struct Leave<'a>(&'a Shared);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.caller_left.store(self.0.now(), SeqCst);
                self.0.caller_waiting.store(false, SeqCst);
            }
        }
        let _leave = Leave(s);
        self.rt.block_on(f)
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        self.shared.release.notify_one();
        if let Some(k) = self.keeper.take() {
            k.thread().unpark();
            let _ = k.join();
        }
    }
}

/// The keeper thread: drives the runtime while the caller is away.
fn keep(rt: &Runtime, s: &Shared) {
    while !s.stop.load(SeqCst) {
        std::thread::park_timeout(IDLE);
        let away = s.now().saturating_sub(s.caller_left.load(SeqCst));
        if s.caller_waiting.load(SeqCst) || away < IDLE.as_nanos() as u64 {
            continue;
        }
        s.keeper_driving.store(true, SeqCst);
        if !s.caller_waiting.load(SeqCst) && !s.stop.load(SeqCst) {
            rt.block_on(s.release.notified());
        }
        s.keeper_driving.store(false, SeqCst);
    }
}

/// Declares a future `Send` that the compiler cannot prove is.
///
/// For the session only (see `session::start`): its future is not `Send`
/// because its parts share the session state through a `RefCell` that the
/// future itself owns.
pub struct AssertSend<F>(F);

impl<F> AssertSend<F> {
    /// # Safety
    /// Every value in `f` that is not `Send` must be owned by `f` and reached
    /// only from inside `f`'s polls, with nothing tied to the thread that
    /// polls it (no thread-locals or lock guards held across an await), so
    /// that polling it from one thread after another cannot race.
    pub unsafe fn new(f: F) -> Self {
        Self(f)
    }
}

// SAFETY: the contract of `AssertSend::new`.
unsafe impl<F> Send for AssertSend<F> {}

impl<F: Future> Future for AssertSend<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: structural pinning of the only field, never moved out.
        unsafe { self.map_unchecked_mut(|s| &mut s.0) }.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use std::thread::ThreadId;

    /// A task that ticks every millisecond and records which thread ran
    /// its latest tick.
    fn ticker(runner: &Runner) -> (Arc<AtomicUsize>, Arc<Mutex<Option<ThreadId>>>) {
        let ticks = Arc::new(AtomicUsize::new(0));
        let last = Arc::new(Mutex::new(None));
        let (t, l) = (ticks.clone(), last.clone());
        runner.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1)).await;
                *l.lock().unwrap() = Some(std::thread::current().id());
                t.fetch_add(1, SeqCst);
            }
        });
        (ticks, last)
    }

    #[test]
    fn keeper_drives_the_runtime_while_the_caller_is_away() {
        let runner = Runner::new("runner-test".into()).unwrap();
        let (ticks, last) = ticker(&runner);
        // Nobody calls block_on: only the keeper can run the task.
        std::thread::sleep(IDLE * 20);
        assert!(ticks.load(SeqCst) > 10, "ticks {}", ticks.load(SeqCst));
        assert_ne!(*last.lock().unwrap(), Some(std::thread::current().id()));
    }

    #[test]
    fn a_waiting_caller_drives_the_runtime_itself() {
        let runner = Runner::new("runner-test".into()).unwrap();
        let (ticks, last) = ticker(&runner);
        std::thread::sleep(IDLE * 5); // let the keeper take over first
        let before = ticks.load(SeqCst);
        // The caller takes the runtime back and runs the task's ticks.
        let ran = runner.block_on(async {
            tokio::time::sleep(IDLE * 10).await;
            *last.lock().unwrap()
        });
        assert!(ticks.load(SeqCst) > before + 5);
        assert_eq!(ran, Some(std::thread::current().id()));
        // Each call runs the task on the caller's thread. (Read inside the
        // call: between calls a preempted caller may leave it to the keeper.)
        for _ in 0..20 {
            let ran = runner.block_on(async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                *last.lock().unwrap()
            });
            assert_eq!(ran, Some(std::thread::current().id()));
        }
    }

    #[test]
    fn dropping_the_runner_stops_the_keeper() {
        let runner = Runner::new("runner-test".into()).unwrap();
        let (ticks, _) = ticker(&runner);
        std::thread::sleep(IDLE * 5);
        drop(runner);
        let after = ticks.load(SeqCst);
        std::thread::sleep(IDLE * 5);
        assert_eq!(
            ticks.load(SeqCst),
            after,
            "the task ran after the runner was dropped"
        );
    }
}
