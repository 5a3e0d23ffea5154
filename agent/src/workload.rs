//! Loopback workloads for gateway mode (beside the datapath): pod backends and pod clients.
//!
//! In gateway mode a pod is an address on 127.0.0.0/8: its backend listens there and its client
//! connects *from* there, because the proxy identifies a caller by its source IP. The demo and
//! the end-to-end tests use these to play the pods of a manifest.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

/// What a backend answers to a method and path: status and body.
pub type Responder = Arc<dyn Fn(&http::Method, &str) -> (u16, String) + Send + Sync>;

/// A running backend; it stops when dropped.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves HTTP/1.1 on `addr` with `respond` until the returned `Backend` is dropped.
pub async fn serve(addr: SocketAddr, respond: Responder) -> std::io::Result<Backend> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let respond = respond.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                    let respond = respond.clone();
                    async move {
                        let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
                        let (status, body) = respond(request.method(), &path);
                        let mut response = http::Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() =
                            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Backend { addr, task })
}

/// The Star Wars deathstar (cilium.md §6).
pub fn deathstar() -> Responder {
    Arc::new(|method, path| match (method.as_str(), path) {
        ("POST", "/v1/request-landing") => (200, "Ship landed\n".to_string()),
        ("PUT", "/v1/exhaust-port") => (503, "Panic: deathstar exploded\n".to_string()),
        ("GET", "/v1") | ("GET", "/v1/") => (200, "{\"name\": \"Death Star\"}\n".to_string()),
        _ => (404, "Not found\n".to_string()),
    })
}

/// Istio's helloworld sample: answers its version and instance.
pub fn helloworld(version: &str, instance: &str) -> Responder {
    let body = format!("Hello version: {version}, instance: {instance}\n");
    Arc::new(move |_, _| (200, body.clone()))
}

/// What a client saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Response { status: u16, body: String },
    /// The connection was accepted and then closed or reset without an HTTP response: how the
    /// proxy enforces an L3/L4 drop in gateway mode.
    Closed,
    /// No connection (nothing listening, refused, unreachable).
    ConnectFailed(String),
    TimedOut,
}

impl Outcome {
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Response { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Response { status, body } => write!(f, "{status} {}", body.trim_end()),
            Outcome::Closed => f.write_str("connection closed without a response"),
            Outcome::ConnectFailed(e) => write!(f, "connect failed: {e}"),
            Outcome::TimedOut => f.write_str("timed out"),
        }
    }
}

/// Sends one HTTP/1.1 request to `target` on a new connection from `source` (port chosen by
/// the kernel), with `host` as the Host header.
pub async fn request(source: IpAddr, target: SocketAddr, method: &str, path: &str, host: &str, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, request_inner(source, target, method, path, host)).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::TimedOut,
    }
}

async fn request_inner(source: IpAddr, target: SocketAddr, method: &str, path: &str, host: &str) -> Outcome {
    let connected = async {
        let socket = if source.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.bind(SocketAddr::new(source, 0))?;
        socket.connect(target).await
    };
    let stream = match connected.await {
        Ok(stream) => stream,
        Err(e) => return Outcome::ConnectFailed(e.to_string()),
    };
    let Ok((mut sender, connection)) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await
    else {
        return Outcome::Closed;
    };
    let driver = tokio::spawn(connection);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host)
        .body(Full::new(Bytes::new()));
    let request = match request {
        Ok(request) => request,
        Err(e) => return Outcome::ConnectFailed(format!("invalid request: {e}")),
    };
    let outcome = match sender.send_request(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            match response.into_body().collect().await {
                Ok(body) => Outcome::Response { status, body: String::from_utf8_lossy(&body.to_bytes()).into_owned() },
                Err(_) => Outcome::Closed,
            }
        }
        Err(_) => Outcome::Closed,
    };
    driver.abort();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn client_from_a_pod_address_gets_the_backend_answer() -> anyhow::Result<()> {
        let backend = serve("127.0.0.1:0".parse()?, deathstar()).await?;
        let outcome = request("127.0.0.9".parse()?, backend.addr, "POST", "/v1/request-landing", "deathstar", Duration::from_secs(5)).await;
        assert_eq!(outcome, Outcome::Response { status: 200, body: "Ship landed\n".into() });
        Ok(())
    }

    #[tokio::test]
    async fn closed_connection_is_reported_as_closed() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            if let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        let outcome = request("127.0.0.1".parse()?, addr, "GET", "/", "x", Duration::from_secs(5)).await;
        assert_eq!(outcome, Outcome::Closed);
        Ok(())
    }
}
