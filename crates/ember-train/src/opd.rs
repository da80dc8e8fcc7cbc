//! On-policy distillation (`kind = "opd"`): each step the student (the stage's model)
//! samples completions of a batch of prompts; a frozen teacher that shares its tokenizer
//! (a Qwen3 or a hybrid, whatever the student's family) scores every sampled token in a
//! no-grad forward; the student minimises the chosen divergence on them
//! ([`crate::objectives::distill`]). A bridge of `bridge_steps` first trains under forward
//! KL on the teacher's own samples.

use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use burn::tensor::Tensor;
use ember_data::prompts::PromptRow;
use ember_data::rng::mix64;
use ember_data::Tokenizer;
use ember_models::generate::{FinishReason, Sampling};
use ember_models::hybrid::stack::HybridLM;
use ember_models::qwen3::Qwen3;
use serde_json::{json, Map, Value};

use crate::evaluate::teacher_evaluator;
use crate::objectives::distill::{distill_loss, DistillConfig, DistillSums};
use crate::objectives::grpo::{grpo, PolicyRow};
use crate::prompt_set::{check_prompt_data, stage_prompts, Encoded, PromptOrder};
use crate::recipe::{DistillLossKind, DistillSection};
use crate::rollout::{sample_groups, Rewarder, RolloutSpec};
use crate::stages::{
    check_common, evaluators, frozen_model, micro_ranges, reference_model, run_loop, LoopSpec,
    Objective, Setup, StageModel, StageRun, Summary,
};

/// The PPO clip of the sampled loss's importance ratio (inactive on the on-policy update).
const SAMPLED_EPSILON: f64 = 0.2;

fn checked_section(s: &StageRun) -> Result<DistillSection> {
    let origin = format!("{} [distill]", s.path.display());
    let d = s
        .stage
        .distill
        .clone()
        .ok_or_else(|| anyhow!("{origin}: an opd stage needs a [distill] section"))?;
    let bad = |key: &str, want: &str| anyhow!("{origin}: `{key}` must be {want}");
    if !(0.0..=1.0).contains(&d.jsd_beta) {
        return Err(bad("jsd_beta", "in [0, 1]"));
    }
    if !(d.lambda >= 0.0 && d.lambda.is_finite()) {
        return Err(bad("lambda", "a finite number >= 0"));
    }
    if d.samples_per_prompt == 0 || d.max_new_tokens == 0 {
        return Err(bad("samples_per_prompt` and `max_new_tokens", "at least 1"));
    }
    if !(d.temperature > 0.0 && d.temperature.is_finite()) {
        return Err(bad("temperature", "positive"));
    }
    if !(d.top_p > 0.0 && d.top_p <= 1.0) {
        return Err(bad("top_p", "in (0, 1]"));
    }
    if d.reference.is_some() && d.lambda == 1.0 {
        return Err(bad(
            "reference",
            "left out when lambda = 1 (plain OPD needs no reference)",
        ));
    }
    if d.route_open.is_some() != d.route_close.is_some() {
        return Err(bad("route_open` and `route_close", "given together"));
    }
    if d.route_open.is_some() && d.samples_per_prompt < 2 {
        return Err(bad(
            "samples_per_prompt",
            "at least 2 with token routing (the GRPO term compares a prompt's samples)",
        ));
    }
    let completions = s.stage.train.batch_size * d.samples_per_prompt;
    if s.stage.train.grad_accum > completions {
        bail!(
            "{} [train]: `grad_accum` {} splits {completions} completions a step into more micro-batches than there are completions",
            s.path.display(),
            s.stage.train.grad_accum,
        );
    }
    Ok(d)
}

/// The teacher must score the student's tokens: the same vocabulary size, and (when its
/// directory ships one) the same tokenizer.
fn check_teacher<M: StageModel, T: StageModel>(
    teacher: &T,
    student: &M,
    dir: &Path,
    tok: &Tokenizer,
    origin: &str,
) -> Result<()> {
    let (t, s) = (teacher.vocab_size(), student.vocab_size());
    if t != s {
        bail!(
            "{origin} teacher {}: vocab_size {t} differs from the student's {s}; the teacher must share the student's tokenizer",
            dir.display()
        );
    }
    let file = dir.join("tokenizer.json");
    if file.is_file() {
        let theirs = Tokenizer::from_file(&file)?;
        let probe = "Teacher and student: 12 + 34 = 46. <|im_start|>user\nWhy?<|im_end|>";
        if theirs.vocab_size() != tok.vocab_size() || theirs.encode(probe)? != tok.encode(probe)? {
            bail!(
                "{origin} teacher {}: its tokenizer.json differs from the student's; distillation compares the two models token by token",
                file.display()
            );
        }
    }
    Ok(())
}

