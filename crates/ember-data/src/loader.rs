//! Packed training batches from a token file (`train.bin` / `val.bin`: little-endian u32),
//! with an exact, resumable cursor.
//!
//! The file is cut into non-overlapping windows: window `i` covers tokens
//! `[i*seq_len, i*seq_len + seq_len + 1)` (the extra token is the last target). Each epoch
//! visits the windows in a permutation seeded by `(seed, epoch)`; a batch takes the next
//! `batch` windows of it, and the last partial batch of an epoch is dropped. Windows are read
//! with positioned reads, so the file is never loaded whole.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};

use crate::rng::{splitmix64, Rng};

/// Where the loader is: `index` is the next position in this epoch's permutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub index: u64,
}

/// One batch, row-major `[batch, seq_len]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub seq_len: usize,
    pub inputs: Vec<u32>,
    /// `inputs` shifted by one.
    pub targets: Vec<u32>,
    /// `0..seq_len` per row, or restarting at 0 after each EOS when `doc_masks`.
    pub positions: Vec<u32>,
    /// The document index within the row (incremented after each EOS) when `doc_masks`.
    pub segments: Option<Vec<u32>>,
    /// Per-target loss weights (SFT: 0 outside assistant turns); `None` trains every target.
    pub weights: Option<Vec<f32>>,
}

impl Batch {
    /// Stacks batches with the same `seq_len` row-wise (mixtures build a batch row by row).
    pub fn concat(parts: &[Batch]) -> Batch {
        let seq_len = parts.first().map_or(0, |b| b.seq_len);
        let cat = |f: &dyn Fn(&Batch) -> &Vec<u32>| {
            parts.iter().flat_map(|b| f(b).iter().copied()).collect()
        };
        Batch {
            batch: parts.iter().map(|b| b.batch).sum(),
            seq_len,
            inputs: cat(&|b| &b.inputs),
            targets: cat(&|b| &b.targets),
            positions: cat(&|b| &b.positions),
            segments: parts
                .iter()
                .map(|b| b.segments.clone())
                .collect::<Option<Vec<_>>>()
                .map(|v| v.concat()),
            weights: parts
                .iter()
                .map(|b| b.weights.clone())
                .collect::<Option<Vec<_>>>()
                .map(|v| v.concat()),
        }
    }
}

pub struct PackedLoader {
    file: File,
    path: PathBuf,
    seq_len: usize,
    batch: usize,
    seed: u64,
    shuffle: bool,
    doc_masks: bool,
    eos_id: u32,
    windows: u64,
    cursor: Cursor,
    /// The permutation of the cursor's epoch (empty when not shuffling).
    order: Vec<u64>,
}

