//! `pipe report`: one self-contained HTML page of a pipeline's latest results (stages, parameters,
//! metrics and figures, images inlined as data URIs), with no network assets and no JavaScript.
//!
//! Figures follow a convention any stage kind may use: a `figures.json` in `out/` lists them in
//! order as `[{"file": "delta_norm.png", "title": "…", "caption": "…", "svg": "delta_norm.svg"}]`
//! (`file` relative to `out/`; `title`, `caption` and `svg` optional). A stage without one gets
//! every top-level `*.png` of its `out/`, by name.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use crate::config::Pipeline;
use crate::plan::{Plan, StagePlan, State};
use crate::report::flatten;
use crate::store::Object;

/// The file of the figure convention, in a stage's `out/`.
pub const FIGURES_FILE: &str = "figures.json";

/// One entry of `figures.json`.
#[derive(Deserialize)]
struct FigureEntry {
    file: String,
    #[serde(default)]
    title: String,
    #[serde(default)]
    caption: String,
    #[serde(default)]
    svg: Option<String>,
}

/// Reads a file of a published object; `None` when it cannot be read.
pub type Reader<'a> = dyn Fn(&Path) -> Option<Vec<u8>> + 'a;

/// The page for `p` as planned in `plan`. `datastore` and `generated` (RFC 3339) are shown as
/// they are; figures are read through `read` from the published objects' `out/` folders.
pub fn render(p: &Pipeline, plan: &Plan, datastore: &Path, generated: &str, read: &Reader<'_>) -> String {
    let mut h = String::new();
    let title = esc(&p.name);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title} · pipe report</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n<h1>{title}</h1>\n"
    );
    if !p.description.is_empty() {
        let _ = writeln!(h, "<p class=\"description\">{}</p>", esc(&p.description));
    }
    let _ = writeln!(
        h,
        "<table class=\"about\">\n<tr><th>pipeline file</th><td><code>{}</code></td></tr>\n\
         <tr><th>datastore</th><td><code>{}</code></td></tr>\n<tr><th>generated</th><td>{}</td></tr>\n</table>",
        esc(&p.file.display().to_string()),
        esc(&datastore.display().to_string()),
        esc(generated)
    );

    h.push_str(
        "<h2>Stages</h2>\n<table>\n<thead><tr><th>stage</th><th>kind</th><th>key</th><th>state</th>\
                <th class=\"num\">seconds</th></tr></thead>\n<tbody>\n",
    );
    for s in &plan.stages {
        let seconds = s.object.as_ref().map(|o| sig4(o.manifest.seconds)).unwrap_or_default();
        let _ = writeln!(
            h,
            "<tr><td><a href=\"#stage-{0}\">{0}</a></td><td>{1}</td><td><code>{2}</code></td>\
             <td class=\"state-{3}\">{3}</td><td class=\"num\">{4}</td></tr>",
            esc(&s.name),
            esc(&s.kind),
            esc(&s.key.short()),
            s.state.as_str(),
            seconds
        );
    }
    h.push_str("</tbody>\n</table>\n");

    for s in &plan.stages {
        stage_section(&mut h, p, s, read);
    }
    h.push_str("</main>\n</body>\n</html>\n");
    h
}

