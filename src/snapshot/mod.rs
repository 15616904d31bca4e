pub mod format;
pub mod manifest;
