//! The workflow's state in SQLite (WAL; inspect it with `sqlite3`): the event log, each
//! sensor's checkpoints, and every rule run with its steps. Schema changes are numbered
//! migrations recorded in `PRAGMA user_version`.
//!
//! Delivery is at least once. An event and the runs it starts are written in one
//! transaction before anything runs; the event is `done` and its sensor checkpoint
//! (`cursor`) advances only in the transaction that ends its last run. A restart resumes
//! every run not yet `success` or `failed`.

use std::collections::HashMap;
use std::path::Path;

use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use serde_json::Value;

use crate::event::{unix_ms, Event};

/// Schema migrations, in order; `user_version` is how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: the event log, checkpoints, runs, steps.
    "CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        sensor TEXT NOT NULL,
        id TEXT NOT NULL,
        time_ms INTEGER NOT NULL,
        payload TEXT NOT NULL,
        cursor_key TEXT,
        cursor_value TEXT,
        done INTEGER NOT NULL DEFAULT 0,
        UNIQUE (sensor, id)
     );
     CREATE INDEX events_open ON events (done) WHERE done = 0;
     CREATE TABLE checkpoints (
        sensor TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (sensor, key)
     );
     CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        rule TEXT NOT NULL,
        event_seq INTEGER NOT NULL REFERENCES events (seq),
        state TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        started_ms INTEGER,
        finished_ms INTEGER,
        error TEXT,
        UNIQUE (rule, event_seq)
     );
     CREATE INDEX runs_state ON runs (state);
     CREATE TABLE steps (
        run INTEGER NOT NULL REFERENCES runs (id),
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        started_ms INTEGER,
        finished_ms INTEGER,
        error TEXT,
        result TEXT,
        PRIMARY KEY (run, name)
     );",
    // 2: a run's event found without a scan (ending a run counts its event's open runs), and
    // old events found by time (retention).
    "CREATE INDEX runs_event ON runs (event_seq);
     CREATE INDEX events_time ON events (time_ms);",
];

/// A run's or a step's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for a slot.
    Queued,
    /// Running.
    Started,
    /// A step failed and waits to try again.
    Retrying,
    /// Failed for good.
    Failed,
    /// Done.
    Success,
    /// A step not run because one before it failed.
    Skipped,
}

impl State {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Started => "started",
            State::Retrying => "retrying",
            State::Failed => "failed",
            State::Success => "success",
            State::Skipped => "skipped",
        }
    }

    /// The state named `text`.
    pub fn parse(text: &str) -> Option<State> {
        Some(match text {
            "queued" => State::Queued,
            "started" => State::Started,
            "retrying" => State::Retrying,
            "failed" => State::Failed,
            "success" => State::Success,
            "skipped" => State::Skipped,
            _ => return None,
        })
    }

    /// Whether nothing more happens to it.
    pub fn is_final(self) -> bool {
        matches!(self, State::Failed | State::Success | State::Skipped)
    }
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[error("workflow state {path}: {message}")]
pub struct StoreError {
    path: String,
    message: String,
}

/// One run as listed by `nexus runs` and `/runs`.
#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    /// The run's id.
    pub id: i64,
    /// Its rule.
    pub rule: String,
    /// Its state.
    pub state: State,
    /// The sensor of the event that started it.
    pub sensor: String,
    /// That event's id.
    pub event: String,
    /// Created, started and finished, RFC 3339 (started and finished once they happened).
    pub created: String,
    /// When it (last) started.
    pub started: Option<String>,
    /// When it ended.
    pub finished: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Its steps.
    pub steps: Vec<StepView>,
}

/// One step of a [`RunView`].
#[derive(Debug, Clone, Serialize)]
pub struct StepView {
    /// The step's name.
    pub name: String,
    /// Its state.
    pub state: State,
    /// Tries so far.
    pub attempts: u32,
    /// When the last try started.
    pub started: Option<String>,
    /// When it ended.
    pub finished: Option<String>,
    /// Why its last try failed.
    pub error: Option<String>,
    /// What it produced (path, bytes, digest, exit status), as JSON.
    pub result: Option<Value>,
}

