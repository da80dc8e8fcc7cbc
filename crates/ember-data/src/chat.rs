//! Supervised fine-tuning data: chat conversations read from JSONL or Parquet, rendered in
//! Qwen3's chat format (ChatML with `<think>` blocks) into token ids plus a loss mask that
//! trains only on what the assistant says.
//!
//! The rendering, for `system`, `user` and `assistant` turns (mask in brackets):
//!
//! ```text
//! <|im_start|>system\n{content}<|im_end|>\n          [0]
//! <|im_start|>user\n{content}<|im_end|>\n            [0]
//! <|im_start|>assistant\n                            [0]  the header is prompt
//! [<think>\n{reasoning}\n</think>\n\n]{content}<|im_end|>  [1]  including <|im_end|>
//! \n                                                 [0]  glue after <|im_end|>
//! ```

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use arrow_array::{Array, OffsetSizeTrait, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::sources::{collect_files, not_parquet, one_line, open_source_file, parquet_items};
use crate::tokenizer::Tokenizer;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// The assistant's chain of thought (`reasoning_content` in HF datasets), rendered in a
    /// `<think>` block before `content`. Ignored on system and user turns.
    #[serde(default, alias = "reasoning_content")]
    pub reasoning: Option<String>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            reasoning: None,
        }
    }

    pub fn with_reasoning(mut self, reasoning: impl Into<String>) -> Self {
        self.reasoning = Some(reasoning.into());
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

impl Conversation {
    pub fn new(messages: Vec<Message>) -> Self {
        Self { messages }
    }

    /// Checks the shape that training needs: at most one system message and only as the
    /// first message, then a user message first, and at least one assistant turn.
    pub fn validate(&self) -> Result<()> {
        self.check(true).map_err(|e| anyhow!("conversation: {e}"))
    }

    /// Checks the shape of a generation prompt: as [`Conversation::validate`] but with no
    /// assistant turn required, and none at the end.
    pub fn validate_prompt(&self) -> Result<()> {
        ChatTemplate::check_prompt(self)
    }

    /// The checks; `training` also requires an assistant turn.
    fn check(&self, training: bool) -> std::result::Result<(), String> {
        if training && self.messages.is_empty() {
            return Err("no messages".into());
        }
        let systems = self
            .messages
            .iter()
            .filter(|m| m.role == Role::System)
            .count();
        if systems > 1 {
            return Err(format!(
                "{systems} system messages (at most one is allowed)"
            ));
        }
        if let Some(i) = self.messages.iter().position(|m| m.role == Role::System) {
            if i != 0 {
                return Err(format!(
                    "system message at messages[{i}] (it must be the first message)"
                ));
            }
        }
        let first = self.messages.iter().find(|m| m.role != Role::System);
        if first.is_some_and(|m| m.role == Role::Assistant) {
            return Err("first message is from the assistant (it must be from the user)".into());
        }
        if training && !self.messages.iter().any(|m| m.role == Role::Assistant) {
            return Err("no assistant turn".into());
        }
        Ok(())
    }
}

/// What to do with a malformed row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Fail,
    Skip,
}

fn messages_field() -> String {
    "messages".to_string()
}

/// Where chat examples come from: JSONL or Parquet rows (a file, or a directory of `*.jsonl`,
/// `*.json`, `*.ndjson` and `*.parquet` files read in path order) with either a `messages`
/// column/field (a list of `{role, content[, reasoning_content or reasoning]}`) or a
/// prompt/response pair.
///
/// A file is Parquet if its name ends in `.parquet` or it starts with the Parquet magic bytes,
/// JSONL otherwise.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChatSource {
    pub path: PathBuf,
    /// The field holding the list of messages (used unless `prompt_field` or
    /// `response_field` is set).
    #[serde(default = "messages_field")]
    pub messages_field: String,
    /// Setting either of these switches to prompt/response rows: one user turn (this field,
    /// default "prompt") and one assistant turn (`response_field`, default "response").
    #[serde(default)]
    pub prompt_field: Option<String>,
    #[serde(default)]
    pub response_field: Option<String>,
    /// For prompt/response rows: an optional field holding a per-row system prompt (a
    /// missing field, null or empty string means none).
    #[serde(default)]
    pub system_field: Option<String>,
    /// A system prompt put first in every conversation that has none of its own.
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub on_error: OnError,
}

/// Counts kept while a [`ChatSource`] is read (shared with its iterator).
#[derive(Debug, Default)]
pub struct ChatStats {
    conversations: AtomicU64,
    skipped: AtomicU64,
}

impl ChatStats {
    /// Conversations yielded so far.
    pub fn conversations(&self) -> u64 {
        self.conversations.load(Ordering::Relaxed)
    }

