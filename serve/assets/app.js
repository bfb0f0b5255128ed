// pipe serve: the latent explorer's page. Plain JavaScript, no dependencies, hash routes:
//   #/                                  pipelines and their latent tables
//   #/p/P/t/T?sort=..&desc=1&class=..   the latent table T of pipeline P
//   #/p/P/t/T/latent/J                  latent J: statistics, examples, figures
//   #/p/P/t/T/steer?latent=J&strength=S&prompt=..&model=chat&autorun=1   steering
"use strict";

const $main = document.getElementById("main");
const $crumbs = document.getElementById("crumbs");
let catalog = null;

const enc = encodeURIComponent;
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

async function api(path, opts) {
  const r = await fetch(path, opts);
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error || msg; } catch (_) {}
    throw new Error(msg);
  }
  return r.json();
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return v.toLocaleString("en-US");
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return v.toFixed(digits);
}

function classPill(c) {
  const k = !c ? "" : c.startsWith("Chat") ? "chat" : c.startsWith("Base") ? "base" : c === "Shared" ? "shared" : "";
  return h("span", { class: "pill " + k }, c || "–");
}

function crumbs(items) {
  $crumbs.replaceChildren(...items.flatMap((it, i) => [
    ...(i ? [h("span", { class: "sep" }, "›")] : []),
    it.href ? h("a", { href: it.href }, it.text) : h("span", {}, it.text),
  ]));
}

function fail(e) {
  $main.replaceChildren(h("div", { class: "error", id: "error" }, e.message || String(e)));
}

async function loadCatalog() {
  catalog = (await api("/api/pipelines")).pipelines;
  return catalog;
}

