//! Rendering: the Discord-only fields of an envelope, read from its JSON
//! object (`envelope.raw`) and checked against Discord's documented limits,
//! before anything is sent. A bad field is a permanent error that names it
//! (the entry is dead-lettered as `rejected`, its channel keeps flowing).
//!
//! Pure functions, unit-tested without Redis or HTTP.

use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::adapters::AdapterError;

/// Most embeds per message.
pub const MAX_EMBEDS: usize = 10;
/// Most characters over all embeds of one message.
pub const MAX_EMBED_TOTAL: usize = 6000;
/// Most files per message.
pub const MAX_FILES: usize = 10;
/// Most fields per embed.
const MAX_EMBED_FIELDS: usize = 25;

/// The `allowed_mentions` kinds Discord knows.
const MENTION_KINDS: &[&str] = &["users", "roles", "everyone"];

/// Discord's `allowed_mentions` object for a message: the envelope's own
/// (`allowed_mentions`: a list of kinds, or Discord's object), else the
/// platform's default kinds (`users` unless configured). `@everyone` and
/// roles are pinged only when asked for.
pub fn allowed_mentions(
    raw: &Map<String, Value>,
    default: &[String],
) -> Result<Value, AdapterError> {
    let bad = |why: &str| AdapterError::permanent(format!("field `allowed_mentions` {why}"));
    let check_kinds = |kinds: &[Value]| -> Result<Vec<Value>, AdapterError> {
        kinds
            .iter()
            .map(|k| match k.as_str() {
                Some(s) if MENTION_KINDS.contains(&s) => Ok(Value::from(s)),
                _ => Err(bad(&format!(
                    "has `{k}`; the kinds are users, roles and everyone"
                ))),
            })
            .collect()
    };
    match raw.get("allowed_mentions") {
        None | Some(Value::Null) => Ok(json!({"parse": default})),
        Some(Value::Array(kinds)) => Ok(json!({"parse": check_kinds(kinds)?})),
        Some(Value::Object(o)) => {
            let mut out = Map::new();
            for (k, v) in o {
                match (k.as_str(), v) {
                    ("parse", Value::Array(kinds)) => {
                        out.insert(k.clone(), Value::Array(check_kinds(kinds)?));
                    }
                    ("users" | "roles", Value::Array(ids)) => {
                        if ids.len() > 100 {
                            return Err(bad(&format!("lists over 100 {k}")));
                        }
                        if ids.iter().any(|i| snowflake(i).is_none()) {
                            return Err(bad(&format!("`{k}` must be ids (strings of digits)")));
                        }
                        out.insert(k.clone(), v.clone());
                    }
                    ("replied_user", Value::Bool(_)) => {
                        out.insert(k.clone(), v.clone());
                    }
                    _ => return Err(bad(&format!("has a bad entry `{k}`"))),
                }
            }
            // Discord refuses a kind both parsed and listed.
            for k in ["users", "roles"] {
                if out.contains_key(k)
                    && out
                        .get("parse")
                        .and_then(Value::as_array)
                        .is_some_and(|p| p.iter().any(|x| x == k))
                {
                    return Err(bad(&format!("both parses and lists `{k}`")));
                }
            }
            Ok(Value::Object(out))
        }
        Some(_) => Err(bad("must be a list of kinds or an object")),
    }
}

/// An id as a string of digits (a JSON number is accepted too).
fn snowflake(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            Some(s.clone())
        }
        Value::Number(n) if n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// An optional id field of the envelope (`thread_id`, …).
pub fn id_field(raw: &Map<String, Value>, name: &str) -> Result<Option<String>, AdapterError> {
    match raw.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => snowflake(v).map(Some).ok_or_else(|| {
            AdapterError::permanent(format!("field `{name}` must be a Discord id (digits)"))
        }),
    }
}

