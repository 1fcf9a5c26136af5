//! The sensors that run on threads of their own: timer and cron ticks, and file watches.
//! The HTTP sensor is the admin endpoint's `POST /sensors/NAME`; `streams` and `runs` are
//! raised by the executors and the engine.
//!
//! Checkpoints (per sensor, in the state database) say what a sensor has fully handled:
//! - **timer, cron**: key `tick`, the last tick whose runs ended. At start the sensor goes on
//!   after the last tick it raised; ticks that fell while the process was down are logged,
//!   counted (`nexus_workflow_sensor_missed_ticks_total`), and then skipped (the next tick
//!   carries `missed = N`) or, with `missed = "catch_up"`, raised oldest first (at most
//!   [`MAX_CATCH_UP`](crate::spec::MAX_CATCH_UP)).
//! - **file**: one key per file (its path under the directory), `SIZE:MTIME_MS` or
//!   `deleted`. At start the sensor rescans the directory against them, so a file created,
//!   changed or deleted while it was down raises its event.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use serde_json::json;

use crate::event::{rfc3339, unix_ms, Event};
use crate::spec::{Missed, Sensor, SensorKind, MAX_CATCH_UP};
use crate::{telemetry, Shared};

/// Starts `sensor`'s thread, if it has one.
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    sensor: &Sensor,
) -> std::io::Result<Option<JoinHandle<()>>> {
    let name = sensor.name.clone();
    let shared = Arc::clone(shared);
    let thread = std::thread::Builder::new().name(format!("nexus-sensor-{name}"));
    match &sensor.kind {
        SensorKind::Timer { .. } | SensorKind::Cron { .. } => {
            Ok(Some(thread.spawn(move || ticks(&shared, &name))?))
        }
        SensorKind::File { .. } => Ok(Some(thread.spawn(move || watch(&shared, &name))?)),
        #[cfg(feature = "s3")]
        SensorKind::S3 { .. } => Ok(Some(
            thread.spawn(move || crate::s3::sensor(&shared, &name))?,
        )),
        #[cfg(not(feature = "s3"))]
        SensorKind::S3 { .. } => Ok(None),
        #[cfg(feature = "mysql")]
        SensorKind::Mysql { .. } => Ok(Some(
            thread.spawn(move || crate::mysql::sensor(&shared, &name))?,
        )),
        #[cfg(not(feature = "mysql"))]
        SensorKind::Mysql { .. } => Ok(None),
        SensorKind::Http | SensorKind::Streams | SensorKind::Runs => Ok(None),
    }
}

/// Raises, retrying a state write that failed (with backoff) for up to the sensor's
/// timeout. False when it could not be recorded: a timer counts the tick as missed, a file
/// sensor starts again with a rescan (which raises it again).
pub(crate) fn raise(shared: &Shared, event: Event, cursor: Option<(&str, &str)>) -> bool {
    let timeout = shared
        .plan
        .sensors
        .get(&event.sensor)
        .map_or(Duration::from_secs(30), |s| s.timeout);
    let deadline = Instant::now() + timeout;
    let mut wait = Duration::from_millis(100);
    loop {
        match shared.raise(event.clone(), cursor) {
            Ok(_) => return true,
            Err(crate::RaiseError::Store(e) | crate::RaiseError::Unavailable(e)) => {
                telemetry::sensor_error(&event.sensor);
                if Instant::now() + wait > deadline {
                    tracing::error!(sensor = %event.sensor, event = %event.id, error = %e,
                                    timeout_ms = timeout.as_millis() as u64,
                                    "Cannot record an event within the sensor's timeout.");
                    return false;
                }
                tracing::warn!(sensor = %event.sensor, error = %e, "Cannot record an event; trying again.");
                if shared.stop.wait(wait) {
                    return false;
                }
                wait = (wait * 2).min(Duration::from_secs(10));
            }
            Err(e) => {
                tracing::error!(sensor = %event.sensor, error = %e, "A sensor raised an event its schema refuses.");
                return true;
            }
        }
    }
}

fn next_tick(kind: &SensorKind, after_ms: i64) -> Option<i64> {
    match kind {
        SensorKind::Timer { every, .. } => {
            let every = i64::try_from(every.as_millis()).ok()?.max(1);
            Some((after_ms.div_euclid(every) + 1) * every)
        }
        SensorKind::Cron { schedule, .. } => {
            let after = chrono::DateTime::from_timestamp_millis(after_ms)?;
            schedule
                .find_next_occurrence(&after, false)
                .ok()
                .map(|t| t.timestamp_millis())
        }
        _ => None,
    }
}

