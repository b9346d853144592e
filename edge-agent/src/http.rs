//! A small HTTP listener: `/metrics` (Prometheus text) and `/healthz`.
//!
//! Hand-rolled on purpose: two fixed GET routes do not justify a web
//! framework in an edge binary (the ingest server, which serves a dashboard,
//! uses axum). Requests are read with a size cap and a timeout.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::shared::Shared;

/// Serves until `cancel`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let (mut stream, _) = tokio::select! {
            () = cancel.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; } },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < buf.len() {
                    let n = stream.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let request = String::from_utf8_lossy(&buf[..len]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, ctype, body) = match (request.split_whitespace().next(), path) {
                (Some("GET"), "/metrics") => {
                    ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", shared.metrics.render())
                }
                (Some("GET"), "/healthz") => {
                    let connected = shared.connected.load(Ordering::Relaxed);
                    let (rows, _) = shared.outbox_size();
                    (
                        "200 OK",
                        "application/json",
                        format!("{{\"status\":\"ok\",\"mqtt_connected\":{connected},\"outbox_rows\":{rows}}}"),
                    )
                }
                (Some("GET"), _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
                _ => ("405 Method Not Allowed", "text/plain", "only GET\n".to_owned()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
