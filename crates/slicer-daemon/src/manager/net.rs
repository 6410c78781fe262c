//! VM networking as the manager uses it: each host group's address plan (`GroupNet`), a VM's
//! address, its host-side objects (namespace, bridge, TAP, nftables table: `NetHandle`) and the
//! policy in force for it.

use super::*;

/// What a VM's network consists of on the host, to undo when it stops.
pub enum NetHandle {
    Isolated(slicer_net::Isolated),
    /// A TAP on the group's bridge and the MAC and address pinned to it.
    Tap(slicer_net::Port),
}

/// Where a host group's VMs get their addresses.
#[derive(Debug, Clone)]
pub enum GroupNet {
    /// One /30 per VM from this range.
    Isolated(slicer_net::Net),
    Bridge(slicer_net::Bridge),
}

impl NetHandle {
    pub(super) async fn teardown(&self) {
        match self {
            NetHandle::Isolated(i) => i.teardown().await,
            NetHandle::Tap(p) => p.remove().await,
        }
    }
}

/// A VM's address (its record keeps it with its prefix; empty: it has none).
pub fn address(rec: &VmRecord) -> Option<std::net::Ipv4Addr> {
    rec.ip.split('/').next()?.parse().ok()
}

impl Manager {
    /// The network plan of a group.
    pub fn group_net(&self, group: &str) -> Option<&GroupNet> {
        self.nets.get(group)
    }

    /// Picks the VM's address (the lowest free one of its group) and records the VM.
    pub(super) async fn allocate_and_record(&self, rec: &mut VmRecord, fixed: Option<u32>) -> Result<(), Error> {
        let _guard = self.alloc.lock().await;
        // Again under the lock: two creates may have asked for the same name at once.
        if let Some(name) = vm_name(&rec.tags) {
            self.check_name(name, None)?;
        }
        let taken: Vec<std::net::Ipv4Addr> = self
            .db
            .list()
            .map_err(Error::host)?
            .iter()
            .filter(|r| r.host_group == rec.host_group)
            .filter_map(address)
            .collect();
        rec.ip = match self.nets.get(&rec.host_group) {
            Some(GroupNet::Isolated(range)) => {
                // The /30s in order, none inside 169.254.169.0/24 (the metadata address's).
                let subnet = slicer_net::vm_subnets(*range)
                    .find(|n| !taken.contains(&n.nth(2)))
                    .ok_or_else(|| {
                        Error::host_msg(format!("no free /30 left in {range} for host group {}", rec.host_group))
                    })?;
                format!("{}/30", subnet.nth(2))
            }
            Some(GroupNet::Bridge(b)) => {
                let n = (1..(b.subnet.size() as u32 - 1))
                    .map(|i| b.subnet.nth(i))
                    .find(|a| *a != b.gateway && *a != slicer_net::METADATA_V4 && !taken.contains(a))
                    .ok_or_else(|| {
                        Error::host_msg(format!(
                            "no free address left in {} for host group {}",
                            b.subnet, rec.host_group
                        ))
                    })?;
                format!("{n}/{}", b.subnet.prefix)
            }
            None => String::new(),
        };
        self.db.create(rec, fixed).map_err(Error::host)
    }

    /// Host-side network objects for a VM, and the spec's NIC.
    pub(super) async fn setup_net(&self, rec: &VmRecord) -> Result<Option<(NetHandle, slicer_vmm::VmNet)>, Error> {
        let Some(ip) = address(rec) else {
            return Ok(None);
        };
        let mac = slicer_net::mac_for(&rec.hostname);
        match self.nets.get(&rec.host_group) {
            Some(GroupNet::Isolated(_)) => {
                let subnet = slicer_net::Net { addr: ip, prefix: 30 }.normalized();
                let (allow, drop) = self.effective_policy(rec);
                let iso = slicer_net::Isolated::new(&rec.hostname, subnet, allow, drop);
                iso.setup().await.map_err(Error::host)?;
                let net = slicer_vmm::VmNet {
                    netns: Some(iso.netns.clone()),
                    tap: iso.tap.clone(),
                    mac,
                    address: iso.guest_ip(),
                    prefix: 30,
                    gateway: iso.gateway(),
                };
                Ok(Some((NetHandle::Isolated(iso), net)))
            }
            Some(GroupNet::Bridge(b)) => {
                let g = self.group(&rec.host_group)?;
                let offset = u32::from(ip) - u32::from(b.subnet.addr);
                let tap = format!("{}{offset}", g.tap_prefix);
                if tap.len() > slicer_net::IFNAMSIZ_MAX {
                    return Err(Error::host_msg(format!("TAP name {tap} is longer than 15 characters")));
                }
                // The MAC pinned is the one the guest is given: on QEMU's NIC for a cold boot,
                // set by the agent's identity call after a restore.
                let port = b.port(&tap, &mac, ip).map_err(Error::host)?;
                b.add_port(&port).await.map_err(Error::host)?;
                let net = slicer_vmm::VmNet {
                    netns: None,
                    tap,
                    mac,
                    address: ip,
                    prefix: b.subnet.prefix,
                    gateway: b.gateway,
                };
                Ok(Some((NetHandle::Tap(port), net)))
            }
            None => Ok(None),
        }
    }

