//! Xen's node permissions: a list whose first entry names the owner and the
//! access every other domain gets by default, followed by per-domain
//! exceptions. On the wire each entry is a letter and a domain id: `n0`, `r5`,
//! `w7`, `b3` (none, read, write, both).

use std::fmt;
use std::str::FromStr;

/// A domain id.
pub type DomId = u32;

/// Errors parsing permission strings.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PermError {
    #[error("permission entry {0:?} is not a letter n/r/w/b followed by a domain id")]
    Malformed(String),
    #[error("a permission list needs at least the owner entry")]
    Empty,
}

/// The access one permission entry grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    None,
    Read,
    Write,
    Both,
}

impl Access {
    /// Whether this access includes reading.
    pub fn can_read(self) -> bool {
        matches!(self, Access::Read | Access::Both)
    }
    /// Whether this access includes writing.
    pub fn can_write(self) -> bool {
        matches!(self, Access::Write | Access::Both)
    }
    fn letter(self) -> char {
        match self {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        }
    }
}

/// One entry: a domain and its access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Perm {
    pub access: Access,
    pub domid: DomId,
}

impl Perm {
    pub fn new(access: Access, domid: DomId) -> Perm {
        Perm { access, domid }
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.access.letter(), self.domid)
    }
}

impl FromStr for Perm {
    type Err = PermError;
    fn from_str(s: &str) -> Result<Perm, PermError> {
        let bad = || PermError::Malformed(s.chars().take(32).collect());
        let mut chars = s.chars();
        let access = match chars.next() {
            Some('n') => Access::None,
            Some('r') => Access::Read,
            Some('w') => Access::Write,
            Some('b') => Access::Both,
            _ => return Err(bad()),
        };
        let digits = chars.as_str();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let domid = digits.parse::<DomId>().map_err(|_| bad())?;
        Ok(Perm { access, domid })
    }
}

/// A node's permission list; never empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Perms(Vec<Perm>);

/// What a connection may do with a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rights {
    pub read: bool,
    pub write: bool,
    /// Owner rights: may change the permissions.
    pub owner: bool,
}

impl Rights {
    pub const ALL: Rights = Rights {
        read: true,
        write: true,
        owner: true,
    };
}

impl Perms {
    /// A list from entries; the first is the owner.
    pub fn new(entries: Vec<Perm>) -> Result<Perms, PermError> {
        if entries.is_empty() {
            return Err(PermError::Empty);
        }
        Ok(Perms(entries))
    }

    /// `n<owner>`: owned by `owner`, nobody else has access.
    pub fn owned_by(owner: DomId) -> Perms {
        Perms(vec![Perm::new(Access::None, owner)])
    }

    /// The owning domain.
    pub fn owner(&self) -> DomId {
        self.0[0].domid
    }

    /// All entries, owner first.
    pub fn entries(&self) -> &[Perm] {
        &self.0
    }

    /// Makes `domid` the owner, keeping the default access.
    pub fn set_owner(&mut self, domid: DomId) {
        self.0[0].domid = domid;
    }

    /// Xen's `perm_for_conn`: privileged callers and owners get everything;
    /// otherwise the first later entry for the caller (or for the domain it
    /// is the target of) decides; otherwise the owner entry's default access.
    pub fn rights_for(&self, domid: DomId, privileged: bool, target: Option<DomId>) -> Rights {
        let is_me = |d: DomId| d == domid || target == Some(d);
        if privileged || is_me(self.owner()) {
            return Rights::ALL;
        }
        let access = self.0[1..]
            .iter()
            .find(|p| is_me(p.domid))
            .map_or(self.0[0].access, |p| p.access);
        Rights {
            read: access.can_read(),
            write: access.can_write(),
            owner: false,
        }
    }

    /// XSA-322: forget a released domain. Where it owned the node, dom0 becomes
    /// the owner; its other entries are dropped. Returns true if anything changed.
    pub fn forget_domain(&mut self, domid: DomId) -> bool {
        let before = self.0.len();
        let mut changed = false;
        if self.0[0].domid == domid {
            self.0[0].domid = 0;
            changed = true;
        }
        let owner = self.0[0];
        let mut rest: Vec<Perm> = self.0[1..]
            .iter()
            .copied()
            .filter(|p| p.domid != domid)
            .collect();
        changed |= rest.len() + 1 != before;
        rest.insert(0, owner);
        self.0 = rest;
        changed
    }

    /// The wire form: each entry followed by a NUL.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for p in &self.0 {
            out.extend_from_slice(p.to_string().as_bytes());
            out.push(0);
        }
        out
    }

    /// Parses entries given as separate strings.
    pub fn from_strs<S: AsRef<str>>(parts: &[S]) -> Result<Perms, PermError> {
        Perms::new(
            parts
                .iter()
                .map(|s| s.as_ref().parse())
                .collect::<Result<_, _>>()?,
        )
    }
}

impl fmt::Display for Perms {
    /// Space-separated, as `xenstore-ls -p` prints them: `n0 r5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl FromStr for Perms {
    type Err = PermError;
    /// Accepts entries separated by spaces, commas or NULs.
    fn from_str(s: &str) -> Result<Perms, PermError> {
        let parts: Vec<&str> = s
            .split([' ', ',', '\0'])
            .filter(|p| !p.is_empty())
            .collect();
        Perms::from_strs(&parts)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let p: Perms = "n0 r5 w7 b12".parse().unwrap();
        assert_eq!(p.owner(), 0);
        assert_eq!(p.entries()[3], Perm::new(Access::Both, 12));
        assert_eq!(p.to_string(), "n0 r5 w7 b12");
        assert_eq!(p.to_wire(), b"n0\0r5\0w7\0b12\0");
    }

    #[test]
    fn rejects_malformed_entries() {
        for bad in ["x0", "r", "r-1", "r 5", "rr5", "r99999999999", ""] {
            assert!(bad.parse::<Perm>().is_err(), "{bad:?}");
        }
        assert_eq!("".parse::<Perms>(), Err(PermError::Empty));
    }

    #[test]
    fn rights_follow_perm_for_conn() {
        let p: Perms = "r3 n5 w6".parse().unwrap();
        assert_eq!(p.rights_for(3, false, None), Rights::ALL, "owner");
        assert_eq!(p.rights_for(9, true, None), Rights::ALL, "privileged");
        let r = p.rights_for(5, false, None);
        assert!(!r.read && !r.write);
        let r = p.rights_for(6, false, None);
        assert!(!r.read && r.write && !r.owner);
        let r = p.rights_for(8, false, None);
        assert!(r.read && !r.write, "default from owner entry");
        let r = p.rights_for(8, false, Some(6));
        assert!(r.write, "target's entry applies");
    }

    #[test]
    fn forget_domain_scrubs_every_mention() {
        let mut p: Perms = "b4 r4 w5".parse().unwrap();
        assert!(p.forget_domain(4));
        assert_eq!(p.to_string(), "b0 w5");
        assert!(!p.forget_domain(4));
    }
}
