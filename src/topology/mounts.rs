//! Which filesystem a path lives on, from the kernel's mount table (`/proc/self/mountinfo`).
//!
//! In a Pod, an ArchivePolicy's `volume` destination must be a mounted volume (a
//! PersistentVolumeClaim, an NFS share...): the container's own root filesystem is read-only in
//! the chart and disappears with the Pod, and memory-backed filesystems disappear with the node.
//! Parsing is kept here, free of I/O, so the decision is unit-tested on real mount tables;
//! [`Mounts::read`] is the one place that touches `/proc`.

use std::path::{Component, Path, PathBuf};

/// Filesystem types that never hold data beyond the Pod's (or the node's) life, or are not
/// data filesystems at all: the container runtime's root layers and kernel pseudo filesystems.
const EPHEMERAL: [&str; 12] = [
    "overlay",
    "tmpfs",
    "ramfs",
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "mqueue",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
];

/// One mount: where it is mounted and its filesystem type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub point: PathBuf,
    pub fstype: String,
}

/// The mount table, or why it could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mounts {
    mounts: Vec<Mount>,
    unreadable: Option<String>,
}

impl Mounts {
    /// Parses the text of `/proc/self/mountinfo` (proc(5)): field 5 is the mount point with
    /// spaces, tabs, newlines and backslashes octal-escaped; the filesystem type is the first
    /// field after the ` - ` separator (optional fields come before it). Lines that do not
    /// parse are skipped.
    pub fn parse(mountinfo: &str) -> Mounts {
        let mut mounts = Vec::new();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let (Some(point), Some(fstype)) = (left.split(' ').nth(4), right.split(' ').next())
            else {
                continue;
            };
            mounts.push(Mount {
                point: PathBuf::from(unescape(point)),
                fstype: fstype.to_string(),
            });
        }
        Mounts {
            mounts,
            unreadable: None,
        }
    }

    /// This process's mount table; when `/proc/self/mountinfo` cannot be read, a table that
    /// refuses every path with the reason (a check that cannot be made must not pass).
    pub fn read() -> Mounts {
        match std::fs::read_to_string("/proc/self/mountinfo") {
            Ok(text) => Mounts::parse(&text),
            Err(e) => Mounts {
                mounts: Vec::new(),
                unreadable: Some(format!("cannot read /proc/self/mountinfo: {e}")),
            },
        }
    }

    /// The mount `path` is on: the one whose mount point is the longest whole-component prefix
    /// of it (the last such entry when one point is mounted over another, as the kernel
    /// resolves it).
    pub fn mount_of(&self, path: &Path) -> Option<&Mount> {
        let path = normalize(path);
        self.mounts
            .iter()
            .filter(|m| path.starts_with(&m.point))
            .fold(None, |best: Option<&Mount>, m| match best {
                Some(b) if b.point.components().count() > m.point.components().count() => Some(b),
                _ => Some(m),
            })
    }

    /// Ok when `path` is on a mounted volume that outlives the Pod; otherwise the reason, in
    /// words for a status condition.
    pub fn check_durable(&self, path: &Path) -> Result<(), String> {
        if let Some(why) = &self.unreadable {
            return Err(format!(
                "{} cannot be checked to be a mounted volume: {why}",
                path.display()
            ));
        }
        match self.mount_of(path) {
            Some(m) if m.point == Path::new("/") => Err(format!(
                "{} is on the container's root filesystem, not a mounted volume: archives \
                 written there are lost with the Pod; mount a PersistentVolumeClaim there \
                 (chart value archiveVolume) or use a store destination",
                path.display()
            )),
            Some(m) if EPHEMERAL.contains(&m.fstype.as_str()) => Err(format!(
                "{} is on {} (a {} filesystem), which does not outlive the Pod: mount a \
                 PersistentVolumeClaim there (chart value archiveVolume) or use a store \
                 destination",
                path.display(),
                m.point.display(),
                m.fstype
            )),
            Some(_) => Ok(()),
            None => Err(format!(
                "{} is not under any mount point (no root mount in the table)",
                path.display()
            )),
        }
    }
}

