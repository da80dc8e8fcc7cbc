//! The pretraining stage: a recipe's `[data]` becomes packed token batches, `[model]` (or a
//! checkpoint) the model, and `[train]` the loop: next-token loss, periodic validation,
//! checkpoints that resume exactly, metrics and curves.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use burn::module::Module;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use ember_data::cache::{build_or_reuse, CacheSpec, TokenCache};
use ember_data::loader::{Batch, PackedLoader};
use ember_data::{tasks, train_bpe, Source, Tokenizer};
use ember_models::hf::{self, Checkpoint};
use ember_models::qwen3::{Qwen3, Qwen3Config};
use ember_models::rng::Rng;
use serde_json::json;

use crate::checkpoint::{self, TrainState};
use crate::metrics::{flops_per_token, step_record, MetricsLog, Progress};
use crate::objectives::lm::cross_entropy;
use crate::optim::Optimizer;
use crate::recipe::{line_of, DataSection, ModelSpec, Recipe, TrainSection};
use crate::schedule::Schedule;
use crate::trainer::{scalar, Diverged, Trainer};

/// Special tokens every ember tokenizer carries; `<|endoftext|>` separates packed documents.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

pub struct TrainArgs {
    pub recipe: PathBuf,
    pub overrides: Vec<String>,
    pub device: String,
    pub resume: Option<PathBuf>,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub final_loss: f64,
    pub val_loss: Option<f64>,
    pub tokens: u64,
    pub seconds: f64,
    pub train_file: PathBuf,
}

/// Everything a recipe's `[data]` section resolves to.
pub struct PreparedData {
    pub tokenizer: Tokenizer,
    pub eos_id: u32,
    pub cache: TokenCache,
}

/// The recipe's `[data]` and `[train]`, checked.
pub fn sections(recipe: &Recipe, path: &Path) -> Result<(DataSection, TrainSection)> {
    let data = recipe
        .data
        .clone()
        .ok_or_else(|| anyhow!("{}: section [data] is missing", path.display()))?;
    let train = recipe
        .train
        .clone()
        .ok_or_else(|| anyhow!("{}: section [train] is missing", path.display()))?;
    let at = |key: &str| format!("{} [train]: `{key}`", path.display());
    if train.steps == 0 {
        bail!("{} must be at least 1", at("steps"));
    }
    if train.batch_size == 0 || train.grad_accum == 0 {
        bail!("{} and `grad_accum` must be at least 1", at("batch_size"));
    }
    if train.lr.is_nan() || train.lr <= 0.0 {
        bail!("{} must be positive", at("lr"));
    }
    if data.seq_len < 2 {
        bail!("{} [data]: `seq_len` must be at least 2", path.display());
    }
    if !(0.0..1.0).contains(&data.val_fraction) {
        bail!(
            "{} [data]: `val_fraction` must be in [0, 1)",
            path.display()
        );
    }
    Ok((data, train))
}

