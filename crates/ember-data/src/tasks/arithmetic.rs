//! Integer arithmetic with worked steps, in five levels:
//!
//! 1. single-digit addition and subtraction;
//! 2. two-digit addition and subtraction, always with a carry or borrow, by place value;
//! 3. a two-digit number times a one-digit number, by partial products;
//! 4. three-operand expressions with precedence or brackets;
//! 5. multi-step word problems.
//!
//! Every step is `Label: equation` or a bare equation, where the equation is a chain
//! `e1 = e2 = ... = n` of integer expressions over `+ - * / ( )` that all evaluate to the same
//! value (divisions are exact), so the steps can be checked by re-evaluating them.

use super::{Problem, Rng, Task};
use std::ops::RangeInclusive;

/// The arithmetic task (levels 1 to 5).
#[derive(Debug, Clone, Copy, Default)]
pub struct Arithmetic;

impl Task for Arithmetic {
    fn name(&self) -> &'static str {
        "arithmetic"
    }

    fn levels(&self) -> RangeInclusive<u32> {
        1..=5
    }

    fn problem(&self, seed: u64, index: u64, level: u32) -> Problem {
        let level = level.clamp(1, 5);
        let mut r = super::problem_rng(self.name(), seed, index, level);
        let (question, steps, answer) = match level {
            1 => level1(&mut r),
            2 => level2(&mut r),
            3 => level3(&mut r),
            4 => level4(&mut r),
            _ => level5(&mut r),
        };
        Problem {
            task: self.name().to_string(),
            level,
            question,
            steps,
            answer: answer.to_string(),
        }
    }
}

type Parts = (String, Vec<String>, i64);

/// A question about a symbolic expression `e`; `words` is `e` with the operators spelled out
/// (`3 plus 4`), used by some templates when given.
fn ask(r: &mut Rng, e: &str, words: Option<&str>) -> String {
    if let Some(w) = words {
        if r.below(4) == 0 {
            return match r.below(2) {
                0 => format!("What is {w}?"),
                _ => format!("How much is {w}?"),
            };
        }
    }
    match r.below(6) {
        0 => format!("What is {e}?"),
        1 => format!("Compute {e}."),
        2 => format!("Calculate {e}."),
        3 => format!("Find the value of {e}."),
        4 => format!("Evaluate {e}."),
        _ => format!("{e} = ?"),
    }
}

fn level1(r: &mut Rng) -> Parts {
    let a = r.range(0, 9);
    let b = r.range(0, 9);
    let (op, word, v) = if r.coin() {
        ('+', "plus", a + b)
    } else {
        ('-', "minus", a - b)
    };
    let e = format!("{a} {op} {b}");
    let q = ask(r, &e, Some(&format!("{a} {word} {b}")));
    (q, vec![format!("{e} = {v}")], v)
}

fn level2(r: &mut Rng) -> Parts {
    let units = *r.pick(&["Ones", "Units"]);
    if r.coin() {
        // Addition whose ones column carries.
        let (a1, b1) = loop {
            let (x, y) = (r.range(0, 9), r.range(0, 9));
            if x + y >= 10 {
                break (x, y);
            }
        };
        let (a10, b10) = (r.range(1, 9), r.range(1, 9));
        let (a, b) = (a10 * 10 + a1, b10 * 10 + b1);
        let ones = a1 + b1;
        let tens = a10 + b10 + 1;
        let v = a + b;
        let e = format!("{a} + {b}");
        let q = ask(r, &e, Some(&format!("{a} plus {b}")));
        let steps = vec![
            format!("{units} (carry 1): {a1} + {b1} = {ones}"),
            format!("Tens: {a10} + {b10} + 1 = {tens}"),
            format!("Combine: {tens} * 10 + {} = {v}", ones - 10),
        ];
        (q, steps, v)
    } else {
        // Subtraction whose ones column borrows; the result stays positive.
        let (a1, b1) = loop {
            let (x, y) = (r.range(0, 9), r.range(0, 9));
            if x < y {
                break (x, y);
            }
        };
        let a10 = r.range(2, 9);
        let b10 = r.range(1, a10 - 1);
        let (a, b) = (a10 * 10 + a1, b10 * 10 + b1);
        let ones = a1 + 10 - b1;
        let tens = a10 - 1 - b10;
        let v = a - b;
        let e = format!("{a} - {b}");
        let q = ask(r, &e, Some(&format!("{a} minus {b}")));
        let steps = vec![
            format!("{units} (borrow 1): {} - {b1} = {ones}", a1 + 10),
            format!("Tens: {a10} - 1 - {b10} = {tens}"),
            format!("Combine: {tens} * 10 + {ones} = {v}"),
        ];
        (q, steps, v)
    }
}

