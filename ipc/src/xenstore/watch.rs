//! Watches: registration rules and matching changes against them.

use super::path;
use super::perms::DomId;
use super::tree::{Change, Match};
use super::wire::{XsError, ABS_PATH_MAX, PAYLOAD_MAX, REL_PATH_MAX};

/// Special watch path fired when a domain is introduced.
pub const INTRODUCE_DOMAIN: &str = "@introduceDomain";
/// Special watch path fired when a domain is released.
pub const RELEASE_DOMAIN: &str = "@releaseDomain";

/// The longest token accepted: an event (`path\0token\0`) for the longest
/// possible path must still fit in one payload.
pub const TOKEN_MAX: usize = PAYLOAD_MAX - ABS_PATH_MAX - 2;

/// One registered watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// Absolute node path, or a special `@...` name.
    pub path: String,
    pub token: Vec<u8>,
    /// Registered with a relative path: events are reported relative to the
    /// watcher's home path.
    pub relative: bool,
}

impl Watch {
    /// Builds a watch from a client's request, canonicalising relative paths.
    pub fn parse(
        raw_path: &[u8],
        token: &[u8],
        domid: DomId,
        max_rel_len: Option<usize>,
    ) -> Result<Watch, XsError> {
        let raw = std::str::from_utf8(raw_path).map_err(|_| XsError::EINVAL)?;
        if token.len() > TOKEN_MAX {
            return Err(XsError::E2BIG);
        }
        if let Some(special) = raw.strip_prefix('@') {
            let ok = !special.is_empty()
                && raw.len() <= REL_PATH_MAX
                && special
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
            if !ok {
                return Err(XsError::EINVAL);
            }
            return Ok(Watch {
                path: raw.to_owned(),
                token: token.to_vec(),
                relative: false,
            });
        }
        let relative = !raw.starts_with('/');
        let abs = path::canonicalize(raw, domid);
        if !path::is_valid_node_name(&abs, max_rel_len) {
            return Err(XsError::EINVAL);
        }
        Ok(Watch {
            path: abs,
            token: token.to_vec(),
            relative,
        })
    }

    /// The path to report for `change`, if this watch fires for it.
    pub fn event_path(&self, change: &Change, domid: DomId) -> Option<String> {
        let hit = match change.how {
            Match::Subtree => path::is_at_or_below(&change.path, &self.path),
            Match::Exact => change.path == self.path,
        };
        hit.then(|| self.report(&change.path, domid))
    }

    /// `p` as this watch reports it (relative to the home path if registered so).
    pub fn report(&self, p: &str, domid: DomId) -> String {
        if self.relative {
            let home = path::domain_path(domid);
            if let Some(rest) = p.strip_prefix(&home).and_then(|r| r.strip_prefix('/')) {
                return rest.to_owned();
            }
        }
        p.to_owned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::xenstore::perms::Perms;

    fn change(p: &str, how: Match) -> Change {
        Change::new(p, how, Perms::owned_by(0))
    }

    #[test]
    fn subtree_and_exact_matching() {
        let w = Watch::parse(b"/a", b"t", 0, None).unwrap();
        assert_eq!(
            w.event_path(&change("/a/b", Match::Subtree), 0).as_deref(),
            Some("/a/b")
        );
        assert_eq!(
            w.event_path(&change("/a", Match::Subtree), 0).as_deref(),
            Some("/a")
        );
        assert_eq!(w.event_path(&change("/ab", Match::Subtree), 0), None);
        assert_eq!(w.event_path(&change("/", Match::Subtree), 0), None);
        assert_eq!(w.event_path(&change("/a/b", Match::Exact), 0), None);
        assert!(w.event_path(&change("/a", Match::Exact), 0).is_some());
    }

    #[test]
    fn relative_watches_report_relative_paths() {
        let w = Watch::parse(b"device", b"t", 4, None).unwrap();
        assert_eq!(w.path, "/local/domain/4/device");
        let ev = w.event_path(&change("/local/domain/4/device/vbd", Match::Subtree), 4);
        assert_eq!(ev.as_deref(), Some("device/vbd"));
    }

    #[test]
    fn rejects_bad_paths_and_tokens() {
        assert_eq!(Watch::parse(b"/a/", b"t", 0, None), Err(XsError::EINVAL));
        assert_eq!(Watch::parse(b"@", b"t", 0, None), Err(XsError::EINVAL));
        assert!(Watch::parse(b"@releaseDomain", b"t", 0, None).is_ok());
        let tok = vec![b'x'; TOKEN_MAX + 1];
        assert_eq!(Watch::parse(b"/a", &tok, 0, None), Err(XsError::E2BIG));
    }
}
