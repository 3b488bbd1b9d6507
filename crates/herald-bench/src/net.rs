//! Sockets and clocks shared by the subscribers and the publisher.

use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::{TcpSocket, TcpStream};

/// Opens a TCP connection to `address`, from `source_ip` if given (so that
/// many connections can spread over several loopback addresses instead of
/// running out of ephemeral ports on one), with a receive buffer of
/// `receive_buffer` bytes if given (set before connecting, so the window the
/// server sees is small from the start).
pub async fn tcp_connect(
    address: SocketAddr,
    source_ip: Option<IpAddr>,
    receive_buffer: Option<u32>,
) -> std::io::Result<TcpStream> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(size) = receive_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    if let Some(ip) = source_ip {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(address).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Wall-clock time as Unix nanoseconds: what payload stamps and receive
/// times are compared in (sender and receivers share this machine's clock).
pub fn unix_nanos_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX))
}
