//! `ember generate`: text in, streamed text out.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use ember_data::{StreamDecoder, Tokenizer};
use ember_models::decode_graph::{generate_graph, graph_on, GraphDecode};
use ember_models::generate::{generate, FinishReason, GenerateOptions, Hooks, Sampling, Sequence};

use crate::models::{self, AnyModel, RunFlags};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json + safetensors, and tokenizer.json unless --tokenizer).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text; repeat for a batch.
    #[arg(long)]
    prompt: Vec<String>,
    /// Prompt as comma-separated token ids; repeat for a batch.
    #[arg(long)]
    prompt_ids: Vec<String>,
    /// tokenizer.json to use instead of the model directory's.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// 0 = no top-k cut.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop a row when its text contains this string; repeatable.
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object per prompt (ids, log-probs, finish reason, text) instead of text.
    #[arg(long)]
    json: bool,
    /// Decode through a step captured once and replayed as a graph: one launch per token
    /// on CUDA (Qwen3 and hybrids). Already the default on CUDA unless `EMBER_DECODE=eager`.
    #[arg(long, conflicts_with = "eager")]
    graph: bool,
    /// Decode with the eager engine where the graph would be the default (CUDA).
    #[arg(long)]
    eager: bool,
    #[command(flatten)]
    run: RunFlags,
}

/// A decoding engine over a loaded model: prompts, options and hooks in, sequences out.
type Engine<'a> = dyn Fn(&[Vec<u32>], &GenerateOptions, &mut Hooks) -> Result<Vec<Sequence>> + 'a;

/// Decoding through a captured step (`graph`) or eagerly.
fn engine<M: GraphDecode>(
    m: &M,
    graph: bool,
) -> impl Fn(&[Vec<u32>], &GenerateOptions, &mut Hooks) -> Result<Vec<Sequence>> + '_ {
    move |p, o, h| match graph {
        true => Ok(generate_graph(m, p, o, h)?.0),
        false => generate(m, p, o, h),
    }
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(|t| {
            t.trim()
                .parse::<u32>()
                .map_err(|_| anyhow!("--prompt-ids: `{t}` is not a token id"))
        })
        .collect()
}

pub fn run(a: Args) -> Result<()> {
    if a.prompt.is_empty() && a.prompt_ids.is_empty() {
        bail!("give at least one --prompt or --prompt-ids");
    }
    let tok_path = a
        .tokenizer
        .clone()
        .unwrap_or_else(|| a.model.join("tokenizer.json"));
    let tok = if a.prompt.is_empty() && a.json && !tok_path.exists() {
        None
    } else {
        Some(Tokenizer::from_file(&tok_path)?)
    };
    let (model, device) = models::load_any(&a.model, &a.run)?;
    match model {
        AnyModel::Qwen3(m) => {
            let eos = m.config.eos_ids();
            let engine = engine(&*m, a.graph || (!a.eager && graph_on(&device)));
            decode(&a, &engine, m.config.vocab_size, eos, tok, &tok_path)
        }
        AnyModel::Hybrid(m) => {
            let eos = m.eos_ids();
            let engine = engine(&*m, a.graph || (!a.eager && graph_on(&device)));
            decode(&a, &engine, m.config.vocab_size, eos, tok, &tok_path)
        }
        AnyModel::ModernBert(_) => bail!(
            "{}: an encoder (modernbert) has MLM logits (ember forward) but cannot generate",
            a.model.display()
        ),
    }
}

/// Generates with `engine`: `config_eos` are the model's own end-of-text ids.
fn decode(
    a: &Args,
    engine: &Engine,
    vocab: usize,
    config_eos: Vec<u32>,
    tok: Option<Tokenizer>,
    tok_path: &Path,
) -> Result<()> {
    if let Some(t) = &tok {
        check_tokenizer(t, vocab, tok_path)?;
    }
    let mut prompts = Vec::new();
    for p in &a.prompt {
        prompts.push(
            tok.as_ref()
                .expect("tokenizer loaded for text prompts")
                .encode(p)?,
        );
    }
    for p in &a.prompt_ids {
        prompts.push(parse_ids(p)?);
    }
    let mut eos = config_eos;
    if let Some(t) = &tok {
        eos.extend(
            ["<|endoftext|>", "<|im_end|>"]
                .iter()
                .filter_map(|s| t.token_id(s)),
        );
    }
    eos.sort();
    eos.dedup();
    let opts = GenerateOptions {
        max_new_tokens: vec![a.max_new_tokens],
        pad_id: eos.first().copied().unwrap_or(0),
        eos_ids: eos,
        sampling: Sampling {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
    };

    // One prompt streams to stdout as tokens arrive; a batch prints when done.
    let stream = prompts.len() == 1 && !a.json;
    let mut streamer = tok.as_ref().map(|t| StreamDecoder::new(t, true));
    let mut stdout = std::io::stdout();
    let mut stream_err = None;
    let mut on_token = |_row: usize, id: u32| {
        if let (true, Some(s)) = (stream, streamer.as_mut()) {
            match s.push(id) {
                Ok(Some(piece)) => {
                    let _ = write!(stdout, "{piece}");
                    let _ = stdout.flush();
                }
                Ok(None) => {}
                Err(e) => stream_err = Some(e),
            }
        }
    };
    let stops = a.stop.clone();
    let tok_ref = tok.as_ref();
    let mut stop = |_row: usize, ids: &[u32]| -> bool {
        match (stops.is_empty(), tok_ref) {
            (false, Some(t)) => {
                let text = t.decode(ids, true).unwrap_or_default();
                stops.iter().any(|s| text.contains(s.as_str()))
            }
            _ => false,
        }
    };
    let t0 = Instant::now();
    let out = engine(
        &prompts,
        &opts,
        &mut Hooks {
            on_token: Some(&mut on_token),
            stop: Some(&mut stop),
        },
    )?;
    let secs = t0.elapsed().as_secs_f64();
    if let Some(e) = stream_err {
        return Err(e);
    }
    if stream {
        println!();
    }
    for (i, seq) in out.iter().enumerate() {
        let text = match &tok {
            Some(t) => Some(t.decode(&seq.tokens, true)?),
            None => None,
        };
        if a.json {
            let finish = match seq.finish {
                FinishReason::Eos => "eos",
                FinishReason::Stop => "stop",
                FinishReason::Length => "length",
            };
            let v = serde_json::json!({"prompt_ids": prompts[i], "tokens": seq.tokens,
                "logprobs": seq.logprobs, "finish": finish, "text": text});
            println!("{v}");
        } else if !stream {
            println!("[{i}] {}", text.unwrap_or_default());
        }
    }
    let n: usize = out.iter().map(|s| s.tokens.len()).sum();
    eprintln!(
        "{n} new tokens in {secs:.2} s ({:.1} tokens/s)",
        n as f64 / secs
    );
    Ok(())
}

/// A tokenizer whose ids the model cannot embed is a mismatched pair: say so up front.
fn check_tokenizer(t: &Tokenizer, mv: usize, path: &Path) -> Result<()> {
    let tv = t.vocab_size();
    if tv > mv {
        bail!(
            "{}: tokenizer has {tv} tokens but the model's config.json has vocab_size {mv}; they do not belong together",
            path.display()
        );
    }
    Ok(())
}
