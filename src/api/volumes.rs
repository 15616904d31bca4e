//! The `/v1/volumes` routes: create, list, inspect, remove, snapshot,
//! revert, delete a snapshot. Same engine calls and JSON shapes as
//! `microagent volume`.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::Body;
use super::routes::{blocking, created, ok, Answer, ServerReport};
use crate::render;

pub(super) fn routes() -> Router<super::State> {
    Router::new()
        .route("/v1/volumes", get(list).post(create))
        .route("/v1/volumes/{name}", get(inspect).delete(remove))
        .route("/v1/volumes/{name}/snapshots", post(snapshot))
        .route(
            "/v1/volumes/{name}/snapshots/{tag}",
            axum::routing::delete(snapshot_delete),
        )
        .route("/v1/volumes/{name}/snapshots/{tag}/revert", post(revert))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    /// Bytes (default 1 GiB).
    size: Option<u64>,
    /// `VOLUME:TAG`: a copy-on-write clone of that volume snapshot.
    from_snapshot: Option<String>,
}

async fn create(State(s): State<super::State>, Body(b): Body<CreateBody>) -> Answer {
    let v = blocking(&s, move |e| {
        e.volume_create(&b.name, b.size, b.from_snapshot.as_deref())
    })
    .await?;
    created(render::volume(&v))
}

async fn list(State(s): State<super::State>) -> Answer {
    let rows = blocking(&s, |e| e.volume_list()).await?;
    ok(Value::Array(rows.iter().map(render::volume).collect()))
}

async fn inspect(State(s): State<super::State>, Path(name): Path<String>) -> Answer {
    let v = blocking(&s, move |e| e.volume_inspect(&name)).await?;
    ok(render::volume(&v))
}

async fn remove(State(s): State<super::State>, Path(name): Path<String>) -> Answer {
    let n = name.clone();
    blocking(&s, move |e| e.volume_remove(&n)).await?;
    ok(json!({"volume": name, "removed": true}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    tag: String,
}

async fn snapshot(
    State(s): State<super::State>,
    Path(name): Path<String>,
    Body(b): Body<SnapshotBody>,
) -> Answer {
    let snap = blocking(&s, move |e| {
        e.volume_snapshot(&name, &b.tag, &ServerReport::new())
    })
    .await?;
    created(render::volume_snapshot(&snap))
}

async fn snapshot_delete(
    State(s): State<super::State>,
    Path((name, tag)): Path<(String, String)>,
) -> Answer {
    let (n, t) = (name.clone(), tag.clone());
    blocking(&s, move |e| e.volume_snapshot_delete(&n, &t)).await?;
    ok(json!({"volume": name, "tag": tag, "removed": true}))
}

async fn revert(
    State(s): State<super::State>,
    Path((name, tag)): Path<(String, String)>,
) -> Answer {
    let v = blocking(&s, move |e| e.volume_revert(&name, &tag)).await?;
    ok(render::volume(&v))
}
