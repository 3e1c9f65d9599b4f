// The demo page: previews, POST /caption-images, per-file results, the cache reset button.
// Everything shown comes from files or the server and goes into the page as text (textContent, attributes
// set as properties), never as HTML, so a file name or caption with markup is shown literally.
"use strict";

(() => {
  const page = JSON.parse(document.getElementById("page-data").textContent);
  const $ = (id) => document.getElementById(id);

  const form = $("caption-form");
  const fileInput = $("file-input");
  const dropzone = $("dropzone");
  const promptInput = $("prompt");
  const captionButton = $("caption-button");
  const formStatus = $("form-status");
  const resultsList = $("results");
  const summary = $("results-summary");
  const emptyState = $("empty-state");
  const template = $("card-template");
  const cacheForm = $("cache-form");
  const tokenInput = $("admin-token");
  const cacheButton = $("clear-cache");
  const cacheStatus = $("cache-status");

  // A big selection goes out in requests of at most this many files, so results appear as each request
  // finishes, and every request stays within the server's limits (the page is told them when the server
  // passes `limits`; else the documented defaults, MAX_FILES_PER_REQUEST=32 and MAX_REQUEST_BYTES=64 MiB).
  const FILES_PER_REQUEST = 8;
  const limits = page.limits || {};
  const maxFilesPerRequest = Math.min(FILES_PER_REQUEST, limits.max_files_per_request || 32);
  // Multipart framing per file is a few hundred bytes; keep well clear of the server's request limit.
  const maxRequestBytes = (limits.max_request_bytes || 64 * 1024 * 1024) - 64 * 1024;
  const COPY_FEEDBACK_MS = 1600;

  /** @type {{file: File, url: string|null, el: HTMLElement, state: string}[]} */
  let cards = [];
  let running = false;

  // ----- small helpers ---------------------------------------------------------------------------------------
  function plural(n, one, many) {
    return `${n} ${n === 1 ? one : many}`;
  }

  function formatBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(n < 10 * 1024 ? 1 : 0)} KB`;
    return `${(n / (1024 * 1024)).toFixed(1)} MB`;
  }

  function setStatus(el, text, kind) {
    el.textContent = text;
    el.classList.toggle("is-error", kind === "error");
    el.classList.toggle("is-ok", kind === "ok");
  }

  function part(card, selector) {
    return card.el.querySelector(selector);
  }

  function updateEmptyState() {
    emptyState.hidden = cards.length > 0;
  }

  // ----- cards -----------------------------------------------------------------------------------------------
  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    if (!files.length) return;
    for (const file of files) cards.push(makeCard(file));
    updateEmptyState();
    const queued = cards.filter((c) => c.state === "queued").length;
    setStatus(formStatus, running
      ? `${plural(queued, "image", "images")} waiting for the next run.`
      : `${plural(queued, "image", "images")} ready. Press “Caption Images”.`);
  }

  function makeCard(file) {
    const el = template.content.firstElementChild.cloneNode(true);
    const card = { file, url: null, el, state: "queued" };
    el.querySelector(".card__name").textContent = file.name || "(unnamed file)";
    el.querySelector(".card__meta").textContent = describeFile(file);
    const remove = el.querySelector(".card__remove");
    remove.setAttribute("aria-label", `Remove ${file.name || "this file"}`);
    remove.addEventListener("click", () => removeCard(card));

    const img = el.querySelector(".card__img");
    const noPreview = el.querySelector(".card__noimg");
    if (!file.type || file.type.startsWith("image/")) {
      card.url = URL.createObjectURL(file);
      img.alt = `Preview of ${file.name}`;
      img.addEventListener("error", () => {
        img.hidden = true;
        noPreview.hidden = false;
      });
      img.src = card.url;
    } else {
      img.hidden = true;
      noPreview.hidden = false;
    }
    el.querySelector(".copy-caption").addEventListener("click", (e) =>
      copyText(card.caption || "", e.currentTarget));
    el.querySelector(".copy-tags").addEventListener("click", (e) =>
      copyText((card.tags || []).join(", "), e.currentTarget));
    setState(card, "queued");
    resultsList.append(el);
    return card;
  }

  function describeFile(file, prompt) {
    const bits = [formatBytes(file.size)];
    if (file.type) bits.push(file.type);
    if (prompt) bits.push(`prompt “${prompt}”`);
    return bits.join(" · ");
  }

  function removeCard(card) {
    if (card.state === "pending") return;
    if (card.url) URL.revokeObjectURL(card.url);
    card.el.remove();
    cards = cards.filter((c) => c !== card);
    updateEmptyState();
  }

  function setState(card, state) {
    card.state = state;
    const el = card.el;
    el.dataset.state = state;
    el.classList.toggle("is-pending", state === "pending");
    el.classList.toggle("is-error", state === "error");
    el.setAttribute("aria-busy", String(state === "pending"));
    part(card, ".card__pending").hidden = state !== "pending";
    part(card, ".card__remove").hidden = state === "pending";
    const badge = part(card, ".badge");
    badge.className = "badge";
    badge.hidden = true;
    if (state === "queued") showBadge(badge, "Ready", "queued", "Waiting for “Caption Images”");
    if (state === "error") showBadge(badge, "Error", "error");
    if (state === "done" && card.cached) showBadge(badge, "Cached", "cached", "This answer came from the cache");
    if (state !== "done") {
      part(card, ".card__caption").hidden = true;
      part(card, ".tags").hidden = true;
      part(card, ".card__actions").hidden = true;
    }
    if (state !== "error") part(card, ".card__error").hidden = true;
  }

  function showBadge(badge, text, kind, title) {
    badge.textContent = text;
    badge.classList.add(`badge--${kind}`);
    badge.title = title || "";
    badge.hidden = false;
  }

  function showResult(card, result, prompt) {
    if (result && result.error) {
      showError(card, result.error.message || "This file could not be captioned.", result.error.code);
      return;
    }
    if (!result || typeof result.caption !== "string") {
      showError(card, "The server's answer for this file had no caption.");
      return;
    }
    card.caption = result.caption;
    card.tags = Array.isArray(result.tags) ? result.tags.map(String) : [];
    card.cached = result.cached === true;
    part(card, ".card__meta").textContent = describeFile(card.file, prompt);
    const caption = part(card, ".card__caption");
    caption.textContent = result.caption;
    caption.hidden = false;
    const list = part(card, ".tags");
    list.replaceChildren(...card.tags.map((tag) => {
      const li = document.createElement("li");
      li.className = "tag";
      li.textContent = tag;
      return li;
    }));
    list.hidden = card.tags.length === 0;
    part(card, ".card__actions").hidden = false;
    part(card, ".copy-tags").hidden = card.tags.length === 0;
    card.el.dataset.cached = String(card.cached);
    setState(card, "done");
  }

  /** `retry`: the whole request failed in a way worth retrying (network, 401, 503 …), so "Caption Images" sends
   * this file again. */
  function showError(card, message, code, retry) {
    card.error = { code: code || "", message };
    card.retry = retry === true;
    const box = part(card, ".card__error");
    box.textContent = message;
    box.hidden = false;
    if (code) card.el.dataset.errorCode = code;
    const meta = part(card, ".card__meta");
    meta.textContent = code ? `${describeFile(card.file)} · ${code}` : describeFile(card.file);
    setState(card, "error");
  }

  // ----- captioning ------------------------------------------------------------------------------------------
  /** Split the cards into requests of at most maxFilesPerRequest files and maxRequestBytes bytes. */
  function chunk(batch) {
    const chunks = [];
    let current = [];
    let bytes = 0;
    for (const card of batch) {
      if (current.length && (current.length >= maxFilesPerRequest || bytes + card.file.size > maxRequestBytes)) {
        chunks.push(current);
        current = [];
        bytes = 0;
      }
      current.push(card);
      bytes += card.file.size;
    }
    if (current.length) chunks.push(current);
    return chunks;
  }

  async function captionQueued() {
    if (running) return;
    const batch = cards.filter((c) => c.state === "queued" || (c.state === "error" && c.retry));
    if (!batch.length) {
      setStatus(formStatus, "Choose or drop at least one image first.", "error");
      return;
    }
    running = true;
    captionButton.setAttribute("aria-disabled", "true");
    captionButton.textContent = "Captioning…";
    resultsList.setAttribute("aria-busy", "true");
    summary.textContent = "";
    const prompt = promptInput.value.trim();
    batch.forEach((card) => setState(card, "pending"));
    setStatus(formStatus, `Captioning ${plural(batch.length, "image", "images")}…`);
    const started = performance.now();
    try {
      for (const group of chunk(batch)) await captionGroup(group, prompt);
    } finally {
      running = false;
      captionButton.removeAttribute("aria-disabled");
      captionButton.textContent = "Caption Images";
      resultsList.setAttribute("aria-busy", "false");
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const done = batch.filter((c) => c.state === "done");
    const cached = done.filter((c) => c.cached).length;
    const failed = batch.length - done.length;
    let text = `${plural(done.length, "image", "images")} captioned`;
    if (cached) text += ` (${cached} from the cache)`;
    if (failed) text += `, ${failed} failed`;
    text += ` in ${seconds} s.`;
    summary.textContent = text;
    setStatus(formStatus, failed && !done.length ? "No image could be captioned; the results below say why."
      : "Done: the results are below.", failed && !done.length ? "error" : "ok");
  }

  async function captionGroup(group, prompt) {
    const body = new FormData();
    for (const card of group) body.append("images", card.file, card.file.name);
    if (prompt) body.append("prompt", prompt);
    let response;
    try {
      const headers = { Accept: "application/json" };
      const apiKey = $("api-key") ? $("api-key").value.trim() : "";
      if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
      response = await fetch("/caption-images", { method: "POST", body, headers });
    } catch (err) {
      group.forEach((card) => showError(card, "Could not reach the server (network error). Is it still running?",
        "network_error", true));
      return;
    }
    const answer = await readJson(response);
    const results = answer && Array.isArray(answer.results) ? answer.results : null;
    if (results && results.length === group.length) {
      group.forEach((card, i) => showResult(card, results[i], prompt));
      return;
    }
    let message;
    let code;
    if (results) {
      message = `The server answered ${results.length} results for ${group.length} files.`;
      code = "bad_answer";
    } else {
      ({ message, code } = requestError(response, answer));
    }
    // worth sending again: a key to enter, a busy or failing server; not a request the server refused as such
    const retry = [401, 403, 408, 429].includes(response.status) || response.status >= 500;
    group.forEach((card) => showError(card, message, code, retry));
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch (err) {
      return null;
    }
  }

  /** The message for a request that failed as a whole (400, 413, 503, a proxy's HTML error page …). */
  function requestError(response, answer) {
    const error = answer && answer.error && typeof answer.error === "object" ? answer.error : null;
    let message = error && error.message ? String(error.message)
      : `The server answered ${response.status} ${response.statusText || ""}`.trim() + ".";
    const retry = response.headers.get("Retry-After");
    if (response.status === 503 && retry) message += ` (try again in ${retry} s)`;
    return { message, code: error && error.code ? String(error.code) : `http_${response.status}` };
  }

  // ----- copy ------------------------------------------------------------------------------------------------
  async function copyText(text, button) {
    let ok = false;
    if (navigator.clipboard && window.isSecureContext) {
      try {
        await navigator.clipboard.writeText(text);
        ok = true;
      } catch (err) {
        ok = false;
      }
    }
    if (!ok) ok = legacyCopy(text, button);
    const label = button.dataset.label || button.textContent;
    button.dataset.label = label;
    button.textContent = ok ? "Copied ✓" : "Copy failed";
    clearTimeout(button.copyTimer);
    button.copyTimer = setTimeout(() => { button.textContent = label; }, COPY_FEEDBACK_MS);
  }

  // Plain http on another host is not a secure context, so navigator.clipboard is missing there.
  function legacyCopy(text, button) {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.append(area);
    area.select();
    let ok = false;
    try {
      ok = document.execCommand("copy");
    } catch (err) {
      ok = false;
    }
    area.remove();
    button.focus();
    return ok;
  }

  // ----- clear cache -----------------------------------------------------------------------------------------
  async function clearCache() {
    cacheButton.setAttribute("aria-disabled", "true");
    setStatus(cacheStatus, "Clearing…");
    const headers = { Accept: "application/json" };
    const token = tokenInput.value.trim();
    if (token) headers.Authorization = `Bearer ${token}`;
    try {
      const response = await fetch("/reset-redis", { method: "POST", headers });
      const answer = await readJson(response);
      if (response.ok && answer && typeof answer.deleted === "number") {
        setStatus(cacheStatus, `${answer.message || "Cache cleared"}: ${plural(answer.deleted, "entry", "entries")} deleted.`,
          "ok");
      } else {
        const { message } = requestError(response, answer);
        const prefix = response.status === 401 ? "Not allowed (401): " : `Failed (${response.status}): `;
        setStatus(cacheStatus, prefix + message, "error");
      }
    } catch (err) {
      setStatus(cacheStatus, "Could not reach the server (network error).", "error");
    } finally {
      cacheButton.removeAttribute("aria-disabled");
    }
  }

  // ----- model facts: follow /readyz while the model is still loading ----------------------------------------
  function showFacts(info) {
    const status = info.status || "unknown";
    $("fact-status").textContent = status;
    $("fact-status-dot").className = `status-dot status-dot--${status.replace(/[^a-z]/g, "")}`;
    if (info.model) {
      $("fact-family").textContent = info.model.family || "";
      $("fact-checkpoint").textContent = info.model.id || "";
    }
    $("fact-device").textContent = info.device || "…";
    $("fact-dtype").textContent = info.dtype || "…";
    if (info.cache) {
      let cache = info.cache.backend || "…";
      if (info.cache.backend === "redis" && info.cache.redis_reachable === false) cache += " (unreachable)";
      $("fact-cache").textContent = cache;
    }
  }

  async function followReadiness() {
    let info = page.info || {};
    while (info.status === "starting") {
      await new Promise((resolve) => setTimeout(resolve, 2000));
      try {
        const answer = await readJson(await fetch("/readyz", { headers: { Accept: "application/json" } }));
        if (answer) info = answer;
      } catch (err) {
        // the server may be restarting; keep asking
      }
      showFacts(info);
    }
  }

  // ----- wiring ----------------------------------------------------------------------------------------------
  fileInput.addEventListener("change", () => {
    addFiles(fileInput.files);
    fileInput.value = ""; // so that picking the same file again fires "change" again
  });

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    captionQueued();
  });

  $("clear-results").addEventListener("click", () => {
    cards.filter((c) => c.state !== "pending").forEach(removeCard);
    summary.textContent = "";
    setStatus(formStatus, "");
  });

  cacheForm.addEventListener("submit", (event) => {
    event.preventDefault();
    if (cacheButton.getAttribute("aria-disabled") !== "true") clearCache();
  });

  // Drop files anywhere on the page; the drop zone lights up while files are dragged over the window.
  const hasFiles = (event) => event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
  let dragDepth = 0;
  window.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    dragDepth += 1;
    dropzone.classList.add("is-dragover");
  });
  window.addEventListener("dragleave", (event) => {
    if (!hasFiles(event)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) dropzone.classList.remove("is-dragover");
  });
  window.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
  });
  window.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault(); // the browser would otherwise navigate to the dropped file
    dragDepth = 0;
    dropzone.classList.remove("is-dragover");
    addFiles(event.dataTransfer.files);
  });

  showFacts(page.info || {});
  updateEmptyState();
  followReadiness();
})();
