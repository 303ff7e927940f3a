//! Turning a client-supplied relative path into a location under a user's
//! root, refusing anything that could leave it.
//!
//! Guarantees: the result is `root/<components>` where every component is a
//! plain name (no `.`, `..`, `/`, NUL, not empty, at most NAME_MAX bytes),
//! and no existing intermediate component is a symlink. The final component
//! is never followed either: the store opens it with `O_NOFOLLOW` or uses
//! `lstat`, so an admin-placed symlink cannot lead outside the root.

use std::path::{Path, PathBuf};

use dfos_protocol::limits::{MAX_NAME_BYTES, MAX_PATH_BYTES};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is absolute, or has an empty, '.' or '..' component")]
    NotRelative,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path or component too long")]
    TooLong,
    #[error("path goes through a symlink")]
    ThroughSymlink,
}

/// Checks the syntax of `rel` without touching the disk.
pub fn check_syntax(rel: &str) -> Result<(), PathError> {
    if rel.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    if rel.contains('\0') {
        return Err(PathError::Nul);
    }
    if rel.is_empty() {
        return Ok(());
    }
    for component in rel.split('/') {
        if component.is_empty() || component == "." || component == ".." {
            return Err(PathError::NotRelative);
        }
        if component.len() > MAX_NAME_BYTES {
            return Err(PathError::TooLong);
        }
    }
    Ok(())
}

/// Resolves `rel` under `root` (see the module guarantees). `""` is the
/// root itself; `PathBuf::join("")` would add a trailing slash, so it is
/// special-cased.
pub fn resolve(root: &Path, rel: &str) -> Result<PathBuf, PathError> {
    check_syntax(rel)?;
    let mut path = root.to_path_buf();
    if rel.is_empty() {
        return Ok(path);
    }
    let mut components = rel.split('/').peekable();
    while let Some(component) = components.next() {
        path.push(component);
        let is_last = components.peek().is_none();
        if !is_last {
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                if meta.file_type().is_symlink() {
                    return Err(PathError::ThroughSymlink);
                }
            }
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_paths_resolve_under_the_root() {
        let root = Path::new("/srv/u");
        assert_eq!(resolve(root, "").unwrap(), PathBuf::from("/srv/u"));
        assert_eq!(resolve(root, "a/b.txt").unwrap(), PathBuf::from("/srv/u/a/b.txt"));
        assert_eq!(resolve(root, "..a/b..").unwrap(), PathBuf::from("/srv/u/..a/b.."));
    }

    #[test]
    fn hostile_paths_are_refused() {
        let root = Path::new("/srv/u");
        for bad in ["/etc/passwd", "..", "a/../../x", "./a", "a//b", "a/", "a/./b", "../User1/secret"] {
            assert_eq!(resolve(root, bad), Err(PathError::NotRelative), "{bad}");
        }
        assert_eq!(resolve(root, "a\0b"), Err(PathError::Nul));
        assert_eq!(resolve(root, &"x".repeat(256)), Err(PathError::TooLong));
        assert_eq!(resolve(root, &"a/".repeat(2100)), Err(PathError::TooLong));
    }

    #[test]
    fn symlinks_are_never_traversed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("u");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        assert_eq!(resolve(&root, "link/passwd"), Err(PathError::ThroughSymlink));
        assert!(resolve(&root, "link").is_ok(), "the last component is checked by the store");
        assert!(resolve(&root, "d/new").is_ok());
    }

    proptest! {
        #[test]
        fn resolved_paths_stay_under_the_root(rel in "[a-z./]{0,30}") {
            if let Ok(path) = resolve(Path::new("/r"), &rel) {
                prop_assert!(path.starts_with("/r"));
                prop_assert!(!path.components().any(|c| matches!(c, std::path::Component::ParentDir | std::path::Component::CurDir)));
            }
        }
    }
}
