//! Workspace definitions: the YAML a user keeps beside their code and
//! hands to `apply -f` (schema: docs/definitions.md).
//!
//! Every value is checked while the YAML is read, so a bad one is refused
//! with the file, the line and the field (`workspaces[1].vcpus`), as an
//! unknown field is. What spans workspaces (unique names, dependencies
//! that exist, no cycles) is checked after, and names the line too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use super::store::validate_name;
use super::volume::parse_mount;
use crate::devices::virtio::net::config::PortMap;

/// The largest definition file read.
pub const MAX_DEFINITION_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefinitionFile {
    pub workspaces: Vec<Definition>,
}

/// A string checked as it is read, so that a bad one is refused at its
/// own line with its own path (`workspaces[0].volumes[1]`): the check runs
/// inside the YAML reader's visit, where the position is known.
macro_rules! checked_str {
    ($(#[$doc:meta])* $ty:ident, $what:expr, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $ty(pub String);

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<$ty, E> {
                        let check: fn(&str) -> Result<(), String> = $check;
                        check(s).map_err(E::custom)?;
                        Ok($ty(s.to_string()))
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

/// A number checked as it is read (see [`checked_str`]).
macro_rules! checked_u64 {
    ($ty:ident, $what:expr, $range:expr) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
        #[serde(transparent)]
        pub struct $ty(pub u64);

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<$ty, E> {
                        if !$range.contains(&n) {
                            return Err(E::custom(format!("{n}: give {}", $what)));
                        }
                        Ok($ty(n))
                    }
                    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<$ty, E> {
                        Err(E::custom(format!("{n}: give {}", $what)))
                    }
                }
                d.deserialize_u64(V)
            }
        }
    };
}

fn check_name(s: &str) -> Result<(), String> {
    validate_name(s).map_err(|_| {
        format!(
            "invalid name {s:?}: use 1-63 lowercase letters, digits and '-', not starting with '-'"
        )
    })
}

checked_str!(
    /// A workspace or snapshot name.
    Name,
    "a name (lowercase letters, digits, '-')",
    check_name
);
checked_str!(
    /// A base snapshot's name, or `oci://REF`.
    Base,
    "a snapshot name or oci://REF",
    |s| match s.strip_prefix("oci://") {
        Some(r) => crate::image::reference::normalise(r)
            .map(|_| ())
            .map_err(|e| format!("{s:?}: {e}")),
        None => check_name(s).map_err(|_| {
            format!("{s:?} is neither a snapshot name (lowercase letters, digits, '-') nor oci://REF")
        }),
    }
);
checked_str!(Network, "user or none", |s| match s {
    "user" | "none" => Ok(()),
    _ => Err(format!("network {s:?}: give user or none")),
});
checked_str!(EnvName, "an environment variable name", |k| {
    let ok = !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "environment variable name {k:?}: use letters, digits and '_', not starting with a digit"
        ))
    }
});
checked_str!(Port, "[ADDR:]HOST:GUEST", |p| p
    .parse::<PortMap>()
    .map(|_| ())
    .map_err(|e| format!("port {p:?}: {e}")));
checked_str!(Volume, "VOLUME:/path[:ro]", |v| parse_mount(v)
    .map(|_| ())
    .map_err(|e| format!("volume {v:?}: {e}")));
checked_str!(SecretKey, "a secret key", |k| {
    if guest_agent::valid_secret_key(k) {
        Ok(())
    } else {
        Err(format!(
            "secret key {k:?}: use 1-128 letters, digits, '_', '.', '-', not starting with '.' or '-'"
        ))
    }
});
checked_str!(Step, "a shell command", |s| if s.trim().is_empty() {
    Err("a setup step is empty".to_string())
} else {
    Ok(())
});
checked_u64!(Vcpus, "1 to 32 vCPUs", 1..=32u64);
checked_u64!(Memory, "64 to 65536 (MiB)", 64..=65536u64);

