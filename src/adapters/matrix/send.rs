//! What an outbound action becomes on the wire: the content of the
//! `m.room.message` events of a message (Markdown rendered to
//! `formatted_body`, buttons as a numbered list, `m.mentions`, reply and
//! thread relations), split into several events when the text does not fit
//! in one, and the content of an edit (`m.replace`).
//!
//! Platform-specific optional fields come from the envelope's own JSON
//! object ([`Extras::from_raw`]); a bad one is refused naming the field.

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};
use serde_json::{Map, Value, json};

use crate::envelope::Button;

/// Matrix's limit on one event as the server stores it (JSON, with the
/// fields the server adds).
pub const MAX_EVENT_BYTES: usize = 65_536;
/// What the content of one event may take: the server adds `sender`,
/// `room_id`, `event_id`, hashes, signatures and `unsigned` around it.
pub const MAX_CONTENT_BYTES: usize = 60_000;

/// The optional Matrix fields of an envelope (its JSON object).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Extras {
    /// `thread_id`: the root event of the thread the message belongs to
    /// (`rel_type: m.thread`).
    pub thread_id: Option<String>,
    /// `mentions`: the user ids the message mentions (`m.mentions.user_ids`).
    pub mentions: Vec<String>,
    /// `mention_room: true` lets the message notify the whole room (`@room`).
    pub mention_room: bool,
    /// `markdown: false` sends the text as it is, with no `formatted_body`.
    pub markdown: bool,
    /// `reason`: why a message is deleted (the redaction's `reason`).
    pub reason: Option<String>,
}

impl Extras {
    /// Read the optional fields from `raw`; an error names the bad field.
    pub fn from_raw(raw: &Map<String, Value>) -> Result<Extras, String> {
        let mut x = Extras {
            markdown: true,
            ..Extras::default()
        };
        match raw.get("thread_id") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.starts_with('$') => x.thread_id = Some(s.clone()),
            Some(other) => {
                return Err(format!(
                    "`thread_id` must be the event id of the thread's root (`$…`), not {other}"
                ));
            }
        }
        match raw.get("mentions") {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for item in items {
                    match item.as_str() {
                        Some(u) if super::valid_user_id(u) => x.mentions.push(u.to_owned()),
                        _ => {
                            return Err(format!(
                                "`mentions` must list user ids like @name:server; {item} is not one"
                            ));
                        }
                    }
                }
            }
            Some(other) => {
                return Err(format!(
                    "`mentions` must be an array of user ids (@name:server), not {other}"
                ));
            }
        }
        x.mention_room = flag(raw, "mention_room", false)?;
        x.markdown = flag(raw, "markdown", true)?;
        match raw.get("reason") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => x.reason = Some(s.clone()),
            Some(other) => return Err(format!("`reason` must be a string, not {other}")),
        }
        Ok(x)
    }

    /// The `m.mentions` object: only who the envelope names; `@room` only
    /// when asked for, whatever the text says.
    pub fn mentions_object(&self) -> Value {
        let mut m = Map::new();
        if !self.mentions.is_empty() {
            m.insert("user_ids".into(), json!(self.mentions));
        }
        if self.mention_room {
            m.insert("room".into(), Value::Bool(true));
        }
        Value::Object(m)
    }
}

fn flag(raw: &Map<String, Value>, key: &str, default: bool) -> Result<bool, String> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(format!("`{key}` must be true or false, not {other}")),
    }
}

/// `text` escaped for HTML, newlines as `<br>`.
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' => out.push_str("<br>"),
            c => out.push(c),
        }
    }
    out
}

/// `text` as HTML when it has Markdown markup (emphasis, code, links,
/// lists, headings, …); `None` for plain text, which needs no
/// `formatted_body`. Raw HTML in the text is escaped, not passed on, and a
/// single line break stays a line break, as chat users expect.
pub fn markdown_html(text: &str) -> Option<String> {
    let opts = Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TABLES;
    let events: Vec<Event<'_>> = Parser::new_ext(text, opts)
        .map(|ev| match ev {
            Event::Html(h) | Event::InlineHtml(h) => Event::Text(h),
            Event::SoftBreak => Event::HardBreak,
            e => e,
        })
        .collect();
    let markup = events.iter().any(|ev| {
        !matches!(
            ev,
            Event::Start(Tag::Paragraph)
                | Event::End(TagEnd::Paragraph)
                | Event::Text(_)
                | Event::SoftBreak
                | Event::HardBreak
        )
    });
    if !markup {
        return None;
    }
    let paragraphs = events
        .iter()
        .filter(|ev| matches!(ev, Event::Start(Tag::Paragraph)))
        .count();
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, events.into_iter());
    let mut html = html.trim_end().to_owned();
    // One paragraph: no <p> around it (as Element sends it).
    if paragraphs == 1
        && html.starts_with("<p>")
        && html.ends_with("</p>")
        && html.matches("<p>").count() == 1
    {
        html = html["<p>".len()..html.len() - "</p>".len()].to_owned();
    }
    Some(html.replace("<br />\n", "<br>"))
}

