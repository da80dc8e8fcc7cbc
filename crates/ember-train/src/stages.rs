//! What every training stage shares: device and model setup, the optimisation loop with
//! periodic evaluation, checkpoints that resume exactly, metrics and curves. A stage kind
//! supplies only its [`Objective`] (for the supervised kinds, pretrain, CPT and SFT, a
//! [`Feed`] of batches under next-token loss: [`Supervised`]) and its [`Evaluator`]s.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use burn::tensor::{DType, Device, Tensor};
use ember_data::loader::{Batch, Cursor, PackedLoader};
use ember_data::sft::SftLoader;
use ember_data::Tokenizer;
use ember_models::decode_graph::GraphDecode;
use ember_models::hf::Checkpoint;
use ember_models::hybrid::stack::HybridLM;
use ember_models::qwen3::Qwen3;
use ember_models::rng::Rng;
use serde_json::{json, Map, Value};

use crate::captured::LossFn;
use crate::checkpoint::{self, TrainState};
use crate::metrics::{step_record, MetricsLog, Progress};
use crate::optim::Optimizer;
use crate::pretrain::{batch_loss, device_batch_loss, parse_dtype, DeviceBatch};
use crate::recipe::{
    model_spec, ModelSpec, PromptFormat, Recipe, StageKind, StageSection, TrainObjective,
    TrainSection,
};
use crate::schedule::{LrPlan, Schedule};
use crate::trainer::{Diverged, NextTokenModel, TrainModel, Trainer};

/// What a finished stage reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub final_loss: f64,
    pub val_loss: Option<f64>,
    pub tokens: u64,
    pub seconds: f64,
    /// The token file it trained on (packed stages).
    pub train_file: Option<PathBuf>,
}

/// One stage to run: the recipe it belongs to (for `[model]`, the seed and error messages),
/// its section, and the directory it writes.
pub struct StageRun<'a> {
    pub recipe: &'a Recipe,
    pub path: &'a Path,
    pub stage: StageSection,
    pub run_dir: PathBuf,
    pub title: String,
    pub device: String,
    pub resume: Option<PathBuf>,
}

/// Runs a stage of any kind, on the model family its `[model]` or starting checkpoint names.
pub fn run_stage(s: &StageRun) -> Result<Summary> {
    if crate::hybrid_lm::is_hybrid(s)? {
        run_kind::<HybridLM>(s)
    } else {
        run_kind::<Qwen3>(s)
    }
}

fn run_kind<M: StageModel>(s: &StageRun) -> Result<Summary> {
    match s.stage.kind {
        StageKind::Pretrain => crate::pretrain::run::<M>(s),
        StageKind::Cpt => crate::cpt::run::<M>(s),
        StageKind::Sft => crate::sft::run::<M>(s),
        StageKind::Rlvr => crate::rlvr::run::<M>(s),
        StageKind::Opd => crate::opd::run::<M>(s),
    }
}

