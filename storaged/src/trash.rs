//! Old versions of deleted and replaced files, kept for a while.
//!
//! With `storaged --trash-hours N`, a regular file that an unlink removes,
//! that a rename replaces (how editors, `sed -i` and `rsync` save), or that
//! a truncate to zero empties (a shell's `>`, `cp` onto it), is moved into
//! the user's `.trash/` instead of being deleted, as JuiceFS's
//! trash does. It lands in a bucket per hour of the request's time, under
//! its old path, named `name@HH.MM.SS.nnnnnnnnn`:
//! `.trash/2026-12-06T19/docs/report.txt@19.55.01.123456789`. Names and
//! buckets come from the envelope's time, so every replica keeps the same
//! versions under the same names. Buckets older than N hours are removed
//! whole, at most once a minute per user, while the user deletes more.
//!
//! Guarantees: a version is only ever moved into the trash, never copied
//! (no extra disk traffic); nothing already inside `.trash/` is kept again,
//! so deleting there frees space at once; the trash never follows a
//! symlink, even one a user put at `.trash`. When a file cannot be kept
//! (its name would grow past NAME_MAX, `.trash` is not a directory), it is
//! deleted as asked and the reason logged.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::Mutex;

use dfos_protocol::path::{join, split, TRASH_DIR};
use dfos_protocol::Timestamp;

use crate::{paths, sys};

const SECS_PER_HOUR: i64 = 3600;
/// How often, in the requests' own time, one user's old buckets are swept.
const SWEEP_EVERY_SECS: i64 = 60;

pub struct Trash {
    keep_hours: i64,
    /// Per user root: the request time of the last sweep.
    last_sweep: Mutex<HashMap<std::path::PathBuf, i64>>,
}

/// Whether `rel` lies inside the trash (or is the trash itself).
pub fn inside(rel: &str) -> bool {
    rel == TRASH_DIR || rel.strip_prefix(TRASH_DIR).is_some_and(|rest| rest.starts_with('/'))
}

impl Trash {
    pub fn new(keep_hours: u64) -> Self {
        Trash {
            keep_hours: keep_hours.min(i64::MAX as u64 / SECS_PER_HOUR as u64) as i64,
            last_sweep: Mutex::default(),
        }
    }

    /// Moves the regular file at `rel` under the user's `root` into the
    /// trash. False when it was not kept and the caller must remove it.
    pub fn keep(&self, root: &Path, rel: &str, now: Timestamp) -> bool {
        if inside(rel) || rel.is_empty() {
            return false;
        }
        self.sweep_if_due(root, now);
        let kept = paths::resolve(root, rel).map_err(io::Error::other).and_then(|victim| {
            let bucket = join(TRASH_DIR, &hour_bucket(now.secs));
            let (parent, name) = split(rel);
            let version_dir = if parent.is_empty() { bucket } else { join(&bucket, parent) };
            make_dirs(root, &version_dir)?;
            let version = format!("{name}@{}", time_of_day(now));
            move_without_replacing(root, &victim, &join(&version_dir, &version))
        });
        match kept {
            Ok(()) => true,
            Err(e) => {
                log::warn!("op=trash path={rel:?} root={root:?} not kept, removed as asked: {e}");
                false
            }
        }
    }

    fn sweep_if_due(&self, root: &Path, now: Timestamp) {
        {
            let mut last = self.last_sweep.lock().unwrap();
            let due = last.get(root).is_none_or(|&at| now.secs - at >= SWEEP_EVERY_SECS || now.secs < at);
            if !due {
                return;
            }
            last.insert(root.to_owned(), now.secs);
        }
        let Ok(trash) = paths::resolve(root, TRASH_DIR) else { return };
        let Ok(buckets) = fs::read_dir(&trash) else { return };
        for bucket in buckets.flatten() {
            let name = bucket.file_name();
            let Some(hour) = name.to_str().and_then(parse_hour_bucket) else { continue };
            let is_dir = bucket.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && hour + SECS_PER_HOUR + self.keep_hours * SECS_PER_HOUR <= now.secs {
                // remove_dir_all never follows symlinks inside the bucket.
                if let Err(e) = fs::remove_dir_all(bucket.path()) {
                    log::warn!("op=trash-sweep path={:?} cannot remove an expired bucket: {e}", bucket.path());
                }
            }
        }
    }
}

/// Creates `rel` and its missing parents as real directories under `root`.
fn make_dirs(root: &Path, rel: &str) -> io::Result<()> {
    let mut prefix = String::new();
    for component in rel.split('/') {
        prefix = join(&prefix, component);
        let dir = paths::resolve(root, &prefix).map_err(io::Error::other)?;
        match fs::create_dir(&dir) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if !fs::symlink_metadata(&dir)?.is_dir() {
                    return Err(io::Error::other(format!("{prefix:?} is not a directory")));
                }
            }
            other => other?,
        }
    }
    Ok(())
}

/// Renames `victim` to `rel` under `root`, or to `rel-2`, `rel-3`, ... when
/// an earlier version already has the name (two deletes of one path in one
/// batch share a time).
fn move_without_replacing(root: &Path, victim: &Path, rel: &str) -> io::Result<()> {
    for attempt in 1u32.. {
        let name = if attempt == 1 { rel.to_owned() } else { format!("{rel}-{attempt}") };
        let target = paths::resolve(root, &name).map_err(io::Error::other)?;
        match sys::rename_no_replace(victim, &target) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
            done => return done,
        }
    }
    unreachable!("some suffix is free")
}

/// `2026-12-06T19` for any time in that hour (UTC).
fn hour_bucket(secs: i64) -> String {
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    format!("{year:04}-{month:02}-{day:02}T{:02}", secs.rem_euclid(86_400) / SECS_PER_HOUR)
}

/// The first second of a bucket named by [`hour_bucket`].
fn parse_hour_bucket(name: &str) -> Option<i64> {
    let (date, hour) = name.split_once('T')?;
    let mut parts = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (parts.next()??, parts.next()??, parts.next()??);
    let hour: i64 = hour.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || !(0..24).contains(&hour) || name.len() != 13 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * SECS_PER_HOUR)
}

/// `19.55.01.123456789`: the time of day of `now` (UTC), to the nanosecond.
fn time_of_day(now: Timestamp) -> String {
    let in_day = now.secs.rem_euclid(86_400);
    format!("{:02}.{:02}.{:02}.{:09}", in_day / 3600, in_day % 3600 / 60, in_day % 60, now.nanos)
}

// Howard Hinnant's algorithms for the proleptic Gregorian calendar
// (http://howardhinnant.github.io/date_algorithms.html).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_name_the_hour_and_parse_back() {
        // 2026-12-06T19:55:01Z
        let secs = 1_796_586_901;
        assert_eq!(hour_bucket(secs), "2026-12-06T19");
        assert_eq!(parse_hour_bucket("2026-12-06T19"), Some(secs - 55 * 60 - 1));
        assert_eq!(time_of_day(Timestamp { secs, nanos: 7 }), "19.55.01.000000007");
        for days in [-800_000, -1, 0, 59, 60, 365, 11_016, 20_428, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        for bad in ["2026-12-06", "2026-13-06T19", "2026-12-06T24", "x-12-06T19", "2026-12-06T19x", "keep"] {
            assert_eq!(parse_hour_bucket(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_paths_under_the_trash_are_inside_it() {
        assert!(inside(".trash") && inside(".trash/a/b"));
        assert!(!inside(".trashy") && !inside("a/.trash") && !inside(""));
    }
}
