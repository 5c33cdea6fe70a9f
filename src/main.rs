//! The `cxone-offboard` binary: parse the command line, run the command, map the exit code.

use std::process::ExitCode;

use clap::Parser;
use cxone_offboard::cli::{self, Cli};

/// Caps glibc's malloc arenas at two. With thousands of sagas spread over the runtime's
/// threads, the default (eight per core) held about twice the memory in use: peak RSS in the
/// layoff benchmark was 239 MiB with the default and 109–149 MiB with two arenas (BENCHMARKS.md).
/// An explicit `MALLOC_ARENA_MAX` in the environment wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: runs first in `main`, before any other thread exists; `mallopt` only sets an
        // allocator tunable and has no memory-safety preconditions.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(cli::EXIT_FAILURE);
        }
    };
    runtime.block_on(cli::run(cli))
}