/// An OPD stage with a student of family `M`; the teacher's own config.json says whether it
/// is a Qwen3 or a hybrid.
pub fn run<M: StageModel>(s: &StageRun) -> Result<Summary> {
    check_common(&s.stage, s.path)?;
    check_prompt_data(s)?;
    let d = checked_section(s)?;
    let teacher_is_hybrid = crate::hybrid_lm::dir_is_hybrid(&d.teacher).map_err(|e| {
        anyhow!(
            "{} [distill] teacher {}: {e:#}",
            s.path.display(),
            d.teacher.display()
        )
    })?;
    if teacher_is_hybrid {
        run_with::<M, HybridLM>(s, d)
    } else {
        run_with::<M, Qwen3>(s, d)
    }
}

/// An OPD stage: a student of family `M` and a teacher of family `T`.
fn run_with<M: StageModel, T: StageModel>(s: &StageRun, d: DistillSection) -> Result<Summary> {
    let path = s.path;
    let origin = format!("{} [distill]", path.display());
    let rewarder = Rewarder::new(&d.rewards, d.max_new_tokens, &origin)?;
    let mut setup = Setup::<M>::new(s)?;
    let (tok, Encoded { prompts, eos, .. }) = stage_prompts(s, &mut setup, d.format)?;
    let route = match (&d.route_open, &d.route_close) {
        (Some(o), Some(c)) => {
            let (o, c) = (tok.encode(o)?, tok.encode(c)?);
            if o.is_empty() || c.is_empty() {
                bail!("{origin}: `route_open` and `route_close` must not be empty");
            }
            Some((o, c))
        }
        _ => None,
    };
    let teacher: T = frozen_model(&d.teacher, &setup, &format!("{origin} teacher"))?;
    check_teacher(&teacher, &setup.model, &d.teacher, &tok, &origin)?;
    let reference = match (&d.reference, d.lambda != 1.0) {
        (Some(p), _) => Some(frozen_model(p, &setup, &format!("{origin} reference"))?),
        (None, true) => Some(reference_model(s, &setup)?),
        (None, false) => None,
    };
    let tcfg = &s.stage.train;
    let data_line = format!(
        "{} prompts, teacher {} ({:.2}M parameters), loss {}{}",
        prompts.len(),
        d.teacher.display(),
        teacher.param_count() as f64 / 1e6,
        loss_name(&d),
        if d.bridge_steps > 0 {
            format!(
                " after {} forward-KL steps on teacher samples",
                d.bridge_steps
            )
        } else {
            String::new()
        }
    );
    let mut evals = evaluators(s, &setup, vec![], &tok, d.format)?;
    evals.extend(teacher_evaluator(s, &tok, d.format, &teacher)?);
    let spec = RolloutSpec {
        group_size: d.samples_per_prompt,
        max_new_tokens: d.max_new_tokens,
        sampling: Sampling {
            temperature: d.temperature,
            top_k: d.top_k,
            top_p: d.top_p,
            seed: 0,
        },
        rollout_batch: d.rollout_batch,
        pad_id: eos[0],
        eos_ids: eos,
    };
    let mut objective = Opd {
        cfg: DistillConfig {
            loss: d.loss,
            jsd_beta: d.jsd_beta,
            lambda: d.lambda,
            temperature: d.temperature as f64,
            epsilon: SAMPLED_EPSILON,
        },
        order: PromptOrder::new(prompts.len(), s.recipe.run.seed),
        prompts,
        tok: &tok,
        rewarder,
        spec,
        teacher: &teacher,
        reference,
        route,
        routes: Vec::new(),
        bridge_steps: d.bridge_steps,
        prompts_per_step: tcfg.batch_size,
        accum: tcfg.grad_accum,
        seed: s.recipe.run.seed,
        bridge: false,
        current: Vec::new(),
        micro: Vec::new(),
        pending: Map::new(),
        shown: String::new(),
        sums: DistillSums::default(),
        t_train: Instant::now(),
    };
    run_loop(
        setup,
        LoopSpec::single(s, &tok, data_line),
        &mut objective,
        &mut evals,
    )
}

