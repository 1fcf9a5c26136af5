//! `mysql`: how fast the mysql sensor reads and counts a real MariaDB binary log. A private
//! `mariadbd` holds N rows inserted in transactions of 1000; the sensor starts from a
//! checkpoint before them and the time to its event (the whole range counted) is its rate.
//! Beside it, in the same run, `mariadb-binlog --read-from-remote-server` reads the same
//! range to /dev/null: the server's own binlog reader, which fetches the events without
//! decoding their rows, so it is the ceiling.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nexus_client::{Client, ClientConfig};
use nexus_testkit::MariaDb;
use nexus_workflow::{Event, Plan, Store, Workflow, WorkflowConfig};
use serde_json::json;

use crate::report::{median, Record};
use crate::Options;

/// Rows per transaction.
const PER: u64 = 1000;

fn master_status(db: &MariaDb) -> (String, u64) {
    let out = db.sql("SHOW MASTER STATUS");
    let mut fields = out.split('\t');
    let file = fields.next().unwrap_or_default().to_string();
    let position = fields
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(0);
    (file, position)
}

/// Seconds the sensor takes from its start at `from` to the event counting `rows`.
fn sensor_seconds(
    options: &Options,
    db: &MariaDb,
    from: &(String, u64),
    rows: u64,
    run: usize,
) -> f64 {
    let dir = options.scratch.join(format!("mysql-{run}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    let config = WorkflowConfig {
        state: dir.join("state.db"),
        ..WorkflowConfig::default()
    };
    let rules = format!(
        "[sensors.orders]\nkind = \"mysql\"\nurl = \"{}\"\ntable = \"shop.orders\"\nthreshold = {rows}\nmax_delay = \"1h\"\nserver_id = {}\n",
        db.url("nexus", "pw"),
        1000 + run
    );
    let plan = Plan::compile(&rules, &config).expect("rules");
    let store = Store::open(&config.state).expect("state");
    // The checkpoint an earlier run would have left: the sensor resumes there.
    let seed = Event::now("orders", "seed".into(), json!({}));
    let cursor = format!("{}:{}", from.0, from.1);
    store
        .raise(&seed, Some(("binlog", &cursor)), &[])
        .expect("seed");
    let client = Client::new(ClientConfig {
        threads: 1,
        ..ClientConfig::default()
    })
    .expect("client");
    let started = Instant::now();
    let workflow = Workflow::start(plan, store, client, config).expect("workflow");
    let deadline = started + Duration::from_secs(600);
    loop {
        let found = workflow
            .events_after("orders", Some("seed"), None, Duration::from_millis(20))
            .expect("events")
            .unwrap_or_default();
        if let Some((_, event)) = found.first() {
            let elapsed = started.elapsed().as_secs_f64();
            assert_eq!(event.payload["inserts"], rows, "{}", event.payload);
            workflow.stop();
            return elapsed;
        }
        assert!(Instant::now() < deadline, "the mysql sensor never fired");
    }
}

/// Seconds `mariadb-binlog` takes to read `from..to` from the server to /dev/null.
fn baseline_seconds(db: &MariaDb, from: &(String, u64), to: u64) -> f64 {
    let started = Instant::now();
    let status = Command::new("mariadb-binlog")
        .args([
            "--no-defaults",
            "--read-from-remote-server",
            "--host=127.0.0.1",
            &format!("--port={}", db.port),
            "--user=nexus",
            "--password=pw",
            &format!("--start-position={}", from.1),
            &format!("--stop-position={to}"),
            &from.0,
        ])
        .stdout(Stdio::null())
        .status()
        .expect("mariadb-binlog (Debian's mariadb-client)");
    assert!(status.success(), "mariadb-binlog failed");
    started.elapsed().as_secs_f64()
}

/// The `mysql` scenario.
pub(crate) fn mysql(options: &Options) -> Vec<Record> {
    let rows = options.size(2_000_000, 100_000);
    if !crate::baselines::ensure_apt("/usr/sbin/mariadbd", "mariadb-server")
        || !crate::baselines::ensure_apt("mariadb-binlog", "mariadb-client")
    {
        eprintln!("mysql: skipped: mariadb-server could not be installed");
        return Vec::new();
    }
    let db = MariaDb::start("ROW");
    db.sql(
        "CREATE DATABASE shop;
         CREATE TABLE shop.orders (id INT PRIMARY KEY, qty INT) ENGINE=InnoDB;",
    );
    db.create_user("nexus", "pw", "REPLICATION SLAVE, REPLICATION CLIENT");
    let from = master_status(&db);
    // The sequence engine's tables (seq_1_to_N) are read in the current database.
    let mut sql = String::from("USE shop;\n");
    for k in 0..rows / PER {
        sql.push_str(&format!(
            "INSERT INTO shop.orders SELECT seq, 1 FROM seq_{}_to_{};\n",
            k * PER + 1,
            (k + 1) * PER
        ));
    }
    db.sql(&sql);
    let to = master_status(&db);
    assert_eq!(to.0, from.0, "the rows span more than one binlog file");
    let bytes = to.1 - from.1;
    let mut nexus = Vec::new();
    let mut baseline = Vec::new();
    for run in 0..options.runs {
        baseline.push(baseline_seconds(&db, &from, to.1));
        nexus.push(sensor_seconds(options, &db, &from, rows, run));
    }
    let (n, b) = (median(nexus), median(baseline));
    let note = format!(
        "{rows} rows in transactions of {PER} ({:.1} MB of binlog): the mysql sensor counts {:.0} rows/s ({:.0} MB/s), \
         mariadb-binlog reads {:.0} rows/s: {:.2}x",
        bytes as f64 / 1e6,
        rows as f64 / n,
        bytes as f64 / n / 1e6,
        rows as f64 / b,
        b / n
    );
    eprintln!("mysql: {note}");
    vec![Record {
        scenario: "mysql".into(),
        baseline: Some("mariadb-binlog --read-from-remote-server".into()),
        pairs: Vec::new(),
        extra: json!({"rows": rows, "binlog_bytes": bytes, "sensor_rows_per_s": rows as f64 / n,
                      "baseline_rows_per_s": rows as f64 / b, "ratio": b / n}),
        note: Some(note),
    }]
}
