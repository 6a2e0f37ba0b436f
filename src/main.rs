//! The `tokenvault` binary: parses the command line and hands over to the library.

#![forbid(unsafe_code)]

/// jemalloc serves every allocation of the process, C's included (see
/// Cargo.toml for why not glibc's malloc).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    tokenvault::cli::main()
}
