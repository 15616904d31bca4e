//! The `/v1` routes: workspaces, snapshots, images, secrets. Each parses,
//! calls the engine on the blocking pool and renders the same JSON shape
//! the CLI's `--json` prints.

use std::path::PathBuf;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, Body};
use crate::engine::auto_snapshot::Settings;
use crate::engine::create::{CreateOptions, RegistryOptions, RootSource};
use crate::engine::fork::ForkOptions;
use crate::engine::lifecycle::StartOptions;
use crate::engine::snapshot::SnapshotOptions;
use crate::engine::{Engine, Reporter};
use crate::image::progress::Progress;
use crate::render;
use crate::workspace::store::NetworkMode;

/// How long a start or fork waits for the guest agent.
const AGENT_WAIT: Duration = Duration::from_secs(600);

/// The server's reporter: warnings go to its stderr, steps nowhere.
pub(super) struct ServerReport(Progress);

impl ServerReport {
    pub fn new() -> ServerReport {
        ServerReport(Progress::Silent)
    }
}

impl Reporter for ServerReport {
    fn warn(&self, message: &str) {
        eprintln!("microagent serve: warning: {message}");
    }
    fn step(&self, _: &str) {}
    fn image_progress(&self) -> &Progress {
        &self.0
    }
}

/// Runs `f` with the engine on the blocking pool: engine calls block on
/// VMs, sockets and disks.
pub(super) async fn blocking<T: Send + 'static>(
    shared: &super::State,
    f: impl FnOnce(&Engine) -> crate::engine::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || f(&shared.engine))
        .await
        .map_err(|e| ApiError::internal(format!("request handler failed: {e}")))?
        .map_err(ApiError::from)
}

pub(super) type Answer = Result<Response, ApiError>;

pub(super) fn ok(v: Value) -> Answer {
    Ok(Json(v).into_response())
}

pub(super) fn created(v: Value) -> Answer {
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

pub(super) fn v1() -> Router<super::State> {
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/workspaces", get(list).post(create))
        .route(
            "/v1/workspaces/{name}",
            get(status).patch(update).delete(delete),
        )
        .route("/v1/workspaces/{name}/start", post(start))
        .route("/v1/workspaces/{name}/halt", post(halt))
        .route("/v1/workspaces/{name}/pause", post(pause))
        .route("/v1/workspaces/{name}/resume", post(resume))
        .route("/v1/workspaces/{name}/exec", post(super::exec::exec))
        .route("/v1/workspaces/{name}/commit", post(commit))
        .route(
            "/v1/workspaces/{name}/snapshots",
            get(snapshot_list).post(snapshot_create),
        )
        .route(
            "/v1/workspaces/{name}/snapshots/{tag}",
            get(snapshot_get).delete(snapshot_delete),
        )
        .route(
            "/v1/workspaces/{name}/snapshots/{tag}/rollback",
            post(rollback),
        )
        .route("/v1/workspaces/{name}/snapshots/{tag}/fork", post(fork))
        .route(
            "/v1/workspaces/{name}/snapshots/{tag}/verify",
            post(snapshot_verify),
        )
        .route("/v1/workspaces/{name}/secrets", get(secret_list))
        .route(
            "/v1/workspaces/{name}/secrets/{key}",
            put(secret_set).delete(secret_remove),
        )
        .route("/v1/images", get(image_list))
        .route("/v1/images/pull", post(image_pull))
        .route("/v1/images/import", post(image_import))
        .route("/v1/images/push", post(image_push))
        .route(
            "/v1/workspaces/{name}/snapshots/{tag}/push",
            post(snapshot_push),
        )
        .route("/v1/snapshots/pull", post(snapshot_pull))
        .merge(super::volumes::routes())
        .merge(super::named::routes())
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        super::OPENAPI,
    )
        .into_response()
}

