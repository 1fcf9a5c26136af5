//! A scripted Nexus server over a real socket: it does the handshake by the book, then answers
//! each INITIATE with whatever frames the test gives, true or not. For testing what clients do
//! with a lying, hostile or silent server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::BytesMut;
use nexus_protocol::frame::{self, Accept, Frame, Initiate, PREFACE};

/// What a fake server answers to one INITIATE: the frames to send, in order.
type Script = dyn Fn(&Initiate) -> Vec<Frame> + Send + Sync;

/// A fake server on 127.0.0.1; stops accepting when dropped.
pub struct FakeServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeServer {
    /// Starts one with ACCEPT's usual values ([`default_accept`]: no authentication, 5 s
    /// heartbeats, 4 MiB windows and frames) answering every INITIATE with `script`.
    pub fn start(script: impl Fn(&Initiate) -> Vec<Frame> + Send + Sync + 'static) -> FakeServer {
        FakeServer::with_accept(default_accept(), script)
    }

    /// As [`start`](Self::start), with this ACCEPT.
    pub fn with_accept(
        accept: Accept,
        script: impl Fn(&Initiate) -> Vec<Frame> + Send + Sync + 'static,
    ) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let script: Arc<Script> = Arc::new(script);
        let thread = std::thread::spawn(move || {
            for socket in listener.incoming() {
                if stopping.load(Ordering::Acquire) {
                    return;
                }
                let Ok(socket) = socket else { continue };
                let (script, accept) = (Arc::clone(&script), accept.clone());
                std::thread::spawn(move || serve(socket, &accept, &*script));
            }
        });
        FakeServer {
            address,
            stop,
            thread: Some(thread),
        }
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.address);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// ACCEPT as a plain server sends it to a client with the default 4 MiB window.
pub fn default_accept() -> Accept {
    Accept {
        version: 1,
        auth_required: false,
        nonce: [6; 32],
        initial_window: 4 << 20,
        max_frame_size: 4 << 20,
        max_streams: 1024,
        max_paradata: 64 << 10,
        heartbeat_interval_ms: 5000,
        name: "fake".into(),
        max_window: 16 << 20,
    }
}

/// One connection: preface and BIND in, preface and ACCEPT out, then the script per INITIATE;
/// everything else is read and ignored, until the client closes.
fn serve(mut socket: TcpStream, accept: &Accept, script: &Script) {
    let mut buf = BytesMut::new();
    let mut preface_seen = false;
    let mut read = [0u8; 64 << 10];
    loop {
        if !preface_seen && buf.len() >= PREFACE.len() {
            if buf[..PREFACE.len()] != PREFACE {
                return;
            }
            let _ = buf.split_to(PREFACE.len());
            preface_seen = true;
        }
        while let (true, Ok(Some(frame))) = (preface_seen, frame::decode(&mut buf, 16 << 20)) {
            let reply = match frame {
                Frame::Bind(_) => {
                    let mut out = PREFACE.to_vec();
                    out.extend_from_slice(&Frame::Accept(accept.clone()).to_bytes());
                    out
                }
                Frame::Initiate(initiate) => script(&initiate)
                    .iter()
                    .flat_map(|f| f.to_bytes().to_vec())
                    .collect(),
                _ => Vec::new(),
            };
            if socket.write_all(&reply).is_err() {
                return;
            }
        }
        match socket.read(&mut read) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&read[..n]),
        }
    }
}
