//! Images in the local store: pull, import, list, remove.

use std::path::Path;

use super::create::RegistryOptions;
use super::{invalid, Engine, Error, Reporter, Result};
use crate::image::building::{self, Building};
use crate::image::ops::{self, Ready};
use crate::image::push::{self, Pushed};
use crate::image::reference;
use crate::image::store::{ImageRecord, ImageStore};
use crate::image::ImageError;

impl Engine {
    fn images(&self) -> ImageStore {
        ImageStore::new(&self.state.root)
    }

    /// Pulls `reference` (always asking the registry what it points at now)
    /// and builds its disk unless already built.
    pub fn image_pull(
        &self,
        reference: &str,
        registry: &RegistryOptions,
        report: &dyn Reporter,
    ) -> Result<Ready> {
        Ok(ops::pull(
            &self.images(),
            reference,
            &registry.pull_options(),
            report.image_progress(),
        )?)
    }

    /// Imports an OCI layout, oci-archive or docker-archive.
    pub fn image_import(
        &self,
        path: &Path,
        tag: Option<&str>,
        ref_name: Option<&str>,
        report: &dyn Reporter,
    ) -> Result<Ready> {
        Ok(ops::import(
            &self.images(),
            path,
            tag,
            ref_name,
            report.image_progress(),
        )?)
    }

    /// Pushes a local image to `dest` (default: its own reference),
    /// skipping the blobs the registry already has.
    pub fn image_push(
        &self,
        query: &str,
        dest: Option<&str>,
        registry: &RegistryOptions,
        report: &dyn Reporter,
    ) -> Result<(ImageRecord, Pushed)> {
        let store = self.images();
        let rec = store
            .find(query)?
            .ok_or_else(|| ImageError::NotFound(query.to_string()))?;
        let dest = match dest {
            Some(d) => d.to_string(),
            None => rec.refs.first().cloned().ok_or_else(|| {
                invalid(format!(
                    "image {query} has no reference to push to: name a destination (image push {query} REGISTRY/REPO:TAG)"
                ))
            })?,
        };
        let dest = reference::parse(&reference::normalise(&dest)?)?;
        report.step(&format!("pushing {} to {}", rec.id(), dest.whole()));
        let pushed = push::push(
            &store,
            &rec,
            &dest,
            &registry.pull_options(),
            report.image_progress(),
        )?;
        Ok((rec, pushed))
    }

    pub fn image_list(&self) -> Result<Vec<ImageRecord>> {
        Ok(self.images().records()?)
    }

    /// Images a running commit is making (not in the store yet).
    pub fn image_building(&self) -> Vec<Building> {
        building::list(&self.images())
    }

    /// Removes an image and the layer disks nothing else uses. Refused
    /// while a workspace or snapshot stands on it, naming them.
    pub fn image_remove(&self, query: &str) -> Result<ImageRecord> {
        let store = self.images();
        let _lock = store.lock()?;
        let rec = store
            .find(query)?
            .ok_or_else(|| ImageError::NotFound(query.to_string()))?;
        let refs = super::references::collect(&self.state)?;
        let users = refs.users_of(&rec);
        if !users.is_empty() {
            return Err(Error::InUse {
                kind: "image",
                name: rec
                    .refs
                    .first()
                    .cloned()
                    .unwrap_or_else(|| rec.digest.to_string()),
                users,
            });
        }
        store.remove(&rec, &|k| refs.layers.contains(&k.to_string()))?;
        Ok(rec)
    }
}
