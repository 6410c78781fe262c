//! Leaves: the TLS configuration presented for each host, minted on a blocking thread and
//! kept in a bounded LRU.

use super::*;

/// Host → its TLS configuration, least recently used evicted. Hand-written: a map with a use
/// counter; eviction scans at most `LEAF_CACHE` entries, far cheaper than the mint it follows.
pub(super) type LeafCell = Arc<OnceCell<Arc<rustls::ServerConfig>>>;

#[derive(Default)]
pub(super) struct LeafCache {
    /// Host → (its configuration once minted, when last used).
    pub(super) map: HashMap<String, (LeafCell, u64)>,
    pub(super) tick: u64,
}

impl LeafCache {
    pub(super) fn entry(&mut self, host: &str) -> LeafCell {
        self.tick += 1;
        let tick = self.tick;
        if let Some((cell, used)) = self.map.get_mut(host) {
            *used = tick;
            return cell.clone();
        }
        if self.map.len() >= LEAF_CACHE {
            if let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(h, _)| h.clone())
            {
                self.map.remove(&oldest);
            }
        }
        let cell = Arc::new(OnceCell::new());
        self.map.insert(host.to_string(), (cell.clone(), tick));
        cell
    }
}

impl Shared {
    /// The guest-facing TLS configuration for `host` (normalized), minted once.
    pub(super) async fn server_config(&self, host: &str) -> std::result::Result<Arc<rustls::ServerConfig>, String> {
        let cell = lock(&self.leaves).entry(host);
        cell.get_or_try_init(|| async {
            let ca = self.ca.clone();
            let provider = self.provider.clone();
            let name = host.trim_start_matches('[').trim_end_matches(']').to_string();
            tokio::task::spawn_blocking(move || mint(&ca, provider, &name))
                .await
                .map_err(|e| e.to_string())?
        })
        .await
        .cloned()
    }
}

pub(super) fn mint(
    ca: &GroupCa,
    provider: Arc<rustls::crypto::CryptoProvider>,
    name: &str,
) -> std::result::Result<Arc<rustls::ServerConfig>, String> {
    let leaf = ca.issue(&[name.to_string()]).map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(leaf.cert_der)], key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSIONS_PER_HOST);
    Ok(Arc::new(cfg))
}
