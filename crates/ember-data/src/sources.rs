//! Streaming document sources: plain text, JSON Lines and Parquet (as HF `datasets` writes
//! it). A source never loads a whole corpus: text and JSONL are read line by line (or file by
//! file), Parquet record batch by record batch.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use arrow_array::{Array, LargeStringArray, RecordBatch, StringArray, StringViewArray};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use serde::{Deserialize, Serialize};

/// Where training documents come from.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "format", rename_all = "lowercase", deny_unknown_fields)]
pub enum Source {
    /// A file or a directory (all regular files inside, recursively, sorted by path). Each
    /// file is one document, unless `split = "line"` (each non-empty line is a document) or
    /// `split = "blank_line"` (paragraphs separated by blank lines).
    Text {
        path: PathBuf,
        #[serde(default)]
        split: TextSplit,
    },
    /// JSON Lines; `field` (default "text") holds the document string.
    Jsonl {
        path: PathBuf,
        #[serde(default = "text_field")]
        field: String,
    },
    /// Parquet as HF datasets writes it: a string column (`column`, default "text"); `path`
    /// may be a file or a directory of `*.parquet` files.
    Parquet {
        path: PathBuf,
        #[serde(default = "text_field")]
        column: String,
    },
}

/// How a text source is cut into documents.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TextSplit {
    /// Each file is one document.
    #[default]
    File,
    /// Each non-empty line is one document.
    Line,
    /// Paragraphs (runs of non-blank lines) are documents.
    BlankLine,
}

fn text_field() -> String {
    "text".to_string()
}

/// An iterator of documents; it stops after the first error it yields.
pub type Documents = Box<dyn Iterator<Item = Result<String>> + Send>;

/// Error text on one line (some library errors span several).
pub(crate) fn one_line(e: impl std::fmt::Display) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

impl Source {
    pub fn path(&self) -> &Path {
        match self {
            Source::Text { path, .. }
            | Source::Jsonl { path, .. }
            | Source::Parquet { path, .. } => path,
        }
    }

    fn format(&self) -> &'static str {
        match self {
            Source::Text { .. } => "text",
            Source::Jsonl { .. } => "jsonl",
            Source::Parquet { .. } => "parquet",
        }
    }

    /// A one-line description, used in fingerprints and logs.
    pub fn describe(&self) -> String {
        match self {
            Source::Text { path, split } => {
                let split = match split {
                    TextSplit::File => "file",
                    TextSplit::Line => "line",
                    TextSplit::BlankLine => "blank_line",
                };
                format!("text {} split {split}", path.display())
            }
            Source::Jsonl { path, field } => format!("jsonl {} field {field}", path.display()),
            Source::Parquet { path, column } => {
                format!("parquet {} column {column}", path.display())
            }
        }
    }

    /// The files this source reads, in reading order.
    pub fn files(&self) -> Result<Vec<PathBuf>> {
        let path = self.path();
        let meta = std::fs::metadata(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!(
                    "{}: no such file or directory ({} data source)",
                    path.display(),
                    self.format()
                )
            } else {
                anyhow!(
                    "{}: cannot read ({} data source: {})",
                    path.display(),
                    self.format(),
                    one_line(e)
                )
            }
        })?;
        if !meta.is_dir() {
            return Ok(vec![path.to_path_buf()]);
        }
        let mut files = vec![];
        collect_files(path, &mut files)?;
        if let Source::Parquet { .. } = self {
            files.retain(|f| f.extension().is_some_and(|e| e == "parquet"));
        }
        files.sort();
        if files.is_empty() {
            let what = match self {
                Source::Parquet { .. } => "*.parquet files",
                _ => "files",
            };
            bail!(
                "{}: directory has no {what} ({} data source)",
                path.display(),
                self.format()
            );
        }
        Ok(files)
    }

    /// The source a command-line path names, by extension: `.jsonl`, `.parquet`, or else
    /// plain text with one document per file; `field` is the JSONL field or Parquet column.
    pub fn from_path(path: &Path, field: &str) -> Self {
        let path = path.to_path_buf();
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") => Source::Jsonl {
                path,
                field: field.to_string(),
            },
            Some("parquet") => Source::Parquet {
                path,
                column: field.to_string(),
            },
            _ => Source::Text {
                path,
                split: TextSplit::File,
            },
        }
    }

    /// Fails fast on a source that cannot be read: missing files, and for Parquet an
    /// unreadable footer or a missing / non-string column.
    pub fn check(&self) -> Result<()> {
        let files = self.files()?;
        if let Source::Parquet { column, .. } = self {
            for f in &files {
                open_parquet(f, column)?;
            }
        }
        Ok(())
    }

    /// Streams the documents, in order.
    pub fn documents(&self) -> Result<Documents> {
        let files = self.files()?;
        let it: Documents = match self.clone() {
            Source::Text { split, .. } => {
                Box::new(Flatten::new(files, move |f| text_docs(f, split)))
            }
            Source::Jsonl { field, .. } => {
                Box::new(Flatten::new(files, move |f| jsonl_docs(f, field.clone())))
            }
            Source::Parquet { column, .. } => {
                Box::new(Flatten::new(files, move |f| parquet_docs(f, &column)))
            }
        };
        Ok(it)
    }
}

