//! Where the tests find the image store and data directory `scripts/setup.sh` made.

use std::path::PathBuf;

/// The data directory: `SLICER_DATA_DIR`, else `/var/lib/slicer`.
pub fn data_dir() -> PathBuf {
    std::env::var_os("SLICER_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/slicer"))
}

/// The image store: `SLICER_IMAGES_DIR`, else `images` of [`data_dir`].
pub fn images_dir() -> PathBuf {
    std::env::var_os("SLICER_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| data_dir().join("images"))
}

/// A loopback TCP port nothing listens on (just now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
