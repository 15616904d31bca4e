//! The runner API of `../shared/seeds/002_*`, verbatim, with the workspace
//! name as the task id: its `curl` lines work against `serve`. Snapshots
//! here are full microagent snapshots (memory too), so a restart resumes
//! processes where the seed's runner only restores files.

use axum::extract::{Path, State};
use axum::routing::{delete, get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::Value;

use super::error::{ApiError, Body};
use super::routes::{self, blocking, ServerReport};
use crate::engine::lifecycle::StartOptions;
use crate::render;

type Answer = Result<axum::response::Response, ApiError>;

fn ok(status: axum::http::StatusCode, v: Value) -> Answer {
    use axum::response::IntoResponse;
    Ok((status, axum::Json(v)).into_response())
}

pub(super) fn routes() -> Router<super::State> {
    Router::new()
        // The same handlers as /v1's: a task id is a workspace name.
        .route(
            "/api/vps/snapshots/{id}",
            post(routes::snapshot_create).get(routes::snapshot_list),
        )
        .route("/api/vps/snapshots/{id}/latest", get(latest))
        .route(
            "/api/vps/snapshots/{id}/{snapshot_id}",
            delete(routes::snapshot_delete),
        )
        .route("/api/vps/restart/{id}", post(restart_named))
        .route("/api/vps/restart", post(restart_body))
}

async fn latest(State(s): State<super::State>, Path(id): Path<String>) -> Answer {
    let info = blocking(&s, move |e| e.snapshot_latest(&id)).await?;
    ok(axum::http::StatusCode::OK, render::snapshot_entry(&info))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestartBody {
    task_id: String,
}

async fn restart_body(State(s): State<super::State>, Body(b): Body<RestartBody>) -> Answer {
    restart(s, b.task_id).await
}

async fn restart_named(State(s): State<super::State>, Path(id): Path<String>) -> Answer {
    restart(s, id).await
}

/// The seed's restart: stop if running (taking the automatic snapshot
/// when that is on), then start from the newest snapshot if there is one.
async fn restart(s: super::State, id: String) -> Answer {
    let started = blocking(&s, move |e| {
        let report = ServerReport::new();
        if e.status(&id)?.status.is_live() {
            e.halt(&id, std::time::Duration::from_secs(10), &report)?;
        }
        let newest = e.snapshot_list(&id, None)?.pop();
        let opts = StartOptions {
            wait: Some(std::time::Duration::from_secs(600)),
            from_snapshot: newest.map(|n| n.manifest.tag),
            cold: false,
        };
        e.start(&id, &opts, &report)
    })
    .await?;
    ok(axum::http::StatusCode::OK, render::started(&started))
}
