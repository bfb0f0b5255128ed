//! `pipe serve`: a local latent explorer over the datastore. An axum server (loopback by
//! default) with its page embedded in the binary (`assets/`, no CDN) and a JSON API:
//!
//! - `GET /api/pipelines`: pipelines, their stages (kind, key, metrics) and views (a latent
//!   table with its crosscoder, examples, cache and figures: [`catalog::View`]);
//! - `GET /api/p/{pipeline}/t/{table}/latents?sort=&desc=&class=&min.<col>=&max.<col>=&offset=&limit=`:
//!   one page of the latent table, filtered and sorted on the server ([`tables::query`]);
//! - `GET /api/p/{pipeline}/t/{table}/latent/{j}?per_bucket=`: latent j's row (statistics
//!   merged from the collect table) and its quantile examples ([`examples`]);
//! - `GET /api/p/{pipeline}/t/{table}/histogram?column=&bins=&lo=&hi=`: one column's histogram
//!   (the latent page marks the latent's place in it);
//! - `POST /api/p/{pipeline}/t/{table}/steer`: steered and plain generations, streamed as
//!   NDJSON events ([`steer`]);
//! - `GET /files/{pipeline}/{stage}/{path}`: a file of a published object, only if the object's
//!   manifest lists it (so nothing outside the datastore's objects is ever served).
//!
//! Bad parameters are 4xx with `{"error": "..."}` naming the parameter; generations run on the
//! blocking pool, at most `max_concurrent` at a time (429 beyond), bounded in length.

pub mod catalog;
pub mod error;
pub mod examples;
pub mod steer;
pub mod tables;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query as UrlQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

pub use catalog::{Catalog, PipelineEntry, StageEntry, View};
pub use error::ApiError;

/// Produces the catalog; called per request, so new runs show up without a restart.
pub type CatalogSource = Arc<dyn Fn() -> Result<Catalog, String> + Send + Sync>;

/// Server settings.
#[derive(Clone, Debug)]
pub struct Options {
    pub limits: steer::Limits,
    /// Generations at once (more get 429).
    pub max_concurrent: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { limits: steer::Limits::default(), max_concurrent: 1 }
    }
}

/// The server's state.
pub struct App {
    catalog: CatalogSource,
    tables: tables::Tables,
    steering: Arc<steer::Steering>,
    permits: Arc<Semaphore>,
    opts: Options,
}

impl App {
    pub fn new(catalog: CatalogSource, device: candle_core::Device, opts: Options) -> App {
        App {
            catalog,
            tables: tables::Tables::default(),
            steering: Arc::new(steer::Steering::new(device)),
            permits: Arc::new(Semaphore::new(opts.max_concurrent.max(1))),
            opts,
        }
    }

    fn catalog(&self) -> Result<Catalog, ApiError> {
        (self.catalog)().map_err(ApiError::internal)
    }
}

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const STYLE_CSS: &str = include_str!("../assets/style.css");

/// The explorer's routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }))
        .route("/assets/app.js", get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }))
        .route("/assets/style.css", get(|| async { asset(STYLE_CSS, "text/css; charset=utf-8") }))
        .route("/api/pipelines", get(pipelines))
        .route("/api/p/{pipeline}/t/{table}/latents", get(latents))
        .route("/api/p/{pipeline}/t/{table}/latent/{latent}", get(latent))
        .route("/api/p/{pipeline}/t/{table}/histogram", get(histogram))
        .route("/api/p/{pipeline}/t/{table}/steer", post(steer_handler))
        .route("/files/{pipeline}/{stage}/{*path}", get(file))
        .fallback(|| async { ApiError::not_found("no such page or API route") })
        .with_state(app)
}