    /// Malformed rows skipped so far (only with `on_error = "skip"`).
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

/// A stream of conversations; it stops after the first error it yields.
pub type Conversations = Box<dyn Iterator<Item = Result<Conversation>> + Send>;

impl ChatSource {
    /// A source reading `messages` from `path`, failing on malformed rows.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            messages_field: messages_field(),
            prompt_field: None,
            response_field: None,
            system_field: None,
            system: None,
            on_error: OnError::Fail,
        }
    }

    fn is_pairs(&self) -> bool {
        self.prompt_field.is_some() || self.response_field.is_some()
    }

    fn prompt_name(&self) -> &str {
        self.prompt_field.as_deref().unwrap_or("prompt")
    }

    fn response_name(&self) -> &str {
        self.response_field.as_deref().unwrap_or("response")
    }

    /// A one-line description, for fingerprints and logs.
    pub fn describe(&self) -> String {
        let mut s = format!("chat {}", self.path.display());
        if self.is_pairs() {
            s += &format!(
                " prompt {} response {}",
                self.prompt_name(),
                self.response_name()
            );
            if let Some(f) = &self.system_field {
                s += &format!(" system_field {f}");
            }
        } else {
            s += &format!(" messages {}", self.messages_field);
        }
        if let Some(sys) = &self.system {
            s += &format!(" system {sys:?}");
        }
        if self.on_error == OnError::Skip {
            s += " skip_errors";
        }
        s
    }

    /// The files this source reads, in reading order.
    pub fn files(&self) -> Result<Vec<PathBuf>> {
        data_files(&self.path, "chat data source")
    }

    /// Streams conversations. Each item is a valid conversation or, for a malformed row with
    /// `on_error = "fail"`, an error `{path}:{row}: {problem}` (row = 1-based line for JSONL,
    /// 1-based row for Parquet). With `on_error = "skip"`, malformed rows are skipped and
    /// counted (see [`ChatSource::conversations_with_stats`]). Unreadable files are errors
    /// either way.
    pub fn conversations(&self) -> Result<Conversations> {
        Ok(self.conversations_with_stats()?.0)
    }

    /// [`ChatSource::conversations`], plus counters of what was read and skipped.
    pub fn conversations_with_stats(&self) -> Result<(Conversations, Arc<ChatStats>)> {
        let files = self.files()?;
        let stats = Arc::new(ChatStats::default());
        let it = ChatIter {
            src: self.clone(),
            files: files.into_iter(),
            current: None,
            stats: stats.clone(),
            done: false,
        };
        Ok((Box::new(it), stats))
    }

    /// The top-level fields/columns a row must have.
    fn columns(&self) -> Vec<String> {
        if self.is_pairs() {
            let mut c = vec![
                self.prompt_name().to_string(),
                self.response_name().to_string(),
            ];
            c.extend(self.system_field.clone());
            c
        } else {
            vec![self.messages_field.clone()]
        }
    }

    /// Turns one row (a JSON object) into a valid conversation, or says what is wrong.
    fn parse_row(&self, row: &Value) -> std::result::Result<Conversation, String> {
        let Value::Object(row) = row else {
            return Err("row is not a JSON object".into());
        };
        let mut messages = if self.is_pairs() {
            let text = |name: &str, required: bool| match row.get(name) {
                Some(Value::String(s)) => Ok(Some(s.clone())),
                None | Some(Value::Null) if !required => Ok(None),
                None | Some(Value::Null) => Err(format!("missing `{name}`")),
                Some(v) => Err(format!("`{name}` is {}, not a string", kind(v))),
            };
            let mut m = vec![];
            if let Some(f) = &self.system_field {
                if let Some(s) = text(f, false)?.filter(|s| !s.is_empty()) {
                    m.push(Message::new(Role::System, s));
                }
            }
            let prompt = text(self.prompt_name(), true)?.unwrap_or_default();
            let response = text(self.response_name(), true)?.unwrap_or_default();
            m.push(Message::new(Role::User, prompt));
            m.push(Message::new(Role::Assistant, response));
            m
        } else {
            let field = &self.messages_field;
            match row.get(field) {
                None | Some(Value::Null) => return Err(format!("missing `{field}`")),
                Some(Value::Array(list)) => list
                    .iter()
                    .enumerate()
                    .map(|(i, v)| parse_message(v).map_err(|e| format!("{field}[{i}]: {e}")))
                    .collect::<std::result::Result<Vec<_>, _>>()?,
                Some(v) => return Err(format!("`{field}` is {}, not a list", kind(v))),
            }
        };
        if let Some(sys) = &self.system {
            if !messages.iter().any(|m| m.role == Role::System) {
                messages.insert(0, Message::new(Role::System, sys.clone()));
            }
        }
        let conv = Conversation { messages };
        conv.check(true)?;
        Ok(conv)
    }
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn parse_message(v: &Value) -> std::result::Result<Message, String> {
    let Value::Object(m) = v else {
        return Err(format!("message is {}, not an object", kind(v)));
    };
    let role = match m.get("role") {
        Some(Value::String(r)) => Role::parse(r)
            .ok_or_else(|| format!("unknown role `{r}` (expected system, user or assistant)"))?,
        None | Some(Value::Null) => return Err("missing `role`".into()),
        Some(v) => return Err(format!("`role` is {}, not a string", kind(v))),
    };
    let content = match m.get("content") {
        Some(Value::String(c)) => c.clone(),
        None | Some(Value::Null) => return Err("missing `content`".into()),
        Some(v) => return Err(format!("`content` is {}, not a string", kind(v))),
    };
    let mut reasoning = None;
    for key in ["reasoning_content", "reasoning"] {
        match m.get(key) {
            Some(Value::String(r)) => {
                reasoning = Some(r.clone());
                break;
            }
            None | Some(Value::Null) => {}
            Some(v) => return Err(format!("`{key}` is {}, not a string", kind(v))),
        }
    }
    Ok(Message {
        role,
        content,
        reasoning,
    })
}

fn open_file(path: &Path) -> Result<File> {
    open_source_file(path, "chat data source")
}

/// The files of a row source (`what` names it in errors): `path` itself, or the `*.jsonl`,
/// `*.json`, `*.ndjson` and `*.parquet` files under the directory `path`, in path order.
pub(crate) fn data_files(path: &Path, what: &str) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!("{}: no such file or directory ({what})", path.display())
        } else {
            anyhow!("{}: cannot read ({what}: {})", path.display(), one_line(e))
        }
    })?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = vec![];
    collect_files(path, &mut files)?;
    files.retain(|f| {
        f.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "jsonl" | "json" | "ndjson" | "parquet"))
    });
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: directory has no *.jsonl, *.json, *.ndjson or *.parquet files ({what})",
            path.display()
        );
    }
    Ok(files)
}

pub(crate) fn is_parquet(path: &Path) -> Result<bool> {
    if path.extension().is_some_and(|e| e == "parquet") {
        return Ok(true);
    }
    let mut magic = [0u8; 4];
    let mut f = open_file(path)?;
    let mut n = 0;
    while n < 4 {
        match f.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => bail!("{}: read error ({})", path.display(), one_line(e)),
        }
    }
    Ok(n == 4 && &magic == b"PAR1")
}

/// One row of a file: its 1-based number and its fields as JSON, or what made it unreadable.
pub(crate) struct Row {
    pub(crate) n: usize,
    pub(crate) data: std::result::Result<Value, String>,
}