fn stage_section(h: &mut String, p: &Pipeline, s: &StagePlan, read: &Reader<'_>) {
    let _ = writeln!(
        h,
        "<section id=\"stage-{0}\">\n<h2>{0} <span class=\"kind\">{1}</span></h2>",
        esc(&s.name),
        esc(&s.kind)
    );
    let _ = writeln!(h, "<p class=\"key\">key <code>{}</code></p>", esc(&s.key.hex()));
    match (&s.object, s.state) {
        (Some(o), State::Cached) => {
            let _ = writeln!(
                h,
                "<p>finished {} in {} s{}</p>",
                esc(&o.manifest.finished),
                sig4(o.manifest.seconds),
                if o.manifest.resumed { " (resumed)" } else { "" }
            );
        }
        _ => {
            let _ = writeln!(
                h,
                "<p class=\"not-run\">not run yet (run <code>pipe run {}</code>)</p>",
                esc(&p.file.display().to_string())
            );
        }
    }

    if let Some(decl) = p.stage(&s.name) {
        let mut rows = Vec::new();
        for (role, ups) in &decl.inputs {
            rows.push((format!("inputs.{role}"), ups.join(", ")));
        }
        for e in &decl.external {
            let paths: Vec<String> = e.paths.iter().map(|x| x.display().to_string()).collect();
            rows.push((format!("inputs.{}", e.role), paths.join(", ")));
        }
        let mut params = Vec::new();
        flatten(&decl.params, "", &mut params);
        rows.extend(params.into_iter().map(|(k, v)| (k, v.to_string())));
        if !rows.is_empty() {
            h.push_str("<h3>Parameters</h3>\n<table>\n<tbody>\n");
            for (k, v) in rows {
                let _ = writeln!(
                    h,
                    "<tr><th><code>{}</code></th><td><code>{}</code></td></tr>",
                    esc(&k),
                    esc(&v)
                );
            }
            h.push_str("</tbody>\n</table>\n");
        }
    }

    let Some(o) = &s.object else {
        h.push_str("</section>\n");
        return;
    };
    if !o.manifest.metrics.is_empty() {
        h.push_str("<h3>Metrics</h3>\n<table>\n<tbody>\n");
        for (k, v) in &o.manifest.metrics {
            let _ = writeln!(h, "<tr><th>{}</th><td class=\"num\">{}</td></tr>", esc(k), esc(&metric(v)));
        }
        h.push_str("</tbody>\n</table>\n");
    }
    let (figures, notes) = figures_of(o, read);
    if !figures.is_empty() || !notes.is_empty() {
        h.push_str("<h3>Figures</h3>\n");
    }
    for n in notes {
        let _ = writeln!(h, "<p class=\"note\">{}</p>", esc(&n));
    }
    for f in figures {
        let _ = write!(
            h,
            "<figure>\n<img src=\"data:{};base64,{}\" alt=\"{}\">\n<figcaption><strong>{}</strong>",
            f.mime,
            f.data,
            esc(&f.title),
            esc(&f.title)
        );
        if !f.caption.is_empty() {
            let _ = write!(h, " {}", esc(&f.caption));
        }
        if let Some((name, svg)) = &f.svg {
            let _ = write!(
                h,
                " <a download=\"{0}\" href=\"data:image/svg+xml;base64,{1}\">{0}</a>",
                esc(name),
                svg
            );
        }
        h.push_str("</figcaption>\n</figure>\n");
    }
    h.push_str("</section>\n");
}

struct Figure {
    title: String,
    caption: String,
    mime: &'static str,
    /// Base64.
    data: String,
    /// (file name, base64) of an SVG version.
    svg: Option<(String, String)>,
}

/// The figures of a published object, in page order, and notes on those that cannot be shown.
fn figures_of(o: &Object, read: &Reader<'_>) -> (Vec<Figure>, Vec<String>) {
    let out = o.out_dir();
    let files: BTreeSet<&str> = o.manifest.files.iter().map(|f| f.path.as_str()).collect();
    let b64 = |rel: &str| read(&out.join(rel)).map(|b| base64::engine::general_purpose::STANDARD.encode(b));
    let mut notes = Vec::new();
    let entries: Option<Vec<FigureEntry>> = if files.contains(FIGURES_FILE) {
        match read(&out.join(FIGURES_FILE)).map(|b| serde_json::from_slice::<Vec<FigureEntry>>(&b)) {
            Some(Ok(e)) => Some(e),
            Some(Err(e)) => {
                notes.push(format!(
                    "{FIGURES_FILE} is not a list of figures ({e}); showing every PNG instead"
                ));
                None
            }
            None => {
                notes.push(format!("{FIGURES_FILE} cannot be read; showing every PNG instead"));
                None
            }
        }
    } else {
        None
    };
    let entries = entries.unwrap_or_else(|| {
        files
            .iter()
            .filter(|f| !f.contains('/') && f.to_ascii_lowercase().ends_with(".png"))
            .map(|f| FigureEntry {
                file: f.to_string(),
                title: f.to_string(),
                caption: String::new(),
                svg: None,
            })
            .collect()
    });
    let mut figures = Vec::new();
    for e in entries {
        // Only files the manifest lists: they are inside out/ and were published with the object.
        if !files.contains(e.file.as_str()) {
            notes.push(format!("figure {} is not among the stage's outputs", e.file));
            continue;
        }
        let Some(mime) = mime_of(&e.file) else {
            notes.push(format!("figure {} is not an image (png, svg, jpeg, gif or webp)", e.file));
            continue;
        };
        let Some(data) = b64(&e.file) else {
            notes.push(format!("figure {} cannot be read", e.file));
            continue;
        };
        let svg = e
            .svg
            .filter(|s| files.contains(s.as_str()))
            .and_then(|s| b64(&s).map(|d| (s.rsplit('/').next().unwrap_or(&s).to_string(), d)));
        let title = if e.title.is_empty() { e.file.clone() } else { e.title };
        figures.push(Figure { title, caption: e.caption, mime, data, svg });
    }
    (figures, notes)
}

