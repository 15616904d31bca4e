//! `commit NAME [REF]` and `diff NAME`.

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::output::{human_size, Out};
use crate::engine::Engine;

#[derive(Args)]
pub struct CommitArgs {
    /// The workspace (running, paused or halted).
    name: String,
    /// The new image's reference (default: the source image's repository
    /// tagged with the UTC time, e.g. localhost/busybox:20261130-065210).
    reference: Option<String>,
}

#[derive(Args)]
pub struct DiffArgs {
    name: String,
}

pub fn commit(engine: &Engine, a: CommitArgs, out: &Out) -> Result<i32> {
    let c = engine.commit(&a.name, a.reference.as_deref(), out)?;
    let v = crate::render::image_committed(&c);
    let paused = c
        .paused_ms
        .map_or(String::new(), |ms| format!(", writes held {ms} ms"));
    out.done(
        &format!(
            "committed {} as {} ({}, {} layers; new layer {} compressed, {} entries) in {} ms{paused}",
            c.workspace,
            c.image.refs.first().map_or(c.image.digest.to_string(), |r| r.clone()),
            c.image.id(),
            c.image.layers.len(),
            human_size(c.layer.blob.size),
            c.entries,
            c.duration_ms,
        ),
        v,
    );
    Ok(0)
}

pub fn diff(engine: &Engine, a: DiffArgs, out: &Out) -> Result<i32> {
    let d = engine.diff(&a.name)?;
    if out.json {
        let changes: Vec<_> = d
            .changes
            .iter()
            .map(|(kind, path)| json!({ "kind": kind, "path": path }))
            .collect();
        println!(
            "{}",
            json!({ "workspace": d.workspace, "changes": changes })
        );
    } else if !out.quiet {
        for (kind, path) in &d.changes {
            let k = serde_json::to_value(kind).ok();
            println!(
                "{} {path}",
                k.as_ref().and_then(|v| v.as_str()).unwrap_or("?")
            );
        }
    }
    Ok(0)
}