/// The content of one `m.text` message: `text`, rendered to
/// `formatted_body` when it has markup (or buttons), the buttons (if any)
/// as a numbered list.
pub fn text_content(text: &str, buttons: &[Button], markdown: bool) -> Map<String, Value> {
    let mut body = text.to_owned();
    let rendered = if markdown { markdown_html(text) } else { None };
    let mut html = rendered.clone();
    if !buttons.is_empty() {
        let mut h = html.unwrap_or_else(|| html_escape(text));
        h.push_str("<ol>");
        for (i, b) in buttons.iter().enumerate() {
            body.push_str(&format!("\n{}. {}", i + 1, b.label));
            match &b.url {
                Some(url) => {
                    body.push_str(&format!(" ({url})"));
                    h.push_str(&format!(
                        "<li><a href=\"{}\">{}</a></li>",
                        html_escape(url),
                        html_escape(&b.label)
                    ));
                }
                None => h.push_str(&format!("<li>{}</li>", html_escape(&b.label))),
            }
        }
        h.push_str("</ol>");
        html = Some(h);
    }
    let mut m = Map::new();
    m.insert("msgtype".into(), Value::from("m.text"));
    m.insert("body".into(), Value::from(body));
    if let Some(h) = html {
        m.insert("format".into(), Value::from("org.matrix.custom.html"));
        m.insert("formatted_body".into(), Value::from(h));
    }
    if !buttons.is_empty() {
        m.insert(
            "org.stargazer.buttons".into(),
            serde_json::to_value(buttons).unwrap_or(Value::Null),
        );
    }
    m
}

/// The size of `content` as JSON.
pub fn json_len(content: &Map<String, Value>) -> usize {
    serde_json::to_vec(content)
        .map(|v| v.len())
        .unwrap_or(usize::MAX)
}

/// The events (contents, in order) a message becomes: one when it fits,
/// else the text split at paragraph, line or word boundaries so each
/// event's content stays under [`MAX_CONTENT_BYTES`]. The reply relation and
/// the mentions go on the first, the buttons on the last, the thread
/// relation on all.
pub fn message_contents(
    text: &str,
    reply_to: Option<&str>,
    buttons: &[Button],
    x: &Extras,
) -> Vec<Map<String, Value>> {
    let build = |chunk: &str, first: bool, last: bool| {
        let mut c = text_content(chunk, if last { buttons } else { &[] }, x.markdown);
        c.insert(
            "m.mentions".into(),
            if first {
                x.mentions_object()
            } else {
                json!({})
            },
        );
        if let Some(rel) = relation(if first { reply_to } else { None }, x.thread_id.as_deref()) {
            c.insert("m.relates_to".into(), rel);
        }
        c
    };
    let whole = build(text, true, true);
    if json_len(&whole) <= MAX_CONTENT_BYTES {
        return vec![whole];
    }
    // Split with room for formatted_body (about as long as the text) and
    // JSON escaping; a piece that still does not fit is split again.
    let mut pending: Vec<String> = split_text(text, MAX_CONTENT_BYTES / 3)
        .into_iter()
        .map(str::to_owned)
        .collect();
    let mut pieces: Vec<String> = Vec::new();
    while !pending.is_empty() {
        let piece = pending.remove(0);
        let c = build(&piece, false, false);
        if json_len(&c) > MAX_CONTENT_BYTES - 2_000 && piece.len() > 1 {
            let halves = split_text(&piece, piece.len().div_ceil(2));
            for (i, h) in halves.into_iter().enumerate() {
                pending.insert(i, h.to_owned());
            }
        } else {
            pieces.push(piece);
        }
    }
    let n = pieces.len();
    pieces
        .iter()
        .enumerate()
        .map(|(i, p)| build(p, i == 0, i + 1 == n))
        .collect()
}