/// What a stage trains on, one optimizer step at a time.
pub trait Objective<M = Qwen3> {
    /// Gets optimizer step `step` (0-based) ready, seeing the model as it now is (RL samples
    /// from it); returns the number of micro-batches and the tokens they hold.
    fn prepare(&mut self, model: &M, step: u64) -> Result<(usize, u64)>;
    /// The loss of micro-batch `i` of the prepared step, with a graph on the model's device.
    fn loss(&mut self, model: &M, i: usize) -> Result<Tensor<1>>;
    /// Adds the step's own metrics to its record after the update; returns what the
    /// progress line should show besides loss, LR and throughput.
    fn annotate(&mut self, _record: &mut Map<String, Value>) -> String {
        String::new()
    }
    /// Where the data stands, saved in every checkpoint.
    fn state(&self) -> Value;
    /// Continues from a saved state, at the start of optimizer step `step`.
    fn restore(&mut self, state: &Value, step: u64) -> Result<()>;
    /// What one step trains on, for the start-of-run line (default: rows of `seq_len`).
    fn step_shape(&self) -> Option<String> {
        None
    }
    /// Writes what the objective keeps besides [`Objective::state`] (RLP's EMA model) into a
    /// checkpoint's `train_state/` directory.
    fn save_files(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Reads back what [`Objective::save_files`] wrote, when resuming.
    fn load_files(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Whether tokens/s measures training work, so that MFU means something (not for RL,
    /// where sampling dominates a step).
    fn counts_flops(&self) -> bool {
        true
    }
    /// The loss of a micro-batch on the device, for a captured step (`[train]
    /// captured_step`); `None` where the objective cannot have one.
    fn device_loss(&self) -> Option<Box<LossFn<M>>> {
        None
    }
    /// The prepared step's micro-batches on the device, for the loss of
    /// [`Objective::device_loss`].
    fn device_batches(&self) -> Vec<DeviceBatch> {
        Vec::new()
    }
}

/// `n` items in `parts` contiguous ranges of near-equal size (at least one, at most `n`):
/// the micro-batches of a step's sampled rows.
pub fn micro_ranges(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let k = parts.min(n).max(1);
    (0..k).map(|i| i * n / k..(i + 1) * n / k).collect()
}

/// Next-token loss on a [`Feed`]'s batches, `accum` micro-batches a step.
pub struct Supervised<'f> {
    feed: &'f mut dyn Feed,
    accum: usize,
    device: Device,
    batches: Vec<Batch>,
}

impl<'f> Supervised<'f> {
    /// `device` is the training (autodiff) device batches go to.
    pub fn new(feed: &'f mut dyn Feed, s: &StageRun, device: &Device) -> Self {
        Self {
            feed,
            accum: s.stage.train.grad_accum,
            device: device.clone(),
            batches: Vec::new(),
        }
    }
}

impl<M: NextTokenModel> Objective<M> for Supervised<'_> {
    fn prepare(&mut self, _model: &M, step: u64) -> Result<(usize, u64)> {
        self.batches = (0..self.accum)
            .map(|_| self.feed.next_batch(step))
            .collect::<Result<Vec<_>>>()?;
        let tokens = self.batches.iter().map(|b| (b.batch * b.seq_len) as u64);
        Ok((self.accum, tokens.sum()))
    }

    fn loss(&mut self, model: &M, i: usize) -> Result<Tensor<1>> {
        Ok(batch_loss(model, &self.batches[i], &self.device))
    }

    fn device_loss(&self) -> Option<Box<LossFn<M>>> {
        Some(Box::new(|m: &M, b: &DeviceBatch| device_batch_loss(m, b)))
    }

    fn device_batches(&self) -> Vec<DeviceBatch> {
        let dev = &self.device;
        self.batches
            .iter()
            .map(|b| DeviceBatch::new(b, dev))
            .collect()
    }

    fn annotate(&mut self, record: &mut Map<String, Value>) -> String {
        self.feed.annotate(record);
        String::new()
    }

    fn state(&self) -> Value {
        self.feed.state()
    }

    fn restore(&mut self, state: &Value, step: u64) -> Result<()> {
        self.feed.restore(state, step)
    }
}

/// A stage's source of training batches.
pub trait Feed {
    /// The next micro-batch for 0-based optimizer step `step`.
    fn next_batch(&mut self, step: u64) -> Result<Batch>;
    /// Where the data stands, saved in every checkpoint.
    fn state(&self) -> Value;
    /// Continues from a saved state, at the start of optimizer step `step`.
    fn restore(&mut self, state: &Value, step: u64) -> Result<()>;
    /// Adds data-side metrics (phase, per-source token counts) to a step's record.
    fn annotate(&self, _record: &mut Map<String, Value>) {}
}

/// A loader whose whole position is one [`Cursor`] (packed windows, SFT conversations).
pub trait CursorLoader {
    fn next(&mut self) -> Result<Batch>;
    fn cursor(&self) -> Cursor;
    fn set_cursor(&mut self, c: Cursor) -> Result<()>;
}

impl CursorLoader for PackedLoader {
    fn next(&mut self) -> Result<Batch> {
        self.next_batch()
    }
    fn cursor(&self) -> Cursor {
        PackedLoader::cursor(self)
    }
    fn set_cursor(&mut self, c: Cursor) -> Result<()> {
        PackedLoader::set_cursor(self, c)
    }
}

impl CursorLoader for SftLoader {
    fn next(&mut self) -> Result<Batch> {
        Ok(self.next_batch())
    }
    fn cursor(&self) -> Cursor {
        SftLoader::cursor(self)
    }
    fn set_cursor(&mut self, c: Cursor) -> Result<()> {
        SftLoader::set_cursor(self, c)
    }
}

/// The [`Feed`] of a [`CursorLoader`]: its cursor is the saved state.
pub struct CursorFeed<L>(pub L);

impl<L: CursorLoader> Feed for CursorFeed<L> {
    fn next_batch(&mut self, _step: u64) -> Result<Batch> {
        self.0.next()
    }

