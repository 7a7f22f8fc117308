//! A handler for tests, built with `weir-sdk` and so for the newest
//! contract (`weir:handler@0.2.0`): the counterpart of `tests/handlers/probe`,
//! which is built for 0.1.0. Run side by side they show what each contract
//! version hands a handler for the same message.
//!
//! Every call logs exactly one `info` record, message `sdk-probe`, with
//! fields `id`, `topic`, `broker` (`kafka`, `jetstream`, …), the position in
//! the broker's terms (Kafka: `partition`, `offset`; JetStream: `stream`,
//! `sequence`, `delivered`; RabbitMQ: `exchange`, `routing_key`,
//! `delivery_tag`, `redelivered`; Redis: `stream`, `entry_id`; SQS:
//! `queue`, `message_id`, `receive_count`; others: `position`, its display
//! form),
//! `attempt`, `key` (UTF-8, lossy; `none` without a key), `payload_len`,
//! `payload` (its first 64 bytes, UTF-8, lossy),
//! `outcome` (`ok`, `retryable`, `retry-after` or `permanent`) and
//! `category` (`none` without one).
//!
//! The UTF-8 value of the `probe.fail` header asks for a failure:
//!
//! | `probe.fail`                  | result                                         |
//! |-------------------------------|------------------------------------------------|
//! | absent                        | `ok`                                           |
//! | `retryable[:CATEGORY]`        | retryable error                                |
//! | `retry-after:MS[:CATEGORY]`   | retry after MS milliseconds                    |
//! | `permanent[:CATEGORY]`        | permanent error                                |
//!
//! | `permanent-long`              | permanent error whose reason is 100 KiB of numbered lines |
//!
//! `CATEGORY` is a category's kebab-case name (`service-unavailable`, …);
//! any other name is sent as `other(name)`. Anything else in the header is
//! a permanent error saying so.
//!
//! A `probe.emit` header (UTF-8: a topic) makes a successful call emit one
//! event there, payload `emitted:<this event's payload>`, with a key and
//! headers few brokers carry as they are: key `key with\nnewline`, headers
//! `with space` = `x`, `multi` = `line1\r\nline2`, `binary` = `ff 00`,
//! `colon:name` = `y`. With `probe.emit-bytes` = N the payload is
//! `emitted:` padded with `e` to N bytes.
//!
//! With `[config] dependency = "down"` every call without a `probe.fail`
//! header fails with a retryable `service-unavailable` error: a handler
//! whose dependency is down (for circuit-breaker and dead-letter tests; a
//! manifest reload brings it back).

use std::time::Duration;

use weir_sdk::{Category, Event, Handler, HandlerError, Position, export_handler, log};

/// Header whose value selects the failure.
const FAIL_HEADER: &str = "probe.fail";

/// The category named `name`: one of the contract's, else `other(name)`.
fn category(name: &str) -> Category {
    match name {
        "timeout" => Category::Timeout,
        "service-unavailable" => Category::ServiceUnavailable,
        "rate-limited" => Category::RateLimited,
        "validation" => Category::Validation,
        "schema-mismatch" => Category::SchemaMismatch,
        "not-found" => Category::NotFound,
        "conflict" => Category::Conflict,
        "unauthorized" => Category::Unauthorized,
        "configuration" => Category::Configuration,
        "internal" => Category::Internal,
        other => Category::other(other),
    }
}

/// The result the `probe.fail` header asks for.
fn plan(request: Option<&str>) -> Result<(), HandlerError> {
    let Some(request) = request else {
        return Ok(());
    };
    let mut parts = request.split(':');
    let kind = parts.next().unwrap_or_default();
    let err = match kind {
        "permanent-long" => {
            let mut reason = String::new();
            let mut line = 0;
            while reason.len() < 100 << 10 {
                line += 1;
                reason.push_str(&format!("sdk-probe failure line {line}\n"));
            }
            return Err(HandlerError::permanent(reason));
        }
        "retryable" => HandlerError::retryable("sdk-probe asked to retry"),
        "permanent" => HandlerError::permanent("sdk-probe asked for a permanent failure"),
        "retry-after" => match parts.next().map(str::parse::<u64>) {
            Some(Ok(ms)) => {
                HandlerError::retry_after(Duration::from_millis(ms), "sdk-probe asked to wait")
            }
            _ => return Err(not_understood(request)),
        },
        _ => return Err(not_understood(request)),
    };
    match (parts.next(), parts.next()) {
        (None, _) => Err(err),
        (Some(name), None) if !name.is_empty() => Err(err.category(category(name))),
        _ => Err(not_understood(request)),
    }
}

