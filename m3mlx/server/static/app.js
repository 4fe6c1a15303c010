// The chat page: conversations in localStorage, replies streamed from /v1/chat/completions.
//
// The page is a plain API client: it reads the model and its context length from /v1/models,
// sends each conversation with its own thinking mode, system prompt and sampling settings,
// and reads the stream's deltas (content, reasoning_content, tool_calls), its usage and
// timings, and the server's progress comments (`: prefill 4096/16384`, `: queued: 1 ahead`).
// Text is only ever put into the page as text (markdown.js builds DOM nodes).

import { StreamingMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const STORE = "m3mlx.conversations";
const CURRENT = "m3mlx.current";
const KEY = "m3mlx.apiKey";
const SAMPLING = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens",
  "seed"];
const INTEGER = new Set(["top_k", "max_tokens", "seed"]);

const state = {
  model: null,        // the served model's id
  context: null,      // its context length, from /v1/models
  conversations: load(),
  current: localStorage.getItem(CURRENT),
  controller: null,   // the streaming request's AbortController
};

// Stored conversations, each with every field the page reads (storage can hold anything: an
// older page's data, a hand edit); what is not a conversation is dropped.
function load() {
  let stored;
  try {
    stored = JSON.parse(localStorage.getItem(STORE) || "[]");
  } catch {
    return [];
  }
  if (!Array.isArray(stored)) return [];
  const text = (v, fallback = "") => (typeof v === "string" ? v : fallback);
  return stored.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages))
    .map((c) => ({
      ...c,
      title: text(c.title, "Chat"), system: text(c.system), tools: text(c.tools),
      thinking: ["adaptive", "enabled", "disabled"].includes(c.thinking) ? c.thinking : "adaptive",
      sampling: c.sampling && typeof c.sampling === "object" ? c.sampling : {},
      created: Number(c.created) || Date.now(),
      messages: c.messages.filter((m) => m && ["user", "assistant", "tool"].includes(m.role))
        .map((m) => ({ ...m, content: text(m.content), reasoning: text(m.reasoning),
                       tool_calls: Array.isArray(m.tool_calls) ? m.tool_calls : [] })),
    }));
}

function save() {
  try {
    localStorage.setItem(STORE, JSON.stringify(state.conversations));
    localStorage.setItem(CURRENT, state.current || "");
  } catch (e) {
    showStatus(`could not save conversations in this browser: ${e.message}`);
  }
}

const el = (tag, cls, text) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
};
const fmt = (n) => Math.round(n).toLocaleString("en-US");

// -- conversations ---------------------------------------------------------------------------

function newConversation() {
  const previous = conversation();
  if (previous && !previous.messages.length) return previous;  // no pile of empty chats
  const convo = {
    id: crypto.randomUUID ? crypto.randomUUID() : String(Date.now() + Math.random()),
    title: "New chat",
    created: Date.now(),
    thinking: previous ? previous.thinking : "adaptive",
    system: previous ? previous.system : "",
    sampling: previous ? { ...previous.sampling } : {},
    tools: previous ? previous.tools : "",
    messages: [],
  };
  state.conversations.unshift(convo);
  state.current = convo.id;
  save();
  return convo;
}

function conversation() {
  return state.conversations.find((c) => c.id === state.current) || null;
}

function current() {
  return conversation() || newConversation();
}

function renderList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const convo of state.conversations) {
    const item = el("li", convo.id === state.current ? "active" : "");
    const button = el("button", null, convo.title);
    button.type = "button";
    button.title = new Date(convo.created).toLocaleString();
    button.addEventListener("click", () => switchTo(convo.id));
    item.append(button);
    list.append(item);
  }
}

function switchTo(id) {
  if (state.controller) state.controller.abort();
  state.current = id;
  save();
  showConversation();
  document.body.classList.remove("sidebar-open");
}

function showConversation() {
  const convo = current();
  $("thinking").value = convo.thinking;
  $("system").value = convo.system;
  $("tools").value = convo.tools || "";
  for (const key of SAMPLING) $(key).value = convo.sampling[key] ?? "";
  renderList();
  renderMessages();
  showUsage(convo);
}

