//! A real MariaDB server for the tests: a private `mariadbd` (Debian's `mariadb-server`,
//! installed by `scripts/test`) with its own data directory in a temp dir, on 127.0.0.1 and
//! a free port, with the binary log on; killed and removed when the test ends.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::process::ChildGuard;
use crate::{free_port, wait_until, TempDir};

/// A running MariaDB server.
pub struct MariaDb {
    _child: ChildGuard,
    dir: TempDir,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
}

fn program(name: &str, env: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(env).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        path.exists(),
        "{} not found ({env} or {default}): the MySQL tests need Debian's mariadb-server \
         (scripts/test installs it) to run {name}",
        path.display()
    );
    path
}

fn as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

impl MariaDb {
    /// Initialises a data directory and starts `mariadbd` on it with `binlog_format` (`ROW`,
    /// `STATEMENT` or `MIXED`); waits until it answers.
    pub fn start(binlog_format: &str) -> MariaDb {
        let install = program(
            "mariadb-install-db",
            "NEXUS_MARIADB_INSTALL_DB",
            "/usr/bin/mariadb-install-db",
        );
        let server = program("mariadbd", "NEXUS_MARIADBD", "/usr/sbin/mariadbd");
        let dir = TempDir::new("mariadb");
        let data = dir.path().join("data");
        let user: Vec<String> = if as_root() {
            vec!["--user=root".into()]
        } else {
            Vec::new()
        };
        // A temp dir of its own: a server starting removes what it finds of `#sql*` files in
        // its temp dir, another server's included.
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let out = Command::new(&install)
            .env("TMPDIR", &tmp)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .args(&user)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", install.display()));
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let child = Command::new(&server)
            .env("TMPDIR", &tmp)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", dir.path().join("sock").display()))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg(format!(
                "--log-error={}",
                dir.path().join("error.log").display()
            ))
            .arg(format!("--log-bin={}", data.join("binlog").display()))
            .arg(format!("--binlog-format={binlog_format}"))
            .arg(format!("--port={port}"))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--server-id=1",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=16M",
            ])
            .args(&user)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", server.display()));
        let db = MariaDb {
            _child: ChildGuard(child),
            dir,
            port,
        };
        wait_until("mariadbd to answer", || db.try_sql("SELECT 1").is_ok());
        db
    }

    fn try_sql(&self, sql: &str) -> Result<String, String> {
        let client = program("mariadb", "NEXUS_MARIADB", "/usr/bin/mariadb");
        // The SQL on stdin: a script of any length.
        let mut child = Command::new(client)
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-uroot", "--batch", "--skip-column-names"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(sql.as_bytes()).map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs SQL as root; its output (tab-separated, no header). Panics on an error.
    pub fn sql(&self, sql: &str) -> String {
        self.try_sql(sql)
            .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"))
    }

    /// The server's Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// Its data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates a user with a password and these privileges `ON *.*` (`""`: none).
    pub fn create_user(&self, user: &str, password: &str, privileges: &str) {
        let mut sql = format!("CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{password}';");
        if !privileges.is_empty() {
            sql.push_str(&format!(
                "GRANT {privileges} ON *.* TO '{user}'@'127.0.0.1';"
            ));
        }
        self.sql(&sql);
    }

    /// The URL of `user` on this server.
    pub fn url(&self, user: &str, password: &str) -> String {
        format!("mysql://{user}:{password}@127.0.0.1:{}", self.port)
    }

    /// How many binary log readers (replicas) are connected now.
    pub fn binlog_readers(&self) -> usize {
        self.sql(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE COMMAND LIKE 'Binlog Dump%'",
        )
        .trim()
        .parse()
        .unwrap_or(0)
    }
}
