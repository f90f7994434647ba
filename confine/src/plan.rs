//! What the toolstack asks of a domain process's confinement, as it travels to the process:
//! one environment variable, `SPLITVMM_CONFINE`, read by [`Plan::from_env`].
//!
//! `uid=200001,gid=200001,allow-missing=landlock`: the unprivileged user and group the domain
//! runs as (the toolstack's base plus the domain id, so no two domains share a uid), and the
//! confinement features the host file lets the domain run without where the kernel lacks them
//! (see [`Feature`]). What the domain may do (its seccomp allowlist, what it may see) is
//! decided by the binary itself ([`Profile`]): nothing in the environment can widen it.

use std::fmt;

/// The environment variable that carries a [`Plan`].
pub const ENV: &str = "SPLITVMM_CONFINE";

/// Errors of reading a plan.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("{ENV}: `{0}` is not key=value")]
    NotKeyValue(String),
    #[error("{ENV}: unknown key `{0}`")]
    UnknownKey(String),
    #[error("{ENV}: `{key}`: `{value}` is not a number")]
    NotANumber { key: String, value: String },
    #[error("{ENV}: uid and gid must not be 0 (root)")]
    Root,
    #[error("{ENV}: uid and gid are required")]
    Missing,
    #[error("{ENV}: unknown feature `{0}` in allow-missing (known: landlock, cgroup)")]
    UnknownFeature(String),
}

/// A confinement feature the kernel may lack, which the host file may let a domain go
/// without (`[confinement] allow_missing = [...]`). Everything else (namespaces, the uid,
/// dropped capabilities, no_new_privs, seccomp) is always required.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Feature {
    /// Landlock (file system access control below the mount namespace).
    Landlock,
    /// cgroup v2 with the memory and pids controllers (for the limits a host file asks for).
    Cgroup,
}

impl Feature {
    /// The name used in host files and in the plan.
    pub fn name(self) -> &'static str {
        match self {
            Feature::Landlock => "landlock",
            Feature::Cgroup => "cgroup",
        }
    }

    /// The feature called `name`.
    pub fn from_name(name: &str) -> Option<Feature> {
        match name {
            "landlock" => Some(Feature::Landlock),
            "cgroup" => Some(Feature::Cgroup),
            _ => None,
        }
    }
}

/// Which kind of domain process is confined: it selects the seccomp allowlist and what the
/// minimal root holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `driver-domain managed`: backends parsing guest rings.
    DriverDomain,
    /// `process-guest`: a frontend in a host process.
    ProcessGuest,
    /// `splitvmm-vmm --managed-domid`: a KVM guest's VMM (KVM ioctls, vCPU threads).
    Vmm,
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Profile::DriverDomain => "driver domain",
            Profile::ProcessGuest => "process guest",
            Profile::Vmm => "VMM",
        })
    }
}

/// The toolstack's side of a domain's confinement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub uid: u32,
    pub gid: u32,
    /// Features the domain may run without where the kernel lacks them (said loudly).
    pub allow_missing: Vec<Feature>,
    /// RLIMIT_MEMLOCK in bytes: 0 unless the domain pins memory (a VMM whose guest has an
    /// assigned PCI function: VFIO type1 pins all guest RAM and counts it there).
    pub memlock: u64,
}

impl Plan {
    /// The plan of domain `domid` under a host whose domains' ids start at `base`.
    pub fn for_domain(base: u32, domid: u32, allow_missing: Vec<Feature>) -> Plan {
        let id = base.saturating_add(domid);
        Plan {
            uid: id,
            gid: id,
            allow_missing,
            memlock: 0,
        }
    }

    /// This plan with RLIMIT_MEMLOCK set to `bytes`.
    pub fn with_memlock(mut self, bytes: u64) -> Plan {
        self.memlock = bytes;
        self
    }

