//! The properties the `nexus` binary reads: one table, the single source of truth for name,
//! environment variable, default and meaning. The property `burst.nexus.x.y` is read from the
//! variable `BURST_NEXUS_X_Y`. Values are looked up through a function, so tests never touch
//! the process environment.
//!
//! Precedence (highest first): command-line flag, `-D name=value`, environment, default.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use nexus_client::ClientConfig;
use nexus_server::{BackendChoice, ServerConfig};

/// One property.
pub(crate) struct Property {
    /// `burst.nexus.*`.
    pub(crate) name: &'static str,
    /// Default, as text; empty when there is none (the value is then computed or absent).
    pub(crate) default: &'static str,
    /// What it does, with the unit.
    pub(crate) description: &'static str,
    /// Whether the value is secret (redacted when printed).
    pub(crate) secret: bool,
}

/// Every property of the server, in the order `nexus config` prints them.
pub(crate) const PROPERTIES: &[Property] = &[
    p(
        "burst.nexus.server.bind",
        "127.0.0.1",
        "Address to listen on.",
    ),
    p("burst.nexus.server.port", "1270", "TCP port to listen on."),
    p(
        "burst.nexus.server.threads",
        "",
        "Shards (threads with their own runtime); default: the number of cores.",
    ),
    p(
        "burst.nexus.server.root",
        "",
        "Directory file: paths are relative to; default: the working directory.",
    ),
    p(
        "burst.nexus.io.backend",
        "auto",
        "IO backend: auto (io_uring, else epoll with a warning), io_uring (or fail), epoll.",
    ),
    p(
        "burst.nexus.pipe.size",
        "100",
        "Depth in chunks of the queue adapter for producers on other threads.",
    ),
    p(
        "burst.nexus.stream.chunk.size",
        "1048576",
        "Bytes per chunk read from a source.",
    ),
    p(
        "burst.nexus.stream.timeout.ms",
        "60000",
        "A stream whose client gives no credit this long ends with `timeout`, in ms.",
    ),
    p(
        "burst.nexus.stream.window.max",
        "16777216",
        "Largest per-stream window granted to a client, in bytes.",
    ),
    p(
        "burst.nexus.server.max.connections",
        "10000",
        "Most open connections; more get `resource_exhausted`.",
    ),
    p(
        "burst.nexus.server.max.streams",
        "1024",
        "Most concurrent streams per connection.",
    ),
    p(
        "burst.nexus.server.max.frame.size",
        "4194304",
        "Largest frame payload accepted, in bytes.",
    ),
    p(
        "burst.nexus.server.max.paradata",
        "65536",
        "Longest paradata accepted, in bytes.",
    ),
    p(
        "burst.nexus.server.heartbeat.ms",
        "5000",
        "Longest heartbeat interval, in ms.",
    ),
    p(
        "burst.nexus.server.handshake.timeout.ms",
        "10000",
        "Time from connect until the handshake must be done, in ms.",
    ),
    p(
        "burst.nexus.server.drain.timeout.ms",
        "30000",
        "On SIGTERM/SIGINT, how long running streams may go on, in ms.",
    ),
    p(
        "burst.nexus.server.insecure",
        "false",
        "Allow a non-loopback bind address without a secret.",
    ),
    Property {
        name: "burst.nexus.auth.secret",
        default: "",
        description: "Shared secret clients must prove (PROTOCOL.md, authentication).",
        secret: true,
    },
    p(
        "burst.nexus.auth.secret.file",
        "",
        "File holding the shared secret (trailing newline ignored).",
    ),
    p(
        "burst.nexus.client.threads",
        "",
        "Client IO threads (each with its own runtime); default: the number of cores.",
    ),
    p(
        "burst.nexus.client.connections.per.endpoint",
        "1",
        "Connections per server that a client stripes its streams over.",
    ),
    p(
        "burst.nexus.client.pool.stale.ms",
        "3600000",
        "An idle pooled connection unused this long is closed, in ms (alias nexus.client.pool.stale.ms).",
    ),
    p(
        "burst.nexus.client.cache.tender.ms",
        "600000",
        "How often the pool's tender closes stale connections, in ms.",
    ),
    p(
        "burst.nexus.client.pool.max.connections",
        "1024",
        "Most pooled connections; beyond it the least recently used idle one is closed.",
    ),
    p(
        "burst.nexus.client.queue.size",
        "100",
        "Items a stream's consumer queue holds (memory is bounded by the window either way).",
    ),
    p(
        "burst.nexus.client.window",
        "4194304",
        "Per-stream window a client asks for, in bytes: the most data in flight per stream.",
    ),
    p(
        "burst.nexus.client.connect.timeout.ms",
        "10000",
        "Time allowed for a client's TCP connect, in ms.",
    ),
];

