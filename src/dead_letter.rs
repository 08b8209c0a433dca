//! Every reason an entry can end in the dead-letter stream, in one enum used
//! by the lanes, the bus, the `dlq` tools and the metric labels.

use crate::envelope::BadInputKind;

/// Why an entry was dead-lettered (`error_kind` of the dead-letter entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterKind {
    /// Bad input (G6), with the problem it names.
    BadInput(BadInputKind),
    /// The platform refused the action for good (a permanent error).
    Rejected,
    /// `max_attempts` used *and* older than `max_age_ms` (G5).
    RetriesExhausted,
    /// Its gateway died mid-send and `unknown_outcome = "dead_letter"`.
    UnknownOutcome,
    /// An `edit` or `delete` whose `target_key` names no message sent.
    UnknownTarget,
    /// Pending, but deleted from the stream before it was delivered (G7).
    LostInStream,
    /// An RPC whose reply list cannot be written (G9).
    ReplyFailed,
}

impl DeadLetterKind {
    /// Every `error_kind` a dead letter can carry.
    pub const NAMES: &'static [&'static str] = &[
        "missing_payload",
        "not_json",
        "not_object",
        "missing_field",
        "bad_field",
        "unknown_type",
        "bad_base64",
        "too_large",
        "bad_signature",
        "forbidden_key",
        "rejected",
        "retries_exhausted",
        "unknown_outcome",
        "unknown_target",
        "lost_in_stream",
        "reply_failed",
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterKind::BadInput(k) => k.as_str(),
            DeadLetterKind::Rejected => "rejected",
            DeadLetterKind::RetriesExhausted => "retries_exhausted",
            DeadLetterKind::UnknownOutcome => "unknown_outcome",
            DeadLetterKind::UnknownTarget => "unknown_target",
            DeadLetterKind::LostInStream => "lost_in_stream",
            DeadLetterKind::ReplyFailed => "reply_failed",
        }
    }
}

impl std::fmt::Display for DeadLetterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_named() {
        use BadInputKind::*;
        let all = [
            DeadLetterKind::BadInput(MissingPayload),
            DeadLetterKind::BadInput(NotJson),
            DeadLetterKind::BadInput(NotObject),
            DeadLetterKind::BadInput(MissingField),
            DeadLetterKind::BadInput(BadField),
            DeadLetterKind::BadInput(UnknownType),
            DeadLetterKind::BadInput(BadBase64),
            DeadLetterKind::BadInput(TooLarge),
            DeadLetterKind::BadInput(BadSignature),
            DeadLetterKind::BadInput(ForbiddenKey),
            DeadLetterKind::Rejected,
            DeadLetterKind::RetriesExhausted,
            DeadLetterKind::UnknownOutcome,
            DeadLetterKind::UnknownTarget,
            DeadLetterKind::LostInStream,
            DeadLetterKind::ReplyFailed,
        ];
        let names: Vec<_> = all.iter().map(|k| k.as_str()).collect();
        assert_eq!(names, DeadLetterKind::NAMES);
    }
}
