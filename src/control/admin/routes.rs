//! The admin port's routes: one table of method, path, whether the admin
//! token is needed, and handler. A path the table knows, asked with a
//! method it does not serve, is answered 405 with `Allow`; any other path
//! 404. A HEAD is answered as the path's GET, without the body. Every path
//! under `/admin` needs the admin token, known or not, so a caller without
//! it learns nothing of the API (401).

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use super::{alerts, api, collect, meter, pools, remote, revocations, Admin, Request};
use crate::core::metrics::text::{family, Kind};
use crate::core::metrics::{render_prometheus, ProcessGauges};
use crate::dataplane::http;

/// The dashboard page: plain HTML and JavaScript, no build step.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Where every path needs the admin token.
const ADMIN_PREFIX: &str = "/admin";

/// A handler's answer, a whole HTTP response.
type Answer<'a> = Pin<Box<dyn Future<Output = Vec<u8>> + 'a>>;

/// A handler: the admin state, the request, and the path's `{id}` segment
/// (empty when the path has none).
type Handler = for<'a> fn(&'a Admin, &'a Request<'a>, &'a str) -> Answer<'a>;

/// One route.
struct Route {
    method: &'static str,
    /// Segments separated by `/`; `{id}` matches any one non-empty segment.
    path: &'static str,
    /// Whether the admin token is needed.
    auth: bool,
    handler: Handler,
}

/// Every route of the admin port.
const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "/",
        auth: false,
        handler: |_, _, _| Box::pin(async { dashboard() }),
    },
    Route {
        method: "GET",
        path: "/dashboard",
        auth: false,
        handler: |_, _, _| Box::pin(async { dashboard() }),
    },
    Route {
        method: "GET",
        path: "/metrics",
        auth: false,
        handler: |a, _, _| {
            Box::pin(async move {
                let body = metrics(a).await;
                http::response(200, "text/plain; version=0.0.4", "", body.as_bytes())
            })
        },
    },
    Route {
        method: "GET",
        path: "/healthz",
        auth: false,
        handler: |a, _, _| Box::pin(async move { healthz(a) }),
    },
    Route {
        method: "GET",
        path: "/readyz",
        auth: false,
        handler: |a, _, _| Box::pin(async move { readyz(a) }),
    },
    Route {
        method: "GET",
        path: "/v1/config",
        auth: false,
        handler: |a, r, _| Box::pin(async move { config(a, r) }),
    },
    Route {
        method: "GET",
        path: "/admin/stats",
        auth: true,
        handler: |a, _, _| {
            Box::pin(async move {
                // Read before the snapshots, as `/metrics` reads it.
                let live = u64::from(a.process.live_streams());
                api::stats(a, live, &collect(&a.shards).await)
            })
        },
    },
    Route {
        method: "GET",
        path: "/admin/usage",
        auth: true,
        handler: |a, r, _| {
            Box::pin(async move {
                // Fresh: take what the shards hold before answering.
                meter::take_usage(a).await;
                meter::usage(a, r).await
            })
        },
    },
    Route {
        method: "GET",
        path: "/admin/reconciliation",
        auth: true,
        handler: |a, _, _| Box::pin(async move { meter::reconciliation(a) }),
    },
    Route {
        method: "GET",
        path: "/admin/revocations",
        auth: true,
        handler: |a, r, _| Box::pin(revocations::revocations(a, r)),
    },
    Route {
        method: "POST",
        path: "/admin/revocations",
        auth: true,
        handler: |a, r, _| Box::pin(revocations::revocations(a, r)),
    },
    Route {
        method: "DELETE",
        path: "/admin/revocations",
        auth: true,
        handler: |a, r, _| Box::pin(revocations::revocations(a, r)),
    },
    Route {
        method: "GET",
        path: "/admin/accounts",
        auth: true,
        handler: |a, _, _| Box::pin(async move { api::accounts(a) }),
    },
    Route {
        method: "POST",
        path: "/admin/accounts",
        auth: true,
        handler: |a, r, _| Box::pin(api::changed(a, r, move |a| api::add(a, r))),
    },
    Route {
        method: "POST",
        path: "/admin/accounts/{id}/enable",
        auth: true,
        handler: |a, r, id| Box::pin(api::changed(a, r, move |a| api::set_enabled(a, id, true))),
    },
    Route {
        method: "POST",
        path: "/admin/accounts/{id}/disable",
        auth: true,
        handler: |a, r, id| Box::pin(api::changed(a, r, move |a| api::set_enabled(a, id, false))),
    },
    Route {
        method: "POST",
        path: "/admin/accounts/{id}/limit",
        auth: true,
        handler: |a, r, id| Box::pin(api::changed(a, r, move |a| api::limit(a, id, r))),
    },
    Route {
        method: "PUT",
        path: "/admin/accounts/{id}/limit",
        auth: true,
        handler: |a, r, id| Box::pin(api::changed(a, r, move |a| api::limit(a, id, r))),
    },
    Route {
        method: "POST",
        path: "/admin/accounts/{id}/rotate",
        auth: true,
        handler: |a, r, id| Box::pin(api::changed(a, r, move |a| api::rotate(a, id, r))),
    },
    Route {
        method: "DELETE",
        path: "/admin/accounts/{id}",
        auth: true,
        handler: |a, r, id| Box::pin(api::changed(a, r, move |a| api::remove(a, id))),
    },
];

