//! One JSON line per figure, the same shape for every bench, so
//! scripts/bench.sh can put them in one table:
//! `{"bench","vmm","metric","unit","runs","min","median","max","pvm_host",…extra}`,
//! or `{"bench","vmm","metric","error"}` when no run produced a sample.
#![allow(dead_code)]

use serde_json::{json, Map, Value};

/// True on a PVM host (software virtualization, see HOST-KVM.md): guest
/// figures there are orders of magnitude off hardware KVM.
pub fn pvm_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Prints the line for `samples` (any order) and returns their median.
/// `extra` (an object) adds fields such as `memory_mib`.
pub fn emit(
    bench: &str,
    vmm: &str,
    metric: &str,
    unit: &str,
    mut samples: Vec<f64>,
    extra: Value,
) -> Option<f64> {
    let mut line = Map::new();
    line.insert("bench".into(), bench.into());
    line.insert("vmm".into(), vmm.into());
    line.insert("metric".into(), metric.into());
    if let Value::Object(extra) = extra {
        line.extend(extra);
    }
    if samples.is_empty() {
        line.insert("error".into(), "no samples".into());
        println!("{}", Value::Object(line));
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let median = samples[samples.len() / 2];
    line.insert("unit".into(), unit.into());
    line.insert("runs".into(), samples.len().into());
    line.insert("min".into(), json!(round(samples[0])));
    line.insert("median".into(), json!(round(median)));
    line.insert("max".into(), json!(round(samples[samples.len() - 1])));
    line.insert("pvm_host".into(), pvm_host().into());
    println!("{}", Value::Object(line));
    Some(median)
}

/// A line saying why a figure was not measured at all.
pub fn skipped(bench: &str, vmm: &str, why: &str) {
    println!(
        "{}",
        json!({"bench": bench, "vmm": vmm, "skipped": why, "pvm_host": pvm_host()})
    );
}
