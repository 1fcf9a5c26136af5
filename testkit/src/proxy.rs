//! A TCP proxy on 127.0.0.1 for fault injection: connections pass through until the test
//! cuts them, either all at once the next time the client speaks (a pooled connection that
//! looks alive but is dead) or after a number of bytes towards the client (a connection
//! dropped mid-stream).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

#[derive(Default)]
struct State {
    /// Connections accepted before a `sever` get cut when the client next sends.
    generation: AtomicU64,
    /// Bytes towards the client after which the connection is cut (`u64::MAX`: never).
    cut_after: AtomicU64,
    accepted: AtomicUsize,
}

/// A running proxy; it stops accepting when dropped (established pumps end with their sockets).
pub struct Proxy {
    address: SocketAddr,
    state: Arc<State>,
}

impl Proxy {
    /// Forwards connections made to [`address`](Self::address) to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let state = Arc::new(State {
            cut_after: AtomicU64::new(u64::MAX),
            ..State::default()
        });
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                shared.accepted.fetch_add(1, SeqCst);
                let generation = shared.generation.load(SeqCst);
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let up = Arc::clone(&shared);
                std::thread::spawn(move || pump_up(client, server, generation, up));
                let down = Arc::clone(&shared);
                std::thread::spawn(move || pump_down(s2, c2, down));
            }
        });
        Proxy { address, state }
    }

    /// Where clients connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(SeqCst)
    }

    /// Every connection open now dies, silently, the next time its client sends anything:
    /// nothing is forwarded and both sockets close. New connections are not affected.
    pub fn sever_on_next_send(&self) {
        self.state.generation.fetch_add(1, SeqCst);
    }

    /// Connections (open and new) are closed once `bytes` bytes went to their client.
    pub fn cut_after(&self, bytes: u64) {
        self.state.cut_after.store(bytes, SeqCst);
    }
}

fn pump_up(mut from: TcpStream, mut to: TcpStream, generation: u64, state: Arc<State>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if state.generation.load(SeqCst) != generation {
            break;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

fn pump_down(mut from: TcpStream, mut to: TcpStream, state: Arc<State>) {
    let mut buf = vec![0u8; 64 << 10];
    let mut sent = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let limit = state.cut_after.load(SeqCst);
        let n = n.min(limit.saturating_sub(sent) as usize);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
        if sent >= limit {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