/// 1 for each token of `tokens` inside an `open` … `close` span (markers included; an
/// unclosed span runs to the end), 0 elsewhere.
pub fn spans(tokens: &[u32], open: &[u32], close: &[u32]) -> Vec<f32> {
    let find = |from: usize, pat: &[u32]| {
        (from..=tokens.len().saturating_sub(pat.len())).find(|&i| tokens[i..].starts_with(pat))
    };
    let mut mask = vec![0.0; tokens.len()];
    let mut i = 0;
    while let Some(s) = find(i, open) {
        let end = find(s + open.len(), close).map_or(tokens.len(), |e| e + close.len());
        mask[s..end].iter_mut().for_each(|m| *m = 1.0);
        i = end;
    }
    mask
}

fn loss_name(d: &DistillSection) -> String {
    let name = match d.loss {
        DistillLossKind::ReverseKlSampled => "reverse_kl_sampled".to_string(),
        DistillLossKind::ReverseKl => "reverse_kl".into(),
        DistillLossKind::ForwardKl => "forward_kl".into(),
        DistillLossKind::Jsd => format!("jsd({})", d.jsd_beta),
    };
    if d.lambda != 1.0 {
        format!("{name}, λ = {}", d.lambda)
    } else {
        name
    }
}

struct Opd<'a, M, T> {
    cfg: DistillConfig,
    prompts: Vec<(PromptRow, Vec<u32>)>,
    order: PromptOrder,
    tok: &'a Tokenizer,
    rewarder: Rewarder,
    spec: RolloutSpec,
    teacher: &'a T,
    reference: Option<M>,
    /// Token routing's open and close markers, and each current row's mask (1: distil).
    route: Option<(Vec<u32>, Vec<u32>)>,
    routes: Vec<Vec<f32>>,
    bridge_steps: u64,
    prompts_per_step: usize,
    accum: usize,
    seed: u64,
    /// Whether the prepared step trains on teacher samples (the bridge).
    bridge: bool,
    current: Vec<PolicyRow>,
    micro: Vec<Range<usize>>,
    pending: Map<String, Value>,
    shown: String,
    sums: DistillSums,
    t_train: Instant,
}

