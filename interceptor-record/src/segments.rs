//! The evidence log on disk: append-only segment files in `DATA_DIR/log`,
//! each named by the seq of its first entry (`00000000000000000000.log`),
//! holding frames:
//!
//! ```text
//! len u32 | seq u64 | entry (len bytes; see crate::log)
//! ```
//!
//! (big-endian). The sled store indexes them (seq → segment, offset,
//! length) and says where the log ends; reading a log means reading these
//! files front to back with a small buffer, so `verify` and `export` need
//! the same memory for ten entries or ten million, read a live agent's log
//! without stopping it, and never write to it. Pruning removes whole
//! segments, which gives their disk space back at once.

use std::{
    fs::File,
    io::{BufReader, Read, Seek, SeekFrom, Write},
    os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

/// A segment is closed, and the next begun, once it holds this much (the
/// default of `[store] segment_size`).
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Bytes before a frame's entry.
pub const FRAME_HEAD: usize = 4 + 8;
/// Longest entry a frame may hold: far above any the agent writes (a
/// statements entry is about 32 KiB), so a damaged length is an error,
/// never a huge allocation.
const FRAME_MAX: u32 = 16 << 20;

/// Where an entry's frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The segment: the seq of its first entry.
    pub segment: u64,
    /// Where the frame starts in it.
    pub offset: u64,
    /// The entry's length (the frame is [`FRAME_HEAD`] more).
    pub len: u32,
}

