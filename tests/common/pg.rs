//! PostgreSQL clusters of a test's own, in a temporary folder on ports of their own: the
//! server binaries and how to run them (as `postgres` when the test runs as root, since
//! `initdb` refuses to run as root).

use std::path::PathBuf;
use std::process::{Command, Output};

/// The newest installed PostgreSQL's server binaries (`WEIR_TEST_PG_BIN` overrides).
pub fn pg_bin_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("WEIR_TEST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

pub fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs PostgreSQL's programs, as `postgres` when this process is root.
#[derive(Clone)]
pub struct PgRunner {
    pub bin: PathBuf,
    pub as_postgres: bool,
    /// Working directory of every command (the postgres user must be able to enter it).
    pub cwd: PathBuf,
}

impl PgRunner {
    /// A runner working in `dir`, which is given (with everything in it) to `postgres` when
    /// the programs run as that user.
    pub fn in_dir(bin: PathBuf, as_postgres: bool, dir: &std::path::Path) -> PgRunner {
        if as_postgres {
            let st = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir)
                .status()
                .expect("chown");
            assert!(st.success(), "chown the temporary folder to postgres");
        }
        PgRunner {
            bin,
            as_postgres,
            cwd: dir.to_path_buf(),
        }
    }

    pub fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.current_dir(&self.cwd);
        cmd
    }

    /// Stops the cluster in `data` at once (`pg_ctl -m immediate`), ignoring failures: for
    /// `Drop`, where the cluster may already be gone.
    pub fn stop_now(&self, data: &std::path::Path) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }

    /// Runs `program args`, failing the test with its output if it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}
