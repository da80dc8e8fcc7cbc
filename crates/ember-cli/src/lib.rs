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
