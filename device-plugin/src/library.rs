//! Installing `libvcuda.so` on the host, at a versioned, immutable path.
//!
//! Share containers get the library bind-mounted read-only at [`CONTAINER_LIBRARY`] and a
//! one-line `/etc/ld.so.preload` naming it. A running process keeps the library mapped for its
//! whole life, so the host file a container mounts is never changed once written: each build
//! gets a file of its own, `libvcuda-<version>-<first 12 hex digits of its SHA-256>.so`, written
//! to a temporary file, fsynced and renamed into place. A daemon upgrade adds a new file, and
//! containers started before it keep the old one. Old versions are never deleted here: a
//! container may still mount them, and removing a bind-mount source would detach it from the
//! container (see `docs/limiter-config.md`, "Upgrades").

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Where the library appears inside a share container.
pub const CONTAINER_LIBRARY: &str = "/usr/local/vcuda/libvcuda.so";
/// The dynamic linker's preload list inside the container.
pub const CONTAINER_PRELOAD: &str = "/etc/ld.so.preload";
/// The container's read-write limiter state directory (shared region, locks).
pub const CONTAINER_STATE_DIR: &str = "/run/vcuda";
/// Name of the preload file in the install directory.
pub const PRELOAD_FILE: &str = "ld.so.preload";
/// The preload file's content.
pub const PRELOAD_CONTENT: &str = "/usr/local/vcuda/libvcuda.so\n";

/// The library, installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledLibrary {
    /// The versioned host file (`<install-dir>/libvcuda-<version>-<hash>.so`).
    pub path: PathBuf,
    /// The host preload file (`<install-dir>/ld.so.preload`).
    pub preload: PathBuf,
    /// SHA-256 of the library, hex.
    pub sha256: String,
    /// False when the versioned file was already there with the right content.
    pub written: bool,
}

/// Why the library could not be installed.
#[derive(Debug)]
pub struct LibraryError {
    /// What went wrong, naming the file and the flag.
    pub message: String,
}

impl std::fmt::Display for LibraryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LibraryError {}

