// How the page talks to the server: `request` adds the API key (kept in this browser only) and
// turns an OpenAI-shaped error body into an APIError with its message and status.
const KEY = "raymix.apiKey";
const keyInput = document.getElementById("api-key");
keyInput.value = localStorage.getItem(KEY) || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem(KEY, keyInput.value.trim());
  document.dispatchEvent(new Event("raymix:key"));
});

export function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = keyInput.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

export class APIError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
  }
}

// fetch + the key; → the response if 2xx, else throws APIError (OpenAI's error body read)
export async function request(path, options = {}) {
  const r = await fetch(path, { ...options, headers: { ...headers(options.body !== undefined), ...options.headers } });
  if (!r.ok) {
    let body = null;
    try { body = await r.json(); } catch { /* not JSON */ }
    const error = new APIError(r.status, body);
    if (r.status === 401) notice("This server needs an API key: enter it at the top right.");
    throw error;
  }
  return r;
}

const noticeBox = document.getElementById("notice");
export function notice(text) {
  noticeBox.textContent = text;
  noticeBox.hidden = !text;
}
