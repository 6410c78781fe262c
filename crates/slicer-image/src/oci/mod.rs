//! OCI and Docker images from a registry, turned into bootable root filesystems.
//!
//! [`pull`] resolves a reference to an image manifest (an index picks linux/amd64), downloads
//! each layer with its digest checked, applies the layers in order ([`layer`]), injects the
//! agent, and writes an ext4 image with `mkfs.ext4 -d` (no mount). An image with systemd keeps
//! it as PID 1 and runs the agent as a unit; any other image boots the agent as PID 1.
//!
//! Everything happens in a scratch directory under `images/tmp/`, renamed into
//! `images/oci/<manifest digest>/` when complete, so a failed or interrupted pull leaves
//! nothing in the store (scratch directories of dead pulls are swept by the next one). A
//! second pull of a digest already in the store downloads nothing but the manifest.

pub mod auth;
pub mod layer;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::{Client, Reference};
use tokio::io::AsyncWrite;

pub use layer::Budget;

use crate::store::{file_sha256, key_of, Image, ImageStore};
use crate::{Variant, AGENT_GUEST_PATH};

/// Most layers an image may have (Docker's own limit is 127).
pub const MAX_LAYERS: usize = 128;

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The static agent to put in the image.
    pub agent: PathBuf,
    /// Registries (`host[:port]`) that may be reached over plain HTTP.
    pub insecure: Vec<String>,
    /// A docker-style config.json with credentials (default: `$DOCKER_CONFIG` or `~/.docker`).
    pub docker_config: Option<PathBuf>,
    /// Show progress on the terminal (layers, bytes); else plain lines on stderr.
    pub progress: bool,
    pub budget: Budget,
    pub connect_timeout: Duration,
}

impl PullOptions {
    pub fn new(agent: PathBuf) -> PullOptions {
        PullOptions {
            agent,
            insecure: Vec::new(),
            docker_config: auth::default_config_path(),
            progress: false,
            budget: Budget::default(),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a pull failed. Whatever the reason, the store is as it was.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{reference:?} is not an image reference: {message}")]
    BadReference { reference: String, message: String },
    #[error("registry {registry} cannot be reached: {message}")]
    Unreachable { registry: String, message: String },
    #[error("{reference}: the registry refused access ({message}); add credentials for {registry} to {config} (docker login)")]
    Unauthorized {
        reference: String,
        registry: String,
        config: String,
        message: String,
    },
    #[error("{reference}: not found in the registry ({message})")]
    NotFound { reference: String, message: String },
    #[error("{reference}: content does not match its digest ({message})")]
    Digest { reference: String, message: String },
    #[error("{reference}: {message}")]
    Registry { reference: String, message: String },
    #[error("{reference}: layer {digest}: {message}")]
    Layer {
        reference: String,
        digest: String,
        message: String,
    },
    #[error("{reference}: {message}")]
    Convert { reference: String, message: String },
    #[error("image store: {0}")]
    Store(String),
}

/// The canonical form of an image reference (`alpine` → `docker.io/library/alpine:latest`).
pub fn normalize(reference: &str) -> Result<String, PullError> {
    parse(reference).map(|r| r.whole())
}

fn parse(reference: &str) -> Result<Reference, PullError> {
    if reference.len() > 512 || reference.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(PullError::BadReference {
            reference: reference.chars().take(80).collect(),
            message: "too long or contains whitespace".into(),
        });
    }
    Reference::from_str(reference).map_err(|e| PullError::BadReference {
        reference: reference.to_string(),
        message: e.to_string(),
    })
}

/// The registry part of a reference, as written (`docker.io` for short names).
pub fn registry_of(reference: &str) -> Option<String> {
    parse(reference).ok().map(|r| r.registry().to_string())
}

fn classify(reference: &Reference, opts: &PullOptions, e: OciDistributionError) -> PullError {
    let r = reference.whole();
    let registry = reference.registry().to_string();
    let msg = e.to_string();
    match e {
        OciDistributionError::RequestError(ref re) if re.is_connect() || re.is_timeout() => PullError::Unreachable {
            registry,
            message: slicer_error::chain_string(re),
        },
        OciDistributionError::AuthenticationFailure(_) | OciDistributionError::UnauthorizedError { .. } => {
            PullError::Unauthorized {
                reference: r,
                registry,
                config: opts
                    .docker_config
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "~/.docker/config.json".into()),
                message: msg,
            }
        }
        OciDistributionError::DigestError(_) => PullError::Digest {
            reference: r,
            message: msg,
        },
        OciDistributionError::ImageManifestNotFoundError(_) => PullError::NotFound {
            reference: r,
            message: msg,
        },
        OciDistributionError::RegistryError { ref envelope, .. } => {
            let codes: Vec<_> = envelope.errors.iter().map(|e| &e.code).collect();
            let unauthorized = codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied));
            let missing = codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::ManifestBlobUnknown
                )
            });
            if unauthorized {
                classify(
                    reference,
                    opts,
                    OciDistributionError::AuthenticationFailure(envelope.to_string()),
                )
            } else if missing {
                PullError::NotFound {
                    reference: r,
                    message: envelope.to_string(),
                }
            } else {
                PullError::Registry {
                    reference: r,
                    message: msg,
                }
            }
        }
        OciDistributionError::ServerError { code: 404, .. } => PullError::NotFound {
            reference: r,
            message: msg,
        },
        OciDistributionError::ServerError { code, .. } if code == 401 || code == 403 => {
            classify(reference, opts, OciDistributionError::AuthenticationFailure(msg))
        }
        _ => PullError::Registry {
            reference: r,
            message: msg,
        },
    }
}

