//! The `gpe` binary: parse, run, turn the outcome into an exit status.
use clap::Parser;

fn main() -> std::process::ExitCode {
    gpe::cli::exit_status(gpe::cli::run(gpe::cli::Cli::parse()))
}
