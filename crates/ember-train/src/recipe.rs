//! Recipe files (TOML). Every key is checked: a misspelt key is an error naming the file,
//! the line and the key, never a silently ignored setting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use ember_data::chat::ChatSource;
use ember_data::prompts::PromptSource;
use ember_data::sft::{Batching, LossAveraging};
use ember_data::tasks::DocFormat;
use ember_data::Source;
use ember_models::hybrid::stack::HybridConfig;
use ember_models::modernbert::ModernBertConfig;
use ember_models::qwen3::Qwen3Config;
use serde::Deserialize;

use crate::objectives::grpo::{AdvantageKind, Aggregation};
use crate::optim::{OptimConfig, OptimizerKind};
use crate::schedule::ScheduleKind;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// What `ember train` runs: `pretrain` (the default), `cpt` or `sft`. A pipeline names
    /// the kind in each `[[stage]]` instead.
    #[serde(default)]
    pub kind: Option<StageKind>,
    pub run: RunSection,
    /// The architecture table: `arch` plus the HF config.json fields of that model.
    /// Absent when the stage starts from a checkpoint (`train.init_from`).
    #[serde(default)]
    pub model: Option<toml::Table>,
    #[serde(default)]
    pub data: Option<DataSection>,
    #[serde(default)]
    pub train: Option<TrainSection>,
    #[serde(default)]
    pub generate: Option<GenerateSection>,
    /// CPT phases of a single-stage recipe.
    #[serde(default)]
    pub phase: Vec<PhaseSection>,
    /// Generation-based evaluation of a single-stage recipe.
    #[serde(default)]
    pub eval: Option<EvalSection>,
    /// RL settings of a single-stage `kind = "rlvr"` recipe.
    #[serde(default)]
    pub rl: Option<RlSection>,
    /// Teacher and loss of a single-stage `kind = "opd"` recipe.
    #[serde(default)]
    pub distill: Option<DistillSection>,
    /// What a single-stage pretraining recipe optimises: `ntp` (next-token loss) or `rlp`.
    #[serde(default)]
    pub objective: Option<TrainObjective>,
    /// RLP settings (`objective = "rlp"`).
    #[serde(default)]
    pub rlp: Option<RlpSection>,
    /// Masked-language-model settings (`objective = "mlm"`).
    #[serde(default)]
    pub mlm: Option<MlmSection>,
    /// The stages `ember pipeline` runs in order, each from the previous one's output.
    #[serde(default)]
    pub stage: Vec<StageSection>,
}

/// One `[[stage]]` of a pipeline recipe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSection {
    /// The stage's directory under the run: `runs/<run.name>/<name>/`.
    pub name: String,
    #[serde(default = "pretrain_kind")]
    pub kind: StageKind,
    pub data: DataSection,
    pub train: TrainSection,
    /// CPT only: the curriculum, in order.
    #[serde(default)]
    pub phase: Vec<PhaseSection>,
    #[serde(default)]
    pub eval: Option<EvalSection>,
    /// RLVR only: rollouts, rewards and the objective.
    #[serde(default)]
    pub rl: Option<RlSection>,
    /// OPD only: the teacher, sampling and the distillation loss.
    #[serde(default)]
    pub distill: Option<DistillSection>,
    /// Pretraining only: `ntp` (the default) or `rlp`.
    #[serde(default)]
    pub objective: Option<TrainObjective>,
    /// RLP settings (`objective = "rlp"`).
    #[serde(default)]
    pub rlp: Option<RlpSection>,
    /// Masked-language-model settings (`objective = "mlm"`).
    #[serde(default)]
    pub mlm: Option<MlmSection>,
    /// This stage's own architecture: a new model trained from scratch (a distillation
    /// student, say) instead of the previous stage's. Same keys as `[model]`.
    #[serde(default)]
    pub model: Option<toml::Table>,
}

/// What a stage trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageKind {
    /// Next-token loss on packed documents.
    Pretrain,
    /// Continued pretraining through phases of weighted dataset mixtures.
    Cpt,
    /// Supervised fine-tuning on chat data, loss on assistant tokens only.
    Sft,
    /// RL with verifiable rewards: sampled groups, scored, trained with the GRPO family.
    Rlvr,
    /// On-policy distillation: the student samples, a frozen teacher scores every token.
    Opd,
}

