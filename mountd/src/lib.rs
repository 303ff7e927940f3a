//! dfos mount daemon.
//!
//! Mounts one user's remote store as a local folder. The layers, bottom up:
//! - [`file_bytes`]: file bytes as shared ranges of fetched buffers;
//! - [`chunk`]: a write's data gathered behind room for its envelope;
//! - [`batch`]: which requests may travel together in one message;
//! - [`rpc`]: request/reply over Kafka with a deadline on every request;
//! - [`logread`]: file data fetched straight from the request log when a
//!   storage node says where it is;
//! - [`events`]: other mounts' changes, to invalidate caches;
//! - [`metacache`]: names and attributes this mount knows;
//! - [`inodes`]: inode numbers for a path-based protocol;
//! - [`readahead`]: cached file blocks and sequential read-ahead;
//! - [`smallfiles`]: small files this mount wrote, kept for reading back;
//! - [`fs`]: the filesystem core (write buffers, consistency), kernel-free;
//! - [`fuse`]: the thin fuser adapter and the errno mapping.

pub mod batch;
pub mod chunk;
pub mod events;
pub mod file_bytes;
pub mod fs;
pub mod fuse;
pub mod inodes;
pub mod logread;
pub mod metacache;
pub mod names;
pub mod prefetch;
pub mod readahead;
pub mod rpc;
pub mod smallfiles;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use fuser::{Config as FuseConfig, MountOption, Session, SessionACL};

use dfos_protocol::ErrorCode;
use rpc::{KafkaRpc, KafkaSettings, RpcError};

#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: KafkaSettings,
    pub user: String,
    pub password: String,
    pub mountpoint: PathBuf,
    /// Let other local users see the mount (needs user_allow_other).
    pub allow_other: bool,
    /// How long names and attributes are trusted without news from
    /// `dfos.events` (which normally invalidates them within milliseconds).
    pub cache_ttl: Duration,
    /// Mount read-only: the kernel refuses every change with EROFS before
    /// it reaches mountd, as for `mount -o ro`.
    pub read_only: bool,
    /// Serve extended attributes (`user.` names). Off, every xattr call is
    /// ENOSYS and the kernel stops asking, so `ls -l` and writes cost no
    /// attribute lookups (JuiceFS likewise needs `--enable-xattr`).
    pub xattrs: bool,
    /// Every `open()` asks a storage node for the file's attributes, as
    /// NFS's close-to-open does: one round trip per open, and a change
    /// another mount closed is seen at once, not when its event arrives.
    pub close_to_open: bool,
}

/// The password for `user`: the first line of `file`, else DFOS_PASSWORD,
/// else a prompt on the terminal.
pub fn read_password(file: Option<&std::path::Path>, user: &str) -> anyhow::Result<String> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
        return Ok(text.lines().next().unwrap_or_default().to_owned());
    }
    if let Ok(password) = std::env::var("DFOS_PASSWORD") {
        return Ok(password);
    }
    rpassword::prompt_password(format!("Password for {user}: "))
        .context("no password: use --password-file, DFOS_PASSWORD or a terminal")
}

/// Chunks are allocated and freed by several threads, and glibc gives each
/// thread a heap of its own that keeps its peak: a 4 GiB copy held
/// 170-270 MiB resident. Two heaps for all threads hold about half that.
/// (Mapping every chunk instead, with a fixed mmap threshold, held 45 MiB
/// but cost 2.5 times the CPU per GiB in page faults.)
fn share_heaps_between_threads() {
    // SAFETY: mallopt only changes allocator parameters; called before any
    // thread of ours exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
}

