//! The `weir` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use weir::config::Config;
use weir::host::{Host, HostSettings};
use weir::registry::{self, content_version};
use weir::runtime::{load_handlers, open_store};
use weir::telemetry::{self, LogFormat};

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
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "pretty",
        env = "WEIR_LOG_FORMAT"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
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
  weir replay projection --from earliest --reset-state
                                         rebuild a projection from its input (weir stopped)

Logs go to stderr; filter them with WEIR_LOG (e.g. WEIR_LOG=weir=debug to see every
handled message, WEIR_LOG=weir::guest=off to silence handler logs).";

#[derive(Subcommand)]
enum Command {
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
    /// Handle a handler's input again: move its consumer back and forget
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
    /// "reset_state": true}' http://127.0.0.1:9464/handlers/NAME/replay`.
    Replay {
        /// Configuration file naming the broker, handlers and data directory.
        #[arg(long, short, default_value = "config/weir.toml", env = "WEIR_CONFIG")]
        config: PathBuf,
        /// The handler (its file stem).
        handler: String,
        /// Where to start again: `earliest`, an RFC 3339 time
        /// (2026-11-26T10:00:00Z), or an offset (Kafka, every partition) /
        /// stream sequence (NATS JetStream). Redis Streams take earliest or
        /// a time; RabbitMQ and SQS queues cannot be replayed.
        #[arg(long, value_parser = weir::source::Rewind::parse)]
        from: weir::source::Rewind,
        /// Also delete the handler's state and its emitted events not yet
        /// published, so the replay rebuilds them.
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
struct DlqSelection {
    /// A handler, a topic it consumes, or a dead-letter topic.
    target: Option<String>,
    /// Only those dead-lettered within this long (e.g. 1h, 2d).
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// Only those dead-lettered at least this long ago.
    #[arg(long, value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
    /// Only those of this error kind (permanent, retryable, retry-after),
    /// category (validation, …) or runtime failure (timeout, trap, …).
    #[arg(long)]
    error_kind: Option<String>,
    /// Only the dead letter of this event id (repeatable).
    #[arg(long = "event-id")]
    event_ids: Vec<String>,
    /// At most this many, oldest first within each dead-letter topic.
    #[arg(long)]
    limit: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum DlqAction {
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
enum StateAction {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    // lapin logs every channel the broker closes at error level, the
    // expected ones too (a passive declare of a queue Weir then creates);
    // the RabbitMQ source logs the losses that matter itself.
    let default_filter = match cli.command {
        Command::Demo { .. } => "error",
        _ => "info,lapin::channel=off",
    };
    telemetry::init(cli.log_format, default_filter);
    // Every rustls client (NATS, RabbitMQ, Redis) uses one provider,
    // whichever crate features the tree enables.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { config } => run(&config).await,
            Command::Demo {
                config,
                events,
                deadline,
                serve,
            } => {
                let config = load_config(&config)?;
                weir::demo::run(&config, events, deadline, serve).await
            }
            Command::New {
                language,
                name,
                dir,
            } => new_project(language, &name, dir),
            Command::Check { files } => check(&files),
            Command::State { config, action } => state(&load_config(&config)?, action).await,
            Command::Handlers { config } => handlers(&load_config(&config)?).await,
            Command::Dlq { config, action } => dlq(&load_config(&config)?, action).await,
            Command::Replay {
                config,
                handler,
                from,
                reset_state,
                yes,
            } => {
                let request = weir::tools::replay::Request {
                    handler,
                    from,
                    reset_state,
                    yes,
                };
                print!(
                    "{}",
                    weir::tools::replay::run(&load_config(&config)?, &request).await?
                );
                Ok(())
            }
        }
    });
    // Everything awaited has finished; what may still run is a handler's
    // file read blocked in the host past its timeout (a FIFO), which must
    // not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!(
                "error: {}",
                weir::config::secrets::redact(&format!("{err:#}"))
            );
            ExitCode::FAILURE
        }
    }
}

async fn dlq(config: &Config, action: DlqAction) -> anyhow::Result<()> {
    use weir::tools::dlq::Filter;
    use weir::tools::dlq_command::{Action, Request};
    let (action, selection, dry_run, all) = match action {
        DlqAction::List { selection } => (Action::List, selection, false, false),
        DlqAction::Replay { selection, dry_run } => (Action::Replay, selection, dry_run, false),
        DlqAction::Purge {
            selection,
            dry_run,
            all,
        } => (Action::Purge, selection, dry_run, all),
    };
    let request = Request {
        action,
        target: selection.target,
        filter: Filter {
            handler: None,
            since: selection.since,
            older_than: selection.older_than,
            error_kind: selection.error_kind,
            event_ids: selection.event_ids,
        },
        limit: selection.limit,
        dry_run,
        all,
        json: selection.json,
    };
    print!("{}", weir::tools::dlq_command::run(config, request).await?);
    Ok(())
}

fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).context("invalid configuration (see config/weir.toml for every key)")
}

async fn run(config_path: &std::path::Path) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    tracing::info!(config = %config_path.display(), version = env!("CARGO_PKG_VERSION"), "starting");
    weir::runtime::supervise(&config).await
}

