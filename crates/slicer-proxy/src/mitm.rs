//! Terminating a guest's TLS (a leaf per host signed by the group CA), deciding each inner
//! request, injecting credentials, and forwarding over TLS verified against the host's roots
//! plus an operator's bundle. (Owned by the interception work; this is the interface the
//! listener calls.)

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::ca::GroupCa;
use crate::plane::{Plane, Tunnel};

/// Leaf cache, TLS configurations, the HTTP client to upstreams.
pub struct Interceptor {}

impl Interceptor {
    /// `extra_roots`: DER certificates trusted for upstreams besides the host's store.
    pub fn new(_ca: Arc<GroupCa>, _extra_roots: Vec<Vec<u8>>) -> crate::Result<Interceptor> {
        Ok(Interceptor {})
    }

    /// Serves an intercepted tunnel. `guest` is the guest's side after the proxy answered the
    /// CONNECT with 200; it may speak TLS (the usual) or plain HTTP (a CONNECT to port 80).
    pub async fn serve<S>(&self, _plane: Arc<Plane>, _tunnel: Tunnel, _guest: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
    }

    /// Serves a plain HTTP forward-proxy connection (`GET http://host/path` on port 3128) whose
    /// first request head the listener already authenticated; `guest` replays the bytes the
    /// listener read. Every request on it is authenticated and decided again.
    pub async fn serve_forward<S>(&self, _plane: Arc<Plane>, _guest: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
    }
}
