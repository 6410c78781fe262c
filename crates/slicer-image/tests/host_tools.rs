//! Every host program slicer, its tests and its benchmarks run is installed, and
//! `scripts/setup.sh` installs the package of each: a fresh machine that ran setup has them all.
//! `scripts/test.sh` runs this first, so a missing one fails early with the package to install.

use slicer_image::tools;

/// Packages every Debian system has (Essential: yes), which setup does not list.
const ESSENTIAL: &[&str] = &["coreutils", "tar", "mount", "util-linux"];

fn setup_packages() -> Vec<String> {
    let setup = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/setup.sh")).unwrap();
    let start = setup.find("PKGS=(").expect("PKGS=( in setup.sh") + "PKGS=(".len();
    let end = start + setup[start..].find(')').unwrap();
    setup[start..end].split_whitespace().map(str::to_string).collect()
}

#[test]
fn setup_installs_the_package_of_every_host_program() {
    let pkgs = setup_packages();
    for (program, pkg) in tools::all() {
        assert!(
            ESSENTIAL.contains(&pkg) || pkgs.iter().any(|p| p == pkg),
            "{program} comes from {pkg}, which scripts/setup.sh does not install"
        );
    }
}

#[test]
#[ignore = "full tier: needs every host program scripts/setup.sh installs (scripts/test.sh runs it)"]
fn every_host_program_is_installed() {
    let all = tools::all();
    if let Err(e) = tools::require(&all) {
        panic!("{e}\n(run ./scripts/setup.sh as root)");
    }
}