/// Whether `path` is under [`ADMIN_PREFIX`].
fn under_admin(path: &str) -> bool {
    path.strip_prefix(ADMIN_PREFIX)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Matches `path` against a route's `pattern`: `Some(id)` (the `{id}`
/// segment, or empty) when it matches. Under `/admin` a trailing `/` is
/// ignored, as the account API always did.
fn matches<'p>(pattern: &str, path: &'p str) -> Option<&'p str> {
    let path = if under_admin(path) {
        path.trim_end_matches('/')
    } else {
        path
    };
    let mut id = "";
    let mut want = pattern.split('/');
    let mut have = path.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return Some(id),
            (Some("{id}"), Some(seg)) if !seg.is_empty() => id = seg,
            (Some(w), Some(h)) if w == h => {}
            _ => return None,
        }
    }
}

/// What the table says about a request: the route and its `{id}`, or the
/// methods the path is served with (none: an unknown path).
fn lookup<'p>(method: &str, path: &'p str) -> Result<(&'static Route, &'p str), Vec<&'static str>> {
    let mut allow = Vec::new();
    for route in ROUTES {
        if let Some(id) = matches(route.path, path) {
            if route.method == method {
                return Ok((route, id));
            }
            allow.push(route.method);
        }
    }
    Err(allow)
}

/// Answers one admin request.
pub(super) async fn route(admin: &Admin, req: &Request<'_>) -> Vec<u8> {
    // A HEAD is answered as its GET, without the body (RFC 9110 §9.3.2).
    let head = req.method == "HEAD";
    let answer = answer(admin, req, if head { "GET" } else { req.method }).await;
    if head {
        http::head_only(answer)
    } else {
        answer
    }
}

async fn answer(admin: &Admin, req: &Request<'_>, method: &str) -> Vec<u8> {
    let found = lookup(method, req.path);
    let auth = under_admin(req.path) || matches!(found, Ok((r, _)) if r.auth);
    if let Some(refusal) = auth.then(|| admin.unauthorized(req)).flatten() {
        return refusal;
    }
    match found {
        Ok((route, id)) => (route.handler)(admin, req, id).await,
        Err(allow) if allow.is_empty() => http::json_error(404, "not found"),
        Err(mut allow) => {
            if let Some(at) = allow.iter().position(|m| *m == "GET") {
                allow.insert(at + 1, "HEAD");
            }
            let allow = allow.join(", ");
            let body = serde_json::json!({
                "error_code": 405,
                "error_message": format!("method not allowed here; allowed: {allow}"),
            })
            .to_string();
            http::response(
                405,
                "application/json",
                &format!("Allow: {allow}\r\n"),
                body.as_bytes(),
            )
        }
    }
}

/// `GET /` and `/dashboard`. The page holds no data: it asks for the admin
/// token and reads everything through the token-protected API. No other
/// site may frame it (`frame-ancestors 'none'`, and `X-Frame-Options`
/// for browsers that read only that): a page that framed it unseen over
/// its own buttons had an operator logged in there press **disable** or
/// **rotate** unaware.
fn dashboard() -> Vec<u8> {
    http::response(
        200,
        "text/html; charset=utf-8",
        "Content-Security-Policy: default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'\r\nX-Frame-Options: DENY\r\n",
        DASHBOARD.as_bytes(),
    )
}