fn asset(body: &'static str, mime: &'static str) -> Response {
    ([(header::CONTENT_TYPE, mime), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// Serves until `stop` returns true (polled), on `addr`; `ready` gets the bound address (port 0
/// picks a free one).
pub fn serve(
    app: App,
    addr: SocketAddr,
    ready: impl FnOnce(SocketAddr),
    stop: impl Fn() -> bool + Send + 'static,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        ready(listener.local_addr()?);
        let shutdown = async move {
            while !stop() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        axum::serve(listener, router(Arc::new(app))).with_graceful_shutdown(shutdown).await
    })?;
    // Generations still running on the blocking pool end with the process.
    rt.shutdown_timeout(Duration::from_millis(200));
    Ok(())
}

fn stage_json(s: &StageEntry) -> Value {
    let o = s.object.as_ref();
    json!({
        "name": s.name,
        "kind": s.kind,
        "key": s.key.hex(),
        "available": o.is_some(),
        "metrics": o.map(|o| json!(o.manifest.metrics)),
        "finished": o.map(|o| o.manifest.finished.clone()),
        "seconds": o.map(|o| o.manifest.seconds),
        "files": o.map(|o| o.manifest.files.iter().map(|f| json!({"path": f.path, "size": f.size})).collect::<Vec<_>>()),
    })
}

async fn pipelines(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let cat = app.catalog()?;
    let list: Vec<Value> = cat
        .pipelines
        .iter()
        .map(|p| {
            let views: Vec<Value> = p
                .views()
                .into_iter()
                .map(|v| {
                    let steer = v.can_steer();
                    let mut v = serde_json::to_value(&v).expect("serializable");
                    v["can_steer"] = json!(steer);
                    v
                })
                .collect();
            json!({
                "name": p.name,
                "file": p.file,
                "status": p.status,
                "started": p.started,
                "stages": p.stages.iter().map(stage_json).collect::<Vec<_>>(),
                "views": views,
            })
        })
        .collect();
    Ok(Json(json!({ "pipelines": list })))
}

/// The pipeline, its view of `table`, and the table stage.
fn find(cat: &Catalog, pipeline: &str, table: &str) -> Result<(PipelineEntry, View), ApiError> {
    let p = cat.pipeline(pipeline).ok_or_else(|| {
        let names: Vec<&str> = cat.pipelines.iter().map(|p| p.name.as_str()).collect();
        ApiError::not_found(format!("no pipeline `{pipeline}` in the datastore (have: {})", names.join(", ")))
    })?;
    let v = p.view(table).ok_or_else(|| {
        let names: Vec<String> = p.views().into_iter().map(|v| v.table).collect();
        ApiError::not_found(format!(
            "`{table}` is not a published latent table of `{pipeline}` (tables: {})",
            names.join(", ")
        ))
    })?;
    Ok((p.clone(), v))
}

fn table_of(app: &App, p: &PipelineEntry, stage: &str) -> Result<Arc<tables::Loaded>, ApiError> {
    let s = p.stage(stage).ok_or_else(|| ApiError::not_found(format!("no stage `{stage}`")))?;
    let o =
        s.object.as_ref().ok_or_else(|| ApiError::not_found(format!("`{stage}` has no published object")))?;
    app.tables.get(s.key, &o.out_dir().join("latents.parquet"))
}

async fn latents(
    State(app): State<Arc<App>>,
    UrlPath((pipeline, table)): UrlPath<(String, String)>,
    UrlQuery(params): UrlQuery<HashMap<String, String>>,
) -> Result<Json<tables::Page>, ApiError> {
    let q = tables::Query::parse(&params)?;
    tokio::task::spawn_blocking(move || {
        let cat = app.catalog()?;
        let (p, v) = find(&cat, &pipeline, &table)?;
        let t = table_of(&app, &p, &v.table)?;
        tables::query(&t, &q).map(Json)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

async fn histogram(
    State(app): State<Arc<App>>,
    UrlPath((pipeline, table)): UrlPath<(String, String)>,
    UrlQuery(params): UrlQuery<HashMap<String, String>>,
) -> Result<Json<tables::Histogram>, ApiError> {
    let (mut column, mut bins, mut lo, mut hi) = (None, 40usize, None, None);
    for (k, v) in &params {
        let number = || {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| ApiError::bad_request(format!("`{k}` must be a finite number, not {v:?}")))
        };
        match k.as_str() {
            "column" => column = Some(v.clone()),
            "bins" => {
                bins = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=500).contains(n))
                    .ok_or_else(|| ApiError::bad_request(format!("`bins` must be 1 to 500, not {v:?}")))?
            }
            "lo" => lo = Some(number()?),
            "hi" => hi = Some(number()?),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{k}` (expected column, bins, lo, hi)"
                )));
            }
        }
    }
    let column = column.ok_or_else(|| ApiError::bad_request("`column` is required"))?;
    tokio::task::spawn_blocking(move || {
        let cat = app.catalog()?;
        let (p, v) = find(&cat, &pipeline, &table)?;
        let t = table_of(&app, &p, &v.table)?;
        tables::histogram(&t.table, &column, bins, lo, hi).map(Json)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

async fn latent(
    State(app): State<Arc<App>>,
    UrlPath((pipeline, table, latent)): UrlPath<(String, String, String)>,
    UrlQuery(params): UrlQuery<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let j: usize = latent.parse().map_err(|_| {
        ApiError::bad_request(format!("the latent must be a non-negative integer, not {latent:?}"))
    })?;
    let mut per_bucket = 10;
    for (k, val) in &params {
        match k.as_str() {
            "per_bucket" => {
                per_bucket = val.parse().ok().filter(|n| (1..=100).contains(n)).ok_or_else(|| {
                    ApiError::bad_request(format!("`per_bucket` must be 1 to 100, not {val:?}"))
                })?
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{k}` (expected per_bucket)"
                )));
            }
        }
    }
    tokio::task::spawn_blocking(move || {
        let cat = app.catalog()?;
        let (p, v) = find(&cat, &pipeline, &table)?;
        let t = table_of(&app, &p, &v.table)?;
        let mut row = tables::row(&t.table, j).ok_or_else(|| {
            ApiError::not_found(format!(
                "latent {j} is out of range: `{}` has {} latents",
                v.table,
                t.table.rows()
            ))
        })?;
        if let Some(stats) = &v.statistics {
            let s = table_of(&app, &p, stats)?;
            for (k, val) in tables::row(&s.table, j).unwrap_or_default() {
                row.entry(k).or_insert(val);
            }
        }
        let examples = match &v.examples {
            Some(stage) => {
                let o =
                    p.stage(stage).and_then(|s| s.object.as_ref()).expect("a view's stages are published");
                Some(examples::examples(&o.out_dir().join("examples.db"), j as i64, per_bucket)?)
            }
            None => None,
        };
        Ok(Json(json!({
            "latent": j,
            "table": v.table,
            "row": row,
            "examples": examples,
            "examples_stage": v.examples,
            "can_steer": v.can_steer(),
        })))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

async fn steer_handler(
    State(app): State<Arc<App>>,
    UrlPath((pipeline, table)): UrlPath<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: steer::SteerRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("bad steering request: {e}")))?;
    let permit = app.permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::busy(format!(
            "{} generation(s) already running (the server's limit, `pipe serve --max-concurrent`); try again when it ends",
            app.opts.max_concurrent
        ))
    })?;
    let cat = app.catalog()?;
    let (p, v) = find(&cat, &pipeline, &table)?;
    let (Some(cc), Some(cache)) = (&v.crosscoder, &v.cache) else {
        return Err(ApiError::conflict(format!(
            "steering `{table}` needs its crosscoder and an activation cache (for the models) published in `{pipeline}`"
        )));
    };
    let dir = |name: &str| p.stage(name).and_then(|s| s.object.as_ref()).map(|o| o.out_dir());
    let cc_stage = p.stage(cc).expect("a view's stages exist");
    let src = steer::Source {
        crosscoder_key: cc_stage.key,
        crosscoder_dir: dir(cc).expect("a view's crosscoder is published"),
        cache_dir: dir(cache).ok_or_else(|| ApiError::conflict(format!("`{cache}` is not published")))?,
    };
    // What can be checked without the crosscoder is checked before its models are loaded.
    steer::check(&req, &app.opts.limits, usize::MAX)?;
    let steering = app.steering.clone();
    let loaded = tokio::task::spawn_blocking(move || steering.load(&src))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    steer::check(&req, &app.opts.limits, loaded.latents())?;
    let (tx, rx) = tokio::sync::mpsc::channel::<steer::Event>(64);
    let limits = app.opts.limits.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut emit = |e: steer::Event| tx.blocking_send(e).is_ok();
        steer::generate(&loaded, &req, &limits, &mut emit);
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let e = rx.recv().await?;
        let mut line = serde_json::to_vec(&e).expect("serializable");
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(line), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

