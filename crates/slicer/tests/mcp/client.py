"""An MCP client (the official Python SDK) that drives slicer's MCP server through the
acceptance sequence and fails loudly: run by crates/slicer/tests/mcp.rs.

    client.py stdio SLICER_BINARY DAEMON_URL TOKEN_FILE GROUP MODE
    client.py http  MCP_URL TOKEN GROUP MODE
    client.py http-no-token MCP_URL

MODE is "legacy" (the initialize handshake) or "auto" (the SDK's choice). Prints one JSON line
with what it measured.
"""

import asyncio
import json
import sys
import time

import httpx2
import jsonschema
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

MARKER = "[slicer: output truncated"
TOOLS = {
    "list_groups", "create_sandbox", "list_sandboxes", "get_sandbox", "run_command",
    "start_background", "inspect_background", "read_background_logs", "stop_background",
    "read_file", "write_file", "list_directory", "delete_sandbox",
}


def fail(msg):
    raise SystemExit(f"FAIL: {msg}")


async def call(c, name, args, expect_error=False):
    r = await c.call_tool(name, args)
    text = "".join(getattr(b, "text", "") for b in r.content)
    if r.is_error != expect_error:
        fail(f"{name}({json.dumps(args)[:200]}): is_error={r.is_error}: {text[:2000]}")
    if expect_error:
        return text
    v = r.structured_content
    if v is None:
        v = json.loads(text)
    return v


