//! Tokenize once, in parallel, into token files on disk.
//!
//! A cache directory holds `train.bin` and `val.bin` (little-endian u32 ids; every document
//! is followed by `eos_id`) and `meta.json`. It is written into a temporary directory next
//! to its place and renamed into it, and reused as long as its fingerprint (sources with
//! their files' sizes and mtimes, tokenizer, eos id, validation split and seed) matches.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::rng::splitmix64;
use crate::sources::Source;
use crate::tokenizer::Tokenizer;

/// Bumped whenever the layout of the cache or the split rule changes.
const FORMAT_VERSION: u32 = 1;
/// Documents tokenized together (in parallel).
const CHUNK_DOCS: usize = 2048;

pub struct CacheSpec<'a> {
    pub sources: &'a [Source],
    pub tokenizer: &'a Tokenizer,
    pub eos_id: u32,
    /// Fraction of documents held out for validation, in `[0, 1)`.
    pub val_fraction: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenCache {
    pub dir: PathBuf,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub docs: u64,
}

impl TokenCache {
    pub fn train_file(&self) -> PathBuf {
        self.dir.join("train.bin")
    }
    pub fn val_file(&self) -> PathBuf {
        self.dir.join("val.bin")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    fingerprint: String,
    train_tokens: u64,
    val_tokens: u64,
    docs: u64,
    eos_id: u32,
    #[serde(default)]
    format_version: u32,
    #[serde(default)]
    sources: Vec<String>,
}

/// FNV-1a, 64-bit: a stable hash (unlike std's `DefaultHasher`).
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }
    /// Length-prefixed, so that concatenations stay unambiguous.
    fn field(&mut self, b: &[u8]) -> &mut Self {
        self.bytes(&(b.len() as u64).to_le_bytes()).bytes(b)
    }
}

/// The fingerprint of what a cache built from `spec` would contain.
pub fn fingerprint(spec: &CacheSpec) -> Result<String> {
    let mut h = Fnv::new();
    h.field(b"ember-token-cache")
        .field(&FORMAT_VERSION.to_le_bytes());
    for s in spec.sources {
        h.field(s.describe().as_bytes());
        for f in s.files()? {
            let m =
                std::fs::metadata(&f).map_err(|e| anyhow!("{}: cannot stat ({e})", f.display()))?;
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .unwrap_or(Duration::ZERO);
            h.field(f.to_string_lossy().as_bytes())
                .field(&m.len().to_le_bytes())
                .field(&mtime.as_nanos().to_le_bytes());
        }
    }
    let tok = spec.tokenizer.inner().to_string(false).map_err(|e| {
        anyhow!(
            "{}: cannot serialize tokenizer ({e})",
            spec.tokenizer.origin.display()
        )
    })?;
    let mut th = Fnv::new();
    th.bytes(tok.as_bytes());
    h.field(&th.0.to_le_bytes())
        .field(&spec.eos_id.to_le_bytes())
        .field(&spec.val_fraction.to_bits().to_le_bytes())
        .field(&spec.seed.to_le_bytes());
    // Two differently seeded passes make a 128-bit id.
    let lo = h.0;
    let hi = splitmix64(lo ^ th.0.rotate_left(17));
    Ok(format!("{lo:016x}{hi:016x}"))
}

/// Whether document `index` goes to validation.
fn is_val(seed: u64, index: u64, val_fraction: f64) -> bool {
    if val_fraction <= 0.0 {
        return false;
    }
    let h = splitmix64(splitmix64(seed ^ 0x7661_6c69_6461_7465) ^ index);
    ((h >> 11) as f64 / (1u64 << 53) as f64) < val_fraction
}

