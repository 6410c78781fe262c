//! Bounded logs of what a guest (or its QEMU) prints.
//!
//! A guest controls its serial console and can make QEMU print warnings, so neither may grow
//! a host file without end. QEMU serves the console on a UNIX socket; [`follow_console`] reads
//! it at most [`CONSOLE_RATE`] bytes a second (past that the socket fills, QEMU's serial device
//! stalls and the flood slows the guest itself) into `console.log`, which rotates to
//! `console.log.1` at [`LOG_MAX`] bytes: at most `2 × LOG_MAX` per VM. QEMU's own output
//! comes through a pipe into `qemu.log` with the same rotation.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest console or QEMU log file before it rotates (one older file is kept).
pub const LOG_MAX: u64 = 1 << 20;
/// Bytes a second read from one guest's console at most.
pub const CONSOLE_RATE: u64 = 1 << 20;

/// An append-only file of at most [`LOG_MAX`] bytes plus one rotated predecessor (`<name>.1`).
pub struct BoundedLog {
    path: PathBuf,
    file: Option<std::fs::File>,
    size: u64,
}

impl BoundedLog {
    pub fn new(path: PathBuf) -> BoundedLog {
        let size = std::fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
        BoundedLog { path, file: None, size }
    }

    fn rotated(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".1");
        PathBuf::from(p)
    }

    /// Appends `data`, rotating first when the file would pass [`LOG_MAX`].
    pub fn append(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            if self.size >= LOG_MAX {
                self.file = None;
                std::fs::rename(&self.path, Self::rotated(&self.path))?;
                self.size = 0;
            }
            if self.file.is_none() {
                // Never through a link at the log's name (the directory is root's; this is
                // the second line of defence).
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&self.path)?;
                self.size = f.metadata()?.len();
                self.file = Some(f);
            }
            let room = (LOG_MAX - self.size.min(LOG_MAX)).max(1) as usize;
            let n = data.len().min(room);
            if let Some(f) = self.file.as_mut() {
                f.write_all(&data[..n])?;
            }
            self.size += n as u64;
            data = &data[n..];
        }
        Ok(())
    }
}

/// Copies `src` into a [`BoundedLog`] at `path` until EOF, at most `rate` bytes a second.
pub async fn copy_bounded(mut src: impl AsyncRead + Unpin, path: PathBuf, rate: u64) {
    let mut log = BoundedLog::new(path);
    let mut buf = vec![0u8; 16 << 10];
    let mut window = tokio::time::Instant::now();
    let mut in_window = 0u64;
    loop {
        let n = match src.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Err(e) = log.append(&buf[..n]) {
            tracing::warn!("writing {}: {e}", log.path.display());
        }
        in_window += n as u64;
        if in_window >= rate {
            let next = window + Duration::from_secs(1);
            tokio::time::sleep_until(next).await;
            window = tokio::time::Instant::now();
            in_window = 0;
        } else if window.elapsed() >= Duration::from_secs(1) {
            window = tokio::time::Instant::now();
            in_window = 0;
        }
    }
}

/// Follows a VM's console socket into its bounded `console.log` until QEMU closes it (or
/// `give_up` completes before QEMU created the socket).
pub fn follow_console(socket: PathBuf, log: PathBuf, give_up: impl std::future::Future<Output = ()> + Send + 'static) {
    tokio::spawn(async move {
        let connect = async {
            loop {
                match tokio::net::UnixStream::connect(&socket).await {
                    Ok(s) => return s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                }
            }
        };
        let stream = tokio::select! {
            s = connect => s,
            _ = give_up => return,
        };
        copy_bounded(stream, log, CONSOLE_RATE).await;
    });
}

/// The last `lines` lines of a bounded log (its rotated predecessor included when needed),
/// reading at most the last [`LOG_MAX`] bytes of each file.
pub fn tail(path: &Path, lines: usize) -> String {
    let mut text = read_end(path);
    if text.iter().filter(|b| **b == b'\n').count() <= lines {
        let mut older = read_end(&BoundedLog::rotated(path));
        older.extend_from_slice(&text);
        text = older;
    }
    let s = String::from_utf8_lossy(&text);
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn read_end(path: &Path) -> Vec<u8> {
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    else {
        return Vec::new();
    };
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return Vec::new();
    }
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(LOG_MAX);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_ok() {
        let _ = f.take(LOG_MAX).read_to_end(&mut buf);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_rotate_and_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let mut log = BoundedLog::new(p.clone());
        let line = vec![b'x'; 1023];
        for i in 0..3000 {
            log.append(&line).unwrap();
            log.append(format!("\n{i}").as_bytes()).unwrap();
        }
        let a = std::fs::metadata(&p).unwrap().len();
        let b = std::fs::metadata(dir.path().join("console.log.1")).unwrap().len();
        assert!(a <= LOG_MAX && b <= LOG_MAX, "{a} {b}");
        let t = tail(&p, 3);
        assert!(t.ends_with("2999"), "{t}");
        assert_eq!(t.lines().count(), 3);
    }

    #[tokio::test]
    async fn copying_is_rate_limited() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.log");
        let data = vec![b'a'; 300 << 10];
        let started = std::time::Instant::now();
        copy_bounded(&data[..], p.clone(), 100 << 10).await;
        assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 300 << 10);
    }
}
