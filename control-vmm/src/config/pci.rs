//! `[[guest.pci]]`: a VF of a PF the driver domain owns, assigned to a `kind = "linux"` guest
//! (after xl.cfg's `pci = [...]`, with `xl pci-assignable-add` done by the driver domain):
//!
//! ```toml
//! [[guest.pci]]
//! pf = "0000:00:02.0"   # in [driver_domain] owns
//! vf = 1                # VF number (1-based), or "any" (the default): the first free VF
//! ```

use std::collections::HashMap;

use serde::Deserialize;

use super::{is_pci_address, GuestKind, HostConfig};

/// Which VF of the PF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum VfChoice {
    /// VF number `n` (1-based, as `virtfn<n-1>`).
    Number(u16),
    /// "any": the first VF no guest holds.
    Any(AnyVf),
}

/// The word `"any"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AnyVf {
    #[serde(rename = "any")]
    Any,
}

impl Default for VfChoice {
    fn default() -> Self {
        VfChoice::Any(AnyVf::Any)
    }
}

impl VfChoice {
    /// The VF number, or None for any.
    pub fn number(self) -> Option<u16> {
        match self {
            VfChoice::Number(n) => Some(n),
            VfChoice::Any(_) => None,
        }
    }
}

/// A PCI function assigned to a guest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciConfig {
    /// The physical function (owned by the driver domain).
    pub pf: String,
    #[serde(default)]
    pub vf: VfChoice,
}

/// Checks every guest's `pci` entries: (key, what was expected).
pub(super) fn validate(host: &HostConfig) -> Result<(), (String, String)> {
    let mut taken = HashMap::new();
    for (i, g) in host.guests.iter().enumerate() {
        for (j, p) in g.pci.iter().enumerate() {
            let key = |k: &str| format!("guest[{i}].pci[{j}].{k}");
            if g.kind != GuestKind::Linux {
                return Err((
                    format!("guest[{i}].pci"),
                    "nothing: only a kind = \"linux\" guest takes PCI functions".into(),
                ));
            }
            if !is_pci_address(&p.pf) {
                return Err((
                    key("pf"),
                    format!(
                        "a PCI address DDDD:BB:DD.F (lower-case hex), got {:?}",
                        p.pf
                    ),
                ));
            }
            if !host.driver_domain.owns.contains(&p.pf) {
                return Err((
                    key("pf"),
                    format!("a PF in [driver_domain] owns, {} is not", p.pf),
                ));
            }
            if let Some(n) = p.vf.number() {
                if n == 0 {
                    return Err((key("vf"), "a VF number from 1, or \"any\"".into()));
                }
                if let Some(first) = taken.insert((p.pf.clone(), n), key("vf")) {
                    return Err((
                        key("vf"),
                        format!(
                            "a VF no other guest names, {first} names VF {n} of {} too",
                            p.pf
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;
    use std::path::Path;

    const HOST: &str = r#"
        run_dir = "run"
        [driver_domain]
        name = "driver"
        domid = 1
        owns = ["0000:00:02.0"]
        [[guest]]
        name = "vm1"
        domid = 2
        kind = "linux"
        kernel = "bzImage"
        [[guest.pci]]
        pf = "0000:00:02.0"
        vf = 1
        [[guest]]
        name = "vm2"
        domid = 3
        kind = "linux"
        kernel = "bzImage"
        [[guest.pci]]
        pf = "0000:00:02.0"
    "#;

    fn invalid_key(text: &str) -> Option<String> {
        match HostConfig::parse(Path::new("host.toml"), text) {
            Err(ConfigError::Invalid { key, .. }) => Some(key),
            Ok(_) => None,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn pci_entries_name_owned_pfs_of_linux_guests_and_distinct_vfs() {
        assert_eq!(invalid_key(HOST), None);
        let h = HostConfig::parse(Path::new("host.toml"), HOST).unwrap();
        assert_eq!(h.guests[1].pci[0].vf.number(), None, "any");
        assert_eq!(
            invalid_key(&HOST.replace("owns = [\"0000:00:02.0\"]", "owns = []")).as_deref(),
            Some("guest[0].pci[0].pf")
        );
        let twice = HOST.replacen(
            "[[guest.pci]]\n        pf = \"0000:00:02.0\"\n",
            "[[guest.pci]]\n        pf = \"0000:00:02.0\"\n        vf = 1\n",
            2,
        );
        let twice = twice.replacen("vf = 1\n        vf = 1", "vf = 1", 1);
        assert_eq!(invalid_key(&twice).as_deref(), Some("guest[1].pci[0].vf"));
        assert_eq!(
            invalid_key(&HOST.replace("vf = 1", "vf = 0")).as_deref(),
            Some("guest[0].pci[0].vf")
        );
        let process = HOST.replacen(
            "kind = \"linux\"\n        kernel = \"bzImage\"",
            "kind = \"process\"",
            1,
        );
        assert_eq!(invalid_key(&process).as_deref(), Some("guest[0].pci"));
    }

    #[derive(Deserialize)]
    struct One {
        pci: Vec<PciConfig>,
    }

    #[test]
    fn vf_is_a_number_or_any() {
        let t: One = toml::from_str(
            "[[pci]]\npf = \"0000:00:02.0\"\nvf = 2\n[[pci]]\npf = \"0000:00:02.0\"\nvf = \"any\"\n[[pci]]\npf = \"0000:00:02.0\"\n",
        )
        .unwrap();
        assert_eq!(t.pci[0].vf.number(), Some(2));
        assert_eq!(t.pci[1].vf.number(), None);
        assert_eq!(t.pci[2].vf, VfChoice::default());
        assert!(toml::from_str::<One>("[[pci]]\npf = \"0000:00:02.0\"\nvf = \"some\"\n").is_err());
        assert!(toml::from_str::<One>("[[pci]]\npf = \"0000:00:02.0\"\nbar = 1\n").is_err());
    }
}
