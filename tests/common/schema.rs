//! The `--json` schemas of docs/json.md, read from the document itself, so
//! the tests hold the code and the documentation to each other.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Field name → optional (may be absent).
type Fields = BTreeMap<String, bool>;

fn schemas() -> BTreeMap<String, Fields> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/json.md"))
        .expect("docs/json.md");
    let mut out: BTreeMap<String, Fields> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        if let Some(id) = line.strip_prefix("### ") {
            current = Some(id.trim().to_string());
            out.entry(id.trim().to_string()).or_default();
            continue;
        }
        let Some(id) = current.clone() else { continue };
        // "All of **workspace**, and:" includes another schema's fields.
        if let Some(rest) = line
            .find("All of **")
            .map(|i| &line[i + "All of **".len()..])
        {
            let base = rest.split("**").next().unwrap_or_default().to_string();
            let inherited = out
                .get(&base)
                .cloned()
                .unwrap_or_else(|| panic!("docs/json.md: {id} includes unknown schema {base}"));
            out.get_mut(&id).unwrap().extend(inherited);
            continue;
        }
        let Some(row) = line.strip_prefix("| `") else {
            continue;
        };
        let mut cells = row.split('|');
        let field = cells
            .next()
            .unwrap_or_default()
            .trim()
            .trim_end_matches('`');
        let ty = cells.next().unwrap_or_default();
        out.get_mut(&id)
            .unwrap()
            .insert(field.to_string(), ty.contains("(optional)"));
    }
    out
}

/// Panics unless `v` is an object with exactly schema `id`'s fields
/// (optional ones may be missing), naming what differs.
pub fn assert_schema(id: &str, v: &Value) {
    let all = schemas();
    let fields = all
        .get(id)
        .unwrap_or_else(|| panic!("docs/json.md has no schema {id}"));
    assert!(!fields.is_empty(), "schema {id} lists no fields");
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{id}: expected an object, got {v}"));
    let got: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
    let undocumented: Vec<&&str> = got.iter().filter(|k| !fields.contains_key(**k)).collect();
    let missing: Vec<&String> = fields
        .iter()
        .filter(|(k, optional)| !**optional && !got.contains(k.as_str()))
        .map(|(k, _)| k)
        .collect();
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "{id}: undocumented fields {undocumented:?}, missing fields {missing:?} in {v}"
    );
    if id == "error" {
        assert_schema("error-body", &v["error"]);
        let code = v["error"]["code"].as_str().unwrap_or_default();
        assert!(
            all["error-codes"].contains_key(code),
            "error code {code:?} is not in docs/json.md's error-codes"
        );
    }
}

/// Every element of the array `v` matches schema `id`; the array must not
/// be empty (an empty one would check nothing).
pub fn assert_each(id: &str, v: &Value) {
    let items = v
        .as_array()
        .unwrap_or_else(|| panic!("{id}: expected an array, got {v}"));
    assert!(!items.is_empty(), "{id}: nothing to check in {v}");
    for item in items {
        assert_schema(id, item);
    }
}
