//! The `weir` binary: everything lives in the library; see `cli.rs`.

fn main() -> std::process::ExitCode {
    weir::cli::main()
}
