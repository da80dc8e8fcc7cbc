//! HF checkpoint interop: `config.json` plus `model.safetensors`, or a sharded
//! `model.safetensors.index.json`, in and out.
//!
//! Every failure names the file and the tensor or field at fault, because a user holding a
//! 5 GB checkpoint needs to know which of its 300 tensors disagrees, not that "shape
//! mismatch" happened somewhere.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::TensorData;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::Value;

use crate::weights::{Init, WeightSink, WeightSource};

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const INDEX: &str = "model.safetensors.index.json";

/// Reads `DIR/config.json`.
pub fn read_config(dir: &Path) -> Result<Value> {
    let path = dir.join(CONFIG);
    let text =
        fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// `model_type` of a config, with a clear error when it is absent.
pub fn model_type(config: &Value, dir: &Path) -> Result<String> {
    config
        .get("model_type")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| {
            anyhow!(
                "{}: field `model_type` is missing",
                dir.join(CONFIG).display()
            )
        })
}

/// Typed reads of a config.json's fields, each error naming the file and the field.
pub struct Fields<'a> {
    pub v: &'a Value,
    pub origin: &'a str,
}

impl<'a> Fields<'a> {
    pub fn new(v: &'a Value, origin: &'a str) -> Self {
        Self { v, origin }
    }

    /// A non-negative integer; `default` when absent (an error when there is none).
    pub fn usize(&self, k: &str, default: Option<usize>) -> Result<usize> {
        match self.v.get(k) {
            Some(x) => x
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| anyhow!("{}: `{k}` must be a non-negative integer", self.origin)),
            None => default.ok_or_else(|| anyhow!("{}: `{k}` is missing", self.origin)),
        }
    }

    /// A float (also `{"__float__": "Infinity"}`, as transformers writes infinities).
    pub fn f64(&self, k: &str, default: f64) -> f64 {
        self.v.get(k).and_then(float_of).unwrap_or(default)
    }

    pub fn bool(&self, k: &str, default: bool) -> bool {
        self.v.get(k).and_then(Value::as_bool).unwrap_or(default)
    }
}

/// A float that config.json may spell `{"__float__": "Infinity"}`.
pub fn float_of(v: &Value) -> Option<f64> {
    v.as_f64()
        .or_else(|| match v.get("__float__").and_then(Value::as_str) {
            Some("Infinity") => Some(f64::INFINITY),
            Some("-Infinity") => Some(f64::NEG_INFINITY),
            _ => None,
        })
}

/// Loads `dir` (config.json + safetensors): `parse` reads the config (given the file's name
/// for errors), `load` builds the model from the checkpoint, and every tensor must be used
/// except the `ignorable` ones (a tied head's copy).
pub fn load_dir<C, M>(
    dir: &Path,
    parse: impl FnOnce(&Value, &str) -> Result<C>,
    load: impl FnOnce(C, &mut Checkpoint) -> Result<M>,
    ignorable: &[&str],
) -> Result<M> {
    let v = read_config(dir)?;
    let config = parse(&v, &dir.join(CONFIG).display().to_string())?;
    let mut ckpt = Checkpoint::open(dir)?;
    let model = load(config, &mut ckpt)?;
    ckpt.finish(ignorable)?;
    Ok(model)
}

struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    range: (usize, usize),
}

/// The tensors of a checkpoint directory, read once and handed out by name.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<PathBuf>,
    buffers: Vec<Vec<u8>>,
    entries: HashMap<String, Entry>,
    taken: HashSet<String>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX);
        let files: Vec<PathBuf> = if index.exists() {
            let text = fs::read_to_string(&index)
                .with_context(|| format!("{}: cannot read", index.display()))?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", index.display()))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| anyhow!("{}: field `weight_map` is missing", index.display()))?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if dir.join(WEIGHTS).exists() {
            vec![dir.join(WEIGHTS)]
        } else if !dir.is_dir() {
            bail!("{}: no such checkpoint directory", dir.display())
        } else {
            bail!(
                "{}: neither {WEIGHTS} nor {INDEX} is present",
                dir.display()
            )
        };

        let mut buffers = Vec::new();
        let mut entries = HashMap::new();
        for (shard, file) in files.iter().enumerate() {
            let buf = fs::read(file).with_context(|| format!("{}: cannot read", file.display()))?;
            let (header, meta) = SafeTensors::read_metadata(&buf)
                .map_err(|e| anyhow!("{}: not a valid safetensors file ({e})", file.display()))?;
            let base = 8 + header;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                entries.insert(
                    name,
                    Entry {
                        shard,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        range: (base + a, base + b),
                    },
                );
            }
            buffers.push(buf);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            buffers,
            entries,
            taken: HashSet::new(),
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Fails on any tensor the model did not ask for: a silently ignored tensor is how a
    /// mis-mapped name turns into a model that loads and is wrong.
    pub fn finish(self, ignorable: &[&str]) -> Result<()> {
        let mut extra: Vec<&String> = self
            .entries
            .keys()
            .filter(|k| !self.taken.contains(*k))
            .filter(|k| !ignorable.contains(&k.as_str()) && !k.ends_with("rotary_emb.inv_freq"))
            .collect();
        extra.sort();
        if let Some(name) = extra.first() {
            let e = &self.entries[*name];
            bail!(
                "{}: unexpected tensor `{name}` (not part of this model's config; {} unexpected in all)",
                self.files[e.shard].display(),
                extra.len()
            );
        }
        Ok(())
    }
}