impl StageKind {
    pub fn name(self) -> &'static str {
        match self {
            StageKind::Pretrain => "pretrain",
            StageKind::Cpt => "cpt",
            StageKind::Sft => "sft",
            StageKind::Rlvr => "rlvr",
            StageKind::Opd => "opd",
        }
    }
}

/// One curriculum phase of a CPT stage: a budget, a mixture and its own LR schedule
/// (re-warmed from the phase's first step).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseSection {
    pub name: String,
    /// Training tokens in this phase (rounded up to whole optimizer steps)...
    #[serde(default)]
    pub tokens: Option<u64>,
    /// ...or optimizer steps.
    #[serde(default)]
    pub steps: Option<u64>,
    /// `{dataset = weight}` over `[data.datasets]`; weights are normalised.
    pub mix: BTreeMap<String, f64>,
    /// Peak LR of this phase (default: `train.lr`).
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default)]
    pub schedule: Option<ScheduleKind>,
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    #[serde(default)]
    pub min_lr_ratio: Option<f64>,
    #[serde(default)]
    pub decay_fraction: Option<f64>,
}

/// A named dataset of a CPT stage: files and/or generated documents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    #[serde(default)]
    pub sources: Vec<Source>,
    #[serde(default)]
    pub generated: Option<GeneratedData>,
}

/// How generation-based evaluation prompts the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptFormat {
    /// The chat template's user turn and assistant header (SFT's default).
    Chat,
    /// The question as a plain document, as pretraining saw it.
    Text,
}

/// Accuracy on held-out problems of a verifiable task, by greedy generation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    pub task: String,
    /// Levels to draw problems from (default: all of the task's levels).
    #[serde(default)]
    pub levels: Vec<u32>,
    #[serde(default = "eval_count")]
    pub count: usize,
    /// Evaluate every this many steps (0: before the first step and after the last only).
    #[serde(default)]
    pub every: u64,
    #[serde(default = "eval_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "eval_batch")]
    pub batch_size: usize,
    #[serde(default)]
    pub format: Option<PromptFormat>,
}

/// An RLVR stage's rollouts, rewards and objective. Each optimizer step trains on
/// `train.batch_size` prompts with `group_size` sampled completions each, split into
/// `train.grad_accum` micro-batches for the backward pass.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlSection {
    /// Completions sampled per prompt (G).
    #[serde(default = "group_size")]
    pub group_size: usize,
    /// Optimizer steps per rollout batch: the batch of `updates_per_rollout × batch_size`
    /// prompts is split into that many updates; after the first they are off-policy, which
    /// the importance ratio and clipping correct.
    #[serde(default = "one_usize")]
    pub updates_per_rollout: usize,
    #[serde(default = "rl_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "one")]
    pub temperature: f32,
    #[serde(default = "one")]
    pub top_p: f32,
    #[serde(default)]
    pub top_k: usize,
    /// `grpo`, `dr_grpo`, `rloo` or `tempo`.
    #[serde(default = "grpo_kind")]
    pub advantage: AdvantageKind,
    /// `token` (DAPO), `sequence` (GRPO), `dr_grpo` or `balanced`.
    #[serde(default = "token_aggregation")]
    pub aggregation: Aggregation,
    /// Lower clip range of the importance ratio: 1 − ε_low.
    #[serde(default = "epsilon")]
    pub epsilon_low: f64,
    /// Upper clip range, 1 + ε_high (default: `epsilon_low`; DAPO's clip-higher uses 0.28).
    #[serde(default)]
    pub epsilon_high: Option<f64>,
    /// Weight of the k3 KL to the frozen starting model (0: no reference model is run).
    #[serde(default)]
    pub beta: f64,
    /// Drop groups whose rewards are all equal and sample more prompts to refill the batch.
    #[serde(default)]
    pub dynamic_sampling: bool,
    /// Rollout rounds at most per batch with `dynamic_sampling`.
    #[serde(default = "sampling_rounds")]
    pub max_sampling_rounds: usize,
    /// Completions generated at once (0: the whole batch).
    #[serde(default)]
    pub rollout_batch: usize,
    /// `chat` (the chat template) or `text` prompts.
    #[serde(default = "chat_format")]
    pub format: PromptFormat,
    /// The reward: a weighted sum of these (default: `math_answer` on the field `answer`).
    #[serde(default)]
    pub rewards: Vec<RewardSpec>,
}

