//! `GET /metrics`: Prometheus text exposition of the daemon's counters (prometheus-client).
//! Labels are bounded: routes are the router's templates (`/vm/{hostname}/exec`), never the
//! request's path, and groups come from the config.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaunchLabels {
    pub group: String,
    /// `cold`, `template` or `resume`.
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    pub mode: String,
}

/// `reserved` (by running and starting VMs) or `budget` (`config.capacity`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

impl KindLabels {
    pub fn reserved() -> KindLabels {
        KindLabels {
            kind: "reserved".into(),
        }
    }
    pub fn budget() -> KindLabels {
        KindLabels { kind: "budget".into() }
    }
}

/// A proxy decision: the proxy's host group and `allow` or `deny`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyDecisionLabels {
    pub group: String,
    pub decision: String,
}

/// Bytes a proxy carried: `up` (client to upstream) or `down`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyBytesLabels {
    pub group: String,
    pub direction: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn request_buckets() -> Histogram {
    // 1 ms … ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn start_buckets() -> Histogram {
    // 25 ms … ~200 s
    Histogram::new(exponential_buckets(0.025, 2.0, 14))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Histograms<RouteLabels>,
    pub launches: Family<LaunchLabels, Counter>,
    pub launch_failures: Family<GroupLabels, Counter>,
    pub ready_seconds: Histograms<ModeLabels>,
    pub running: Family<GroupLabels, Gauge>,
    pub capacity_ram: Family<KindLabels, Gauge>,
    pub capacity_vcpus: Family<KindLabels, Gauge>,
    pub capacity_vms: Family<KindLabels, Gauge>,
    pub template_memory: Family<KindLabels, Gauge>,
    pub template_shapes: Family<KindLabels, Gauge>,
    pub template_shapes_refused: Counter,
    pub proxy_decisions: Family<ProxyDecisionLabels, Counter>,
    pub proxy_bytes: Family<ProxyBytesLabels, Gauge>,
    pub proxy_open_connections: Family<GroupLabels, Gauge>,
    pub proxy_connected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Registers `metric` in `registry` and answers it (a handle to the same metric).
fn reg<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    /// Every family, registered under `slicer_` in the order `/metrics` shows them.
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("slicer");
        let r = &mut r;
        let requests = reg(r, "http_requests", "API requests answered", Family::default());
        let request_seconds = reg(
            r,
            "http_request_duration_seconds",
            "Time to answer an API request (streamed answers: until the headers)",
            Histograms::<RouteLabels>::new_with_constructor(request_buckets as fn() -> Histogram),
        );
        let launches = reg(r, "vm_launches", "VMs started, by how they started", Family::default());
        let launch_failures = reg(r, "vm_launch_failures", "VM starts that failed", Family::default());
        let ready_seconds = reg(
            r,
            "vm_ready_duration_seconds",
            "From starting QEMU to the agent's first answer",
            Histograms::<ModeLabels>::new_with_constructor(start_buckets as fn() -> Histogram),
        );
        let running = reg(r, "vms_running", "VMs whose QEMU runs", Family::default());
        let capacity_ram = reg(
            r,
            "capacity_ram_bytes",
            "Host memory reserved by running and starting VMs (RAM plus QEMU overhead), and the budget",
            Family::default(),
        );
        let capacity_vcpus = reg(
            r,
            "capacity_vcpus",
            "vCPUs reserved by running and starting VMs, and the budget",
            Family::default(),
        );
        let capacity_vms = reg(
            r,
            "capacity_vms",
            "VMs running or starting, and the budget",
            Family::default(),
        );
        let template_memory = reg(
            r,
            "template_memory_bytes",
            "Template and live-commit memory: loaded (kept for restores), pinned (loaded or mapped by running clones; counted in the RAM budget), limit (on loaded)",
            Family::default(),
        );
        let template_shapes = reg(
            r,
            "template_shapes",
            "Distinct VM shapes with a template (used), and the bound (limit)",
            Family::default(),
        );
        let template_shapes_refused = reg(
            r,
            "template_shapes_refused",
            "VMs booted cold because their shape found no free template slot",
            Counter::default(),
        );
        let mut m = Metrics {
            registry: Registry::default(),
            requests,
            request_seconds,
            launches,
            launch_failures,
            ready_seconds,
            running,
            capacity_ram,
            capacity_vcpus,
            capacity_vms,
            template_memory,
            template_shapes,
            template_shapes_refused,
            proxy_decisions: Family::default(),
            proxy_bytes: Family::default(),
            proxy_open_connections: Family::default(),
            proxy_connected: Gauge::default(),
        };
        m.register_proxy(r);
        m.registry = std::mem::take(r);
        m
    }

    /// Registers the proxy families (the control plane updates them).
    fn register_proxy(&mut self, r: &mut Registry) {
        reg(
            r,
            "proxy_decisions",
            "Slicer Proxy decisions reported to the daemon, by host group and allow or deny",
            self.proxy_decisions.clone(),
        );
        reg(
            r,
            "proxy_bytes",
            "Bytes a proxy carried since it started (up: towards upstreams), as it last reported",
            self.proxy_bytes.clone(),
        );
        reg(
            r,
            "proxy_open_connections",
            "Client connections a proxy holds open, as it last reported",
            self.proxy_open_connections.clone(),
        );
        reg(
            r,
            "proxies_connected",
            "Proxies connected to the daemon's control channel",
            self.proxy_connected.clone(),
        );
    }

    /// Sets the template gauges.
    pub fn set_templates(&self, memory: &slicer_vmm::MemoryUse, shapes: (usize, u32)) {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let kind = |k: &str| KindLabels { kind: k.into() };
        for (k, v) in [
            ("loaded", memory.loaded_bytes),
            ("pinned", memory.pinned_bytes),
            ("limit", memory.limit_bytes),
        ] {
            self.template_memory.get_or_create(&kind(k)).set(clamp(v));
        }
        self.template_shapes.get_or_create(&kind("used")).set(shapes.0 as i64);
        self.template_shapes
            .get_or_create(&kind("limit"))
            .set(i64::from(shapes.1));
    }

    /// Sets the capacity gauges: what is reserved now and the budget.
    pub fn set_capacity(&self, reserved: &crate::config::Capacity, budget: &crate::config::Capacity) {
        let gauges = [
            (&self.capacity_ram, reserved.ram_bytes, budget.ram_bytes),
            (&self.capacity_vcpus, u64::from(reserved.vcpus), u64::from(budget.vcpus)),
            (&self.capacity_vms, u64::from(reserved.vms), u64::from(budget.vms)),
        ];
        for (family, r, b) in gauges {
            let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            family.get_or_create(&KindLabels::reserved()).set(clamp(r));
            family.get_or_create(&KindLabels::budget()).set(clamp(b));
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_families() {
        let m = Metrics::new();
        m.launches
            .get_or_create(&LaunchLabels {
                group: "g".into(),
                mode: "template".into(),
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains("slicer_vm_launches_total{group=\"g\",mode=\"template\"} 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE slicer_vm_launches counter"), "{text}");
        let cap = |ram_bytes, vms, vcpus| crate::config::Capacity { ram_bytes, vms, vcpus };
        m.set_capacity(&cap(3 << 30, 2, 4), &cap(20 << 30, 256, 32));
        let text = m.encode();
        for line in [
            "slicer_capacity_ram_bytes{kind=\"reserved\"} 3221225472",
            "slicer_capacity_ram_bytes{kind=\"budget\"} 21474836480",
            "slicer_capacity_vcpus{kind=\"reserved\"} 4",
            "slicer_capacity_vms{kind=\"budget\"} 256",
        ] {
            assert!(text.contains(line), "{line} missing in {text}");
        }
    }
}
