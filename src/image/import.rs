//! `image import PATH`: an OCI layout directory, an `oci-archive` tarball,
//! or a `docker save` tarball (optionally gzip-compressed).

use std::path::Path;

use super::layout::{self, Found};
use super::store::ImageStore;
use super::{ImageError, Result};

/// Scratch space removed however the import ends.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads the image at `path` into the blob store. The caller builds it.
pub fn read(store: &ImageStore, path: &Path, ref_name: Option<&str>) -> Result<Found> {
    let meta = std::fs::metadata(path).map_err(ImageError::io(path))?;
    if meta.is_dir() {
        if !layout::is_oci_layout(path) {
            return Err(ImageError::Invalid(format!(
                "{} is a directory but not an OCI image layout (no oci-layout and index.json)",
                path.display()
            )));
        }
        return layout::read_oci_layout(path, ref_name, &store.blobs, "oci-layout");
    }
    let tmp = store.tmp_dir().join(format!(
        "import-{}-{}",
        std::process::id(),
        super::blob::unique()
    ));
    std::fs::create_dir_all(&tmp).map_err(ImageError::io(&tmp))?;
    let _scratch = Scratch(tmp.clone());
    extract(path, &tmp)?;
    if layout::is_oci_layout(&tmp) {
        // `docker save` from Docker 25 on is also an OCI layout; its
        // index.json is the more precise description.
        let source = if tmp.join("manifest.json").is_file() {
            "docker-archive"
        } else {
            "oci-archive"
        };
        return layout::read_oci_layout(&tmp, ref_name, &store.blobs, source);
    }
    if tmp.join("manifest.json").is_file() {
        return layout::read_docker_archive(&tmp, &store.blobs);
    }
    Err(ImageError::Invalid(format!(
        "{} is neither an oci-archive (no oci-layout/index.json inside) nor a docker-archive (no manifest.json)",
        path.display()
    )))
}

/// Unpacks the archive file itself. The tar crate's `unpack` refuses
/// entries that would land outside `dest`; device nodes and ownership are
/// not needed for an archive of blobs.
fn extract(path: &Path, dest: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(ImageError::io(path))?;
    let reader = super::unpack::decompressor(file)?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_ownerships(false);
    archive.set_preserve_permissions(false);
    archive.unpack(dest).map_err(|e| {
        ImageError::Invalid(format!(
            "{} is not a readable tar archive: {e}",
            path.display()
        ))
    })
}
