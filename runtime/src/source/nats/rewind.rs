//! Moving a durable consumer back (`weir rewind`): JetStream cannot move a
//! durable's ack floor backwards, so the durable is deleted and created
//! again, with the same settings and a start (`deliver_policy`) at the
//! point asked for. Refused while a client is pulling from it (a running
//! weir).

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};

use super::{ConsumerSpec, NatsConnection};
use crate::source::Rewind;

/// One subject's move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// The subject.
    pub topic: String,
    /// Its durable consumer.
    pub durable: String,
    /// The stream sequence acknowledged so far (`None`: no durable yet).
    pub acked: Option<u64>,
    /// Where it starts again, in words.
    pub to: String,
}

impl NatsConnection {
    /// Where `spec`'s durables would start again, from `from`; with
    /// `apply`, recreates them so.
    ///
    /// # Errors
    ///
    /// When the server cannot be asked or refuses, or a client is pulling
    /// from a durable (a weir serving it still runs).
    pub async fn rewind_durables(
        &self,
        spec: &ConsumerSpec,
        from: Rewind,
        apply: bool,
    ) -> anyhow::Result<Vec<Move>> {
        let policy = match from {
            Rewind::Earliest => DeliverPolicy::All,
            Rewind::Offset(sequence) => DeliverPolicy::ByStartSequence {
                start_sequence: u64::try_from(sequence).unwrap_or(0).max(1),
            },
            Rewind::Time(at) => {
                let text = humantime::format_rfc3339_nanos(at).to_string();
                DeliverPolicy::ByStartTime {
                    start_time: async_nats::datetime::parse_rfc3339(&text)
                        .map_err(|err| anyhow::anyhow!("time {text}: {err}"))?,
                }
            }
        };
        let to = match from {
            Rewind::Earliest => "the stream's first message".to_string(),
            Rewind::Offset(sequence) => format!("stream sequence {}", sequence.max(1)),
            Rewind::Time(at) => format!(
                "the first message at or after {}",
                humantime::format_rfc3339_millis(at)
            ),
        };
        let mut moves = Vec::new();
        let mut streams = Vec::new();
        for topic in &spec.topics {
            let stream_name = self
                .js()
                .stream_by_subject(topic.as_str())
                .await
                .map_err(|err| anyhow::anyhow!("no stream captures {topic:?}: {err}"))?;
            let stream = self
                .js()
                .get_stream(&stream_name)
                .await
                .map_err(|err| anyhow::anyhow!("cannot open stream {stream_name:?}: {err}"))?;
            let durable = spec.durable_for(topic);
            let acked = match stream.get_consumer::<pull::Config>(&durable).await {
                Ok(mut consumer) => {
                    let info = consumer.info().await.map_err(|err| {
                        anyhow::anyhow!("cannot read consumer {durable:?}: {err}")
                    })?;
                    if info.num_waiting > 0 {
                        anyhow::bail!(
                            "a client is pulling from consumer {durable:?}: stop the weir serving it first"
                        );
                    }
                    Some(info.ack_floor.stream_sequence)
                }
                Err(_) => None,
            };
            moves.push(Move {
                topic: topic.clone(),
                durable: durable.clone(),
                acked,
                to: to.clone(),
            });
            streams.push((stream, durable, acked.is_some()));
        }
        if apply {
            for ((stream, durable, exists), topic) in streams.into_iter().zip(&spec.topics) {
                if exists {
                    stream.delete_consumer(&durable).await.map_err(|err| {
                        anyhow::anyhow!("cannot delete consumer {durable:?}: {err}")
                    })?;
                }
                stream
                    .create_consumer(pull::Config {
                        durable_name: Some(durable.clone()),
                        filter_subject: topic.clone(),
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: spec.ack_wait,
                        max_deliver: -1,
                        max_ack_pending: i64::try_from(spec.max_ack_pending).unwrap_or(i64::MAX),
                        deliver_policy: policy,
                        ..Default::default()
                    })
                    .await
                    .map_err(|err| anyhow::anyhow!("cannot create consumer {durable:?}: {err}"))?;
            }
        }
        Ok(moves)
    }
}