/// The versioned file name of a library build.
pub fn versioned_name(version: &str, sha256_hex: &str) -> String {
    format!(
        "libvcuda-{version}-{}.so",
        &sha256_hex[..12.min(sha256_hex.len())]
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Write `bytes` to a new temporary file in `dir`, fsync it and rename it to `target`. The
/// previous file at `target` (if any) is replaced, never truncated: processes that map it keep
/// their copy.
fn install_file(dir: &Path, target: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        // The umask may have taken bits away; readers are every user in every container.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, target)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Copy `source` (the image's libvcuda.so) into `install_dir` under its versioned name, unless
/// that file already exists with the same SHA-256, and write `install_dir/ld.so.preload`.
pub fn install(
    source: &Path,
    install_dir: &Path,
    version: &str,
) -> Result<InstalledLibrary, LibraryError> {
    let bytes = fs::read(source).map_err(|e| LibraryError {
        message: format!(
            "cannot read the limiter library {} (--limiter-library): {e}",
            source.display()
        ),
    })?;
    if !bytes.starts_with(b"\x7fELF") {
        return Err(LibraryError {
            message: format!(
                "the limiter library {} (--limiter-library) is not a shared library (no ELF header; {} bytes)",
                source.display(),
                bytes.len()
            ),
        });
    }
    let dir_error = |e: io::Error| {
        LibraryError {
        message: format!(
            "cannot install the limiter library into {} (--limiter-install-dir): {e}; check that it is a writable host directory",
            install_dir.display()
        ),
    }
    };
    fs::create_dir_all(install_dir).map_err(dir_error)?;
    let sha256 = sha256_hex(&bytes);
    let path = install_dir.join(versioned_name(version, &sha256));
    let present = fs::read(&path).ok().map(|b| sha256_hex(&b));
    let written = match present {
        Some(h) if h == sha256 => false,
        other => {
            if other.is_some() {
                // Same name, other content: a damaged file. Replacing it by rename leaves any
                // process that maps it with its own copy.
                tracing::warn!(file = %path.display(), "the installed limiter library does not match its name's hash; replacing it");
            }
            install_file(install_dir, &path, &bytes, 0o644).map_err(dir_error)?;
            true
        }
    };
    let preload = install_dir.join(PRELOAD_FILE);
    if fs::read(&preload).ok().as_deref() != Some(PRELOAD_CONTENT.as_bytes()) {
        install_file(install_dir, &preload, PRELOAD_CONTENT.as_bytes(), 0o644)
            .map_err(dir_error)?;
    }
    Ok(InstalledLibrary {
        path,
        preload,
        sha256,
        written,
    })
}

/// Earlier versions still in `install_dir` (kept: containers may mount them).
pub fn other_versions(install_dir: &Path, current: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(install_dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p != current)
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libvcuda-") && n.ends_with(".so"))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const LIB: &[u8] = b"\x7fELF a stand-in for libvcuda.so";

    #[test]
    fn the_library_lands_under_a_versioned_name_with_the_preload_file_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("libvcuda.so");
        fs::write(&src, LIB).unwrap();
        let lib_dir = dir.path().join("lib");
        let got = install(&src, &lib_dir, "0.1.0").unwrap();
        let hash = sha256_hex(LIB);
        assert_eq!(
            got.path,
            lib_dir.join(format!("libvcuda-0.1.0-{}.so", &hash[..12]))
        );
        assert!(got.written);
        assert_eq!(fs::read(&got.path).unwrap(), LIB);
        assert_eq!(
            fs::metadata(&got.path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(
            fs::read_to_string(&got.preload).unwrap(),
            "/usr/local/vcuda/libvcuda.so\n"
        );
        // No temporary files are left.
        let mut names: Vec<String> = fs::read_dir(&lib_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn an_installed_file_is_never_rewritten_and_a_new_build_gets_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("libvcuda.so");
        fs::write(&src, LIB).unwrap();
        let install_dir = dir.path().join("lib");
        let first = install(&src, &install_dir, "0.1.0").unwrap();
        let ino = fs::metadata(&first.path).unwrap().ino();
        let again = install(&src, &install_dir, "0.1.0").unwrap();
        assert!(!again.written);
        assert_eq!(again.path, first.path);
        assert_eq!(fs::metadata(&first.path).unwrap().ino(), ino, "same inode");

        fs::write(&src, b"\x7fELF a newer build").unwrap();
        let newer = install(&src, &install_dir, "0.2.0").unwrap();
        assert_ne!(newer.path, first.path);
        assert_eq!(fs::read(&first.path).unwrap(), LIB, "the old version stays");
        assert_eq!(other_versions(&install_dir, &newer.path), vec![first.path]);
    }

    #[test]
    fn a_damaged_file_under_the_right_name_is_replaced_not_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("libvcuda.so");
        fs::write(&src, LIB).unwrap();
        let install_dir = dir.path().join("lib");
        let first = install(&src, &install_dir, "0.1.0").unwrap();
        fs::write(&first.path, b"damaged").unwrap();
        // A process holding the damaged file open keeps reading its own copy.
        let held = File::open(&first.path).unwrap();
        let again = install(&src, &install_dir, "0.1.0").unwrap();
        assert!(again.written);
        assert_eq!(fs::read(&again.path).unwrap(), LIB);
        assert_eq!(held.metadata().unwrap().len(), 7);
    }

    #[test]
    fn a_missing_or_bogus_library_is_refused_naming_the_file_and_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let e = install(&dir.path().join("nope.so"), dir.path(), "0.1.0").unwrap_err();
        assert!(e.to_string().contains("nope.so (--limiter-library)"), "{e}");
        let txt = dir.path().join("text.so");
        fs::write(&txt, b"not a library").unwrap();
        let e = install(&txt, dir.path(), "0.1.0").unwrap_err();
        assert!(e.to_string().contains("no ELF header"), "{e}");
        let src = dir.path().join("libvcuda.so");
        fs::write(&src, LIB).unwrap();
        let blocked = dir.path().join("blocked");
        fs::write(&blocked, b"a file, not a directory").unwrap();
        let e = install(&src, &blocked, "0.1.0").unwrap_err();
        assert!(e.to_string().contains("--limiter-install-dir"), "{e}");
    }
}
