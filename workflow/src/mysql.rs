//! The `mysql` pressure sensor (feature `mysql`): connects to a MySQL or MariaDB server as a
//! replica, reads the row events of its binary log through `mysql_async`, and counts the rows
//! of one table inserted, updated and deleted. It raises an event when their sum reaches the
//! threshold, or when the oldest change counted is `max_delay` old.
//!
//! Counts are taken at transaction boundaries (the XID, or a `COMMIT` query for tables
//! without transactions): an event covers whole transactions, and its checkpoint (key
//! `binlog`, `FILE:POSITION`, the end of its last transaction) is where the next start
//! resumes. So a restart recounts what had not fired (nothing missed) and skips what had
//! (nothing counted twice). A sensor with no checkpoint starts at the binary log's end.

use std::time::{Duration, Instant, SystemTime};

use mysql_async::binlog::events::{EventData, RowsEventData};
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStreamRequest, Conn, Opts};
use serde_json::json;

use crate::event::{unix_ms, Event};
use crate::sensor::{raise, restarting};
use crate::spec::SensorKind;
use crate::Shared;

/// A position in the binary log.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// The log file's name (`mysql-bin.000003`).
    pub file: String,
    /// The byte offset in it.
    pub position: u64,
}

impl Position {
    fn text(&self) -> String {
        format!("{}:{}", self.file, self.position)
    }

    fn parse(text: &str) -> Option<Position> {
        let (file, position) = text.rsplit_once(':')?;
        Some(Position {
            file: file.to_string(),
            position: position.parse().ok()?,
        })
    }
}

/// Rows counted, and the binlog times of the first and last change among them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Counts {
    inserts: u64,
    updates: u64,
    deletes: u64,
    first_s: Option<u32>,
    last_s: u32,
    /// When the first of them was read here (for `max_delay`).
    first_seen: Option<Instant>,
}

impl Counts {
    fn total(&self) -> u64 {
        self.inserts + self.updates + self.deletes
    }

    fn add(&mut self, other: &Counts) {
        self.inserts += other.inserts;
        self.updates += other.updates;
        self.deletes += other.deletes;
        if self.first_s.is_none() {
            self.first_s = other.first_s;
            self.first_seen = other.first_seen;
        }
        self.last_s = self.last_s.max(other.last_s);
    }
}

/// Connects to `url` and checks that its binary log can feed the sensor: binary logging on,
/// in ROW format, and the privileges of a replica. The error says which and how to fix it.
pub async fn connect_checked(url: &str) -> Result<Conn, String> {
    let opts = Opts::from_url(url).map_err(|e| format!("url: {e}"))?;
    let user = opts.user().unwrap_or("").to_string();
    let mut conn = Conn::new(opts)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (log_bin, format): (Option<String>, Option<String>) = conn
        .query_first("SELECT @@GLOBAL.log_bin, @@GLOBAL.binlog_format")
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or((None, None));
    if !matches!(log_bin.as_deref(), Some("1" | "ON")) {
        return Err(
            "the server's binary log is off: start it with log_bin (and binlog_format=ROW)".into(),
        );
    }
    let format = format.unwrap_or_default();
    if !format.eq_ignore_ascii_case("ROW") {
        return Err(format!(
            "the server's binlog_format is {format}, not ROW: the mysql sensor counts rows from row events \
             (SET GLOBAL binlog_format = 'ROW', or binlog_format=ROW in the server's configuration)"
        ));
    }
    let granted: Vec<String> = conn
        .query("SHOW GRANTS FOR CURRENT_USER()")
        .await
        .map_err(|e| e.to_string())?;
    let all = granted.join(" ").to_ascii_uppercase();
    let has = |what: &str| all.contains(what) || all.contains("ALL PRIVILEGES");
    if !has("REPLICATION SLAVE") && !has("REPLICATION REPLICA") {
        return Err(format!(
            "user {user:?} lacks the REPLICATION SLAVE privilege a binlog reader needs \
             (GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{user}')"
        ));
    }
    if !has("REPLICATION CLIENT") && !has("BINLOG MONITOR") {
        return Err(format!(
            "user {user:?} lacks the REPLICATION CLIENT privilege (BINLOG MONITOR on MariaDB) \
             that reads the binary log's position (GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{user}')"
        ));
    }
    Ok(conn)
}

/// The end of the server's binary log now.
async fn log_end(conn: &mut Conn) -> Result<Position, String> {
    let row: Option<(String, u64)> = conn
        .query_first("SHOW MASTER STATUS")
        .await
        .map_err(|e| e.to_string())?
        .map(|row: mysql_async::Row| row)
        .and_then(|row| Some((row.get::<String, _>(0)?, row.get::<u64, _>(1)?)));
    let (file, position) = row.ok_or("SHOW MASTER STATUS returned nothing")?;
    Ok(Position { file, position })
}

/// The sensor's thread: reads the binary log until stopped; on a failure, starts again from
/// its checkpoint after a backoff from 500 ms doubling to 60 s.
pub(crate) fn sensor(shared: &Shared, name: &str) {
    let Some(sensor) = shared.plan.sensors.get(name) else {
        return;
    };
    let SensorKind::Mysql { .. } = &sensor.kind else {
        return;
    };
    restarting(shared, name, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the sensor's runtime: {e}"))?;
        runtime.block_on(follow(shared, name))
    });
}

/// Where the sensor starts: after its last checkpoint or open cursor, else the log's end.
fn resume_point(shared: &Shared, name: &str) -> Result<Option<Position>, String> {
    let done = shared.store.checkpoints(name).map_err(|e| e.to_string())?;
    let open = shared.store.open_cursors(name).map_err(|e| e.to_string())?;
    Ok([done.get("binlog"), open.get("binlog")]
        .into_iter()
        .flatten()
        .filter_map(|v| Position::parse(v))
        .max())
}

