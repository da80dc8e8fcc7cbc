//! The synthetic verifiable tasks (`ember_data::tasks`): determinism, arithmetically correct
//! worked steps at every level, answer extraction and verification, and document streams.

use ember_data::tasks::{
    documents, extract_answer, problems, task, verify, DocFormat, Problem, Split, Task,
};

/// A tiny evaluator for the step equations: integers, unary minus, `+ - * /` (exact division
/// only) and brackets, with the usual precedence.
struct Eval<'a> {
    s: &'a [u8],
    i: usize,
}

impl Eval<'_> {
    fn run(src: &str) -> Result<i64, String> {
        let mut e = Eval {
            s: src.as_bytes(),
            i: 0,
        };
        let v = e.sum()?;
        e.ws();
        if e.i != e.s.len() {
            return Err(format!("trailing input in {src:?} at {}", e.i));
        }
        Ok(v)
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i] == b' ' {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.i).copied()
    }

    fn sum(&mut self) -> Result<i64, String> {
        let mut v = self.product()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.i += 1;
            let r = self.product()?;
            v = if op == b'+' { v + r } else { v - r };
        }
        Ok(v)
    }

    fn product(&mut self) -> Result<i64, String> {
        let mut v = self.atom()?;
        while let Some(op @ (b'*' | b'/')) = self.peek() {
            self.i += 1;
            let r = self.atom()?;
            if op == b'*' {
                v *= r;
            } else {
                if r == 0 || v % r != 0 {
                    return Err(format!("inexact division {v} / {r}"));
                }
                v /= r;
            }
        }
        Ok(v)
    }

    fn atom(&mut self) -> Result<i64, String> {
        match self.peek() {
            Some(b'-') => {
                self.i += 1;
                Ok(-self.atom()?)
            }
            Some(b'(') => {
                self.i += 1;
                let v = self.sum()?;
                if self.peek() != Some(b')') {
                    return Err("missing )".into());
                }
                self.i += 1;
                Ok(v)
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                std::str::from_utf8(&self.s[start..self.i])
                    .unwrap()
                    .parse()
                    .map_err(|e| format!("{e}"))
            }
            c => Err(format!("unexpected {:?}", c.map(|c| c as char))),
        }
    }
}

/// Checks a step `[label:] e1 = e2 = ... = n`: every side evaluates to the same value, which is
/// returned.
fn check_step(step: &str) -> i64 {
    let eq = step.rsplit_once(':').map_or(step, |(_, e)| e);
    let sides: Vec<&str> = eq.split('=').collect();
    assert!(sides.len() >= 2, "step {step:?} is not an equation");
    let vals: Vec<i64> = sides
        .iter()
        .map(|s| Eval::run(s.trim()).unwrap_or_else(|e| panic!("step {step:?}: {e}")))
        .collect();
    assert!(
        vals.windows(2).all(|w| w[0] == w[1]),
        "step {step:?} is wrong: sides evaluate to {vals:?}"
    );
    vals[0]
}

fn arithmetic() -> Box<dyn Task> {
    task("arithmetic").unwrap()
}

#[test]
fn problems_are_deterministic_in_seed_index_and_level() {
    let t = arithmetic();
    assert_eq!(t.name(), "arithmetic");
    assert_eq!(t.levels(), 1..=5);
    for level in t.levels() {
        for index in 0..20 {
            let a = t.problem(42, index, level);
            assert_eq!(a, t.problem(42, index, level));
            assert_eq!(a, task("arithmetic").unwrap().problem(42, index, level));
            assert_eq!(a.level, level);
            assert_eq!(a.task, "arithmetic");
        }
        // Different indices and seeds give (almost always) different problems.
        let qs: std::collections::HashSet<String> =
            (0..100).map(|i| t.problem(42, i, level).question).collect();
        assert!(
            qs.len() >= 60,
            "level {level}: only {} distinct of 100",
            qs.len()
        );
        let same = (0..100)
            .filter(|&i| t.problem(1, i, level) == t.problem(2, i, level))
            .count();
        assert!(
            same <= 10,
            "level {level}: seeds 1 and 2 agree on {same} of 100"
        );
    }
    assert_ne!(t.problem(0, 0, 4), t.problem(0, 1, 4));
    assert_ne!(t.problem(0, 0, 5), t.problem(1, 0, 5));
    // Out-of-range levels are clamped.
    assert_eq!(t.problem(3, 3, 0), t.problem(3, 3, 1));
    assert_eq!(t.problem(3, 3, 99), t.problem(3, 3, 5));
}

