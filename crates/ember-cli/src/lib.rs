//! The `ember` command line. Each subcommand lives in its own module; `main` turns every
//! error into one line on stderr and a non-zero exit.

mod bench;
mod forward;
mod generate;
mod models;
mod quickstart;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ember",
    version,
    about = "Train and post-train language models: one binary, any GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the quickstart recipe's model, save it in HF format, reload it and generate.
    Quickstart(quickstart::Args),
    /// Generate text from a model directory, streaming tokens as they are produced.
    Generate(generate::Args),
    /// Run a forward pass over token ids from JSON and write the logits as safetensors.
    Forward(forward::Args),
    /// Throughput benchmarks.
    #[command(subcommand)]
    Bench(bench::Command),
}

/// Entry point: returns the process exit code.
pub fn main() -> i32 {
    // A bug deep in a backend must still end as one line, not a backtrace, unless the
    // user asked for one.
    if std::env::var_os("RUST_BACKTRACE").is_none() {
        std::panic::set_hook(Box::new(|info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            eprintln!(
                "error: internal error{at}: {} (set RUST_BACKTRACE=1 for details)",
                msg.replace('\n', " ")
            );
        }));
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Quickstart(a) => quickstart::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Forward(a) => forward::run(a),
        Command::Bench(c) => bench::run(c),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            1
        }
    }
}
