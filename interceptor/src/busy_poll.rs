//! Optional busy polling of the data plane (`agent.busy_poll_us`).
//!
//! A request relayed to a server is usually answered within tens of
//! microseconds. A data-plane thread that sleeps in the meantime pays for a
//! wakeup to see the answer, and on virtual machines waking an idle CPU is
//! the largest part of what a proxy adds to request/response latency. With
//! a window set, each worker runs a poller task: for that long after the
//! last byte the thread read, it keeps polling its sockets (a non-blocking
//! `epoll_wait` per round) instead of sleeping.
//!
//! Every round yields the CPU to the kernel first, so a runnable task on
//! this CPU (the server being answered, say) runs before the next round:
//! the poller fills idle time rather than competing for busy time. Off by
//! default, like the kernel's own `busy_poll`: the agent's CPU time rises
//! by up to the window after every message it reads, which monitoring will
//! show, and on burstable or shared virtual machines idle time is not free.

use std::{
    cell::{Cell, RefCell},
    task::{Poll, Waker},
    time::{Duration, Instant},
};

thread_local! {
    /// Set on a thread that runs a poller.
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    /// When this thread last read bytes from a relayed socket.
    static LAST_READ: Cell<Option<Instant>> = const { Cell::new(None) };
    /// The poller, while it waits for activity.
    static WAITING: RefCell<Option<Waker>> = const { RefCell::new(None) };
    /// Polling rounds run on this thread.
    static ROUNDS: Cell<u64> = const { Cell::new(0) };
}

/// Tells this thread's poller, if any, that a relay read bytes.
#[inline]
pub fn activity() {
    if !ENABLED.get() {
        return;
    }
    LAST_READ.set(Some(Instant::now()));
    if let Some(w) = WAITING.take() {
        w.wake();
    }
}

/// Polls this thread's sockets for `window` after each read; runs forever
/// on the worker's runtime (spawn it there).
pub async fn poller(window: Duration) {
    ENABLED.set(true);
    let recent = || LAST_READ.get().is_some_and(|t| t.elapsed() < window);
    loop {
        std::future::poll_fn(|cx| {
            if recent() {
                Poll::Ready(())
            } else {
                WAITING.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
        while recent() {
            ROUNDS.set(ROUNDS.get() + 1);
            // SAFETY: sched_yield takes no arguments and cannot fail.
            unsafe { libc::sched_yield() };
            // Lets the runtime poll its sockets without blocking, then
            // comes back here.
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CPU time this thread has used.
    fn thread_cpu() -> Duration {
        // SAFETY: clock_gettime fills the timespec we pass.
        let ts = unsafe {
            let mut ts: libc::timespec = std::mem::zeroed();
            libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
            ts
        };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[test]
    fn polls_only_for_the_window_after_activity() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::spawn(poller(Duration::from_millis(40)));
            tokio::task::yield_now().await;
            // Each phase: polling rounds run and CPU time used. CPU time is
            // only bounded above: other tests may share the CPU.
            let phase = |ms| async move {
                let (rounds, cpu) = (ROUNDS.get(), thread_cpu());
                tokio::time::sleep(Duration::from_millis(ms)).await;
                (ROUNDS.get() - rounds, thread_cpu() - cpu)
            };
            // No activity: the thread sleeps.
            let (rounds, cpu) = phase(100).await;
            assert_eq!(rounds, 0);
            assert!(cpu < Duration::from_millis(15), "used {cpu:?} idle");
            // Activity: the thread polls for about the window, then sleeps.
            activity();
            let (rounds, cpu) = phase(200).await;
            assert!(rounds > 10, "{rounds} rounds after activity");
            assert!(
                cpu < Duration::from_millis(75),
                "used {cpu:?} after activity"
            );
            let (rounds, cpu) = phase(100).await;
            assert_eq!(rounds, 0, "still polling after the window");
            assert!(
                cpu < Duration::from_millis(15),
                "used {cpu:?} after the window"
            );
        });
    }

    #[test]
    fn off_unless_a_poller_runs_on_the_thread() {
        std::thread::spawn(|| {
            activity();
            assert!(LAST_READ.get().is_none());
            assert!(WAITING.take().is_none());
        })
        .join()
        .unwrap();
    }
}
