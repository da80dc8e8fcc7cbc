//! `ember pipeline`: a recipe's `[[stage]]`s in order, each starting from the previous
//! stage's output directory. A finished stage is skipped and a partial one resumes, so an
//! interrupted pipeline is continued by running the same command again.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::checkpoint;
use crate::metrics::METRICS;
use crate::recipe::{Recipe, StageKind, StageSection};
use crate::stages::{run_stage, StageRun, Summary};

pub const REPORT: &str = "report.md";

/// One row of the pipeline report, read back from the stage's metrics.
#[derive(Debug, Clone)]
pub struct StageReport {
    pub name: String,
    pub kind: StageKind,
    pub steps: u64,
    pub loss: Option<f64>,
    pub val_loss: Option<f64>,
    /// Task accuracy before the stage's first step and after its last.
    pub accuracy_before: Option<f64>,
    pub accuracy_after: Option<f64>,
    /// The last value of every per-source validation loss (`val_loss/<name>`).
    pub val_by_source: Vec<(String, f64)>,
    /// RL: the mean rollout reward over the first and over the last tenth of the steps.
    pub reward: Option<(f64, f64)>,
    /// OPD: the teacher's task accuracy.
    pub teacher_accuracy: Option<f64>,
    /// RLP: the mean information gain over the first and over the last tenth of the steps.
    pub info_gain: Option<(f64, f64)>,
    pub tokens: u64,
    pub skipped: bool,
    /// What the stage reported when it ran in this invocation.
    pub summary: Option<Summary>,
}

/// The optimizer steps a stage runs (a cpt stage's come from its phases).
pub fn stage_steps(st: &StageSection, path: &Path) -> Result<u64> {
    match st.kind {
        StageKind::Cpt => crate::cpt::total_steps(st, path),
        _ => Ok(st.train.steps),
    }
}

/// Whether a stage directory holds a finished run of `steps` steps.
fn complete(dir: &Path, steps: u64) -> bool {
    dir.join("config.json").is_file()
        && checkpoint::resolve(dir)
            .and_then(|c| checkpoint::read_state(&c))
            .is_ok_and(|s| s.step >= steps)
}

fn report_row(
    dir: &Path,
    name: &str,
    kind: StageKind,
    summary: Option<Summary>,
) -> Result<StageReport> {
    let f = dir.join(METRICS);
    let text = fs::read_to_string(&f).with_context(|| format!("{}: cannot read", f.display()))?;
    let mut r = StageReport {
        name: name.to_string(),
        kind,
        steps: 0,
        loss: None,
        val_loss: None,
        accuracy_before: None,
        accuracy_after: None,
        val_by_source: Vec::new(),
        reward: None,
        teacher_accuracy: None,
        info_gain: None,
        tokens: 0,
        skipped: summary.is_none(),
        summary,
    };
    let mut by_source = std::collections::BTreeMap::new();
    let mut rewards = Vec::new();
    let mut gains = Vec::new();
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        r.steps = v["step"].as_u64().unwrap_or(r.steps);
        r.loss = v["loss"].as_f64().or(r.loss);
        r.val_loss = v["val_loss"].as_f64().or(r.val_loss);
        r.tokens = v["tokens"].as_u64().unwrap_or(r.tokens);
        rewards.extend(v["reward"].as_f64());
        gains.extend(v["info_gain"].as_f64());
        r.teacher_accuracy = v["teacher_accuracy"].as_f64().or(r.teacher_accuracy);
        if let Some(a) = v["accuracy"].as_f64() {
            r.accuracy_before.get_or_insert(a);
            r.accuracy_after = Some(a);
        }
        for (k, x) in v.as_object().into_iter().flatten() {
            if let (Some(src), Some(x)) = (k.strip_prefix("val_loss/"), x.as_f64()) {
                by_source.insert(src.to_string(), x);
            }
        }
    }
    r.val_by_source = by_source.into_iter().collect();
    r.reward = first_and_last_tenth(&rewards);
    r.info_gain = first_and_last_tenth(&gains);
    Ok(r)
}

/// The means over the first and over the last tenth of a series (None when it is empty).
fn first_and_last_tenth(x: &[f64]) -> Option<(f64, f64)> {
    if x.is_empty() {
        return None;
    }
    let k = x.len().div_ceil(10);
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    Some((mean(&x[..k]), mean(&x[x.len() - k..])))
}

