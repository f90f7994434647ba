//! cgroup v2 limits per domain (the toolstack's side): a parent group `splitvmm-<pid>` under
//! the cgroup v2 root with the memory and pids controllers enabled, and one leaf per domain
//! with its `memory.max` and `pids.max`. A domain process enters its leaf between fork and
//! exec (it writes "0" to the leaf's `cgroup.procs`, which the toolstack opened), so it runs
//! under its limits from its first instruction. The groups are removed when dropped, once
//! their processes are gone.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors of setting up cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The controllers a domain's limits need.
pub const CONTROLLERS: [&str; 2] = ["memory", "pids"];

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io("writing", path))
}

/// Whether the cgroup v2 hierarchy at `root` offers memory and pids.
pub fn has_controllers(root: &Path) -> bool {
    std::fs::read_to_string(root.join("cgroup.controllers")).is_ok_and(|c| {
        CONTROLLERS
            .iter()
            .all(|want| c.split_whitespace().any(|have| have == *want))
    })
}

/// A domain's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
}

/// The toolstack's cgroups: one parent, a leaf per domain.
#[derive(Debug)]
pub struct DomainCgroups {
    parent: PathBuf,
}

impl DomainCgroups {
    /// Creates `splitvmm-<pid>` under `root` and enables memory and pids for its leaves.
    pub fn create(root: &Path) -> Result<DomainCgroups, CgroupError> {
        let enable = CONTROLLERS.map(|c| format!("+{c}")).join(" ");
        write(&root.join("cgroup.subtree_control"), &enable)?;
        let parent = root.join(format!("splitvmm-{}", std::process::id()));
        std::fs::create_dir_all(&parent).map_err(io("creating", &parent))?;
        write(&parent.join("cgroup.subtree_control"), &enable)?;
        Ok(DomainCgroups { parent })
    }

    /// The parent group.
    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// Domain `name`'s leaf with `limits` (created, or updated if a previous run of the
    /// domain left it); returns its `cgroup.procs`, open for the child to write itself into.
    pub fn leaf(&self, name: &str, limits: Limits) -> Result<File, CgroupError> {
        let leaf = self.parent.join(name);
        if !leaf.is_dir() {
            std::fs::create_dir(&leaf).map_err(io("creating", &leaf))?;
        }
        let value = |v: Option<u64>| v.map_or_else(|| "max".to_owned(), |v| v.to_string());
        write(&leaf.join("memory.max"), &value(limits.memory_bytes))?;
        write(&leaf.join("pids.max"), &value(limits.pids))?;
        let procs = leaf.join("cgroup.procs");
        File::options()
            .write(true)
            .open(&procs)
            .map_err(io("opening", &procs))
    }
}

/// Removes an empty cgroup, waiting a little for its last process to be released.
fn remove(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() == std::io::ErrorKind::NotFound || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for DomainCgroups {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.parent) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove(&entry.path());
                }
            }
        }
        remove(&self.parent);
    }
}