// -- messages --------------------------------------------------------------------------------

function renderMessages() {
  const convo = current();
  const box = $("messages");
  box.replaceChildren(...convo.messages.map((m, i) => messageNode(convo, m, i)));
  if (!convo.messages.length) {
    box.append(el("p", "empty", "Send a message to start. Settings (system prompt, sampling, " +
      "tools) belong to this conversation."));
  }
  box.scrollTop = box.scrollHeight;
  const call = unansweredCall(convo);
  $("input").placeholder = call ? `The result of ${call.function.name} (Enter sends)`
    : "Message (Enter sends, Shift+Enter adds a line)";
}

function messageNode(convo, message, index) {
  const node = el("article", `message ${message.role}`);
  node.dataset.index = index;
  fillMessage(node, message);
  const last = index === convo.messages.length - 1;
  const actions = el("div", "actions");
  if (message.role === "user" && index === lastIndex(convo, "user") && !state.controller) {
    actions.append(action("Edit", "edit", () => editLast(convo)));
  }
  if (message.role === "assistant" && last && !state.controller) {
    actions.append(action("Regenerate", "regenerate", () => regenerate(convo)));
  }
  if (message.content) {
    actions.append(action("Copy", "copy-message", (b) => copy(message.content, b)));
  }
  if (actions.childNodes.length) node.append(actions);
  return node;
}

function action(label, cls, handler) {
  const button = el("button", cls, label);
  button.type = "button";
  button.addEventListener("click", () => handler(button));
  return button;
}

function lastIndex(convo, role) {
  for (let i = convo.messages.length - 1; i >= 0; i--) {
    if (convo.messages[i].role === role) return i;
  }
  return -1;
}

// The inside of a message: reasoning, content, tool calls, then what went wrong if anything.
// While a reply streams this runs on every frame: the reasoning and content elements are kept
// (node.view), and their Markdown is rendered again only past its last finished block.
function fillMessage(node, message, streaming = false) {
  const view = node.view || (node.view = {});
  const parts = [];
  if (message.role === "tool") parts.push(el("div", "role-label", "tool result"));
  if (message.reasoning) {
    if (!view.reasoning) {
      const details = el("details", "reasoning");
      const summary = el("summary");
      const body = el("div", "reasoning-body");
      summary.addEventListener("click", () => {
        node.dataset.reasoning = details.open ? "closed" : "open";
      });
      details.append(summary, body);
      view.reasoning = { details, summary, markdown: new StreamingMarkdown(body) };
    }
    const { details, summary, markdown } = view.reasoning;
    const thinking = streaming && !message.content && !(message.tool_calls || []).length;
    // Open while the model thinks, folded once it answers, unless the reader chose.
    details.open = node.dataset.reasoning ? node.dataset.reasoning === "open" : thinking;
    const words = message.reasoning.trim().split(/\s+/).length;
    summary.textContent = thinking ? "Thinking…" : `Reasoning (${fmt(words)} words)`;
    markdown.update(message.reasoning);
    parts.push(details);
  }
  if (message.content || (streaming && !message.reasoning && !(message.tool_calls || []).length)) {
    if (!view.content) {
      const div = el("div", "content");
      const markdown = message.role === "assistant" ? new StreamingMarkdown(div) : null;
      view.content = { div, markdown };
    }
    const { div, markdown } = view.content;
    if (markdown) markdown.update(message.content);
    else div.textContent = message.content;  // what people type is shown as typed
    div.classList.toggle("streaming", streaming);
    parts.push(div);
  }
  for (const call of message.tool_calls || []) {
    const box = el("div", "tool-call");
    box.append(el("div", "tool-name", `called ${call.function.name}`));
    let args = call.function.arguments;
    try { args = JSON.stringify(JSON.parse(args), null, 2); } catch { /* still streaming */ }
    box.append(el("pre", "tool-args", args));
    parts.push(box);
  }
  if (message.stopped) parts.push(el("div", "note", "stopped"));
  if (message.error) {
    const box = el("div", "error");
    box.append(el("strong", null, message.error.message),
               el("div", "what-to-do", message.error.hint));
    parts.push(box);
  }
  const actions = node.querySelector(":scope > .actions");
  node.replaceChildren(...parts);
  if (actions) node.append(actions);
}

