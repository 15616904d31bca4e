//! Images in the local store: pull, import, list, remove.

use std::path::Path;

use super::create::RegistryOptions;
use super::{Engine, Reporter, Result};
use crate::image::ops::{self, Ready};
use crate::image::store::{ImageRecord, ImageStore};

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

    pub fn image_list(&self) -> Result<Vec<ImageRecord>> {
        Ok(self.images().records()?)
    }

    /// Removes an image (workspaces made from it keep their disks).
    pub fn image_remove(&self, query: &str) -> Result<ImageRecord> {
        Ok(ops::remove(&self.images(), query)?)
    }
}
