//! Synthetic tasks with verifiable answers: a small deterministic "world" of problems with
//! worked steps, used as pretraining text, SFT chat pairs, RL prompts with checkable answers
//! and curriculum levels.
//!
//! Everything is a pure function of `(seed, index, level)`: problems come from an internal
//! seeded PRNG (splitmix64 seeding xoshiro256**), never from the OS, so the same call gives the
//! same problem on every machine and every run.

use std::ops::RangeInclusive;

pub(crate) use crate::rng::Rng;
use crate::rng::{fnv1a, mix64};

mod arithmetic;

pub use arithmetic::Arithmetic;

/// The names [`task`] knows.
pub const TASKS: &[&str] = &["arithmetic"];

/// One problem: the question, worked steps (each ending in a checkable equation), and the
/// exact answer as text.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    pub task: String,
    pub level: u32,
    pub question: String,
    pub steps: Vec<String>,
    pub answer: String,
}

/// A generator of problems, deterministic in `(seed, index, level)`.
pub trait Task {
    fn name(&self) -> &'static str;
    /// The difficulty levels, easiest first.
    fn levels(&self) -> RangeInclusive<u32>;
    /// Problem `index` of the stream `seed` at `level` (clamped into [`Task::levels`]).
    fn problem(&self, seed: u64, index: u64, level: u32) -> Problem;
}

/// The task called `name`.
pub fn task(name: &str) -> anyhow::Result<Box<dyn Task>> {
    match name {
        "arithmetic" => Ok(Box::new(Arithmetic)),
        _ => anyhow::bail!("unknown task {name:?}; known tasks: {}", TASKS.join(", ")),
    }
}

/// How a problem is written as a pretraining document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocFormat {
    /// The question, the worked steps, then `Answer: X`.
    Worked,
    /// The question, the worked steps inside `<think>…</think>`, then `Answer: X` right after
    /// the closing tag: reasoning written as a thought.
    Think,
    /// The question and `Answer: X`, with no reasoning on the page (what RLP's thoughts can
    /// supply).
    Answer,
}

impl Problem {
    /// The problem as a pretraining document in `format`.
    pub fn document(&self, format: DocFormat) -> String {
        match format {
            DocFormat::Worked => self.pretraining_text(),
            DocFormat::Think => {
                let steps: String = self.steps.iter().map(|l| format!("{l}\n")).collect();
                format!(
                    "{}\n<think>\n{steps}</think>Answer: {}\n",
                    self.question, self.answer
                )
            }
            DocFormat::Answer => format!("{}\nAnswer: {}\n", self.question, self.answer),
        }
    }

    /// A natural document: the question, the worked steps, and a final line `Answer: X`.
    pub fn pretraining_text(&self) -> String {
        let mut s = String::with_capacity(
            self.question.len() + self.steps.iter().map(|l| l.len() + 1).sum::<usize>() + 24,
        );
        s.push_str(&self.question);
        s.push('\n');
        for step in &self.steps {
            s.push_str(step);
            s.push('\n');
        }
        s.push_str("Answer: ");
        s.push_str(&self.answer);
        s.push('\n');
        s
    }

    /// `(user prompt, assistant response)`: the response is the worked steps then `Answer: X`.
    pub fn chat(&self) -> (String, String) {
        let mut response = String::new();
        for step in &self.steps {
            response.push_str(step);
            response.push('\n');
        }
        response.push_str("Answer: ");
        response.push_str(&self.answer);
        (self.question.clone(), response)
    }

    /// The question with an instruction to end the reply with `Answer: <value>`.
    pub fn rl_prompt(&self) -> String {
        format!(
            "{}\nWork it out step by step, then end with a line \"Answer: <value>\".",
            self.question
        )
    }
}

/// The value after the last `Answer:` in `text`, up to the end of that line, trimmed and without
/// trailing full stops. `None` when there is no `Answer:` or nothing follows it.
pub fn extract_answer(text: &str) -> Option<String> {
    let at = text.rfind("Answer:")?;
    let rest = &text[at + "Answer:".len()..];
    let line = rest.lines().next().unwrap_or("");
    let v = line.trim().trim_end_matches('.').trim_end();
    (!v.is_empty()).then(|| v.to_string())
}

/// Canonical form of an answer: whitespace removed, a leading `$` dropped, and integers written
/// plainly (`+5` -> `5`, `-0` -> `0`, `007` -> `7`, `1,234` -> `1234`).
fn normalise(s: &str) -> String {
    let mut v: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if let Some(rest) = v.strip_prefix('$') {
        v = rest.to_string();
    }
    let plain: String = v.chars().filter(|&c| c != ',').collect();
    match plain.parse::<i128>() {
        Ok(n) => n.to_string(),
        Err(_) => v,
    }
}

/// Whether `completion`'s final `Answer:` equals the problem's answer (after normalising both).
pub fn verify(p: &Problem, completion: &str) -> bool {
    extract_answer(completion).is_some_and(|a| normalise(&a) == normalise(&p.answer))
}

/// Which side of the fixed train/evaluation split a problem falls on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

impl Problem {
    /// A tenth of every task's problem space is reserved for evaluation, keyed by the
    /// computation (the worked steps and the answer, not the question's wording), so that no
    /// generated training data, in any stage and from any seed, contains an evaluation problem
    /// even reworded.
    pub fn split(&self) -> Split {
        let key = format!(
            "{}|{}|{}|{}",
            self.task,
            self.level,
            self.steps.join("\n"),
            self.answer
        );
        if mix64(fnv1a(&key)).is_multiple_of(10) {
            Split::Eval
        } else {
            Split::Train
        }
    }
}

/// Streams `count` problems of one side of the split: the `k`-th at level
/// `levels[k % levels.len()]`, deterministic in `seed`. An empty `levels` cycles through all of
/// the task's levels.
pub fn problems<'a>(
    task: &'a dyn Task,
    seed: u64,
    count: u64,
    levels: &[u32],
    split: Split,
) -> impl Iterator<Item = Problem> + 'a {
    let levels: Vec<u32> = if levels.is_empty() {
        task.levels().collect()
    } else {
        levels.to_vec()
    };
    let mut index = 0u64;
    (0..count).map(move |k| {
        let level = levels[(k % levels.len() as u64) as usize];
        loop {
            let p = task.problem(seed, index, level);
            index += 1;
            if p.split() == split {
                return p;
            }
        }
    })
}

/// Streams `count` pretraining documents from the training side of the split (see
/// [`problems`]), document i written in `formats[i % formats.len()]` (worked steps when
/// `formats` is empty).
pub fn documents<'a>(
    task: &'a dyn Task,
    seed: u64,
    count: u64,
    levels: &[u32],
    formats: &'a [DocFormat],
) -> impl Iterator<Item = String> + 'a {
    problems(task, seed, count, levels, Split::Train)
        .enumerate()
        .map(move |(i, p)| match formats {
            [] => p.pretraining_text(),
            f => p.document(f[i % f.len()]),
        })
}

/// The generator for problem `(seed, index, level)` of the task `name`.
pub(crate) fn problem_rng(name: &str, seed: u64, index: u64, level: u32) -> Rng {
    let k = mix64(seed ^ fnv1a(name));
    let k = mix64(k ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let k = mix64(k ^ (level as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    Rng::new(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_forms() {
        assert_eq!(normalise(" -0 "), "0");
        assert_eq!(normalise("+12"), "12");
        assert_eq!(normalise("- 12"), "-12");
        assert_eq!(normalise("1,234"), "1234");
        assert_eq!(normalise("$40"), "40");
        assert_eq!(normalise("abc"), "abc");
    }
}