// The conversation as the API takes it: errors and stops are the page's, not the model's.
function apiMessages(convo) {
  const out = [];
  if (convo.system.trim()) out.push({ role: "system", content: convo.system });
  for (const m of convo.messages) {
    if (m.role === "assistant") {
      // A reply that failed, or was stopped before its first token, is not sent back.
      if (!m.content && !m.reasoning && !(m.tool_calls || []).length) continue;
      const entry = { role: "assistant", content: m.content || "" };
      if (m.reasoning) entry.reasoning_content = m.reasoning;
      if (m.tool_calls && m.tool_calls.length) entry.tool_calls = m.tool_calls;
      out.push(entry);
    } else if (m.role === "tool") {
      out.push({ role: "tool", content: m.content, tool_call_id: m.tool_call_id });
    } else {
      out.push({ role: m.role, content: m.content });
    }
  }
  return out;
}

// -- sending ---------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function unansweredCall(convo) {
  const last = convo.messages[convo.messages.length - 1];
  if (!last || last.role === "user") return null;
  const i = lastIndex(convo, "assistant");
  const calls = (convo.messages[i] && convo.messages[i].tool_calls) || [];
  const answered = new Set(convo.messages.slice(i + 1).map((m) => m.tool_call_id));
  return calls.find((c) => !answered.has(c.id)) || null;
}

async function send() {
  const input = $("input");
  const text = input.value;
  if (!text.trim() || state.controller) return;
  const convo = current();
  const call = unansweredCall(convo);  // a pending tool call: this text is its result
  convo.messages.push(call ? { role: "tool", content: text, tool_call_id: call.id }
    : { role: "user", content: text });
  if (convo.title === "New chat" && !call) convo.title = text.trim().split("\n")[0].slice(0, 60);
  input.value = "";
  save();
  renderList();
  await complete(convo);
}

function editLast(convo) {
  const i = lastIndex(convo, "user");
  if (i < 0) return;
  $("input").value = convo.messages[i].content;
  convo.messages.splice(i);
  save();
  renderMessages();
  $("input").focus();
}

function regenerate(convo) {
  const i = lastIndex(convo, "assistant");
  if (i < 0 || i !== convo.messages.length - 1) return;
  convo.messages.splice(i);
  save();
  complete(convo);
}

function requestBody(convo) {
  const body = {
    model: state.model,
    messages: apiMessages(convo),
    stream: true,
    stream_options: { include_usage: true },
    chat_template_kwargs: { thinking_mode: convo.thinking },
  };
  for (const [key, value] of Object.entries(convo.sampling)) {
    if (value !== "" && value !== null && value !== undefined) body[key] = value;
  }
  if (convo.tools && convo.tools.trim()) body.tools = JSON.parse(convo.tools);
  return body;
}

