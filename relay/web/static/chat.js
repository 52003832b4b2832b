// The chat page. A prompt becomes a job (POST /v1/jobs); its reply is followed through the
// job's event stream and drawn as it grows. Follow-ups name the last reply's messageId as
// parentMessageId, and the conversation is kept in localStorage across reloads.
import { renderMarkdown, renderThoughts } from "./markdown.js";
import { followJob, samePath } from "./stream.js";

const STORAGE_KEY = "chat-relay:conversation";
const KEY_STORAGE = "chat-relay:api-key"; // the API key this browser sends, if it was given one
const MODEL_STORAGE = "chat-relay:model"; // the model picked, "" for the relay's default
const $ = (id) => document.getElementById(id);
const ui = {
  scroller: $("scroller"),
  messages: $("messages"),
  empty: $("empty"),
  form: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  newChat: $("new-chat"),
  keyButton: $("key-button"),
  keyDialog: $("key-dialog"),
  keyForm: $("key-form"),
  keyInput: $("key-input"),
  keyHelp: $("key-help"),
  model: $("model"),
};
const KEY_HELP = ui.keyHelp.textContent;

// A message: {role: "user" | "assistant", text} and, for a reply, reasoning (a reasoning
// model's thinking, if it streamed any), jobId, messageId, the job's
// eventsUrl, watchUrl (share link) and cancelUrl (each carrying its token), status
// ("waiting" | "streaming" | "done" | "length" | "stopped" | "failed") and error.
// Keys starting with "_" are for this page view only and are not saved.
let chat = load(); // {messages, parentMessageId}
let current = null; // the reply being written, with its stream: {reply, stream}
const views = new WeakMap(); // message -> {el, body, meta, thinking}

const NOTES = {
  waiting: "Waiting for the relay…",
  stopped: "Stopped",
  length: "Cut off at the length limit",
};
const STATUS_BY_FINISH = { stop: "done", cancelled: "stopped", length: "length" };

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORAGE_KEY));
    if (saved && Array.isArray(saved.messages)) return saved;
  } catch {
    // unreadable: start afresh
  }
  return { messages: [], parentMessageId: null };
}

function save() {
  const json = JSON.stringify(chat, (key, value) => (key.startsWith("_") ? undefined : value));
  try {
    localStorage.setItem(STORAGE_KEY, json);
  } catch {
    // storage full or disabled: the chat works, it just does not survive a reload
  }
}

// ---- drawing ---------------------------------------------------------------------------

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function view(message) {
  const el = element("article", `msg ${message.role}`);
  const body = element("div", message.role === "user" ? "body" : "body markdown");
  const reply = message.role === "assistant";
  const meta = reply ? element("footer", "meta") : null;
  // A reasoning model's thinking, folded away once its answer starts: plain text, never HTML.
  const thinking = reply ? element("details", "thinking") : null;
  thinking?.append(element("summary"), element("div", "reasoning"));
  el.append(...[thinking, body, meta].filter(Boolean));
  views.set(message, { el, body, meta, thinking });
  update(message);
  return el;
}

/** Show a reply's reasoning, if it has any: "Thinking…" until its answer starts. */
function drawThoughts(message) {
  const thinking = views.get(message)?.thinking;
  const busy = ["waiting", "streaming"].includes(message.status) && !message.text;
  if (thinking) renderThoughts(thinking, message.reasoning, busy);
}

/** Redraw a message completely: text, status and footer. */
function update(message) {
  const { el, body, meta } = views.get(message) ?? {};
  if (!el) return;
  if (message.role === "user") {
    body.textContent = message.text;
    return;
  }
  el.dataset.status = message.status;
  if (message.jobId) el.dataset.jobId = message.jobId;
  el.classList.toggle("streaming", ["waiting", "streaming"].includes(message.status));
  renderMarkdown(body, message.text);
  drawThoughts(message);
  meta.replaceChildren(...footer(message));
}

function footer(message) {
  const items = [];
  const note = message.error ?? message._note ?? NOTES[message.status];
  if (note) {
    const notice = element("span", `notice ${message.error ? "error" : message.status}`, note);
    if (message.error) notice.setAttribute("role", "alert");
    items.push(notice);
  }
  if (message.watchUrl) {
    // The relay's link carries the job's read token; shown on this page's origin.
    const href = new URL(samePath(message.watchUrl), location.origin).href;
    const share = element("a", "share", "Share live");
    Object.assign(share, { href, target: "_blank", rel: "noopener", title: href });
    const copy = element("button", "copy ghost", "Copy link");
    copy.type = "button";
    copy.addEventListener("click", () => {
      navigator.clipboard.writeText(href).then(
        () => (copy.textContent = "Copied"),
        () => (copy.textContent = "Copy failed: use the link"),
      );
    });
    items.push(share, copy);
  }
  return items;
}

