//! The sandbox tools: create one (in the group its arguments pick), list them, delete one.

use serde_json::{json, Value};
use slicer_api::{CreateNodeRequest, NodeFilter};

use crate::args::{CreateArgs, ListArgs, SandboxArg, Wait};
use crate::{Fail, Sandboxes};

impl Sandboxes {
    /// The host group `sandbox` is in.
    async fn group_of(&self, sandbox: &str) -> Result<String, Fail> {
        Ok(self.api.describe_vm(sandbox).await?.node.hostgroup)
    }

    /// The group a create goes to: the one given, else the one `image` picks, else the only one.
    async fn pick_group(&self, group: Option<&str>, image: Option<&str>) -> Result<String, Fail> {
        let groups = self.api.hostgroups().await?;
        let names = || groups.iter().map(|g| g.name.as_str()).collect::<Vec<_>>().join(", ");
        match (group, image) {
            (Some(g), image) => {
                let info = groups
                    .iter()
                    .find(|x| x.name == g)
                    .ok_or_else(|| Fail(format!("no host group {g:?}; the groups are: {}", names())))?;
                if let Some(i) = image.filter(|i| *i != info.image) {
                    return Err(Fail(format!(
                        "host group {g:?} runs image {:?}, not {i:?}; give another group or leave out image",
                        info.image
                    )));
                }
                Ok(g.to_string())
            }
            (None, Some(i)) => groups
                .iter()
                .find(|x| x.image == i)
                .map(|x| x.name.clone())
                .ok_or_else(|| Fail(format!("no host group runs image {i:?}; the groups are: {}", names()))),
            (None, None) => match groups.as_slice() {
                [one] => Ok(one.name.clone()),
                [] => Err("the daemon has no host groups".into()),
                _ => Err(Fail(format!("give group: the daemon has several ({})", names()))),
            },
        }
    }

    pub(crate) async fn create(&self, a: CreateArgs) -> Result<Value, Fail> {
        let group = self.pick_group(a.group.as_deref(), a.image.as_deref()).await?;
        let body = CreateNodeRequest {
            ram_bytes: a.ram_mb.map(|m| m << 20),
            cpus: a.cpus,
            tags: a.tags,
            userdata: a.userdata,
            ..Default::default()
        };
        let wait = match a.wait.unwrap_or(Wait::Agent) {
            Wait::Agent => "agent",
            Wait::Userdata => "userdata",
            Wait::None => "",
        };
        let r = self.api.create_node(&group, &body, &[("wait", wait.into())]).await?;
        Ok(json!({
            "sandbox": r.hostname,
            "group": r.hostgroup,
            "ip": r.ip,
            "created_at": r.created_at,
        }))
    }

    pub(crate) async fn list(&self, a: ListArgs) -> Result<Value, Fail> {
        let filter = NodeFilter {
            tag: a.tag,
            tag_prefix: a.tag_prefix,
        };
        let nodes = match &a.group {
            Some(g) => self.api.group_nodes(g, &filter).await?,
            None => self.api.list_nodes(&filter).await?,
        };
        Ok(json!({ "sandboxes": nodes }))
    }

    pub(crate) async fn delete(&self, a: SandboxArg) -> Result<Value, Fail> {
        let group = self.group_of(&a.sandbox).await?;
        let r = self.api.delete_node(&group, &a.sandbox).await?;
        Ok(json!({ "sandbox": a.sandbox, "deleted": true, "message": r.message }))
    }
}