pub(crate) fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| anyhow!("{}: cannot list directory ({})", dir.display(), one_line(e)))?;
    for entry in rd {
        let entry = entry
            .map_err(|e| anyhow!("{}: cannot list directory ({})", dir.display(), one_line(e)))?;
        let p = entry.path();
        // Follows symlinks, so a linked file or directory counts as what it points to.
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => collect_files(&p, out)?,
            Ok(m) if m.is_file() => out.push(p),
            _ => {}
        }
    }
    Ok(())
}

/// Chains the per-file document iterators lazily; stops after the first error.
struct Flatten<F> {
    files: std::vec::IntoIter<PathBuf>,
    open: F,
    current: Option<Documents>,
    failed: bool,
}

impl<F> Flatten<F> {
    fn new(files: Vec<PathBuf>, open: F) -> Self {
        Self {
            files: files.into_iter(),
            open,
            current: None,
            failed: false,
        }
    }
}

impl<F: FnMut(PathBuf) -> Result<Documents>> Iterator for Flatten<F> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(cur) = &mut self.current {
                match cur.next() {
                    Some(Ok(d)) => return Some(Ok(d)),
                    Some(Err(e)) => {
                        self.failed = true;
                        return Some(Err(e));
                    }
                    None => self.current = None,
                }
            }
            let f = self.files.next()?;
            match (self.open)(f) {
                Ok(it) => self.current = Some(it),
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

fn open_file(path: &Path) -> Result<File> {
    open_source_file(path, "data source")
}

/// Opens a data file; a missing one is reported as `what` (e.g. "chat data source").
pub(crate) fn open_source_file(path: &Path, what: &str) -> Result<File> {
    File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!("{}: no such file ({what})", path.display())
        } else {
            anyhow!("{}: cannot open ({})", path.display(), one_line(e))
        }
    })
}

/// Lines of a file with 1-based numbers, without the line ending.
struct Lines {
    path: PathBuf,
    reader: BufReader<File>,
    line: usize,
    buf: Vec<u8>,
}

impl Lines {
    fn open(path: PathBuf) -> Result<Self> {
        let reader = BufReader::with_capacity(1 << 16, open_file(&path)?);
        Ok(Self {
            path,
            reader,
            line: 0,
            buf: vec![],
        })
    }

    fn next_line(&mut self) -> Option<Result<(usize, String)>> {
        self.buf.clear();
        match self.reader.read_until(b'\n', &mut self.buf) {
            Ok(0) => None,
            Ok(_) => {
                self.line += 1;
                if self.buf.last() == Some(&b'\n') {
                    self.buf.pop();
                    if self.buf.last() == Some(&b'\r') {
                        self.buf.pop();
                    }
                }
                match std::str::from_utf8(&self.buf) {
                    Ok(s) => Some(Ok((self.line, s.to_string()))),
                    Err(_) => Some(Err(anyhow!(
                        "{}:{}: not valid UTF-8",
                        self.path.display(),
                        self.line
                    ))),
                }
            }
            Err(e) => Some(Err(anyhow!(
                "{}:{}: read error ({})",
                self.path.display(),
                self.line + 1,
                one_line(e)
            ))),
        }
    }
}

fn text_docs(path: PathBuf, split: TextSplit) -> Result<Documents> {
    match split {
        TextSplit::File => {
            let mut bytes = vec![];
            open_file(&path)?
                .read_to_end(&mut bytes)
                .map_err(|e| anyhow!("{}: read error ({})", path.display(), one_line(e)))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| anyhow!("{}: not valid UTF-8", path.display()))?;
            if text.is_empty() {
                Ok(Box::new(std::iter::empty()))
            } else {
                Ok(Box::new(std::iter::once(Ok(text))))
            }
        }
        TextSplit::Line => {
            let mut lines = Lines::open(path)?;
            Ok(Box::new(std::iter::from_fn(move || loop {
                match lines.next_line()? {
                    Ok((_, l)) if l.trim().is_empty() => continue,
                    Ok((_, l)) => return Some(Ok(l)),
                    Err(e) => return Some(Err(e)),
                }
            })))
        }
        TextSplit::BlankLine => {
            let mut lines = Lines::open(path)?;
            let mut done = false;
            Ok(Box::new(std::iter::from_fn(move || {
                if done {
                    return None;
                }
                let mut para = String::new();
                loop {
                    match lines.next_line() {
                        None => {
                            done = true;
                            return (!para.is_empty()).then_some(Ok(para));
                        }
                        Some(Err(e)) => {
                            done = true;
                            return Some(Err(e));
                        }
                        Some(Ok((_, l))) if l.trim().is_empty() => {
                            if !para.is_empty() {
                                return Some(Ok(para));
                            }
                        }
                        Some(Ok((_, l))) => {
                            if !para.is_empty() {
                                para.push('\n');
                            }
                            para.push_str(&l);
                        }
                    }
                }
            })))
        }
    }
}