fn mime_of(file: &str) -> Option<&'static str> {
    let ext = file.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match ext.as_str() {
        "png" => "image/png",
        "svg" => "image/svg+xml",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        _ => return None,
    })
}

/// A metric for people: integers as they are, other numbers to 4 significant digits.
fn metric(v: &Value) -> String {
    match v {
        Value::Number(n) if n.is_f64() => n.as_f64().map(sig4).unwrap_or_else(|| n.to_string()),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// `x` to 4 significant digits: `0.01235`, `1235`, `3`, `1.235e-7`.
pub fn sig4(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let mag = x.abs().log10().floor() as i32;
    if !(-4..6).contains(&mag) {
        let s = format!("{x:.3e}");
        // `1.230e-7` → `1.23e-7`
        return match s.split_once('e') {
            Some((m, e)) if m.contains('.') => {
                format!("{}e{e}", m.trim_end_matches('0').trim_end_matches('.'))
            }
            _ => s,
        };
    }
    let decimals = (3 - mag).max(0) as usize;
    let s = format!("{x:.decimals$}");
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
}

/// Text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const CSS: &str = "
:root { color-scheme: light; }
body { font: 15px/1.5 system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; color: #1d1d1f;
  background: #fff; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.8em; margin: 0 0 4px; }
h2 { font-size: 1.35em; margin: 32px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 1.05em; margin: 18px 0 6px; }
.kind { font-size: 0.7em; font-weight: normal; color: #666; }
.description { color: #444; margin-top: 0; }
.key, .note { color: #666; font-size: 0.9em; }
.not-run { color: #8a5a00; }
code { font: 0.9em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { text-align: left; vertical-align: top; padding: 3px 12px 3px 6px; }
thead th { border-bottom: 2px solid #ccc; }
tbody tr:nth-child(even) { background: #f4f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.about th { color: #666; font-weight: normal; }
.state-cached { color: #1a7f37; }
.state-partial, .state-stale { color: #8a5a00; }
.state-missing { color: #a40e26; }
figure { margin: 16px 0; break-inside: avoid; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; margin-top: 4px; }
a { color: #0550ae; }
@media print {
  main { max-width: none; padding: 0; }
  h2 { break-after: avoid; }
  section { break-inside: auto; }
  a { color: inherit; text-decoration: none; }
}
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{RunOptions, run};
    use crate::plan::tests::Fixture;
    use crate::plan::{PlanOptions, plan};
    use crate::store::FileEntry;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    /// A pipeline whose `web` stage is published (with the given output files, served by the
    /// reader from `files`) and whose `train` stage has not run.
    fn page(files: &[(&str, &[u8])]) -> String {
        let f = Fixture::new();
        let (registry, store) = (&f.registry, &f.store);
        let mut p = f.load_as("p", &[]);
        p.description = "a \"quoted\" <script>alert(1)</script> description".into();
        let pl = plan(&p, registry, store, &PlanOptions::default()).unwrap();
        let opts = RunOptions { only: ["web".to_string()].into_iter().collect(), ..RunOptions::default() };
        assert!(run(&p, registry, store, &pl, &opts).unwrap().ok());
        let mut pl = plan(&p, registry, store, &PlanOptions::default()).unwrap();
        // A name the store would refuse, to see it escaped.
        p.name = "p<&>".into();
        let web = pl.stages.iter_mut().find(|s| s.name == "web").unwrap();
        let obj = web.object.as_mut().unwrap();
        obj.manifest.files = files
            .iter()
            .map(|(f, b)| FileEntry { path: f.to_string(), size: b.len() as u64, blake3: String::new() })
            .collect();
        obj.manifest.metrics = BTreeMap::from([
            ("loss".to_string(), serde_json::json!(0.0123456)),
            ("rows".to_string(), serde_json::json!(4096)),
            ("<b>".to_string(), serde_json::json!("x&y")),
        ]);
        let out = obj.out_dir();
        let served: BTreeMap<PathBuf, Vec<u8>> =
            files.iter().map(|(f, b)| (out.join(f), b.to_vec())).collect();
        let read = move |path: &Path| served.get(path).cloned();
        render(&p, &pl, Path::new("/ds"), "2026-01-02T03:04:05Z", &read)
    }

    fn data_uri(mime: &str, bytes: &[u8]) -> String {
        format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    #[test]
    fn everything_is_escaped_and_nothing_is_fetched() {
        let html = page(&[]);
        assert!(html.contains("<h1>p&lt;&amp;&gt;</h1>"), "{html}");
        assert!(html.contains("a &quot;quoted&quot; &lt;script&gt;alert(1)&lt;/script&gt; description"));
        assert!(!html.contains("<script"));
        assert!(html.contains("<th>&lt;b&gt;</th><td class=\"num\">x&amp;y</td>"));
        assert!(!html.contains("http://") && !html.contains("https://"));
        assert!(html.contains("2026-01-02T03:04:05Z"));
    }

    #[test]
    fn stages_metrics_and_parameters() {
        let html = page(&[]);
        assert!(html.contains("<td class=\"num\">0.01235</td>"), "{html}");
        assert!(html.contains("<td class=\"num\">4096</td>"));
        assert!(html.contains("<tr><th><code>seed</code></th><td><code>1</code></td></tr>"));
        assert!(
            html.contains("<tr><th><code>n</code></th><td><code>10</code></td></tr>"),
            "defaults are filled in"
        );
        assert!(html.contains("<tr><th><code>inputs.activations</code></th><td><code>web</code></td></tr>"));
        // train has not run; web has.
        let train = &html[html.find("<section id=\"stage-train\">").unwrap()..];
        assert!(train.contains("not run yet (run <code>pipe run "), "{train}");
        let web = &html[html.find("<section id=\"stage-web\">").unwrap()
            ..html.find("<section id=\"stage-train\">").unwrap()];
        assert!(!web.contains("not run yet"), "{web}");
        // Topological order.
        assert!(html.find("id=\"stage-web\"").unwrap() < html.find("id=\"stage-train\"").unwrap());
    }

    #[test]
    fn figures_json_orders_titles_and_captions() {
        let json = br#"[{"file": "b.png", "title": "B <one>", "caption": "x & y", "svg": "b.svg"},
                        {"file": "a.png"}, {"file": "../etc/passwd.png"}]"#;
        let html =
            page(&[("a.png", b"AAA"), ("b.png", b"BBB"), ("b.svg", b"<svg/>"), ("figures.json", json)]);
        let (a, b) = (data_uri("image/png", b"AAA"), data_uri("image/png", b"BBB"));
        assert!(html.find(&b).unwrap() < html.find(&a).unwrap(), "listed order");
        assert!(html.contains(&format!("<img src=\"{b}\" alt=\"B &lt;one&gt;\">")), "{html}");
        assert!(html.contains("<figcaption><strong>B &lt;one&gt;</strong> x &amp; y"));
        assert!(html.contains(&data_uri("image/svg+xml", b"<svg/>")));
        assert!(html.contains("figure ../etc/passwd.png is not among the stage&#39;s outputs"));
    }

    #[test]
    fn without_figures_json_every_top_level_png_by_name() {
        let html = page(&[("z.png", b"ZZ"), ("a.png", b"AA"), ("sub/c.png", b"CC"), ("t.txt", b"TT")]);
        let (a, z) = (data_uri("image/png", b"AA"), data_uri("image/png", b"ZZ"));
        assert!(html.find(&a).unwrap() < html.find(&z).unwrap());
        assert!(!html.contains(&data_uri("image/png", b"CC")));
        assert!(html.contains("<figure>\n<img src=\"") && html.contains("alt=\"a.png\""));
    }

    #[test]
    fn numbers_have_four_significant_digits() {
        for (x, want) in [
            (0.0123456, "0.01235"),
            (1234.5678, "1235"),
            (3.0, "3"),
            (1.5e-7, "1.5e-7"),
            (2.5e9, "2.5e9"),
            (-0.5, "-0.5"),
        ] {
            assert_eq!(sig4(x), want, "{x}");
        }
    }
}
