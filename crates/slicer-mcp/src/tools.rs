//! The MCP surface: the tools (names, descriptions, hints) and the console resource, each a
//! call to the daemon made in [`crate::sandboxes`], [`crate::exec`] or [`crate::files`].

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    Implementation, ListResourceTemplatesResult, PaginatedRequestParams, ReadResourceRequestParams,
    ReadResourceResponse, ReadResourceResult, ResourceContents, ResourceTemplate, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_handler, tool_router, ErrorData, RoleServer, ServerHandler};
use serde_json::json;

use crate::args::{
    CreateArgs, DirArgs, ExecIdArgs, ListArgs, LogsArgs, ReadArgs, RunArgs, SandboxArg, StartArgs, StopArgs, WriteArgs,
};
use crate::{answer, to_json, Fail, Outcome, Sandboxes};

#[tool_router]
impl Sandboxes {
    #[tool(
        description = "List the host groups sandboxes can be created in: name, image, default vCPUs and RAM.",
        annotations(read_only_hint = true)
    )]
    async fn list_groups(&self) -> Outcome {
        answer(
            self.api
                .hostgroups()
                .await
                .map(|g| json!({ "groups": g }))
                .map_err(Fail::from),
        )
    }

    #[tool(
        description = "Create a sandbox (a Linux microVM) and wait until commands can run in it. Returns its \
        hostname, the `sandbox` argument of every other tool. Tag it (e.g. user=alice) to find it again."
    )]
    async fn create_sandbox(&self, Parameters(a): Parameters<CreateArgs>) -> Outcome {
        answer(self.create(a).await)
    }

    #[tool(
        description = "List sandboxes, optionally only those of a group or with a tag (exact, or by prefix): \
        hostname, group, status, tags, IP, vCPUs, RAM.",
        annotations(read_only_hint = true)
    )]
    async fn list_sandboxes(&self, Parameters(a): Parameters<ListArgs>) -> Outcome {
        answer(self.list(a).await)
    }

    #[tool(
        description = "Describe one sandbox: status, group, image, tags, network, resources.",
        annotations(read_only_hint = true)
    )]
    async fn get_sandbox(&self, Parameters(a): Parameters<SandboxArg>) -> Outcome {
        let r = async { to_json(self.api.describe_vm(&a.sandbox).await?) };
        answer(r.await)
    }

    #[tool(
        description = "Run a command in a sandbox and wait for it to end. Returns exit_code (null if it was \
        killed by the timeout: timed_out is then true), signal, stdout and stderr. Each stream is cut at \
        max_output_bytes (default 65536); a cut stream ends with a line starting \"[slicer: output truncated\" \
        that gives the full size. A non-zero exit code is a normal result, not a tool error. For servers and \
        long jobs use start_background."
    )]
    async fn run_command(&self, Parameters(a): Parameters<RunArgs>) -> Outcome {
        answer(self.run(a).await)
    }

    #[tool(
        description = "Start a command in the background in a sandbox (a server, a long job). Returns its \
        exec_id for inspect_background, read_background_logs and stop_background. Its output is kept in a \
        1 MiB ring."
    )]
    async fn start_background(&self, Parameters(a): Parameters<StartArgs>) -> Outcome {
        answer(self.start(a).await)
    }

    #[tool(
        description = "State of a background command: running, exit_code, signal, bytes written and dropped.",
        annotations(read_only_hint = true)
    )]
    async fn inspect_background(&self, Parameters(a): Parameters<ExecIdArgs>) -> Outcome {
        answer(self.inspect(a).await)
    }

    #[tool(
        description = "Output of a background command so far (stdout and stderr, each cut at max_bytes). Pass \
        next_from_id back as from_id to read only what came after.",
        annotations(read_only_hint = true)
    )]
    async fn read_background_logs(&self, Parameters(a): Parameters<LogsArgs>) -> Outcome {
        answer(self.logs(a).await)
    }

    #[tool(
        description = "Stop a background command: TERM, then KILL after grace_ms if it still runs (or the \
        signal given)."
    )]
    async fn stop_background(&self, Parameters(a): Parameters<StopArgs>) -> Outcome {
        answer(self.stop(a).await)
    }

    #[tool(
        description = "Read a file from a sandbox. Text comes back as is (encoding utf-8), other bytes as base64 \
        (encoding base64); at most max_bytes (default 1 MiB), with truncated true when the file is longer.",
        annotations(read_only_hint = true)
    )]
    async fn read_file(&self, Parameters(a): Parameters<ReadArgs>) -> Outcome {
        answer(self.read(a).await)
    }

    #[tool(
        description = "Write a file in a sandbox (replacing it; missing directories are made), owned by the \
        default user unless uid is given. content is text, or base64 with base64: true; at most 8 MiB."
    )]
    async fn write_file(&self, Parameters(a): Parameters<WriteArgs>) -> Outcome {
        answer(self.write(a).await)
    }

    #[tool(
        description = "List a directory in a sandbox: name, type (file, directory, symlink), size, mode, mtime.",
        annotations(read_only_hint = true)
    )]
    async fn list_directory(&self, Parameters(a): Parameters<DirArgs>) -> Outcome {
        answer(self.list_dir(a).await)
    }

    #[tool(
        description = "Delete a sandbox: its VM stops and its disk is removed.",
        annotations(destructive_hint = true)
    )]
    async fn delete_sandbox(&self, Parameters(a): Parameters<SandboxArg>) -> Outcome {
        answer(self.delete(a).await)
    }
}

