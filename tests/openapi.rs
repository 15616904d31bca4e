//! docs/openapi.json against the routes in src/api, in both directions:
//! every route is documented with its methods, and every documented path
//! and method is a route. Read from the source, as module_graph does.

use std::collections::BTreeSet;
use std::path::Path;

/// (path, method) for every `.route("PATH", get(..).post(..))` in `text`.
fn routes_in(text: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let parts: Vec<&str> = text.split(".route(").skip(1).collect();
    for part in parts {
        let part = part.trim_start();
        let Some(rest) = part.strip_prefix('"') else {
            continue;
        };
        let end = rest.find('"').unwrap();
        let path = &rest[..end];
        // The method calls inside this `.route(...)` call only.
        let mut depth = 1;
        let close = rest[end..]
            .char_indices()
            .find(|&(_, c)| {
                depth += match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                depth == 0
            })
            .map_or(rest.len(), |(i, _)| end + i);
        let chain = &rest[end..close];
        for method in ["get", "post", "put", "patch", "delete"] {
            let called = chain.match_indices(&format!("{method}(")).any(|(i, _)| {
                i == 0
                    || !chain.as_bytes()[i - 1].is_ascii_alphanumeric()
                        && chain.as_bytes()[i - 1] != b'_'
            });
            if called {
                out.insert((path.to_string(), method.to_string()));
            }
        }
    }
    out
}

#[test]
fn every_route_is_documented_and_every_documented_route_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut routes = BTreeSet::new();
    for f in ["routes.rs", "seed.rs", "volumes.rs", "named.rs"] {
        let text = std::fs::read_to_string(root.join("src/api").join(f)).unwrap();
        routes.extend(routes_in(&text));
    }
    assert!(routes.len() > 20, "too few routes read: {routes:?}");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("docs/openapi.json")).unwrap()).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path} documents no responses"
            );
            documented.insert((path.clone(), method.clone()));
        }
    }
    let undocumented: Vec<_> = routes.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&routes).collect();
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "routes not in docs/openapi.json: {undocumented:?}\ndocumented but not routed: {missing:?}"
    );
}

#[test]
fn the_route_reader_sees_chained_methods() {
    let r = routes_in(
        r#".route("/a/{x}", get(one).patch(two).delete(delete)) .route("/b", post(super::exec::exec))"#,
    );
    let want: BTreeSet<(String, String)> = [
        ("/a/{x}", "get"),
        ("/a/{x}", "patch"),
        ("/a/{x}", "delete"),
        ("/b", "post"),
    ]
    .iter()
    .map(|(p, m)| (p.to_string(), m.to_string()))
    .collect();
    assert_eq!(r, want);
}
