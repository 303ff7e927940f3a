use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// dfos storage daemon: applies filesystem requests from Kafka to DIR/<user>/.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[arg(long, global = true, env = "DFOS_BROKERS", default_value = "localhost:9092")]
    brokers: String,
    /// Data root; each user's files live in DIR/<user>/.
    #[arg(long, global = true, default_value = "storage", value_name = "DIR")]
    storage: PathBuf,
    #[arg(long, global = true, env = "DFOS_CREDENTIALS", default_value = "id_passwd.txt", value_name = "FILE")]
    credentials: PathBuf,
    #[arg(long, global = true, default_value = "node1", value_name = "ID")]
    node_id: String,
    /// Topic-name prefix, to run independent deployments on one cluster.
    #[arg(long, global = true, env = "DFOS_NAMESPACE", default_value = "")]
    namespace: String,
    #[arg(long, global = true, default_value_t = 1)]
    replication_factor: i32,
    #[arg(long, global = true, default_value_t = 30, value_name = "SECS")]
    timeout: u64,
    /// Keep deleted, replaced and emptied files in each user's .trash/ for this many
    /// hours (0: delete at once). Give every node the same value.
    #[arg(long, global = true, default_value_t = 0, value_name = "HOURS")]
    trash_hours: u64,
    /// librdkafka setting passed through, e.g. -X security.protocol=SSL.
    #[arg(short = 'X', global = true, value_name = "KEY=VALUE", value_parser = parse_key_value)]
    kafka: Vec<(String, String)>,
}

#[derive(Subcommand)]
enum Command {
    /// Show this node's applied offset and lag per partition.
    Status,
    /// Manage users in the credentials file.
    User {
        #[command(subcommand)]
        action: UserAction,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Add a user; the password is read from stdin or a prompt.
    Add { name: String },
    /// Change a user's password; read from stdin or a prompt.
    Passwd { name: String },
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let config = storaged::Config {
        brokers: cli.brokers,
        storage: cli.storage,
        credentials: cli.credentials,
        node_id: cli.node_id,
        namespace: cli.namespace,
        replication_factor: cli.replication_factor,
        timeout_secs: cli.timeout,
        kafka_options: cli.kafka,
        trash_hours: cli.trash_hours,
        ..storaged::Config::default()
    };
    match cli.command {
        Some(Command::Status) => {
            print!("{}", storaged::service::status(&config)?);
            Ok(())
        }
        Some(Command::User { action }) => {
            let credentials = &config.credentials;
            let (name, replace) = match &action {
                UserAction::Add { name } => (name, false),
                UserAction::Passwd { name } => (name, true),
            };
            let password = storaged::credentials::read_new_password()?;
            storaged::credentials::set_password(credentials, name, &password, replace)?;
            eprintln!("{} user {name} in {}", if replace { "updated" } else { "added" }, credentials.display());
            Ok(())
        }
        None => storaged::run(config),
    }
}
