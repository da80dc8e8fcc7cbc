//! Learning-rate schedules as pure functions of the step, so a resumed run needs no
//! scheduler state beyond the step count.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Linear warmup, then cosine decay to `min_lr_ratio · lr` at the last step.
    Cosine,
    /// Warmup-stable-decay: linear warmup, constant, then a linear decay over the final
    /// `decay_fraction` of the steps (MiniCPM, DeepSeek).
    Wsd,
    /// Linear warmup, then constant.
    Constant,
}

#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub min_lr_ratio: f64,
    pub decay_fraction: f64,
}

impl Schedule {
    /// `lr` at every step, no warmup (benchmarks).
    pub fn constant(lr: f64) -> Self {
        Self {
            kind: ScheduleKind::Constant,
            lr,
            warmup_steps: 0,
            total_steps: 1,
            min_lr_ratio: 1.0,
            decay_fraction: 0.0,
        }
    }

    /// The learning rate for 0-based optimizer step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        let min = self.lr * self.min_lr_ratio;
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let total = self.total_steps.max(1);
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Cosine => {
                let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
                let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
                min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * t).cos())
            }
            ScheduleKind::Wsd => {
                let decay = ((total as f64) * self.decay_fraction).round() as u64;
                let start = total.saturating_sub(decay).max(self.warmup_steps);
                if step < start {
                    self.lr
                } else {
                    let t = ((step - start + 1) as f64 / (total - start).max(1) as f64).min(1.0);
                    self.lr - (self.lr - min) * t
                }
            }
        }
    }
}

/// The learning rate over a whole stage: one schedule, or one per curriculum phase, each
/// phase re-warming and decaying over its own steps (the step passed to a phase's schedule
/// counts from the phase's start).
#[derive(Debug, Clone)]
pub struct LrPlan {
    /// `(first step, schedule)`, in order of first step; the first starts at 0.
    pieces: Vec<(u64, Schedule)>,
}

impl LrPlan {
    /// Phases of `(steps, schedule)` run back to back.
    pub fn phased(phases: impl IntoIterator<Item = (u64, Schedule)>) -> Self {
        let mut start = 0;
        let mut pieces = Vec::new();
        for (steps, s) in phases {
            pieces.push((start, s));
            start += steps;
        }
        assert!(!pieces.is_empty(), "an LR plan needs at least one phase");
        Self { pieces }
    }

    pub fn lr_at(&self, step: u64) -> f64 {
        let (start, s) = self
            .pieces
            .iter()
            .rev()
            .find(|(start, _)| *start <= step)
            .unwrap_or(&self.pieces[0]);
        s.lr_at(step - start)
    }
}

impl From<Schedule> for LrPlan {
    fn from(s: Schedule) -> Self {
        Self {
            pieces: vec![(0, s)],
        }
    }
}
