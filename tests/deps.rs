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
