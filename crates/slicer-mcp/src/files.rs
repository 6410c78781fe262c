//! The file tools: read a file (text, or base64 when it is not UTF-8), write one, list a
//! directory.

use base64::Engine as _;
use futures_util::TryStreamExt;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use slicer_api::client::full;
use slicer_api::query::CopyQuery;
use slicer_api::CopyResponse;

use crate::args::{DirArgs, ReadArgs, WriteArgs};
use crate::{output, Fail, Sandboxes};
use crate::{DEFAULT_READ_BYTES, MAX_READ_BYTES, MAX_WRITE_BYTES};

impl Sandboxes {
    pub(crate) async fn read(&self, a: ReadArgs) -> Result<Value, Fail> {
        let limit = a.max_bytes.unwrap_or(DEFAULT_READ_BYTES).min(MAX_READ_BYTES);
        let q = CopyQuery {
            path: a.path.clone(),
            mode: Some("binary".into()),
            ..Default::default()
        };
        let resp = self.api.cp_download(&a.sandbox, &q).await?;
        let mut kept = output::Capped::new(limit);
        let mut body = resp.into_body().into_data_stream();
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| Fail(format!("reading {}: {e}", a.path)))?
        {
            kept.push(&chunk);
            // Past the limit the rest is not read: dropping the body ends the transfer.
            if kept.truncated() {
                break;
            }
        }
        let bytes = kept.kept();
        Ok(match std::str::from_utf8(bytes) {
            Ok(text) => json!({
                "path": a.path,
                "encoding": "utf-8",
                "content": text,
                "truncated": kept.truncated(),
                "bytes_returned": bytes.len(),
            }),
            Err(_) => json!({
                "path": a.path,
                "encoding": "base64",
                "content": base64::engine::general_purpose::STANDARD.encode(bytes),
                "truncated": kept.truncated(),
                "bytes_returned": bytes.len(),
            }),
        })
    }

    pub(crate) async fn write(&self, a: WriteArgs) -> Result<Value, Fail> {
        let data = if a.base64 {
            base64::engine::general_purpose::STANDARD
                .decode(a.content.trim())
                .map_err(|e| Fail(format!("content is not base64: {e}")))?
        } else {
            a.content.into_bytes()
        };
        if data.len() > MAX_WRITE_BYTES {
            return Err(Fail(format!(
                "content is {} bytes; write_file takes at most {MAX_WRITE_BYTES}",
                data.len()
            )));
        }
        let q = CopyQuery {
            path: a.path,
            mode: Some("binary".into()),
            uid: a.uid,
            permissions: a.permissions,
            ..Default::default()
        };
        let resp = self
            .api
            .cp_upload(&a.sandbox, &q, "application/octet-stream", full(data))
            .await?;
        let raw = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Fail(e.to_string()))?
            .to_bytes();
        let c: CopyResponse =
            serde_json::from_slice(&raw).map_err(|e| Fail(format!("invalid answer from the daemon: {e}")))?;
        Ok(json!({ "path": c.path, "bytes": c.bytes }))
    }

    pub(crate) async fn list_dir(&self, a: DirArgs) -> Result<Value, Fail> {
        let entries = self.api.fs_readdir(&a.sandbox, &a.path).await?;
        Ok(json!({ "path": a.path, "entries": entries }))
    }
}
