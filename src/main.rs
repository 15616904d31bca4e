//! microagent: Linux microVMs on KVM from OCI images.

mod cli;
pub mod devices;
pub mod vmm;

fn main() {
    std::process::exit(cli::run());
}
