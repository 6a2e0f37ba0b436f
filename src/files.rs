//! Files the vault creates: readable and writable by their owner only (mode
//! 0600), whatever the directory they are in. A file that already exists
//! never gains a permission here; one readable by group or others can be
//! narrowed to its owner.
//!
//! A mode given at creation is masked by the process umask, which can only
//! remove permissions: a file created 0600 is 0600 or narrower.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// The mode of every file the vault creates.
pub const PRIVATE_MODE: u32 = 0o600;

/// Open options that create a missing file with mode 0600 (an existing file
/// keeps its mode). Add the access and creation flags the caller needs.
pub fn private_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(PRIVATE_MODE);
    options
}

/// Creates `path` empty with mode 0600 unless something already exists
/// there (`create_new`: never truncates, never follows a symlink). Returns
/// whether it created the file.
pub fn create_private_if_missing(path: &Path) -> io::Result<bool> {
    match private_options().write(true).create_new(true).open(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Takes every permission of group and others away from the regular file at
/// `path` (0644 becomes 0600), keeping the owner's. Returns the mode it had
/// when it changed it; `None` when there was nothing to take away, or no
/// regular file at `path`.
pub fn restrict_to_owner(path: &Path) -> io::Result<Option<u32>> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !meta.is_file() {
        return Ok(None);
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
    Ok(Some(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_owner_only_files_and_leaves_existing_ones_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        assert!(create_private_if_missing(&path).unwrap());
        assert_eq!(mode(&path) & 0o077, 0, "{:04o}", mode(&path));
        std::fs::write(&path, b"data").unwrap();
        assert!(!create_private_if_missing(&path).unwrap());
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"data",
            "an existing file is kept"
        );
    }

    #[test]
    fn narrows_to_the_owner_and_never_adds_a_permission() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(restrict_to_owner(&path).unwrap(), Some(0o644));
        assert_eq!(mode(&path), 0o600);
        assert_eq!(restrict_to_owner(&path).unwrap(), None);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        assert_eq!(restrict_to_owner(&path).unwrap(), Some(0o444));
        assert_eq!(mode(&path), 0o400, "the owner gains no write permission");

        assert_eq!(
            restrict_to_owner(&dir.path().join("missing")).unwrap(),
            None
        );
    }
}
