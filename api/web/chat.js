// The chat playground: streams /v1/chat/completions (SSE) into the page. The conversation and
// the settings stay in this browser (localStorage); nothing is kept on the server.
import { APIError, notice, request } from "./api.js";
import { $, element } from "./dom.js";

const STORE = "raymix.chat";
const SETTINGS = ["model", "system", "temperature", "top_p", "max_tokens", "seed", "stop", "schema", "tools", "tool_choice"];

// Server-sent events of a fetch response → each `data:` payload parsed, until [DONE]
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE));
    if (saved && Array.isArray(saved.messages)) return saved;
  } catch { /* nothing saved, or from another version */ }
  return { messages: [], settings: {} };
}

function statsLine(m) {
  const parts = [];
  if (m.stats?.ttft_ms != null) parts.push(`TTFT ${Math.round(m.stats.ttft_ms)} ms`);
  if (m.stats?.tokens_per_s != null) parts.push(`${m.stats.tokens_per_s.toFixed(1)} tok/s`);
  if (m.usage) parts.push(`${m.usage.prompt_tokens} prompt + ${m.usage.completion_tokens} completion = ${m.usage.total_tokens} tokens`);
  if (m.finish_reason) parts.push(`finish: ${m.finish_reason}`);
  return parts.join(" · ");
}

export function startChat() {
  const state = load();
  const list = $("messages");
  let running = null; // the AbortController of the answer streaming now
  if (matchMedia("(max-width: 760px)").matches) $("settings").open = false; // a phone: the chat first

  for (const name of SETTINGS) {
    const input = $(name);
    if (state.settings[name] !== undefined && name !== "model") input.value = state.settings[name];
    input.addEventListener("change", () => { state.settings[name] = input.value; save(); });
  }

  function save() {
    localStorage.setItem(STORE, JSON.stringify(state));
  }

  function renderMessage(m, box = element("div")) {
    box.replaceChildren();
    box.className = `msg ${m.role}`;
    box.append(element("div", "role", m.role === "user" ? "You" : "Assistant"));
    if (m.content || (m.role === "assistant" && !m.tool_calls?.length && !m.error)) {
      box.append(element("div", "content", m.content || "…"));
    }
    for (const call of m.tool_calls || []) {
      const card = element("div", "tool-call");
      card.append(element("div", "tool-name", `tool call: ${call.name}`), element("pre", "tool-args", call.arguments));
      const result = element("input", "tool-result");
      result.placeholder = "the tool's result, sent with your next message";
      result.value = call.result || "";
      result.addEventListener("change", () => { call.result = result.value; save(); });
      card.append(result);
      box.append(card);
    }
    if (m.error) box.append(element("div", "error", m.error));
    const stats = statsLine(m);
    if (stats) box.append(element("div", "stats", stats));
    return box;
  }

  function render() {
    list.replaceChildren(...state.messages.map((m) => renderMessage(m)));
    list.lastElementChild?.scrollIntoView({ block: "end" });
  }

  function parsed(id, what) {
    const text = $(id).value.trim();
    if (!text) return undefined;
    try {
      return JSON.parse(text);
    } catch (e) {
      throw new Error(`${what} is not valid JSON: ${e.message}`);
    }
  }

  function requestBody() {
    const messages = [];
    if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
    for (const m of state.messages) {
      if (m.role === "user") {
        messages.push({ role: "user", content: m.content });
      } else if (m.tool_calls?.length) {
        messages.push({
          role: "assistant",
          content: m.content || null,
          tool_calls: m.tool_calls.map((c) => ({ id: c.id, type: "function", function: { name: c.name, arguments: c.arguments } })),
        });
        for (const c of m.tool_calls) messages.push({ role: "tool", tool_call_id: c.id, content: c.result || "" });
      } else if (m.content) {
        messages.push({ role: "assistant", content: m.content });
      }
    }
    const body = {
      model: $("model").value || undefined,
      messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: Number($("temperature").value),
      top_p: Number($("top_p").value),
      max_tokens: Number($("max_tokens").value),
    };
    if ($("seed").value !== "") body.seed = Number($("seed").value);
    const stop = $("stop").value.split("\n").filter((s) => s);
    if (stop.length) body.stop = stop;
    const schema = parsed("schema", "The JSON schema");
    if (schema !== undefined) body.response_format = { type: "json_schema", json_schema: { name: "answer", schema } };
    const tools = parsed("tools", "The tools");
    if (tools !== undefined) {
      body.tools = tools;
      body.tool_choice = $("tool_choice").value;
    }
    return body;
  }

  async function send(text) {
    let body;
    state.messages.push({ role: "user", content: text });
    try {
      body = requestBody();
    } catch (e) {
      state.messages.pop();
      notice(e.message);
      return;
    }
    notice("");
    const answer = { role: "assistant", content: "", tool_calls: [] };
    state.messages.push(answer);
    render();
    const box = list.lastElementChild;
    running = new AbortController();
    $("send").hidden = true;
    $("stop-button").hidden = false;
    const start = performance.now();
    let first = null;
    let pieces = 0; // streamed deltas with text or tool calls (a tool call comes whole, at the end)
    try {
      const response = await request("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: running.signal });
      for await (const chunk of events(response)) {
        if (chunk.error) throw new APIError(response.status, chunk);
        if (chunk.usage) answer.usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const delta = choice.delta || {};
          if (delta.content) answer.content += delta.content;
          for (const t of delta.tool_calls || []) {
            const call = (answer.tool_calls[t.index] ||= { id: t.id, name: "", arguments: "" });
            if (t.id) call.id = t.id;
            if (t.function?.name) call.name += t.function.name;
            if (t.function?.arguments) call.arguments += t.function.arguments;
          }
          if (delta.content || delta.tool_calls) {
            pieces += 1;
            first ??= performance.now();
          }
          if (choice.finish_reason) answer.finish_reason = choice.finish_reason;
        }
        renderMessage(answer, box);
      }
    } catch (e) {
      if (e.name === "AbortError") answer.finish_reason = "stopped";
      else answer.error = e.message;
    }
    const end = performance.now();
    const tokens = answer.usage?.completion_tokens;
    // decode speed: the tokens after the first over the time since it; for an answer that came
    // in one piece (a tool call) the whole request's time
    const rate = pieces > 1 && tokens > 1 && end > first ? (tokens - 1) / ((end - first) / 1000) : tokens / ((end - start) / 1000);
    answer.stats = { ttft_ms: first === null ? null : first - start, tokens_per_s: tokens ? rate : null };
    running = null;
    $("send").hidden = false;
    $("stop-button").hidden = true;
    save();
    renderMessage(answer, box);
  }

  async function loadModels() {
    const select = $("model");
    try {
      const models = await (await request("/v1/models")).json();
      select.replaceChildren(...models.data.map((m) => element("option", "", m.id)));
      if (models.data.some((m) => m.id === state.settings.model)) select.value = state.settings.model;
    } catch (e) {
      if (e.status !== 401) notice(`Could not list the models: ${e.message}`);
    }
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || running) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop-button").addEventListener("click", () => running?.abort());
  $("new-chat").addEventListener("click", () => {
    state.messages = [];
    save();
    render();
  });

  render();
  loadModels();
  return { active() {}, refresh: loadModels };
}
