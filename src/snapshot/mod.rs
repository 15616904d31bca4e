pub mod bootcache;
pub mod chunks;
pub mod cpuid;
pub mod format;
pub mod manifest;
pub mod scan;