/// One part of an RLVR reward.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    /// `math_answer`, `exact_match`, `think_format` or `overlong`.
    pub kind: RewardKind,
    #[serde(default = "one_f64")]
    pub weight: f64,
    /// The row field holding the reference answer (`math_answer`, `exact_match`).
    #[serde(default)]
    pub field: Option<String>,
    /// `overlong`: the length at which the penalty reaches −1 (default: `max_new_tokens`).
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// `overlong`: the soft buffer before `max_tokens` over which it falls from 0 to −1.
    #[serde(default)]
    pub buffer: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    MathAnswer,
    ExactMatch,
    ThinkFormat,
    Overlong,
}

/// What a pretraining stage optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainObjective {
    /// Next-token cross-entropy.
    Ntp,
    /// RLP's information-gain reward on sampled thoughts (optionally plus next-token loss).
    Rlp,
    /// Masked-token prediction for an encoder (`arch = "modernbert"`).
    Mlm,
}

/// Masked language modelling (BERT's recipe at ModernBERT's rate): a fraction of the
/// tokens, never special ones, is chosen; of those, most become the mask token, some a
/// random token and the rest stay; the loss is the cross-entropy at the chosen positions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlmSection {
    /// The fraction of (non-special) tokens predicted.
    #[serde(default = "mlm_prob")]
    pub mask_prob: f64,
    /// The token that replaces masked inputs; a BPE or byte-level tokenizer the stage
    /// builds gets it as a special token.
    #[serde(default = "mlm_token")]
    pub mask_token: String,
    /// Of the chosen tokens, the fraction replaced by a random token.
    #[serde(default = "tenth")]
    pub random_fraction: f64,
    /// Of the chosen tokens, the fraction left unchanged.
    #[serde(default = "tenth")]
    pub keep_fraction: f64,
}

fn mlm_prob() -> f64 {
    0.3
}
fn mlm_token() -> String {
    "<|mask|>".into()
}
fn tenth() -> f64 {
    0.1
}

/// The distillation loss of an OPD stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistillLossKind {
    /// Per-token advantage −(log π_student − log π_teacher) on the sampled tokens, with
    /// importance weighting against the sampler (Thinking Machines' on-policy distillation).
    ReverseKlSampled,
    /// KL(student ‖ teacher) over the whole vocabulary at every sampled position.
    ReverseKl,
    /// KL(teacher ‖ student) over the whole vocabulary.
    ForwardKl,
    /// GKD's generalized Jensen–Shannon divergence with `jsd_beta`.
    Jsd,
}

/// An OPD stage: the student (the stage's model) samples completions of the prompts, the
/// frozen teacher scores them, and the student minimises the chosen divergence on them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSection {
    /// The teacher: a checkpoint or HF model directory, or (in a pipeline) the name of an
    /// earlier stage. It must share the student's tokenizer.
    pub teacher: PathBuf,
    /// `reverse_kl_sampled`, `reverse_kl`, `forward_kl` or `jsd`.
    #[serde(default = "reverse_kl_sampled")]
    pub loss: DistillLossKind,
    /// β of `jsd`, in [0, 1]: 0 is forward KL, 1 reverse KL.
    #[serde(default = "half")]
    pub jsd_beta: f64,
    /// Extrapolation λ ≥ 0 on the teacher-vs-reference reward log π_T − log π_ref: 1 is plain
    /// OPD; above 1 pushes past the teacher. Other values need the reference model.
    #[serde(default = "one_f64")]
    pub lambda: f64,
    /// The reference model for λ ≠ 1 (default: the model the student started from).
    #[serde(default)]
    pub reference: Option<PathBuf>,
    /// Bridge: the first this many steps train on teacher samples under forward KL, then
    /// the student samples.
    #[serde(default)]
    pub bridge_steps: u64,
    /// Completions sampled per prompt.
    #[serde(default = "one_usize")]
    pub samples_per_prompt: usize,
    #[serde(default = "rl_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "one")]
    pub temperature: f32,
    #[serde(default = "one")]
    pub top_p: f32,
    #[serde(default)]
    pub top_k: usize,
    /// Completions generated at once (0: the whole batch).
    #[serde(default)]
    pub rollout_batch: usize,
    /// `chat` (the chat template) or `text` prompts.
    #[serde(default = "chat_format")]
    pub format: PromptFormat,
    /// Answer checkers for the student's rollout accuracy (default: `math_answer` on
    /// `answer`, reported when the rows have that field), and the reward of routed tokens.
    #[serde(default)]
    pub rewards: Vec<RewardSpec>,
    /// Token routing: the distillation term applies only to the completion's spans from
    /// `route_open` to `route_close` (markers included; an unclosed span runs to the end),
    /// and a GRPO term on the reward of `rewards` to every other token. Needs
    /// `samples_per_prompt` ≥ 2.
    #[serde(default)]
    pub route_open: Option<String>,
    #[serde(default)]
    pub route_close: Option<String>,
}

