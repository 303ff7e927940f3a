//! The paths requests carry: relative to the user's root, `/`-separated,
//! `""` for the root itself. Joining and splitting them lives here once, so
//! mountd and storaged build and take apart the same paths the same way.

/// The directory at a user's root where storage nodes run with a trash
/// keep deleted and replaced files (`storaged --trash-hours`).
pub const TRASH_DIR: &str = ".trash";

/// `parent/name`, where the root's path is `""`.
pub fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    }
}

/// A path's parent and last name; a child of the root has parent `""`.
pub fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_and_split_undo_each_other() {
        for (parent, name) in [("", "a"), ("a", "b"), ("a/b", "c")] {
            assert_eq!(split(&join(parent, name)), (parent, name));
        }
    }
}
