//! The host file's `[confinement]` section and the toolstack's side of confining domains:
//! what this machine cannot do is said once, loudly, when the host comes up, and refused
//! unless the host file opts out; each domain then gets its [`Plan`] (its own uid and gid).
//!
//! ```toml
//! [confinement]
//! enabled = true              # false: every domain runs as root, unconfined (said loudly)
//! uid_base = 200000           # domain N runs as uid and gid uid_base + N
//! allow_missing = []          # ["landlock", "cgroup"]: run without them where missing
//! memory_max_mib = 512        # optional: cgroup v2 memory.max per domain (a VMM: + its RAM)
//! pids_max = 256              # optional: cgroup v2 pids.max per domain
//! ```

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use confine::cgroup::{CgroupError, DomainCgroups, Limits};
use confine::{Feature, Plan};
use serde::Deserialize;

use crate::config::DOMID_FIRST_RESERVED;

/// The uid of domain 0 + N, by default.
pub const DEFAULT_UID_BASE: u32 = 200_000;

/// Errors of preparing confinement.
#[derive(Debug, thiserror::Error)]
pub enum ConfinementError {
    #[error(
        "this machine cannot confine domains: it lacks {0}; run on a kernel that has it, or \
         set `[confinement] enabled = false` in the host file to run every domain as root"
    )]
    Unsupported(String),
    #[error(
        "this kernel has no {feature}; every domain would run without it. Set `[confinement] \
         allow_missing = [\"{feature}\"]` in the host file to accept that"
    )]
    Missing { feature: &'static str },
    #[error(
        "the host file asks for cgroup limits (memory_max_mib, pids_max), but this machine has \
         no cgroup v2 hierarchy with the memory and pids controllers; set `[confinement] \
         allow_missing = [\"cgroup\"]` to run without them"
    )]
    NoCgroup,
    #[error("cgroups")]
    Cgroup(#[from] CgroupError),
    #[error("only root can start confined domains (each runs as its own uid); run as root, or set `[confinement] enabled = false`")]
    NotRoot,
}

/// A feature the host file may let domains go without.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptionalFeature {
    Landlock,
    Cgroup,
}

impl OptionalFeature {
    fn feature(self) -> Feature {
        match self {
            OptionalFeature::Landlock => Feature::Landlock,
            OptionalFeature::Cgroup => Feature::Cgroup,
        }
    }
}

/// `[confinement]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfinementConfig {
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    #[serde(default = "default_uid_base")]
    pub uid_base: u32,
    #[serde(default)]
    pub allow_missing: Vec<OptionalFeature>,
    /// cgroup v2 `memory.max` of each domain, MiB (a VMM's is this plus its guest's RAM).
    #[serde(default)]
    pub memory_max_mib: Option<u64>,
    /// cgroup v2 `pids.max` of each domain (threads count).
    #[serde(default)]
    pub pids_max: Option<u64>,
}

fn enabled_by_default() -> bool {
    true
}

fn default_uid_base() -> u32 {
    DEFAULT_UID_BASE
}

impl Default for ConfinementConfig {
    fn default() -> Self {
        ConfinementConfig {
            enabled: true,
            uid_base: DEFAULT_UID_BASE,
            allow_missing: Vec::new(),
            memory_max_mib: None,
            pids_max: None,
        }
    }
}

impl ConfinementConfig {
    /// What is wrong with `uid_base`, if anything (for the host file's validation).
    pub fn invalid_uid_base(&self) -> Option<String> {
        if self.uid_base < 1000 {
            return Some(format!(
                "at least 1000 (system users live below), not {}",
                self.uid_base
            ));
        }
        if self.uid_base.checked_add(DOMID_FIRST_RESERVED).is_none()
            || self.uid_base + DOMID_FIRST_RESERVED >= u32::MAX - 1
        {
            return Some(format!(
                "small enough that uid_base + every domain id is a uid, not {}",
                self.uid_base
            ));
        }
        None
    }
}

/// The toolstack's confinement of its domains, once the machine was checked.
#[derive(Debug, Clone)]
pub struct Confinement {
    uid_base: u32,
    allow_missing: Vec<Feature>,
    /// Where to put domains' cgroups, when the host file asks for limits and the machine
    /// has cgroup v2 (set up by [`Confinement::prepare`]).
    cgroups: Option<(Arc<DomainCgroups>, Limits)>,
}

