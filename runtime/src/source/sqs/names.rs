//! Queue names, FIFO message group ids and deduplication ids.
//!
//! SQS allows `[A-Za-z0-9_-]` in queue names, up to 80 characters, with a
//! `.fifo` suffix for FIFO queues; Weir's default dead-letter topic is
//! `<topic>.dlq` (`x.dlq.fifo` for `x.fifo`). A topic is therefore mapped
//! to its queue by turning every `.` before a trailing `.fifo` into `-`:
//! `orders` → `orders`, `orders.dlq` → `orders-dlq`, `orders.fifo` →
//! `orders.fifo`, `orders.dlq.fifo` → `orders-dlq.fifo`. Two topics that
//! differ only in `.` and `-` name the same queue.

use sha2::{Digest, Sha256};

/// The suffix of a FIFO queue's name.
pub const FIFO_SUFFIX: &str = ".fifo";

/// Longest queue name SQS allows.
const MAX_QUEUE_NAME: usize = 80;

/// Longest message group id or deduplication id SQS allows.
const MAX_FIFO_ID: usize = 128;

/// The queue a topic names (see the module documentation).
pub fn queue_name(topic: &str) -> String {
    match topic.strip_suffix(FIFO_SUFFIX) {
        Some(base) => format!("{}{FIFO_SUFFIX}", base.replace('.', "-")),
        None => topic.replace('.', "-"),
    }
}

/// Whether the queue `name` (already mapped) is a FIFO queue.
pub fn is_fifo(name: &str) -> bool {
    name.ends_with(FIFO_SUFFIX)
}

/// Whether `topic` can name a queue once mapped (see the module
/// documentation).
///
/// # Errors
///
/// Saying why not.
pub fn check_queue_name(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("an empty name".into());
    }
    let name = queue_name(topic);
    let base = name.strip_suffix(FIFO_SUFFIX).unwrap_or(&name);
    if base.is_empty() {
        return Err(format!("{topic:?} has nothing before {FIFO_SUFFIX:?}"));
    }
    if let Some(bad) = base
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "{topic:?} is not a valid SQS queue name: {bad:?} is not allowed (letters, digits, '-', '_', and '.' which becomes '-'; a FIFO queue ends in \".fifo\")"
        ));
    }
    if name.len() > MAX_QUEUE_NAME {
        return Err(format!(
            "{topic:?} names queue {name:?}, longer than the {MAX_QUEUE_NAME} characters SQS allows"
        ));
    }
    Ok(())
}

/// `text` as a message group id or deduplication id if SQS takes it as it
/// is (1 to 128 characters of ASCII letters, digits and punctuation);
/// otherwise `h-` and its SHA-256 in hex.
pub fn fifo_id(text: &[u8]) -> String {
    match std::str::from_utf8(text) {
        Ok(id)
            if !id.is_empty()
                && id.len() <= MAX_FIFO_ID
                && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            id.to_string()
        }
        _ => format!("h-{}", hex_sha256(&[text])),
    }
}

/// The SHA-256 of `parts` (each length-prefixed), in hex.
pub fn hex_sha256(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_become_dashes_before_the_fifo_suffix() {
        assert_eq!(queue_name("orders"), "orders");
        assert_eq!(queue_name("orders.dlq"), "orders-dlq");
        assert_eq!(queue_name("orders.fifo"), "orders.fifo");
        assert_eq!(queue_name("orders.dlq.fifo"), "orders-dlq.fifo");
        assert!(is_fifo(&queue_name("orders.dlq.fifo")));
        assert!(!is_fifo(&queue_name("orders.dlq")));
    }

    #[test]
    fn names_are_checked_after_mapping() {
        assert!(check_queue_name("orders.dlq").is_ok());
        assert!(check_queue_name("a_b-c.fifo").is_ok());
        assert!(check_queue_name("").is_err());
        assert!(check_queue_name(".fifo").is_err());
        assert!(check_queue_name("orders/eu").is_err());
        assert!(check_queue_name("orders.*").is_err());
        assert!(check_queue_name(&"x".repeat(80)).is_ok());
        let long =
            check_queue_name(&format!("{}.dlq", "x".repeat(77))).expect_err("must be refused");
        assert!(long.contains("80"), "{long}");
    }

    #[test]
    fn fifo_ids_are_kept_or_hashed() {
        assert_eq!(fifo_id(b"order-17"), "order-17");
        assert_eq!(fifo_id(b"a:b/c#1"), "a:b/c#1");
        let hashed = fifo_id(b"with space");
        assert!(hashed.starts_with("h-") && hashed.len() == 66, "{hashed}");
        assert_eq!(hashed, fifo_id(b"with space"));
        assert!(fifo_id(&[0xff]).starts_with("h-"));
        assert!(fifo_id(b"").starts_with("h-"));
        assert!(fifo_id("x".repeat(129).as_bytes()).starts_with("h-"));
        assert_eq!(fifo_id("x".repeat(128).as_bytes()), "x".repeat(128));
    }
}
