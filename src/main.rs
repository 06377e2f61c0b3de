//! The `switchboard` binary: command-line parsing and wiring only.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};

use switchboard::config::{Config, Durability, RegistrationPolicy};
use switchboard::metrics::serve_admin;
use switchboard::metrics::{Registry, ShardMetrics};
use switchboard::shard::server::{Controls, ServiceStats};

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "A store-and-forward messaging server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (defaults: 127.0.0.1:7700, data in ./data).
    Serve(ServeArgs),
    /// Check this host against a connection target; exit 0 only when nothing fails.
    Doctor(DoctorArgs),
    /// An interactive terminal client: register or log in, chat, watch the ticks.
    Chat(switchboard::chat::ChatArgs),
    /// Inspect the message log (read-only).
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// Show or rotate the server's Noise static key (in the data directory).
    /// A running server reads the keys at start: restart it after a change.
    NoiseKey {
        #[command(subcommand)]
        command: NoiseKeyCommand,
    },
}

#[derive(Subcommand)]
enum NoiseKeyCommand {
    /// Print the current public key (hex, what clients pin) and its
    /// fingerprint, and whether a previous key is still accepted. Makes the
    /// key if there is none.
    Show { data_dir: PathBuf },
    /// Start a rotation: a fresh key becomes current, the current one is
    /// kept as the previous key, still accepted for IK (whose clients are
    /// told the new key in the handshake) until `end-overlap`.
    Rotate { data_dir: PathBuf },
    /// End a rotation's overlap: delete the previous key.
    EndOverlap { data_dir: PathBuf },
}

#[derive(Subcommand)]
enum LogCommand {
    /// Segments per shard, records by kind, live and dead records, time span,
    /// and any corruption with its position. Never modifies the files.
    Inspect {
        /// The data directory (or one shard's log directory).
        data_dir: PathBuf,
    },
}

#[derive(Args)]
struct DoctorArgs {
    /// Connections this host must hold.
    #[arg(long)]
    connections: Option<u64>,
    /// The server's configuration file (data directory, shards).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Root of the proc/sys tree to inspect (for testing against a copy).
    #[arg(long, default_value = "/")]
    sysroot: PathBuf,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file; flags override it.
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// Client listener address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin (metrics, health) listener address.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Data directory (metadata database and shard logs).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Shard count; 0 = one per usable CPU.
    #[arg(long)]
    shards: Option<u32>,
    /// Do not pin shard executors to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// When a ServerAck may go out: fsync or os.
    #[arg(long, value_parser = parse_durability)]
    durability: Option<Durability>,
    /// Who may register: open, token or closed.
    #[arg(long, value_parser = parse_registration)]
    registration: Option<RegistrationPolicy>,
    /// A registration token (repeatable) for `--registration token`.
    #[arg(long = "registration-token")]
    registration_tokens: Vec<String>,
    /// Segment file size in bytes.
    #[arg(long)]
    segment_size_bytes: Option<u64>,
    /// Log filter, e.g. `info` or `switchboard=debug`.
    #[arg(long, env = "SWITCHBOARD_LOG")]
    log_level: Option<String>,
}

/// Raises the soft open-file limit to the hard one: every connection is a
/// descriptor, and the soft default (often 1,024) is far below what a
/// connection server needs. The hard limit is the operator's (systemd's
/// LimitNOFILE); `switchboard doctor` checks it.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-file limit"),
                Err(err) => tracing::warn!(%err, "could not raise the open-file limit"),
            }
        }
    }
}

fn parse_durability(s: &str) -> Result<Durability, String> {
    match s {
        "fsync" => Ok(Durability::Fsync),
        "os" => Ok(Durability::Os),
        _ => Err("expected fsync or os".into()),
    }
}

