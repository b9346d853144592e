//! Sensor connections: accept on TCP and Unix sockets, decode frames or JSON
//! lines, validate readings, hand them to the committer, and ack each frame
//! back once the committer reports it committed.
//!
//! Back-pressure is the bounded channel to the committer: when it is full
//! (outbox at quota, Postgres down) a connection stops reading its socket and
//! the sensor's writes block. Nothing is acked before it is committed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use futures_util::{FutureExt, StreamExt};
use telemetry_wire::{json, FrameError, Reading, SensorFrameCodec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{CodecChoice, ListenAddr};
use crate::metrics::{Metrics, Reason};

/// Readings of one or more frames of one connection, on their way to the
/// outbox. `units` frames (or lines) are acked together once committed.
#[derive(Debug)]
pub struct Submission {
    /// Valid readings (may be empty when every reading was rejected: the
    /// frames still need their ack, in order).
    pub readings: Vec<Reading>,
    /// Ack units: frames, or JSON lines.
    pub units: u64,
    /// The connection's cumulative committed-units counter.
    pub ack: Arc<watch::Sender<u64>>,
    /// When the first frame of this submission was read.
    pub received_at: Instant,
}

/// What every connection needs.
#[derive(Debug, Clone)]
pub struct ConnContext {
    /// To the committer.
    pub submissions: mpsc::Sender<Submission>,
    /// Counters.
    pub metrics: Metrics,
    /// Encoding.
    pub codec: CodecChoice,
    /// Largest frame / line.
    pub max_frame_bytes: usize,
    /// Close after this long without a frame.
    pub idle_timeout: Duration,
    /// Reject readings further in the future than this.
    pub max_future_skew_micros: i64,
    /// Reject readings further in the past than this (`None`: no limit).
    pub max_past_skew_micros: Option<i64>,
    /// How long a closing connection waits for its last commits to ack them.
    pub close_grace: Duration,
    /// Most readings gathered into one submission from frames already
    /// buffered (fewer, larger submissions; at most a commit's worth).
    pub gather_readings: usize,
    /// `true` while intake is paused (a remote command): connections stop
    /// reading, so sensors are held as under back-pressure.
    pub intake_paused: watch::Receiver<bool>,
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Bound {
    /// TCP.
    Tcp(TcpListener),
    /// Unix.
    Unix(UnixListener, std::path::PathBuf),
}

/// Binds every listener before the agent reports ready.
///
/// # Errors
/// The address cannot be bound.
pub async fn bind(addrs: &[ListenAddr]) -> std::io::Result<Vec<Bound>> {
    let mut out = Vec::new();
    for addr in addrs {
        match addr {
            ListenAddr::Tcp(a) => out.push(Bound::Tcp(TcpListener::bind(a).await?)),
            ListenAddr::Unix(p) => {
                // A socket file left by a killed agent would make bind fail.
                if std::fs::symlink_metadata(p).is_ok_and(|m| !m.is_dir()) {
                    let _ = std::fs::remove_file(p);
                }
                out.push(Bound::Unix(UnixListener::bind(p)?, p.clone()));
            }
        }
    }
    Ok(out)
}

impl Bound {
    /// The address actually bound (a TCP port 0 becomes the real port).
    #[must_use]
    pub fn local_addr(&self) -> ListenAddr {
        match self {
            Self::Tcp(l) => ListenAddr::Tcp(l.local_addr().map(|a| a.to_string()).unwrap_or_default()),
            Self::Unix(_, p) => ListenAddr::Unix(p.clone()),
        }
    }
}

/// Accepts connections until `cancel`, at most `max_connections` at once.
pub async fn serve(
    bound: Bound,
    ctx: ConnContext,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let mut error_delay = Duration::from_millis(10);
    loop {
        // Take a permit before accepting: connections beyond the cap wait in
        // the kernel's accept queue instead of costing memory here.
        let permit = tokio::select! {
            () = cancel.cancelled() => break,
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            a = accept(&bound) => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                error_delay = Duration::from_millis(10);
                let ctx = ctx.clone();
                let cancel = cancel.clone();
                tracker.spawn(async move {
                    ctx.metrics.connections.inc();
                    handle(stream, &peer, &ctx, &cancel).await;
                    ctx.metrics.connections.dec();
                    drop(permit);
                });
            }
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%error, delay = ?error_delay, "accept failed");
                tokio::time::sleep(error_delay).await;
                error_delay = (error_delay * 2).min(Duration::from_secs(1));
            }
        }
    }
    if let Bound::Unix(_, path) = &bound {
        let _ = std::fs::remove_file(path);
    }
}

type Stream = Box<dyn AsyncReadWrite>;

/// A socket of either kind.
pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncReadWrite for T {}

