//! Recipe files (TOML). Every key is checked: a misspelt key is an error naming the file,
//! the line and the key, never a silently ignored setting.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use ember_models::qwen3::Qwen3Config;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub run: RunSection,
    /// The architecture table: `arch` plus the HF config.json fields of that model.
    pub model: toml::Table,
    #[serde(default)]
    pub generate: Option<GenerateSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    /// Runs are written to `<out_dir>/<name>/`.
    #[serde(default = "default_out_dir")]
    pub out_dir: PathBuf,
}

fn default_out_dir() -> PathBuf {
    PathBuf::from("runs")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateSection {
    pub prompt: String,
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub temperature: f32,
    #[serde(default)]
    pub top_k: usize,
    #[serde(default = "one")]
    pub top_p: f32,
}

fn default_new_tokens() -> usize {
    64
}
fn one() -> f32 {
    1.0
}

/// The model a recipe describes.
pub enum ModelSpec {
    Qwen3(Qwen3Config),
}

impl Recipe {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("{}: cannot read recipe ({e})", path.display()))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start].lines().count().max(1));
            let msg = e.message().replace('\n', " ");
            match line {
                Some(l) => anyhow!("{}:{l}: {msg}", path.display()),
                None => anyhow!("{}: {msg}", path.display()),
            }
        })
    }

    pub fn model_spec(&self, path: &Path) -> Result<ModelSpec> {
        let origin = format!("{} [model]", path.display());
        let mut table = self.model.clone();
        let arch = match table.remove("arch") {
            Some(toml::Value::String(s)) => s,
            Some(_) => bail!("{origin}: key `arch` must be a string"),
            None => bail!("{origin}: key `arch` is missing (e.g. arch = \"qwen3\")"),
        };
        let mut json = serde_json::to_value(&table)?;
        json["model_type"] = arch.clone().into();
        match arch.as_str() {
            "qwen3" => {
                let known = Qwen3Config::known_fields();
                if let Some(k) = table.keys().find(|k| !known.contains(k)) {
                    bail!("{origin}: unknown key `{k}` for arch qwen3");
                }
                Ok(ModelSpec::Qwen3(Qwen3Config::from_value(&json, &origin)?))
            }
            other => bail!("{origin}: unknown arch `{other}` (supported: qwen3)"),
        }
    }

    pub fn run_dir(&self) -> PathBuf {
        self.run.out_dir.join(&self.run.name)
    }
}