/// Sources, tokenizer and token cache for a recipe.
pub fn prepare_data(
    data: &DataSection,
    recipe_path: &Path,
    seed: u64,
    run_dir: &Path,
    existing_tokenizer: Option<&Path>,
) -> Result<PreparedData> {
    let mut sources = data.sources.clone();
    for (i, s) in sources.iter().enumerate() {
        s.check().map_err(|e| {
            let file = s.path().display().to_string();
            let line = line_of(recipe_path, &file)
                .map(|l| format!(":{l}"))
                .unwrap_or_default();
            anyhow!(
                "{}{line}: data.sources[{i}].path: {e:#}",
                recipe_path.display()
            )
        })?;
    }
    if let Some(g) = &data.generated {
        let task = tasks::task(&g.task)
            .map_err(|e| anyhow!("{} [data.generated]: {e:#}", recipe_path.display()))?;
        let dir = run_dir.join("data");
        fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let file = dir.join(format!("generated-{}.jsonl", g.task));
        let mut body = String::new();
        for doc in tasks::documents(task.as_ref(), seed, g.count, &g.levels) {
            body.push_str(&json!({ "text": doc }).to_string());
            body.push('\n');
        }
        // Rewriting identical bytes would change the mtime and invalidate the token cache.
        if fs::read(&file).ok().as_deref() != Some(body.as_bytes()) {
            hf::write_atomic(&file, body.as_bytes())?;
        }
        sources.push(Source::Jsonl {
            path: file,
            field: "text".into(),
        });
    }
    if sources.is_empty() {
        bail!(
            "{} [data]: no `sources` and no `generated` data",
            recipe_path.display()
        );
    }
    let tokenizer = match (existing_tokenizer, data.bpe_vocab_size) {
        (Some(t), _) => Tokenizer::from_file(t)?,
        (None, Some(n)) => {
            eprintln!("training a byte-level BPE tokenizer with {n} tokens");
            train_bpe(&sources, n, &SPECIALS, 2)
                .map_err(|e| anyhow!("{} [data] bpe_vocab_size: {e:#}", recipe_path.display()))?
        }
        (None, None) if data.tokenizer == "byte_level" => Tokenizer::byte_level(&SPECIALS)?,
        (None, None) => {
            let p = PathBuf::from(&data.tokenizer);
            Tokenizer::from_file(&p).map_err(|e| {
                let line = line_of(recipe_path, &data.tokenizer)
                    .map(|l| format!(":{l}"))
                    .unwrap_or_default();
                anyhow!("{}{line}: data.tokenizer: {e:#}", recipe_path.display())
            })?
        }
    };
    let eos_id = tokenizer.token_id(SPECIALS[0]).ok_or_else(|| {
        anyhow!(
            "{} [data]: the tokenizer has no `{}` token to separate documents",
            recipe_path.display(),
            SPECIALS[0]
        )
    })?;
    let spec = CacheSpec {
        sources: &sources,
        tokenizer: &tokenizer,
        eos_id,
        val_fraction: data.val_fraction,
        seed,
    };
    let cache = build_or_reuse(&spec, &run_dir.join("data").join("tokens"), true)?;
    Ok(PreparedData {
        tokenizer,
        eos_id,
        cache,
    })
}

/// Token ids as an int tensor `[batch, seq]`.
fn ids(v: &[u32], b: usize, s: usize, device: &Device) -> Tensor<2, Int> {
    let v: Vec<i32> = v.iter().map(|&x| x as i32).collect();
    Tensor::from_data(TensorData::new(v, [b, s]), device)
}

/// The mean next-token loss of a packed batch, weighted per target when the batch says so
/// (SFT's assistant-only mask).
pub fn batch_loss(model: &Qwen3, batch: &Batch, device: &Device) -> Tensor<1> {
    let (b, s) = (batch.batch, batch.seq_len);
    let logits = model.forward_packed(
        ids(&batch.inputs, b, s, device),
        ids(&batch.positions, b, s, device),
        batch.segments.as_ref().map(|g| ids(g, b, s, device)),
    );
    let weights = batch
        .weights
        .as_ref()
        .map(|w| Tensor::from_data(TensorData::new(w.clone(), [b, s]), device));
    cross_entropy(logits, ids(&batch.targets, b, s, device), weights)
}

/// Mean loss over fixed validation batches, without building a graph.
pub fn eval_loss(model: &Qwen3, batches: &[Batch], device: &Device) -> Result<f64> {
    let model = model.valid();
    let mut total = 0.0;
    for b in batches {
        total += scalar(batch_loss(&model, b, device))?;
    }
    Ok(total / batches.len().max(1) as f64)
}

pub fn parse_dtype(name: &str, device: &Device, origin: &str) -> Result<DType> {
    let d = match name {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => bail!("{origin}: unknown dtype `{other}` (expected f32, bf16 or f16)"),
    };
    if !device.supports_dtype(d) {
        bail!("{origin}: dtype {name} is not supported on {device:?}");
    }
    Ok(d)
}

