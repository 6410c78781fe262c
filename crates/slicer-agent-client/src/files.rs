//! Files in the guest: uploads and downloads (single files and tar streams), listings and
//! filesystem changes.

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::BodyExt;
use slicer_agent_proto::{FileWritten, FsEntry, MkdirRequest, PathQuery, RemoveQuery, HEADER_MODE};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::oneshot;

use crate::{
    check, empty, parse_json, uri, within, AgentClient, AgentError, Download, ReqBody, Result, CALL_DEADLINE, MAX_JSON,
    MAX_LISTING, UPLOAD_CHUNK,
};

/// Streams an `AsyncRead` as a request body, 256 KiB at a time; `sent` is dropped once all of
/// it is queued (or reading failed, or the request went away).
fn reader_body<R: AsyncRead + Send + Unpin + 'static>(mut rd: R, sent: oneshot::Sender<()>) -> ReqBody {
    let (tx, body) = slicer_agent_proto::body::channel(4);
    tokio::spawn(async move {
        let _sent = sent;
        loop {
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            match rd.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send(Ok(Bytes::from(buf))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    body.boxed()
}

impl AgentClient {
    /// Writes `data` to the file `path` in the guest (atomically replaced).
    pub async fn upload_file<R: AsyncRead + Send + Unpin + 'static>(
        &self,
        path: &str,
        mode: Option<u32>,
        owner: Option<(u32, Option<u32>)>,
        data: R,
    ) -> Result<u64> {
        let q = PathQuery {
            path: path.into(),
            mode: mode.map(|m| format!("{m:o}")),
            uid: owner.map(|o| o.0),
            gid: owner.and_then(|o| o.1),
            ..Default::default()
        };
        Ok(self.upload("/v1/file", &q, data).await?.bytes)
    }

    /// SlicerVM's cp-v1 upload: a file (`tar` false) or a directory's tar to `path`, placed
    /// inside `path` as `source_name` when it is a directory (its contents merged into it with
    /// `copy_contents`); a directory replaces its target whole. Answers where it went.
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_placed<R: AsyncRead + Send + Unpin + 'static>(
        &self,
        tar: bool,
        path: &str,
        source_name: &str,
        copy_contents: bool,
        mode: Option<u32>,
        owner: Option<(u32, Option<u32>)>,
        data: R,
    ) -> Result<FileWritten> {
        let q = PathQuery {
            path: path.into(),
            mode: mode.map(|m| format!("{m:o}")),
            uid: owner.map(|o| o.0),
            gid: owner.and_then(|o| o.1),
            source_name: Some(source_name.into()),
            copy_contents,
        };
        self.upload(if tar { "/v1/tar" } else { "/v1/file" }, &q, data).await
    }

    /// PUTs `data` to `route`. Sending the body takes as long as the source needs (cp streams
    /// a user's upload); the answer after it has [`CALL_DEADLINE`].
    async fn upload<R: AsyncRead + Send + Unpin + 'static>(
        &self,
        route: &str,
        q: &PathQuery,
        data: R,
    ) -> Result<FileWritten> {
        let (sent_tx, sent) = oneshot::channel();
        let req = Request::put(uri(route, Some(q)))
            .body(reader_body(data, sent_tx))
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let answer = async {
            let resp = check(self.send(req).await?).await?;
            let w: FileWritten = parse_json(resp.into_body()).await?;
            Ok(w)
        };
        tokio::pin!(answer);
        tokio::select! {
            r = &mut answer => r,
            _ = sent => within("an upload", CALL_DEADLINE, answer).await,
        }
    }

    /// Reads the file `path` from the guest as a stream.
    pub async fn download_file(&self, path: &str) -> Result<Download> {
        let q = PathQuery {
            path: path.into(),
            ..Default::default()
        };
        let req = Request::get(uri("/v1/file", Some(&q)))
            .body(empty())
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let resp = within("a download's start", CALL_DEADLINE, async {
            check(self.send(req).await?).await
        })
        .await?;
        let mode = resp
            .headers()
            .get(HEADER_MODE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| u32::from_str_radix(v, 8).ok())
            .map(|m| m & 0o7777);
        Ok(Download::new(mode, Box::new(resp.into_body())))
    }

    /// Unpacks a tar stream into directory `dir` in the guest.
    pub async fn upload_tar<R: AsyncRead + Send + Unpin + 'static>(
        &self,
        dir: &str,
        owner: Option<(u32, Option<u32>)>,
        tar: R,
    ) -> Result<u64> {
        let q = PathQuery {
            path: dir.into(),
            mode: None,
            uid: owner.map(|o| o.0),
            gid: owner.and_then(|o| o.1),
            ..Default::default()
        };
        Ok(self.upload("/v1/tar", &q, tar).await?.bytes)
    }

    /// Streams directory `dir` of the guest as a tar. The archive comes from the guest: never
    /// unpack it on the host without path checks.
    pub async fn download_tar(&self, dir: &str) -> Result<Download> {
        let q = PathQuery {
            path: dir.into(),
            ..Default::default()
        };
        let req = Request::get(uri("/v1/tar", Some(&q)))
            .body(empty())
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        self.stream(req).await
    }

    /// Lists directory `path` (entries sorted by name; symlinks not followed).
    pub async fn readdir(&self, path: &str) -> Result<Vec<FsEntry>> {
        self.get_json("/v1/fs/readdir", path, MAX_LISTING).await
    }

    /// Describes `path` (a symlink itself, not its target).
    pub async fn stat(&self, path: &str) -> Result<FsEntry> {
        self.get_json("/v1/fs/stat", path, MAX_JSON).await
    }

    /// Makes a directory; answers its entry.
    pub async fn mkdir(&self, r: &MkdirRequest) -> Result<FsEntry> {
        self.post_json("a filesystem request", "/v1/fs/mkdir", r).await
    }

    /// Removes a file, a link or a directory (a non-empty one only with `recursive`).
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        let q = RemoveQuery {
            path: path.into(),
            recursive,
        };
        let req = Request::builder()
            .method(Method::DELETE)
            .uri(format!(
                "http://agent/v1/fs/remove?{}",
                serde_urlencoded::to_string(&q).unwrap_or_default()
            ))
            .body(empty())
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        within("a filesystem request", CALL_DEADLINE, async {
            check(self.send(req).await?).await?;
            Ok(())
        })
        .await
    }
}
