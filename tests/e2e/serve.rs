//! `pipe serve` on the tiny pipeline through the real binary: the JSON API over HTTP (tables,
//! latents, examples, figures, steering, path safety, 4xx), and the page in headless Chromium
//! driven over WebDriver (chromedriver): open the explorer, open a latent, run a steering
//! request, with screenshots under `target/tmp/serve-*.png`.
//!
//! The browser test needs Debian's `chromium` and `chromium-driver`; without them it is skipped
//! with a message, unless `PIPE_REQUIRE_BROWSER=1` (as `.ci/run` sets), when it fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Env, tiny_toml};

/// A running `pipe serve`, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(env: &Env, args: &[&str]) -> Server {
        let mut all = vec!["serve", "--port", "0"];
        all.extend_from_slice(args);
        let mut child = env.cmd(&all).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line
            .strip_prefix("serving http://")
            .and_then(|r| r.split('/').next())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request (`Connection: close`); the path is sent exactly as given.
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Headers first; then the body by its length, by chunks, or to the end (chromedriver keeps
    // connections open, so the length is what ends a response).
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push_str(&line);
    }
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim())
            })
            .unwrap_or("")
            .to_string()
    };
    let mut out = Vec::new();
    if header("transfer-encoding") == "chunked" {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
        }
    } else if let Ok(n) = header("content-length").parse::<usize>() {
        out.resize(n, 0);
        reader.read_exact(&mut out).unwrap();
    } else {
        reader.read_to_end(&mut out).unwrap();
    }
    (status, header("content-type"), out)
}

fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, _, body) = http(addr, "GET", path, None);
    (
        status,
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| panic!("{path}: {}", String::from_utf8_lossy(&body))),
    )
}

/// Steers and returns (events, steered text, plain text).
fn steer(addr: SocketAddr, req: Value) -> (Vec<Value>, String, String) {
    let (status, mime, body) = http(addr, "POST", "/api/p/tiny/t/scale/steer", Some(&req));
    assert_eq!((status, mime.as_str()), (200, "application/x-ndjson"), "{}", String::from_utf8_lossy(&body));
    let events: Vec<Value> =
        String::from_utf8(body).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let text = |stream: &str| {
        events
            .iter()
            .filter(|e| e["event"] == "token" && e["stream"] == stream)
            .map(|e| e["text"].as_str().unwrap())
            .collect::<String>()
    };
    let (s, p) = (text("steered"), text("plain"));
    (events, s, p)
}