/// Rows of one file; an `Err` item is fatal (I/O, unreadable Parquet).
pub(crate) type Rows = Box<dyn Iterator<Item = Result<Row>> + Send>;

struct ChatIter {
    src: ChatSource,
    files: std::vec::IntoIter<PathBuf>,
    current: Option<(PathBuf, Rows)>,
    stats: Arc<ChatStats>,
    done: bool,
}

impl ChatIter {
    fn open(&self, path: &Path) -> Result<Rows> {
        if is_parquet(path)? {
            parquet_rows(path, &self.src.columns())
        } else {
            jsonl_rows(path)
        }
    }
}

impl Iterator for ChatIter {
    type Item = Result<Conversation>;

    fn next(&mut self) -> Option<Result<Conversation>> {
        if self.done {
            return None;
        }
        loop {
            let Some((path, rows)) = &mut self.current else {
                let f = self.files.next()?;
                match self.open(&f) {
                    Ok(rows) => self.current = Some((f, rows)),
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                continue;
            };
            let row = match rows.next() {
                None => {
                    self.current = None;
                    continue;
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Some(Ok(row)) => row,
            };
            match row.data.and_then(|v| self.src.parse_row(&v)) {
                Ok(conv) => {
                    self.stats.conversations.fetch_add(1, Ordering::Relaxed);
                    return Some(Ok(conv));
                }
                Err(problem) => match self.src.on_error {
                    OnError::Skip => {
                        self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                    }
                    OnError::Fail => {
                        self.done = true;
                        return Some(Err(anyhow!("{}:{}: {problem}", path.display(), row.n)));
                    }
                },
            }
        }
    }
}

/// JSONL rows: one JSON object a non-blank line, numbered by line.
pub(crate) fn jsonl_rows(path: &Path) -> Result<Rows> {
    let mut reader = BufReader::with_capacity(1 << 16, open_file(path)?);
    let path = path.to_path_buf();
    let mut line = 0usize;
    let mut buf = Vec::new();
    Ok(Box::new(std::iter::from_fn(move || loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => return None,
            Ok(_) => line += 1,
            Err(e) => {
                return Some(Err(anyhow!(
                    "{}:{}: read error ({})",
                    path.display(),
                    line + 1,
                    one_line(e)
                )))
            }
        }
        let data = match std::str::from_utf8(&buf) {
            Err(_) => Err("not valid UTF-8".to_string()),
            Ok(s) if s.trim().is_empty() => continue,
            Ok(s) => serde_json::from_str::<Value>(s)
                .map_err(|e| format!("invalid JSON ({})", one_line(e))),
        };
        return Some(Ok(Row { n: line, data }));
    })))
}

/// Opens a Parquet file reading only `columns` (all must exist).
fn open_parquet(path: &Path, columns: &[String]) -> Result<ParquetRecordBatchReader> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(open_file(path)?)
        .map_err(|e| not_parquet(path, e))?;
    let schema = builder.schema().clone();
    let mut idx = vec![];
    for c in columns {
        let Some(i) = schema.fields().iter().position(|f| f.name() == c) else {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            bail!(
                "{}: column `{c}` not found (columns: {})",
                path.display(),
                names.join(", ")
            );
        };
        idx.push(i);
    }
    let mask = if columns.is_empty() {
        ProjectionMask::all()
    } else {
        ProjectionMask::roots(builder.parquet_schema(), idx)
    };
    builder
        .with_projection(mask)
        .with_batch_size(256)
        .build()
        .map_err(|e| not_parquet(path, e))
}

/// Parquet rows, as JSON objects of the projected columns (every column when `columns` is
/// empty), numbered from 1.
pub(crate) fn parquet_rows(path: &Path, columns: &[String]) -> Result<Rows> {
    let reader = open_parquet(path, columns)?;
    let mut n = 0usize;
    Ok(Box::new(
        parquet_items(path.to_path_buf(), reader, batch_rows).map(move |v| {
            n += 1;
            v.map(|data| Row { n, data: Ok(data) })
        }),
    ))
}

fn batch_rows(batch: &RecordBatch) -> std::result::Result<Vec<Value>, String> {
    let schema = batch.schema();
    let mut cols = vec![];
    for (f, c) in schema.fields().iter().zip(batch.columns()) {
        let vals = arrow_values(c.as_ref()).map_err(|e| format!("column `{}`: {e}", f.name()))?;
        cols.push((f.name().clone(), vals));
    }
    Ok((0..batch.num_rows())
        .map(|i| {
            Value::Object(
                cols.iter()
                    .map(|(name, vals)| (name.clone(), vals[i].clone()))
                    .collect(),
            )
        })
        .collect())
}

fn list_values<O: OffsetSizeTrait>(
    a: &arrow_array::GenericListArray<O>,
) -> std::result::Result<Vec<Value>, String> {
    let child = arrow_values(a.values().as_ref())?;
    let offsets = a.value_offsets();
    Ok((0..a.len())
        .map(|i| {
            if a.is_null(i) {
                Value::Null
            } else {
                let (s, e) = (offsets[i].as_usize(), offsets[i + 1].as_usize());
                Value::Array(child[s..e].to_vec())
            }
        })
        .collect())
}

