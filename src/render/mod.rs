//! The documented JSON shapes (docs/json.md): one place, so that the CLI's
//! `--json` and the HTTP API answer with the same documents.

use serde_json::{json, Value};

use crate::engine::auto_snapshot::AutoSnapshot;
use crate::engine::commit::Committed;
use crate::engine::lifecycle::{Halted, Started};
use crate::engine::snapshot::{Created, SnapshotInfo};
use crate::engine::volume::VolumeView;
use crate::engine::WorkspaceView;
use crate::image::building::Building;
use crate::image::ops::Ready;
use crate::image::push::Pushed;
use crate::image::store::ImageRecord;
use crate::workspace::volume::{Consistency, VolumeSnapshotRecord};

/// "workspace".
pub fn workspace(v: &WorkspaceView) -> Value {
    let rec = &v.record;
    json!({
        "name": rec.name,
        "status": v.status.name(),
        "crash_reason": v.crash_reason,
        "image": rec.image,
        "image_digest": rec.image_digest,
        "rootfs_source": rec.rootfs_source,
        "vcpus": rec.vcpus,
        "memory_mib": rec.memory_mib,
        "kernel": rec.kernel,
        "kernel_sha256": rec.kernel_sha256,
        "cmdline": rec.cmdline,
        "cpu_template": rec.cpu_template,
        "network": rec.network.name(),
        "ports": rec.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "auto_snapshot_on_stop": rec.auto_snapshot_on_stop,
        "max_snapshots": rec.max_snapshots,
        "volumes": rec.volumes.iter().map(|m| json!({
            "volume": m.volume,
            "path": m.path,
            "read_only": m.read_only,
        })).collect::<Vec<_>>(),
        "created": rec.created,
        "pid": v.pid,
        "dir": v.dir.dir.display().to_string(),
    })
}

/// "workspace-status".
pub fn workspace_status(v: &WorkspaceView) -> Value {
    let mut j = workspace(v);
    j["network_state"] = json!(v.network_state);
    j["limits"] = json!(v.limits);
    j
}

/// "workspace-start".
pub fn started(s: &Started) -> Value {
    let mut j = workspace(&s.workspace);
    j["boot"] = s.boot.name().into();
    j["running_ms"] = s.running_ms.into();
    j["start_ms"] = s.start_ms.into();
    j
}

/// "workspace-halt".
pub fn halted(h: &Halted) -> Value {
    let mut j = workspace(&h.workspace);
    j["forced"] = h.forced.into();
    let (tag, error, rotated): (Option<&str>, Option<&str>, &[String]) = match &h.auto_snapshot {
        AutoSnapshot::Skipped => (None, None, &[]),
        AutoSnapshot::Taken {
            created,
            rotated_out,
        } => (Some(&created.snapshot.manifest.tag), None, rotated_out),
        AutoSnapshot::Failed(why) => (None, Some(why), &[]),
    };
    j["auto_snapshot"] = json!(tag);
    j["auto_snapshot_error"] = json!(error);
    j["rotated_out"] = json!(rotated);
    j
}

/// "image".
pub fn image(r: &ImageRecord) -> Value {
    json!({
        "id": r.id(),
        "digest": r.digest.to_string(),
        "refs": r.refs,
        "source": r.source,
        "layers": r.layers.len(),
        "content_bytes": r.content_bytes,
        "disk_bytes": r.disk_bytes,
        "created": r.created,
        "config": r.run,
        "state": "ready",
    })
}

/// "image-fetch".
pub fn image_fetched(ready: &Ready) -> Value {
    let mut v = image(&ready.record);
    v["cached"] = json!(ready.cached);
    v["seconds"] = json!(ready.seconds);
    v
}

/// "image-push".
pub fn image_pushed(rec: &ImageRecord, p: &Pushed) -> Value {
    let mut v = image(rec);
    v["pushed_to"] = json!(p.reference);
    v["pushed_digest"] = json!(p.manifest_digest.to_string());
    v["blobs_pushed"] = json!(p.blobs_pushed);
    v["blobs_skipped"] = json!(p.blobs_skipped);
    v["bytes_pushed"] = json!(p.bytes_pushed);
    v
}

/// "image-commit".
pub fn image_committed(c: &Committed) -> Value {
    let mut v = image(&c.image);
    v["workspace"] = json!(c.workspace);
    v["new_layer"] = json!({
        "digest": c.layer.blob.digest.to_string(),
        "diff_id": c.layer.diff_id.to_string(),
        "size": c.layer.blob.size,
        "uncompressed_bytes": c.layer.uncompressed_bytes,
        "entries": c.entries,
    });
    v["duration_ms"] = json!(c.duration_ms);
    v["paused_ms"] = json!(c.paused_ms);
    v
}