/// `m.relates_to` for a reply and/or a thread. In a thread, a message that
/// replies to nothing in particular carries the thread's fallback reply to
/// the root (`is_falling_back`), as the spec asks of threaded messages.
pub fn relation(reply_to: Option<&str>, thread: Option<&str>) -> Option<Value> {
    match (reply_to, thread) {
        (None, None) => None,
        (Some(parent), None) => Some(json!({"m.in_reply_to": {"event_id": parent}})),
        (reply, Some(root)) => Some(json!({
            "rel_type": "m.thread",
            "event_id": root,
            "is_falling_back": reply.is_none(),
            "m.in_reply_to": {"event_id": reply.unwrap_or(root)},
        })),
    }
}

/// `text` cut into pieces of at most `max` bytes, each ending at the last
/// paragraph break, line break or space inside the limit (a char boundary
/// when there is none); nothing is lost and the order is kept.
pub fn split_text(text: &str, max: usize) -> Vec<&str> {
    let max = max.max(4);
    let mut out = Vec::new();
    let mut rest = text;
    while rest.len() > max {
        let mut cut = max;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let window = &rest[..cut];
        let at = ["\n\n", "\n", " "]
            .iter()
            .find_map(|sep| {
                window
                    .rfind(sep)
                    .filter(|&i| i >= cut / 2)
                    .map(|i| i + sep.len())
            })
            .unwrap_or(cut);
        out.push(&rest[..at]);
        rest = &rest[at..];
    }
    if !rest.is_empty() || out.is_empty() {
        out.push(rest);
    }
    out
}