/// `GET /healthz`: 200 unless draining.
fn healthz(admin: &Admin) -> Vec<u8> {
    if admin.process.draining() {
        http::response(503, "text/plain", "", b"draining\n")
    } else {
        http::response(200, "text/plain", "", b"ok\n")
    }
}

/// `GET /readyz`: 200 while a stream would find a usable account.
fn readyz(admin: &Admin) -> Vec<u8> {
    let process = &admin.process;
    let now = Instant::now();
    let usable = process
        .accounts()
        .iter()
        .any(|a| a.healthy(now) && a.available(now));
    let store_down = process.fleet.get().filter(|f| !f.store_up());
    if process.draining() {
        http::response(503, "text/plain", "", b"draining\n")
    } else if let Some(status) = process.upstream_fault.get() {
        let why = format!(
            "{}\n",
            crate::dataplane::upstream::UpstreamFault::describe(status)
        );
        http::response(503, "text/plain", "", why.as_bytes())
    } else if !usable {
        http::response(503, "text/plain", "", b"no healthy account\n")
    } else if let Some(f) = store_down {
        // With `refuse` this node takes no stream; with `local` it
        // does (its shares), and says so.
        match f.on_store_down {
            crate::core::config::StoreDown::Refuse => {
                http::response(503, "text/plain", "", b"cluster store unreachable\n")
            }
            crate::core::config::StoreDown::Local => http::response(
                200,
                "text/plain",
                "",
                b"ready (cluster store unreachable: this node's share of each limit)\n",
            ),
        }
    } else {
        http::response(200, "text/plain", "", b"ready\n")
    }
}

/// `GET /v1/config`, with an ETag, and `Cache-Control: no-cache`: a cache
/// (the app's HTTP cache, a proxy in front) may keep the document but asks
/// again, with `If-None-Match`, each time it is used, so a change is seen
/// at the next read. `no-store`, every other answer's, kept any cache from
/// keeping it, and so from ever sending the tag back.
fn config(admin: &Admin, req: &Request<'_>) -> Vec<u8> {
    const CACHE: &str = "no-cache";
    let body = remote::remote_config(&admin.process, &admin.pools);
    let etag = remote::etag(&body);
    // If-None-Match on several lines is one list (RFC 9110 §5.3).
    if req
        .header_values("if-none-match")
        .any(|v| http::none_match_finds(v, &etag))
    {
        http::not_modified(CACHE, &format!("ETag: {etag}\r\n"))
    } else {
        http::response_cached(
            200,
            "application/json",
            CACHE,
            &format!("ETag: {etag}\r\n"),
            body.as_bytes(),
        )
    }
}

