//! Peer authentication with a shared secret (`--token` / `HPMIG_TOKEN`).
//!
//! Both ends derive a key from the token (BLAKE3 `derive_key`) and prove
//! they hold it with keyed BLAKE3 MACs over fresh nonces from both sides:
//!
//! ```text
//!  Hello   {nonce_s, MAC(k, "hello" | nonce_s)}            source -> dest
//!  Welcome {nonce_d, MAC(k, "welcome" | nonce_s | nonce_d)} dest -> source
//!  Proof   {MAC(k, "proof" | nonce_s | nonce_d)}            source -> dest
//! ```
//!
//! The Hello's MAC lets the destination drop a peer without the token at
//! once; a replayed Hello still fails at the Proof, which needs the
//! destination's fresh nonce. The destination accepts data connections only
//! with the session's stream tag, `MAC(k, "stream" | nonce_s | nonce_d | i)`.
//!
//! What this protects: only holders of the token can migrate into a
//! destination or receive a source's guest. What it does not: the stream is
//! neither encrypted nor integrity-protected after the handshake, so anyone
//! on the path can read guest memory or alter it in flight (the final digest
//! comparison catches accidental corruption, not a capable attacker).
//! Without a token the MACs use a key derived from the empty token: no
//! authentication, but data connections are still bound to their session.

const CONTEXT: &str = "hpmig 2026-11 peer authentication v1";

/// The key both ends derive from the shared token.
#[derive(Clone)]
pub struct Secret {
    key: [u8; 32],
    set: bool,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.set {
            "Secret(token)"
        } else {
            "Secret(none)"
        })
    }
}

impl Default for Secret {
    fn default() -> Self {
        Secret::none()
    }
}

impl Secret {
    pub fn from_token(token: &[u8]) -> Self {
        Secret {
            key: blake3::derive_key(CONTEXT, token),
            set: !token.is_empty(),
        }
    }

    /// No token: nothing is authenticated.
    pub fn none() -> Self {
        Secret {
            set: false,
            ..Secret::from_token(b"")
        }
    }

    /// True when a token was given.
    pub fn is_set(&self) -> bool {
        self.set
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(label);
        for p in parts {
            h.update(p);
        }
        h.finalize()
    }

    pub fn hello(&self, nonce_s: &[u8; 16]) -> [u8; 32] {
        *self.mac(b"hello", &[nonce_s]).as_bytes()
    }

    pub fn welcome(&self, nonce_s: &[u8; 16], nonce_d: &[u8; 16]) -> [u8; 32] {
        *self.mac(b"welcome", &[nonce_s, nonce_d]).as_bytes()
    }

    pub fn proof(&self, nonce_s: &[u8; 16], nonce_d: &[u8; 16]) -> [u8; 32] {
        *self.mac(b"proof", &[nonce_s, nonce_d]).as_bytes()
    }

    /// Constant-time check of a received MAC against the expected one.
    pub fn verify(expected: [u8; 32], got: &[u8]) -> bool {
        <[u8; 32]>::try_from(got)
            .is_ok_and(|g| blake3::Hash::from(expected) == blake3::Hash::from(g))
    }

    /// The session of a completed handshake.
    pub fn session(&self, nonce_s: [u8; 16], nonce_d: [u8; 16]) -> Session {
        Session {
            secret: self.clone(),
            nonce_s,
            nonce_d,
        }
    }
}

/// A fresh random nonce.
pub fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    // A failing system RNG leaves a time-based nonce: unique, not secret.
    if getrandom::fill(&mut n).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        n[..16].copy_from_slice(&t.as_nanos().to_le_bytes());
    }
    n
}

/// What binds data connections to their control exchange.
#[derive(Clone, Debug)]
pub struct Session {
    secret: Secret,
    nonce_s: [u8; 16],
    nonce_d: [u8; 16],
}

/// A session's name on the wire: fixed by both nonces, the same at both
/// ends, public (it proves nothing by itself).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; 16]);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionId({self})")
    }
}

impl std::str::FromStr for SessionId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a session id (32 hex digits)");
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad());
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(SessionId(id))
    }
}

impl Session {
    /// A session for transports that need no binding (in-process).
    pub fn unbound() -> Session {
        Secret::none().session([0; 16], [0; 16])
    }

    /// The session's name on the wire.
    pub fn id(&self) -> SessionId {
        let h = self
            .secret
            .mac(b"session id", &[&self.nonce_s, &self.nonce_d]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&h.as_bytes()[..16]);
        SessionId(id)
    }

    /// Both nonces, from which [`Secret::session`] rebuilds the session
    /// (a destination's journal keeps them).
    pub fn nonces(&self) -> ([u8; 16], [u8; 16]) {
        (self.nonce_s, self.nonce_d)
    }

    /// The key of the per-page hashes both ends keep (see
    /// [`crate::verify`]): derived from the session, never sent.
    pub fn page_hash_key(&self) -> [u8; 32] {
        self.record_mac(b"page hash key", b"")
    }

    /// A MAC over a switch-over record's `body` under this session's key;
    /// `label` separates the kinds of record.
    pub fn record_mac(&self, label: &[u8], body: &[u8]) -> [u8; 32] {
        *self
            .secret
            .mac(label, &[&self.nonce_s, &self.nonce_d, body])
            .as_bytes()
    }

    /// The tag data connection `index` presents.
    pub fn stream_tag(&self, index: u16) -> [u8; 32] {
        *self
            .secret
            .mac(
                b"stream",
                &[&self.nonce_s, &self.nonce_d, &index.to_le_bytes()],
            )
            .as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_depend_on_token_and_both_nonces() {
        let a = Secret::from_token(b"s3cret");
        let b = Secret::from_token(b"other");
        let (ns, nd) = (nonce(), nonce());
        assert_ne!(ns, nd);
        assert!(Secret::verify(a.welcome(&ns, &nd), &a.welcome(&ns, &nd)));
        assert!(
            !Secret::verify(a.welcome(&ns, &nd), &b.welcome(&ns, &nd)),
            "wrong token"
        );
        assert!(
            !Secret::verify(a.proof(&ns, &nd), &a.proof(&ns, &nonce())),
            "replayed with another nonce"
        );
        assert!(
            !Secret::verify(a.proof(&ns, &nd), &a.welcome(&ns, &nd)),
            "labels separate the messages"
        );
        assert!(!Secret::verify(a.hello(&ns), &[0u8; 31]), "short MAC");
        let s = a.session(ns, nd);
        assert_ne!(s.stream_tag(0), s.stream_tag(1));
        assert_eq!(s.id(), a.session(ns, nd).id());
        assert_ne!(s.id(), a.session(nd, ns).id());
        assert_eq!(s.id().to_string().parse::<SessionId>(), Ok(s.id()));
        assert_ne!(s.record_mac(b"x", b"1"), s.record_mac(b"x", b"2"));
        assert_ne!(
            s.record_mac(b"x", b"1"),
            b.session(ns, nd).record_mac(b"x", b"1")
        );
        assert_ne!(s.stream_tag(0), b.session(ns, nd).stream_tag(0));
        assert!(a.is_set() && !Secret::none().is_set());
    }
}
