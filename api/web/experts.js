// The expert view: polls /experts (the router's own counters) every second while it is shown,
// and draws the tokens per expert per layer, each shard's experts, health and round trip per
// layer, and the balancedness over time; the rebalance button posts /experts/rebalance.
import { request } from "./api.js";
import { $, element } from "./dom.js";
import uPlot from "./vendor/uPlot.esm.js";

const POLL_MS = 1000;
const HISTORY = 600; // balancedness points kept: 10 minutes at one a second

function compact(n) {
  return n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : n >= 1e4 ? `${Math.round(n / 1e3)}k` : n >= 1e3 ? `${(n / 1e3).toFixed(1)}k` : String(n);
}

// tokens [layer][expert] → a grid: a row per MoE layer, a column per expert, darker = more tokens
// (scaled to the busiest cell); a column's header names the shards computing that expert. With
// many experts (Qwen3's 128, OLMoE's 64) the columns narrow to colour alone: every 8th is named,
// the numbers are in each cell's tooltip, and the grid scrolls sideways on a narrow screen; with
// more than 128 (DeepSeek-V3's 256, Kimi-K2's 384) they narrow to a few pixels, every 16th named,
// so that a whole layer fits a laptop's screen.
const DENSE_FROM = 33; // experts: above 32, cells show colour only
const VERY_DENSE_FROM = 129;
function renderHeatmap(status, which) {
  const tokens = which === "total" ? status.expert_tokens : status.recent_expert_tokens;
  const holders = Array.from({ length: status.num_experts }, () => []);
  for (const s of status.shards) for (const e of s.experts) holders[e].push(s.shard_id);
  const max = Math.max(1, ...tokens.flat());
  const grid = $("heatmap");
  const dense = status.num_experts >= DENSE_FROM;
  const veryDense = status.num_experts >= VERY_DENSE_FROM;
  grid.classList.toggle("dense", dense);
  const width = veryDense ? "2px" : dense ? "0.7em" : "2.2em";
  grid.style.gridTemplateColumns = `auto repeat(${status.num_experts}, minmax(${width}, 1fr))`;
  const step = veryDense ? 16 : 8;
  const cells = [element("div", "corner", "layer \\ expert")];
  for (let e = 0; e < status.num_experts; e++) {
    const head = element("div", "col-head", dense ? (e % step === 0 ? String(e) : "") : `E${e}`);
    if (holders[e].length && !dense) head.append(element("small", "", ` s${holders[e].join(",")}`));
    head.title = holders[e].length ? `expert ${e}: computed by shard ${holders[e].join(" and ")}` : `expert ${e}`;
    cells.push(head);
  }
  tokens.forEach((row, layer) => {
    cells.push(element("div", "row-head", `L${layer}`));
    const total = row.reduce((a, b) => a + b, 0);
    row.forEach((n, e) => {
      const cell = element("div", "cell", n && !dense ? compact(n) : "");
      const level = n / max;
      cell.style.background = `rgba(214, 69, 20, ${(0.06 + 0.94 * level).toFixed(3)})`;
      cell.style.color = level > 0.55 ? "#fff" : "";
      cell.dataset.layer = layer;
      cell.dataset.expert = e;
      cell.dataset.tokens = n;
      cell.title = `layer ${layer}, expert ${e}: ${n} tokens${total ? ` (${((100 * n) / total).toFixed(1)} % of the layer)` : ""}`;
      cells.push(cell);
    });
  });
  grid.replaceChildren(...cells);
}

// [0, 1, 2, 5, 7, 8] → [[0, 2], [5, 5], [7, 8]]: a shard's 43 experts as a few chips
function runs(ids) {
  const out = [];
  for (const e of [...ids].sort((a, b) => a - b)) {
    if (out.length && e === out[out.length - 1][1] + 1) out[out.length - 1][1] = e;
    else out.push([e, e]);
  }
  return out;
}

function renderShards(status) {
  const box = $("shards");
  if (!status.shards.length) {
    box.replaceChildren(element("p", "muted", "The experts run in this process: there are no expert shards to show."));
    return;
  }
  const slowest = Math.max(1e-9, ...status.shards.flatMap((s) => s.dispatch_ms.filter((v) => v != null)));
  box.replaceChildren(
    ...status.shards.map((s) => {
      const card = element("div", `shard ${s.healthy ? "healthy" : "down"}`);
      card.dataset.shard = s.shard_id;
      card.dataset.healthy = s.healthy;
      const head = element("div", "shard-head");
      head.append(element("strong", "", `Shard ${s.shard_id}`), element("span", "badge", s.healthy ? "healthy" : "unreachable"));
      card.append(head);
      const facts = [s.device, s.transport && `data plane: ${s.transport}`, s.pid && `pid ${s.pid}`].filter(Boolean);
      card.append(element("div", "muted", s.healthy ? facts.join(" · ") : s.detail));
      const chips = element("div", "chips");
      const own = s.experts.filter((e) => !s.replicas.includes(e));
      if (own.length > 16) {
        for (const [a, b] of runs(own)) chips.append(element("span", "chip", a === b ? `E${a}` : `E${a}–${b}`));
      } else {
        for (const e of own) {
          const chip = element("span", "chip", `E${e}`);
          chip.title = `expert ${e}`;
          chips.append(chip);
        }
      }
      for (const e of s.replicas) {
        const chip = element("span", "chip replica", `E${e} replica`);
        chip.title = `a replica of hot expert ${e} (its primary is on another shard)`;
        chips.append(chip);
      }
      card.append(chips);
      const latency = element("div", "latency");
      s.dispatch_ms.forEach((ms, layer) => {
        const bar = element("div", "bar");
        bar.style.width = ms == null ? "0" : `${Math.max(2, (100 * ms) / slowest)}%`;
        latency.append(element("span", "muted", `L${layer}`), bar, element("span", "ms", ms == null ? "–" : `${ms.toFixed(2)} ms`));
      });
      card.append(element("div", "caption", "round trip per layer batch (recent)"), latency);
      return card;
    }),
  );
}