/// Converts an Arrow array to JSON values, for the types chat data uses (strings, numbers,
/// booleans, lists, structs, dictionary-encoded strings).
fn arrow_values(a: &dyn Array) -> std::result::Result<Vec<Value>, String> {
    fn prim<T, F>(a: &dyn Array, f: F) -> Vec<Value>
    where
        T: arrow_array::ArrowPrimitiveType,
        F: Fn(T::Native) -> Value,
    {
        a.as_primitive::<T>()
            .iter()
            .map(|v| v.map_or(Value::Null, &f))
            .collect()
    }
    fn strs<'a>(it: impl Iterator<Item = Option<&'a str>>) -> Vec<Value> {
        it.map(|s| s.map_or(Value::Null, |s| Value::String(s.to_string())))
            .collect()
    }
    let float = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    let out = match a.data_type() {
        DataType::Null => vec![Value::Null; a.len()],
        DataType::Boolean => a
            .as_boolean()
            .iter()
            .map(|v| v.map_or(Value::Null, Value::Bool))
            .collect(),
        DataType::Int8 => prim::<Int8Type, _>(a, |x| x.into()),
        DataType::Int16 => prim::<Int16Type, _>(a, |x| x.into()),
        DataType::Int32 => prim::<Int32Type, _>(a, |x| x.into()),
        DataType::Int64 => prim::<Int64Type, _>(a, |x| x.into()),
        DataType::UInt8 => prim::<UInt8Type, _>(a, |x| x.into()),
        DataType::UInt16 => prim::<UInt16Type, _>(a, |x| x.into()),
        DataType::UInt32 => prim::<UInt32Type, _>(a, |x| x.into()),
        DataType::UInt64 => prim::<UInt64Type, _>(a, |x| x.into()),
        DataType::Float32 => prim::<Float32Type, _>(a, |x| float(x as f64)),
        DataType::Float64 => prim::<Float64Type, _>(a, float),
        DataType::Utf8 => strs(a.as_string::<i32>().iter()),
        DataType::LargeUtf8 => strs(a.as_string::<i64>().iter()),
        DataType::Utf8View => strs(a.as_string_view().iter()),
        DataType::List(_) => list_values(a.as_list::<i32>())?,
        DataType::LargeList(_) => list_values(a.as_list::<i64>())?,
        DataType::Struct(fields) => {
            let s = a.as_struct();
            let children = s
                .columns()
                .iter()
                .map(|c| arrow_values(c.as_ref()))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            (0..s.len())
                .map(|i| {
                    if s.is_null(i) {
                        return Value::Null;
                    }
                    let obj: Map<String, Value> = fields
                        .iter()
                        .zip(&children)
                        .map(|(f, vals)| (f.name().clone(), vals[i].clone()))
                        .collect();
                    Value::Object(obj)
                })
                .collect()
        }
        DataType::Dictionary(_, _) => {
            let d = a.as_any_dictionary();
            let values = arrow_values(d.values().as_ref())?;
            if values.is_empty() {
                vec![Value::Null; a.len()]
            } else {
                d.normalized_keys()
                    .into_iter()
                    .enumerate()
                    .map(|(i, k)| {
                        if a.is_null(i) {
                            Value::Null
                        } else {
                            values[k].clone()
                        }
                    })
                    .collect()
            }
        }
        dt => return Err(format!("unsupported Arrow type {dt}")),
    };
    Ok(out)
}

/// A piece of a rendered conversation.
enum Seg<'a> {
    ImStart,
    ImEnd,
    ThinkOpen,
    ThinkClose,
    Text(std::borrow::Cow<'a, str>),
}

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";
const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// The reasoning to render for an assistant turn, as Qwen3's template normalises it (newlines
/// stripped from both ends); `None` when absent or empty, which renders no `<think>` block.
fn reasoning_of(m: &Message) -> Option<&str> {
    m.reasoning
        .as_deref()
        .map(|r| r.trim_matches('\n'))
        .filter(|r| !r.is_empty())
}

/// The segments of a conversation, each with its mask bit. `history` renders assistant turns
/// without reasoning (as inference prompts do); otherwise reasoning is rendered where present.
fn segments<'a>(conv: &'a Conversation, history: bool) -> Vec<(Seg<'a>, u8)> {
    use std::borrow::Cow;
    let mut out = vec![];
    for m in &conv.messages {
        match m.role {
            Role::System | Role::User => {
                // Header and content in one piece: between two special tokens, exactly the
                // text a whole-string encode sees.
                out.push((Seg::ImStart, 0));
                out.push((
                    Seg::Text(Cow::Owned(format!("{}\n{}", m.role.as_str(), m.content))),
                    0,
                ));
                out.push((Seg::ImEnd, 0));
                out.push((Seg::Text(Cow::Borrowed("\n")), 0));
            }
            Role::Assistant => {
                let t = u8::from(!history);
                out.push((Seg::ImStart, 0));
                // The header is its own piece, as in an inference prompt, so the first trained
                // token starts exactly at the content.
                out.push((Seg::Text(Cow::Borrowed("assistant\n")), 0));
                match reasoning_of(m).filter(|_| !history) {
                    Some(r) => {
                        out.push((Seg::ThinkOpen, t));
                        out.push((Seg::Text(Cow::Owned(format!("\n{r}\n"))), t));
                        out.push((Seg::ThinkClose, t));
                        let c = m.content.trim_start_matches('\n');
                        out.push((Seg::Text(Cow::Owned(format!("\n\n{c}"))), t));
                    }
                    None => out.push((Seg::Text(Cow::Borrowed(m.content.as_str())), t)),
                }
                out.push((Seg::ImEnd, t));
                out.push((Seg::Text(Cow::Borrowed("\n")), 0));
            }
        }
    }
    out
}

fn segments_text(segs: &[(Seg, u8)]) -> String {
    let mut s = String::new();
    for (seg, _) in segs {
        s.push_str(match seg {
            Seg::ImStart => IM_START,
            Seg::ImEnd => IM_END,
            Seg::ThinkOpen => THINK_OPEN,
            Seg::ThinkClose => THINK_CLOSE,
            Seg::Text(t) => t,
        });
    }
    s
}

