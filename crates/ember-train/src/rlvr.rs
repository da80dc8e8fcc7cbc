//! RL with verifiable rewards (`kind = "rlvr"`): each rollout batch samples G completions
//! per prompt from the current policy, scores them with the stage's reward, and turns each
//! group into advantages and token weights (the GRPO family, [`crate::objectives::grpo`]);
//! the clipped surrogate is then minimised over `updates_per_rollout` optimizer steps. Groups
//! whose rewards are all equal can be dropped and refilled (dynamic sampling).

use std::ops::Range;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use burn::tensor::Tensor;
use ember_data::prompts::PromptRow;
use ember_data::rng::mix64;
use ember_data::Tokenizer;
use ember_models::generate::{FinishReason, Sampling};
use serde_json::{json, Map, Value};

use crate::objectives::grpo::{
    advantages, aggregation_weights, completion_logprobs, grpo, policy_loss, tempo, AdvantageKind,
    Aggregation, LossSums, PolicyRow, SurrogateConfig,
};
use crate::prompt_set::{check_prompt_data, stage_prompts, Encoded, PromptOrder};
use crate::recipe::RlSection;
use crate::rollout::{rl_origin, sample_groups, Group, Rewarder, RolloutSpec};
use crate::stages::{
    check_common, evaluators, micro_ranges, reference_model, run_loop, LoopSpec, Objective, Setup,
    StageModel, StageRun, Summary,
};

/// Checks `[rl]` and returns it with ε_high resolved.
fn checked_section(s: &StageRun) -> Result<(RlSection, f64)> {
    let origin = rl_origin(s.path);
    let rl = s
        .stage
        .rl
        .clone()
        .ok_or_else(|| anyhow!("{origin}: a rlvr stage needs an [rl] section"))?;
    let eps_high = rl.epsilon_high.unwrap_or(rl.epsilon_low);
    let bad = |key: &str, want: &str| anyhow!("{origin}: `{key}` must be {want}");
    if rl.group_size < 2 {
        return Err(bad(
            "group_size",
            "at least 2 (advantages compare a group's samples)",
        ));
    }
    if rl.max_new_tokens == 0 {
        return Err(bad("max_new_tokens", "at least 1"));
    }
    if rl.updates_per_rollout == 0 || rl.max_sampling_rounds == 0 {
        return Err(bad(
            "updates_per_rollout` and `max_sampling_rounds",
            "at least 1",
        ));
    }
    if !(rl.temperature > 0.0 && rl.temperature.is_finite()) {
        return Err(bad(
            "temperature",
            "positive (greedy decoding would give G identical samples)",
        ));
    }
    if !(rl.top_p > 0.0 && rl.top_p <= 1.0) {
        return Err(bad("top_p", "in (0, 1]"));
    }
    if !((0.0..1.0).contains(&rl.epsilon_low) && eps_high >= 0.0 && eps_high.is_finite()) {
        return Err(bad("epsilon_low` / `epsilon_high", "in [0, 1) and >= 0"));
    }
    if !(rl.beta >= 0.0 && rl.beta.is_finite()) {
        return Err(bad("beta", ">= 0"));
    }
    if s.stage.train.grad_accum > s.stage.train.batch_size * rl.group_size {
        bail!(
            "{} [train]: `grad_accum` {} splits {} completions a step into more micro-batches than there are completions",
            s.path.display(),
            s.stage.train.grad_accum,
            s.stage.train.batch_size * rl.group_size
        );
    }
    Ok((rl, eps_high))
}

