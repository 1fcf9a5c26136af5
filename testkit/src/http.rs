//! HTTP and Prometheus helpers for the admin endpoint, with plain sockets so a test sees the
//! bytes a scraper would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use crate::PATIENCE;

/// A plain HTTP/1.1 GET on loopback: the status code and the body.
pub fn http_get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(address, "GET", path, &[], b"")
}

/// A plain HTTP/1.1 request on loopback with these headers and body: the status code and
/// the body of the answer.
pub fn http_request(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut socket = TcpStream::connect(address)?;
    socket.set_read_timeout(Some(PATIENCE))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    socket.write_all(head.as_bytes())?;
    // A server may answer (413) before taking the whole body: a write error then is fine.
    let _ = socket.write_all(body);
    let mut response = Vec::new();
    let _ = socket.read_to_end(&mut response);
    parse_response(&response)
}

/// The status code and body of an HTTP/1.1 response.
fn parse_response(response: &[u8]) -> std::io::Result<(u16, String)> {
    let response = String::from_utf8_lossy(response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string());
    Ok((status, body))
}

/// An https GET (TLS 1.3, ALPN http/1.1) of `path` from `address`, checking its certificate
/// against the PEM CA `ca` and the name `localhost`: the status code and the body.
pub fn https_get(address: SocketAddr, ca: &std::path::Path, path: &str) -> (u16, String) {
    try_https_get(address, ca, path).unwrap_or_else(|e| panic!("https GET {path}: {e}"))
}

/// [`https_get`], with the failure (a refused certificate, say) as an error.
pub fn try_https_get(
    address: SocketAddr,
    ca: &std::path::Path,
    path: &str,
) -> Result<(u16, String), String> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = crate::tls_stream_to(address, ca, name, b"http/1.1");
    let head = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(head.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    parse_response(&response).map_err(|e| e.to_string())
}

/// The value of the sample `series` (a metric name with its labels, as printed) in a
/// Prometheus text scrape.
pub fn prometheus_sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The value of `series` in a fresh scrape of the admin endpoint at `admin`; 0 when it is not
/// there yet (a counter that never moved is not printed).
pub fn scrape_sample(admin: SocketAddr, series: &str) -> f64 {
    let (status, text) =
        http_get(admin, "/metrics").unwrap_or_else(|e| panic!("scrape of {admin}: {e}"));
    assert_eq!(status, 200, "scrape of {admin}: {text}");
    prometheus_sample(&text, series).unwrap_or(0.0)
}