async fn list(State(s): State<super::State>) -> Answer {
    let rows = blocking(&s, |e| e.list()).await?;
    ok(Value::Array(rows.iter().map(render::workspace).collect()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    image: Option<String>,
    rootfs: Option<PathBuf>,
    /// `WORKSPACE:TAG`, or a snapshot in a registry (`REGISTRY/REPO:TAG`,
    /// pulled first): a fork, started at once.
    from_snapshot: Option<String>,
    vcpus: Option<u64>,
    memory_mib: Option<u64>,
    kernel: Option<PathBuf>,
    /// A program in the root disk the agent starts at boot.
    init: Option<String>,
    network: Option<NetworkMode>,
    auto_snapshot_on_stop: Option<bool>,
    max_snapshots: Option<u32>,
    /// Registry credentials USER:PASSWORD for `image` or a registry
    /// `from_snapshot` (default: the server's docker config).
    creds: Option<String>,
    #[serde(default)]
    insecure_registries: Vec<String>,
    /// Volumes to attach: `VOLUME:/PATH[:ro]`, in order.
    #[serde(default)]
    volumes: Vec<String>,
}

async fn create(State(s): State<super::State>, Body(b): Body<CreateBody>) -> Answer {
    let settings = Settings {
        auto_snapshot_on_stop: b.auto_snapshot_on_stop,
        max_snapshots: b.max_snapshots,
    };
    let registry = RegistryOptions {
        creds: b.creds,
        insecure_registries: b.insecure_registries,
    };
    if let Some(from) = b.from_snapshot {
        if b.image.is_some() || b.rootfs.is_some() || b.kernel.is_some() || b.init.is_some() {
            return Err(ApiError::bad_request(
                "from_snapshot: a fork takes its image, disk and kernel from the snapshot; drop image, rootfs and kernel",
            ));
        }
        let v = blocking(&s, move |e| {
            let opts = ForkOptions {
                from: &from,
                wait: Some(AGENT_WAIT),
                secret_overrides: &[],
                ports: &[],
                settings,
                registry,
            };
            e.fork(&b.name, &opts, &ServerReport::new())
        })
        .await?;
        return created(render::workspace(&v));
    }
    let source = match (b.image, b.rootfs) {
        (Some(i), None) => RootSource::Image(i),
        (None, Some(r)) => RootSource::Rootfs(r),
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of image (an OCI reference), rootfs (an ext4 file) or from_snapshot (WORKSPACE:TAG)",
            ))
        }
    };
    let mut opts = CreateOptions::new(source).with_settings(&settings);
    opts.vcpus = b.vcpus.unwrap_or(opts.vcpus);
    opts.memory = b.memory_mib.unwrap_or(opts.memory);
    opts.kernel = b.kernel;
    opts.init = b.init;
    opts.network = b.network.unwrap_or(opts.network);
    opts.registry = registry;
    opts.volumes = b
        .volumes
        .iter()
        .map(|v| crate::workspace::volume::parse_mount(v))
        .collect::<Result<_, _>>()
        .map_err(ApiError::bad_request)?;
    let v = blocking(&s, move |e| e.create(&b.name, &opts, &ServerReport::new())).await?;
    created(render::workspace(&v))
}