fn ticks(shared: &Shared, name: &str) {
    let Some(sensor) = shared.plan.sensors.get(name) else {
        return;
    };
    let missed_policy = match &sensor.kind {
        SensorKind::Timer { missed, .. } | SensorKind::Cron { missed, .. } => *missed,
        _ => return,
    };
    let parse = |m: HashMap<String, String>| m.get("tick").and_then(|v| v.parse::<i64>().ok());
    let last = loop {
        match (
            shared.store.checkpoints(name),
            shared.store.open_cursors(name),
        ) {
            (Ok(done), Ok(open)) => break parse(done).max(parse(open)),
            (Err(e), _) | (_, Err(e)) => {
                telemetry::sensor_error(name);
                tracing::warn!(sensor = name, error = %e, "Cannot read the sensor's checkpoint.");
                if shared.stop.wait(Duration::from_secs(1)) {
                    return;
                }
            }
        }
    };
    let now = unix_ms(SystemTime::now());
    let Some(mut next) = next_tick(&sensor.kind, last.unwrap_or(now)) else {
        tracing::warn!(sensor = name, "The schedule has no tick to come.");
        return;
    };
    // Ticks that fell while down: (last, now].
    // The last MAX_CATCH_UP of them (catch_up raises those), their count, and the first.
    let mut fell = std::collections::VecDeque::new();
    let mut fell_count: u64 = 0;
    let first_fell = next;
    while next <= now {
        fell_count += 1;
        fell.push_back(next);
        if fell.len() as u64 > MAX_CATCH_UP {
            fell.pop_front();
        }
        match next_tick(&sensor.kind, next) {
            Some(t) => next = t,
            None => return,
        }
        if fell_count >= 10_000_000 {
            // A tiny interval over a long outage: count no further.
            next = next_tick(&sensor.kind, now).unwrap_or(next);
            break;
        }
    }
    let mut missed: u64 = 0;
    if fell_count > 0 {
        telemetry::missed_ticks(name, fell_count);
        match missed_policy {
            Missed::Skip => {
                tracing::warn!(sensor = name, missed = fell_count, first = %rfc3339(first_fell),
                               "Ticks fell while the process was down; skipped (missed = \"skip\").");
                missed = fell_count;
            }
            Missed::CatchUp => {
                let skipped = fell_count - fell.len() as u64;
                tracing::warn!(
                    sensor = name,
                    missed = fell_count,
                    raised = fell.len(),
                    skipped,
                    "Ticks fell while the process was down; raising them (missed = \"catch_up\")."
                );
                for (i, t) in fell.iter().enumerate() {
                    let m = if i == 0 { skipped } else { 0 };
                    if !raise_tick(shared, name, *t, m) {
                        missed += 1;
                    }
                }
            }
        }
    }
    loop {
        let wait =
            Duration::from_millis(u64::try_from(next - unix_ms(SystemTime::now())).unwrap_or(0));
        if shared.stop.wait(wait) {
            return;
        }
        let now = unix_ms(SystemTime::now());
        if now < next {
            continue;
        }
        if raise_tick(shared, name, next, missed) {
            missed = 0;
        } else {
            missed += 1;
        }
        // A tick that came too late to keep up (a suspended VM) skips the ones that fell.
        loop {
            match next_tick(&sensor.kind, next) {
                Some(t) => next = t,
                None => return,
            }
            if next > now {
                break;
            }
            missed += 1;
        }
        if missed > 0 {
            telemetry::missed_ticks(name, missed);
        }
    }
}

fn raise_tick(shared: &Shared, name: &str, at: i64, missed: u64) -> bool {
    let payload = json!({"scheduled": rfc3339(at), "scheduled_ms": at, "missed": missed});
    let event = Event::now(name, format!("tick-{at}"), payload);
    let value = at.to_string();
    raise(shared, event, Some(("tick", &value)))
}

/// What the sensor knows of one file: `SIZE:MTIME_MS`, or `deleted`.
fn file_state(meta: Option<&std::fs::Metadata>) -> String {
    match meta {
        Some(m) => {
            let mtime = m.modified().map_or(0, unix_ms);
            format!("{}:{mtime}", m.len())
        }
        None => "deleted".into(),
    }
}

struct Watch<'a> {
    shared: &'a Shared,
    name: &'a str,
    root: PathBuf,
    recursive: bool,
    inotify: Inotify,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    known: HashMap<String, String>,
    /// How long a scan (the first, or of a new directory) may take: the sensor's timeout.
    timeout: Duration,
}

