//! Warm starts: the template shapes of warm-starting groups, and a new VM restored from its
//! template (or booted cold when that fails).

use super::*;

impl Manager {
    /// Whether new VMs of `group` start from a template.
    pub(super) fn warm(&self, group: &str) -> bool {
        self.group(group).is_ok_and(|g| g.warm_start)
    }

    /// The template shapes the warm host groups ask for, that is those with a template
    /// slot (see [`Manager::admit_shape`]).
    pub fn template_shapes(&self) -> Vec<Shape> {
        let admitted = self.template_shapes.lock().unwrap_or_else(|p| p.into_inner());
        self.configured_shapes()
            .into_iter()
            .filter(|s| admitted.contains(s))
            .collect()
    }

    /// The shapes of the host groups that start warm (their default vCPUs and RAM).
    pub(super) fn configured_shapes(&self) -> Vec<Shape> {
        let mut shapes: Vec<Shape> = Vec::new();
        for g in self.settings.groups.iter().filter(|g| g.warm_start) {
            let s = Shape {
                image: g.image.clone(),
                cpus: g.cpus,
                memory_mib: (g.ram_bytes >> 20) as u32,
                nic: self.nets.contains_key(&g.name),
            };
            if !shapes.contains(&s) {
                shapes.push(s);
            }
        }
        shapes
    }

    /// Builds (or loads) the templates of warm-starting groups, so the first creates find them.
    pub async fn prepare_templates(&self) {
        for shape in self.template_shapes() {
            if let Err(e) = self.backend.template(&shape).await {
                tracing::warn!(
                    "no template for {shape:?}; VMs of that shape boot cold: {:#}",
                    GuestText(&e)
                );
            }
        }
    }

    /// Whether `shape` gets a template: it has one of the `config.capacity.template_shapes`
    /// slots already, or takes a free one now. Slots are kept for the daemon's life.
    pub(super) fn admit_shape(&self, shape: &Shape) -> bool {
        let mut admitted = self.template_shapes.lock().unwrap_or_else(|p| p.into_inner());
        if admitted.contains(shape) {
            return true;
        }
        if admitted.len() >= self.settings.templates.shapes as usize {
            return false;
        }
        admitted.push(shape.clone());
        true
    }

    /// Room in the capacity budget for `template`'s memory, when a restore would load it:
    /// unused loaded memory goes first if needed. `false`: its memory does not fit.
    fn room_for_template_memory(&self, template: &slicer_vmm::Template) -> bool {
        let need = template.memory_bytes();
        let memory = &self.host.template_memory;
        if need == 0 || memory.contains(&template.dir) {
            return true;
        }
        let short = self.ram_short_by(need);
        !(short > 0 && memory.evict_unused(short) < short)
    }

    /// A new VM from its group's template, ready (agent answering, identity applied). `None`
    /// (with the reason logged) when that is not possible: the caller boots it cold.
    pub(super) async fn start_warm(&self, spec: &VmSpec) -> Option<Box<dyn Machine>> {
        let shape = Shape::of(spec);
        if !self.admit_shape(&shape) {
            self.metrics.template_shapes_refused.inc();
            tracing::warn!(
                "VM {}: booting cold: {shape:?} gets no template, {} shapes have one already (config.capacity.template_shapes)",
                spec.name,
                self.settings.templates.shapes
            );
            return None;
        }
        let template = match self.backend.template(&shape).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("VM {}: booting cold, no template: {:#}", spec.name, GuestText(&e));
                return None;
            }
        };

        match self.restore_ready(spec, &template).await {
            Ok(vm) => Some(vm),
            Err(e) => {
                tracing::warn!("VM {}: booting cold, restore failed: {:#}", spec.name, GuestText(&e));
                None
            }
        }
    }

    /// A VM restored from `template` (a group's template, or a live commit's capture) and
    /// ready; on failure nothing of it is left.
    pub(super) async fn restore_ready(
        &self,
        spec: &VmSpec,
        template: &slicer_vmm::Template,
    ) -> Result<Box<dyn Machine>, Error> {
        // Refused, a new VM boots cold; a live fork, which has no cold boot to fall back to,
        // fails.
        if !self.room_for_template_memory(template) {
            return Err(Error::host_msg(format!(
                "host capacity: template {}: its memory ({}) does not fit the capacity budget",
                template.id,
                crate::config::human_bytes(template.memory_bytes())
            )));
        }
        let vm = self.backend.restore(spec, template).await.map_err(Error::host)?;
        if let Err(e) = vm.wait_ready(RESTORE_TIMEOUT).await {
            vm.discard().await;
            return Err(Error::host(e));
        }
        Ok(vm)
    }
}

impl Manager {
    /// The template of `shape`, built now when the image store has none.
    pub async fn template(&self, shape: &Shape) -> Result<Arc<slicer_vmm::Template>, Error> {
        self.backend.template(shape).await.map_err(Error::host)
    }
}
