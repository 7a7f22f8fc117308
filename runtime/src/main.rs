//! The `weir` command line: parses it ([`cli`]) and runs the command.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;

use weir::config::Config;
use weir::host::{Host, HostSettings};
use weir::registry::{self, content_version};
use weir::runtime::{load_handlers, open_store};
use weir::telemetry;

use cli::{Cli, Command, DlqAction, StateAction};

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
            Command::Rewind {
                config,
                handler,
                from,
                reset_state,
                yes,
            } => {
                let request = weir::tools::rewind::Request {
                    handler,
                    from,
                    reset_state,
                    yes,
                };
                print!(
                    "{}",
                    weir::tools::rewind::run(&load_config(&config)?, &request).await?
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