async def session(server, group, mode):
    out = {}
    async with Client(server, mode=mode, read_timeout_seconds=600) as c:
        out["protocol"] = c.session.protocol_version if hasattr(c, "session") else None
        tools = (await c.list_tools()).tools
        names = {t.name for t in tools}
        if names != TOOLS:
            fail(f"tools: {sorted(names)}")
        for t in tools:
            jsonschema.Draft202012Validator.check_schema(t.input_schema)
            if t.input_schema.get("type") != "object" or not t.description:
                fail(f"tool {t.name}: {t.input_schema} {t.description!r}")
        run = next(t for t in tools if t.name == "run_command")
        v = jsonschema.Draft202012Validator(run.input_schema)
        if v.is_valid({"command": "x"}):
            fail("run_command's schema accepts a call without sandbox")
        if not v.is_valid({"sandbox": "x", "command": "uname -a", "timeout_secs": 5}):
            fail("run_command's schema refuses a valid call")

        t0 = time.monotonic()
        created = await call(c, "create_sandbox", {"group": group, "tags": ["mcp-test"]})
        sb = created["sandbox"]
        out["create_s"] = round(time.monotonic() - t0, 2)
        try:
            found = await call(c, "list_sandboxes", {"tag": "mcp-test"})
            if [n["hostname"] for n in found["sandboxes"]] != [sb]:
                fail(f"list_sandboxes by tag: {found}")

            r = await call(c, "run_command", {"sandbox": sb, "command": "uname -a"})
            if r["exit_code"] != 0 or not r["stdout"].startswith("Linux"):
                fail(f"uname -a: {r}")
            r = await call(c, "run_command", {"sandbox": sb, "argv": ["id", "-u"], "uid": 0})
            if r["exit_code"] != 0 or r["stdout"].strip() != "0":
                fail(f"id -u as root: {r}")

            text = "hello from mcp\nline two\n"
            w = await call(c, "write_file", {"sandbox": sb, "path": "/tmp/mcp/hello.txt", "content": text})
            if w["bytes"] != len(text):
                fail(f"write_file: {w}")
            rd = await call(c, "read_file", {"sandbox": sb, "path": "/tmp/mcp/hello.txt"})
            if rd["content"] != text or rd["encoding"] != "utf-8" or rd["truncated"]:
                fail(f"read_file: {rd}")
            ls = await call(c, "list_directory", {"sandbox": sb, "path": "/tmp/mcp"})
            if [(e["name"], e["type"], e["size"]) for e in ls["entries"]] != [("hello.txt", "file", len(text))]:
                fail(f"list_directory: {ls}")

            r = await call(c, "run_command", {"sandbox": sb, "command": "echo oops >&2; exit 3"})
            if r["exit_code"] != 3 or r["stderr"] != "oops\n" or r["timed_out"]:
                fail(f"failing command: {r}")

            t0 = time.monotonic()
            r = await call(c, "run_command", {
                "sandbox": sb,
                "command": "head -c 10485760 /dev/zero | tr '\\0' a; echo done >&2",
                "max_output_bytes": 100000,
            })
            out["ten_mib_s"] = round(time.monotonic() - t0, 2)
            if r["exit_code"] != 0 or not r["truncated"] or r["stdout_bytes"] != 10485760:
                fail(f"10 MiB: { {k: v for k, v in r.items() if k != 'stdout'} }")
            if not r["stdout"].startswith("a" * 100000) or MARKER not in r["stdout"] or len(r["stdout"]) > 100200:
                fail(f"10 MiB: stdout is {len(r['stdout'])} chars: {r['stdout'][-200:]!r}")
            if r["stderr"] != "done\n":
                fail(f"10 MiB: stderr {r['stderr']!r}")

            r = await call(c, "run_command", {"sandbox": sb, "command": "sleep 30", "timeout_secs": 2})
            if not r["timed_out"] or r["exit_code"] is not None:
                fail(f"timeout: {r}")

            bg = await call(c, "start_background", {
                "sandbox": sb, "command": "for i in 1 2 3; do echo tick $i; sleep 0.2; done; sleep 60"})
            deadline = time.monotonic() + 60
            while True:
                logs = await call(c, "read_background_logs", {"sandbox": sb, "exec_id": bg["exec_id"]})
                if "tick 3" in logs["stdout"]:
                    break
                if time.monotonic() > deadline:
                    fail(f"background logs: {logs}")
                await asyncio.sleep(0.2)
            info = await call(c, "inspect_background", {"sandbox": sb, "exec_id": bg["exec_id"]})
            if not info["running"]:
                fail(f"inspect_background: {info}")
            await call(c, "stop_background", {"sandbox": sb, "exec_id": bg["exec_id"], "signal": "KILL"})
            deadline = time.monotonic() + 60
            while (await call(c, "inspect_background", {"sandbox": sb, "exec_id": bg["exec_id"]}))["running"]:
                if time.monotonic() > deadline:
                    fail("stop_background: still running")
                await asyncio.sleep(0.2)

            templates = (await c.list_resource_templates()).resource_templates
            if [t.uri_template for t in templates] != ["slicer://sandbox/{sandbox}/console"]:
                fail(f"resource templates: {templates}")
            console = await c.read_resource(f"slicer://sandbox/{sb}/console")
            if len(console.contents) != 1 or not hasattr(console.contents[0], "text"):
                fail(f"console: {console}")
            out["console_bytes"] = len(console.contents[0].text)
            try:
                await c.read_resource("slicer://sandbox/no-such-vm/console")
            except Exception as e:  # an MCP error, not a crashed server
                out["unknown_console"] = str(e)[:200]
            else:
                fail("the console of an unknown sandbox was read")

            err = await call(c, "run_command", {"sandbox": "no-such-vm", "command": "true"}, expect_error=True)
            if "no-such-vm" not in err:
                fail(f"unknown sandbox: {err}")
            err = await call(c, "read_file", {"sandbox": sb, "path": "/no/such/file"}, expect_error=True)
            if not err:
                fail("missing file: empty error")
        finally:
            await call(c, "delete_sandbox", {"sandbox": sb})
        left = await call(c, "list_sandboxes", {"tag": "mcp-test"})
        if left["sandboxes"]:
            fail(f"after delete: {left}")
    return out


async def main():
    kind = sys.argv[1]
    if kind == "stdio":
        binary, url, token_file, group, mode = sys.argv[2:7]
        server = StdioServerParameters(command=binary, args=["mcp", "--url", url, "--token-file", token_file])
        out = await session(server, group, mode)
    elif kind == "http":
        url, token, group, mode = sys.argv[2:6]
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(600))
        out = await session(streamable_http_client(url, http_client=http), group, mode)
    elif kind == "http-no-token":
        url = sys.argv[2]
        statuses = []

        async def seen(response):
            statuses.append(response.status_code)

        http = httpx2.AsyncClient(timeout=httpx2.Timeout(30), event_hooks={"response": [seen]})
        try:
            async with Client(streamable_http_client(url, http_client=http), mode="legacy", read_timeout_seconds=30) as c:
                await c.list_tools()
        except BaseException as e:  # the SDK raises its own types, or a group of them
            leaves, todo = [], [e]
            while todo:
                x = todo.pop()
                if isinstance(x, BaseExceptionGroup):
                    todo.extend(x.exceptions)
                else:
                    leaves.append(f"{type(x).__name__}: {x}"[:300])
            out = {"refused": leaves, "statuses": statuses}
        else:
            fail("the server answered without a token")
    else:
        fail(f"unknown mode {kind}")
    print(json.dumps(out))


asyncio.run(main())