fn client(opts: &PullOptions) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(opts.insecure.clone()),
        connect_timeout: Some(opts.connect_timeout),
        read_timeout: Some(Duration::from_secs(60)),
        platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
        ..Default::default()
    })
}

/// Layer media types we can apply (OCI and Docker; the compression is also sniffed).
fn layer_type_ok(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd"
    )
}

/// An AsyncWrite that refuses more than `left` bytes (a registry may lie about a blob's size)
/// and reports progress.
struct Bounded<W> {
    inner: W,
    left: u64,
    bar: Option<indicatif::ProgressBar>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Bounded<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if buf.len() as u64 > self.left {
            return Poll::Ready(Err(std::io::Error::other(
                "the blob is larger than its descriptor says",
            )));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            let n = *n;
            self.left -= n as u64;
            if let Some(b) = &self.bar {
                b.inc(n as u64);
            }
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Pulls `reference` into the store (or finds it there) and returns the bootable image.
pub async fn pull(store: &ImageStore, reference: &str, opts: &PullOptions) -> Result<Image, PullError> {
    let r = parse(reference)?;
    let name = r.whole();
    let base = store.kernel_image().map_err(|e| PullError::Store(format!("{e:#}")))?;
    let agent_hash = file_sha256(&opts.agent).map_err(|e| PullError::Store(format!("the agent: {e:#}")))?;
    let creds =
        auth::lookup(opts.docker_config.as_deref(), r.resolve_registry()).map_err(|message| PullError::Registry {
            reference: name.clone(),
            message,
        })?;
    let client = client(opts);
    let (manifest, digest) = client
        .pull_image_manifest(&r, &creds)
        .await
        .map_err(|e| classify(&r, opts, e))?;
    let hex_digest = digest_hex(&name, &digest)?;
    let id = format!("{}-{}", &hex_digest[..32], &agent_hash[..16]);
    if let Ok(img) = store.get_stored(&id) {
        store
            .set_ref(&name, &id)
            .map_err(|e| PullError::Store(format!("{e:#}")))?;
        tracing::info!(reference = %name, %digest, "image already in the store");
        return Ok(store.complete(img, &name, &base));
    }
    check_layers(&name, &manifest.layers, opts)?;
    check_platform(&client, &r, &manifest.config, opts).await?;
    let scratch = store
        .scratch("pull")
        .map_err(|e| PullError::Store(format!("scratch directory: {e:#}")))?;
    let rootfs = scratch.path().join("rootfs");
    std::fs::create_dir(&rootfs).map_err(|e| PullError::Store(e.to_string()))?;
    let applier = layer::Applier::new(&rootfs, opts.budget.clone()).map_err(|e| PullError::Store(e.to_string()))?;
    let puller = Puller {
        client: &client,
        r: &r,
        opts,
        name: &name,
    };
    let (applier, started) = puller
        .fetch_layers(&manifest.layers, &digest, scratch.path(), applier)
        .await?;
    let variant = puller.convert(applier, scratch.path(), &digest).await?;
    let out = scratch.path().join("out");
    let img = Image {
        name: name.clone(),
        variant,
        kernel: base.kernel.clone(),
        vmlinux: base.vmlinux.clone(),
        rootfs: store.oci_dir(&id).join("rootfs.ext4"),
        kernel_release: base.kernel_release.clone(),
        key: key_of(&[digest.as_bytes(), agent_hash.as_bytes()]),
        reference: Some(name.clone()),
        digest: Some(digest.clone()),
    };
    std::fs::write(
        out.join("image.json"),
        serde_json::to_vec_pretty(&img).map_err(|e| PullError::Store(e.to_string()))?,
    )
    .map_err(|e| PullError::Store(e.to_string()))?;
    store
        .publish_stored(&id, &out)
        .and_then(|_| store.set_ref(&name, &id))
        .map_err(|e| PullError::Store(format!("{e:#}")))?;
    drop(scratch);
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(reference = %name, %digest, secs, "image pulled and converted");
    if opts.progress {
        eprintln!("==> {name} ({variant}) ready in {secs:.1} s, {digest}");
    }
    Ok(store.complete(img, &name, &base))
}

/// The hex of a `sha256:` manifest digest (the only kind accepted).
fn digest_hex(name: &str, digest: &str) -> Result<String, PullError> {
    Ok(digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| PullError::Registry {
            reference: name.to_string(),
            message: format!("unsupported manifest digest {digest:?}"),
        })?
        .to_string())
}

/// At most [`MAX_LAYERS`] layers, each of a supported type and within the byte budget.
fn check_layers(name: &str, layers: &[OciDescriptor], opts: &PullOptions) -> Result<(), PullError> {
    if layers.len() > MAX_LAYERS {
        return Err(PullError::Registry {
            reference: name.to_string(),
            message: format!("{} layers; at most {MAX_LAYERS} are accepted", layers.len()),
        });
    }
    for l in layers {
        if !layer_type_ok(&l.media_type) {
            return Err(PullError::Layer {
                reference: name.to_string(),
                digest: l.digest.clone(),
                message: format!("unsupported layer type {:?}", l.media_type),
            });
        }
        if l.size < 0 || l.size as u64 > opts.budget.bytes {
            return Err(PullError::Layer {
                reference: name.to_string(),
                digest: l.digest.clone(),
                message: format!("layer size {} is out of bounds", l.size),
            });
        }
    }
    Ok(())
}

/// One pull's registry, reference and options, for its download and conversion steps.
struct Puller<'a> {
    client: &'a Client,
    r: &'a Reference,
    opts: &'a PullOptions,
    name: &'a str,
}

