//! Landlock: below the mount namespace, the domain may open nothing by path but the files it
//! was handed for reading (a kernel, an initrd: reopened through `/proc/self/fd`), may not
//! bind or connect TCP ports, connect to abstract Unix sockets or signal processes outside its
//! own sandbox. Best effort across kernels (the lab's has ABI 2, this host 7): what the kernel
//! cannot enforce is reported, and a kernel without Landlock at all is refused unless the plan
//! allows it.

use std::os::fd::BorrowedFd;
use std::path::Path;

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

/// Errors of applying Landlock.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("building the ruleset")]
    Ruleset(#[from] landlock::RulesetError),
    #[error("opening {0} for a rule")]
    Path(String, #[source] landlock::PathFdError),
}

/// Paths of the minimal root a domain may open: the device nodes (read and write) and its
/// own `/proc` (read).
const DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/full", "/dev/urandom"];
const PROC: &str = "/proc";

/// What the kernel enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforced {
    Fully,
    Partially,
    Not,
}

/// The newest ABI this code was written and tested against.
const ABI_TESTED: ABI = ABI::V6;

/// Restricts the calling thread (and the threads it starts afterwards).
pub fn restrict(read_only: &[BorrowedFd<'_>]) -> Result<Enforced, LandlockError> {
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(ABI_TESTED))?
        .handle_access(AccessNet::from_all(ABI_TESTED))?
        .scope(Scope::from_all(ABI_TESTED))?
        .create()?;
    let abi = ABI_TESTED;
    for dev in DEVICES {
        let fd = PathFd::new(Path::new(dev)).map_err(|e| LandlockError::Path(dev.into(), e))?;
        ruleset = ruleset.add_rule(PathBeneath::new(
            fd,
            AccessFs::ReadFile | AccessFs::WriteFile,
        ))?;
    }
    let proc_fd = PathFd::new(PROC).map_err(|e| LandlockError::Path(PROC.into(), e))?;
    ruleset = ruleset.add_rule(PathBeneath::new(proc_fd, AccessFs::from_read(abi)))?;
    for fd in read_only {
        ruleset = ruleset.add_rule(PathBeneath::new(*fd, AccessFs::ReadFile))?;
    }
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Enforced::Fully,
        RulesetStatus::PartiallyEnforced => Enforced::Partially,
        RulesetStatus::NotEnforced => Enforced::Not,
    })
}
