//! The verbs enum values this crate reads or exchanges, as Rust types:
//! path MTU, port state, work completion status and opcode.

use std::ffi::CStr;

use rdma_sys::{ibv_mtu, ibv_port_state, ibv_wc_opcode, ibv_wc_status, ibv_wc_status_str};

/// A path MTU, numbered as the verbs enum numbers it (the number is what
/// the setup exchange carries). Ordered by size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mtu {
    Mtu256,
    Mtu512,
    Mtu1024,
    Mtu2048,
    Mtu4096,
}

impl Mtu {
    /// The MTU the verbs enum value `raw` names, if any.
    pub fn from_raw(raw: u32) -> Option<Mtu> {
        Some(match raw {
            ibv_mtu::IBV_MTU_256 => Mtu::Mtu256,
            ibv_mtu::IBV_MTU_512 => Mtu::Mtu512,
            ibv_mtu::IBV_MTU_1024 => Mtu::Mtu1024,
            ibv_mtu::IBV_MTU_2048 => Mtu::Mtu2048,
            ibv_mtu::IBV_MTU_4096 => Mtu::Mtu4096,
            _ => return None,
        })
    }

    /// The verbs enum value.
    pub fn raw(self) -> u32 {
        match self {
            Mtu::Mtu256 => ibv_mtu::IBV_MTU_256,
            Mtu::Mtu512 => ibv_mtu::IBV_MTU_512,
            Mtu::Mtu1024 => ibv_mtu::IBV_MTU_1024,
            Mtu::Mtu2048 => ibv_mtu::IBV_MTU_2048,
            Mtu::Mtu4096 => ibv_mtu::IBV_MTU_4096,
        }
    }

    pub fn bytes(self) -> u32 {
        match self {
            Mtu::Mtu256 => 256,
            Mtu::Mtu512 => 512,
            Mtu::Mtu1024 => 1024,
            Mtu::Mtu2048 => 2048,
            Mtu::Mtu4096 => 4096,
        }
    }
}

impl std::fmt::Display for Mtu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.bytes())
    }
}

/// A port's state, as `ibv_port_attr::state` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortState {
    Nop,
    Down,
    Init,
    Armed,
    Active,
    ActiveDefer,
    /// A value this build does not know.
    Unknown(u32),
}

impl PortState {
    pub(super) fn from_raw(raw: ibv_port_state::Type) -> PortState {
        match raw {
            ibv_port_state::IBV_PORT_NOP => PortState::Nop,
            ibv_port_state::IBV_PORT_DOWN => PortState::Down,
            ibv_port_state::IBV_PORT_INIT => PortState::Init,
            ibv_port_state::IBV_PORT_ARMED => PortState::Armed,
            ibv_port_state::IBV_PORT_ACTIVE => PortState::Active,
            ibv_port_state::IBV_PORT_ACTIVE_DEFER => PortState::ActiveDefer,
            other => PortState::Unknown(other),
        }
    }
}

/// As `ibv_devinfo` names the state (PORT_ACTIVE, ...).
impl std::fmt::Display for PortState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PortState::Nop => "PORT_NOP",
            PortState::Down => "PORT_DOWN",
            PortState::Init => "PORT_INIT",
            PortState::Armed => "PORT_ARMED",
            PortState::Active => "PORT_ACTIVE",
            PortState::ActiveDefer => "PORT_ACTIVE_DEFER",
            PortState::Unknown(n) => return write!(f, "PORT_STATE_{n}"),
        })
    }
}

/// A work completion's status. A number rather than an enum: libibverbs
/// defines two dozen codes and names them itself ([`WcStatus::name`]), and
/// a code this build does not know must still be shown as it came.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WcStatus(u32);

impl WcStatus {
    pub const SUCCESS: WcStatus = WcStatus(ibv_wc_status::IBV_WC_SUCCESS);
    /// What every outstanding work request of a queue pair in the error
    /// state completes with.
    pub const FLUSH_ERR: WcStatus = WcStatus(ibv_wc_status::IBV_WC_WR_FLUSH_ERR);

