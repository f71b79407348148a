// servelm dashboard: polls /dashboard/data about once a second and draws its charts on <canvas>
// with the small helpers below (no libraries, no external assets). After each render every
// chart canvas carries data-points="N" (the items it drew) and #status says whether the stream
// is live, so a test (or a person) can tell the page works without reading pixels.
"use strict";

(() => {
  const POLL_MS = 1000;
  const KEY_STORE = "servelm.apiKey"; // sessionStorage: asked once per tab, gone when it closes
  const MAX_STEPS = 600; // per-step records kept, as the server's ring buffer
  const BATCH_STEPS = 120; // bars in the batch composition chart
  const HISTORY_S = 120; // time series kept
  const MIN_WINDOW_S = 10; // the time axes span the data seen, within these bounds
  const MAX_WINDOW_S = 60;
  const SAMPLE_MERGE_S = 0.05; // closer state samples merge: few points even at GPU step rates
  const GANTT_ROWS = 20; // rows tall enough for their labels

  const LEGENDS = {
    "c-batch": [["prefill", "prefill"], ["decode", "decode"], ["speculative", "spec"]],
    "c-tput": [["output (decode) tok/s", "output"], ["all tokens/s", "total"]],
    "c-reqs": [["running", "running"], ["waiting", "waiting"], ["swapped", "swapped"]],
    "c-kv": [["blocks in use", "kv"]],
    "c-gantt": [["queued", "queued"], ["prefilling", "prefill"], ["decoding", "decode"],
                ["finished", "text"], ["aborted", "bad"]],
  };

  const $ = (id) => document.getElementById(id);
  const color = (name) =>
    getComputedStyle(document.documentElement).getPropertyValue("--" + name).trim();

  // everything the page knows; one stream per page
  const st = {
    since: -1, // the last step received
    steps: [], // the last MAX_STEPS step records
    buckets: new Map(), // whole second -> tokens scheduled in it, for tokens/s
    // {t, running, waiting, swapped, kv}, for the request and KV charts (levels: a straight
    // line across missing steps is a fair guess, unlike for the token counts)
    samples: [],
    // [t0, t1, share]: steps between two received ones never arrived (the server's buffer
    // overflowed between polls); that share of the time between is unknown, not idle
    gaps: [],
    lastStepTime: null,
    firstTime: null,
    last: null, // the last response
    key: sessionStorage.getItem(KEY_STORE),
    timer: null,
    busy: false,
  };

  // ---- the data stream ------------------------------------------------------------------
  function schedule(ms = POLL_MS) {
    if (st.timer === null) st.timer = setTimeout(() => { st.timer = null; poll(); }, ms);
  }

  async function poll() {
    if (st.busy) return;
    st.busy = true;
    try {
      await pollOnce();
    } finally {
      st.busy = false;
    }
  }

  async function pollOnce() {
    if (document.hidden) return schedule(); // nobody is looking
    let resp, data;
    try {
      const headers = st.key ? { Authorization: "Bearer " + st.key } : {};
      resp = await fetch("/dashboard/data?since=" + st.since, { headers, cache: "no-store" });
      if (resp.status === 401) return askForKey(st.key ? "That key was refused." : "");
      if (!resp.ok) {
        setStatus("error", "error " + resp.status + ": " + (await errorMessage(resp)));
        return schedule(2 * POLL_MS);
      }
      data = await resp.json();
    } catch (e) {
      setStatus("error", "server unreachable; retrying");
      return schedule(2 * POLL_MS);
    }
    if (!ingest(data)) return schedule(0); // the engine restarted: fetch from the start
    render();
    schedule();
  }

  async function errorMessage(resp) {
    try {
      return (await resp.json()).error.message;
    } catch (e) {
      return resp.statusText;
    }
  }

  function askForKey(message) {
    if (st.key) sessionStorage.removeItem(KEY_STORE);
    st.key = null;
    $("keyerror").textContent = message;
    $("keyform").hidden = false;
    $("apikey").focus();
    setStatus("auth", "API key needed");
  }

  $("keyform").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("apikey").value.trim();
    if (!key) return;
    st.key = key;
    sessionStorage.setItem(KEY_STORE, key);
    $("apikey").value = "";
    $("keyform").hidden = true;
    setStatus("connecting", "connecting…");
    poll();
  });

  function setStatus(state, text) {
    const el = $("status");
    el.dataset.state = state;
    el.textContent = text;
  }

  // ---- keeping what arrives -------------------------------------------------------------
  function ingest(d) {
    if (d.num_steps - 1 < st.since) { // a new engine: its step counter restarted
      Object.assign(st, { since: -1, steps: [], buckets: new Map(), samples: [], gaps: [],
                          lastStepTime: null, firstTime: null });
      return false;
    }
    for (const s of d.steps) {
      if (s.step <= st.since) continue;
      const missing = st.lastStepTime === null ? 0 : s.step - st.since - 1;
      if (missing > 0) st.gaps.push([st.lastStepTime, s.time, missing / (missing + 1)]);
      st.since = s.step;
      st.lastStepTime = s.time;
      st.steps.push(s);
      const sec = Math.floor(s.time);
      const b = st.buckets.get(sec) || { prefill: 0, decode: 0, spec: 0 };
      b.prefill += s.num_prefill_tokens;
      b.decode += s.num_decode_tokens;
      b.spec += s.num_spec_tokens;
      st.buckets.set(sec, b);
      addSample(s.time, s.num_running, s.num_waiting, s.num_swapped, s.kv_cache_usage);
    }
    // the state now, so the lines reach the present while the engine idles
    addSample(d.time, d.num_running, d.num_waiting, d.num_swapped, d.kv_cache_usage);
    if (st.steps.length > MAX_STEPS) st.steps.splice(0, st.steps.length - MAX_STEPS);
    const horizon = d.time - HISTORY_S;
    for (const sec of st.buckets.keys()) if (sec < horizon) st.buckets.delete(sec);
    st.gaps = st.gaps.filter((g) => g[1] >= horizon);
    const keep = st.samples.findIndex((p) => p.t >= horizon);
    if (keep > 0) st.samples.splice(0, keep);
    const first = st.steps.length ? Math.min(st.steps[0].time, st.samples[0].t) : st.samples[0].t;
    st.firstTime = st.firstTime === null ? first : Math.min(st.firstTime, first);
    st.last = d;
    return true;
  }

  function addSample(t, running, waiting, swapped, kv) {
    const prev = st.samples[st.samples.length - 1];
    if (prev && t < prev.t) return; // out of order (a step recorded before the last snapshot)
    if (prev && t - prev.t < SAMPLE_MERGE_S) {
      prev.running = Math.max(prev.running, running);
      prev.waiting = Math.max(prev.waiting, waiting);
      prev.swapped = Math.max(prev.swapped, swapped);
      prev.kv = Math.max(prev.kv, kv);
      return;
    }
    st.samples.push({ t, running, waiting, swapped, kv });
  }

  // ---- formatting -----------------------------------------------------------------------
  function fmtNum(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
    if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
    if (a >= 100 || Number.isInteger(v)) return v.toFixed(0);
    return String(+v.toFixed(a >= 1 ? 1 : 2));
  }

  function fmtMs(v) {
    if (v === null || v === undefined) return "–";
    if (v >= 1000) return (v / 1000).toFixed(v >= 10000 ? 1 : 2) + " s";
    return (v >= 100 ? v.toFixed(0) : v.toFixed(1)) + " ms";
  }

  function fmtPct(v) {
    if (v === null || v === undefined) return "–";
    return (100 * v).toFixed(v === 0 || v === 1 ? 0 : 1) + "%"; // 99.9% is not 100%
  }

  function shortId(id) {
    const m = /^([a-z]+)-([0-9a-f]{32})(.*)$/.exec(id); // our ids: cmpl-<uuid hex>-<i>
    if (m) return m[1] + "-" + m[2].slice(0, 6) + m[3];
    return id.length > 16 ? id.slice(0, 15) + "…" : id;
  }

  // ---- tiles ----------------------------------------------------------------------------
  function renderTiles(d) {
    $("model").textContent = d.model || "";
    $("t-kv").textContent = fmtPct(d.kv_cache_usage);
    $("t-kv-bar").style.width = (100 * Math.min(1, d.kv_cache_usage)).toFixed(1) + "%";
    $("t-reqs").textContent = d.num_running + " / " + d.num_waiting + " / " + d.num_swapped;
    $("t-tput").textContent = fmtNum(d.output_tokens_per_s) + " tok/s";
    $("t-tput-sub").textContent = "output · all " + fmtNum(d.total_tokens_per_s) +
      " tok/s · last " + Math.round(d.throughput_window_s) + " s";
    for (const [name, p] of [["ttft", d.ttft_ms], ["tpot", d.tpot_ms]]) {
      $("t-" + name).textContent = fmtMs(p.p50);
      $("t-" + name + "-sub").textContent = p.count
        ? "p90 " + fmtMs(p.p90) + " · p99 " + fmtMs(p.p99) + " · n=" + p.count
        : "no finished requests yet";
    }
    $("t-prefix").textContent = fmtPct(d.prefix_cache_hit_rate);
    $("t-prefix-sub").textContent = d.prefix_cache_queries
      ? fmtNum(d.prefix_cache_hits) + " of " + fmtNum(d.prefix_cache_queries) + " prompt tokens"
      : "no lookups yet";
    $("t-slo").textContent = fmtPct(d.slo_attainment);
    const shed = d.num_shed ? " · shed " + d.num_shed : "";
    $("t-slo-sub").textContent = d.num_slo_requests
      ? "met " + d.num_slo_met + " of " + d.num_slo_requests + shed
      : "no request set an SLO" + shed;
    $("t-done").textContent = fmtNum(d.num_finished);
    $("t-done-sub").textContent =
      "preemptions " + d.num_preemptions + " · steps " + fmtNum(d.num_steps);
  }

  // ---- chart helpers --------------------------------------------------------------------
  function surface(canvas) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    const pw = Math.round(w * dpr), ph = Math.round(h * dpr);
    if (canvas.width !== pw || canvas.height !== ph) {
      canvas.width = pw;
      canvas.height = ph;
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = "11px system-ui, -apple-system, 'Segoe UI', Roboto, Arial, sans-serif";
    ctx.lineJoin = "round";
    return { ctx, w, h };
  }

  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) hi = lo + 1;
    const raw = (hi - lo) / Math.max(1, n);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const f = raw / mag;
    const step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
    const ticks = [];
    // integer multiples of the step: a running sum would drift (0 as 2.8e-16)
    for (let i = Math.ceil(lo / step - 1e-9); i * step <= hi + step * 1e-9; i++) {
      ticks.push(+(i * step).toPrecision(12));
    }
    return { ticks, step };
  }

  // the axis top: a round number at or above v, so the top grid line is labelled
  function niceMax(v, atLeast) {
    v = Math.max(v, atLeast);
    const { step } = niceTicks(0, v, 4);
    return Math.ceil(v / step - 1e-9) * step;
  }

  function hline(ctx, x0, x1, y) {
    ctx.beginPath();
    ctx.moveTo(x0, y);
    ctx.lineTo(x1, y);
    ctx.stroke();
  }

  // axes, grid, tick labels and titles; returns the plot box and the scales
  function frame(ctx, w, h, o) {
    const m = { l: o.left || 60, r: 14, t: 8, b: 36 };
    const box = { x: m.l, y: m.t, w: Math.max(10, w - m.l - m.r), h: Math.max(10, h - m.t - m.b) };
    const px = (x) => box.x + ((x - o.x0) / (o.x1 - o.x0 || 1)) * box.w;
    const py = (y) => box.y + box.h - ((y - o.y0) / (o.y1 - o.y0 || 1)) * box.h;
    ctx.lineWidth = 1;
    ctx.fillStyle = color("muted");
    if (o.yFmt) {
      ctx.strokeStyle = color("grid");
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      const yt = o.yTicks || niceTicks(o.y0, o.y1, 4).ticks;
      for (const v of yt) {
        const y = Math.round(py(v)) + 0.5;
        hline(ctx, box.x, box.x + box.w, y);
        ctx.fillText(o.yFmt(v), box.x - 6, y);
      }
    }
    ctx.strokeStyle = color("border");
    hline(ctx, box.x, box.x + box.w, Math.round(box.y + box.h) + 0.5);
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const xt = o.xTicks || niceTicks(o.x0, o.x1, Math.max(2, Math.floor(box.w / 100))).ticks;
    for (const v of xt) {
      const x = Math.round(px(v)) + 0.5;
      if (x < box.x - 1 || x > box.x + box.w + 1) continue;
      ctx.beginPath();
      ctx.moveTo(x, box.y + box.h);
      ctx.lineTo(x, box.y + box.h + 4);
      ctx.stroke();
      ctx.fillText(o.xFmt(v), x, box.y + box.h + 6);
    }
    ctx.textBaseline = "bottom";
    ctx.fillText(o.xTitle, box.x + box.w / 2, h - 1);
    if (o.yTitle) {
      ctx.save();
      ctx.translate(2, box.y + box.h / 2);
      ctx.rotate(-Math.PI / 2);
      ctx.textBaseline = "top";
      ctx.fillText(o.yTitle, 0, 0);
      ctx.restore();
    }
    return { px, py, box };
  }

  function empty(ctx, w, h, text) {
    ctx.fillStyle = color("muted");
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText(text, w / 2, h / 2 - 10);
  }

  // pts: [x, y] points, null where the line breaks (no data)
  function polyline(ctx, pts, stroke, fill, baseY) {
    let run = [];
    for (const p of [...pts, null]) {
      if (p) {
        run.push(p);
      } else if (run.length) {
        segment(ctx, run, stroke, fill, baseY);
        run = [];
      }
    }
  }

  function segment(ctx, pts, stroke, fill, baseY) {
    ctx.beginPath();
    pts.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    if (fill) {
      ctx.save();
      ctx.lineTo(pts[pts.length - 1][0], baseY);
      ctx.lineTo(pts[0][0], baseY);
      ctx.closePath();
      ctx.globalAlpha = 0.18;
      ctx.fillStyle = fill;
      ctx.fill();
      ctx.restore();
      ctx.beginPath();
      pts.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    }
    ctx.strokeStyle = stroke;
    ctx.lineWidth = 1.75;
    ctx.stroke();
    if (pts.length === 1) { // a lone point: a dot, or it would not show
      ctx.fillStyle = stroke;
      ctx.beginPath();
      ctx.arc(pts[0][0], pts[0][1], 2.5, 0, 2 * Math.PI);
      ctx.fill();
    }
  }

  // the time axes: seconds before the last snapshot, spanning what the page has seen
  function timeWindow(now) {
    const seen = st.firstTime === null ? 0 : now - st.firstTime;
    const span = Math.min(MAX_WINDOW_S, Math.max(MIN_WINDOW_S, Math.ceil(seen / 5) * 5));
    return { t0: now - span, t1: now, span };
  }

  function timeAxis(now, span) {
    return {
      x0: -span, x1: 0, xTitle: "time (s before now)",
      xFmt: (v) => (v === 0 ? "now" : String(+v.toPrecision(3)) + "s"),
    };
  }

  // ---- charts ---------------------------------------------------------------------------
  function drawBatch() {
    const canvas = $("c-batch");
    const { ctx, w, h } = surface(canvas);
    const steps = st.steps.slice(-BATCH_STEPS);
    const total = (s) => s.num_prefill_tokens + s.num_decode_tokens + s.num_spec_tokens;
    const ymax = niceMax(Math.max(0, ...steps.map(total)), 4);
    const x1 = (steps.length ? steps[steps.length - 1].step : 0) + 0.5;
    const x0 = x1 - BATCH_STEPS;
    const { px, py, box } = frame(ctx, w, h, {
      x0, x1, y0: 0, y1: ymax, xTitle: "step", yTitle: "tokens",
      xFmt: (v) => String(Math.round(v)), yFmt: fmtNum,
      xTicks: niceTicks(Math.max(0, x0 + 0.5), x1 - 0.5, Math.max(2, Math.floor((w - 80) / 90)))
        .ticks.filter(Number.isInteger),
    });
    const bw = box.w / BATCH_STEPS;
    const gap = bw > 4 ? 1 : 0;
    const parts = [["num_prefill_tokens", color("prefill")], ["num_decode_tokens", color("decode")],
                   ["num_spec_tokens", color("spec")]];
    for (const s of steps) {
      const x = px(s.step - 0.5) + gap / 2;
      let base = 0;
      for (const [field, c] of parts) {
        const v = s[field];
        if (!v) continue;
        const yTop = py(base + v), yBot = py(base);
        ctx.fillStyle = c;
        ctx.fillRect(x, yTop, Math.max(1, bw - gap), Math.max(1, yBot - yTop));
        base += v;
      }
    }
    if (!steps.length) empty(ctx, w, h, "no steps yet");
    canvas.dataset.points = steps.length;
  }

  function drawThroughput(now) {
    const canvas = $("c-tput");
    const { ctx, w, h } = surface(canvas);
    const { t0, span } = timeWindow(now);
    const pts = [];
    if (st.firstTime !== null) {
      // whole seconds from the first one seen; a second without steps is an idle one (0).
      // The first and the current second are partial: their rate is over the part seen, and
      // left out when that part is too short to say much.
      for (let sec = Math.floor(Math.max(t0, st.firstTime)); sec <= now; sec++) {
        const b = st.buckets.get(sec) || { prefill: 0, decode: 0, spec: 0 };
        const start = Math.max(sec, st.firstTime), end = Math.min(sec + 1, now);
        const dur = end - start - unknownTime(start, end);
        if (dur < 0.25) {
          if (end - start >= 0.25) pts.push(null); // a second we know nothing of: a break
          continue;
        }
        pts.push({ t: end, out: b.decode / dur, all: (b.prefill + b.decode + b.spec) / dur });
      }
    }
    const known = pts.filter((p) => p);
    const ymax = niceMax(Math.max(0, ...known.map((p) => p.all)), 4);
    const { px, py, box } = frame(ctx, w, h, {
      ...timeAxis(now, span), y0: 0, y1: ymax, yTitle: "tokens / s", yFmt: fmtNum,
    });
    const base = box.y + box.h;
    for (const [field, c] of [["all", "total"], ["out", "output"]]) {
      polyline(ctx, pts.map((p) => p && [px(p.t - now), py(p[field])]), color(c), color(c), base);
    }
    if (!known.length) empty(ctx, w, h, "no data yet");
    canvas.dataset.points = known.length;
  }

  // the seconds in [a, b) whose steps never arrived
  function unknownTime(a, b) {
    let out = 0;
    for (const [g0, g1, share] of st.gaps) {
      out += Math.max(0, Math.min(b, g1) - Math.max(a, g0)) * share;
    }
    return out;
  }

  function visibleSamples(t0) {
    const i = st.samples.findIndex((p) => p.t >= t0);
    // and the one before: the line enters from the left edge
    return i < 0 ? [] : st.samples.slice(Math.max(0, i - 1));
  }

  function drawRequests(now) {
    const canvas = $("c-reqs");
    const { ctx, w, h } = surface(canvas);
    const { t0, span } = timeWindow(now);
    const pts = visibleSamples(t0);
    const top = Math.max(0, ...pts.map((p) => Math.max(p.running, p.waiting, p.swapped)));
    const ymax = niceMax(top, 4);
    const { px, py, box } = frame(ctx, w, h, {
      ...timeAxis(now, span), y0: 0, y1: ymax, yTitle: "requests", yFmt: fmtNum,
      yTicks: niceTicks(0, ymax, 4).ticks.filter(Number.isInteger),
    });
    ctx.save();
    ctx.beginPath();
    ctx.rect(box.x, box.y - 2, box.w, box.h + 4);
    ctx.clip();
    for (const field of ["swapped", "waiting", "running"]) { // running drawn last: on top
      polyline(ctx, pts.map((p) => [px(p.t - now), py(p[field])]), color(field));
    }
    ctx.restore();
    if (!pts.length) empty(ctx, w, h, "no data yet");
    canvas.dataset.points = pts.length;
  }

  function drawKv(now) {
    const canvas = $("c-kv");
    const { ctx, w, h } = surface(canvas);
    const { t0, span } = timeWindow(now);
    const pts = visibleSamples(t0);
    const { px, py, box } = frame(ctx, w, h, {
      ...timeAxis(now, span), y0: 0, y1: 1, yTitle: "usage", yFmt: (v) => Math.round(100 * v) + "%",
      yTicks: [0, 0.25, 0.5, 0.75, 1],
    });
    ctx.save();
    ctx.beginPath();
    ctx.rect(box.x, box.y - 2, box.w, box.h + 4);
    ctx.clip();
    const line = pts.map((p) => [px(p.t - now), py(Math.min(1, p.kv))]);
    polyline(ctx, line, color("kv"), color("kv"), box.y + box.h);
    ctx.restore();
    if (!pts.length) empty(ctx, w, h, "no data yet");
    canvas.dataset.points = pts.length;
  }

  // which requests get a row: those started (running, or preempted) first, then the most
  // recently finished and the longest waiting in equal shares, so a long queue does not hide
  // the work in progress, nor the finished requests the queue
  function ganttRows(d, now) {
    const started = d.live.filter((r) => r.first_scheduled_time !== null);
    const queued = d.live.filter((r) => r.first_scheduled_time === null); // oldest first
    const done = d.finished.filter((r) => r.finished_time >= now - MAX_WINDOW_S).reverse();
    const rows = started.slice(0, GANTT_ROWS);
    const room = GANTT_ROWS - rows.length;
    const nDone = Math.min(done.length, Math.max(Math.ceil(room / 2), room - queued.length));
    rows.push(...done.slice(0, nDone), ...queued.slice(0, room - nDone));
    return rows;
  }

  function drawGantt(d) {
    const canvas = $("c-gantt");
    const { ctx, w, h } = surface(canvas);
    const now = d.time;
    const rows = ganttRows(d, now).sort((a, b) => a.arrival_time - b.arrival_time);
    // the span of the rows shown (their requests may be a few ms long, or minutes)
    const oldest = rows.length ? now - rows[0].arrival_time : 0;
    const span = Math.min(MAX_WINDOW_S, niceMax(oldest * 1.05, 1));
    const t0 = now - span;
    const { px, box } = frame(ctx, w, h, { ...timeAxis(now, span), y0: 0, y1: 1, left: 110 });
    const rowH = Math.min(18, box.h / Math.max(rows.length, 1));
    const barH = Math.max(2, Math.round(rowH * 0.66));
    const x = (t) => px(Math.min(now, Math.max(t0, t)) - now);
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    rows.forEach((r, i) => {
      const yMid = box.y + rowH * (i + 0.5);
      const end = r.finished_time === null ? now : r.finished_time;
      const phases = [
        [r.arrival_time, r.first_scheduled_time === null ? end : r.first_scheduled_time, "queued"],
        [r.first_scheduled_time, r.first_token_time === null ? end : r.first_token_time, "prefill"],
        [r.first_token_time, end, "decode"],
      ];
      for (const [a, b, c] of phases) {
        if (a === null || b < t0 || b <= a) continue;
        const xa = x(a), xb = x(b);
        ctx.fillStyle = color(c);
        ctx.fillRect(xa, yMid - barH / 2, Math.max(1.5, xb - xa), barH);
      }
      if (r.finished_time !== null && r.finished_time >= t0) { // a tick where it ended
        ctx.fillStyle = color(r.finish_reason === "abort" ? "bad" : "text");
        ctx.fillRect(x(r.finished_time) - 1, yMid - barH / 2 - 2, 2, barH + 4);
      }
      if (rowH >= 10) {
        ctx.fillStyle = color("muted");
        ctx.fillText(shortId(r.request_id), box.x - 8, yMid);
      }
    });
    if (!rows.length) empty(ctx, w, h, "no requests in this window");
    canvas.dataset.points = rows.length;
  }

  function render() {
    const d = st.last;
    if (!d) return;
    renderTiles(d);
    drawBatch();
    drawThroughput(d.time);
    drawRequests(d.time);
    drawKv(d.time);
    drawGantt(d);
    const when = new Date(d.time * 1000).toLocaleTimeString();
    const step = d.num_steps ? "step " + (d.num_steps - 1) : "no steps yet";
    setStatus("live", "live · " + step + " · " + when);
  }

  // ---- start ----------------------------------------------------------------------------
  for (const el of document.querySelectorAll(".legend")) {
    for (const [label, c] of LEGENDS[el.dataset.for] || []) {
      const item = document.createElement("span");
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = color(c);
      item.append(sw, label);
      el.append(item);
    }
  }
  window.addEventListener("resize", render);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) render(); });
  poll();
})();
