//! Test fixture: a host whose images come from the store built by `scripts/setup.sh` and
//! whose VM directories live in a temporary directory removed afterwards.

#![allow(dead_code, unused_imports)]

use std::time::Duration;

use slicer_vmm::{Host, Vm, VmSpec};

pub struct Fixture {
    pub host: Host,
    pub tmp: tempfile::TempDir,
}

pub use slicer_testkit::data_dir;
pub use slicer_testkit::qemu::pid_alive;

pub fn fixture() -> Fixture {
    let tmp = tempfile::Builder::new()
        .prefix("slicer-test-")
        .tempdir()
        .expect("tempdir");
    let host = Host::new(&data_dir(), tmp.path());
    Fixture { host, tmp }
}

pub async fn boot(f: &Fixture, name: &str, image: &str) -> Vm {
    let mut spec = VmSpec::new(name, image);
    spec.boot_timeout = Duration::from_secs(180);
    match Vm::boot(&f.host, &spec).await {
        Ok(vm) => vm,
        Err(e) => panic!("booting {name} from image {image}: {e:#}"),
    }
}
