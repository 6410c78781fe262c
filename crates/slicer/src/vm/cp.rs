//! `slicer vm cp`: files and tar streams to and from a guest.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use futures_util::TryStreamExt;
use http_body_util::BodyExt;
use slicer_api::client::Body;
use slicer_api::query::CopyQuery;
use slicer_api::ApiClient;

use super::exec::channel_body;
use super::{resolve, CpOpts};

/// `NAME:/path` → (NAME, /path); a local path → None.
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (name, path) = spec.split_once(':')?;
    (!name.is_empty() && !name.contains('/') && !name.starts_with('.')).then_some((name, path))
}

/// `vm cp`: exactly one side is `NAME:/path` (NAME a hostname or a VM's name).
pub(super) async fn cp(c: &ApiClient, src: &str, dst: &str, opts: CpOpts) -> Result<()> {
    let resolved = |spec: &str| {
        let c = c.clone();
        let spec = spec.to_string();
        async move {
            match remote(&spec) {
                Some((name, path)) => Ok::<_, anyhow::Error>(format!("{}:{path}", resolve(&c, name).await?)),
                None => Ok(spec),
            }
        }
    };
    let (src, dst) = (resolved(src).await?, resolved(dst).await?);
    let (src, dst) = (src.as_str(), dst.as_str());
    match (remote(src), remote(dst)) {
        (None, Some((name, path))) => upload(c, src, name, path, opts).await,
        (Some((name, path)), None) => download(c, name, path, dst, opts).await,
        _ => bail!("give exactly one side as NAME:/path, e.g. `slicer vm cp ./f sandbox-1:/tmp/f`"),
    }
}

/// `vm cp LOCAL NAME:/path`: the file, or the directory as a tar.
async fn upload(c: &ApiClient, src: &str, name: &str, path: &str, opts: CpOpts) -> Result<()> {
    let CpOpts {
        mode,
        recursive,
        uid,
        gid,
        permissions,
        exclude,
    } = opts;
    let local = PathBuf::from(src);
    let meta = std::fs::metadata(&local).with_context(|| format!("{}", local.display()))?;
    let tar = mode.as_deref() == Some("tar") || recursive || meta.is_dir();
    // `dir/.` copies the directory's contents into the destination (as `cp -r dir/.`).
    let contents = tar && (src.ends_with("/.") || src.ends_with('/'));
    let source_name = std::fs::canonicalize(&local)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let base = CopyQuery {
        path: path.to_string(),
        uid: Some(uid),
        gid,
        permissions,
        ..Default::default()
    };
    let ct = if tar {
        "application/x-tar"
    } else {
        "application/octet-stream"
    };
    // SlicerVM's cp-v1 first (the guest places the copy as `cp` would), then the
    // legacy modes for a daemon that answers "invalid mode".
    let v1 = CopyQuery {
        mode: Some(if tar { "cp-v1-tar" } else { "cp-v1-binary" }.into()),
        source_type: Some(if tar { "directory" } else { "file" }.into()),
        source_name: (!source_name.is_empty()).then_some(source_name),
        copy_contents: contents,
        ..base.clone()
    };
    let body = upload_body(local.clone(), tar, exclude.clone());
    match c.cp_upload(name, &v1, ct, body).await {
        Err(e) if e.to_string().contains("invalid mode: cp-v1") => {
            let legacy = CopyQuery {
                mode: Some(if tar { "tar" } else { "binary" }.into()),
                ..base
            };
            let body = upload_body(local, tar, exclude);
            c.cp_upload(name, &legacy, ct, body).await?;
        }
        r => {
            r?;
        }
    }
    Ok(())
}

/// `vm cp NAME:/path LOCAL`: a file, or with --mode tar / -r a directory.
async fn download(c: &ApiClient, name: &str, path: &str, dst: &str, opts: CpOpts) -> Result<()> {
    let tar = opts.mode.as_deref() == Some("tar") || opts.recursive;
    // As `cp`: into an existing local directory, under the source's name.
    let base = path.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    let placed;
    let dst = if Path::new(dst).is_dir() && !base.is_empty() && base != "~" && base != "." {
        placed = Path::new(dst).join(base).to_string_lossy().into_owned();
        placed.as_str()
    } else {
        dst
    };
    let q = CopyQuery {
        path: path.to_string(),
        mode: Some(if tar { "tar" } else { "binary" }.into()),
        ..Default::default()
    };
    let resp = c.cp_download(name, &q).await?;
    let mut stream = resp.into_body().into_data_stream();
    if tar {
        return unpack(stream, path, PathBuf::from(dst), &opts.exclude).await;
    }
    let mut f = std::fs::File::create(dst).with_context(|| format!("creating {dst}"))?;
    while let Some(chunk) = stream.try_next().await? {
        f.write_all(&chunk)?;
    }
    Ok(())
}

