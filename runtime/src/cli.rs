//! The `weir` command line as clap reads it: every command, option and
//! help text.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use weir::telemetry::LogFormat;

/// Weir runs event handlers written as WebAssembly components.
///
/// It consumes messages from Kafka, NATS JetStream, RabbitMQ, Redis
/// Streams, Amazon SQS or its embedded Kafka-protocol broker, hands each one to the handler components in a
/// directory, retries failures with backoff, dead-letters poison messages to
/// `<topic>.dlq`, and acknowledges a message only once its outcome is
/// durable.
///
/// A handler is `<name>.wasm` (a component of the `weir:handler` world) plus
/// `<name>.toml` beside it, naming at least its topics: `topics = ["orders"]`.
#[derive(Parser)]
#[command(name = "weir", version, about, long_about, after_help = EXAMPLES)]
pub(crate) struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "pretty",
        env = "WEIR_LOG_FORMAT"
    )]
    pub(crate) log_format: LogFormat,

    #[command(subcommand)]
    pub(crate) command: Command,
}

const EXAMPLES: &str = "\
Examples:
  weir new python order-totals           a ready-to-build handler project (rust, python or js)
  weir demo                              example handlers + embedded broker + generated events
  weir run --config config/weir.toml     serve the handlers in [runtime] handlers_dir until Ctrl-C
  weir check target/handlers/orders.wasm does this component fit the weir:handler world?
  weir handlers                          which handlers and versions the directory holds
  weir state list projection --prefix customer/
                                         what a handler keeps in its state
  weir dlq list orders --since 1h        the dead letters of handler orders in the last hour
  weir dlq replay orders --error-kind timeout
                                         send them back to be handled again
  weir rewind projection --from earliest --reset-state
                                         rebuild a projection from its input (weir stopped)

Logs go to stderr; filter them with WEIR_LOG (e.g. WEIR_LOG=weir=debug to see every
handled message, WEIR_LOG=weir::guest=off to silence handler logs).";

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Serve every handler in the handlers directory until Ctrl-C or SIGTERM.
    ///
    /// The broker is the configuration's one [source.kafka], [source.nats],
    /// [source.rabbitmq], [source.redis] or [source.sqs] table
    /// (config/production.toml, config/nats.toml, config/rabbitmq.toml,
    /// config/redis.toml and config/sqs.toml show each). With none, an
    /// embedded Kafka-protocol broker is started on loopback and
    /// its address printed, so any Kafka client can produce to it. On
    /// Ctrl-C/SIGTERM in-flight messages finish, what finished is
    /// acknowledged and the process exits 0; if the database's writer dies it
    /// exits 1 with the reason.
    ///
    /// Dedup marks, attempts, state and the outbox are kept in [runtime]
    /// data_dir, for this process alone; with [store] url, in PostgreSQL, so
    /// that several processes with the same configuration share the
    /// consumer groups with exactly-once effects (README, "Running several
    /// processes").
    Run {
        /// Configuration file.
        #[arg(long, short, default_value = "config/weir.toml", env = "WEIR_CONFIG")]
        config: PathBuf,
    },
    /// Run the example handlers against the embedded broker with a generated
    /// stream of order events, and print what was handled.
    ///
    /// Builds nothing: the handlers must already be in the configured
    /// handlers directory (`bash .ci/build-handlers` puts the examples there).
    Demo {
        /// Configuration file (its [source] is ignored: the demo always uses
        /// the embedded broker).
        #[arg(long, short, default_value = "config/weir.toml", env = "WEIR_CONFIG")]
        config: PathBuf,
        /// How many events to generate.
        #[arg(long, default_value_t = 600)]
        events: usize,
        /// Give up if the stream is not handled within this time.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        deadline: Duration,
        /// After the summary, keep serving the handlers and the status page
        /// ([admin] listen, http://127.0.0.1:9464/ by default) until Ctrl-C.
        #[arg(long)]
        serve: bool,
    },
    /// Create a handler project: the handler, its manifest, the WIT world
    /// and the language's SDK, ready to build.
    ///
    /// Rust builds with cargo for wasm32-wasip2, Python with componentize-py,
    /// JavaScript with componentize-js. The project's README says how to
    /// build, test, check and deploy it.
    New {
        /// The handler's language.
        #[arg(value_enum)]
        language: weir::scaffold::Language,
        /// The handler's name: lowercase letters, digits, '-' and '_'. It
        /// names the component (`<name>.wasm`), its manifest, consumer group
        /// and state.
        name: String,
        /// Where to create the project (default: ./<name>).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Check that components fit the weir:handler world of a contract
    /// version this runtime serves (0.1.0 or 0.2.0) and say which; say what
    /// is wrong if not.
    Check {
        /// Component files (`.wasm`).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// List the handlers in the handlers directory: name, version (content
    /// hash), topics and consumer group, or why a file does not load.
    ///
    /// The version is what `weir run` serves (and logs as `version=`) for
    /// the files as they are now; a running weir picks up changes within
    /// a second.
    Handlers {
        /// Configuration file naming the handlers directory.
        #[arg(long, short, default_value = "config/weir.toml", env = "WEIR_CONFIG")]
        config: PathBuf,
    },
    /// Read a handler's state, and see how many emitted events wait in the
    /// outbox.
    ///
    /// Reads the store: PostgreSQL with [store] url, else the database in
    /// [runtime] data_dir; while `weir run` holds that one, asks that
    /// process's admin server ([admin] listen) instead.
    State {
        /// Configuration file naming the data directory.
        #[arg(
            long,
            short,
            global = true,
            default_value = "config/weir.toml",
            env = "WEIR_CONFIG"
        )]
        config: PathBuf,
        #[command(subcommand)]
        action: StateAction,
    },
    /// Handle a handler's input again: rewind its consumer and forget
    /// its dedup marks — with --reset-state also its state and pending
    /// emitted events, to rebuild a projection from scratch.
    ///
    /// Works on a stopped weir (it refuses while one holds the database,
    /// and the broker refuses while one consumes in the group). Says what
    /// it will do; does it only with --yes. A running weir does the same
    /// when asked on its admin server, with the admin token ([admin]
    /// token, or the generated admin.token in the data directory):
    /// `curl -X POST -H "Authorization: Bearer $(cat data/admin.token)"
    /// -H 'Content-Type: application/json' -d '{"from": "earliest",
    /// "reset_state": true}' http://127.0.0.1:9464/handlers/NAME/rewind`. `weir replay` is
    /// the same command under its first name.
    #[command(alias = "replay")]
    Rewind {
        /// Configuration file naming the broker, handlers and data directory.
        #[arg(long, short, default_value = "config/weir.toml", env = "WEIR_CONFIG")]
        config: PathBuf,
        /// The handler (its file stem).
        handler: String,
        /// Where to start again: `earliest`, an RFC 3339 time
        /// (2026-11-26T10:00:00Z), or an offset (Kafka, every partition) /
        /// stream sequence (NATS JetStream). Redis Streams take earliest or
        /// a time; RabbitMQ and SQS queues cannot be rewound.
        #[arg(long, value_parser = weir::source::Rewind::parse)]
        from: weir::source::Rewind,
        /// Also delete the handler's state and its emitted events not yet
        /// published, so the rewind rebuilds them.
        #[arg(long)]
        reset_state: bool,
        /// Do it (without: only say what would be done).
        #[arg(long)]
        yes: bool,
    },
    /// List, replay and purge dead letters.
    ///
    /// Reads the dead-letter topics of the handlers in the handlers
    /// directory (`<topic>.dlq`, or each manifest's `[dlq]`) straight from
    /// the broker, so it works whether weir runs or not. TARGET is a
    /// handler's name, a topic it consumes, or a dead-letter topic; without
    /// it, every handler's. Kafka, NATS JetStream and Redis Streams keep
    /// dead letters readable; RabbitMQ and SQS queues cannot be read without
    /// consuming them, so there the broker's own tools show them.
    Dlq {
        /// Configuration file naming the broker and the handlers directory.
        #[arg(
            long,
            short,
            global = true,
            default_value = "config/weir.toml",
            env = "WEIR_CONFIG"
        )]
        config: PathBuf,
        #[command(subcommand)]
        action: DlqAction,
    },
}

