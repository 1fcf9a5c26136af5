//! A real RabbitMQ broker for the tests: a private node (Debian's `rabbitmq-server`,
//! installed by `scripts/test`) with its own data and log directories in a temp dir, its
//! AMQP, distribution and epmd ports free ports on 127.0.0.1; stopped, and its epmd killed,
//! when the test ends. It can be stopped and started again on the same data, as a broker
//! outage.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::process::ChildGuard;
use crate::{free_port, TempDir};

const BIN: &str = "/usr/lib/rabbitmq/bin";

/// A private RabbitMQ node.
pub struct RabbitMq {
    dir: TempDir,
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
    env: Vec<(String, String)>,
    node: String,
    child: Option<ChildGuard>,
}

fn program(name: &str) -> PathBuf {
    let path = PathBuf::from(BIN).join(name);
    assert!(
        path.exists(),
        "{} not found: the bus tests need Debian's rabbitmq-server (scripts/test installs it)",
        path.display()
    );
    path
}

impl RabbitMq {
    /// Starts a node and waits until it has booted.
    pub fn start() -> RabbitMq {
        let dir = TempDir::new("rabbitmq");
        let port = free_port();
        let node = format!("nexus-test-{port}@localhost");
        let path = |p: &str| dir.path().join(p).display().to_string();
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(dir.path().join("rabbitmq.conf"), "loopback_users = none\n").unwrap();
        let env = vec![
            ("RABBITMQ_NODENAME".to_string(), node.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS".into(), "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT".into(), port.to_string()),
            ("RABBITMQ_DIST_PORT".into(), free_port().to_string()),
            ("ERL_EPMD_PORT".into(), free_port().to_string()),
            ("ERL_EPMD_ADDRESS".into(), "127.0.0.1".into()),
            (
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS".into(),
                "-kernel inet_dist_use_interface {127,0,0,1}".into(),
            ),
            ("RABBITMQ_MNESIA_BASE".into(), path("mnesia")),
            ("RABBITMQ_LOG_BASE".into(), path("log")),
            ("RABBITMQ_CONFIG_FILE".into(), path("rabbitmq")),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE".into(),
                path("enabled_plugins"),
            ),
            ("RABBITMQ_PID_FILE".into(), path("pid")),
            ("HOME".into(), dir.path().display().to_string()),
        ];
        let mut broker = RabbitMq {
            dir,
            port,
            env,
            node,
            child: None,
        };
        broker.boot();
        broker
    }

    fn command(&self, name: &str) -> Command {
        let mut command = Command::new(program(name));
        command
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null());
        command
    }

    fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .command("rabbitmqctl")
            .args(["-n", &self.node])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Starts the node (again, on the same data) and waits until it has booted.
    pub fn boot(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.out")).unwrap();
        let child = self
            .command("rabbitmq-server")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start rabbitmq-server: {e}"));
        self.child = Some(ChildGuard(child));
        // await_startup fails at once while the node has not even registered with epmd
        // (a slow start on a loaded machine): ask again until it has booted, or gave up.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        loop {
            let answer = self.ctl(&["await_startup", "--timeout", "60"]);
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.0.try_wait().is_ok_and(|s| s.is_some()));
            match answer {
                Ok(_) => return,
                Err(e) if exited || std::time::Instant::now() > deadline => {
                    let out = std::fs::read_to_string(self.dir.path().join("server.out"))
                        .unwrap_or_default();
                    panic!("rabbitmq did not boot: {e}\n{out}");
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(250)),
            }
        }
    }

    /// Stops the node (its data stays), and waits until it has.
    pub fn stop(&mut self) {
        let _ = self.ctl(&["stop"]);
        if let Some(mut child) = self.child.take() {
            let _ = child.0.wait();
        }
    }

    /// The URL of the default virtual host as `guest`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Messages ready and unacknowledged in `queue`.
    pub fn queue_depth(&self, queue: &str) -> Option<u64> {
        let out = self
            .ctl(&[
                "list_queues",
                "-q",
                "--no-table-headers",
                "name",
                "messages",
            ])
            .ok()?;
        out.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next()? == queue)
                .then(|| fields.next()?.parse().ok())
                .flatten()
        })
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new("epmd")
            .arg("-kill")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output();
    }
}