fn not_understood(request: &str) -> HandlerError {
    HandlerError::permanent(format!(
        "sdk-probe: cannot understand {FAIL_HEADER} = {request:?}; expected \
         retryable[:CATEGORY], retry-after:MS[:CATEGORY] or permanent[:CATEGORY]"
    ))
    .category(Category::Validation)
}

/// The fields of the one record a call logs.
fn record(event: &Event, result: &Result<(), HandlerError>) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("id", event.id().to_string()),
        ("topic", event.topic().to_string()),
        ("broker", event.broker().to_string()),
    ];
    match event.position() {
        Position::Kafka { partition, offset } => {
            fields.push(("partition", partition.to_string()));
            fields.push(("offset", offset.to_string()));
        }
        Position::JetStream {
            stream,
            sequence,
            delivered,
        } => {
            fields.push(("stream", stream.clone()));
            fields.push(("sequence", sequence.to_string()));
            fields.push(("delivered", delivered.to_string()));
        }
        Position::RabbitMq {
            exchange,
            routing_key,
            delivery_tag,
            redelivered,
        } => {
            fields.push(("exchange", exchange.clone()));
            fields.push(("routing_key", routing_key.clone()));
            fields.push(("delivery_tag", delivery_tag.to_string()));
            fields.push(("redelivered", redelivered.to_string()));
        }
        Position::Redis { stream, entry_id } => {
            fields.push(("stream", stream.clone()));
            fields.push(("entry_id", entry_id.clone()));
        }
        Position::Sqs {
            queue,
            message_id,
            receive_count,
            ..
        } => {
            fields.push(("queue", queue.clone()));
            fields.push(("message_id", message_id.clone()));
            fields.push(("receive_count", receive_count.to_string()));
        }
        other => fields.push(("position", other.to_string())),
    }
    let (outcome, category) = match result {
        Ok(()) => ("ok", None),
        Err(err) => (
            match err.kind {
                weir_sdk::ErrorKind::Retryable => "retryable",
                weir_sdk::ErrorKind::RetryAfter(_) => "retry-after",
                weir_sdk::ErrorKind::Permanent => "permanent",
            },
            err.category.as_ref(),
        ),
    };
    fields.extend([
        ("attempt", event.attempt().to_string()),
        (
            "key",
            event.key().map_or_else(
                || "none".to_string(),
                |k| String::from_utf8_lossy(k).into_owned(),
            ),
        ),
        ("payload_len", event.payload().len().to_string()),
        (
            "payload",
            String::from_utf8_lossy(&event.payload()[..event.payload().len().min(64)]).into_owned(),
        ),
        ("outcome", outcome.to_string()),
        (
            "category",
            category.map_or_else(|| "none".to_string(), ToString::to_string),
        ),
    ]);
    fields
}

/// The probe.
pub struct SdkProbe;

impl Handler for SdkProbe {
    fn handle(event: Event) -> Result<(), HandlerError> {
        let down = weir_sdk::config::get("dependency").as_deref() == Some("down");
        let result = if down && event.header_str(FAIL_HEADER).is_none() {
            Err(HandlerError::retryable("sdk-probe: its dependency is down")
                .category(Category::ServiceUnavailable))
        } else {
            plan(event.header_str(FAIL_HEADER))
        };
        let result = match (result, event.header_str("probe.emit")) {
            (Ok(()), Some(topic)) => {
                let mut payload = b"emitted:".to_vec();
                match event
                    .header_str("probe.emit-bytes")
                    .map(str::parse::<usize>)
                {
                    Some(Ok(size)) => payload.resize(size, b'e'),
                    _ => payload.extend_from_slice(event.payload()),
                }
                weir_sdk::emit::to(topic)
                    .key("key with\nnewline")
                    .payload(payload)
                    .header("with space", "x")
                    .header("multi", "line1\r\nline2")
                    .header("binary", vec![0xff, 0])
                    .header("colon:name", "y")
                    .send()
                    .map_err(HandlerError::from)
            }
            (result, _) => result,
        };
        let fields = record(&event, &result);
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        log::info("sdk-probe", &fields);
        result
    }
}