/// The envelope's `embeds`, checked against Discord's limits (at most 10;
/// title 256, description 4,096, 25 fields of name 256 / value 1,024,
/// footer 2,048, author 256 characters; 6,000 over all of them).
pub fn embeds(raw: &Map<String, Value>) -> Result<Option<Value>, AdapterError> {
    let list = match raw.get("embeds") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(AdapterError::permanent(
                "field `embeds` must be a list of embed objects",
            ));
        }
    };
    if list.len() > MAX_EMBEDS {
        return Err(AdapterError::permanent(format!(
            "field `embeds` has {} embeds; Discord allows {MAX_EMBEDS}",
            list.len()
        )));
    }
    let mut total = 0;
    for (i, e) in list.iter().enumerate() {
        let at = |path: &str| format!("embeds[{i}].{path}");
        let Some(o) = e.as_object() else {
            return Err(AdapterError::permanent(format!(
                "field `embeds[{i}]` must be an object"
            )));
        };
        let mut text = |v: Option<&Value>, path: &str, max: usize| -> Result<(), AdapterError> {
            match v {
                None | Some(Value::Null) => Ok(()),
                Some(Value::String(s)) => {
                    let n = s.chars().count();
                    if n > max {
                        return Err(AdapterError::permanent(format!(
                            "field `{}` is {n} characters; Discord allows {max}",
                            at(path)
                        )));
                    }
                    total += n;
                    Ok(())
                }
                Some(_) => Err(AdapterError::permanent(format!(
                    "field `{}` must be a string",
                    at(path)
                ))),
            }
        };
        text(o.get("title"), "title", 256)?;
        text(o.get("description"), "description", 4096)?;
        text(e.pointer("/footer/text"), "footer.text", 2048)?;
        text(e.pointer("/author/name"), "author.name", 256)?;
        if let Some(fields) = o.get("fields") {
            let Some(fields) = fields.as_array() else {
                return Err(AdapterError::permanent(format!(
                    "field `{}` must be a list",
                    at("fields")
                )));
            };
            if fields.len() > MAX_EMBED_FIELDS {
                return Err(AdapterError::permanent(format!(
                    "field `{}` has {} fields; Discord allows {MAX_EMBED_FIELDS}",
                    at("fields"),
                    fields.len()
                )));
            }
            for (j, f) in fields.iter().enumerate() {
                for (key, max) in [("name", 256), ("value", 1024)] {
                    match f.get(key) {
                        Some(Value::String(s)) if !s.is_empty() => text(
                            Some(&Value::from(s.as_str())),
                            &format!("fields[{j}].{key}"),
                            max,
                        )?,
                        _ => {
                            return Err(AdapterError::permanent(format!(
                                "field `{}` is required (a non-empty string)",
                                at(&format!("fields[{j}].{key}"))
                            )));
                        }
                    }
                }
            }
        }
        if let Some(c) = o.get("color")
            && c.as_u64().is_none_or(|c| c > 0xFF_FFFF)
        {
            return Err(AdapterError::permanent(format!(
                "field `{}` must be an integer from 0 to 16777215 (0xRRGGBB)",
                at("color")
            )));
        }
    }
    if total > MAX_EMBED_TOTAL {
        return Err(AdapterError::permanent(format!(
            "field `embeds` has {total} characters in all; Discord allows {MAX_EMBED_TOTAL}"
        )));
    }
    Ok(Some(Value::Array(list.clone())))
}

/// One file to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    pub data: Vec<u8>,
    pub filename: String,
    pub mimetype: String,
}

/// The envelope's `files` (`[{file_data, filename, mimetype}]`, at most 10).
pub fn files(raw: &Map<String, Value>) -> Result<Vec<FileSpec>, AdapterError> {
    let list = match raw.get("files") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(AdapterError::permanent(
                "field `files` must be a list of {file_data, filename, mimetype}",
            ));
        }
    };
    if list.len() > MAX_FILES {
        return Err(AdapterError::permanent(format!(
            "field `files` has {} files; Discord allows {MAX_FILES} per message",
            list.len()
        )));
    }
    list.iter()
        .enumerate()
        .map(|(i, f)| {
            let field = |k: &str| f.get(k).and_then(Value::as_str);
            let data = field("file_data").ok_or_else(|| {
                AdapterError::permanent(format!(
                    "field `files[{i}].file_data` is required (base64)"
                ))
            })?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map_err(|e| {
                    AdapterError::permanent(format!(
                        "field `files[{i}].file_data` is not valid base64: {e}"
                    ))
                })?;
            Ok(FileSpec {
                data,
                filename: field("filename").unwrap_or("file").to_owned(),
                mimetype: field("mimetype")
                    .unwrap_or("application/octet-stream")
                    .to_owned(),
            })
        })
        .collect()
}

