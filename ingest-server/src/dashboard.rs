//! The built-in dashboard: one page and its script and style, embedded in the
//! binary (`include_str!`) so it works with no internet access. The page
//! draws its charts as SVG and reads everything from [`crate::api`].
//!
//! Sources are in `ingest-server/assets/`. The page sets no inline script or
//! style, so it is served under a strict Content-Security-Policy.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const DASHBOARD_JS: &str = include_str!("../assets/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("../assets/dashboard.css");

/// Only this origin's script, style and API; no frames, no plugins.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The routes `/`, `/assets/dashboard.js` and `/assets/dashboard.css`.
pub fn router() -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/assets/dashboard.js", get(|| async { asset("text/javascript; charset=utf-8", DASHBOARD_JS) }))
        .route("/assets/dashboard.css", get(|| async { asset("text/css; charset=utf-8", DASHBOARD_CSS) }))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_embedded_assets() {
        assert!(INDEX_HTML.contains("src=\"/assets/dashboard.js\""));
        assert!(INDEX_HTML.contains("href=\"/assets/dashboard.css\""));
        for text in [INDEX_HTML, DASHBOARD_JS, DASHBOARD_CSS] {
            // The SVG namespace is a name, not a download.
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(!text.contains("http://") && !text.contains("https://"), "an external URL in an asset");
        }
        // No inline script or style: the CSP would block them.
        assert!(!INDEX_HTML.contains("<script>") && !INDEX_HTML.contains("style="));
    }

    #[test]
    fn the_script_never_parses_data_as_html() {
        assert!(!DASHBOARD_JS.contains("innerHTML"), "data must go through textContent / setAttribute");
        assert!(!DASHBOARD_JS.contains("insertAdjacentHTML") && !DASHBOARD_JS.contains("document.write"));
    }
}
