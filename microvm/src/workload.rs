//! How a test guest dirties its memory.

/// A guest program's write pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// 8-byte writes at random offsets across all memory (the paper's case).
    Sparse,
    /// Whole pages rewritten in sequence.
    Dense,
    /// A small region (64 pages) rewritten constantly.
    Hotspot,
    /// Writes that later put the previous value back.
    Aba,
    /// Only the heartbeat.
    Idle,
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::Sparse,
        Workload::Dense,
        Workload::Hotspot,
        Workload::Aba,
        Workload::Idle,
    ];

    pub fn to_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(v: u8) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| *w as u8 == v)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Sparse => "sparse",
            Workload::Dense => "dense",
            Workload::Hotspot => "hotspot",
            Workload::Aba => "aba",
            Workload::Idle => "idle",
        }
    }
}

impl std::str::FromStr for Workload {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Workload::ALL
            .into_iter()
            .find(|w| w.as_str() == s)
            .ok_or_else(|| {
                format!("unknown workload '{s}' (expected sparse, dense, hotspot, aba or idle)")
            })
    }
}