function route() {
  const [path, qs] = location.hash.replace(/^#/, "").split("?");
  const q = new URLSearchParams(qs || "");
  const parts = (path || "/").split("/").filter(Boolean).map(decodeURIComponent);
  const go = async () => {
    await loadCatalog();
    if (parts[0] === "p" && parts[2] === "t" && parts[4] === "latent") return latentPage(parts[1], parts[3], +parts[5]);
    if (parts[0] === "p" && parts[2] === "t" && parts[4] === "steer") return steerPage(parts[1], parts[3], q);
    if (parts[0] === "p" && parts[2] === "t") return tablePage(parts[1], parts[3], q);
    return home();
  };
  go().catch(fail);
}

function viewOf(pipeline, table) {
  const p = catalog.find((x) => x.name === pipeline);
  if (!p) throw new Error(`no pipeline \`${pipeline}\` in the datastore`);
  const v = p.views.find((x) => x.table === table);
  if (!v) throw new Error(`\`${table}\` is not a latent table of \`${pipeline}\``);
  return [p, v];
}

const base = (p, v) => `#/p/${enc(p.name)}/t/${enc(v.table)}`;

// ---- home ----
function home() {
  crumbs([{ text: "pipelines" }]);
  if (!catalog.length) {
    $main.replaceChildren(h("h1", {}, "No pipelines yet"),
      h("p", { class: "muted" }, "Run one first: pipe run pipelines/tiny.toml"));
    return;
  }
  $main.replaceChildren(h("h1", {}, "Pipelines"), ...catalog.map((p) => h("div", { class: "card pipeline" },
    h("h2", { style: "margin-top:0" }, p.name, " ", h("span", { class: "pill" }, p.status)),
    h("div", { class: "muted" }, p.file, p.started ? " · last run " + p.started : ""),
    p.views.length ? h("p", {}, "Latent tables: ", ...p.views.flatMap((v, i) => [i ? " · " : "",
      h("a", { href: base(p, v), class: "view-link" }, v.table), v.can_steer ? " " : "",
      v.can_steer ? h("a", { href: base(p, v) + "/steer", class: "muted" }, "(steer)") : ""]))
      : h("p", { class: "muted" }, "No latent table published yet."),
    h("table", {}, h("thead", {}, h("tr", {}, ["stage", "kind", "key", "finished", "seconds", "metrics"].map((c) =>
      h("th", { class: "text" }, c)))),
      h("tbody", {}, p.stages.map((s) => h("tr", {},
        h("td", { class: "text" }, s.name), h("td", { class: "text" }, s.kind),
        h("td", { class: "text muted" }, s.key.slice(0, 12)),
        h("td", { class: "text" }, s.finished || "–"), h("td", {}, fmt(s.seconds, 2)),
        h("td", { class: "text muted" }, Object.entries(s.metrics || {}).slice(0, 4)
          .map(([k, v]) => `${k} ${fmt(v)}`).join(" · ")))))))));
}

// ---- latent table ----
const PREFERRED = ["latent", "class", "delta_norm", "dec_cos_sim", "norm_base", "norm_chat", "nu_error",
  "nu_reconstruction", "frequency", "max_activation", "template_share", "dead"];

async function tablePage(pipeline, table, q) {
  const [p, v] = viewOf(pipeline, table);
  crumbs([{ text: "pipelines", href: "#/" }, { text: p.name }, { text: v.table }]);
  const params = new URLSearchParams(q);
  if (!params.has("limit")) params.set("limit", "100");
  const page = await api(`/api/p/${enc(p.name)}/t/${enc(v.table)}/latents?${params}`);
  const all = q.get("all") === "1";
  const shown = all ? page.columns : PREFERRED.filter((c) => page.columns.includes(c));
  const idx = shown.map((c) => page.columns.indexOf(c));
  const setQ = (changes) => {
    const n = new URLSearchParams(q);
    for (const [k, val] of Object.entries(changes)) (val === "" || val === null) ? n.delete(k) : n.set(k, val);
    if (!("offset" in changes)) n.delete("offset");
    location.hash = base(p, v) + "?" + n;
  };
  const sort = q.get("sort"), desc = q.get("desc") === "1";
  const numeric = page.columns.filter((c, i) => page.types[i] !== "str");
  const bound = (which) => h("label", {}, which === "min" ? "at least" : "at most",
    h("input", { type: "number", step: "any", id: which + "-value",
      value: [...q.keys()].filter((k) => k.startsWith(which + ".")).map((k) => q.get(k))[0] || "" }));
  const boundCol = [...q.keys()].find((k) => k.startsWith("min.") || k.startsWith("max."));
  const colSel = h("select", { id: "bound-col" }, numeric.map((c) =>
    h("option", { value: c, selected: boundCol && boundCol.slice(4) === c }, c)));
  const offset = page.offset, limit = +params.get("limit");
  $main.replaceChildren(
    h("h1", {}, `${v.table} `, h("span", { class: "muted" }, `· ${fmt(page.rows_in_table)} latents · ${v.table_kind}`)),
    h("div", { class: "controls" },
      h("label", {}, "class", h("select", { id: "class", onchange: (e) => setQ({ class: e.target.value }) },
        h("option", { value: "" }, "all"), page.classes.map((c) =>
          h("option", { value: c, selected: q.get("class") === c }, c)))),
      h("label", {}, "sort by", h("select", { id: "sort", onchange: (e) => setQ({ sort: e.target.value }) },
        h("option", { value: "" }, "latent id"), page.columns.map((c) => h("option", { value: c, selected: sort === c }, c)))),
      h("label", {}, "order", h("select", { id: "order", onchange: (e) => setQ({ desc: e.target.value }) },
        h("option", { value: "" }, "ascending"), h("option", { value: "1", selected: desc }, "descending"))),
      h("label", {}, "filter column", colSel), bound("min"), bound("max"),
      h("button", { id: "apply", onclick: () => {
        const n = {};
        for (const k of [...q.keys()]) if (k.startsWith("min.") || k.startsWith("max.")) n[k] = null;
        const c = colSel.value, lo = document.getElementById("min-value").value, hi = document.getElementById("max-value").value;
        if (lo !== "") n["min." + c] = lo;
        if (hi !== "") n["max." + c] = hi;
        setQ(n);
      } }, "Filter"),
      h("button", { class: "secondary", onclick: () => { location.hash = base(p, v); } }, "Reset"),
      h("label", {}, "columns", h("select", { onchange: (e) => setQ({ all: e.target.value }) },
        h("option", { value: "" }, "main"), h("option", { value: "1", selected: all }, "all"))),
      h("label", {}, "go to latent", h("input", { type: "number", min: 0, step: 1, id: "goto", placeholder: "id",
        onkeydown: (e) => { if (e.key === "Enter" && e.target.value !== "") location.hash = `${base(p, v)}/latent/${+e.target.value}`; } })),
      v.can_steer ? h("a", { href: base(p, v) + "/steer" }, "Steering →") : null),
    h("div", { class: "pager" },
      h("button", { class: "secondary", disabled: offset === 0, onclick: () => setQ({ offset: Math.max(0, offset - limit) }) }, "‹ prev"),
      h("span", { id: "count" }, `${fmt(page.total)} match · rows ${fmt(Math.min(offset + 1, page.total))}–${fmt(Math.min(offset + limit, page.total))}`),
      h("button", { class: "secondary", disabled: offset + limit >= page.total, onclick: () => setQ({ offset: offset + limit }) }, "next ›")),
    h("table", { id: "latents" },
      h("thead", {}, h("tr", {}, shown.map((c, i) => h("th", {
        class: page.types[idx[i]] === "str" ? "text" : "",
        title: "sort by " + c,
        onclick: () => setQ({ sort: c, desc: sort === c && !desc ? "1" : "" }),
      }, c, sort === c ? (desc ? " ▼" : " ▲") : "")))),
      h("tbody", {}, page.rows.map((r) => h("tr", {
        "data-latent": r[page.columns.indexOf("latent")],
        onclick: () => { location.hash = `${base(p, v)}/latent/${r[page.columns.indexOf("latent")]}`; },
      }, idx.map((j) => h("td", { class: page.types[j] === "str" ? "text" : "" },
        page.columns[j] === "class" ? classPill(r[j]) : fmt(r[j]))))))),
    figures(p, v));
}

function figures(p, v) {
  if (!v.figures.length) return null;
  return h("div", {}, h("h2", {}, "Figures"), h("div", { class: "figures" }, v.figures.map((f) =>
    h("figure", {}, h("a", { href: `/files/${enc(p.name)}/${enc(f.stage)}/${f.path}`, target: "_blank" },
      h("img", { src: `/files/${enc(p.name)}/${enc(f.stage)}/${f.path}`, alt: f.path, loading: "lazy" })),
      h("figcaption", {}, `${f.stage} / ${f.path}`)))));
}

// ---- latent ----
const STATS = [["class", "class"], ["delta_norm", "Δ_norm"], ["dec_cos_sim", "decoder cosine"],
  ["norm_base", "‖d base‖"], ["norm_chat", "‖d chat‖"], ["nu_error", "νᵋ (error)"], ["nu_reconstruction", "νʳ (reconstruction)"],
  ["frequency", "frequency"], ["max_activation", "max activation"], ["template_share", "template share"],
  ["beta_activation_ratio", "β activation ratio"], ["dead", "dead"]];

function tokenSpan(text, act, max) {
  const a = max > 0 ? Math.min(1, act / max) : 0;
  const special = /^<\|?[^<>\s]{1,30}\|?>$/.test(text);
  const shown = text.replace(/\n/g, "↵\n");
  return h("span", {
    class: "tok" + (special ? " special" : ""),
    style: a > 0 ? `background: rgba(var(--hl), ${(0.12 + 0.78 * a).toFixed(3)})${a > 0.55 ? "; color: #fff" : ""}` : null,
    title: act > 0 ? `${JSON.stringify(text)}: ${act.toFixed(4)}` : JSON.stringify(text),
  }, shown);
}

// A histogram of one column over every latent (counts on a log scale), with this latent's value.
const SVGNS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  for (const c of children) el.append(c);
  return el;
}
const PLACES = [["delta_norm", "Δ_norm", 0, 1], ["dec_cos_sim", "decoder cosine", -1, 1],
  ["nu_error", "νᵋ", -0.2, 1.5], ["nu_reconstruction", "νʳ", -0.2, 1.5]];
