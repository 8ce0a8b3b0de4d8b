// Runs viewer/index.html's script in node against a live viewer, with just enough DOM to
// click through it: node page_driver.js PAGE_HTML BASE_URL. Prints what each view rendered
// as one JSON object (the pytest side asserts on it).
"use strict";
const fs = require("fs");
const vm = require("vm");

const [, , pagePath, baseUrl] = process.argv;
const html = fs.readFileSync(pagePath, "utf8");
const script = html.match(/<script>([\s\S]*)<\/script>/)[1];
const elements = {};

function element(id) {
  const el = {
    id, value: "", textContent: "", onchange: null, onclick: null, dataset: {},
    classList: { toggle() {} },
    _html: "",
    get innerHTML() { return this._html; },
    set innerHTML(v) {
      this._html = v;
      // a select gets the value of its first option, as a browser would
      const first = v.match(/<option(?: value="([^"]*)")?>([^<]*)<\/option>/);
      if (first && !v.includes("<select")) this.value = first[1] ?? first[2];
      // selects created inside this element become addressable by id
      for (const m of v.matchAll(/<select id="(\w+)">\s*<option(?: value="([^"]*)")?>([^<]*)<\/option>/g)) {
        const sel = (elements[m[1]] ||= element(m[1]));
        sel.value = m[2] ?? m[3];
      }
      this._rows = [...v.matchAll(/<tr class="row"([^>]*)>/g)].map((m) => {
        const ds = {};
        for (const a of m[1].matchAll(/data-(\w+)="([^"]*)"/g)) ds[a[1]] = a[2];
        return { dataset: ds, onclick: null };
      });
    },
    querySelectorAll(sel) { return sel === "tr.row" ? (this._rows || []) : []; },
  };
  return el;
}
// like a browser: only ids in the static page or created through innerHTML exist
function getById(id) { return elements[id] ?? null; }
for (const m of html.split("<script>")[0].matchAll(/ id="(\w+)"/g)) elements[m[1]] = element(m[1]);

const tabs = ["neurons", "features", "universal"].map((t) => ({
  dataset: { tab: t }, onclick: null, classList: { toggle() {} },
}));
const document = {
  getElementById: getById,
  querySelectorAll: (sel) => (sel === ".tabs button" ? tabs : []),
};
// settle() waits until every request the page made has been answered and read, and the page
// has had a tick to render (not a fixed sleep: a loaded CI machine can take longer per answer)
let inflight = 0;
const tracked = (p) => { inflight++; return p.finally(() => { inflight--; }); };
const fetchAbs = (url, opts) => tracked(fetch(new URL(url, baseUrl), opts).then((r) => ({
  ok: r.ok, status: r.status, statusText: r.statusText, json: () => tracked(r.json()),
})));
const settle = async () => {
  const t0 = Date.now();
  for (let quiet = 0; quiet < 2 && Date.now() - t0 < 30000;) {
    await new Promise((r) => setTimeout(r, 50));
    quiet = inflight === 0 ? quiet + 1 : 0;
  }
};

(async () => {
  // location: the page's own URL (BASE_URL may carry ?token=, as a browser's address would)
  vm.runInNewContext(script, { document, fetch: fetchAbs, console, setTimeout, URL, URLSearchParams,
                               location: new URL(baseUrl) });
  const out = {};
  await settle();
  out.models = getById("model").innerHTML;
  getById("model").value = "toy";  // the first model listed is the incomplete one
  getById("model").onchange();
  await settle();
  out.neuronList = getById("list").innerHTML;
  const rows = getById("list").querySelectorAll("tr.row");
  out.firstRow = rows[0] && rows[0].dataset;
  if (!rows.length) throw new Error("no neuron rows: " + JSON.stringify(out));
  rows[0].onclick();
  await settle();
  out.neuron = getById("main").innerHTML;
  getById("layer").value = "1";
  tabs[1].onclick();
  await settle();
  out.featureList = getById("list").innerHTML;
  const frows = getById("list").querySelectorAll("tr.row");
  frows[0].onclick();
  await settle();
  out.feature = getById("main").innerHTML;
  tabs[0].onclick();
  getById("model").value = "nope";
  getById("model").onchange();
  await settle();
  out.badModel = getById("list").innerHTML;
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