    pub(super) fn from_raw(raw: ibv_wc_status::Type) -> WcStatus {
        WcStatus(raw)
    }

    pub fn is_success(self) -> bool {
        self == WcStatus::SUCCESS
    }

    /// The verbs status code.
    pub fn code(self) -> u32 {
        self.0
    }

    /// The status as libibverbs names it.
    pub fn name(self) -> String {
        // SAFETY: ibv_wc_status_str returns a pointer to a static string for
        // any value (an "unknown" string for values it does not know).
        unsafe { CStr::from_ptr(ibv_wc_status_str(self.0)) }
            .to_string_lossy()
            .into_owned()
    }
}

/// "NAME (code)".
impl std::fmt::Display for WcStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// What a work completion completed: the opcodes this crate posts or
/// receives, and any other as its number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WcOpcode {
    #[default]
    Send,
    RdmaWrite,
    /// A SEND arrived.
    Recv,
    /// An RDMA WRITE WITH IMMEDIATE arrived.
    RecvRdmaWithImm,
    Other(u32),
}

impl WcOpcode {
    pub(super) fn from_raw(raw: ibv_wc_opcode::Type) -> WcOpcode {
        match raw {
            ibv_wc_opcode::IBV_WC_SEND => WcOpcode::Send,
            ibv_wc_opcode::IBV_WC_RDMA_WRITE => WcOpcode::RdmaWrite,
            ibv_wc_opcode::IBV_WC_RECV => WcOpcode::Recv,
            ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvRdmaWithImm,
            other => WcOpcode::Other(other),
        }
    }

    /// The verbs opcode number.
    pub fn raw(self) -> u32 {
        match self {
            WcOpcode::Send => ibv_wc_opcode::IBV_WC_SEND,
            WcOpcode::RdmaWrite => ibv_wc_opcode::IBV_WC_RDMA_WRITE,
            WcOpcode::Recv => ibv_wc_opcode::IBV_WC_RECV,
            WcOpcode::RecvRdmaWithImm => ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM,
            WcOpcode::Other(n) => n,
        }
    }
}

/// "IBV_WC_NAME (number)", or the number alone for one this build does not
/// name.
impl std::fmt::Display for WcOpcode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            WcOpcode::Send => "IBV_WC_SEND",
            WcOpcode::RdmaWrite => "IBV_WC_RDMA_WRITE",
            WcOpcode::Recv => "IBV_WC_RECV",
            WcOpcode::RecvRdmaWithImm => "IBV_WC_RECV_RDMA_WITH_IMM",
            WcOpcode::Other(n) => return write!(f, "{n}"),
        };
        write!(f, "{name} ({})", self.raw())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtu_numbers_round_trip_and_order_by_size() {
        for raw in 1..=5 {
            let mtu = Mtu::from_raw(raw).unwrap();
            assert_eq!(mtu.raw(), raw);
            assert_eq!(mtu.bytes(), 128 << raw);
        }
        assert_eq!(Mtu::from_raw(0), None);
        assert_eq!(Mtu::from_raw(6), None);
        assert_eq!(Mtu::Mtu4096.min(Mtu::Mtu1024), Mtu::Mtu1024);
    }

    #[test]
    fn opcodes_and_states_keep_their_numbers() {
        for raw in [0, 1, 128, 129, 7, 200] {
            assert_eq!(WcOpcode::from_raw(raw).raw(), raw);
        }
        assert_eq!(WcOpcode::from_raw(129), WcOpcode::RecvRdmaWithImm);
        assert_eq!(
            WcOpcode::RecvRdmaWithImm.to_string(),
            "IBV_WC_RECV_RDMA_WITH_IMM (129)"
        );
        assert_eq!(PortState::from_raw(4).to_string(), "PORT_ACTIVE");
        assert_eq!(PortState::from_raw(9).to_string(), "PORT_STATE_9");
        assert!(WcStatus::default().is_success());
        assert!(WcStatus::FLUSH_ERR.to_string().ends_with("(5)"));
    }
}
