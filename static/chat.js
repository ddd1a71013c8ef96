// my-claw WebChat. Plain browser JavaScript, no build step, no dependencies.
//
// Security rule of this file: model output (and anything else from the server) is untrusted
// and only ever reaches the page through textContent and DOM nodes built here; innerHTML is
// never used. The server's Content-Security-Policy forbids inline scripts as a second wall.
//
// Other scripts (cron.js) can use `window.myClaw`: `api(path, options)`, `conversations()`,
// `currentConversationId()`, `openConversation(id)`, `refreshConversations()`,
// `showError(text)`, and `renderMarkdown(element, text)` (the safe renderer).

"use strict";

(() => {
  const TOKEN_KEY = "my-claw.token";
  const TIER_KEY = "my-claw.tier";

  const $ = (id) => document.getElementById(id);
  const el = {
    app: $("app"),
    sidebar: $("sidebar"),
    scrim: $("scrim"),
    list: $("conversation-list"),
    newChat: $("new-chat"),
    openSidebar: $("open-sidebar"),
    closeSidebar: $("close-sidebar"),
    title: $("conversation-title"),
    actions: $("conversation-actions"),
    rename: $("rename-chat"),
    del: $("delete-chat"),
    model: $("model-select"),
    connection: $("connection"),
    banner: $("banner"),
    bannerText: $("banner-text"),
    bannerRetry: $("banner-retry"),
    messages: $("messages"),
    empty: $("empty"),
    composer: $("composer"),
    composerNote: $("composer-note"),
    input: $("input"),
    send: $("send"),
    stop: $("stop"),
    tokenDialog: $("token-dialog"),
    tokenForm: $("token-form"),
    tokenInput: $("token-input"),
    tokenReason: $("token-reason"),
    togglePersona: $("toggle-persona"),
    toggleCron: $("toggle-cron"),
    signOut: $("sign-out"),
    personaPanel: $("persona-panel"),
    personaForm: $("persona-form"),
    personaName: $("persona-name"),
    personaPrompt: $("persona-prompt"),
    personaReset: $("persona-reset"),
    personaClose: $("persona-close"),
    personaStatus: $("persona-status"),
    cronPanel: $("cron-panel"),
  };

  const state = {
    token: null,
    conversations: [],
    current: null, // the open conversation object, or null for a new chat
    streaming: null, // { controller, conversationId, bubble, stopRequested }
    tiers: [],
    defaultTier: null,
    personaDefaults: null,
    eventsController: null,
    started: false,
  };

  class AuthError extends Error {}
  class NetworkError extends Error {}
  class ApiFailure extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // --- Token -----------------------------------------------------------------------------

  /** Takes `?token=` from the address bar into storage, and removes it from the URL. */
  function adoptTokenFromUrl() {
    const url = new URL(window.location.href);
    const token = url.searchParams.get("token");
    if (token === null) return;
    url.searchParams.delete("token");
    window.history.replaceState(null, "", url.pathname + url.search + url.hash);
    if (token.trim()) saveToken(token.trim());
  }

  function saveToken(token) {
    state.token = token;
    try {
      window.localStorage.setItem(TOKEN_KEY, token);
    } catch (_) {
      // Private mode without storage: the token lives for this page only.
    }
  }

  function loadToken() {
    try {
      state.token = window.localStorage.getItem(TOKEN_KEY);
    } catch (_) {
      state.token = null;
    }
  }

  function forgetToken() {
    state.token = null;
    try {
      window.localStorage.removeItem(TOKEN_KEY);
    } catch (_) {
      /* nothing to forget */
    }
  }

  function askToken(reason) {
    el.tokenReason.textContent =
      reason ||
      "Enter the WebChat token (WEBCHAT_TOKEN, or the file webchat_token in the data directory). It is kept in this browser.";
    el.tokenReason.classList.toggle("error", Boolean(reason));
    el.tokenDialog.hidden = false;
    el.tokenInput.value = "";
    el.tokenInput.focus();
  }

  // --- HTTP ------------------------------------------------------------------------------

  /** Calls the API with the token. Resolves to parsed JSON (or null for 204). */
  async function api(path, options = {}) {
    const response = await rawFetch(path, options);
    if (response.status === 204) return null;
    return response.json();
  }

  /** fetch with the token and our error handling; returns the (ok) Response. */
  async function rawFetch(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (state.token) headers.set("Authorization", "Bearer " + state.token);
    let body = options.body;
    if (body !== undefined && typeof body !== "string") {
      body = JSON.stringify(body);
      headers.set("Content-Type", "application/json");
    }
    let response;
    try {
      response = await fetch(path, { ...options, headers, body, cache: "no-store" });
    } catch (err) {
      if (err && err.name === "AbortError") throw err;
      setConnection("down");
      showBanner("Cannot reach my-claw. Is the server running?", retryAll);
      throw new NetworkError("the server cannot be reached");
    }
    if (response.status === 401) {
      forgetToken();
      askToken("The token was refused. Enter it again.");
      throw new AuthError("unauthorized");
    }
    if (!response.ok) {
      let code = "http_" + response.status;
      let message = response.status + " " + response.statusText;
      try {
        const payload = await response.json();
        if (payload && payload.error) {
          code = payload.error.code || code;
          message = payload.error.message || message;
        }
      } catch (_) {
        /* not our JSON: keep the status line */
      }
      throw new ApiFailure(response.status, code, message);
    }
    if (response.status < 500) hideBanner(true);
    return response;
  }

  /** Yields the `data:` payloads of a Server-Sent Events response body. */
  async function* sseData(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = block
            .split("\n")
            .filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).replace(/^ /, ""))
            .join("\n");
          if (data) yield data;
        }
      }
    } finally {
      reader.releaseLock();
    }
  }

  function describeError(err) {
    if (err instanceof ApiFailure) {
      if (err.status === 503) return "Model unavailable: " + err.message;
      if (err.status === 413) return "This message is too long for the server.";
      return err.message;
    }
    if (err instanceof NetworkError) return "The server cannot be reached.";
    if (err instanceof AuthError) return "Not signed in.";
    return String((err && err.message) || err);
  }

  // --- Banner and connection state --------------------------------------------------------

  let bannerIsNetwork = false;

  function showBanner(text, retry) {
    el.bannerText.textContent = text;
    el.bannerRetry.hidden = !retry;
    el.bannerRetry.onclick = retry || null;
    bannerIsNetwork = Boolean(retry);
    el.banner.hidden = false;
  }

  /** Hides the banner; `onlyNetwork` keeps other messages until they are dismissed. */
  function hideBanner(onlyNetwork) {
    if (onlyNetwork && !bannerIsNetwork) return;
    el.banner.hidden = true;
  }

  function setConnection(kind) {
    el.connection.dataset.state = kind;
    el.connection.title =
      kind === "live" ? "Connected: live updates on" : kind === "down" ? "Server unreachable" : "Connecting…";
  }

  function retryAll() {
    hideBanner();
    start();
  }

  // --- Safe Markdown -----------------------------------------------------------------------

  /** Renders a safe Markdown subset into `parent` with DOM nodes only. */
  function renderMarkdown(parent, text) {
    parent.replaceChildren();
    const lines = text.split("\n");
    let i = 0;
    let paragraph = [];
    const flushParagraph = () => {
      if (paragraph.length === 0) return;
      const p = document.createElement("p");
      renderInline(p, paragraph.join("\n"));
      parent.appendChild(p);
      paragraph = [];
    };
    while (i < lines.length) {
      const line = lines[i];
      const fence = line.match(/^\s*(```+|~~~+)\s*([\w+#.-]*)\s*$/);
      if (fence) {
        flushParagraph();
        const closing = fence[1];
        const body = [];
        i += 1;
        while (i < lines.length && !lines[i].trim().startsWith(closing)) {
          body.push(lines[i]);
          i += 1;
        }
        i += 1; // skip the closing fence (or the end of an unfinished stream)
        const pre = document.createElement("pre");
        const code = document.createElement("code");
        if (fence[2]) code.dataset.lang = fence[2];
        code.textContent = body.join("\n");
        pre.appendChild(code);
        parent.appendChild(pre);
        continue;
      }
      if (!line.trim()) {
        flushParagraph();
        i += 1;
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      if (heading) {
        flushParagraph();
        const level = Math.min(6, heading[1].length + 2);
        const h = document.createElement("h" + level);
        renderInline(h, heading[2].replace(/\s+#+\s*$/, ""));
        parent.appendChild(h);
        i += 1;
        continue;
      }
      if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
        flushParagraph();
        parent.appendChild(document.createElement("hr"));
        i += 1;
        continue;
      }
      if (/^\s*>/.test(line)) {
        flushParagraph();
        const quoted = [];
        while (i < lines.length && /^\s*>/.test(lines[i])) {
          quoted.push(lines[i].replace(/^\s*>\s?/, ""));
          i += 1;
        }
        const quote = document.createElement("blockquote");
        renderMarkdown(quote, quoted.join("\n"));
        parent.appendChild(quote);
        continue;
      }
      const item = line.match(/^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/);
      if (item) {
        flushParagraph();
        const ordered = /\d/.test(item[1]);
        const list = document.createElement(ordered ? "ol" : "ul");
        if (ordered) {
          const first = parseInt(item[1], 10);
          if (first !== 1) list.start = first;
        }
        while (i < lines.length) {
          const m = lines[i].match(/^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/);
          if (!m || /\d/.test(m[1]) !== ordered) break;
          const li = document.createElement("li");
          renderInline(li, m[2]);
          list.appendChild(li);
          i += 1;
        }
        parent.appendChild(list);
        continue;
      }
      paragraph.push(line);
      i += 1;
    }
    flushParagraph();
  }

  const INLINE =
    /(`+)([\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|(?<![\p{L}\p{N}_])__(?=\S)([\s\S]*?\S)__(?![\p{L}\p{N}_])|~~(?=\S)([\s\S]*?\S)~~|\*(?=[^\s*])([^*\n]*?[^\s*])\*|(?<![\p{L}\p{N}_])_(?=[^\s_])([^_\n]*?[^\s_])_(?![\p{L}\p{N}_])|\[([^\]\n]+)\]\(([^()\s]+)\)|(https?:\/\/[^\s<>()"']*[^\s<>()"'.,;:!?])/gu;

  /** Inline Markdown: code, bold, italic, strike-through and links; the rest is text. */
  function renderInline(parent, text) {
    let last = 0;
    INLINE.lastIndex = 0;
    const matches = [...text.matchAll(INLINE)];
    for (const m of matches) {
      if (m.index > last) appendText(parent, text.slice(last, m.index));
      last = m.index + m[0].length;
      if (m[2] !== undefined) {
        const code = document.createElement("code");
        code.textContent = m[2].trim() ? m[2].replace(/^ (.*) $/, "$1") : m[2];
        parent.appendChild(code);
      } else if (m[3] !== undefined || m[4] !== undefined) {
        const strong = document.createElement("strong");
        renderInline(strong, m[3] !== undefined ? m[3] : m[4]);
        parent.appendChild(strong);
      } else if (m[5] !== undefined) {
        const del = document.createElement("del");
        renderInline(del, m[5]);
        parent.appendChild(del);
      } else if (m[6] !== undefined || m[7] !== undefined) {
        const em = document.createElement("em");
        renderInline(em, m[6] !== undefined ? m[6] : m[7]);
        parent.appendChild(em);
      } else if (m[8] !== undefined) {
        appendLink(parent, m[8], m[9]);
      } else if (m[10] !== undefined) {
        appendLink(parent, m[10], m[10]);
      }
    }
    if (last < text.length) appendText(parent, text.slice(last));
  }

  /** A link only for http(s) and mailto URLs; anything else stays text. */
  function appendLink(parent, label, href) {
    let url = null;
    try {
      url = new URL(href, window.location.href);
    } catch (_) {
      url = null;
    }
    if (!url || !["http:", "https:", "mailto:"].includes(url.protocol)) {
      appendText(parent, label === href ? href : label + " (" + href + ")");
      return;
    }
    const a = document.createElement("a");
    a.href = url.href;
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
    a.textContent = label;
    parent.appendChild(a);
  }

  function appendText(parent, text) {
    const parts = text.split("\n");
    parts.forEach((part, index) => {
      if (index > 0) parent.appendChild(document.createElement("br"));
      if (part) parent.appendChild(document.createTextNode(part));
    });
  }

  // --- Messages --------------------------------------------------------------------------

  function clearMessages() {
    el.messages.replaceChildren(el.empty);
    el.empty.hidden = false;
  }

  /** Adds a message bubble; returns its parts for streaming updates. */
  function addBubble(role, text, options = {}) {
    el.empty.hidden = true;
    const wrap = document.createElement("div");
    wrap.className = "msg " + role;
    if (options.id) wrap.dataset.messageId = String(options.id);
    if (options.status) wrap.dataset.status = options.status;
    const content = document.createElement("div");
    content.className = "content";
    const notices = document.createElement("div");
    notices.className = "notices";
    const meta = document.createElement("div");
    meta.className = "meta";
    wrap.append(notices, content, meta);
    const bubble = { wrap, content, meta, notices, text: text || "" };
    renderBubbleText(bubble);
    el.messages.appendChild(wrap);
    return bubble;
  }

  function renderBubbleText(bubble) {
    if (bubble.wrap.classList.contains("assistant")) {
      renderMarkdown(bubble.content, bubble.text);
    } else {
      bubble.content.textContent = bubble.text;
    }
  }

  /** Writes the footer of an answer: tier, model, where it ran, status and numbers. */
  function setMeta(bubble, info) {
    bubble.meta.replaceChildren();
    const add = (text, cls) => {
      const span = document.createElement("span");
      span.textContent = text;
      if (cls) span.className = cls;
      bubble.meta.appendChild(span);
      return span;
    };
    if (info.tier || info.model) {
      const who = add([info.tier, info.model].filter(Boolean).join(" · "), "model");
      who.title = info.provider ? "provider: " + info.provider : "";
    }
    if (info.leftMachine) {
      add("☁ left this machine (" + (info.provider || "cloud") + ")", "left-machine");
    } else if (info.provider === "local") {
      add("on this machine", "local");
    }
    if (info.status === "partial") add("stopped before the end", "stopped");
    if (info.finish === "length") add("cut at the length limit", "stopped");
    if (info.status === "error") add("failed", "stopped");
    if (info.promptTokens != null) {
      bubble.wrap.dataset.promptTokens = String(info.promptTokens);
      add(info.promptTokens + " prompt tokens", "tokens");
    }
    if (info.completionTokens != null && info.completionTokens > 0) {
      add(info.completionTokens + " tokens", "tokens");
    }
    if (info.tokS) add(info.tokS + " tok/s", "speed");
  }

  function addNotice(bubble, text) {
    const notice = document.createElement("div");
    notice.className = "notice";
    notice.textContent = text;
    bubble.notices.appendChild(notice);
  }

  function addErrorText(bubble, text) {
    const p = document.createElement("div");
    p.className = "error-text";
    p.textContent = text;
    bubble.wrap.appendChild(p);
  }

  function scrollToEnd(force) {
    const box = el.messages;
    const nearEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 120;
    if (force || nearEnd) box.scrollTop = box.scrollHeight;
  }

  function showMessages(messages) {
    clearMessages();
    for (const m of messages) {
      const role = m.role === "user" || m.role === "assistant" ? m.role : "system";
      const bubble = addBubble(role, m.content, { id: m.id, status: m.status });
      if (role === "assistant") {
        bubble.wrap.dataset.state = m.status === "complete" ? "done" : m.status;
        setMeta(bubble, {
          tier: m.tier,
          model: m.model,
          provider: m.provider,
          leftMachine: m.left_machine,
          status: m.status,
          promptTokens: m.prompt_tokens || null,
          completionTokens: m.completion_tokens,
        });
      }
    }
    scrollToEnd(true);
  }

  // --- Conversations ---------------------------------------------------------------------

  async function loadConversations() {
    const data = await api("/api/conversations");
    state.conversations = data.conversations || [];
    renderConversationList();
    return state.conversations;
  }

  function conversationTitle(c) {
    return (c && c.title) || (c ? "Conversation " + c.id : "New chat");
  }

  function renderConversationList() {
    const items = state.conversations.map((c) => {
      const li = document.createElement("li");
      li.dataset.conversationId = String(c.id);
      if (state.current && state.current.id === c.id) li.className = "active";
      const button = document.createElement("button");
      button.type = "button";
      const title = document.createElement("span");
      title.className = "conv-title";
      title.textContent = conversationTitle(c);
      button.appendChild(title);
      if (c.channel !== "webchat") {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = c.channel;
        button.appendChild(badge);
      }
      if (c.left_machine) {
        const badge = document.createElement("span");
        badge.className = "badge cloud";
        badge.textContent = "☁";
        badge.title = "Part of this conversation was answered outside this machine";
        button.appendChild(badge);
      }
      button.addEventListener("click", () => {
        closeSidebar();
        openConversation(c.id).catch(reportError);
      });
      li.appendChild(button);
      return li;
    });
    el.list.replaceChildren(...items);
  }

  function renderHeader() {
    const c = state.current;
    el.title.textContent = conversationTitle(c);
    document.title = c ? conversationTitle(c) + " · my-claw" : "my-claw";
    el.actions.hidden = !c;
    const readOnly = c && c.channel !== "webchat";
    el.composerNote.hidden = !readOnly;
    el.composerNote.textContent = readOnly
      ? "This is a " + c.channel + " conversation: it is shown here, and answered on " + c.channel + "."
      : "";
    el.input.disabled = Boolean(readOnly);
    updateComposer();
  }

  async function openConversation(id) {
    if (state.streaming) return;
    const data = await api("/api/conversations/" + encodeURIComponent(id) + "/messages");
    state.current = data.conversation;
    setHash(state.current.id);
    renderHeader();
    renderConversationList();
    showMessages(data.messages || []);
  }

  function newChat() {
    if (state.streaming) return;
    state.current = null;
    setHash(null);
    renderHeader();
    renderConversationList();
    clearMessages();
    closeSidebar();
    el.input.focus();
  }

  async function renameCurrent() {
    const c = state.current;
    if (!c) return;
    const title = window.prompt("New name for this conversation", conversationTitle(c));
    if (title === null || !title.trim()) return;
    const updated = await api("/api/conversations/" + c.id, { method: "PATCH", body: { title } });
    state.current = { ...c, ...updated };
    renderHeader();
    await loadConversations();
  }

  async function deleteCurrent() {
    const c = state.current;
    if (!c) return;
    if (!window.confirm("Delete “" + conversationTitle(c) + "” and all its messages?")) return;
    await api("/api/conversations/" + c.id, { method: "DELETE" });
    newChat();
    await loadConversations();
  }

  function setHash(id) {
    const hash = id ? "#c=" + id : "";
    if (window.location.hash !== hash) {
      window.history.replaceState(null, "", window.location.pathname + window.location.search + hash);
    }
  }

  function hashConversationId() {
    const m = window.location.hash.match(/^#c=(\d+)$/);
    return m ? Number(m[1]) : null;
  }

  // --- Models ----------------------------------------------------------------------------

  async function loadModels() {
    const data = await api("/api/models");
    state.tiers = data.tiers || [];
    state.defaultTier = data.default_tier || null;
    let saved = null;
    try {
      saved = window.localStorage.getItem(TIER_KEY);
    } catch (_) {
      saved = null;
    }
    const options = state.tiers.map((t) => {
      const option = document.createElement("option");
      option.value = t.tier;
      let label = t.tier;
      if (t.model) label += " · " + t.model;
      if (t.leaves_machine) label += " (cloud)";
      if (!t.available) {
        label += " — unavailable";
        option.disabled = true;
      } else if (t.fallback_to) {
        label += " → " + t.fallback_to;
      }
      option.textContent = label;
      option.title = t.detail || "";
      return option;
    });
    el.model.replaceChildren(...options);
    const usable = state.tiers.filter((t) => t.available).map((t) => t.tier);
    el.model.value = usable.includes(saved) ? saved : usable.includes(state.defaultTier) ? state.defaultTier : usable[0] || "";
    if (usable.length === 0) showBanner("No model is available: check MODEL_* settings and /api/health.");
  }

  function selectedTier() {
    return el.model.value || null;
  }

  // --- Sending and streaming ---------------------------------------------------------------

  function updateComposer() {
    const busy = Boolean(state.streaming);
    el.send.hidden = busy;
    el.stop.hidden = !busy;
    el.send.disabled = el.input.disabled || !el.input.value.trim();
  }

  function autoGrow() {
    el.input.style.height = "auto";
    el.input.style.height = Math.min(el.input.scrollHeight + 2, window.innerHeight * 0.4) + "px";
  }

  async function sendMessage() {
    const text = el.input.value;
    if (!text.trim() || state.streaming || el.input.disabled) return;
    el.input.value = "";
    autoGrow();
    const conversationId = state.current ? state.current.id : null;
    addBubble("user", text);
    const bubble = addBubble("assistant", "");
    bubble.wrap.dataset.state = "waiting";
    scrollToEnd(true);
    const controller = new AbortController();
    const run = { controller, conversationId, bubble, stopRequested: false, meta: null };
    state.streaming = run;
    updateComposer();
    try {
      const body = { message: text };
      if (conversationId) body.conversation_id = conversationId;
      const tier = selectedTier();
      if (tier) body.tier = tier;
      const response = await rawFetch("/api/chat", {
        method: "POST",
        body,
        signal: controller.signal,
        headers: { Accept: "text/event-stream" },
      });
      bubble.wrap.dataset.state = "streaming";
      let ended = false;
      let frame = 0;
      for await (const data of sseData(response)) {
        let event;
        try {
          event = JSON.parse(data);
        } catch (_) {
          continue;
        }
        if (event.type === "meta") {
          run.meta = event;
          run.conversationId = event.conversation_id;
          if (!state.current || state.current.id !== event.conversation_id) {
            state.current = { id: event.conversation_id, channel: "webchat", title: text.split("\n")[0].slice(0, 60) };
            setHash(event.conversation_id);
            renderHeader();
            loadConversations().catch(() => {});
          }
          setMeta(bubble, {
            tier: event.tier,
            model: event.model,
            provider: event.provider,
            leftMachine: event.leaves_machine,
          });
          if (run.stopRequested) requestStop(run);
        } else if (event.type === "token") {
          bubble.text += event.text;
          // Re-render at most once a frame: tokens can arrive faster than paint.
          if (!frame) {
            frame = window.requestAnimationFrame(() => {
              frame = 0;
              renderBubbleText(bubble);
              scrollToEnd(false);
            });
          }
        } else if (event.type === "notice") {
          addNotice(bubble, event.message);
        } else if (event.type === "done") {
          ended = true;
          if (frame) window.cancelAnimationFrame(frame);
          frame = 0;
          renderBubbleText(bubble);
          const stopped = event.finish === "cancelled";
          bubble.wrap.dataset.state = stopped ? "stopped" : "done";
          bubble.wrap.dataset.messageId = String(event.message_id);
          const m = run.meta || {};
          setMeta(bubble, {
            tier: m.tier,
            model: m.model,
            provider: m.provider,
            leftMachine: m.leaves_machine,
            status: stopped ? "partial" : "complete",
            promptTokens: event.usage.prompt_tokens || null,
            completionTokens: event.usage.completion_tokens,
            tokS: event.timings.decode_tok_s || null,
            finish: event.finish,
          });
        } else if (event.type === "error") {
          ended = true;
          renderBubbleText(bubble);
          bubble.wrap.dataset.state = "error";
          addErrorText(bubble, "Error: " + event.message);
        }
        scrollToEnd(false);
      }
      if (!ended) {
        renderBubbleText(bubble);
        bubble.wrap.dataset.state = run.stopRequested ? "stopped" : "error";
        if (!run.stopRequested) addErrorText(bubble, "The connection closed before the answer was complete.");
      }
    } catch (err) {
      renderBubbleText(bubble);
      if (err && err.name === "AbortError") {
        bubble.wrap.dataset.state = "stopped";
        addErrorText(bubble, "Stopped.");
      } else {
        bubble.wrap.dataset.state = "error";
        addErrorText(bubble, describeError(err));
        if (err instanceof ApiFailure && err.status === 404 && conversationId) {
          addErrorText(bubble, "This conversation no longer exists; start a new chat.");
        }
      }
    } finally {
      state.streaming = null;
      updateComposer();
      loadConversations().catch(() => {});
      if (!el.input.disabled) el.input.focus();
    }
  }

  /** Stops the running answer: through the API once the conversation is known, else by
   * dropping the connection (the server stops the engine when the client leaves). */
  function requestStop(run) {
    run.stopRequested = true;
    if (run.meta && run.conversationId) {
      api("/api/chat/" + run.conversationId + "/stop", { method: "POST" })
        .catch(() => run.controller.abort());
      // If the stream has not ended shortly after, leave it.
      window.setTimeout(() => {
        if (state.streaming === run) run.controller.abort();
      }, 4000);
    } else {
      run.controller.abort();
    }
  }

  // --- Live updates (messages stored by cron jobs, other channels, other tabs) ----------------

  let refreshTimer = 0;

  function scheduleRefresh(conversationId) {
    window.clearTimeout(refreshTimer);
    refreshTimer = window.setTimeout(async () => {
      try {
        await loadConversations();
        if (!state.streaming && state.current && (conversationId === null || state.current.id === conversationId)) {
          await openConversation(state.current.id);
        }
      } catch (_) {
        /* the next event or a reload will try again */
      }
    }, 250);
  }

  async function followEvents() {
    let delay = 1000;
    for (;;) {
      const controller = new AbortController();
      state.eventsController = controller;
      try {
        const response = await rawFetch("/api/events", {
          signal: controller.signal,
          headers: { Accept: "text/event-stream" },
        });
        for await (const data of sseData(response)) {
          let event;
          try {
            event = JSON.parse(data);
          } catch (_) {
            continue;
          }
          if (event.type === "ready") {
            setConnection("live");
            hideBanner(true);
            delay = 1000;
          } else if (event.type === "message") {
            const own = state.streaming && state.streaming.conversationId === event.conversation_id;
            if (!own) scheduleRefresh(event.conversation_id);
          } else if (event.type === "resync") {
            scheduleRefresh(null);
          }
        }
        setConnection("down");
      } catch (err) {
        if (err instanceof AuthError) {
          state.started = false; // start() follows again after sign-in
          return;
        }
        setConnection("down");
      }
      await new Promise((resolve) => window.setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 30000);
    }
  }

  // --- Persona ---------------------------------------------------------------------------

  async function loadPersona() {
    el.personaStatus.textContent = "Loading…";
    const p = await api("/api/settings/persona");
    state.personaDefaults = { name: p.default_persona_name, prompt: p.default_system_prompt };
    el.personaName.value = p.persona_name;
    el.personaPrompt.value = p.system_prompt;
    el.personaStatus.textContent = "";
  }

  async function savePersona() {
    el.personaStatus.textContent = "Saving…";
    const p = await api("/api/settings/persona", {
      method: "PUT",
      body: { persona_name: el.personaName.value, system_prompt: el.personaPrompt.value },
    });
    el.personaName.value = p.persona_name;
    el.personaPrompt.value = p.system_prompt;
    el.personaStatus.textContent = "Saved: used from the next message on.";
  }

  function togglePanel(panel, button, open) {
    const show = open === undefined ? panel.hidden : open;
    panel.hidden = !show;
    button.setAttribute("aria-expanded", String(show));
    window.dispatchEvent(new CustomEvent("myclaw:panel", { detail: { id: panel.id, open: show } }));
    return show;
  }

  // --- Layout ----------------------------------------------------------------------------

  function openSidebar() {
    el.app.classList.add("sidebar-open");
    el.scrim.hidden = false;
  }

  function closeSidebar() {
    el.app.classList.remove("sidebar-open");
    el.scrim.hidden = true;
  }

  function reportError(err) {
    if (err instanceof AuthError || err instanceof NetworkError) return;
    showBanner(describeError(err));
  }

  // --- Start -------------------------------------------------------------------------------

  async function start() {
    if (!state.token) {
      askToken();
      return;
    }
    try {
      await loadModels();
    } catch (err) {
      reportError(err);
      return;
    }
    el.tokenDialog.hidden = true;
    try {
      await loadConversations();
      const wanted = hashConversationId();
      const first = state.conversations.find((c) => c.channel === "webchat");
      if (wanted && state.conversations.some((c) => c.id === wanted)) {
        await openConversation(wanted);
      } else if (!state.current && first) {
        await openConversation(first.id);
      } else {
        renderHeader();
      }
    } catch (err) {
      reportError(err);
    }
    if (!state.started) {
      state.started = true;
      followEvents();
    }
    document.documentElement.dataset.ready = "true";
  }

  function bind() {
    el.tokenForm.addEventListener("submit", (e) => {
      e.preventDefault();
      const token = el.tokenInput.value.trim();
      if (!token) return;
      saveToken(token);
      el.tokenDialog.hidden = true;
      start();
    });
    el.composer.addEventListener("submit", (e) => {
      e.preventDefault();
      sendMessage();
    });
    el.input.addEventListener("keydown", (e) => {
      // Enter sends; Shift+Enter (and Enter while composing with an IME) makes a new line.
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        sendMessage();
      }
    });
    el.input.addEventListener("input", () => {
      autoGrow();
      updateComposer();
    });
    el.stop.addEventListener("click", () => {
      if (state.streaming) requestStop(state.streaming);
    });
    el.newChat.addEventListener("click", newChat);
    el.rename.addEventListener("click", () => renameCurrent().catch(reportError));
    el.del.addEventListener("click", () => deleteCurrent().catch(reportError));
    el.model.addEventListener("change", () => {
      try {
        window.localStorage.setItem(TIER_KEY, el.model.value);
      } catch (_) {
        /* not remembered */
      }
    });
    el.openSidebar.addEventListener("click", openSidebar);
    el.closeSidebar.addEventListener("click", closeSidebar);
    el.scrim.addEventListener("click", closeSidebar);
    el.togglePersona.addEventListener("click", () => {
      if (togglePanel(el.personaPanel, el.togglePersona)) {
        closeSidebar();
        loadPersona().catch((err) => {
          el.personaStatus.textContent = describeError(err);
        });
      }
    });
    el.personaClose.addEventListener("click", () => togglePanel(el.personaPanel, el.togglePersona, false));
    el.personaForm.addEventListener("submit", (e) => {
      e.preventDefault();
      savePersona().catch((err) => {
        el.personaStatus.textContent = describeError(err);
      });
    });
    el.personaReset.addEventListener("click", () => {
      if (!state.personaDefaults) return;
      el.personaName.value = state.personaDefaults.name;
      el.personaPrompt.value = state.personaDefaults.prompt;
      el.personaStatus.textContent = "Defaults filled in: press Save to use them.";
    });
    el.toggleCron.addEventListener("click", () => {
      if (togglePanel(el.cronPanel, el.toggleCron)) closeSidebar();
    });
    el.signOut.addEventListener("click", () => {
      forgetToken();
      if (state.eventsController) state.eventsController.abort();
      window.location.reload();
    });
  }

  window.myClaw = {
    api,
    conversations: () => state.conversations.slice(),
    currentConversationId: () => (state.current ? state.current.id : null),
    openConversation: (id) => openConversation(id).catch(reportError),
    refreshConversations: () => loadConversations().catch(reportError),
    showError: (text) => showBanner(text),
    // Exposed for the browser test, which checks that hostile text stays text.
    renderMarkdown,
  };

  adoptTokenFromUrl();
  loadToken();
  bind();
  updateComposer();
  start();
})();