const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::MODIFY)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::ONLYDIR);

impl Watch<'_> {
    /// Watches `dir` (and, recursive, what is under it) and marks what it holds as changed,
    /// within the sensor's timeout.
    fn scan(&mut self, dir: &Path, changed: &mut HashMap<String, Instant>) -> std::io::Result<()> {
        let deadline = Instant::now() + self.timeout;
        self.add_dir(dir, changed, deadline)
    }

    fn add_dir(
        &mut self,
        dir: &Path,
        changed: &mut HashMap<String, Instant>,
        deadline: Instant,
    ) -> std::io::Result<()> {
        if Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "scanning {} took longer than the sensor's timeout ({} ms)",
                    dir.display(),
                    self.timeout.as_millis()
                ),
            ));
        }
        let wd = self.inotify.watches().add(dir, MASK)?;
        self.dirs.insert(wd, dir.to_path_buf());
        // What is in it already (it may have filled before the watch was added).
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                if self.recursive {
                    self.add_dir(&path, changed, deadline)?;
                }
            } else if kind.is_file() {
                if let Some(rel) = self.relative(&path) {
                    changed.insert(rel, Instant::now());
                }
            }
        }
        Ok(())
    }

    fn relative(&self, path: &Path) -> Option<String> {
        path.strip_prefix(&self.root)
            .ok()
            .and_then(|p| p.to_str())
            .map(str::to_string)
    }

    /// Raises the event of one settled file, if it changed; an error when it could not be
    /// recorded (the caller starts again with a rescan, which finds the change again).
    fn settle(&mut self, rel: &str) -> std::io::Result<()> {
        let path = self.root.join(rel);
        let meta = std::fs::symlink_metadata(&path)
            .ok()
            .filter(|m| m.is_file());
        let now = file_state(meta.as_ref());
        let before = self.known.get(rel).map(String::as_str);
        let change = match (before, &meta) {
            (None | Some("deleted"), Some(_)) => "created",
            (Some(b), Some(_)) if b != now => "updated",
            (Some(b), None) if b != "deleted" => "deleted",
            _ => return Ok(()),
        };
        let (size, mtime) = match &meta {
            Some(m) => (m.len(), m.modified().map_or(0, unix_ms)),
            None => {
                // A deleted file's last known size and time.
                let mut parts = before.unwrap_or("0:0").split(':');
                (
                    parts.next().and_then(|s| s.parse().ok()).unwrap_or(0),
                    parts.next().and_then(|s| s.parse().ok()).unwrap_or(0),
                )
            }
        };
        let name = Path::new(rel)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(rel)
            .to_string();
        let payload = json!({"change": change, "path": path, "relative": rel, "name": name,
                             "size": size, "mtime_ms": mtime});
        let id = format!("{change}:{rel}:{size}:{mtime}");
        let event = Event::now(self.name, id, payload);
        if !raise(self.shared, event, Some((rel, &now))) {
            return Err(std::io::Error::other(format!(
                "the event of {rel:?} was not recorded"
            )));
        }
        self.known.insert(rel.to_string(), now);
        Ok(())
    }
}

fn watch(shared: &Shared, name: &str) {
    let Some(sensor) = shared.plan.sensors.get(name) else {
        return;
    };
    let SensorKind::File {
        path,
        recursive,
        debounce,
    } = &sensor.kind
    else {
        return;
    };
    restarting(shared, name, || {
        watch_once(shared, name, path, *recursive, *debounce)
            .map_err(|e| format!("{}: {e}", path.display()))
    });
}