function histogramFigure(hist, value, label) {
  const W = 300, H = 120, L = 6, B = 22, n = hist.counts.length;
  const top = Math.max(1, ...hist.counts.map((c) => Math.log10(1 + c)));
  const x = (v) => L + ((v - hist.lo) / (hist.hi - hist.lo || 1)) * (W - 2 * L);
  const bars = hist.counts.map((c, i) => {
    const bh = (Math.log10(1 + c) / top) * (H - B - 8);
    return svg("rect", { x: L + (i * (W - 2 * L)) / n, y: H - B - bh, width: Math.max(1, (W - 2 * L) / n - 1), height: bh, fill: "#9ecae1" });
  });
  const marks = value === null || value === undefined ? [] : [
    svg("line", { x1: x(Math.min(hist.hi, Math.max(hist.lo, value))), x2: x(Math.min(hist.hi, Math.max(hist.lo, value))),
      y1: 2, y2: H - B, stroke: "#d62728", "stroke-width": 2 })];
  const text = (tx, anchor, s) => svg("text", { x: tx, y: H - 6, "font-size": 11, "text-anchor": anchor, fill: "#6b7280" }, s);
  return h("figure", { class: "place" }, svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" },
    ...bars, ...marks, text(L, "start", fmt(hist.lo, 1)), text(W - L, "end", fmt(hist.hi, 1))),
    h("figcaption", {}, `${label}: ${fmt(value)} `, h("span", { class: "muted" },
      `(all latents, log counts${hist.missing ? `; ${fmt(hist.missing)} without a value` : ""})`)));
}