/// The most frequent chat-only latent of the tiny pipeline's scale table, and its max activation.
fn chat_only_latent(addr: SocketAddr) -> (u64, f64) {
    let (status, page) =
        get_json(addr, "/api/p/tiny/t/scale/latents?class=Chat%20only&sort=frequency&desc=1&limit=1");
    assert_eq!(status, 200, "{page}");
    let cols: Vec<&str> = page["columns"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let at = |c: &str| cols.iter().position(|x| *x == c).unwrap();
    let row = &page["rows"][0];
    (row[at("latent")].as_u64().unwrap(), row[at("max_activation")].as_f64().unwrap())
}

#[test]
fn api_on_the_tiny_pipeline() {
    let env = Env::pipe();
    env.write("tiny.toml", &tiny_toml());
    env.ok(&["run", "tiny.toml"]);
    let server = Server::start(&env, &[]);
    let addr = server.addr;

    // Pipelines and views: both latent tables, each with the crosscoder, examples and cache.
    let (status, cat) = get_json(addr, "/api/pipelines");
    assert_eq!(status, 200);
    let p = &cat["pipelines"][0];
    assert_eq!(p["name"], "tiny");
    let views: Vec<&str> =
        p["views"].as_array().unwrap().iter().map(|v| v["table"].as_str().unwrap()).collect();
    assert_eq!(views, ["collect", "scale"]);
    let scale = &p["views"][1];
    assert_eq!(
        (&scale["crosscoder"], &scale["examples"], &scale["statistics"], &scale["can_steer"]),
        (&json!("train"), &json!("collect"), &json!("collect"), &json!(true))
    );
    let plots = scale["figures"].as_array().unwrap().iter().filter(|f| f["stage"] == "plot").count();
    assert_eq!(plots, 8, "the plot stage's figures belong to the scale table: {scale}");

    // The table: a class filter and a sort, checked against the published CSV.
    let csv = std::fs::read_to_string(env.ds().join("results/tiny/scale/latents.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let class_at = header.iter().position(|c| *c == "class").unwrap();
    let chat_only = csv.lines().skip(1).filter(|l| l.split(',').nth(class_at) == Some("Chat only")).count();
    assert!(chat_only > 0, "the tiny pipeline plants chat-only latents");
    let (status, page) =
        get_json(addr, "/api/p/tiny/t/scale/latents?class=Chat%20only&sort=delta_norm&desc=1");
    assert_eq!(
        (status, page["total"].as_u64(), page["rows_in_table"].as_u64()),
        (200, Some(chat_only as u64), Some(256))
    );
    let cols: Vec<&str> = page["columns"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let (ci, di) = (
        cols.iter().position(|c| *c == "class").unwrap(),
        cols.iter().position(|c| *c == "delta_norm").unwrap(),
    );
    let rows = page["rows"].as_array().unwrap();
    assert!(rows.iter().all(|r| r[ci] == "Chat only"));
    let dn: Vec<f64> = rows.iter().map(|r| r[di].as_f64().unwrap()).collect();
    assert!(dn.windows(2).all(|w| w[0] >= w[1]), "{dn:?}");
    let (status, page) =
        get_json(addr, "/api/p/tiny/t/scale/latents?min.frequency=0.02&max.frequency=0.03&limit=1000");
    assert_eq!(status, 200);
    let fi = cols.iter().position(|c| *c == "frequency").unwrap();
    assert!(
        page["rows"].as_array().unwrap().iter().all(|r| (0.02..=0.03).contains(&r[fi].as_f64().unwrap()))
    );

    // A latent page: its row, and examples whose token activations peak at the example's activation.
    let (j, max_act) = chat_only_latent(addr);
    let (status, latent) = get_json(addr, &format!("/api/p/tiny/t/scale/latent/{j}?per_bucket=3"));
    assert_eq!((status, latent["row"]["class"].as_str()), (200, Some("Chat only")), "{latent}");
    assert!(latent["row"]["freq_val"].is_number(), "the collect table's statistics are merged in");
    let buckets = latent["examples"].as_array().unwrap();
    assert!(!buckets.is_empty());
    let top = &buckets[0]["examples"][0];
    let acts: Vec<f64> = top["activations"].as_array().unwrap().iter().map(|a| a.as_f64().unwrap()).collect();
    assert_eq!(acts.len(), top["tokens"].as_array().unwrap().len());
    let peak = acts.iter().copied().fold(0.0, f64::max);
    assert!((peak - top["activation"].as_f64().unwrap()).abs() < 1e-6 && peak <= max_act + 1e-6, "{top}");
    assert!(buckets.iter().all(|b| b["examples"].as_array().unwrap().len() <= 3));

    // A column's histogram over every latent accounts for each of them.
    let (status, hist) =
        get_json(addr, "/api/p/tiny/t/scale/histogram?column=nu_error&bins=20&lo=-0.2&hi=1.5");
    assert_eq!((status, hist["counts"].as_array().unwrap().len()), (200, 20), "{hist}");
    let counted: u64 = hist["counts"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).sum::<u64>()
        + ["below", "above", "missing"].iter().map(|k| hist[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(counted, 256);
    let (status, v) = get_json(addr, "/api/p/tiny/t/scale/histogram?column=class");
    assert!(status == 400 && v["error"].as_str().unwrap().contains("text column"), "{v}");

    // Figures: the published bytes; nothing else.
    let (status, mime, png) = http(addr, "GET", "/files/tiny/plot/delta_norm.png", None);
    assert_eq!((status, mime.as_str()), (200, "image/png"));
    assert_eq!(png, std::fs::read(env.ds().join("results/tiny/plot/delta_norm.png")).unwrap());
    for path in [
        "/files/tiny/plot/../train/crosscoder.safetensors",
        "/files/tiny/plot/%2e%2e/%2e%2e/manifest.json",
        "/files/tiny/plot/..%2f..%2f..%2fFORMAT",
        "/files/tiny/plot//etc/passwd",
        "/files/tiny/nope/delta_norm.png",
    ] {
        let (status, _, body) = http(addr, "GET", path, None);
        assert_eq!(status, 404, "{path}: {}", String::from_utf8_lossy(&body));
    }

    // Bad parameters: 4xx naming them.
    for (path, want) in [
        ("/api/p/tiny/t/scale/latents?sort=bogus", "no column `bogus`"),
        ("/api/p/tiny/t/scale/latents?min.delta_norm=x", "`min.delta_norm` must be a number"),
        ("/api/p/tiny/t/scale/latent/99999", "latent 99999 is out of range"),
        ("/api/p/tiny/t/train/latents", "`train` is not a published latent table"),
        ("/api/p/other/t/scale/latents", "no pipeline `other`"),
    ] {
        let (status, v) = get_json(addr, path);
        assert!((400..500).contains(&status), "{path}: {status}");
        assert!(v["error"].as_str().unwrap().contains(want), "{path}: {v}");
    }

    // Steering: streamed events; greedy generation is deterministic; no latents = no change;
    // a chat-only latent at a few times its max activation changes the generation.
    let req = |latents: Value| json!({"prompt": "What is 2+2?", "latents": latents, "max_new_tokens": 12});
    let (events, steered, plain) = steer(addr, req(json!([{"latent": j, "strength": 20.0 * max_act}])));
    assert_eq!(events.first().unwrap()["event"], "start");
    assert_eq!(events.last().unwrap()["event"], "done");
    assert_eq!(events.iter().filter(|e| e["event"] == "end").count(), 2, "{events:?}");
    assert!(!steered.is_empty() && !plain.is_empty());
    assert_ne!(steered, plain, "steering with a chat-only latent changes the output");
    let again = steer(addr, req(json!([{"latent": j, "strength": 20.0 * max_act}])));
    assert_eq!((again.1, again.2), (steered, plain.clone()), "greedy generation is repeatable");
    let (_, s0, p0) = steer(addr, req(json!([])));
    assert_eq!((&s0, &p0), (&plain, &plain));
    let (status, _, body) = http(
        addr,
        "POST",
        "/api/p/tiny/t/scale/steer",
        Some(&json!({"prompt": "hi", "latents": [{"latent": 256, "strength": 1}]})),
    );
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("`latents[0].latent` = 256 is out of range"));
    let (status, _, body) = http(
        addr,
        "POST",
        "/api/p/tiny/t/scale/steer",
        Some(&json!({"prompt": "hi", "max_new_tokens": 100000})),
    );
    assert!(status == 400 && String::from_utf8_lossy(&body).contains("`max_new_tokens`"));
}

// ---- the browser ----

/// A WebDriver session on chromedriver + headless Chromium.
struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    fn start() -> Option<Browser> {
        let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let driver_bin = ["/usr/bin/chromedriver"].into_iter().find(|p| std::path::Path::new(p).exists());
        let (Some(chromium), Some(driver_bin)) = (chromium, driver_bin) else {
            assert!(
                std::env::var_os("PIPE_REQUIRE_BROWSER").is_none(),
                "PIPE_REQUIRE_BROWSER is set but chromium / chromedriver are not installed"
            );
            eprintln!("SKIPPED: the browser test needs Debian's chromium and chromium-driver");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = std::process::Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let started = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().unwrap().keep();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1280,1100",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args}
        }}});
        let mut b = Browser { driver, addr, session: String::new() };
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {v}")).to_string();
        b.call("POST", "/timeouts", Some(json!({"implicit": 30000, "script": 30000, "pageLoad": 30000})));
        Some(b)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_call(method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Value> {
        let path =
            if path == "/session" { path.to_string() } else { format!("/session/{}{path}", self.session) };
        let (status, _, bytes) = http(self.addr, method, &path, Some(&body.unwrap_or(json!({}))));
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        if status == 200 { Ok(v["value"].clone()) } else { Err(v["value"].clone()) }
    }

    fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({"url": url})));
    }

    /// The first element matching `css`, waiting for it (implicit wait).
    fn find(&self, css: &str) -> String {
        let v = self.call("POST", "/element", Some(json!({"using": "css selector", "value": css})));
        v[ELEMENT].as_str().unwrap().to_string()
    }

    /// Retries `f` while the page re-renders under it (a stale element), for up to 30 s.
    fn retry<T>(&self, what: &str, f: impl Fn() -> Result<T, Value>) -> T {
        let started = Instant::now();
        loop {
            match f() {
                Ok(t) => return t,
                Err(e) if started.elapsed() < Duration::from_secs(30) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("{what}: {e}"),
            }
        }
    }

    fn click(&self, css: &str) {
        self.retry(css, || {
            let id = self.find(css);
            self.try_call("POST", &format!("/element/{id}/click"), None)
        });
    }

    fn text(&self, css: &str) -> String {
        self.retry(css, || {
            let id = self.find(css);
            self.try_call("GET", &format!("/element/{id}/text"), None)
                .map(|v| v.as_str().unwrap().to_string())
        })
    }

    /// Waits until the text of `css` satisfies `ok` (the page renders asynchronously).
    fn wait_text(&self, css: &str, ok: impl Fn(&str) -> bool) -> String {
        self.retry(css, || {
            let t = self.text(css);
            if ok(&t) { Ok(t) } else { Err(json!(format!("text is {t:?}"))) }
        })
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine as _;
        let b64 = self.call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("serve-{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(self.addr, "DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn browser_opens_a_latent_and_steers() {
    let Some(browser) = Browser::start() else { return };
    let env = Env::pipe();
    env.write("tiny.toml", &tiny_toml());
    env.ok(&["run", "tiny.toml"]);
    // This time at the pipeline file's keys.
    let server = Server::start(&env, &["tiny.toml"]);
    let url = format!("http://{}/", server.addr);

    browser.goto(&url);
    browser.click("a.view-link[href$='/t/scale']");
    browser.find("#latents tbody tr");
    let header = "#latents th[title='sort by delta_norm']";
    browser.click(header);
    browser.wait_text(header, |t| t.ends_with('▲'));
    browser.click(header);
    browser.wait_text(header, |t| t.ends_with('▼'));
    // The highest Δ_norm latent is one of the planted chat-only ones.
    assert_eq!(browser.text("#latents tbody tr td:nth-child(2)"), "Chat only");
    browser.screenshot("table");

    browser.click("#latents tbody tr");
    browser.wait_text("h1", |t| t.starts_with("Latent "));
    browser.find("#examples .example .tok[style]");
    assert!(browser.text("#stats").contains("Chat only"));
    browser.find("#places svg rect");
    assert!(browser.text("#places").contains("Δ_norm: 0."), "{}", browser.text("#places"));
    browser.screenshot("latent");

    browser.click("#steer-link");
    browser.find("#latent-rows .latent-id");
    browser.click("#generate");
    browser.find("body[data-steer-done='1']");
    let steered = browser.text("#out-steered");
    let plain = browser.text("#out-plain");
    assert!(steered.contains("tokens (") && plain.contains("tokens ("), "{steered:?} / {plain:?}");
    assert!(browser.text("#status").contains("prompt tokens"));
    browser.screenshot("steer");
}
