//! Upstream connections: shaping a request for the upstream's protocol, and the idle
//! connections a guest connection keeps.

use super::*;

pub(super) fn upstream_error(e: hyper::Error) -> Fail {
    Fail::new(StatusCode::BAD_GATEWAY, "upstream-error", format!("upstream: {e}"))
}

/// Sets the target form, version and `Host`/`:authority` for the upstream's protocol. The
/// authority is always the tunnel's (or the absolute URI's) host: what the policy decided on.
pub(super) fn shape(req: &mut Request<ReqBody>, s: &Sender, target: &Target) -> std::result::Result<(), Fail> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .filter(|p| p.starts_with('/'))
        .unwrap_or_else(|| "/".into());
    let authority = target.authority();
    let bad = |_| Fail::new(StatusCode::BAD_REQUEST, "bad-request", "invalid request target");
    match s {
        Sender::H2(_) => {
            *req.uri_mut() = Uri::try_from(format!("{}://{authority}{pq}", target.scheme())).map_err(bad)?;
            *req.version_mut() = Version::HTTP_2;
            req.headers_mut().remove(header::HOST);
        }
        Sender::H1(_) => {
            *req.uri_mut() = Uri::try_from(pq).map_err(bad)?;
            *req.version_mut() = Version::HTTP_11;
            let host = HeaderValue::from_str(&authority)
                .map_err(|_| Fail::new(StatusCode::BAD_REQUEST, "bad-request", "invalid host"))?;
            req.headers_mut().insert(header::HOST, host);
        }
    }
    Ok(())
}

pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub(super) enum Sender {
    H1(client1::SendRequest<ReqBody>),
    H2(client2::SendRequest<ReqBody>),
}

pub(super) enum SendErr {
    /// Not sent; the request is back.
    Retry(Box<Request<ReqBody>>),
    Failed(hyper::Error),
}

impl Sender {
    pub(super) async fn send(&mut self, req: Request<ReqBody>) -> std::result::Result<Response<Incoming>, SendErr> {
        let r = match self {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2(s) => s.try_send_request(req).await,
        };
        r.map_err(|mut e| match e.take_message() {
            Some(req) => SendErr::Retry(Box::new(req)),
            None => SendErr::Failed(e.into_error()),
        })
    }

    /// An h2 connection goes back to the pool at once (it multiplexes); an HTTP/1.1 one is
    /// returned, to be pooled when the response body ended.
    pub(super) fn keep(self, pool: &Mutex<Pool>, key: Key) -> Option<Sender> {
        match self {
            Sender::H2(s) => {
                lock(pool).put(key, Sender::H2(s));
                None
            }
            s => Some(s),
        }
    }
}

/// A guest connection's idle upstream connections (several keys only for the forward proxy).
#[derive(Default)]
pub(super) struct Pool {
    pub(super) h2: Vec<(Key, client2::SendRequest<ReqBody>)>,
    pub(super) h1: Vec<(Key, client1::SendRequest<ReqBody>)>,
}

impl Pool {
    pub(super) fn take(&mut self, key: &Key) -> Option<Sender> {
        self.h2.retain(|(_, s)| !s.is_closed());
        if let Some((_, s)) = self.h2.iter().find(|(k, _)| k == key) {
            return Some(Sender::H2(s.clone()));
        }
        self.h1.retain(|(_, s)| !s.is_closed());
        let i = self.h1.iter().rposition(|(k, _)| k == key)?;
        Some(Sender::H1(self.h1.swap_remove(i).1))
    }

    pub(super) fn put(&mut self, key: Key, s: Sender) {
        match s {
            Sender::H2(s) => {
                if self.h2.iter().any(|(k, _)| *k == key) {
                    return;
                }
                if self.h2.len() >= MAX_IDLE_UPSTREAM {
                    self.h2.remove(0);
                }
                self.h2.push((key, s));
            }
            Sender::H1(s) => {
                if s.is_closed() {
                    return;
                }
                if self.h1.len() >= MAX_IDLE_UPSTREAM {
                    self.h1.remove(0);
                }
                self.h1.push((key, s));
            }
        }
    }
}