    fn state(&self) -> Value {
        json!(self.0.cursor())
    }

    fn restore(&mut self, state: &Value, _step: u64) -> Result<()> {
        let c: Cursor = serde_json::from_value(state.clone())
            .map_err(|e| anyhow!("cursor: {e} (a checkpoint of another stage kind?)"))?;
        self.0.set_cursor(c)
    }
}

/// Periodic evaluation; its metrics go into the step's record.
pub trait Evaluator<M = Qwen3> {
    /// Whether to evaluate after `step` optimizer steps (`step == 0`: before training).
    fn due(&self, step: u64, last: bool) -> bool;
    /// Metrics of `model` (named as they appear in `metrics.jsonl`) and one line for the log.
    fn evaluate(&mut self, model: &M, step: u64) -> Result<(Map<String, Value>, String)>;
}

/// Why a stage cannot train through a captured step, as one line naming the key: what
/// [`check_common`] cannot see before the run: the objective and the device.
fn check_captured<M: TrainModel>(
    s: &StageRun,
    objective: &dyn Objective<M>,
    device: &Device,
) -> Result<()> {
    let at = format!("{} [train]: `captured_step`", s.path.display());
    if objective.device_loss().is_none() {
        bail!(
            "{at}: the {} stage's objective has no captured step (next-token pretraining, \
             CPT and SFT have one)",
            s.stage.kind.name()
        );
    }
    if ember_models::layers::gemm::on_cublaslt(device) {
        bail!("{at}: the graph cannot record cuBLASLt's GEMMs; unset EMBER_GEMM=cublaslt");
    }
    Ok(())
}

/// Checks shared by every stage kind.
pub fn check_common(stage: &StageSection, path: &Path) -> Result<()> {
    let (data, train) = (&stage.data, &stage.train);
    let at = |key: &str| format!("{} [train]: `{key}`", path.display());
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
    // Each kind-specific section belongs to its kind, and the RL kinds need theirs.
    let sections = [
        ("an [rl] section", stage.rl.is_some(), StageKind::Rlvr),
        (
            "a [distill] section",
            stage.distill.is_some(),
            StageKind::Opd,
        ),
        ("an [rlp] section", stage.rlp.is_some(), StageKind::Pretrain),
        ("an [mlm] section", stage.mlm.is_some(), StageKind::Pretrain),
        (
            "`objective`",
            stage.objective.is_some(),
            StageKind::Pretrain,
        ),
    ];
    for (name, present, kind) in sections {
        if present && stage.kind != kind {
            bail!(
                "{}: {name} belongs to kind = \"{}\" (this stage is {})",
                path.display(),
                kind.name(),
                stage.kind.name()
            );
        }
    }
    if train.captured_step {
        let next_token = matches!(
            stage.kind,
            StageKind::Pretrain | StageKind::Cpt | StageKind::Sft
        ) && matches!(stage.objective, None | Some(TrainObjective::Ntp));
        if !next_token {
            let objective = stage
                .objective
                .map(|o| format!(" with objective = {:?}", format!("{o:?}").to_lowercase()))
                .unwrap_or_default();
            bail!(
                "{}: next-token pretraining, CPT and SFT have a captured step; not a {} stage{objective}",
                at("captured_step"),
                stage.kind.name()
            );
        }
    }
    if stage.mlm.is_some() && stage.objective != Some(TrainObjective::Mlm) {
        bail!(
            "{}: an [mlm] section needs objective = \"mlm\"",
            path.display()
        );
    }
    let needs = match stage.kind {
        StageKind::Rlvr if stage.rl.is_none() => {
            Some("an [rl] section (group_size, max_new_tokens, rewards, ...)")
        }
        StageKind::Opd if stage.distill.is_none() => {
            Some("a [distill] section (teacher, loss, ...)")
        }
        _ if stage.objective == Some(TrainObjective::Rlp) && stage.rlp.is_none() => {
            Some("an [rlp] section with objective = \"rlp\"")
        }
        _ => None,
    };
    if let Some(what) = needs {
        bail!(
            "{}: a {} stage needs {what}",
            path.display(),
            stage.kind.name()
        );
    }
    if stage.kind != StageKind::Cpt {
        if train.steps == 0 {
            bail!("{} must be at least 1", at("steps"));
        }
        if !stage.phase.is_empty() {
            bail!(
                "{}: [[phase]] entries belong to kind = \"cpt\" (this stage is {})",
                path.display(),
                stage.kind.name()
            );
        }
    }
    Ok(())
}

/// The one-schedule plan of `[train]`.
pub fn train_schedule(t: &TrainSection) -> Schedule {
    Schedule {
        kind: t.schedule,
        lr: t.lr,
        warmup_steps: t.warmup_steps,
        total_steps: t.steps,
        min_lr_ratio: t.min_lr_ratio,
        decay_fraction: t.decay_fraction,
    }
}

/// The device, the model (random, from `init_from`, or from the checkpoint being resumed)
/// and where a tokenizer shipped with that checkpoint lives.
pub struct Setup<M = Qwen3> {
    pub base: Device,
    pub train_dev: Device,
    pub dtype: DType,
    pub model: M,
    pub resume_ckpt: Option<PathBuf>,
    /// `tokenizer.json` of the checkpoint the model came from, if it has one.
    pub tokenizer_from: Option<PathBuf>,
}

/// A decoder family that the decoder stages (next-token pretraining, CPT, SFT, RLVR, and OPD
/// as student or teacher) train, sample from and evaluate by generation: Qwen3 and the
/// hybrids.
pub trait StageModel: NextTokenModel + GraphDecode + Sized {
    /// The model of stage `s` in compute dtype `dtype`: from checkpoint `from` (checked
    /// against the stage's `[model]` when it has one), else random from that `[model]`.
    fn build(s: &StageRun, from: Option<&Path>, device: &Device, dtype: DType) -> Result<Self>;
    /// A frozen model (a reference, a teacher) from checkpoint or HF directory `dir`.
    fn frozen(dir: &Path, device: &Device, dtype: DType) -> Result<Self>;
    /// Refuses, in one line naming the key, what the family cannot train on in stage `s`.
    fn check_stage(_s: &StageRun) -> Result<()> {
        Ok(())
    }
    /// Records the tokenizer's end-of-text id in the config the model saves.
    fn set_eos(&mut self, eos_id: u32);
    /// What the start-of-run line adds about the model (a hybrid's layer kinds).
    fn describe(&self) -> Option<String> {
        None
    }
}

impl StageModel for Qwen3 {
    fn build(s: &StageRun, from: Option<&Path>, device: &Device, dtype: DType) -> Result<Self> {
        let path = s.path;
        let spec = stage_model_spec(s)?;
        let objective = s.stage.objective.unwrap_or(TrainObjective::Ntp);
        check_model_fits(spec.as_ref(), s.stage.kind, objective, path)?;
        let model = match (from, spec) {
            (Some(dir), Some(ModelSpec::Qwen3(config))) => load_matching(
                dir,
                path,
                |ckpt| Qwen3::load(config, ckpt, device),
                &["lm_head.weight"],
            ),
            (Some(dir), None) => Qwen3::from_pretrained(dir, device),
            (None, Some(ModelSpec::Qwen3(config))) => {
                Qwen3::random(config, s.recipe.run.seed, device)
            }
            (_, Some(_)) => bail!(
                "{}: {}: this stage trains a qwen3 [model] only",
                path.display(),
                s.stage.name
            ),
            (None, None) => bail!(
                "{}: needs a [model] section or train.init_from",
                path.display()
            ),
        }?;
        Ok(model.with_compute_dtype(dtype))
    }

