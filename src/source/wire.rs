//! `run`'s replication connection: Postgres's streaming replication protocol, each message
//! parsed where it was read.
//!
//! The socket is read in large chunks into one buffer, and the source takes each message as
//! a slice of that buffer, on its own task: no copy per message, no allocation, no channel
//! (docs/benchmarks.md, "Our own replication reader"). A small task owns the socket's
//! writing half and sends the standby status updates: every `status_interval`, at once when
//! a keepalive asks for a reply, and at once for the final position of a stop. It goes on
//! while the source waits for the sinks, so a slow sink never lets `wal_sender_timeout`
//! end the session. Message construction and SCRAM come from `postgres-protocol`; TLS is
//! the same rustls configuration as the query connection's (`PgConnection::client_tls`).
//!
//! `setup` keeps `pgwire-replication` for its one-off session (IDENTIFY_SYSTEM and
//! CREATE_REPLICATION_SLOT with an exported snapshot).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::FutureExt;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::types::Lsn;

/// The socket is read in chunks of at least this much free room.
const READ_ROOM: usize = 64 * 1024;
/// The buffer's size when it has to grow for room.
const READ_BUFFER: usize = 256 * 1024;
/// The largest message accepted: Postgres's own limit for one (1 GB), plus its headers.
pub const MAX_MESSAGE: usize = (1 << 30) + 64 * 1024;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Stream = Box<dyn Io>;

/// What went wrong, in the shape the session's caller sorts (`stream::classify`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum WireError {
    /// The connection failed or closed: a new session may work.
    #[error("{0}")]
    Io(String),
    /// An ErrorResponse.
    #[error("{message} (SQLSTATE {code})")]
    Server { code: String, message: String },
    /// The login failed on our side (an answer we cannot give).
    #[error("{0}")]
    Auth(String),
    /// TLS could not be set up.
    #[error("{0}")]
    Tls(String),
    /// The server sent what the protocol does not allow here.
    #[error("{0}")]
    Protocol(String),
}

fn io_error(what: &str) -> impl Fn(std::io::Error) -> WireError + '_ {
    move |e| WireError::Io(format!("{what}: {e}"))
}

/// Where the server listens.
#[derive(Debug, Clone)]
pub enum Target {
    Tcp {
        host: String,
        port: u16,
    },
    /// A Unix socket: the socket file's path.
    Unix(PathBuf),
}

/// Whether and how TLS is used; the rustls configuration carries the verification.
#[derive(Clone)]
pub enum Tls {
    Off,
    /// TLS when the server offers it, plain otherwise (`sslmode=prefer`).
    Prefer(Arc<rustls::ClientConfig>),
    /// TLS or no connection.
    Require(Arc<rustls::ClientConfig>),
}

/// One session's settings.
#[derive(Clone)]
pub struct Config {
    pub target: Target,
    pub tls: Tls,
    /// The name the server's certificate must carry (a host name or an IP address).
    pub server_name: String,
    pub user: String,
    pub password: String,
    pub database: String,
    pub options: String,
    pub application_name: String,
    pub slot: String,
    pub publication: String,
    pub binary: bool,
    /// Where the stream starts; also the first position confirmed.
    pub start: Lsn,
    pub status_interval: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("target", &self.target)
            .field("user", &self.user)
            .field("database", &self.database)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl Config {
    pub fn is_unix_socket(&self) -> bool {
        matches!(self.target, Target::Unix(_))
    }
}

/// What IDENTIFY_SYSTEM says.
#[derive(Debug, Clone)]
pub struct System {
    pub system_id: String,
}

/// A logged-in replication connection, before the stream starts.
pub struct Connection {
    io: Stream,
    buf: BytesMut,
    cfg: Config,
}

/// One backend message, as tag and body, taken off the front of a buffer.
fn take_message(buf: &mut BytesMut) -> Result<Option<(u8, BytesMut)>, WireError> {
    let Some(len) = frame_len(buf)? else {
        return Ok(None);
    };
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let mut m = buf.split_to(len);
    let tag = m[0];
    m.advance(5);
    Ok(Some((tag, m)))
}

/// The length of the message at the front of `buf` (tag and length word included), once
/// its header is there.
#[inline]
fn frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(WireError::Protocol(format!(
            "replication protocol: a message of length {len}"
        )));
    }
    if len > MAX_MESSAGE {
        return Err(WireError::Protocol(format!(
            "replication protocol: a message of {len} bytes, over the limit of {MAX_MESSAGE}"
        )));
    }
    Ok(Some(len + 1))
}