/// Unpacks the tar `stream` into `dest` (see [`crate::untar`]: the archive is the guest's),
/// but what `exclude` leaves out; patterns naming paths under the guest's `src` are taken
/// relative to it.
async fn unpack<S, E>(mut stream: S, src: &str, dest: PathBuf, exclude: &[String]) -> Result<()>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(8);
    let rules = crate::untar::exclude_rules(src, exclude)?;
    let umask = crate::untar::process_umask();
    let unpack = std::thread::spawn(move || -> Result<()> {
        let r = ChannelReader {
            rx,
            cur: bytes::Bytes::new(),
        };
        crate::untar::unpack(r, &dest, &rules, umask)
    });
    while let Some(chunk) = stream.try_next().await? {
        if tx.send(chunk).is_err() {
            break;
        }
    }
    drop(tx);
    unpack.join().map_err(|_| anyhow::anyhow!("unpack thread panicked"))?
}

/// The body of an upload: the file, or the directory as a tar without what `exclude` and its
/// .slicerignore leave out, streamed from a thread.
fn upload_body(local: PathBuf, tar: bool, exclude: Vec<String>) -> Body {
    let (tx, body) = channel_body();
    std::thread::spawn(move || {
        let mut w = ChannelWriter { tx: tx.clone() };
        let res = if tar {
            let mut b = tar::Builder::new(&mut w);
            b.follow_symlinks(false);
            let ignored = ignore_rules(&local, &exclude, true);
            ignored
                .and_then(|gi| append_tree(&mut b, &local, &gi))
                .and_then(|_| b.finish())
        } else {
            std::fs::File::open(&local).and_then(|mut f| std::io::copy(&mut f, &mut w).map(|_| ()))
        };
        if let Err(e) = res {
            let _ = tx.blocking_send(Err(e));
        }
    });
    body
}

/// The exclude rules of a copy: `--exclude` patterns, plus `root`'s .slicerignore when asked,
/// both with gitignore's syntax (`**`, a trailing `/` for directories, `!` to re-include).
/// Written by the `ignore` crate (ripgrep's), which implements exactly that syntax.
fn ignore_rules(root: &Path, exclude: &[String], slicerignore: bool) -> std::io::Result<ignore::gitignore::Gitignore> {
    let mut b = ignore::gitignore::GitignoreBuilder::new(root);
    if slicerignore && root.join(".slicerignore").is_file() {
        if let Some(e) = b.add(root.join(".slicerignore")) {
            return Err(std::io::Error::other(format!(".slicerignore: {e}")));
        }
    }
    for p in exclude {
        b.add_line(None, p)
            .map_err(|e| std::io::Error::other(format!("--exclude {p:?}: {e}")))?;
    }
    b.build().map_err(std::io::Error::other)
}

/// Appends the tree under `root` (entries relative to it) minus what `gi` ignores.
fn append_tree<W: Write>(
    b: &mut tar::Builder<W>,
    root: &Path,
    gi: &ignore::gitignore::Gitignore,
) -> std::io::Result<()> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(&rel))?.collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let r = rel.join(e.file_name());
            let ft = e.file_type()?;
            if gi.matched(&r, ft.is_dir()).is_ignore() {
                continue;
            }
            if ft.is_dir() {
                b.append_dir(&r, e.path())?;
                stack.push(r);
            } else {
                b.append_path_with_name(e.path(), &r)?;
            }
        }
    }
    Ok(())
}

struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.tx
            .blocking_send(Ok(bytes::Bytes::copy_from_slice(data)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload ended"))?;
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct ChannelReader {
    rx: std::sync::mpsc::Receiver<bytes::Bytes>,
    cur: bytes::Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(b) => self.cur = b,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}
