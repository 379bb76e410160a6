//! Records open sessions while they run: the statements of sessions whose
//! protocol the agent inspects, and every session's bytes while they move (so a session the
//! agent could not end, killed, still shows how far it got).
//!
//! One task per data-plane thread ([`run`]) takes what has completed in
//! every session open on that thread, each [`STATEMENT_FLUSH`], and hands it
//! to the recorder. One thread ([`start_ticker`]) wakes those tasks. So a data-plane
//! runtime has no timer to keep: a connection's path polls none on every
//! message it relays, and a worker that parks sets no timeout.

use std::{
    cell::RefCell,
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Weak,
    },
};

use tokio::sync::Notify;

use crate::record::{codec::Chunk, Outbox, Recorder, SessionId};

/// How often completed statements of open sessions are recorded.
pub use crate::record::STATEMENT_FLUSH;

struct Open {
    /// Where an inspected session's statements arrive.
    outbox: Option<Outbox>,
    progress: Arc<interceptor_relay::Progress>,
    /// The bytes of the last progress record.
    reported: (u64, u64),
    /// Statements taken from this session so far.
    recorded: u32,
    /// [`run`] is handing some of them to the recorder.
    sending: bool,
}

/// Notified each time [`run`] has handed a session's statements over.
static SENT: Notify = Notify::const_new();

/// Sessions listed on all threads: an idle agent's workers are not woken.
static LISTED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The sessions open on this thread.
    static OPEN: RefCell<HashMap<SessionId, Open>> = RefCell::new(HashMap::new());
}

/// A session on this thread's list; dropping it takes the session off.
pub struct Listed {
    id: SessionId,
}

impl Listed {
    /// Puts a session on this thread's list: its bytes as its relay loop
    /// counts them in `progress`, and its statements if `outbox` is given.
    pub fn new(
        id: SessionId,
        outbox: Option<Outbox>,
        progress: Arc<interceptor_relay::Progress>,
    ) -> Listed {
        OPEN.with_borrow_mut(|open| {
            open.insert(
                id,
                Open {
                    outbox,
                    progress,
                    reported: (0, 0),
                    recorded: 0,
                    sending: false,
                },
            )
        });
        LISTED.fetch_add(1, Ordering::Relaxed);
        Listed { id }
    }

    /// Ends the session's recording: once [`run`] is not handing any of its
    /// statements over (so they reach the recorder first), takes it off the
    /// list and records what is left, answered or not. How many statements
    /// the session recorded in all.
    pub async fn finish(self, recorder: &Recorder) -> u32 {
        while OPEN.with_borrow(|open| open.get(&self.id).is_some_and(|o| o.sending)) {
            SENT.notified().await;
        }
        let Some(o) = self.take_off() else {
            return 0;
        };
        let Some(outbox) = o.outbox else {
            return 0;
        };
        let rest = outbox.take();
        let recorded = o.recorded + count(&rest);
        recorder.statements(self.id, rest).await;
        recorded
    }

    fn take_off(&self) -> Option<Open> {
        let open = OPEN
            .try_with(|open| open.borrow_mut().remove(&self.id))
            .ok()??;
        LISTED.fetch_sub(1, Ordering::Relaxed);
        Some(open)
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        // After `finish`, nothing is left to take off; a session whose task
        // is dropped (its runtime stopping) is taken off here.
        self.take_off();
    }
}