/// An ErrorResponse's (or NoticeResponse's) SQLSTATE and message.
fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message, mut detail) = (String::new(), String::new(), String::new());
    let mut p = body;
    while let Some((&kind, rest)) = p.split_first() {
        if kind == 0 {
            break;
        }
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let text = String::from_utf8_lossy(&rest[..end]).into_owned();
        match kind {
            b'C' => code = text,
            b'M' => message = text,
            b'D' => detail = text,
            _ => {}
        }
        p = rest.get(end + 1..).unwrap_or_default();
    }
    if !detail.is_empty() {
        message = format!("{message}: {detail}");
    }
    (code, message)
}

fn server_error(body: &[u8]) -> WireError {
    let (code, message) = error_fields(body);
    WireError::Server { code, message }
}

impl Connection {
    /// Connect, negotiate TLS, log in as a replication connection.
    pub async fn open(cfg: Config) -> Result<Connection, WireError> {
        let io: Stream = match &cfg.target {
            Target::Unix(path) => Box::new(
                tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(io_error(&format!("cannot connect to {}", path.display())))?,
            ),
            Target::Tcp { host, port } => {
                let tcp = connect_tcp(host, *port, clamps(&cfg.tls)).await?;
                tcp.set_nodelay(true)
                    .map_err(io_error("cannot set TCP_NODELAY"))?;
                match &cfg.tls {
                    Tls::Off => Box::new(tcp),
                    Tls::Prefer(tls) => negotiate(tcp, tls, &cfg.server_name, false).await?,
                    Tls::Require(tls) => negotiate(tcp, tls, &cfg.server_name, true).await?,
                }
            }
        };
        let mut conn = Connection {
            io,
            buf: BytesMut::with_capacity(8 * 1024),
            cfg,
        };
        conn.login().await?;
        Ok(conn)
    }

    async fn send(&mut self, out: &[u8]) -> Result<(), WireError> {
        self.io
            .write_all(out)
            .await
            .map_err(io_error("cannot write to Postgres"))?;
        self.io
            .flush()
            .await
            .map_err(io_error("cannot write to Postgres"))
    }

    async fn message(&mut self) -> Result<(u8, BytesMut), WireError> {
        loop {
            if let Some(m) = take_message(&mut self.buf)? {
                return Ok(m);
            }
            read_more(&mut self.io, &mut self.buf, 4096, 8 * 1024).await?;
        }
    }