async fn status(State(s): State<super::State>, Path(name): Path<String>) -> Answer {
    let v = blocking(&s, move |e| e.status(&name)).await?;
    ok(render::workspace_status(&v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    auto_snapshot_on_stop: Option<bool>,
    max_snapshots: Option<u32>,
}

async fn update(
    State(s): State<super::State>,
    Path(name): Path<String>,
    Body(b): Body<UpdateBody>,
) -> Answer {
    let settings = Settings {
        auto_snapshot_on_stop: b.auto_snapshot_on_stop,
        max_snapshots: b.max_snapshots,
    };
    let v = blocking(&s, move |e| e.update(&name, &settings)).await?;
    ok(render::workspace(&v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete(
    State(s): State<super::State>,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Answer {
    let n = name.clone();
    blocking(&s, move |e| e.delete(&n, q.force)).await?;
    ok(json!({"name": name, "deleted": true}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    /// Roll back to this tag (`latest`: the newest).
    from_snapshot: Option<String>,
    #[serde(default)]
    cold: bool,
}

async fn start(
    State(s): State<super::State>,
    Path(name): Path<String>,
    Body(b): Body<StartBody>,
) -> Answer {
    let opts = StartOptions {
        wait: Some(AGENT_WAIT),
        from_snapshot: b.from_snapshot,
        cold: b.cold,
    };
    let st = blocking(&s, move |e| e.start(&name, &opts, &ServerReport::new())).await?;
    ok(render::started(&st))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HaltBody {
    /// Seconds before the VMM is killed (default 10).
    timeout_s: Option<u64>,
}

async fn halt(
    State(s): State<super::State>,
    Path(name): Path<String>,
    Body(b): Body<HaltBody>,
) -> Answer {
    let timeout = Duration::from_secs(b.timeout_s.unwrap_or(10).min(3600));
    let h = blocking(&s, move |e| e.halt(&name, timeout, &ServerReport::new())).await?;
    ok(render::halted(&h))
}

async fn pause(State(s): State<super::State>, Path(name): Path<String>) -> Answer {
    let v = blocking(&s, move |e| e.pause(&name)).await?;
    ok(render::workspace(&v))
}

async fn resume(State(s): State<super::State>, Path(name): Path<String>) -> Answer {
    let v = blocking(&s, move |e| e.resume(&name)).await?;
    ok(render::workspace(&v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitBody {
    #[serde(rename = "ref")]
    reference: Option<String>,
}

async fn commit(
    State(s): State<super::State>,
    Path(name): Path<String>,
    Body(b): Body<CommitBody>,
) -> Answer {
    let c = blocking(&s, move |e| {
        e.commit(&name, b.reference.as_deref(), &ServerReport::new())
    })
    .await?;
    created(render::image_committed(&c))
}

pub(super) async fn snapshot_list(
    State(s): State<super::State>,
    Path(name): Path<String>,
) -> Answer {
    let rows = blocking(&s, move |e| e.snapshot_list(&name, None)).await?;
    ok(Value::Array(
        rows.iter().map(render::snapshot_entry).collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SnapshotBody {
    tag: Option<String>,
    /// See `snapshot create --live`.
    #[serde(default)]
    live: bool,
    /// See `snapshot create --full`.
    #[serde(default)]
    full: bool,
}

pub(super) async fn snapshot_create(
    State(s): State<super::State>,
    Path(name): Path<String>,
    Body(b): Body<SnapshotBody>,
) -> Answer {
    let c = blocking(&s, move |e| {
        let opts = SnapshotOptions {
            live: b.live,
            full: b.full,
        };
        e.snapshot_create_with(&name, b.tag.as_deref(), opts, &ServerReport::new())
    })
    .await?;
    created(render::snapshot_created(&c))
}

async fn snapshot_get(
    State(s): State<super::State>,
    Path((name, tag)): Path<(String, String)>,
) -> Answer {
    let info = blocking(&s, move |e| e.snapshot_get(&name, &tag)).await?;
    ok(render::snapshot_entry(&info))
}

pub(super) async fn snapshot_delete(
    State(s): State<super::State>,
    Path((name, tag)): Path<(String, String)>,
) -> Answer {
    let (n, t) = (name.clone(), tag.clone());
    // `latest` names a tag here too; the answer says which was deleted.
    let deleted = blocking(&s, move |e| {
        let real = e.snapshot_get(&n, &t)?.manifest.tag;
        e.snapshot_delete(&n, &real, &|| Ok(()))?;
        Ok(real)
    })
    .await?;
    ok(json!({"workspace": name, "tag": deleted, "deleted": true}))
}

async fn rollback(
    State(s): State<super::State>,
    Path((name, tag)): Path<(String, String)>,
) -> Answer {
    let opts = StartOptions {
        wait: Some(AGENT_WAIT),
        from_snapshot: Some(tag),
        cold: false,
    };
    let st = blocking(&s, move |e| e.start(&name, &opts, &ServerReport::new())).await?;
    ok(render::started(&st))
}

/// Hashes every file of the snapshot again (`snapshot verify`): 200 with
/// the files, or 422 `snapshot_damaged` naming each one that differs.
async fn snapshot_verify(
    State(s): State<super::State>,
    Path((name, tag)): Path<(String, String)>,
) -> Answer {
    let v = blocking(&s, move |e| e.snapshot_verify(&name, &tag)).await?;
    ok(render::snapshot_verified(&v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForkBody {
    /// The new workspace's name.
    name: String,
    auto_snapshot_on_stop: Option<bool>,
    max_snapshots: Option<u32>,
}

async fn fork(
    State(s): State<super::State>,
    Path((name, tag)): Path<(String, String)>,
    Body(b): Body<ForkBody>,
) -> Answer {
    let v = blocking(&s, move |e| {
        let from = format!("{name}:{tag}");
        let opts = ForkOptions {
            from: &from,
            wait: Some(AGENT_WAIT),
            secret_overrides: &[],
            ports: &[],
            settings: Settings {
                auto_snapshot_on_stop: b.auto_snapshot_on_stop,
                max_snapshots: b.max_snapshots,
            },
            registry: Default::default(),
        };
        e.fork(&b.name, &opts, &ServerReport::new())
    })
    .await?;
    created(render::workspace(&v))
}

async fn secret_list(State(s): State<super::State>, Path(name): Path<String>) -> Answer {
    let n = name.clone();
    let keys = blocking(&s, move |e| e.secret_keys(&n)).await?;
    ok(json!({"workspace": name, "keys": keys}))
}

/// The body is the value, as is (never echoed back, never logged).
async fn secret_set(
    State(s): State<super::State>,
    Path((name, key)): Path<(String, String)>,
    value: Bytes,
) -> Answer {
    let (n, k) = (name.clone(), key.clone());
    let value = zeroize::Zeroizing::new(value.to_vec());
    let delivered = blocking(&s, move |e| e.secret_set(&n, &k, &value)).await?;
    ok(json!({"workspace": name, "key": key, "delivered": delivered}))
}

async fn secret_remove(
    State(s): State<super::State>,
    Path((name, key)): Path<(String, String)>,
) -> Answer {
    let (n, k) = (name.clone(), key.clone());
    let scrubbed = blocking(&s, move |e| e.secret_remove(&n, &k)).await?;
    ok(json!({"workspace": name, "key": key, "removed": true, "scrubbed_in_guest": scrubbed}))
}

async fn image_list(State(s): State<super::State>) -> Answer {
    let (records, building) = blocking(&s, |e| Ok((e.image_list()?, e.image_building()))).await?;
    let all = building
        .iter()
        .map(render::image_building)
        .chain(records.iter().map(render::image));
    ok(Value::Array(all.collect()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PullBody {
    #[serde(rename = "ref")]
    reference: String,
    /// USER:PASSWORD (default: the server user's ~/.docker/config.json).
    creds: Option<String>,
    #[serde(default)]
    insecure_registries: Vec<String>,
}

async fn image_pull(State(s): State<super::State>, Body(b): Body<PullBody>) -> Answer {
    let reg = RegistryOptions {
        creds: b.creds,
        insecure_registries: b.insecure_registries,
    };
    let r = blocking(&s, move |e| {
        e.image_pull(&b.reference, &reg, &ServerReport::new())
    })
    .await?;
    ok(render::image_fetched(&r))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportBody {
    /// An OCI layout directory or archive on the server's host.
    path: PathBuf,
    tag: Option<String>,
    ref_name: Option<String>,
}

async fn image_import(State(s): State<super::State>, Body(b): Body<ImportBody>) -> Answer {
    let r = blocking(&s, move |e| {
        e.image_import(
            &b.path,
            b.tag.as_deref(),
            b.ref_name.as_deref(),
            &ServerReport::new(),
        )
    })
    .await?;
    ok(render::image_fetched(&r))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushBody {
    /// The local image (reference, digest or ID).
    image: String,
    /// Where to (default: its own reference).
    dest: Option<String>,
    creds: Option<String>,
    #[serde(default)]
    insecure_registries: Vec<String>,
}

async fn image_push(State(s): State<super::State>, Body(b): Body<PushBody>) -> Answer {
    let reg = RegistryOptions {
        creds: b.creds,
        insecure_registries: b.insecure_registries,
    };
    let (rec, p) = blocking(&s, move |e| {
        e.image_push(&b.image, b.dest.as_deref(), &reg, &ServerReport::new())
    })
    .await?;
    ok(render::image_pushed(&rec, &p))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotPushBody {
    /// REGISTRY/REPOSITORY:TAG.
    dest: String,
    creds: Option<String>,
    #[serde(default)]
    insecure_registries: Vec<String>,
}

async fn snapshot_push(
    State(s): State<super::State>,
    Path((name, tag)): Path<(String, String)>,
    Body(b): Body<SnapshotPushBody>,
) -> Answer {
    let reg = RegistryOptions {
        creds: b.creds,
        insecure_registries: b.insecure_registries,
    };
    let p = blocking(&s, move |e| {
        e.snapshot_push(&name, &tag, &b.dest, &reg, &ServerReport::new())
    })
    .await?;
    ok(render::snapshot_pushed(&p))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotPullBody {
    /// REGISTRY/REPOSITORY:TAG (or @sha256:…).
    #[serde(rename = "ref")]
    reference: String,
    /// NAME or NAME:TAG of the new workspace.
    into: Option<String>,
    creds: Option<String>,
    #[serde(default)]
    insecure_registries: Vec<String>,
}

async fn snapshot_pull(State(s): State<super::State>, Body(b): Body<SnapshotPullBody>) -> Answer {
    let reg = RegistryOptions {
        creds: b.creds,
        insecure_registries: b.insecure_registries,
    };
    let p = blocking(&s, move |e| {
        e.snapshot_pull(&b.reference, b.into.as_deref(), &reg, &ServerReport::new())
    })
    .await?;
    created(render::snapshot_pulled(&p))
}
