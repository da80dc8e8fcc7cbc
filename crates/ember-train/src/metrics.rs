//! Run metrics: one JSON object per line in `metrics.jsonl`, a progress bar, MFU, and the
//! loss curves drawn at the end.

use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use ember_models::qwen3::Qwen3Config;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::plot::{write_svg, Series};

pub const METRICS: &str = "metrics.jsonl";
pub const CURVES: &str = "curves.svg";
pub const ACCURACY: &str = "accuracy.svg";
pub const REWARDS: &str = "rewards.svg";

/// Training FLOPs per token: 6·N for the matmul parameters (every linear layer, the head
/// counted even when tied) plus 12·L·H·d·S for attention scores and values (PaLM appendix B,
/// as nanoGPT and torchtitan count it; no credit for causal sparsity).
pub fn flops_per_token(c: &Qwen3Config, seq: usize) -> f64 {
    let h = c.hidden_size as f64;
    let (q, kv) = (
        (c.num_attention_heads * c.head_dim()) as f64,
        (c.kv_heads() * c.head_dim()) as f64,
    );
    let per_layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * c.intermediate_size as f64;
    let n = c.num_hidden_layers as f64 * per_layer + h * c.vocab_size as f64;
    let attn =
        12.0 * (c.num_hidden_layers * c.num_attention_heads * c.head_dim()) as f64 * seq as f64;
    6.0 * n + attn
}

pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `run_dir/metrics.jsonl`, dropping records after `keep_through` (a resumed run
    /// rewrites the steps it repeats).
    pub fn open(run_dir: &Path, keep_through: Option<u64>) -> Result<Self> {
        let path = run_dir.join(METRICS);
        let kept: Vec<String> = match (keep_through, fs::read_to_string(&path)) {
            (Some(step), Ok(text)) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_some_and(|s| s <= step)
                })
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        ember_models::hf::write_atomic(&path, body.as_bytes())?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        Ok(Self { path, file })
    }

    /// The latest value of `key` in the log: what a resumed run that has nothing left to do
    /// reports as its final figures.
    pub fn last(&self, key: &str) -> Option<f64> {
        let text = fs::read_to_string(&self.path).ok()?;
        text.lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find_map(|v| v.get(key).and_then(Value::as_f64))
    }

    pub fn write(&mut self, record: Value) -> Result<()> {
        writeln!(self.file, "{record}")
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }

    /// Draws the loss curves (training, validation, and validation per dataset) into
    /// `curves.svg`, task accuracy, when there is any, into `accuracy.svg`, and RL rollouts'
    /// reward and accuracy into `rewards.svg`.
    pub fn draw(&self, run_dir: &Path, title: &str) -> Result<PathBuf> {
        let text = fs::read_to_string(&self.path)?;
        let mut losses: Vec<Series> = Vec::new();
        let mut accuracy: Vec<Series> = Vec::new();
        let mut rewards: Vec<Series> = Vec::new();
        let add = |set: &mut Vec<Series>, name: String, p: (f64, f64)| match set
            .iter_mut()
            .find(|s| s.name == name)
        {
            Some(s) => s.points.push(p),
            None => set.push(Series {
                name,
                points: vec![p],
            }),
        };
        for v in text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            let Some(step) = v.get("step").and_then(Value::as_f64) else {
                continue;
            };
            for (k, x) in v.as_object().into_iter().flatten() {
                let Some(x) = x.as_f64() else { continue };
                let name = match k.as_str() {
                    "loss" => "train loss".to_string(),
                    "val_loss" => "val loss".to_string(),
                    "accuracy" => {
                        add(&mut accuracy, "accuracy".into(), (step, x));
                        continue;
                    }
                    // OPD's divergences and RLP's no-thought baseline, in nats/token.
                    "kl" | "logprob_gap" | "ema_ce" => k.replace('_', " "),
                    "teacher_accuracy" => {
                        add(&mut accuracy, "teacher".into(), (step, x));
                        continue;
                    }
                    "reward" | "rollout_accuracy" | "student_accuracy" | "info_gain" => {
                        add(&mut rewards, k.replace('_', " "), (step, x));
                        continue;
                    }
                    k => match (k.strip_prefix("val_loss/"), k.strip_prefix("accuracy/")) {
                        (Some(src), _) => format!("val loss {src}"),
                        (_, Some(level)) => {
                            add(&mut accuracy, level.to_string(), (step, x));
                            continue;
                        }
                        _ => continue,
                    },
                };
                add(&mut losses, name, (step, x));
            }
        }
        let out = run_dir.join(CURVES);
        write_svg(&out, title, "step", "loss (nats/token)", &losses, false)?;
        if !rewards.is_empty() {
            let t = title.replace("— loss", "— rollouts");
            write_svg(&run_dir.join(REWARDS), &t, "step", "mean", &rewards, false)?;
        }
        if !accuracy.is_empty() {
            let t = title.replace("— loss", "— task accuracy");
            write_svg(
                &run_dir.join(ACCURACY),
                &t,
                "step",
                "accuracy",
                &accuracy,
                false,
            )?;
        }
        Ok(out)
    }
}

thread_local! {
    /// The stage this thread trains, when a pipeline runs several at once.
    static STAGE_LABEL: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Names the stage the calling thread runs, so that its progress can be told apart from a
/// stage running beside it.
pub fn set_stage_label(label: Option<String>) {
    STAGE_LABEL.with(|l| *l.borrow_mut() = label);
}

fn stage_label() -> Option<String> {
    STAGE_LABEL.with(|l| l.borrow().clone())
}

/// Every bar of the process, drawn together (stages can run side by side).
fn bars() -> &'static MultiProgress {
    static BARS: std::sync::OnceLock<MultiProgress> = std::sync::OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

/// The progress bar, or plain lines when stderr is not a terminal (CI logs).
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    /// ` [stage]` after each plain line (lines start with `step` for log filters).
    suffix: String,
}

impl Progress {
    pub fn new(start: u64, total: u64) -> Self {
        let label = stage_label();
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = bars().add(ProgressBar::new(total));
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix}[{elapsed_precise}] {bar:30} {pos}/{len} {msg} ETA {eta}",
                )
                .expect("valid template"),
            );
            if let Some(l) = &label {
                b.set_prefix(format!("{l} "));
            }
            b.set_position(start);
            b.enable_steady_tick(Duration::from_millis(250));
            b
        });
        let suffix = label.map(|l| format!(" [{l}]")).unwrap_or_default();
        Self { bar, total, suffix }
    }

    pub fn update(&self, step: u64, msg: String, print_line: bool) {
        match &self.bar {
            Some(b) => {
                b.set_position(step);
                b.set_message(msg);
            }
            None if print_line => eprintln!("step {step}/{} {msg}{}", self.total, self.suffix),
            None => {}
        }
    }

    pub fn println(&self, line: String) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Metrics record for one step.
pub fn step_record(
    step: u64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    tokens_per_s: f64,
    mfu: Option<f64>,
    tokens: u64,
) -> Value {
    json!({
        "step": step,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "tokens": tokens,
    })
}
