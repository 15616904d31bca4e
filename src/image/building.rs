//! Images being made by a running `commit`: a marker per commit in
//! `images/building/`, so `image ls` shows the image as `building` before
//! it exists. A marker whose process is gone (killed) means nothing and is
//! removed by the next listing.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::store::ImageStore;
use super::{ImageError, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Building {
    /// The reference the image will have.
    pub reference: String,
    /// What it is made from (the workspace being committed).
    pub source: String,
    pub pid: u32,
    pub since: String,
}

/// Removes its marker when dropped.
pub struct BuildingGuard(PathBuf);

impl Drop for BuildingGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn dir(store: &ImageStore) -> PathBuf {
    store.root.join("building")
}

fn alive(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(|p| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None) != Err(nix::errno::Errno::ESRCH)
    })
}

/// Marks `reference` as being built by this process from `source`.
pub fn mark(store: &ImageStore, reference: &str, source: &str) -> Result<BuildingGuard> {
    let dir = dir(store);
    std::fs::create_dir_all(&dir).map_err(ImageError::io(&dir))?;
    let b = Building {
        reference: reference.to_string(),
        source: source.to_string(),
        pid: std::process::id(),
        since: crate::util::time::now_rfc3339(),
    };
    let path = dir.join(format!("{}-{}.json", b.pid, super::blob::unique()));
    let bytes = serde_json::to_vec(&b).map_err(ImageError::json("building marker"))?;
    crate::util::fs::write_atomic(&path, &bytes).map_err(ImageError::io(&path))?;
    Ok(BuildingGuard(path))
}

/// The images being built now, oldest first.
pub fn list(store: &ImageStore) -> Vec<Building> {
    let Ok(rd) = std::fs::read_dir(dir(store)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let parsed = crate::util::fs::read_bounded(&entry.path())
            .ok()
            .and_then(|b| serde_json::from_slice::<Building>(&b).ok());
        match parsed {
            Some(b) if alive(b.pid) => out.push(b),
            // Not ours to judge while it is being written.
            _ if entry.file_name().to_string_lossy().starts_with('.') => {}
            _ => {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    out.sort_by(|a, b| a.since.cmp(&b.since));
    out
}