/// What this machine offers, as [`Confinement::prepare`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSupport {
    /// Required features it lacks (seccomp, namespaces).
    pub required_missing: Vec<&'static str>,
    /// Optional features it lacks (Landlock).
    pub optional_missing: Vec<Feature>,
    pub root: bool,
    /// The cgroup v2 root, if it has the memory and pids controllers.
    pub cgroup: Option<PathBuf>,
}

impl MachineSupport {
    /// This machine, now.
    pub fn probe() -> MachineSupport {
        MachineSupport {
            required_missing: confine::support::required(),
            optional_missing: confine::support::missing_optional(),
            root: nix::unistd::geteuid().is_root(),
            cgroup: confine::support::cgroup2_with_controllers(),
        }
    }
}

impl Confinement {
    /// Checks this machine against `config`; `Ok(None)` if the host file turned confinement
    /// off (said on stderr). What is missing and allowed is said on stderr too.
    pub fn prepare(config: &ConfinementConfig) -> Result<Option<Confinement>, ConfinementError> {
        let machine = MachineSupport::probe();
        let (mut confinement, warnings) = Self::decide(config, &machine)?;
        for warning in &warnings {
            eprintln!("splitvmm: WARNING: {warning}");
        }
        if let (Some(c), Some(root), Some(limits)) =
            (confinement.as_mut(), &machine.cgroup, Self::limits(config))
        {
            c.cgroups = Some((Arc::new(DomainCgroups::create(root)?), limits));
        }
        Ok(confinement)
    }

    /// The limits `config` asks for, if any.
    fn limits(config: &ConfinementConfig) -> Option<Limits> {
        (config.memory_max_mib.is_some() || config.pids_max.is_some()).then(|| Limits {
            memory_bytes: config.memory_max_mib.map(|m| m << 20),
            pids: config.pids_max,
        })
    }

    /// Domain `name`'s cgroup, with `guest_ram_mib` more memory than the host file's limit
    /// (a VMM holds its guest's RAM); `None` without limits.
    pub fn cgroup(&self, name: &str, guest_ram_mib: u64) -> Result<Option<File>, ConfinementError> {
        let Some((cgroups, limits)) = &self.cgroups else {
            return Ok(None);
        };
        let limits = Limits {
            memory_bytes: limits
                .memory_bytes
                .map(|m| m.saturating_add(guest_ram_mib << 20)),
            ..*limits
        };
        Ok(Some(cgroups.leaf(name, limits)?))
    }

    /// What `config` makes of `machine`: the confinement (or none), and the warnings to say.
    pub fn decide(
        config: &ConfinementConfig,
        machine: &MachineSupport,
    ) -> Result<(Option<Confinement>, Vec<String>), ConfinementError> {
        if !config.enabled {
            return Ok((
                None,
                vec![
                    "confinement is off (`[confinement] enabled = false`): every domain \
                      process runs as root with all capabilities, in the host's namespaces"
                        .to_owned(),
                ],
            ));
        }
        if !machine.required_missing.is_empty() {
            return Err(ConfinementError::Unsupported(
                machine.required_missing.join(", "),
            ));
        }
        if !machine.root {
            return Err(ConfinementError::NotRoot);
        }
        let allowed: Vec<Feature> = config.allow_missing.iter().map(|f| f.feature()).collect();
        let mut warnings = Vec::new();
        if Self::limits(config).is_some() && machine.cgroup.is_none() {
            if !allowed.contains(&Feature::Cgroup) {
                return Err(ConfinementError::NoCgroup);
            }
            warnings.push(
                "no cgroup v2 memory and pids controllers: domains run without the limits the \
                 host file asks for, as it allows"
                    .to_owned(),
            );
        }
        for missing in &machine.optional_missing {
            if !allowed.contains(missing) {
                return Err(ConfinementError::Missing {
                    feature: missing.name(),
                });
            }
            warnings.push(format!(
                "this kernel has no {}: domains run without it, as the host file allows",
                missing.name()
            ));
        }
        Ok((
            Some(Confinement {
                uid_base: config.uid_base,
                allow_missing: allowed,
                cgroups: None,
            }),
            warnings,
        ))
    }