/// One workspace as a definition describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub name: Name,
    pub base_snapshot: Base,
    #[serde(default)]
    pub home_snapshot: Option<Name>,
    /// Apply the user's default personal snapshot.
    #[serde(default = "yes")]
    pub personal: bool,
    #[serde(default = "one")]
    pub vcpus: Vcpus,
    /// MiB.
    #[serde(default = "mib512")]
    pub memory: Memory,
    #[serde(default = "user_net")]
    pub network: Network,
    #[serde(default)]
    pub env: BTreeMap<EnvName, String>,
    #[serde(default)]
    pub ports: Vec<Port>,
    /// A volume that does not exist yet is made.
    #[serde(default)]
    pub volumes: Vec<Volume>,
    #[serde(default)]
    pub secrets: BTreeMap<SecretKey, SecretSource>,
    /// Shell commands run once, in order, in a fresh workspace, and kept
    /// as a checkpoint: a later apply with the same inputs forks it.
    #[serde(default)]
    pub setup: Vec<Step>,
    /// Workspaces of this file made and started first.
    #[serde(default)]
    pub dependencies: Vec<Name>,
}

/// Where a secret's value comes from on the host: exactly one of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// A host environment variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// A host file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

fn yes() -> bool {
    true
}
fn one() -> Vcpus {
    Vcpus(1)
}
fn mib512() -> Memory {
    Memory(512)
}
fn user_net() -> Network {
    Network("user".into())
}

/// A definition that cannot be used: where and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}:{}{message}", .line.map(|l| format!("{l}: ")).unwrap_or_default())]
pub struct DefinitionError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

