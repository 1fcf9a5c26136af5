//! The IO seam: everything that differs between the io_uring and the epoll backend.
//!
//! Above this crate the server and the client are one code base each: a shard or client IO
//! thread runs a current-thread tokio runtime (tokio-uring builds on one too), spawns `!Send`
//! tasks with `spawn_local`, and uses tokio's timers and `Notify`. Only sockets and file reads
//! differ, and they live here, behind owned buffer APIs (`read(buf) -> (result, buf)`) that
//! both backends can implement without copies. Replacing tokio-uring means changing this
//! crate only.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

pub mod driver;
pub mod recv;
pub mod tls;

/// Which IO backend to use, as configured (`burst.nexus.io.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// io_uring when the kernel and the sandbox allow it, else epoll with a warning.
    #[default]
    Auto,
    /// io_uring or nothing: start fails when it is unavailable.
    IoUring,
    /// epoll (tokio's reactor), always available.
    Epoll,
}

/// The choice that picks exactly this backend (no fallback).
impl From<Backend> for BackendChoice {
    fn from(backend: Backend) -> BackendChoice {
        match backend {
            Backend::IoUring => BackendChoice::IoUring,
            Backend::Epoll => BackendChoice::Epoll,
        }
    }
}

impl FromStr for BackendChoice {
    type Err = BackendError;

    fn from_str(text: &str) -> Result<Self, BackendError> {
        match text {
            "auto" => Ok(BackendChoice::Auto),
            "io_uring" => Ok(BackendChoice::IoUring),
            "epoll" => Ok(BackendChoice::Epoll),
            other => Err(BackendError::Unknown(other.to_string())),
        }
    }
}

/// Why a backend cannot be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// Not a backend's name.
    #[error("unknown IO backend {0:?}; expected auto, io_uring or epoll")]
    Unknown(String),
    /// io_uring was required and does not work here.
    #[error("io_uring is unavailable: {0}")]
    Unavailable(#[source] ProbeError),
}

/// Why io_uring does not work here.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// No ring could be created (no io_uring in the kernel, `kernel.io_uring_disabled`, a
    /// seccomp profile that blocks `io_uring_setup`).
    #[error("cannot create a ring: {0}")]
    Setup(#[source] io::Error),
    /// A ring was created and a no-op on it failed (a profile that blocks `io_uring_enter`).
    #[error("a no-op on the ring failed: {0}")]
    NoOp(#[source] io::Error),
    /// The scratch thread could not be started.
    #[error("cannot start the probe thread: {0}")]
    Thread(#[source] io::Error),
    /// The probe panicked.
    #[error("the probe panicked")]
    Panicked,
}

/// The backend in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// tokio-uring.
    IoUring,
    /// tokio's epoll reactor.
    Epoll,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::IoUring => "io_uring",
            Backend::Epoll => "epoll",
        })
    }
}

/// Resolves a choice to a backend. `Auto` probes io_uring and falls back to epoll, returning
/// the reason for the fallback so the caller can log it once; a forced `IoUring` that does
/// not work is an error naming the reason.
pub fn select_backend(
    choice: BackendChoice,
) -> Result<(Backend, Option<ProbeError>), BackendError> {
    match choice {
        BackendChoice::Epoll => Ok((Backend::Epoll, None)),
        BackendChoice::IoUring => probe_io_uring()
            .map(|()| (Backend::IoUring, None))
            .map_err(BackendError::Unavailable),
        BackendChoice::Auto => match probe_io_uring() {
            Ok(()) => Ok((Backend::IoUring, None)),
            Err(reason) => Ok((Backend::Epoll, Some(reason))),
        },
    }
}