async function complete(convo) {
  const message = { role: "assistant", content: "", reasoning: "", tool_calls: [] };
  if (!state.model) await loadModel();  // the server was down, or the key missing, at load
  let body;
  try {
    body = requestBody(convo);
  } catch (e) {
    message.error = { message: `The tools are not valid JSON: ${e.message}`,
                      hint: "Fix them in Settings → Tools, or empty the field." };
    convo.messages.push(message);
    save();
    renderMessages();
    return;
  }
  convo.messages.push(message);
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  renderMessages();
  const node = $("messages").lastElementChild;
  const started = performance.now();
  let redraw = 0;
  const update = () => {
    if (redraw) return;
    redraw = requestAnimationFrame(() => {
      redraw = 0;
      const box = $("messages");
      const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
      fillMessage(node, message, state.controller === controller);
      if (atBottom) box.scrollTop = box.scrollHeight;
    });
  };
  let saved = started;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) {
      message.error = await explain(response);
    } else {
      showStatus("waiting for the first token…");
      await readStream(response, (event) => {
        if (event.comment) return progress(event.comment);
        const chunk = event.data;
        if (chunk.error) {
          message.error = { message: chunk.error.message, hint: hintFor(500, chunk.error.message) };
          return;
        }
        if (chunk.usage) message.usage = chunk.usage;
        if (chunk.timings) message.timings = chunk.timings;
        for (const choice of chunk.choices || []) {
          const d = choice.delta || {};
          if (message.first === undefined && (d.content || d.reasoning_content || d.tool_calls)) {
            message.first = performance.now() - started;
            $("prefill").hidden = true;
            showStatus("generating…");
          }
          if (d.reasoning_content) message.reasoning += d.reasoning_content;
          if (d.content) message.content += d.content;
          for (const call of d.tool_calls || []) {
            const slot = message.tool_calls[call.index] ||= { id: call.id, type: "function",
              function: { name: "", arguments: "" } };
            if (call.id) slot.id = call.id;
            if (call.function && call.function.name) slot.function.name = call.function.name;
            if (call.function && call.function.arguments) {
              slot.function.arguments += call.function.arguments;
            }
          }
          if (choice.finish_reason) message.finish = choice.finish_reason;
        }
        update();
        if (performance.now() - saved > 1000) { save(); saved = performance.now(); }
      });
    }
  } catch (e) {
    if (e.name === "AbortError") message.stopped = true;
    else message.error = { message: `The server could not be reached: ${e.message}`,
                           hint: "Check that m3mlx serve is still running, then press " +
                             "Regenerate." };
  }
  if (redraw) cancelAnimationFrame(redraw);
  state.controller = null;
  if (message.finish === "length") {
    message.error = { message: "The reply was cut at its token limit.",
                      hint: "Raise Max tokens in Settings, or ask the model to go on." };
  }
  setBusy(false);
  save();
  renderMessages();
  showUsage(convo);
  if (message.error && message.error.status === 401) {
    askKey("The API key was refused; enter it again.");
  }
}

// Server-sent events, as {data} (parsed JSON) and {comment} (progress lines).
async function readStream(response, handle) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith(":")) handle({ comment: line.slice(1).trim() });
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      const text = data.join("\n");
      if (text && text !== "[DONE]") handle({ data: JSON.parse(text) });
    }
  }
}

function progress(comment) {
  let m;
  if ((m = /^prefill (\d+)\/(\d+)/.exec(comment))) {
    const [done, total] = [Number(m[1]), Number(m[2])];
    const bar = $("prefill");
    bar.hidden = false;
    bar.max = total;
    bar.value = done;
    const percent = Math.floor((100 * done) / total);
    showStatus(`reading the prompt: ${fmt(done)} of ${fmt(total)} tokens (${percent}%)`);
  } else if ((m = /^queued: (\d+) ahead/.exec(comment))) {
    showStatus(`waiting for the server: ${m[1]} request${m[1] === "1" ? "" : "s"} ahead`);
  }
}

async function explain(response) {
  let text = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    text = (body.error && body.error.message) || text;
  } catch { /* not JSON */ }
  return { status: response.status, message: text, hint: hintFor(response.status, text) };
}

function hintFor(status, text) {
  if (status === 401) return "Enter the server's API key (the one given to m3mlx serve --api-key).";
  if (/context/.test(text)) {
    return "The conversation no longer fits the model's context: start a new chat (or edit the " +
      "last message shorter), or lower Max tokens in Settings.";
  }
  if (status === 400 || status === 422) {
    return "A setting of this conversation was refused: check Settings (sampling values, tools " +
      "JSON), then press Regenerate.";
  }
  if (status === 404) return "The server serves another model now: reload the page.";
  if (status === 413) return "The message is larger than the server accepts: send less, or " +
    "restart m3mlx serve with a larger --max-body-size.";
  if (status === 503) {
    return "The server is busy with other requests: press Regenerate in a moment.";
  }
  return "See the server's console for details, then press Regenerate.";
}

