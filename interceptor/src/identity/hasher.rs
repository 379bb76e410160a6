//! Executable hashes, off the data path.
//!
//! One thread hashes every executable the agent has not seen, a chunk at a
//! time, always the job with the fewest bytes left next: a small executable
//! is hashed in milliseconds even while a huge one is under way, so no
//! workload waits on another's hash. Results are cached by device, inode,
//! size and modification time, so a changed file is hashed again. A
//! connection waits for its own executable's hash at most [`DEADLINE`];
//! past it, it is recorded without one (later connections find it cached).

use std::{
    collections::HashMap,
    fs::File,
    io::Read,
    os::unix::fs::MetadataExt,
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// Longest a connection waits for its executable's hash.
pub const DEADLINE: Duration = Duration::from_millis(500);
/// Bytes hashed before the thread looks again at which job goes next.
const CHUNK: usize = 1 << 20;
/// Most executables being hashed at once; more are not hashed until some
/// finish (their connections are recorded without a hash).
const MOST_JOBS: usize = 64;

/// What identifies a file's contents here.
type Key = (u64, u64, u64, i64, i64);

/// A hash being made, or made (`Some`), or given up (`Some(None)`).
pub type Slot = watch::Receiver<Option<Option<String>>>;

struct Job {
    file: File,
    left: u64,
    hasher: Sha256,
    done: watch::Sender<Option<Option<String>>>,
    key: Key,
}

pub struct Hasher {
    slots: Arc<Mutex<HashMap<Key, Slot>>>,
    jobs: mpsc::SyncSender<Job>,
}

impl Hasher {
    pub fn start() -> std::io::Result<Hasher> {
        let (jobs, rx) = mpsc::sync_channel::<Job>(MOST_JOBS);
        let slots: Arc<Mutex<HashMap<Key, Slot>>> = Arc::default();
        let forget = slots.clone();
        std::thread::Builder::new()
            .name("exe-hasher".into())
            .spawn(move || run(&rx, &forget))?;
        Ok(Hasher { slots, jobs })
    }

    /// The hash of the opened executable `file`: a receiver that holds it
    /// once made (at once if cached).
    pub fn hash(&self, file: File) -> Option<Slot> {
        let m = file.metadata().ok()?;
        let key = (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec());
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get(&key) {
            return Some(slot.clone());
        }
        let (done, slot) = watch::channel(None);
        let job = Job {
            file,
            left: m.size(),
            hasher: Sha256::new(),
            done,
            key,
        };
        // Too many under way: no hash for this one now.
        self.jobs.try_send(job).ok()?;
        slots.insert(key, slot.clone());
        Some(slot)
    }
}

/// Waits for `slot` at most [`DEADLINE`].
pub async fn wait(mut slot: Slot) -> Option<String> {
    let made = tokio::time::timeout(DEADLINE, slot.wait_for(Option::is_some)).await;
    made.ok()?.ok()?.clone().flatten()
}

fn run(rx: &mpsc::Receiver<Job>, slots: &Mutex<HashMap<Key, Slot>>) {
    let mut active: Vec<Job> = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        // Take every waiting job; block only when there is nothing to do.
        if active.is_empty() {
            match rx.recv() {
                Ok(j) => active.push(j),
                Err(_) => return,
            }
        }
        active.extend(rx.try_iter());
        let Some(next) = (0..active.len()).min_by_key(|&i| active[i].left) else {
            continue;
        };
        let job = &mut active[next];
        let finished = match job.file.read(&mut buf) {
            Ok(0) => Some(Some(super::hex(&job.hasher.clone().finalize()))),
            Ok(n) => {
                job.hasher.update(&buf[..n]);
                job.left = job.left.saturating_sub(n as u64);
                None
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => None,
            Err(_) => Some(None),
        };
        if let Some(result) = finished {
            let job = active.swap_remove(next);
            if result.is_none() {
                // Unreadable: not cached, a later connection tries again.
                slots
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&job.key);
            }
            let _ = job.done.send(Some(result));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A small file is hashed while a large one is under way, and cached
    /// until it changes.
    #[tokio::test(flavor = "current_thread")]
    async fn small_files_do_not_wait_for_large_ones() {
        let dir = std::env::temp_dir().join(format!("icpt-hasher-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big");
        let f = File::create(&big).unwrap();
        f.set_len(2 << 30).unwrap(); // sparse: 2 GiB of zeros
        let small = dir.join("small");
        File::create(&small).unwrap().write_all(b"abc").unwrap();
        let h = Hasher::start().unwrap();
        let big_slot = h.hash(File::open(&big).unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let t = std::time::Instant::now();
        let got = wait(h.hash(File::open(&small).unwrap()).unwrap()).await;
        assert_eq!(
            got.as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        assert!(big_slot.borrow().is_none(), "2 GiB hashed that fast?");
        // Cached: the same receiver, already holding it.
        let again = h.hash(File::open(&small).unwrap()).unwrap();
        assert!(again.borrow().is_some());
        // Changed: hashed again.
        std::fs::write(&small, b"abcd").unwrap();
        let changed = wait(h.hash(File::open(&small).unwrap()).unwrap()).await;
        assert_ne!(changed, got);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
