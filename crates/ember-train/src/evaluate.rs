//! Generation-based evaluation: held-out problems of a verifiable task, answered greedily by
//! the model and checked by the task's verifier. Used by stages every N steps and by
//! `ember eval --task <name>`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, Result};
use ember_data::chat::{ChatTemplate, Conversation, Message, Role};
use ember_data::tasks::{self, Problem, Split};
use ember_data::Tokenizer;
use ember_models::decode_graph::{generate_auto, GraphDecode};
use ember_models::generate::{GenerateOptions, Hooks, Sampling};
use ember_models::hf::write_atomic;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::pretrain::SPECIALS;
use crate::recipe::PromptFormat;
use crate::stages::{Evaluator, StageRun};

/// Held-out problems: `count` from the evaluation side of the task's fixed split, so that no
/// generated training data contains them (see [`tasks::Problem::split`]).
pub fn held_out(task: &str, seed: u64, count: usize, levels: &[u32]) -> Result<Vec<Problem>> {
    let t = tasks::task(task)?;
    // A stream of its own, apart from the training documents of the same seed.
    Ok(tasks::problems(t.as_ref(), seed ^ 0xE7A1, count as u64, levels, Split::Eval).collect())
}

/// One scored answer.
#[derive(Debug, Clone, Serialize)]
pub struct Graded {
    pub level: u32,
    pub question: String,
    pub completion: String,
    pub correct: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
    /// `level -> (correct, total)`.
    pub by_level: BTreeMap<u32, (usize, usize)>,
    pub graded: Vec<Graded>,
}

impl Accuracy {
    pub fn value(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

/// How problems are put to a model and where its answer ends.
pub struct Prompter {
    /// The chat template (`chat` format), or none (`text`).
    template: Option<ChatTemplate>,
    eos: Vec<u32>,
}

impl Prompter {
    pub fn new(tok: &Tokenizer, format: PromptFormat) -> Result<Self> {
        let mut eos: Vec<u32> = tok.token_id(SPECIALS[0]).into_iter().collect();
        let template = match format {
            PromptFormat::Chat => {
                let t = ChatTemplate::new(tok)?;
                eos.push(t.im_end());
                Some(t)
            }
            PromptFormat::Text => None,
        };
        if eos.is_empty() {
            return Err(anyhow!(
                "{}: the tokenizer has no `{}` token to end an answer",
                tok.origin.display(),
                SPECIALS[0]
            ));
        }
        Ok(Self { template, eos })
    }

    pub fn prompt(&self, tok: &Tokenizer, p: &Problem) -> Result<Vec<u32>> {
        self.encode(
            tok,
            &Conversation::new(vec![Message::new(Role::User, p.question.clone())]),
        )
    }

    /// A conversation's prompt: the chat template's rendering with the assistant header, or
    /// (plain text, as pretraining documents begin) its last user turn and a newline.
    pub fn encode(&self, tok: &Tokenizer, conv: &Conversation) -> Result<Vec<u32>> {
        match &self.template {
            Some(t) => t.prompt(tok, conv),
            None => {
                let user = conv.messages.iter().rev().find(|m| m.role == Role::User);
                tok.encode(&format!("{}\n", user.map_or("", |m| m.content.as_str())))
            }
        }
    }

    /// The ids that end an answer.
    pub fn eos(&self) -> &[u32] {
        &self.eos
    }
}

/// Greedy answers to `problems`, `batch` at a time, scored by the task's verifier.
pub fn accuracy<M: GraphDecode>(
    model: &M,
    tok: &Tokenizer,
    problems: &[Problem],
    format: PromptFormat,
    max_new_tokens: usize,
    batch: usize,
) -> Result<Accuracy> {
    let prompter = Prompter::new(tok, format)?;
    let opts = GenerateOptions {
        max_new_tokens: vec![max_new_tokens],
        eos_ids: prompter.eos.clone(),
        pad_id: prompter.eos[0],
        sampling: Sampling::default(),
    };
    let mut acc = Accuracy {
        correct: 0,
        total: 0,
        by_level: BTreeMap::new(),
        graded: Vec::new(),
    };
    for chunk in problems.chunks(batch.max(1)) {
        let prompts = chunk
            .iter()
            .map(|p| prompter.prompt(tok, p))
            .collect::<Result<Vec<_>>>()?;
        let out = generate_auto(model, &prompts, &opts, &mut Hooks::default())?;
        for (p, seq) in chunk.iter().zip(out) {
            let completion = tok.decode(&seq.tokens, true)?;
            let correct = tasks::verify(p, &completion);
            acc.total += 1;
            acc.correct += correct as usize;
            let e = acc.by_level.entry(p.level).or_default();
            e.0 += correct as usize;
            e.1 += 1;
            acc.graded.push(Graded {
                level: p.level,
                question: p.question.clone(),
                completion,
                correct,
            });
        }
    }
    Ok(acc)
}

/// Task accuracy as a stage [`Evaluator`]: before the first step, every `every` steps and
/// after the last. Each evaluation's answers go to `eval/<task>-step-N.jsonl`.
pub struct TaskAccuracy<'a> {
    pub name: String,
    pub problems: Vec<Problem>,
    pub tokenizer: &'a Tokenizer,
    pub format: PromptFormat,
    pub max_new_tokens: usize,
    pub batch: usize,
    pub every: u64,
    pub out_dir: PathBuf,
}

impl<M: GraphDecode> Evaluator<M> for TaskAccuracy<'_> {
    fn due(&self, step: u64, last: bool) -> bool {
        step == 0 || last || (self.every > 0 && step.is_multiple_of(self.every))
    }