impl Puller<'_> {
    /// Downloads each layer into `stage` and applies it (on a blocking thread), with progress;
    /// returns the applier and when the downloads began.
    async fn fetch_layers(
        &self,
        layers: &[OciDescriptor],
        digest: &str,
        stage: &Path,
        mut applier: layer::Applier,
    ) -> Result<(layer::Applier, std::time::Instant), PullError> {
        let (name, opts) = (self.name, self.opts);
        let multi = (opts.progress && std::io::stderr().is_terminal()).then(indicatif::MultiProgress::new);
        let total: i64 = layers.iter().map(|l| l.size).sum();
        if opts.progress && multi.is_none() {
            eprintln!("==> pulling {name} ({} layers, {} MiB)", layers.len(), total >> 20);
        }
        tracing::info!(reference = %name, %digest, layers = layers.len(), bytes = total, "pulling image");
        let started = std::time::Instant::now();
        for (i, l) in layers.iter().enumerate() {
            let bar = multi.as_ref().map(|m| layer_bar(m, l, i, layers.len()));
            applier = self.fetch_layer(l, i, layers.len(), stage, applier, bar).await?;
        }
        Ok((applier, started))
    }

    /// Downloads layer `i` of `n` into `stage` (bounded to its declared size), applies it and
    /// removes the blob.
    async fn fetch_layer(
        &self,
        l: &OciDescriptor,
        i: usize,
        n: usize,
        stage: &Path,
        mut applier: layer::Applier,
        bar: Option<indicatif::ProgressBar>,
    ) -> Result<layer::Applier, PullError> {
        let layer_err = |message: String| PullError::Layer {
            reference: self.name.to_string(),
            digest: l.digest.clone(),
            message,
        };
        let blob = stage.join(format!("layer-{i}"));
        let file = tokio::fs::File::create(&blob)
            .await
            .map_err(|e| PullError::Store(format!("{}: {e}", blob.display())))?;
        let mut out = Bounded {
            inner: file,
            left: l.size as u64,
            bar: bar.clone(),
        };
        self.client
            .pull_blob(self.r, l, &mut out)
            .await
            .map_err(|e| match classify(self.r, self.opts, e) {
                PullError::Registry { message, .. } => layer_err(message),
                other => other,
            })?;
        drop(out);
        if let Some(b) = &bar {
            b.finish();
        } else if self.opts.progress {
            eprintln!("    layer {}/{} {} ({} KiB)", i + 1, n, short(&l.digest), l.size >> 10);
        }
        let path = blob.clone();
        let (a, res) = tokio::task::spawn_blocking(move || {
            let res = apply_blob(&mut applier, &path);
            (applier, res)
        })
        .await
        .map_err(|e| layer_err(e.to_string()))?;
        res.map_err(|e| layer_err(e.to_string()))?;
        let _ = std::fs::remove_file(&blob);
        Ok(a)
    }

    /// Injects the agent and writes the ext4 image into `stage/out` (on a blocking thread).
    async fn convert(&self, applier: layer::Applier, stage: &Path, digest: &str) -> Result<Variant, PullError> {
        let agent = self.opts.agent.clone();
        let stage = stage.to_path_buf();
        let digest_for = digest.to_string();
        let budget = self.opts.budget.clone();
        tokio::task::spawn_blocking(move || -> Result<Variant, String> {
            let variant = inject(&applier, &agent, &digest_for).map_err(|e| format!("injecting the agent: {e}"))?;
            let bytes = budget.bytes - applier.budget.bytes;
            let entries = budget.entries - applier.budget.entries;
            write_ext4(&stage.join("rootfs"), &stage.join("out/rootfs.ext4"), bytes, entries)
                .map_err(|e| format!("writing the ext4 image: {e}"))?;
            Ok(variant)
        })
        .await
        .map_err(|e| PullError::Convert {
            reference: self.name.to_string(),
            message: e.to_string(),
        })?
        .map_err(|message| PullError::Convert {
            reference: self.name.to_string(),
            message,
        })
    }
}

