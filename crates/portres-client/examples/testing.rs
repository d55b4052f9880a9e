//! The example of `portres_client::testing` (run by the integration suite against a real
//! daemon): a server on a reserved port, and a block for code that binds by number.

use std::io::{Read, Write};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A server under test, on a port nobody else can take.
    let listener = portres_client::testing::tcp_listener()?;
    let port = listener.port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(b"hello").unwrap();
    });
    let mut reply = String::new();
    std::net::TcpStream::connect(("127.0.0.1", port))?.read_to_string(&mut reply)?;
    assert_eq!(reply, "hello");
    server.join().unwrap();

    // Three consecutive ports for a program that binds them by number itself.
    let block = portres_client::testing::ports(3)?;
    assert_eq!(block.len(), 3);
    assert_eq!(block[1], block[0] + 1);
    let _bound = std::net::TcpListener::bind(("127.0.0.1", block[2]))?;

    // A UDP socket on a held port.
    let udp = portres_client::testing::udp_socket()?;
    assert_eq!(udp.local_addr()?.port(), udp.port());
    println!("ok {port} {} {}", block[0], udp.port());
    // Keep them until told to go (the test looks at them meanwhile).
    if std::env::args().any(|a| a == "--wait") {
        std::io::stdin().read_to_end(&mut Vec::new())?;
    }
    Ok(())
}
