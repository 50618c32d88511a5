//! The `mxspool` command: parse arguments, load the config, set up logging,
//! bind sockets, and hand over to the library. Nothing else lives here.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mxspool::Server;
use mxspool::cli::{self, CliError};
use mxspool::config::{Config, LogFormat};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

/// Backup MX spooling server: keeps a domain's mail while its primary is down
/// and forwards it the moment the primary is back.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file.
    #[arg(
        short,
        long,
        global = true,
        env = "MXSPOOL_CONFIG",
        default_value = "/etc/mxspool/config.toml"
    )]
    config: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve,
    /// Validate the configuration and print it with every default filled in.
    CheckConfig,
    /// Inspect and operate on the queue of the running server (admin API).
    #[command(subcommand)]
    Queue(cli::QueueCommand),
    /// Mail that could neither be delivered nor bounced (admin API).
    #[command(subcommand)]
    Dead(cli::DeadCommand),
    /// Exit 0 iff the server's /healthz answers within 3 s (Docker HEALTHCHECK).
    Health,
    /// Mailbox fetch: run a `[[fetch]]` block's fetch now (admin API).
    #[command(subcommand)]
    Fetch(cli::FetchCommand),
    /// Check the deployment as senders see it: MX records, our certificate,
    /// TLSA, MTA-STS, the primaries. Exit 1 if a check fails.
    Doctor {
        /// Only this domain (default: every `[[domain]]`).
        #[arg(long, value_name = "D")]
        domain: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// PEM file of CA certificates to trust besides the system's (a
        /// private CA of the primaries or the MTA-STS host).
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Port of the MTA-STS policy hosts (https://mta-sts.DOMAIN/).
        #[arg(long, value_name = "PORT", default_value_t = 443)]
        mta_sts_port: u16,
    },
}

/// Exit status for a configuration that does not load.
const EXIT_CONFIG: u8 = 2;
/// How long sessions get to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("mxspool: {e}");
            // Docker reserves a HEALTHCHECK's exit status 2: any failure is 1.
            return ExitCode::from(match cli.command {
                Command::Health => cli::EXIT_FAILURE,
                _ => EXIT_CONFIG,
            });
        }
    };
    match cli.command {
        Command::Queue(command) => finish(cli::queue(&config, command, &mut std::io::stdout())),
        Command::Dead(command) => finish(cli::dead(&config, command, &mut std::io::stdout())),
        Command::Health => finish(cli::health(&config)),
        Command::Fetch(command) => finish(cli::fetch(&config, command, &mut std::io::stdout())),
        Command::Doctor {
            domain,
            json,
            ca_file,
            mta_sts_port,
        } => {
            let options = mxspool::doctor::Options {
                domain,
                ca_file,
                mta_sts_port,
            };
            finish(cli::doctor(&config, &options, json, &mut std::io::stdout()))
        }
        Command::CheckConfig => {
            print!("{}", config.to_toml());
            ExitCode::SUCCESS
        }
        Command::Serve => {
            init_logging(&config);
            // Spool reads run on blocking threads; a few suffice, and each
            // thread costs the process an allocator arena that keeps memory.
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .max_blocking_threads(BLOCKING_THREADS)
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("mxspool: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("mxspool: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The exit of an operator command: a one-line reason on stderr on failure.
fn finish(result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mxspool: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Threads for spool reads (the writer has its own).
const BLOCKING_THREADS: usize = 4;

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    for addr in &config.server.listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (server.listen)"))?;
        listeners.push(listener);
    }
    let spool_path: &Path = &config.spool.path;
    let spool_path = spool_path.display().to_string();
    let mut server = Server::start(config, listeners).await?;
    let addrs: Vec<String> = server.smtp_addrs().iter().map(|a| a.to_string()).collect();
    tracing::info!(spool = %spool_path, "listening for SMTP on {}", addrs.join(", "));

    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hup.recv() => {
                if let Err(e) = server.reload() {
                    tracing::error!("reload failed, keeping the running configuration: {e}");
                }
            }
        }
    }
    tracing::info!("shutting down");
    server.shutdown(SHUTDOWN_GRACE).await;
    Ok(())
}
