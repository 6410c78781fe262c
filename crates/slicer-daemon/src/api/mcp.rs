//! `/mcp`: the MCP server (slicer-mcp) on the streamable-HTTP transport, behind the same bearer
//! token as the REST API. Its tools call the REST router in-process, over in-memory pipes
//! served by a loopback listener (no socket, whatever the daemon listens on), with the daemon's
//! token: a tool can do exactly what a REST call with the token can, and every call passes
//! the same checks.

use std::sync::Arc;

use axum::Router;
use slicer_api::client::{Connector, Io};
use tokio::sync::mpsc;

use super::Shared;

/// Buffer of each in-memory connection, each way.
const PIPE_BYTES: usize = 256 << 10;
/// In-process connections waiting to be accepted; a tool call waits for room beyond this.
const BACKLOG: usize = 64;

/// A listener whose connections are in-memory pipes handed over by [`connector`].
struct Loopback(mpsc::Receiver<tokio::io::DuplexStream>);

impl axum::serve::Listener for Loopback {
    type Io = tokio::io::DuplexStream;
    type Addr = ();

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.0.recv().await {
            Some(io) => (io, ()),
            // Every connector is gone: nothing will connect again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn connector(tx: mpsc::Sender<tokio::io::DuplexStream>) -> Connector {
    Arc::new(move || {
        let tx = tx.clone();
        Box::pin(async move {
            let (client, server) = tokio::io::duplex(PIPE_BYTES);
            tx.send(server)
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::NotConnected, "the daemon's API has stopped"))?;
            Ok(Box::new(client) as Box<dyn Io>)
        })
    })
}

/// `rest` with `/mcp` added: the MCP service, whose tools call `rest` itself.
pub fn with_mcp(rest: Router, state: Shared) -> Router {
    let (tx, rx) = mpsc::channel(BACKLOG);
    let inner = rest.clone();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(Loopback(rx), inner).await {
            tracing::error!("in-process API for /mcp: {e}");
        }
    });
    let client =
        slicer_api::ApiClient::with_connector("the daemon's API (in-process)", state.token.clone(), connector(tx));
    // Without a token, Host is checked against loopback names (DNS rebinding); with one, the
    // token is the check.
    let service = slicer_mcp::http_service(client, state.token.is_none());
    let mcp = Router::new()
        .nest_service("/mcp", service)
        .route_layer(axum::middleware::from_fn_with_state(state, super::auth));
    rest.merge(mcp)
}