    fn evaluate(&mut self, model: &M, step: u64) -> Result<(Map<String, Value>, String)> {
        let acc = accuracy(
            model,
            self.tokenizer,
            &self.problems,
            self.format,
            self.max_new_tokens,
            self.batch,
        )?;
        let body: String = acc
            .graded
            .iter()
            .map(|g| serde_json::to_string(g).expect("graded answers serialise") + "\n")
            .collect();
        std::fs::create_dir_all(&self.out_dir)?;
        write_atomic(
            &self
                .out_dir
                .join(format!("{}-step-{step:08}.jsonl", self.name)),
            body.as_bytes(),
        )?;
        let mut m = Map::new();
        m.insert("accuracy".into(), json!(acc.value()));
        let mut levels = Vec::new();
        for (level, (c, n)) in &acc.by_level {
            m.insert(
                format!("accuracy/level{level}"),
                json!(*c as f64 / *n as f64),
            );
            levels.push(format!("level {level}: {c}/{n}"));
        }
        let line = format!(
            "{} accuracy {}/{} = {:.1}% ({})",
            self.name,
            acc.correct,
            acc.total,
            100.0 * acc.value(),
            levels.join(", ")
        );
        Ok((m, line))
    }
}

/// The stage's `[eval]` section as an evaluator, if it has one. `default_format` is the
/// stage kind's: chat prompts for SFT, plain text for pretraining.
pub fn task_evaluator<'a, M: GraphDecode>(
    s: &StageRun,
    tok: &'a Tokenizer,
    default_format: PromptFormat,
) -> Result<Option<Box<dyn Evaluator<M> + 'a>>> {
    Ok(task_accuracy(s, tok, default_format)?.map(|t| Box::new(t) as Box<dyn Evaluator<M>>))
}

/// A frozen teacher's accuracy on the stage's `[eval]` task, before the first step, as
/// `teacher_accuracy` (what an OPD student is measured against).
pub fn teacher_evaluator<'a, M, T: GraphDecode>(
    s: &StageRun,
    tok: &'a Tokenizer,
    default_format: PromptFormat,
    teacher: &'a T,
) -> Result<Option<Box<dyn Evaluator<M> + 'a>>> {
    Ok(task_accuracy(s, tok, default_format)?.map(|mut inner| {
        inner.name = format!("teacher-{}", inner.name);
        Box::new(TeacherAccuracy { inner, teacher }) as Box<dyn Evaluator<M>>
    }))
}

struct TeacherAccuracy<'a, T> {
    inner: TaskAccuracy<'a>,
    teacher: &'a T,
}

impl<M, T: GraphDecode> Evaluator<M> for TeacherAccuracy<'_, T> {
    fn due(&self, step: u64, _last: bool) -> bool {
        step == 0
    }

    fn evaluate(&mut self, _student: &M, step: u64) -> Result<(Map<String, Value>, String)> {
        let (m, line) = self.inner.evaluate(self.teacher, step)?;
        let m = m
            .into_iter()
            .map(|(k, v)| (format!("teacher_{k}"), v))
            .collect();
        Ok((m, line))
    }
}

fn task_accuracy<'a>(
    s: &StageRun,
    tok: &'a Tokenizer,
    default_format: PromptFormat,
) -> Result<Option<TaskAccuracy<'a>>> {
    let Some(e) = &s.stage.eval else {
        return Ok(None);
    };
    let origin = format!("{} [eval]", s.path.display());
    if e.count == 0 {
        anyhow::bail!("{origin}: `count` must be at least 1");
    }
    let problems = held_out(&e.task, s.recipe.run.seed, e.count, &e.levels)
        .map_err(|err| anyhow!("{origin}: task: {err:#}"))?;
    let format = e.format.unwrap_or(default_format);
    // Fail now, not after the first training steps, if the tokenizer cannot chat.
    Prompter::new(tok, format).map_err(|err| anyhow!("{origin}: {err:#}"))?;
    Ok(Some(TaskAccuracy {
        name: e.task.clone(),
        problems,
        tokenizer: tok,
        format,
        max_new_tokens: e.max_new_tokens,
        batch: e.batch_size,
        every: e.every,
        out_dir: s.run_dir.join("eval"),
    }))
}
