// The page's shell: the tabs (#chat, #experts) and the API key field.
import { notice } from "./api.js";
import { startChat } from "./chat.js";
import { startExperts } from "./experts.js";

const views = { chat: startChat(), experts: startExperts() };

function show() {
  const name = location.hash === "#experts" ? "experts" : "chat";
  for (const [v, ctl] of Object.entries(views)) {
    document.getElementById(`view-${v}`).hidden = v !== name;
    document.getElementById(`tab-${v}`).classList.toggle("active", v === name);
    ctl.active(v === name);
  }
}
window.addEventListener("hashchange", show);
document.addEventListener("raymix:key", () => { notice(""); views.chat.refresh(); });
show();