fn level3(r: &mut Rng) -> Parts {
    let a10 = r.range(1, 9);
    let a1 = r.range(0, 9);
    let a = a10 * 10 + a1;
    let b = r.range(2, 9);
    let (hi, lo) = (a10 * 10 * b, a1 * b);
    let v = a * b;
    let e = format!("{a} * {b}");
    let q = ask(r, &e, Some(&format!("{a} times {b}")));
    let mut steps = Vec::with_capacity(4);
    if r.coin() {
        steps.push(format!(
            "Split: {a} * {b} = {} * {b} + {a1} * {b}",
            a10 * 10
        ));
    }
    steps.push(format!("Tens: {} * {b} = {hi}", a10 * 10));
    steps.push(format!("Ones: {a1} * {b} = {lo}"));
    steps.push(format!("Add: {hi} + {lo} = {v}"));
    (q, steps, v)
}

fn level4(r: &mut Rng) -> Parts {
    let a = r.range(1, 20);
    let b = r.range(2, 12);
    let c = r.range(2, 9);
    // (expression, first sub-expression, its value, expression with it replaced, final value)
    let (e, first, x, rest, v) = match r.below(8) {
        0 => (
            format!("{a} + {b} * {c}"),
            format!("{b} * {c}"),
            b * c,
            format!("{a} + {}", b * c),
            a + b * c,
        ),
        1 => (
            format!("{a} - {b} * {c}"),
            format!("{b} * {c}"),
            b * c,
            format!("{a} - {}", b * c),
            a - b * c,
        ),
        2 => (
            format!("{b} * {c} + {a}"),
            format!("{b} * {c}"),
            b * c,
            format!("{} + {a}", b * c),
            b * c + a,
        ),
        3 => (
            format!("{b} * {c} - {a}"),
            format!("{b} * {c}"),
            b * c,
            format!("{} - {a}", b * c),
            b * c - a,
        ),
        4 => (
            format!("({a} + {b}) * {c}"),
            format!("{a} + {b}"),
            a + b,
            format!("{} * {c}", a + b),
            (a + b) * c,
        ),
        5 => (
            format!("({a} - {b}) * {c}"),
            format!("{a} - {b}"),
            a - b,
            format!("{} * {c}", a - b),
            (a - b) * c,
        ),
        6 => (
            format!("{c} * ({a} + {b})"),
            format!("{a} + {b}"),
            a + b,
            format!("{c} * {}", a + b),
            c * (a + b),
        ),
        _ => (
            format!("{a} + {b} - {c}"),
            format!("{a} + {b}"),
            a + b,
            format!("{} - {c}", a + b),
            a + b - c,
        ),
    };
    let q = ask(r, &e, None);
    let label = if e.contains('(') {
        *r.pick(&["Brackets first", "Inside the brackets", "Parentheses first"])
    } else if first.contains('*') {
        *r.pick(&[
            "Multiply first",
            "Multiplication first",
            "First the product",
        ])
    } else {
        *r.pick(&["Left to right", "First"])
    };
    // A negative partial result is bracketed so the rewritten expression reads right.
    let rest = if x < 0 {
        rest.replacen(&x.to_string(), &format!("({x})"), 1)
    } else {
        rest
    };
    let steps = vec![
        format!("{label}: {first} = {x}"),
        format!("Then: {e} = {rest} = {v}"),
    ];
    (q, steps, v)
}

