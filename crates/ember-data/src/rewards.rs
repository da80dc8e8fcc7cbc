//! Verifiable rewards for RL: a [`Reward`] scores one completion of one prompt, given the
//! dataset row it came from, or returns `None` to leave the sample out (a row without a
//! reference answer, say). Rewards combine with weights in [`Weighted`].
//!
//! Built in: math answer checking ([`MathAnswer`]: the last `\boxed{...}` with brace matching,
//! or an `Answer:` line; normalised; numeric and fraction equivalence), [`ExactMatch`], a
//! `<think>…</think>`-then-answer [`ThinkFormat`] reward, and DAPO's soft [`OverlongPenalty`].

use serde_json::{Map, Value};

/// What a reward sees of one sample.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    pub prompt: &'a str,
    pub completion: &'a str,
    /// Tokens in the completion (for length shaping).
    pub completion_tokens: usize,
    /// The dataset row's other fields (the reference answer among them).
    pub fields: &'a Map<String, Value>,
}

pub trait Reward: Send + Sync {
    fn name(&self) -> &str;
    /// The score, or `None` to skip the sample.
    fn score(&self, s: &Sample) -> Option<f64>;
}

/// A field of the row as text (strings as they are, numbers printed).
fn field_text(fields: &Map<String, Value>, name: &str) -> Option<String> {
    match fields.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The content of the last `\boxed{...}` in `text`, braces matched (so `\boxed{\frac{1}{2}}`
/// gives `\frac{1}{2}`). `None` when there is none or its braces do not close.
pub fn last_boxed(text: &str) -> Option<&str> {
    let start = text.rfind("\\boxed")? + "\\boxed".len();
    let rest = text[start..].trim_start();
    let offset = text.len() - rest.len();
    let mut chars = rest.char_indices();
    if chars.next()?.1 != '{' {
        return None;
    }
    let mut depth = 1;
    for (i, c) in chars {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[offset + 1..offset + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// The final answer of a completion: its last `\boxed{...}`, else the value of its last
/// `Answer:` line.
pub fn extract_math_answer(text: &str) -> Option<String> {
    last_boxed(text)
        .map(str::to_string)
        .or_else(|| crate::tasks::extract_answer(text))
}

/// Canonical text of a math answer: no whitespace, `$`, `\left`/`\right`, `\!` or `\,`;
/// `\dfrac` and `\tfrac` as `\frac`; `\text{x}` as `x`; no trailing full stop; thousands
/// separators dropped from numbers and trailing zeros from decimals (`2.50` -> `2.5`,
/// `3.0` -> `3`).
pub fn normalise_math(s: &str) -> String {
    let mut v: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    for (from, to) in [
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("$", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
    ] {
        v = v.replace(from, to);
    }
    while let Some(at) = v.find("\\text{") {
        let inner_start = at + "\\text{".len();
        match v[inner_start..].find('}') {
            Some(end) => {
                let inner = v[inner_start..inner_start + end].to_string();
                v.replace_range(at..inner_start + end + 1, &inner);
            }
            None => break,
        }
    }
    let v = v.trim_end_matches('.').to_string();
    match number_text(&v) {
        Some(n) => n,
        None => v,
    }
}

/// A plain decimal number in canonical form (`1,234.50` -> `1234.5`, `-0` -> `0`), or `None`.
fn number_text(s: &str) -> Option<String> {
    let plain: String = s.chars().filter(|&c| c != ',').collect();
    let body = plain.strip_prefix(['-', '+']).unwrap_or(&plain);
    if body.is_empty()
        || !body.chars().all(|c| c.is_ascii_digit() || c == '.')
        || body.matches('.').count() > 1
        || body == "."
    {
        return None;
    }
    // Thousands separators must be in groups of three.
    if s.contains(',') {
        let int_part = s.trim_start_matches(['-', '+']).split('.').next()?;
        let groups: Vec<&str> = int_part.split(',').collect();
        if groups[0].is_empty() || groups[0].len() > 3 || groups[1..].iter().any(|g| g.len() != 3) {
            return None;
        }
    }
    let negative = plain.starts_with('-');
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let mut out = if int.is_empty() {
        "0".to_string()
    } else {
        int.to_string()
    };
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    if negative && out != "0" {
        out.insert(0, '-');
    }
    Some(out)
}

/// An exact rational `num/den` (den > 0) from an integer, a decimal, `a/b` or `\frac{a}{b}`
/// (each part an integer or decimal, with an optional leading minus), on canonical text.
fn rational(s: &str) -> Option<(i128, i128)> {
    fn decimal(s: &str) -> Option<(i128, i128)> {
        let n = number_text(s)?;
        let negative = n.starts_with('-');
        let body = n.trim_start_matches('-');
        let (int, frac) = body.split_once('.').unwrap_or((body, ""));
        if frac.len() > 18 || int.len() > 18 {
            return None;
        }
        let den = 10i128.pow(frac.len() as u32);
        let num = format!("{int}{frac}").parse::<i128>().ok()?;
        Some((if negative { -num } else { num }, den))
    }
    fn ratio(a: (i128, i128), b: (i128, i128)) -> Option<(i128, i128)> {
        let (num, den) = (a.0.checked_mul(b.1)?, a.1.checked_mul(b.0)?);
        if den == 0 {
            return None;
        }
        Some(if den < 0 { (-num, -den) } else { (num, den) })
    }
    let (negative, body) = match s.strip_prefix('-') {
        Some(rest) if rest.starts_with("\\frac") => (true, rest),
        _ => (false, s),
    };
    let value = if let Some(rest) = body.strip_prefix("\\frac{") {
        let (a, rest) = rest.split_once('}')?;
        let b = rest.strip_prefix('{')?.strip_suffix('}')?;
        ratio(decimal(a)?, decimal(b)?)?
    } else if let Some((a, b)) = body.split_once('/') {
        ratio(decimal(a)?, decimal(b)?)?
    } else {
        decimal(body)?
    };
    Some(if negative { (-value.0, value.1) } else { value })
}

/// Whether two answers are the same: equal after [`normalise_math`], or the same rational
/// number (`0.5`, `1/2`, `\frac{1}{2}` and `\dfrac{2}{4}` are all equal).
pub fn math_equal(a: &str, b: &str) -> bool {
    let (a, b) = (normalise_math(a), normalise_math(b));
    if a == b {
        return true;
    }
    match (rational(&a), rational(&b)) {
        (Some(x), Some(y)) => {
            x.0.checked_mul(y.1)
                .is_some_and(|l| Some(l) == y.0.checked_mul(x.1))
        }
        _ => false,
    }
}

/// 1 when the completion's final answer ([`extract_math_answer`]) equals the row's
/// `field`, else 0; skipped when the row has no such field.
pub struct MathAnswer {
    pub field: String,
}

impl Reward for MathAnswer {
    fn name(&self) -> &str {
        "math_answer"
    }

    fn score(&self, s: &Sample) -> Option<f64> {
        let reference = field_text(s.fields, &self.field)?;
        let ok = extract_math_answer(s.completion).is_some_and(|a| math_equal(&a, &reference));
        Some(if ok { 1.0 } else { 0.0 })
    }
}

/// 1 when the whole completion, trimmed, equals the row's `field`, trimmed.
pub struct ExactMatch {
    pub field: String,
}

impl Reward for ExactMatch {
    fn name(&self) -> &str {
        "exact_match"
    }

    fn score(&self, s: &Sample) -> Option<f64> {
        let reference = field_text(s.fields, &self.field)?;
        Some(if s.completion.trim() == reference.trim() {
            1.0
        } else {
            0.0
        })
    }
}

/// 1 when the completion is `<think>` reasoning `</think>` followed by a non-empty answer
/// (one think block, opened first), else 0.
pub struct ThinkFormat;

impl Reward for ThinkFormat {
    fn name(&self) -> &str {
        "think_format"
    }

    fn score(&self, s: &Sample) -> Option<f64> {
        let t = s.completion.trim_start();
        let ok = t
            .strip_prefix("<think>")
            .is_some_and(|rest| match rest.split_once("</think>") {
                Some((thought, answer)) => {
                    !thought.trim().is_empty()
                        && !answer.trim().is_empty()
                        && !answer.contains("<think>")
                        && !answer.contains("</think>")
                        && !thought.contains("<think>")
                }
                None => false,
            });
        Some(if ok { 1.0 } else { 0.0 })
    }
}

/// DAPO's soft overlong penalty: 0 up to `max_tokens - buffer` tokens, then falling linearly
/// to -1 at `max_tokens`, and -1 beyond.
pub struct OverlongPenalty {
    pub max_tokens: usize,
    pub buffer: usize,
}

impl Reward for OverlongPenalty {
    fn name(&self) -> &str {
        "overlong_penalty"
    }

    fn score(&self, s: &Sample) -> Option<f64> {
        let soft = self.max_tokens.saturating_sub(self.buffer);
        let n = s.completion_tokens;
        Some(if n <= soft {
            0.0
        } else if n <= self.max_tokens {
            (soft as f64 - n as f64) / self.buffer.max(1) as f64
        } else {
            -1.0
        })
    }
}

/// A weighted sum of rewards; skipped when any part skips.
pub struct Weighted {
    pub parts: Vec<(f64, Box<dyn Reward>)>,
}

impl Reward for Weighted {
    fn name(&self) -> &str {
        "weighted"
    }

    fn score(&self, s: &Sample) -> Option<f64> {
        self.parts
            .iter()
            .map(|(w, r)| r.score(s).map(|v| w * v))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample<'a>(
        completion: &'a str,
        fields: &'a Map<String, Value>,
        tokens: usize,
    ) -> Sample<'a> {
        Sample {
            prompt: "p",
            completion,
            completion_tokens: tokens,
            fields,
        }
    }

    #[test]
    fn boxed_answers_match_braces_and_take_the_last() {
        let cases: &[(&str, Option<&str>)] = &[
            ("so \\boxed{42}.", Some("42")),
            ("\\boxed{1} then \\boxed{2}", Some("2")),
            ("\\boxed{\\frac{1}{2}}", Some("\\frac{1}{2}")),
            ("\\boxed {x^{2}+1} done", Some("x^{2}+1")),
            ("\\boxed{unclosed", None),
            ("\\boxed 5", None),
            ("no box", None),
        ];
        for (text, want) in cases {
            assert_eq!(last_boxed(text), *want, "{text}");
        }
        assert_eq!(extract_math_answer("x\nAnswer: 7."), Some("7".into()));
        assert_eq!(
            extract_math_answer("Answer: 7\nso \\boxed{8}"),
            Some("8".into()),
            "a box wins over an Answer: line"
        );
    }

    #[test]
    fn math_equivalence_true_and_false_cases() {
        let same = [
            ("42", "42"),
            (" 4 2 ", "42"),
            ("1,234", "1234"),
            ("2.50", "2.5"),
            ("3.0", "3"),
            ("-0", "0"),
            ("0.5", "1/2"),
            ("\\frac{1}{2}", "0.5"),
            ("\\dfrac{2}{4}", "\\frac{1}{2}"),
            ("-\\frac{3}{4}", "-0.75"),
            ("\\tfrac{6}{3}", "2"),
            ("$12$", "12"),
            ("12.", "12"),
            ("\\text{No}", "No"),
            ("\\left(1,2\\right)", "(1,2)"),
        ];
        for (a, b) in same {
            assert!(math_equal(a, b), "{a} should equal {b}");
        }
        let different = [
            ("42", "24"),
            ("0.5", "0.25"),
            ("1/3", "0.333"),
            ("\\frac{1}{2}", "\\frac{2}{1}"),
            ("12,34", "1234"),
            ("No", "Yes"),
            ("x+1", "x-1"),
            ("1/0", "0"),
            ("", "0"),
        ];
        for (a, b) in different {
            assert!(!math_equal(a, b), "{a} should differ from {b}");
        }
    }

    #[test]
    fn rewards_score_skip_and_combine() {
        let row = json!({"answer": "1/2", "n": 239})
            .as_object()
            .unwrap()
            .clone();
        let empty = Map::new();
        let math = MathAnswer {
            field: "answer".into(),
        };
        assert_eq!(
            math.score(&sample("thus \\boxed{\\frac{2}{4}}", &row, 5)),
            Some(1.0)
        );
        assert_eq!(math.score(&sample("Answer: 0.5", &row, 5)), Some(1.0));
        assert_eq!(math.score(&sample("Answer: 0.6", &row, 5)), Some(0.0));
        assert_eq!(math.score(&sample("no answer", &row, 5)), Some(0.0));
        assert_eq!(math.score(&sample("\\boxed{1}", &empty, 5)), None);
        let numeric = MathAnswer { field: "n".into() };
        assert_eq!(numeric.score(&sample("\\boxed{239}", &row, 5)), Some(1.0));

        let exact = ExactMatch {
            field: "answer".into(),
        };
        assert_eq!(exact.score(&sample(" 1/2\n", &row, 3)), Some(1.0));
        assert_eq!(exact.score(&sample("0.5", &row, 3)), Some(0.0));

        let fmt = ThinkFormat;
        for (text, want) in [
            ("<think>add them</think>The answer is 4.", 1.0),
            ("  <think>a</think>\nb", 1.0),
            ("<think></think>4", 0.0),
            ("<think>a</think>", 0.0),
            ("4 <think>a</think> 4", 0.0),
            ("<think>a<think>b</think>c", 0.0),
            ("<think>a</think>b</think>", 0.0),
        ] {
            assert_eq!(fmt.score(&sample(text, &row, 3)), Some(want), "{text:?}");
        }

        let long = OverlongPenalty {
            max_tokens: 100,
            buffer: 20,
        };
        for (n, want) in [(0, 0.0), (80, 0.0), (90, -0.5), (100, -1.0), (150, -1.0)] {
            assert_eq!(long.score(&sample("x", &row, n)), Some(want), "{n} tokens");
        }

        let both = Weighted {
            parts: vec![(1.0, Box::new(math)), (0.5, Box::new(long))],
        };
        assert_eq!(both.score(&sample("\\boxed{0.5}", &row, 90)), Some(0.75));
        assert_eq!(both.score(&sample("\\boxed{0.5}", &empty, 90)), None);
    }
}
