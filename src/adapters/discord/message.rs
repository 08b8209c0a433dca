//! Message pieces: components (buttons, the toggle), long text split into
//! parts, nonces, path segments, files as multipart, history entries. Pure
//! functions, unit-tested.

use super::*;

/// The request body of a create-message: JSON, or with files
/// `multipart/form-data` (`payload_json`, `files[n]`, and `attachments`
/// naming each file by its index).
pub(super) fn with_files(mut payload: Value, files: &[FileSpec]) -> Result<Body, AdapterError> {
    if files.is_empty() {
        return Ok(Body::Json(payload));
    }
    payload["attachments"] = files
        .iter()
        .enumerate()
        .map(|(i, f)| json!({"id": i, "filename": f.filename}))
        .collect();
    let json_part = reqwest::multipart::Part::text(payload.to_string())
        .mime_str("application/json")
        .map_err(|e| AdapterError::permanent(format!("bad payload part: {e}")))?;
    let mut form = reqwest::multipart::Form::new().part("payload_json", json_part);
    for (i, f) in files.iter().enumerate() {
        let part = reqwest::multipart::Part::bytes(f.data.clone())
            .file_name(f.filename.clone())
            .mime_str(&f.mimetype)
            .or_else(|_| {
                reqwest::multipart::Part::bytes(f.data.clone())
                    .file_name(f.filename.clone())
                    .mime_str("application/octet-stream")
            })
            .map_err(|e| AdapterError::permanent(format!("bad file part: {e}")))?;
        form = form.part(format!("files[{i}]"), part);
    }
    Ok(Body::Form(form))
}

/// `rows` (the message's own button rows, if any) with the toggle button
/// added: at the end of the last row when it has room, else in a row of its
/// own; left off when all five rows are full.
pub(super) fn with_toggle(rows: Option<Value>, t: &ToggleButton) -> Option<Value> {
    let button = json!({"type": 2, "style": 2, "label": t.label, "custom_id": t.custom_id});
    let mut rows = match rows {
        Some(Value::Array(r)) => r,
        _ => Vec::new(),
    };
    let full_rows = rows.len() >= 5;
    match rows
        .last_mut()
        .and_then(|r| r.get_mut("components"))
        .and_then(Value::as_array_mut)
    {
        Some(last) if last.len() < 5 => last.push(button),
        _ if !full_rows => rows.push(json!({"type": 1, "components": [button]})),
        _ => debug!("no room for the toggle button beside the message's own five rows"),
    }
    (!rows.is_empty()).then_some(Value::Array(rows))
}

/// A bot token as configured, without surrounding blanks or a `Bot ` prefix.
pub fn bare_token(raw: &str) -> &str {
    let t = raw.trim();
    t.strip_prefix("Bot ").unwrap_or(t)
}

/// The nonce of part `part` of a send: 20 hex digits of SHA-256 of the
/// idempotency key, `-<part>` appended after the first; at most 25 characters.
pub fn nonce(idempotency_key: &str, part: usize) -> String {
    let digest = hex::encode(Sha256::digest(idempotency_key.as_bytes()));
    let mut n = digest[..20].to_owned();
    if part > 0 {
        n.push_str(&format!("-{part}"));
    }
    n.truncate(MAX_NONCE);
    n
}

/// `s` percent-encoded as one URL path segment.
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The path segment of a reaction's emoji: a custom emoji (`<:name:id>`,
/// `<a:name:id>` or `name:id`) as `name:id`, a unicode one percent-encoded.
pub fn emoji_segment(emoji: &str) -> Result<String, AdapterError> {
    let e = emoji.trim();
    if e.is_empty() {
        return Err(AdapterError::permanent("a reaction needs an emoji"));
    }
    let inner = e
        .strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .map(|s| s.strip_prefix("a:").unwrap_or(s).trim_start_matches(':'))
        .unwrap_or(e);
    if let Some((name, id)) = inner.rsplit_once(':')
        && !name.is_empty()
        && !id.is_empty()
        && id.bytes().all(|b| b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Ok(format!("{name}:{id}"));
    }
    Ok(seg(e))
}

/// A button style by name or number (`primary` by default).
fn button_style(style: Option<&str>) -> u8 {
    match style.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        Some("secondary" | "2" | "grey" | "gray") => 2,
        Some("success" | "3" | "green") => 3,
        Some("danger" | "4" | "red") => 4,
        _ => 1,
    }
}

