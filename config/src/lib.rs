//! The `burst.nexus.*` properties and where their values come from.
//!
//! One table ([`PROPERTIES`]) is the single source of truth for name, type, default, unit and
//! meaning. The property `burst.nexus.x.y` is read from the environment variable
//! `BURST_NEXUS_X_Y`. Precedence, highest first: command-line flag, `-D name=value`, the
//! environment, a properties file (`--config FILE`), the default.
//!
//! The environment is passed in as a lookup function, so tests never touch the process
//! environment. The server and client crates turn [`Values`] into their configurations.

mod table;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub use table::{Property, Type, ALIASES, PROPERTIES};

/// The environment variable of a property: upper-case, dots become underscores.
pub fn env_name(property: &str) -> String {
    property.to_ascii_uppercase().replace('.', "_")
}

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag.
    Flag,
    /// `-D name=value`.
    Define,
    /// The environment.
    Env,
    /// The properties file.
    File,
    /// The built-in default.
    Default,
}

impl Origin {
    /// How `nexus config` names it.
    pub fn label(self) -> &'static str {
        match self {
            Origin::Flag => "flag",
            Origin::Define => "-D",
            Origin::Env => "env",
            Origin::File => "file",
            Origin::Default => "default",
        }
    }
}

/// A bad value or an unknown name: the message names the property or variable and the value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadValue(pub String);

/// Looks up an environment variable by name.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Everything a value may come from, besides the defaults.
#[derive(Default)]
pub struct Sources<'a> {
    /// Command-line flags, by property name.
    pub flags: Vec<(&'static str, String)>,
    /// `-D name=value` pairs, in the order given (the last one wins).
    pub defines: Vec<(String, String)>,
    /// Looks up an environment variable.
    pub env: Option<EnvLookup<'a>>,
    /// A properties file: its path (for messages) and text.
    pub file: Option<(PathBuf, String)>,
}

/// Property values with their origin.
#[derive(Debug, Clone)]
pub struct Values {
    values: BTreeMap<&'static str, (String, Origin)>,
    file: Option<PathBuf>,
}

fn canonical(name: &str) -> Option<&'static Property> {
    let name = ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, property)| property);
    PROPERTIES.iter().find(|p| p.name == name)
}

/// The `name=value` lines of a properties file, with their line numbers. Blank lines and
/// lines starting with `#` or `!` are skipped; spaces around the name and the value are not
/// part of them.
pub fn parse_properties_file(path: &Path, text: &str) -> Result<Vec<(String, String)>, BadValue> {
    let mut pairs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            return Err(BadValue(format!(
                "{}:{}: expected name=value, got {line:?}",
                path.display(),
                index + 1
            )));
        };
        let name = name.trim();
        if canonical(name).is_none() {
            return Err(BadValue(format!(
                "{}:{}: unknown property {name}{}",
                path.display(),
                index + 1,
                closest_hint(name, PROPERTIES.iter().map(|p| p.name.to_string()))
            )));
        }
        pairs.push((name.to_string(), value.trim().to_string()));
    }
    Ok(pairs)
}

/// Canonicalises `pairs` (aliases to their property); a canonical name beats an alias given
/// at the same level, and otherwise the last one wins.
fn canonical_pairs(
    pairs: &[(String, String)],
    what: &str,
) -> Result<BTreeMap<&'static str, String>, BadValue> {
    let mut resolved: Vec<(&'static str, &String, bool)> = Vec::with_capacity(pairs.len());
    for (name, value) in pairs {
        match canonical(name) {
            Some(property) => resolved.push((property.name, value, name == property.name)),
            None => {
                return Err(BadValue(format!(
                    "{what} {name}: unknown property{}",
                    closest_hint(name, PROPERTIES.iter().map(|p| p.name.to_string()))
                )))
            }
        }
    }
    resolved.sort_by_key(|(_, _, is_canonical)| *is_canonical);
    Ok(resolved
        .into_iter()
        .map(|(name, value, _)| (name, value.clone()))
        .collect())
}

