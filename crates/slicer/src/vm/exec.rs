//! `slicer vm exec`: a command's output streamed back, stdin streamed in.

use std::io::{IsTerminal, Read, Write};

use anyhow::{Context, Result};
use futures_util::TryStreamExt;
use http_body_util::BodyExt;
use slicer_api::client::{empty, Body};
use slicer_api::query::ExecQuery;
use slicer_api::{ApiClient, ExecFrame, FrameType};

use super::RunAs;

/// `vm exec NAME -- COMMAND`: the command's exit code.
pub(super) async fn exec(
    c: &ApiClient,
    name: &str,
    run_as: RunAs,
    shell: Option<String>,
    command: Vec<String>,
) -> Result<i32> {
    let stdin = !std::io::stdin().is_terminal();
    let q = run_as.apply(ExecQuery {
        cmd: command[0].clone(),
        args: command[1..].to_vec(),
        shell,
        stdin,
        stdio: Some("base64".into()),
        ..Default::default()
    });
    let body: Body = if stdin {
        let (tx, body) = channel_body();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut input = std::io::stdin().lock();
            loop {
                match input.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.blocking_send(Ok(bytes::Bytes::copy_from_slice(&buf[..n]))).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        body
    } else {
        empty()
    };
    let resp = c.vm_exec(name, &q, body).await?;
    let mut stream = resp.into_body().into_data_stream();
    let mut buf = slicer_api::lines::LineBuf::new();
    let mut code = 0;
    while let Some(chunk) = stream.try_next().await? {
        buf.push(&chunk);
        while let Some(line) = buf.next_line() {
            let f: ExecFrame = serde_json::from_slice(line).context("invalid exec frame")?;
            if !f.error.is_empty() {
                eprintln!("error: {}", crate::term::stderr_text(&f.error));
                return Ok(f.exit_code.unwrap_or(1).max(1));
            }
            let data = f.payload().unwrap_or_default();
            match f.r#type {
                Some(FrameType::Stdout) => std::io::stdout().write_all(&data)?,
                Some(FrameType::Stderr) => std::io::stderr().write_all(&data)?,
                Some(FrameType::Exit) => code = f.exit_code.unwrap_or(0),
                _ => {}
            }
        }
    }
    std::io::stdout().flush()?;
    Ok(code)
}

pub(super) fn channel_body() -> (tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(8);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    (tx, http_body_util::StreamBody::new(stream.map_ok(hyper_frame)).boxed())
}

fn hyper_frame(b: bytes::Bytes) -> http_body::Frame<bytes::Bytes> {
    http_body::Frame::data(b)
}
