//! The soak, short: `slicer-bench --suite soak` for `SLICER_SOAK_SECS` (default 120) with two
//! clients against the shared image store, not recorded. It fails on any error, leak or growth
//! of the daemon's RSS or open files; `scripts/bench.sh` runs the long one into
//! docs/benchmarks.md.

#[test]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
fn a_short_soak_leaks_nothing() {
    let secs = std::env::var("SLICER_SOAK_SECS").unwrap_or_else(|_| "120".into());
    let images = slicer_testkit::images_dir();
    let data = images
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_slicer-bench"))
        .args([
            "--suite",
            "soak",
            "--secs",
            &secs,
            "--clients",
            "2",
            "--no-record",
            "--data-dir",
            &data,
        ])
        .output()
        .expect("running slicer-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "the soak failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
