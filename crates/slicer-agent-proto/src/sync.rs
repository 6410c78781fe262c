//! Session resync over a byte stream that may hold stale bytes from an earlier session.
//!
//! Host: sends `SYNC_MAGIC + nonce` (re-sending it until answered) and discards everything it
//! reads until `ACK_MAGIC + nonce`. Agent: discards everything until `SYNC_MAGIC + nonce`,
//! answers once with `ACK_MAGIC + nonce`, then drops any re-sent copies of that same SYNC
//! before handing the stream to HTTP/2. The host only starts HTTP/2 after the ACK, so all
//! copies precede the HTTP/2 preface, whose first byte differs from the magic's.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

pub const SYNC_MAGIC: [u8; 16] = *b"\x7fSLICER-SYNC\x01\xa5\x5a\n";
pub const ACK_MAGIC: [u8; 16] = *b"\x7fSLICER-ACK!\x01\xa5\x5a\n";
pub const NONCE_LEN: usize = 16;
pub const MSG_LEN: usize = 16 + NONCE_LEN;
pub type Nonce = [u8; NONCE_LEN];

fn message(magic: &[u8; 16], nonce: &Nonce) -> [u8; MSG_LEN] {
    let mut m = [0u8; MSG_LEN];
    m[..16].copy_from_slice(magic);
    m[16..].copy_from_slice(nonce);
    m
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Keeps at most the last `keep` bytes: a needle cut at a read boundary is still found.
fn trim_front(buf: &mut Vec<u8>, keep: usize) {
    if buf.len() > keep {
        buf.drain(..buf.len() - keep);
    }
}

/// First re-send of an unanswered SYNC; the interval then doubles up to the caller's `resend`.
/// A SYNC is often lost (an agent still in its previous session takes it for HTTP/2 bytes and
/// ends that session), so the first re-send must come soon.
const FIRST_RESEND: Duration = Duration::from_millis(5);

/// Host side of the handshake. Returns the stream positioned right after the agent's ACK.
pub async fn host_handshake<IO>(io: IO, nonce: Nonce, resend: Duration, timeout: Duration) -> io::Result<Rewind<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let sync = message(&SYNC_MAGIC, &nonce);
    let ack = message(&ACK_MAGIC, &nonce);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    wr.write_all(&sync).await?;
    wr.flush().await?;
    let mut interval = FIRST_RESEND.min(resend);
    let mut next_resend = tokio::time::Instant::now() + interval;
    let leftover = loop {
        tokio::select! {
            n = rd.read(&mut chunk) => {
                let n = n?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "agent channel closed during handshake"));
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(pos) = find(&buf, &ack) {
                    break buf.split_off(pos + MSG_LEN);
                }
                trim_front(&mut buf, MSG_LEN - 1);
            }
            _ = tokio::time::sleep_until(next_resend) => {
                wr.write_all(&sync).await?;
                wr.flush().await?;
                interval = (interval * 2).min(resend);
                next_resend = tokio::time::Instant::now() + interval;
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "agent did not answer the handshake"));
            }
        }
    };
    Ok(Rewind::new(rd.unsplit(wr), leftover))
}

/// Agent side of the handshake. Returns the stream positioned at the host's first HTTP/2 byte
/// and the nonce of the session.
pub async fn agent_handshake<IO>(mut io: IO) -> io::Result<(Rewind<IO>, Nonce)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let nonce = loop {
        if let Some(pos) = find(&buf, &SYNC_MAGIC) {
            if buf.len() >= pos + MSG_LEN {
                let mut nonce = [0u8; NONCE_LEN];
                nonce.copy_from_slice(&buf[pos + 16..pos + MSG_LEN]);
                buf.drain(..pos + MSG_LEN);
                break nonce;
            }
        } else {
            trim_front(&mut buf, 15);
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "host not connected"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    io.write_all(&message(&ACK_MAGIC, &nonce)).await?;
    io.flush().await?;
    // Drop re-sent copies of the same SYNC that precede the HTTP/2 preface.
    let sync = message(&SYNC_MAGIC, &nonce);
    loop {
        if buf.starts_with(&sync) {
            buf.drain(..MSG_LEN);
            continue;
        }
        if !buf.is_empty() && !sync.starts_with(&buf[..buf.len().min(MSG_LEN)]) {
            break;
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "host went away after handshake",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((Rewind::new(io, buf), nonce))
}

/// A stream that first yields `prefix`, then reads from the inner stream.
pub struct Rewind<T> {
    prefix: Vec<u8>,
    pos: usize,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(inner: T, prefix: Vec<u8>) -> Self {
        Rewind { prefix, pos: 0, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn handshake_skips_stale_bytes_and_duplicate_syncs() {
        let (host, agent) = tokio::io::duplex(1 << 16);
        let nonce = [7u8; NONCE_LEN];
        let agent_task = tokio::spawn(async move {
            let (mut io, n) = agent_handshake(agent).await.unwrap();
            assert_eq!(n, [7u8; NONCE_LEN]);
            let mut first = [0u8; 4];
            io.read_exact(&mut first).await.unwrap();
            assert_eq!(&first, b"PRI ");
            io.write_all(b"reply").await.unwrap();
        });
        // stale garbage, then a stale ACK of another session in the agent->host direction is
        // simulated by the agent never sending it; the host sends garbage + two SYNC copies.
        let (hr, mut hw) = tokio::io::split(host);
        hw.write_all(b"stale bytes of an old session").await.unwrap();
        hw.write_all(&message(&SYNC_MAGIC, &nonce)).await.unwrap();
        let host = hr.unsplit(hw);
        let mut io = host_handshake(host, nonce, Duration::from_millis(5), Duration::from_secs(5))
            .await
            .unwrap();
        io.write_all(b"PRI * HTTP/2.0").await.unwrap();
        let mut reply = [0u8; 5];
        io.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"reply");
        agent_task.await.unwrap();
    }

    #[tokio::test]
    async fn host_ignores_acks_of_other_nonces() {
        let (host, mut agent) = tokio::io::duplex(1 << 16);
        let t = tokio::spawn(async move {
            agent.write_all(&message(&ACK_MAGIC, &[1u8; NONCE_LEN])).await.unwrap();
            agent.write_all(&message(&ACK_MAGIC, &[2u8; NONCE_LEN])).await.unwrap();
            agent.write_all(b"tail").await.unwrap();
            agent
        });
        let mut io = host_handshake(host, [2u8; NONCE_LEN], Duration::from_secs(1), Duration::from_secs(5))
            .await
            .unwrap();
        let mut tail = [0u8; 4];
        io.read_exact(&mut tail).await.unwrap();
        assert_eq!(&tail, b"tail");
        drop(t.await.unwrap());
    }

    #[tokio::test]
    async fn host_times_out_without_agent() {
        let (host, _agent) = tokio::io::duplex(1 << 16);
        let err = host_handshake(
            host,
            [0u8; NONCE_LEN],
            Duration::from_millis(10),
            Duration::from_millis(50),
        )
        .await
        .err()
        .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