/// "image" while a commit is still making it: what is known so far.
pub fn image_building(b: &Building) -> Value {
    json!({
        "id": null,
        "digest": null,
        "refs": [b.reference],
        "source": b.source,
        "layers": null,
        "content_bytes": null,
        "disk_bytes": null,
        "created": b.since,
        "config": null,
        "state": "building",
    })
}

/// "snapshot-create".
pub fn snapshot_created(c: &Created) -> Value {
    let m = &c.snapshot.manifest;
    json!({
        "workspace": c.snapshot.workspace,
        "tag": m.tag,
        "created": m.created,
        "vcpus": m.vcpus,
        "memory_mib": m.memory_mib,
        "size_bytes": c.snapshot.size_bytes,
        "dir": c.snapshot.dir.display().to_string(),
        "duration_ms": c.duration_ms,
        "paused_ms": c.paused_ms,
        "secrets_scrubbed": c.secrets_scrubbed,
        "memory_layers": m.memory_layers.len().max(1),
        "memory_bytes": c.memory_bytes,
    })
}

/// "snapshot-entry".
pub fn snapshot_entry(s: &SnapshotInfo) -> Value {
    let m = &s.manifest;
    json!({
        "kind": "memory", "tag": m.tag, "size_bytes": s.size_bytes, "created": m.created,
        "image": m.image, "vcpus": m.vcpus, "memory_mib": m.memory_mib,
        "kernel_sha256": m.kernel_sha256,
    })
}

/// `snapshot verify`: schema `snapshot-verify`.
pub fn snapshot_verified(v: &crate::engine::snapshot_verify::Verified) -> Value {
    let files: Vec<Value> = v
        .files
        .iter()
        .map(|f| json!({"name": f.name, "size": f.size, "sha256": f.sha256}))
        .collect();
    json!({"workspace": v.workspace, "tag": v.tag, "verified": true, "files": files})
}

/// `snapshot push`: schema `snapshot-push`.
pub fn snapshot_pushed(p: &crate::engine::share::SnapshotPushed) -> Value {
    json!({
        "workspace": p.workspace,
        "tag": p.tag,
        "reference": p.reference,
        "digest": p.digest,
        "blobs": p.blobs,
        "blobs_pushed": p.blobs_pushed,
        "chunks": p.chunks,
        "bytes_total": p.bytes_total,
        "bytes_pushed": p.bytes_pushed,
        "duration_ms": p.duration_ms,
    })
}

/// `snapshot pull`: schema `snapshot-pull`.
pub fn snapshot_pulled(p: &crate::engine::share_pull::SnapshotPulled) -> Value {
    json!({
        "workspace": p.workspace,
        "tag": p.tag,
        "reference": p.reference,
        "digest": p.digest,
        "blobs": p.blobs,
        "blobs_fetched": p.blobs_fetched,
        "bytes_fetched": p.bytes_fetched,
        "duration_ms": p.duration_ms,
    })
}

/// How a volume snapshot was made consistent, as printed.
pub fn consistency(c: Consistency) -> &'static str {
    match c {
        Consistency::Detached => "detached",
        Consistency::Frozen => "frozen",
        Consistency::Paused => "paused",
    }
}

/// "volume-snapshot".
pub fn volume_snapshot(s: &VolumeSnapshotRecord) -> Value {
    json!({
        "volume": s.volume,
        "tag": s.tag,
        "created": s.created,
        "consistency": consistency(s.consistency),
        "workspace": s.workspace,
    })
}

/// "volume".
pub fn volume(v: &VolumeView) -> Value {
    json!({
        "name": v.record.name,
        "size": v.record.size,
        "allocated_bytes": v.allocated_bytes,
        "created": v.record.created,
        "from_snapshot": v.record.from_snapshot,
        "dir": v.dir.display().to_string(),
        "attached": v.users.iter().map(|u| json!({
            "workspace": u.workspace,
            "path": u.path,
            "read_only": u.read_only,
            "status": u.status.name(),
        })).collect::<Vec<_>>(),
        "snapshots": v.snapshots.iter().map(volume_snapshot).collect::<Vec<_>>(),
    })
}

/// "container-snapshot".
pub fn container_snapshot(c: &crate::engine::container_snapshot::ContainerSnapshot) -> Value {
    json!({
        "workspace": c.workspace,
        "tag": c.tag,
        "created": c.created,
        "consistency": consistency(c.consistency),
        "volumes": c.volumes,
    })
}