/// How RLP chooses the positions it thinks before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionChoice {
    /// Uniformly at random.
    Random,
    /// Where the EMA baseline's next-token entropy is highest.
    Entropy,
    /// At random among line starts (after a token that ends a line, or a document): the
    /// thought comes before a whole line, as a reasoning step would.
    LineStart,
}

/// RLP (arXiv 2510.01265): at sampled positions t of ordinary text the model writes G
/// thoughts `<think>c</think>`; each is rewarded by how much it raises the log-prob of the
/// next token over an EMA copy of the model that does not think.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlpSection {
    /// Thoughts sampled per position (G ≥ 2).
    #[serde(default = "rlp_group")]
    pub group_size: usize,
    /// Positions sampled per training row.
    #[serde(default = "one_usize")]
    pub positions_per_row: usize,
    /// `random`, `entropy` or `line_start`.
    #[serde(default = "random_positions")]
    pub positions: PositionChoice,
    /// Longest thought, in tokens.
    #[serde(default = "rlp_thought")]
    pub thought_tokens: usize,
    #[serde(default = "rlp_temperature")]
    pub temperature: f32,
    /// Next tokens the reward scores (x_t … x_{t+k−1}).
    #[serde(default = "one_usize")]
    pub next_tokens: usize,
    /// EMA decay τ of the no-thought baseline: φ ← τφ + (1−τ)θ after every step.
    #[serde(default = "ema_tau")]
    pub ema_decay: f64,
    #[serde(default = "epsilon")]
    pub epsilon_low: f64,
    #[serde(default)]
    pub epsilon_high: Option<f64>,
    /// Weight of an added next-token loss on the batch (0: RLP alone, as in the paper).
    #[serde(default)]
    pub ntp_weight: f64,
}

fn reverse_kl_sampled() -> DistillLossKind {
    DistillLossKind::ReverseKlSampled
}
fn half() -> f64 {
    0.5
}
fn rlp_group() -> usize {
    16
}
fn random_positions() -> PositionChoice {
    PositionChoice::Random
}
fn rlp_thought() -> usize {
    2048
}
fn rlp_temperature() -> f32 {
    0.7
}
fn ema_tau() -> f64 {
    0.999
}

fn group_size() -> usize {
    8
}
fn rl_new_tokens() -> usize {
    256
}
fn grpo_kind() -> AdvantageKind {
    AdvantageKind::Grpo
}
fn token_aggregation() -> Aggregation {
    Aggregation::Token
}
fn epsilon() -> f64 {
    0.2
}
fn sampling_rounds() -> usize {
    3
}
fn chat_format() -> PromptFormat {
    PromptFormat::Chat
}

fn eval_count() -> usize {
    64
}
fn eval_new_tokens() -> usize {
    128
}
fn eval_batch() -> usize {
    32
}

fn pretrain_kind() -> StageKind {
    StageKind::Pretrain
}

