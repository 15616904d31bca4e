//! The direction of calls (README, "Architecture"): every top-level module
//! of src/ may use only modules below it, so there is no cycle. Read from
//! the source itself: each `crate::MODULE` a file names is an edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Lowest first. A module may use modules of a lower rank only.
const LAYERS: &[(&str, u32)] = &[
    ("digest", 0),
    ("paths", 0),
    ("util", 0),
    ("disk", 1),
    ("ext4", 1),
    ("snapshot", 2),
    ("devices", 2),
    ("vmm", 3),
    ("image", 4),
    ("workspace", 5),
    ("agent", 6),
    ("engine", 7),
    ("render", 8),
    // Two front ends of one engine; `microagent serve` is how the CLI
    // starts the API, so the CLI sits on top.
    ("api", 9),
    ("cli", 10),
    // Fuzz targets call parsers of every layer and nothing calls them.
    ("fuzzing", 11),
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level modules named after `crate::` in `text`, including the ones in
/// `use crate::{a::x, b}` groups.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: after '{' and after each ','
            // at nesting depth 0.
            let mut depth = 0;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        refs.insert(ident(&group[j..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            refs.insert(ident(rest));
        }
    }
    refs.retain(|r| !r.is_empty());
    refs
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "main" || top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let deps = edges.entry(top.clone()).or_default();
        for r in crate_refs(&text) {
            if r != top {
                deps.insert(r);
            }
        }
    }
    edges
}

#[test]
fn groups_are_parsed() {
    let refs = crate_refs("use crate::{a::b::{c, d}, e, f::g};\nlet x = crate::h::i();");
    let want: BTreeSet<String> = ["a", "e", "f", "h"].iter().map(|s| s.to_string()).collect();
    assert_eq!(refs, want);
}

#[test]
fn calls_go_down_the_layers_and_never_in_a_circle() {
    let rank: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let edges = graph();
    let mut wrong = Vec::new();
    for (from, deps) in &edges {
        let Some(&rf) = rank.get(from.as_str()) else {
            wrong.push(format!(
                "module {from} has no layer in tests/module_graph.rs"
            ));
            continue;
        };
        for to in deps {
            match rank.get(to.as_str()) {
                Some(&rt) if rt < rf => {}
                Some(&rt) => wrong.push(format!("{from} (layer {rf}) uses {to} (layer {rt})")),
                None => wrong.push(format!("{from} uses {to}, which has no layer")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "calls against the direction of the layers:\n{}\n(edges: {edges:#?})",
        wrong.join("\n")
    );
}