impl WeightSource for Checkpoint {
    fn take(&mut self, name: &str, shape: &[usize], _init: Init) -> Result<TensorData> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| anyhow!("{}: missing tensor `{name}`", self.dir.display()))?;
        let file = self.files[e.shard].display();
        if e.shape != shape {
            bail!(
                "{file}: tensor `{name}` has shape {:?}, expected {:?} from config.json",
                e.shape,
                shape
            );
        }
        let bytes = &self.buffers[e.shard][e.range.0..e.range.1];
        let values: Vec<f32> = match e.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => bail!(
                "{file}: tensor `{name}` has dtype {other:?}; only F32, BF16 and F16 are supported"
            ),
        };
        self.taken.insert(name.to_string());
        Ok(TensorData::new(values, shape.to_vec()))
    }
}

/// Storage dtype of a saved checkpoint. Training keeps f32 masters; bf16 halves the size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    Bf16,
}

impl SaveDtype {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => bail!("unknown save dtype `{s}` (expected f32 or bf16)"),
        }
    }
    fn hf_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
        }
    }
}

#[derive(Clone, Debug)]
pub struct SaveOptions {
    pub dtype: SaveDtype,
    /// Split into `model-0000i-of-0000n.safetensors` shards of at most this many bytes.
    pub max_shard_bytes: Option<usize>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            dtype: SaveDtype::F32,
            max_shard_bytes: Some(5 << 30),
        }
    }
}

struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn encode(data: TensorData, dtype: SaveDtype) -> Owned {
    let shape = data.shape().to_vec();
    let v: Vec<f32> = data.iter::<f32>().collect();
    match dtype {
        SaveDtype::F32 => Owned {
            dtype: Dtype::F32,
            shape,
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
        SaveDtype::Bf16 => Owned {
            dtype: Dtype::BF16,
            shape,
            bytes: v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
        },
    }
}

/// Writes `bytes` to `path` atomically: a reader sees the old file or the whole new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("{}: cannot move into place", path.display()))
}

/// Saves a checkpoint in HF layout. The config's `dtype`/`torch_dtype` are set to the
/// storage dtype. Files of the other layout (single vs sharded) left from an earlier save
/// are removed only after the new files are in place.
pub fn save(dir: &Path, config: &Value, weights: WeightSink, opts: &SaveOptions) -> Result<()> {
    fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let mut tensors: BTreeMap<String, Owned> = BTreeMap::new();
    for (name, data) in weights {
        tensors.insert(name, encode(data, opts.dtype));
    }
    let total: usize = tensors.values().map(|t| t.bytes.len()).sum();

    // Group into shards in name order.
    let limit = opts.max_shard_bytes.unwrap_or(usize::MAX).max(1);
    let mut shards: Vec<Vec<&String>> = vec![vec![]];
    let mut size = 0usize;
    for (name, t) in &tensors {
        if size > 0 && size + t.bytes.len() > limit {
            shards.push(vec![]);
            size = 0;
        }
        size += t.bytes.len();
        shards.last_mut().unwrap().push(name);
    }
    let n = shards.len();
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let mut weight_map = BTreeMap::new();
    let mut written = Vec::new();
    for (i, names) in shards.iter().enumerate() {
        let file = if n == 1 {
            WEIGHTS.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let views: Vec<(String, TensorView<'_>)> = names
            .iter()
            .map(|name| {
                let t = &tensors[*name];
                (
                    (*name).clone(),
                    TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                        .expect("sizes agree by construction"),
                )
            })
            .collect();
        let bytes = safetensors::tensor::serialize(views, Some(meta.clone())).map_err(|e| {
            anyhow!(
                "{}: cannot serialise safetensors ({e})",
                dir.join(&file).display()
            )
        })?;
        write_atomic(&dir.join(&file), &bytes)?;
        for name in names {
            weight_map.insert((*name).clone(), file.clone());
        }
        written.push(file);
    }

    let stale_index = dir.join(INDEX);
    let old_shards: Vec<String> = fs::read_to_string(&stale_index)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.get("weight_map").and_then(Value::as_object).cloned())
        .map(|m| {
            m.values()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if n > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_atomic(
            &stale_index,
            serde_json::to_string_pretty(&index)?.as_bytes(),
        )?;
        let _ = fs::remove_file(dir.join(WEIGHTS));
    } else {
        let _ = fs::remove_file(&stale_index);
    }
    for old in old_shards {
        if !written.contains(&old) {
            let _ = fs::remove_file(dir.join(old));
        }
    }

    let mut config = config.clone();
    if let Some(obj) = config.as_object_mut() {
        obj.insert("dtype".into(), Value::from(opts.dtype.hf_name()));
        obj.remove("torch_dtype");
    }
    write_atomic(
        &dir.join(CONFIG),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )
}