/// Other names accepted for a property (as `-D` and as environment variables), for operators
/// of the original system. The canonical name wins when both are set.
pub(crate) const ALIASES: &[(&str, &str)] = &[(
    "nexus.client.pool.stale.ms",
    "burst.nexus.client.pool.stale.ms",
)];

const fn p(name: &'static str, default: &'static str, description: &'static str) -> Property {
    Property {
        name,
        default,
        description,
        secret: false,
    }
}

/// The environment variable of a property.
pub(crate) fn env_name(property: &str) -> String {
    property.to_ascii_uppercase().replace('.', "_")
}

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A command-line flag.
    Flag,
    /// `-D name=value`.
    Define,
    /// The environment.
    Env,
    /// The built-in default.
    Default,
}

/// Property values with their origin.
pub(crate) struct Values {
    values: BTreeMap<&'static str, (String, Origin)>,
}

/// A bad value: names the property or variable and the value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BadValue(pub String);

impl Values {
    /// Resolves every property from flags, defines, and `env` (a lookup by variable name).
    pub(crate) fn resolve(
        flags: &[(&'static str, String)],
        defines: &[(String, String)],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Values, BadValue> {
        let canonical = |name: &str| -> Option<&'static str> {
            let name = ALIASES
                .iter()
                .find(|(alias, _)| *alias == name)
                .map_or(name, |(_, property)| property);
            PROPERTIES.iter().find(|p| p.name == name).map(|p| p.name)
        };
        let mut canonical_defines = Vec::with_capacity(defines.len());
        for (name, value) in defines {
            match canonical(name) {
                Some(property) => {
                    canonical_defines.push((property, value.clone(), name == property))
                }
                None => return Err(BadValue(format!("-D {name}: unknown property"))),
            }
        }
        // A canonical name beats an alias given at the same level.
        canonical_defines.sort_by_key(|(_, _, is_canonical)| *is_canonical);
        let mut values = BTreeMap::new();
        for property in PROPERTIES {
            let flag = flags.iter().rev().find(|(n, _)| *n == property.name);
            let define = canonical_defines
                .iter()
                .rev()
                .find(|(n, _, _)| *n == property.name)
                .map(|(n, v, _)| (n, v));
            let alias_env = || {
                ALIASES
                    .iter()
                    .filter(|(_, p)| *p == property.name)
                    .find_map(|(alias, _)| env(&env_name(alias)))
            };
            let value = if let Some((_, v)) = flag {
                Some((v.clone(), Origin::Flag))
            } else if let Some((_, v)) = define {
                Some((v.clone(), Origin::Define))
            } else if let Some(v) = env(&env_name(property.name)).or_else(alias_env) {
                Some((v, Origin::Env))
            } else {
                (!property.default.is_empty())
                    .then(|| (property.default.to_string(), Origin::Default))
            };
            if let Some(value) = value {
                values.insert(property.name, value);
            }
        }
        Ok(Values { values })
    }

    /// Each property with its value (redacted if secret) and origin, for `nexus config`.
    pub(crate) fn describe(&self) -> Vec<(&'static Property, String, &'static str)> {
        PROPERTIES
            .iter()
            .map(|p| match self.values.get(p.name) {
                Some((v, origin)) => {
                    let shown = if p.secret {
                        "<redacted>".to_string()
                    } else {
                        v.clone()
                    };
                    let origin = match origin {
                        Origin::Flag => "flag",
                        Origin::Define => "-D",
                        Origin::Env => "env",
                        Origin::Default => "default",
                    };
                    (p, shown, origin)
                }
                None => (p, String::new(), "unset"),
            })
            .collect()
    }

    fn raw(&self, name: &str) -> Option<(&str, Origin)> {
        self.values.get(name).map(|(v, o)| (v.as_str(), *o))
    }

    fn parse<T: FromStr>(&self, name: &str) -> Result<Option<T>, BadValue>
    where
        T::Err: std::fmt::Display,
    {
        let Some((text, origin)) = self.raw(name) else {
            return Ok(None);
        };
        text.trim().parse().map(Some).map_err(|e| {
            let source = match origin {
                Origin::Env => format!("environment variable {}", env_name(name)),
                Origin::Flag => format!("flag for {name}"),
                Origin::Define => format!("-D {name}"),
                Origin::Default => format!("default of {name}"),
            };
            BadValue(format!("{source}: bad value {text:?}: {e}"))
        })
    }

    fn positive<T: FromStr + PartialOrd + Default>(&self, name: &str) -> Result<Option<T>, BadValue>
    where
        T::Err: std::fmt::Display,
    {
        match self.parse::<T>(name)? {
            Some(v) if v <= T::default() => Err(BadValue(format!(
                "{name} ({}): must be greater than 0, got {:?}",
                env_name(name),
                self.raw(name).map_or("", |r| r.0)
            ))),
            v => Ok(v),
        }
    }

    fn millis(&self, name: &str) -> Result<Option<Duration>, BadValue> {
        Ok(self.positive::<u64>(name)?.map(Duration::from_millis))
    }

    /// The server configuration these values describe.
    pub(crate) fn server_config(&self) -> Result<ServerConfig, BadValue> {
        let mut c = ServerConfig::default();
        if let Some(v) = self.parse::<IpAddr>("burst.nexus.server.bind")? {
            c.bind = v;
        }
        if let Some(v) = self.parse::<u16>("burst.nexus.server.port")? {
            c.port = v;
        }
        if let Some(v) = self.positive::<usize>("burst.nexus.server.threads")? {
            c.threads = v;
        }
        if let Some(v) = self.parse::<PathBuf>("burst.nexus.server.root")? {
            c.root = v;
        }
        if let Some(v) = self.parse::<BackendChoice>("burst.nexus.io.backend")? {
            c.backend = v;
        }
        if let Some(v) = self.positive::<usize>("burst.nexus.pipe.size")? {
            c.pipe_size = v;
        }
        if let Some(v) = self.positive::<usize>("burst.nexus.stream.chunk.size")? {
            c.chunk_size = v;
        }
        if let Some(v) = self.millis("burst.nexus.stream.timeout.ms")? {
            c.protocol.stream_timeout = v;
        }
        if let Some(v) = self.positive::<u32>("burst.nexus.stream.window.max")? {
            c.protocol.max_window = v;
        }
        if let Some(v) = self.positive::<usize>("burst.nexus.server.max.connections")? {
            c.max_connections = v;
        }
        if let Some(v) = self.positive::<u32>("burst.nexus.server.max.streams")? {
            c.protocol.max_streams = v;
        }
        if let Some(v) = self.positive::<u32>("burst.nexus.server.max.frame.size")? {
            c.protocol.max_frame_size = v;
        }
        if let Some(v) = self.positive::<u32>("burst.nexus.server.max.paradata")? {
            c.protocol.max_paradata = v;
        }
        if let Some(v) = self.millis("burst.nexus.server.heartbeat.ms")? {
            c.protocol.heartbeat_interval = v;
        }
        if let Some(v) = self.millis("burst.nexus.server.handshake.timeout.ms")? {
            c.protocol.handshake_timeout = v;
        }
        if let Some(v) = self.millis("burst.nexus.server.drain.timeout.ms")? {
            c.drain_timeout = v;
        }
        if let Some(v) = self.parse::<bool>("burst.nexus.server.insecure")? {
            c.insecure = v;
        }
        c.protocol.secret = self.secret()?;
        Ok(c)
    }

    /// The shared secret, from the property or the file it names.
    fn secret(&self) -> Result<Option<Vec<u8>>, BadValue> {
        let secret = self
            .raw("burst.nexus.auth.secret")
            .map(|(v, _)| v.as_bytes().to_vec());
        let secret_file = self.parse::<PathBuf>("burst.nexus.auth.secret.file")?;
        let secret = match (secret, secret_file) {
            (Some(_), Some(_)) => {
                return Err(BadValue(
                    "set burst.nexus.auth.secret or burst.nexus.auth.secret.file, not both".into(),
                ))
            }
            (Some(s), None) => Some(s),
            (None, Some(path)) => {
                let text = std::fs::read(&path).map_err(|e| {
                    BadValue(format!(
                        "burst.nexus.auth.secret.file: cannot read {path:?}: {e}"
                    ))
                })?;
                let trimmed = text.strip_suffix(b"\n").unwrap_or(&text);
                Some(trimmed.strip_suffix(b"\r").unwrap_or(trimmed).to_vec())
            }
            (None, None) => None,
        };
        if secret.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(BadValue("the shared secret is empty".into()));
        }
        Ok(secret)
    }

    /// The client configuration these values describe.
    pub(crate) fn client_config(&self) -> Result<ClientConfig, BadValue> {
        let mut c = ClientConfig::default();
        if let Some(v) = self.positive::<usize>("burst.nexus.client.threads")? {
            c.threads = v;
        }
        if let Some(v) = self.parse::<BackendChoice>("burst.nexus.io.backend")? {
            c.backend = v;
        }
        if let Some(v) = self.positive::<usize>("burst.nexus.client.connections.per.endpoint")? {
            c.connections_per_endpoint = v;
        }
        if let Some(v) = self.millis("burst.nexus.client.pool.stale.ms")? {
            c.pool_stale = v;
        }
        if let Some(v) = self.millis("burst.nexus.client.cache.tender.ms")? {
            c.tender_interval = v;
        }
        if let Some(v) = self.positive::<usize>("burst.nexus.client.pool.max.connections")? {
            c.max_connections = v;
        }
        if let Some(v) = self.positive::<usize>("burst.nexus.client.queue.size")? {
            c.queue_size = v;
        }
        if let Some(v) = self.positive::<u32>("burst.nexus.client.window")? {
            c.protocol.initial_window = v;
        }
        if let Some(v) = self.millis("burst.nexus.client.connect.timeout.ms")? {
            c.connect_timeout = v;
        }
        if let Some(v) = self.millis("burst.nexus.stream.timeout.ms")? {
            c.protocol.stream_timeout = v;
        }
        c.protocol.secret = self.secret()?;
        Ok(c)
    }

    /// `BURST_NEXUS_*` variables in `env_vars` that name no property, each with the closest
    /// known variable.
    pub(crate) fn unknown_env(env_vars: impl Iterator<Item = String>) -> Vec<(String, String)> {
        let known: Vec<String> = PROPERTIES.iter().map(|p| env_name(p.name)).collect();
        env_vars
            .filter(|v| v.starts_with("BURST_NEXUS_") && !known.contains(v))
            .map(|v| {
                let closest = known
                    .iter()
                    .min_by_key(|k| edit_distance(k, &v))
                    .cloned()
                    .unwrap_or_default();
                (v, closest)
            })
            .collect()
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The README's configuration table rows, generated from [`PROPERTIES`].
pub(crate) fn markdown_table() -> String {
    let mut out = String::from("| property | default | meaning |\n|---|---|---|\n");
    for p in PROPERTIES {
        let default = if p.default.is_empty() {
            "-".to_string()
        } else {
            format!("`{}`", p.default)
        };
        out.push_str(&format!(
            "| `{}` | {default} | {} |\n",
            p.name, p.description
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_table_is_the_property_table() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let start = readme.find("<!-- properties:start -->\n").unwrap()
            + "<!-- properties:start -->\n".len();
        let end = readme.find("<!-- properties:end -->").unwrap();
        let expected = markdown_table();
        assert!(
            readme[start..end] == expected,
            "README.md's configuration table is out of date; replace it with:\n{expected}"
        );
    }

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn environment_names_follow_the_rule() {
        assert_eq!(
            env_name("burst.nexus.server.port"),
            "BURST_NEXUS_SERVER_PORT"
        );
        for p in PROPERTIES {
            assert!(p.name.starts_with("burst.nexus."), "{}", p.name);
        }
    }

    #[test]
    fn the_original_stale_name_is_an_alias_and_the_canonical_name_wins() {
        let stale = |v: &Values| v.client_config().unwrap().pool_stale;
        let v = Values::resolve(&[], &[], &env(&[("NEXUS_CLIENT_POOL_STALE_MS", "1500")])).unwrap();
        assert_eq!(stale(&v), Duration::from_millis(1500));
        let v = Values::resolve(
            &[],
            &[],
            &env(&[
                ("NEXUS_CLIENT_POOL_STALE_MS", "1500"),
                ("BURST_NEXUS_CLIENT_POOL_STALE_MS", "2500"),
            ]),
        )
        .unwrap();
        assert_eq!(stale(&v), Duration::from_millis(2500));
        let defines = [
            (
                "burst.nexus.client.pool.stale.ms".to_string(),
                "7".to_string(),
            ),
            ("nexus.client.pool.stale.ms".to_string(), "9".to_string()),
        ];
        let v = Values::resolve(&[], &defines, &env(&[])).unwrap();
        assert_eq!(stale(&v), Duration::from_millis(7));
        let v = Values::resolve(&[], &defines[1..], &env(&[])).unwrap();
        assert_eq!(stale(&v), Duration::from_millis(9));
        assert_eq!(
            stale(&Values::resolve(&[], &[], &env(&[])).unwrap()),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn client_properties_reach_the_client_config() {
        let v = Values::resolve(
            &[],
            &[],
            &env(&[
                ("BURST_NEXUS_CLIENT_THREADS", "3"),
                ("BURST_NEXUS_CLIENT_CONNECTIONS_PER_ENDPOINT", "2"),
                ("BURST_NEXUS_CLIENT_CACHE_TENDER_MS", "1000"),
                ("BURST_NEXUS_CLIENT_WINDOW", "65536"),
                ("BURST_NEXUS_STREAM_TIMEOUT_MS", "5000"),
                ("BURST_NEXUS_IO_BACKEND", "epoll"),
            ]),
        )
        .unwrap();
        let c = v.client_config().unwrap();
        assert_eq!((c.threads, c.connections_per_endpoint), (3, 2));
        assert_eq!(c.tender_interval, Duration::from_secs(1));
        assert_eq!(c.protocol.initial_window, 65536);
        assert_eq!(c.protocol.stream_timeout, Duration::from_secs(5));
        assert_eq!(c.backend, BackendChoice::Epoll);
        for bad in ["0", "-1", "abc"] {
            let pairs: &'static [(&'static str, &'static str)] =
                Box::leak(Box::new([("BURST_NEXUS_CLIENT_CACHE_TENDER_MS", bad)]));
            let v = Values::resolve(&[], &[], &env(pairs)).unwrap();
            let err = v.client_config().unwrap_err().to_string();
            assert!(err.contains("BURST_NEXUS_CLIENT_CACHE_TENDER_MS"), "{err}");
        }
    }

    #[test]
    fn precedence_is_flag_then_define_then_env_then_default() {
        let e = env(&[
            ("BURST_NEXUS_SERVER_PORT", "2000"),
            ("BURST_NEXUS_PIPE_SIZE", "7"),
        ]);
        let v = Values::resolve(
            &[("burst.nexus.server.port", "3000".into())],
            &[
                ("burst.nexus.server.port".into(), "4000".into()),
                ("burst.nexus.server.threads".into(), "3".into()),
            ],
            &e,
        )
        .unwrap();
        let c = v.server_config().unwrap();
        assert_eq!(c.port, 3000);
        assert_eq!(c.threads, 3);
        assert_eq!(c.pipe_size, 7);
        assert_eq!(c.chunk_size, 1 << 20);
        let v = Values::resolve(&[], &[], &env(&[("BURST_NEXUS_SERVER_PORT", "2000")])).unwrap();
        assert_eq!(v.server_config().unwrap().port, 2000);
    }

    #[test]
    fn bad_values_name_the_variable_and_the_value() {
        for (var, value) in [
            ("BURST_NEXUS_SERVER_PORT", "abc"),
            ("BURST_NEXUS_SERVER_PORT", "-1"),
            ("BURST_NEXUS_STREAM_TIMEOUT_MS", "0"),
            ("BURST_NEXUS_IO_BACKEND", "kqueue"),
        ] {
            let pairs: &'static [(&str, &str)] = Box::leak(Box::new([(var, value)]));
            let err = Values::resolve(&[], &[], &env(pairs))
                .unwrap()
                .server_config()
                .unwrap_err()
                .to_string();
            assert!(err.contains(var) && err.contains(value), "{err}");
        }
    }

    #[test]
    fn secrets_are_redacted_and_unknown_variables_get_a_suggestion() {
        let v = Values::resolve(&[], &[], &env(&[("BURST_NEXUS_AUTH_SECRET", "hunter2")])).unwrap();
        let described = v.describe();
        let secret = described
            .iter()
            .find(|d| d.0.name == "burst.nexus.auth.secret")
            .unwrap();
        assert_eq!((secret.1.as_str(), secret.2), ("<redacted>", "env"));
        assert_eq!(
            v.server_config().unwrap().protocol.secret.unwrap(),
            b"hunter2"
        );
        let unknown =
            Values::unknown_env(["BURST_NEXUS_SERVER_PROT".to_string(), "HOME".into()].into_iter());
        assert_eq!(
            unknown,
            vec![(
                "BURST_NEXUS_SERVER_PROT".into(),
                "BURST_NEXUS_SERVER_PORT".into()
            )]
        );
    }
}