/// Renders a conversation in Qwen3's chat format and marks which tokens the loss trains on.
///
/// Choices, compared with transformers' Qwen3 chat template:
/// - Every assistant turn is trained (multi-turn SFT), each with its `<|im_end|>`.
/// - An assistant turn gets a `<think>` block only when it has non-empty reasoning, and then
///   the reasoning is trained, on every turn that has it. Qwen3's template drops the reasoning
///   of turns before the last user message and gives the final turn an empty
///   `<think>\n\n</think>\n\n` block; we train on reasoning only where the data has it and
///   never on empty think blocks.
/// - [`ChatTemplate::prompt`] renders earlier assistant turns without reasoning, as Qwen3's
///   template does at inference.
/// - With a think block, the content's leading newlines are stripped and the reasoning's
///   surrounding newlines too (as Qwen3's template does).
/// - Reasoning is not parsed out of `<think>…</think>` inside `content`; such text is rendered
///   as is.
///
/// Text is encoded piece by piece between special tokens, so mask boundaries are exact. The
/// pieces are what a whole-string encode sees, except that an assistant turn's
/// `assistant\n` header is encoded apart from its content (as in a generation prompt); the
/// two tokenisations differ only if a content starts with whitespace that the pre-tokenizer
/// would merge with the header's newline (e.g. a content starting with a newline).
/// Special-token text inside message contents (say a literal `<|im_end|>`) is encoded as the
/// special token, exactly as a whole-string encode would.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    im_start: u32,
    im_end: u32,
    think: Option<(u32, u32)>,
    origin: PathBuf,
}

impl ChatTemplate {
    /// Looks up `<|im_start|>`, `<|im_end|>` (required) and `<think>`/`</think>` (optional)
    /// in the tokenizer.
    pub fn new(tok: &Tokenizer) -> Result<Self> {
        let need = |t: &str| {
            tok.token_id(t).ok_or_else(|| {
                anyhow!(
                    "{}: tokenizer has no `{t}` token (the Qwen3 chat template needs it)",
                    tok.origin.display()
                )
            })
        };
        let im_start = need(IM_START)?;
        let im_end = need(IM_END)?;
        let think = tok.token_id(THINK_OPEN).zip(tok.token_id(THINK_CLOSE));
        Ok(Self {
            im_start,
            im_end,
            think,
            origin: tok.origin.clone(),
        })
    }

    pub fn im_start(&self) -> u32 {
        self.im_start
    }

    /// The end-of-turn id, which generation stops at.
    pub fn im_end(&self) -> u32 {
        self.im_end
    }

    /// The `<think>` and `</think>` ids, if the tokenizer has them.
    pub fn think(&self) -> Option<(u32, u32)> {
        self.think
    }

    fn encode(&self, tok: &Tokenizer, segs: &[(Seg, u8)]) -> Result<(Vec<u32>, Vec<u8>)> {
        let (mut ids, mut mask) = (vec![], vec![]);
        for (seg, m) in segs {
            let think = || {
                self.think.ok_or_else(|| {
                    anyhow!(
                        "{}: tokenizer has no `<think>`/`</think>` tokens, needed for an assistant turn with reasoning",
                        self.origin.display()
                    )
                })
            };
            match seg {
                Seg::ImStart => ids.push(self.im_start),
                Seg::ImEnd => ids.push(self.im_end),
                Seg::ThinkOpen => ids.push(think()?.0),
                Seg::ThinkClose => ids.push(think()?.1),
                Seg::Text(t) => ids.extend(tok.encode(t)?),
            }
            mask.resize(ids.len(), *m);
        }
        Ok((ids, mask))
    }

    /// Ids and mask (1 = trained) for a whole conversation, which must be valid
    /// ([`Conversation::validate`]).
    pub fn render(&self, tok: &Tokenizer, conv: &Conversation) -> Result<(Vec<u32>, Vec<u8>)> {
        conv.validate()?;
        self.encode(tok, &segments(conv, false))
    }

    /// The text [`ChatTemplate::render`] encodes.
    pub fn render_text(conv: &Conversation) -> String {
        segments_text(&segments(conv, false))
    }

    /// The generation prompt for inference: the conversation (which must not end with an
    /// assistant turn; earlier assistant turns are rendered without reasoning) followed by
    /// `<|im_start|>assistant\n`.
    pub fn prompt(&self, tok: &Tokenizer, conv: &Conversation) -> Result<Vec<u32>> {
        Self::check_prompt(conv)?;
        let mut segs = segments(conv, true);
        segs.push((Seg::ImStart, 0));
        segs.push((Seg::Text("assistant\n".into()), 0));
        Ok(self.encode(tok, &segs)?.0)
    }

    /// The text [`ChatTemplate::prompt`] encodes.
    pub fn prompt_text(conv: &Conversation) -> String {
        segments_text(&segments(conv, true)) + IM_START + "assistant\n"
    }