impl Location {
    pub fn encode(&self) -> [u8; 20] {
        let mut out = [0u8; 20];
        out[..8].copy_from_slice(&self.segment.to_be_bytes());
        out[8..16].copy_from_slice(&self.offset.to_be_bytes());
        out[16..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Option<Location> {
        if b.len() != 20 {
            return None;
        }
        Some(Location {
            segment: u64::from_be_bytes(b[..8].try_into().ok()?),
            offset: u64::from_be_bytes(b[8..16].try_into().ok()?),
            len: u32::from_be_bytes(b[16..].try_into().ok()?),
        })
    }

    /// Where the frame ends.
    pub fn end(&self) -> u64 {
        self.offset + FRAME_HEAD as u64 + u64::from(self.len)
    }
}

pub fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.log"))
}

/// The segments in `dir`, by their first seq (other files are ignored).
pub fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut out = Vec::new();
    let list = match std::fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in list {
        let name = e?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name.strip_suffix(".log").filter(|n| n.len() == 20) {
            if let Ok(first) = n.parse() {
                out.push(first);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Appends frames to the newest segment; begins a new one when it is full.
pub struct Writer {
    dir: PathBuf,
    /// A segment is closed once it holds this much.
    pub segment_bytes: u64,
    /// The open segment: its first seq, the file, and its length.
    current: Option<(u64, File, u64)>,
}

impl Writer {
    /// A writer that goes on at `end` of segment `segment` (none: the log
    /// is empty). Whatever the file holds past `end` must have been dealt
    /// with by the caller ([`recover`]).
    pub fn open(dir: &Path, at: Option<(u64, u64)>) -> std::io::Result<Writer> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let current = match at {
            Some((segment, end)) => {
                let f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(segment_path(dir, segment))?;
                Some((segment, f, end))
            }
            None => None,
        };
        Ok(Writer {
            dir: dir.to_owned(),
            segment_bytes: SEGMENT_BYTES,
            current,
        })
    }

    /// Appends `frames` (whole frames, the first of entry `first_seq`);
    /// returns the segment they went to and the offset they start at.
    pub fn append(&mut self, frames: &[u8], first_seq: u64) -> std::io::Result<(u64, u64)> {
        let full = self
            .current
            .as_ref()
            .is_none_or(|(_, _, len)| *len >= self.segment_bytes);
        if full {
            if let Some((_, f, _)) = &self.current {
                f.sync_data()?;
            }
            let f = std::fs::OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(0o600)
                .open(segment_path(&self.dir, first_seq))?;
            File::open(&self.dir)?.sync_all()?;
            self.current = Some((first_seq, f, 0));
        }
        let (segment, f, len) = self.current.as_mut().expect("a segment is open");
        if let Err(e) = f.write_all(frames) {
            // Whatever part was written goes: the batch is written again.
            let _ = f.set_len(*len);
            return Err(e);
        }
        let at = *len;
        *len += frames.len() as u64;
        Ok((*segment, at))
    }

    /// Cuts the open segment back to `len` (what a failed batch added),
    /// so the batch can be written again.
    pub fn truncate(&mut self, len: u64) {
        if let Some((segment, f, at)) = &mut self.current {
            if let Err(e) = f.set_len(len) {
                tracing::error!(segment = *segment, error = %e, "cutting a failed batch off the log");
            }
            *at = len;
        }
    }

    /// Makes what was appended durable.
    pub fn sync(&mut self) -> std::io::Result<()> {
        match &self.current {
            Some((_, f, _)) => f.sync_data(),
            None => Ok(()),
        }
    }
}

/// Appends the frame of entry `seq` to `out`.
pub fn frame(out: &mut Vec<u8>, seq: u64, entry: &[u8]) {
    out.extend_from_slice(&(entry.len() as u32).to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(entry);
}

/// One frame as read.
#[derive(Debug, Clone)]
pub struct Frame {
    pub seq: u64,
    pub at: Location,
    pub entry: Vec<u8>,
}

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Bad {
    #[error("segment {segment} ends with {bytes} bytes of a frame cut short at offset {offset}")]
    Torn {
        segment: u64,
        offset: u64,
        bytes: u64,
    },
    #[error("segment {segment} holds a frame of {len} bytes at offset {offset}: damaged")]
    Length { segment: u64, offset: u64, len: u32 },
    #[error("reading segment {segment}: {why}")]
    Io { segment: u64, why: String },
}

/// Reads frames front to back from a place in the log, across segments,
/// with a small buffer.
pub struct Frames {
    dir: PathBuf,
    /// Segments still to read after the current one.
    rest: std::vec::IntoIter<u64>,
    current: Option<(u64, BufReader<File>, u64)>,
    done: bool,
}

impl Frames {
    /// From the start of the oldest segment.
    pub fn all(dir: &Path) -> std::io::Result<Frames> {
        Self::from(dir, None)
    }

    /// From `at` (a frame's place), or from the oldest segment's start.
    pub fn from(dir: &Path, at: Option<(u64, u64)>) -> std::io::Result<Frames> {
        let list = segments(dir)?;
        let (rest, current) = match at {
            Some((segment, offset)) => {
                let mut f =
                    BufReader::with_capacity(256 << 10, File::open(segment_path(dir, segment))?);
                f.seek(SeekFrom::Start(offset))?;
                let later: Vec<u64> = list.into_iter().filter(|&s| s > segment).collect();
                (later, Some((segment, f, offset)))
            }
            None => (list, None),
        };
        Ok(Frames {
            dir: dir.to_owned(),
            rest: rest.into_iter(),
            current,
            done: false,
        })
    }

    fn open_next(&mut self) -> Result<bool, Bad> {
        let Some(segment) = self.rest.next() else {
            return Ok(false);
        };
        let f = File::open(segment_path(&self.dir, segment)).map_err(|e| Bad::Io {
            segment,
            why: e.to_string(),
        })?;
        self.current = Some((segment, BufReader::with_capacity(256 << 10, f), 0));
        Ok(true)
    }
}

/// Reads as much of `buf` as there is; how much.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl Iterator for Frames {
    type Item = Result<Frame, Bad>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            if self.current.is_none() {
                match self.open_next() {
                    Ok(true) => {}
                    Ok(false) => return None,
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            }
            let (segment, r, offset) = self.current.as_mut().expect("open");
            let (segment, start) = (*segment, *offset);
            let io = |e: std::io::Error| Bad::Io {
                segment,
                why: e.to_string(),
            };
            let mut head = [0u8; FRAME_HEAD];
            let got = match read_full(r, &mut head) {
                Ok(n) => n,
                Err(e) => return Some(Err(io(e))),
            };
            if got == 0 {
                self.current = None;
                continue;
            }
            let torn = |bytes: usize| Bad::Torn {
                segment,
                offset: start,
                bytes: bytes as u64,
            };
            if got < FRAME_HEAD {
                // Go on with the next segment: a frame cut short by a
                // crash does not stop the reading of what follows.
                self.current = None;
                return Some(Err(torn(got)));
            }
            let len = u32::from_be_bytes(head[..4].try_into().expect("4"));
            let seq = u64::from_be_bytes(head[4..].try_into().expect("8"));
            if len > FRAME_MAX {
                self.current = None;
                return Some(Err(Bad::Length {
                    segment,
                    offset: start,
                    len,
                }));
            }
            let mut entry = vec![0u8; len as usize];
            let got = match read_full(r, &mut entry) {
                Ok(n) => n,
                Err(e) => return Some(Err(io(e))),
            };
            if got < entry.len() {
                self.current = None;
                return Some(Err(torn(FRAME_HEAD + got)));
            }
            *offset = start + (FRAME_HEAD + entry.len()) as u64;
            return Some(Ok(Frame {
                seq,
                at: Location {
                    segment,
                    offset: start,
                    len,
                },
                entry,
            }));
        }
    }
}

/// Reads the entry at `at`, checking the frame names `seq`.
pub fn read_at(file: &File, at: Location, seq: u64) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; FRAME_HEAD + at.len as usize];
    file.read_exact_at(&mut buf, at.offset)
        .map_err(|e| format!("reading entry {seq} in segment {}: {e}", at.segment))?;
    let len = u32::from_be_bytes(buf[..4].try_into().expect("4"));
    let found = u64::from_be_bytes(buf[4..FRAME_HEAD].try_into().expect("8"));
    if len != at.len || found != seq {
        return Err(format!(
            "segment {} at offset {} holds entry {found} ({len} bytes), not entry {seq} as the index says",
            at.segment, at.offset
        ));
    }
    buf.drain(..FRAME_HEAD);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_back_across_segments_and_a_torn_tail_is_said() {
        let dir = std::env::temp_dir().join(format!("icpt-seg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = Writer::open(&dir, None).unwrap();
        let mut places = Vec::new();
        for seq in 0..5u64 {
            let mut out = Vec::new();
            frame(&mut out, seq, format!("entry {seq}").as_bytes());
            places.push(w.append(&out, seq).unwrap());
        }
        w.sync().unwrap();
        assert_eq!(segments(&dir).unwrap(), vec![0]);
        let read: Vec<Frame> = Frames::all(&dir).unwrap().map(Result::unwrap).collect();
        assert_eq!(read.len(), 5);
        assert_eq!(read[3].entry, b"entry 3");
        assert_eq!((read[3].at.segment, read[3].at.offset), places[3]);
        let f = File::open(segment_path(&dir, 0)).unwrap();
        assert_eq!(read_at(&f, read[2].at, 2).unwrap(), b"entry 2");
        assert!(read_at(&f, read[2].at, 3).is_err());
        // From the middle.
        let from: Vec<u64> = Frames::from(&dir, Some(places[2]))
            .unwrap()
            .map(|f| f.unwrap().seq)
            .collect();
        assert_eq!(from, vec![2, 3, 4]);
        // A torn frame, then a new segment: both said, reading goes on.
        std::fs::OpenOptions::new()
            .append(true)
            .open(segment_path(&dir, 0))
            .unwrap()
            .write_all(&[0, 0, 0, 9, 0])
            .unwrap();
        let mut out = Vec::new();
        frame(&mut out, 5, b"entry 5");
        std::fs::write(segment_path(&dir, 5), &out).unwrap();
        let all: Vec<Result<Frame, Bad>> = Frames::all(&dir).unwrap().collect();
        assert_eq!(all.len(), 7);
        assert!(
            matches!(
                all[5],
                Err(Bad::Torn {
                    segment: 0,
                    bytes: 5,
                    ..
                })
            ),
            "{:?}",
            all[5]
        );
        assert_eq!(all[6].as_ref().unwrap().seq, 5);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
