//! `GET /v1/snapshots` (every kind, as `snapshot list`) and
//! `POST /v1/apply` (a definition's YAML in the body, as `apply -f`).
//! Personal snapshots are the server user's: its uid is the caller's.

use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::json;

use super::error::Body;
use super::routes::{blocking, ok, Answer, ServerReport};
use crate::engine::apply::{parse_definitions, ApplyOptions, Existing};

pub(super) fn routes() -> Router<super::State> {
    Router::new()
        .route("/v1/snapshots", get(catalog))
        .route("/v1/apply", post(apply))
}

async fn catalog(State(s): State<super::State>) -> Answer {
    let rows = blocking(&s, |e| e.snapshot_catalog()).await?;
    ok(serde_json::to_value(rows).unwrap_or_default())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyBody {
    /// The definition file's text (docs/definitions.md).
    yaml: String,
    /// Refuse when a workspace exists (`create -f`) instead of leaving
    /// equal ones alone.
    #[serde(default)]
    create_only: bool,
}

async fn apply(State(s): State<super::State>, Body(b): Body<ApplyBody>) -> Answer {
    let done = blocking(&s, move |e| {
        let defs = parse_definitions(&b.yaml, "definition")?;
        let existing = if b.create_only {
            Existing::Refuse
        } else {
            Existing::KeepEqual
        };
        e.apply(
            &defs,
            existing,
            &ApplyOptions::default(),
            &ServerReport::new(),
        )
    })
    .await?;
    ok(json!({ "workspaces": done }))
}
