//! Reading a daemon's HTTP endpoints from tests and the fault suite: one
//! plain HTTP/1.1 GET, and one Prometheus text parser.

use std::time::Duration;

/// GET `path` from `addr` over plain HTTP/1.1: the body, or `None` if the
/// daemon is unreachable or does not answer within 5 s.
pub async fn http_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), io).await.ok().flatten()
}

/// The value of metric `name` in a Prometheus text `body`, summed over its
/// label sets; `None` when it is absent.
#[must_use]
pub fn metric_value(body: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let value = if let Some(v) = rest.strip_prefix(' ') {
            v
        } else if rest.starts_with('{') {
            match rest.rsplit_once("} ") {
                Some((_, v)) => v,
                None => continue,
            }
        } else {
            continue;
        };
        if let Ok(v) = value.trim().parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::metric_value;

    #[test]
    fn a_metric_is_summed_over_its_label_sets() {
        let body = "# HELP x\nx_total{reason=\"a\"} 2\nx_total{reason=\"b\"} 3\nx_total_other 9\ny 1.5\n";
        assert_eq!(metric_value(body, "x_total"), Some(5.0));
        assert_eq!(metric_value(body, "y"), Some(1.5));
        assert_eq!(metric_value(body, "z"), None);
    }
}