// -- status ----------------------------------------------------------------------------------

function showStatus(text) {
  $("status-text").textContent = text;
}

function showUsage(convo) {
  $("prefill").hidden = true;
  const last = [...convo.messages].reverse().find((m) => m.usage);
  const max = state.context ? fmt(state.context) : "?";
  if (!last) {
    showStatus(state.model ? `${state.model} · context ${max} tokens` : "");
    return;
  }
  const u = last.usage;
  const parts = [`context ${fmt(u.total_tokens)} / ${max}`];
  if (last.timings) {
    parts.push(`prompt ${fmt(last.timings.prompt_per_second)} tok/s`,
               `generation ${last.timings.predicted_per_second.toFixed(1)} tok/s`);
  }
  const cached = (u.prompt_tokens_details && u.prompt_tokens_details.cached_tokens) || 0;
  parts.push(`cached ${fmt(cached)} of ${fmt(u.prompt_tokens)} prompt tokens`);
  showStatus(parts.join(" · "));
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

// -- API key and model -------------------------------------------------------------------------

function askKey(reason) {
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason;
  $("key-input").value = "";
  if (!dialog.open) dialog.showModal();
}

async function loadModel() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    showStatus(`the server could not be reached: ${e.message}`);
    return;
  }
  if (response.status === 401) {
    askKey(localStorage.getItem(KEY) ? "The saved API key was refused; enter it again."
      : "This server needs an API key (the one given to m3mlx serve --api-key).");
    return;
  }
  const models = await response.json();
  const card = models.data[0];
  state.model = card.id;
  state.context = card.context_length || null;
  $("model-name").textContent = card.id;
  document.title = `${card.id} · m3mlx`;
  showUsage(current());
}

// -- copying -----------------------------------------------------------------------------------

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // No clipboard API outside secure contexts (http to another machine): a hidden textarea.
    const area = el("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  const label = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = label; }, 1200);
}

// -- wiring ------------------------------------------------------------------------------------

function settingsChanged() {
  const convo = current();
  convo.thinking = $("thinking").value;
  convo.system = $("system").value;
  convo.tools = $("tools").value;
  for (const key of SAMPLING) {
    const raw = $(key).value.trim();
    convo.sampling[key] = raw === "" ? "" : INTEGER.has(key) ? parseInt(raw, 10) : Number(raw);
  }
  save();
}

function download() {
  const convo = current();
  const blob = new Blob([JSON.stringify(convo, null, 2)], { type: "application/json" });
  const a = el("a");
  a.href = URL.createObjectURL(blob);
  a.download = `${convo.title.replace(/[^\w.-]+/g, "_").slice(0, 40) || "chat"}.json`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

function wire() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.controller && !$("key-dialog").open) state.controller.abort();
  });
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    newConversation();
    showConversation();
    $("input").focus();
  });
  $("delete-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.conversations = state.conversations.filter((c) => c.id !== state.current);
    state.current = state.conversations.length ? state.conversations[0].id : null;
    save();
    showConversation();
  });
  $("export").addEventListener("click", download);
  for (const id of ["thinking", "system", "tools", ...SAMPLING]) {
    $(id).addEventListener("change", settingsChanged);
    $(id).addEventListener("input", settingsChanged);
  }
  $("settings-toggle").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  });
  $("menu").addEventListener("click", () => {
    const open = document.body.classList.toggle("sidebar-open");
    $("menu").setAttribute("aria-expanded", String(open));
  });
  document.querySelector("main").addEventListener("click", (e) => {  // narrow: a tap beside closes
    if (!e.target.closest("#menu")) document.body.classList.remove("sidebar-open");
  });
  $("messages").addEventListener("click", (e) => {
    const button = e.target.closest("button.copy");
    if (button) copy(button.dataset.code, button);
  });
  $("key-form").addEventListener("submit", () => {
    localStorage.setItem(KEY, $("key-input").value.trim());
    loadModel();
  });
}

wire();
showConversation();
loadModel();