#[test]
fn every_step_at_every_level_re_evaluates() {
    let t = arithmetic();
    for level in t.levels() {
        let mut templates = std::collections::HashSet::new();
        for index in 0..500 {
            let p = t.problem(7, index, level);
            let answer: i64 = p.answer.parse().unwrap_or_else(|_| panic!("{p:?}"));
            assert!(!p.steps.is_empty(), "{p:?}");
            let mut last = 0;
            for step in &p.steps {
                last = check_step(step);
            }
            assert_eq!(last, answer, "final step disagrees with the answer: {p:?}");
            if level <= 4 {
                // The question's expression itself evaluates to the answer.
                let expr: String = p
                    .question
                    .replace(" plus ", " + ")
                    .replace(" minus ", " - ")
                    .replace(" times ", " * ")
                    .chars()
                    .filter(|c| c.is_ascii_digit() || "+-*/() ".contains(*c))
                    .collect();
                assert_eq!(Eval::run(expr.trim()), Ok(answer), "{p:?}");
            }
            match level {
                1 => assert!(answer.abs() <= 9 + 9),
                2 => assert!(p.steps[0].contains("carry 1") || p.steps[0].contains("borrow 1")),
                3 => assert!(p.steps.len() >= 3, "partial products: {p:?}"),
                5 => assert!(p.steps.len() >= 2, "multi-step: {p:?}"),
                _ => {}
            }
            let doc = p.pretraining_text();
            assert!(doc.is_ascii(), "{doc:?}");
            assert!(
                (20..=300).contains(&doc.len()),
                "{} bytes: {doc:?}",
                doc.len()
            );
            templates.insert(p.question.split_whitespace().next().unwrap().to_string());
        }
        assert!(
            templates.len() >= 3,
            "level {level}: little variety {templates:?}"
        );
    }
}

#[test]
fn renderings_end_with_the_answer_and_verify() {
    let t = arithmetic();
    for level in t.levels() {
        let p = t.problem(5, 11, level);
        let doc = p.pretraining_text();
        assert!(doc.starts_with(&p.question), "{doc:?}");
        assert!(doc.trim_end().ends_with(&format!("Answer: {}", p.answer)));
        for step in &p.steps {
            assert!(doc.contains(step.as_str()));
        }
        let (user, assistant) = p.chat();
        assert_eq!(user, p.question);
        assert!(assistant.ends_with(&format!("Answer: {}", p.answer)));
        assert!(verify(&p, &assistant));
        assert!(verify(&p, &doc));
        let prompt = p.rl_prompt();
        assert!(prompt.starts_with(&p.question) && prompt.contains("Answer: <value>"));
        // The prompt's own template is not an answer.
        assert!(!verify(&p, &prompt));
    }
}

fn problem(answer: &str) -> Problem {
    Problem {
        task: "arithmetic".into(),
        level: 1,
        question: "What is 3 - 3?".into(),
        steps: vec!["3 - 3 = 0".into()],
        answer: answer.into(),
    }
}

#[test]
fn verify_normalises_forms_and_rejects_wrong_answers() {
    let p = problem("42");
    for ok in [
        "Answer: 42",
        "Answer:42",
        "Answer: +42",
        "Answer:  42 .",
        "Answer: 42.",
        "so 6 * 7 = 42\nAnswer: 042\n",
        "Answer: 41\nwait, no.\nAnswer: 42",
        "Answer: $42",
    ] {
        assert!(verify(&p, ok), "{ok:?} should verify");
    }
    for bad in [
        "42",
        "Answer: 43",
        "Answer: -42",
        "Answer: 42\nAnswer: 41",
        "Answer:",
        "answer: 42",
        "Answer: 4 2 apples",
        "",
    ] {
        assert!(!verify(&p, bad), "{bad:?} should not verify");
    }
    let zero = problem("0");
    assert!(verify(&zero, "Answer: -0"));
    assert!(verify(&zero, "Answer: 0"));
    assert!(!verify(&zero, "Answer: 1"));
    let neg = problem("-12");
    assert!(verify(&neg, "Answer: - 12"));
    assert!(verify(&neg, "Answer: -12."));
    assert!(!verify(&neg, "Answer: 12"));
    let big = problem("1234");
    assert!(verify(&big, "Answer: 1,234"));
}