/// A run to (re)start.
#[derive(Debug, Clone)]
pub struct OpenRun {
    /// The run's id.
    pub id: i64,
    /// Its rule.
    pub rule: String,
    /// The event that started it.
    pub event: Event,
    /// The bus delivery to settle when it ends (a run the bus gave this node).
    pub delivery: Option<Delivery>,
}

/// A delivery of the AMQP bus, settled when its run ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The rule (its queue and channel).
    pub rule: String,
    /// The connection it came on: a settle for an older one is dropped (the broker has
    /// already given the message out again).
    pub generation: u64,
    /// Its tag on that connection.
    pub tag: u64,
}

/// What a step stored last time (for a resumed run).
#[derive(Debug, Clone)]
pub struct StepRecord {
    /// Its state.
    pub state: State,
    /// Tries so far.
    pub attempts: u32,
    /// Its result when it succeeded.
    pub result: Option<Value>,
}

/// The state database. One connection under a mutex: the control plane writes a few rows
/// per event and per step, never per chunk.
pub struct Store {
    path: String,
    db: Mutex<Connection>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn ms_text(ms: Option<i64>) -> Option<String> {
    ms.map(crate::event::rfc3339)
}

impl Store {
    /// Opens (creating) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let name = path.display().to_string();
        let fail = |e: &dyn std::fmt::Display| StoreError {
            path: name.clone(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        }
        let mut db = Connection::open(path).map_err(|e| fail(&e))?;
        db.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| fail(&e))?;
        // WAL: readers (nexus runs, /runs) never block the writer. synchronous=NORMAL for
        // progress (see `durable` for what is synced).
        db.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| fail(&e))?;
        db.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| fail(&e))?;
        db.pragma_update(None, "foreign_keys", "ON")
            .map_err(|e| fail(&e))?;
        let version: i64 = db
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| fail(&e))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(fail(&format!(
                "schema version {version} is newer than this nexus knows ({}); use a newer nexus",
                known
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            let tx = db.transaction().map_err(|e| fail(&e))?;
            tx.execute_batch(sql).map_err(|e| fail(&e))?;
            tx.pragma_update(None, "user_version", i as i64 + 1)
                .map_err(|e| fail(&e))?;
            tx.commit().map_err(|e| fail(&e))?;
        }
        Ok(Store {
            path: name,
            db: Mutex::new(db),
        })
    }

    fn fail(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Runs `work` in a transaction synced to disk at its commit (synchronous=FULL): events
    /// (acknowledged to their sensor once this returns) and the ends of runs (which move
    /// checkpoints) survive a power cut. Progress (a run or step started, a step's result)
    /// is written with synchronous=NORMAL: in WAL mode it survives the process dying, and a
    /// power cut can only take it back to the last synced commit, whose open runs the next
    /// start resumes; the sync of the next durable commit covers it too. Measured: a run of
    /// one step makes five commits, two of them synced.
    fn durable<T>(
        &self,
        work: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut db = self.db.lock();
        db.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| self.fail(e))?;
        let result = match db.transaction() {
            Ok(tx) => work(&tx).and_then(|value| tx.commit().map(|()| value)),
            Err(e) => Err(e),
        };
        let reset = db.pragma_update(None, "synchronous", "NORMAL");
        let value = result.map_err(|e| self.fail(e))?;
        reset.map_err(|e| self.fail(e))?;
        Ok(value)
    }

    /// Records `event` and a queued run for each of `rules`, in one transaction. Returns
    /// the new run ids, or `None` when the sensor already had an event with this id (a
    /// replay: nothing new happens). An event no rule wants is done at once, and its
    /// `cursor` (checkpoint key and value) applied.
    pub fn raise(
        &self,
        event: &Event,
        cursor: Option<(&str, &str)>,
        rules: &[&str],
    ) -> Result<Option<Vec<i64>>, StoreError> {
        self.durable(|tx| insert_event(tx, event, cursor, rules))
    }

    /// Records many events of one sensor, without cursors, in one transaction (one sync for
    /// all): the `streams` sensor under a flood of short streams. Each is (id, payload as
    /// JSON text, rules) and gets what [`raise`](Self::raise) would return for it.
    pub fn raise_many(
        &self,
        sensor: &str,
        time_ms: i64,
        events: &[(String, String, Vec<&str>)],
    ) -> Result<Vec<Option<Vec<i64>>>, StoreError> {
        self.durable(|tx| {
            let mut out = Vec::with_capacity(events.len());
            for (id, payload, rules) in events {
                out.push(insert_row(tx, sensor, id, time_ms, payload, None, rules)?);
            }
            Ok(out)
        })
    }

    /// A sensor's checkpoints (key to value).
    pub fn checkpoints(&self, sensor: &str) -> Result<HashMap<String, String>, StoreError> {
        let db = self.db.lock();
        let mut q = db
            .prepare_cached("SELECT key, value FROM checkpoints WHERE sensor = ?1")
            .map_err(|e| self.fail(e))?;
        let rows = q
            .query_map([sensor], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.fail(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.fail(e))
    }

    /// The cursors of a sensor's events not yet done (raised, their runs still going), by
    /// key: what the sensor has already handed over.
    pub fn open_cursors(&self, sensor: &str) -> Result<HashMap<String, String>, StoreError> {
        let db = self.db.lock();
        let mut q = db
            .prepare_cached(
                "SELECT cursor_key, cursor_value FROM events
                 WHERE sensor = ?1 AND done = 0 AND cursor_key IS NOT NULL ORDER BY seq",
            )
            .map_err(|e| self.fail(e))?;
        let rows = q
            .query_map([sensor], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.fail(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.fail(e))
    }

    /// Runs not finished (queued, started or retrying), oldest first, with their events.
    pub fn open_runs(&self) -> Result<Vec<OpenRun>, StoreError> {
        let db = self.db.lock();
        let mut q = db
            .prepare_cached(
                "SELECT r.id, r.rule, e.id, e.sensor, e.time_ms, e.payload
                 FROM runs r JOIN events e ON e.seq = r.event_seq
                 WHERE r.state IN ('queued', 'started', 'retrying') ORDER BY r.id",
            )
            .map_err(|e| self.fail(e))?;
        let rows = q
            .query_map([], |r| {
                let payload: String = r.get(5)?;
                Ok(OpenRun {
                    id: r.get(0)?,
                    rule: r.get(1)?,
                    event: Event {
                        id: r.get(2)?,
                        sensor: r.get(3)?,
                        time_ms: r.get(4)?,
                        payload: serde_json::from_str(&payload).unwrap_or(Value::Null),
                    },
                    delivery: None,
                })
            })
            .map_err(|e| self.fail(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.fail(e))
    }

    /// Whether `sensor` has an event `id`.
    pub fn has_event(&self, sensor: &str, id: &str) -> Result<bool, StoreError> {
        let db = self.db.lock();
        db.prepare_cached("SELECT 1 FROM events WHERE sensor = ?1 AND id = ?2")
            .and_then(|mut q| q.exists(params![sensor, id]))
            .map_err(|e| self.fail(e))
    }

    /// An event the bus confirmed (one transaction, synced): recorded with no runs here
    /// (unless this node's own consumer recorded it first, with its run), and its cursor
    /// applied at once.
    pub fn record_published(
        &self,
        event: &Event,
        cursor: Option<(&str, &str)>,
    ) -> Result<(), StoreError> {
        self.durable(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO events (sensor, id, time_ms, payload, done)
                 VALUES (?1, ?2, ?3, ?4, 1)",
                params![
                    event.sensor,
                    event.id,
                    event.time_ms,
                    event.payload.to_string()
                ],
            )?;
            if let Some((key, value)) = cursor {
                set_checkpoint(tx, &event.sensor, key, value)?;
            }
            Ok(())
        })
    }

    /// An event the bus delivered for `rule` (one transaction, synced): recorded if this
    /// node has not seen it (the node that published it has, without its cursor: that moved
    /// at the publish), with a queued run of `rule`. `None` when the run already succeeded
    /// here (a delivery whose ack was lost); a run that did not finish is queued again, and
    /// resumes from its first step that did not succeed.
    pub fn take_delivery(&self, event: &Event, rule: &str) -> Result<Option<i64>, StoreError> {
        self.durable(|tx| {
            let payload = event.payload.to_string();
            tx.execute(
                "INSERT OR IGNORE INTO events (sensor, id, time_ms, payload, done)
                 VALUES (?1, ?2, ?3, ?4, 0)",
                params![event.sensor, event.id, event.time_ms, payload],
            )?;
            let seq: i64 = tx.query_row(
                "SELECT seq FROM events WHERE sensor = ?1 AND id = ?2",
                params![event.sensor, event.id],
                |r| r.get(0),
            )?;
            // Its cursor moved when the bus confirmed it; ending this run must not move it back.
            tx.execute(
                "UPDATE events SET done = 0, cursor_key = NULL, cursor_value = NULL WHERE seq = ?1",
                [seq],
            )?;
            let existing: Option<(i64, String)> = tx
                .query_row(
                    "SELECT id, state FROM runs WHERE event_seq = ?1 AND rule = ?2",
                    params![seq, rule],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let now = unix_ms(std::time::SystemTime::now());
            match existing {
                Some((_, state)) if state == State::Success.as_str() => {
                    tx.execute("UPDATE events SET done = 1 WHERE seq = ?1", [seq])?;
                    Ok(None)
                }
                Some((id, _)) => {
                    tx.execute(
                        "UPDATE runs SET state = 'queued', finished_ms = NULL, error = NULL WHERE id = ?1",
                        [id],
                    )?;
                    Ok(Some(id))
                }
                None => {
                    tx.execute(
                        "INSERT INTO runs (rule, event_seq, state, created_ms) VALUES (?1, ?2, 'queued', ?3)",
                        params![rule, seq, now],
                    )?;
                    Ok(Some(tx.last_insert_rowid()))
                }
            }
        })
    }

    /// Marks open events whose runs have all ended (or that lost their rules) done, and
    /// applies their cursors: after a crash between a run's end and its event's.
    pub fn settle(&self) -> Result<usize, StoreError> {
        self.durable(|tx| {
            let seqs: Vec<i64> = {
                let mut q = tx.prepare(
                    "SELECT seq FROM events e WHERE done = 0 AND NOT EXISTS
                     (SELECT 1 FROM runs r WHERE r.event_seq = e.seq
                      AND r.state IN ('queued', 'started', 'retrying'))",
                )?;
                let rows = q.query_map([], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            for seq in &seqs {
                finish_event(tx, *seq)?;
            }
            Ok(seqs.len())
        })
    }

    /// The steps a run has recorded, by name.
    pub fn steps(&self, run: i64) -> Result<HashMap<String, StepRecord>, StoreError> {
        let db = self.db.lock();
        let mut q = db
            .prepare_cached("SELECT name, state, attempts, result FROM steps WHERE run = ?1")
            .map_err(|e| self.fail(e))?;
        let rows = q
            .query_map([run], |r| {
                let state: String = r.get(1)?;
                let result: Option<String> = r.get(3)?;
                Ok((
                    r.get::<_, String>(0)?,
                    StepRecord {
                        state: State::parse(&state).unwrap_or(State::Queued),
                        attempts: r.get(2)?,
                        result: result.and_then(|t| serde_json::from_str(&t).ok()),
                    },
                ))
            })
            .map_err(|e| self.fail(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.fail(e))
    }

    /// Sets a run's state (and `started_ms` when it starts).
    pub fn set_run(&self, run: i64, state: State) -> Result<(), StoreError> {
        let db = self.db.lock();
        let now = unix_ms(std::time::SystemTime::now());
        // started_ms is when it (last) started; other states leave it.
        db.execute(
            "UPDATE runs SET state = ?2,
               started_ms = CASE WHEN ?2 = 'started' THEN ?3 ELSE started_ms END
             WHERE id = ?1",
            params![run, state.as_str(), now],
        )
        .map_err(|e| self.fail(e))?;
        Ok(())
    }

    /// Records a step's state, tries, error and result.
    pub fn set_step(
        &self,
        run: i64,
        name: &str,
        state: State,
        attempts: u32,
        error: Option<&str>,
        result: Option<&Value>,
    ) -> Result<(), StoreError> {
        let db = self.db.lock();
        let now = unix_ms(std::time::SystemTime::now());
        db.execute(
            "INSERT INTO steps (run, name, state, attempts, started_ms, finished_ms, error, result)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (run, name) DO UPDATE SET state = ?3, attempts = ?4,
               started_ms = COALESCE(?5, started_ms), finished_ms = ?6, error = ?7,
               result = COALESCE(?8, result)",
            params![
                run,
                name,
                state.as_str(),
                attempts,
                (state == State::Started).then_some(now),
                state.is_final().then_some(now),
                error,
                result.map(Value::to_string),
            ],
        )
        .map_err(|e| self.fail(e))?;
        Ok(())
    }

    /// Ends a run, and, when it was its event's last open run, marks the event done and
    /// advances the sensor's checkpoint, all in one transaction. With `follow`, that same
    /// transaction records the run's own event (`runs`) and the runs it starts, as
    /// [`raise`](Self::raise) does: a crash cannot lose the rules that follow this one.
    pub fn finish_run(
        &self,
        run: i64,
        state: State,
        error: Option<&str>,
        follow: Option<(&Event, &[&str])>,
    ) -> Result<Option<Vec<i64>>, StoreError> {
        self.durable(|tx| {
            let now = unix_ms(std::time::SystemTime::now());
            tx.execute(
                "UPDATE runs SET state = ?2, finished_ms = ?3, error = ?4 WHERE id = ?1",
                params![run, state.as_str(), now, error],
            )?;
            let seq: i64 =
                tx.query_row("SELECT event_seq FROM runs WHERE id = ?1", [run], |r| {
                    r.get(0)
                })?;
            let open: i64 = tx.query_row(
                "SELECT count(*) FROM runs WHERE event_seq = ?1
                 AND state IN ('queued', 'started', 'retrying')",
                [seq],
                |r| r.get(0),
            )?;
            if open == 0 {
                finish_event(tx, seq)?;
            }
            match follow {
                Some((event, rules)) => insert_event(tx, event, None, rules),
                None => Ok(None),
            }
        })
    }

    /// Deletes what ended before `cut_ms` (milliseconds since the epoch): events that are
    /// done, their runs and those runs' steps, at most `limit` events per call (a short
    /// transaction: call again while it returns `limit`). Open events and their runs stay
    /// whatever their age, and so do checkpoints.
    pub fn prune(&self, cut_ms: i64, limit: usize) -> Result<usize, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.durable(|tx| {
            tx.execute(
                "CREATE TEMP TABLE IF NOT EXISTS pruned (seq INTEGER PRIMARY KEY)",
                [],
            )?;
            tx.execute("DELETE FROM pruned", [])?;
            let n = tx.execute(
                "INSERT INTO pruned SELECT seq FROM events
                 WHERE done = 1 AND time_ms < ?1 ORDER BY time_ms LIMIT ?2",
                params![cut_ms, limit],
            )?;
            tx.execute(
                "DELETE FROM steps WHERE run IN
                 (SELECT id FROM runs WHERE event_seq IN (SELECT seq FROM pruned))",
                [],
            )?;
            tx.execute(
                "DELETE FROM runs WHERE event_seq IN (SELECT seq FROM pruned)",
                [],
            )?;
            tx.execute(
                "DELETE FROM events WHERE seq IN (SELECT seq FROM pruned)",
                [],
            )?;
            Ok(n)
        })
    }

    /// Runs, newest first, optionally of one rule and in one state; at most `limit`.
    pub fn runs(
        &self,
        rule: Option<&str>,
        state: Option<State>,
        limit: usize,
    ) -> Result<Vec<RunView>, StoreError> {
        let db = self.db.lock();
        let mut q = db
            .prepare_cached(
                "SELECT r.id, r.rule, r.state, e.sensor, e.id, r.created_ms, r.started_ms,
                        r.finished_ms, r.error
                 FROM runs r JOIN events e ON e.seq = r.event_seq
                 WHERE (?1 IS NULL OR r.rule = ?1) AND (?2 IS NULL OR r.state = ?2)
                 ORDER BY r.id DESC LIMIT ?3",
            )
            .map_err(|e| self.fail(e))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = q
            .query_map(params![rule, state.map(State::as_str), limit], |r| {
                let state: String = r.get(2)?;
                Ok(RunView {
                    id: r.get(0)?,
                    rule: r.get(1)?,
                    state: State::parse(&state).unwrap_or(State::Queued),
                    sensor: r.get(3)?,
                    event: r.get(4)?,
                    created: crate::event::rfc3339(r.get(5)?),
                    started: ms_text(r.get(6)?),
                    finished: ms_text(r.get(7)?),
                    error: r.get(8)?,
                    steps: Vec::new(),
                })
            })
            .map_err(|e| self.fail(e))?;
        let mut runs: Vec<RunView> = rows.collect::<Result<_, _>>().map_err(|e| self.fail(e))?;
        let mut q = db
            .prepare_cached(
                "SELECT name, state, attempts, started_ms, finished_ms, error, result
                 FROM steps WHERE run = ?1 ORDER BY rowid",
            )
            .map_err(|e| self.fail(e))?;
        for run in &mut runs {
            let rows = q
                .query_map([run.id], |r| {
                    let state: String = r.get(1)?;
                    let result: Option<String> = r.get(6)?;
                    Ok(StepView {
                        name: r.get(0)?,
                        state: State::parse(&state).unwrap_or(State::Queued),
                        attempts: r.get(2)?,
                        started: ms_text(r.get(3)?),
                        finished: ms_text(r.get(4)?),
                        error: r.get(5)?,
                        result: result.and_then(|t| serde_json::from_str(&t).ok()),
                    })
                })
                .map_err(|e| self.fail(e))?;
            run.steps = rows.collect::<Result<_, _>>().map_err(|e| self.fail(e))?;
        }
        Ok(runs)
    }

    /// A sensor's events after the one with id `after` (from the first when `None`), in
    /// order, at most `limit`, with their sequence numbers. `Ok(None)` when `after` is not
    /// an id of this sensor.
    pub fn events_after(
        &self,
        sensor: &str,
        after: Option<&str>,
        after_seq: Option<i64>,
        limit: usize,
    ) -> Result<Option<Vec<(i64, Event)>>, StoreError> {
        let db = self.db.lock();
        let from = match (after_seq, after) {
            (Some(seq), _) => seq,
            (None, None) => 0,
            (None, Some(id)) => {
                let seq: Option<i64> = db
                    .query_row(
                        "SELECT seq FROM events WHERE sensor = ?1 AND id = ?2",
                        [sensor, id],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(|e| self.fail(e))?;
                match seq {
                    Some(seq) => seq,
                    None => return Ok(None),
                }
            }
        };
        let mut q = db
            .prepare_cached(
                "SELECT seq, id, time_ms, payload FROM events
                 WHERE sensor = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(|e| self.fail(e))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = q
            .query_map(params![sensor, from, limit], |r| {
                let payload: String = r.get(3)?;
                Ok((
                    r.get(0)?,
                    Event {
                        id: r.get(1)?,
                        sensor: sensor.to_string(),
                        time_ms: r.get(2)?,
                        payload: serde_json::from_str(&payload).unwrap_or(Value::Null),
                    },
                ))
            })
            .map_err(|e| self.fail(e))?;
        rows.collect::<Result<_, _>>()
            .map(Some)
            .map_err(|e| self.fail(e))
    }
}

/// Inserts `event` (ignored when the sensor has its id: `None`) and a queued run per rule;
/// an event no rule wants is done at once and its cursor applied.
fn insert_event(
    tx: &rusqlite::Transaction<'_>,
    event: &Event,
    cursor: Option<(&str, &str)>,
    rules: &[&str],
) -> rusqlite::Result<Option<Vec<i64>>> {
    let payload = event.payload.to_string();
    insert_row(
        tx,
        &event.sensor,
        &event.id,
        event.time_ms,
        &payload,
        cursor,
        rules,
    )
}

fn insert_row(
    tx: &rusqlite::Transaction<'_>,
    sensor: &str,
    id: &str,
    time_ms: i64,
    payload: &str,
    cursor: Option<(&str, &str)>,
    rules: &[&str],
) -> rusqlite::Result<Option<Vec<i64>>> {
    // Cached statements: the streams sensor inserts thousands of these a second.
    let inserted = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO events (sensor, id, time_ms, payload, cursor_key, cursor_value, done)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            sensor,
            id,
            time_ms,
            payload,
            cursor.map(|c| c.0),
            cursor.map(|c| c.1),
            i64::from(rules.is_empty()),
        ])?;
    if inserted == 0 {
        return Ok(None);
    }
    let seq = tx.last_insert_rowid();
    let now = unix_ms(std::time::SystemTime::now());
    let mut runs = Vec::new();
    for rule in rules {
        tx.prepare_cached(
            "INSERT INTO runs (rule, event_seq, state, created_ms) VALUES (?1, ?2, 'queued', ?3)",
        )?
        .execute(params![rule, seq, now])?;
        runs.push(tx.last_insert_rowid());
    }
    if rules.is_empty() {
        if let Some((key, value)) = cursor {
            set_checkpoint(tx, sensor, key, value)?;
        }
    }
    Ok(Some(runs))
}

fn set_checkpoint(
    tx: &rusqlite::Transaction<'_>,
    sensor: &str,
    key: &str,
    value: &str,
) -> rusqlite::Result<()> {
    let now = unix_ms(std::time::SystemTime::now());
    tx.execute(
        "INSERT INTO checkpoints (sensor, key, value, updated_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (sensor, key) DO UPDATE SET value = ?3, updated_ms = ?4",
        params![sensor, key, value, now],
    )?;
    Ok(())
}

fn finish_event(tx: &rusqlite::Transaction<'_>, seq: i64) -> rusqlite::Result<()> {
    let (sensor, key, value): (String, Option<String>, Option<String>) = tx.query_row(
        "SELECT sensor, cursor_key, cursor_value FROM events WHERE seq = ?1",
        [seq],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    tx.execute("UPDATE events SET done = 1 WHERE seq = ?1", [seq])?;
    if let (Some(key), Some(value)) = (key, value) {
        set_checkpoint(tx, &sensor, &key, &value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn temp_db(name: &str) -> (std::path::PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!(
            "nexus-store-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("state.db");
        let store = Store::open(&path).unwrap();
        (dir, store)
    }

    fn event(id: &str) -> Event {
        Event::now("landing", id.into(), json!({"n": id}))
    }

    #[test]
    fn a_replayed_event_starts_nothing_new() {
        let (dir, store) = temp_db("replay");
        let runs = store.raise(&event("a"), None, &["r1", "r2"]).unwrap();
        assert_eq!(runs.unwrap().len(), 2);
        assert_eq!(store.raise(&event("a"), None, &["r1", "r2"]).unwrap(), None);
        assert_eq!(store.open_runs().unwrap().len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_checkpoint_moves_only_when_the_last_run_of_the_event_ended() {
        let (dir, store) = temp_db("checkpoint");
        let runs = store
            .raise(&event("a"), Some(("f.csv", "3:100")), &["r1", "r2"])
            .unwrap()
            .unwrap();
        assert!(store.checkpoints("landing").unwrap().is_empty());
        assert_eq!(store.open_cursors("landing").unwrap()["f.csv"], "3:100");
        store
            .finish_run(runs[0], State::Success, None, None)
            .unwrap();
        assert!(store.checkpoints("landing").unwrap().is_empty());
        store
            .finish_run(runs[1], State::Failed, Some("boom"), None)
            .unwrap();
        assert_eq!(store.checkpoints("landing").unwrap()["f.csv"], "3:100");
        assert!(store.open_cursors("landing").unwrap().is_empty());
        // An event no rule wants checkpoints at once.
        store
            .raise(&event("b"), Some(("g.csv", "1:1")), &[])
            .unwrap()
            .unwrap();
        assert_eq!(store.checkpoints("landing").unwrap()["g.csv"], "1:1");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn state_survives_reopening_and_migrations_run_once() {
        let (dir, store) = temp_db("reopen");
        let runs = store.raise(&event("a"), None, &["r1"]).unwrap().unwrap();
        store.set_run(runs[0], State::Started).unwrap();
        store
            .set_step(
                runs[0],
                "get",
                State::Success,
                1,
                None,
                Some(&json!({"bytes": 3})),
            )
            .unwrap();
        drop(store);
        let store = Store::open(&dir.join("state.db")).unwrap();
        let open = store.open_runs().unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].event.payload, json!({"n": "a"}));
        let steps = store.steps(runs[0]).unwrap();
        assert_eq!(steps["get"].state, State::Success);
        assert_eq!(steps["get"].result, Some(json!({"bytes": 3})));
        let listed = store.runs(Some("r1"), Some(State::Started), 10).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].steps[0].name, "get");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn retention_removes_what_ended_long_ago_and_keeps_what_is_open() {
        let (dir, store) = temp_db("prune");
        let old = |id: &str| Event {
            time_ms: 1_000,
            ..event(id)
        };
        let done = store.raise(&old("done"), None, &["r"]).unwrap().unwrap();
        store
            .set_step(done[0], "s", State::Success, 1, None, None)
            .unwrap();
        store
            .finish_run(done[0], State::Success, None, None)
            .unwrap();
        let open = store.raise(&old("open"), None, &["r"]).unwrap().unwrap();
        store.raise(&old("nobody"), None, &[]).unwrap().unwrap();
        store.raise(&event("new"), None, &[]).unwrap().unwrap();
        assert_eq!(store.prune(2_000, 1).unwrap(), 1, "one per call at most");
        assert_eq!(store.prune(2_000, 100).unwrap(), 1);
        assert_eq!(store.prune(2_000, 100).unwrap(), 0);
        let left: Vec<String> = store
            .events_after("landing", None, None, 10)
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.id)
            .collect();
        assert_eq!(left, ["open", "new"]);
        let runs = store.runs(None, None, 10).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].id, open[0]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_older_database_is_migrated_and_a_newer_one_refused() {
        let (dir, store) = temp_db("migrate");
        store.raise(&event("a"), None, &["r"]).unwrap();
        drop(store);
        let path = dir.join("state.db");
        // As version 1 left it.
        let db = Connection::open(&path).unwrap();
        db.execute_batch("DROP INDEX runs_event; DROP INDEX events_time; PRAGMA user_version = 1;")
            .unwrap();
        drop(db);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.open_runs().unwrap().len(), 1, "the data survives");
        drop(store);
        let db = Connection::open(&path).unwrap();
        let indexes: i64 = db
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name IN ('runs_event', 'events_time')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 2);
        db.pragma_update(None, "user_version", 99).unwrap();
        drop(db);
        let e = Store::open(&path).unwrap_err().to_string();
        assert!(e.contains("schema version 99 is newer"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn events_are_read_back_after_an_id() {
        let (dir, store) = temp_db("after");
        for id in ["a", "b", "c"] {
            store.raise(&event(id), None, &[]).unwrap();
        }
        let ids = |v: Vec<(i64, Event)>| v.into_iter().map(|(_, e)| e.id).collect::<Vec<_>>();
        assert_eq!(
            ids(store
                .events_after("landing", None, None, 10)
                .unwrap()
                .unwrap()),
            ["a", "b", "c"]
        );
        assert_eq!(
            ids(store
                .events_after("landing", Some("a"), None, 10)
                .unwrap()
                .unwrap()),
            ["b", "c"]
        );
        assert!(store
            .events_after("landing", Some("zz"), None, 10)
            .unwrap()
            .is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