/// Builds or loads the model: a checkpoint when resuming or `init_from` is set (checked
/// against the recipe's `[model]` when it has one), otherwise random from `[model]`.
fn build_model(
    recipe: &Recipe,
    path: &Path,
    from: Option<&Path>,
    device: &Device,
) -> Result<Qwen3> {
    let spec = recipe
        .model
        .as_ref()
        .map(|_| recipe.model_spec(path))
        .transpose()?;
    match (from, spec) {
        (Some(dir), Some(ModelSpec::Qwen3(config))) => {
            let mut ckpt = Checkpoint::open(dir)?;
            let m = Qwen3::load(config, &mut ckpt, device).map_err(|e| {
                anyhow!(
                    "{e:#} (checkpoint {} does not match {} [model])",
                    dir.display(),
                    path.display()
                )
            })?;
            ckpt.finish(&["lm_head.weight"])?;
            Ok(m)
        }
        (Some(dir), None) => Qwen3::from_pretrained(dir, device),
        (None, Some(ModelSpec::Qwen3(config))) => Qwen3::random(config, recipe.run.seed, device),
        (None, None) => bail!(
            "{}: needs a [model] section or train.init_from",
            path.display()
        ),
    }
}

fn check_vocab(config: &Qwen3Config, tok: &Tokenizer, path: &Path) -> Result<()> {
    if tok.vocab_size() > config.vocab_size {
        bail!(
            "{} [model]: vocab_size {} is smaller than the tokenizer's {} tokens",
            path.display(),
            config.vocab_size,
            tok.vocab_size()
        );
    }
    Ok(())
}

fn default_peak_tflops(device: &Device, dtype: DType) -> Option<f64> {
    // H100 SXM dense bf16; other devices need train.peak_tflops.
    let name = format!("{device:?}").to_lowercase();
    (name.contains("cuda") && dtype == DType::BF16).then_some(989.0)
}

/// `ember train`: the recipe's single training stage, written to `runs/<name>/`.
pub fn train(args: &TrainArgs) -> Result<Summary> {
    let path = &args.recipe;
    let recipe = Recipe::load_with(path, &args.overrides)?;
    let (data, train) = sections(&recipe, path)?;
    run_stage(&StageRun {
        recipe: &recipe,
        path,
        data,
        train,
        run_dir: recipe.run_dir(),
        title: recipe.run.name.clone(),
        device: args.device.clone(),
        resume: args.resume.clone(),
    })
}

/// One training stage: the recipe it belongs to (for `[model]`, the seed and error
/// messages), its own data and trainer settings, and the directory it writes.
pub struct StageRun<'a> {
    pub recipe: &'a Recipe,
    pub path: &'a Path,
    pub data: DataSection,
    pub train: TrainSection,
    pub run_dir: PathBuf,
    pub title: String,
    pub device: String,
    pub resume: Option<PathBuf>,
}