/// Connects, logs in, mounts, and serves until SIGINT, SIGTERM or an
/// external unmount. Nothing is mounted unless login succeeded.
pub fn run(config: Config) -> anyhow::Result<()> {
    share_heaps_between_threads();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let deadline = config.kafka.deadline;
    let brokers = config.kafka.brokers.clone();
    let hint = config.kafka.unreachable_hint().unwrap_or_default();
    let rpc = runtime.block_on(async {
        let rpc = KafkaRpc::connect(config.kafka.clone(), &config.user).await.map_err(|e| match e {
            RpcError::Timeout => {
                anyhow::anyhow!("cannot reach Kafka at {brokers} within {deadline:?}{hint}")
            }
            other => anyhow::anyhow!("cannot reach Kafka at {brokers}: {other}{hint}"),
        })?;
        match rpc.login(&config.password).await {
            Ok(()) => Ok(rpc),
            Err(e) => {
                rpc.shutdown().await;
                match e {
                    RpcError::Remote(ErrorCode::AccessDenied) => {
                        bail!("authentication failed for user {}", config.user)
                    }
                    RpcError::Timeout => bail!("no storage daemon answered within {deadline:?} (is storaged running?)"),
                    other => bail!("login failed: {other}"),
                }
            }
        }
    })?;
    log::info!("op=login user={} ok; mounting at {}", config.user, config.mountpoint.display());

    let fs = Arc::new(fs::DfosFs::with_cache_ttl(rpc.clone(), config.cache_ttl));
    let notifier_slot = fuse::NotifierSlot::default();
    let serving = fuse::Serving { xattrs: config.xattrs, close_to_open: config.close_to_open };
    let adapter = fuse::FuseAdapter::new(fs.clone(), runtime.handle().clone(), notifier_slot.clone(), serving);
    let mut fuse_config = FuseConfig::default();
    fuse_config.mount_options = vec![
        MountOption::FSName(format!("dfos:{}", config.user)),
        MountOption::Subtype("dfos".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    if config.read_only {
        fuse_config.mount_options.push(MountOption::RO);
    }
    if config.allow_other {
        fuse_config.acl = SessionACL::All;
        fuse_config.mount_options.push(MountOption::AutoUnmount);
    }
    fuse_config.n_threads = Some(2);
    let mounted = Session::new(adapter, &config.mountpoint, &fuse_config);
    let mut session = match mounted {
        Ok(session) => session,
        Err(e) => {
            runtime.block_on(rpc.shutdown());
            return Err(e).with_context(|| format!("cannot mount at {}", config.mountpoint.display()));
        }
    };

    let notifier = session.notifier();
    let _ = notifier_slot.set(notifier.clone());
    let followed = rpc.followed_owners();
    let listener = events::EventListener::start(&config.kafka, &config.user, rpc.origin(), followed, move |change| {
        for invalidation in fs.remote_change(change) {
            // ENOENT only means the kernel had nothing cached.
            let _ = match invalidation {
                fs::Invalidation::Entry { parent, name } => {
                    notifier.inval_entry(fuser::INodeNo(parent), &names::from_wire(&name))
                }
                fs::Invalidation::Inode(ino) => notifier.inval_inode(fuser::INodeNo(ino), 0, 0),
            };
        }
    });
    let mut listener = match listener {
        Ok(listener) => Some(listener),
        Err(e) => {
            log::warn!(
                "op=events user={} cannot follow other mounts' changes: {e}; caches expire by TTL only",
                config.user
            );
            None
        }
    };
    let mut unmounter = session.unmount_callable();
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
    let signal_handle = signals.handle();
    let signal_thread = std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            log::info!("op=unmount signal={signal}");
            if let Err(e) = unmounter.unmount() {
                log::error!("op=unmount error={e}");
            }
        }
    });
    let served = session.run();
    if let Some(listener) = listener.as_mut() {
        listener.stop();
    }
    signal_handle.close();
    let _ = signal_thread.join();
    runtime.block_on(rpc.shutdown());
    runtime.shutdown_timeout(Duration::from_secs(2));
    served.context("FUSE session failed")?;
    log::info!("op=unmount user={} done", config.user);
    Ok(())
}

/// A regular file of `size` bytes with all three times at `time`, as the
/// caches' unit tests need one.
#[cfg(test)]
pub(crate) fn test_file_attr(size: u64, time: dfos_protocol::Timestamp) -> dfos_protocol::FileAttr {
    dfos_protocol::FileAttr {
        kind: dfos_protocol::FileKind::File,
        size,
        mode: 0o644,
        nlink: 1,
        atime: time,
        mtime: time,
        ctime: time,
        blocks: 0,
        link: None,
    }
}