/// Starts a tiny io_uring runtime on a scratch thread and completes one no-op on it: this
/// catches a kernel without io_uring, `kernel.io_uring_disabled`, and seccomp profiles that
/// block `io_uring_setup` or `io_uring_enter` (Docker's default does), without touching the
/// shard threads.
pub fn probe_io_uring() -> Result<(), ProbeError> {
    let probe = std::thread::Builder::new()
        .name("nexus-uring-probe".into())
        .spawn(|| {
            let runtime = tokio_uring::Runtime::new(tokio_uring::builder().entries(8))
                .map_err(ProbeError::Setup)?;
            runtime
                .block_on(tokio_uring::no_op())
                .map_err(ProbeError::NoOp)
        })
        .map_err(ProbeError::Thread)?;
    probe.join().unwrap_or(Err(ProbeError::Panicked))
}

/// Runs `future` to completion on a new runtime of this backend, on the current thread.
/// `ring_entries` sizes the io_uring submission queue.
pub fn block_on<F: Future>(
    backend: Backend,
    ring_entries: u32,
    future: F,
) -> io::Result<F::Output> {
    match backend {
        Backend::IoUring => {
            let runtime = tokio_uring::Runtime::new(tokio_uring::builder().entries(ring_entries))?;
            Ok(runtime.block_on(future))
        }
        Backend::Epoll => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            Ok(local.block_on(&runtime, future))
        }
    }
}

/// A listening socket of one shard.
pub enum Listener {
    /// io_uring, with a second handle on the same (non-blocking) socket for accepting what
    /// already waits without a trip through the ring.
    Uring {
        /// Accepts through the ring when nothing waits.
        ring: tokio_uring::net::TcpListener,
        /// The same socket (a duplicate descriptor), for non-blocking `accept`.
        ready: std::net::TcpListener,
    },
    /// epoll: tokio's listener, which accepts what waits before it waits.
    Epoll(tokio::net::TcpListener),
}

impl Listener {
    /// Adopts a bound, listening, non-blocking std socket. Must run inside the shard's runtime.
    pub fn from_std(backend: Backend, socket: std::net::TcpListener) -> io::Result<Self> {
        Ok(match backend {
            Backend::IoUring => {
                // Non-blocking whatever the caller did: `ready.accept()` must never block the
                // shard (the flag is shared by both handles; the ring waits either way).
                socket.set_nonblocking(true)?;
                Listener::Uring {
                    ready: socket.try_clone()?,
                    ring: tokio_uring::net::TcpListener::from_std(socket),
                }
            }
            Backend::Epoll => Listener::Epoll(tokio::net::TcpListener::from_std(socket)?),
        })
    }

    /// Accepts one connection, with TCP_NODELAY. A connection already waiting is taken at
    /// once, without yielding: one io_uring accept per wake-up would take a backlog of N
    /// connections N turns of a busy shard's scheduler, and their handshakes would wait.
    pub async fn accept(&self) -> io::Result<(Connection, SocketAddr)> {
        match self {
            Listener::Uring { ring, ready } => {
                let (stream, peer) = match ready.accept() {
                    Ok((stream, peer)) => (tokio_uring::net::TcpStream::from_std(stream), peer),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => ring.accept().await?,
                    Err(e) => return Err(e),
                };
                stream.set_nodelay(true)?;
                Ok((Connection::plain(Socket::Uring(Rc::new(stream))), peer))
            }
            Listener::Epoll(l) => {
                let (stream, peer) = l.accept().await?;
                stream.set_nodelay(true)?;
                Ok((Connection::plain(Socket::Epoll(Rc::new(stream))), peer))
            }
        }
    }
}

/// A connected socket, plain or with a TLS session ([`tls`]); clones share it (one reader
/// task, one writer task).
#[derive(Clone)]
pub struct Connection {
    socket: Socket,
    tls: Option<Rc<tls::Session>>,
}

impl Connection {
    fn plain(socket: Socket) -> Connection {
        Connection { socket, tls: None }
    }