/// What the server tells a client about itself on connecting.
const INSTRUCTIONS: &str = "Slicer sandboxes are Linux microVMs with their own kernel. Create one \
(create_sandbox), run commands in it (run_command; start_background for servers and long jobs), \
move files with write_file/read_file/list_directory, and delete it when done (delete_sandbox). \
Commands run as the image's default non-root user with passwordless sudo unless uid is given. \
Tag sandboxes (tags) to find them again with list_sandboxes.";

/// The console log resource: a sandbox's kernel and boot messages.
const CONSOLE_TEMPLATE: &str = "slicer://sandbox/{sandbox}/console";
/// The end of the console log a resource read returns.
const CONSOLE_BYTES: usize = 256 << 10;

#[tool_handler]
impl ServerHandler for Sandboxes {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().enable_resources().build())
            .with_server_info(Implementation::new("slicer", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        let mut t = ResourceTemplate::new(CONSOLE_TEMPLATE, "console");
        t.description = Some(format!(
            "A sandbox's serial console (kernel and boot messages), its last {} KiB",
            CONSOLE_BYTES >> 10
        ));
        t.mime_type = Some("text/plain".into());
        Ok(ListResourceTemplatesResult::with_all_items(vec![t]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let uri = request.uri;
        let sandbox = uri
            .strip_prefix("slicer://sandbox/")
            .and_then(|r| r.strip_suffix("/console"))
            .ok_or_else(|| {
                ErrorData::resource_not_found(format!("no resource {uri:?}; the console is {CONSOLE_TEMPLATE}"), None)
            })?;
        let logs = self
            .api
            .vm_logs(sandbox, 0)
            .await
            .map_err(|e| ErrorData::resource_not_found(e.to_string(), None))?;
        Ok(ReadResourceResult::new(vec![ResourceContents::text(console_tail(&logs.content), uri)]).into())
    }
}

/// The last [`CONSOLE_BYTES`] of a console log, cut at a line, with a marker when cut.
fn console_tail(log: &str) -> String {
    if log.len() <= CONSOLE_BYTES {
        return log.to_string();
    }
    let mut from = log.len() - CONSOLE_BYTES;
    while !log.is_char_boundary(from) {
        from += 1;
    }
    let rest = &log[from..];
    let rest = rest.find('\n').map(|n| &rest[n + 1..]).unwrap_or(rest);
    format!(
        "[slicer: console log truncated: its last {} of {} bytes]\n{rest}",
        rest.len(),
        log.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_console_log_keeps_its_end_from_a_line_start() {
        let log = format!("{}\nlast line\n", "x".repeat(CONSOLE_BYTES + 10));
        let t = console_tail(&log);
        assert!(t.starts_with("[slicer: console log truncated"), "{}", &t[..80]);
        assert!(t.ends_with("\nlast line\n"));
        assert_eq!(console_tail("short\n"), "short\n");
    }

    #[test]
    fn every_tool_has_an_object_schema_and_a_description() {
        let tools = Sandboxes::tool_router().list_all();
        assert_eq!(tools.len(), 13);
        for t in tools {
            assert!(t.description.as_deref().is_some_and(|d| d.len() > 20), "{}", t.name);
            assert_eq!(
                t.input_schema.get("type").and_then(|v| v.as_str()),
                Some("object"),
                "{}",
                t.name
            );
        }
    }
}
