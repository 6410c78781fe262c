//! Long-lived streams with the guest: forwards, shells, watches, and the [`Download`] and
//! [`StdinWriter`] halves every stream is read and written through.

use std::future::Future;
use std::io;
use std::pin::Pin;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::{check, full, uri, within, AgentClient, AgentError, ReqBody, Result, CALL_DEADLINE};

impl AgentClient {
    /// A full-duplex stream: what is written to the [`StdinWriter`] is the request body, the
    /// [`Download`] is the response body. The first answer (or error) comes before it returns.
    async fn duplex(&self, uri: String) -> Result<(StdinWriter, Download)> {
        let (tx, body) = slicer_agent_proto::body::channel(8);
        let req = Request::post(uri)
            .body(body.boxed())
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let resp = within("a stream's start", CALL_DEADLINE, async {
            check(self.send(req).await?).await
        })
        .await?;
        Ok((StdinWriter { tx }, Download::new(None, Box::new(resp.into_body()))))
    }

    /// Connects to `target` inside the guest (`host:port` or `unix:/path`): bytes both ways.
    pub async fn forward(&self, target: &str) -> Result<(StdinWriter, Download)> {
        let q = serde_urlencoded::to_string([("target", target)]).unwrap_or_default();
        self.duplex(format!("http://agent/v1/forward?{q}")).await
    }

    /// A login shell on a PTY; both directions carry [`slicer_agent_proto::shell`] frames.
    pub async fn shell(&self, q: &slicer_agent_proto::shell::ShellQuery) -> Result<(StdinWriter, Download)> {
        let q = serde_urlencoded::to_string(q).unwrap_or_default();
        self.duplex(format!("http://agent/v1/shell?{q}")).await
    }

    /// Watches paths in the guest: NDJSON [`slicer_agent_proto::WatchEvent`] lines until dropped.
    pub async fn watch(&self, w: &slicer_agent_proto::WatchRequest) -> Result<Download> {
        let body = serde_json::to_vec(w).map_err(|e| AgentError::Protocol(e.to_string()))?;
        let req = Request::post(uri("/v1/fs/watch", None))
            .body(full(body))
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        self.stream(req).await
    }

    /// Sends `req` and hands back the answer's body as a stream; the answer's head has
    /// [`CALL_DEADLINE`], the stream none.
    pub(crate) async fn stream(&self, req: Request<ReqBody>) -> Result<Download> {
        let resp = within("a stream's start", CALL_DEADLINE, async {
            check(self.send(req).await?).await
        })
        .await?;
        Ok(Download::new(None, Box::new(resp.into_body())))
    }
}

/// Writes stdin of a running process; dropping it closes the process's stdin.
pub struct StdinWriter {
    pub(crate) tx: mpsc::Sender<io::Result<Bytes>>,
}

impl StdinWriter {
    pub async fn write(&self, data: Bytes) -> Result<()> {
        self.tx
            .send(Ok(data))
            .await
            .map_err(|_| AgentError::Protocol("the process's stdin is closed".into()))
    }
}

/// Where a [`Download`]'s chunks come from: an answer's body from the agent, or anything else
/// that hands out chunks (what is in memory; a wrapper that holds something while it reads).
pub trait Chunks: Send {
    /// The next chunk; `None` at the end.
    fn chunk(&mut self) -> Pin<Box<dyn Future<Output = Result<Option<Bytes>>> + Send + '_>>;
}

impl Chunks for Incoming {
    fn chunk(&mut self) -> Pin<Box<dyn Future<Output = Result<Option<Bytes>>> + Send + '_>> {
        Box::pin(async move {
            loop {
                match self.frame().await {
                    Some(Ok(f)) => {
                        if let Ok(d) = f.into_data() {
                            return Ok(Some(d));
                        }
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Ok(None),
                }
            }
        })
    }
}

impl Chunks for std::collections::VecDeque<Bytes> {
    fn chunk(&mut self) -> Pin<Box<dyn Future<Output = Result<Option<Bytes>>> + Send + '_>> {
        let next = self.pop_front();
        Box::pin(async move { Ok(next) })
    }
}

/// A file, tar or event stream coming from the guest.
pub struct Download {
    /// Mode bits of a downloaded file.
    pub mode: Option<u32>,
    source: Box<dyn Chunks>,
    /// Bytes read past the last line handed out by [`Download::next_line`].
    pending: slicer_agent_proto::lines::LineBuf,
}

impl Download {
    /// A stream of `source`'s chunks.
    pub fn new(mode: Option<u32>, source: Box<dyn Chunks>) -> Download {
        Download {
            mode,
            source,
            pending: slicer_agent_proto::lines::LineBuf::default(),
        }
    }

    /// A stream of what is in memory.
    pub fn of(mode: Option<u32>, chunks: impl IntoIterator<Item = Bytes>) -> Download {
        let q: std::collections::VecDeque<Bytes> = chunks.into_iter().collect();
        Download::new(mode, Box::new(q))
    }

    /// The next chunk; `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        self.source.chunk().await
    }

    /// The next `\n`-terminated line of a line-oriented stream (NDJSON), `None` at its end. A
    /// line longer than `max` (what a hostile guest could send) is an error. Cancelling the call
    /// loses nothing: what was read stays for the next call.
    pub async fn next_line(&mut self, max: usize) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some(line) = self.pending.next_line() {
                return Ok(Some(line.to_vec()));
            }
            if self.pending.pending() > max {
                return Err(AgentError::Protocol(format!(
                    "a line from the agent is over {max} bytes"
                )));
            }
            match self.chunk().await? {
                Some(c) => self.pending.push(&c),
                None => return Ok(None),
            }
        }
    }

    /// Copies the whole stream into `w`, returning the byte count.
    pub async fn copy_to<W: tokio::io::AsyncWrite + Unpin>(&mut self, w: &mut W) -> Result<u64> {
        use tokio::io::AsyncWriteExt;
        let mut n = 0u64;
        while let Some(c) = self.chunk().await? {
            w.write_all(&c).await?;
            n += c.len() as u64;
        }
        w.flush().await?;
        Ok(n)
    }

    /// Reads everything into memory, failing beyond `limit` bytes.
    pub async fn bytes(mut self, limit: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(c) = self.chunk().await? {
            if out.len() + c.len() > limit {
                return Err(AgentError::Protocol(format!("download larger than {limit} bytes")));
            }
            out.extend_from_slice(&c);
        }
        Ok(out)
    }
}
