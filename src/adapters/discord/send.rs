//! Sending: create-message (split into parts, with nonces, files, embeds,
//! mentions, the reply reference), the destination (a thread, a DM opened
//! once), edits and deletes.

use super::*;

impl DiscordAdapter {
    /// `POST /channels/{c}/messages`: the new (or, for a repeated nonce, the
    /// original) message's id. Files go as `multipart/form-data`:
    /// `payload_json` and `files[n]`, each named in `attachments` by its id.
    pub(super) async fn create_message(
        &self,
        channel: &str,
        payload: Value,
        files: &[FileSpec],
    ) -> Result<String, AdapterError> {
        let route = Route::new(
            Method::POST,
            format!("/channels/{}/messages", seg(channel)),
            "/channels/:c/messages",
            channel,
        );
        let body = with_files(payload, files)?;
        let v = self.call_api(&route, &[], body).await?;
        v.get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| AdapterError::transient("discord create-message answered without id"))
    }

    /// Send `text` as one or more ordered messages (see the module docs); the
    /// first part's message id.
    pub(super) async fn send_parts(
        &self,
        channel: &str,
        ctx: &SendCtx<'_>,
        text: &str,
        extras: Extras,
        toggle: Option<&ToggleButton>,
    ) -> Result<String, AdapterError> {
        let mut components = if extras.buttons.is_empty() {
            None
        } else {
            Some(components(&extras.buttons)?)
        };
        if let Some(t) = toggle {
            components = with_toggle(components, t);
        }
        let parts = self.parts_of(text)?;
        if parts.len() == 1
            && parts[0].trim().is_empty()
            && components.is_none()
            && extras.files.is_empty()
            && extras.embeds.is_none()
        {
            return Err(AdapterError::permanent(
                "discord cannot send an empty message (no text, embeds, buttons or file)",
            ));
        }
        let last = parts.len() - 1;
        let mut first_id = None;
        for (i, part) in parts.iter().enumerate() {
            let nonce = nonce(ctx.key, i);
            if ctx.resend
                && let Some(id) = self.reconcile(&nonce, ctx.age).await
            {
                first_id.get_or_insert(id);
                continue;
            }
            let mut payload = json!({
                "nonce": nonce,
                "enforce_nonce": true,
                "allowed_mentions": extras.mentions,
            });
            if !part.is_empty() {
                payload["content"] = Value::from(part.as_str());
            }
            if i == 0
                && let Some(parent) = &extras.reply_to
            {
                payload["message_reference"] =
                    json!({"message_id": parent, "fail_if_not_exists": false});
            }
            if i == last {
                if let Some(c) = &components {
                    payload["components"] = c.clone();
                }
                if let Some(e) = &extras.embeds {
                    payload["embeds"] = e.clone();
                }
            }
            let files: &[FileSpec] = if i == last { &extras.files } else { &[] };
            let id = self.create_message(channel, payload, files).await?;
            first_id.get_or_insert(id);
        }
        Ok(first_id.unwrap_or_default())
    }

    /// `text` in parts of at most 2,000 characters, or refused
    /// (`long_text = "dead_letter"`).
    pub(super) fn parts_of(&self, text: &str) -> Result<Vec<String>, AdapterError> {
        let chars = text.chars().count();
        if chars <= MAX_CONTENT {
            return Ok(vec![text.to_owned()]);
        }
        match self.long_text {
            LongText::Split => Ok(split_text(text, MAX_CONTENT)),
            LongText::DeadLetter => Err(AdapterError::permanent(format!(
                "text is {chars} characters, over Discord's {MAX_CONTENT} (long_text = \"dead_letter\")"
            ))),
        }
    }

    /// The extras an envelope asks for (embeds, mentions, files, reply).
    pub(super) fn extras_of(
        &self,
        raw: &Map<String, Value>,
        reply_to: Option<&str>,
        buttons: &[Button],
    ) -> Result<Extras, AdapterError> {
        Ok(Extras {
            reply_to: reply_to.map(str::to_owned),
            buttons: buttons.to_vec(),
            embeds: render::embeds(raw)?,
            mentions: render::allowed_mentions(raw, &self.allowed_mentions)?,
            files: render::files(raw)?,
        })
    }

    /// Where a channel's message goes: the envelope's `thread_id` (a thread
    /// is a channel of its own), the DM channel of `dm:<user id>` (opened
    /// once with `POST /users/@me/channels`, remembered in Redis for every
    /// gateway), else the channel itself.
    pub(super) async fn destination(
        &self,
        channel: &str,
        raw: &Map<String, Value>,
    ) -> Result<String, AdapterError> {
        if let Some(t) = render::id_field(raw, "thread_id")? {
            return Ok(t);
        }
        let Some(user) = render::dm_user(channel)? else {
            return Ok(channel.to_owned());
        };
        let key = crate::bus::discord::dm_key(&self.state_base);
        let mut conn = self.conn.clone();
        let known: Option<String> = conn.hget(&key, user).await.map_err(|e| {
            AdapterError::transient(format!("reading the DM channel (redis) failed: {e}"))
        })?;
        if let Some(c) = known {
            return Ok(c);
        }
        let route = Route::new(
            Method::POST,
            "/users/@me/channels".into(),
            "/users/@me/channels",
            "@me",
        );
        let v = self
            .call_api(&route, &[], Body::Json(json!({"recipient_id": user})))
            .await?;
        let id = v
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| AdapterError::transient("discord opened a DM without a channel id"))?
            .to_owned();
        let r: redis::RedisResult<()> = conn.hset(&key, user, &id).await;
        if let Err(e) = r {
            debug!(error = %e, "recording a DM channel failed");
        }
        Ok(id)
    }

    /// `PATCH /channels/{c}/messages/{m}`: new text (first part only: an
    /// edit is one message), buttons and embeds.
    pub(super) async fn edit_message(
        &self,
        channel: &str,
        target: &str,
        text: &str,
        raw: &Map<String, Value>,
        buttons: &[Button],
    ) -> Result<(), AdapterError> {
        let chars = text.chars().count();
        if chars > MAX_CONTENT {
            return Err(AdapterError::permanent(format!(
                "an edit's text is {chars} characters, over Discord's {MAX_CONTENT}"
            )));
        }
        let mut payload = json!({
            "content": text,
            "allowed_mentions": render::allowed_mentions(raw, &self.allowed_mentions)?,
        });
        if !buttons.is_empty() {
            payload["components"] = components(buttons)?;
        }
        if let Some(e) = render::embeds(raw)? {
            payload["embeds"] = e;
        }
        let route = Route::new(
            Method::PATCH,
            format!("/channels/{}/messages/{}", seg(channel), seg(target)),
            "/channels/:c/messages/:m",
            channel,
        );
        self.call_api(&route, &[], Body::Json(payload)).await?;
        Ok(())
    }

    /// `DELETE /channels/{c}/messages/{m}`; a message already gone (10008)
    /// counts as deleted, so a retried delete is not dead-lettered.
    pub(super) async fn delete_message(
        &self,
        channel: &str,
        target: &str,
    ) -> Result<(), AdapterError> {
        let route = Route::new(
            Method::DELETE,
            format!("/channels/{}/messages/{}", seg(channel), seg(target)),
            "/channels/:c/messages/:m",
            channel,
        );
        match self.call_api(&route, &[], Body::None).await {
            Ok(_) => Ok(()),
            Err(e) if e.retry == Retry::Never && e.message.contains("code 10008") => {
                debug!(
                    channel,
                    message_id = target,
                    "the message was already deleted"
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}
