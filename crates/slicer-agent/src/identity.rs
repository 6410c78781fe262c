//! `POST /v1/identity`: makes a guest restored from a template snapshot its own VM. Every copy
//! of a template starts with the template's memory: its hostname, machine-id, RNG state, clock
//! and (no) address. The host sends this VM's values; all are applied with syscalls and ioctls,
//! no processes, so the fix-up costs milliseconds even under TCG.

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use slicer_agent_proto::{Identity, NetIdentity};

use crate::server::{json, json_body, ApiError, Body, State};

/// Present once an identity was applied since boot (/run is a tmpfs).
pub const APPLIED: &str = "/run/slicer/identity-applied";

pub async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Body>, ApiError> {
    let id: Identity = json_body(req, 64 * 1024, "identity").await?;
    validate(&id)?;
    if !id.rng_seed.is_empty() {
        reseed(&id.rng_seed).map_err(|e| ApiError::io("seeding the RNG", &e))?;
    }
    if let Some(ns) = id.time_unix_ns {
        let ts = nix::sys::time::TimeSpec::new((ns / 1_000_000_000) as i64, (ns % 1_000_000_000) as i64);
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
            .map_err(|e| ApiError::io("setting the clock", &e.into()))?;
    }
    if let Some(h) = &id.hostname {
        set_hostname(h).map_err(|e| ApiError::io("setting the hostname", &e))?;
    }
    if let Some(m) = &id.machine_id {
        write_in_place("/etc/machine-id", format!("{m}\n").as_bytes())
            .map_err(|e| ApiError::io("writing /etc/machine-id", &e))?;
    }
    if let Some(dns) = &id.dns {
        set_dns(dns).map_err(|e| ApiError::io("writing /etc/resolv.conf", &e))?;
    }
    if let Some(n) = &id.net {
        configure_eth0(n).map_err(|e| ApiError::io("configuring eth0", &e))?;
    }
    // An agent restarted later (under systemd) must not put the template's command-line
    // identity back.
    if let Err(e) = std::fs::create_dir_all("/run/slicer").and_then(|()| std::fs::write(APPLIED, b"")) {
        return Err(ApiError::io(&format!("writing {APPLIED}"), &e));
    }
    if let Some(bytes) = id.disk_bytes {
        // The host resized the disk just before this call; the kernel learns of it from a
        // config interrupt, so wait (briefly) until it shows, then grow in the background.
        let deadline = Instant::now() + Duration::from_secs(2);
        while disk_bytes() < bytes && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::spawn(crate::init::grow_root(state.reaper.clone()));
    }
    // The console (`vm logs`) shows that this VM was restored and who it became.
    eprintln!(
        "slicer-agent {}: identity applied ({})",
        slicer_agent_proto::VERSION,
        id.hostname.as_deref().unwrap_or("hostname unchanged")
    );
    Ok(json(StatusCode::OK, &id))
}

fn validate(id: &Identity) -> Result<(), ApiError> {
    if let Some(h) = &id.hostname {
        let ok = !h.is_empty()
            && h.len() <= 63
            && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !h.starts_with('-');
        if !ok {
            return Err(ApiError::bad_request(format!("invalid hostname {h:?}")));
        }
    }
    if let Some(m) = &id.machine_id {
        if !slicer_agent_proto::valid_machine_id(m) {
            return Err(ApiError::bad_request(format!(
                "invalid machine id {m:?}: need 32 lowercase hex digits"
            )));
        }
    }
    if let Some(n) = &id.net {
        parse_mac(&n.mac).ok_or_else(|| ApiError::bad_request(format!("invalid MAC {:?}", n.mac)))?;
        if n.prefix == 0 || n.prefix > 32 {
            return Err(ApiError::bad_request(format!("invalid prefix /{}", n.prefix)));
        }
    }
    if id.rng_seed.len() > 4096 {
        return Err(ApiError::bad_request("rng_seed is longer than 4096 bytes"));
    }
    Ok(())
}

pub fn set_hostname(h: &str) -> std::io::Result<()> {
    nix::unistd::sethostname(h)?;
    write_in_place("/etc/hostname", format!("{h}\n").as_bytes())?;
    // The name resolves locally (sudo and many tools look it up), as Debian's installer sets it.
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    std::fs::write("/etc/hosts", hosts_with(&hosts, h))
}

/// `hosts` with its `127.0.1.1` line naming `h` (lines for other addresses kept).
fn hosts_with(hosts: &str, h: &str) -> String {
    let mut out: String = hosts
        .lines()
        .filter(|l| !l.trim_start().starts_with("127.0.1.1"))
        .map(|l| format!("{l}\n"))
        .collect();
    if !hosts.lines().any(|l| l.trim_start().starts_with("127.0.0.1")) {
        out.insert_str(0, "127.0.0.1\tlocalhost\n");
    }
    out.push_str(&format!("127.0.1.1\t{h}\n"));
    out
}