impl Values {
    /// Resolves every property from `sources` and the defaults.
    pub fn resolve(sources: &Sources<'_>) -> Result<Values, BadValue> {
        let defines = canonical_pairs(&sources.defines, "-D")?;
        let file = match &sources.file {
            Some((path, text)) => canonical_pairs(&parse_properties_file(path, text)?, "file")?,
            None => BTreeMap::new(),
        };
        let no_env = |_: &str| None;
        let env = sources.env.unwrap_or(&no_env);
        let mut values = BTreeMap::new();
        for property in PROPERTIES {
            let from_env = || {
                env(&env_name(property.name)).or_else(|| {
                    ALIASES
                        .iter()
                        .filter(|(_, p)| *p == property.name)
                        .find_map(|(alias, _)| env(&env_name(alias)))
                })
            };
            let flag = sources
                .flags
                .iter()
                .rev()
                .find(|(n, _)| *n == property.name);
            // An empty value means "not set" (the default), so that `nexus config`'s output
            // can be fed back; but an empty address means "none" (the admin endpoint off).
            let set = |v: &String| !v.trim().is_empty() || property.ty == Type::SocketAddress;
            let flag = flag.filter(|(_, v)| set(v));
            let from_env = || from_env().filter(set);
            let value = if let Some((_, v)) = flag {
                Some((v.clone(), Origin::Flag))
            } else if let Some(v) = defines.get(property.name).filter(|v| set(v)) {
                Some((v.clone(), Origin::Define))
            } else if let Some(v) = from_env() {
                Some((v, Origin::Env))
            } else if let Some(v) = file.get(property.name).filter(|v| set(v)) {
                Some((v.clone(), Origin::File))
            } else {
                (!property.default.is_empty())
                    .then(|| (property.default.to_string(), Origin::Default))
            };
            if let Some(value) = value {
                values.insert(property.name, value);
            }
        }
        Ok(Values {
            values,
            file: sources.file.as_ref().map(|(path, _)| path.clone()),
        })
    }

