//! Node names: canonicalisation of relative paths and Xen's validity rules
//! (`is_valid_nodename`).

use super::perms::DomId;
use super::wire::ABS_PATH_MAX;

/// The home path of a domain, `/local/domain/<domid>`.
pub fn domain_path(domid: DomId) -> String {
    format!("/local/domain/{domid}")
}

/// Resolves a client-supplied name: absolute names stay, relative ones are
/// placed below the caller's home path.
pub fn canonicalize(name: &str, domid: DomId) -> String {
    if name.starts_with('/') {
        name.to_owned()
    } else {
        format!("{}/{name}", domain_path(domid))
    }
}

/// Length of the `/local/domain/<n>/` prefix of `path`, if it has one
/// (Xen accepts any domain id of up to five digits here).
fn local_prefix_len(path: &str) -> usize {
    const PREFIX: &str = "/local/domain/";
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return 0;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 5 || rest.as_bytes().get(digits) != Some(&b'/') {
        return 0;
    }
    PREFIX.len() + digits + 1
}

/// Checks an absolute node name: starts with `/`, no trailing `/` (except the
/// root), no `//`, only `[A-Za-z0-9/_@-]`, at most [`ABS_PATH_MAX`] bytes, and
/// -- when `max_rel_len` is given (unprivileged callers) -- at most that many
/// bytes below a `/local/domain/<n>/` prefix.
pub fn is_valid_node_name(path: &str, max_rel_len: Option<usize>) -> bool {
    if !path.starts_with('/') || path.len() > ABS_PATH_MAX {
        return false;
    }
    if path.len() > 1 && path.ends_with('/') {
        return false;
    }
    if path.contains("//") {
        return false;
    }
    if let Some(max) = max_rel_len {
        if path.len() - local_prefix_len(path) > max {
            return false;
        }
    }
    path.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'@' | b'-'))
}

/// The parent of an absolute, valid, non-root path.
pub fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// The last component of an absolute, valid, non-root path.
pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Joins a parent path and a child name.
pub fn join(parent: &str, child: &str) -> String {
    if parent == "/" {
        format!("/{child}")
    } else {
        format!("{parent}/{child}")
    }
}

/// Whether `path` is `ancestor` itself or lies below it.
pub fn is_at_or_below(path: &str, ancestor: &str) -> bool {
    if ancestor == "/" {
        return path.starts_with('/');
    }
    path == ancestor
        || (path.len() > ancestor.len()
            && path.starts_with(ancestor)
            && path.as_bytes()[ancestor.len()] == b'/')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn canonicalizes_relative_names() {
        assert_eq!(canonicalize("device/vbd", 5), "/local/domain/5/device/vbd");
        assert_eq!(canonicalize("/vm", 5), "/vm");
    }

    #[test]
    fn validity_rules() {
        for ok in ["/", "/a", "/a/b-c_d@e/F9", "/local/domain/3/x"] {
            assert!(is_valid_node_name(ok, None), "{ok}");
        }
        for bad in ["", "a", "/a/", "/a//b", "/a b", "/a.b", "/ä", "/a\0"] {
            assert!(!is_valid_node_name(bad, None), "{bad:?}");
        }
        let long = format!("/{}", "a".repeat(ABS_PATH_MAX));
        assert!(!is_valid_node_name(&long, None));
    }

    #[test]
    fn relative_length_limit_counts_below_domain_prefix() {
        let rel = "a".repeat(10);
        assert!(is_valid_node_name(
            &format!("/local/domain/7/{rel}"),
            Some(10)
        ));
        assert!(!is_valid_node_name(
            &format!("/local/domain/7/{rel}x"),
            Some(10)
        ));
        assert!(!is_valid_node_name(&format!("/vm/{rel}"), Some(10)));
    }

    #[test]
    fn parent_basename_and_ancestry() {
        assert_eq!(parent("/a/b/c"), "/a/b");
        assert_eq!(parent("/a"), "/");
        assert_eq!(basename("/a/b"), "b");
        assert_eq!(join("/", "a"), "/a");
        assert!(is_at_or_below("/a/b", "/a"));
        assert!(is_at_or_below("/a", "/a"));
        assert!(!is_at_or_below("/ab", "/a"));
        assert!(is_at_or_below("/x", "/"));
    }
}
