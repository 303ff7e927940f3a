use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// dfos mount daemon: mounts USER's remote store at MOUNTPOINT.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[arg(long, env = "DFOS_BROKERS", default_value = "localhost:9092")]
    brokers: String,
    #[arg(long)]
    user: String,
    /// File whose first line is the password. Otherwise DFOS_PASSWORD, then a prompt.
    #[arg(long, value_name = "F")]
    password_file: Option<PathBuf>,
    /// Deadline for every request; past it the caller gets EIO.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    timeout: u64,
    /// Topic-name prefix; must match the storage daemons'.
    #[arg(long, env = "DFOS_NAMESPACE", default_value = "")]
    namespace: String,
    /// Let other local users access the mount.
    #[arg(long)]
    allow_other: bool,
    /// Seconds names and attributes stay cached unless another mount's
    /// change event drops them sooner.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    cache_ttl: u64,
    /// Mount read-only: every change fails with EROFS.
    #[arg(long)]
    read_only: bool,
    /// Serve extended attributes (`user.` names: setfattr, cp -a, tar
    /// --xattrs). Off by default, as in JuiceFS: with them on, the kernel
    /// asks mountd about ACL and security attributes of every file `ls -l`
    /// lists, which made it about three times slower.
    #[arg(long)]
    xattrs: bool,
    /// Ask a storage node for a file's attributes at every open, as NFS's
    /// close-to-open does: what another mount closed is seen at once, not
    /// milliseconds later when its change event arrives, at the cost of a
    /// round trip per open (appends always do this).
    #[arg(long)]
    close_to_open: bool,
    /// librdkafka setting passed through, e.g. -X security.protocol=SSL.
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_key_value)]
    kafka: Vec<(String, String)>,
    mountpoint: PathBuf,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let outcome = mountd::read_password(cli.password_file.as_deref(), &cli.user).and_then(|password| {
        mountd::run(mountd::Config {
            kafka: mountd::rpc::KafkaSettings {
                brokers: cli.brokers.clone(),
                namespace: cli.namespace.clone(),
                deadline: Duration::from_secs(cli.timeout.max(1)),
                options: cli.kafka.clone(),
            },
            user: cli.user.clone(),
            password,
            mountpoint: cli.mountpoint.clone(),
            allow_other: cli.allow_other,
            cache_ttl: Duration::from_secs(cli.cache_ttl),
            read_only: cli.read_only,
            xattrs: cli.xattrs,
            close_to_open: cli.close_to_open,
        })
    });
    if let Err(e) = outcome {
        eprintln!("mountd: {e:#}");
        std::process::exit(1);
    }
}