/// Where training text comes from and how it becomes batches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// `"byte_level"`, or the path of an HF `tokenizer.json`. Ignored when `bpe_vocab_size`
    /// asks for a tokenizer trained on the sources.
    #[serde(default = "byte_level")]
    pub tokenizer: String,
    /// Train a byte-level BPE of this size on the sources before tokenizing.
    #[serde(default)]
    pub bpe_vocab_size: Option<usize>,
    #[serde(default)]
    pub sources: Vec<Source>,
    /// Documents generated on the fly by a built-in task (no download); for SFT, the task's
    /// problems as prompt/response conversations.
    #[serde(default)]
    pub generated: Option<GeneratedData>,
    /// CPT: named datasets that `[[phase]]` mixtures draw from.
    #[serde(default)]
    pub datasets: BTreeMap<String, DatasetSpec>,
    /// SFT: chat data (JSONL or Parquet, `messages` or prompt/response).
    #[serde(default)]
    pub chat: Vec<ChatSource>,
    /// RLVR: prompt rows (JSONL or Parquet) with the fields the rewards check.
    #[serde(default)]
    pub prompts: Vec<PromptSource>,
    /// SFT: `pack` conversations into rows with per-conversation attention, or `pad`.
    #[serde(default)]
    pub batching: Batching,
    /// SFT: `per_token` or `per_sequence` loss averaging.
    #[serde(default)]
    pub loss_averaging: LossAveraging,
    /// Tokens per training row (the model sees `seq_len` inputs and predicts the next).
    pub seq_len: usize,
    /// Fraction of documents held out for validation.
    #[serde(default = "val_fraction")]
    pub val_fraction: f64,
    /// Keep attention inside each packed document.
    #[serde(default)]
    pub doc_masks: bool,
    #[serde(default = "yes")]
    pub shuffle: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratedData {
    pub task: String,
    pub count: u64,
    #[serde(default = "level_one")]
    pub levels: Vec<u32>,
    /// Pretraining documents: `worked` (steps then the answer; the default), `think` (the
    /// steps inside `<think>…</think>`) or `answer` (no steps); document i takes the
    /// i-th entry, cyclically.
    #[serde(default)]
    pub formats: Vec<DocFormat>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps (CPT: the sum of its phases, so left out).
    #[serde(default)]
    pub steps: u64,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "one_usize")]
    pub grad_accum: usize,
    pub lr: f64,
    #[serde(default = "cosine")]
    pub schedule: ScheduleKind,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "min_lr_ratio")]
    pub min_lr_ratio: f64,
    /// WSD only: the final fraction of steps spent decaying.
    #[serde(default = "decay_fraction")]
    pub decay_fraction: f64,
    /// `adamw`, or `muon` (Muon for hidden matrices, AdamW for the rest).
    #[serde(default)]
    pub optimizer: Option<OptimizerKind>,
    #[serde(default)]
    pub beta1: Option<f64>,
    #[serde(default)]
    pub beta2: Option<f64>,
    #[serde(default)]
    pub eps: Option<f64>,
    #[serde(default)]
    pub weight_decay: Option<f64>,
    #[serde(default)]
    pub muon_momentum: Option<f64>,
    /// Global gradient-norm clipping threshold (0 disables it).
    #[serde(default = "one_f64")]
    pub clip_grad_norm: f64,
    /// Compute dtype: f32 or bf16 (parameters and optimizer state stay f32).
    #[serde(default = "f32_name")]
    pub dtype: String,
    /// Recompute memory-bound activations in the backward pass.
    #[serde(default)]
    pub grad_checkpointing: bool,
    /// Train through a step captured once and replayed as a graph (`crate::captured`):
    /// Qwen3 or a hybrid, next-token objectives.
    #[serde(default)]
    pub captured_step: bool,
    #[serde(default = "ten")]
    pub log_every: u64,
    /// Validation loss every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    #[serde(default = "eval_batches")]
    pub eval_batches: usize,
    /// Checkpoint every this many steps (0: only at the end).
    #[serde(default)]
    pub save_every: u64,
    /// Checkpoints kept under `checkpoints/`.
    #[serde(default = "keep_last")]
    pub keep_last: usize,
    /// Start from this HF checkpoint directory (e.g. the previous stage) instead of `[model]`.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Dense peak of the device in TFLOP/s, for MFU (defaults: 989 for CUDA bf16).
    #[serde(default)]
    pub peak_tflops: Option<f64>,
}