fn render(rows: &[StageReport], title: &str) -> String {
    let f = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    let pct = |x: Option<f64>| {
        x.map(|v| format!("{:.1}%", 100.0 * v))
            .unwrap_or_else(|| "-".into())
    };
    let mut out = format!(
        "# {title}\n\n| stage | kind | steps | tokens | final train loss | val loss | val ppl | val loss by source | reward (RL) or information gain (RLP), first → last | accuracy before | accuracy after | teacher accuracy | this run |\n|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|\n"
    );
    for r in rows {
        let sources = r
            .val_by_source
            .iter()
            .map(|(n, v)| format!("{n} {v:.4}"))
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            r.kind.name(),
            r.steps,
            r.tokens,
            f(r.loss),
            f(r.val_loss),
            f(r.val_loss.map(f64::exp)),
            if sources.is_empty() {
                "-".into()
            } else {
                sources
            },
            r.reward
                .or(r.info_gain)
                .map(|(a, b)| format!("{a:.3} → {b:.3}"))
                .unwrap_or_else(|| "-".into()),
            pct(r.accuracy_before),
            pct(r.accuracy_after),
            pct(r.teacher_accuracy),
            if r.skipped {
                "already complete"
            } else {
                "trained"
            }
        ));
    }
    out
}

/// Checks a pipeline recipe before anything runs: stages present and uniquely named, and each
/// stage's settings (phases, budgets) valid.
pub fn check(recipe: &Recipe, path: &Path) -> Result<()> {
    if recipe.stage.is_empty() {
        bail!(
            "{}: no [[stage]] entries (ember pipeline runs stages; use ember train for a single [train])",
            path.display()
        );
    }
    if recipe.train.is_some()
        || recipe.data.is_some()
        || recipe.kind.is_some()
        || !recipe.phase.is_empty()
        || recipe.eval.is_some()
        || recipe.rl.is_some()
        || recipe.distill.is_some()
        || recipe.objective.is_some()
        || recipe.rlp.is_some()
        || recipe.mlm.is_some()
    {
        bail!(
            "{}: a pipeline recipe keeps `kind`, `objective`, [data], [train], [[phase]], [eval], [rl], [distill], [rlp] and [mlm] inside each [[stage]]",
            path.display()
        );
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = recipe.stage.iter().find(|s| !seen.insert(s.name.as_str())) {
        bail!("{}: two stages are named `{}`", path.display(), dup.name);
    }
    for st in &recipe.stage {
        crate::stages::check_common(st, path)?;
        stage_steps(st, path)?;
    }
    Ok(())
}

/// A path in a stage's settings that names an earlier stage (`teacher = "sft"`) is that
/// stage's output directory; anything else is a path.
fn stage_ref(p: &Path, earlier: &[StageSection], root: &Path) -> PathBuf {
    match p.to_str() {
        Some(name) if earlier.iter().any(|s| s.name == name) => root.join(name),
        _ => p.to_path_buf(),
    }
}

/// A stage as it will run: `init_from`, the teacher and the reference resolved to
/// directories, and the architecture inherited from the stage it starts from.
pub struct PlannedStage {
    pub stage: StageSection,
    pub dir: PathBuf,
    /// Optimizer steps (a cpt stage's from its phases).
    pub steps: u64,
}

/// The recipe's stages up to and including `until` (all when None), resolved.
pub fn plan(recipe: &Recipe, path: &Path, until: Option<&str>) -> Result<Vec<PlannedStage>> {
    let last = match until {
        None => recipe.stage.len() - 1,
        Some(name) => recipe
            .stage
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = recipe.stage.iter().map(|s| s.name.as_str()).collect();
                anyhow::anyhow!(
                    "{}: --until {name}: no such stage (stages: {})",
                    path.display(),
                    names.join(", ")
                )
            })?,
    };
    let root = recipe.run_dir();
    let mut previous: Option<PathBuf> = None;
    let mut shapes: Vec<Option<toml::Table>> = Vec::new();
    let mut planned = Vec::new();
    for (i, st) in recipe.stage[..=last].iter().enumerate() {
        let earlier = &recipe.stage[..i];
        let mut stage = st.clone();
        let train = &mut stage.train;
        // The architecture a stage's weights have: its own [stage.model], else that of the
        // stage it starts from (a student's later stages keep the student's shape).
        let source = match &train.init_from {
            Some(p) => earlier
                .iter()
                .position(|e| Some(e.name.as_str()) == p.to_str()),
            None => i.checked_sub(1),
        };
        if stage.model.is_none() {
            stage.model = source.and_then(|j| shapes[j].clone());
        }
        train.init_from = match &train.init_from {
            Some(p) => Some(stage_ref(p, earlier, &root)),
            // A stage with its own [model] starts a new model; the others continue the chain.
            None if st.model.is_some() => None,
            None => previous.clone(),
        };
        shapes.push(stage.model.clone());
        if let Some(d) = &mut stage.distill {
            d.teacher = stage_ref(&d.teacher, earlier, &root);
            d.reference = d.reference.as_deref().map(|p| stage_ref(p, earlier, &root));
        }
        let steps = stage_steps(&stage, path)?;
        let dir = root.join(&st.name);
        previous = Some(dir.clone());
        planned.push(PlannedStage { stage, dir, steps });
    }
    Ok(planned)
}

