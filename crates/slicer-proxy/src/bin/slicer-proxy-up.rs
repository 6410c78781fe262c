//! Runs the proxy with `slicer_proxy::server::UpOptions` given as one JSON argument. The
//! product's entry is `slicer proxy up`; this is the same `server::run` as a program of its own
//! for the crate's integration tests.

fn main() {
    let Some(arg) = std::env::args().nth(1) else {
        eprintln!("usage: slicer-proxy-up '<UpOptions as JSON>'");
        std::process::exit(2);
    };
    let opts: slicer_proxy::server::UpOptions = match serde_json::from_str(&arg) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("slicer-proxy-up: options: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = slicer_proxy::server::run(opts) {
        eprintln!("slicer-proxy-up: {e}");
        std::process::exit(1);
    }
}
