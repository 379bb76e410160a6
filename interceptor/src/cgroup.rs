//! cgroup v2: finding the mount, resolving workload selectors to cgroup
//! directories, creating and removing agent-managed cgroups, moving a process.
//!
//! Never attaches anything to the root cgroup, nor to a cgroup that contains
//! the agent itself: [`resolve`] refuses both.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::config::{Config, Selector, Workload};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 file system is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("workload `{workload}`: cgroup {path} does not exist; create it or fix the workload's `cgroup`/`systemd_unit`")]
    Missing { workload: String, path: PathBuf },
    #[error("workload `{workload}`: systemd unit `{unit}` has no cgroup under {root} (is the unit running?)")]
    NoUnit {
        workload: String,
        unit: String,
        root: PathBuf,
    },
    #[error("workload `{workload}`: refusing cgroup {path}: {why}")]
    Refused {
        workload: String,
        path: PathBuf,
        why: &'static str,
    },
    #[error("workload `{0}`: cgroup path must stay under the cgroup2 mount")]
    Escapes(String),
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |e| CgroupError::Io(path.to_path_buf(), e)
}

/// The cgroup2 mount point, read from `/proc/self/mountinfo` (never hard-coded:
/// `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err(Path::new("/proc/self/mountinfo")))?;
    for line in info.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2") {
            if let Some(mp) = left.split_whitespace().nth(4) {
                return Ok(PathBuf::from(unescape_mount(mp)));
            }
        }
    }
    Err(CgroupError::NoCgroup2)
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// cgroup v2 id: the inode number of the cgroup directory.
pub fn cgroup_id(dir: &Path) -> Result<u64, CgroupError> {
    Ok(fs::metadata(dir).map_err(io_err(dir))?.ino())
}

/// The cgroup2 path (relative to the mount, starting with `/`) of a process.
pub fn proc_cgroup(pid: u32) -> io::Result<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 line"))
}

/// A workload resolved to its cgroup.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub workload: String,
    /// Absolute directory under the cgroup2 mount.
    pub dir: PathBuf,
    /// Path relative to the mount, starting with `/`.
    pub rel: String,
    pub id: u64,
    pub managed: bool,
}

/// The directory a workload's cgroup has, or will have once created.
pub fn workload_dir(mount: &Path, config: &Config, w: &Workload) -> Result<PathBuf, CgroupError> {
    let dir = match &w.selector {
        Selector::Managed => mount
            .join(&config.agent.managed_cgroup_parent)
            .join(&w.name),
        Selector::Cgroup(p) => {
            let p = Path::new(p);
            let rel = p.strip_prefix(mount).unwrap_or(p);
            let rel = rel.strip_prefix("/").unwrap_or(rel);
            if rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(CgroupError::Escapes(w.name.clone()));
            }
            mount.join(rel)
        }
        Selector::SystemdUnit(unit) => {
            find_unit(mount, unit, 4).ok_or_else(|| CgroupError::NoUnit {
                workload: w.name.clone(),
                unit: unit.clone(),
                root: mount.to_path_buf(),
            })?
        }
    };
    Ok(dir)
}

fn find_unit(dir: &Path, unit: &str, depth: u32) -> Option<PathBuf> {
    let entries = fs::read_dir(dir).ok()?;
    let mut subdirs = Vec::new();
    for e in entries.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            if e.file_name() == unit {
                return Some(e.path());
            }
            subdirs.push(e.path());
        }
    }
    if depth == 0 {
        return None;
    }
    subdirs
        .into_iter()
        .find_map(|d| find_unit(&d, unit, depth - 1))
}

/// Resolves every workload of the config, creating managed cgroups when
/// `create` is set, and refusing the root cgroup and the agent's own.
pub fn resolve(config: &Config, create: bool) -> Result<Vec<Resolved>, CgroupError> {
    let mount = cgroup2_mount()?;
    let own = proc_cgroup(std::process::id()).map_err(io_err(Path::new("/proc/self/cgroup")))?;
    // Check every selector before creating anything, so a bad config leaves
    // no managed cgroups behind.
    let mut dirs = Vec::new();
    for w in &config.workloads {
        let dir = workload_dir(&mount, config, w)?;
        let managed = w.selector == Selector::Managed;
        if !managed && !dir.is_dir() {
            return Err(CgroupError::Missing {
                workload: w.name.clone(),
                path: dir,
            });
        }
        dirs.push((w, dir, managed));
    }
    let mut out = Vec::new();
    for (w, dir, managed) in dirs {
        if managed && create {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        if !dir.is_dir() {
            return Err(CgroupError::Missing {
                workload: w.name.clone(),
                path: dir,
            });
        }
        let rel = format!("/{}", dir.strip_prefix(&mount).unwrap_or(&dir).display());
        if dir == mount {
            return Err(CgroupError::Refused {
                workload: w.name.clone(),
                path: dir,
                why: "it is the root cgroup",
            });
        }
        if own == rel || own.starts_with(&format!("{rel}/")) {
            return Err(CgroupError::Refused {
                workload: w.name.clone(),
                path: dir,
                why: "it contains the agent itself",
            });
        }
        let id = cgroup_id(&dir)?;
        out.push(Resolved {
            workload: w.name.clone(),
            dir,
            rel,
            id,
            managed,
        });
    }
    Ok(out)
}

/// Moves process `pid` into the cgroup at `dir`.
pub fn enter(dir: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    fs::write(&procs, pid.to_string()).map_err(io_err(&procs))
}

/// Finds the directory with cgroup id `id` under `dir` (a workload's
/// sub-cgroups), searching at most `depth` levels.
pub fn find_by_id(dir: &Path, id: u64, depth: u32) -> Option<PathBuf> {
    for e in fs::read_dir(dir).ok()?.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        if !meta.is_dir() {
            continue;
        }
        if meta.ino() == id {
            return Some(e.path());
        }
        if depth > 0 {
            if let Some(p) = find_by_id(&e.path(), id, depth - 1) {
                return Some(p);
            }
        }
    }
    None
}

/// Removes an agent-managed cgroup tree, first moving any processes left in
/// it to the parent of `parent_dir`'s tree root (the mount). Returns how many
/// processes were moved out.
pub fn remove_managed(parent_dir: &Path, mount: &Path) -> Result<usize, CgroupError> {
    let mut moved = 0;
    remove_tree(parent_dir, mount, &mut moved)?;
    Ok(moved)
}

fn remove_tree(dir: &Path, mount: &Path, moved: &mut usize) -> Result<(), CgroupError> {
    if !dir.is_dir() {
        return Ok(());
    }
    for e in fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_tree(&e.path(), mount, moved)?;
        }
    }
    let procs = dir.join("cgroup.procs");
    if let Ok(list) = fs::read_to_string(&procs) {
        for pid in list.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            // A process that exits meanwhile is fine.
            if enter(mount, pid).is_ok() {
                *moved += 1;
            }
        }
    }
    // rmdir can race with a process leaving; retry briefly.
    for _ in 0..50 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(CgroupError::Io(dir.to_path_buf(), e)),
        }
    }
    fs::remove_dir(dir).map_err(io_err(dir))
}
