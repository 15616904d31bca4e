//! `microagent-fuzz TARGET`: one AFL++ fuzz target of `microagent::fuzzing`
//! per run (the names are its `TARGETS`), input on stdin as AFL gives it.

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(run) = microagent::fuzzing::target(&name) else {
        let names: Vec<&str> = microagent::fuzzing::TARGETS
            .iter()
            .map(|(n, _)| *n)
            .collect();
        eprintln!(
            "usage: microagent-fuzz TARGET (one of: {})",
            names.join(", ")
        );
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| run(data));
}