    /// Domain `domid`'s plan.
    pub fn plan(&self, domid: u32) -> Plan {
        Plan::for_domain(self.uid_base, domid, self.allow_missing.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_domain_gets_a_uid_of_its_own() {
        let c = Confinement {
            uid_base: DEFAULT_UID_BASE,
            allow_missing: vec![],
            cgroups: None,
        };
        assert_ne!(c.plan(1).uid, c.plan(2).uid);
        assert_eq!(c.plan(2).uid, DEFAULT_UID_BASE + 2);
    }

    #[test]
    fn uid_bases_that_reach_system_users_or_overflow_are_refused() {
        let mut config = ConfinementConfig::default();
        assert_eq!(config.invalid_uid_base(), None);
        config.uid_base = 0;
        assert!(config.invalid_uid_base().is_some());
        config.uid_base = u32::MAX - 10;
        assert!(config.invalid_uid_base().is_some());
    }

    fn machine(optional_missing: Vec<Feature>) -> MachineSupport {
        MachineSupport {
            required_missing: vec![],
            optional_missing,
            root: true,
            cgroup: None,
        }
    }

    #[test]
    fn a_kernel_without_landlock_is_refused_unless_the_host_file_allows_it() {
        let no_landlock = machine(vec![Feature::Landlock]);
        let strict = ConfinementConfig::default();
        let err = Confinement::decide(&strict, &no_landlock).unwrap_err();
        assert!(
            err.to_string().contains("allow_missing = [\"landlock\"]"),
            "{err}"
        );
        let lenient: ConfinementConfig = toml::from_str("allow_missing = [\"landlock\"]").unwrap();
        let (confinement, warnings) = Confinement::decide(&lenient, &no_landlock).unwrap();
        assert!(confinement.is_some());
        assert_eq!(warnings.len(), 1, "said loudly: {warnings:?}");
        assert!(confinement
            .unwrap()
            .plan(1)
            .allows_missing(Feature::Landlock));
        // A kernel that has it needs no allowance and says nothing.
        let (c, warnings) = Confinement::decide(&strict, &machine(vec![])).unwrap();
        assert!(c.is_some() && warnings.is_empty());
    }

    #[test]
    fn missing_namespaces_non_root_and_disabled_confinement() {
        let mut m = machine(vec![]);
        m.required_missing = vec!["seccomp filters"];
        assert!(matches!(
            Confinement::decide(&ConfinementConfig::default(), &m),
            Err(ConfinementError::Unsupported(_))
        ));
        let mut m = machine(vec![]);
        m.root = false;
        assert!(matches!(
            Confinement::decide(&ConfinementConfig::default(), &m),
            Err(ConfinementError::NotRoot)
        ));
        let off: ConfinementConfig = toml::from_str("enabled = false").unwrap();
        let (c, warnings) = Confinement::decide(&off, &m).unwrap();
        assert!(c.is_none());
        assert!(warnings[0].contains("runs as root"), "{warnings:?}");
    }

    #[test]
    fn unknown_features_and_keys_are_refused() {
        assert!(toml::from_str::<ConfinementConfig>("allow_missing = [\"seccomp\"]").is_err());
        assert!(toml::from_str::<ConfinementConfig>("uid = 5").is_err());
    }

    #[test]
    fn a_host_file_with_a_bad_uid_base_names_the_key() {
        let text = "[confinement]\nuid_base = 10\n[driver_domain]\nname = \"d\"\ndomid = 1\n";
        let err = crate::config::HostConfig::parse(std::path::Path::new("h.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("confinement.uid_base"), "{err}");
        let good = text.replace("uid_base = 10", "uid_base = 300000");
        let config =
            crate::config::HostConfig::parse(std::path::Path::new("h.toml"), &good).unwrap();
        assert_eq!(config.confinement.uid_base, 300_000);
    }

    #[test]
    fn limits_without_cgroup_v2_are_refused_unless_allowed() {
        let asked: ConfinementConfig = toml::from_str("pids_max = 64").unwrap();
        let err = Confinement::decide(&asked, &machine(vec![])).unwrap_err();
        assert!(matches!(err, ConfinementError::NoCgroup), "{err}");
        let allowed: ConfinementConfig =
            toml::from_str("pids_max = 64\nallow_missing = [\"cgroup\"]").unwrap();
        let (c, warnings) = Confinement::decide(&allowed, &machine(vec![])).unwrap();
        assert!(c.is_some());
        assert!(warnings[0].contains("cgroup"), "{warnings:?}");
        // With cgroup v2 there, nothing to allow; without limits asked, cgroups do not matter.
        let mut with = machine(vec![]);
        with.cgroup = Some("/sys/fs/cgroup".into());
        assert!(Confinement::decide(&asked, &with).unwrap().1.is_empty());
        assert!(Confinement::decide(&ConfinementConfig::default(), &machine(vec![])).is_ok());
    }
}