/// Which dead letters a `weir dlq` command acts on.
#[derive(clap::Args)]
pub(crate) struct DlqSelection {
    /// A handler, a topic it consumes, or a dead-letter topic.
    pub(crate) target: Option<String>,
    /// Only those dead-lettered within this long (e.g. 1h, 2d).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) since: Option<Duration>,
    /// Only those dead-lettered at least this long ago.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) older_than: Option<Duration>,
    /// Only those of this error kind (permanent, retryable, retry-after),
    /// category (validation, …) or runtime failure (timeout, trap, …).
    #[arg(long)]
    pub(crate) error_kind: Option<String>,
    /// Only the dead letter of this event id (repeatable).
    #[arg(long = "event-id")]
    pub(crate) event_ids: Vec<String>,
    /// At most this many, oldest first within each dead-letter topic.
    #[arg(long)]
    pub(crate) limit: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Subcommand)]
pub(crate) enum DlqAction {
    /// Each dead letter (event id, handler, error, kind, attempts, origin,
    /// age) and, per dead-letter topic, its depth and oldest age.
    List {
        #[command(flatten)]
        selection: DlqSelection,
    },
    /// Send dead letters back to the topic they came from (key, payload,
    /// original headers, plus weir.replay-of, weir.replay-id and
    /// weir.replayed-at), so that each is handled again; replaying one
    /// twice handles it once. The dead letters stay (purge them after).
    Replay {
        #[command(flatten)]
        selection: DlqSelection,
        /// Say what would be replayed; send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove dead letters (Kafka: DeleteRecords, which removes only a
    /// partition's oldest records; NATS JetStream: each message; Redis:
    /// XDEL of each entry). Refuses
    /// without a filter unless --all.
    Purge {
        #[command(flatten)]
        selection: DlqSelection,
        /// Say what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Allow removing every dead letter of the target.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum StateAction {
    /// Print one value (UTF-8 as text, anything else as hex). Exits 1 if the
    /// key is absent.
    Get {
        /// Handler name (its file stem).
        handler: String,
        /// The key.
        key: String,
    },
    /// List entries whose key starts with a prefix, in key order.
    List {
        /// Handler name (its file stem).
        handler: String,
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// At most this many entries.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line: key, value (text, or null when not
        /// UTF-8), value_hex, version.
        #[arg(long)]
        json: bool,
    },
}