fn jsonl_docs(path: PathBuf, field: String) -> Result<Documents> {
    let mut lines = Lines::open(path.clone())?;
    Ok(Box::new(std::iter::from_fn(move || loop {
        let (n, line) = match lines.next_line()? {
            Ok(x) => x,
            Err(e) => return Some(Err(e)),
        };
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                return Some(Err(anyhow!(
                    "{}:{n}: invalid JSON ({})",
                    path.display(),
                    one_line(e)
                )))
            }
        };
        return Some(match v.get(&field) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            _ => Err(anyhow!(
                "{}:{n}: field `{field}` missing or not a string",
                path.display()
            )),
        });
    })))
}

pub(crate) fn not_parquet(path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!(
        "{}: not a readable Parquet file ({})",
        path.display(),
        one_line(e)
    )
}

/// Opens a Parquet file reading only `column`, after checking the column exists and holds
/// strings.
fn open_parquet(path: &Path, column: &str) -> Result<ParquetRecordBatchReader> {
    let file = open_file(path)?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| not_parquet(path, e))?;
    let schema = builder.schema().clone();
    let Some(idx) = schema.fields().iter().position(|f| f.name() == column) else {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        bail!(
            "{}: column `{column}` not found (columns: {})",
            path.display(),
            names.join(", ")
        );
    };
    let dt = schema.field(idx).data_type();
    if !matches!(
        dt,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    ) {
        bail!(
            "{}: column `{column}` has type {dt}, not a string",
            path.display()
        );
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), [idx]);
    builder
        .with_projection(mask)
        .with_batch_size(1024)
        .build()
        .map_err(|e| not_parquet(path, e))
}

fn batch_strings(batch: &RecordBatch) -> Option<Vec<String>> {
    let col = batch.column(0);
    let any = col.as_any();
    let out = if let Some(a) = any.downcast_ref::<StringArray>() {
        a.iter().flatten().map(str::to_string).collect()
    } else if let Some(a) = any.downcast_ref::<LargeStringArray>() {
        a.iter().flatten().map(str::to_string).collect()
    } else if let Some(a) = any.downcast_ref::<StringViewArray>() {
        a.iter().flatten().map(str::to_string).collect()
    } else {
        return None;
    };
    Some(out)
}

fn parquet_docs(path: PathBuf, column: &str) -> Result<Documents> {
    let reader = open_parquet(&path, column)?;
    Ok(Box::new(parquet_items(path, reader, |b| {
        batch_strings(b).ok_or_else(|| "column is not a string column".to_string())
    })))
}

/// Flattens a Parquet reader's record batches into the items `decode` makes of each, lazily;
/// stops after the first error, which names the file.
pub(crate) fn parquet_items<T: Send + 'static>(
    path: PathBuf,
    mut reader: ParquetRecordBatchReader,
    mut decode: impl FnMut(&RecordBatch) -> std::result::Result<Vec<T>, String> + Send + 'static,
) -> impl Iterator<Item = Result<T>> + Send {
    let mut pending = std::collections::VecDeque::<T>::new();
    let mut done = false;
    std::iter::from_fn(move || loop {
        if let Some(d) = pending.pop_front() {
            return Some(Ok(d));
        }
        if done {
            return None;
        }
        match reader.next() {
            None => done = true,
            Some(Err(e)) => {
                done = true;
                return Some(Err(not_parquet(&path, e)));
            }
            Some(Ok(batch)) => match decode(&batch) {
                Ok(items) => pending.extend(items),
                Err(e) => {
                    done = true;
                    return Some(Err(anyhow!("{}: {e}", path.display())));
                }
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_toml_shapes() {
        let s: Source =
            serde_json::from_str(r#"{"format":"text","path":"a","split":"blank_line"}"#).unwrap();
        assert_eq!(
            s,
            Source::Text {
                path: "a".into(),
                split: TextSplit::BlankLine
            }
        );
        let s: Source = serde_json::from_str(r#"{"format":"jsonl","path":"a"}"#).unwrap();
        assert_eq!(s.describe(), "jsonl a field text");
        assert!(serde_json::from_str::<Source>(r#"{"format":"jsonl","path":"a","x":1}"#).is_err());
    }
}