const NAMES: &[&str] = &[
    "Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Juno", "Kai", "Lena",
];
const ITEMS: &[&str] = &[
    "apples", "pencils", "marbles", "stickers", "cookies", "cards", "shells", "books",
];

fn cap(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

fn level5(r: &mut Rng) -> Parts {
    let n = *r.pick(NAMES);
    let m = loop {
        let m = *r.pick(NAMES);
        if m != n {
            break m;
        }
    };
    let it = *r.pick(ITEMS);
    let container = *r.pick(&["bags", "boxes", "packs"]);
    match r.below(6) {
        0 => {
            let (a, b, c) = (r.range(2, 30), r.range(2, 9), r.range(2, 12));
            let x = b * c;
            let v = a + x;
            let q = format!(
                "{n} has {a} {it}. {n} buys {b} {container} of {c} {it} each. How many {it} does {n} have now?"
            );
            let steps = vec![
                format!("{} bought: {b} * {c} = {x}", cap(it)),
                format!("Total: {a} + {x} = {v}"),
            ];
            (q, steps, v)
        }
        1 => {
            let (b, c) = (r.range(2, 9), r.range(2, 6));
            let x = b * c;
            let a = x + r.range(0, 25);
            let v = a - x;
            let q = format!(
                "{n} has {a} {it} and gives {b} to each of {c} friends. How many {it} are left?"
            );
            let steps = vec![
                format!("Given away: {b} * {c} = {x}"),
                format!("Left: {a} - {x} = {v}"),
            ];
            (q, steps, v)
        }
        2 => {
            let (a, b) = (r.range(3, 12), r.range(2, 9));
            let x = a * b;
            let c = r.range(1, x);
            let v = x - c;
            let q = format!(
                "A shelf has {b} rows with {a} {it} in each row. {n} takes {c} of them. How many {it} are still on the shelf?"
            );
            let steps = vec![
                format!("On the shelf: {a} * {b} = {x}"),
                format!("Still there: {x} - {c} = {v}"),
            ];
            (q, steps, v)
        }
        3 => {
            let (a, b) = (r.range(3, 15), r.range(2, 7));
            let x = a * b;
            let c = r.range(1, x);
            let v = x - c;
            let thing = *r.pick(&["a book", "a kite", "lunch", "a game", "paint"]);
            let q = format!(
                "{n} earns {a} dollars a day for {b} days, then spends {c} dollars on {thing}. How many dollars does {n} have left?"
            );
            let steps = vec![
                format!("Earned: {a} * {b} = {x}"),
                format!("Left: {x} - {c} = {v}"),
            ];
            (q, steps, v)
        }
        4 => {
            let (b, c, d) = (r.range(2, 6), r.range(2, 10), r.range(2, 6));
            let x = b * c;
            // Pick the total first so that the share is exact, then the starting amount.
            let each = r.range((x / d) + 1, (x / d) + 8);
            let t = each * d;
            let a = t - x;
            let q = format!(
                "{n} has {a} {it} and buys {b} {container} of {c} more. {n} shares all of them equally among {d} friends. How many {it} does each friend get?"
            );
            let steps = vec![
                format!("Bought: {b} * {c} = {x}"),
                format!("Total: {a} + {x} = {t}"),
                format!("Each friend: {t} / {d} = {each}"),
            ];
            (q, steps, each)
        }
        _ => {
            let (a, k) = (r.range(2, 20), r.range(2, 5));
            let x = k * a;
            let v = a + x;
            let times = match k {
                2 => "twice".to_string(),
                3 => "three times".to_string(),
                4 => "four times".to_string(),
                _ => "five times".to_string(),
            };
            let q = format!(
                "{n} has {a} {it}. {m} has {times} as many {it} as {n}. How many {it} do they have together?"
            );
            let steps = vec![
                format!("{m} has: {k} * {a} = {x}"),
                format!("Together: {a} + {x} = {v}"),
            ];
            (q, steps, v)
        }
    }
}
