//! The book (`book/src`) is kept true by these tests:
//! - every ```` ```bash,runnable ```` block runs, in the book's order, in one scratch
//!   directory, with `EMBER_MAX_STEPS=2` so each training stage takes two steps;
//! - every recipe the book names then passes `--dry-run` there (the runs above made the
//!   checkpoints that later recipes start from);
//! - the recipe reference documents every key the recipe types accept, and no key they
//!   do not.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use ember_train::recipe::Recipe;

use crate::common::temp_dir;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn book_src() -> PathBuf {
    root().join("book/src")
}

/// The chapters in SUMMARY.md order.
fn chapters() -> Vec<PathBuf> {
    let summary = std::fs::read_to_string(book_src().join("SUMMARY.md")).unwrap();
    summary
        .lines()
        .filter_map(|l| {
            let start = l.find("](")? + 2;
            let end = start + l[start..].find(')')?;
            Some(book_src().join(&l[start..end]))
        })
        .collect()
}

/// The fenced blocks of a chapter whose info string is exactly `info`.
fn blocks(text: &str, info: &str) -> Vec<String> {
    let mut out = Vec::new();
    // Inside a fence: Some(kept), where kept says whether the block is one of `info`.
    let mut inside: Option<bool> = None;
    let mut body = String::new();
    for line in text.lines() {
        match (inside, line.trim_start().strip_prefix("```")) {
            (None, Some(tag)) => inside = Some(tag.trim() == info),
            (Some(kept), Some(_)) => {
                if kept {
                    out.push(std::mem::take(&mut body));
                }
                inside = None;
            }
            (Some(true), None) => {
                body.push_str(line);
                body.push('\n');
            }
            _ => {}
        }
    }
    out
}

/// The scratch directory a reader would work in: the repository's recipes, data and test
/// fixtures, and `ember` on PATH.
fn scratch(tag: &str) -> PathBuf {
    let dir = temp_dir(tag);
    for name in ["recipes", "data", "tests"] {
        std::os::unix::fs::symlink(root().join(name), dir.join(name)).unwrap();
    }
    dir
}