/// Message components for `buttons`: action rows of up to five buttons.
pub fn components(buttons: &[Button]) -> Result<Value, AdapterError> {
    if buttons.len() > 25 {
        return Err(AdapterError::permanent(format!(
            "discord allows at most 25 buttons per message, not {}",
            buttons.len()
        )));
    }
    let mut rows = Vec::new();
    for chunk in buttons.chunks(5) {
        let mut row = Vec::new();
        for b in chunk {
            let label: String = b.label.chars().take(80).collect();
            let button = match (&b.url, &b.custom_id) {
                (Some(url), _) => json!({"type": 2, "style": 5, "label": label, "url": url}),
                (None, Some(id)) => {
                    if id.chars().count() > 100 {
                        return Err(AdapterError::permanent(format!(
                            "button custom_id `{id}` is over Discord's 100 characters"
                        )));
                    }
                    json!({"type": 2, "style": button_style(b.style.as_deref()), "label": label, "custom_id": id})
                }
                (None, None) => {
                    return Err(AdapterError::permanent(format!(
                        "button `{}` has neither custom_id nor url",
                        b.label
                    )));
                }
            };
            row.push(button);
        }
        rows.push(json!({"type": 1, "components": row}));
    }
    Ok(Value::Array(rows))
}

/// `text` in ordered parts of at most `limit` characters, cut at the last
/// paragraph break, else line break, else space inside each window (hard cut
/// when there is none); the separator at a cut is dropped.
pub fn split_text(text: &str, limit: usize) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = text;
    while rest.chars().count() > limit {
        // Byte index just past `limit` characters.
        let end = rest
            .char_indices()
            .nth(limit)
            .map(|(i, _)| i)
            .unwrap_or(rest.len());
        let window = &rest[..end];
        let cut = [("\n\n", 2), ("\n", 1), (" ", 1)]
            .iter()
            .find_map(|(sep, len)| window.rfind(sep).filter(|&i| i > 0).map(|i| (i, i + len)));
        let (part_end, next) = match cut {
            Some((i, j)) if !window[..i].trim().is_empty() => (i, j),
            _ => (end, end),
        };
        parts.push(rest[..part_end].to_owned());
        // A break right at the cut would otherwise open the next part.
        rest = rest[next..].trim_start_matches('\n');
    }
    if !rest.is_empty() || parts.is_empty() {
        parts.push(rest.to_owned());
    }
    parts
}