#[test]
fn extract_answer_takes_the_last_one() {
    assert_eq!(extract_answer("Answer: 1\nAnswer: 2"), Some("2".into()));
    assert_eq!(
        extract_answer("Answer: 1\nmore\nAnswer:  -7 .\ntrailing text"),
        Some("-7".into())
    );
    assert_eq!(extract_answer("x Answer: 5."), Some("5".into()));
    assert_eq!(extract_answer("no answer here"), None);
    assert_eq!(extract_answer("Answer:   \n"), None);
}

#[test]
fn documents_stream_cycles_levels_and_never_holds_an_evaluation_problem() {
    let t = arithmetic();
    let docs: Vec<String> = documents(t.as_ref(), 9, 10, &[2, 5], &[]).collect();
    assert_eq!(docs.len(), 10);
    let train: Vec<Problem> = problems(t.as_ref(), 9, 10, &[2, 5], Split::Train).collect();
    for (i, (d, p)) in docs.iter().zip(&train).enumerate() {
        assert_eq!(p.level, [2, 5][i % 2]);
        assert_eq!(*d, p.pretraining_text());
    }
    // Deterministic, and a prefix of a longer stream.
    let again: Vec<String> = documents(t.as_ref(), 9, 4, &[2, 5], &[]).collect();
    assert_eq!(again, docs[..4]);
    assert_ne!(
        docs,
        documents(t.as_ref(), 10, 10, &[2, 5], &[]).collect::<Vec<_>>()
    );
    // No levels: all of the task's levels in turn.
    let all: Vec<Problem> = problems(t.as_ref(), 1, 7, &[], Split::Train).collect();
    assert_eq!(
        all.iter().map(|p| p.level).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 1, 2]
    );
    assert_eq!(documents(t.as_ref(), 1, 0, &[1], &[]).count(), 0);

    // Formats cycle per document: steps inside <think>…</think>, or no steps at all.
    let formats = [DocFormat::Think, DocFormat::Answer, DocFormat::Worked];
    let mixed: Vec<String> = documents(t.as_ref(), 9, 6, &[2, 5], &formats).collect();
    for (i, (d, p)) in mixed.iter().zip(&train).enumerate() {
        let steps: String = p.steps.iter().map(|l| format!("{l}\n")).collect();
        let want = match i % 3 {
            0 => format!(
                "{}\n<think>\n{steps}</think>Answer: {}\n",
                p.question, p.answer
            ),
            1 => format!("{}\nAnswer: {}\n", p.question, p.answer),
            _ => p.pretraining_text(),
        };
        assert_eq!(*d, want);
        assert_eq!(extract_answer(d).as_deref(), Some(p.answer.as_str()));
    }

    // The split is by computation: an evaluation problem's steps never occur in training
    // data, whatever the seed, and about a tenth of the problems are held out.
    let key = |p: &Problem| (p.level, p.steps.clone(), p.answer.clone());
    let held: Vec<Problem> = problems(t.as_ref(), 3, 200, &[1, 2, 3], Split::Eval).collect();
    assert!(held.iter().all(|p| p.split() == Split::Eval));
    let held_keys: std::collections::HashSet<_> = held.iter().map(key).collect();
    for seed in [0, 3, 77] {
        for p in problems(t.as_ref(), seed, 3000, &[1, 2, 3], Split::Train) {
            assert!(!held_keys.contains(&key(&p)), "{p:?} is held out");
        }
    }
    let n = 5000;
    let eval = (0..n)
        .filter(|&i| t.problem(5, i, 2).split() == Split::Eval)
        .count() as f64;
    assert!((eval / n as f64 - 0.1).abs() < 0.02, "{eval} of {n}");
}

#[test]
fn unknown_task_is_a_one_line_error() {
    let err = task("calculus")
        .err()
        .expect("unknown task must fail")
        .to_string();
    assert!(
        err.contains("calculus") && err.contains("arithmetic"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
}
