//! The bottom layer: file, lock, copy and time helpers shared by every
//! module above. It uses nothing else of the crate.

pub mod copy;
pub mod fs;
pub mod lock;
pub mod peer;
pub mod time;