    /// The values of an environment (`lookup` by variable name) and the defaults.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Values, BadValue> {
        Values::resolve(&Sources {
            env: Some(&lookup),
            ..Sources::default()
        })
    }

    /// The values of these `(variable, value)` pairs and the defaults: an environment given
    /// in code (a test, an application that keeps its own).
    pub fn from_env_vars(vars: &[(&str, &str)]) -> Result<Values, BadValue> {
        Values::from_env(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    /// The values of the process environment and the defaults: what a library embedded in
    /// an application reads (the client's global instance, say).
    pub fn from_process_env() -> Result<Values, BadValue> {
        Values::from_env(|name| std::env::var(name).ok())
    }

    /// Each property with its value (redacted if secret) and origin, for `nexus config`.
    pub fn describe(&self) -> Vec<(&'static Property, String, &'static str)> {
        PROPERTIES
            .iter()
            .map(|p| match self.values.get(p.name) {
                Some((v, origin)) => {
                    let shown = if p.secret {
                        "<redacted>".to_string()
                    } else {
                        v.clone()
                    };
                    (p, shown, origin.label())
                }
                None => (p, String::new(), "unset"),
            })
            .collect()
    }

    /// The raw text of a property and where it came from.
    pub fn raw(&self, name: &str) -> Option<(&str, Origin)> {
        self.values.get(name).map(|(v, o)| (v.as_str(), *o))
    }

    fn source(&self, name: &str, origin: Origin) -> String {
        match origin {
            Origin::Env => format!("environment variable {}", env_name(name)),
            Origin::Flag => format!("flag for {name}"),
            Origin::Define => format!("-D {name}"),
            Origin::File => match &self.file {
                Some(path) => format!("{name} in {}", path.display()),
                None => name.to_string(),
            },
            Origin::Default => format!("default of {name}"),
        }
    }

    /// A property parsed as `T`; `None` when it has no value.
    pub fn parse<T: FromStr>(&self, name: &str) -> Result<Option<T>, BadValue>
    where
        T::Err: std::fmt::Display,
    {
        let Some((text, origin)) = self.raw(name) else {
            return Ok(None);
        };
        text.trim().parse().map(Some).map_err(|e| {
            BadValue(format!(
                "{}: bad value {text:?}: {e}",
                self.source(name, origin)
            ))
        })
    }

    /// A property that must be greater than zero.
    pub fn positive<T: FromStr + PartialOrd + Default>(
        &self,
        name: &str,
    ) -> Result<Option<T>, BadValue>
    where
        T::Err: std::fmt::Display,
    {
        match self.parse::<T>(name)? {
            Some(v) if v <= T::default() => {
                let (text, origin) = self.raw(name).unwrap_or(("", Origin::Default));
                Err(BadValue(format!(
                    "{}: bad value {text:?}: must be greater than 0",
                    self.source(name, origin)
                )))
            }
            v => Ok(v),
        }
    }

    /// A byte count with an optional unit (`64KiB`, `1GiB`, `10GB`), greater than 0.
    pub fn size(&self, name: &str) -> Result<Option<u64>, BadValue> {
        let Some((text, origin)) = self.raw(name) else {
            return Ok(None);
        };
        match nexus_protocol::size::parse_size(text.trim()) {
            Some(0) | None => Err(BadValue(format!(
                "{}: bad value {text:?}: expected a size greater than 0, like 1048576, 64KiB \
                 or 1GiB",
                self.source(name, origin)
            ))),
            Some(n) => Ok(Some(n)),
        }
    }

    /// A size that must fit `T` (a `u32` field, say).
    pub fn size_as<T: TryFrom<u64>>(&self, name: &str) -> Result<Option<T>, BadValue> {
        let Some(n) = self.size(name)? else {
            return Ok(None);
        };
        T::try_from(n).map(Some).map_err(|_| {
            let (text, origin) = self.raw(name).unwrap_or(("", Origin::Default));
            BadValue(format!(
                "{}: bad value {text:?}: too large",
                self.source(name, origin)
            ))
        })
    }

    /// A positive duration in milliseconds.
    pub fn millis(&self, name: &str) -> Result<Option<Duration>, BadValue> {
        Ok(self.positive::<u64>(name)?.map(Duration::from_millis))
    }

    /// The shared secret, from `burst.nexus.auth.secret` or the file
    /// `burst.nexus.auth.secret.file` names (one trailing newline ignored).
    pub fn secret(&self) -> Result<Option<Vec<u8>>, BadValue> {
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

    /// `BURST_NEXUS_*` variables in `env_vars` that name no property, each with the closest
    /// known variable.
    pub fn unknown_env(env_vars: impl Iterator<Item = String>) -> Vec<(String, String)> {
        let known: Vec<String> = PROPERTIES.iter().map(|p| env_name(p.name)).collect();
        env_vars
            .filter(|v| v.starts_with("BURST_NEXUS_") && !known.contains(v))
            .map(|v| {
                let closest = closest(&v, known.iter().cloned()).unwrap_or_default();
                (v, closest)
            })
            .collect()
    }
}

fn closest(name: &str, candidates: impl Iterator<Item = String>) -> Option<String> {
    candidates.min_by_key(|k| edit_distance(k, name))
}

fn closest_hint(name: &str, candidates: impl Iterator<Item = String>) -> String {
    closest(name, candidates).map_or_else(String::new, |c| format!("; did you mean {c}?"))
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

/// How one property sets one part of a configuration `C`: one row of a table that binds
/// every property a configuration reads to its field, in place of a chain of hand-written
/// lookups. Make rows with [`bind!`].
pub struct Binding<C> {
    /// The property.
    pub name: &'static str,
    /// Reads it from the values into the configuration; `Ok` without change when unset.
    pub apply: fn(&mut C, &Values, &'static str) -> Result<(), BadValue>,
}

/// Applies every binding of `table` to `config`.
pub fn apply<C>(config: &mut C, values: &Values, table: &[Binding<C>]) -> Result<(), BadValue> {
    for binding in table {
        (binding.apply)(config, values, binding.name)?;
    }
    Ok(())
}

/// One [`Binding`]: `bind!("burst.nexus.server.port", parse::<u16>, |c, v| c.port = v)`. The
/// reader is a method of [`Values`] (`parse::<T>`, `positive::<T>`, `size`, `size_as::<T>`,
/// `millis`); the setter runs only when the property has a value.
#[macro_export]
macro_rules! bind {
    ($name:literal, $read:ident $(::<$t:ty>)?, |$c:ident, $v:ident| $set:expr) => {
        $crate::Binding {
            name: $name,
            apply: |$c, values, name| {
                if let Some($v) = values.$read$(::<$t>)?(name)? {
                    $set;
                }
                Ok(())
            },
        }
    };
}

/// The README's configuration table, generated from [`PROPERTIES`].
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| property | environment variable | type | default | unit | meaning |\n|---|---|---|---|---|---|\n",
    );
    for p in PROPERTIES {
        let default = if p.default.is_empty() {
            "-".to_string()
        } else {
            format!("`{}`", p.default)
        };
        let unit = if p.unit.is_empty() { "-" } else { p.unit };
        out.push_str(&format!(
            "| `{}` | `{}` | {} | {default} | {unit} | {} |\n",
            p.name,
            env_name(p.name),
            p.ty.name(),
            p.description
        ));
    }
    out
}

/// The environment file of `deploy/`: every property, commented out at its default.
pub fn env_file() -> String {
    let mut out = String::from(
        "# Nexus properties: uncomment a line to change it. Generated by `nexus config --env-file`.\n",
    );
    for p in PROPERTIES {
        out.push_str(&format!("\n# {} ({})\n", p.description, p.name));
        out.push_str(&format!("#{}={}\n", env_name(p.name), p.default));
    }
    out
}

#[cfg(test)]
mod tests;
