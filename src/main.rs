//! microagent: Linux microVMs on KVM from OCI images.

fn main() {
    std::process::exit(microagent::cli::run());
}
