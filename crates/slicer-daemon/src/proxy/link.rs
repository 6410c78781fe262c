//! The control links to proxies: found by their sockets, greeted, sent every state, and read for
//! acknowledgements, decisions and stats.

use super::*;

impl ProxyAdmin {
    // ----- links to proxies -----

    /// Connects to the socket of each configured group's proxy not linked yet.
    pub(super) fn scan(self: &Arc<Self>) {
        let dir = control::proxy_dir(&self.data_dir);
        if !private_dir(&dir) {
            return;
        }
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        for group in &self.groups {
            if self.links().contains_key(group) {
                continue;
            }
            let path = control::control_socket(&self.data_dir, group);
            let ok = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket() && m.uid() == me);
            if !ok {
                continue;
            }
            let id = self.next_link.fetch_add(1, Ordering::Relaxed);
            let (acked_tx, acked) = watch::channel(0u64);
            let hello = Arc::new(AtomicBool::new(false));
            self.links().insert(
                group.clone(),
                Link {
                    id,
                    acked,
                    hello: hello.clone(),
                },
            );
            let (me2, group) = (self.clone(), group.clone());
            let closing = self.closing.clone();
            tokio::spawn(async move {
                tokio::select! {
                    r = me2.link(&group, &path, acked_tx, &hello) => {
                        if let Err(e) = r {
                            tracing::info!(group, "proxy control link ended: {e:#}");
                        }
                    }
                    _ = closing.cancelled() => {}
                }
                let mut links = me2.links();
                if links.get(&group).is_some_and(|l| l.id == id) {
                    links.remove(&group);
                }
                if hello.load(Ordering::SeqCst) {
                    me2.metrics.connected.dec();
                }
                me2.metrics
                    .open
                    .get_or_create(&GroupLabels { group: group.clone() })
                    .set(0);
            });
        }
    }

    /// Runs one control link: the proxy's hello, then states out and its lines in, until either
    /// end stops.
    pub(super) async fn link(
        &self,
        group: &str,
        path: &Path,
        acked: watch::Sender<u64>,
        hello: &AtomicBool,
    ) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let stream = tokio::time::timeout(CONNECT_WAIT, tokio::net::UnixStream::connect(path))
            .await
            .context("connecting timed out")?
            .with_context(|| format!("connecting to {}", path.display()))?;
        let (rd, mut wr) = stream.into_split();
        let mut lines = Lines {
            rd,
            buf: slicer_agent_proto::lines::LineBuf::new(),
        };
        self.hello(group, &mut lines).await?;
        hello.store(true, Ordering::SeqCst);
        self.metrics.connected.inc();
        let mut state = self.state.subscribe();
        let first_state = state.borrow_and_update().clone();
        send_state(&mut wr, &first_state).await?;
        let mut pending: Vec<Decision> = Vec::new();
        let mut flush = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                changed = state.changed() => {
                    changed.context("the daemon is stopping")?;
                    let s = state.borrow_and_update().clone();
                    send_state(&mut wr, &s).await?;
                }
                line = lines.next() => self.on_line(group, &line?, &acked, &mut pending),
                _ = flush.tick() => self.flush_decisions(&mut pending),
            }
        }
    }

    /// Reads the proxy's first line, which must be a hello for `group` with an IP bind, and
    /// records it (`check_binding` answers from it).
    async fn hello(&self, group: &str, lines: &mut Lines) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let first = tokio::time::timeout(HELLO_WAIT, lines.next())
            .await
            .context("no hello within 5 s")??;
        let FromProxy::Hello {
            group: g,
            bind,
            mode,
            pid,
        } = serde_json::from_slice::<FromProxy>(&first).context("reading the hello")?
        else {
            anyhow::bail!("the proxy's first line is not a hello");
        };
        anyhow::ensure!(g == group, "the proxy on {group}'s socket says it serves {g:?}");
        anyhow::ensure!(
            proxy_host(&bind).is_some(),
            "the proxy's bind {bind:?} is not an IP address"
        );
        self.db
            .conn()
            .execute(
                "INSERT OR REPLACE INTO proxy_hellos (host_group, bind, mode, pid, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![group, bind, Text(mode), pid, now()],
            )
            .context("recording the proxy's hello")?;
        tracing::info!(group, bind, mode = mode.as_str(), pid, "proxy connected");
        Ok(())
    }

    /// One line after the hello: an acknowledgement, a decision (counted, and kept in
    /// `pending` for `suggest`) or stats; anything else is logged and skipped.
    fn on_line(&self, group: &str, line: &[u8], acked: &watch::Sender<u64>, pending: &mut Vec<Decision>) {
        match serde_json::from_slice::<FromProxy>(line) {
            Ok(FromProxy::Ack { generation }) => {
                acked.send_if_modified(|a| {
                    let newer = generation > *a;
                    if newer {
                        *a = generation;
                    }
                    newer
                });
            }
            Ok(FromProxy::Decision(d)) => {
                let decision = if d.allow { "allow" } else { "deny" };
                self.metrics
                    .decisions
                    .get_or_create(&ProxyDecisionLabels {
                        group: group.into(),
                        decision: decision.into(),
                    })
                    .inc();
                if keep_for_suggest(&d) {
                    pending.push(d);
                }
                if pending.len() >= DECISION_BATCH {
                    self.flush_decisions(pending);
                }
            }
            Ok(FromProxy::Stats(s)) => self.record_stats(group, &s),
            Ok(FromProxy::Hello { .. }) => {}
            Err(e) => tracing::debug!(group, "an unreadable line from the proxy: {e}"),
        }
    }

    /// A proxy's byte and connection counts, into the gauges of its group.
    fn record_stats(&self, group: &str, s: &control::Stats) {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (dir, v) in [("up", s.bytes_up), ("down", s.bytes_down)] {
            self.metrics
                .bytes
                .get_or_create(&ProxyBytesLabels {
                    group: group.into(),
                    direction: dir.into(),
                })
                .set(clamp(v));
        }
        self.metrics
            .open
            .get_or_create(&GroupLabels { group: group.into() })
            .set(clamp(s.open_connections));
    }

    pub(super) fn flush_decisions(&self, pending: &mut Vec<Decision>) {
        if pending.is_empty() {
            return;
        }
        if let Err(e) = self.store_decisions(std::mem::take(pending)) {
            tracing::warn!("keeping proxy decisions: {e}");
        }
    }
}