/// The `/metrics` text: the shards' merged metrics, then every family
/// the admin thread keeps.
async fn metrics(admin: &Admin) -> String {
    let process = &admin.process;
    // Read before the shards' snapshots: a stream counts its resumes
    // before it ends, so a live count back down here comes with every
    // resume of the streams that ended in the snapshots that follow.
    let live_streams = u64::from(process.live_streams());
    let snaps = collect(&admin.shards).await;
    let now = Instant::now();
    let accounts = process.accounts();
    let gauges = ProcessGauges {
        max_streams: process.max_streams() as u64,
        draining: process.draining(),
        live_streams,
        accounts_healthy: accounts.iter().filter(|a| a.healthy(now)).count() as u64,
        accounts: accounts.len() as u64,
    };
    let mut body = render_prometheus(&snaps, &gauges);
    api::render_key_metrics(admin, &mut body);
    let ring = admin.process.ring();
    let views = pools::views(&admin.pools, &ring, now);
    pools::render_metrics(&views, &ring, now, &mut body);
    let names: Vec<String> = admin.pools.iter().map(|p| p.name.clone()).collect();
    process.pools.render_metrics(&names, &mut body);
    meter::render_metrics(admin, &mut body);
    alerts::render_metrics(&admin.usage.alerts.borrow(), &mut body);
    meter::render_drift(&admin.usage.reconciliation.borrow(), &mut body);
    if let Some(fleet) = process.fleet.get() {
        fleet.render_metrics(&mut body);
        family(
            &mut body,
            "clio_relay_cluster_account_set_unreadable",
            Kind::Gauge,
            "1 while this node cannot open the fleet's account set (another admin.master_key): its account changes are refused.",
        )
        .sample(&[], u8::from(admin.accounts.fleet_unreadable.get()));
    }
    process.faults.render(&mut body);
    process.resume_copies.render(&mut body);
    family(
        &mut body,
        "clio_relay_upstream_config_fault",
        Kind::Gauge,
        "While upstream.url is misconfigured, the HTTP status upstream answered the WebSocket upgrade with (400, 404, 405, 426, a 1xx-3xx other than 101), or 495 while the relay refuses its TLS certificate; 0 when neither.",
    )
    .sample(&[], process.upstream_fault.get().unwrap_or(0));
    let tls_end = process
        .tls_not_after
        .load(std::sync::atomic::Ordering::Relaxed);
    if tls_end != 0 {
        family(
            &mut body,
            "clio_relay_tls_certificate_expiry_timestamp_seconds",
            Kind::Gauge,
            "When the client port's certificate chain ([tls]) stops working, in seconds since the epoch: the earliest end of the certificates clients check in the one served now, the server's own or an intermediate (read at the start and at each reload that took it).",
        )
        .sample(&[], tls_end);
    }
    admin.health.checks.render(&mut body);
    family(
        &mut body,
        "clio_relay_log_lines_dropped_total",
        Kind::Counter,
        "Log lines lost: stderr did not take them as fast as they came (its reader stalled, the queue of lines full) or refused them (its reader gone).",
    )
    .sample(&[], crate::core::log_sink::dropped_total());
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dashboard's refusals table names each `refusals_total` label
    /// in words: every label the relay counts has its words (a new one
    /// showed raw, as `pool_limit` did), and no words stand for a label
    /// that is gone.
    #[test]
    fn the_dashboard_names_every_refusal_label() {
        let start = DASHBOARD
            .find("const refusedBy = {")
            .expect("the dashboard's refusedBy table");
        let table = &DASHBOARD[start..];
        let table = &table[..table.find("};").expect("its end")];
        let mut named: Vec<&str> = table
            .split(['{', ','])
            .skip(1)
            .filter_map(|entry| Some(entry.split_once(':')?.0.trim()))
            .collect();
        named.sort_unstable();
        let mut labels: Vec<&str> = crate::core::metrics::RefusedBy::ALL
            .iter()
            .map(|by| by.label())
            .collect();
        labels.sort_unstable();
        assert_eq!(named, labels);
    }

    #[test]
    fn the_table_answers_route_405_or_404() {
        let found = |m, p| lookup(m, p).map(|(r, id)| (r.method, r.path, id));
        assert_eq!(found("GET", "/metrics"), Ok(("GET", "/metrics", "")));
        assert_eq!(
            found("PUT", "/admin/accounts/a-1/limit/"),
            Ok(("PUT", "/admin/accounts/{id}/limit", "a-1"))
        );
        assert_eq!(
            found("DELETE", "/admin/accounts/x"),
            Ok(("DELETE", "/admin/accounts/{id}", "x"))
        );
        assert_eq!(
            found("GET", "/admin/accounts/"),
            Ok(("GET", "/admin/accounts", ""))
        );
        assert_eq!(found("POST", "/metrics"), Err(vec!["GET"]));
        assert_eq!(found("PUT", "/admin/accounts"), Err(vec!["GET", "POST"]));
        assert_eq!(
            found("PUT", "/admin/revocations"),
            Err(vec!["GET", "POST", "DELETE"])
        );
        assert_eq!(
            found("GET", "/admin/accounts/a/limit"),
            Err(vec!["POST", "PUT"])
        );
        assert_eq!(found("GET", "/nope"), Err(vec![]));
        assert_eq!(found("POST", "/nope"), Err(vec![]));
        assert_eq!(
            found("DELETE", "/admin/accounts//"),
            Err(vec!["GET", "POST"])
        );
        assert_eq!(
            found("GET", "/metrics/"),
            Err(vec![]),
            "exact outside /admin"
        );
        assert_eq!(found("GET", "/admin/accounts/a/b/enable"), Err(vec![]));
        assert!(under_admin("/admin") && under_admin("/admin/x"));
        assert!(!under_admin("/administrator") && !under_admin("/"));
    }
}