impl PackedLoader {
    pub fn open(
        file: &Path,
        seq_len: usize,
        batch: usize,
        seed: u64,
        shuffle: bool,
        doc_masks: bool,
        eos_id: u32,
    ) -> Result<Self> {
        if seq_len == 0 {
            bail!("{}: seq_len must be at least 1", file.display());
        }
        if batch == 0 {
            bail!("{}: batch size must be at least 1", file.display());
        }
        let f = File::open(file).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!("{}: no such token file", file.display())
            } else {
                anyhow!("{}: cannot open token file ({e})", file.display())
            }
        })?;
        let bytes = f
            .metadata()
            .map_err(|e| anyhow!("{}: cannot stat token file ({e})", file.display()))?
            .len();
        if bytes % 4 != 0 {
            bail!(
                "{}: size {bytes} bytes is not a multiple of 4 (not a u32 token file)",
                file.display()
            );
        }
        let tokens = bytes / 4;
        let windows = tokens.saturating_sub(1) / seq_len as u64;
        if windows == 0 {
            bail!(
                "{}: only {tokens} tokens, fewer than seq_len+1 = {}",
                file.display(),
                seq_len + 1
            );
        }
        if windows < batch as u64 {
            bail!(
                "{}: only {windows} windows of seq_len {seq_len}, fewer than one batch of {batch}",
                file.display()
            );
        }
        let mut me = Self {
            file: f,
            path: file.to_path_buf(),
            seq_len,
            batch,
            seed,
            shuffle,
            doc_masks,
            eos_id,
            windows,
            cursor: Cursor { epoch: 0, index: 0 },
            order: vec![],
        };
        me.set_cursor(Cursor { epoch: 0, index: 0 })?;
        Ok(me)
    }

    /// Number of full windows in the file.
    pub fn windows(&self) -> u64 {
        self.windows
    }

    /// Rows per batch.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Full batches per epoch (the last partial batch is dropped).
    pub fn batches_per_epoch(&self) -> u64 {
        self.windows / self.batch as u64
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    pub fn set_cursor(&mut self, c: Cursor) -> Result<()> {
        if c.index > self.windows {
            bail!(
                "{}: cursor index {} is past the {} windows of an epoch",
                self.path.display(),
                c.index,
                self.windows
            );
        }
        if self.order.is_empty() || c.epoch != self.cursor.epoch {
            self.order = self.permutation(c.epoch);
        }
        self.cursor = c;
        Ok(())
    }

    fn permutation(&self, epoch: u64) -> Vec<u64> {
        if !self.shuffle {
            return vec![];
        }
        let mut order: Vec<u64> = (0..self.windows).collect();
        let mut rng = Rng::new(self.seed ^ splitmix64(epoch.wrapping_add(0x005e_ed0f_e90c)));
        for i in (1..order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        order
    }

    fn window_at(&self, pos: u64) -> u64 {
        if self.shuffle {
            self.order[pos as usize]
        } else {
            pos
        }
    }

    /// The next batch; at the end of an epoch it moves to the next one.
    pub fn next_batch(&mut self) -> Result<Batch> {
        if self.cursor.index + self.batch as u64 > self.windows {
            self.set_cursor(Cursor {
                epoch: self.cursor.epoch + 1,
                index: 0,
            })?;
        }
        let start = self.cursor.index;
        let windows: Vec<u64> = (start..start + self.batch as u64)
            .map(|p| self.window_at(p))
            .collect();
        let b = self.read_batch(&windows)?;
        self.cursor.index += self.batch as u64;
        Ok(b)
    }

    /// The first `max_batches` batches in file order, without touching the cursor.
    pub fn eval_batches(&self, max_batches: usize) -> Result<Vec<Batch>> {
        let n = (max_batches as u64).min(self.batches_per_epoch());
        (0..n)
            .map(|b| {
                let s = b * self.batch as u64;
                let windows: Vec<u64> = (s..s + self.batch as u64).collect();
                self.read_batch(&windows)
            })
            .collect()
    }

    fn read_batch(&self, windows: &[u64]) -> Result<Batch> {
        let (s, b) = (self.seq_len, windows.len());
        let mut inputs = Vec::with_capacity(b * s);
        let mut targets = Vec::with_capacity(b * s);
        let mut positions = Vec::with_capacity(b * s);
        let mut segments = self.doc_masks.then(|| Vec::with_capacity(b * s));
        let mut buf = vec![0u8; (s + 1) * 4];
        let mut toks = vec![0u32; s + 1];
        for &w in windows {
            let offset = w * s as u64 * 4;
            read_exact_at(&self.file, &mut buf, offset).map_err(|e| {
                anyhow!(
                    "{}: cannot read window {w} at byte {offset} ({e})",
                    self.path.display()
                )
            })?;
            for (t, c) in toks.iter_mut().zip(buf.chunks_exact(4)) {
                *t = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            inputs.extend_from_slice(&toks[..s]);
            targets.extend_from_slice(&toks[1..]);
            match &mut segments {
                None => positions.extend(0..s as u32),
                Some(segs) => {
                    let (mut pos, mut seg) = (0u32, 0u32);
                    for &t in &toks[..s] {
                        positions.push(pos);
                        segs.push(seg);
                        if t == self.eos_id {
                            pos = 0;
                            seg += 1;
                        } else {
                            pos += 1;
                        }
                    }
                }
            }
        }
        Ok(Batch {
            batch: b,
            seq_len: s,
            inputs,
            targets,
            positions,
            segments,
            weights: None,
        })
    }
}

#[cfg(unix)]
fn read_exact_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, offset)
}

#[cfg(not(unix))]
fn read_exact_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = f.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}