    async fn login(&mut self) -> Result<(), WireError> {
        let mut out = BytesMut::new();
        let params = [
            ("user", self.cfg.user.as_str()),
            ("database", self.cfg.database.as_str()),
            ("replication", "database"),
            ("client_encoding", "UTF8"),
            ("application_name", self.cfg.application_name.as_str()),
            ("options", self.cfg.options.as_str()),
        ];
        frontend::startup_message(params.iter().copied(), &mut out)
            .map_err(|e| WireError::Protocol(format!("cannot write the startup message: {e}")))?;
        self.send(&out).await?;
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'R' => {
                    if body.len() < 4 {
                        return Err(WireError::Protocol("a short authentication request".into()));
                    }
                    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    let data = &body[4..];
                    let mut out = BytesMut::new();
                    let written = match code {
                        0 => continue,
                        3 => frontend::password_message(self.password()?.as_bytes(), &mut out),
                        5 => {
                            let salt: [u8; 4] = data.try_into().map_err(|_| {
                                WireError::Protocol("an MD5 request without its salt".into())
                            })?;
                            let hash = md5_hash(
                                self.cfg.user.as_bytes(),
                                self.password()?.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut out)
                        }
                        10 => {
                            let offered = data
                                .split(|&b| b == 0)
                                .any(|m| m == sasl::SCRAM_SHA_256.as_bytes());
                            if !offered {
                                return Err(WireError::Auth(
                                    "Postgres asks for a SASL mechanism other than SCRAM-SHA-256"
                                        .into(),
                                ));
                            }
                            let s = sasl::ScramSha256::new(
                                self.password()?.as_bytes(),
                                sasl::ChannelBinding::unsupported(),
                            );
                            let w = frontend::sasl_initial_response(
                                sasl::SCRAM_SHA_256,
                                s.message(),
                                &mut out,
                            );
                            scram = Some(s);
                            w
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                WireError::Protocol("SASL continue without a start".into())
                            })?;
                            s.update(data)
                                .map_err(|e| WireError::Auth(format!("SCRAM: {e}")))?;
                            frontend::sasl_response(s.message(), &mut out)
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                WireError::Protocol("SASL final without a start".into())
                            })?;
                            s.finish(data).map_err(|e| {
                                WireError::Auth(format!("SCRAM: the server's proof is wrong: {e}"))
                            })?;
                            continue;
                        }
                        other => {
                            return Err(WireError::Auth(format!(
                                "Postgres asks for an authentication method this engine does not speak (code {other}); use scram-sha-256, md5 or password in pg_hba.conf"
                            )))
                        }
                    };
                    written.map_err(|e| {
                        WireError::Protocol(format!("cannot write the login message: {e}"))
                    })?;
                    self.send(&out).await?;
                }
                b'E' => return Err(server_error(&body)),
                b'Z' => return Ok(()),
                // ParameterStatus, BackendKeyData, notices.
                _ => {}
            }
        }
    }

    fn password(&self) -> Result<&str, WireError> {
        if self.cfg.password.is_empty() {
            return Err(WireError::Auth(
                "Postgres asks for a password and none is set".into(),
            ));
        }
        Ok(&self.cfg.password)
    }

    /// A simple query's rows, as text.
    async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, WireError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)
            .map_err(|e| WireError::Protocol(format!("cannot write a query: {e}")))?;
        self.send(&out).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'D' => rows.push(data_row(&body)?),
                b'E' => error = Some(server_error(&body)),
                b'Z' => return error.map_or(Ok(rows), Err),
                _ => {}
            }
        }
    }

    pub async fn identify_system(&mut self) -> Result<System, WireError> {
        let rows = self.query("IDENTIFY_SYSTEM").await?;
        let system_id = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .ok_or_else(|| WireError::Protocol("IDENTIFY_SYSTEM returned no system id".into()))?;
        Ok(System { system_id })
    }

    /// START_REPLICATION: the stream begins.
    pub async fn start(mut self) -> Result<Session, WireError> {
        let sql = format!(
            "START_REPLICATION SLOT \"{}\" LOGICAL {} (proto_version '1', publication_names '\"{}\"', messages 'true'{})",
            self.cfg.slot.replace('"', "\"\""),
            self.cfg.start,
            self.cfg.publication.replace('"', "\"\"").replace('\'', "''"),
            if self.cfg.binary { ", binary 'true'" } else { "" },
        );
        let mut out = BytesMut::new();
        frontend::query(&sql, &mut out)
            .map_err(|e| WireError::Protocol(format!("cannot write START_REPLICATION: {e}")))?;
        self.send(&out).await?;
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'W' => break,
                b'E' => return Err(server_error(&body)),
                _ => {}
            }
        }
        Ok(Session::streaming(
            self.io,
            self.buf,
            self.cfg.start,
            self.cfg.status_interval,
        ))
    }
}

/// The receive window of a loopback connection, at most (`TCP_WINDOW_CLAMP`). A sidecar
/// beside Postgres reads faster than the walsender writes; with the window wide open, the
/// walsender's every message leaves as a segment of its own, which its own system call
/// carries through the receiving side. Set before connecting, the clamp makes the kernel
/// offer this connection a window scale of 0, so its window stays within 64 KiB for the
/// connection's life, even after the kernel raises the clamp itself as data arrives (during
/// a catch-up `ss` shows the engine's end at `wscale:10,0` with rcv_ssthresh in megabytes,
/// and most reads return 65,534 bytes: docs/benchmarks.md, "What the clamp does"). While the
/// engine naps, the window closes and the walsender's messages queue in its socket and
/// leave together: in alternated catch-ups on this project's machine 20–25 segments per
/// 1,000 events in every run, and 94–101 % of `pg_recvlogical` (docs/benchmarks.md, "The
/// receive window on loopback"). A fixed receive buffer (96 KiB, then 64 KiB) closed the
/// window too, but by memory, which small segments use up faster than their bytes: runs
/// fell into one of two regimes, 17–70 segments or 125–319, at 98 % or at 67–86 %. Other
/// connections, and those certain to be TLS ([`clamps`]), keep the kernel's tuning, which a
/// longer round trip needs.
const LOOPBACK_WINDOW_CLAMP: libc::c_int = 32 * 1024;

