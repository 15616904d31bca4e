//! Who uses which image and layer disk: every workspace record and every
//! snapshot manifest, read fresh. `image rm` refuses to take away what
//! they stand on and says who they are; collection keeps their layers.

use std::collections::HashSet;

use super::Result;
use crate::image::store::ImageRecord;
use crate::snapshot::manifest::Manifest;
use crate::workspace::store::StateDir;

/// One user of an image: a workspace, or a snapshot of one.
struct User {
    /// `workspace NAME` or `snapshot NAME:TAG`.
    label: String,
    image_digest: Option<String>,
    layers: Vec<String>,
    boot_disk: Option<String>,
    /// The kernel a workspace boots (snapshots pin it by sha256 only).
    kernel: Option<String>,
}

pub(crate) struct References {
    users: Vec<User>,
    /// Every layer disk key a workspace or snapshot needs.
    pub layers: HashSet<String>,
    /// Every boot disk (file name) a workspace or snapshot needs.
    pub boot_disks: HashSet<String>,
    /// Every kernel path a workspace boots.
    pub kernels: HashSet<String>,
}

/// Reads every workspace and snapshot of `state`. Unreadable records are
/// skipped: they cannot be restored either.
pub(crate) fn collect(state: &StateDir) -> Result<References> {
    let mut users = Vec::new();
    for name in state.list()? {
        let Ok(ws) = state.existing(&name) else {
            continue;
        };
        let Ok(rec) = ws.read() else {
            continue;
        };
        users.push(User {
            label: format!("workspace {name}"),
            image_digest: rec.image_digest.clone(),
            layers: rec
                .layout
                .as_ref()
                .map(|l| l.layer_keys())
                .unwrap_or_default(),
            boot_disk: rec.layout.as_ref().and_then(|l| {
                l.boot_disk
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            }),
            kernel: Some(rec.kernel.clone()),
        });
        let Ok(entries) = std::fs::read_dir(ws.snapshots()) else {
            continue;
        };
        let mut snaps: Vec<User> = entries
            .flatten()
            .filter_map(|e| {
                let m = Manifest::read(&e.path()).ok()?;
                Some(User {
                    label: format!("snapshot {name}:{}", m.tag),
                    image_digest: m.image_digest.clone(),
                    layers: m.layer_disks.iter().map(|d| d.key.clone()).collect(),
                    boot_disk: m.boot_disk.as_ref().map(|d| d.key.clone()),
                    kernel: None,
                })
            })
            .collect();
        snaps.sort_by(|a, b| a.label.cmp(&b.label));
        users.extend(snaps);
    }
    let layers = users
        .iter()
        .flat_map(|u| u.layers.iter().cloned())
        .collect();
    let boot_disks = users.iter().filter_map(|u| u.boot_disk.clone()).collect();
    let kernels = users.iter().filter_map(|u| u.kernel.clone()).collect();
    Ok(References {
        users,
        layers,
        boot_disks,
        kernels,
    })
}

impl References {
    /// Who stands on `image`: the workspaces made from it and their
    /// snapshots (forks carry the image they were forked from).
    pub(crate) fn users_of(&self, image: &ImageRecord) -> Vec<String> {
        let digest = image.digest.to_string();
        self.users
            .iter()
            .filter(|u| u.image_digest.as_deref() == Some(digest.as_str()))
            .map(|u| u.label.clone())
            .collect()
    }
}
