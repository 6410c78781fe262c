//! What the manager counts: VM starts, API requests, and the metrics text with the running
//! VMs, capacity and templates counted now.

use super::*;

impl Manager {
    /// Counts a VM start (`None`: it failed).
    pub(super) fn count_launch(&self, group: &str, mode: Option<slicer_vmm::StartMode>) {
        match mode {
            Some(m) => {
                self.metrics
                    .launches
                    .get_or_create(&crate::metrics::LaunchLabels {
                        group: group.to_string(),
                        mode: m.as_str().to_string(),
                    })
                    .inc();
            }
            None => {
                self.metrics
                    .launch_failures
                    .get_or_create(&crate::metrics::GroupLabels {
                        group: group.to_string(),
                    })
                    .inc();
            }
        }
    }

    /// The `/metrics` text, with the running VMs of each group counted now.
    pub fn metrics_text(&self) -> String {
        let running: Vec<(String, bool)> = self
            .vms()
            .values()
            .map(|r| (r.group.clone(), r.vm.is_running()))
            .collect();
        for g in &self.settings.groups {
            let n = running.iter().filter(|(group, up)| *up && group == &g.name).count();
            self.metrics
                .running
                .get_or_create(&crate::metrics::GroupLabels { group: g.name.clone() })
                .set(n as i64);
        }
        let templates = self.template_memory();
        let (held, budget) = self.capacity();
        self.metrics.set_capacity(&held, &budget);
        self.metrics.set_templates(&templates, self.template_shape_count());
        self.metrics.encode()
    }

    /// Counts and times one API request by its route template.
    pub fn count_request(&self, method: String, route: String, status: u16, seconds: f64) {
        self.metrics
            .request_seconds
            .get_or_create(&crate::metrics::RouteLabels {
                method: method.clone(),
                route: route.clone(),
            })
            .observe(seconds);
        self.metrics
            .requests
            .get_or_create(&crate::metrics::RequestLabels { method, route, status })
            .inc();
    }
}