/// An RLVR stage, on a model of family `M` (Qwen3 or a hybrid).
pub fn run<M: StageModel>(s: &StageRun) -> Result<Summary> {
    let path = s.path;
    check_common(&s.stage, path)?;
    let (rl, eps_high) = checked_section(s)?;
    let tcfg = &s.stage.train;
    check_prompt_data(s)?;
    let rewarder = Rewarder::new(&rl.rewards, rl.max_new_tokens, &rl_origin(path))?;
    let mut setup = Setup::<M>::new(s)?;
    let (
        tok,
        Encoded {
            prompts,
            eos: eos_ids,
            ..
        },
    ) = stage_prompts(s, &mut setup, rl.format)?;
    let reference = (rl.beta > 0.0)
        .then(|| reference_model(s, &setup))
        .transpose()?;
    let data_line = format!(
        "{} prompts × {} samples, rewards {}",
        prompts.len(),
        rl.group_size,
        rewarder.names().join(" + ")
    );
    let mut evaluators = evaluators(s, &setup, vec![], &tok, rl.format)?;
    let spec = RolloutSpec {
        group_size: rl.group_size,
        max_new_tokens: rl.max_new_tokens,
        sampling: Sampling {
            temperature: rl.temperature,
            top_k: rl.top_k,
            top_p: rl.top_p,
            seed: 0,
        },
        rollout_batch: rl.rollout_batch,
        pad_id: eos_ids[0],
        eos_ids,
    };
    let mut objective = Rlvr {
        order: PromptOrder::new(prompts.len(), s.recipe.run.seed),
        prompts,
        tok: &tok,
        rewarder,
        spec,
        reference,
        surrogate: SurrogateConfig {
            temperature: rl.temperature as f64,
            eps_low: rl.epsilon_low,
            eps_high,
            beta: rl.beta,
        },
        prompts_per_step: tcfg.batch_size,
        accum: tcfg.grad_accum,
        seed: s.recipe.run.seed,
        buffer: Vec::new(),
        buffer_rollout: None,
        current: Vec::new(),
        micro: Vec::new(),
        pending: Map::new(),
        shown: String::new(),
        stats: LossSums::default(),
        t_train: Instant::now(),
        rl,
    };
    run_loop(
        setup,
        LoopSpec::single(s, &tok, data_line),
        &mut objective,
        &mut evaluators,
    )
}

struct Rlvr<'a, M> {
    rl: RlSection,
    surrogate: SurrogateConfig,
    prompts: Vec<(PromptRow, Vec<u32>)>,
    order: PromptOrder,
    tok: &'a Tokenizer,
    rewarder: Rewarder,
    spec: RolloutSpec,
    reference: Option<M>,
    prompts_per_step: usize,
    accum: usize,
    seed: u64,
    /// The current rollout batch's kept groups, and which rollout it is.
    buffer: Vec<Group>,
    buffer_rollout: Option<u64>,
    current: Vec<PolicyRow>,
    micro: Vec<Range<usize>>,
    /// Rollout metrics for the next step record.
    pending: Map<String, Value>,
    shown: String,
    stats: LossSums,
    t_train: Instant,
}