    fn check_prompt(conv: &Conversation) -> Result<()> {
        conv.check(false)
            .map_err(|e| anyhow!("conversation: {e}"))?;
        if conv
            .messages
            .last()
            .is_some_and(|m| m.role == Role::Assistant)
        {
            bail!("conversation: ends with an assistant turn (a generation prompt must not)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECIALS: &[&str] = &[
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<think>",
        "</think>",
    ];

    fn byte_tok() -> Tokenizer {
        Tokenizer::byte_level(SPECIALS).unwrap()
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ember-chat-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The decoded text of the tokens whose mask is 1, and of those whose mask is 0.
    fn split_by_mask(tok: &Tokenizer, ids: &[u32], mask: &[u8]) -> (String, String) {
        let pick = |want: u8| {
            let sel: Vec<u32> = ids
                .iter()
                .zip(mask)
                .filter(|(_, &m)| m == want)
                .map(|(&i, _)| i)
                .collect();
            tok.decode(&sel, false).unwrap()
        };
        (pick(1), pick(0))
    }

    #[test]
    fn chat_single_turn_renders_and_masks_exactly() {
        let tok = byte_tok();
        let t = ChatTemplate::new(&tok).unwrap();
        let conv = Conversation::new(vec![
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Hi?"),
            Message::new(Role::Assistant, "Hello!"),
        ]);
        let (ids, mask) = t.render(&tok, &conv).unwrap();
        assert_eq!(ids.len(), mask.len());
        let want = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n\
                    <|im_start|>assistant\nHello!<|im_end|>\n";
        assert_eq!(tok.decode(&ids, false).unwrap(), want);
        assert_eq!(ChatTemplate::render_text(&conv), want);

        // Hand count: "Hello!" is 6 bytes, plus <|im_end|>.
        assert_eq!(mask.iter().filter(|&&m| m == 1).count(), 7);
        let (trained, _) = split_by_mask(&tok, &ids, &mask);
        assert_eq!(trained, "Hello!<|im_end|>");
        // Everything before the content is prompt; the last token (newline) is glue.
        let start = want.find("Hello!").unwrap(); // bytes before it: 1 id each, except specials
        let prompt_ids = tok.encode(&want[..start]).unwrap();
        assert!(mask[..prompt_ids.len()].iter().all(|&m| m == 0));
        assert!(mask[prompt_ids.len()..ids.len() - 1]
            .iter()
            .all(|&m| m == 1));
        assert_eq!(*mask.last().unwrap(), 0);
        assert_eq!(*ids.last().unwrap(), tok.encode("\n").unwrap()[0]);
        assert_eq!(ids[ids.len() - 2], tok.token_id("<|im_end|>").unwrap());
        assert_eq!(mask[ids.len() - 2], 1);
    }

    #[test]
    fn chat_multi_turn_trains_every_assistant_turn_and_reasoning() {
        let tok = byte_tok();
        let t = ChatTemplate::new(&tok).unwrap();
        let conv = Conversation::new(vec![
            Message::new(Role::User, "2+2?"),
            Message::new(Role::Assistant, "\n4").with_reasoning("\nadd them\n"),
            Message::new(Role::User, "and 3+3?"),
            Message::new(Role::Assistant, "6"),
            Message::new(Role::User, "thanks"),
            Message::new(Role::Assistant, "").with_reasoning("\n\n"), // empty: no think block
        ]);
        let (ids, mask) = t.render(&tok, &conv).unwrap();
        let want = "<|im_start|>user\n2+2?<|im_end|>\n\
                    <|im_start|>assistant\n<think>\nadd them\n</think>\n\n4<|im_end|>\n\
                    <|im_start|>user\nand 3+3?<|im_end|>\n\
                    <|im_start|>assistant\n6<|im_end|>\n\
                    <|im_start|>user\nthanks<|im_end|>\n\
                    <|im_start|>assistant\n<|im_end|>\n";
        assert_eq!(tok.decode(&ids, false).unwrap(), want);
        assert_eq!(ChatTemplate::render_text(&conv), want);

        // Hand count: turn 1 = <think> + "\nadd them\n" (10) + </think> + "\n\n4" (3) +
        // <|im_end|> = 16; turn 2 = "6" + <|im_end|> = 2; turn 3 = <|im_end|> = 1.
        assert_eq!(mask.iter().filter(|&&m| m == 1).count(), 19);

        // The trained tokens form exactly the three assistant bodies, in order; the rest is
        // every system/user token, the headers and the glue newlines.
        let (trained, untrained) = split_by_mask(&tok, &ids, &mask);
        assert_eq!(
            trained,
            "<think>\nadd them\n</think>\n\n4<|im_end|>6<|im_end|><|im_end|>"
        );
        assert_eq!(
            untrained,
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n\n\
             <|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n\n\
             <|im_start|>user\nthanks<|im_end|>\n<|im_start|>assistant\n\n"
        );
        // Trained runs are contiguous: three runs of 1s, each ending on <|im_end|>.
        let im_end = tok.token_id("<|im_end|>").unwrap();
        let runs: Vec<usize> = (0..ids.len())
            .filter(|&i| mask[i] == 1 && mask.get(i + 1) != Some(&1))
            .collect();
        assert_eq!(runs.len(), 3);
        assert!(runs.iter().all(|&i| ids[i] == im_end && mask[i + 1] == 0));
        let think = tok.token_id("<think>").unwrap();
        let p = ids.iter().position(|&i| i == think).unwrap();
        assert_eq!(mask[p], 1, "<think> is trained");
    }

    #[test]
    fn chat_prompt_ends_with_assistant_header_and_drops_history_reasoning() {
        let tok = byte_tok();
        let t = ChatTemplate::new(&tok).unwrap();
        let conv = Conversation::new(vec![
            Message::new(Role::System, "sys"),
            Message::new(Role::User, "a"),
            Message::new(Role::Assistant, "b").with_reasoning("hmm"),
            Message::new(Role::User, "c"),
        ]);
        let ids = t.prompt(&tok, &conv).unwrap();
        let text = tok.decode(&ids, false).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\na<|im_end|>\n\
             <|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        assert!(text.ends_with("<|im_start|>assistant\n"));
        assert_eq!(ChatTemplate::prompt_text(&conv), text);
        // A prompt for the first turn, and errors for a finished conversation.
        let first = Conversation::new(vec![Message::new(Role::User, "x")]);
        assert_eq!(
            tok.decode(&t.prompt(&tok, &first).unwrap(), false).unwrap(),
            "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
        );
        let mut done = first.clone();
        done.messages.push(Message::new(Role::Assistant, "y"));
        let e = t.prompt(&tok, &done).unwrap_err().to_string();
        assert!(e.contains("ends with an assistant turn"), "{e}");
        // The prompt is a prefix of the training rendering (no reasoning involved).
        let (r, _) = t.render(&tok, &done).unwrap();
        let p = t.prompt(&tok, &first).unwrap();
        assert_eq!(&r[..p.len()], &p[..]);
    }

    #[test]
    fn chat_template_needs_im_tokens_and_think_only_for_reasoning() {
        let e = ChatTemplate::new(&Tokenizer::byte_level(&["<|endoftext|>"]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`<|im_start|>`") && !e.contains('\n'), "{e}");
        let tok = Tokenizer::byte_level(&["<|im_start|>", "<|im_end|>"]).unwrap();
        let t = ChatTemplate::new(&tok).unwrap();
        assert_eq!(t.think(), None);
        assert_eq!(t.im_end(), 257);
        let plain = Conversation::new(vec![
            Message::new(Role::User, "q"),
            Message::new(Role::Assistant, "a"),
        ]);
        assert!(t.render(&tok, &plain).is_ok());
        let mut thinking = plain.clone();
        thinking.messages[1].reasoning = Some("r".into());
        let e = t.render(&tok, &thinking).unwrap_err().to_string();
        assert!(e.contains("<think>"), "{e}");
    }

    #[test]
    fn chat_invalid_conversations_are_rejected() {
        let tok = byte_tok();
        let t = ChatTemplate::new(&tok).unwrap();
        let u = |s: &str| Message::new(Role::User, s);
        let a = |s: &str| Message::new(Role::Assistant, s);
        let s = |s: &str| Message::new(Role::System, s);
        for (msgs, want) in [
            (vec![], "no messages"),
            (vec![u("q")], "no assistant turn"),
            (
                vec![a("x"), u("q"), a("y")],
                "first message is from the assistant",
            ),
            (vec![s("x"), a("y")], "first message is from the assistant"),
            (vec![s("x"), s("y"), u("q"), a("z")], "2 system messages"),
            (
                vec![u("q"), s("x"), a("z")],
                "system message at messages[1]",
            ),
        ] {
            let e = t
                .render(&tok, &Conversation::new(msgs))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
        // Empty contents are fine.
        let (ids, mask) = t
            .render(&tok, &Conversation::new(vec![u(""), a("")]))
            .unwrap();
        assert_eq!(mask.iter().filter(|&&m| m == 1).count(), 1);
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
        );
    }

    fn collect(src: &ChatSource) -> Vec<Result<Conversation>> {
        src.conversations().unwrap().collect()
    }

    #[test]
    fn chat_jsonl_messages_and_malformed_rows() {
        let d = tmp("jsonl");
        let p = d.join("chat.jsonl");
        std::fs::write(
            &p,
            concat!(
                r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo","reasoning_content":"think"}]}"#,
                "\n\n",
                r#"{"messages":[{"role":"user","content":"a"},{"role":"tool","content":"b"}]}"#,
                "\n",
                r#"{"messages":[{"role":"user"},{"role":"assistant","content":"b"}]}"#,
                "\n",
                r#"{"messages":"nope"}"#,
                "\n",
                r#"{"messages":[{"role":"user","content":"q"}]}"#,
                "\n",
                "{not json\n",
                r#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":"q2"},{"role":"assistant","content":"a2","reasoning":"r2"}]}"#,
                "\n",
            ),
        )
        .unwrap();
        let mut src = ChatSource::new(&p);
        let got = collect(&src);
        assert_eq!(got.len(), 2, "stops after the first error");
        let first = got[0].as_ref().unwrap();
        assert_eq!(
            first.messages,
            vec![
                Message::new(Role::User, "hi"),
                Message::new(Role::Assistant, "yo").with_reasoning("think"),
            ]
        );
        let e = got[1].as_ref().unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}:3: messages[1]: unknown role `tool` (expected system, user or assistant)",
                p.display()
            )
        );

        src.on_error = OnError::Skip;
        let (it, stats) = src.conversations_with_stats().unwrap();
        let got: Vec<Conversation> = it.map(Result::unwrap).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].messages[0], Message::new(Role::System, "s"));
        assert_eq!(got[1].messages[2].reasoning.as_deref(), Some("r2"));
        assert_eq!(stats.skipped(), 5);
        assert_eq!(stats.conversations(), 2);

        // Each malformed row names path:line and the problem.
        let lines = std::fs::read_to_string(&p).unwrap();
        for (line, want) in [
            (4, "4: messages[0]: missing `content`"),
            (5, "5: `messages` is a string, not a list"),
            (6, "6: no assistant turn"),
            (7, "7: invalid JSON"),
        ] {
            let one = d.join(format!("row{line}.jsonl"));
            // Keep the line number: blank lines before the row.
            let body = "\n".repeat(line - 1) + lines.lines().nth(line - 1).unwrap() + "\n";
            std::fs::write(&one, body).unwrap();
            let e = collect(&ChatSource::new(&one))[0]
                .as_ref()
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("{}:{want}", one.display())),
                "{e} (wanted {want})"
            );
        }
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn chat_jsonl_prompt_response_pairs_with_system() {
        let d = tmp("pairs");
        let p = d.join("pairs.jsonl");
        std::fs::write(
            &p,
            concat!(
                r#"{"q":"What?","a":"That.","sys":"Be kind."}"#,
                "\n",
                r#"{"q":"Who?","a":"Me.","sys":null}"#,
                "\n",
                r#"{"q":"Where?"}"#,
                "\n",
            ),
        )
        .unwrap();
        let src: ChatSource = serde_json::from_str(&format!(
            r#"{{"path":{:?},"prompt_field":"q","response_field":"a","system_field":"sys","system":"Default."}}"#,
            p.display().to_string()
        ))
        .unwrap();
        let got = collect(&src);
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[0].as_ref().unwrap().messages,
            vec![
                Message::new(Role::System, "Be kind."),
                Message::new(Role::User, "What?"),
                Message::new(Role::Assistant, "That."),
            ]
        );
        assert_eq!(
            got[1].as_ref().unwrap().messages,
            vec![
                Message::new(Role::System, "Default."),
                Message::new(Role::User, "Who?"),
                Message::new(Role::Assistant, "Me."),
            ]
        );
        let e = got[2].as_ref().unwrap_err().to_string();
        assert_eq!(e, format!("{}:3: missing `a`", p.display()));

        // Defaults: "prompt"/"response", no system.
        std::fs::write(&p, r#"{"prompt":"p","response":"r"}"#).unwrap();
        let mut src = ChatSource::new(&p);
        src.response_field = Some("response".into());
        let c = collect(&src).remove(0).unwrap();
        assert_eq!(c.messages.len(), 2);
        assert_eq!(c.messages[0], Message::new(Role::User, "p"));
        // Unknown config keys are refused.
        assert!(serde_json::from_str::<ChatSource>(r#"{"path":"x","colum":"y"}"#).is_err());
        std::fs::remove_dir_all(d).unwrap();
    }

    /// (role, content) pairs of one row.
    type Msgs<'a> = &'a [(&'a str, Option<&'a str>)];

    fn write_messages_parquet(path: &Path, rows: &[Option<Msgs>]) {
        use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
        use arrow_schema::{Field, Fields, Schema};
        let fields = Fields::from(vec![
            Field::new("role", DataType::Utf8, true),
            Field::new("content", DataType::Utf8, true),
        ]);
        let item = Field::new("item", DataType::Struct(fields.clone()), true);
        let mut lb =
            ListBuilder::new(StructBuilder::from_fields(fields, 0)).with_field(item.clone());
        for row in rows {
            match row {
                None => lb.append(false),
                Some(msgs) => {
                    for (role, content) in *msgs {
                        let sb = lb.values();
                        sb.field_builder::<StringBuilder>(0)
                            .unwrap()
                            .append_value(role);
                        sb.field_builder::<StringBuilder>(1)
                            .unwrap()
                            .append_option(*content);
                        sb.append(true);
                    }
                    lb.append(true);
                }
            }
        }
        let list = lb.finish();
        let mut ids = arrow_array::builder::Int64Builder::new();
        for i in 0..rows.len() {
            ids.append_value(i as i64);
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("messages", list.data_type().clone(), true),
        ]));
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(ids.finish()), Arc::new(list)])
                .unwrap();
        let f = File::create(path).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn chat_parquet_messages_column() {
        let d = tmp("parquet");
        let p = d.join("train-00000.parquet");
        let good: Msgs = &[
            ("system", Some("sys")),
            ("user", Some("héllo")),
            ("assistant", Some("wörld")),
            ("user", Some("again")),
            ("assistant", Some("")),
        ];
        let bad_content: Msgs = &[("user", None), ("assistant", Some("x"))];
        let bad_role: Msgs = &[("user", Some("q")), ("bot", Some("x"))];
        let second: Msgs = &[("user", Some("q")), ("assistant", Some("a"))];
        write_messages_parquet(
            &p,
            &[
                Some(good),
                Some(bad_content),
                None,
                Some(bad_role),
                Some(second),
            ],
        );

        let mut src = ChatSource::new(&d); // a directory of parquet files
        let got = collect(&src);
        assert_eq!(got.len(), 2);
        let c = got[0].as_ref().unwrap();
        assert_eq!(
            c.messages,
            good.iter()
                .map(|(r, t)| Message::new(Role::parse(r).unwrap(), t.unwrap()))
                .collect::<Vec<_>>()
        );
        let e = got[1].as_ref().unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{}:2: messages[0]: missing `content`", p.display())
        );

        src.on_error = OnError::Skip;
        let (it, stats) = src.conversations_with_stats().unwrap();
        let got: Vec<Conversation> = it.map(Result::unwrap).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[1].messages,
            vec![
                Message::new(Role::User, "q"),
                Message::new(Role::Assistant, "a"),
            ]
        );
        assert_eq!(stats.skipped(), 3);

        // Row numbers for the null list and the bad role.
        src.on_error = OnError::Fail;
        src.path = p.clone();
        let e = {
            write_messages_parquet(&p, &[Some(second), None]);
            collect(&src)[1].as_ref().unwrap_err().to_string()
        };
        assert_eq!(e, format!("{}:2: missing `messages`", p.display()));
        write_messages_parquet(&p, &[Some(second), Some(second), Some(bad_role)]);
        let e = collect(&src)[2].as_ref().unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{}:3: messages[1]: unknown role `bot`",
                p.display()
            )),
            "{e}"
        );
        // A missing column is a file-level error naming the columns.
        src.messages_field = "conversations".into();
        let e = collect(&src)[0].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("column `conversations` not found (columns: id, messages)"),
            "{e}"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn chat_missing_path_is_one_line_error() {
        let e = ChatSource::new("/nonexistent/chat.jsonl")
            .conversations()
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("/nonexistent/chat.jsonl: no such file"),
            "{e}"
        );
    }

    /// With the real Qwen3 tokenizer, piecewise encoding equals whole-string encoding.
    #[test]
    fn chat_qwen3_render_matches_whole_string_encode() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/downloads/qwen3/tokenizer.json");
        if !path.exists() {
            eprintln!("skipping: {} not found", path.display());
            return;
        }
        let tok = Tokenizer::from_file(&path).unwrap();
        let t = ChatTemplate::new(&tok).unwrap();
        assert_eq!(t.im_start(), 151644);
        assert_eq!(t.im_end(), 151645);
        assert_eq!(t.think(), Some((151667, 151668)));
        let conv = Conversation::new(vec![
            Message::new(Role::System, "You are a helpful assistant.\n"),
            Message::new(Role::User, "What's 2+2? Answer in   one word!"),
            Message::new(Role::Assistant, "Four.").with_reasoning("The user asks 2+2.\nThat's 4!"),
            Message::new(Role::User, "Und auf Deutsch? 你好 🙂\n\n"),
            Message::new(Role::Assistant, "Vier!\n  Indented:\n\tcode();"),
            Message::new(Role::User, " leading space"),
            Message::new(Role::Assistant, " also a leading space."),
            Message::new(Role::User, "ok"),
            Message::new(Role::Assistant, "  two spaces, then ... \"quotes\"")
                .with_reasoning("\n\nok\n"),
        ]);
        let (ids, mask) = t.render(&tok, &conv).unwrap();
        let text = ChatTemplate::render_text(&conv);
        assert_eq!(ids, tok.encode(&text).unwrap());
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        let (trained, _) = split_by_mask(&tok, &ids, &mask);
        assert_eq!(
            trained,
            "<think>\nThe user asks 2+2.\nThat's 4!\n</think>\n\nFour.<|im_end|>\
             Vier!\n  Indented:\n\tcode();<|im_end|> also a leading space.<|im_end|>\
             <think>\nok\n</think>\n\n  two spaces, then ... \"quotes\"<|im_end|>"
        );
        let prompt = Conversation::new(conv.messages[..4].to_vec());
        let p = t.prompt(&tok, &prompt).unwrap();
        assert_eq!(p, tok.encode(&ChatTemplate::prompt_text(&prompt)).unwrap());
    }
}