/// The 1-based line of the first line at or after `from` that holds
/// `key:` followed by `value` (or `- value` in a list under it).
fn line_of(text: &str, from: usize, needle: &str) -> Option<usize> {
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .find(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
}

/// Reads definition `text` (from `file`, for messages): every workspace,
/// in an order where each comes after its dependencies.
pub fn parse(text: &str, file: &str) -> Result<Vec<Definition>, DefinitionError> {
    let fail = |line, message: String| DefinitionError {
        file: file.to_string(),
        line,
        message,
    };
    if text.len() > MAX_DEFINITION_BYTES {
        return Err(fail(
            None,
            format!("larger than {MAX_DEFINITION_BYTES} bytes"),
        ));
    }
    let parsed: DefinitionFile = serde_yaml_ng::from_str(text).map_err(|e| {
        let line = e.location().map(|l| l.line());
        // The crate appends " at line N column M"; the line leads instead.
        let msg = e.to_string();
        let msg = match msg.rfind(" at line ") {
            Some(i) => msg[..i].to_string(),
            None => msg,
        };
        fail(line, msg)
    })?;
    let defs = parsed.workspaces;
    if defs.is_empty() {
        return Err(fail(None, "workspaces: lists no workspace".into()));
    }
    let name_line = |n: &str| line_of(text, 1, &format!("name: {n}"));
    let mut seen = BTreeSet::new();
    for (i, d) in defs.iter().enumerate() {
        let from = name_line(&d.name.0).unwrap_or(1);
        for (k, s) in &d.secrets {
            if s.env.is_some() == s.file.is_some() {
                return Err(fail(
                    line_of(text, from, &format!("{}:", k.0)),
                    format!(
                        "workspaces[{i}].secrets.{}: give exactly one of env: VAR or file: PATH",
                        k.0
                    ),
                ));
            }
        }
        let ports: Vec<PortMap> = d.ports.iter().filter_map(|p| p.0.parse().ok()).collect();
        if let Err(e) = crate::devices::virtio::net::config::check_unique(&ports) {
            return Err(fail(
                line_of(text, from, "ports:"),
                format!("workspaces[{i}].ports: {e}"),
            ));
        }
        let mounts: Vec<_> = d
            .volumes
            .iter()
            .filter_map(|v| parse_mount(&v.0).ok())
            .collect();
        if let Err(e) = super::volume::validate_mounts(&mounts) {
            return Err(fail(
                line_of(text, from, "volumes:"),
                format!("workspaces[{i}].volumes: {e}"),
            ));
        }
        if !seen.insert(d.name.0.as_str()) {
            let second = text
                .lines()
                .enumerate()
                .filter(|(_, l)| l.contains(&format!("name: {}", d.name.0)))
                .nth(1)
                .map(|(i, _)| i + 1);
            return Err(fail(
                second,
                format!("workspaces[{i}].name: {} is defined twice", d.name.0),
            ));
        }
    }
    for (i, d) in defs.iter().enumerate() {
        for Name(dep) in &d.dependencies {
            if !seen.contains(dep.as_str()) || dep == &d.name.0 {
                let from = name_line(&d.name.0).unwrap_or(1);
                let why = if dep == &d.name.0 {
                    "is the workspace itself".to_string()
                } else {
                    "is not defined in this file".to_string()
                };
                return Err(fail(
                    line_of(text, from, &format!("- {dep}")),
                    format!("workspaces[{i}].dependencies: {dep} {why}"),
                ));
            }
        }
    }
    // Dependencies first (Kahn's algorithm, file order among equals).
    let mut order: Vec<Definition> = Vec::new();
    let mut left: Vec<&Definition> = defs.iter().collect();
    while !left.is_empty() {
        let ready = left.iter().position(|d| {
            d.dependencies
                .iter()
                .all(|dep| order.iter().any(|o| o.name == *dep))
        });
        match ready {
            Some(i) => order.push(left.remove(i).clone()),
            None => {
                let names: Vec<&str> = left.iter().map(|d| d.name.0.as_str()).collect();
                return Err(fail(
                    name_line(names[0]),
                    format!(
                        "dependencies: {} depend on each other in a cycle",
                        names.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
workspaces:
- name: db
  base_snapshot: oci://localhost/redis:latest
  volumes: [data:/data]
- name: app
  base_snapshot: dev-base
  home_snapshot: dotfiles
  vcpus: 2
  memory: 1024
  env: {MODE: test}
  ports: ['8080:80']
  secrets:
    API_TOKEN: {env: MY_TOKEN}
  setup:
  - echo hi > /hi
  dependencies: [db]
";

    #[test]
    fn a_good_file_reads_in_dependency_order() {
        let d = parse(GOOD, "w.yaml").unwrap();
        assert_eq!(d[0].name.0, "db");
        assert_eq!(d[1].vcpus.0, 2);
        assert_eq!(
            d[1].secrets[&SecretKey("API_TOKEN".into())].env.as_deref(),
            Some("MY_TOKEN")
        );
        assert_eq!(d[0].memory.0, 512);
        assert!(d[0].personal);
        // Reordered, the dependency still comes first.
        let swapped = GOOD
            .replacen("- name: db", "- name: dbx", 1)
            .replace("[db]", "[dbx]");
        let text = format!(
            "workspaces:\n{}{}",
            &swapped[swapped.find("- name: app").unwrap()..],
            &swapped[12..swapped.find("- name: app").unwrap()]
        );
        let d = parse(&text, "w.yaml").unwrap();
        assert_eq!(d[0].name.0, "dbx");
    }

    fn err(text: &str) -> DefinitionError {
        parse(text, "w.yaml").unwrap_err()
    }

    #[test]
    fn bad_files_name_the_line_and_the_field() {
        let e = err("workspaces:\n- name: a\n  base_snapshot: b\n  vcpu: 2\n");
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("unknown field `vcpu`"), "{e}");
        assert!(e.to_string().starts_with("w.yaml:4: workspaces[0]"), "{e}");
        let e = err("workspaces:\n- name: a\n  base_snapshot: b\n  memory: 12\n");
        assert_eq!(e.line, Some(4), "{e}");
        assert!(
            e.message.contains("workspaces[0].memory: 12: give 64"),
            "{e}"
        );
        let e = err("workspaces:\n- name: a\n  base_snapshot: b\n  volumes: ['data:relative']\n");
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("workspaces[0].volumes"), "{e}");
        let e = err("workspaces:\n- name: A\n  base_snapshot: b\n");
        assert_eq!(e.line, Some(2), "{e}");
        let e = err("workspaces:\n- base_snapshot: b\n");
        assert!(e.message.contains("missing field `name`"), "{e}");
        let e = err("workspaces:\n- name: a\n  base_snapshot: b\n  dependencies:\n  - ghost\n");
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.message.contains("ghost is not defined"), "{e}");
        let cyc = "workspaces:\n- name: a\n  base_snapshot: b\n  dependencies: [c]\n- name: c\n  base_snapshot: b\n  dependencies: [a]\n";
        assert!(err(cyc).message.contains("cycle"), "{}", err(cyc));
        let twice = "workspaces:\n- name: a\n  base_snapshot: b\n- name: a\n  base_snapshot: b\n";
        assert_eq!(err(twice).line, Some(4));
        let e = err("workspaces:\n- name: a\n  base_snapshot: b\n  secrets: {K: {stdin: x}}\n");
        assert_eq!(e.line, Some(4), "{e}");
        let e = err("workspaces:\n- name: a\n  base_snapshot: b\n  secrets:\n    K: {}\n");
        assert_eq!(e.line, Some(5), "{e}");
        let e = err("workspaces:\n- name: a\n  base_snapshot: b\n  ports: ['1:2', '1:3']\n");
        assert_eq!(e.line, Some(4), "{e}");
    }
}
