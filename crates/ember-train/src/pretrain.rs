//! The pretraining stage: a recipe's `[data]` becomes packed token batches, `[model]` (or a
//! checkpoint) the model, and `[train]` the loop: next-token loss, periodic validation,
//! checkpoints that resume exactly, metrics and curves.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use ember_data::cache::{build_or_reuse, CacheSpec, TokenCache};
use ember_data::loader::{Batch, PackedLoader};
use ember_data::{tasks, train_bpe, Source, Tokenizer};
use ember_models::hf;
use serde_json::json;

use crate::objectives::linear_ce::{chunk_rows, linear_cross_entropy};
use crate::recipe::{
    line_of, DataSection, GeneratedData, PromptFormat, Recipe, TrainObjective, TrainSection,
};
use crate::rlp::Rlp;
use crate::stages::{
    check_common, evaluators, run_loop, run_stage, CursorFeed, LoopSpec, Objective, Setup,
    StageModel, StageRun, Summary, Supervised,
};
use crate::trainer::{scalar, NextTokenModel};

/// Special tokens every ember tokenizer carries; `<|endoftext|>` separates packed documents.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

pub struct TrainArgs {
    pub recipe: PathBuf,
    pub overrides: Vec<String>,
    pub device: String,
    pub resume: Option<PathBuf>,
}

/// Everything a recipe's `[data]` section resolves to.
pub struct PreparedData {
    pub tokenizer: Tokenizer,
    pub eos_id: u32,
    pub cache: TokenCache,
}

/// The data's sources, checked, with generated documents (if any) written to
/// `data_dir/generated-<stem>.jsonl` and appended as one more source. `tag` names the
/// recipe table in errors.
pub fn resolve_sources(
    sources: &[Source],
    generated: Option<&GeneratedData>,
    recipe_path: &Path,
    seed: u64,
    data_dir: &Path,
    tag: &str,
    stem: &str,
) -> Result<Vec<Source>> {
    let mut sources = sources.to_vec();
    for (i, s) in sources.iter().enumerate() {
        s.check().map_err(|e| {
            let file = s.path().display().to_string();
            let line = line_of(recipe_path, &file)
                .map(|l| format!(":{l}"))
                .unwrap_or_default();
            anyhow!(
                "{}{line}: {tag}.sources[{i}].path: {e:#}",
                recipe_path.display()
            )
        })?;
    }
    if let Some(g) = generated {
        let task = tasks::task(&g.task)
            .map_err(|e| anyhow!("{} [{tag}.generated]: {e:#}", recipe_path.display()))?;
        let file = data_dir.join(format!("generated-{stem}.jsonl"));
        let body: String = tasks::documents(task.as_ref(), seed, g.count, &g.levels, &g.formats)
            .map(|doc| json!({ "text": doc }).to_string() + "\n")
            .collect();
        write_if_changed(&file, body.as_bytes())?;
        sources.push(Source::Jsonl {
            path: file,
            field: "text".into(),
        });
    }
    if sources.is_empty() {
        bail!(
            "{} [{tag}]: no `sources` and no `generated` data",
            recipe_path.display()
        );
    }
    Ok(sources)
}

/// Writes `bytes` unless the file already holds them: rewriting identical bytes would change
/// the mtime and invalidate the token cache.
pub fn write_if_changed(file: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    if fs::read(file).ok().as_deref() != Some(bytes) {
        hf::write_atomic(file, bytes)?;
    }
    Ok(())
}