// one card per router: up or not, its batch, its KV cache, its prefix-cache hit rate
function renderRouters(status) {
  $("routers").replaceChildren(
    ...(status.routers || []).map((r) => {
      const card = element("div", `shard router ${r.ready ? "healthy" : "down"}`);
      card.dataset.router = r.router;
      const head = element("div", "shard-head");
      head.append(element("strong", "", `Router ${r.router}`), element("span", "badge", r.ready ? "ready" : "not ready"));
      const hit = r.prefix_cache_hit_rate == null ? "–" : `${(100 * r.prefix_cache_hit_rate).toFixed(0)} %`;
      const facts = [
        `${r.num_requests_running} running`,
        `${r.num_requests_waiting} waiting`,
        `KV cache ${(100 * r.kv_cache_usage_perc).toFixed(0)} %`,
        `prefix hits ${hit}`,
      ];
      card.append(head, element("div", "muted", facts.join(" · ")));
      return card;
    }),
  );
}

// whether the recent window holds any tokens (it starts over when the placement changes)
const seen = (status) => status.recent_expert_tokens.some((row) => row.some((n) => n > 0));

export function startExperts() {
  let timer = null;
  let chart = null;
  let status = null;
  const times = [];
  const balance = [];

  function drawChart() {
    const box = $("balance-chart");
    const width = box.clientWidth;
    if (!width) return;
    if (!chart) {
      chart = new uPlot(
        {
          width,
          height: 180,
          scales: { y: { range: [0, 1] } },
          series: [{}, { label: "balancedness", stroke: "#d64514", width: 2 }],
          axes: [{}, { values: (_, ticks) => ticks.map((t) => t.toFixed(1)) }],
        },
        [times, balance],
        box,
      );
    } else {
      chart.setData([times, balance]);
    }
  }

  function render() {
    if (!status) return;
    const healthy = status.shards.filter((s) => s.healthy).length;
    $("ex-shards").textContent = status.shards.length ? `${healthy}/${status.shards.length} up` : "in-process";
    $("ex-shards").classList.toggle("bad", healthy < status.shards.length);
    $("ex-balance").textContent = seen(status) ? status.balancedness.toFixed(2) : "–";
    $("ex-recoveries").textContent = status.shard_recoveries;
    $("rebalance").disabled = !status.shards.length || !status.num_redundant_experts;
    $("rebalance").title = status.num_redundant_experts
      ? `replicate hot experts into ${status.num_redundant_experts} spare slots`
      : "rebalancing needs spare expert slots (num_redundant_experts)";
    renderHeatmap(status, $("heat-window").value);
    renderShards(status);
    renderRouters(status);
    drawChart();
  }

  async function poll() {
    try {
      status = await (await request("/experts")).json();
      $("view-experts").classList.remove("unreachable");
      times.push(Date.now() / 1000);
      balance.push(seen(status) ? status.balancedness : null); // a gap while the window is empty
      if (times.length > HISTORY) {
        times.shift();
        balance.shift();
      }
      render();
    } catch (e) {
      $("view-experts").classList.add("unreachable");
      $("ex-shards").textContent = "router down";
      $("ex-shards").classList.add("bad");
      $("rebalance-result").textContent = `Could not read the experts: ${e.message}`;
    }
  }

  $("heat-window").addEventListener("change", render);
  window.addEventListener("resize", () => {
    if (chart && $("balance-chart").clientWidth) chart.setSize({ width: $("balance-chart").clientWidth, height: 180 });
  });
  $("rebalance").addEventListener("click", async () => {
    const out = $("rebalance-result");
    out.className = "result";
    out.textContent = "rebalancing…";
    try {
      const plan = await (await request("/experts/rebalance", { method: "POST" })).json();
      const replicas = Object.entries(plan.replicas).map(([e, shards]) => `E${e} on shards ${shards.join(", ")}`);
      out.textContent = plan.changed
        ? `Rebalanced: balancedness ${plan.before.toFixed(2)} → ${plan.after.toFixed(2)} (planned); replicas: ${replicas.join("; ")}`
        : plan.reason
          ? `Nothing to do: ${plan.reason}`
          : `Already as planned (balancedness ${plan.balancedness.toFixed(2)})${replicas.length ? `; replicas: ${replicas.join("; ")}` : ""}`;
      out.classList.add("ok");
      poll();
    } catch (e) {
      out.textContent = `Rebalance refused: ${e.message}`;
      out.classList.add("error");
    }
  });

  return {
    active(on) {
      if (on && !timer) {
        poll();
        timer = setInterval(poll, POLL_MS);
      } else if (!on && timer) {
        clearInterval(timer);
        timer = null;
      }
    },
    refresh: poll,
  };
}
