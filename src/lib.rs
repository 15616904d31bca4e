//! microagent: Linux microVMs on KVM from OCI images, with exec over vsock
//! and memory snapshots. The binary (`src/main.rs`) is a thin shell over
//! [`cli::run`]; tests and benches use the library directly.

pub mod agent;
pub mod api;
pub mod cli;
pub mod devices;
pub mod digest;
pub mod disk;
pub mod engine;
pub mod ext4;
pub mod fuzzing;
pub mod image;
pub mod paths;
pub mod render;
pub mod snapshot;
pub mod util;
pub mod vmm;
pub mod workspace;
