//! `--dry-run`: everything about a recipe that can be checked without training. The recipe
//! is parsed and its stages resolved exactly as a real run would, every file it names must
//! exist (a tokenizer must also load), checkpoints named by path must hold a `config.json`,
//! and each stage's model must suit its objective. One line per stage says what would run.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use ember_data::Tokenizer;

use crate::pipeline::{self, PlannedStage};
use crate::recipe::{line_of, ModelSpec, Recipe, StageKind, TrainObjective};
use crate::stages::{check_common, check_model_fits, model_spec_of};

/// A single-stage recipe (`ember train --dry-run`).
pub fn single(path: &Path, overrides: &[String]) -> Result<Vec<String>> {
    let recipe = Recipe::load_with(path, overrides)?;
    let stage = recipe.single_stage(path)?;
    check_common(&stage, path)?;
    let steps = pipeline::stage_steps(&stage, path)?;
    let planned = PlannedStage {
        stage,
        dir: recipe.run_dir(),
        steps,
    };
    Ok(vec![describe(&recipe, &planned, path, &[], "stage 1/1")?])
}

/// A pipeline recipe (`ember pipeline --dry-run`), up to `until` when given.
pub fn stages(path: &Path, overrides: &[String], until: Option<&str>) -> Result<Vec<String>> {
    let recipe = Recipe::load_with(path, overrides)?;
    pipeline::check(&recipe, path)?;
    let planned = pipeline::plan(&recipe, path, until)?;
    let n = planned.len();
    let mut produced = Vec::new();
    let mut lines = Vec::new();
    for (i, p) in planned.iter().enumerate() {
        lines.push(describe(
            &recipe,
            p,
            path,
            &produced,
            &format!("stage {}/{n}", i + 1),
        )?);
        produced.push(p.dir.clone());
    }
    Ok(lines)
}