fn mime(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "png" => "image/png",
        "svg" => "image/svg+xml",
        "json" => "application/json",
        "jsonl" => "application/x-ndjson",
        "csv" => "text/csv; charset=utf-8",
        "txt" | "log" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

async fn file(
    State(app): State<Arc<App>>,
    UrlPath((pipeline, stage, path)): UrlPath<(String, String, String)>,
) -> Result<Response, ApiError> {
    let cat = app.catalog()?;
    let p =
        cat.pipeline(&pipeline).ok_or_else(|| ApiError::not_found(format!("no pipeline `{pipeline}`")))?;
    let s =
        p.stage(&stage).ok_or_else(|| ApiError::not_found(format!("no stage `{stage}` in `{pipeline}`")))?;
    // Only a path the manifest lists, compared as a string: `..`, absolute paths and symlinks
    // never match one (objects hold regular files only).
    if !s.has_file(&path) {
        return Err(ApiError::not_found(format!("`{stage}` has no published file `{path}`")));
    }
    let full = s.object.as_ref().expect("has_file").out_dir().join(&path);
    let bytes =
        tokio::fs::read(&full).await.map_err(|e| ApiError::internal(format!("{}: {e}", full.display())))?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, mime(&path)), (header::CACHE_CONTROL, "max-age=3600")],
        bytes,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use axum::http::Request;
    use engine::Key;
    use engine::store::{FileEntry, Manifest, Object};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    fn manifest(files: &[&str]) -> Manifest {
        Manifest {
            format: 1,
            key: Key::from_bytes([1; 32]).hex(),
            kind: "plot".into(),
            stage_version: 1,
            preimage: json!({}),
            files: files
                .iter()
                .map(|f| FileEntry { path: f.to_string(), size: 1, blake3: String::new() })
                .collect(),
            bytes: 1,
            metrics: BTreeMap::new(),
            produced_by: "plot".into(),
            started: String::new(),
            finished: String::new(),
            seconds: 0.0,
            resumed: false,
            tool: String::new(),
        }
    }

    /// A catalog with one pipeline `p` whose stage `s` has an object in `dir` listing `a.png`
    /// and `sub/b.svg`; `dir` also holds files the manifest does not list.
    fn app(dir: &std::path::Path) -> Arc<App> {
        let out = dir.join("obj/out");
        std::fs::create_dir_all(out.join("sub")).unwrap();
        std::fs::write(out.join("a.png"), b"png bytes").unwrap();
        std::fs::write(out.join("sub/b.svg"), b"<svg/>").unwrap();
        std::fs::write(out.join("unlisted.txt"), b"UNLISTED-CONTENT").unwrap();
        std::fs::write(dir.join("obj/manifest.json"), b"{}").unwrap();
        std::fs::write(dir.join("secret"), b"SECRET-CONTENT").unwrap();
        let stage = StageEntry {
            name: "s".into(),
            kind: "plot".into(),
            key: Key::from_bytes([2; 32]),
            inputs: Vec::new(),
            object: Some(Object { dir: dir.join("obj"), manifest: manifest(&["a.png", "sub/b.svg"]) }),
        };
        let cat = Catalog {
            pipelines: vec![PipelineEntry {
                name: "p".into(),
                file: "p.toml".into(),
                status: "ok".into(),
                started: None,
                stages: vec![stage],
            }],
        };
        Arc::new(App::new(Arc::new(move || Ok(cat.clone())), candle_core::Device::Cpu, Options::default()))
    }

    async fn call(app: &Arc<App>, method: &str, uri: &str, body: &str) -> (StatusCode, String, Vec<u8>) {
        let req = Request::builder().method(method).uri(uri).body(Body::from(body.to_string())).unwrap();
        let resp = router(app.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let mime = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
        (status, mime, bytes)
    }

    fn error(bytes: &[u8]) -> String {
        serde_json::from_slice::<Value>(bytes).unwrap()["error"].as_str().unwrap().to_string()
    }

    #[tokio::test]
    async fn serves_only_files_the_manifest_lists() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let (status, mime, bytes) = call(&app, "GET", "/files/p/s/a.png", "").await;
        assert_eq!(
            (status, mime.as_str(), bytes.as_slice()),
            (StatusCode::OK, "image/png", &b"png bytes"[..])
        );
        let (status, mime, _) = call(&app, "GET", "/files/p/s/sub/b.svg", "").await;
        assert_eq!((status, mime.as_str()), (StatusCode::OK, "image/svg+xml"));
        for uri in [
            "/files/p/s/unlisted.txt",
            "/files/p/s/../manifest.json",
            "/files/p/s/%2e%2e/manifest.json",
            "/files/p/s/..%2F..%2Fsecret",
            "/files/p/s/%2Fetc%2Fpasswd",
            "/files/p/s/sub/../a.png",
            "/files/p/s/",
        ] {
            let (status, _, bytes) = call(&app, "GET", uri, "").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains("UNLISTED-CONTENT") && !text.contains("SECRET-CONTENT"),
                "{uri} leaked a file"
            );
        }
        let (status, _, bytes) = call(&app, "GET", "/files/q/s/a.png", "").await;
        assert_eq!((status, error(&bytes)), (StatusCode::NOT_FOUND, "no pipeline `q`".to_string()));
    }

    #[tokio::test]
    async fn page_assets_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let (status, mime, bytes) = call(&app, "GET", "/", "").await;
        assert_eq!((status, mime.as_str()), (StatusCode::OK, "text/html; charset=utf-8"));
        let html = String::from_utf8(bytes).unwrap();
        assert!(html.contains("/assets/app.js") && !html.contains("http://") && !html.contains("https://"));
        let (status, mime, bytes) = call(&app, "GET", "/assets/app.js", "").await;
        assert_eq!((status, mime.as_str()), (StatusCode::OK, "text/javascript; charset=utf-8"));
        assert!(!String::from_utf8(bytes).unwrap().contains("https://"), "the page fetches nothing remote");
        let (status, _, bytes) = call(&app, "GET", "/api/nope", "").await;
        assert_eq!((status, error(&bytes).as_str()), (StatusCode::NOT_FOUND, "no such page or API route"));
        let (status, _, bytes) = call(&app, "GET", "/api/p/p/t/s/latents", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(error(&bytes).contains("`s` is not a published latent table of `p`"), "{}", error(&bytes));
        let (status, _, bytes) = call(&app, "GET", "/api/p/p/t/s/latents?limit=0", "").await;
        assert_eq!((status, error(&bytes).as_str()), (StatusCode::BAD_REQUEST, "`limit` must be 1 to 1000"));
        let (status, _, bytes) = call(&app, "GET", "/api/p/p/t/s/latent/-1", "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{}", error(&bytes));
        let (status, _, bytes) = call(&app, "GET", "/api/p/p/t/s/latent/1?per_bucket=1000", "").await;
        assert!(status == StatusCode::BAD_REQUEST && error(&bytes).contains("`per_bucket`"));
        let (status, _, bytes) = call(&app, "GET", "/api/pipelines", "").await;
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!((status, v["pipelines"][0]["stages"][0]["name"].as_str()), (StatusCode::OK, Some("s")));
    }

    #[tokio::test]
    async fn steering_requests_are_checked_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let (status, _, bytes) =
            call(&app, "POST", "/api/p/p/t/s/steer", r#"{"prompt": "hi", "strength": 1}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error(&bytes).contains("unknown field `strength`"), "{}", error(&bytes));
        let (status, _, bytes) = call(&app, "POST", "/api/p/p/t/s/steer", r#"{"prompt": "hi"}"#).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{}", error(&bytes));
        // While a generation holds the only permit, another request is refused at once.
        let held = app.permits.clone().try_acquire_owned().unwrap();
        let (status, _, bytes) = call(&app, "POST", "/api/p/p/t/s/steer", r#"{"prompt": "hi"}"#).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(error(&bytes).contains("already running"), "{}", error(&bytes));
        drop(held);
        let (status, _, _) = call(&app, "POST", "/api/p/p/t/s/steer", r#"{"prompt": "hi"}"#).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "the permit is back");
    }
}