    /// Whether the domain may run without `feature`.
    pub fn allows_missing(&self, feature: Feature) -> bool {
        self.allow_missing.contains(&feature)
    }

    /// The value of [`ENV`] for this plan.
    pub fn to_env(&self) -> String {
        let mut s = format!("uid={},gid={}", self.uid, self.gid);
        if !self.allow_missing.is_empty() {
            let names: Vec<&str> = self.allow_missing.iter().map(|f| f.name()).collect();
            s.push_str(",allow-missing=");
            s.push_str(&names.join("+"));
        }
        if self.memlock != 0 {
            s.push_str(&format!(",memlock={}", self.memlock));
        }
        s
    }

    /// Parses a value of [`ENV`].
    pub fn parse(value: &str) -> Result<Plan, PlanError> {
        let (mut uid, mut gid, mut allow_missing, mut memlock) = (None, None, Vec::new(), 0);
        for part in value.split(',').filter(|p| !p.is_empty()) {
            let (key, val) = part
                .split_once('=')
                .ok_or_else(|| PlanError::NotKeyValue(part.to_owned()))?;
            let number = || {
                val.parse::<u32>().map_err(|_| PlanError::NotANumber {
                    key: key.to_owned(),
                    value: val.to_owned(),
                })
            };
            match key {
                "uid" => uid = Some(number()?),
                "gid" => gid = Some(number()?),
                "memlock" => {
                    memlock = val.parse::<u64>().map_err(|_| PlanError::NotANumber {
                        key: key.to_owned(),
                        value: val.to_owned(),
                    })?
                }
                "allow-missing" => {
                    for name in val.split('+').filter(|n| !n.is_empty()) {
                        let feature = Feature::from_name(name)
                            .ok_or_else(|| PlanError::UnknownFeature(name.to_owned()))?;
                        allow_missing.push(feature);
                    }
                }
                other => return Err(PlanError::UnknownKey(other.to_owned())),
            }
        }
        let (Some(uid), Some(gid)) = (uid, gid) else {
            return Err(PlanError::Missing);
        };
        if uid == 0 || gid == 0 {
            return Err(PlanError::Root);
        }
        Ok(Plan {
            uid,
            gid,
            allow_missing,
            memlock,
        })
    }

    /// The plan in this process's environment, if the toolstack gave one.
    pub fn from_env() -> Result<Option<Plan>, PlanError> {
        match std::env::var(ENV) {
            Ok(value) => Plan::parse(&value).map(Some),
            Err(_) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_survives_the_environment() {
        let plan = Plan::for_domain(200_000, 3, vec![Feature::Landlock]);
        assert_eq!(plan.uid, 200_003);
        assert_eq!(Plan::parse(&plan.to_env()), Ok(plan.clone()));
        let plain = Plan::for_domain(200_000, 1, vec![]);
        assert_eq!(plain.to_env(), "uid=200001,gid=200001");
        assert_eq!(Plan::parse(&plain.to_env()), Ok(plain));
        let pinning = Plan::for_domain(200_000, 4, vec![]).with_memlock(320 << 20);
        assert_eq!(pinning.to_env(), "uid=200004,gid=200004,memlock=335544320");
        assert_eq!(Plan::parse(&pinning.to_env()), Ok(pinning));
    }

    #[test]
    fn root_and_nonsense_are_refused() {
        assert_eq!(Plan::parse("uid=0,gid=5"), Err(PlanError::Root));
        assert_eq!(Plan::parse("uid=5"), Err(PlanError::Missing));
        assert!(matches!(
            Plan::parse("uid=5,gid=x"),
            Err(PlanError::NotANumber { .. })
        ));
        assert!(matches!(
            Plan::parse("uid=5,gid=5,caps=all"),
            Err(PlanError::UnknownKey(_))
        ));
        assert!(matches!(
            Plan::parse("uid=5,gid=5,allow-missing=seccomp"),
            Err(PlanError::UnknownFeature(_))
        ));
    }
}
