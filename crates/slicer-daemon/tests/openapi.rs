//! docs/openapi.yaml and the typed client (`slicer_api::routes`) know exactly the routes the router
//! serves: the list is read back from the code that builds the router
//! (`slicer_daemon::api::methods`), not kept by hand.

use std::collections::BTreeSet;

fn documented() -> BTreeSet<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("docs/openapi.yaml");
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("valid YAML");
    let mut out = BTreeSet::new();
    for (p, ops) in doc["paths"].as_mapping().expect("paths") {
        let p = p.as_str().expect("a path is a string");
        for (m, _) in ops.as_mapping().expect("operations") {
            let m = m.as_str().expect("a method is a string").to_ascii_uppercase();
            if m != "PARAMETERS" {
                out.insert((m, p.to_string()));
            }
        }
    }
    out
}

fn lines<'a>(set: impl Iterator<Item = &'a (String, String)>) -> String {
    set.map(|(m, p)| format!("\n  {m} {p}")).collect()
}

#[test]
fn openapi_matches_the_routes() {
    let served: BTreeSet<(String, String)> = slicer_daemon::api::methods()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert!(!served.is_empty(), "the router lists no route");
    let doc = documented();
    let undocumented = lines(served.difference(&doc));
    let unserved = lines(doc.difference(&served));
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "docs/openapi.yaml and the router differ.\nserved but not in docs/openapi.yaml:{}\nin docs/openapi.yaml but not served:{}",
        if undocumented.is_empty() { " none" } else { &undocumented },
        if unserved.is_empty() { " none" } else { &unserved },
    );
}

/// The typed client (`slicer_api::routes`) knows every route the router serves and every route
/// docs/openapi.yaml documents, and no other: a route added to both but not to the client fails.
#[test]
fn the_client_has_every_route() {
    let client: BTreeSet<(String, String)> = slicer_api::routes::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let served: BTreeSet<(String, String)> = slicer_daemon::api::methods()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let doc = documented();
    let missing = lines(served.union(&doc).filter(|r| !client.contains(*r)));
    let extra = lines(client.difference(&served));
    assert!(
        missing.is_empty() && extra.is_empty(),
        "slicer_api::routes::ROUTES and the router differ.\nserved or documented but not in the client:{}\nin the client but not served:{}",
        if missing.is_empty() { " none" } else { &missing },
        if extra.is_empty() { " none" } else { &extra },
    );
}
