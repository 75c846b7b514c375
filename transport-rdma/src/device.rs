//! What the host's verbs devices offer: `hpmig devices`, and the default
//! GID index of a connection.

use std::fmt::Write as _;
use std::net::Ipv6Addr;
use std::sync::Arc;

use hpmig_core::transport::TransportError;
use thiserror::Error;

use crate::verbs::{self, Context, Mtu, PortInfo, VerbsError};

/// Errors of looking at the host's devices.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// a verbs call failed
    #[error(transparent)]
    Verbs(#[from] VerbsError),
    /// the port has no GID a connection could use
    #[error("choosing a GID failed: port {port} of {device} has no GID set (does its network device have an address?)")]
    NoGid { device: String, port: u8 },
}

impl From<DeviceError> for TransportError {
    fn from(e: DeviceError) -> Self {
        TransportError::Device(Box::new(e))
    }
}

/// One GID table entry in use.
#[derive(Clone, Debug)]
pub struct GidEntry {
    pub index: i32,
    pub gid: [u8; 16],
    /// "RoCE v2", "IB/RoCE v1", or empty where the kernel does not say.
    pub kind: String,
    /// The network device the GID belongs to, where the kernel says.
    pub netdev: String,
}

impl GidEntry {
    /// An IPv4-mapped GID (::ffff:a.b.c.d), the usual RoCE v2 address.
    pub fn is_ipv4_mapped(&self) -> bool {
        self.gid[..10].iter().all(|&b| b == 0) && self.gid[10..12] == [0xff, 0xff]
    }

    pub fn address(&self) -> String {
        let a = Ipv6Addr::from(self.gid);
        match a.to_ipv4_mapped() {
            Some(v4) => format!("::ffff:{v4}"),
            None => a.to_string(),
        }
    }
}

/// One port of a device.
#[derive(Clone, Debug)]
pub struct Port {
    pub number: u8,
    pub info: PortInfo,
    pub gids: Vec<GidEntry>,
}

/// One device.
#[derive(Clone, Debug)]
pub struct Device {
    pub name: String,
    pub node_guid: u64,
    pub fw_ver: String,
    pub max_qp_wr: i32,
    pub ports: Vec<Port>,
}

fn sysfs(dev: &str, port: u8, what: &str, index: i32) -> String {
    std::fs::read_to_string(format!(
        "/sys/class/infiniband/{dev}/ports/{port}/gid_attrs/{what}/{index}"
    ))
    .map(|s| s.trim().to_string())
    .unwrap_or_default()
}

/// The GID entries of `port` that are set.
pub fn gid_table(ctx: &Context, port: u8, info: &PortInfo) -> Vec<GidEntry> {
    (0..info.gid_table_len.min(256))
        .filter_map(|index| {
            let gid = ctx.gid(port, index).ok()?;
            if gid.iter().all(|&b| b == 0) {
                return None;
            }
            Some(GidEntry {
                index,
                gid,
                kind: sysfs(ctx.name(), port, "types", index),
                netdev: sysfs(ctx.name(), port, "ndevs", index),
            })
        })
        .collect()
}

/// Ethernet link layer (RoCE), as `ibv_port_attr::link_layer` says it.
pub const LINK_LAYER_ETHERNET: u8 = 2;

/// The GID index a connection uses when none is given: on RoCE the first
/// RoCE v2 IPv4-mapped entry (routable, what most fabrics use), else the
/// first RoCE v2 entry, else the first entry set; on InfiniBand index 0.
pub fn default_gid_index(ctx: &Context, port: u8) -> Result<u8, DeviceError> {
    let info = ctx.port(port)?;
    if info.link_layer != LINK_LAYER_ETHERNET {
        return Ok(0);
    }
    let gids = gid_table(ctx, port, &info);
    let v2 = |g: &&GidEntry| g.kind.eq_ignore_ascii_case("RoCE v2");
    let pick = gids
        .iter()
        .filter(v2)
        .find(|g| g.is_ipv4_mapped())
        .or_else(|| gids.iter().find(v2))
        .or_else(|| gids.first());
    match pick {
        Some(g) => Ok(g.index as u8),
        None => Err(DeviceError::NoGid {
            device: ctx.name().to_string(),
            port,
        }),
    }
}

/// Every device with its ports and GID tables.
pub fn list() -> Result<Vec<Device>, VerbsError> {
    let mut out = Vec::new();
    for name in verbs::device_names()? {
        let ctx: Arc<Context> = Context::open(&name)?;
        let attr = ctx.attr().clone();
        let mut ports = Vec::new();
        for number in 1..=attr.phys_port_cnt {
            let info = ctx.port(number)?;
            let gids = gid_table(&ctx, number, &info);
            ports.push(Port { number, info, gids });
        }
        out.push(Device {
            name,
            node_guid: attr.node_guid,
            fw_ver: attr.fw_ver,
            max_qp_wr: attr.max_qp_wr,
            ports,
        });
    }
    Ok(out)
}

/// `devices` as text, in the manner of `ibv_devinfo -v`'s essentials.
pub fn describe(devices: &[Device]) -> String {
    let mut s = String::new();
    if devices.is_empty() {
        s.push_str(
            "no RDMA devices found (is an RDMA driver loaded? a kernel with rdma_rxe can make \
             a soft-RoCE device: scripts/setup-rxe.sh)\n",
        );
    }
    for d in devices {
        let g = d.node_guid.to_be_bytes();
        let _ = writeln!(s, "hca_id: {}", d.name);
        let _ = writeln!(
            s,
            "\tnode_guid:\t\t{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}",
            g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]
        );
        if !d.fw_ver.is_empty() {
            let _ = writeln!(s, "\tfw_ver:\t\t\t{}", d.fw_ver);
        }
        let _ = writeln!(s, "\tmax_qp_wr:\t\t{}", d.max_qp_wr);
        for p in &d.ports {
            let _ = writeln!(s, "\tport:\t{}", p.number);
            let _ = writeln!(s, "\t\tstate:\t\t{}", p.info.state);
            let _ = writeln!(
                s,
                "\t\tmax_mtu:\t{}\n\t\tactive_mtu:\t{}",
                p.info.max_mtu.map_or(0, Mtu::bytes),
                p.info.active_mtu.map_or(0, Mtu::bytes)
            );
            let layer = if p.info.link_layer == LINK_LAYER_ETHERNET {
                "Ethernet"
            } else {
                "InfiniBand"
            };
            let _ = writeln!(s, "\t\tlink_layer:\t{layer}\n\t\tport_lid:\t{}", p.info.lid);
            for e in &p.gids {
                let _ = writeln!(
                    s,
                    "\t\tGID[{:3}]:\t{}{}{}",
                    e.index,
                    e.address(),
                    if e.kind.is_empty() {
                        String::new()
                    } else {
                        format!(", {}", e.kind)
                    },
                    if e.netdev.is_empty() {
                        String::new()
                    } else {
                        format!(", {}", e.netdev)
                    },
                );
            }
        }
    }
    s
}