async fn state(config: &Config, action: StateAction) -> anyhow::Result<()> {
    let (handler, key, prefix, limit, json) = match &action {
        StateAction::Get { handler, key } => (handler, Some(key.as_str()), "", 1, false),
        StateAction::List {
            handler,
            prefix,
            limit,
            json,
        } => (handler, None, prefix.as_str(), *limit, *json),
    };
    let (answer, from) = match open_store(config).await {
        Ok(store) => (
            weir::admin::read_state(&store, handler, key, prefix, limit).await?,
            "",
        ),
        // A running weir holds the database: ask it instead.
        Err(err) if format!("{err:#}").contains("already open") && config.admin.enabled => (
            state_via_admin(config, handler, key, prefix, limit).with_context(|| {
                format!("{err:#}; asking the running weir's admin server failed")
            })?,
            " (read from the running weir)",
        ),
        Err(err) => return Err(err).context("cannot read the state"),
    };
    let entries = answer["entries"].as_array().cloned().unwrap_or_default();
    let show = |e: &serde_json::Value| match e["value"].as_str() {
        Some(text) => text.to_string(),
        None => format!("0x{}", e["value_hex"].as_str().unwrap_or_default()),
    };
    if let Some(key) = key {
        return match entries.first() {
            Some(entry) => {
                println!("{}", show(entry));
                Ok(())
            }
            None => anyhow::bail!("handler {handler:?} has no key {key:?}"),
        };
    }
    for entry in &entries {
        if json {
            println!("{entry}");
        } else {
            println!(
                "{} = {}",
                entry["key"].as_str().unwrap_or_default(),
                show(entry)
            );
        }
    }
    eprintln!(
        "{} entr{} of {handler:?}{}; {} emitted event(s) waiting in the outbox{from}",
        entries.len(),
        if entries.len() == 1 { "y" } else { "ies" },
        if prefix.is_empty() {
            String::new()
        } else {
            format!(" starting with {prefix:?}")
        },
        answer["outbox"]
    );
    Ok(())
}

/// What [`weir::admin::read_state`] answers, asked of a running weir's
/// admin server (`GET /handlers/{name}/state`).
fn state_via_admin(
    config: &Config,
    handler: &str,
    key: Option<&str>,
    prefix: &str,
    limit: usize,
) -> anyhow::Result<serde_json::Value> {
    use weir::admin::{fetch, url_escape};
    let query = match key {
        Some(key) => format!("key={}", url_escape(key)),
        None => format!("prefix={}&limit={limit}", url_escape(prefix)),
    };
    let path = format!("/handlers/{}/state?{query}", url_escape(handler));
    let token = weir::admin::client_token(config.admin.token.as_deref(), &config.runtime.data_dir);
    let (code, body) = fetch(config.admin.listen, &path, token.as_deref())?;
    let answer: serde_json::Value = serde_json::from_str(&body)
        .with_context(|| format!("the admin server answered {code} with {body:?}"))?;
    anyhow::ensure!(
        code == 200,
        "the admin server answered {code}: {}",
        answer["error"].as_str().unwrap_or(&body)
    );
    Ok(answer)
}

/// The Wasm host as `weir run` configures it: fuel metering when
/// `[limits] fuel` is set, compiled components cached in the data directory.
async fn handlers(config: &Config) -> anyhow::Result<()> {
    let host = weir::runtime::host_for(config)?;
    let dir = &config.runtime.handlers_dir;
    let (loaded, failed) = load_handlers(&host, dir, &config.limits, config.broker_kind()).await?;
    println!(
        "{:<16} {:<13} {:<9} {:<24} topics",
        "handler", "version", "contract", "group"
    );
    for handler in &loaded {
        println!(
            "{:<16} {:<13} {:<9} {:<24} {}",
            handler.name,
            handler.compiled.version(),
            handler.compiled.contract().version(),
            handler.group(),
            handler.manifest.topics.join(", ")
        );
    }
    for err in &failed {
        println!("{}: does not load: {err}", err.file().display());
    }
    eprintln!(
        "{} handler(s) in {}, {} failing to load",
        loaded.len(),
        dir.display(),
        failed.len()
    );
    Ok(())
}

fn new_project(
    language: weir::scaffold::Language,
    name: &str,
    dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(|| PathBuf::from(name));
    let project = weir::scaffold::create(language, name, &dir)?;
    println!(
        "created {language} handler {name:?} in {} ({} files)",
        project.dir.display(),
        project.files.len()
    );
    println!("next:");
    println!("  cd {}", project.dir.display());
    println!("  {}", project.build);
    println!("  weir check {name}.wasm");
    println!("  cp {name}.wasm {name}.toml <handlers_dir>/   # deploy; see README.md");
    Ok(())
}

fn check(files: &[PathBuf]) -> anyhow::Result<()> {
    let host = Host::new(&HostSettings::default())?;
    let mut bad = 0;
    for file in files {
        let bytes = match std::fs::read(file) {
            Ok(bytes) => bytes,
            Err(err) => {
                println!("{}: cannot read: {err}", file.display());
                bad += 1;
                continue;
            }
        };
        let name = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("handler");
        let version = content_version(&bytes);
        let limits = weir::config::LimitsSection::default();
        let limits = registry::ManifestLimits::default().resolve(&limits);
        match host.compile(name, &version, &bytes, limits) {
            Ok(compiled) => {
                let contract = compiled.contract();
                let note = if contract < weir::host::Contract::LATEST {
                    format!(
                        " (still served; the SDKs and `weir new` build for {})",
                        weir::host::Contract::LATEST
                    )
                } else {
                    String::new()
                };
                println!(
                    "{}: ok — fits {contract}/handler (version {version}, {} KiB)",
                    file.display(),
                    bytes.len() / 1024
                );
                println!("  contract: {contract}{note}");
                println!("  imports: {}", compiled.imports().join(", "));
                println!("  exports: {}", compiled.exports().join(", "));
            }
            Err(err) => {
                println!("{}: does not fit: {err}", file.display());
                bad += 1;
            }
        }
    }
    anyhow::ensure!(
        bad == 0,
        "{bad} of {} file(s) do not fit the world",
        files.len()
    );
    Ok(())
}
