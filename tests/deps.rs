//! One TLS stack: rustls on ring. OpenSSL (`openssl-sys`, `native-tls`) and aws-lc-rs must not
//! come back into the dependency tree (for any target), e.g. through a crate's default
//! features. Reads the committed lock file only (`--locked --offline`: no network).

use std::process::Command;

#[test]
fn no_openssl_native_tls_or_aws_lc_in_the_tree() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for krate in ["openssl-sys", "native-tls", "aws-lc-rs", "aws-lc-sys"] {
        let out = Command::new(&cargo)
            .args([
                "tree",
                "--locked",
                "--offline",
                "--target",
                "all",
                "-e",
                "all",
                "-i",
                krate,
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo tree");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // cargo tree fails with this message for a crate that is not in the tree at all; any
        // other failure (a lock file out of date...) must not pass for an empty tree.
        assert!(
            !out.status.success() && stdout.trim().is_empty(),
            "{krate} is in the dependency tree:\n{stdout}"
        );
        assert!(
            stderr.contains("did not match any packages"),
            "cargo tree -i {krate} failed for another reason:\n{stderr}"
        );
    }
}

/// sqlx-core sets `TCP_NODELAY` on its PostgreSQL sockets from 0.9.1 on. Before, against a
/// server with `ssl = on` (Debian's default) and the default `sslmode=prefer`, a statement
/// written as several TLS records waited for PostgreSQL's delayed ACK (40 ms) before its last
/// record left: one-event publishes fell from about 4,900 to 750 events/s, and every store
/// round trip could take 40 ms (found by `weir bench ingest`). An older sqlx-core must not come
/// back with a lock file update.
#[test]
fn sqlx_core_sets_tcp_nodelay() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock"))
        .expect("read Cargo.lock");
    let versions: Vec<Vec<u64>> = lock
        .split("[[package]]")
        .filter(|p| p.contains("\nname = \"sqlx-core\"\n"))
        .filter_map(|p| {
            let v = p.lines().find_map(|l| l.strip_prefix("version = "))?;
            Some(
                v.trim_matches('"')
                    .split(['.', '-'])
                    .map_while(|n| n.parse().ok())
                    .collect(),
            )
        })
        .collect();
    assert!(!versions.is_empty(), "sqlx-core is not in Cargo.lock");
    for v in versions {
        assert!(
            v >= vec![0, 9, 1],
            "sqlx-core {v:?} does not set TCP_NODELAY"
        );
    }
}