async fn accept(bound: &Bound) -> std::io::Result<(Stream, String)> {
    match bound {
        Bound::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            s.set_nodelay(true)?;
            Ok((Box::new(s), peer.to_string()))
        }
        Bound::Unix(l, path) => {
            let (s, _) = l.accept().await?;
            Ok((Box::new(s), format!("unix:{}", path.display())))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detected {
    Bincode,
    Json,
}

/// Decides the codec from the first four bytes. A JSON line starts with `{`
/// or whitespace and has no NUL; a binary frame is shorter than 16 MiB, so
/// its 4th byte (the top byte of the little-endian length) is 0. Anything
/// else is treated as binary, where garbage fails fast (oversize length or
/// unknown version) instead of waiting for a newline.
fn detect(prefix: &[u8]) -> Option<Detected> {
    let top = *prefix.get(3)?;
    match prefix[0] {
        b'{' | b' ' | b'\t' | b'\r' | b'\n' if top != 0 => Some(Detected::Json),
        _ => Some(Detected::Bincode),
    }
}

async fn handle(mut stream: Stream, peer: &str, ctx: &ConnContext, cancel: &CancellationToken) {
    let mut prefix = BytesMut::with_capacity(4096);
    let detected = match ctx.codec {
        CodecChoice::Bincode => Detected::Bincode,
        CodecChoice::Json => Detected::Json,
        CodecChoice::Auto => loop {
            if let Some(d) = detect(&prefix) {
                break d;
            }
            let read = tokio::select! {
                () = cancel.cancelled() => return,
                r = tokio::time::timeout(ctx.idle_timeout, stream.read_buf(&mut prefix)) => r,
            };
            match read {
                Ok(Ok(0)) if prefix.is_empty() => return,
                Ok(Ok(0)) => {
                    reject_frame(ctx, peer, "truncated", &"connection closed inside the first frame");
                    return;
                }
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::debug!(peer, %error, "read failed");
                    return;
                }
                Err(_) => {
                    reject_frame(ctx, peer, "idle_timeout", &"no complete frame header before the idle timeout");
                    return;
                }
            }
        },
    };
    tracing::debug!(peer, codec = ?detected, "sensor connected");
    let (reader, writer) = tokio::io::split(stream);
    // The bytes read for detection are read again through the codec (a
    // pre-filled FramedRead buffer would only be decoded after more bytes
    // arrive, stalling a sensor that sent one frame and waits for its ack).
    let reader = std::io::Cursor::new(prefix.freeze()).chain(reader);
    let units: Box<dyn UnitStream> = match detected {
        Detected::Bincode => Box::new(frame_units(FramedRead::new(reader, SensorFrameCodec::new(ctx.max_frame_bytes)))),
        Detected::Json => {
            Box::new(line_units(FramedRead::new(reader, LinesCodec::new_with_max_length(ctx.max_frame_bytes))))
        }
    };
    run_connection(units, writer, detected, peer, ctx, cancel).await;
}

/// One decoded unit of the stream.
enum Unit {
    Frame(Vec<Reading>),
    Line(Reading),
}

trait UnitStream: futures_util::Stream<Item = Result<Unit, (&'static str, String)>> + Unpin + Send {}
impl<T: futures_util::Stream<Item = Result<Unit, (&'static str, String)>> + Unpin + Send> UnitStream for T {}

fn frame_units<R: AsyncRead + Unpin + Send>(f: FramedRead<R, SensorFrameCodec>) -> impl UnitStream {
    f.map(|r| r.map(Unit::Frame).map_err(|e: FrameError| (e.kind(), e.to_string())))
}

fn line_units<R: AsyncRead + Unpin + Send>(f: FramedRead<R, LinesCodec>) -> impl UnitStream {
    f.map(|r| match r {
        Ok(line) => json::parse_line(&line).map(Unit::Line).map_err(|e| ("malformed_json", e.to_string())),
        Err(LinesCodecError::MaxLineLengthExceeded) => Err(("oversize", "line longer than the frame limit".into())),
        Err(LinesCodecError::Io(e)) => Err(("io", e.to_string())),
    })
}

fn reject_frame(ctx: &ConnContext, peer: &str, reason: &'static str, error: &dyn std::fmt::Display) {
    ctx.metrics.frames_rejected.get_or_create(&Reason { reason }).inc();
    tracing::warn!(peer, reason, %error, "bad sensor input; closing connection");
}

async fn run_connection<W: AsyncWrite + Unpin + Send>(
    mut units: Box<dyn UnitStream>,
    mut writer: W,
    detected: Detected,
    peer: &str,
    ctx: &ConnContext,
    cancel: &CancellationToken,
) {
    let (ack_tx, mut ack_rx) = watch::channel(0u64);
    let ack_tx = Arc::new(ack_tx);
    let mut submitted = 0u64;
    let mut acked = 0u64;
    let mut out = BytesMut::new();
    let mut paused = ctx.intake_paused.clone();
    loop {
        let reading = !*paused.borrow_and_update();
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            // Paused: no read (and no idle timeout) until resumed; acks of
            // what was committed still go out.
            Ok(()) = paused.changed() => continue,
            changed = ack_rx.changed() => {
                if changed.is_err() { break; }
                let n = *ack_rx.borrow_and_update();
                if write_ack(&mut writer, &mut out, detected, n).await.is_err() { return; }
                acked = n;
            }
            next = tokio::time::timeout(ctx.idle_timeout, units.next()), if reading => {
                let first = match next {
                    Err(_) => { reject_frame(ctx, peer, "idle_timeout", &"no frame within the idle timeout"); break; }
                    Ok(None) => break,
                    Ok(Some(Err((reason, error)))) => { reject_frame(ctx, peer, reason, &error); break; }
                    Ok(Some(Ok(unit))) => unit,
                };
                let received_at = Instant::now();
                let mut sub = Submission { readings: Vec::new(), units: 0, ack: ack_tx.clone(), received_at };
                let mut failed = None;
                add_unit(&mut sub, first, ctx);
                // Gather what is already buffered: fewer, larger submissions.
                while sub.readings.len() < ctx.gather_readings {
                    match units.next().now_or_never() {
                        Some(Some(Ok(unit))) => add_unit(&mut sub, unit, ctx),
                        Some(Some(Err(e))) => { failed = Some(e); break; }
                        Some(None) | None => break,
                    }
                }
                submitted += sub.units;
                if ctx.submissions.send(sub).await.is_err() {
                    return; // the committer is gone: shutting down
                }
                if let Some((reason, error)) = failed {
                    reject_frame(ctx, peer, reason, &error);
                    break;
                }
            }
        }
    }
    // Ack what is committed before closing, waiting briefly for commits of
    // frames already handed over (the sensor would otherwise resend them).
    let deadline = tokio::time::Instant::now() + ctx.close_grace;
    while acked < submitted {
        match tokio::time::timeout_at(deadline, ack_rx.changed()).await {
            Ok(Ok(())) => {
                acked = *ack_rx.borrow_and_update();
                if write_ack(&mut writer, &mut out, detected, acked).await.is_err() {
                    return;
                }
            }
            _ => break,
        }
    }
    let _ = writer.shutdown().await;
}

fn add_unit(sub: &mut Submission, unit: Unit, ctx: &ConnContext) {
    let now = crate::now_micros();
    let accept = |r: Reading, sub: &mut Submission| {
        ctx.metrics.readings_received.inc();
        let verdict = match r.validate() {
            Err(e) => Err(e.kind()),
            Ok(()) if r.ts > now.saturating_add(ctx.max_future_skew_micros) => Err("future_timestamp"),
            Ok(()) if ctx.max_past_skew_micros.is_some_and(|past| r.ts < now.saturating_sub(past)) => {
                Err("past_timestamp")
            }
            Ok(()) => Ok(()),
        };
        match verdict {
            Ok(()) => sub.readings.push(r),
            Err(reason) => {
                ctx.metrics.readings_rejected.get_or_create(&Reason { reason }).inc();
                tracing::debug!(sensor = %r.sensor, ts = r.ts, reason, "reading rejected");
            }
        }
    };
    match unit {
        Unit::Frame(readings) => {
            sub.units += 1;
            for r in readings {
                accept(r, sub);
            }
        }
        Unit::Line(r) => {
            sub.units += 1;
            accept(r, sub);
        }
    }
}

async fn write_ack<W: AsyncWrite + Unpin>(
    writer: &mut W,
    out: &mut BytesMut,
    detected: Detected,
    n: u64,
) -> std::io::Result<()> {
    out.clear();
    match detected {
        Detected::Bincode => {
            use tokio_util::codec::Encoder;
            // Invariant: the ack encoder is infallible.
            telemetry_wire::AckFrameCodec::default().encode(n, out).expect("ack encoding cannot fail");
        }
        Detected::Json => {
            out.put_slice(json::ack_line(n).as_bytes());
            out.put_u8(b'\n');
        }
    }
    writer.write_all(out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_detection_reads_the_first_bytes() {
        assert_eq!(detect(b""), None);
        assert_eq!(detect(b"{\"sensor\""), Some(Detected::Json));
        assert_eq!(detect(b"\n{\"s"), Some(Detected::Json));
        assert_eq!(detect(&[0x3d, 0, 0]), None);
        assert_eq!(detect(&[0x3d, 0, 0, 0]), Some(Detected::Bincode));
        // Frames whose length byte looks like `{` or whitespace are binary.
        assert_eq!(detect(&[b'{', 0, 0, 0]), Some(Detected::Bincode));
        assert_eq!(detect(&[b'\n', 0, 0, 0]), Some(Detected::Bincode));
        // A huge length prefix is binary (and then refused as oversize).
        assert_eq!(detect(&[0, 0, 0, 0x80]), Some(Detected::Bincode));
        assert_eq!(detect(b"garbage"), Some(Detected::Bincode));
    }
}