/// A progress bar for layer `i` of `n`.
fn layer_bar(m: &indicatif::MultiProgress, l: &OciDescriptor, i: usize, n: usize) -> indicatif::ProgressBar {
    let b = m.add(indicatif::ProgressBar::new(l.size as u64));
    b.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b.set_prefix(format!("layer {}/{} {}", i + 1, n, short(&l.digest)));
    b
}

/// Reads the image's config (at most 1 MiB, digest checked): it must be a linux/amd64 image,
/// which is what our kernel runs.
async fn check_platform(
    client: &Client,
    r: &Reference,
    config: &OciDescriptor,
    opts: &PullOptions,
) -> Result<(), PullError> {
    let name = r.whole();
    if config.size < 0 || config.size > 1 << 20 {
        return Err(PullError::Registry {
            reference: name,
            message: format!("image config of {} bytes; at most 1 MiB is accepted", config.size),
        });
    }
    let mut out = Bounded {
        inner: std::io::Cursor::new(Vec::new()),
        left: config.size as u64,
        bar: None,
    };
    client
        .pull_blob(r, config, &mut out)
        .await
        .map_err(|e| classify(r, opts, e))?;
    #[derive(serde::Deserialize)]
    struct Platform {
        architecture: Option<String>,
        os: Option<String>,
    }
    let p: Platform = serde_json::from_slice(out.inner.get_ref()).map_err(|e| PullError::Registry {
        reference: name.clone(),
        message: format!("the image config is not JSON: {e}"),
    })?;
    match (p.os.as_deref(), p.architecture.as_deref()) {
        (Some("linux") | None, Some("amd64") | None) => Ok(()),
        (os, arch) => Err(PullError::Registry {
            reference: name,
            message: format!(
                "the image is for {}/{}; slicer's guests are linux/amd64",
                os.unwrap_or("?"),
                arch.unwrap_or("?")
            ),
        }),
    }
}

