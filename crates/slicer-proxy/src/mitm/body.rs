//! Bodies and decisions: upgraded-connection splicing, byte meters, the counting body
//! wrapper that records one decision per request, and the proxy's own answers.

use super::*;

pub(super) async fn splice(guest: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade, finish: Finish) {
    let (g, u) = tokio::join!(guest, up);
    if let (Ok(g), Ok(u)) = (g, u) {
        let mut g = Metered {
            inner: TokioIo::new(g),
            meter: finish.meter.clone(),
            down: false,
        };
        let mut u = Metered {
            inner: TokioIo::new(u),
            meter: finish.meter.clone(),
            down: true,
        };
        if let Err(e) = tokio::io::copy_bidirectional(&mut g, &mut u).await {
            tracing::debug!("upgraded connection: {e}");
        }
    }
    finish.done(false);
}

#[derive(Default)]
pub(super) struct Meter {
    pub(super) up: AtomicU64,
    pub(super) down: AtomicU64,
}

impl Meter {
    pub(super) fn add(&self, down: bool, n: u64) {
        if down {
            self.down.fetch_add(n, Ordering::Relaxed);
        } else {
            self.up.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// An upgraded stream counting the bytes read from it (guest side: up, upstream side: down),
/// so a splice that ends with a reset still reports what it moved.
pub(super) struct Metered<T> {
    pub(super) inner: T,
    pub(super) meter: Arc<Meter>,
    pub(super) down: bool,
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.meter.add(self.down, n);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What is recorded when a forwarded request's response ends.
pub(super) struct Finish {
    pub(super) plane: Arc<Plane>,
    pub(super) d: Decision,
    pub(super) meter: Arc<Meter>,
    pub(super) start: Instant,
    pub(super) _busy: Busy,
    /// An HTTP/1.1 upstream connection to pool again when the body ended cleanly.
    pub(super) pool_return: Option<(Arc<Mutex<Pool>>, Key, Sender)>,
}

impl Finish {
    pub(super) fn done(mut self, clean: bool) {
        if clean {
            if let Some((pool, key, s)) = self.pool_return.take() {
                lock(&pool).put(key, s);
            }
        }
        let mut d = std::mem::take(&mut self.d);
        d.bytes_up = self.meter.up.load(Ordering::Relaxed);
        d.bytes_down = self.meter.down.load(Ordering::Relaxed);
        d.duration_ms = self.start.elapsed().as_millis() as u64;
        self.plane.events.record(d);
    }
}

/// A body passed through while its data bytes are counted; the response side records the
/// decision when it ends (or is dropped: a guest that went away mid-download).
pub(super) struct Counted<B> {
    pub(super) inner: B,
    pub(super) meter: Arc<Meter>,
    pub(super) down: bool,
    pub(super) finish: Option<Finish>,
}

impl<B> Counted<B> {
    pub(super) fn new(inner: B, meter: Arc<Meter>, down: bool) -> Counted<B> {
        Counted {
            inner,
            meter,
            down,
            finish: None,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(data) = f.data_ref() {
                    self.meter.add(self.down, data.len() as u64);
                }
                // hyper stops polling a body that says it ended (a known length read whole).
                if self.inner.is_end_stream() {
                    if let Some(f) = self.finish.take() {
                        f.done(true);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = self.finish.take() {
                    f.done(true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = self.finish.take() {
                    f.done(false);
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            f.done(false);
        }
    }
}

pub(super) fn empty() -> ResBody {
    UnsyncBoxBody::new(Empty::new().map_err(|n: Infallible| match n {}))
}

pub(super) fn text(status: StatusCode, body: String) -> Response<ResBody> {
    let mut r = Response::new(UnsyncBoxBody::new(
        Full::new(Bytes::from(body)).map_err(|n: Infallible| match n {}),
    ));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The 403 body: which rule is missing (no secret, no token).
pub(super) fn deny_text(d: &Decision, reason: &str) -> String {
    let mut path: String = d.path.chars().take(MAX_ECHO_PATH).collect();
    if path.len() < d.path.len() {
        path.push_str("...");
    }
    let what = if reason == DenyReason::NoMatch.as_str() {
        "no rule for this method and path"
    } else {
        "no rule for this host and port"
    };
    format!(
        "slicer-proxy: denied ({reason}): {what}: client {:?} {} {}://{}:{}{}\n",
        d.client,
        d.method,
        d.scheme,
        d.host,
        d.port,
        path.escape_debug()
    )
}