/// Whether a loopback connection in this TLS mode gets [`LOOPBACK_WINDOW_CLAMP`]: one that
/// may be plaintext. The clamp has to be set before the socket connects (set after, on a
/// `sslmode=prefer` connection the server answered without TLS, a catch-up ran at 63–75 %
/// of `pg_recvlogical` with 400–512 segments per 1,000 events, against 94 % and 37 before
/// connecting: docs/benchmarks.md, "The window clamp and `sslmode=prefer`"), so a `prefer`
/// connection that does become TLS keeps it (over TLS it measured 95 % with the clamp,
/// 98 and 105 % without). `require` and the `verify-*` modes are TLS or nothing: no clamp.
fn clamps(tls: &Tls) -> bool {
    match tls {
        Tls::Off | Tls::Prefer(_) => true,
        Tls::Require(_) => false,
    }
}

/// Clamp the receive window of a socket not yet connected ([`LOOPBACK_WINDOW_CLAMP`]).
fn clamp_window(socket: &tokio::net::TcpSocket) -> std::io::Result<()> {
    let bytes = LOOPBACK_WINDOW_CLAMP;
    // SAFETY: the descriptor is the socket's own, open while it lives; the option's value
    // is a c_int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::IPPROTO_TCP,
            libc::TCP_WINDOW_CLAMP,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// With `clamp`, a loopback address gets [`LOOPBACK_WINDOW_CLAMP`].
async fn connect_tcp(
    host: &str,
    port: u16,
    clamp: bool,
) -> Result<tokio::net::TcpStream, WireError> {
    let cannot = |e: std::io::Error| WireError::Io(format!("cannot connect to {host}:{port}: {e}"));
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port))
        .await
        .map_err(cannot)?
    {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(cannot)?;
        if clamp && addr.ip().is_loopback() {
            clamp_window(&socket).map_err(cannot)?;
        }
        match socket.connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(cannot(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address")
    })))
}

/// Read what the socket holds into `buf`, with at least `room` bytes free (growing it by
/// `grow` when less is).
async fn read_more<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    room: usize,
    grow: usize,
) -> Result<(), WireError> {
    if buf.capacity() - buf.len() < room {
        buf.reserve(grow);
    }
    let n = rd
        .read_buf(buf)
        .await
        .map_err(io_error("cannot read from Postgres"))?;
    if n == 0 {
        return Err(WireError::Io("Postgres closed the connection".into()));
    }
    Ok(())
}

async fn negotiate(
    mut tcp: tokio::net::TcpStream,
    tls: &Arc<rustls::ClientConfig>,
    server_name: &str,
    required: bool,
) -> Result<Stream, WireError> {
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    tcp.write_all(&out)
        .await
        .map_err(io_error("cannot write to Postgres"))?;
    let answer = tcp
        .read_u8()
        .await
        .map_err(io_error("cannot read Postgres's answer to the TLS request"))?;
    match answer {
        b'S' => {
            let name =
                rustls::pki_types::ServerName::try_from(server_name.to_string()).map_err(|e| {
                    WireError::Tls(format!("{server_name:?} is not a server name: {e}"))
                })?;
            let tls = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    WireError::Tls(
                        crate::tls::explain(&e)
                            .unwrap_or_else(|| format!("TLS handshake with Postgres failed: {e}")),
                    )
                })?;
            Ok(Box::new(tls))
        }
        b'N' if !required => Ok(Box::new(tcp)),
        b'N' => Err(WireError::Tls(
            "Postgres does not offer TLS on this connection, and sslmode demands it".into(),
        )),
        other => Err(WireError::Protocol(format!(
            "Postgres answered the TLS request with {other:#04x}"
        ))),
    }
}

fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, WireError> {
    let malformed = || WireError::Protocol("a malformed DataRow".into());
    let mut p = body;
    if p.len() < 2 {
        return Err(malformed());
    }
    let n = i16::from_be_bytes([p[0], p[1]]);
    p = &p[2..];
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if p.len() < 4 {
            return Err(malformed());
        }
        let len = i32::from_be_bytes([p[0], p[1], p[2], p[3]]);
        p = &p[4..];
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = len as usize;
        if p.len() < len {
            return Err(malformed());
        }
        row.push(Some(String::from_utf8_lossy(&p[..len]).into_owned()));
        p = &p[len..];
    }
    Ok(row)
}

/// What the reading side and the status writer share.
struct Shared {
    /// The position to confirm.
    applied: AtomicU64,
    /// The position in the last status update written.
    sent: AtomicU64,
    /// Wakes the writer: a reply is asked for, a position is urgent, or the session stops.
    wake: Notify,
    /// Each status update written.
    written: Notify,
    reply: AtomicBool,
    urgent: AtomicBool,
    stop: AtomicBool,
    /// Why the writer ended early.
    failed: Mutex<Option<WireError>>,
}

/// A standby status update: written, flushed and applied up to `lsn`.
fn status_update(lsn: Lsn, out: &mut BytesMut) {
    let now = crate::enrich::now_us() - crate::source::stream::PG_EPOCH_OFFSET_US;
    let mut body = [0u8; 34];
    body[0] = b'r';
    for i in 0..3 {
        body[1 + 8 * i..9 + 8 * i].copy_from_slice(&lsn.0.to_be_bytes());
    }
    body[25..33].copy_from_slice(&now.to_be_bytes());
    out.clear();
    out.extend_from_slice(b"d");
    out.extend_from_slice(&(4 + body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
}

/// The status writer: until the session stops, a status update every `interval`, and at
/// once when asked. On a stop it ends the copy (CopyDone) and hands the writing half back.
async fn write_status(
    mut wr: WriteHalf<Stream>,
    shared: Arc<Shared>,
    interval: Duration,
) -> Option<WriteHalf<Stream>> {
    let mut out = BytesMut::with_capacity(64);
    let mut next = Instant::now();
    loop {
        let now = Instant::now();
        let due = now >= next;
        let asked = shared.reply.swap(false, Ordering::AcqRel)
            | shared.urgent.swap(false, Ordering::AcqRel);
        let stop = shared.stop.load(Ordering::Acquire);
        if due || asked || stop {
            let lsn = Lsn(shared.applied.load(Ordering::Acquire));
            status_update(lsn, &mut out);
            if stop {
                frontend::copy_done(&mut out);
            }
            let written = async {
                wr.write_all(&out).await?;
                wr.flush().await
            };
            if let Err(e) = written.await {
                *shared.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(WireError::Io(
                    format!("cannot send a status update to Postgres: {e}"),
                ));
                shared.written.notify_waiters();
                return None;
            }
            shared.sent.fetch_max(lsn.0, Ordering::AcqRel);
            shared.written.notify_waiters();
            if stop {
                return Some(wr);
            }
            next = Instant::now() + interval;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = shared.wake.notified() => {}
        }
    }
}

/// One message of the stream. Slices borrow the session's buffer until the next call.
#[derive(Debug)]
pub enum Event<'a> {
    Begin {
        final_lsn: Lsn,
        /// µs after Postgres's epoch.
        commit_time_micros: i64,
    },
    Commit {
        end_lsn: Lsn,
        commit_time_micros: i64,
    },
    /// Any other pgoutput message (relation, insert, update, delete, truncate, type).
    Change {
        data: &'a [u8],
        /// When the server sent it, µs after Postgres's epoch.
        server_time_micros: i64,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    Message {
        transactional: bool,
        lsn: Lsn,
    },
    KeepAlive {
        wal_end: Lsn,
    },
}

/// A started stream.
pub struct Session {
    rd: ReadHalf<Stream>,
    buf: BytesMut,
    /// Bytes at the front of `buf` handed out by the last message, dropped at the next.
    taken: usize,
    shared: Arc<Shared>,
    writer: Option<tokio::task::JoinHandle<Option<WriteHalf<Stream>>>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            w.abort();
        }
    }
}

#[inline]
fn be64(p: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(p[at..at + 8].try_into().expect("8 bytes"))
}