    /// The allow and drop lists in force for a VM: its overrides, else its group's.
    pub fn effective_policy(&self, rec: &VmRecord) -> (Vec<String>, Vec<String>) {
        let g = self.settings.groups.iter().find(|g| g.name == rec.host_group);
        let allow = rec
            .net_allow
            .clone()
            .unwrap_or_else(|| g.map(|g| g.allow.clone()).unwrap_or_default());
        let drop = rec
            .net_drop
            .clone()
            .unwrap_or_else(|| g.map(|g| g.drop.clone()).unwrap_or_default());
        (allow, drop)
    }

    /// Network objects and cgroups for the daemon as a whole: leftovers of earlier runs go
    /// (only those named after this daemon's groups' VMs), group bridges come.
    pub async fn setup_networks(&self) -> Result<(), Error> {
        let taps: Vec<String> = self
            .settings
            .groups
            .iter()
            .filter(|g| g.network_mode == NetworkMode::Bridge)
            .map(|g| g.tap_prefix.clone())
            .collect();
        let groups: Vec<String> = self.settings.groups.iter().map(|g| g.name.clone()).collect();
        // What adopted VMs use stays.
        let keep: Vec<String> = self
            .vms()
            .values()
            .filter_map(|r| r.net.as_ref())
            .flat_map(|n| match n {
                NetHandle::Isolated(i) => vec![i.netns.clone(), i.table.clone()],
                NetHandle::Tap(p) => vec![p.tap.clone()],
            })
            .collect();
        // Their ports stay pinned when the bridge tables are made again.
        let ports: Vec<slicer_net::Port> = self
            .vms()
            .values()
            .filter_map(|r| match r.net.as_ref() {
                Some(NetHandle::Tap(p)) => Some(p.clone()),
                _ => None,
            })
            .collect();
        slicer_net::remove_leftovers(&groups, &taps, &keep).await;
        if let Some(j) = &self.host.jail {
            let running: Vec<String> = self.vms().keys().cloned().collect();
            j.remove_leftover_cgroups(|name| {
                !running.iter().any(|r| r == name)
                    && groups.iter().any(|g| {
                        name.strip_prefix(g.as_str())
                            .and_then(|n| n.strip_prefix('-'))
                            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                    })
            });
        }
        for n in self.nets.values() {
            if let GroupNet::Bridge(b) = n {
                let mine: Vec<slicer_net::Port> = ports.iter().filter(|p| p.table == b.table).cloned().collect();
                b.setup(&mine).await.map_err(Error::host)?;
            }
        }
        Ok(())
    }

    pub(super) async fn teardown_networks(&self) {
        for n in self.nets.values() {
            if let GroupNet::Bridge(b) = n {
                b.teardown().await;
            }
        }
    }

    /// The host-side network objects a VM has (for an adopted VM: they already exist).
    pub(super) fn net_handle(&self, rec: &VmRecord) -> Option<NetHandle> {
        let ip = address(rec)?;
        match self.nets.get(&rec.host_group)? {
            GroupNet::Isolated(_) => {
                let (allow, drop) = self.effective_policy(rec);
                let subnet = slicer_net::Net { addr: ip, prefix: 30 }.normalized();
                Some(NetHandle::Isolated(slicer_net::Isolated::new(
                    &rec.hostname,
                    subnet,
                    allow,
                    drop,
                )))
            }
            GroupNet::Bridge(b) => {
                let g = self.group(&rec.host_group).ok()?;
                let tap = format!("{}{}", g.tap_prefix, u32::from(ip) - u32::from(b.subnet.addr));
                b.port(&tap, &slicer_net::mac_for(&rec.hostname), ip)
                    .ok()
                    .map(NetHandle::Tap)
            }
        }
    }

    /// A per-VM network override: only in isolated groups, every entry parsed.
    pub(super) fn check_override(&self, g: &Group, n: &slicer_api::NetworkOverride) -> Result<(), Error> {
        if g.network_mode != NetworkMode::Isolated {
            return Err(Error::invalid(format!(
                "network: per-VM allow/drop lists need an isolated host group; {} is in {} mode",
                g.name, g.network_mode
            )));
        }
        for (field, list) in [("allow", &n.allow), ("drop", &n.drop)] {
            if list.as_ref().is_some_and(|l| l.len() > 256) {
                return Err(Error::invalid(format!("network.{field}: at most 256 entries")));
            }
            for e in list.iter().flatten() {
                if slicer_net::policy::parse_entry(e).is_none() {
                    return Err(Error::invalid(format!(
                        "network.{field}: {e:?} is not a CIDR, an address or address:port"
                    )));
                }
            }
        }
        Ok(())
    }
}