/// The stage's tokenizer: the checkpoint's own when it has one, else a BPE trained on
/// `sources`, the byte-level tokenizer or an HF `tokenizer.json`; with its `<|endoftext|>` id.
/// A tokenizer built here gets `extra` special tokens after [`SPECIALS`] (MLM's mask).
pub fn resolve_tokenizer(
    data: &DataSection,
    sources: &[Source],
    recipe_path: &Path,
    existing: Option<&Path>,
    extra: &[&str],
) -> Result<(Tokenizer, u32)> {
    let specials: Vec<&str> = SPECIALS
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect();
    let tokenizer = match (existing, data.bpe_vocab_size) {
        (Some(t), _) => Tokenizer::from_file(t)?,
        (None, Some(n)) => {
            eprintln!("training a byte-level BPE tokenizer with {n} tokens");
            train_bpe(sources, n, &specials, 2)
                .map_err(|e| anyhow!("{} [data] bpe_vocab_size: {e:#}", recipe_path.display()))?
        }
        (None, None) if data.tokenizer == "byte_level" => Tokenizer::byte_level(&specials)?,
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
    Ok((tokenizer, eos_id))
}

/// Sources, tokenizer and token cache for a recipe's `[data]`.
pub fn prepare_data(
    data: &DataSection,
    recipe_path: &Path,
    seed: u64,
    run_dir: &Path,
    existing_tokenizer: Option<&Path>,
    extra_specials: &[&str],
) -> Result<PreparedData> {
    let data_dir = run_dir.join("data");
    let sources = resolve_sources(
        &data.sources,
        data.generated.as_ref(),
        recipe_path,
        seed,
        &data_dir,
        "data",
        data.generated.as_ref().map_or("", |g| g.task.as_str()),
    )?;
    let (tokenizer, eos_id) = resolve_tokenizer(
        data,
        &sources,
        recipe_path,
        existing_tokenizer,
        extra_specials,
    )?;
    let spec = CacheSpec {
        sources: &sources,
        tokenizer: &tokenizer,
        eos_id,
        val_fraction: data.val_fraction,
        seed,
    };
    let cache = build_or_reuse(&spec, &data_dir.join("tokens"), true)?;
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

/// A packed batch's tensors on the device.
#[derive(Clone, Debug)]
pub struct DeviceBatch {
    pub inputs: Tensor<2, Int>,
    pub targets: Tensor<2, Int>,
    pub positions: Tensor<2, Int>,
    pub segments: Option<Tensor<2, Int>>,
    /// `[batch · seq]` per-target loss weights.
    pub weights: Option<Tensor<1>>,
}

impl DeviceBatch {
    pub fn new(batch: &Batch, device: &Device) -> Self {
        let (b, s) = (batch.batch, batch.seq_len);
        Self {
            inputs: ids(&batch.inputs, b, s, device),
            targets: ids(&batch.targets, b, s, device),
            positions: ids(&batch.positions, b, s, device),
            segments: batch.segments.as_ref().map(|g| ids(g, b, s, device)),
            weights: batch
                .weights
                .as_ref()
                .map(|w| Tensor::from_data(TensorData::new(w.clone(), [b * s]), device)),
        }
    }
}

/// The mean next-token loss of a packed batch, weighted per target when the batch says so
/// (SFT's assistant-only mask).
pub fn batch_loss<M: NextTokenModel>(model: &M, batch: &Batch, device: &Device) -> Tensor<1> {
    device_batch_loss(model, &DeviceBatch::new(batch, device))
}

/// [`batch_loss`] of a batch already on the device.
pub fn device_batch_loss<M: NextTokenModel>(model: &M, batch: &DeviceBatch) -> Tensor<1> {
    let [b, s] = batch.inputs.dims();
    let hidden = model.packed_hidden(
        batch.inputs.clone(),
        batch.positions.clone(),
        batch.segments.clone(),
    );
    let dim = hidden.dims()[2];
    let head = model.head_weight();
    let rows = chunk_rows(head.dims()[0], &head.device());
    let targets = batch.targets.clone().reshape([b * s]);
    linear_cross_entropy(
        hidden.reshape([b * s, dim]),
        head,
        targets,
        batch.weights.clone(),
        rows,
    )
}

/// Mean loss over fixed validation batches, without building a graph.
pub fn eval_loss<M: NextTokenModel>(model: &M, batches: &[Batch], device: &Device) -> Result<f64> {
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

/// `ember train`: the recipe's single stage, written to `runs/<name>/`.
pub fn train(args: &TrainArgs) -> Result<Summary> {
    let path = &args.recipe;
    let recipe = Recipe::load_with(path, &args.overrides)?;
    let stage = recipe.single_stage(path)?;
    run_stage(&StageRun {
        recipe: &recipe,
        path,
        stage,
        run_dir: recipe.run_dir(),
        title: recipe.run.name.clone(),
        device: args.device.clone(),
        resume: args.resume.clone(),
    })
}

/// The fixed validation batches of a token file (none, with a note, when it is too small).
pub fn val_batches(
    file: &Path,
    data: &DataSection,
    t: &TrainSection,
    seed: u64,
    eos: u32,
) -> Vec<Batch> {
    let opened = PackedLoader::open(
        file,
        data.seq_len,
        t.batch_size,
        seed,
        false,
        data.doc_masks,
        eos,
    );
    match opened.and_then(|v| v.eval_batches(t.eval_batches)) {
        Ok(v) => v,
        Err(e) => {
            if data.val_fraction > 0.0 {
                eprintln!("note: no validation: {e:#}");
            }
            Vec::new()
        }
    }
}

/// The training loader over prepared data's packed windows, and its fixed validation
/// batches.
pub fn packed_data(
    prepared: &PreparedData,
    data: &DataSection,
    tcfg: &TrainSection,
    seed: u64,
) -> Result<(PackedLoader, Vec<Batch>)> {
    let loader = PackedLoader::open(
        &prepared.cache.train_file(),
        data.seq_len,
        tcfg.batch_size,
        seed,
        data.shuffle,
        data.doc_masks,
        prepared.eos_id,
    )?;
    let val = val_batches(
        &prepared.cache.val_file(),
        data,
        tcfg,
        seed,
        prepared.eos_id,
    );
    Ok((loader, val))
}

/// One unnamed validation set of `val`, or none when it is empty.
pub fn val_sets(val: Vec<Batch>) -> Vec<(String, Vec<Batch>)> {
    if val.is_empty() {
        vec![]
    } else {
        vec![(String::new(), val)]
    }
}

/// A pretraining stage: packed documents, next-token loss or RLP's reward, on a model of
/// family `M` (Qwen3 or a hybrid); `objective = "mlm"` trains an encoder instead.
pub fn run<M: StageModel>(s: &StageRun) -> Result<Summary> {
    let (recipe, path) = (s.recipe, s.path);
    check_common(&s.stage, path)?;
    let (data, tcfg) = (&s.stage.data, &s.stage.train);
    if !data.datasets.is_empty() || !data.chat.is_empty() {
        bail!(
            "{}: [data] `datasets` belong to kind = \"cpt\" and `chat` to kind = \"sft\"",
            path.display()
        );
    }
    match s.stage.objective {
        Some(TrainObjective::Rlp) => {
            crate::rlp::checked_section(s)?;
        }
        Some(TrainObjective::Mlm) => {
            // The family's own refusal first (a hybrid checkpoint is no encoder).
            M::check_stage(s)?;
            return crate::mlm::run(s);
        }
        _ => {}
    }
    let mut setup = Setup::<M>::new(s)?;
    let prepared = prepare_data(
        data,
        path,
        recipe.run.seed,
        &s.run_dir,
        setup.tokenizer_from.as_deref(),
        &[],
    )?;
    setup.adopt_tokenizer(&prepared.tokenizer, prepared.eos_id, path)?;
    let (loader, val) = packed_data(&prepared, data, tcfg, recipe.run.seed)?;
    let sets = val_sets(val);
    let mut evaluators = evaluators(s, &setup, sets, &prepared.tokenizer, PromptFormat::Text)?;
    let data_line = format!(
        "{} train tokens ({} val){}",
        prepared.cache.train_tokens,
        prepared.cache.val_tokens,
        setup
            .model
            .describe()
            .map(|d| format!(", {d}"))
            .unwrap_or_default()
    );
    let mut feed = CursorFeed(loader);
    let mut objective: Box<dyn Objective<M>> = match s.stage.objective {
        Some(TrainObjective::Rlp) => Box::new(Rlp::new(
            &mut feed,
            s,
            &setup,
            &prepared.tokenizer,
            prepared.eos_id,
        )?),
        _ => Box::new(Supervised::new(&mut feed, s, &setup.train_dev)),
    };
    run_loop(
        setup,
        LoopSpec {
            train_file: Some(prepared.cache.train_file()),
            ..LoopSpec::single(s, &prepared.tokenizer, data_line)
        },
        objective.as_mut(),
        &mut evaluators,
    )
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
