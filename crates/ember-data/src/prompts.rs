//! Prompts for RL: JSONL or Parquet rows whose prompt is a string (one user turn) or a list
//! of messages, kept with every other field of the row (the reference answer among them) for
//! the rewards to read. Generated tasks give the same rows from their problems.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::chat::{
    data_files, is_parquet, jsonl_rows, kind, parquet_rows, parse_message, Conversation, Message,
    OnError, Role,
};
use crate::tasks::Problem;

fn prompt_field() -> String {
    "prompt".into()
}

/// Where RL prompts come from (a file, or a directory of `*.jsonl`, `*.json`, `*.ndjson` and
/// `*.parquet` files read in path order).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSource {
    pub path: PathBuf,
    /// The field holding the prompt: a string (one user turn) or a list of
    /// `{role, content}` messages (a trailing assistant turn, a reference answer, is dropped).
    #[serde(default = "prompt_field")]
    pub prompt_field: String,
    /// A system prompt put first in every prompt that has none of its own.
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub on_error: OnError,
}

/// One prompt and the row it came from.
#[derive(Debug, Clone)]
pub struct PromptRow {
    /// The conversation to continue (no trailing assistant turn).
    pub conversation: Conversation,
    /// The row's fields, the prompt's own included.
    pub fields: Map<String, Value>,
}

impl PromptRow {
    /// The user turn's text (the last one), as rewards see the prompt.
    pub fn text(&self) -> &str {
        self.conversation
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.as_str())
            .unwrap_or("")
    }

    /// A generated problem as a prompt: its question as the user turn; `answer`, `level`
    /// and `question` as fields.
    pub fn from_problem(p: &Problem) -> Self {
        let fields = json!({"question": p.question, "answer": p.answer, "level": p.level});
        Self {
            conversation: Conversation::new(vec![Message::new(Role::User, p.question.clone())]),
            fields: fields.as_object().expect("an object").clone(),
        }
    }
}

impl PromptSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            prompt_field: prompt_field(),
            system: None,
            on_error: OnError::Fail,
        }
    }

    /// Every prompt of the source, and how many malformed rows were skipped (only with
    /// `on_error = "skip"`; otherwise the first one is an error `{path}:{row}: {problem}`).
    pub fn read_all(&self) -> Result<(Vec<PromptRow>, usize)> {
        let mut out = Vec::new();
        let mut skipped = 0;
        for file in data_files(&self.path, "prompt source")? {
            let rows = if is_parquet(&file)? {
                parquet_rows(&file, &[])?
            } else {
                jsonl_rows(&file)?
            };
            for row in rows {
                let row = row?;
                match row.data.and_then(|v| self.parse_row(v)) {
                    Ok(p) => out.push(p),
                    Err(_) if self.on_error == OnError::Skip => skipped += 1,
                    Err(problem) => return Err(anyhow!("{}:{}: {problem}", file.display(), row.n)),
                }
            }
        }
        Ok((out, skipped))
    }

    fn parse_row(&self, row: Value) -> std::result::Result<PromptRow, String> {
        let Value::Object(fields) = row else {
            return Err("row is not a JSON object".into());
        };
        let name = &self.prompt_field;
        let mut messages = match fields.get(name) {
            Some(Value::String(s)) if !s.trim().is_empty() => {
                vec![Message::new(Role::User, s.clone())]
            }
            Some(Value::String(_)) => return Err(format!("`{name}` is empty")),
            Some(Value::Array(list)) => list
                .iter()
                .map(parse_message)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| format!("`{name}`: {e}"))?,
            None | Some(Value::Null) => return Err(format!("missing `{name}`")),
            Some(v) => {
                return Err(format!(
                    "`{name}` is {}, not a string or a list of messages",
                    kind(v)
                ))
            }
        };
        if messages.last().is_some_and(|m| m.role == Role::Assistant) {
            messages.pop();
        }
        if !messages.iter().any(|m| m.role == Role::User) {
            return Err(format!("`{name}` has no user turn"));
        }
        if let Some(sys) = &self.system {
            if messages.first().is_none_or(|m| m.role != Role::System) {
                messages.insert(0, Message::new(Role::System, sys.clone()));
            }
        }
        let conversation = Conversation::new(messages);
        conversation.validate_prompt().map_err(|e| e.to_string())?;
        Ok(PromptRow {
            conversation,
            fields,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, body: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ember-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn prompt_rows_keep_fields_and_accept_messages() {
        let p = tmp(
            "a.jsonl",
            concat!(
                r#"{"prompt": "What is 2+2?", "answer": "4", "id": 7}"#,
                "\n\n",
                r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}], "answer": 2}"#,
                "\n"
            ),
        );
        let mut src = PromptSource::new(&p);
        src.system = Some("Box the answer.".into());
        let (rows, skipped) = src.read_all().unwrap();
        assert_eq!((rows.len(), skipped), (2, 0));
        assert_eq!(rows[0].text(), "What is 2+2?");
        assert_eq!(rows[0].fields["answer"], "4");
        assert_eq!(rows[0].fields["id"], 7);
        let roles: Vec<Role> = rows[0]
            .conversation
            .messages
            .iter()
            .map(|m| m.role)
            .collect();
        assert_eq!(roles, [Role::System, Role::User]);
        assert_eq!(rows[0].conversation.messages[0].content, "Box the answer.");
        // Its own system prompt is kept; the reference assistant turn is dropped.
        let m = &rows[1].conversation.messages;
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].content, "Be brief.");
        assert_eq!(rows[1].text(), "1+1?");
    }

    #[test]
    fn malformed_prompt_rows_name_file_and_line() {
        let p = tmp(
            "bad.jsonl",
            "{\"prompt\": \"ok\"}\n{\"question\": \"no prompt\"}\n{\"prompt\": 3}\n",
        );
        let err = PromptSource::new(&p).read_all().unwrap_err().to_string();
        assert!(err.ends_with("bad.jsonl:2: missing `prompt`"), "{err}");
        let mut src = PromptSource::new(&p);
        src.on_error = OnError::Skip;
        let (rows, skipped) = src.read_all().unwrap();
        assert_eq!((rows.len(), skipped), (1, 2));
        let missing = PromptSource::new(p.with_file_name("nope.jsonl"))
            .read_all()
            .unwrap_err()
            .to_string();
        assert!(missing.contains("nope.jsonl: no such file"), "{missing}");
    }
}
