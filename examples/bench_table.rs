//! Reads the benches' JSON lines (scripts/bench.sh collects them) and
//! prints one table: each figure for microagent and QEMU microvm side by
//! side where both were measured, with the ratio, and what kind of KVM the
//! numbers come from.
//!
//!     cargo run --release --example bench_table -- results.jsonl

use std::collections::BTreeMap;

use serde_json::Value;

/// (bench, metric, memory) → vmm → line
type Rows = BTreeMap<(String, String, String), BTreeMap<String, Value>>;

fn kvm_kind() -> String {
    let has = |m: &str| std::path::Path::new(&format!("/sys/module/{m}")).exists();
    if has("kvm_pvm") {
        "PVM (software virtualization: guest-side figures run about 1000x slower than on hardware KVM; see HOST-KVM.md)".into()
    } else if has("kvm_intel") || has("kvm_amd") {
        "hardware KVM".into()
    } else {
        "no KVM module found".into()
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Lower is better, except throughputs.
fn higher_is_better(unit: &str) -> bool {
    unit.ends_with("/s")
}

fn fmt_value(line: &Value) -> String {
    if let Some(e) = line.get("error").and_then(Value::as_str) {
        return format!("error: {e}");
    }
    if let Some(s) = line.get("skipped").and_then(Value::as_str) {
        return format!("skipped: {s}");
    }
    let unit = line["unit"].as_str().unwrap_or("");
    match line["median"].as_f64() {
        Some(m) if m >= 100.0 => format!("{m:.0} {unit}"),
        Some(m) => format!("{m:.2} {unit}"),
        None => "-".into(),
    }
}

fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: bench_table RESULTS.jsonl");
        std::process::exit(2);
    });
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        eprintln!("bench_table: reading {path}: {e}");
        std::process::exit(1);
    });
    let mut rows = Rows::new();
    let mut skipped = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        if v.get("metric").is_none() {
            skipped.push(format!(
                "{} ({}): {}",
                field("bench"),
                field("vmm"),
                v.get("skipped")
                    .or(v.get("error"))
                    .cloned()
                    .unwrap_or_default()
            ));
            continue;
        }
        let memory = v
            .get("memory_mib")
            .and_then(Value::as_u64)
            .map(|m| format!("{m} MiB"))
            .unwrap_or_default();
        rows.entry((field("bench"), field("metric"), memory))
            .or_default()
            .insert(field("vmm"), v.clone());
    }
    println!("Host: {}, {}", cpu_model(), kvm_kind());
    println!("Medians; min/max and run counts are in {path}.");
    println!(
        "{:<11} {:<34} {:>8}  {:>20}  {:>20}  {:>9}",
        "BENCH", "METRIC", "GUEST", "MICROAGENT", "QEMU MICROVM", "ADVANTAGE"
    );
    for ((bench, metric, memory), by_vmm) in &rows {
        let ours = by_vmm.get("microagent");
        let theirs = by_vmm.get("qemu-microvm");
        let show = |l: Option<&Value>| l.map(fmt_value).unwrap_or_else(|| "-".into());
        // >1 means microagent does better, whichever way "better" points.
        let advantage = match (ours, theirs) {
            (Some(o), Some(t)) => match (o["median"].as_f64(), t["median"].as_f64()) {
                (Some(o_m), Some(t_m)) if o_m > 0.0 && t_m > 0.0 => {
                    let unit = o["unit"].as_str().unwrap_or("");
                    let r = if higher_is_better(unit) {
                        o_m / t_m
                    } else {
                        t_m / o_m
                    };
                    format!("{r:.2}x")
                }
                _ => "-".into(),
            },
            _ => "-".into(),
        };
        println!(
            "{bench:<11} {metric:<34} {memory:>8}  {:>20}  {:>20}  {advantage:>9}",
            show(ours),
            show(theirs)
        );
    }
    for s in skipped {
        println!("not measured: {s}");
    }
    println!("ADVANTAGE: QEMU's figure over ours (ours over QEMU's for throughput): above 1x, microagent is better.");
    println!("No QEMU figure for exec (QEMU's vsock needs /dev/vhost-vsock, which PVM hosts lack, and it has no agent of its own)");
    println!("nor for warm starts (a microagent feature). restore_to_running_ms ends when the vCPUs run for both (ours includes");
    println!("rolling the disk back, which QEMU's -incoming does not do); restore_to_agent_ready_ms adds the guest's reconnect.");
}
