//! The persistent-reservation functions with their Windows names and conventions
//! (`iphlpapi.h`): `StartPort` in network byte order, results as Win32 codes.
//!
//! ```no_run
//! use portres_client::windows::*;
//! let token = create_persistent_tcp_port_reservation(50000u16.to_be(), 10)?;
//! assert_eq!(lookup_persistent_tcp_port_reservation(50000u16.to_be(), 10)?, token);
//! delete_persistent_tcp_port_reservation(50000u16.to_be(), 10)?;
//! # Ok::<(), u32>(())
//! ```
//!
//! Each call connects with [`Client::connect`] (so `PORTRES_SOCKET` and autostart apply). Errors
//! are the codes of docs/behaviour.md §2: `ERROR_INVALID_PARAMETER` (87), `ERROR_ACCESS_DENIED`
//! (5), `ERROR_SHARING_VIOLATION` (32), `ERROR_NOT_FOUND` (1168); when no daemon can be reached,
//! `ERROR_SERVICE_NOT_ACTIVE` (1062); other failures `ERROR_INTERNAL_ERROR` (1359).

use crate::{Client, PersistentSpec, Protocol};

/// `NO_ERROR`.
pub const NO_ERROR: u32 = 0;

fn create(protocol: Protocol, start_port: u16, number_of_ports: u16) -> Result<u64, u32> {
    let spec = PersistentSpec::new(
        protocol,
        u16::from_be(start_port).into(),
        number_of_ports.into(),
    );
    Client::connect()
        .and_then(|c| c.create_persistent(&spec))
        .map(|t| t.get())
        .map_err(|e| e.windows_code())
}

fn lookup(protocol: Protocol, start_port: u16, number_of_ports: u16) -> Result<u64, u32> {
    Client::connect()
        .and_then(|c| {
            c.lookup_persistent(
                protocol,
                u16::from_be(start_port).into(),
                number_of_ports.into(),
            )
        })
        .map(|t| t.get())
        .map_err(|e| e.windows_code())
}

fn delete(protocol: Protocol, start_port: u16, number_of_ports: u16) -> Result<(), u32> {
    Client::connect()
        .and_then(|c| {
            c.delete_persistent(
                protocol,
                u16::from_be(start_port).into(),
                number_of_ports.into(),
            )
        })
        .map_err(|e| e.windows_code())
}

/// `CreatePersistentTcpPortReservation(StartPort, NumberOfPorts, &Token)`.
pub fn create_persistent_tcp_port_reservation(
    start_port_network_order: u16,
    number_of_ports: u16,
) -> Result<u64, u32> {
    create(Protocol::Tcp, start_port_network_order, number_of_ports)
}

/// `CreatePersistentUdpPortReservation(StartPort, NumberOfPorts, &Token)`.
pub fn create_persistent_udp_port_reservation(
    start_port_network_order: u16,
    number_of_ports: u16,
) -> Result<u64, u32> {
    create(Protocol::Udp, start_port_network_order, number_of_ports)
}

/// `LookupPersistentTcpPortReservation(StartPort, NumberOfPorts, &Token)`.
pub fn lookup_persistent_tcp_port_reservation(
    start_port_network_order: u16,
    number_of_ports: u16,
) -> Result<u64, u32> {
    lookup(Protocol::Tcp, start_port_network_order, number_of_ports)
}

/// `LookupPersistentUdpPortReservation(StartPort, NumberOfPorts, &Token)`.
pub fn lookup_persistent_udp_port_reservation(
    start_port_network_order: u16,
    number_of_ports: u16,
) -> Result<u64, u32> {
    lookup(Protocol::Udp, start_port_network_order, number_of_ports)
}

/// `DeletePersistentTcpPortReservation(StartPort, NumberOfPorts)`.
pub fn delete_persistent_tcp_port_reservation(
    start_port_network_order: u16,
    number_of_ports: u16,
) -> Result<(), u32> {
    delete(Protocol::Tcp, start_port_network_order, number_of_ports)
}

/// `DeletePersistentUdpPortReservation(StartPort, NumberOfPorts)`.
pub fn delete_persistent_udp_port_reservation(
    start_port_network_order: u16,
    number_of_ports: u16,
) -> Result<(), u32> {
    delete(Protocol::Udp, start_port_network_order, number_of_ports)
}