fn read_meta(dir: &Path) -> Option<Meta> {
    let text = std::fs::read_to_string(dir.join("meta.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Reuses the cache in `dir` if its fingerprint matches `spec`, or builds it.
pub fn build_or_reuse(spec: &CacheSpec, dir: &Path, progress: bool) -> Result<TokenCache> {
    if !(0.0..1.0).contains(&spec.val_fraction) {
        bail!(
            "val_fraction {} must be in [0, 1) (token cache {})",
            spec.val_fraction,
            dir.display()
        );
    }
    if spec.sources.is_empty() {
        bail!("{}: no data sources to tokenize", dir.display());
    }
    for s in spec.sources {
        s.check()?;
    }
    let fp = fingerprint(spec)?;
    if let Some(m) = read_meta(dir) {
        if m.fingerprint == fp && dir.join("train.bin").is_file() && dir.join("val.bin").is_file() {
            return Ok(TokenCache {
                dir: dir.to_path_buf(),
                train_tokens: m.train_tokens,
                val_tokens: m.val_tokens,
                docs: m.docs,
            });
        }
    }

    let name = dir
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a usable cache directory name", dir.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("{}: cannot create directory", parent.display()))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)
        .with_context(|| format!("{}: cannot create directory", tmp.display()))?;

    let result = build_into(spec, &tmp, &fp, progress);
    let meta = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("{}: cannot remove stale token cache", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp);
        anyhow!(
            "{}: cannot move token cache into place ({e})",
            dir.display()
        )
    })?;
    Ok(TokenCache {
        dir: dir.to_path_buf(),
        train_tokens: meta.train_tokens,
        val_tokens: meta.val_tokens,
        docs: meta.docs,
    })
}

struct Out {
    path: PathBuf,
    w: BufWriter<File>,
    tokens: u64,
    docs: u64,
}

impl Out {
    fn create(path: PathBuf) -> Result<Self> {
        let f =
            File::create(&path).map_err(|e| anyhow!("{}: cannot create ({e})", path.display()))?;
        Ok(Self {
            path,
            w: BufWriter::with_capacity(1 << 20, f),
            tokens: 0,
            docs: 0,
        })
    }

    fn doc(&mut self, ids: &[u32], eos: u32) -> Result<()> {
        let mut buf = Vec::with_capacity((ids.len() + 1) * 4);
        for &t in ids.iter().chain(std::iter::once(&eos)) {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        self.w
            .write_all(&buf)
            .map_err(|e| anyhow!("{}: write error ({e})", self.path.display()))?;
        self.tokens += ids.len() as u64 + 1;
        self.docs += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        self.w
            .flush()
            .map_err(|e| anyhow!("{}: write error ({e})", self.path.display()))?;
        self.w
            .get_ref()
            .sync_all()
            .map_err(|e| anyhow!("{}: write error ({e})", self.path.display()))
    }
}

fn build_into(spec: &CacheSpec, tmp: &Path, fp: &str, progress: bool) -> Result<Meta> {
    let mut train = Out::create(tmp.join("train.bin"))?;
    let mut val = Out::create(tmp.join("val.bin"))?;

    let bar = if progress {
        let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template("{spinner} tokenizing [{elapsed_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    } else {
        ProgressBar::hidden()
    };
    let start = Instant::now();

    // The last document headed for train is held back, so that it can go to validation
    // instead if no document landed there (a tiny corpus).
    let mut held: Option<Vec<u32>> = None;
    let mut index = 0u64;
    let mut chunk: Vec<String> = Vec::with_capacity(CHUNK_DOCS);
    let flush = |chunk: &mut Vec<String>,
                 held: &mut Option<Vec<u32>>,
                 index: &mut u64,
                 train: &mut Out,
                 val: &mut Out|
     -> Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let ids = spec.tokenizer.encode_batch(chunk)?;
        chunk.clear();
        for doc in ids {
            if is_val(spec.seed, *index, spec.val_fraction) {
                val.doc(&doc, spec.eos_id)?;
            } else if let Some(prev) = held.replace(doc) {
                train.doc(&prev, spec.eos_id)?;
            }
            *index += 1;
        }
        let tokens = train.tokens + val.tokens;
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "{index} docs, {tokens} tokens, {:.0} tok/s",
            tokens as f64 / secs
        ));
        Ok(())
    };

    for s in spec.sources {
        for doc in s.documents()? {
            chunk.push(doc?);
            if chunk.len() >= CHUNK_DOCS {
                flush(&mut chunk, &mut held, &mut index, &mut train, &mut val)?;
            }
        }
    }
    flush(&mut chunk, &mut held, &mut index, &mut train, &mut val)?;
    if let Some(last) = held.take() {
        if spec.val_fraction > 0.0 && val.docs == 0 {
            val.doc(&last, spec.eos_id)?;
        } else {
            train.doc(&last, spec.eos_id)?;
        }
    }
    bar.finish_and_clear();
    if index == 0 {
        let names: Vec<String> = spec.sources.iter().map(Source::describe).collect();
        bail!("data sources yielded no documents ({})", names.join("; "));
    }
    let meta = Meta {
        fingerprint: fp.to_string(),
        train_tokens: train.tokens,
        val_tokens: val.tokens,
        docs: index,
        eos_id: spec.eos_id,
        format_version: FORMAT_VERSION,
        sources: spec.sources.iter().map(Source::describe).collect(),
    };
    train.finish()?;
    val.finish()?;
    let meta_path = tmp.join("meta.json");
    let text = serde_json::to_string_pretty(&meta)?;
    std::fs::write(&meta_path, text)
        .map_err(|e| anyhow!("{}: cannot write ({e})", meta_path.display()))?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn val_split_is_deterministic_and_near_the_fraction() {
        let n = (0..10_000).filter(|&i| is_val(3, i, 0.1)).count();
        assert!((800..1200).contains(&n), "{n}");
        let a: Vec<bool> = (0..100).map(|i| is_val(3, i, 0.1)).collect();
        let b: Vec<bool> = (0..100).map(|i| is_val(3, i, 0.1)).collect();
        let c: Vec<bool> = (0..100).map(|i| is_val(4, i, 0.1)).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(!(0..100).any(|i| is_val(3, i, 0.0)));
    }
}