impl Session {
    /// The session of a connection whose START_REPLICATION was answered; `buf` holds what
    /// was read past the answer.
    fn streaming(io: Stream, mut buf: BytesMut, start: Lsn, status_interval: Duration) -> Session {
        let shared = Arc::new(Shared {
            applied: AtomicU64::new(start.0),
            sent: AtomicU64::new(0),
            wake: Notify::new(),
            written: Notify::new(),
            reply: AtomicBool::new(false),
            urgent: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            failed: Mutex::new(None),
        });
        let (rd, wr) = tokio::io::split(io);
        let writer = tokio::spawn(write_status(wr, shared.clone(), status_interval));
        buf.reserve(READ_BUFFER);
        Session {
            rd,
            buf,
            taken: 0,
            shared,
            writer: Some(writer),
        }
    }

    /// A session over a connection a test plays the server of, streaming from the start.
    #[cfg(test)]
    pub(crate) fn over_tcp(tcp: tokio::net::TcpStream) -> Session {
        Session::streaming(
            Box::new(tcp),
            BytesMut::new(),
            Lsn(0),
            Duration::from_secs(10),
        )
    }

    /// The next message; `None` once the server ended the stream. Cancel-safe: what was
    /// read stays in the session.
    pub async fn next(&mut self) -> Result<Option<Event<'_>>, WireError> {
        let len = loop {
            match self.frame()? {
                Frame::Copy(len) => break len,
                Frame::End => return Ok(None),
                Frame::More => self.fill().await?,
            }
        };
        self.taken = len;
        self.event(5, len - 5).map(Some)
    }

    /// Wait until a message is ready for [`Session::next`] (or the stream ended). Cancel-safe.
    /// ([`Session::ready_now`] reads what the socket already holds without waiting.)
    pub async fn wait(&mut self) -> Result<(), WireError> {
        loop {
            match self.frame()? {
                Frame::More => self.fill().await?,
                _ => {
                    // The message stays for `next`: not taken yet.
                    return Ok(());
                }
            }
        }
    }

    /// Whether a message is ready for [`Session::next`] in what was already read (the socket
    /// is not read).
    pub fn buffered(&mut self) -> Result<bool, WireError> {
        Ok(!matches!(self.frame()?, Frame::More))
    }

    /// Whether a message is ready for [`Session::next`], in what was already read or in what
    /// the socket holds now: read without waiting for more.
    pub fn ready_now(&mut self) -> Result<bool, WireError> {
        loop {
            match self.frame()? {
                Frame::More => match self.fill().now_or_never() {
                    Some(read) => read?,
                    None => return Ok(false),
                },
                _ => return Ok(true),
            }
        }
    }

    /// Confirm up to `lsn` in the next status updates.
    #[inline]
    pub fn update_applied_lsn(&self, lsn: Lsn) {
        self.shared.applied.fetch_max(lsn.0, Ordering::AcqRel);
    }

    /// Send `lsn` now, and wait (at most `limit`) until it is written.
    pub async fn confirm(&self, lsn: Lsn, limit: Duration) -> bool {
        self.update_applied_lsn(lsn);
        self.shared.urgent.store(true, Ordering::Release);
        let deadline = Instant::now() + limit;
        loop {
            let written = self.shared.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            self.shared.wake.notify_one();
            if self.shared.sent.load(Ordering::Acquire) >= lsn.0 {
                return true;
            }
            if self.writer_failed().is_some() {
                return false;
            }
            if tokio::time::timeout_at(deadline, written).await.is_err() {
                return false;
            }
        }
    }

    fn writer_failed(&self) -> Option<WireError> {
        self.shared
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// End the stream as the protocol wants: CopyDone, the server's end of it, Terminate.
    /// The caller bounds how long this may take.
    pub async fn shutdown(mut self) -> Result<(), WireError> {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        // Awaited in place: dropped before it finishes (the caller's time limit), the session
        // still aborts its writer.
        let writer = self
            .writer
            .as_mut()
            .expect("the writer runs until the session ends");
        let Some(mut wr) = writer
            .await
            .map_err(|e| WireError::Io(format!("the status writer failed: {e}")))?
        else {
            return Err(self
                .writer_failed()
                .unwrap_or_else(|| WireError::Io("the status writer failed".into())));
        };
        // What the server still sends until its own CopyDone, then the query's end.
        let mut ended = false;
        loop {
            if self.taken > 0 {
                self.buf.advance(std::mem::take(&mut self.taken));
            }
            match take_message(&mut self.buf)? {
                Some((b'c', _)) => ended = true,
                Some((b'Z', _)) => break,
                Some((b'E', body)) => return Err(server_error(&body)),
                Some(_) => {}
                None => match read_more(&mut self.rd, &mut self.buf, 4096, 8 * 1024).await {
                    Ok(()) => {}
                    // The server closed the connection after its end of the stream.
                    Err(_) if ended => return Ok(()),
                    Err(e) => return Err(e),
                },
            }
        }
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = wr.write_all(&out).await;
        let _ = wr.flush().await;
        Ok(())
    }

    /// Where the next message is: a CopyData (its whole length, left at the front of the
    /// buffer until [`Session::next`] takes it), the end, or more to read. Other messages
    /// are dealt with here.
    #[inline]
    fn frame(&mut self) -> Result<Frame, WireError> {
        loop {
            if self.taken > 0 {
                self.buf.advance(self.taken);
                self.taken = 0;
            }
            let Some(len) = frame_len(&self.buf)? else {
                return Ok(Frame::More);
            };
            if self.buf.len() < len {
                if self.buf.capacity() < len {
                    self.buf.reserve(len - self.buf.len());
                }
                return Ok(Frame::More);
            }
            match self.buf[0] {
                b'd' => return Ok(Frame::Copy(len)),
                b'E' => return Err(server_error(&self.buf[5..len])),
                b'c' => return Ok(Frame::End),
                b'N' => {
                    let (code, message) = error_fields(&self.buf[5..len]);
                    tracing::info!(
                        "Postgres says on the replication connection: {message} ({code})"
                    );
                }
                _ => {}
            }
            self.taken = len;
        }
    }

    async fn fill(&mut self) -> Result<(), WireError> {
        if let Some(e) = self.writer_failed() {
            return Err(e);
        }
        read_more(&mut self.rd, &mut self.buf, READ_ROOM, READ_BUFFER).await
    }

    fn event(&self, start: usize, len: usize) -> Result<Event<'_>, WireError> {
        let p = &self.buf[start..start + len];
        let short = || WireError::Protocol(format!("a short replication message ({len} bytes)"));
        match p.first() {
            Some(b'w') if len >= 25 => {
                let server_time_micros = be64(p, 17) as i64;
                let data = &p[25..];
                match data.first() {
                    Some(b'B') if data.len() >= 21 => Ok(Event::Begin {
                        final_lsn: Lsn(be64(data, 1)),
                        commit_time_micros: be64(data, 9) as i64,
                    }),
                    Some(b'C') if data.len() >= 26 => Ok(Event::Commit {
                        end_lsn: Lsn(be64(data, 10)),
                        commit_time_micros: be64(data, 18) as i64,
                    }),
                    Some(b'M') if data.len() >= 10 => Ok(Event::Message {
                        transactional: data[1] & 1 != 0,
                        lsn: Lsn(be64(data, 2)),
                    }),
                    Some(b'B' | b'C' | b'M') => Err(short()),
                    _ => Ok(Event::Change {
                        data,
                        server_time_micros,
                    }),
                }
            }
            Some(b'k') if len >= 18 => {
                if p[17] != 0 {
                    self.shared.reply.store(true, Ordering::Release);
                    self.shared.wake.notify_one();
                }
                Ok(Event::KeepAlive {
                    wal_end: Lsn(be64(p, 1)),
                })
            }
            Some(b'w' | b'k') => Err(short()),
            Some(other) => Err(WireError::Protocol(format!(
                "an unknown replication message {other:#04x}"
            ))),
            None => Err(short()),
        }
    }
}