/// For each planned stage, the earlier stages it reads: the one it starts from, its teacher
/// and its reference.
fn dependencies(planned: &[PlannedStage]) -> Vec<Vec<usize>> {
    planned
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let t = &p.stage.train;
            let d = p.stage.distill.as_ref();
            let reads: Vec<&Path> = t
                .init_from
                .as_deref()
                .into_iter()
                .chain(d.map(|d| d.teacher.as_path()))
                .chain(d.and_then(|d| d.reference.as_deref()))
                .collect();
            (0..i)
                .filter(|&j| reads.contains(&planned[j].dir.as_path()))
                .collect()
        })
        .collect()
}

/// Runs the recipe's stages (up to and including `until`, when given), `jobs` at a time
/// where they do not depend on each other (a student's chain beside the main model's);
/// returns the report rows, in recipe order, and writes `report.md`. A stage's results do
/// not depend on what runs beside it.
pub fn run(
    path: &Path,
    overrides: &[String],
    device: &str,
    until: Option<&str>,
    jobs: usize,
) -> Result<Vec<StageReport>> {
    let recipe = Recipe::load_with(path, overrides)?;
    check(&recipe, path)?;
    let root = recipe.run_dir();
    let planned = plan(&recipe, path, until)?;
    let deps = dependencies(&planned);
    let n = planned.len();
    // None: not started; Some(None): running; Some(Some(result)): done.
    let mut state: Vec<Option<Option<Result<Option<Summary>>>>> = (0..n).map(|_| None).collect();
    let run_one = |i: usize| -> Result<Option<Summary>> {
        let PlannedStage { stage, dir, steps } = &planned[i];
        let name = &stage.name;
        if complete(dir, *steps) {
            eprintln!("stage {} ({name}): complete, skipping", i + 1);
            return Ok(None);
        }
        let resume = dir.join("checkpoints").exists().then(|| dir.clone());
        let how = if resume.is_some() {
            "resuming"
        } else {
            "starting"
        };
        eprintln!("stage {} ({name}): {how}", i + 1);
        crate::metrics::set_stage_label(Some(name.clone()));
        let out = run_stage(&StageRun {
            recipe: &recipe,
            path,
            stage: stage.clone(),
            run_dir: dir.clone(),
            title: format!("{} / {name}", recipe.run.name),
            device: device.to_string(),
            resume,
        });
        crate::metrics::set_stage_label(None);
        out.map(Some)
    };
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut running = 0;
        let mut failed = false;
        loop {
            // Start every stage whose inputs are done, in recipe order, up to `jobs`.
            for i in 0..n {
                let ready = state[i].is_none()
                    && deps[i]
                        .iter()
                        .all(|&j| matches!(state[j], Some(Some(Ok(_)))));
                if running >= jobs.max(1) || failed {
                    break;
                }
                if ready {
                    state[i] = Some(None);
                    running += 1;
                    let tx = tx.clone();
                    let run_one = &run_one;
                    scope.spawn(move || {
                        let _ = tx.send((i, run_one(i)));
                    });
                }
            }
            if running == 0 {
                break;
            }
            let (i, result) = rx.recv().expect("a running stage reports back");
            running -= 1;
            failed |= result.is_err();
            state[i] = Some(Some(result));
        }
    });
    let mut rows = Vec::new();
    for (i, st) in state.into_iter().enumerate() {
        let p = &planned[i];
        match st {
            Some(Some(Ok(summary))) => {
                rows.push(report_row(&p.dir, &p.stage.name, p.stage.kind, summary)?)
            }
            Some(Some(Err(e))) => return Err(e),
            // Not run: an earlier stage failed (its error is returned above, first).
            _ => {}
        }
    }
    if rows.len() < n {
        bail!("{}: a stage failed; the pipeline stopped", path.display());
    }
    let text = render(&rows, &format!("{}: pipeline report", recipe.run.name));
    ember_models::hf::write_atomic(&root.join(REPORT), text.as_bytes())?;
    print!("{text}");
    Ok(rows)
}