fn short(digest: &str) -> &str {
    let d = digest.strip_prefix("sha256:").unwrap_or(digest);
    &d[..d.len().min(12)]
}

/// Applies one downloaded blob, whatever its compression (gzip, zstd or none, by magic bytes).
fn apply_blob(applier: &mut layer::Applier, path: &Path) -> std::io::Result<layer::LayerStats> {
    let mut f = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut magic = [0u8; 4];
    let n = {
        use std::io::BufRead;
        let buf = f.fill_buf()?;
        let n = buf.len().min(4);
        magic[..n].copy_from_slice(&buf[..n]);
        n
    };
    if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        applier.apply(flate2::read::MultiGzDecoder::new(f))
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        let d = ruzstd::decoding::StreamingDecoder::new(f).map_err(std::io::Error::other)?;
        applier.apply(d)
    } else {
        applier.apply(f)
    }
}

/// Puts the agent (and, under systemd, its unit) into the tree; returns how it boots.
fn inject(a: &layer::Applier, agent: &Path, digest: &str) -> std::io::Result<Variant> {
    let bin = std::fs::read(agent)?;
    for (d, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("etc", 0o755),
        ("root", 0o700),
    ] {
        a.mkdir(d, mode)?;
    }
    a.write_file(AGENT_GUEST_PATH, &bin, 0o755)?;
    let systemd = ["lib/systemd/systemd", "usr/lib/systemd/systemd"]
        .into_iter()
        .find(|p| a.exists(p));
    let variant = if let Some(sd) = systemd {
        a.write_file(
            "etc/systemd/system/slicer-agent.service",
            crate::build::AGENT_UNIT.as_bytes(),
            0o644,
        )?;
        a.symlink(
            "etc/systemd/system/sysinit.target.wants/slicer-agent.service",
            "/etc/systemd/system/slicer-agent.service",
        )?;
        for unit in crate::build::MASKED_UNITS {
            a.symlink(&format!("etc/systemd/system/{unit}"), "/dev/null")?;
        }
        if !a.exists("sbin/init") {
            a.symlink("sbin/init", &format!("/{sd}"))?;
        }
        Variant::Systemd
    } else {
        Variant::Min
    };
    if !a.exists("etc/fstab") {
        a.write_file("etc/fstab", b"/dev/vda / ext4 rw,relatime 0 1\n", 0o644)?;
    }
    let meta = serde_json::json!({"variant": variant, "digest": digest});
    a.write_file("etc/slicer/image.json", meta.to_string().as_bytes(), 0o644)?;
    Ok(variant)
}

/// `mkfs.ext4 -d`: sized to the content plus headroom (at least 2 GiB, as ours; a VM's disk can be
/// larger, and images with resize2fs grow into it), with inodes for every file.
fn write_ext4(tree: &Path, out: &Path, bytes: u64, entries: u64) -> std::io::Result<()> {
    let size = (bytes + bytes / 2 + entries * 4096 + (256 << 20)).max(2 << 30);
    let size_mib = size.div_ceil(1 << 20);
    let inodes = (entries * 2).max(65536);
    if let Some(p) = out.parent() {
        std::fs::create_dir_all(p)?;
    }
    let res = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "slicer-root", "-N"])
        .arg(inodes.to_string())
        .arg("-d")
        .arg(tree)
        .arg(out)
        .arg(format!("{size_mib}M"))
        .output()?;
    if !res.status.success() {
        return Err(std::io::Error::other(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&res.stderr).trim()
        )));
    }
    Ok(())
}
