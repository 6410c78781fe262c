//! An HTTP body fed from a bounded channel: the producer awaits when the peer is slow, which
//! carries HTTP/2 flow control back to whoever produces the bytes (a pipe, a file).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

pub struct ChannelBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
}

/// Creates a body and the sender that feeds it. Dropping the sender ends the body.
pub fn channel(depth: usize) -> (mpsc::Sender<io::Result<Bytes>>, ChannelBody) {
    let (tx, rx) = mpsc::channel(depth);
    (tx, ChannelBody { rx })
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
