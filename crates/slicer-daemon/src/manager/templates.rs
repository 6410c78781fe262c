//! Warm starts: the template shapes of warm-starting groups, and a new VM restored from its
//! template (or booted cold when that fails).

use super::*;

impl Manager {
    /// Whether new VMs of `group` start from a template.
    pub(super) fn warm(&self, group: &str) -> bool {
        self.group(group).is_ok_and(|g| g.warm_start)
    }

    /// The template shapes of the host groups that start warm.
    pub fn template_shapes(&self) -> Vec<Shape> {
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

    /// A new VM from its group's template, ready (agent answering, identity applied). `None`
    /// (with the reason logged) when that is not possible: the caller boots it cold.
    pub(super) async fn start_warm(&self, spec: &VmSpec) -> Option<Box<dyn Machine>> {
        let shape = Shape::of(spec);
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
    ) -> anyhow::Result<Box<dyn Machine>> {
        let vm = self.backend.restore(spec, template).await?;
        if let Err(e) = vm.wait_ready(RESTORE_TIMEOUT).await {
            vm.discard().await;
            return Err(e);
        }
        Ok(vm)
    }
}

impl Manager {
    /// The template of `shape`, built now when the image store has none.
    pub async fn template(&self, shape: &Shape) -> anyhow::Result<Arc<slicer_vmm::Template>> {
        self.backend.template(shape).await
    }
}
