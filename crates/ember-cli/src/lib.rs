//! The `ember` command line. Each subcommand lives in its own module; `main` turns every
//! error into one line on stderr and a non-zero exit.

mod bench;
mod bench_encoder;
mod bench_gemm;
mod bench_rl;
mod bench_train;
mod eval;
mod forward;
mod generate;
mod models;
mod pipeline;
mod quickstart;
mod tokenizer;
mod train;

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
    /// The quickstart: pretrain a tiny Qwen3 on generated arithmetic (CPU, no downloads),
    /// then generate from the trained checkpoint.
    Quickstart(quickstart::Args),
    /// Run a recipe's training stage.
    Train(train::Args),
    /// Run a recipe's [[stage]]s in order, each from the previous one's output.
    Pipeline(pipeline::Args),
    /// Evaluate a model (held-out LM loss and perplexity).
    Eval(eval::Args),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(tokenizer::Command),
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
    // cubecl and burn report trouble (a kernel cache that cannot be written, a failed
    // autotune) only through `log`, and without a logger it vanishes. RUST_LOG overrides.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("cubecl=warn,cubek=warn,burn=warn"),
    )
    .format_timestamp(None)
    .init();
    let cli = Cli::parse();
    ember_models::device::configure_kernel_cache();
    let result = match cli.command {
        Command::Quickstart(a) => quickstart::run(a),
        Command::Train(a) => train::run(a),
        Command::Pipeline(a) => pipeline::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Tokenizer(c) => tokenizer::run(c),
        Command::Generate(a) => generate::run(a),
        Command::Forward(a) => forward::run(a),
        Command::Bench(c) => bench::run(c),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            // 1: the run itself failed (it diverged); 2: the input was wrong (recipe, data,
            // checkpoint, flags), as with clap's usage errors.
            if e.downcast_ref::<ember_train::trainer::Diverged>().is_some() {
                1
            } else {
                2
            }
        }
    }
}
