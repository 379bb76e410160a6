//! The file sink: events as JSON Lines, appended and made durable before
//! the cursor moves; rotated by size (`path` → `path.1` → … `path.keep`).

use std::{io::Write, path::PathBuf};

use super::{Event, Transport};

pub struct File {
    path: PathBuf,
    max: u64,
    keep: u32,
    open: Option<(std::fs::File, u64)>,
}

impl File {
    pub fn new(s: &crate::config::Sink) -> anyhow::Result<File> {
        let path = s.path.clone().expect("checked at load");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Ok(File {
            path,
            max: s
                .max_size
                .as_deref()
                .map_or(Ok(100 << 20), crate::config::parse_size)
                .map_err(anyhow::Error::msg)?,
            keep: s.keep.unwrap_or(5),
            open: None,
        })
    }

    fn numbered(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        p.into()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.open = None;
        let _ = std::fs::remove_file(self.numbered(self.keep));
        for n in (1..self.keep).rev() {
            let _ = std::fs::rename(self.numbered(n), self.numbered(n + 1));
        }
        std::fs::rename(&self.path, self.numbered(1))
    }
}

impl Transport for File {
    fn send(&mut self, events: &[Event<'_>]) -> Result<(), String> {
        let shown = self.path.display().to_string();
        let err = |e: std::io::Error| format!("{shown}: {e}");
        if self.open.as_ref().is_some_and(|(_, len)| *len >= self.max) {
            self.rotate().map_err(err)?;
        }
        if self.open.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&self.path)
                .map_err(err)?;
            let len = f.metadata().map_err(err)?.len();
            self.open = Some((f, len));
        }
        let (f, len) = self.open.as_mut().expect("opened");
        let mut buf = Vec::with_capacity(events.iter().map(|e| e.json.len() + 1).sum());
        for e in events {
            buf.extend_from_slice(e.json);
            buf.push(b'\n');
        }
        let res = f.write_all(&buf).and_then(|()| f.sync_data());
        if let Err(e) = res {
            self.open = None;
            return Err(format!("{}: {e}", self.path.display()));
        }
        *len += buf.len() as u64;
        Ok(())
    }

    fn reset(&mut self) {
        self.open = None;
    }
}
