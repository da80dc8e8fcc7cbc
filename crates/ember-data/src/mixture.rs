//! Weighted data mixtures for curricula: each row of a batch comes from one source, chosen so
//! that the realised shares track the weights as closely as whole rows allow.
//!
//! The choice is a deficit rule (smooth weighted round-robin): the next row goes to the source
//! furthest below its target share, ties to the lower index. It is deterministic, needs no
//! random state, and after `n` rows every source is within one row of `weight · n`, so the
//! shares stay within 1% after a hundred rows. Randomness comes from each source's own seeded
//! window order. The whole state (per-source cursors and row counts) goes into checkpoints.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::loader::{Batch, Cursor, PackedLoader};

/// What a checkpoint needs to continue a mixture exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixtureState {
    pub cursors: Vec<Cursor>,
    /// Rows drawn from each source since the weights were last set.
    pub rows: Vec<u64>,
}

pub struct MixtureLoader {
    names: Vec<String>,
    /// One-row loaders, one per source.
    sources: Vec<PackedLoader>,
    weights: Vec<f64>,
    rows: Vec<u64>,
    batch: usize,
}

fn normalised(names: &[String], weights: &[f64]) -> Result<Vec<f64>> {
    if weights.len() != names.len() {
        bail!(
            "mixture: {} weights for {} sources",
            weights.len(),
            names.len()
        );
    }
    if let Some((n, w)) = names
        .iter()
        .zip(weights)
        .find(|(_, w)| !w.is_finite() || **w < 0.0)
    {
        bail!("mixture: weight of `{n}` is {w}; weights must be finite and non-negative");
    }
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        bail!("mixture: the weights sum to 0");
    }
    Ok(weights.iter().map(|w| w / total).collect())
}

impl MixtureLoader {
    /// `sources` are `(name, loader)` pairs whose loaders were opened with a batch of 1.
    pub fn new(
        sources: Vec<(String, PackedLoader)>,
        weights: &[f64],
        batch: usize,
    ) -> Result<Self> {
        let (names, sources): (Vec<String>, Vec<PackedLoader>) = sources.into_iter().unzip();
        if let Some(i) = sources.iter().position(|l| l.batch_size() != 1) {
            bail!(
                "mixture: source `{}` must be opened with a batch of 1",
                names[i]
            );
        }
        let weights = normalised(&names, weights)?;
        let rows = vec![0; names.len()];
        Ok(Self {
            names,
            sources,
            weights,
            rows,
            batch,
        })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// New weights (a new curriculum phase): the row counts restart, the sources continue
    /// where they were, so no data repeats early.
    pub fn set_weights(&mut self, weights: &[f64]) -> Result<()> {
        self.weights = normalised(&self.names, weights)?;
        self.rows.iter_mut().for_each(|r| *r = 0);
        Ok(())
    }

    /// Rows drawn from each source since the weights were set.
    pub fn rows(&self) -> &[u64] {
        &self.rows
    }

    fn pick(&self) -> usize {
        let n = self.rows.iter().sum::<u64>() as f64 + 1.0;
        let mut best = 0;
        let mut best_deficit = f64::NEG_INFINITY;
        for (i, (&w, &r)) in self.weights.iter().zip(&self.rows).enumerate() {
            if w == 0.0 {
                continue;
            }
            let deficit = w * n - r as f64;
            if deficit > best_deficit {
                best = i;
                best_deficit = deficit;
            }
        }
        best
    }

    /// The next batch and, per row, the index of the source it came from.
    pub fn next_batch(&mut self) -> Result<(Batch, Vec<usize>)> {
        let mut from = Vec::with_capacity(self.batch);
        let mut rows = Vec::with_capacity(self.batch);
        for _ in 0..self.batch {
            let i = self.pick();
            rows.push(self.sources[i].next_batch()?);
            self.rows[i] += 1;
            from.push(i);
        }
        Ok((Batch::concat(&rows), from))
    }

    pub fn state(&self) -> MixtureState {
        MixtureState {
            cursors: self.sources.iter().map(PackedLoader::cursor).collect(),
            rows: self.rows.clone(),
        }
    }

    pub fn restore(&mut self, s: &MixtureState) -> Result<()> {
        if s.cursors.len() != self.sources.len() || s.rows.len() != self.sources.len() {
            bail!(
                "mixture state has {} sources, the recipe has {}",
                s.cursors.len(),
                self.sources.len()
            );
        }
        for (l, c) in self.sources.iter_mut().zip(&s.cursors) {
            l.set_cursor(*c)?;
        }
        self.rows = s.rows.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_file(dir: &std::path::Path, name: &str, base: u32, n: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        let bytes: Vec<u8> = (0..n).flat_map(|i| (base + i).to_le_bytes()).collect();
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn mixture(dir: &std::path::Path, weights: &[f64]) -> MixtureLoader {
        let src = |name: &str, base| {
            let f = token_file(dir, name, base, 4000);
            (
                name.to_string(),
                PackedLoader::open(&f, 8, 1, 5, true, false, 0).unwrap(),
            )
        };
        MixtureLoader::new(
            vec![src("a", 100_000), src("b", 200_000), src("c", 300_000)],
            weights,
            4,
        )
        .unwrap()
    }

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ember-mixture-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn realised_shares_track_the_weights_and_rows_come_from_their_source() {
        let d = dir("shares");
        let mut m = mixture(&d, &[0.6, 0.3, 0.1]);
        for _ in 0..250 {
            let (b, from) = m.next_batch().unwrap();
            for (r, &i) in from.iter().enumerate() {
                // Each source's tokens live in its own id range.
                let t = b.inputs[r * 8];
                assert_eq!(
                    t / 100_000,
                    i as u32 + 1,
                    "row {r} claims source {i} but holds {t}"
                );
            }
        }
        let total = 1000.0;
        for (got, want) in m.rows().iter().zip([0.6, 0.3, 0.1]) {
            assert!((*got as f64 / total - want).abs() < 0.01, "{:?}", m.rows());
        }
        // A new phase restarts the counts with new weights.
        m.set_weights(&[0.0, 0.0, 1.0]).unwrap();
        let (_, from) = m.next_batch().unwrap();
        assert_eq!(from, [2, 2, 2, 2]);
        assert!(m.set_weights(&[0.0, 0.0, 0.0]).is_err());
        assert!(m.set_weights(&[1.0, -1.0, 1.0]).is_err());
    }

    #[test]
    fn restoring_the_state_continues_with_the_same_batches() {
        let d = dir("resume");
        let mut full = mixture(&d, &[0.5, 0.25, 0.25]);
        let mut cut = mixture(&d, &[0.5, 0.25, 0.25]);
        let reference: Vec<_> = (0..40).map(|_| full.next_batch().unwrap()).collect();
        for r in &reference[..13] {
            assert_eq!(&cut.next_batch().unwrap(), r);
        }
        let saved = serde_json::to_string(&cut.state()).unwrap();
        let mut resumed = mixture(&d, &[0.5, 0.25, 0.25]);
        resumed
            .restore(&serde_json::from_str(&saved).unwrap())
            .unwrap();
        for r in &reference[13..] {
            assert_eq!(&resumed.next_batch().unwrap(), r);
        }
    }
}
