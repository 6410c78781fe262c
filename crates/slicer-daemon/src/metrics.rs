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
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("slicer");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("http_requests", "API requests answered", requests.clone());
        let request_seconds = Histograms::<RouteLabels>::new_with_constructor(request_buckets as fn() -> Histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an API request (streamed answers: until the headers)",
            request_seconds.clone(),
        );
        let launches = Family::<LaunchLabels, Counter>::default();
        registry.register("vm_launches", "VMs started, by how they started", launches.clone());
        let launch_failures = Family::<GroupLabels, Counter>::default();
        registry.register("vm_launch_failures", "VM starts that failed", launch_failures.clone());
        let ready_seconds = Histograms::<ModeLabels>::new_with_constructor(start_buckets as fn() -> Histogram);
        registry.register(
            "vm_ready_duration_seconds",
            "From starting QEMU to the agent's first answer",
            ready_seconds.clone(),
        );
        let running = Family::<GroupLabels, Gauge>::default();
        registry.register("vms_running", "VMs whose QEMU runs", running.clone());
        Metrics {
            registry,
            requests,
            request_seconds,
            launches,
            launch_failures,
            ready_seconds,
            running,
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
    }
}