impl<M: StageModel> Rlvr<'_, M> {
    /// Samples rollout batch `rollout` (starting at optimizer step `step`) and keeps its
    /// groups, dropping and refilling zero-variance groups under dynamic sampling.
    fn fill(&mut self, model: &M, rollout: u64) -> Result<()> {
        let need = self.prompts_per_step * self.rl.updates_per_rollout;
        let rounds = if self.rl.dynamic_sampling {
            self.rl.max_sampling_rounds
        } else {
            1
        };
        let mut kept: Vec<Group> = Vec::new();
        let mut flat: Vec<Group> = Vec::new();
        let mut m = RolloutMetrics::default();
        for round in 0..rounds {
            let picks: Vec<usize> = (0..need).map(|_| self.order.draw()).collect();
            let batch: Vec<(usize, &[u32], &PromptRow)> = picks
                .iter()
                .map(|&i| (i, self.prompts[i].1.as_slice(), &self.prompts[i].0))
                .collect();
            let seed = mix64(self.seed ^ mix64(rollout.wrapping_mul(0x1_0000) + round as u64));
            let (groups, cost) =
                sample_groups(model, self.tok, &self.rewarder, &batch, &self.spec, seed)?;
            m.add(&groups, cost.new_tokens, cost.seconds);
            m.rounds += 1;
            for g in groups {
                if g.rewards().len() < 2 {
                    continue;
                }
                if self.rl.dynamic_sampling && g.zero_variance() {
                    flat.push(g);
                } else {
                    kept.push(g);
                }
            }
            if kept.len() >= need {
                break;
            }
        }
        if kept.is_empty() {
            // No group with a signal: train on flat ones (zero advantages) rather than stall.
            kept = flat;
        }
        if kept.is_empty() {
            bail!(
                "no completion got a reward: every sample was skipped (do the prompt rows have the fields [rl.rewards] reads?)"
            );
        }
        kept.truncate(need);
        m.kept = kept.len();
        self.pending = m.record(&self.rewarder.names());
        self.shown = m.shown();
        self.buffer = kept;
        self.buffer_rollout = Some(rollout);
        Ok(())
    }

    /// The training rows of `groups`: advantages per token and aggregation weights that sum
    /// the loss over the whole mini-batch.
    fn train_rows(&self, groups: &[Group]) -> Vec<PolicyRow> {
        let kind = self.rl.advantage;
        let mut rows = Vec::new();
        let mut group_weights: Vec<Vec<f64>> = Vec::new();
        for g in groups {
            let samples: Vec<_> = g
                .samples
                .iter()
                .filter(|s| s.scores.total.is_some())
                .collect();
            let r: Vec<f64> = samples.iter().filter_map(|s| s.scores.total).collect();
            let ids: Vec<Vec<u32>> = samples.iter().map(|s| s.tokens.clone()).collect();
            let seq_adv = match kind {
                AdvantageKind::Tempo => grpo(&r),
                k => advantages(k, &r),
            };
            let tok_adv: Vec<Vec<f64>> = match kind {
                AdvantageKind::Tempo => tempo(&ids, &r),
                _ => ids
                    .iter()
                    .zip(&seq_adv)
                    .map(|(t, &a)| vec![a; t.len()])
                    .collect(),
            };
            let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
            group_weights.push(aggregation_weights(
                Aggregation::Balanced,
                &lengths,
                &seq_adv,
                self.rl.max_new_tokens,
            ));
            let prompt = &self.prompts[g.prompt].1;
            for (s, adv) in samples.iter().zip(tok_adv) {
                rows.push(PolicyRow {
                    ids: prompt.iter().chain(&s.tokens).copied().collect(),
                    prompt_len: prompt.len(),
                    rollout_logp: s.logprobs.clone(),
                    ref_logp: None,
                    adv: adv.iter().map(|&a| a as f32).collect(),
                    weight: 0.0,
                });
            }
        }
        let lengths: Vec<usize> = rows.iter().map(|r| r.ids.len() - r.prompt_len).collect();
        let weights: Vec<f64> = match self.rl.aggregation {
            Aggregation::Balanced => group_weights
                .iter()
                .flatten()
                .map(|w| w / groups.len() as f64)
                .collect(),
            k => aggregation_weights(k, &lengths, &[], self.rl.max_new_tokens),
        };
        for (row, w) in rows.iter_mut().zip(weights) {
            row.weight = w as f32;
        }
        rows
    }

    /// The reference model's log-probs of every row's completion (β > 0 only).
    fn reference_logprobs(&mut self) -> Result<()> {
        let Some(reference) = &self.reference else {
            return Ok(());
        };
        for range in self.micro.clone() {
            let lp = completion_logprobs(
                reference,
                &self.current[range.clone()],
                self.rl.temperature as f64,
            );
            for (row, lp) in self.current[range].iter_mut().zip(lp) {
                row.ref_logp = Some(lp);
            }
        }
        Ok(())
    }
}

impl<M: StageModel> Objective<M> for Rlvr<'_, M> {
    fn prepare(&mut self, model: &M, step: u64) -> Result<(usize, u64)> {
        let k = self.rl.updates_per_rollout as u64;
        let rollout = step / k;
        if self.buffer_rollout != Some(rollout) {
            self.fill(model, rollout)?;
        }
        // This step's share of the rollout batch's groups.
        let n = self.buffer.len();
        let mini = (step % k) as usize;
        let k = k as usize;
        let mut range = mini * n / k..(mini + 1) * n / k;
        if range.is_empty() {
            range = mini % n..mini % n + 1;
        }
        self.current = self.train_rows(&self.buffer[range]);
        let rows = self.current.len();
        self.micro = micro_ranges(rows, self.accum);
        let micro = self.micro.len();
        self.reference_logprobs()?;
        self.stats = LossSums::default();
        self.t_train = Instant::now();
        let tokens = self.current.iter().map(|r| r.ids.len() as u64).sum();
        Ok((micro, tokens))
    }

    fn loss(&mut self, model: &M, i: usize) -> Result<Tensor<1>> {
        let rows = &self.current[self.micro[i].clone()];
        let (loss, sums) = policy_loss(model, rows, &self.surrogate)?;
        self.stats.add(&sums);
        // The trainer averages micro-batch losses; these are parts of one sum.
        Ok(loss * self.micro.len() as f64)
    }

    fn annotate(&mut self, record: &mut Map<String, Value>) -> String {
        let st = &self.stats;
        record.extend(std::mem::take(&mut self.pending));
        let w = st.weight.max(1e-12);
        record.insert("clip_ratio".into(), json!(st.clip / w));
        if self.reference.is_some() {
            record.insert("kl".into(), json!(st.kl / w));
        }
        record.insert("entropy".into(), json!(st.entropy / st.tokens.max(1.0)));
        // How far the policy has moved from the sampler (0 up to numerics on the first update
        // of a rollout; verl's rollout_probs_diff).
        record.insert(
            "rollout/logprob_diff".into(),
            json!(st.logp_diff / st.tokens.max(1.0)),
        );
        record.insert(
            "time/train_s".into(),
            json!(self.t_train.elapsed().as_secs_f64()),
        );
        self.shown.clone()
    }

    fn state(&self) -> Value {
        self.order.state()
    }

    fn restore(&mut self, state: &Value, _step: u64) -> Result<()> {
        // The rollout batch in flight is not saved: the next step samples a fresh one.
        self.buffer_rollout = None;
        self.order.restore(state)
    }

    fn counts_flops(&self) -> bool {
        false
    }

    fn step_shape(&self) -> Option<String> {
        Some(self.spec.shape(self.prompts_per_step))
    }
}