fn byte_level() -> String {
    "byte_level".into()
}
fn val_fraction() -> f64 {
    0.01
}
fn yes() -> bool {
    true
}
fn level_one() -> Vec<u32> {
    vec![1]
}
fn one_usize() -> usize {
    1
}
fn one_f64() -> f64 {
    1.0
}
fn cosine() -> ScheduleKind {
    ScheduleKind::Cosine
}
fn min_lr_ratio() -> f64 {
    0.1
}
fn decay_fraction() -> f64 {
    0.2
}
fn f32_name() -> String {
    "f32".into()
}
fn ten() -> u64 {
    10
}
fn eval_batches() -> usize {
    8
}
fn keep_last() -> usize {
    2
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    /// Runs are written to `<out_dir>/<name>/`.
    #[serde(default = "default_out_dir")]
    pub out_dir: PathBuf,
}

fn default_out_dir() -> PathBuf {
    PathBuf::from("runs")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateSection {
    pub prompt: String,
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub temperature: f32,
    #[serde(default)]
    pub top_k: usize,
    #[serde(default = "one")]
    pub top_p: f32,
}

fn default_new_tokens() -> usize {
    64
}
fn one() -> f32 {
    1.0
}

impl TrainSection {
    pub fn optim(&self) -> OptimConfig {
        let d = OptimConfig::default();
        OptimConfig {
            optimizer: self.optimizer.unwrap_or(d.optimizer),
            beta1: self.beta1.unwrap_or(d.beta1),
            beta2: self.beta2.unwrap_or(d.beta2),
            eps: self.eps.unwrap_or(d.eps),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            muon_momentum: self.muon_momentum.unwrap_or(d.muon_momentum),
            muon_ns_steps: d.muon_ns_steps,
        }
    }
}

/// The model a recipe describes.
pub enum ModelSpec {
    Qwen3(Qwen3Config),
    ModernBert(ModernBertConfig),
    /// `nemotron_flash`, `mamba2` or `nemotron_h`.
    Hybrid(HybridConfig),
}

impl Recipe {
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &[])
    }

    /// Loads a recipe and applies `key.path=value` overrides (the value is read as TOML,
    /// or as a plain string when it is not valid TOML), then `EMBER_MAX_STEPS`.
    pub fn load_with(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut recipe = Self::load_overridden(path, overrides)?;
        crate::step_cap::apply_env(&mut recipe)?;
        Ok(recipe)
    }

    fn load_overridden(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("{}: cannot read recipe ({e})", path.display()))?;
        let recipe = Self::parse(&text, path)?;
        if overrides.is_empty() {
            return Ok(recipe);
        }
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        table.try_into().map_err(|e: toml::de::Error| {
            anyhow!(
                "{} with --set {}: {}",
                path.display(),
                overrides.join(" --set "),
                e.message().replace('\n', " ")
            )
        })
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start].lines().count().max(1));
            let msg = e.message().replace('\n', " ");
            match line {
                Some(l) => anyhow!("{}:{l}: {msg}", path.display()),
                None => anyhow!("{}: {msg}", path.display()),
            }
        })
    }

    pub fn model_spec(&self, path: &Path) -> Result<ModelSpec> {
        let Some(table) = self.model.clone() else {
            bail!("{}: section [model] is missing", path.display());
        };
        model_spec(table, path)
    }

    /// The recipe's single stage, for `ember train`.
    pub fn single_stage(&self, path: &Path) -> Result<StageSection> {
        if !self.stage.is_empty() {
            bail!(
                "{}: has [[stage]] entries; run it with ember pipeline",
                path.display()
            );
        }
        let data = self
            .data
            .clone()
            .ok_or_else(|| anyhow!("{}: section [data] is missing", path.display()))?;
        let train = self
            .train
            .clone()
            .ok_or_else(|| anyhow!("{}: section [train] is missing", path.display()))?;
        Ok(StageSection {
            name: self.run.name.clone(),
            kind: self.kind.unwrap_or(StageKind::Pretrain),
            data,
            train,
            phase: self.phase.clone(),
            eval: self.eval.clone(),
            rl: self.rl.clone(),
            distill: self.distill.clone(),
            objective: self.objective,
            rlp: self.rlp.clone(),
            mlm: self.mlm.clone(),
            model: None,
        })
    }

    pub fn run_dir(&self) -> PathBuf {
        self.run.out_dir.join(&self.run.name)
    }
}

