// my-claw WebChat: the Schedules panel (cron jobs that make the assistant write first).
// Plain browser JavaScript, no build step. It fills `<section id="cron-panel">` and talks to
// `/api/cron/*` through `window.myClaw.api` (chat.js), which carries the token.
//
// Same security rule as chat.js: text from the server only reaches the page through
// textContent and DOM nodes built here; innerHTML is never used.
//
// Schedules are put in words by the server, never here: jobs carry their `description`,
// and the editor asks `/api/cron/describe` (debounced) as the user types, which also checks
// the expression and lists its next runs.

"use strict";

(() => {
  const CHANNELS = [
    ["webchat", "WebChat conversation"],
    ["whatsapp", "WhatsApp number"],
    ["nextcloud", "Nextcloud Talk room"],
  ];
  const TIERS = [
    ["main", "main (local)"],
    ["fast", "fast (local)"],
    ["smart", "smart (local)"],
    ["code", "code (Z.ai cloud)"],
    ["reason", "reason (Z.ai cloud)"],
  ];
  const TARGET_HINTS = {
    webchat: "The conversation the answers are written into.",
    whatsapp: "International format, e.g. +33612345678. Outside WhatsApp's 24-hour window only an approved template can be sent.",
    nextcloud: "The room token: the end of the room's link.",
  };
  const REFRESH_MS = 10000;
  /** Pause in the typing before the expression is sent to be described. */
  const DESCRIBE_DELAY_MS = 250;

  // --- The panel ---------------------------------------------------------------------------

  const panel = document.getElementById("cron-panel");
  if (!panel || !window.myClaw) return;
  const claw = window.myClaw;

  const state = {
    jobs: [],
    defaultTimezone: "",
    editing: null, // null: no form; {}: new job; a job: editing it
    history: new Set(), // ids of jobs whose history is shown
    busy: new Set(), // ids of jobs with a run-now in flight
    timer: 0,
    describeTimer: 0,
    describeSeq: 0,
  };

  /** Builds an element: h("button", { class: "btn", onclick }, "text", child…). */
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "class") node.className = value;
      else if (value === true) node.setAttribute(key, "");
      else node.setAttribute(key, String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  /** A time in the job's zone, which is named: the viewer's own zone may differ. */
  function formatTime(ms, timezone) {
    if (ms === null || ms === undefined) return "—";
    try {
      const text = new Intl.DateTimeFormat(undefined, {
        timeZone: timezone || undefined,
        dateStyle: "medium",
        timeStyle: "medium",
      }).format(new Date(ms));
      const zone = timezone || Intl.DateTimeFormat().resolvedOptions().timeZone;
      return zone ? text + " " + zone : text;
    } catch (_) {
      return new Date(ms).toLocaleString() + " (your local time)";
    }
  }

  function relative(ms) {
    const seconds = Math.round((ms - Date.now()) / 1000);
    const abs = Math.abs(seconds);
    let text;
    if (abs < 60) text = abs + " s";
    else if (abs < 3600) text = Math.round(abs / 60) + " min";
    else if (abs < 86400 * 2) text = Math.round(abs / 3600) + " h";
    else text = Math.round(abs / 86400) + " days";
    return seconds >= 0 ? "in " + text : text + " ago";
  }

  function describeError(err) {
    return String((err && err.message) || err);
  }

  async function load() {
    try {
      const data = await claw.api("/api/cron/jobs");
      state.jobs = data.jobs || [];
      state.defaultTimezone = data.default_timezone || "";
      renderList();
    } catch (err) {
      setStatus("Could not load the schedules: " + describeError(err), true);
    }
  }

  function setStatus(text, isError) {
    const status = panel.querySelector("#cron-status");
    if (!status) return;
    status.textContent = text || "";
    status.className = isError ? "error-text" : "hint";
  }

  function render() {
    panel.replaceChildren(
      h("h2", { id: "cron-heading" }, "Schedules"),
      h(
        "p",
        { class: "hint" },
        "Jobs that make the assistant write first: at each run the prompt is answered in the target conversation (with its history and the persona) and the answer is sent on its channel."
      ),
      h(
        "div",
        { class: "row" },
        h("button", { id: "cron-new", class: "btn primary small", type: "button", onclick: () => openForm({}) }, "+ New schedule"),
        h("button", { id: "cron-refresh", class: "btn small", type: "button", onclick: load }, "Refresh"),
        h("button", { id: "cron-close", class: "btn ghost small", type: "button", onclick: closePanel }, "Close"),
        h("span", { id: "cron-status", class: "hint", role: "status" })
      ),
      h("div", { id: "cron-form-slot" }),
      h("ul", { id: "cron-jobs", class: "cron-jobs" })
    );
    const list = panel.querySelector("#cron-jobs");
    list.style.listStyle = "none";
    list.style.padding = "0";
    list.style.margin = "10px 0 0";
    list.style.display = "grid";
    list.style.gap = "8px";
    list.style.maxWidth = "760px";
    renderForm();
    renderList();
  }

  function renderList() {
    const list = panel.querySelector("#cron-jobs");
    if (!list) return;
    if (state.jobs.length === 0) {
      list.replaceChildren(h("li", { class: "hint" }, "No schedules yet."));
      return;
    }
    list.replaceChildren(...state.jobs.map(jobItem));
  }

  function conversationTitle(id) {
    const c = claw.conversations().find((conv) => String(conv.id) === String(id));
    return c ? c.title || "conversation " + c.id : "conversation " + id;
  }

  function targetText(job) {
    if (job.channel === "webchat") return "WebChat: " + conversationTitle(job.target);
    if (job.channel === "whatsapp") return "WhatsApp: +" + job.target;
    return "Nextcloud Talk: " + job.target;
  }

  function jobItem(job) {
    const zone = job.effective_timezone;
    const outcome = job.last_outcome;
    const item = h(
      "li",
      { class: "cron-job", "data-job-id": job.id, "data-enabled": String(job.enabled) },
      h(
        "div",
        { class: "row" },
        h("strong", { class: "cron-name" }, job.name),
        job.kind === "reminder"
          ? h("span", { class: "badge cron-kind", title: "Set by asking the assistant; posts its text as is" }, "reminder")
          : h("span", { class: "badge" }, job.tier || "main"),
        job.enabled ? null : h("span", { class: "badge" }, "disabled")
      ),
      h("p", { class: "hint cron-when" }, job.description + " — ", h("code", {}, job.schedule)),
      h("p", { class: "hint" }, targetText(job)),
      h(
        "p",
        { class: "hint cron-next" },
        "Next run: ",
        job.next_run ? formatTime(job.next_run, zone) + " (" + relative(job.next_run) + ")" : "— (disabled)"
      ),
      h(
        "p",
        { class: "hint cron-last", "data-outcome": outcome || "" },
        "Last run: ",
        job.last_run ? formatTime(job.last_run, zone) + " — " + (outcome || "?") : "never",
        job.last_error ? h("span", { class: outcome === "failed" ? "error-text" : "hint" }, " " + job.last_error) : null
      ),
      h(
        "div",
        { class: "row" },
        h("label", { class: "hint" },
          h("input", {
            type: "checkbox",
            class: "cron-enabled",
            checked: job.enabled,
            onchange: (e) => setEnabled(job, e.target.checked),
          }),
          " enabled"),
        h("button", {
          class: "btn small cron-run",
          type: "button",
          disabled: state.busy.has(job.id) || outcome === "running",
          onclick: () => runNow(job),
        }, state.busy.has(job.id) ? "Running…" : "Run now"),
        h("button", { class: "btn small cron-edit", type: "button", onclick: () => openForm(job) }, "Edit"),
        h("button", { class: "btn small cron-history", type: "button", onclick: () => toggleHistory(job) },
          state.history.has(job.id) ? "Hide history" : "History"),
        h("button", { class: "btn small danger cron-delete", type: "button", onclick: () => remove(job) }, "Delete")
      ),
      h("div", { class: "cron-runs" })
    );
    item.style.border = "1px solid var(--line)";
    item.style.borderRadius = "var(--radius)";
    item.style.padding = "8px 12px";
    if (!job.enabled) item.style.opacity = "0.7";
    if (state.history.has(job.id)) loadHistory(job, item.querySelector(".cron-runs"));
    return item;
  }

  async function loadHistory(job, slot) {
    slot.replaceChildren(h("p", { class: "hint" }, "Loading…"));
    try {
      const data = await claw.api("/api/cron/jobs/" + job.id + "/runs?limit=10");
      const runs = data.runs || [];
      if (runs.length === 0) {
        slot.replaceChildren(h("p", { class: "hint" }, "No runs yet."));
        return;
      }
      slot.replaceChildren(
        h("ul", { class: "hint" }, runs.map((run) =>
          h("li", { "data-outcome": run.outcome },
            formatTime(run.started_at, job.effective_timezone) + " — " + run.outcome +
              (run.duration_ms !== null ? " in " + (run.duration_ms / 1000).toFixed(1) + " s" : ""),
            run.error ? h("span", { class: run.outcome === "failed" ? "error-text" : "hint" }, " " + run.error) : null)))
      );
    } catch (err) {
      slot.replaceChildren(h("p", { class: "error-text" }, describeError(err)));
    }
  }

  function toggleHistory(job) {
    if (state.history.has(job.id)) state.history.delete(job.id);
    else state.history.add(job.id);
    renderList();
  }

  async function setEnabled(job, enabled) {
    try {
      await claw.api("/api/cron/jobs/" + job.id, { method: "PUT", body: { enabled } });
      setStatus(enabled ? "“" + job.name + "” enabled." : "“" + job.name + "” disabled.");
    } catch (err) {
      setStatus(describeError(err), true);
    }
    await load();
  }

  async function runNow(job) {
    state.busy.add(job.id);
    renderList();
    setStatus("Running “" + job.name + "”…");
    try {
      const run = await claw.api("/api/cron/jobs/" + job.id + "/run", { method: "POST" });
      if (run.outcome === "delivered") setStatus("“" + job.name + "” delivered." + (run.error ? " " + run.error : ""));
      else setStatus("“" + job.name + "” failed: " + (run.error || "unknown reason"), true);
    } catch (err) {
      setStatus(describeError(err), true);
    } finally {
      state.busy.delete(job.id);
    }
    await load();
  }

  async function remove(job) {
    if (!window.confirm("Delete the schedule “" + job.name + "” and its history?")) return;
    try {
      await claw.api("/api/cron/jobs/" + job.id, { method: "DELETE" });
      setStatus("“" + job.name + "” deleted.");
      if (state.editing && state.editing.id === job.id) state.editing = null;
      renderForm();
    } catch (err) {
      setStatus(describeError(err), true);
    }
    await load();
  }

  // --- The create / edit form -------------------------------------------------------------

  function openForm(job) {
    state.editing = job;
    renderForm();
    const name = panel.querySelector("#cron-name");
    if (name) name.focus();
  }

  function closeForm() {
    state.editing = null;
    renderForm();
  }

  function options(pairs, selected) {
    return pairs.map(([value, label]) => h("option", { value, selected: value === selected }, label));
  }

  function timezoneList() {
    try {
      return Intl.supportedValuesOf("timeZone");
    } catch (_) {
      return ["UTC", "Europe/Paris", "Europe/London", "America/New_York", "Asia/Tokyo"];
    }
  }

  function renderForm() {
    const slot = panel.querySelector("#cron-form-slot");
    if (!slot) return;
    const job = state.editing;
    if (!job) {
      slot.replaceChildren();
      return;
    }
    const isNew = job.id === undefined;
    const channel = job.channel || "webchat";
    const form = h(
      "form",
      { id: "cron-form", class: "persona-form", onsubmit: (e) => { e.preventDefault(); save(); } },
      h("h2", {}, isNew ? "New schedule" : "Edit “" + job.name + "”"),
      h("label", { for: "cron-name" }, "Name"),
      h("input", { id: "cron-name", maxlength: 100, autocomplete: "off", value: job.name || "", placeholder: "Morning briefing" }),
      h("label", { for: "cron-schedule" }, "When (cron expression, or at YYYY-MM-DD HH:MM for once)"),
      h("input", {
        id: "cron-schedule",
        autocomplete: "off",
        spellcheck: "false",
        required: true,
        value: job.schedule || "0 8 * * *",
        placeholder: "0 8 * * *",
        oninput: updateDescription,
      }),
      h("p", { id: "cron-description", class: "hint", "aria-live": "polite" }),
      h("p", { id: "cron-preview", class: "hint" }),
      h("p", { class: "hint" }, "minute hour day-of-month month weekday — or 6 fields with seconds first. Examples: 30 7 * * 1-5 (weekdays at 07:30), 0 */2 * * * (every 2 hours), @daily."),
      h("label", { for: "cron-timezone" }, "Time zone"),
      h("input", {
        id: "cron-timezone",
        list: "cron-timezones",
        autocomplete: "off",
        value: job.timezone || "",
        placeholder: "default: " + state.defaultTimezone,
        "aria-describedby": "cron-timezone-note",
        oninput: () => {
          clearTimezoneNote();
          updateDescription();
        },
        onchange: checkTimezone,
      }),
      h("p", { id: "cron-timezone-note", class: "error-text", role: "alert" }),
      h("datalist", { id: "cron-timezones" }, timezoneList().map((tz) => h("option", { value: tz }))),
      h("label", { for: "cron-channel" }, "Send to"),
      // A reminder writes back where it was asked: its destination is not editable.
      h("select", { id: "cron-channel", onchange: renderTarget, disabled: job.kind === "reminder" }, options(CHANNELS, channel)),
      h("div", { id: "cron-target-slot", class: "persona-form" }),
      h("label", { for: "cron-prompt" }, job.kind === "reminder" ? "Reminder text" : "Prompt"),
      h("textarea", { id: "cron-prompt", rows: 4, required: true, placeholder: "Give me a short, upbeat plan for today." }, job.prompt || ""),
      // A reminder posts its text as is: no model is asked, so none is chosen.
      job.kind === "reminder" ? null : h("label", { for: "cron-tier" }, "Model"),
      job.kind === "reminder" ? null : h("select", { id: "cron-tier" }, options(TIERS, job.tier || "main")),
      h("label", { class: "hint" }, h("input", { id: "cron-enabled", type: "checkbox", checked: job.enabled !== false }), " enabled"),
      h(
        "div",
        { class: "row" },
        h("button", { id: "cron-save", class: "btn primary", type: "submit" }, isNew ? "Create" : "Save"),
        h("button", { class: "btn ghost", type: "button", onclick: closeForm }, "Cancel"),
        h("span", { id: "cron-form-status", class: "hint", role: "status" })
      )
    );
    form.style.marginTop = "10px";
    slot.replaceChildren(form);
    renderTarget();
    updateDescription();
  }

  function renderTarget() {
    const slot = panel.querySelector("#cron-target-slot");
    const channel = panel.querySelector("#cron-channel").value;
    const job = state.editing || {};
    const current = job.channel === channel ? job.target : "";
    // A reminder writes back where it was asked: its target is shown, not editable.
    const fixed = job.kind === "reminder";
    let field;
    if (channel === "webchat") {
      const conversations = claw.conversations().filter((c) => c.channel === "webchat");
      const selected = current || String(claw.currentConversationId() || "");
      const listed = conversations.some((c) => String(c.id) === selected);
      field = h(
        "select",
        { id: "cron-target", disabled: fixed },
        h("option", { value: "" }, conversations.length ? "Choose a conversation" : "No WebChat conversation yet: start one first"),
        fixed && selected && !listed ? h("option", { value: selected, selected: true }, conversationTitle(selected)) : null,
        conversations.map((c) =>
          h("option", { value: String(c.id), selected: String(c.id) === selected }, c.title || "conversation " + c.id))
      );
    } else {
      const value = channel === "whatsapp" && current ? "+" + current : current;
      field = h("input", {
        id: "cron-target",
        autocomplete: "off",
        spellcheck: "false",
        value,
        disabled: fixed,
        placeholder: channel === "whatsapp" ? "+33612345678" : "room token",
      });
    }
    const hint = fixed ? "A reminder writes back where it was asked: its destination cannot change." : TARGET_HINTS[channel];
    slot.replaceChildren(h("label", { for: "cron-target" }, "Target"), field, h("p", { class: "hint" }, hint));
  }

  /** Asks the server for the words and the next runs once the typing pauses. */
  function updateDescription() {
    const expression = panel.querySelector("#cron-schedule").value;
    const timezone = panel.querySelector("#cron-timezone").value.trim();
    const seq = ++state.describeSeq;
    window.clearTimeout(state.describeTimer);
    if (!expression.trim()) {
      showDescription("Write a cron expression, e.g. 0 8 * * * for every day at 08:00.", "", true, expression);
      return;
    }
    state.describeTimer = window.setTimeout(() => describe(seq, expression, timezone), DESCRIBE_DELAY_MS);
  }

  async function describe(seq, expression, timezone) {
    const query = new URLSearchParams({ expression });
    if (timezone) query.set("timezone", timezone);
    try {
      const result = await claw.api("/api/cron/describe?" + query.toString());
      // An older answer that arrives late must not replace a newer one.
      if (seq !== state.describeSeq) return;
      const times = (result.next_runs || []).map((ms) => formatTime(ms, result.timezone));
      showDescription(result.description, times.length ? "Next runs: " + times.join(" · ") : "", false, expression);
    } catch (err) {
      if (seq !== state.describeSeq) return;
      showDescription(describeError(err), "", true, expression);
    }
  }

  /** Checks the zone once the field is left: a mistyped one is said beside it (the server
   * knows the zones; the expression asked about is a fixed, valid one, so the answer is
   * about the zone alone). */
  async function checkTimezone() {
    const field = panel.querySelector("#cron-timezone");
    if (!field) return;
    const zone = field.value.trim();
    if (!zone) {
      clearTimezoneNote();
      return;
    }
    const query = new URLSearchParams({ expression: "0 8 * * *", timezone: zone });
    try {
      await claw.api("/api/cron/describe?" + query.toString());
      if (field.value.trim() === zone) clearTimezoneNote();
    } catch (err) {
      const note = panel.querySelector("#cron-timezone-note");
      if (!note || field.value.trim() !== zone) return;
      field.setAttribute("aria-invalid", "true");
      note.textContent = "Time zone “" + zone + "”: " + describeError(err);
    }
  }

  function clearTimezoneNote() {
    const field = panel.querySelector("#cron-timezone");
    const note = panel.querySelector("#cron-timezone-note");
    if (field) field.removeAttribute("aria-invalid");
    if (note) note.textContent = "";
  }

  /** Shows what the server said of `expression`, which the line names in `data-expression`
   * (while the typing pauses, the line still speaks of the expression before). */
  function showDescription(text, nextRuns, isError, expression) {
    const line = panel.querySelector("#cron-description");
    const preview = panel.querySelector("#cron-preview");
    if (!line || !preview) return;
    line.textContent = text;
    line.dataset.expression = expression;
    line.className = isError ? "error-text" : "hint";
    preview.textContent = nextRuns;
  }

  async function save() {
    const job = state.editing;
    if (!job) return;
    const value = (id) => panel.querySelector("#" + id).value;
    const body = {
      name: value("cron-name"),
      schedule: value("cron-schedule"),
      timezone: value("cron-timezone").trim() || null,
      prompt: value("cron-prompt"),
      enabled: panel.querySelector("#cron-enabled").checked,
    };
    // A reminder keeps its destination and asks no model: those are not sent.
    if (job.kind !== "reminder") {
      body.channel = value("cron-channel");
      body.target = value("cron-target");
      body.tier = value("cron-tier");
    }
    const status = panel.querySelector("#cron-form-status");
    status.textContent = "Saving…";
    status.className = "hint";
    // The note of an earlier save ("saved: next run …") would contradict what comes now.
    setStatus("");
    try {
      const isNew = job.id === undefined;
      const saved = await claw.api(isNew ? "/api/cron/jobs" : "/api/cron/jobs/" + job.id, {
        method: isNew ? "POST" : "PUT",
        body,
      });
      state.editing = null;
      renderForm();
      setStatus("“" + saved.name + "” saved" + (saved.next_run ? ": next run " + relative(saved.next_run) + "." : "."));
      await load();
    } catch (err) {
      status.textContent = describeError(err);
      status.className = "error-text";
    }
  }

  // --- Opening and closing -----------------------------------------------------------------

  function closePanel() {
    const button = document.getElementById("toggle-cron");
    if (button && !panel.hidden) button.click();
  }

  function onOpen() {
    if (!panel.querySelector("#cron-jobs")) render();
    load();
    window.clearInterval(state.timer);
    // Next runs and outcomes move on by themselves: refresh while the panel is open, but
    // never under the user's typing (the form is kept as it is).
    state.timer = window.setInterval(() => {
      if (!panel.hidden) load();
    }, REFRESH_MS);
  }

  window.addEventListener("myclaw:panel", (event) => {
    if (!event.detail || event.detail.id !== panel.id) return;
    if (event.detail.open) onOpen();
    else window.clearInterval(state.timer);
  });
  if (!panel.hidden) onOpen();
})();
