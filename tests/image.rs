//! The container image: `scripts/build-image.sh` builds it FROM scratch into an OCI archive,
//! podman loads and runs it against the machine's RabbitMQ and PostgreSQL (host network), an
//! event is published and read back, and the container is checked to run as a non-root user
//! on a read-only root filesystem.
//!
//! Skipped, with the reason printed, only where buildah or podman is not installed
//! (`.ci/run` installs them).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run a container tool");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// podman with the settings this kind of machine needs: cgroups v1/v2 hybrid, which crun
/// refuses (runc with the cgroupfs manager runs), and no right to raise rlimits above the
/// session's (podman's defaults ask for more), so the limits are given explicitly.
fn podman() -> Command {
    let mut c = Command::new("podman");
    if have("runc") {
        c.args(["--runtime", "runc"]);
    }
    c.args(["--cgroup-manager", "cgroupfs"]);
    c
}

/// Removes the container and the image even when an assertion fails.
struct Cleanup {
    container: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "-f", &self.container]).output();
        let _ = podman().args(["rmi", "-f", &self.image]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_runs_as_non_root_on_a_read_only_root_and_serves_events() {
    for tool in ["buildah", "podman"] {
        if !have(tool) {
            eprintln!("SKIPPED: {tool} is not installed (apt-get install buildah podman runc)");
            return;
        }
    }
    let tag = format!("localhost/{}:test", unique("weir-image-"));
    let archive = tempfile::tempdir().expect("tempdir");
    let oci = archive.path().join("weir.tar");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = run(Command::new(root.join("scripts/build-image.sh"))
        .arg("--binary")
        .arg(weir_binary())
        .args(["--tag", &tag])
        .arg("--out")
        .arg(&oci));
    eprintln!("{}", String::from_utf8_lossy(&built.stdout).trim());
    // The archive is what gets shipped: drop the build's copy and load the image from it.
    let _ = Command::new("buildah").args(["rmi", "-f", &tag]).output();
    run(podman().arg("load").arg("-i").arg(&oci));
    let name = unique("weir-image-");
    let _cleanup = Cleanup {
        container: name.clone(),
        image: tag.clone(),
    };

    let db = fresh_database().await;
    let m = Manifests::new(&db);
    m.write("stream.yaml", &stream_yaml("boxed", "weir.test.boxed", ""));
    // The container's user (65532) reads the folder through a read-only bind mount.
    set_mode(m.path(), 0o755);
    for entry in std::fs::read_dir(m.path())
        .expect("manifest folder")
        .flatten()
    {
        set_mode(&entry.path(), 0o644);
    }
    let (port, admin) = (free_port(), free_port());
    run(podman()
        .args([
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "--read-only",
        ])
        .args([
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=4096:4096",
        ])
        .arg("-v")
        .arg(format!("{}:/manifests:ro", m.path().display()))
        .arg(&tag)
        .args(["run", "-f", "/manifests"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")]));

    let logs = || {
        podman()
            .args(["logs", &name])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    };
    let base = format!("http://127.0.0.1:{port}");
    let event = serde_json::json!({
        "specversion": "1.0", "id": "boxed-1", "source": "/image-test",
        "type": "parcel.sealed", "subject": "parcel-1", "data": {"weight": 3}
    });
    eventually(
        60,
        "a publish through the image answered 201",
        logs,
        || async { (publish_event(&base, "test", "boxed", &event).await == 201).then_some(()) },
    )
    .await;

    let page: serde_json::Value = common::http_get(format!(
        "{base}/v1/namespaces/test/streams/boxed/events?from=1"
    ))
    .await
    .expect("read")
    .json()
    .await
    .expect("page");
    let events = page.as_array().cloned().unwrap_or_default();
    assert_eq!(events.len(), 1, "read back: {page}");
    assert_eq!(events[0]["id"], "boxed-1");
    assert_eq!(events[0]["data"]["weight"], 3);

    // Non-root: the process's real and effective uid, as the kernel sees them.
    let pid = String::from_utf8_lossy(
        &run(podman().args(["inspect", "-f", "{{.State.Pid}}", &name])).stdout,
    )
    .trim()
    .to_string();
    let proc_status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("container process");
    let uid = proc_status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        uid.split_whitespace().skip(1).all(|u| u == "65532"),
        "container runs as {uid:?}"
    );
    // Read-only root: the container's `/` is mounted `ro`.
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let root_mount = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .unwrap_or_default()
        .to_string();
    assert!(
        root_mount
            .split_whitespace()
            .nth(5)
            .is_some_and(|o| o.split(',').any(|x| x == "ro")),
        "root filesystem is not read-only: {root_mount}"
    );
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