export_handler!(SdkProbe);

#[cfg(test)]
mod tests {
    use weir_sdk::ErrorKind;

    use super::*;

    fn logged(event: Event) -> (Result<(), HandlerError>, log::Record) {
        let _ = log::take_records();
        let result = SdkProbe::handle(event);
        let mut records = log::take_records();
        assert_eq!(records.len(), 1, "{records:?}");
        (result, records.remove(0))
    }

    #[test]
    fn a_dependency_that_is_down_fails_every_call_retryably() {
        weir_sdk::config::set_for_test("dependency", "down");
        let (result, record) = logged(Event::new("orders", b"abc".to_vec()));
        weir_sdk::config::clear_for_test();
        let err = result.expect_err("down");
        assert_eq!(err.kind, ErrorKind::Retryable);
        assert_eq!(record.field("category"), Some("service-unavailable"));
    }

    #[test]
    fn logs_the_position_in_the_broker_s_terms() {
        let (result, kafka) = logged(
            Event::new("orders", b"abc".to_vec())
                .with_key("k")
                .with_position(Position::kafka(2, 40)),
        );
        assert_eq!(result, Ok(()));
        assert_eq!(kafka.field("broker"), Some("kafka"));
        assert_eq!(kafka.field("partition"), Some("2"));
        assert_eq!(kafka.field("offset"), Some("40"));
        assert_eq!(kafka.field("stream"), None);
        assert_eq!(kafka.field("key"), Some("k"));
        assert_eq!(kafka.field("payload_len"), Some("3"));
        assert_eq!(kafka.field("outcome"), Some("ok"));
        assert_eq!(kafka.field("category"), Some("none"));

        let (_, nats) = logged(
            Event::new("orders.placed", Vec::new()).with_position(Position::jetstream("ORDERS", 9)),
        );
        assert_eq!(nats.field("broker"), Some("jetstream"));
        assert_eq!(nats.field("stream"), Some("ORDERS"));
        assert_eq!(nats.field("sequence"), Some("9"));
        assert_eq!(nats.field("delivered"), Some("1"));
        assert_eq!(nats.field("partition"), None);
        assert_eq!(nats.field("id"), Some("ORDERS/9"));
        assert_eq!(nats.field("key"), Some("none"));
    }

    #[test]
    fn failures_carry_the_category_asked_for() {
        let ask = |spec: &str| plan(Some(spec)).expect_err(spec);
        let err = ask("retryable:service-unavailable");
        assert_eq!(err.kind, ErrorKind::Retryable);
        assert_eq!(err.category, Some(Category::ServiceUnavailable));
        let err = ask("permanent");
        assert_eq!((err.kind, err.category), (ErrorKind::Permanent, None));
        let err = ask("retry-after:250:rate-limited");
        assert_eq!(err.kind, ErrorKind::RetryAfter(Duration::from_millis(250)));
        assert_eq!(err.category, Some(Category::RateLimited));
        assert_eq!(
            ask("permanent:payment-declined").category,
            Some(Category::other("payment-declined"))
        );
        for bad in [
            "nope",
            "retry-after",
            "retry-after:x",
            "permanent:",
            "permanent:a:b",
        ] {
            let err = ask(bad);
            assert!(
                err.is_permanent() && err.reason.contains("cannot understand"),
                "{bad}"
            );
        }
        assert_eq!(plan(None), Ok(()));

        let (_, record) =
            logged(Event::new("t", Vec::new()).with_header(FAIL_HEADER, "permanent:validation"));
        assert_eq!(record.field("outcome"), Some("permanent"));
        assert_eq!(record.field("category"), Some("validation"));
    }
}