async function latentPlaces(p, v, row) {
  const wanted = PLACES.filter(([k]) => k in row);
  const hists = await Promise.all(wanted.map(([k, , lo, hi]) =>
    api(`/api/p/${enc(p.name)}/t/${enc(v.table)}/histogram?column=${k}&bins=40&lo=${lo}&hi=${hi}`)));
  return h("div", { class: "places", id: "places" }, hists.map((hist, i) => histogramFigure(hist, row[wanted[i][0]], wanted[i][1])));
}

async function latentPage(pipeline, table, j) {
  const [p, v] = viewOf(pipeline, table);
  crumbs([{ text: "pipelines", href: "#/" }, { text: p.name }, { text: v.table, href: base(p, v) }, { text: `latent ${j}` }]);
  const d = await api(`/api/p/${enc(p.name)}/t/${enc(v.table)}/latent/${j}?per_bucket=10`);
  const row = d.row;
  const max = row.max_activation || 0;
  const strength = max > 0 ? +(max * 2).toPrecision(3) : 1;
  $main.replaceChildren(
    h("h1", {}, `Latent ${j} `, classPill(row.class)),
    h("div", { class: "grid", id: "stats" }, STATS.filter(([k]) => k in row).map(([k, label]) =>
      h("div", { class: "stat" }, h("div", { class: "k" }, label), h("div", { class: "v" }, k === "class" ? row[k] : fmt(row[k]))))),
    await latentPlaces(p, v, row),
    h("p", {},
      h("a", { href: `${base(p, v)}/latent/${Math.max(0, j - 1)}` }, "‹ previous"), " · ",
      h("a", { href: `${base(p, v)}/latent/${j + 1}` }, "next ›"),
      d.can_steer ? [" · ", h("a", { id: "steer-link", href: `${base(p, v)}/steer?latent=${j}&strength=${strength}` },
        `Steer with latent ${j} →`)] : null),
    h("h2", {}, "Quantile activating examples", d.examples_stage ? h("span", { class: "muted" }, ` (from ${d.examples_stage})`) : ""),
    d.examples === null ? h("p", { class: "muted" }, "No collect stage with examples.db for this crosscoder.")
      : d.examples.length === 0 ? h("p", { class: "muted" }, "This latent never fired on the validation tokens.")
      : h("div", { id: "examples" }, d.examples.map((b) => h("div", { class: "bucket" },
        h("h3", {}, b.upper === null ? `above ${fmt(b.lower, 2)} × max` : `${fmt(b.lower, 2)}–${fmt(b.upper, 2)} × max`,
          h("span", { class: "muted" }, ` · ${b.count} example${b.count === 1 ? "" : "s"}`)),
        b.examples.map((e) => h("div", { class: "example" },
          h("div", { class: "meta" }, `sequence ${e.sequence_idx} · max ${fmt(e.activation, 4)}`),
          e.tokens.map((t, i) => tokenSpan(t, e.activations[i], max))))))),
    figures(p, v));
}