/// A Discord message object as a history entry.
pub(super) fn history_message(m: &Value) -> Option<HistoryMessage> {
    let id = m.get("id")?.as_str()?;
    let author = m.get("author")?;
    let timestamp = id
        .parse::<u64>()
        .map(|s| ((s >> 22) + DISCORD_EPOCH_MS) as f64 / 1000.0)
        .unwrap_or(0.0);
    Some(HistoryMessage {
        user_id: author.get("id")?.as_str()?.to_owned(),
        user_name: author
            .get("global_name")
            .and_then(Value::as_str)
            .or_else(|| author.get("username").and_then(Value::as_str))
            .unwrap_or_default()
            .to_owned(),
        text: m
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        timestamp,
        message_id: id.to_owned(),
        is_bot: author.get("bot").and_then(Value::as_bool).unwrap_or(false),
        reply_to_id: m
            .pointer("/message_reference/message_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        reactions: m
            .get("reactions")
            .and_then(Value::as_array)
            .map(|rs| {
                rs.iter()
                    .map(|r| {
                        let emoji = match (
                            r.pointer("/emoji/name").and_then(Value::as_str),
                            r.pointer("/emoji/id").and_then(Value::as_str),
                        ) {
                            (Some(n), Some(id)) => format!("{n}:{id}"),
                            (Some(n), None) => n.to_owned(),
                            _ => String::new(),
                        };
                        json!({"emoji": emoji, "count": r.get("count").cloned().unwrap_or(Value::from(0))})
                    })
                    .collect()
            })
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_stable_short_and_per_part() {
        assert_eq!(nonce("k1", 0), nonce("k1", 0));
        assert_ne!(nonce("k1", 0), nonce("k2", 0));
        assert_ne!(nonce("k1", 0), nonce("k1", 1));
        assert_eq!(nonce("k1", 0).len(), 20);
        assert!(nonce("k1", 9999).len() <= MAX_NONCE);
        assert!(nonce("k1", 1).starts_with(&nonce("k1", 0)));
    }

    #[test]
    fn emoji_are_encoded() {
        assert_eq!(emoji_segment("👍").unwrap(), "%F0%9F%91%8D");
        assert_eq!(emoji_segment("blob:123").unwrap(), "blob:123");
        assert_eq!(emoji_segment("<:blob:123>").unwrap(), "blob:123");
        assert_eq!(emoji_segment("<a:dance:456>").unwrap(), "dance:456");
        assert_eq!(emoji_segment("a:b").unwrap(), "a%3Ab");
        assert!(emoji_segment(" ").is_err());
    }

    #[test]
    fn long_text_splits_on_boundaries() {
        let para = "a".repeat(1500);
        let text = format!("{para}\n\n{para}");
        let parts = split_text(&text, 2000);
        assert_eq!(parts, vec![para.clone(), para.clone()]);
        let text = format!("{para}\n{para}");
        assert_eq!(split_text(&text, 2000), vec![para.clone(), para.clone()]);
        let words = "word ".repeat(500);
        let parts = split_text(words.trim_end(), 2000);
        assert!(parts.iter().all(|p| p.chars().count() <= 2000));
        assert_eq!(parts.join(" "), words.trim_end());
        let solid = "é".repeat(4500);
        let parts = split_text(&solid, 2000);
        assert_eq!(
            parts.iter().map(|p| p.chars().count()).collect::<Vec<_>>(),
            vec![2000, 2000, 500]
        );
        assert_eq!(parts.concat(), solid);
        let edge = format!("{}\n\nb", "a".repeat(2000));
        assert_eq!(split_text(&edge, 2000), vec!["a".repeat(2000), "b".into()]);
        assert_eq!(split_text("short", 2000), vec!["short"]);
        assert_eq!(split_text("", 2000), vec![""]);
    }

    #[test]
    fn buttons_become_action_rows() {
        let b = |label: &str, id: Option<&str>, url: Option<&str>, style: Option<&str>| Button {
            label: label.into(),
            custom_id: id.map(Into::into),
            url: url.map(Into::into),
            style: style.map(Into::into),
        };
        let c = components(&[
            b("Yes", Some("yes"), None, Some("success")),
            b("Docs", None, Some("https://e.org"), None),
        ])
        .unwrap();
        assert_eq!(
            c,
            json!([{"type": 1, "components": [
                {"type": 2, "style": 3, "label": "Yes", "custom_id": "yes"},
                {"type": 2, "style": 5, "label": "Docs", "url": "https://e.org"},
            ]}])
        );
        let many: Vec<Button> = (0..7)
            .map(|i| b("x", Some(&i.to_string()), None, None))
            .collect();
        let c = components(&many).unwrap();
        assert_eq!(c.as_array().unwrap().len(), 2);
        assert_eq!(c[1]["components"].as_array().unwrap().len(), 2);
        assert!(components(&[b("x", None, None, None)]).is_err());
        let too_many: Vec<Button> = (0..26)
            .map(|i| b("x", Some(&i.to_string()), None, None))
            .collect();
        assert!(components(&too_many).is_err());
    }

    #[test]
    fn history_messages_are_read() {
        let m = json!({
            "id": "175928847299117063",
            "content": "hi",
            "author": {"id": "80351110224678912", "username": "nelly", "bot": false},
            "message_reference": {"message_id": "175928847299117000"},
            "reactions": [{"count": 2, "emoji": {"id": null, "name": "🔥"}}],
        });
        let h = history_message(&m).unwrap();
        assert_eq!(h.user_name, "nelly");
        assert_eq!(h.reply_to_id.as_deref(), Some("175928847299117000"));
        assert_eq!(h.reactions, vec![json!({"emoji": "🔥", "count": 2})]);
        // 175928847299117063 >> 22 = 41944705796 ms after Discord's epoch.
        assert!(
            (h.timestamp - 1_462_015_105.796).abs() < 0.001,
            "{}",
            h.timestamp
        );
    }
}