/// Checks one resolved stage against the files on disk; `produced` are the directories
/// that earlier stages of the same run will write.
fn describe(
    recipe: &Recipe,
    p: &PlannedStage,
    path: &Path,
    produced: &[PathBuf],
    label: &str,
) -> Result<String> {
    let st = &p.stage;
    let (data, train) = (&st.data, &st.train);
    let at = |key: &str, value: &str| {
        let line = line_of(path, value)
            .map(|l| format!(":{l}"))
            .unwrap_or_default();
        format!("{}{line}: {key}", path.display())
    };
    let checkpoint = |dir: &Path, key: &str| -> Result<String> {
        if produced.iter().any(|d| d == dir) {
            return Ok(format!("stage output {}", dir.display()));
        }
        if !dir.join("config.json").is_file() {
            bail!(
                "{} `{}`: no checkpoint there (config.json missing)",
                at(key, &dir.display().to_string()),
                dir.display()
            );
        }
        Ok(dir.display().to_string())
    };

    let spec = model_spec_of(st, recipe, path)?;
    let objective = st.objective.unwrap_or(TrainObjective::Ntp);
    let model = match (&spec, &train.init_from) {
        (None, None) => bail!(
            "{}: {}: needs a [model] section or train.init_from",
            path.display(),
            st.name
        ),
        (_, Some(dir)) => format!("from {}", checkpoint(dir, "train.init_from")?),
        (Some(s), None) => format!("new {}", model_line(s)),
    };
    check_model_fits(spec.as_ref(), st.kind, objective, path)?;
    if let Some(ModelSpec::Hybrid(c)) = &spec {
        crate::hybrid_lm::check_section(st, path, Some(c.memory_tokens))?;
    }

    // Every file the stage reads.
    let mut inputs = Vec::new();
    let sources = data
        .sources
        .iter()
        .chain(data.datasets.values().flat_map(|d| d.sources.iter()));
    let chat = data.chat.iter().map(|c| c.path.as_path());
    let prompts = data.prompts.iter().map(|c| c.path.as_path());
    for (key, file) in sources
        .map(|s| ("data.sources path", s.path()))
        .chain(chat.map(|f| ("data.chat path", f)))
        .chain(prompts.map(|f| ("data.prompts path", f)))
    {
        if !file.exists() {
            bail!(
                "{} `{}` does not exist",
                at(key, &file.display().to_string()),
                file.display()
            );
        }
        inputs.push(file.display().to_string());
    }
    let generated = data.generated.iter().map(|g| ("", g)).chain(
        data.datasets
            .iter()
            .filter_map(|(name, d)| Some((name.as_str(), d.generated.as_ref()?))),
    );
    for (dataset, g) in generated {
        ember_data::tasks::task(&g.task)
            .map_err(|e| anyhow::anyhow!("{}: {e:#}", at("data.generated.task", &g.task)))?;
        let label = if dataset.is_empty() {
            String::new()
        } else {
            format!("{dataset}: ")
        };
        inputs.push(format!("{label}generated {} ×{}", g.task, g.count));
    }
    if let Some(e) = &st.eval {
        ember_data::tasks::task(&e.task)
            .map_err(|err| anyhow::anyhow!("{}: {err:#}", at("eval.task", &e.task)))?;
    }
    // The tokenizer a fresh model reads (a checkpoint brings its own).
    let from_checkpoint = train.init_from.is_some();
    if !from_checkpoint && data.bpe_vocab_size.is_none() && data.tokenizer != "byte_level" {
        let file = PathBuf::from(&data.tokenizer);
        Tokenizer::from_file(&file)
            .map_err(|e| anyhow::anyhow!("{}: {e:#}", at("data.tokenizer", &data.tokenizer)))?;
    }
    if let Some(d) = &st.distill {
        checkpoint(&d.teacher, "distill.teacher")?;
        if let Some(r) = &d.reference {
            checkpoint(r, "distill.reference")?;
        }
    }

    let kind = match (st.kind, st.objective) {
        (StageKind::Pretrain, Some(o)) if o != TrainObjective::Ntp => {
            format!("pretrain, {}", objective_name(o))
        }
        (k, _) => k.name().to_string(),
    };
    let work = match (&st.rl, &st.distill) {
        (Some(rl), _) => format!(
            "{} steps of {} prompts × {} completions of ≤ {} tokens",
            p.steps, train.batch_size, rl.group_size, rl.max_new_tokens
        ),
        (_, Some(d)) => format!(
            "{} steps of {} prompts × {} completion(s) of ≤ {} tokens",
            p.steps, train.batch_size, d.samples_per_prompt, d.max_new_tokens
        ),
        _ => format!(
            "{} steps of {} × {} tokens",
            p.steps,
            train.batch_size * train.grad_accum,
            data.seq_len
        ),
    };
    let data_line = if inputs.is_empty() {
        String::from("no inputs")
    } else {
        inputs.join(", ")
    };
    Ok(format!(
        "{label} {} ({kind}): {work}; model {model}; data {data_line}; writes {}",
        st.name,
        p.dir.display()
    ))
}

fn objective_name(o: TrainObjective) -> &'static str {
    match o {
        TrainObjective::Ntp => "ntp",
        TrainObjective::Rlp => "rlp",
        TrainObjective::Mlm => "mlm",
    }
}

fn model_line(s: &ModelSpec) -> String {
    let millions = |n: usize| format!("{:.1}M parameters", n as f64 / 1e6);
    match s {
        ModelSpec::Qwen3(c) => format!(
            "qwen3, {} layers × {} wide, {}",
            c.num_hidden_layers,
            c.hidden_size,
            millions(c.num_params())
        ),
        ModelSpec::ModernBert(c) => format!(
            "modernbert, {} layers × {} wide, {}",
            c.num_hidden_layers,
            c.hidden_size,
            millions(c.num_params())
        ),
        ModelSpec::Hybrid(c) => {
            format!("hybrid, {} layers × {} wide", c.layers.len(), c.hidden_size)
        }
    }
}