/// Runs a sensor's `attempt` until it returns `Ok` (the workflow stopped). After each
/// failure: counted (`nexus_workflow_sensor_errors_total`), logged, and tried again after a
/// backoff from 500 ms doubling to 60 s, back to 500 ms after an attempt that ran a minute.
pub(crate) fn restarting(
    shared: &Shared,
    name: &str,
    mut attempt: impl FnMut() -> Result<(), String>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        match attempt() {
            Ok(()) => return,
            Err(e) => {
                telemetry::sensor_error(name);
                if started.elapsed() >= Duration::from_secs(60) {
                    backoff = Duration::from_millis(500);
                }
                tracing::warn!(sensor = name, error = %e, wait_ms = backoff.as_millis() as u64,
                               "Sensor failed; starting it again from its checkpoints.");
                if shared.stop.wait(backoff) {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Watches until stopped (`Ok`) or until something fails (`Err`, and the caller starts
/// again with a full rescan).
fn watch_once(
    shared: &Shared,
    name: &str,
    root: &Path,
    recursive: bool,
    debounce: Duration,
) -> std::io::Result<()> {
    let sensor_timeout = shared
        .plan
        .sensors
        .get(name)
        .map_or(Duration::from_secs(30), |s| s.timeout);
    let io = |e: crate::store::StoreError| std::io::Error::other(e.to_string());
    let mut known = shared.store.checkpoints(name).map_err(io)?;
    known.extend(shared.store.open_cursors(name).map_err(io)?);
    let mut w = Watch {
        shared,
        name,
        root: root.to_path_buf(),
        recursive,
        inotify: Inotify::init()?,
        dirs: HashMap::new(),
        known,
        timeout: sensor_timeout,
    };
    // Watch first, then scan: nothing changes unseen between the two. Every file present
    // and every file known (it may be gone) is looked at once.
    let mut changed: HashMap<String, Instant> = HashMap::new();
    w.scan(root, &mut changed)?;
    let long_ago = Instant::now()
        .checked_sub(debounce)
        .unwrap_or_else(Instant::now);
    for rel in w.known.keys() {
        changed.insert(rel.clone(), long_ago);
    }
    for at in changed.values_mut() {
        *at = long_ago;
    }
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let now = Instant::now();
        let due: Vec<String> = changed
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= debounce)
            .map(|(k, _)| k.clone())
            .collect();
        for rel in due {
            changed.remove(&rel);
            w.settle(&rel)?;
        }
        let wait = changed
            .values()
            .map(|at| (*at + debounce).saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(3600));
        let timeout = rustix::event::Timespec {
            tv_sec: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(wait.subsec_nanos()),
        };
        let stop_fd = shared.stop.fd();
        let mut fds = [
            rustix::event::PollFd::new(&w.inotify, rustix::event::PollFlags::IN),
            rustix::event::PollFd::new(&stop_fd, rustix::event::PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        if shared.stop.is_stopped() {
            return Ok(());
        }
        let events: Vec<(WatchDescriptor, EventMask, Option<PathBuf>)> =
            match w.inotify.read_events(&mut buffer) {
                Ok(events) => events
                    .map(|e| (e.wd, e.mask, e.name.map(PathBuf::from)))
                    .collect(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Vec::new(),
                Err(e) => return Err(e),
            };
        for (wd, mask, file) in events {
            if mask.contains(EventMask::Q_OVERFLOW) {
                return Err(std::io::Error::other(
                    "inotify queue overflowed; rescanning",
                ));
            }
            let Some(dir) = w.dirs.get(&wd).cloned() else {
                continue;
            };
            if mask.contains(EventMask::DELETE_SELF) && dir == root {
                return Err(std::io::Error::other("the watched directory was removed"));
            }
            if mask.contains(EventMask::IGNORED) {
                w.dirs.remove(&wd);
                continue;
            }
            let Some(file) = file else { continue };
            let path = dir.join(file);
            if mask.contains(EventMask::ISDIR) {
                if recursive && mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                    w.scan(&path, &mut changed)?;
                }
                if mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM) {
                    // Files known under a directory that went away.
                    if let Some(prefix) = w.relative(&path) {
                        let prefix = format!("{prefix}/");
                        for rel in w.known.keys().filter(|k| k.starts_with(&prefix)) {
                            changed.insert(rel.clone(), Instant::now());
                        }
                    }
                }
                continue;
            }
            if let Some(rel) = w.relative(&path) {
                changed.insert(rel, Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn timer_ticks_are_aligned_to_the_interval() {
        let kind = SensorKind::Timer {
            every: Duration::from_millis(1000),
            missed: Missed::Skip,
        };
        assert_eq!(next_tick(&kind, 1500), Some(2000));
        assert_eq!(next_tick(&kind, 2000), Some(3000));
    }

    #[test]
    fn cron_ticks_follow_the_schedule_with_or_without_seconds() {
        for text in ["0 */5 * * * *", "*/5 * * * *"] {
            let schedule = croner::Cron::new(text)
                .with_seconds_optional()
                .parse()
                .unwrap();
            let kind = SensorKind::Cron {
                schedule: Box::new(schedule),
                missed: Missed::Skip,
            };
            let after = ms("2026-01-01T00:01:00Z");
            assert_eq!(
                next_tick(&kind, after),
                Some(ms("2026-01-01T00:05:00Z")),
                "{text}"
            );
            let at = ms("2026-01-01T00:05:00Z");
            assert_eq!(
                next_tick(&kind, at),
                Some(ms("2026-01-01T00:10:00Z")),
                "{text}"
            );
        }
    }
}