    /// Connects to `addr` with TCP_NODELAY. Must run inside a runtime of `backend`.
    pub async fn connect(backend: Backend, addr: SocketAddr) -> io::Result<Self> {
        match backend {
            Backend::IoUring => {
                let stream = tokio_uring::net::TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                Ok(Connection::plain(Socket::Uring(Rc::new(stream))))
            }
            Backend::Epoll => {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                Ok(Connection::plain(Socket::Epoll(Rc::new(stream))))
            }
        }
    }

    /// Adopts a connected std socket (with TCP_NODELAY). Must run inside a runtime of
    /// `backend`.
    pub fn from_std(backend: Backend, stream: std::net::TcpStream) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        Ok(Connection::plain(match backend {
            Backend::IoUring => {
                Socket::Uring(Rc::new(tokio_uring::net::TcpStream::from_std(stream)))
            }
            Backend::Epoll => Socket::Epoll(Rc::new(tokio::net::TcpStream::from_std(stream)?)),
        }))
    }

    /// This connection as the server end of a TLS session; [`handshake`](Self::handshake)
    /// next.
    pub fn server_tls(self, config: Arc<rustls::ServerConfig>) -> io::Result<Connection> {
        let session = tls::Session::server(config)?;
        Ok(Connection {
            socket: self.socket,
            tls: Some(Rc::new(session)),
        })
    }

    /// This connection as the client end of a TLS session with the server `name`;
    /// [`handshake`](Self::handshake) next.
    pub fn client_tls(
        self,
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> io::Result<Connection> {
        let session = tls::Session::client(config, name)?;
        Ok(Connection {
            socket: self.socket,
            tls: Some(Rc::new(session)),
        })
    }

    /// Runs the TLS handshake when the connection has a session (else returns at once).
    /// Bound it with a deadline: a peer may stop half-way.
    pub async fn handshake(&self) -> Result<(), tls::HandshakeError> {
        match &self.tls {
            Some(session) => tls::handshake(&self.socket, session).await,
            None => Ok(()),
        }
    }

    /// Whether the connection has a TLS session.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The first TLS failure on this connection, described (a refused certificate, an
    /// alert), for messages that would otherwise only say that the connection was lost.
    pub fn tls_failure(&self) -> Option<String> {
        self.tls.as_ref().and_then(|session| session.failure())
    }

    /// Sends `bytes` as they are, outside any TLS session, and closes the way TCP expects
    /// (half-close, then read and drop until the peer's FIN or `deadline`): how a TLS port
    /// refuses a plaintext client in words it can read.
    pub async fn refuse_in_plaintext(&self, bytes: Bytes, deadline: Instant) {
        let socket = &self.socket;
        let refuse = async {
            let (result, _) = socket.write_all(vec![bytes]).await;
            socket.shutdown(std::net::Shutdown::Write);
            if result.is_err() {
                return;
            }
            let mut scratch = BytesMut::with_capacity(4096);
            loop {
                scratch.clear();
                let (result, back) = socket.read_up_to(scratch, usize::MAX).await;
                scratch = back;
                if !matches!(result, Ok(n) if n > 0) {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout_at(deadline.into(), refuse).await;
        socket.shutdown(std::net::Shutdown::Both);
    }

    /// Reads into the spare capacity of `buf` (after its current contents) and returns it.
    /// `Ok(0)` is end of stream.
    pub async fn read(&self, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        self.read_up_to(buf, usize::MAX).await
    }

    /// As [`read`](Self::read), taking at most `max` bytes (at least 1), so a caller can stop
    /// a read at a frame boundary.
    pub async fn read_up_to(&self, buf: BytesMut, max: usize) -> (io::Result<usize>, BytesMut) {
        match &self.tls {
            None => self.socket.read_up_to(buf, max).await,
            Some(session) => tls::read(&self.socket, session, buf, max).await,
        }
    }

    /// Asks the kernel not to report the socket readable (and not to wake a waiting read)
    /// before `bytes` are queued (`SO_RCVLOWAT`; at least 1). A read that finds data still
    /// returns what there is; the kernel also wakes early when its buffer or the peer's window
    /// runs short, or at the peer's FIN, so waiting for more than will come cannot hang.
    ///
    /// With TLS, `bytes` counts plaintext still to come, and part of it may already sit in
    /// the session, read and not yet opened: the session sets the kernel's mark itself before
    /// each wait, to `bytes` less what it holds (a mark of the whole rest would wait for bytes
    /// that were already read, and hang at the end of a stream).
    pub fn set_recv_lowat(&self, bytes: usize) -> io::Result<()> {
        match &self.tls {
            None => self.socket.set_recv_lowat(bytes),
            Some(session) => {
                session.want_recv_lowat(bytes);
                Ok(())
            }
        }
    }

    /// Writes all of `segments` (gathered, as few system calls as the socket allows) and
    /// hands the vector back so the caller can recycle the buffers.
    pub async fn write_all(&self, segments: Vec<Bytes>) -> (io::Result<()>, Vec<Bytes>) {
        match &self.tls {
            None => self.socket.write_all(segments).await,
            Some(session) => tls::write(&self.socket, session, segments).await,
        }
    }

    /// Shuts down both directions: a pending read returns, the peer sees FIN.
    pub fn shutdown(&self) {
        self.socket.shutdown(std::net::Shutdown::Both);
    }

    /// Half-closes: the peer sees FIN after everything written so far (with TLS, after the
    /// session's close_notify); reading goes on.
    pub async fn shutdown_write(&self) {
        if let Some(session) = &self.tls {
            tls::close(&self.socket, session).await;
        }
        self.socket.shutdown(std::net::Shutdown::Write);
    }

    /// Closes a connection whose protocol has ended the way TCP expects: waits for `flushed`
    /// (the writer, which sends what is queued and then half-closes with
    /// [`shutdown_write`](Self::shutdown_write)) while reading and dropping input until the
    /// peer's FIN, both bounded by `deadline`. Returns whether both finished in time.
    ///
    /// Why: a socket closed with unread input makes the kernel answer with a reset and drop
    /// whatever it had not sent yet, which is the tail of the last streams. A peer that keeps
    /// sending (CREDIT as it reads), never reads or never closes only holds the socket until
    /// `deadline`; then both directions are shut down, which ends any write still pending.
    pub async fn linger<F: Future + Unpin>(&self, flushed: &mut F, deadline: Instant) -> bool {
        let both = async {
            let (_, eof) = tokio::join!(flushed, self.discard_until_eof());
            eof
        };
        let clean = matches!(
            tokio::time::timeout_at(deadline.into(), both).await,
            Ok(Ok(()))
        );
        if !clean {
            // Ends the operations still in flight (a write to a peer that does not read):
            // io_uring keeps a descriptor open until its operations complete.
            self.shutdown();
        }
        clean
    }

    /// Reads and drops input until the peer's FIN (`Ok`) or an error.
    async fn discard_until_eof(&self) -> io::Result<()> {
        let mut scratch = BytesMut::with_capacity(64 << 10);
        loop {
            scratch.clear();
            let (result, back) = self.read(scratch).await;
            scratch = back;
            if result? == 0 {
                return Ok(());
            }
        }
    }
}

/// A connected socket of either backend.
#[derive(Clone)]
pub(crate) enum Socket {
    Uring(Rc<tokio_uring::net::TcpStream>),
    Epoll(Rc<tokio::net::TcpStream>),
}

impl Socket {
    async fn read_up_to(&self, mut buf: BytesMut, max: usize) -> (io::Result<usize>, BytesMut) {
        if buf.len() == buf.capacity() {
            buf.reserve(64 << 10);
        }
        let max = max.max(1);
        match self {
            Socket::Uring(s) => {
                // tokio-uring reads at the start of a plain buffer, over what it holds; a
                // slice of the spare capacity appends (its set_init grows the length).
                use tokio_uring::buf::BoundedBuf;
                let (len, capacity) = (buf.len(), buf.capacity());
                let end = len + (capacity - len).min(max);
                let (result, slice) = s.read(buf.slice(len..end)).await;
                (result, slice.into_inner())
            }
            Socket::Epoll(s) => loop {
                if let Err(e) = s.readable().await {
                    return (Err(e), buf);
                }
                match s.try_read_buf(&mut (&mut buf).limit(max)) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    result => return (result, buf),
                }
            },
        }
    }

    fn set_recv_lowat(&self, bytes: usize) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Socket::Uring(s) => s.as_raw_fd(),
            Socket::Epoll(s) => s.as_raw_fd(),
        };
        let value = libc::c_int::try_from(bytes.max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fd` is this connection's open socket (borrowed for the call); the option
        // value points to a live c_int and its exact size is passed.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    async fn write_all(&self, segments: Vec<Bytes>) -> (io::Result<()>, Vec<Bytes>) {
        let total: usize = segments.iter().map(Bytes::len).sum();
        match self {
            Socket::Uring(s) => {
                let mut pending = segments;
                let mut left = total;
                loop {
                    let (result, back) = s.writev(pending).await;
                    match result {
                        Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), back),
                        Ok(n) if n >= left => return (Ok(()), back),
                        // A short write: resubmit the rest (new handles, no data copied).
                        // Buffers of the first attempt are then freed, not recycled: rare.
                        Ok(n) => {
                            left -= n;
                            pending = remaining(&back, n);
                        }
                        Err(e) => return (Err(e), back),
                    }
                }
            }
            Socket::Epoll(s) => {
                let mut written = 0;
                while written < total {
                    if let Err(e) = s.writable().await {
                        return (Err(e), segments);
                    }
                    let slices = io_slices(&segments, written);
                    match s.try_write_vectored(&slices) {
                        Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), segments),
                        Ok(n) => written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return (Err(e), segments),
                    }
                }
                (Ok(()), segments)
            }
        }
    }

    fn shutdown(&self, how: std::net::Shutdown) {
        // Errors mean the socket is already gone, which is the goal.
        let _ = match self {
            Socket::Uring(s) => s.shutdown(how),
            Socket::Epoll(s) => socket2::SockRef::from(&**s).shutdown(how),
        };
    }
}

/// A read-only file of a source.
#[allow(missing_docs)] // the variants are the two backends
pub enum File {
    Uring(tokio_uring::fs::File),
    /// The epoll backend reads with `pread` on the shard thread: files are served from the
    /// page cache in the common case, and a thread hop per chunk would cost more than it saves.
    Std(std::fs::File),
}

impl File {
    /// Adopts an open file.
    pub fn from_std(backend: Backend, file: std::fs::File) -> Self {
        match backend {
            Backend::IoUring => File::Uring(tokio_uring::fs::File::from_std(file)),
            Backend::Epoll => File::Std(file),
        }
    }

    /// Reads at most `len` bytes at `offset` into `buf`, which must be empty with a capacity
    /// of at least `len`; `Ok(0)` is end of file.
    pub async fn read_at(
        &self,
        mut buf: BytesMut,
        offset: u64,
        len: usize,
    ) -> (io::Result<usize>, BytesMut) {
        debug_assert!(buf.is_empty() && buf.capacity() >= len);
        match self {
            File::Uring(f) => {
                use tokio_uring::buf::BoundedBuf;
                let (result, slice) = f.read_at(buf.slice(0..len), offset).await;
                (result, slice.into_inner())
            }
            File::Std(f) => {
                // Into the spare capacity as it is: zero-filling it first (`resize`) was one
                // more pass over every chunk's memory.
                let spare = &mut buf.spare_capacity_mut()[..len];
                let result = rustix::io::pread(f, spare, offset)
                    .map(|(filled, _)| filled.len())
                    .map_err(io::Error::from);
                if let Ok(n) = result {
                    // SAFETY: `pread` initialised the first `n` bytes of the spare capacity
                    // (it returned them as `filled`), and `n <= len <= capacity`.
                    unsafe { buf.set_len(n) };
                }
                (result, buf)
            }
        }
    }
}

/// The segments after the first `skip` bytes, as new `Bytes` handles (no data copied).
fn remaining(segments: &[Bytes], mut skip: usize) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(segments.len());
    for seg in segments {
        if skip >= seg.len() {
            skip -= seg.len();
            continue;
        }
        out.push(seg.slice(skip..));
        skip = 0;
    }
    out
}

fn io_slices(segments: &[Bytes], mut skip: usize) -> Vec<io::IoSlice<'_>> {
    let mut out = Vec::with_capacity(segments.len().min(1024));
    for seg in segments {
        if skip >= seg.len() {
            skip -= seg.len();
            continue;
        }
        out.push(io::IoSlice::new(&seg[skip..]));
        skip = 0;
        if out.len() == 1024 {
            break; // IOV_MAX
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    /// A second read appends after what the buffer holds (a frame split across reads).
    fn read_appends(backend: Backend) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        block_on(backend, 8, async move {
            let connection = Connection::connect(backend, address).await.unwrap();
            let (mut peer, _) = listener.accept().unwrap();
            peer.write_all(b"first ").unwrap();
            let (n, buf) = connection.read(BytesMut::with_capacity(64)).await;
            assert_eq!(n.unwrap(), 6);
            peer.write_all(b"second").unwrap();
            let (n, buf) = connection.read(buf).await;
            assert_eq!(n.unwrap(), 6);
            assert_eq!(&buf[..], b"first second");
            // A full buffer grows instead of reading nothing (which would look like EOF).
            let mut full = BytesMut::with_capacity(4);
            full.extend_from_slice(b"abcd");
            let spare = full.capacity() - full.len();
            full.extend_from_slice(&vec![b'x'; spare]);
            peer.write_all(b"!").unwrap();
            let (n, buf) = connection.read(full).await;
            assert_eq!(n.unwrap(), 1);
            assert_eq!(buf.last(), Some(&b'!'));
            // A bounded read leaves the rest in the socket for the next one.
            peer.write_all(b"0123456789").unwrap();
            let mut buf = BytesMut::with_capacity(64);
            let mut total = 0;
            while total < 4 {
                let (n, next) = connection.read_up_to(buf, 4 - total).await;
                total += n.unwrap();
                buf = next;
            }
            assert_eq!(&buf[..], b"0123");
            let (n, buf) = connection.read_up_to(buf, 64).await;
            assert_eq!(n.unwrap(), 6);
            assert_eq!(&buf[..], b"0123456789");
        })
        .unwrap();
    }

    /// A read waiting for a low-water mark the peer will never reach still returns what
    /// came, at the peer's FIN: the mark cannot hang a connection whose peer stops short.
    fn low_water_mark_yields_at_fin(backend: Backend) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        block_on(backend, 8, async move {
            let connection = Connection::connect(backend, address).await.unwrap();
            connection.set_recv_lowat(64 << 10).unwrap();
            let (mut peer, _) = listener.accept().unwrap();
            peer.write_all(b"ten bytes!").unwrap();
            peer.shutdown(std::net::Shutdown::Write).unwrap();
            let mut buf = BytesMut::with_capacity(128 << 10);
            loop {
                let (n, next) = connection.read(buf).await;
                buf = next;
                if n.unwrap() == 0 {
                    break;
                }
            }
            assert_eq!(&buf[..], b"ten bytes!");
        })
        .unwrap();
    }

    #[test]
    fn low_water_mark_yields_at_fin_epoll() {
        low_water_mark_yields_at_fin(Backend::Epoll);
    }

    #[test]
    fn low_water_mark_yields_at_fin_io_uring() {
        low_water_mark_yields_at_fin(Backend::IoUring);
    }

    #[test]
    fn read_appends_io_uring() {
        read_appends(Backend::IoUring);
    }

    #[test]
    fn read_appends_epoll() {
        read_appends(Backend::Epoll);
    }
}
