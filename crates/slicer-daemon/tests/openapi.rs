//! docs/openapi.yaml documents exactly the routes the router serves.

use std::collections::BTreeSet;

fn documented() -> BTreeSet<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("docs/openapi.yaml");
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("valid YAML");
    let mut out = BTreeSet::new();
    for (p, ops) in doc["paths"].as_mapping().expect("paths") {
        for (m, _) in ops.as_mapping().expect("operations") {
            let m = m.as_str().unwrap().to_ascii_uppercase();
            if m != "PARAMETERS" {
                out.insert((m, p.as_str().unwrap().to_string()));
            }
        }
    }
    out
}

#[test]
fn openapi_matches_the_routes() {
    let served: BTreeSet<(String, String)> = slicer_daemon::api::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let doc = documented();
    let missing: Vec<_> = served.difference(&doc).collect();
    let extra: Vec<_> = doc.difference(&served).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "not documented: {missing:?}; documented but not served: {extra:?}"
    );
}