/// What a rollout batch measured, over every sampled completion (all rounds).
#[derive(Default)]
struct RolloutMetrics {
    rewards: Vec<f64>,
    parts: Vec<Vec<f64>>,
    correct: (usize, usize),
    groups: usize,
    zero_variance: usize,
    lengths: Vec<usize>,
    truncated: usize,
    new_tokens: u64,
    seconds: f64,
    rounds: usize,
    kept: usize,
}

impl RolloutMetrics {
    fn add(&mut self, groups: &[Group], new_tokens: u64, seconds: f64) {
        for g in groups {
            self.groups += 1;
            self.zero_variance += g.zero_variance() as usize;
            for s in &g.samples {
                self.rewards.extend(s.scores.total);
                if self.parts.len() < s.scores.parts.len() {
                    self.parts.resize(s.scores.parts.len(), Vec::new());
                }
                for (p, v) in self.parts.iter_mut().zip(&s.scores.parts) {
                    p.extend(v);
                }
                if let Some(c) = s.scores.correct {
                    self.correct.0 += c as usize;
                    self.correct.1 += 1;
                }
                self.lengths.push(s.tokens.len());
                self.truncated += (s.finish == FinishReason::Length) as usize;
            }
        }
        self.new_tokens += new_tokens;
        self.seconds += seconds;
    }

    fn mean(x: &[f64]) -> f64 {
        x.iter().sum::<f64>() / x.len().max(1) as f64
    }

    fn accuracy(&self) -> Option<f64> {
        (self.correct.1 > 0).then(|| self.correct.0 as f64 / self.correct.1 as f64)
    }

    fn record(&self, names: &[String]) -> Map<String, Value> {
        let mean = Self::mean(&self.rewards);
        let std = (self.rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>()
            / self.rewards.len().max(1) as f64)
            .sqrt();
        let n = self.lengths.len().max(1) as f64;
        let mut m = Map::new();
        m.insert("reward".into(), json!(mean));
        m.insert("reward_std".into(), json!(std));
        for (name, p) in names.iter().zip(&self.parts) {
            m.insert(format!("reward/{name}"), json!(Self::mean(p)));
        }
        if let Some(a) = self.accuracy() {
            m.insert("rollout_accuracy".into(), json!(a));
        }
        m.insert(
            "frac_reward_zero_std".into(),
            json!(self.zero_variance as f64 / self.groups.max(1) as f64),
        );
        m.insert(
            "completions/mean_length".into(),
            json!(self.lengths.iter().sum::<usize>() as f64 / n),
        );
        m.insert(
            "completions/max_length".into(),
            json!(self.lengths.iter().max().copied().unwrap_or(0)),
        );
        m.insert(
            "completions/clipped_ratio".into(),
            json!(self.truncated as f64 / n),
        );
        m.insert("rollout/rounds".into(), json!(self.rounds));
        m.insert("rollout/groups".into(), json!(self.kept));
        m.insert("rollout/new_tokens".into(), json!(self.new_tokens));
        m.insert("time/rollout_s".into(), json!(self.seconds));
        m.insert(
            "rollout_tokens_per_s".into(),
            json!(self.new_tokens as f64 / self.seconds.max(1e-9)),
        );
        m
    }

    fn shown(&self) -> String {
        let acc = self
            .accuracy()
            .map(|a| format!("acc {:.1}% ", 100.0 * a))
            .unwrap_or_default();
        format!(
            "reward {:.3} {acc}len {:.0} rollout {:.0} tok/s | ",
            Self::mean(&self.rewards),
            self.lengths.iter().sum::<usize>() as f64 / self.lengths.len().max(1) as f64,
            self.new_tokens as f64 / self.seconds.max(1e-9)
        )
    }
}
