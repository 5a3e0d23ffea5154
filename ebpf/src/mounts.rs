//! datapath setup (I/O edge): the filesystems the loader needs, bpffs for pins and cgroup v2 for
//! the socket hooks, mounted at a path the caller chooses when they are missing.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::DatapathError;

const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// Mounts a bpffs at `mount_point` unless one is there already.
pub fn ensure_bpffs(mount_point: &Path) -> Result<(), DatapathError> {
    ensure_mounted(mount_point, "bpf", BPF_FS_MAGIC)
}

/// Mounts the cgroup v2 hierarchy at `mount_point` unless it is there already.
pub fn ensure_cgroup2(mount_point: &Path) -> Result<(), DatapathError> {
    ensure_mounted(mount_point, "cgroup2", CGROUP2_SUPER_MAGIC)
}

pub(crate) fn is_bpffs(path: &Path) -> io::Result<bool> {
    Ok(filesystem_magic(path)? == BPF_FS_MAGIC)
}

pub(crate) fn is_cgroup2(path: &Path) -> io::Result<bool> {
    Ok(filesystem_magic(path)? == CGROUP2_SUPER_MAGIC)
}

/// The root of a cgroup hierarchy is a mount point: programs attached there would affect every
/// process on the machine, so the loader refuses it.
pub(crate) fn is_mount_point(path: &Path) -> io::Result<bool> {
    let own = std::fs::metadata(path)?;
    let parent = std::fs::metadata(path.join(".."))?;
    Ok(own.dev() != parent.dev() || own.ino() == parent.ino())
}

fn ensure_mounted(mount_point: &Path, fstype: &str, magic: u64) -> Result<(), DatapathError> {
    let io_err = |what: &'static str| {
        move |source| DatapathError::Io {
            what,
            path: mount_point.to_path_buf(),
            source,
        }
    };
    if mount_point.exists() && filesystem_magic(mount_point).map_err(io_err("statfs"))? == magic {
        return Ok(());
    }
    std::fs::create_dir_all(mount_point).map_err(io_err("creating mount point"))?;
    let target = CString::new(mount_point.as_os_str().as_bytes())
        .map_err(|e| io_err("mount point path")(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let fstype_c = CString::new(fstype)
        .map_err(|e| io_err("fs type")(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            fstype_c.as_ptr(),
            target.as_ptr(),
            fstype_c.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io_err("mount")(io::Error::last_os_error()));
    }
    tracing::info!(path = %mount_point.display(), fstype, "mounted");
    Ok(())
}

fn filesystem_magic(path: &Path) -> io::Result<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut buf) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(buf.f_type as u64)
}
