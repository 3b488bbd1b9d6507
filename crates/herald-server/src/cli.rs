//! The command line: `herald [serve]`, `config check`, `token`, `publish`,
//! `listen`. Flags are the last configuration layer (file < env < flags).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use herald_core::duration::{format_duration, parse_duration};

use crate::config::{Config, LogFormat, RawConfig};

#[derive(Parser)]
#[command(name = "herald", version, about = "Real-time notification and messaging hub")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Clone, Default)]
struct Common {
    /// TOML configuration file.
    #[arg(long, short, global = true, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address (overrides `listen` and HERALD_LISTEN).
    #[arg(long, global = true)]
    listen: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub (the default command).
    Serve,
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Mint a token from the configured `jwt.secret`.
    Token {
        #[arg(long)]
        user: String,
        /// Groups the user may join (adds `group:NAME` to the `channels` claim).
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Extra channels or patterns for the `channels` claim.
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Publish JSON to a channel through the HTTP API.
    Publish {
        channel: String,
        /// The message's `data`, as JSON.
        json: String,
        /// The delivered frame's `type`.
        #[arg(long = "type")]
        message_type: Option<String>,
        /// An id for idempotent publishing.
        #[arg(long)]
        message_id: Option<String>,
        /// Server base URL (default: from `listen`).
        #[arg(long)]
        url: Option<String>,
        /// API key (default: `api.key` / HERALD_API_KEY).
        #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// Connect as a client and print every frame received, one per line.
    Listen {
        #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
        token: String,
        /// WebSocket URL (default: from `listen`).
        #[arg(long)]
        url: Option<String>,
        /// Channels to subscribe to after authenticating.
        #[arg(long, value_delimiter = ',')]
        subscribe: Vec<String>,
        /// Exit after this many frames other than `auth_success` and `ack`.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and print the effective settings.
    Check,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("herald: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(&cli.common).await,
            Command::Config {
                command: ConfigCommand::Check,
            } => config_check(&cli.common),
            Command::Token {
                user,
                groups,
                channels,
                ttl,
            } => token(&cli.common, &user, groups, channels, &ttl),
            Command::Publish {
                channel,
                json,
                message_type,
                message_id,
                url,
                api_key,
            } => publish(&cli.common, channel, json, message_type, message_id, url, api_key).await,
            Command::Listen {
                token,
                url,
                subscribe,
                count,
            } => listen(&cli.common, &token, url, subscribe, count).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("herald: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Loads file → env → flags and validates.
fn load_config(common: &Common) -> anyhow::Result<Config> {
    let mut raw = match &common.config {
        Some(path) => RawConfig::from_file(path)?,
        None => RawConfig::default(),
    };
    raw.apply_env(|name| std::env::var(name).ok())?;
    if let Some(listen) = &common.listen {
        raw.listen = Some(listen.clone());
    }
    Ok(Config::from_raw(raw)?)
}

async fn serve(common: &Common) -> anyhow::Result<ExitCode> {
    let mut config = load_config(common)?;
    config.fill_ephemeral_secrets()?;
    init_logging(&config);
    let running = crate::server::start(config.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let addr = running.local_addr;
    tracing::info!(%addr, node_id = %running.hub.node_id, "herald listening");
    print_banner(&config, addr);
    crate::shutdown::signal().await;
    tracing::info!(
        drain_window = %format_duration(config.shutdown.drain_window),
        timeout = %format_duration(config.shutdown.timeout),
        "shutting down"
    );
    if running.stop().await {
        tracing::info!("shutdown complete");
    } else {
        tracing::warn!("shutdown timeout reached; remaining connections were cut");
    }
    Ok(ExitCode::SUCCESS)
}

fn print_banner(config: &Config, addr: std::net::SocketAddr) {
    let mode = match &config.redis {
        None => "in-process broker, in-memory state".to_owned(),
        Some(redis) => format!("Redis at {}, prefix `{}`", redis.address.host_port, redis.prefix),
    };
    println!("Herald {} on http://{addr} ({mode})", env!("CARGO_PKG_VERSION"));
    if !config.ephemeral_secrets {
        return;
    }
    let token = crate::auth::mint(&config.jwt, "demo", &[crate::demo::DEMO_ROOM.to_owned()], 24 * 3_600);
    let api_key = config.api_key.as_deref().unwrap_or_default();
    println!("Embedded mode: the JWT secret and API key below were generated for this run only.");
    println!("  demo page:     http://{addr}/");
    println!("  demo token:    {token}   (user \"demo\", valid 24h)");
    println!("  listen:        cargo run --release -- listen --url ws://{addr}/ws --token {token}");
    println!(
        "  publish:       curl -s -H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' \
         -d '{{\"channel\":\"user:demo\",\"data\":{{\"hello\":\"world\"}}}}' http://{addr}/api/v1/publish"
    );
    println!("Set jwt.secret and api.key (or HERALD_JWT_SECRET, HERALD_API_KEY) to keep them across restarts.");
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn config_check(common: &Common) -> anyhow::Result<ExitCode> {
    let config = load_config(common)?;
    println!("configuration is valid");
    println!("  listen:            {}", config.listen);
    println!(
        "  jwt.secret:        {}",
        if config.jwt.secret.is_some() {
            "set"
        } else {
            "not set (generated at start on loopback)"
        }
    );
    println!("  jwt.algorithms:    {:?}", config.jwt.algorithms);
    println!(
        "  api.key:           {}",
        if config.api_key.is_some() {
            "set"
        } else {
            "not set (generated at start on loopback)"
        }
    );
    match &config.redis {
        Some(redis) => println!(
            "  redis:             {} (prefix {:?}, {} routes, streams {})",
            redis.address.host_port,
            redis.prefix,
            redis.routes.len(),
            if redis.streams.is_some() { "on" } else { "off" }
        ),
        None => println!("  redis:             not set (in-process broker)"),
    }
    println!("  max_message_size:  {} bytes", config.limits.max_message_size);
    println!(
        "  max_connections:   {} (per user {}, per IP {})",
        config.limits.max_connections, config.limits.max_connections_per_user, config.limits.max_connections_per_ip
    );
    if !config.listen.ip().is_loopback() && (config.jwt.secret.is_none() || config.api_key.is_none()) {
        let mut config = config;
        config.fill_ephemeral_secrets()?;
    }
    Ok(ExitCode::SUCCESS)
}

fn token(
    common: &Common,
    user: &str,
    groups: Vec<String>,
    mut channels: Vec<String>,
    ttl: &str,
) -> anyhow::Result<ExitCode> {
    let config = load_config(common)?;
    if config.jwt.secret.is_none() {
        anyhow::bail!("`herald token` needs jwt.secret (config file or HERALD_JWT_SECRET)");
    }
    let ttl = parse_duration(ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    herald_core::ChannelName::user(user).map_err(|e| anyhow::anyhow!("--user: {e}"))?;
    channels.extend(groups.iter().map(|group| format!("group:{group}")));
    println!(
        "{}",
        crate::auth::mint(&config.jwt, user, &channels, ttl.as_secs().max(1))
    );
    Ok(ExitCode::SUCCESS)
}

async fn publish(
    common: &Common,
    channel: String,
    json: String,
    message_type: Option<String>,
    message_id: Option<String>,
    url: Option<String>,
    api_key: Option<String>,
) -> anyhow::Result<ExitCode> {
    let config = load_config(common)?;
    let data: serde_json::Value = serde_json::from_str(&json).map_err(|e| anyhow::anyhow!("JSON argument: {e}"))?;
    let api_key = api_key
        .or(config.api_key.clone())
        .ok_or_else(|| anyhow::anyhow!("give --api-key or set api.key / HERALD_API_KEY"))?;
    let base = url.unwrap_or_else(|| format!("http://{}", config.listen));
    let mut body = serde_json::json!({"channel": channel, "data": data});
    if let Some(t) = message_type {
        body["type"] = t.into();
    }
    if let Some(id) = message_id {
        body["message_id"] = id.into();
    }
    let url = format!("{}/api/v1/publish", base.trim_end_matches('/'));
    let (status, response) = crate::http_client::request("POST", &url, Some(&api_key), Some(body.to_string())).await?;
    println!("{response}");
    Ok(if (200..300).contains(&status) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn listen(
    common: &Common,
    token: &str,
    url: Option<String>,
    subscribe: Vec<String>,
    count: Option<u64>,
) -> anyhow::Result<ExitCode> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let url = match url {
        Some(url) => url,
        None => format!("ws://{}/ws", load_config(common)?.listen),
    };
    let separator = if url.contains('?') { '&' } else { '?' };
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("{url}{separator}token={token}"))
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {url}: {e}"))?;
    let mut received = 0u64;
    while let Some(message) = socket.next().await {
        match message? {
            Message::Text(text) => {
                println!("{text}");
                let kind = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
                    .unwrap_or_default();
                if kind == "auth_success" {
                    for channel in &subscribe {
                        let frame = serde_json::json!({"type": "subscribe", "data": {"channel": channel}});
                        socket.send(Message::Text(frame.to_string().into())).await?;
                    }
                } else if kind != "ack" {
                    received += 1;
                    if count.is_some_and(|limit| received >= limit) {
                        let _ = socket.close(None).await;
                        return Ok(ExitCode::SUCCESS);
                    }
                }
            }
            Message::Binary(bytes) => println!("<binary {} bytes>", bytes.len()),
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                eprintln!("closed by server: {code} {reason}");
                return Ok(if code == 1000 || code == 1001 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            _ => {}
        }
    }
    eprintln!("connection lost");
    Ok(ExitCode::FAILURE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
