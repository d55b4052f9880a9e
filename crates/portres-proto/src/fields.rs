//! Field types of requests, range-checked where they are decoded: a request whose numbers are
//! out of range never reaches a handler (it is answered `MalformedRequest`, naming the field).

use portres_core::{Mode, Protocol};
use serde::de::{Deserializer, Error, Unexpected};
use serde::{Deserialize, Serializer};

/// `"tcp"` or `"udp"` ([`Protocol`]), for `#[serde(with = "fields::protocol")]`.
pub mod protocol {
    use super::*;

    /// Writes the protocol's name.
    pub fn serialize<S: Serializer>(p: &Protocol, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.as_str())
    }

    /// Reads `"tcp"` or `"udp"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(D::Error::custom)
    }
}

/// An optional `"hold"` or `"exclude"` ([`Mode`]), for `#[serde(with = "fields::mode")]`.
pub mod mode {
    use super::*;

    /// Writes the mode's name, or null.
    pub fn serialize<S: Serializer>(m: &Option<Mode>, s: S) -> Result<S::Ok, S::Error> {
        match m {
            Some(m) => s.serialize_str(m.as_str()),
            None => s.serialize_none(),
        }
    }

    /// Reads `"hold"`, `"exclude"` or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Mode>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| s.parse().map_err(D::Error::custom))
            .transpose()
    }
}

/// A number of ports: 1 to 65,535, for `#[serde(deserialize_with = "fields::count")]`.
pub fn count<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let n = u64::deserialize(d)?;
    match u16::try_from(n) {
        Ok(c) if c > 0 => Ok(c),
        _ => Err(D::Error::invalid_value(
            Unexpected::Unsigned(n),
            &"a count of ports from 1 to 65535",
        )),
    }
}

/// A port: 0 to 65,535, for `#[serde(deserialize_with = "fields::port")]`.
pub fn port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let n = u64::deserialize(d)?;
    u16::try_from(n)
        .map_err(|_| D::Error::invalid_value(Unexpected::Unsigned(n), &"a port from 0 to 65535"))
}

/// An optional `listen()` backlog: 1 to 65,535.
pub fn backlog<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    match Option::<u64>::deserialize(d)? {
        None => Ok(None),
        Some(n @ 1..=65535) => Ok(Some(n as i32)),
        Some(n) => Err(D::Error::invalid_value(
            Unexpected::Unsigned(n),
            &"a listen backlog from 1 to 65535",
        )),
    }
}