/** Redraw a growing reply's text, at most once per frame (the typewriter). */
function drawText(message) {
  if (message._frame) return;
  message._frame = requestAnimationFrame(() => {
    message._frame = 0;
    const stick = nearBottom();
    renderMarkdown(views.get(message).body, message.text);
    drawThoughts(message);
    if (stick) scrollDown();
  });
}

function drawAll() {
  ui.messages.replaceChildren(...(chat.messages.length ? chat.messages.map(view) : [ui.empty]));
  scrollDown();
}

const nearBottom = () =>
  ui.scroller.scrollHeight - ui.scroller.scrollTop - ui.scroller.clientHeight < 80;
const scrollDown = () => (ui.scroller.scrollTop = ui.scroller.scrollHeight);

function setBusy() {
  ui.send.hidden = Boolean(current);
  ui.stop.hidden = !current;
  ui.stop.disabled = !current?.reply.cancelUrl;
}

// ---- the conversation ------------------------------------------------------------------

function add(message) {
  if (!chat.messages.length) ui.empty.remove();
  chat.messages.push(message);
  ui.messages.append(view(message));
  scrollDown();
  return message;
}

async function send(prompt) {
  add({ role: "user", text: prompt });
  const reply = add({ role: "assistant", text: "", status: "waiting" });
  current = { reply, stream: null };
  setBusy();
  save();

  const request = { prompt };
  if (chat.parentMessageId) request.parentMessageId = chat.parentMessageId;
  if (ui.model.value) request.model = ui.model.value;
  let response, answer;
  const key = apiKey();
  try {
    response = await fetch("/v1/jobs", {
      method: "POST",
      headers: {
        "Content-Type": "application/json",
        ...(key ? { Authorization: `Bearer ${key}` } : {}),
      },
      body: JSON.stringify(request),
    });
    answer = await response.json().catch(() => null);
  } catch (error) {
    ui.prompt.value ||= prompt; // so that it can be sent again
    return finish(reply, "failed", `Could not reach the relay: ${error.message}`);
  }
  if (response.status === 401) {
    ui.prompt.value ||= prompt;
    const message = key
      ? "The relay refused this API key. Check it under “API key”, then send again."
      : "This relay needs an API key. Enter yours under “API key”, then send again.";
    finish(reply, "failed", message);
    return askForKey(message);
  }
  if (!response.ok) {
    ui.prompt.value ||= prompt;
    const message = answer?.error?.message ?? `The relay answered ${response.status}.`;
    return finish(reply, "failed", message);
  }
  if (current?.reply !== reply) return cancel(answer.cancel_url); // "New chat" was pressed
  Object.assign(reply, {
    jobId: answer.id,
    messageId: answer.messageId,
    eventsUrl: answer.events_url,
    watchUrl: answer.watch_url,
    cancelUrl: answer.cancel_url,
    status: "streaming",
  });
  save();
  update(reply);
  follow(reply);
}

/** Follow a reply's events from the start (also after a reload, while it is still going). */
function follow(reply) {
  let finishReason = null;
  let error = null;
  reply.text = "";
  reply.reasoning = "";
  current = { reply, stream: null };
  const thinking = views.get(reply)?.thinking;
  current.stream = followJob(
    reply.eventsUrl,
    {
      reasoning(delta) {
        if (!reply.reasoning && !reply.text && thinking) thinking.open = true;
        reply.reasoning += delta;
        drawText(reply);
      },
      text(delta) {
        if (!reply.text && thinking) thinking.open = false; // the answer starts
        reply.text += delta;
        drawText(reply);
      },
      finish(reason) {
        finishReason = reason;
      },
      error(problem) {
        error = problem?.message || "The reply failed.";
      },
      state(state) {
        reply._note = state === "reconnecting" ? "Connection lost, reconnecting…" : undefined;
        update(reply);
      },
      done() {
        finish(reply, error ? "failed" : (STATUS_BY_FINISH[finishReason] ?? "done"), error);
      },
    },
    { giveUp: true },
  );
  setBusy();
}

function finish(reply, status, error) {
  cancelAnimationFrame(reply._frame);
  Object.assign(reply, { status, error: error ?? undefined, _frame: 0, _note: undefined });
  // The relay keeps every reply that ended, stopped ones too: the next prompt continues it.
  if (status !== "failed" && reply.messageId) chat.parentMessageId = reply.messageId;
  if (current?.reply === reply) current = null;
  save();
  const stick = nearBottom();
  update(reply);
  if (stick) scrollDown();
  setBusy();
}

/** Cancel a job through its cancel URL (it carries the token only its creator was given; a
 * relay with API keys wants the key on every POST too). */
