// Live progress of one job: one websocket, resumed from the last line id on reconnect.
(function () {
  const root = document.getElementById("job");
  const token = root.dataset.token;
  // the server drew the log's last lines for a reader without script: the stream
  // replays the whole log below, live
  const drawn = document.getElementById("log-static");
  if (drawn) drawn.remove();
  const q = (extra) => "?" + new URLSearchParams(Object.assign(token ? {token} : {}, extra));
  let last = "0-0";
  let done = false;
  const sections = {};
  // a job of many pieces (a map of 100,000 items) shares one log section, and a
  // section keeps its last MAX_LINES lines: the page costs the same for any job size
  const MAX_LINES = 2000;
  let manyPieces = Number(root.dataset.pieces || 0) > 200;  // known before the first line

  function section(piece) {
    const name = manyPieces ? "output" : (piece || "sheepdog");
    if (!sections[name]) {
      const d = document.createElement("details");
      d.open = true;
      d.dataset.piece = name;
      const s = document.createElement("summary");
      s.textContent = name;
      d.appendChild(s);
      d.appendChild(document.createElement("pre"));
      document.getElementById("log").appendChild(d);
      sections[name] = d;
    }
    return sections[name];
  }

  // in a many-piece job's shared log, sheepdog's own lines only when something went wrong
  const WORTH = /error|fail|lost|stopped|once more|truncated|cancel/;

  function addLine(m) {
    if (manyPieces && m.stream === "sheepdog" && !WORTH.test(m.text)) {
      last = m.id;
      return;
    }
    const d = section(m.piece);
    const span = document.createElement("span");
    span.className = "line " + m.stream;
    span.textContent = (manyPieces && m.piece ? `[${m.piece}] ` : "") +
      (m.stream === "stderr" ? "! " : "") + m.text + "\n";
    const pre = d.querySelector("pre");
    pre.appendChild(span);
    if (pre.childElementCount > MAX_LINES) {
      pre.removeChild(pre.firstElementChild);
      d.dataset.trimmed = "1";
      d.querySelector("summary").textContent =
        `${d.dataset.piece} (last ${MAX_LINES} lines; the whole log: sheepdog logs JOB)`;
    }
    last = m.id;
  }

  function showProgress(m) {
    const p = m.progress;
    const it = p.items;
    manyPieces = manyPieces || m.pieces_total > m.pieces.length;
    const pct = it && it.total ? Math.floor(100 * it.done / it.total)
      : p.total ? Math.round(100 * p.done / p.total) : 0;
    const eta = it ? it.eta_seconds : p.eta_seconds;
    document.getElementById("bar-fill").style.width = pct + "%";
    document.getElementById("bar-text").textContent = it
      ? `${pct}% — ${it.done.toLocaleString()}/${it.total.toLocaleString()} items`
      : `${pct}% — ${p.done}/${p.total} pieces`;
    document.getElementById("eta").textContent = eta != null ? `about ${Math.ceil(eta)} s left` : "";
    if (it) showItems(it, p.running || 0);
    const status = document.getElementById("status");
    status.textContent = m.status;
    status.className = "badge " + m.status;
    showSteps((m.steps || []).filter(s => s.total > 1));
    const grid = document.getElementById("grid");
    grid.innerHTML = "";
    if (m.pieces_total > m.pieces.length) {
      // too many pieces for one cell each: counts only (the API pages the pieces)
      const c = document.createElement("span");
      c.className = "counts";
      c.textContent = `${p.total} pieces: ${p.done} done, ${p.running || 0} running`;
      grid.appendChild(c);
    }
    for (const piece of m.pieces) {
      const c = document.createElement("span");
      c.className = "cell " + piece.status;
      c.title = `${piece.name}: ${piece.status}`;
      c.textContent = piece.name.replace(/^(kinship|lmm) chr /, "$1 ").replace("permutations ", "p ");
      grid.appendChild(c);
      if (sections[piece.name]) sections[piece.name].className = piece.status;
    }
    if (m.error) showError(m.error);
  }

  // a step of several pieces (a CWL scatter): its counts, one line each
  function showSteps(list) {
    const box = document.getElementById("steps");
    box.hidden = list.length === 0;
    box.innerHTML = "";
    for (const s of list) {
      const li = document.createElement("li");
      li.className = s.failed ? "error" : s.done === s.total ? "success" : "running";
      li.textContent = `${s.step}: ${s.done}/${s.total} done` +
        (s.running ? `, ${s.running} running` : "") + (s.failed ? `, ${s.failed} failed` : "");
      box.appendChild(li);
    }
  }

  // many items: counts, rate and the failed ones on demand (never an element per item)
  function showItems(it, running) {
    const box = document.getElementById("items");
    box.hidden = false;
    document.getElementById("items-counts").textContent =
      `${(it.done - it.failed).toLocaleString()} succeeded, ${it.failed.toLocaleString()} failed, ` +
      `${running} pieces running` + (it.rate_per_second ? `, ${it.rate_per_second}/s` : "");
    document.getElementById("show-failed").hidden = it.failed === 0;
  }

  async function showFailed(after) {
    const list = document.getElementById("failed-items");
    const r = await fetch(root.dataset.items + q(Object.assign({state: "failed"},
                                                              after ? {after} : {})));
    if (!r.ok) return;
    const page = await r.json();
    if (!after) list.innerHTML = "";
    for (const item of page.items) {
      const li = document.createElement("li");
      li.textContent = `${item.key}: ${item.status}` +
        (item.exit_code != null ? ` (exit ${item.exit_code})` : "") +
        (item.stderr ? ` — ${item.stderr.split("\n").pop()}` : "");
      list.appendChild(li);
    }
    const more = document.getElementById("more-failed");
    more.hidden = page.next_after == null;
    more.onclick = () => showFailed(page.next_after);
  }

  function showError(text) {
    document.getElementById("error").hidden = false;
    document.getElementById("error-text").textContent = text;
  }

  async function showResult() {
    const r = await fetch(root.dataset.result + q({}));
    if (!r.ok) return;
    const result = await r.json();
    if (!result.top_hits) return;
    document.getElementById("result").hidden = false;
    document.getElementById("manhattan").src = result.urls["manhattan.png"] + q({});
    const body = document.querySelector("#hits tbody");
    const pcol = result.p_column;
    for (const h of result.top_hits) {
      const tr = document.createElement("tr");
      for (const v of [h.chr, h.rs, h.ps, h[pcol].toExponential(3), h.minus_log10_p.toFixed(2)]) {
        const td = document.createElement("td");
        td.textContent = v;
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
    if (result.permutations) {
      const t = result.permutations;
      document.getElementById("thresholds").textContent =
        `${t.permutations} permutations: significant p ${t.significant.toExponential(3)} ` +
        `(−log10 ${t.significant_minus_log10.toFixed(2)}), suggestive p ` +
        `${t.suggestive.toExponential(3)} (−log10 ${t.suggestive_minus_log10.toFixed(2)})`;
    }
  }

  function connect() {
    // the path only: behind a proxy the browser's own host and scheme are the right ones
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const path = new URL(root.dataset.stream, location.href).pathname;
    const ws = new WebSocket(`${proto}//${location.host}${path}${q({after: last})}`);
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (m.type === "line") addLine(m);
      else if (m.type === "progress") showProgress(m);
      else if (m.type === "end") {
        done = true;
        root.dataset.ended = m.status;
        if (m.status === "success") showResult();
        else if (m.error) showError(m.error);
      }
    };
    ws.onclose = () => { if (!done) setTimeout(connect, 1000); };
  }
  document.getElementById("show-failed").onclick = () => showFailed(null);
  connect();
})();