    fn frozen(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Ok(Qwen3::from_pretrained(dir, device)?.with_compute_dtype(dtype))
    }

    fn set_eos(&mut self, eos_id: u32) {
        self.config.eos_token_id = Some(eos_id.into());
    }
}

impl<M: StageModel> Setup<M> {
    pub fn new(s: &StageRun) -> Result<Self> {
        M::check_stage(s)?;
        Setup::build(s, |from, device, dtype| M::build(s, from, device, dtype))
    }

    /// Checks the tokenizer against the model and records its end-of-text id.
    pub fn adopt_tokenizer(&mut self, tok: &Tokenizer, eos_id: u32, path: &Path) -> Result<()> {
        check_vocab(self.model.vocab_size(), tok, path)?;
        self.model.set_eos(eos_id);
        Ok(())
    }
}

impl<M> Setup<M> {
    /// The device and `make(checkpoint to start from, device, dtype)`'s model: the
    /// checkpoint being resumed, else `train.init_from`, else none (a new model).
    pub fn build(
        s: &StageRun,
        make: impl FnOnce(Option<&Path>, &Device, DType) -> Result<M>,
    ) -> Result<Self> {
        let (path, tcfg) = (s.path, &s.stage.train);
        let resume_ckpt = s.resume.as_deref().map(checkpoint::resolve).transpose()?;
        if resume_ckpt.is_none() && s.run_dir.join("checkpoints").exists() {
            bail!(
                "{}: holds an earlier run; continue it with --resume {0}, or choose another run.name",
                s.run_dir.display()
            );
        }
        let base = ember_models::device::select(&s.device)?;
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
        let model = make(init_dir.as_deref(), &train_dev, dtype)?;
        let tokenizer_from = init_dir
            .map(|d| d.join("tokenizer.json"))
            .filter(|p| p.is_file());
        Ok(Self {
            base,
            train_dev,
            dtype,
            model,
            resume_ckpt,
            tokenizer_from,
        })
    }
}

/// The frozen model a stage started from (`init_from`, or `[model]` drawn with the run's
/// seed), without autodiff: the reference of a KL penalty. A resumed run rebuilds it rather
/// than taking the checkpoint it resumes.
pub fn reference_model<M: StageModel>(s: &StageRun, setup: &Setup<M>) -> Result<M> {
    if setup.resume_ckpt.is_none() {
        return Ok(setup.model.valid());
    }
    let from = s.stage.train.init_from.as_deref();
    M::build(s, from, &setup.base, setup.dtype)
}

/// A frozen model from a checkpoint or HF directory (a teacher, a reference), without
/// autodiff, in the stage's compute dtype; `what` names it in errors.
pub fn frozen_model<T: StageModel, M>(dir: &Path, setup: &Setup<M>, what: &str) -> Result<T> {
    T::frozen(dir, &setup.base, setup.dtype).map_err(|e| anyhow!("{what} {}: {e:#}", dir.display()))
}

/// Whether a model of `spec` can train in a stage of `kind` with `objective`; the error
/// names what would: encoders train with MLM, decoders without it.
pub fn check_model_fits(
    spec: Option<&ModelSpec>,
    kind: StageKind,
    objective: TrainObjective,
    path: &Path,
) -> Result<()> {
    match (spec, kind, objective) {
        (Some(ModelSpec::ModernBert(_)), _, o) if o != TrainObjective::Mlm => bail!(
            "{}: arch modernbert is an encoder; it trains with objective = \"mlm\"",
            path.display()
        ),
        (Some(ModelSpec::Qwen3(_) | ModelSpec::Hybrid(_)), _, TrainObjective::Mlm) => {
            bail!("{}: {MLM_NEEDS_ENCODER}", path.display())
        }
        _ => Ok(()),
    }
}

/// Why a decoder cannot take `objective = "mlm"`.
pub const MLM_NEEDS_ENCODER: &str = "objective = \"mlm\" needs arch = \"modernbert\"";

/// Loads checkpoint `dir` into the shape a recipe's `[model]` gives (`load`), saying which
/// two disagree when they do; every tensor must be used except `ignorable` ones.
pub fn load_matching<M>(
    dir: &Path,
    recipe: &Path,
    load: impl FnOnce(&mut Checkpoint) -> Result<M>,
    ignorable: &[&str],
) -> Result<M> {
    let mut ckpt = Checkpoint::open(dir)?;
    let m = load(&mut ckpt).map_err(|e| {
        anyhow!(
            "{e:#} (checkpoint {} does not match {} [model])",
            dir.display(),
            recipe.display()
        )
    })?;
    ckpt.finish(ignorable)?;
    Ok(m)
}

/// The stage's own `[stage.model]`, else the recipe's `[model]`, if either is given.
pub fn stage_model_spec(s: &StageRun) -> Result<Option<ModelSpec>> {
    model_spec_of(&s.stage, s.recipe, s.path)
}

/// [`stage_model_spec`] of a stage not yet running (`--dry-run`).
pub fn model_spec_of(
    stage: &StageSection,
    recipe: &Recipe,
    path: &Path,
) -> Result<Option<ModelSpec>> {
    stage
        .model
        .as_ref()
        .or(recipe.model.as_ref())
        .map(|t| model_spec(t.clone(), path))
        .transpose()
}

/// A model's vocabulary must hold every token of the tokenizer.
pub fn check_vocab(vocab_size: usize, tok: &Tokenizer, path: &Path) -> Result<()> {
    if tok.vocab_size() > vocab_size {
        bail!(
            "{} [model]: vocab_size {} is smaller than the tokenizer's {} tokens",
            path.display(),
            vocab_size,
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

/// What the loop needs besides the model, the feed and the evaluators.
pub struct LoopSpec<'a> {
    pub run: &'a StageRun<'a>,
    pub total_steps: u64,
    pub schedule: LrPlan,
    pub tokenizer: &'a Tokenizer,
    /// A line describing the data, for the start-of-run message.
    pub data_line: String,
    pub train_file: Option<PathBuf>,
}

impl<'a> LoopSpec<'a> {
    /// A stage trained for `train.steps` on `train`'s one schedule.
    pub fn single(run: &'a StageRun<'a>, tokenizer: &'a Tokenizer, data_line: String) -> Self {
        let t = &run.stage.train;
        Self {
            run,
            total_steps: t.steps,
            schedule: train_schedule(t).into(),
            tokenizer,
            data_line,
            train_file: None,
        }
    }
}

/// The training loop: steps until `total_steps`, evaluating when the evaluators are due,
/// checkpointing every `save_every` steps and at the end, then publishing the final model at
/// the top of the stage directory and drawing the curves.
pub fn run_loop<M: TrainModel>(
    setup: Setup<M>,
    spec: LoopSpec,
    objective: &mut dyn Objective<M>,
    evaluators: &mut [Box<dyn Evaluator<M> + '_>],
) -> Result<Summary> {
    let s = spec.run;
    let tcfg = &s.stage.train;
    let run_dir = s.run_dir.clone();
    let Setup {
        base,
        dtype,
        model,
        resume_ckpt,
        ..
    } = setup;
    let mut optimizer = Optimizer::new(tcfg.optim());
    let mut rng = Rng::new(s.recipe.run.seed);
    let mut tokens_seen = 0u64;
    let mut elapsed_before = 0.0;
    let mut start_step = 0;
    if let Some(ckpt) = &resume_ckpt {
        let st = checkpoint::read_state(ckpt)?;
        optimizer.load(&checkpoint::optimizer_file(ckpt), &model, &base)?;
        optimizer.steps = st.optimizer_steps;
        objective
            .restore(&st.cursor, st.step)
            .map_err(|e| anyhow!("{}: {e:#}", checkpoint::state_file(ckpt).display()))?;
        objective.load_files(&checkpoint::state_dir(ckpt))?;
        rng = Rng::from_state(st.rng);
        tokens_seen = st.tokens_seen;
        elapsed_before = st.elapsed_s;
        start_step = st.step;
        eprintln!("resuming from {} at step {}", ckpt.display(), st.step);
    }
    let total = spec.total_steps;
    let model = if tcfg.captured_step {
        check_captured(s, objective, &base)?;
        model
            .for_capture()
            .map_err(|e| anyhow!("{} [train]: `captured_step`: {e:#}", s.path.display()))?
    } else {
        model
    };
    let mut trainer = Trainer::new(model, optimizer, spec.schedule, tcfg.clip_grad_norm);
    trainer.step = start_step;

    let seq = s.stage.data.seq_len;
    let flops = trainer.model().flops_per_token(seq);
    let peak = tcfg
        .peak_tflops
        .or_else(|| default_peak_tflops(&base, dtype))
        .filter(|_| objective.counts_flops());
    let shape = objective
        .step_shape()
        .unwrap_or_else(|| format!("{} rows of {seq} tokens", tcfg.batch_size * tcfg.grad_accum));
    eprintln!(
        "{} {}: {:.2}M parameters, {}, {total} steps × {shape}, on {base:?} ({dtype:?})",
        s.stage.kind.name(),
        run_dir.display(),
        trainer.model().param_count() as f64 / 1e6,
        spec.data_line,
    );
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| anyhow!("{}: cannot create ({e})", run_dir.display()))?;
    let mut metrics = MetricsLog::open(&run_dir, Some(start_step))?;
    if start_step == 0 {
        // Evaluations before the first step (the "before" of a fine-tuning stage).
        let mut record = Map::new();
        for ev in evaluators.iter_mut().filter(|e| e.due(0, false)) {
            let (m, line) = ev.evaluate(trainer.model(), 0)?;
            eprintln!("step 0: {line}");
            record.extend(m);
        }
        if !record.is_empty() {
            record.insert("step".into(), json!(0));
            metrics.write(Value::Object(record))?;
        }
    }
    let progress = Progress::new(start_step, total);
    let t_run = Instant::now();
    let mut t_window = Instant::now();
    let mut tokens_window = 0u64;
    let mut last_loss = metrics.last("loss").unwrap_or(f64::NAN);
    let mut last_val = metrics.last("val_loss");
    let mut last_ckpt: Option<PathBuf> = resume_ckpt.clone();
    let save =
        |trainer: &Trainer<M>, objective: &dyn Objective<M>, rng: &Rng, tokens: u64, secs: f64| {
            let state = TrainState {
                step: trainer.step,
                optimizer_steps: trainer.optimizer.steps,
                cursor: objective.state(),
                rng: rng.state(),
                tokens_seen: tokens,
                elapsed_s: secs,
            };
            checkpoint::save(
                &run_dir,
                trainer.model(),
                spec.tokenizer,
                &trainer.optimizer,
                &state,
                tcfg.keep_last,
                &|dir| objective.save_files(dir),
            )
        };

    while trainer.step < total {
        let (micro, step_tokens) = objective.prepare(trainer.model(), trainer.step)?;
        let result = if tcfg.captured_step {
            let batches = objective.device_batches();
            let loss_of = || objective.device_loss().expect("checked before the loop");
            trainer.train_captured(batches, loss_of).map_err(|e| {
                if e.downcast_ref::<Diverged>().is_some() {
                    e
                } else {
                    e.context(format!("{} [train]: `captured_step`", s.path.display()))
                }
            })
        } else {
            trainer.train_step(micro, |m, i| objective.loss(m, i))
        };
        if let (Some(secs), true) = (trainer.capture_secs(), trainer.step == start_step + 1) {
            progress.println(format!(
                "captured the training step in {secs:.2} s (replayed as a graph: {})",
                trainer.replays_graph()
            ));
        }
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
        let last = step == total;
        checkpoint::fault("abort-after-step", step);
        tokens_seen += step_tokens;
        tokens_window += step_tokens;
        last_loss = stats.loss;
        let log_now = step % tcfg.log_every.max(1) == 0 || last;
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
        let obj = record.as_object_mut().expect("a step record is an object");
        let shown = objective.annotate(obj);
        for ev in evaluators.iter_mut().filter(|e| e.due(step, last)) {
            let (m, line) = ev.evaluate(trainer.model(), step)?;
            if let Some(v) = m.get("val_loss").and_then(Value::as_f64) {
                last_val = Some(v);
            }
            obj.extend(m);
            progress.println(format!("step {step}: {line}"));
        }
        metrics.write(record)?;
        let mfu_s = mfu
            .map(|m| format!(" mfu {:.1}%", 100.0 * m))
            .unwrap_or_default();
        progress.update(
            step,
            format!(
                "{shown}loss {:.4} lr {:.2e} gnorm {:.2} {:.0} tok/s{mfu_s}",
                stats.loss, stats.lr, stats.grad_norm, tps
            ),
            log_now,
        );
        if (tcfg.save_every > 0 && step % tcfg.save_every == 0) || last {
            let secs = elapsed_before + t_run.elapsed().as_secs_f64();
            last_ckpt = Some(save(&trainer, &*objective, &rng, tokens_seen, secs)?);
        }
    }
    progress.finish();
    let ckpt = match &last_ckpt {
        Some(c) => c.clone(),
        None => save(&trainer, &*objective, &rng, tokens_seen, elapsed_before)?,
    };
    checkpoint::publish(&run_dir, &ckpt)?;
    let curves = metrics.draw(&run_dir, &format!("{} — loss", s.title))?;
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
        train_file: spec.train_file,
    })
}

/// A stage's evaluators: validation loss on `sets` (when there are any) every
/// `train.eval_every` steps, and the `[eval]` task's accuracy, prompting in `format` unless
/// the section says otherwise.
pub fn evaluators<'a, M: StageModel>(
    s: &StageRun,
    setup: &Setup<M>,
    sets: Vec<(String, Vec<Batch>)>,
    tok: &'a Tokenizer,
    format: PromptFormat,
) -> Result<Vec<Box<dyn Evaluator<M> + 'a>>> {
    let mut out: Vec<Box<dyn Evaluator<M> + 'a>> =
        ValLoss::boxed(sets, s.stage.train.eval_every, &setup.base)
            .into_iter()
            .collect();
    if let Some(ev) = crate::evaluate::task_evaluator(s, tok, format)? {
        out.push(ev);
    }
    Ok(out)
}