/// The model an architecture table (`[model]`, or a stage's own) describes.
pub fn model_spec(mut table: toml::Table, path: &Path) -> Result<ModelSpec> {
    let origin = format!("{} [model]", path.display());
    let arch = match table.remove("arch") {
        Some(toml::Value::String(s)) => s,
        Some(_) => bail!("{origin}: key `arch` must be a string"),
        None => bail!("{origin}: key `arch` is missing (e.g. arch = \"qwen3\")"),
    };
    let mut json = serde_json::to_value(&table)?;
    json["model_type"] = arch.clone().into();
    match arch.as_str() {
        "qwen3" => {
            let known = Qwen3Config::known_fields();
            if let Some(k) = table.keys().find(|k| !known.contains(k)) {
                let at = line_of(path, &format!("{k} ="))
                    .map(|l| format!("{}:{l}: [model]", path.display()))
                    .unwrap_or(origin);
                bail!("{at}: unknown key `{k}` for arch qwen3");
            }
            Ok(ModelSpec::Qwen3(Qwen3Config::from_value(&json, &origin)?))
        }
        "modernbert" => {
            let known = ModernBertConfig::KNOWN_FIELDS;
            if let Some(k) = table.keys().find(|k| !known.contains(&k.as_str())) {
                let at = line_of(path, &format!("{k} ="))
                    .map(|l| format!("{}:{l}: [model]", path.display()))
                    .unwrap_or(origin);
                bail!("{at}: unknown key `{k}` for arch modernbert");
            }
            Ok(ModelSpec::ModernBert(ModernBertConfig::from_value(
                &json, &origin,
            )?))
        }
        t if HybridConfig::is_hybrid_type(t) => {
            let known = HybridConfig::KNOWN_FIELDS;
            if let Some(k) = table.keys().find(|k| !known.contains(&k.as_str())) {
                let at = line_of(path, &format!("{k} ="))
                    .map(|l| format!("{}:{l}: [model]", path.display()))
                    .unwrap_or(origin);
                bail!("{at}: unknown key `{k}` for arch {arch}");
            }
            Ok(ModelSpec::Hybrid(HybridConfig::from_value(&json, &origin)?))
        }
        other => bail!(
            "{origin}: unknown arch `{other}` (supported: qwen3, modernbert, nemotron_flash, mamba2, nemotron_h)"
        ),
    }
}

fn apply_override(table: &mut toml::Table, o: &str) -> Result<()> {
    let Some((key, raw)) = o.split_once('=') else {
        bail!("--set {o}: expected key=value, e.g. --set train.lr=3e-4");
    };
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, parents) = parts.split_last().expect("split yields one part");
    // Walk tables by key and arrays of tables by index (`stage.0.train.steps`).
    let mut cur = toml::Value::Table(std::mem::take(table));
    let result = (|| {
        let mut node = &mut cur;
        for p in parents {
            node = match node {
                toml::Value::Table(t) => t
                    .entry(p.to_string())
                    .or_insert_with(|| toml::Value::Table(Default::default())),
                toml::Value::Array(a) => {
                    let len = a.len();
                    p.parse::<usize>()
                        .ok()
                        .and_then(|i| a.get_mut(i))
                        .ok_or_else(|| {
                            anyhow!("--set {o}: `{p}` is not an index of a list of {len}")
                        })?
                }
                _ => bail!("--set {o}: `{p}` is not a table"),
            };
        }
        match node {
            toml::Value::Table(t) => {
                t.insert(last.to_string(), value);
                Ok(())
            }
            _ => bail!("--set {o}: the parent of `{last}` is not a table"),
        }
    })();
    if let toml::Value::Table(t) = cur {
        *table = t;
    }
    result
}

/// The 1-based line of the first occurrence of `needle` in a recipe, for error messages
/// about values that parse but do not work (a path that does not exist).
pub fn line_of(path: &Path, needle: &str) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}