// ---- steering ----
async function steerPage(pipeline, table, q) {
  const [p, v] = viewOf(pipeline, table);
  crumbs([{ text: "pipelines", href: "#/" }, { text: p.name }, { text: v.table, href: base(p, v) }, { text: "steering" }]);
  if (!v.can_steer) throw new Error(`steering \`${v.table}\` needs its crosscoder and an activation cache published in \`${p.name}\``);
  const rows = h("div", { id: "latent-rows" });
  const addRow = (latent = "", strength = "") => rows.append(h("div", { class: "latent-row" },
    h("input", { type: "number", min: 0, step: 1, class: "latent-id", placeholder: "latent", value: latent }),
    h("input", { type: "number", step: "any", class: "latent-strength", placeholder: "strength", value: strength }),
    h("button", { class: "secondary", onclick: (e) => e.target.parentElement.remove() }, "×")));
  const ids = q.getAll("latent"), strengths = q.getAll("strength");
  ids.forEach((id, i) => addRow(id, strengths[i] || "1"));
  if (!ids.length) addRow();
  const out = { steered: h("div", { class: "card gen steered", id: "out-steered" }), plain: h("div", { class: "card gen plain", id: "out-plain" }) };
  const status = h("div", { class: "muted", id: "status" }, "");
  const model = q.get("model") || "chat";
  const form = {
    model: h("select", { id: "model" }, ["chat", "base"].map((m) => h("option", { value: m, selected: m === model }, m))),
    prompt: h("textarea", { id: "prompt" }, q.get("prompt") || "What is the capital of France?"),
    tokens: h("input", { type: "number", id: "max-new-tokens", min: 1, value: q.get("max_new_tokens") || "48" }),
    temperature: h("input", { type: "number", id: "temperature", min: 0, step: "any", value: q.get("temperature") || "0" }),
    seed: h("input", { type: "number", id: "seed", min: 0, step: 1, value: q.get("seed") || "0" }),
    raw: h("input", { type: "checkbox", id: "raw", checked: q.get("raw") === "1" }),
  };
  const button = h("button", { id: "generate", onclick: () => run() }, "Generate");
  async function run() {
    const latents = [...rows.querySelectorAll(".latent-row")].map((r) => ({
      latent: r.querySelector(".latent-id").value, strength: r.querySelector(".latent-strength").value,
    })).filter((l) => l.latent !== "").map((l) => ({ latent: +l.latent, strength: +(l.strength || 1) }));
    const body = { model: form.model.value, prompt: form.prompt.value, raw: form.raw.checked, latents,
      max_new_tokens: +form.tokens.value, temperature: +form.temperature.value, seed: +form.seed.value, compare: true };
    out.steered.textContent = ""; out.plain.textContent = "";
    status.textContent = "loading models…"; status.className = "muted"; button.disabled = true;
    try {
      const r = await fetch(`/api/p/${enc(p.name)}/t/${enc(v.table)}/steer`, {
        method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
      if (!r.ok) { let m = r.statusText; try { m = (await r.json()).error; } catch (_) {} throw new Error(m); }
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const ev = JSON.parse(buf.slice(0, nl)); buf = buf.slice(nl + 1);
          if (ev.event === "start") status.textContent = `${ev.model} model · ${ev.prompt_tokens} prompt tokens · steering after layer ${ev.layer}`;
          else if (ev.event === "token") out[ev.stream].append(ev.text);
          else if (ev.event === "end") out[ev.stream].append(h("div", { class: "muted" }, `— ${ev.tokens} tokens (${ev.reason.replace(/_/g, " ")})`));
          else if (ev.event === "error") throw new Error(ev.message);
          else if (ev.event === "done") { status.textContent += " · done"; document.body.dataset.steerDone = "1"; }
        }
      }
    } catch (e) {
      status.textContent = e.message; status.className = "error";
    } finally { button.disabled = false; }
  }
  $main.replaceChildren(
    h("h1", {}, "Steering ", h("span", { class: "muted" }, `· ${v.table} · crosscoder ${v.crosscoder}`)),
    h("div", { class: "steer-form card" },
      h("div", {}, h("div", { class: "controls" }, h("label", {}, "model", form.model),
        h("label", {}, "new tokens", form.tokens), h("label", {}, "temperature (0: greedy)", form.temperature),
        h("label", {}, "seed", form.seed), h("label", {}, "raw prompt (no chat template)", form.raw)),
        h("label", { class: "muted" }, "prompt (the user turn)"), form.prompt),
      h("div", {}, h("div", { class: "muted" }, "Latents and strengths: h += strength · d_latent after layer L, at every position"),
        rows, h("button", { class: "secondary", onclick: () => addRow() }, "+ latent"), " ", button)),
    status,
    h("div", { class: "cols" },
      h("div", {}, h("h2", {}, "Steered"), out.steered),
      h("div", {}, h("h2", {}, "Without steering"), out.plain)));
  if (q.get("autorun") === "1") run();
}

window.addEventListener("hashchange", route);
route();
