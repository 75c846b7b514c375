//! `--rdma DEVICE` and `hpmig devices`: the RDMA transport's flags, in every
//! build; the transport itself only with `--features rdma`.

use anyhow::Result;

use crate::outcome::usage;
use clap::Args;
use hpmig_transport_tcp::TcpOptions;

/// Flags that choose the RDMA transport.
#[derive(Args, Debug, Clone)]
pub struct RdmaArgs {
    /// Move memory by RDMA on this verbs device (mlx5_0, rxe0, ... as
    /// `hpmig devices` lists them); the TCP address still carries the
    /// handshake and queue-pair setup.
    #[arg(long, value_name = "DEVICE")]
    pub rdma: Option<String>,
    /// Port of the RDMA device.
    #[arg(long, default_value_t = 1, requires = "rdma")]
    pub rdma_port: u8,
    /// GID index (default: the first RoCE v2 IPv4-mapped GID, 0 on InfiniBand).
    #[arg(long, requires = "rdma")]
    pub gid_index: Option<u8>,
}

#[cfg(feature = "rdma")]
pub use hpmig_transport_rdma::RdmaOptions;

/// Stands in for the RDMA options in a build without RDMA.
#[cfg(not(feature = "rdma"))]
#[derive(Debug)]
pub enum RdmaOptions {}

impl RdmaArgs {
    /// Refuses `--rdma` in a build without RDMA (exit status 2), before
    /// anything starts.
    pub fn check(&self) -> Result<()> {
        match &self.rdma {
            Some(device) if !hpmig_transport_rdma::ENABLED => Err(usage(format!(
                "--rdma {device}: {}",
                hpmig_transport_rdma::unavailable()
            ))),
            _ => Ok(()),
        }
    }

    /// The RDMA options, when `--rdma` was given; an error that says how to
    /// build with RDMA when this build lacks it.
    pub fn options(&self, tcp: TcpOptions) -> Result<Option<RdmaOptions>> {
        let Some(device) = &self.rdma else {
            return Ok(None);
        };
        self.check()?;
        #[cfg(feature = "rdma")]
        {
            let mut o = RdmaOptions::new(device);
            o.port = self.rdma_port;
            o.gid_index = self.gid_index;
            o.tcp = tcp;
            o.check()?;
            Ok(Some(o))
        }
        #[cfg(not(feature = "rdma"))]
        {
            let _ = tcp;
            anyhow::bail!("--rdma {device}: {}", hpmig_transport_rdma::unavailable())
        }
    }
}

/// How the wire is described to the user.
#[cfg(feature = "rdma")]
pub fn wire(o: &RdmaOptions) -> String {
    format!("RDMA on {} port {}", o.device, o.port)
}

#[cfg(not(feature = "rdma"))]
pub fn wire(o: &RdmaOptions) -> String {
    match *o {}
}

/// `hpmig devices`: the verbs devices, ports, MTUs and GID tables.
pub fn devices() -> Result<bool> {
    #[cfg(feature = "rdma")]
    {
        let list = hpmig_transport_rdma::device::list()?;
        print!("{}", hpmig_transport_rdma::device::describe(&list));
        Ok(!list.is_empty())
    }
    #[cfg(not(feature = "rdma"))]
    anyhow::bail!("{}", hpmig_transport_rdma::unavailable())
}

/// One line on what the RDMA streams did.
#[cfg(feature = "rdma")]
pub fn stats_line(s: &hpmig_transport_rdma::RdmaStats) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    format!(
        "{} batches, {} work requests in {} doorbells ({:.1} per doorbell, {} inline); {} landed in place, {} staged",
        s.batches.load(Relaxed),
        s.work_requests.load(Relaxed),
        s.doorbells.load(Relaxed),
        s.per_doorbell(),
        s.inline.load(Relaxed),
        crate::units::human(s.in_place_bytes.load(Relaxed)),
        crate::units::human(s.staged_bytes.load(Relaxed)),
    )
}
