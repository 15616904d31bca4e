//! The virtual machine monitor: the only code that touches kvm-ioctls.

pub mod arch;
pub mod boot;
pub mod cgroup;
pub mod control;
mod devices;
pub mod handle;
pub mod host;
pub mod jail;
pub mod memory;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
