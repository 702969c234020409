//! In operator mode an ArchivePolicy's `volume` destination must be a mounted volume that
//! outlives the Pod: the real `weir operator` against the test API server refuses a path on the
//! root filesystem (Ready=False, InvalidSpec, naming the path and the fix) and accepts one on a
//! mounted volume (a bind mount stands in for the Pod's PersistentVolumeClaim).

mod apiserver;
mod common;

use std::process::Command;

use apiserver::TestApiServer;
use common::{Operator, fresh_database, namespace_with_secrets, unique};
use serde_json::Value;

/// A bind mount of a fresh directory, unmounted on drop.
struct BindMount {
    target: std::path::PathBuf,
}

impl BindMount {
    /// None (with the reason printed) where this process may not mount.
    fn new(source: &std::path::Path, target: &std::path::Path) -> Option<BindMount> {
        std::fs::create_dir_all(source).unwrap();
        std::fs::create_dir_all(target).unwrap();
        let out = Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(target)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipping the mounted half: mount --bind failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(BindMount {
            target: target.to_path_buf(),
        })
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.target).status();
    }
}

fn ready(server: &TestApiServer, ns: &str, name: &str) -> Option<(String, String, String)> {
    let obj: Value = server.object("weir.dev", "archivepolicies", ns, name)?;
    let c = obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?
        .clone();
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
        c["message"].as_str().unwrap_or("").to_string(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_destinations_must_be_mounted_volumes() {
    let server = TestApiServer::start().await;
    let ns = unique("vol");
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    // tempdir() is under /tmp, on this machine's root filesystem (as a container's would be).
    let unmounted = dir.path().join("plain/archive");
    let mount = BindMount::new(&dir.path().join("disk"), &dir.path().join("mnt"));
    let mounted = dir.path().join("mnt/archive");

    server.apply_crds().await;
    let manifests = namespace_with_secrets(&ns, &db)
        + &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: orders, namespace: {ns}}}\n\
         spec: {{broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}, store: {{urlSecretRef: {{name: pg, key: url}}}}}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: EventStream\nmetadata: {{name: payments, namespace: {ns}}}\n\
         spec: {{broker: {{urlSecretRef: {{name: rabbitmq, key: url}}}}, store: {{urlSecretRef: {{name: pg, key: url}}}}}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: ArchivePolicy\nmetadata: {{name: ephemeral, namespace: {ns}}}\n\
         spec: {{streamNames: [orders], destination: {{volume: {{path: \"{}\"}}}}}}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: ArchivePolicy\nmetadata: {{name: durable, namespace: {ns}}}\n\
         spec: {{streamNames: [payments], destination: {{volume: {{path: \"{}\"}}}}}}\n",
            unmounted.display(),
            mounted.display()
        );
    server.apply(&manifests).await;
    let op = Operator::start(server.kubeconfig(), "op", &unique("weir-"), &[]);

    let (status, reason, message) = common::eventually(
        30,
        "the root-filesystem ArchivePolicy is refused",
        || op.log_text(),
        || async { ready(&server, &ns, "ephemeral").filter(|(s, _, _)| s == "False") },
    )
    .await;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    assert!(
        message.contains("spec.destination.volume.path")
            && message.contains(&unmounted.display().to_string())
            && message.contains("root filesystem")
            && message.contains("archiveVolume"),
        "{message}"
    );
    // Refused means not archiving: nothing was created there.
    assert!(!unmounted.exists());

    if mount.is_some() {
        let (status, _, message) = common::eventually(
            30,
            "the mounted-volume ArchivePolicy is Ready",
            || op.log_text(),
            || async { ready(&server, &ns, "durable").filter(|(s, _, _)| s == "True") },
        )
        .await;
        assert_eq!(status, "True", "{message}");
    }
    drop(op);
    drop(mount);
}