pub(super) async fn send_state(wr: &mut tokio::net::unix::OwnedWriteHalf, state: &ProxyState) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(&ToProxy::State { state: state.clone() })?;
    line.push(b'\n');
    tokio::time::timeout(SEND_WAIT, wr.write_all(&line))
        .await
        .map_err(|_| anyhow::anyhow!("the proxy did not read the state within {SEND_WAIT:?}"))??;
    Ok(())
}

/// Lines from a proxy, each at most [`control::MAX_EVENT_LINE`]. `next` is cancel-safe (what
/// was read stays in `buf`).
pub(super) struct Lines {
    rd: tokio::net::unix::OwnedReadHalf,
    buf: slicer_agent_proto::lines::LineBuf,
}

impl Lines {
    pub(super) async fn next(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(l) = self.buf.next_line() {
                anyhow::ensure!(
                    l.len() <= control::MAX_EVENT_LINE + 1,
                    "a line from the proxy is longer than {} bytes",
                    control::MAX_EVENT_LINE
                );
                return Ok(l.to_vec());
            }
            anyhow::ensure!(
                self.buf.pending() <= control::MAX_EVENT_LINE,
                "a line from the proxy is longer than {} bytes",
                control::MAX_EVENT_LINE
            );
            let n = self.rd.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "the proxy closed the connection");
            self.buf.push(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_proxy_line_past_the_bound_ends_the_link() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (rd, w) = a.into_split();
        let mut lines = Lines {
            rd,
            buf: slicer_agent_proto::lines::LineBuf::new(),
        };
        let (_r, mut wr) = b.into_split();
        let writer = tokio::spawn(async move {
            wr.write_all(b"{\"type\":\"ack\",\"generation\":1}\n").await.unwrap();
            // Endless bytes without a newline.
            let junk = vec![b'x'; 1 << 16];
            while wr.write_all(&junk).await.is_ok() {}
        });
        assert_eq!(lines.next().await.unwrap(), b"{\"type\":\"ack\",\"generation\":1}\n");
        let e = lines.next().await.unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        // Closing our end ends the writer.
        drop(lines);
        drop(w);
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .unwrap()
            .unwrap();
    }
}
