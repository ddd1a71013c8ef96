// my-claw WebChat: the Schedules panel (cron jobs that make the assistant write first).
// Plain browser JavaScript, no build step. It fills `<section id="cron-panel">` and talks to
// `/api/cron/*` through `window.myClaw.api` (chat.js), which carries the token.
//
// Same security rule as chat.js: text from the server only reaches the page through
// textContent and DOM nodes built here; innerHTML is never used.
//
// `describeSchedule(expression, timezone)` explains an expression in words as the user
// types ("every day at 08:00 Europe/Paris"); the server's preview then confirms it and
// lists the next runs. The describer is exported as `window.myClawCron.describeSchedule`.

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

  // --- Describing cron expressions ---------------------------------------------------------

  const DAY_NAMES = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
  const MONTH_NAMES = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
  ];
  const DAY_ALIASES = { SUN: 0, MON: 1, TUE: 2, WED: 3, THU: 4, FRI: 5, SAT: 6 };
  const MONTH_ALIASES = {
    JAN: 1, FEB: 2, MAR: 3, APR: 4, MAY: 5, JUN: 6, JUL: 7, AUG: 8, SEP: 9, OCT: 10, NOV: 11, DEC: 12,
  };
  const NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
  };

  const pad = (n) => String(n).padStart(2, "0");
  const isNumber = (s) => /^\d+$/.test(s);
  const isStar = (s) => s === "*" || s === "?";

  /** "a", "a and b", "a, b and c". */
  function joinWords(items) {
    if (items.length <= 1) return items.join("");
    return items.slice(0, -1).join(", ") + " and " + items[items.length - 1];
  }

  /** The values of a list field of plain numbers or names (`1,3,5`, `MON-FRI`), or null. */
  function listValues(field, aliases, max) {
    const values = [];
    for (const part of field.toUpperCase().split(",")) {
      const range = part.split("-");
      if (range.length > 2) return null;
      const nums = range.map((p) => (p in aliases ? aliases[p] : isNumber(p) ? Number(p) : NaN));
      if (nums.some((n) => Number.isNaN(n) || n > max)) return null;
      if (nums.length === 1) values.push(nums[0]);
      else {
        if (nums[0] > nums[1]) return null;
        for (let n = nums[0]; n <= nums[1]; n++) values.push(n);
      }
    }
    return values;
  }

  function describeDays(field) {
    const days = listValues(field, DAY_ALIASES, 7);
    if (!days) return null;
    const set = [...new Set(days.map((d) => d % 7))].sort();
    const key = set.join(",");
    if (key === "1,2,3,4,5") return "every weekday (Monday to Friday)";
    if (key === "0,6") return "every weekend day";
    if (set.length === 7) return "every day";
    return "every " + joinWords(set.map((d) => DAY_NAMES[d]));
  }

  function describeMonths(field) {
    const months = listValues(field, MONTH_ALIASES, 12);
    if (!months || months.some((m) => m < 1)) return null;
    return joinWords(months.map((m) => MONTH_NAMES[m - 1]));
  }

  function ordinal(n) {
    const rem100 = n % 100;
    if (rem100 >= 11 && rem100 <= 13) return n + "th";
    return n + ({ 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th");
  }

  /** The time-of-day part: "at 08:00", "at 08:00 and 18:30", "every 2 hours at :15"… */
  function describeTime(second, minute, hour) {
    if (!isNumber(second) || Number(second) > 59) return null;
    const secText = (s) => (s === "0" ? "" : ":" + pad(s));
    if (isNumber(minute) && hour.split(",").every(isNumber)) {
      const hours = hour.split(",").map(Number);
      if (hours.some((h) => h > 23) || Number(minute) > 59) return null;
      return "at " + joinWords(hours.map((h) => pad(h) + ":" + pad(minute) + secText(second)));
    }
    if (isNumber(minute) && isStar(hour)) {
      return "every hour at :" + pad(minute) + secText(second);
    }
    const everyHours = /^(?:\*|0)\/(\d+)$/.exec(hour);
    if (isNumber(minute) && everyHours) {
      return "every " + everyHours[1] + " hours at :" + pad(minute) + secText(second);
    }
    return null;
  }

  /** Explains common patterns in words; a field-by-field reading otherwise. */
  function describeSchedule(expression, timezone) {
    const text = String(expression || "").trim();
    if (!text) return { ok: false, text: "Write a cron expression, e.g. 0 8 * * * for every day at 08:00." };
    let fields = text.split(/\s+/);
    if (fields.length === 1 && fields[0].startsWith("@")) {
      const expanded = NICKNAMES[fields[0].toLowerCase()];
      if (!expanded) return { ok: false, text: "Unknown shortcut: use @hourly, @daily, @weekly, @monthly or @yearly." };
      fields = expanded.split(" ");
    }
    if (fields.length !== 5 && fields.length !== 6) {
      return {
        ok: false,
        text: fields.length + " fields: write 5 (minute hour day month weekday) or 6 (seconds first).",
      };
    }
    if (fields.length === 5) fields = ["0", ...fields];
    const [second, minute, hour, dom, month, dow] = fields;
    // The zone only matters once the hour or the day is fixed.
    const zoneMatters = !(isStar(hour) && isStar(dom) && isStar(month) && isStar(dow));
    const zone = timezone && zoneMatters ? " " + timezone : "";
    const words = describeFields(second, minute, hour, dom, month, dow);
    return { ok: true, text: words + zone };
  }

  function describeFields(second, minute, hour, dom, month, dow) {
    const allDays = isStar(dom) && isStar(month) && isStar(dow);
    const restStar = isStar(minute) && isStar(hour) && allDays;
    // Sub-minute and sub-hour repeats.
    if (second === "*" && restStar) return "every second";
    const everySeconds = /^(?:\*|0)\/(\d+)$/.exec(second);
    if (everySeconds && restStar) return "every " + everySeconds[1] + " seconds";
    if (second === "0" && restStar) return "every minute";
    const everyMinutes = /^(?:\*|0)\/(\d+)$/.exec(minute);
    if (second === "0" && everyMinutes && isStar(hour) && allDays) {
      return "every " + everyMinutes[1] + " minutes";
    }
    const time = describeTime(second, minute, hour);
    if (time) {
      if (allDays) return time.startsWith("every") ? time : "every day " + time;
      if (isStar(dom) && isStar(month)) {
        const days = describeDays(dow);
        if (days) return days + (time.startsWith("every") ? ", " : " ") + time;
      }
      if (isNumber(dom) && isStar(dow)) {
        if (isStar(month)) return "on the " + ordinal(Number(dom)) + " of every month " + time;
        const months = describeMonths(month);
        if (months) return "every year on " + Number(dom) + " " + months + " " + time;
      }
      if (dom.toUpperCase() === "L" && isStar(month) && isStar(dow)) {
        return "on the last day of every month " + time;
      }
    }
    return genericReading(second, minute, hour, dom, month, dow);
  }

  function genericReading(second, minute, hour, dom, month, dow) {
    const part = (name, value) => (isStar(value) ? null : name + " " + value);
    const parts = [
      part("second", second === "0" ? "*" : second),
      part("minute", minute),
      part("hour", hour),
      part("day of month", dom),
      part("month", month),
      part("weekday", dow),
    ].filter(Boolean);
    if (parts.length === 0) return "every second";
    let text = "when " + joinWords(parts);
    if (!isStar(dom) && !isStar(dow)) text += " (both the day and the weekday must match)";
    return text;
  }

  window.myClawCron = { describeSchedule };

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
    previewTimer: 0,
    previewSeq: 0,
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

  function formatTime(ms, timezone) {
    if (ms === null || ms === undefined) return "—";
    try {
      return new Intl.DateTimeFormat(undefined, {
        timeZone: timezone || undefined,
        dateStyle: "medium",
        timeStyle: "medium",
      }).format(new Date(ms));
    } catch (_) {
      return new Date(ms).toLocaleString();
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
    const described = describeSchedule(job.schedule, zone);
    const outcome = job.last_outcome;
    const item = h(
      "li",
      { class: "cron-job", "data-job-id": job.id, "data-enabled": String(job.enabled) },
      h(
        "div",
        { class: "row" },
        h("strong", { class: "cron-name" }, job.name),
        h("span", { class: "badge" }, job.tier || "main"),
        job.enabled ? null : h("span", { class: "badge" }, "disabled")
      ),
      h("p", { class: "hint cron-when" }, described.text + " — ", h("code", {}, job.schedule)),
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
      h("label", { for: "cron-schedule" }, "When (cron expression)"),
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
        oninput: updateDescription,
      }),
      h("datalist", { id: "cron-timezones" }, timezoneList().map((tz) => h("option", { value: tz }))),
      h("label", { for: "cron-channel" }, "Send to"),
      h("select", { id: "cron-channel", onchange: renderTarget }, options(CHANNELS, channel)),
      h("div", { id: "cron-target-slot", class: "persona-form" }),
      h("label", { for: "cron-prompt" }, "Prompt"),
      h("textarea", { id: "cron-prompt", rows: 4, required: true, placeholder: "Give me a short, upbeat plan for today." }, job.prompt || ""),
      h("label", { for: "cron-tier" }, "Model"),
      h("select", { id: "cron-tier" }, options(TIERS, job.tier || "main")),
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
    let field;
    if (channel === "webchat") {
      const conversations = claw.conversations().filter((c) => c.channel === "webchat");
      const selected = current || String(claw.currentConversationId() || "");
      field = h(
        "select",
        { id: "cron-target" },
        h("option", { value: "" }, conversations.length ? "Choose a conversation" : "No WebChat conversation yet: start one first"),
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
        placeholder: channel === "whatsapp" ? "+33612345678" : "room token",
      });
    }
    slot.replaceChildren(h("label", { for: "cron-target" }, "Target"), field, h("p", { class: "hint" }, TARGET_HINTS[channel]));
  }

  /** The words at once; the server's check and next runs after a short pause. */
  function updateDescription() {
    const expression = panel.querySelector("#cron-schedule").value;
    const timezone = panel.querySelector("#cron-timezone").value.trim();
    const described = describeSchedule(expression, timezone || state.defaultTimezone);
    const line = panel.querySelector("#cron-description");
    line.textContent = described.text;
    line.className = described.ok ? "hint" : "error-text";
    window.clearTimeout(state.previewTimer);
    state.previewTimer = window.setTimeout(() => preview(expression, timezone), 300);
  }

  async function preview(expression, timezone) {
    const seq = ++state.previewSeq;
    const line = panel.querySelector("#cron-preview");
    if (!line) return;
    if (!expression.trim()) {
      line.textContent = "";
      return;
    }
    try {
      const body = { schedule: expression };
      if (timezone) body.timezone = timezone;
      const result = await claw.api("/api/cron/preview", { method: "POST", body });
      if (seq !== state.previewSeq) return;
      const times = (result.next_runs || []).map((ms) => formatTime(ms, result.timezone));
      line.textContent = times.length ? "Next runs: " + times.join(" · ") : "";
      line.className = "hint";
    } catch (err) {
      if (seq !== state.previewSeq) return;
      line.textContent = describeError(err);
      line.className = "error-text";
    }
  }

  async function save() {
    const job = state.editing;
    if (!job) return;
    const value = (id) => panel.querySelector("#" + id).value;
    const body = {
      name: value("cron-name"),
      schedule: value("cron-schedule"),
      timezone: value("cron-timezone").trim() || null,
      channel: value("cron-channel"),
      target: value("cron-target"),
      prompt: value("cron-prompt"),
      tier: value("cron-tier"),
      enabled: panel.querySelector("#cron-enabled").checked,
    };
    const status = panel.querySelector("#cron-form-status");
    status.textContent = "Saving…";
    status.className = "hint";
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
