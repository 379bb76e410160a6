//! Waking a relayed connection from another thread, wherever it is relayed.
//!
//! A connection whose machines hold a message (waiting for a decision made
//! elsewhere) reads nothing more from its client. Whoever decides rings its
//! [`Bell`]: the loop relaying the connection at that moment is told (a
//! [`Job::Wake`](crate::event_loop::Job) naming the connection's slot and
//! the bell, so a slot since given to another connection is not woken), and
//! it hands the machines their input again.
//!
//! A connection can move to another loop at any time (see
//! [`Loops`](crate::Loops)). A loop that takes a connection in records
//! itself as the bell's home, then pumps the connection, which looks at
//! whether the bell was rung: a ring that raced with the move is seen
//! either by the new home's wake or by that first pump. Nothing is lost.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, Mutex,
};

use crate::event_loop::Handle;

/// Wakes one relayed connection (see the module's documentation). Clones
/// ring the same connection.
#[derive(Clone, Default)]
pub struct Bell(Arc<Inner>);

#[derive(Default)]
struct Inner {
    rung: AtomicBool,
    /// The loop relaying the connection now, and its slot there.
    home: Mutex<Option<(Handle, usize)>>,
}

impl Bell {
    pub fn new() -> Bell {
        Bell::default()
    }

    /// Wakes the connection: its machines are handed their input again on
    /// the loop that relays it now (or as soon as one takes it in).
    pub fn ring(&self) {
        self.0.rung.store(true, Ordering::SeqCst);
        let home = self.0.home.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((handle, slot)) = &*home {
            handle.wake(*slot, self.id());
        }
    }

    /// Which bell this is (the same for every clone).
    pub(crate) fn id(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }

    /// The connection now lives in `slot` of the loop `handle` reaches.
    pub(crate) fn joined(&self, handle: &Handle, slot: usize) {
        let mut home = self.0.home.lock().unwrap_or_else(|p| p.into_inner());
        *home = Some((handle.clone(), slot));
    }

    /// Whether the bell was rung since the last look.
    pub(crate) fn take_rung(&self) -> bool {
        self.0.rung.load(Ordering::Relaxed) && self.0.rung.swap(false, Ordering::SeqCst)
    }
}
