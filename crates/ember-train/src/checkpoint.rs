//! Training checkpoints: the model in HF layout plus everything needed to continue the run
//! exactly (optimizer moments, step, data cursor, RNG).
//!
//! A checkpoint is written into a hidden temporary directory and renamed into place, so a
//! kill at any moment leaves either a complete checkpoint or none; resume only ever sees
//! complete ones.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use ember_data::Tokenizer;
use ember_models::hf::write_atomic;
use serde::{Deserialize, Serialize};

use crate::optim::Optimizer;
use crate::trainer::TrainModel;

pub const STATE_DIR: &str = "train_state";
const STATE_FILE: &str = "state.json";
const OPTIM_FILE: &str = "optimizer.safetensors";

/// The scalar part of the training state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    pub optimizer_steps: u64,
    /// Where the stage's data stands (its feed's own state: a loader cursor, a mixture's
    /// per-source cursors and counts).
    pub cursor: serde_json::Value,
    pub rng: [u64; 4],
    pub tokens_seen: u64,
    pub elapsed_s: f64,
}

/// Test hook: `EMBER_FAULT=abort-after-step:N` or `abort-in-checkpoint:N` kills the process
/// without unwinding at that point, as a power cut or `kill -9` would.
pub fn fault(kind: &str, step: u64) {
    if let Ok(f) = std::env::var("EMBER_FAULT") {
        if f == format!("{kind}:{step}") {
            eprintln!("EMBER_FAULT: aborting ({f})");
            std::process::abort();
        }
    }
}

pub fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:08}"))
}

/// Writes a checkpoint for `state.step` under `run_dir/checkpoints/` and keeps the newest
/// `keep_last`; `extra` adds the objective's own files to its `train_state/`. Returns the
/// checkpoint directory.
pub fn save<M: TrainModel>(
    run_dir: &Path,
    model: &M,
    tokenizer: &Tokenizer,
    optimizer: &Optimizer,
    state: &TrainState,
    keep_last: usize,
    extra: &dyn Fn(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let final_dir = step_dir(run_dir, state.step);
    let parent = final_dir.parent().expect("step dir has a parent");
    fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    let tmp = parent.join(format!(".tmp-step-{:08}", state.step));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
    }
    write_into(&tmp, model, tokenizer, optimizer, state)?;
    extra(&tmp.join(STATE_DIR))?;
    fault("abort-in-checkpoint", state.step);
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir)
            .with_context(|| format!("{}: cannot replace", final_dir.display()))?;
    }
    fs::rename(&tmp, &final_dir)
        .with_context(|| format!("{}: cannot move into place", final_dir.display()))?;
    prune(parent, keep_last.max(1))?;
    Ok(final_dir)
}

/// Writes a complete checkpoint into `dir` (model, tokenizer, train_state/).
pub fn write_into<M: TrainModel>(
    dir: &Path,
    model: &M,
    tokenizer: &Tokenizer,
    optimizer: &Optimizer,
    state: &TrainState,
) -> Result<()> {
    model.save_hf(dir)?;
    tokenizer.save(&dir.join("tokenizer.json"))?;
    let sd = dir.join(STATE_DIR);
    fs::create_dir_all(&sd).with_context(|| format!("{}: cannot create", sd.display()))?;
    optimizer.save(&sd.join(OPTIM_FILE))?;
    write_atomic(
        &sd.join(STATE_FILE),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )
}

/// Publishes the final model at the top of the run directory (file by file, each atomic),
/// so `ember generate --model runs/<name>` works.
pub fn publish(run_dir: &Path, ckpt: &Path) -> Result<()> {
    for entry in fs::read_dir(ckpt).with_context(|| format!("{}: cannot list", ckpt.display()))? {
        let entry = entry?;
        let src = entry.path();
        if src.is_file() {
            let bytes =
                fs::read(&src).with_context(|| format!("{}: cannot read", src.display()))?;
            write_atomic(&run_dir.join(entry.file_name()), &bytes)?;
        }
    }
    Ok(())
}

fn prune(parent: &Path, keep: usize) -> Result<()> {
    let mut steps = list(parent)?;
    while steps.len() > keep {
        let old = steps.remove(0);
        fs::remove_dir_all(&old).with_context(|| format!("{}: cannot remove", old.display()))?;
    }
    Ok(())
}

/// Complete checkpoints under `checkpoints/`, oldest first.
fn list(parent: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = match fs::read_dir(parent) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    Ok(out)
}

/// Resolves `--resume DIR`: a checkpoint directory itself, or a run directory whose newest
/// complete checkpoint is used.
pub fn resolve(dir: &Path) -> Result<PathBuf> {
    if dir.join(STATE_DIR).join(STATE_FILE).is_file() && dir.join("config.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    if !dir.exists() {
        bail!("{}: no such directory (--resume)", dir.display());
    }
    list(&dir.join("checkpoints"))?.pop().ok_or_else(|| {
        anyhow!(
            "{}: no complete checkpoint to resume from (--resume)",
            dir.display()
        )
    })
}

/// Where a checkpoint keeps what its objective saves besides the model (RLP's EMA).
pub fn state_dir(ckpt: &Path) -> PathBuf {
    ckpt.join(STATE_DIR)
}

pub fn state_file(ckpt: &Path) -> PathBuf {
    ckpt.join(STATE_DIR).join(STATE_FILE)
}

pub fn read_state(ckpt: &Path) -> Result<TrainState> {
    let f = state_file(ckpt);
    let text = fs::read_to_string(&f).with_context(|| format!("{}: cannot read", f.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", f.display()))
}

pub fn optimizer_file(ckpt: &Path) -> PathBuf {
    ckpt.join(STATE_DIR).join(OPTIM_FILE)
}
