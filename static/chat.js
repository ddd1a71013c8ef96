// my-claw WebChat. Plain browser JavaScript, no build step; one vendored library
// (static/vendor/markdown-it.min.js, loaded before this file) parses Markdown.
//
// Security rule of this file: model output (and anything else from the server) is untrusted
// and only ever reaches the page through textContent and DOM nodes built here from the
// parser's tokens; innerHTML is never used. The server's Content-Security-Policy forbids inline scripts as a second wall.
//
// Other scripts (cron.js) can use `window.myClaw`: `api(path, options)`, `conversations()`,
// `currentConversationId()`, `openConversation(id)`, `refreshConversations()`,
// `showError(text)`, and `renderMarkdown(element, text)` (the safe renderer).

"use strict";

(() => {
  const TOKEN_KEY = "my-claw.token";
  const TIER_KEY = "my-claw.tier";
  /** What was typed and not sent, per conversation: this prefix and its id, or `new`. */
  const DRAFT_KEY = "my-claw.draft.";
  /** The server's limit on one message (config::MAX_MESSAGE_CHARS), in characters. */
  const MAX_MESSAGE_CHARS = 16000;
  /** The character counter shows from this length on. */
  const COUNT_FROM = 14000;

  const $ = (id) => document.getElementById(id);
  const el = {
    app: $("app"),
    main: $("main"),
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
    bannerClose: $("banner-close"),
    messages: $("messages"),
    jumpLatest: $("jump-latest"),
    empty: $("empty"),
    emptyDeleted: $("empty-deleted"),
    announcer: $("announcer"),
    skipLink: $("skip-link"),
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
    editNote: $("edit-note"),
    busyNote: $("busy-note"),
    inputCount: $("input-count"),
    menuButton: $("chat-menu-button"),
    exportMd: $("export-md"),
    exportJson: $("export-json"),
    exportAll: $("export-all"),
    importButton: $("import"),
    importFile: $("import-file"),
    searchForm: $("search-form"),
    searchInput: $("search-input"),
    searchPanel: $("search-panel"),
    searchStatus: $("search-status"),
    searchResults: $("search-results"),
  };

  const state = {
    token: null,
    /** Why a sign-in link did not sign in, said by the sign-in dialog. */
    signInProblem: null,
    conversations: [],
    current: null, // the open conversation object, or null for a new chat
    // The answer the open view shows as it is written: { controller, conversationId, bubble,
    // stopRequested, meta, kind, accepted, detached }. Only ever the open conversation's:
    // leaving it stops reading it (`leaveAnswer`), so any other conversation can send.
    streaming: null,
    following: null, // { conversationId, controller } while `/live` is asked (`followLive`)
    editing: null, // { wrap, draft, messageId } while the last user message is being edited
    reloadOnReconnect: false, // an answer lost its connection: show the stored state once back
    dropLost: false, // the next reload, once back, also drops answers that were never stored
    tiers: [],
    defaultTier: null,
    personaDefaults: null,
    personaSaved: null, // the persona as stored, to tell unsaved changes
    eventsController: null,
    started: false,
    deletedIds: new Set(), // conversations the live events said were deleted
    deletedWaiters: [], // { id, resolve } waiting to learn whether a conversation was deleted
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

  /**
   * Takes `?token=` from the address bar into storage, and removes it from the URL. A link
   * can come from anywhere (model output, a message from someone else): it replaces a stored
   * token only when the server accepts it, so a bad link cannot sign the user out. With no
   * stored token (the first-start sign-in link) it is kept as is, and checked by `start`.
   */
  async function adoptTokenFromUrl() {
    const url = new URL(window.location.href);
    const raw = url.searchParams.get("token");
    if (raw === null) return;
    url.searchParams.delete("token");
    window.history.replaceState(null, "", url.pathname + url.search + url.hash);
    const token = raw.trim();
    if (!token) return;
    loadToken();
    if (!state.token || state.token === token) {
      saveToken(token);
    } else if (await tokenAccepted(token)) {
      saveToken(token);
    } else {
      showBanner("The token in that link was refused; you are still signed in with yours.");
    }
  }

  /**
   * Takes `?code=` (a one-time sign-in link: `my-claw` prints one at start on a terminal,
   * `my-claw sign-in-link` makes more) from the address bar, removes it, and exchanges it
   * for the token. The link stays in the browser's history, but the code in it is spent. A
   * code that was used or has expired leaves the page as it was, saying so.
   */
  async function adoptSignInCode() {
    const url = new URL(window.location.href);
    const raw = url.searchParams.get("code");
    if (raw === null) return;
    url.searchParams.delete("code");
    window.history.replaceState(null, "", url.pathname + url.search + url.hash);
    const code = raw.trim();
    if (!code) return;
    let problem = null;
    try {
      const response = await fetch("/api/sign-in", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ code }),
        cache: "no-store",
      });
      if (response.ok) {
        const body = await response.json();
        if (typeof body.token === "string" && body.token) {
          saveToken(body.token);
          return;
        }
      }
      problem =
        response.status === 401
          ? "That sign-in link was already used or has expired (a link works once, for 10 minutes)."
          : "That sign-in link could not be used (the server answered " + response.status + ").";
    } catch (_) {
      problem = "That sign-in link could not be used: the server did not answer.";
    }
    loadToken();
    if (state.token) {
      showBanner(problem + " You are still signed in.");
    } else {
      state.signInProblem = problem + " Enter the WebChat token, or make a new link with `my-claw sign-in-link`.";
    }
  }

  async function tokenAccepted(token) {
    try {
      const response = await fetch("/api/models", {
        headers: { Authorization: "Bearer " + token },
        cache: "no-store",
      });
      return response.ok;
    } catch (_) {
      return false;
    }
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
    // A modal dialog: the page behind it can be neither focused nor clicked.
    el.app.inert = true;
    el.tokenInput.value = "";
    el.tokenInput.focus();
  }

  /** Closes the sign-in dialog; the message box gets the focus when it was open. */
  function closeTokenDialog() {
    const wasOpen = !el.tokenDialog.hidden;
    el.tokenDialog.hidden = true;
    el.app.inert = false;
    if (wasOpen && !el.input.disabled) el.input.focus();
  }

  /** Tab and Shift+Tab cycle inside the open sign-in dialog. */
  function trapDialogFocus(e) {
    if (e.key !== "Tab" || el.tokenDialog.hidden) return;
    const focusable = [...el.tokenDialog.querySelectorAll("input, button")].filter((n) => !n.disabled);
    if (!focusable.length) return;
    const first = focusable[0];
    const last = focusable[focusable.length - 1];
    const inside = el.tokenDialog.contains(document.activeElement);
    if (e.shiftKey && (document.activeElement === first || !inside)) {
      e.preventDefault();
      last.focus();
    } else if (!e.shiftKey && (document.activeElement === last || !inside)) {
      e.preventDefault();
      first.focus();
    }
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

  /** The JSON objects of an SSE response's `data:` payloads; one that is not JSON is skipped. */
  async function* sseEvents(response) {
    for await (const data of sseData(response)) {
      let event;
      try {
        event = JSON.parse(data);
      } catch (_) {
        continue;
      }
      yield event;
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

  /** Hides the banner; `onlyNetwork` keeps other messages until they are dismissed (with
   * its close button) or the user moves on (`hideMessageBanner`). */
  function hideBanner(onlyNetwork) {
    if (onlyNetwork && !bannerIsNetwork) return;
    el.banner.hidden = true;
  }

  /** Hides a message about something the user did: called when they move on (open another
   * conversation, send). A "cannot reach the server" banner stays until it is reachable. */
  function hideMessageBanner() {
    if (!bannerIsNetwork) el.banner.hidden = true;
  }

  function setConnection(kind) {
    const text =
      kind === "live" ? "Connected: live updates on" : kind === "down" ? "Server unreachable" : "Connecting…";
    if (el.connection.dataset.state === kind && el.connection.title === text) return;
    el.connection.dataset.state = kind;
    el.connection.title = text;
    el.connection.setAttribute("aria-label", text);
    el.connection.textContent = text;
  }

  function retryAll() {
    hideBanner();
    start();
  }

  // --- Safe Markdown -----------------------------------------------------------------------
  //
  // markdown-it (vendored, CommonMark + GFM tables and strikethrough) parses; this file turns
  // its tokens into DOM nodes with an allow-list of tags, so no HTML string from the model is
  // ever interpreted. `html: false` keeps raw HTML as text, links are kept only for http,
  // https and mailto, and deep nesting is capped (quotes at MAX_QUOTE_DEPTH, anything else at
  // markdown-it's MAX_NESTING) instead of overflowing the stack.

  const MAX_NESTING = 40;
  const SAFE_PROTOCOLS = ["http:", "https:", "mailto:"];
  /** Block and inline tags the renderer may create; anything else becomes a <span>. */
  const ALLOWED_TAGS = new Set([
    "p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "ul", "ol", "li", "table", "thead",
    "tbody", "tr", "th", "td", "strong", "em", "s", "a", "hr", "br", "pre", "code", "span",
  ]);

  /** Blocks whose direction follows their first strong character (`dir="auto"`). */
  const TEXT_BLOCKS = new Set(["p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "li", "th", "td"]);

  const markdown = createParser();

  function createParser() {
    if (typeof window.markdownit !== "function") return null;
    const md = window.markdownit({
      html: false,
      linkify: true,
      breaks: true,
      typographer: false,
      maxNesting: MAX_NESTING,
    });
    md.validateLink = (url) => safeUrl(url) !== null;
    md.core.ruler.after("inline", "task_lists", markTaskLists);
    return md;
  }

  /** The URL if it is http(s) or mailto, else null. */
  function safeUrl(href) {
    let url;
    try {
      url = new URL(String(href).trim(), window.location.href);
    } catch (_) {
      return null;
    }
    return SAFE_PROTOCOLS.includes(url.protocol) ? url : null;
  }

  /** A safe URL that leaves this page's origin, else null. Model output has no business
   * linking into the app itself (a `/?token=…` link would try to swap the sign-in token): such
   * a link shows as its text. */
  function outsideUrl(href) {
    const url = safeUrl(href);
    return url && url.origin !== window.location.origin ? url : null;
  }

  /** GFM task lists: a list item whose text starts with `[ ]` or `[x]` gets a disabled
   * checkbox. Done on the token stream (no HTML is produced), unlike the usual plugin. */
  function markTaskLists(state) {
    const tokens = state.tokens;
    for (let i = 2; i < tokens.length; i += 1) {
      const inline = tokens[i];
      if (inline.type !== "inline" || tokens[i - 1].type !== "paragraph_open") continue;
      if (tokens[i - 2].type !== "list_item_open") continue;
      const m = /^\[([ xX])\](?:[ \t]+|$)/.exec(inline.content);
      const first = inline.children && inline.children[0];
      if (!m || !first || first.type !== "text" || !first.content.startsWith(m[0])) continue;
      first.content = first.content.slice(m[0].length);
      tokens[i - 2].meta = { ...(tokens[i - 2].meta || {}), task: m[1] !== " " };
    }
  }

  /**
   * Renders Markdown into `parent`. Top-level blocks whose source did not change keep their
   * DOM nodes, so while an answer streams only the last block is rebuilt; `final` (the
   * answer ended) rebuilds them all. Any failure falls back to plain text for this message
   * only.
   */
  function renderMarkdown(parent, text, final) {
    try {
      if (!markdown) throw new Error("the Markdown parser did not load");
      renderBlocks(parent, String(text), Boolean(final));
      parent.classList.remove("render-failed");
    } catch (err) {
      parent.__mdBlocks = null;
      parent.replaceChildren(document.createTextNode(String(text)));
      parent.classList.add("render-failed");
      if (window.console) console.warn("my-claw: Markdown rendering failed:", err);
    }
  }

  /** Quote markers beyond this depth are dropped (their text is kept): deeper quoting says
   * nothing to a reader, and markdown-it would drop the text past its nesting cap. */
  const MAX_QUOTE_DEPTH = 16;
  const DEEP_QUOTES = new RegExp("^((?: {0,3}> ?){" + MAX_QUOTE_DEPTH + "})(?: {0,3}> ?)+", "gm");

  function renderBlocks(parent, source, final) {
    const text = source.replace(DEEP_QUOTES, "$1");
    const env = {};
    const tokens = markdown.parse(text, env);
    // A reference definition (`[d]: https://…`) changes blocks above it whose source did
    // not change (`[the docs][d]` becomes a link): when the definitions change, nothing is
    // reused.
    const references = JSON.stringify(env.references || {});
    const lines = text.split("\n");
    const blocks = splitBlocks(tokens).map((group) => {
      const map = group[0].map;
      const source = map ? lines.slice(map[0], map[1]).join("\n") : "";
      return { key: group[0].type + "\u0000" + source, tokens: group, nodes: null };
    });
    const kept = parent.__mdBlocks && parent.__mdBlocks.owner === parent ? parent.__mdBlocks : null;
    const previous = kept && !final && kept.references === references ? kept.list : [];
    // Reuse only while the prefix is identical: a changed block can change the meaning of
    // nothing after it, but positions shift, so compare index by index.
    let same = 0;
    while (same < blocks.length && same < previous.length && previous[same].key === blocks[same].key) {
      blocks[same].nodes = previous[same].nodes;
      same += 1;
    }
    if (kept) for (const old of kept.list.slice(same)) for (const node of old.nodes) node.remove();
    for (const block of blocks.slice(same)) {
      const fragment = document.createDocumentFragment();
      renderTokens(fragment, block.tokens);
      block.nodes = [...fragment.childNodes];
      parent.appendChild(fragment);
    }
    // Nodes that are not ours (a previous plain-text fallback) go.
    const ours = new Set(blocks.flatMap((b) => b.nodes));
    for (const child of [...parent.childNodes]) if (!ours.has(child)) child.remove();
    parent.__mdBlocks = { owner: parent, list: blocks, references };
  }

  /** Groups the token stream into top-level blocks (level 0 open … close). */
  function splitBlocks(tokens) {
    const groups = [];
    let current = null;
    let depth = 0;
    for (const token of tokens) {
      if (depth === 0) {
        current = [];
        groups.push(current);
      }
      current.push(token);
      depth += token.nesting;
      if (depth < 0) depth = 0;
    }
    return groups;
  }

  /** Builds DOM nodes from block tokens without recursion over block depth. */
  function renderTokens(root, tokens) {
    const stack = [root];
    for (const token of tokens) {
      const top = stack[stack.length - 1];
      if (token.nesting === 1) {
        // Paragraphs of tight lists are hidden: their content goes straight into the <li>.
        const node = token.hidden ? top : openElement(token);
        if (token.type === "table_open") {
          // Wide tables scroll inside the bubble instead of widening the page.
          const wrap = document.createElement("div");
          wrap.className = "table-wrap";
          wrap.appendChild(node);
          top.appendChild(wrap);
        } else if (node !== top) {
          top.appendChild(node);
        }
        stack.push(node);
      } else if (token.nesting === -1) {
        if (stack.length > 1) stack.pop();
      } else if (token.type === "inline") {
        renderTokens(top, token.children || []);
      } else {
        renderLeaf(top, token);
      }
    }
  }

  function openElement(token) {
    if (token.type === "link_open") {
      const url = outsideUrl(token.attrGet("href"));
      if (!url) return document.createElement("span");
      const a = document.createElement("a");
      a.href = url.href;
      a.target = "_blank";
      a.rel = "noopener noreferrer nofollow";
      return a;
    }
    let tag = ALLOWED_TAGS.has(token.tag) ? token.tag : "span";
    // An answer's headings sit under the page's own (h1: the conversation; h2: the panels):
    // # becomes h3, ## h4 and so on, capped at h6. The class keeps the look of its level.
    const heading = /^h([1-6])$/.exec(tag);
    if (heading) tag = "h" + Math.min(6, Number(heading[1]) + 2);
    const node = document.createElement(tag);
    if (heading) node.className = "md-h" + heading[1];
    // Each block takes the direction of its own text: an Arabic or Hebrew paragraph aligns
    // right inside an English answer.
    if (TEXT_BLOCKS.has(tag)) node.dir = "auto";
    if (token.type === "ordered_list_open") {
      const start = token.attrGet("start");
      if (start !== null && Number.isInteger(Number(start))) node.start = Number(start);
    } else if (token.type === "th_open" || token.type === "td_open") {
      // Alignment comes as a style attribute, which the CSP forbids: use a class.
      const align = /text-align:(left|right|center)/.exec(token.attrGet("style") || "");
      if (align) node.className = "align-" + align[1];
    } else if (token.type === "list_item_open" && token.meta && token.meta.task !== undefined) {
      node.className = "task";
      const box = document.createElement("input");
      box.type = "checkbox";
      box.disabled = true;
      box.checked = token.meta.task;
      node.appendChild(box);
    }
    return node;
  }

  function renderLeaf(parent, token) {
    switch (token.type) {
      case "text":
        parent.appendChild(document.createTextNode(token.content));
        break;
      case "code_inline": {
        const code = document.createElement("code");
        code.textContent = token.content;
        parent.appendChild(code);
        break;
      }
      case "softbreak":
      case "hardbreak":
        parent.appendChild(document.createElement("br"));
        break;
      case "fence":
      case "code_block":
        parent.appendChild(codeBlock(token.content, (token.info || "").trim().split(/\s+/)[0]));
        break;
      case "hr":
        parent.appendChild(document.createElement("hr"));
        break;
      case "image": {
        // Images are not loaded (privacy: a remote image tells its server you read this);
        // a safe source becomes a link with the alt text.
        const alt = token.content || "image";
        const url = outsideUrl(token.attrGet("src"));
        if (url && url.protocol !== "mailto:") {
          const a = document.createElement("a");
          a.href = url.href;
          a.target = "_blank";
          a.rel = "noopener noreferrer nofollow";
          a.textContent = "🖼 " + alt;
          parent.appendChild(a);
        } else {
          parent.appendChild(document.createTextNode(alt));
        }
        break;
      }
      default:
        // html_inline / html_block (not produced with html: false) and anything unknown:
        // shown as the text it is.
        if (token.content) parent.appendChild(document.createTextNode(token.content));
    }
  }

  /** A fenced code block: language label, copy button, and the code as text. */
  function codeBlock(content, language) {
    const wrap = document.createElement("div");
    wrap.className = "code-block";
    const head = document.createElement("div");
    head.className = "code-head";
    const label = document.createElement("span");
    label.className = "code-lang";
    label.textContent = language || "text";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "btn small copy-code";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", "Copy code");
    const source = content.replace(/\n$/, "");
    copy.addEventListener("click", () => copyToClipboard(source, copy));
    head.append(label, copy);
    const pre = document.createElement("pre");
    const code = document.createElement("code");
    if (language) code.dataset.lang = language;
    code.textContent = source;
    pre.appendChild(code);
    wrap.append(head, pre);
    return wrap;
  }

  /** Copies text; shows the outcome on `button`. The Clipboard API needs a secure context
   * (https or localhost); elsewhere the old selection-based copy is used. */
  async function copyToClipboard(text, button) {
    let ok = false;
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(text);
        ok = true;
      }
    } catch (_) {
      ok = false;
    }
    if (!ok) {
      const area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.className = "copy-buffer";
      document.body.appendChild(area);
      area.select();
      try {
        ok = document.execCommand("copy");
      } catch (_) {
        ok = false;
      }
      area.remove();
    }
    if (button) {
      const label = button.dataset.label || button.textContent;
      const name = button.dataset.name || button.getAttribute("aria-label") || "";
      button.dataset.label = label;
      button.dataset.name = name;
      button.textContent = ok ? "Copied" : "Copy failed";
      // The accessible name says the outcome too ("Copy message" would hide it).
      if (name) button.setAttribute("aria-label", button.textContent);
      button.dataset.copied = ok ? "true" : "false";
      window.setTimeout(() => {
        button.textContent = label;
        if (name) button.setAttribute("aria-label", name);
      }, 1500);
    }
    return ok;
  }

  // --- Messages --------------------------------------------------------------------------

  function clearMessages() {
    el.messages.replaceChildren(el.empty);
    el.empty.hidden = false;
    el.emptyDeleted.hidden = true;
  }

  /** Adds a message bubble; returns its parts for streaming updates. */
  function addBubble(role, text, options = {}) {
    el.empty.hidden = true;
    const wrap = document.createElement("div");
    wrap.className = "msg " + role;
    // Who wrote it, for screen readers: the bubbles' look says it to the eye.
    const author = document.createElement("span");
    author.className = "visually-hidden author";
    author.textContent = role === "user" ? "You said:" : role === "assistant" ? "Assistant said:" : "Note:";
    if (options.id) wrap.dataset.messageId = String(options.id);
    if (options.status) wrap.dataset.status = options.status;
    const content = document.createElement("div");
    content.className = "content";
    // A user's message (plain text) takes the direction of its own text.
    if (role === "user") content.dir = "auto";
    const notices = document.createElement("div");
    notices.className = "notices";
    const meta = document.createElement("div");
    meta.className = "meta";
    const wait = document.createElement("div");
    wait.className = "wait";
    wait.setAttribute("role", "status");
    const actions = document.createElement("div");
    actions.className = "msg-actions";
    const tools = document.createElement("div");
    tools.className = "tools";
    const bubble = { wrap, content, meta, notices, wait, tools, actions, text: text || "" };
    wrap.__bubble = bubble;
    const copy = actionButton("Copy", "act-copy", (button) => copyToClipboard(bubble.text, button));
    copy.setAttribute("aria-label", "Copy message");
    actions.appendChild(copy);
    if (role === "assistant") {
      actions.appendChild(actionButton("Regenerate", "act-regenerate", () => regenerateLast().catch(reportError)));
    } else if (role === "user") {
      actions.appendChild(actionButton("Edit", "act-edit", () => startEdit()));
      // The last stored message is this one and no answer follows it (the answer failed,
      // or the connection was lost before it was stored): answer it again.
      actions.appendChild(actionButton("Answer", "act-answer", () => regenerateFrom(wrap).catch(reportError)));
    }
    wrap.append(author, notices, wait, tools, content, meta, actions);
    renderBubbleText(bubble);
    el.messages.appendChild(wrap);
    return bubble;
  }

  function actionButton(label, cls, onClick) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "btn small ghost " + cls;
    button.textContent = label;
    button.addEventListener("click", () => onClick(button));
    return button;
  }

  /** Marks the last stored user message and the last stored answer after it: only they can
   * be edited or regenerated, and only in a WebChat conversation with no answer running. A
   * bubble the server never stored has no message id, so it gets neither action (they would
   * change the stored exchange before it): its own Retry puts it right. The server checks
   * the ids again (409 when the conversation moved on meanwhile). */
  function updateMessageActions() {
    const editable = Boolean(state.current && state.current.channel === "webchat" && !state.streaming);
    el.messages.classList.toggle("actions-enabled", editable);
    const wraps = [...el.messages.querySelectorAll(".msg")];
    for (const w of wraps) w.classList.remove("last-user", "last-answer", "unanswered");
    const stored = wraps.filter((w) => w.dataset.messageId);
    const last = stored[stored.length - 1];
    const users = stored.filter((w) => w.classList.contains("user"));
    const lastUser = users[users.length - 1];
    if (!lastUser) return;
    lastUser.classList.add("last-user");
    // The answer is what a model wrote after the last user message; a reminder posted there
    // is not part of it (Regenerate keeps it), so it never carries the answer's actions.
    const after = stored.slice(stored.indexOf(lastUser) + 1);
    const answers = after.filter((w) => w.classList.contains("assistant") && !w.dataset.post);
    if (answers.length) {
      answers[answers.length - 1].classList.add("last-answer");
    } else if (after.every((w) => w.dataset.post)) {
      lastUser.classList.add("unanswered");
    }
  }

  /** The last message of the open conversation the server stored, as the page shows it. */
  function lastStoredWrap() {
    const stored = [...el.messages.querySelectorAll(".msg")].filter((w) => w.dataset.messageId);
    return stored[stored.length - 1] || null;
  }

  /** Removes what follows `wrap` but the reminders posted there, which the server keeps. */
  function removeAnswerAfter(wrap) {
    let node = wrap.nextSibling;
    while (node) {
      const next = node.nextSibling;
      if (!(node.dataset && node.dataset.post)) node.remove();
      node = next;
    }
  }

  /** A message the server did not store: it says so and why, and offers Retry. */
  function markUnsent(bubble, reason) {
    bubble.wrap.classList.add("unsent");
    bubble.wrap.dataset.state = "unsent";
    addErrorText(bubble, "Not sent: " + reason);
    bubble.actions.appendChild(actionButton("Retry", "act-retry", () => retryUnsent(bubble).catch(reportError)));
  }

  function removeUnsent() {
    for (const wrap of el.messages.querySelectorAll(".msg.unsent")) wrap.remove();
  }

  /** Shows a bubble's text; `final` once an answer ended (every block is rebuilt). */
  function renderBubbleText(bubble, final) {
    if (bubble.wrap.classList.contains("assistant")) {
      renderMarkdown(bubble.content, bubble.text, final);
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
      const fallback = info.fallback || fellBackToMain(info.tier, info.model);
      const tier = fallback && info.tier ? info.tier + " → main" : info.tier;
      const who = add([tier, info.model].filter(Boolean).join(" · "), "model");
      who.title = info.provider ? "provider: " + info.provider : "";
      if (info.host) who.title += " · host: " + info.host;
      if (fallback) {
        who.classList.add("fallback");
        who.title = (typeof fallback === "string" ? fallback : info.tier + " was not available: main answered") +
          (who.title ? " · " + who.title : "");
      }
    }
    // A remote server is named by its host; one on loopback stays on this machine.
    if (info.leftMachine) {
      add("☁ left this machine (" + (info.host || info.provider || "cloud") + ")", "left-machine");
    } else if (info.provider === "local" || info.host) {
      add("on this machine" + (info.host ? " (" + info.host + ")" : ""), "local");
    }
    if (info.stoppedBy === "server") {
      add("stopped by a restart of my-claw", "stopped");
    } else if (info.status === "partial") {
      // A partial answer with a reason failed mid-way; without one, the user stopped it.
      add(info.failed ? "failed before the end" : "stopped before the end", "stopped");
    }
    if (info.status === "lost") add("connection lost", "stopped");
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

  /** Whether a stored answer of `tier` was written by main's model instead of the tier's
   * own (the cloud tier had no key or failed): the stream says so with a `fallback` notice,
   * a stored message only by its model. */
  function fellBackToMain(tier, model) {
    if (!tier || tier === "main" || !model) return false;
    const own = state.tiers.find((t) => t.tier === tier);
    const main = state.tiers.find((t) => t.tier === "main");
    return Boolean(own && main && own.model && own.model !== model && main.model === model);
  }

  /** Notices about waiting (engine queue, model loading, previous answer) replace each
   * other in the pending bubble's status line and vanish with the first token. */
  const WAIT_KINDS = new Set(["queued", "loading", "busy"]);

  function showWait(bubble, kind, text) {
    bubble.wait.textContent = text;
    bubble.wrap.dataset.wait = kind;
  }

  function clearWait(bubble) {
    bubble.wait.textContent = "";
    delete bubble.wrap.dataset.wait;
  }

  function addNotice(bubble, text) {
    const notice = document.createElement("div");
    notice.className = "notice";
    notice.textContent = text;
    bubble.notices.appendChild(notice);
  }

  // --- Tool use inside an answer ------------------------------------------------------------
  // Each round shows the text the model wrote before its calls, then one compact line per
  // call ("used reminders_create") that opens, as a native <details>, on its arguments and
  // result. Tool names, arguments and results are untrusted text: textContent only.

  /** The text an answer wrote before a round of calls (Markdown, rendered like answers). */
  function addToolText(bubble, text) {
    if (!text || !text.trim()) return;
    const div = document.createElement("div");
    div.className = "tool-text";
    renderMarkdown(div, text);
    bubble.tools.appendChild(div);
  }

  /** Arguments as the model wrote them, indented when they are valid JSON. */
  function prettyJson(text) {
    try {
      return JSON.stringify(JSON.parse(text), null, 2);
    } catch (_) {
      return String(text);
    }
  }

  function toolSection(label, text, cls) {
    const section = document.createElement("div");
    section.className = cls;
    const heading = document.createElement("div");
    heading.className = "tool-label";
    heading.textContent = label;
    const pre = document.createElement("pre");
    pre.textContent = prettyJson(text);
    section.append(heading, pre);
    return section;
  }

  /** One call: a "used NAME" line that expands to its arguments (and later its result). */
  function addToolCall(bubble, call) {
    const details = document.createElement("details");
    details.className = "tool-use";
    details.dataset.callId = String(call.id || "");
    details.dataset.tool = String(call.name || "");
    const summary = document.createElement("summary");
    summary.textContent = "used " + String(call.name || "a tool");
    details.append(summary, toolSection("Arguments", call.arguments || "{}", "tool-arguments"));
    bubble.tools.appendChild(details);
    return details;
  }

  /** Adds a result under its call (found by id); a failed call says so in its line. */
  function addToolResult(bubble, result) {
    const calls = [...bubble.tools.querySelectorAll("details.tool-use")];
    const details = calls.find((d) => d.dataset.callId === String(result.call_id));
    if (!details) return;
    details.appendChild(toolSection(result.is_error ? "Error" : "Result", result.content, "tool-result"));
    if (result.is_error) {
      details.classList.add("failed");
      details.querySelector("summary").textContent += " (failed)";
    }
  }

  /** The stored rounds of an answer, when a conversation is shown. */
  function showToolRounds(bubble, rounds) {
    for (const round of rounds || []) {
      addToolText(bubble, round.text);
      for (const call of round.calls || []) addToolCall(bubble, call);
      for (const result of round.results || []) addToolResult(bubble, result);
    }
  }

  function addErrorText(bubble, text) {
    const p = document.createElement("div");
    p.className = "error-text";
    p.textContent = text;
    bubble.wrap.appendChild(p);
  }

  // --- Following the end of the conversation --------------------------------------------
  //
  // While an answer streams the view follows its end, until the user scrolls up by any
  // amount (a wheel step, a touchpad's few pixels, a swipe, a key): from then on it stays
  // where the user put it, and "Jump to latest" brings it back. Scrolling back to the very
  // bottom follows again.

  /** How close to the bottom (px) counts as being at it. */
  const BOTTOM_SLACK = 4;
  const follow = {
    on: true, // the view follows the end of the conversation
    lastTop: 0, // the scroll position last seen or set, to tell a move up
    touchY: null, // where a touch on the list is, to tell a swipe's direction
  };

  function atBottom() {
    const box = el.messages;
    return box.scrollHeight - box.scrollTop - box.clientHeight <= BOTTOM_SLACK;
  }

  function scrollable() {
    return el.messages.scrollHeight - el.messages.clientHeight > BOTTOM_SLACK;
  }

  /** Scrolls to the end: always when `force` (a message was sent, a conversation opened),
   * else only while the view follows it. */
  function scrollToEnd(force) {
    const box = el.messages;
    // A move up that no scroll event has reported yet (it comes with the next frame, and a
    // token can come first) still stops following.
    if (!force && box.scrollTop < follow.lastTop - 1 && !atBottom()) follow.on = false;
    if (force || follow.on) {
      follow.on = true;
      box.scrollTop = box.scrollHeight;
    }
    follow.lastTop = box.scrollTop;
    updateJump();
  }

  /** The user moved up (a wheel, a swipe, a key): the view stops following the end, if
   * there is anything to scroll. */
  function userScrolledUp() {
    if (scrollable()) follow.on = false;
    updateJump();
  }

  function onMessagesScroll() {
    const top = el.messages.scrollTop;
    if (atBottom()) {
      follow.on = true;
    } else if (top < follow.lastTop - 1) {
      follow.on = false;
    }
    follow.lastTop = top;
    updateJump();
  }

  /** "Jump to latest" shows while there is more below than the view shows. */
  function updateJump() {
    el.jumpLatest.hidden = atBottom();
  }

  function bindFollow() {
    const box = el.messages;
    box.addEventListener("scroll", onMessagesScroll, { passive: true });
    box.addEventListener("wheel", (e) => {
      if (e.deltaY < 0) userScrolledUp();
    }, { passive: true });
    box.addEventListener("touchstart", (e) => {
      follow.touchY = e.touches.length === 1 ? e.touches[0].clientY : null;
    }, { passive: true });
    box.addEventListener("touchmove", (e) => {
      // A finger moving down drags the list down: the reader goes up.
      if (follow.touchY !== null && e.touches.length === 1 && e.touches[0].clientY > follow.touchY + 2) {
        userScrolledUp();
      }
    }, { passive: true });
    box.addEventListener("keydown", (e) => {
      if (["ArrowUp", "PageUp", "Home"].includes(e.key)) userScrolledUp();
    });
    el.jumpLatest.addEventListener("click", () => scrollToEnd(true));
    window.addEventListener("resize", updateJump);
  }

  /** Adds one stored message as the conversation endpoint gives it. */
  function addStoredBubble(m) {
    const role = m.role === "user" || m.role === "assistant" ? m.role : "system";
    const bubble = addBubble(role, m.content, { id: m.id, status: m.status });
    if (role === "assistant") {
      // Written without a model (a reminder firing): not part of any answer, so Regenerate
      // and Edit keep it, as the server does.
      if (!m.provider) bubble.wrap.dataset.post = "true";
      showToolRounds(bubble, m.tool_rounds);
      bubble.wrap.dataset.state = m.status === "complete" ? "done" : m.status;
      setMeta(bubble, {
        tier: m.tier,
        model: m.model,
        provider: m.provider,
        host: m.host,
        leftMachine: m.left_machine,
        status: m.status,
        failed: Boolean(m.error),
        promptTokens: m.prompt_tokens || null,
        completionTokens: m.completion_tokens,
      });
      // Why it failed, as the page that asked said it then (absent when the user stopped it).
      if (m.error) addErrorText(bubble, "Error: " + m.error);
    }
    return bubble;
  }

  /** Shows a conversation's stored messages, scrolled to the end unless `keepScroll`. An
   * answer of this conversation still streaming in the background comes back at the end. */
  function showMessages(messages, keepScroll) {
    clearMessages();
    for (const m of messages) addStoredBubble(m);
    const run = state.streaming;
    if (run && state.current && run.conversationId === state.current.id) {
      el.empty.hidden = true;
      el.messages.appendChild(run.bubble.wrap);
    }
    updateMessageActions();
    // A live refresh can re-render the conversation while its last message is being edited:
    // the edit follows that message's new bubble. It never moves to another message (sent
    // meanwhile in another tab): that one would be replaced by text written for this one.
    if (state.editing) {
      const last = el.messages.querySelector(".msg.last-user");
      if (last && last.dataset.messageId === state.editing.messageId) {
        state.editing.wrap = last;
        last.classList.add("editing");
      } else {
        editOvertaken();
      }
    }
    updateComposer();
    if (!keepScroll) scrollToEnd(true);
  }

  /**
   * Brings the open conversation up to date with `messages` (its stored state) without
   * disturbing the reader: when the stored messages shown are unchanged, only new ones are
   * added (our own just-finished answer adds nothing); otherwise the view is rebuilt with
   * its scroll position and opened tool details kept. Either way it stays where it was
   * unless it was at the end. Bubbles that were never stored (an unsent message, the
   * answer streaming now) are not compared and stay. An answer that lost its connection
   * stays, saying so, until the server stored something after it, or until my-claw is
   * back after the loss (`state.dropLost`): then it goes, as the server kept nothing of it.
   */
  function reconcileMessages(messages) {
    const box = el.messages;
    const dropLost = state.dropLost;
    state.dropLost = false;
    const atEnd = follow.on && (atBottom() || !state.streaming);
    const shown = [...box.querySelectorAll(".msg")].filter((w) => w.dataset.messageId);
    let same = 0;
    while (same < shown.length && same < messages.length && sameMessage(shown[same], messages[same])) {
      same += 1;
    }
    if (same === shown.length) {
      if (messages.length === same) {
        // Back after my-claw went away mid-answer, and it stored nothing of it (it crashed
        // before): the view shows what is stored, and the question left unanswered offers
        // Answer. Before that, the lost answer says what happened.
        const lost = dropLost ? [...box.querySelectorAll(".msg.lost")] : [];
        for (const wrap of lost) wrap.remove();
        if (lost.length) {
          if (!box.querySelector(".msg")) clearMessages();
          updateMessageActions();
        }
        return;
      }
      // An answer whose connection was lost is replaced by what the server stored.
      for (const wrap of box.querySelectorAll(".msg.lost")) wrap.remove();
      const live = state.streaming && state.streaming.bubble.wrap.isConnected ? state.streaming.bubble.wrap : null;
      for (const m of messages.slice(same)) {
        const bubble = addStoredBubble(m);
        if (live) box.insertBefore(bubble.wrap, live);
      }
      updateMessageActions();
    } else {
      const top = box.scrollTop;
      const opened = new Set(
        [...box.querySelectorAll(".msg[data-message-id] details[open]")].map(detailsKey),
      );
      showMessages(messages, true);
      for (const d of box.querySelectorAll(".msg[data-message-id] details")) {
        if (opened.has(detailsKey(d))) d.open = true;
      }
      box.scrollTop = top;
    }
    if (atEnd) scrollToEnd(true);
  }

  function sameMessage(wrap, m) {
    return wrap.dataset.messageId === String(m.id) && Boolean(wrap.__bubble) && wrap.__bubble.text === m.content;
  }

  function detailsKey(details) {
    const wrap = details.closest(".msg");
    return (wrap ? wrap.dataset.messageId : "") + ":" + (details.dataset.callId || "");
  }

  // --- Conversations ---------------------------------------------------------------------

  // Loads of the list overlap (live events, answers ending, the user's moves) and their
  // answers can come back in any order: only the newest asked is shown, so a late answer to
  // an older request never puts back a list that is no longer true (an "answering…" mark
  // gone while the answer runs).
  let listAsked = 0;
  let listShown = 0;

  async function loadConversations() {
    const asked = ++listAsked;
    const data = await api("/api/conversations");
    if (asked < listShown) return state.conversations;
    listShown = asked;
    // Asked before a deletion the live events already told of (ids are never reused).
    state.conversations = (data.conversations || []).filter((c) => !state.deletedIds.has(c.id));
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
      const button = document.createElement("button");
      button.type = "button";
      if (state.current && state.current.id === c.id) {
        li.className = "active";
        button.setAttribute("aria-current", "page");
      }
      const title = document.createElement("span");
      title.className = "conv-title";
      title.textContent = conversationTitle(c);
      button.appendChild(title);
      // The whole title (the list cuts long ones) and when it was last written in.
      button.title = conversationTitle(c) + (c.updated_at ? " · " + shortDate(c.updated_at) : "");
      const badge = (className, text, title) => {
        const span = document.createElement("span");
        span.className = className;
        span.textContent = text;
        if (title) span.title = title;
        button.appendChild(span);
      };
      if (c.channel !== "webchat") badge("badge", c.channel);
      if (c.left_machine) {
        badge("badge cloud", "☁", "Part of this conversation was sent outside this machine");
      }
      // Written by the server whether or not a page reads it (this one left it, or was
      // reloaded): opening the conversation follows it.
      if (c.answering) badge("badge answering", "answering…", "An answer is being written in this conversation");
      button.addEventListener("click", (e) => {
        // Chosen with Enter or Space (a click with no pointer behind it): the list is
        // redrawn, so the focus would fall to the page; it goes where the user types next.
        const byKeyboard = e.detail === 0;
        closeSidebar();
        openConversation(c.id)
          .then(() => {
            if (byKeyboard) focusComposer();
          })
          .catch(reportError);
      });
      li.appendChild(button);
      return li;
    });
    el.list.replaceChildren(...items);
  }

  /** A date as short as is clear: the time today, the day this year, else the full date. */
  function shortDate(ms) {
    const date = new Date(ms);
    const now = new Date();
    if (date.toDateString() === now.toDateString()) {
      return date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
    }
    if (date.getFullYear() === now.getFullYear()) {
      return date.toLocaleDateString(undefined, { day: "numeric", month: "short" });
    }
    return date.toLocaleDateString(undefined, { day: "numeric", month: "short", year: "numeric" });
  }

  // The conversation the header shows: its menu closes when that changes, not when a live
  // update re-renders the same conversation (which would close a menu under the user's
  // finger).
  let headerFor = null;

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
    const shown = c ? c.id : null;
    if (shown !== headerFor) closeChatMenu();
    headerFor = shown;
    updateComposer();
    updateMessageActions();
  }

  /**
   * Opens a conversation. The one already open is brought up to date in place instead
   * (`refreshConversation`). An answer streaming meanwhile goes on in the background: its
   * request stays open, so the server finishes and stores it, and the composer says where
   * it is being written. `how` the address changes (`setHash`): a new history entry unless
   * said otherwise.
   */
  async function openConversation(id, how = "push") {
    if (state.current && state.current.id === id) {
      await refreshConversation();
      return;
    }
    const data = await api("/api/conversations/" + encodeURIComponent(id) + "/messages");
    cancelEdit(true);
    leaveAnswer();
    // Moving on clears a message about the previous view; the first view keeps one said at
    // start (a refused sign-in link).
    if (state.started) hideMessageBanner();
    state.current = data.conversation;
    setHash(state.current.id, how);
    renderHeader();
    renderConversationList();
    showDraft(state.current.id);
    showMessages(data.messages || []);
    followLive(state.current.id).catch(() => {});
  }

  /** Reloads the open conversation's stored messages into the view (`reconcileMessages`),
   * then follows its running answer if another page asked for it (`followLive`, asked
   * `tries` times when a user message was just stored there). */
  async function refreshConversation(tries = 1) {
    const c = state.current;
    if (!c) return;
    const data = await api("/api/conversations/" + encodeURIComponent(c.id) + "/messages");
    if (!state.current || state.current.id !== c.id) return; // moved on meanwhile
    state.current = data.conversation;
    renderHeader();
    renderConversationList();
    reconcileMessages(data.messages || []);
    followLive(c.id, tries).catch(() => {});
  }

  function newChat() {
    clearView({ how: "push" });
    updateComposer();
    closeSidebar();
    el.input.focus();
  }

  /** No conversation open: the empty view a new chat starts from, with its draft, or with
   * the text in the box when `keepText` (the conversation typed in was deleted). `how` the
   * address changes (`setHash`). */
  function clearView({ keepText = false, how = "replace" } = {}) {
    cancelEdit(true);
    leaveAnswer();
    hideMessageBanner();
    state.current = null;
    setHash(null, how);
    renderHeader();
    renderConversationList();
    clearMessages();
    if (keepText) {
      draftFor = null;
      saveDraft();
    } else {
      showDraft(null);
    }
  }

  /**
   * A conversation was deleted (in another tab, through the API): it leaves the list, and
   * when it is the open one the view says so and holds none of its messages, so nothing
   * offers to act on them; what is sent next starts a new chat. An answer streaming into it
   * was stopped and stored by the server before the deletion: it ends without alarm.
   */
  function conversationDeleted(id) {
    state.deletedIds.add(id);
    state.deletedWaiters = state.deletedWaiters.filter((w) => {
      if (w.id !== id) return true;
      w.resolve(true);
      return false;
    });
    const run = state.streaming;
    if (run && run.conversationId === id) run.deleted = true;
    state.conversations = state.conversations.filter((c) => c.id !== id);
    storeDraft(id, "");
    if (state.current && state.current.id === id) {
      showDeleted();
    } else {
      renderConversationList();
      updateComposer();
    }
  }

  /** A conversation was renamed (here, in another tab, through the API): the list and, when
   * it is the open one, the header take the new title. Only the title changes: an edit or an
   * answer in progress is left as it is. */
  async function conversationRenamed(id) {
    await loadConversations();
    const listed = state.conversations.find((c) => c.id === id);
    if (listed && state.current && state.current.id === id) {
      state.current = { ...state.current, title: listed.title };
      renderHeader();
    }
  }

  /** The open conversation is gone: an empty view that says so, ready for a new chat. */
  function showDeleted() {
    clearView({ keepText: true });
    el.emptyDeleted.hidden = false;
    updateComposer();
  }

  /** Resolves true once a live event says conversation `id` was deleted, false after `ms`. */
  function deletedSoon(id, ms) {
    if (state.deletedIds.has(id)) return Promise.resolve(true);
    return new Promise((resolve) => {
      const waiter = { id, resolve };
      state.deletedWaiters.push(waiter);
      window.setTimeout(() => {
        state.deletedWaiters = state.deletedWaiters.filter((w) => w !== waiter);
        resolve(false);
      }, ms);
    });
  }

  async function renameCurrent() {
    const c = state.current;
    if (!c) return;
    const title = window.prompt("New name for this conversation", conversationTitle(c));
    if (title === null) return;
    if (!title.trim()) {
      showBanner("Not renamed: a conversation's name cannot be blank.");
      return;
    }
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

  /** The address the view shows (`#c=<id>`, or empty for a new chat). */
  let addressShown = null;

  /** Puts the open conversation into the address: `push` adds a history entry (the user
   * moved to another conversation, so Back returns to the one before), `replace` does not,
   * `none` leaves the address (it is what changed: Back, Forward, a link). */
  function setHash(id, how = "replace") {
    const hash = id ? "#c=" + id : "";
    if (how !== "none") addressShown = hash;
    if (how === "none" || window.location.hash === hash) return;
    const url = window.location.pathname + window.location.search + hash;
    if (how === "push") {
      window.history.pushState(null, "", url);
    } else {
      window.history.replaceState(null, "", url);
    }
  }

  /** Shows what the address names (after Back or Forward, or a `#c=` link): that
   * conversation, or a new chat without one. */
  function followAddress() {
    // Back fires both popstate and hashchange: the second finds the address shown.
    if (!state.started || window.location.hash === addressShown) return;
    addressShown = window.location.hash;
    const id = hashConversationId();
    if (id && (!state.current || state.current.id !== id)) {
      openConversation(id, "none").catch(reportError);
    } else if (!id && !window.location.hash && state.current) {
      clearView({ how: "none" });
    }
  }

  function hashConversationId() {
    const m = window.location.hash.match(/^#c=(\d+)$/);
    return m ? Number(m[1]) : null;
  }

  // --- Search ------------------------------------------------------------------------------

  let searchTimer = 0;
  let searchSeq = 0;

  function scheduleSearch() {
    window.clearTimeout(searchTimer);
    searchTimer = window.setTimeout(() => runSearch().catch(reportError), 250);
  }

  async function runSearch() {
    const q = el.searchInput.value.trim();
    const seq = ++searchSeq;
    if (!q) {
      el.searchPanel.hidden = true;
      el.searchResults.replaceChildren();
      return;
    }
    el.searchPanel.hidden = false;
    el.searchStatus.textContent = "Searching…";
    let data;
    try {
      data = await api("/api/search?q=" + encodeURIComponent(q));
    } catch (err) {
      if (seq !== searchSeq) return;
      el.searchResults.replaceChildren();
      el.searchStatus.textContent = describeError(err);
      return;
    }
    if (seq !== searchSeq) return; // a newer query is on its way
    const results = data.results || [];
    el.searchStatus.textContent = results.length === 0 ? "No message matches." : "";
    el.searchResults.replaceChildren(...results.map(searchResultItem));
  }

  /** One result: the conversation, and the snippet with the matches as <mark> (text nodes
   * only: the snippet is message text, untrusted like the rest). */
  function searchResultItem(r) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "search-result";
    button.dataset.messageId = String(r.message_id);
    button.dataset.conversationId = String(r.conversation_id);
    const head = document.createElement("span");
    head.className = "search-head";
    const title = document.createElement("span");
    title.className = "conv-title";
    title.textContent = r.conversation_title || "Conversation " + r.conversation_id;
    head.appendChild(title);
    if (r.channel !== "webchat") {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = r.channel;
      head.appendChild(badge);
    }
    const snippet = document.createElement("span");
    snippet.className = "snippet";
    for (const part of r.snippet || []) {
      if (part.mark) {
        const mark = document.createElement("mark");
        mark.textContent = part.text;
        snippet.appendChild(mark);
      } else {
        snippet.appendChild(document.createTextNode(part.text));
      }
    }
    button.append(head, snippet);
    button.addEventListener("click", () => {
      closeSidebar();
      jumpToMessage(r.conversation_id, r.message_id).catch(reportError);
    });
    li.appendChild(button);
    return li;
  }

  /** Opens a conversation and brings one of its messages into view, highlighted. */
  async function jumpToMessage(conversationId, messageId) {
    await openConversation(conversationId);
    const selector = '.msg[data-message-id="' + Number(messageId) + '"]';
    let target = el.messages.querySelector(selector);
    if (!target) {
      // Stored after the view was drawn (or shown without its id): reload it once.
      await refreshConversation();
      target = el.messages.querySelector(selector);
    }
    if (!target) {
      showBanner("That message is not among the ones shown for this conversation.");
      return;
    }
    for (const old of el.messages.querySelectorAll(".msg.found")) old.classList.remove("found");
    target.classList.add("found");
    target.scrollIntoView({ block: "center" });
  }

  // --- Export ------------------------------------------------------------------------------

  /** Downloads an export. The API needs the token header, so a plain link cannot do it:
   * fetch, then hand the browser a blob with the server's file name. */
  async function download(path, fallbackName) {
    const response = await rawFetch(path);
    const disposition = response.headers.get("Content-Disposition") || "";
    const m = /filename="([^"]+)"/.exec(disposition);
    const name = m ? m[1] : fallbackName;
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    window.setTimeout(() => URL.revokeObjectURL(url), 10000);
    document.documentElement.dataset.lastDownload = name;
  }

  /**
   * Sends the chosen file to `/api/import` as it is (the server tells the formats apart),
   * then says what was added and opens the first conversation it added.
   */
  async function importChosenFile() {
    const file = el.importFile.files && el.importFile.files[0];
    // The same file can be chosen again (a second import adds nothing, and says so).
    el.importFile.value = "";
    if (!file) return;
    el.importButton.disabled = true;
    try {
      const text = await file.text();
      const summary = await api("/api/import", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: text,
      });
      const plural = (n, word) => n + " " + word + (n === 1 ? "" : "s");
      let said = "Imported " + plural(summary.imported, "conversation") + " (" + plural(summary.messages, "message") + ")";
      if (summary.already_there) said += "; " + plural(summary.already_there, "conversation") + " already here";
      if (summary.empty) said += "; " + summary.empty + " without messages skipped";
      if (summary.unreadable) said += "; " + summary.unreadable + " unreadable item" + (summary.unreadable === 1 ? "" : "s") + " skipped";
      await loadConversations();
      const first = summary.conversations && summary.conversations[0];
      if (first) await openConversation(first.id);
      showBanner(said + ".");
    } catch (err) {
      reportError(err);
    } finally {
      el.importButton.disabled = false;
    }
  }

  function exportCurrent(format) {
    const c = state.current;
    if (!c) return Promise.resolve();
    closeChatMenu();
    return download("/api/conversations/" + c.id + "/export?format=" + format, "conversation." + format);
  }

  function toggleChatMenu() {
    const open = !el.actions.classList.contains("menu-open");
    el.actions.classList.toggle("menu-open", open);
    el.menuButton.setAttribute("aria-expanded", String(open));
  }

  function closeChatMenu() {
    el.actions.classList.remove("menu-open");
    el.menuButton.setAttribute("aria-expanded", "false");
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
    // The label is the tier, short enough for the closed select on a phone; the model and
    // the rest are in the option's tooltip and the select's (`describeTier`).
    const options = state.tiers.map((t) => {
      const option = document.createElement("option");
      option.value = t.tier;
      let label = t.tier;
      if (t.leaves_machine) label += " ☁";
      if (!t.available) {
        label += " (unavailable)";
        option.disabled = true;
      }
      option.textContent = label;
      option.title = describeTier(t);
      return option;
    });
    el.model.replaceChildren(...options);
    const usable = state.tiers.filter((t) => t.available).map((t) => t.tier);
    el.model.value = usable.includes(saved) ? saved : usable.includes(state.defaultTier) ? state.defaultTier : usable[0] || "";
    titleModelSelect();
    if (usable.length === 0) showBanner("No model is available: check MODEL_* settings and /api/health.");
  }

  /** A tier in full: its model, where it runs, what it falls back to, the server's detail. */
  function describeTier(t) {
    const parts = [t.tier + (t.model ? ": " + t.model : "")];
    if (t.leaves_machine) parts.push("cloud: leaves this machine");
    if (!t.available) parts.push("unavailable");
    else if (t.fallback_to) parts.push("falls back to " + t.fallback_to);
    if (t.detail) parts.push(t.detail);
    return parts.join(" · ");
  }

  /** The closed select names only the tier: its tooltip says the rest. */
  function titleModelSelect() {
    const t = state.tiers.find((x) => x.tier === el.model.value);
    el.model.title = t ? describeTier(t) : "";
  }

  function selectedTier() {
    return el.model.value || null;
  }

  // --- Sending and streaming ---------------------------------------------------------------

  /** Characters as the server counts them (Unicode scalar values, not UTF-16 units). */
  function countChars(text) {
    let n = 0;
    for (const _ of text) n += 1;
    return n;
  }

  const formatCount = (n) => n.toLocaleString("en-US");

  /** Whether the open view shows the running answer (it can run on in the background). */
  function streamShown(run) {
    return Boolean(run && run.bubble.wrap.isConnected);
  }

  function updateComposer() {
    const run = state.streaming;
    const here = streamShown(run);
    el.send.hidden = here;
    el.stop.hidden = !here;
    const text = el.input.value;
    const n = countChars(text);
    const over = n > MAX_MESSAGE_CHARS;
    el.send.disabled = el.input.disabled || !text.trim() || over || Boolean(run);
    // The limit is shown before sending, near it and over it, rather than refused after.
    el.inputCount.hidden = n < COUNT_FROM;
    el.inputCount.classList.toggle("over", over);
    el.inputCount.textContent = over
      ? "Too long to send: " + formatCount(n) + " / " + formatCount(MAX_MESSAGE_CHARS) +
        " characters. Remove " + formatCount(n - MAX_MESSAGE_CHARS) + " to send it."
      : formatCount(n) + " / " + formatCount(MAX_MESSAGE_CHARS) + " characters";
    if (!run) el.busyNote.hidden = true;
    saveDraft();
  }

  // --- Drafts ------------------------------------------------------------------------------
  //
  // Each conversation keeps what was typed in it and not sent (and a new chat its own), in
  // this browser's storage: it comes back when the conversation is opened again, after a
  // reload too, and goes once sent. The text of an edit is not a draft: the draft the edit
  // put aside is.

  /** The conversation whose draft the message box holds (an id, or null for a new chat);
   * undefined until the first view is shown. */
  let draftFor;

  function draftKey(id) {
    return DRAFT_KEY + (id === null ? "new" : String(id));
  }

  function storeDraft(id, text) {
    try {
      if (text.trim()) {
        window.localStorage.setItem(draftKey(id), text);
      } else {
        window.localStorage.removeItem(draftKey(id));
      }
    } catch (_) {
      /* no storage (private mode): the draft lives in the box only */
    }
  }

  function loadDraft(id) {
    try {
      return window.localStorage.getItem(draftKey(id)) || "";
    } catch (_) {
      return "";
    }
  }

  /** Keeps the box's text as the draft of its conversation (called on every change). */
  function saveDraft() {
    if (draftFor === undefined || state.editing || el.input.disabled) return;
    storeDraft(draftFor, el.input.value);
  }

  /** Shows conversation `id`'s draft (null: a new chat's) in the box. */
  function showDraft(id) {
    draftFor = id;
    el.input.value = loadDraft(id);
    autoGrow();
    updateComposer();
  }

  /** A new chat got its conversation id: its draft is that conversation's from now on. */
  function adoptDraft(id) {
    if (draftFor !== null) return;
    storeDraft(null, "");
    draftFor = id;
    saveDraft();
  }

  function autoGrow() {
    el.input.style.height = "auto";
    el.input.style.height = Math.min(el.input.scrollHeight + 2, window.innerHeight * 0.4) + "px";
  }

  /** Puts text back into the composer, unless the user has typed something else there. */
  function restoreInput(text) {
    if (el.input.value.trim() || el.input.disabled) return;
    el.input.value = text;
    autoGrow();
    updateComposer();
  }

  async function sendMessage() {
    const text = el.input.value;
    if (!text.trim() || el.input.disabled) return;
    if (state.streaming) {
      // One answer at a time in a conversation: Enter says so instead of doing nothing.
      el.busyNote.hidden = false;
      return;
    }
    if (countChars(text) > MAX_MESSAGE_CHARS) {
      updateComposer();
      return;
    }
    if (state.editing) {
      await resendEdited(text);
      return;
    }
    el.input.value = "";
    autoGrow();
    await sendText(text);
  }

  async function sendText(text) {
    hideMessageBanner();
    removeUnsent();
    const conversationId = state.current ? state.current.id : null;
    const userBubble = addBubble("user", text);
    const bubble = addBubble("assistant", "");
    const body = { message: text };
    if (conversationId) body.conversation_id = conversationId;
    await streamAnswer("/api/chat", body, bubble, conversationId, { kind: "send", userBubble, text });
  }

  /** Sends an unsent message again (its text left the composer when it was restored). */
  async function retryUnsent(bubble) {
    if (state.streaming || el.input.disabled) return;
    if (el.input.value === bubble.text) {
      el.input.value = "";
      autoGrow();
    }
    bubble.wrap.remove();
    await sendText(bubble.text);
  }

  /** Replaces the last answer with a new one (the old one is deleted, not kept). */
  async function regenerateLast() {
    const last = el.messages.querySelector(".msg.last-answer");
    if (last) await regenerateFrom(last);
  }

  /** Answers again after `wrap`: the last stored answer (replaced), or the last stored user
   * message when no answer to it was stored. The server refuses (409) when it is no longer
   * the conversation's last message. */
  async function regenerateFrom(wrap) {
    const c = state.current;
    if (state.streaming || !c || c.channel !== "webchat" || !wrap.isConnected) return;
    hideMessageBanner();
    let user = wrap;
    while (user && !user.classList.contains("user")) user = user.previousElementSibling;
    if (!user) return;
    // The server checks the conversation's last message is still the one this page shows
    // last (a reminder posted after the answer may be it).
    const body = {};
    const last = lastStoredWrap();
    if (last) body.message_id = Number(last.dataset.messageId);
    removeAnswerAfter(user);
    const bubble = addBubble("assistant", "");
    await streamAnswer("/api/conversations/" + c.id + "/regenerate", body, bubble, c.id, { kind: "regenerate" });
  }

  /** Puts the last stored user message into the input for editing (Up in an empty input,
   * or its Edit button). What was typed in the input is kept and comes back after. */
  function startEdit() {
    const c = state.current;
    if (state.streaming || !c || c.channel !== "webchat") return false;
    const lastUser = el.messages.querySelector(".msg.last-user");
    if (!lastUser || !lastUser.__bubble) return false;
    const draft = state.editing ? state.editing.draft : el.input.value;
    cancelEdit(false);
    // The id names the message being edited for as long as the edit lasts: the server
    // refuses the edit (409) once it is no longer the last one, and the page never points
    // the edit at another message.
    state.editing = { wrap: lastUser, draft, messageId: lastUser.dataset.messageId };
    lastUser.classList.add("editing");
    el.input.value = lastUser.__bubble.text;
    el.editNote.hidden = false;
    autoGrow();
    updateComposer();
    el.input.focus();
    el.input.setSelectionRange(el.input.value.length, el.input.value.length);
    return true;
  }

  /** Ends editing; `restoreDraft` puts back what the input held before. */
  function cancelEdit(restoreDraft) {
    if (!state.editing) return;
    const draft = state.editing.draft;
    state.editing.wrap.classList.remove("editing");
    state.editing = null;
    el.editNote.hidden = true;
    if (restoreDraft) {
      el.input.value = draft;
      autoGrow();
    }
    updateComposer();
  }

  const EDIT_OVERTAKEN =
    "Your edit was not sent: your last message changed in another tab or window. " +
    "The conversation is shown as it is now, and your text is in the message box.";

  /**
   * The message being edited is no longer the last one (another tab or window sent or
   * edited meanwhile): the edit ends, and what was typed stays in the message box as an
   * ordinary draft, not sent. The draft the edit had put aside follows it.
   */
  function editOvertaken(text) {
    const editing = state.editing;
    if (!editing) return;
    const typed = text === undefined ? el.input.value : text;
    cancelEdit(false);
    keepAsDraft(typed, editing.draft);
    showBanner(EDIT_OVERTAKEN);
  }

  /** Puts `text` (and the earlier `draft` after it) into the message box, unsent. */
  function keepAsDraft(text, draft) {
    el.input.value = draft && draft.trim() && draft !== text ? text + "\n\n" + draft : text;
    autoGrow();
    updateComposer();
  }

  /** Sends the edited last message: it replaces the stored one, and every message after
   * it goes, then a new answer streams. The draft the edit put aside comes back. */
  async function resendEdited(text) {
    const c = state.current;
    const messageId = state.editing.messageId;
    const draft = state.editing.draft;
    // The bubble of the message being edited, found by its id (a re-render replaces it).
    const wrap = [...el.messages.querySelectorAll(".msg.user")].find((w) => w.dataset.messageId === messageId);
    if (!c || !messageId || !wrap || !wrap.classList.contains("last-user")) {
      editOvertaken(text);
      return;
    }
    cancelEdit(false);
    hideMessageBanner();
    el.input.value = draft;
    autoGrow();
    const userBubble = wrap.__bubble;
    userBubble.text = text;
    renderBubbleText(userBubble);
    removeAnswerAfter(wrap);
    const bubble = addBubble("assistant", "");
    const body = { message: text, message_id: Number(messageId) };
    await streamAnswer("/api/conversations/" + c.id + "/edit", body, bubble, c.id, {
      kind: "edit",
      userBubble,
      text,
      draft,
      messageId,
    });
  }

  function metaInfo(run) {
    const m = run.meta || {};
    return {
      tier: m.tier,
      model: m.model,
      provider: m.provider,
      host: m.host,
      leftMachine: m.leaves_machine,
      fallback: run.fallback,
    };
  }

  const LOST_CONNECTION =
    "The connection to my-claw was lost; the answer may be incomplete. The conversation is reloaded when my-claw is back.";

  /** The state of one answer this page shows as it is written (`state.streaming`). */
  function newRun(controller, conversationId, bubble, kind, userBubble) {
    return {
      controller,
      conversationId,
      bubble,
      stopRequested: false,
      meta: null,
      fallback: null,
      kind,
      userBubble: userBubble || null,
      accepted: kind === "follow", // the server answered the request (its stream is open)
      detached: false, // the user left its conversation: it goes on unread (`leaveAnswer`)
    };
  }

  /**
   * Posts `body` to `path` and streams the answer's events into `bubble` (`consumeAnswer`,
   * which `followLive` shares). `opts.kind` says what started it: `send` (opts.userBubble
   * and opts.text), `edit` (also opts.draft) or `regenerate`. Until `meta` arrives nothing is stored, so a failure before it gives the
   * text back (`failedBeforeStart`); after it, a failure says what happened to the answer.
   */
  async function streamAnswer(path, body, bubble, conversationId, opts) {
    bubble.wrap.dataset.state = "waiting";
    showWait(bubble, "sending", "Sending…");
    scrollToEnd(true);
    const controller = new AbortController();
    const run = newRun(controller, conversationId, bubble, opts.kind, opts.userBubble);
    state.streaming = run;
    updateComposer();
    updateMessageActions();
    let lost = false;
    let reload = false;
    try {
      const tier = selectedTier();
      if (tier) body.tier = tier;
      const response = await rawFetch(path, {
        method: "POST",
        body,
        signal: controller.signal,
        headers: { Accept: "text/event-stream" },
      });
      run.accepted = true;
      if (run.detached) {
        controller.abort();
        return;
      }
      bubble.wrap.dataset.state = "streaming";
      showWait(bubble, "started", "Waiting for the model…");
      const ended = await consumeAnswer(response, run, opts);
      if (!ended) {
        renderBubbleText(bubble, true);
        if (run.stopRequested) {
          bubble.wrap.dataset.state = "stopped";
        } else {
          lost = true;
        }
      }
    } catch (err) {
      if (run.detached) {
        // Left meanwhile: nothing of it is shown, but a message the server never took is
        // said, wherever the user is now.
        if (!run.accepted && !(err && err.name === "AbortError") && opts.kind === "send") {
          showBanner("A message you sent was not sent (" + describeError(err) + "): “" + opts.text.slice(0, 60) + "”");
        }
        return;
      }
      renderBubbleText(bubble, true);
      if (!run.meta) {
        reload = failedBeforeStart(run, err, opts);
      } else if (err && err.name === "AbortError") {
        bubble.wrap.dataset.state = "stopped";
        addErrorText(bubble, "Stopped.");
      } else if (err instanceof AuthError) {
        bubble.wrap.dataset.state = "error";
        addErrorText(bubble, describeError(err));
      } else {
        // The body broke off (the server died, the network went): a fetch error.
        lost = true;
      }
    } finally {
      clearWait(bubble);
      if (state.streaming === run) state.streaming = null;
      updateComposer();
      updateMessageActions();
      loadConversations().catch(() => {});
      if (!run.detached && !el.input.disabled && document.activeElement === document.body) el.input.focus();
    }
    if (lost) {
      // What the server kept (a partial answer, or nothing after a crash) replaces this
      // bubble on the next reload: now if the server is still up, else once it is back.
      bubble.wrap.dataset.state = "error";
      bubble.wrap.classList.add("lost");
      setMeta(bubble, { ...metaInfo(run), status: "lost" });
      addErrorText(bubble, LOST_CONNECTION);
      state.reloadOnReconnect = true;
      if (state.current && state.current.id === run.conversationId) refreshConversation().catch(() => {});
    }
    if (reload && state.current && state.current.id === conversationId) {
      await refreshConversation().catch(() => {
        state.reloadOnReconnect = true;
      });
      // An edit that was not sent comes back: as an edit again when the failure said
      // nothing about the conversation (the server could not be reached) and the same
      // message is still the last; after a conflict, or when that message is gone, as an
      // ordinary draft. It never becomes an edit of another message.
      if (opts.kind === "edit" && el.input.value === (opts.draft || "")) {
        const last = el.messages.querySelector(".msg.last-user");
        const same = !run.conflict && last && last.dataset.messageId === opts.messageId;
        if (same && startEdit()) {
          el.input.value = opts.text;
          autoGrow();
          updateComposer();
        } else {
          keepAsDraft(opts.text, opts.draft);
        }
      }
    }
  }

  /**
   * Reads an answer's Server-Sent Events (`/api/chat`, regenerate, edit, or `/live`) into
   * `run.bubble` until the stream ends. Resolves true once `done` or `error` came; throws
   * what reading throws (an abort, a broken connection).
   */
  async function consumeAnswer(response, run, opts) {
    const bubble = run.bubble;
    let ended = false;
    let frame = 0;
    for await (const event of sseEvents(response)) {
      if (event.type === "meta") {
        run.meta = event;
        run.conversationId = event.conversation_id;
        if (run.userBubble && event.user_message_id != null) {
          run.userBubble.wrap.dataset.messageId = String(event.user_message_id);
        }
        // A new chat becomes the open conversation, unless the user went elsewhere.
        if (streamShown(run) && (!state.current || state.current.id !== event.conversation_id)) {
          const title = (opts.text || "").split("\n")[0].slice(0, 60);
          state.current = { id: event.conversation_id, channel: "webchat", title };
          adoptDraft(event.conversation_id);
          setHash(event.conversation_id);
          renderHeader();
        }
        loadConversations().catch(() => {});
        setMeta(bubble, metaInfo(run));
        updateComposer();
        if (run.stopRequested) requestStop(run);
      } else if (event.type === "token") {
        if (bubble.wrap.dataset.wait) clearWait(bubble);
        bubble.text += event.text;
        // Re-render at most once a frame: tokens can arrive faster than paint, and only
        // the last Markdown block is rebuilt each time.
        if (!frame) {
          frame = window.requestAnimationFrame(() => {
            frame = 0;
            renderBubbleText(bubble);
            if (streamShown(run)) scrollToEnd(false);
          });
        }
      } else if (event.type === "tool_call") {
        // The text so far was written before this call: it moves above the call, and
        // the answer's own text starts again empty.
        if (bubble.wrap.dataset.wait) clearWait(bubble);
        if (frame) window.cancelAnimationFrame(frame);
        frame = 0;
        addToolText(bubble, bubble.text);
        bubble.text = "";
        renderBubbleText(bubble);
        addToolCall(bubble, event);
      } else if (event.type === "tool_result") {
        addToolResult(bubble, event);
      } else if (event.type === "notice") {
        if (WAIT_KINDS.has(event.kind)) {
          if (!bubble.text) showWait(bubble, event.kind, event.message);
        } else {
          // A fallback also names main in the answer's label, where the model is read.
          if (event.kind === "fallback") {
            run.fallback = event.message;
            setMeta(bubble, metaInfo(run));
          }
          addNotice(bubble, event.message);
        }
      } else if (event.type === "done") {
        ended = true;
        clearWait(bubble);
        if (frame) window.cancelAnimationFrame(frame);
        frame = 0;
        renderBubbleText(bubble, true);
        const stopped = event.finish === "cancelled";
        // Not stopped by us: the conversation was deleted (elsewhere, or here: the delete
        // stops its answer first, then says so on the live events), or the server is
        // shutting down (it stops answers to exit).
        let byServer = stopped && !run.stopRequested;
        if (byServer && run.conversationId && (run.deleted || (await deletedSoon(run.conversationId, 1500)))) {
          run.deleted = true;
          byServer = false;
        }
        if (event.message_id == null) {
          // Stopped before its first word: nothing was stored, so nothing stays on the page
          // (the question stays, unanswered, as it is after a reload).
          bubble.wrap.remove();
          if (byServer) state.reloadOnReconnect = true;
          continue;
        }
        bubble.wrap.dataset.state = stopped ? "stopped" : "done";
        bubble.wrap.dataset.messageId = String(event.message_id);
        setMeta(bubble, {
          ...metaInfo(run),
          status: stopped ? "partial" : "complete",
          stoppedBy: byServer ? "server" : null,
          promptTokens: event.usage.prompt_tokens || null,
          completionTokens: event.usage.completion_tokens,
          tokS: event.timings.decode_tok_s || null,
          finish: event.finish,
        });
        if (byServer) {
          addErrorText(bubble, "my-claw stopped while writing this answer (a restart or shutdown); the part shown is saved.");
          state.reloadOnReconnect = true;
        }
        if (streamShown(run)) announceAnswer(bubble.text, stopped);
      } else if (event.type === "error") {
        ended = true;
        clearWait(bubble);
        renderBubbleText(bubble, true);
        bubble.wrap.dataset.state = "error";
        if (event.partial_message_id != null) bubble.wrap.dataset.messageId = String(event.partial_message_id);
        addErrorText(bubble, "Error: " + event.message);
      }
      if (streamShown(run)) scrollToEnd(false);
    }
    return ended;
  }

  /**
   * A request that failed before its answer started (refused, the server unreachable, the
   * user stopped it while it waited): the server stored nothing. A message comes back into
   * the composer; the unsent bubble stays marked with Retry, unless the user stopped it. An
   * edit or a regenerate the server did not take is undone by showing the stored state
   * again (returns true: reload the conversation).
   */
  function failedBeforeStart(run, err, opts) {
    const stopped = err && err.name === "AbortError";
    const reason = stopped ? "" : describeError(err);
    run.bubble.wrap.remove();
    if (err instanceof ApiFailure && err.status === 404 && run.conversationId) {
      // The conversation was deleted meanwhile: the view says so (one message, not the
      // server's words and ours after them), the text comes back, Send starts a new chat.
      if (state.current && state.current.id === run.conversationId) showDeleted();
      const what = opts.kind === "edit" ? "Your edit was not sent" : opts.kind === "send" ? "Not sent" : "Not regenerated";
      showBanner(what + ": this conversation was deleted. Send starts a new chat.");
      if (opts.kind === "send" || opts.kind === "edit") restoreInput(opts.text);
      return false;
    }
    if (opts.kind === "send") {
      if (stopped) {
        opts.userBubble.wrap.remove();
      } else {
        markUnsent(opts.userBubble, reason);
      }
      restoreInput(opts.text);
      if (!el.messages.querySelector(".msg")) clearMessages();
      return false;
    }
    // The server's words for a conflict name message ids, which mean nothing to the user.
    run.conflict = err instanceof ApiFailure && err.status === 409;
    if (run.conflict && opts.kind === "edit") {
      showBanner(EDIT_OVERTAKEN);
    } else if (run.conflict) {
      showBanner(
        "The answer was not regenerated: the conversation changed in another tab or window. " +
          "It is shown as it is now.",
      );
    } else if (!stopped && !(err instanceof AuthError)) {
      const what = opts.kind === "edit" ? "Your edit was not sent: " : "The answer was not regenerated: ";
      showBanner(what + reason);
    }
    return true;
  }

  /**
   * Follows the running answer of the open conversation when this page did not ask for it
   * (it was asked before a reload, or in another tab, or by a scheduled job, or it answers
   * a WhatsApp or Talk message): `/live` replays it from its start into a streaming bubble
   * at the end, which Stop stops as any answer; once it ends the conversation is reloaded,
   * so the view is what was stored. `tries` > 1 asks again a little later while nothing
   * runs yet (a message was stored there just before its answer started). A failed request
   * says nothing: the answer is stored all the same.
   */
  async function followLive(conversationId, tries = 1) {
    const c = state.current;
    if (state.streaming || state.following || !c || c.id !== conversationId) return;
    const controller = new AbortController();
    const pending = { conversationId, controller };
    state.following = pending;
    const wanted = () =>
      !controller.signal.aborted && !state.streaming && Boolean(state.current) && state.current.id === conversationId;
    let response = null;
    try {
      for (let n = 0; n < tries && wanted(); n += 1) {
        if (n) await new Promise((resolve) => window.setTimeout(resolve, 700));
        if (!wanted()) break;
        const headers = { Accept: "text/event-stream" };
        if (state.token) headers.Authorization = "Bearer " + state.token;
        response = await fetch("/api/conversations/" + encodeURIComponent(conversationId) + "/live", {
          headers,
          signal: controller.signal,
          cache: "no-store",
        });
        if (response.status !== 204) break;
      }
    } catch (_) {
      response = null; // unreachable, or left meanwhile: nothing to say
    } finally {
      if (state.following === pending) state.following = null;
    }
    // This page started an answer of its own meanwhile, or moved on: that one is shown.
    if (!response || response.status !== 200 || !wanted()) {
      controller.abort();
      return;
    }
    const bubble = addBubble("assistant", "");
    bubble.wrap.dataset.state = "streaming";
    showWait(bubble, "started", "Waiting for the model…");
    const run = newRun(controller, conversationId, bubble, "follow", null);
    state.streaming = run;
    updateComposer();
    updateMessageActions();
    scrollToEnd(false);
    let ended = false;
    try {
      ended = await consumeAnswer(response, run, {});
    } catch (_) {
      /* stopped following (another conversation opened), or the connection broke */
    } finally {
      clearWait(bubble);
      if (state.streaming === run) state.streaming = null;
      if (!ended) bubble.wrap.remove();
      updateComposer();
      updateMessageActions();
    }
    // Broken off (not stopped, nor left): shown again as stored once my-claw is back.
    if (!ended && !controller.signal.aborted) state.reloadOnReconnect = true;
    if (state.current && state.current.id === conversationId) refreshConversation().catch(() => {});
  }

  /**
   * The user leaves the conversation whose answer streams: this page stops reading it (the
   * server writes it to its end and stores it; its sidebar entry says "answering…"), so
   * sending works in any other conversation. Coming back follows it again (`followLive`)
   * while it runs, else shows it as stored. A request not answered yet is dropped only once
   * its response comes: aborted before, the server might never have taken the message.
   */
  function leaveAnswer() {
    if (state.following) {
      state.following.controller.abort();
      state.following = null;
    }
    const run = state.streaming;
    if (!run) return;
    run.detached = true;
    state.streaming = null;
    run.bubble.wrap.remove();
    if (run.accepted) run.controller.abort();
    updateComposer();
  }

  /** Says once, to screen readers, that the answer shown ended (the message list itself is
   * not a live region: each streamed re-render would be read out). */
  function announceAnswer(text, stopped) {
    const words = String(text).replace(/[#*_`>|~[\]()-]+/g, " ").trim().split(/\s+/).filter(Boolean);
    const start = words.slice(0, 12).join(" ");
    const said = (stopped ? "Answer stopped" : "Answer finished") + (start ? ": " + start + (words.length > 12 ? "…" : "") : ".");
    el.announcer.textContent = "";
    window.setTimeout(() => {
      el.announcer.textContent = said;
    }, 50);
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

  // A user message another page stored in the open conversation: its answer is about to
  // start there, and this page follows it.
  let refreshExpects = false;

  function scheduleRefresh(conversationId, userMessage) {
    window.clearTimeout(refreshTimer);
    refreshExpects = refreshExpects || Boolean(userMessage);
    refreshTimer = window.setTimeout(async () => {
      try {
        await loadConversations();
        const c = state.current;
        // Not while the last message is being edited (reloading would end the edit), nor
        // while this conversation's answer streams (it is shown as it comes).
        const answering = state.streaming && c && state.streaming.conversationId === c.id;
        const tries = refreshExpects ? 4 : 1;
        refreshExpects = false;
        if (!answering && !state.editing && c && (conversationId === null || c.id === conversationId)) {
          await refreshConversation(tries);
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
        for await (const event of sseEvents(response)) {
          if (event.type === "ready") {
            setConnection("live");
            hideBanner(true);
            delay = 1000;
            // Back after an answer lost its connection: show what the server kept.
            if (state.reloadOnReconnect) {
              state.reloadOnReconnect = false;
              state.dropLost = true;
              scheduleRefresh(null);
            }
          } else if (event.type === "message") {
            const own = state.streaming && state.streaming.conversationId === event.conversation_id;
            if (!own) scheduleRefresh(event.conversation_id, event.role === "user");
          } else if (event.type === "deleted") {
            conversationDeleted(Number(event.conversation_id));
          } else if (event.type === "renamed") {
            conversationRenamed(Number(event.conversation_id)).catch(() => {});
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
    showPersona(p);
    el.personaStatus.textContent = "";
  }

  /** Fills the form with the saved persona, which is what "unsaved changes" compare to. */
  function showPersona(p) {
    el.personaName.value = p.persona_name;
    el.personaPrompt.value = p.system_prompt;
    state.personaSaved = { name: p.persona_name, prompt: p.system_prompt };
  }

  function personaDirty() {
    const saved = state.personaSaved;
    return Boolean(saved) && !el.personaPanel.hidden &&
      (el.personaName.value !== saved.name || el.personaPrompt.value !== saved.prompt);
  }

  async function savePersona() {
    el.personaStatus.textContent = "Saving…";
    const asked = el.personaPrompt.value;
    const p = await api("/api/settings/persona", {
      method: "PUT",
      body: { persona_name: el.personaName.value, system_prompt: asked },
    });
    showPersona(p);
    // An empty system prompt is not kept: the server uses the default one, and says so by
    // sending it back. The form shows it, and the status says why it came back.
    el.personaStatus.textContent = !asked.trim() && p.system_prompt.trim()
      ? "Saved: the system prompt was empty, so the default one is used (shown above)."
      : "Saved: used from the next message on.";
  }

  /** Closes the persona panel; unsaved changes are discarded only when the user agrees.
   * Returns whether it is closed. */
  function closePersona() {
    if (el.personaPanel.hidden) return true;
    if (personaDirty() && !window.confirm("Discard your unsaved persona changes?")) return false;
    togglePanel(el.personaPanel, el.togglePersona, false);
    el.personaStatus.textContent = "";
    return true;
  }

  /** Opens or closes a settings panel. Only one is open at a time: with both open the
   * conversation would be squeezed to nothing. */
  function togglePanel(panel, button, open) {
    const show = open === undefined ? panel.hidden : open;
    if (show) {
      if (panel === el.cronPanel && !closePersona()) return false;
      if (panel === el.personaPanel && !el.cronPanel.hidden) togglePanel(el.cronPanel, el.toggleCron, false);
    }
    const focusWasInside = panel.contains(document.activeElement);
    panel.hidden = !show;
    button.setAttribute("aria-expanded", String(show));
    window.dispatchEvent(new CustomEvent("myclaw:panel", { detail: { id: panel.id, open: show } }));
    // Focus follows: into the panel when it opens (cron.js has filled it by now), back to
    // the button that opened it when it closes from inside (the button itself, Escape).
    if (show) {
      const first = panel.querySelector("input, textarea, select, button");
      if (first) first.focus();
    } else if (focusWasInside || document.activeElement === document.body) {
      focusVisible(button);
    }
    return show;
  }

  /** Closes the open settings panel (Escape in it); returns whether one was open. */
  function closeOpenPanel() {
    if (!el.personaPanel.hidden) {
      closePersona();
      return true;
    }
    if (!el.cronPanel.hidden) {
      togglePanel(el.cronPanel, el.toggleCron, false);
      return true;
    }
    return false;
  }

  /** Focuses `node`, or the message box when it cannot take the focus (the opener of a
   * panel is in the phone's closed drawer). */
  function focusVisible(node) {
    node.focus();
    if (document.activeElement !== node) focusComposer();
  }

  /** The message box gets the focus; the message list when the box is disabled (a
   * conversation of another channel is read-only). */
  function focusComposer() {
    if (!el.input.disabled) {
      el.input.focus();
    } else {
      el.messages.focus();
    }
  }

  // --- Layout ----------------------------------------------------------------------------

  /** The phone's conversation list, a drawer over the page: while it is open, the page
   * behind it can be neither focused nor clicked (`inert`), and the focus is in it. */
  function openSidebar() {
    el.app.classList.add("sidebar-open");
    el.scrim.hidden = false;
    el.main.inert = true;
    el.closeSidebar.focus();
  }

  /** Closes the phone's drawer; `returnFocus` puts the focus back on the button that opened
   * it (closed with its × button, Escape or the scrim, not by choosing something in it). */
  function closeSidebar(returnFocus) {
    if (!el.app.classList.contains("sidebar-open")) return;
    el.app.classList.remove("sidebar-open");
    el.scrim.hidden = true;
    el.main.inert = false;
    if (returnFocus === true) el.openSidebar.focus();
  }

  function touchInput() {
    return Boolean(window.matchMedia && window.matchMedia("(pointer: coarse)").matches);
  }

  function reportError(err) {
    if (err instanceof AuthError || err instanceof NetworkError) return;
    showBanner(describeError(err));
  }

  // --- Start -------------------------------------------------------------------------------

  async function start() {
    if (!state.token) {
      askToken(state.signInProblem);
      state.signInProblem = null;
      return;
    }
    try {
      await loadModels();
    } catch (err) {
      reportError(err);
      return;
    }
    closeTokenDialog();
    try {
      await loadConversations();
      const wanted = hashConversationId();
      const first = state.conversations.find((c) => c.channel === "webchat");
      if (wanted && state.conversations.some((c) => c.id === wanted)) {
        await openConversation(wanted, "replace");
      } else if (!state.current && first) {
        await openConversation(first.id, "replace");
      } else {
        if (!state.current && draftFor === undefined) showDraft(null);
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
    bindFollow();
    document.addEventListener("keydown", trapDialogFocus);
    el.skipLink.addEventListener("click", (e) => {
      // The link's own #input would replace the conversation in the address bar.
      e.preventDefault();
      el.input.focus();
    });
    el.tokenForm.addEventListener("submit", (e) => {
      e.preventDefault();
      const token = el.tokenInput.value.trim();
      if (!token) return;
      saveToken(token);
      // Closed at once, so a "cannot reach my-claw" banner shows with its Retry; a refused
      // token opens the dialog again.
      closeTokenDialog();
      start();
    });
    el.composer.addEventListener("submit", (e) => {
      e.preventDefault();
      sendMessage();
    });
    el.input.addEventListener("keydown", (e) => {
      // Enter sends; Shift+Enter (and Enter while composing with an IME) makes a new line.
      // On a touch screen the keyboard's Enter makes a new line and the Send button sends,
      // as in other chat apps: there is no Shift to hold.
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing && !touchInput()) {
        e.preventDefault();
        sendMessage();
      } else if (e.key === "ArrowUp" && !el.input.value && !e.isComposing) {
        if (startEdit()) e.preventDefault();
      }
    });
    document.addEventListener("keydown", (e) => {
      if (e.key !== "Escape") return;
      const inField = e.target instanceof Element && e.target.closest("input, textarea, select");
      // The phone's drawer closes first (a search field keeps Escape to clear its text).
      if (el.app.classList.contains("sidebar-open") && !(inField && inField.value)) {
        closeSidebar(true);
        return;
      }
      // Escape in a settings panel closes it, and the focus goes back to its button.
      if (e.target instanceof Element && e.target.closest("#persona-panel, #cron-panel") && closeOpenPanel()) {
        return;
      }
      // Escape in another field (search, persona, schedule form, sign-in) is that field's:
      // it never stops an answer nor ends an edit.
      const target = e.target instanceof Element ? e.target : null;
      if (target && target !== el.input && target.closest("input, textarea, select, [contenteditable]")) {
        closeChatMenu();
        return;
      }
      if (streamShown(state.streaming)) {
        requestStop(state.streaming);
      } else if (state.editing) {
        cancelEdit(true);
      } else {
        closeChatMenu();
      }
    });
    // The ⋯ menu closes on a click or tap anywhere outside it.
    document.addEventListener("click", (e) => {
      if (!el.actions.classList.contains("menu-open")) return;
      if (!(e.target instanceof Node) || !el.actions.contains(e.target)) closeChatMenu();
    });
    el.bannerClose.addEventListener("click", () => hideBanner());
    // Back and Forward between conversations, and a link or bookmark to `#c=<id>`, show
    // that conversation without a reload.
    window.addEventListener("popstate", followAddress);
    window.addEventListener("hashchange", followAddress);
    el.menuButton.addEventListener("click", toggleChatMenu);
    el.exportMd.addEventListener("click", () => exportCurrent("md").catch(reportError));
    el.exportJson.addEventListener("click", () => exportCurrent("json").catch(reportError));
    el.exportAll.addEventListener("click", () => download("/api/export", "my-claw-export.json").catch(reportError));
    el.importButton.addEventListener("click", () => el.importFile.click());
    el.importFile.addEventListener("change", () => importChosenFile());
    el.searchInput.addEventListener("input", scheduleSearch);
    el.searchForm.addEventListener("submit", (e) => {
      e.preventDefault();
      window.clearTimeout(searchTimer);
      runSearch().catch(reportError);
    });
    el.input.addEventListener("input", () => {
      autoGrow();
      updateComposer();
    });
    el.stop.addEventListener("click", () => {
      if (streamShown(state.streaming)) requestStop(state.streaming);
    });
    el.newChat.addEventListener("click", newChat);
    el.rename.addEventListener("click", () => {
      closeChatMenu();
      renameCurrent().catch(reportError);
    });
    el.del.addEventListener("click", () => {
      closeChatMenu();
      deleteCurrent().catch(reportError);
    });
    el.model.addEventListener("change", () => {
      titleModelSelect();
      try {
        window.localStorage.setItem(TIER_KEY, el.model.value);
      } catch (_) {
        /* not remembered */
      }
    });
    el.openSidebar.addEventListener("click", openSidebar);
    el.closeSidebar.addEventListener("click", () => closeSidebar(true));
    el.scrim.addEventListener("click", () => closeSidebar(true));
    // The drawer exists only on a narrow screen: widened, the page behind it comes back.
    if (window.matchMedia) {
      window.matchMedia("(max-width: 760px)").addEventListener("change", (e) => {
        if (!e.matches) closeSidebar();
      });
    }
    el.togglePersona.addEventListener("click", () => {
      if (!el.personaPanel.hidden) {
        closePersona();
      } else if (togglePanel(el.personaPanel, el.togglePersona, true)) {
        closeSidebar();
        loadPersona().catch((err) => {
          el.personaStatus.textContent = describeError(err);
        });
      }
    });
    el.personaClose.addEventListener("click", closePersona);
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

  bind();
  updateComposer();
  adoptSignInCode()
    .catch(() => {})
    .then(() => adoptTokenFromUrl())
    .catch(() => {})
    .then(() => {
      loadToken();
      start();
    });
})();