fn parse_registration(s: &str) -> Result<RegistrationPolicy, String> {
    match s {
        "open" => Ok(RegistrationPolicy::Open),
        "token" => Ok(RegistrationPolicy::Token),
        "closed" => Ok(RegistrationPolicy::Closed),
        _ => Err("expected open, token or closed".into()),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Doctor(args) => doctor(args),
        Command::Chat(args) => switchboard::chat::run(args),
        Command::Log {
            command: LogCommand::Inspect { data_dir },
        } => {
            let report = switchboard::store::inspect(&data_dir)
                .with_context(|| format!("inspecting {}", data_dir.display()))?;
            print!("{report}");
            Ok(())
        }
        Command::NoiseKey { command } => {
            use switchboard::noise::{fingerprint, KeySlot, ServerKeys};
            let keys = match &command {
                NoiseKeyCommand::Show { data_dir } => ServerKeys::load_or_create(data_dir),
                NoiseKeyCommand::Rotate { data_dir } => ServerKeys::rotate(data_dir),
                NoiseKeyCommand::EndOverlap { data_dir } => ServerKeys::end_overlap(data_dir),
            }
            .context("the Noise key files")?;
            println!("public key  {}", hex::encode(keys.public()));
            println!("fingerprint {}", fingerprint(keys.public()));
            match keys.get(KeySlot::Previous) {
                Some(previous) => println!(
                    "previous    {} (accepted until end-overlap)",
                    fingerprint(previous.public())
                ),
                None => println!("previous    none"),
            }
            Ok(())
        }
    }
}

fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    let mut options = switchboard::doctor::DoctorOptions::from_config(&config, args.connections);
    options.sysroot = args.sysroot;
    let report = switchboard::doctor::run(&options);
    print!("{report}");
    std::process::exit(report.exit_code());
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(v) = args.listen {
        config.server.listen = v;
    }
    if let Some(v) = args.admin_listen {
        config.server.admin_listen = v;
    }
    if let Some(v) = args.data_dir {
        config.server.data_dir = v;
    }
    if let Some(v) = args.shards {
        config.server.shards = v;
    }
    if args.no_pin {
        config.server.pin_cpus = false;
    }
    if let Some(v) = args.durability {
        config.store.durability = v;
    }
    if let Some(v) = args.registration {
        config.server.registration = v;
    }
    if !args.registration_tokens.is_empty() {
        config.server.registration_tokens = args.registration_tokens;
    }
    if let Some(v) = args.segment_size_bytes {
        config.store.segment_size_bytes = v;
    }
    if let Some(v) = args.log_level {
        config.server.log_level = v;
    }
    config.validate()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.server.log_level)
                .context("invalid log filter")?,
        )
        .with_writer(std::io::stderr)
        .init();

    // A bug in any shard ends the process: a half-running server would hold
    // connections it no longer serves. The supervisor restarts it and
    // recovery rebuilds everything acknowledged.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));

    // SIGINT, SIGTERM and SIGHUP are blocked here, so every thread inherits
    // the mask, and taken synchronously by one waiting thread.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGHUP);
    signals.thread_block().context("blocking signals")?;
    raise_open_file_limit();
    let shards = config.shard_count();
    let metrics: Vec<Arc<ShardMetrics>> =
        (0..shards).map(|_| Arc::new(ShardMetrics::new())).collect();
    let registry = Arc::new(
        Registry::from_shards(metrics.clone())
            .with_stall_limit_ms(u64::from(config.server.shard_stall_ready_ms)),
    );
    let controls = Controls::default();
    {
        let controls = controls.clone();
        let registry = registry.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                match signals.wait() {
                    Ok(Signal::SIGHUP) => {
                        tracing::info!("SIGHUP: reading the WSS certificate files again");
                        controls.reload.raise();
                    }
                    Ok(signal) => {
                        tracing::info!(?signal, "stopping: draining sessions and commits");
                        // /readyz answers 503 first, so balancers stop sending.
                        registry.set_draining(true);
                        controls.stop.raise();
                    }
                    Err(_) => return,
                }
            })
            .context("starting the signal thread")?;
    }

    let admin_listener = std::net::TcpListener::bind(config.server.admin_listen)
        .with_context(|| format!("binding the admin listener {}", config.server.admin_listen))?;
    let admin_addr = admin_listener.local_addr()?;
    let stats = ServiceStats {
        push: registry.push.clone(),
        media: registry.media.clone(),
        wss: registry.wss.clone(),
    };
    let admin =
        serve_admin(admin_listener, registry).context("starting the admin endpoint's thread")?;
    switchboard::shard::server::run(config, metrics, stats, controls, |running| {
        let mut out = std::io::stdout().lock();
        let media = running
            .media
            .map(|addr| format!(", media on http://{addr}"))
            .unwrap_or_default();
        let wss = running
            .wss
            .map(|addr| format!(", wss on wss://{addr}"))
            .unwrap_or_default();
        let noise = running
            .noise_key
            .map(|key| format!(", noise key {}", hex::encode(key)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "switchboard listening on {} with {} shards, admin on http://{}{media}{wss}{noise}",
            running.listen, running.shards, admin_addr
        );
        let _ = out.flush();
    })?;
    let _ = admin.stop();
    Ok(())
}
