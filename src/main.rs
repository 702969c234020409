//! The `weir` binary: everything lives in the library; see `cli.rs`.

/// mimalloc instead of the system allocator: per-event allocations (parsing, row encoding,
/// relay messages) made glibc's malloc about 30 % of a worker's CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Before any TLS client exists (HTTP clients panic without a provider).
    weir::tls_provider::install_crypto_provider();
    weir::cli::main()
}