/// Records what completed in the sessions open on this thread, each time
/// `tick` is notified. Runs forever on a data-plane runtime (spawn it there).
pub async fn run(recorder: Recorder, tick: Arc<Notify>) {
    let mut ids = Vec::new();
    loop {
        tick.notified().await;
        OPEN.with_borrow(|open| ids.extend(open.keys().copied()));
        for id in ids.drain(..) {
            // One session at a time, marked while its records are on their
            // way: its end waits for them (see `Listed::finish`).
            let Some((done, moved)) = OPEN.with_borrow_mut(|open| {
                let o = open.get_mut(&id)?;
                let done = o.outbox.as_ref().map(Outbox::take).unwrap_or_default();
                let bytes = o.progress.get();
                let moved = (bytes != o.reported).then_some(bytes);
                if done.is_empty() && moved.is_none() {
                    return None;
                }
                o.recorded += count(&done);
                o.reported = bytes;
                o.sending = true;
                Some((done, moved))
            }) else {
                continue;
            };
            recorder.statements(id, done).await;
            if let Some((up, down)) = moved {
                recorder.progress(id, up, down).await;
            }
            OPEN.with_borrow_mut(|open| open.get_mut(&id).map(|o| o.sending = false));
            SENT.notify_waiters();
        }
    }
}

/// Records, for every session open on this thread, what it has completed
/// and what is still unanswered. For a stopping worker, once the relay
/// loops have stopped (their connections left what they held in their
/// outboxes): its sessions end with its runtime, and their last statements
/// would otherwise be lost.
pub async fn drain(recorder: &Recorder) {
    let left: Vec<_> = OPEN.with_borrow(|open| {
        open.iter()
            .filter_map(|(id, o)| Some((*id, o.outbox.as_ref()?.take())))
            .filter(|(_, list)| !list.is_empty())
            .collect()
    });
    for (id, list) in left {
        recorder.statements(id, list).await;
    }
}

/// How many statements `chunks` hold.
fn count(chunks: &[Chunk]) -> u32 {
    chunks.iter().map(|c| c.count).sum()
}

/// Starts the thread that notifies each worker's [`run`] every
/// [`STATEMENT_FLUSH`]; it ends once every worker is gone.
pub fn start_ticker(ticks: &[Arc<Notify>]) -> std::io::Result<()> {
    let ticks: Vec<Weak<Notify>> = ticks.iter().map(Arc::downgrade).collect();
    std::thread::Builder::new()
        .name("statement-flush".into())
        .spawn(move || loop {
            std::thread::sleep(STATEMENT_FLUSH);
            let idle = LISTED.load(Ordering::Relaxed) == 0;
            let mut alive = false;
            for t in ticks.iter().filter_map(Weak::upgrade) {
                alive = true;
                if !idle {
                    // Kept as a permit if the task is busy: it goes round again.
                    t.notify_one();
                }
            }
            if !alive {
                return;
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{future::Future, task::Poll};

    fn listed(id: SessionId) -> bool {
        OPEN.with_borrow(|open| open.contains_key(&id))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_session_end_waits_while_its_statements_are_handed_over() {
        let dir = std::env::temp_dir().join(format!("icpt-flush-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(crate::record::SledStore::open(&dir).unwrap());
        let (recorder, writer) = Recorder::start(store);
        let id = SessionId(0x5e55_1000);
        let l = Listed::new(id, Some(Outbox::default()), Arc::default());
        OPEN.with_borrow_mut(|open| {
            let o = open.get_mut(&id).unwrap();
            o.recorded = 3;
            o.sending = true;
        });
        {
            let mut finish = std::pin::pin!(l.finish(&recorder));
            let first = std::future::poll_fn(|cx| Poll::Ready(finish.as_mut().poll(cx))).await;
            assert!(
                first.is_pending(),
                "finished while statements were on their way"
            );
            assert!(listed(id));
            // A notification for another session's hand-over does not end it.
            SENT.notify_waiters();
            let again = std::future::poll_fn(|cx| Poll::Ready(finish.as_mut().poll(cx))).await;
            assert!(again.is_pending());
            OPEN.with_borrow_mut(|open| open.get_mut(&id).unwrap().sending = false);
            SENT.notify_waiters();
            assert_eq!(finish.await, 3);
            assert!(!listed(id));
        }
        drop(recorder);
        writer.join();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_dropped_session_leaves_the_list() {
        let id = SessionId(0x5e55_2000);
        let l = Listed::new(id, Some(Outbox::default()), Arc::default());
        assert!(listed(id));
        drop(l);
        assert!(!listed(id));
    }
}
