//! The `mysql` pressure sensor against a real MariaDB server (a private `mariadbd` with its
//! binary log on, started by each test on a free port): exact counts for its table and none
//! for another; a restart between batches that neither misses nor repeats a row event; the
//! clear errors of a server not in ROW format and of a user without replication privileges.
#![cfg(feature = "mysql")]
#![allow(clippy::unwrap_used)]

use std::path::Path;

use nexus_testkit::{wait_until, MariaDb, TempDir};
use nexus_workflow::{Event, State, Workflow};

mod common;

fn start(dir: &Path, rules: &str) -> Workflow {
    common::start_with(common::config(dir), rules)
}

/// A server in ROW format with tables `shop.orders` (watched) and `shop.other`, and a user
/// `nexus` with the privileges of a replica.
fn server() -> MariaDb {
    let db = MariaDb::start("ROW");
    db.sql(
        "CREATE DATABASE shop;
         CREATE TABLE shop.orders (id INT PRIMARY KEY, qty INT) ENGINE=InnoDB;
         CREATE TABLE shop.other (id INT PRIMARY KEY) ENGINE=InnoDB;",
    );
    db.create_user("nexus", "pw", "REPLICATION SLAVE, REPLICATION CLIENT");
    db
}

fn rules(db: &MariaDb, threshold: u64, max_delay: &str, extra: &str) -> String {
    format!(
        r#"
[sensors.orders]
kind = "mysql"
url = "{url}"
table = "shop.orders"
threshold = {threshold}
max_delay = "{max_delay}"
{extra}"#,
        url = db.url("nexus", "pw")
    )
}

/// Inserts ids `from..to` into `table`, `per` rows per transaction.
fn insert(db: &MariaDb, table: &str, from: u32, to: u32, per: u32) {
    let mut sql = String::new();
    let mut id = from;
    while id < to {
        let end = (id + per).min(to);
        let values: Vec<String> = (id..end).map(|i| format!("({i}, 1)")).collect();
        let values = if table.ends_with("other") {
            (id..end).map(|i| format!("({i})")).collect::<Vec<_>>()
        } else {
            values
        };
        sql.push_str(&format!(
            "BEGIN; INSERT INTO {table} VALUES {}; COMMIT;\n",
            values.join(",")
        ));
        id = end;
    }
    db.sql(&sql);
}

fn events(workflow: &Workflow) -> Vec<Event> {
    workflow
        .events_after("orders", None, None, std::time::Duration::ZERO)
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|(_, e)| e)
        .collect()
}

/// (inserts, updates, deletes) over all the sensor's events.
fn totals(events: &[Event]) -> (u64, u64, u64) {
    events.iter().fold((0, 0, 0), |(i, u, d), e| {
        let p = &e.payload;
        assert_eq!(p["table"], "shop.orders");
        (
            i + p["inserts"].as_u64().unwrap(),
            u + p["updates"].as_u64().unwrap(),
            d + p["deletes"].as_u64().unwrap(),
        )
    })
}

fn wait_for_totals(workflow: &Workflow, want: (u64, u64, u64)) -> Vec<Event> {
    wait_until(&format!("events counting {want:?}"), || {
        let t = totals(&events(workflow));
        assert!(
            t.0 <= want.0 && t.1 <= want.1 && t.2 <= want.2,
            "counted more than happened: {t:?} > {want:?}"
        );
        t == want
    });
    events(workflow)
}

#[test]
fn the_sensor_fires_with_exactly_the_rows_changed_in_its_table() {
    let db = server();
    let dir = TempDir::new("mysql-counts");
    // The threshold is the whole batch: one event, when its last transaction commits.
    let workflow = start(dir.path(), &rules(&db, 1150, "1h", ""));
    wait_until("the sensor to read the binary log", || {
        db.binlog_readers() == 1
    });
    insert(&db, "shop.orders", 0, 1000, 100);
    insert(&db, "shop.other", 0, 500, 250);
    db.sql("UPDATE shop.orders SET qty = 2 WHERE id < 100; DELETE FROM shop.other WHERE id < 100;");
    db.sql("DELETE FROM shop.orders WHERE id >= 950;");
    let all = wait_for_totals(&workflow, (1000, 100, 50));
    assert_eq!(all.len(), 1, "{all:?}");
    let p = &all[0].payload;
    assert_eq!(p["rows"], 1150);
    assert!(
        p["binlog_file"].as_str().unwrap().starts_with("binlog."),
        "{p}"
    );
    assert!(p["binlog_position"].as_u64().unwrap() > 4, "{p}");
    assert!(
        p["from_ms"].as_i64().unwrap() <= p["to_ms"].as_i64().unwrap(),
        "{p}"
    );
}

#[test]
fn a_restart_between_batches_neither_misses_nor_repeats_a_row_event() {
    let db = server();
    let dir = TempDir::new("mysql-restart");
    // A rule, so that each event's run ends and moves the checkpoint; a short delay, so that
    // each batch fires on its own.
    let rules = rules(
        &db,
        1_000_000,
        "200ms",
        r#"
[rules.take]
on = "orders"

[[rules.take.steps]]
name = "ok"
command = { run = ["true"] }
"#,
    );
    let workflow = start(dir.path(), &rules);
    wait_until("the sensor to read the binary log", || {
        db.binlog_readers() == 1
    });
    insert(&db, "shop.orders", 0, 300, 100);
    wait_for_totals(&workflow, (300, 0, 0));
    wait_until("the runs to succeed", || {
        let runs = workflow.runs(None, None, 100).unwrap();
        !runs.is_empty() && runs.iter().all(|r| r.state == State::Success)
    });
    workflow.stop();
    drop(workflow);

    // While it is down.
    insert(&db, "shop.orders", 300, 500, 50);
    db.sql(
        "UPDATE shop.orders SET qty = 3 WHERE id < 50; DELETE FROM shop.orders WHERE id >= 480;",
    );
    let workflow = start(dir.path(), &rules);
    wait_for_totals(&workflow, (500, 50, 20));
    // And after: once this is counted, every listing of the log before it was too.
    insert(&db, "shop.orders", 1000, 1001, 1);
    let all = wait_for_totals(&workflow, (501, 50, 20));
    // No event covers a range of the log another one covers.
    let mut ends: Vec<(String, u64)> = all
        .iter()
        .map(|e| {
            (
                e.payload["binlog_file"].as_str().unwrap().to_string(),
                e.payload["binlog_position"].as_u64().unwrap(),
            )
        })
        .collect();
    let n = ends.len();
    ends.dedup();
    assert_eq!(ends.len(), n, "{all:?}");
}

#[test]
fn a_server_not_in_row_format_and_a_user_without_replication_get_clear_errors() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let statement = MariaDb::start("STATEMENT");
    statement.create_user("nexus", "pw", "REPLICATION SLAVE, REPLICATION CLIENT");
    let error = runtime
        .block_on(nexus_workflow::mysql::connect_checked(
            &statement.url("nexus", "pw"),
        ))
        .err()
        .unwrap();
    assert!(
        error.contains("binlog_format is STATEMENT, not ROW"),
        "{error}"
    );

    let row = server();
    row.create_user("reader", "pw", "SELECT");
    let error = runtime
        .block_on(nexus_workflow::mysql::connect_checked(
            &row.url("reader", "pw"),
        ))
        .err()
        .unwrap();
    assert!(
        error.contains("lacks the REPLICATION SLAVE privilege"),
        "{error}"
    );
    assert!(runtime
        .block_on(nexus_workflow::mysql::connect_checked(
            &row.url("nexus", "pw")
        ))
        .is_ok());
}
