//! The randomized model test: a long random sequence of create, write at
//! offsets, appends, exclusive creates, read, truncate, rename, exchange, unlink,
//! mkdir, rmdir, hard link, copies of ranges, fallocate and extended
//! attributes on a dfos mount and on a local directory. Every step's result must match; after every
//! step the trees' shapes (names, kinds, modes, sizes) must match, and
//! every 25 steps and at the end their contents too.
//!
//! Fixed seed and bounded length here; `bench/run.sh` runs it longer with
//! DFOS_MODEL_STEPS and DFOS_MODEL_SEED. Every caching change must keep it
//! green.

mod common;

use common::model::{tree_listing, tree_shape, Workload};
use common::*;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn random_operations_match_a_local_directory() {
    let steps = env_or("DFOS_MODEL_STEPS", 300);
    let seed = env_or("DFOS_MODEL_SEED", 1);
    let d = Deployment::start("model");
    let m = d.mount_with_xattrs(USER1);
    let model = d.local_dir("model");
    let mut workload = Workload::new(seed);
    for step in 1..=steps {
        let what = workload.step(&m.path, &model);
        assert_eq!(tree_shape(&m.path), tree_shape(&model), "tree shapes differ after step {step}: {what}");
        if step % 25 == 0 || step == steps {
            assert_eq!(tree_listing(&m.path), tree_listing(&model), "contents differ after step {step}: {what}");
        }
    }
    drop_caches();
    assert_eq!(tree_listing(&m.path), tree_listing(&model), "contents differ after dropping caches");
    assert_eq!(tree_listing(&d.storage.join("User1")), tree_listing(&model), "storage node differs");
}
