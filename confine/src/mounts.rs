//! The minimal root a confined domain sees: a tmpfs holding `/dev/{null,zero,full,urandom}`
//! (bind mounts of the host's), a fresh `/proc` of the domain's own pid namespace, an empty
//! `/tmp`, and nothing else; read-only once built. Runs in the domain's own mount namespace.
//!
//! `pivot_root` moves the old root away and detaches it. Where the root is an initramfs
//! (`rootfs`, as in the lab VM), `pivot_root` fails with EINVAL; there the new root is moved
//! over `/` (`MS_MOVE`) and entered with `chroot`, as `switch_root` does. The old root stays
//! underneath, unreachable without CAP_SYS_CHROOT/CAP_SYS_ADMIN, which the domain drops next.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Errors of building the root.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{what} {path}")]
    Step {
        what: &'static str,
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("creating {path}")]
    Create {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the new root is assembled (a mount point that exists on every root we run on; the
/// tmpfs mounted on it is private to the domain's mount namespace).
const STAGING: &str = "/tmp";
/// Device nodes bound into the new root.
const DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/full", "/dev/urandom"];

fn step<'a>(what: &'static str, path: &'a str) -> impl FnOnce(nix::Error) -> MountError + 'a {
    move |source| MountError::Step {
        what,
        path: path.to_owned(),
        source,
    }
}

fn create(path: &Path, dir: bool) -> Result<(), MountError> {
    let r = if dir {
        std::fs::create_dir_all(path)
    } else {
        std::fs::File::create(path).map(drop)
    };
    r.map_err(|source| MountError::Create {
        path: path.display().to_string(),
        source,
    })
}

/// How the old root was left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootSwitch {
    /// `pivot_root`: the old root is detached.
    PivotRoot,
    /// `MS_MOVE` + `chroot` (an initramfs root).
    MoveAndChroot,
}

/// Builds the minimal root and enters it. Needs CAP_SYS_ADMIN in a mount namespace of the
/// domain's own.
pub fn enter_minimal_root() -> Result<RootSwitch, MountError> {
    // Nothing done here may propagate back to the host's mounts.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("making private", "/"))?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        STAGING,
        Some("tmpfs"),
        flags,
        Some("mode=0755,size=1m"),
    )
    .map_err(step("mounting tmpfs on", STAGING))?;
    let root = Path::new(STAGING);
    create(&root.join("dev"), true)?;
    for dev in DEVICES {
        let target = root.join(&dev[1..]);
        create(&target, false)?;
        let t = target.display().to_string();
        mount(
            Some(dev),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(step("binding", dev))?;
        // A bind mount takes its flags only on a remount.
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(step("remounting", &t))?;
    }
    let proc_dir = root.join("proc");
    create(&proc_dir, true)?;
    mount(Some("proc"), &proc_dir, Some("proc"), flags, None::<&str>)
        .map_err(step("mounting proc on", "/proc"))?;
    create(&root.join("tmp"), true)?;
    let switch = switch_root(root)?;
    // The root itself is read-only from now on.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | flags,
        None::<&str>,
    )
    .map_err(step("remounting read-only", "/"))?;
    Ok(switch)
}

fn switch_root(root: &Path) -> Result<RootSwitch, MountError> {
    let old = root.join("old-root");
    create(&old, true)?;
    std::env::set_current_dir(root).map_err(|source| MountError::Create {
        path: root.display().to_string(),
        source,
    })?;
    match nix::unistd::pivot_root(".", "old-root") {
        Ok(()) => {
            nix::unistd::chdir("/").map_err(step("chdir", "/"))?;
            umount2("/old-root", MntFlags::MNT_DETACH).map_err(step("detaching", "old root"))?;
            std::fs::remove_dir("/old-root").map_err(|source| MountError::Create {
                path: "/old-root".into(),
                source,
            })?;
            Ok(RootSwitch::PivotRoot)
        }
        Err(nix::Error::EINVAL) => {
            // An initramfs root cannot be pivoted away from: move the new root over it.
            std::fs::remove_dir(&old).map_err(|source| MountError::Create {
                path: old.display().to_string(),
                source,
            })?;
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(step("moving the new root over", "/"))?;
            nix::unistd::chroot(".").map_err(step("chroot", "."))?;
            nix::unistd::chdir("/").map_err(step("chdir", "/"))?;
            Ok(RootSwitch::MoveAndChroot)
        }
        Err(e) => Err(step("pivot_root to", STAGING)(e)),
    }
}