async fn follow(shared: &Shared, name: &str) -> Result<(), String> {
    let Some(sensor) = shared.plan.sensors.get(name) else {
        return Ok(());
    };
    let SensorKind::Mysql {
        url,
        table,
        threshold,
        max_delay,
        server_id,
    } = &sensor.kind
    else {
        return Ok(());
    };
    let (database, table_name) = table.split_once('.').unwrap_or(("", table));
    let mut conn = connect_checked(url).await?;
    let mut at = match resume_point(shared, name)? {
        Some(p) => p,
        None => log_end(&mut conn).await?,
    };
    tracing::info!(sensor = name, table = %table, binlog = %at.text(), "MySQL sensor reading the binary log.");
    let request = BinlogStreamRequest::new(*server_id)
        .with_filename(at.file.as_bytes())
        .with_pos(at.position);
    let mut stream = conn
        .get_binlog_stream(request)
        .await
        .map_err(|e| format!("binlog dump: {e}"))?;
    // Rows of transactions committed and not yet raised; rows of the open transaction.
    let mut committed = Counts::default();
    let mut open = Counts::default();
    let mut file = at.file.clone();
    let mut described = false;
    let tick = Duration::from_millis(100).min(*max_delay);
    loop {
        if shared.stop.is_stopped() {
            let _ = stream.close().await;
            return Ok(());
        }
        let due = committed
            .first_seen
            .is_some_and(|t| t.elapsed() >= *max_delay);
        if committed.total() > 0 && (committed.total() >= *threshold || due) {
            fire(shared, name, table, &committed, &at)?;
            committed = Counts::default();
        }
        let next = tokio::time::timeout(tick, crate::next_item(&mut stream)).await;
        let event = match next {
            Err(_) => continue,
            Ok(None) => return Err("the server ended the binlog stream".into()),
            Ok(Some(Err(e))) => return Err(format!("binlog stream: {e}")),
            Ok(Some(Ok(event))) => event,
        };
        let header = event.header();
        let data = event
            .read_data()
            .map_err(|e| format!("binlog event: {e}"))?;
        let end = u64::from(header.log_pos());
        match data {
            Some(EventData::FormatDescriptionEvent(_)) => described = true,
            Some(EventData::RotateEvent(rotate)) => {
                // The stream's first event is a rotate to where it starts, the file asked
                // for; it comes before the format description, so its name is read with
                // the checksum after it. Later rotates (a new file) are read clean.
                let raw = rotate.name_raw();
                file = if !described && raw.starts_with(at.file.as_bytes()) {
                    at.file.clone()
                } else {
                    String::from_utf8_lossy(raw).into_owned()
                };
                at = Position {
                    file: file.clone(),
                    position: rotate.position(),
                };
            }
            Some(EventData::RowsEvent(rows)) => {
                let Some(tme) = stream.get_tme(rows.table_id()) else {
                    continue;
                };
                if tme.database_name() != database || tme.table_name() != table_name {
                    continue;
                }
                let n = rows.rows(tme).count() as u64;
                match rows {
                    RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => {
                        open.inserts += n
                    }
                    RowsEventData::UpdateRowsEventV1(_)
                    | RowsEventData::UpdateRowsEvent(_)
                    | RowsEventData::PartialUpdateRowsEvent(_) => open.updates += n,
                    RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => {
                        open.deletes += n
                    }
                }
                if open.first_s.is_none() {
                    open.first_s = Some(header.timestamp());
                    open.first_seen = Some(Instant::now());
                }
                open.last_s = header.timestamp();
            }
            // A transaction's end: its rows count from here.
            Some(EventData::XidEvent(_)) => {
                commit(&mut committed, &mut open, &mut at, &file, end);
            }
            Some(EventData::QueryEvent(query)) if query.query().eq_ignore_ascii_case("COMMIT") => {
                commit(&mut committed, &mut open, &mut at, &file, end);
            }
            _ => {}
        }
    }
}

/// A transaction ended at `end` of `file`: its rows join the committed ones.
fn commit(committed: &mut Counts, open: &mut Counts, at: &mut Position, file: &str, end: u64) {
    committed.add(open);
    *open = Counts::default();
    if end > 0 {
        *at = Position {
            file: file.to_string(),
            position: end,
        };
    }
}

/// Raises the counts of whole transactions up to `at`.
fn fire(
    shared: &Shared,
    name: &str,
    table: &str,
    counts: &Counts,
    at: &Position,
) -> Result<(), String> {
    let from_ms = i64::from(counts.first_s.unwrap_or(counts.last_s)) * 1000;
    let payload = json!({
        "table": table,
        "inserts": counts.inserts,
        "updates": counts.updates,
        "deletes": counts.deletes,
        "rows": counts.total(),
        "binlog_file": at.file,
        "binlog_position": at.position,
        "from_ms": from_ms,
        "to_ms": i64::from(counts.last_s) * 1000,
        "fired_ms": unix_ms(SystemTime::now()),
    });
    let id = format!("binlog-{}", at.text());
    let value = at.text();
    if raise(
        shared,
        Event::now(name, id, payload),
        Some(("binlog", &value)),
    ) {
        Ok(())
    } else {
        Err(format!("the event at {value} was not recorded"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_read_back_and_order_by_file_then_offset() {
        let a = Position {
            file: "mysql-bin.000002".into(),
            position: 900,
        };
        assert_eq!(Position::parse(&a.text()), Some(a.clone()));
        let b = Position {
            file: "mysql-bin.000003".into(),
            position: 4,
        };
        assert!(b > a);
        assert_eq!(Position::parse("nope"), None);
        assert_eq!(Position::parse("f:x"), None);
    }
}