function cancel(cancelUrl) {
  const key = apiKey();
  return fetch(samePath(cancelUrl), {
    method: "POST",
    headers: key ? { Authorization: `Bearer ${key}` } : {},
  });
}

// ---- the API key ---------------------------------------------------------------------------

function apiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

function setApiKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage disabled: the key cannot be kept
  }
  showKeyState();
}

function showKeyState() {
  const has = Boolean(apiKey());
  ui.keyButton.classList.toggle("has-key", has);
  ui.keyButton.title = has ? "An API key is saved in this browser" : "No API key saved";
}

/** Open the key dialog; ``why`` (a refusal) replaces its usual help text. */
function askForKey(why) {
  ui.keyHelp.textContent = why || KEY_HELP;
  ui.keyInput.value = apiKey();
  ui.keyDialog.returnValue = ""; // closed with Escape: nothing changes
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.keyInput.focus();
}

ui.keyButton.addEventListener("click", () => askForKey());
ui.keyDialog.addEventListener("close", () => {
  if (ui.keyDialog.returnValue === "save") setApiKey(ui.keyInput.value.trim());
  else if (ui.keyDialog.returnValue === "forget") setApiKey("");
  if (ui.keyDialog.returnValue) loadModels(); // a key may show models it could not before
  ui.keyInput.value = "";
  ui.prompt.focus();
});

// ---- the model picker ----------------------------------------------------------------------

/** The model picked here before ("" for the relay's default), or null if none ever was. */
function storedModel() {
  try {
    return localStorage.getItem(MODEL_STORAGE);
  } catch {
    return null;
  }
}

/** Offer the models the relay lists (GET /v1/models); hidden if it lists none or refuses. */
async function loadModels() {
  const key = apiKey();
  let models = [];
  let fallback = null; // the model "Default" stands for, as the relay names it
  try {
    const response = await fetch("/v1/models", {
      headers: key ? { Authorization: `Bearer ${key}` } : {},
    });
    if (response.ok) {
      models = ((await response.json()).data || []).map((m) => m.id);
      fallback = response.headers.get("X-Relay-Default-Model");
    }
  } catch {
    // the relay is unreachable: sending will say so
  }
  ui.model.options[0].textContent = fallback ? `Default (${fallback})` : "Default";
  ui.model.replaceChildren(ui.model.options[0]);
  for (const id of models) ui.model.append(new Option(id, id));
  const wanted = storedModel();
  // A relay serving one model shows its name until someone picks "Default" instead.
  const first = wanted === null && models.length === 1 ? models[0] : "";
  ui.model.value = models.includes(wanted) ? wanted : first;
  ui.model.hidden = models.length === 0;
}

ui.model.addEventListener("change", () => {
  try {
    localStorage.setItem(MODEL_STORAGE, ui.model.value);
  } catch {
    // storage disabled: the choice holds for this page view
  }
});

// ---- controls ----------------------------------------------------------------------------

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = ui.prompt.value.trim();
  if (!prompt || current) return;
  ui.prompt.value = "";
  send(prompt);
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});

ui.stop.addEventListener("click", async () => {
  const reply = current?.reply;
  if (!reply?.cancelUrl) return;
  ui.stop.disabled = true;
  try {
    const response = await cancel(reply.cancelUrl);
    if (!response.ok) {
      const answer = await response.json().catch(() => null);
      throw new Error(answer?.error?.message ?? `the relay answered ${response.status}`);
    }
    // The stream now ends with finish_reason "cancelled" and [DONE]: see follow().
  } catch (error) {
    reply._note = `Could not stop: ${error.message}`;
    update(reply);
    ui.stop.disabled = false;
  }
});

ui.newChat.addEventListener("click", () => {
  if (current) {
    current.stream?.close();
    if (current.reply.cancelUrl) cancel(current.reply.cancelUrl).catch(() => {});
    current = null;
  }
  chat = { messages: [], parentMessageId: null };
  save();
  drawAll();
  setBusy();
  ui.prompt.focus();
});

// Leaving (or reloading) the page aborts the stream, which is no failure of the reply: it goes
// on without us, and a reload follows it again. Chromium aborts it right after beforeunload.
const leave = () => current?.stream?.close();
addEventListener("beforeunload", leave);
addEventListener("pagehide", leave);
addEventListener("pageshow", (event) => event.persisted && resume());

// ---- start -------------------------------------------------------------------------------

function resume() {
  const last = chat.messages.at(-1);
  if (last?.status === "streaming" && last.eventsUrl) {
    follow(last); // reloaded while a reply was being written: replay it and go on
  } else if (last?.status === "waiting") {
    finish(last, "failed", "The page was closed before the relay accepted this message.");
  }
}

showKeyState();
loadModels();
drawAll();
resume();
ui.prompt.focus();