enum Frame {
    /// A CopyData message of this length, header included.
    Copy(usize),
    End,
    More,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_data(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![b'd'];
        m.extend_from_slice(&(4 + payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    /// A TCP-level option of the stream, read into a zeroed `T` (a plain C value).
    fn tcp_option<T: Copy>(tcp: &tokio::net::TcpStream, option: libc::c_int) -> T {
        // SAFETY: `T` is a C integer or struct, for which all zeros is a valid value.
        let mut v: T = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<T>() as libc::socklen_t;
        // SAFETY: the stream's own descriptor; `v` and `len` outlive the call, and `len`
        // is `v`'s size.
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(tcp),
                libc::IPPROTO_TCP,
                option,
                (&mut v as *mut T).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        v
    }

    fn window_clamp(tcp: &tokio::net::TcpStream) -> libc::c_int {
        tcp_option(tcp, libc::TCP_WINDOW_CLAMP)
    }

    /// The window scale the connection receives with (`TCP_INFO`'s `tcpi_rcv_wscale`, the
    /// high four bits of its byte).
    fn receive_window_scale(tcp: &tokio::net::TcpStream) -> u8 {
        tcp_option::<libc::tcp_info>(tcp, libc::TCP_INFO).tcpi_snd_rcv_wscale >> 4
    }

    #[tokio::test]
    async fn a_loopback_connection_clamps_its_receive_window() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (ours, _accepted) =
            tokio::join!(connect_tcp("127.0.0.1", port, true), listener.accept());
        let ours = ours.unwrap();
        assert_eq!(window_clamp(&ours), LOOPBACK_WINDOW_CLAMP);
        // What lasts once the kernel raises the clamp as data arrives: no window scaling,
        // the window within 64 KiB.
        assert_eq!(receive_window_scale(&ours), 0);
        // Without the clamp asked for (a TLS connection), the kernel's own, larger, and a
        // scaled window.
        let (plain, _accepted) =
            tokio::join!(connect_tcp("127.0.0.1", port, false), listener.accept());
        let plain = plain.unwrap();
        let clamp = window_clamp(&plain);
        assert!(clamp > LOOPBACK_WINDOW_CLAMP, "{clamp}");
        assert!(receive_window_scale(&plain) > 0);
    }

    #[test]
    fn every_mode_that_may_be_plaintext_is_clamped() {
        let tls = || {
            Arc::new(
                crate::tls::client_config(
                    "postgres",
                    &crate::tls::TlsFiles::default(),
                    crate::tls::Verify::Nothing,
                )
                .unwrap(),
            )
        };
        assert!(clamps(&Tls::Off));
        // `sslmode=prefer`, the default: a server without TLS makes it plaintext.
        assert!(clamps(&Tls::Prefer(tls())));
        assert!(!clamps(&Tls::Require(tls())));
    }

    #[test]
    fn a_status_update_carries_the_position_three_times() {
        let mut out = BytesMut::new();
        status_update(Lsn(0x0102_0304_0506_0708), &mut out);
        assert_eq!(out.len(), 1 + 4 + 34);
        assert_eq!(&out[..5], &[b'd', 0, 0, 0, 38]);
        assert_eq!(out[5], b'r');
        for i in 0..3 {
            assert_eq!(be64(&out, 6 + 8 * i), 0x0102_0304_0506_0708);
        }
        assert_eq!(out[38], 0, "no reply asked");
    }

    #[test]
    fn frames_are_found_whole_or_not_at_all() {
        let m = copy_data(b"k0123456789abcdef\x01");
        let mut buf = BytesMut::new();
        for (i, b) in m.iter().enumerate() {
            assert!(take_message(&mut buf).unwrap().is_none(), "at {i}");
            buf.extend_from_slice(&[*b]);
        }
        let (tag, body) = take_message(&mut buf).unwrap().unwrap();
        assert_eq!(tag, b'd');
        assert_eq!(&body[..], b"k0123456789abcdef\x01");
        assert!(buf.is_empty());
        let bad = [b'd', 0, 0, 0, 3];
        assert!(frame_len(&bad).is_err());
        let huge = [b'd', 0x7f, 0xff, 0xff, 0xff];
        assert!(frame_len(&huge)
            .unwrap_err()
            .to_string()
            .contains("over the limit"));
    }

    #[test]
    fn an_error_response_gives_its_code_message_and_detail() {
        let body =
            b"SERROR\0VERROR\0C55006\0Mreplication slot \"s\" is active for PID 7\0Dsomething\0\0";
        let e = server_error(body);
        assert_eq!(
            e.to_string(),
            "replication slot \"s\" is active for PID 7: something (SQLSTATE 55006)"
        );
    }

    #[test]
    fn a_data_row_gives_its_text_and_nulls() {
        let mut body = vec![0, 2];
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            data_row(&body).unwrap(),
            vec![Some("abc".to_string()), None]
        );
        assert!(data_row(&body[..5]).is_err());
    }
}
