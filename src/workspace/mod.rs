//! Workspaces on disk: the state directory, workspace records, the status
//! state machine, per-workspace locks and private root disks.

pub mod base;
pub mod busy;
pub mod definition;
pub mod disk;
pub mod home_capture;
pub mod layout;
pub mod named_snapshots;
pub mod secrets;
pub mod state;
pub mod store;
pub mod volume;