/// A DM target: `channel_id = "dm:<user id>"` names the user; the adapter
/// opens (and remembers) the DM channel.
pub fn dm_user(channel: &str) -> Result<Option<&str>, AdapterError> {
    let Some(user) = channel.strip_prefix("dm:") else {
        return Ok(None);
    };
    if user.is_empty() || !user.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AdapterError::permanent(format!(
            "channel_id `{channel}`: a DM is `dm:<user id>` (digits)"
        )));
    }
    Ok(Some(user))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn mentions_default_to_users_and_never_everyone() {
        let d = vec!["users".to_owned()];
        assert_eq!(
            allowed_mentions(&raw(json!({})), &d).unwrap(),
            json!({"parse": ["users"]})
        );
        assert_eq!(
            allowed_mentions(&raw(json!({"allowed_mentions": []})), &d).unwrap(),
            json!({"parse": []})
        );
        assert_eq!(
            allowed_mentions(&raw(json!({"allowed_mentions": ["everyone", "roles"]})), &d).unwrap(),
            json!({"parse": ["everyone", "roles"]})
        );
        let o = json!({"allowed_mentions": {"users": ["123"], "replied_user": false}});
        assert_eq!(
            allowed_mentions(&raw(o), &d).unwrap(),
            json!({"users": ["123"], "replied_user": false})
        );
        for bad in [
            json!({"allowed_mentions": ["here"]}),
            json!({"allowed_mentions": "users"}),
            json!({"allowed_mentions": {"users": ["x"]}}),
            json!({"allowed_mentions": {"parse": ["users"], "users": ["1"]}}),
        ] {
            let e = allowed_mentions(&raw(bad.clone()), &d).unwrap_err();
            assert!(
                e.message.contains("allowed_mentions"),
                "{bad}: {}",
                e.message
            );
        }
    }

    #[test]
    fn embeds_are_checked_against_discords_limits() {
        assert_eq!(embeds(&raw(json!({}))).unwrap(), None);
        let ok = json!({"embeds": [{"title": "t", "description": "d", "color": 0xff0000,
            "fields": [{"name": "a", "value": "b"}], "footer": {"text": "f"}}]});
        assert!(embeds(&raw(ok)).unwrap().is_some());
        let cases = [
            (json!({"embeds": {}}), "`embeds`"),
            (
                json!({"embeds": (0..11).map(|_| json!({})).collect::<Vec<_>>()}),
                "11 embeds",
            ),
            (
                json!({"embeds": [{"title": "x".repeat(257)}]}),
                "embeds[0].title",
            ),
            (
                json!({"embeds": [{}, {"description": 5}]}),
                "embeds[1].description",
            ),
            (
                json!({"embeds": [{"fields": [{"name": "a"}]}]}),
                "fields[0].value",
            ),
            (json!({"embeds": [{"color": -1}]}), "color"),
            (
                json!({"embeds": [{"description": "x".repeat(4000)}, {"description": "x".repeat(2001)}]}),
                "6000",
            ),
        ];
        for (v, needle) in cases {
            let e = embeds(&raw(v)).unwrap_err();
            assert!(e.message.contains(needle), "{needle}: {}", e.message);
        }
    }

    #[test]
    fn files_ids_and_dms() {
        let f = files(&raw(
            json!({"files": [{"file_data": "aGk=", "filename": "a.txt"}, {"file_data": "eA=="}]}),
        ))
        .unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].data, b"hi");
        assert_eq!(f[1].filename, "file");
        assert_eq!(f[1].mimetype, "application/octet-stream");
        let e = files(&raw(json!({"files": [{"file_data": "!!"}]}))).unwrap_err();
        assert!(e.message.contains("files[0].file_data"), "{}", e.message);
        let many: Vec<Value> = (0..11).map(|_| json!({"file_data": "eA=="})).collect();
        assert!(
            files(&raw(json!({"files": many})))
                .unwrap_err()
                .message
                .contains("11 files")
        );
        assert_eq!(
            id_field(&raw(json!({"thread_id": "42"})), "thread_id")
                .unwrap()
                .as_deref(),
            Some("42")
        );
        assert!(
            id_field(&raw(json!({"thread_id": "x"})), "thread_id")
                .unwrap_err()
                .message
                .contains("thread_id")
        );
        assert_eq!(dm_user("dm:77").unwrap(), Some("77"));
        assert_eq!(dm_user("123").unwrap(), None);
        assert!(dm_user("dm:bob").is_err());
    }
}