/// The content of an edit of `target`: the new text (rendered as a message
/// is) in `m.new_content`, and a `* `-prefixed fallback for clients that do
/// not show edits. The edit itself mentions nobody (`m.mentions: {}`), so
/// a streamed reply does not notify again on every edit; the new content
/// carries the full mentions.
pub fn edit_content(
    target: &str,
    text: &str,
    buttons: &[Button],
    x: &Extras,
) -> Map<String, Value> {
    let mut new = text_content(text, buttons, x.markdown);
    new.insert("m.mentions".into(), x.mentions_object());
    let mut c = Map::new();
    c.insert("msgtype".into(), Value::from("m.text"));
    let body = new.get("body").and_then(Value::as_str).unwrap_or(text);
    c.insert("body".into(), Value::from(format!("* {body}")));
    if let Some(h) = new.get("formatted_body").and_then(Value::as_str) {
        c.insert("format".into(), Value::from("org.matrix.custom.html"));
        c.insert("formatted_body".into(), Value::from(format!("* {h}")));
    }
    c.insert("m.new_content".into(), Value::Object(new));
    c.insert("m.mentions".into(), json!({}));
    c.insert(
        "m.relates_to".into(),
        json!({"rel_type": "m.replace", "event_id": target}),
    );
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn extras_are_read_and_bad_ones_named() {
        let x = Extras::from_raw(&raw(json!({
            "thread_id": "$root", "mentions": ["@a:x"], "mention_room": true, "reason": "spam"
        })))
        .unwrap();
        assert_eq!(x.thread_id.as_deref(), Some("$root"));
        assert_eq!(x.mentions, ["@a:x"]);
        assert!(x.mention_room && x.markdown);
        assert_eq!(x.reason.as_deref(), Some("spam"));
        for (bad, field) in [
            (json!({"thread_id": 5}), "`thread_id`"),
            (json!({"thread_id": "root"}), "`thread_id`"),
            (json!({"mentions": "@a:x"}), "`mentions`"),
            (json!({"mentions": ["bob"]}), "`mentions`"),
            (json!({"mention_room": "yes"}), "`mention_room`"),
            (json!({"markdown": 1}), "`markdown`"),
            (json!({"reason": []}), "`reason`"),
        ] {
            let e = Extras::from_raw(&raw(bad.clone())).unwrap_err();
            assert!(e.contains(field), "{bad}: {e}");
        }
    }

    #[test]
    fn mentions_never_name_the_room_unless_asked() {
        let x = Extras::from_raw(&raw(json!({}))).unwrap();
        assert_eq!(x.mentions_object(), json!({}));
        let c = &message_contents("@room look", None, &[], &x)[0];
        assert_eq!(c["m.mentions"], json!({}));
        let x =
            Extras::from_raw(&raw(json!({"mentions": ["@a:x"], "mention_room": true}))).unwrap();
        assert_eq!(
            x.mentions_object(),
            json!({"user_ids": ["@a:x"], "room": true})
        );
    }

    #[test]
    fn markdown_renders_only_when_there_is_markup() {
        assert_eq!(markdown_html("just words, 3 * 4 = 12"), None);
        assert_eq!(markdown_html("two\n\nparagraphs"), None);
        assert_eq!(
            markdown_html("**bold** and `code`").as_deref(),
            Some("<strong>bold</strong> and <code>code</code>")
        );
        let list = markdown_html("- a\n- b").unwrap();
        assert!(
            list.starts_with("<ul>") && list.contains("<li>b</li>"),
            "{list}"
        );
        // Raw HTML is shown, not interpreted.
        let h = markdown_html("*x* <script>alert(1)</script>").unwrap();
        assert!(h.contains("&lt;script&gt;"), "{h}");
        let plain = text_content("hello", &[], true);
        assert!(!plain.contains_key("formatted_body"));
        let off = text_content("**x**", &[], false);
        assert!(!off.contains_key("formatted_body"));
    }

    #[test]
    fn relations_for_replies_and_threads() {
        assert_eq!(relation(None, None), None);
        assert_eq!(
            relation(Some("$p"), None).unwrap(),
            json!({"m.in_reply_to": {"event_id": "$p"}})
        );
        assert_eq!(
            relation(None, Some("$r")).unwrap(),
            json!({"rel_type": "m.thread", "event_id": "$r", "is_falling_back": true,
                   "m.in_reply_to": {"event_id": "$r"}})
        );
        assert_eq!(
            relation(Some("$p"), Some("$r")).unwrap()["is_falling_back"],
            false
        );
    }

    #[test]
    fn long_text_is_split_in_order_under_the_limit() {
        let para = "word ".repeat(2_000); // 10,000 bytes
        let text = [para.as_str(); 20].join("\n\n"); // ~200 KB
        let x = Extras {
            markdown: true,
            mentions: vec!["@a:x".into()],
            ..Extras::default()
        };
        let parts = message_contents(&text, Some("$p"), &[], &x);
        assert!(parts.len() >= 4, "{}", parts.len());
        let joined: String = parts.iter().map(|c| c["body"].as_str().unwrap()).collect();
        assert_eq!(joined, text);
        assert!(parts.iter().all(|c| json_len(c) <= MAX_CONTENT_BYTES));
        assert!(parts[0].contains_key("m.relates_to"));
        assert!(!parts[1].contains_key("m.relates_to"));
        assert_eq!(parts[0]["m.mentions"], json!({"user_ids": ["@a:x"]}));
        assert_eq!(parts[1]["m.mentions"], json!({}));
        // Without spaces, multi-byte characters are never cut.
        let wide = "é".repeat(80_000);
        let parts = message_contents(&wide, None, &[], &x);
        assert!(parts.len() >= 3);
        assert_eq!(
            parts
                .iter()
                .map(|c| c["body"].as_str().unwrap())
                .collect::<String>(),
            wide
        );
    }

    #[test]
    fn split_prefers_breaks() {
        assert_eq!(split_text("aaaa bbbb", 6), ["aaaa ", "bbbb"]);
        assert_eq!(split_text("aa\n\nbb cc", 7), ["aa\n\n", "bb cc"]);
        assert_eq!(split_text("abcdefgh", 4), ["abcd", "efgh"]);
        assert_eq!(split_text("", 4), [""]);
    }

    #[test]
    fn edits_replace_with_new_content() {
        let x = Extras::from_raw(&raw(json!({"mentions": ["@a:x"]}))).unwrap();
        let c = edit_content("$t", "**new**", &[], &x);
        assert_eq!(
            c["m.relates_to"],
            json!({"rel_type": "m.replace", "event_id": "$t"})
        );
        assert_eq!(c["body"], "* **new**");
        assert_eq!(c["formatted_body"], "* <strong>new</strong>");
        assert_eq!(c["m.new_content"]["body"], "**new**");
        assert_eq!(c["m.new_content"]["formatted_body"], "<strong>new</strong>");
        assert_eq!(
            c["m.new_content"]["m.mentions"],
            json!({"user_ids": ["@a:x"]})
        );
        assert_eq!(c["m.mentions"], json!({}));
        let plain = edit_content("$t", "plain", &[], &x);
        assert!(!plain.contains_key("formatted_body"));
    }
}
