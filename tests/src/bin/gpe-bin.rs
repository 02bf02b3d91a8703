//! The `gpe` command line (the same `main` as `cli/src/main.rs`), built inside
//! the tests package: cargo hands integration tests only the binaries of their
//! own package, and the black-box tests of `gpe serve`, `gpe check` and
//! `gpe exporter` need one that is always fresh.
use clap::Parser;

fn main() -> std::process::ExitCode {
    gpe::cli::exit_status(gpe::cli::run(gpe::cli::Cli::parse()))
}