/// Undoes mountinfo's `\ooo` octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'\\')
            .then(|| bytes.get(i + 1..i + 4))
            .flatten()
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .map(|d| d.iter().fold(0u32, |n, b| n * 8 + u32::from(b - b'0')))
            .and_then(|n| u8::try_from(n).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `path` without `.` and with `..` applied lexically (the archive path must be absolute; a
/// symlink inside it is not followed: the directory may not exist yet).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker Pod's table (containerd, the chart's /tmp emptyDir, a PVC, a memory emptyDir),
    /// trimmed.
    const POD: &str = "\
1385 1126 0:333 / / ro,relatime master:377 - overlay overlay rw,lowerdir=/var/lib/containerd/l1
1386 1385 0:336 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
1387 1385 0:337 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
1392 1385 259:1 /var/lib/kubelet/pods/p/volumes/kubernetes.io~empty-dir/tmp /tmp rw,relatime - ext4 /dev/nvme0n1p1 rw
1393 1385 259:1 /var/lib/kubelet/pods/p/etc-hosts /etc/hosts rw,relatime - ext4 /dev/nvme0n1p1 rw
1394 1385 0:45 / /var/lib/weir/archive rw,relatime shared:12 master:3 - ext4 /dev/nvme1n1 rw
1395 1385 0:46 / /var/lib/weir/fast rw,relatime - tmpfs tmpfs rw,size=1g
1396 1385 0:47 / /mnt/with\\040space rw,relatime - nfs4 server:/export rw
";

    #[test]
    fn parses_points_and_types_past_optional_fields() {
        let m = Mounts::parse(POD);
        let archive = m.mount_of(Path::new("/var/lib/weir/archive/shop")).unwrap();
        assert_eq!(archive.point, Path::new("/var/lib/weir/archive"));
        assert_eq!(archive.fstype, "ext4");
        assert_eq!(
            m.mount_of(Path::new("/mnt/with space/x")).unwrap().fstype,
            "nfs4"
        );
    }

    #[test]
    fn a_pvc_or_a_network_share_is_durable() {
        let m = Mounts::parse(POD);
        assert_eq!(m.check_durable(Path::new("/var/lib/weir/archive")), Ok(()));
        assert_eq!(
            m.check_durable(Path::new("/var/lib/weir/archive/a/b")),
            Ok(())
        );
        assert_eq!(m.check_durable(Path::new("/mnt/with space")), Ok(()));
    }

    #[test]
    fn the_root_filesystem_and_memory_are_not() {
        let m = Mounts::parse(POD);
        for (path, says) in [
            ("/var/lib/weir", "container's root filesystem"),
            // A sibling that only shares a string prefix with the mount point.
            ("/var/lib/weir/archive2", "container's root filesystem"),
            // `..` climbs out of the volume.
            (
                "/var/lib/weir/archive/../elsewhere",
                "container's root filesystem",
            ),
            ("/var/lib/weir/fast/x", "tmpfs"),
            ("/dev/archive", "tmpfs"),
        ] {
            let err = m.check_durable(Path::new(path)).unwrap_err();
            assert!(err.contains(says), "{path}: {err}");
            assert!(err.contains("archiveVolume"), "{path}: {err}");
        }
    }

    #[test]
    fn an_unreadable_table_refuses() {
        let m = Mounts {
            mounts: Vec::new(),
            unreadable: Some("cannot read /proc/self/mountinfo: denied".into()),
        };
        let err = m.check_durable(Path::new("/data")).unwrap_err();
        assert!(err.contains("denied"), "{err}");
    }

    #[test]
    fn this_process_has_a_root_mount() {
        let m = Mounts::read();
        assert!(m.mount_of(Path::new("/")).is_some());
    }
}