impl<M: StageModel, T: StageModel> Objective<M> for Opd<'_, M, T> {
    fn prepare(&mut self, model: &M, step: u64) -> Result<(usize, u64)> {
        self.bridge = step < self.bridge_steps;
        let picks: Vec<usize> = (0..self.prompts_per_step)
            .map(|_| self.order.draw())
            .collect();
        let batch: Vec<(usize, &[u32], &PromptRow)> = picks
            .iter()
            .map(|&i| (i, self.prompts[i].1.as_slice(), &self.prompts[i].0))
            .collect();
        let seed = mix64(self.seed ^ mix64(step ^ 0x4F50_4400));
        let (tok, rewarder, spec) = (self.tok, &self.rewarder, &self.spec);
        let (groups, cost) = if self.bridge {
            sample_groups(self.teacher, tok, rewarder, &batch, spec, seed)
        } else {
            sample_groups(model, tok, rewarder, &batch, spec, seed)
        }?;
        let (mut correct, mut graded, mut truncated) = (0usize, 0usize, 0usize);
        let mut rows = Vec::new();
        self.routes.clear();
        let routing = self.route.as_ref().filter(|_| !self.bridge);
        for g in &groups {
            let prompt = &self.prompts[g.prompt].1;
            // GRPO advantages of the group's rewarded samples (0 for the others).
            let rewarded: Vec<f64> = g.rewards();
            let mut adv = grpo(&rewarded).into_iter();
            for smp in &g.samples {
                let a = match smp.scores.total {
                    Some(_) => adv.next().unwrap_or(0.0) as f32,
                    None => 0.0,
                };
                if let Some(c) = smp.scores.correct {
                    correct += c as usize;
                    graded += 1;
                }
                truncated += (smp.finish == FinishReason::Length) as usize;
                if smp.tokens.is_empty() {
                    continue;
                }
                if let Some((open, close)) = routing {
                    self.routes.push(spans(&smp.tokens, open, close));
                }
                rows.push(PolicyRow {
                    ids: prompt.iter().chain(&smp.tokens).copied().collect(),
                    prompt_len: prompt.len(),
                    rollout_logp: smp.logprobs.clone(),
                    ref_logp: None,
                    adv: vec![a; smp.tokens.len()],
                    weight: 0.0,
                });
            }
        }
        if rows.is_empty() {
            bail!("every sampled completion was empty: nothing to distill on");
        }
        // The loss is the mean over every sampled token of the step.
        let total: usize = rows.iter().map(PolicyRow::completion_len).sum();
        for r in &mut rows {
            r.weight = 1.0 / total as f32;
        }
        let n = rows.len();
        self.micro = micro_ranges(n, self.accum);
        let micro = self.micro.len();
        self.current = rows;
        let mut m = Map::new();
        let acc = (graded > 0).then(|| correct as f64 / graded as f64);
        let key = if self.bridge {
            "teacher_sample_accuracy"
        } else {
            "student_accuracy"
        };
        if let Some(a) = acc {
            m.insert(key.into(), json!(a));
        }
        m.insert("bridge".into(), json!(self.bridge as u8));
        m.insert(
            "completions/mean_length".into(),
            json!(total as f64 / n as f64),
        );
        m.insert(
            "completions/clipped_ratio".into(),
            json!(truncated as f64 / n as f64),
        );
        m.insert("rollout/new_tokens".into(), json!(cost.new_tokens));
        m.insert("time/rollout_s".into(), json!(cost.seconds));
        m.insert(
            "rollout_tokens_per_s".into(),
            json!(cost.new_tokens as f64 / cost.seconds.max(1e-9)),
        );
        self.pending = m;
        self.shown = format!(
            "{}{}len {:.0} |",
            if self.bridge { "bridge " } else { "" },
            acc.map(|a| format!("acc {:.1}% ", 100.0 * a))
                .unwrap_or_default(),
            total as f64 / n as f64
        );
        self.sums = DistillSums::default();
        self.t_train = Instant::now();
        let tokens = self.current.iter().map(|r| r.ids.len() as u64).sum();
        Ok((micro, tokens))
    }

    fn loss(&mut self, model: &M, i: usize) -> Result<Tensor<1>> {
        let rows = &self.current[self.micro[i].clone()];
        let cfg = if self.bridge {
            // Teacher samples: the student matches the teacher's whole distribution on them.
            DistillConfig {
                loss: DistillLossKind::ForwardKl,
                lambda: 1.0,
                ..self.cfg
            }
        } else {
            self.cfg
        };
        let reference = self.reference.as_ref().filter(|_| !self.bridge);
        let routes = (!self.routes.is_empty()).then(|| &self.routes[self.micro[i].clone()]);
        let (loss, sums) = distill_loss(model, self.teacher, reference, rows, routes, &cfg)?;
        self.sums.add(&sums);
        // The trainer averages micro-batch losses; these are parts of one sum.
        Ok(loss * self.micro.len() as f64)
    }

    fn annotate(&mut self, record: &mut Map<String, Value>) -> String {
        let st = &self.sums;
        record.extend(std::mem::take(&mut self.pending));
        let tokens = st.tokens.max(1.0);
        record.insert("kl".into(), json!(st.kl / tokens));
        record.insert("logprob_gap".into(), json!(st.gap / tokens));
        if !self.routes.is_empty() {
            let routed: f32 = self.routes.iter().flatten().sum();
            record.insert(
                "route/distilled_fraction".into(),
                json!(routed as f64 / tokens),
            );
        }
        if self.cfg.loss == DistillLossKind::ReverseKlSampled && !self.bridge {
            record.insert("clip_ratio".into(), json!(st.clip / st.weight.max(1e-12)));
        }
        record.insert(
            "time/train_s".into(),
            json!(self.t_train.elapsed().as_secs_f64()),
        );
        format!("{} kl {:.4} ", self.shown, st.kl / tokens)
    }

    fn state(&self) -> Value {
        self.order.state()
    }

    fn restore(&mut self, state: &Value, _step: u64) -> Result<()> {
        self.order.restore(state)
    }

    fn counts_flops(&self) -> bool {
        false
    }

    fn step_shape(&self) -> Option<String> {
        Some(self.spec.shape(self.prompts_per_step))
    }
}
