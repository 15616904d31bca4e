//! `snapshot create --base/--home/--personal`, `snapshot list` over
//! every kind, `snapshot delete` of a named snapshot, `snapshot default`.

use anyhow::Result;
use serde_json::json;

use super::output::{human_size, Out};
use super::snapshot::{CreateArgs, DefaultArgs, DeleteArgs};
use crate::engine::named_snapshot::HomeOptions;
use crate::engine::{Engine, Reporter};
use crate::workspace::named_snapshots::{Kind, NamedSnapshot};

fn named_json(s: &NamedSnapshot) -> serde_json::Value {
    serde_json::to_value(s).unwrap_or_default()
}

pub fn create(engine: &Engine, args: CreateArgs, out: &Out) -> Result<i32> {
    if let Some(name) = &args.base {
        let (snap, made) = engine.snapshot_base(&args.name, name, out)?;
        out.done(
            &format!(
                "base snapshot {name} created from workspace {}: {} ({} layers, {} new)",
                args.name,
                made.image.refs.first().cloned().unwrap_or_default(),
                made.image.layers.len(),
                human_size(made.layer.uncompressed_bytes)
            ),
            named_json(&snap),
        );
        return Ok(0);
    }
    let (kind, name) = match (&args.home, &args.personal) {
        (Some(h), _) => (Kind::Home, h.clone()),
        (None, Some(p)) => (Kind::Personal, p.clone()),
        (None, None) => unreachable!("called with --base, --home or --personal"),
    };
    let opts = HomeOptions {
        kind,
        name: name.clone(),
        user: args.user.clone(),
        set_default: args.set_personal_default,
    };
    let made = engine.snapshot_home(&args.name, &opts, out)?;
    for m in &made.missing {
        out.warn(&format!(
            "{m} is listed but not in workspace {}: left out",
            args.name
        ));
    }
    for s in &made.skipped {
        out.warn(&format!("{s} is not a file, directory or link: left out"));
    }
    let mut v = named_json(&made.snapshot);
    v["entries"] = json!(made.entries);
    v["missing"] = json!(made.missing);
    v["skipped"] = json!(made.skipped);
    v["default"] = json!(made.is_default);
    v["duration_ms"] = json!(made.duration_ms);
    out.done(
        &format!(
            "{} snapshot {name} created from workspace {}'s {}: {} entries, {}{}",
            kind.name(),
            args.name,
            made.snapshot.home.as_deref().unwrap_or("home"),
            made.entries,
            human_size(made.snapshot.bytes),
            if made.is_default {
                "; now your default"
            } else {
                ""
            }
        ),
        v,
    );
    Ok(0)
}

pub fn list_all(engine: &Engine, out: &Out) -> Result<i32> {
    let rows = engine.snapshot_catalog()?;
    if out.json {
        println!("{}", serde_json::to_value(&rows)?);
        return Ok(0);
    }
    println!(
        "{:<9} {:<32} {:>9} {:<21} SOURCE",
        "KIND", "NAME", "SIZE", "CREATED"
    );
    for r in &rows {
        let name = if r.default {
            format!("{} (default)", r.name)
        } else {
            r.name.clone()
        };
        println!(
            "{:<9} {:<32} {:>9} {:<21} {}",
            r.kind,
            name,
            human_size(r.size_bytes),
            r.created,
            r.source
        );
    }
    Ok(0)
}

pub fn delete(engine: &Engine, args: DeleteArgs, out: &Out) -> Result<i32> {
    let what = format!("snapshot delete removes snapshot {}", args.name);
    super::confirm::confirm(&what, args.yes)?;
    let s = engine.named_snapshot_delete(&args.name, args.personal)?;
    out.done(
        &format!("{} snapshot {} deleted", s.kind.name(), s.name),
        json!({"name": s.name, "kind": s.kind, "deleted": true}),
    );
    Ok(0)
}

pub fn set_default(engine: &Engine, args: DefaultArgs, out: &Out) -> Result<i32> {
    engine.set_personal_default(&args.name)?;
    out.done(
        &format!("personal snapshot {} is now your default", args.name),
        json!({"name": args.name, "default": true}),
    );
    Ok(0)
}
