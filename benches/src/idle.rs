//! Idle keep-alive clients (datapath under memory load): N connections that each made one
//! request and then stay open, as a fleet of idle keep-alive clients leaves a proxy.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Open connections; they close when this is dropped.
pub struct IdleConnections {
    streams: Vec<TcpStream>,
}

impl IdleConnections {
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

/// Opens `count` connections to `target`, one after another, each doing `GET path` to the end
/// of its response before the next one starts, so the proxy's upstream pool stays at one
/// connection and only the downstream side grows.
pub fn open(target: SocketAddr, path: &str, count: usize) -> Result<IdleConnections> {
    let mut streams = Vec::with_capacity(count);
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
    for index in 0..count {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .with_context(|| format!("idle connection {index} of {count} to {target}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(request.as_bytes())?;
        let status = read_response(&mut stream)
            .with_context(|| format!("idle connection {index}: response"))?;
        if status != 200 {
            bail!("idle connection {index}: GET {path} answered {status}");
        }
        streams.push(stream);
    }
    Ok(IdleConnections { streams })
}

/// Reads one response with a `Content-Length` body and returns its status.
fn read_response(stream: &mut TcpStream) -> Result<u16> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .context("response without content-length")?;
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .context("no status")?;
            if buffer.len() >= end + 4 + length {
                return Ok(status);
            }
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("closed before the end of the response");
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}