pub fn set_dns(servers: &[String]) -> std::io::Result<()> {
    let conf: String = servers.iter().map(|s| format!("nameserver {s}\n")).collect();
    // Images often ship resolv.conf as a symlink into /run; replace it with a file.
    let _ = std::fs::remove_file("/etc/resolv.conf");
    std::fs::write("/etc/resolv.conf", conf)
}

/// Overwrites a file's contents without replacing the file: under systemd, /etc/machine-id
/// may be a bind mount, which a rename cannot replace.
fn write_in_place(path: &str, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.write_all(data)
}

fn disk_bytes() -> u64 {
    std::fs::read_to_string("/sys/block/vda/size")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(0, |sectors| sectors * 512)
}

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])`; `RNDRESEEDCRNG` = `_IO('R', 0x07)`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `seed` into the input pool (credited), then reseeds the CRNG at once, so this VM's
/// random numbers part from every other copy of the template.
fn reseed(seed: &[u8]) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    // SAFETY: the buffer holds a complete rand_pool_info with buf_size bytes after the header.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn sockaddr_in(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the bytes are a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// `struct rtentry` of <net/route.h> (glibc's libc crate lacks it).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
        ifr.ifr_name[i] = b as libc::c_char;
    }
    ifr
}

fn ioctl_ifreq(fd: &OwnedFd, req: libc::c_ulong, ifr: &mut libc::ifreq) -> std::io::Result<()> {
    // SAFETY: `ifr` is a valid ifreq for the socket ioctls used here.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req as _, ifr as *mut libc::ifreq) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets eth0's MAC (so the device filters for this VM's address), address and netmask, brings
/// it up and points the default route at the gateway.
fn configure_eth0(n: &NetIdentity) -> std::io::Result<()> {
    let mac = parse_mac(&n.mac).ok_or_else(|| std::io::Error::other("invalid MAC"))?;
    // SAFETY: socket(2) returns a new descriptor or -1.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    let mut ifr = ifreq("eth0");
    // SAFETY: writing the hwaddr member of the request union.
    unsafe {
        ifr.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (i, b) in mac.iter().enumerate() {
            ifr.ifr_ifru.ifru_hwaddr.sa_data[i] = *b as libc::c_char;
        }
    }
    ioctl_ifreq(&fd, libc::SIOCSIFHWADDR, &mut ifr)?;

    let mut ifr = ifreq("eth0");
    ifr.ifr_ifru.ifru_addr = sockaddr_in(n.address);
    ioctl_ifreq(&fd, libc::SIOCSIFADDR, &mut ifr)?;
    let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(n.prefix)).unwrap_or(0));
    let mut ifr = ifreq("eth0");
    ifr.ifr_ifru.ifru_netmask = sockaddr_in(mask);
    ioctl_ifreq(&fd, libc::SIOCSIFNETMASK, &mut ifr)?;

    let mut ifr = ifreq("eth0");
    ioctl_ifreq(&fd, libc::SIOCGIFFLAGS, &mut ifr)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    unsafe { ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl_ifreq(&fd, libc::SIOCSIFFLAGS, &mut ifr)?;

    let mut rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_in(n.gateway),
        rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: `rt` is a complete rtentry; rt_dev is null (the kernel picks eth0 by the gateway).
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCADDRT as _, &mut rt as *mut RtEntry) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_names_the_vm_once() {
        let base = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\tslicer\n";
        let once = hosts_with(base, "vm-1");
        assert_eq!(
            once,
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\tvm-1\n"
        );
        assert_eq!(hosts_with(&once, "vm-2").matches("127.0.1.1").count(), 1);
        assert!(hosts_with("", "vm-3").starts_with("127.0.0.1\tlocalhost\n"));
    }

    #[test]
    fn macs() {
        assert_eq!(parse_mac("02:ab:00:10:ff:01"), Some([2, 0xab, 0, 0x10, 0xff, 1]));
        for bad in [
            "",
            "02:ab:00:10:ff",
            "02:ab:00:10:ff:01:02",
            "2:ab:00:10:ff:01",
            "zz:ab:00:10:ff:01",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_identities_are_refused() {
        let mut id = Identity {
            hostname: Some("a b".into()),
            ..Default::default()
        };
        assert!(validate(&id).is_err());
        id.hostname = Some("vm-1".into());
        assert!(validate(&id).is_ok());
        id.machine_id = Some("0".repeat(32));
        assert!(validate(&id).is_err());
        id.machine_id = Some("0123456789abcdef0123456789abcdef".into());
        assert!(validate(&id).is_ok());
        id.net = Some(NetIdentity {
            mac: "nope".into(),
            address: Ipv4Addr::new(10, 0, 0, 2),
            prefix: 30,
            gateway: Ipv4Addr::new(10, 0, 0, 1),
        });
        assert!(validate(&id).is_err());
    }
}