/// Held-out loss on fixed batches, per named set: `val_loss/<name>` for each and `val_loss`
/// for their mean (or `val_loss` alone for a single unnamed set).
pub struct ValLoss {
    pub sets: Vec<(String, Vec<Batch>)>,
    pub every: u64,
    pub device: Device,
}

impl ValLoss {
    /// The evaluator of `sets`, none when there are none (no validation data).
    pub fn boxed<'a, M: NextTokenModel>(
        sets: Vec<(String, Vec<Batch>)>,
        every: u64,
        device: &Device,
    ) -> Option<Box<dyn Evaluator<M> + 'a>> {
        (!sets.is_empty()).then(|| {
            Box::new(ValLoss {
                sets,
                every,
                device: device.clone(),
            }) as Box<dyn Evaluator<M> + 'a>
        })
    }
}

/// Whether a periodic held-out evaluation runs after `step`: every `every` steps and at the
/// end, never before training.
pub fn periodic_due(every: u64, step: u64, last: bool) -> bool {
    step > 0 && (last || (every > 0 && step.is_multiple_of(every)))
}

impl<M: NextTokenModel> Evaluator<M> for ValLoss {
    fn due(&self, step: u64, last: bool) -> bool {
        periodic_due(self.every, step, last)
    }

    fn evaluate(&mut self, model: &M, _step: u64) -> Result<(Map<String, Value>, String)> {
        let mut m = Map::new();
        let mut parts = Vec::new();
        let mut sum = 0.0;
        for (name, batches) in &self.sets {
            let v = crate::pretrain::eval_loss(model, batches, &self.device)?;
            sum += v;
            if !name.is_empty() {
                m.insert(format!("val_loss/{name}"), json!(v));
                parts.push(format!("{name} {v:.4}"));
            }
        }
        let mean = sum / self.sets.len().max(1) as f64;
        m.insert("val_loss".into(), json!(mean));
        m.insert("val_ppl".into(), json!(mean.exp()));
        let detail = if parts.is_empty() {
            String::new()
        } else {
            format!(" [{}]", parts.join(", "))
        };
        Ok((
            m,
            format!("val loss {mean:.4} (ppl {:.2}){detail}", mean.exp()),
        ))
    }
}