pub fn run_stage(stage: &StageRun) -> Result<Summary> {
    let (recipe, path) = (stage.recipe, stage.path);
    let (data, tcfg) = (&stage.data, &stage.train);
    let run_dir = stage.run_dir.clone();
    let resume_ckpt = stage
        .resume
        .as_deref()
        .map(checkpoint::resolve)
        .transpose()?;
    if resume_ckpt.is_none() && run_dir.join("checkpoints").exists() {
        bail!(
            "{}: holds an earlier run; continue it with --resume {0}, or choose another run.name",
            run_dir.display()
        );
    }
    let base = ember_models::device::select(&stage.device)?;
    let dtype = parse_dtype(
        &tcfg.dtype,
        &base,
        &format!("{} [train] dtype", path.display()),
    )?;
    let mut train_dev = base.clone().autodiff();
    if tcfg.grad_checkpointing {
        train_dev = train_dev.gradient_checkpointing();
    }
    let init_dir = resume_ckpt.clone().or_else(|| tcfg.init_from.clone());
    // The model first: a checkpoint that does not fit fails before any data work.
    let mut model =
        build_model(recipe, path, init_dir.as_deref(), &train_dev)?.with_compute_dtype(dtype);
    let tok_from = init_dir
        .as_ref()
        .map(|d| d.join("tokenizer.json"))
        .filter(|p| p.is_file());
    let prepared = prepare_data(data, path, recipe.run.seed, &run_dir, tok_from.as_deref())?;
    check_vocab(&model.config, &prepared.tokenizer, path)?;
    model.config.eos_token_id = Some(prepared.eos_id.into());

    let mut loader = PackedLoader::open(
        &prepared.cache.train_file(),
        data.seq_len,
        tcfg.batch_size,
        recipe.run.seed,
        data.shuffle,
        data.doc_masks,
        prepared.eos_id,
    )?;
    let val_batches = match PackedLoader::open(
        &prepared.cache.val_file(),
        data.seq_len,
        tcfg.batch_size,
        recipe.run.seed,
        false,
        data.doc_masks,
        prepared.eos_id,
    ) {
        Ok(v) => v.eval_batches(tcfg.eval_batches)?,
        Err(e) => {
            if data.val_fraction > 0.0 {
                eprintln!("note: no validation: {e:#}");
            }
            Vec::new()
        }
    };

    let schedule = Schedule {
        kind: tcfg.schedule,
        lr: tcfg.lr,
        warmup_steps: tcfg.warmup_steps,
        total_steps: tcfg.steps,
        min_lr_ratio: tcfg.min_lr_ratio,
        decay_fraction: tcfg.decay_fraction,
    };
    let mut optimizer = Optimizer::new(tcfg.optim());
    let mut rng = Rng::new(recipe.run.seed);
    let mut tokens_seen = 0u64;
    let mut elapsed_before = 0.0;
    let mut start_step = 0;
    if let Some(ckpt) = &resume_ckpt {
        let st = checkpoint::read_state(ckpt)?;
        optimizer.load(&checkpoint::optimizer_file(ckpt), &model, &base)?;
        optimizer.steps = st.optimizer_steps;
        loader.set_cursor(st.cursor)?;
        rng = Rng::from_state(st.rng);
        tokens_seen = st.tokens_seen;
        elapsed_before = st.elapsed_s;
        start_step = st.step;
        eprintln!("resuming from {} at step {}", ckpt.display(), st.step);
    }
    let mut trainer = Trainer::new(model, optimizer, schedule, tcfg.clip_grad_norm);
    trainer.step = start_step;

    let seq = data.seq_len;
    let tokens_per_step = (tcfg.batch_size * seq * tcfg.grad_accum) as u64;
    let flops = flops_per_token(&trainer.model().config, seq);
    let peak = tcfg
        .peak_tflops
        .or_else(|| default_peak_tflops(&base, dtype));
    eprintln!(
        "run {}: {:.2}M parameters, {} train tokens ({} val), {} steps × {} tokens, on {base:?} ({:?})",
        run_dir.display(),
        trainer.model().config.num_params() as f64 / 1e6,
        prepared.cache.train_tokens,
        prepared.cache.val_tokens,
        tcfg.steps,
        tokens_per_step,
        dtype
    );
    let mut metrics = MetricsLog::open(&run_dir, Some(start_step))?;
    let progress = Progress::new(start_step, tcfg.steps);
    let t_run = Instant::now();
    let mut t_window = Instant::now();
    let mut tokens_window = 0u64;
    let mut last_loss = f64::NAN;
    let mut last_val = None;
    let mut last_ckpt: Option<PathBuf> = resume_ckpt.clone();
    let save =
        |trainer: &Trainer<Qwen3>, loader: &PackedLoader, rng: &Rng, tokens: u64, secs: f64| {
            let state = TrainState {
                step: trainer.step,
                optimizer_steps: trainer.optimizer.steps,
                cursor: loader.cursor(),
                rng: rng.state(),
                tokens_seen: tokens,
                elapsed_s: secs,
            };
            checkpoint::save(
                &run_dir,
                trainer.model(),
                &prepared.tokenizer,
                &trainer.optimizer,
                &state,
                tcfg.keep_last,
            )
        };

    while trainer.step < tcfg.steps {
        let batches = (0..tcfg.grad_accum)
            .map(|_| loader.next_batch())
            .collect::<Result<Vec<_>>>()?;
        let result = trainer.train_step(tcfg.grad_accum, |m, i| {
            Ok(batch_loss(m, &batches[i], &train_dev))
        });
        let stats = match result {
            Ok(s) => s,
            Err(e) if e.downcast_ref::<Diverged>().is_some() => {
                progress.finish();
                let keep = match &last_ckpt {
                    Some(c) => format!("the last good checkpoint is {}", c.display()),
                    None => "no checkpoint was written before it".into(),
                };
                return Err(e.context(format!("training diverged; stopping ({keep})")));
            }
            Err(e) => return Err(e),
        };
        let step = trainer.step;
        checkpoint::fault("abort-after-step", step);
        tokens_seen += tokens_per_step;
        tokens_window += tokens_per_step;
        last_loss = stats.loss;
        let log_now = step % tcfg.log_every.max(1) == 0 || step == tcfg.steps;
        let secs = t_window.elapsed().as_secs_f64();
        let tps = tokens_window as f64 / secs.max(1e-9);
        let mfu = peak.map(|p| tps * flops / (p * 1e12));
        if log_now {
            t_window = Instant::now();
            tokens_window = 0;
        }
        let mut record = step_record(
            step,
            stats.loss,
            stats.lr,
            stats.grad_norm,
            tps,
            mfu,
            tokens_seen,
        );
        let eval_now = !val_batches.is_empty()
            && ((tcfg.eval_every > 0 && step % tcfg.eval_every == 0) || step == tcfg.steps);
        if eval_now {
            let v = eval_loss(trainer.model(), &val_batches, &base)?;
            record["val_loss"] = json!(v);
            record["val_ppl"] = json!(v.exp());
            last_val = Some(v);
            progress.println(format!("step {step}: val loss {v:.4} (ppl {:.2})", v.exp()));
        }
        metrics.write(record)?;
        let mfu_s = mfu
            .map(|m| format!(" mfu {:.1}%", 100.0 * m))
            .unwrap_or_default();
        progress.update(
            step,
            format!(
                "loss {:.4} lr {:.2e} gnorm {:.2} {:.0} tok/s{mfu_s}",
                stats.loss, stats.lr, stats.grad_norm, tps
            ),
            log_now,
        );
        let save_now = (tcfg.save_every > 0 && step % tcfg.save_every == 0) || step == tcfg.steps;
        if save_now {
            let secs = elapsed_before + t_run.elapsed().as_secs_f64();
            last_ckpt = Some(save(&trainer, &loader, &rng, tokens_seen, secs)?);
        }
    }
    progress.finish();
    let ckpt = match &last_ckpt {
        Some(c) => c.clone(),
        None => save(&trainer, &loader, &rng, tokens_seen, elapsed_before)?,
    };
    checkpoint::publish(&run_dir, &ckpt)?;
    let curves = metrics.draw(&run_dir, &format!("{} — loss", stage.title))?;
    let seconds = t_run.elapsed().as_secs_f64();
    eprintln!(
        "done: {} steps, final train loss {last_loss:.4}{}, {} tokens in {seconds:.1} s; model in {}, curves in {}",
        trainer.step,
        last_val.map(|v| format!(", val loss {v:.4} (ppl {:.2})", v.exp())).unwrap_or_default(),
        tokens_seen,
        run_dir.display(),
        curves.display()
    );
    Ok(Summary {
        run_dir,
        steps: trainer.step,
        final_loss: last_loss,
        val_loss: last_val,
        tokens: tokens_seen,
        seconds,
        train_file: prepared.cache.train_file(),
    })
}

/// The entropy (nats) of the unigram distribution of a token file: the loss of the best
/// model that ignores context, which a trained LM must beat.
pub fn unigram_entropy(file: &Path) -> Result<f64> {
    use std::io::{BufReader, Read};
    let f = fs::File::open(file).with_context(|| format!("{}: cannot open", file.display()))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut counts: std::collections::HashMap<u32, u64> = Default::default();
    let mut total = 0u64;
    let mut word = [0u8; 4];
    while r.read_exact(&mut word).is_ok() {
        *counts.entry(u32::from_le_bytes(word)).or_default() += 1;
        total += 1;
    }
    Ok(counts
        .values()
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum())
}