fn shell(dir: &Path, script: &str) -> std::process::Output {
    let bin = Path::new(env!("CARGO_BIN_EXE_ember")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .env("EMBER_MAX_STEPS", "2")
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn tutorials_run_and_every_named_recipe_passes_dry_run() {
    let dir = scratch("book-tutorials");
    let mut recipes = BTreeSet::new();
    let mut ran = 0;
    for chapter in chapters() {
        let text = std::fs::read_to_string(&chapter).unwrap();
        let name = chapter
            .strip_prefix(book_src())
            .unwrap()
            .display()
            .to_string();
        for word in text.split(|c: char| c.is_whitespace() || "`\"'()[],".contains(c)) {
            if word.starts_with("recipes/") && word.ends_with(".toml") {
                recipes.insert(word.to_string());
            }
        }
        for (i, block) in blocks(&text, "bash,runnable").iter().enumerate() {
            let t = std::time::Instant::now();
            let out = shell(&dir, block);
            eprintln!(
                "{name} block {}: {:.1} s: {}",
                i + 1,
                t.elapsed().as_secs_f64(),
                block.lines().next().unwrap_or("")
            );
            assert!(
                out.status.success(),
                "{name}, runnable block {}:\n{block}\nfailed ({}):\n{}\n{}",
                i + 1,
                out.status,
                tail(&out.stdout, 20),
                tail(&out.stderr, 30)
            );
            ran += 1;
        }
    }
    assert!(ran >= 10, "only {ran} runnable blocks in the book");
    assert!(recipes.len() >= 5, "the book names only {recipes:?}");
    for recipe in &recipes {
        assert!(
            root().join(recipe).is_file(),
            "the book names {recipe}, which does not exist"
        );
        let text = std::fs::read_to_string(root().join(recipe)).unwrap();
        let command = if text.contains("[[stage]]") {
            "pipeline"
        } else {
            "train"
        };
        let out = shell(&dir, &format!("ember {command} {recipe} --dry-run"));
        assert!(
            out.status.success(),
            "ember {command} {recipe} --dry-run failed:\n{}",
            tail(&out.stderr, 10)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(": ok (dry run"),
            "{recipe}: no verdict in\n{stdout}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dry_run_names_the_missing_file_and_trains_nothing() {
    let dir = scratch("book-dry-run");
    let out = shell(
        &dir,
        "ember train recipes/sft/champ-qwen3.toml --dry-run --set data.chat.0.path=missing.jsonl",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert!(
        errors.len() == 1 && errors[0].contains("data.chat path `missing.jsonl` does not exist"),
        "{err}"
    );
    let out = shell(
        &dir,
        "ember pipeline recipes/quickstart.toml --dry-run --set stage.2.train.init_from=nowhere",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("train.init_from `nowhere`"),
        "{err}"
    );
    let out = shell(&dir, "ember pipeline recipes/quickstart.toml --dry-run");
    assert!(out.status.success(), "{}", tail(&out.stderr, 5));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("stage ")).count(),
        7
    );
    assert!(
        !dir.join("runs").exists(),
        "a dry run wrote {}",
        dir.join("runs").display()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// How a recipe table nests: `[a]`, `[[a]]` or `[a.<name>]`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    Table,
    Array,
    Map,
}

const PROBE: &str = "zz_probe";

/// The keys the table at `path` accepts, read from the error a recipe with an unknown
/// key there gets; None when that table takes no fixed keys.
fn keys_at(path: &[(String, Shape)], extra: &str) -> Option<Vec<String>> {
    let mut text = String::new();
    let mut dotted = Vec::new();
    for (i, (name, shape)) in path.iter().enumerate() {
        dotted.push(name.clone());
        if *shape == Shape::Map {
            dotted.push("x".into());
        }
        let header = dotted.join(".");
        if i + 1 == path.len() {
            text += &match shape {
                Shape::Array => format!("[[{header}]]\n"),
                _ => format!("[{header}]\n"),
            };
        } else if *shape == Shape::Array {
            text += &format!("[[{header}]]\n");
        }
    }
    text += extra;
    text += &format!("{PROBE} = 1\n");
    let err = format!("{:#}", Recipe::parse(&text, Path::new("probe.toml")).err()?);
    let listed = err
        .split(&format!("unknown field `{PROBE}`, expected"))
        .nth(1)?;
    let keys = listed
        .split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect();
    Some(keys)
}

/// Every fixed-key table of the recipe types, by its reference heading (a pipeline stage's
/// tables are the top-level ones), with its keys.
fn code_tables() -> BTreeMap<String, BTreeSet<String>> {
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut todo = vec![(Vec::<(String, Shape)>::new(), None::<String>)];
    while let Some((path, tag)) = todo.pop() {
        let extra = tag
            .as_ref()
            .map(|t| format!("format = \"{t}\"\n"))
            .unwrap_or_default();
        let Some(keys) = keys_at(&path, &extra) else {
            continue;
        };
        let entry = found.entry(doc_name(&path)).or_default();
        entry.extend(keys.iter().cloned());
        if tag.is_some() {
            entry.insert("format".into());
        }
        for key in keys {
            for shape in [Shape::Table, Shape::Array, Shape::Map] {
                let mut p = path.clone();
                p.push((key.clone(), shape));
                // An internally tagged table (a data source) lists its keys per variant.
                if let Some(tags) = variants(&p) {
                    todo.extend(tags.into_iter().map(|t| (p.clone(), Some(t))));
                } else if keys_at(&p, "").is_some() {
                    todo.push((p, None));
                }
            }
        }
    }
    found
}

/// The variants of a table tagged by `format`, when the table at `path` is one.
fn variants(path: &[(String, Shape)]) -> Option<Vec<String>> {
    let mut text = String::new();
    let dotted: Vec<&str> = path.iter().map(|(n, _)| n.as_str()).collect();
    for (i, (_, shape)) in path.iter().enumerate() {
        if *shape == Shape::Array {
            text += &format!("[[{}]]\n", dotted[..=i].join("."));
        } else if i + 1 == path.len() {
            text += &format!("[{}]\n", dotted.join("."));
        }
    }
    text += "format = \"zz_probe\"\n";
    let err = format!("{:#}", Recipe::parse(&text, Path::new("probe.toml")).err()?);
    let listed = err.split("unknown variant `zz_probe`, expected").nth(1)?;
    Some(
        listed
            .split('`')
            .skip(1)
            .step_by(2)
            .map(String::from)
            .collect(),
    )
}

/// The reference's heading for a table: `[train]`, `[[data.sources]]`,
/// `[data.datasets.<name>]`; a pipeline stage's tables are the top-level ones.
fn doc_name(path: &[(String, Shape)]) -> String {
    let mut parts: Vec<&(String, Shape)> = path.iter().collect();
    if parts.len() > 1 && parts[0].0 == "stage" {
        parts.remove(0);
    }
    // A CPT dataset's sources and generated documents are `[data]`'s.
    if parts.len() > 2 && parts[1].0 == "datasets" {
        parts.remove(1);
    }
    if parts.is_empty() {
        return "top-level".into();
    }
    let mut dotted = Vec::new();
    for (name, shape) in &parts {
        dotted.push(name.clone());
        if *shape == Shape::Map {
            dotted.push("<name>".into());
        }
    }
    let joined = dotted.join(".");
    match parts.last().unwrap().1 {
        Shape::Array => format!("[[{joined}]]"),
        _ => format!("[{joined}]"),
    }
}

/// The reference's tables: heading → the backticked keys in the first cell of its rows.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(book_src().join("recipes.md")).unwrap();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines() {
        if line.starts_with('#') {
            section = match (line.find("`["), line.rfind("]`")) {
                (Some(a), Some(b)) if b > a => line[a + 1..b + 1].to_string(),
                _ if line.contains("Top-level keys") => "top-level".into(),
                _ => String::new(),
            };
            out.entry(section.clone()).or_default();
        } else if let Some(cell) = line.strip_prefix('|').and_then(|l| l.split('|').next()) {
            let keys = out.entry(section.clone()).or_default();
            keys.extend(cell.split('`').skip(1).step_by(2).map(String::from));
        }
    }
    out
}

/// Whether `key` of `table` has a section of its own among `headings`.
fn has_own_section<'a>(
    table: &str,
    key: &str,
    mut headings: impl Iterator<Item = &'a String>,
) -> bool {
    let parent = table.trim_matches(|c| c == '[' || c == ']');
    // A pipeline stage's tables are the top-level ones.
    let inner = if parent == "top-level" || parent == "stage" {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    };
    headings.any(|h| {
        let h = h.trim_matches(|c| c == '[' || c == ']');
        h == inner || h == format!("{inner}.<name>")
    })
}

#[test]
fn recipe_reference_documents_every_recipe_key() {
    let code = code_tables();
    let docs = documented();
    for must in [
        "top-level",
        "[train]",
        "[[data.sources]]",
        "[[rl.rewards]]",
        "[[stage]]",
    ] {
        assert!(code.contains_key(must), "probing found no {must}: {code:?}");
    }
    let mut problems = Vec::new();
    for (table, keys) in &code {
        // `[distill]` takes the same reward tables as `[rl]`, documented once there.
        let Some(doc) = docs
            .get(table)
            .or_else(|| docs.get(&table.replace("distill.", "rl.")))
        else {
            problems.push(format!("{table} has no section in book/src/recipes.md"));
            continue;
        };
        for key in keys {
            if !doc.contains(key) && !has_own_section(table, key, code.keys().chain(docs.keys())) {
                problems.push(format!("{table}: key `{key}` is not documented"));
            }
        }
        for key in doc {
            if !keys.contains(key) {
                problems.push(format!(
                    "{table}: documents `{key}`, which the code does not accept"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "recipe reference out of date:\n{}",
        problems.join("\n")
    );
}

#[test]
fn recipe_reference_names_every_model_config_key() {
    let text = std::fs::read_to_string(book_src().join("recipes.md")).unwrap();
    let model = text
        .split("## `[model]`")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a [model] section");
    let named: BTreeSet<&str> = model.split('`').skip(1).step_by(2).collect();
    let qwen3 = ember_models::qwen3::Qwen3Config::known_fields();
    let mut missing: Vec<String> = qwen3
        .iter()
        .map(String::as_str)
        .chain(
            ember_models::modernbert::ModernBertConfig::KNOWN_FIELDS
                .iter()
                .copied(),
        )
        .chain(
            ember_models::hybrid::stack::HybridConfig::KNOWN_FIELDS
                .iter()
                .copied(),
        )
        .filter(|k| !named.contains(k) && !IMPLIED_MODEL_KEYS.contains(k))
        .map(String::from)
        .collect();
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "[model] keys not in book/src/recipes.md: {missing:?}"
    );
}

/// Keys of HF config.json files that the loaders accept but that carry no setting
/// (bookkeeping written by transformers).
const IMPLIED_MODEL_KEYS: &[&str] = &[];
