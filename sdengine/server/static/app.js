// The sdengine web page: a plain script over the server's own AUTOMATIC1111-compatible API (same origin).
// Paths are relative, so the page also works behind a reverse proxy under a sub-path.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("gen-form"), prompt: $("prompt"), negative: $("negative_prompt"), model: $("model"),
    sampler: $("sampler"), scheduler: $("scheduler"), steps: $("steps"), cfg: $("cfg_scale"),
    batch: $("batch_size"), width: $("width"), height: $("height"), sizePreset: $("size-preset"),
    seed: $("seed"), seedRandom: $("seed-random"),
    sourceSection: $("source-section"), sourceFile: $("source-file"), sourceEmpty: $("source-empty"),
    sourcePreview: $("source-preview"), maskEditor: $("mask-editor"), maskImage: $("mask-image"),
    maskCanvas: $("mask-canvas"), brush: $("brush-size"), brushValue: $("brush-size-value"), eraser: $("eraser"),
    maskClear: $("mask-clear"), maskFill: $("mask-fill"), maskInvert: $("mask-invert"),
    strength: $("denoising_strength"), strengthValue: $("strength-value"), matchSize: $("match-size"),
    generate: $("generate"), interrupt: $("interrupt"), progress: $("progress"), progressText: $("progress-text"),
    announce: $("announce"), preview: $("live-preview"), error: $("error"), gallery: $("gallery"),
    galleryEmpty: $("gallery-empty"), galleryClear: $("gallery-clear"), tiling: $("tiling"),
    hiresSection: $("hires-section"), hires: $("enable_hr"), hrScale: $("hr_scale"), hrStrength: $("hr_strength"),
    hrSteps: $("hr_steps"), hrUpscaler: $("hr_upscaler"), refinerSection: $("refiner-section"),
    refiner: $("refiner_checkpoint"), refinerSwitch: $("refiner_switch_at"), networks: $("networks"),
    loraList: $("lora-list"), loraEmpty: $("lora-empty"),
    embeddingList: $("embedding-list"), embeddingEmpty: $("embedding-empty"), networksRefresh: $("networks-refresh"),
    loraHidden: $("lora-hidden"), loraAll: $("lora-all"), loraAllLabel: $("lora-all-label"),
    control: $("control-section"), controlEnabled: $("control-enabled"), controlFile: $("control-file"),
    controlPreview: $("control-preview"), controlDetected: $("control-detected"), controlNet: $("control-net"),
    controlModule: $("control-module"), controlResize: $("control-resize"), controlWeight: $("control-weight"),
    controlMode: $("control-mode"),
    controlStart: $("control-start"), controlEnd: $("control-end"), controlDetect: $("control-detect"),
    xyz: $("xyz-section"), xyzEnabled: $("xyz-enabled"), xyzCells: $("xyz-cells"),
    xyzType: ["x", "y", "z"].map((a) => $(`xyz-${a}-type`)),
    xyzValues: ["x", "y", "z"].map((a) => $(`xyz-${a}-values`)),
    xyzFill: ["x", "y", "z"].map((a) => $(`xyz-${a}-fill`)),
  };
  ["X", "Y", "Z"].forEach((a, i) => { el[`xyzType${a}`] = el.xyzType[i]; el[`xyzValues${a}`] = el.xyzValues[i]; });
  const MASK_COLOR = "#ff2d87"; // what the painted area looks like; it is sent as white on black
  const MASK_MAX_SIDE = 1024; // the mask is drawn at most this large (the server resizes it to the output)
  const POLL_MS = 600;
  const SAVED_KEY = "sdengine.settings";
  const SAVED_FIELDS = ["prompt", "negative", "model", "sampler", "scheduler", "steps", "cfg", "batch", "width",
    "height", "seed", "hrScale", "hrStrength", "hrSteps", "hrUpscaler", "refiner", "refinerSwitch", "controlNet",
    "controlModule", "controlWeight", "controlStart", "controlEnd", "controlMode", "controlResize", "xyzTypeX",
    "xyzTypeY", "xyzTypeZ", "xyzValuesX", "xyzValuesY", "xyzValuesZ"]; // not the on/off boxes: off on each visit

  const state = { busy: false, taskId: null, running: false, started: 0, currentModel: null, source: null,
    urls: [], lastPrompt: null, controlImage: null, axes: { txt2img: [], img2img: [] }, loras: [] };
  // The X/Y/Z axes the server plots (A1111's labels; sdengine/server/scripts.py AXIS_FIELDS); the index sent is the
  // label's place in A1111's list for the tab, read from /sdapi/v1/script-info. Placeholders show the syntax.
  const XYZ_AXES = { "Seed": "1-4", "Steps": "10,20,30", "CFG Scale": "5,7,9", "Sampler": "Euler a, DPM++ 2M",
    "Schedule type": "Karras, Exponential", "Prompt S/R": "red, blue, green", "Checkpoint name": "model names",
    "Clip skip": "1,2", "Denoising": "0.3,0.5,0.7", "Var. seed": "1-3", "Var. strength": "0,0.25,0.5" };

  // --- the API -----------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  function detailText(data, fallback) {
    const detail = data && (data.detail ?? data.error);
    if (Array.isArray(detail)) { // FastAPI's validation errors
      return detail.map((e) => `${(e.loc || []).filter((x) => x !== "body").join(".")}: ${e.msg}`).join("; ");
    }
    return typeof detail === "string" && detail ? detail : fallback;
  }

  async function api(path, body) {
    const options = { method: body === undefined ? "GET" : "POST", credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, options);
    } catch (_) {
      throw new ApiError(0, "The server cannot be reached. Is sdengine still running?");
    }
    let data = null;
    try { data = await response.json(); } catch (_) { /* an empty or non-JSON body */ }
    if (!response.ok) {
      throw new ApiError(response.status, detailText(data, `${response.status} ${response.statusText}`));
    }
    return data;
  }

  // --- messages ----------------------------------------------------------------------------------------------

  function showError(message) {
    el.error.textContent = message instanceof Error ? message.message : String(message);
    el.error.hidden = false;
  }
  function clearError() { el.error.hidden = true; el.error.textContent = ""; }
  function announce(text) { el.announce.textContent = text; }
  function seconds(s) { return s < 60 ? `${Math.max(1, Math.round(s))} s` : `${Math.round(s / 60)} min`; }
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // --- settings: the lists from the server, saved between visits ---------------------------------------------

  function fillSelect(select, items, wanted, fallback) {
    select.replaceChildren(...items.map(([value, text]) => new Option(text, value)));
    const values = items.map(([value]) => value);
    select.value = values.includes(wanted) ? wanted : values.includes(fallback) ? fallback : values[0] ?? "";
  }

  function saved() {
    try { return JSON.parse(localStorage.getItem(SAVED_KEY)) || {}; } catch (_) { return {}; }
  }

  function save() {
    const data = { seedRandom: el.seedRandom.checked, tiling: el.tiling.checked, hires: el.hires.checked };
    for (const key of SAVED_FIELDS) data[key] = el[key].value;
    try { localStorage.setItem(SAVED_KEY, JSON.stringify(data)); } catch (_) { /* private mode: not kept */ }
  }

  function restore(data) {
    for (const key of SAVED_FIELDS) {
      if (typeof data[key] !== "string") continue;
      // the lists from the server are filled later, each with its saved choice; the page's own ones now
      if (el[key].tagName !== "SELECT" || [...el[key].options].some((o) => o.value === data[key])) {
        el[key].value = data[key];
      }
    }
    if (typeof data.seedRandom === "boolean") el.seedRandom.checked = data.seedRandom;
    if (typeof data.tiling === "boolean") el.tiling.checked = data.tiling;
    if (typeof data.hires === "boolean") el.hires.checked = data.hires;
    syncSeed();
    applyHires();
  }

  async function loadLists() {
    const keep = saved();
    const [samplers, schedulers, models, options, latent, upscalers] = await Promise.allSettled([
      api("sdapi/v1/samplers"), api("sdapi/v1/schedulers"), api("sdapi/v1/sd-models"), api("sdapi/v1/options"),
      api("sdapi/v1/latent-upscale-modes"), api("sdapi/v1/upscalers")]);
    const failed = [samplers, schedulers, models, options, latent, upscalers].find((r) => r.status === "rejected");
    if (failed) showError(`Could not load the server's settings: ${failed.reason.message}`);
    if (samplers.status === "fulfilled") {
      fillSelect(el.sampler, samplers.value.map((s) => [s.name, s.name]), keep.sampler, "Euler a");
    }
    if (schedulers.status === "fulfilled") {
      fillSelect(el.scheduler, schedulers.value.map((s) => [s.name, s.label || s.name]), keep.scheduler, "automatic");
    }
    state.currentModel = options.status === "fulfilled" ? options.value.sd_model_checkpoint : null;
    const size = options.status === "fulfilled" ? options.value.sdengine_image_size : null;
    if (Number.isInteger(size) && size > 0) { // the loaded model's size, unless the user's own sizes are kept
      if (typeof keep.width !== "string") el.width.value = String(size);
      if (typeof keep.height !== "string") el.height.value = String(size);
    }
    fillSizePresets(Number.isInteger(size) && size > 0 ? size : 512);
    if (models.status === "fulfilled") {
      fillSelect(el.model, models.value.map((m) => [m.title, m.model_name]), keep.model, state.currentModel);
      // refiners are chosen by file name, as models are
      fillSelect(el.refiner, [["None", "None"], ...models.value.map((m) => [m.filename, m.model_name])],
        keep.refiner, "None");
    }
    const images = upscalers.status === "fulfilled" ? upscalers.value.filter((u) => u.name !== "None") : [];
    const names = [...(latent.status === "fulfilled" ? latent.value : []), ...images].map((u) => u.name);
    fillSelect(el.hrUpscaler, names.map((n) => [n, n]), keep.hrUpscaler, "Latent");
  }

  // --- LoRAs and embeddings: the server's folders, listed by name; a click adds one to a prompt ---------------

  function insertInto(box, text) { // appended, as A1111's extra-networks cards do; the focus stays on the list
    const value = box.value.replace(/\s+$/, "");
    box.value = value ? `${value} ${text}` : text;
    save();
  }

  function fillChips(list, empty, items, onPick) { // items: [name, tooltip]
    list.replaceChildren(...items.map(([name, title]) => {
      const b = Object.assign(document.createElement("button"), { type: "button", textContent: name, title });
      b.addEventListener("click", () => onPick(name));
      const item = document.createElement("li");
      item.append(b);
      return item;
    }));
    empty.hidden = items.length > 0;
  }

  // A LoRA fits the loaded model when it was made for the same UNet context width (SD1 768, SD2 1024, SDXL 2048;
  // the server reads it from the file's shapes or metadata); one whose width is unknown is offered, as A1111 does.
  function fitsModel(lora) {
    return !state.contextDim || !lora.sdengine_context_dim || lora.sdengine_context_dim === state.contextDim;
  }

  function showLoras() {
    const others = state.loras.filter((l) => !fitsModel(l));
    const shown = el.loraAll.checked ? state.loras : state.loras.filter(fitsModel);
    const loraItems = shown.map((l) => [l.name, `${l.alias && l.alias !== l.name ? `${l.alias}: ` : ""}` +
      `${l.sd_version && l.sd_version !== "Unknown" ? `${l.sd_version} LoRA; ` : ""}` +
      `adds <lora:${l.name}:1> to the prompt`]);
    // by name (the file's), not alias: the server looks LoRAs up by file name only
    fillChips(el.loraList, el.loraEmpty, loraItems, (name) => insertInto(el.prompt, `<lora:${name}:1>`));
    el.loraEmpty.textContent = state.loras.length ? "None for the loaded model." : "None in the server's LoRA folder.";
    const kinds = [...new Set(others.map((l) => (l.sd_version && l.sd_version !== "Unknown" ? l.sd_version
      : "another model")))];
    el.loraHidden.textContent = `${others.length} hidden: made for ${kinds.join(", ")}, not the loaded model.`;
    el.loraHidden.hidden = others.length === 0 || el.loraAll.checked;
    el.loraAllLabel.hidden = others.length === 0;
    return loraItems.length;
  }

  async function loadNetworks() {
    const [loras, embeddings, options] = await Promise.allSettled([api("sdapi/v1/loras"), api("sdapi/v1/embeddings"),
      api("sdapi/v1/options")]);
    const failed = [loras, embeddings].find((r) => r.status === "rejected");
    if (failed) showError(`Could not list the LoRAs and embeddings: ${failed.reason.message}`);
    state.contextDim = options.status === "fulfilled" ? options.value.sdengine_context_dim : null;
    state.loras = loras.status === "fulfilled" ? loras.value : [];
    const loraCount = showLoras();
    const loaded = Object.keys(embeddings.status === "fulfilled" ? embeddings.value.loaded || {} : {});
    fillChips(el.embeddingList, el.embeddingEmpty, loaded.map((n) => [n, `adds ${n} to the prompt typed in last`]),
      (name) => insertInto(state.lastPrompt || el.prompt, name));
    if (loraCount + loaded.length > 0 && !el.networks.dataset.seen) el.networks.open = true; // first time
    el.networks.dataset.seen = "true";
  }

  async function refreshNetworks() {
    el.networksRefresh.disabled = true;
    el.networksRefresh.textContent = "Refreshing…"; // the embeddings wait for the running job, as in A1111
    try {
      await Promise.all([api("sdapi/v1/refresh-loras", {}), api("sdapi/v1/refresh-embeddings", {})]);
      await loadNetworks();
    } catch (e) {
      showError(e);
    } finally {
      el.networksRefresh.disabled = false;
      el.networksRefresh.textContent = "Refresh lists";
    }
  }

  // --- ControlNet: one unit in alwayson_scripts, as the sd-webui-controlnet extension sends it ------------------

  async function loadControl() {
    let models = [], modules = [];
    try {
      const [m, p] = await Promise.all([api("controlnet/model_list"), api("controlnet/module_list")]);
      models = m.model_list || [];
      modules = p.module_list || [];
    } catch (_) { /* a server without ControlNet routes: no panel */ }
    el.control.hidden = models.length === 0; // nothing in the server's ControlNet folder
    const keep = saved();
    fillSelect(el.controlNet, models.map((m) => [m, m]), el.controlNet.value || keep.controlNet, models[0]);
    fillSelect(el.controlModule, modules.map((m) => [m, m]), el.controlModule.value || keep.controlModule, "none");
    syncControl(!keep.controlModule);
  }

  const isIpAdapter = (name) => /ip[-_]?adapter/i.test(name || "");

  // An IP-Adapter takes its reference picture through its own module (ip-adapter*), and has no map to preview.
  function syncControl(modelChanged) {
    const ip = isIpAdapter(el.controlNet.value);
    const module = el.controlModule.value || "";
    if (modelChanged && ip !== module.startsWith("ip-adapter")) {
      const match = [...el.controlModule.options].find((o) => (ip ? o.value.startsWith("ip-adapter")
        : o.value === "none"));
      if (match) el.controlModule.value = match.value;
    }
    el.controlDetect.disabled = (el.controlModule.value || "").startsWith("ip-adapter");
  }

  function readControlFile(file) {
    const reader = new FileReader();
    reader.onload = () => {
      const img = new Image();
      img.onload = () => {
        clearError();
        state.controlImage = reader.result;
        el.controlPreview.src = reader.result;
        el.controlPreview.hidden = false;
        el.controlDetected.hidden = true;
        el.controlEnabled.checked = true; // choosing an image means using it
      };
      img.onerror = () => showError("That file is not an image this browser can read (PNG, JPEG, WebP).");
      img.src = reader.result;
    };
    reader.onerror = () => showError("The file could not be read.");
    reader.readAsDataURL(file);
  }

  function controlSource() { // the control image, or img2img's source image as the extension falls back to
    return state.controlImage || (mode() !== "txt2img" && state.source ? state.source.dataURL : null);
  }

  async function detectControl() {
    const image = controlSource();
    if (!image) {
      el.controlFile.focus();
      showError("Choose a control image first.");
      return;
    }
    clearError();
    el.controlDetect.disabled = true;
    el.controlDetect.textContent = "Preprocessing…";
    try {
      const data = await api("controlnet/detect", { controlnet_module: el.controlModule.value || "none",
        controlnet_input_images: [image] });
      el.controlDetected.src = `data:image/png;base64,${data.images[0]}`;
      el.controlDetected.hidden = false;
    } catch (e) {
      showError(e);
    } finally {
      el.controlDetect.textContent = "Preview preprocessor";
      syncControl(false);
    }
  }

  function controlUnit(m) {
    if (el.control.hidden || !el.controlEnabled.checked) return null;
    if (!el.controlNet.value) throw new Error("Choose a ControlNet.");
    if (!controlSource()) {
      el.controlFile.focus();
      throw new Error("Choose a control image (or turn ControlNet off).");
    }
    const unit = { enabled: true, module: el.controlModule.value || "none", model: el.controlNet.value,
      weight: parseFloat(el.controlWeight.value), guidance_start: parseFloat(el.controlStart.value),
      guidance_end: parseFloat(el.controlEnd.value), control_mode: el.controlMode.value,
      resize_mode: el.controlResize.value, pixel_perfect: false };
    if (state.controlImage) unit.image = state.controlImage; // else the server takes img2img's source
    if (![unit.weight, unit.guidance_start, unit.guidance_end].every(Number.isFinite)) {
      throw new Error("The ControlNet's weight, starting and ending step must be numbers.");
    }
    return unit;
  }

  // --- X/Y/Z plot: A1111's script_args, axis types as indices into the tab's list ---------------------------

  async function loadScripts() {
    try {
      for (const script of await api("sdapi/v1/script-info")) {
        if (script.name === "x/y/z plot") {
          state.axes[script.is_img2img ? "img2img" : "txt2img"] = (script.args[0] && script.args[0].choices) || [];
        }
      }
    } catch (_) { /* no X/Y/Z plot on this server: the section stays hidden */ }
    fillAxes();
  }

  const tab = () => (mode() === "txt2img" ? "txt2img" : "img2img");

  function fillAxes() {
    const usable = state.axes[tab()].filter((label) => label === "Nothing" || (label in XYZ_AXES &&
      (label !== "Denoising" || tab() === "img2img"))); // the server plots Denoising in img2img only
    el.xyz.hidden = usable.length < 2;
    const keep = saved();
    el.xyzType.forEach((select, i) => {
      const wanted = select.value || keep[`xyzType${"XYZ"[i]}`] || ["Steps", "CFG Scale", "Nothing"][i];
      fillSelect(select, usable.map((label) => [label, label]), wanted, "Nothing");
    });
    syncAxes();
  }

  function choices(label) { // a choice axis's values: the page's own lists, as the server names them
    const select = { "Sampler": el.sampler, "Schedule type": el.scheduler, "Checkpoint name": el.model }[label];
    return select ? [...select.options].map((o) => (label === "Sampler" ? o.value : o.text)) : null;
  }

  function syncAxes() {
    el.xyzType.forEach((select, i) => {
      el.xyzValues[i].placeholder = XYZ_AXES[select.value] ? `e.g. ${XYZ_AXES[select.value]}` : "";
      el.xyzValues[i].disabled = select.value === "Nothing";
      el.xyzFill[i].disabled = !choices(select.value);
    });
  }

  function xyzArgs() {
    if (el.xyz.hidden || !el.xyzEnabled.checked) return null;
    const labels = state.axes[tab()];
    const args = [];
    el.xyzType.forEach((select, i) => {
      const label = select.value || "Nothing";
      const values = el.xyzValues[i].value.trim();
      if (label !== "Nothing" && !values) {
        el.xyzValues[i].focus();
        throw new Error(`Give the ${"XYZ"[i]} axis (${label}) its values, separated by commas.`);
      }
      args.push(Math.max(0, labels.indexOf(label)), label === "Nothing" ? "" : values, []);
    });
    if (args[0] === 0 && args[3] === 0 && args[6] === 0) throw new Error("Choose at least one axis for the grid.");
    // A1111 1.10's order: draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x/y/z,
    // margin_size, csv_mode (the values are text, the choice axes' names included)
    args.push(true, el.xyzCells.checked, false, false, false, false, false, 0, true);
    return args;
  }

  function syncSeed() {
    el.seed.disabled = el.seedRandom.checked;
    if (!el.seedRandom.checked && Number(el.seed.value) < 0) el.seed.value = String(Math.floor(Math.random() * 2 ** 32));
  }

  // --- modes and the source image ----------------------------------------------------------------------------

  const mode = () => el.form.elements.mode.value;

  function applyMode() {
    const m = mode();
    const hasSource = state.source !== null;
    el.sourceSection.hidden = m === "txt2img";
    el.sourceEmpty.hidden = hasSource;
    el.sourcePreview.hidden = m !== "img2img" || !hasSource;
    el.maskEditor.hidden = m !== "inpaint" || !hasSource;
    el.hiresSection.hidden = m !== "txt2img"; // A1111's hires fix is a txt2img option
    el.refinerSection.hidden = m !== "txt2img"; // here a refiner continues a txt2img schedule only
    fillAxes(); // img2img's axis list is another (Denoising; its own indices)
  }

  function applyHires() {
    for (const input of [el.hrScale, el.hrStrength, el.hrSteps, el.hrUpscaler]) input.disabled = !el.hires.checked;
  }

  function loadSource(dataURL, name) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => {
        state.source = { dataURL, img, width: img.naturalWidth, height: img.naturalHeight, name };
        el.sourcePreview.src = dataURL;
        setupMask();
        applyMode();
        resolve();
      };
      img.onerror = () => reject(new Error("That file is not an image this browser can read (PNG, JPEG, WebP)."));
      img.src = dataURL;
    });
  }

  function readFile(file) {
    const reader = new FileReader();
    reader.onload = () => { clearError(); loadSource(reader.result, file.name).catch(showError); };
    reader.onerror = () => showError("The file could not be read.");
    reader.readAsDataURL(file);
  }

  // SDXL's training buckets (width x height at 1024), scaled to the size the loaded model was trained at
  const SIZE_BUCKETS = [[1024, 1024], [1152, 896], [896, 1152], [1216, 832], [832, 1216], [1344, 768], [768, 1344],
    [1536, 640], [640, 1536]];

  function fillSizePresets(size) {
    const round8 = (v) => Math.max(8, Math.round(v / 8) * 8);
    const sizes = SIZE_BUCKETS.map(([w, h]) => [round8(w * size / 1024), round8(h * size / 1024)]);
    el.sizePreset.replaceChildren(new Option("Choose…", ""),
      ...sizes.map(([w, h]) => new Option(`${w} × ${h}${w === h ? " (the model's)" : ""}`, `${w}x${h}`)));
  }

  el.sizePreset.addEventListener("change", () => {
    const [w, h] = el.sizePreset.value.split("x");
    if (!w || !h) return;
    el.width.value = w;
    el.height.value = h;
    el.sizePreset.value = "";
    save();
  });

  function matchSize() {
    const src = state.source;
    if (!src) return;
    const long = Math.max(parseInt(el.width.value, 10) || 512, parseInt(el.height.value, 10) || 512);
    const ratio = src.width / src.height;
    const round8 = (v) => Math.max(64, Math.round(v / 8) * 8);
    el.width.value = String(round8(ratio >= 1 ? long : long * ratio));
    el.height.value = String(round8(ratio >= 1 ? long / ratio : long));
    save();
  }

  // --- the inpainting mask -----------------------------------------------------------------------------------

  const maskCtx = () => el.maskCanvas.getContext("2d");

  function setupMask() {
    const src = state.source;
    const scale = Math.min(1, MASK_MAX_SIDE / Math.max(src.width, src.height));
    const w = Math.max(1, Math.round(src.width * scale));
    const h = Math.max(1, Math.round(src.height * scale));
    for (const canvas of [el.maskImage, el.maskCanvas]) { canvas.width = w; canvas.height = h; }
    el.maskImage.getContext("2d").drawImage(src.img, 0, 0, w, h);
    clearMask();
  }

  function clearMask() { maskCtx().clearRect(0, 0, el.maskCanvas.width, el.maskCanvas.height); }

  function fillMask() {
    const ctx = maskCtx();
    ctx.globalCompositeOperation = "source-over";
    ctx.fillStyle = MASK_COLOR;
    ctx.fillRect(0, 0, el.maskCanvas.width, el.maskCanvas.height);
  }

  function invertMask() {
    const copy = document.createElement("canvas");
    copy.width = el.maskCanvas.width;
    copy.height = el.maskCanvas.height;
    copy.getContext("2d").drawImage(el.maskCanvas, 0, 0);
    fillMask();
    const ctx = maskCtx();
    ctx.globalCompositeOperation = "destination-out";
    ctx.drawImage(copy, 0, 0);
    ctx.globalCompositeOperation = "source-over";
  }

  function maskIsEmpty() {
    const { width, height } = el.maskCanvas;
    const pixels = maskCtx().getImageData(0, 0, width, height).data;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) return false;
    return true;
  }

  function maskDataURL() { // white where painted, black elsewhere (A1111: white = repaint)
    const { width, height } = el.maskCanvas;
    const white = document.createElement("canvas");
    white.width = width;
    white.height = height;
    const wctx = white.getContext("2d");
    wctx.drawImage(el.maskCanvas, 0, 0);
    wctx.globalCompositeOperation = "source-in";
    wctx.fillStyle = "#fff";
    wctx.fillRect(0, 0, width, height);
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, width, height);
    ctx.drawImage(white, 0, 0);
    return out.toDataURL("image/png");
  }

  let stroke = null; // the last point of the stroke being painted

  function canvasPoint(event) {
    const rect = el.maskCanvas.getBoundingClientRect();
    const scale = el.maskCanvas.width / rect.width;
    return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale, scale };
  }

  function paint(from, to) {
    const ctx = maskCtx();
    const size = Number(el.brush.value) * to.scale;
    ctx.globalCompositeOperation = el.eraser.checked ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = MASK_COLOR;
    ctx.lineWidth = size;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
    ctx.beginPath(); // a dot where a stroke starts or the pointer rests (zero-length lines draw nothing)
    ctx.arc(to.x, to.y, size / 2, 0, 2 * Math.PI);
    ctx.fill();
    ctx.globalCompositeOperation = "source-over";
  }

  el.maskCanvas.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    event.preventDefault();
    el.maskCanvas.setPointerCapture(event.pointerId);
    stroke = canvasPoint(event);
    paint(stroke, stroke);
  });
  el.maskCanvas.addEventListener("pointermove", (event) => {
    if (!stroke) return;
    const point = canvasPoint(event);
    paint(stroke, point);
    stroke = point;
  });
  for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
    el.maskCanvas.addEventListener(type, () => { stroke = null; });
  }

  // --- generating --------------------------------------------------------------------------------------------

  function buildRequest() {
    const m = mode();
    const body = {
      prompt: el.prompt.value, negative_prompt: el.negative.value, sampler_name: el.sampler.value || undefined,
      scheduler: el.scheduler.value || undefined, steps: parseInt(el.steps.value, 10),
      cfg_scale: parseFloat(el.cfg.value), width: parseInt(el.width.value, 10), height: parseInt(el.height.value, 10),
      batch_size: parseInt(el.batch.value, 10), n_iter: 1,
      seed: el.seedRandom.checked ? -1 : parseInt(el.seed.value, 10), tiling: el.tiling.checked,
      // our own id: the progress shown is this request's, and a request still waiting can be cancelled
      force_task_id: `web-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`,
    };
    if (el.model.value && el.model.value !== state.currentModel) {
      body.override_settings = { sd_model_checkpoint: el.model.value }; // this request only
    }
    if (m === "txt2img" && el.hires.checked) {
      Object.assign(body, { enable_hr: true, hr_scale: parseFloat(el.hrScale.value),
        denoising_strength: parseFloat(el.hrStrength.value), hr_second_pass_steps: parseInt(el.hrSteps.value, 10),
        hr_upscaler: el.hrUpscaler.value || undefined });
    }
    if (m === "txt2img" && el.refiner.value && el.refiner.value !== "None") {
      Object.assign(body, { refiner_checkpoint: el.refiner.value,
        refiner_switch_at: parseFloat(el.refinerSwitch.value) });
    }
    if (m !== "txt2img") {
      if (!state.source) {
        el.sourceFile.focus();
        throw new Error("Choose a source image first.");
      }
      body.init_images = [state.source.dataURL];
      body.denoising_strength = parseFloat(el.strength.value);
      if (m === "inpaint") {
        if (maskIsEmpty()) {
          el.maskFill.focus();
          throw new Error("Paint over the part of the image to repaint first (or choose \"Repaint everything\").");
        }
        body.mask = maskDataURL();
        body.mask_blur = 4;
        body.inpainting_fill = 1; // start from the original pixels, as A1111's page does by default
        body.inpaint_full_res = false; // "Whole picture", the page's default there (the API's is "Only masked")
      }
    }
    const unit = controlUnit(m);
    if (unit) body.alwayson_scripts = { controlnet: { args: [unit] } };
    const script = xyzArgs();
    if (script) Object.assign(body, { script_name: "x/y/z plot", script_args: script });
    return [m === "txt2img" ? "sdapi/v1/txt2img" : "sdapi/v1/img2img", body];
  }

  function setBusy(busy) {
    state.busy = busy;
    el.generate.disabled = busy;
    el.generate.textContent = busy ? "Generating…" : "Generate";
    el.interrupt.disabled = !busy;
    el.form.setAttribute("aria-busy", String(busy));
    if (busy) {
      el.progress.removeAttribute("value"); // indeterminate until the first step
      el.progressText.textContent = "Starting…";
      el.preview.hidden = true;
      el.preview.removeAttribute("src");
    } else {
      el.preview.hidden = true;
    }
  }

  function onProgress(p) {
    if (!state.busy) return;
    state.running = p.current_task === state.taskId;
    if (!state.running) {
      el.progress.removeAttribute("value");
      el.progressText.textContent = p.current_task ? "Waiting: another job is running first…" : "Starting…";
      return;
    }
    const s = p.state || {};
    el.progress.value = Math.min(1, Math.max(0, p.progress || 0));
    let text = s.sampling_steps ? `Step ${s.sampling_step}/${s.sampling_steps}` : "Starting…";
    if (s.job_count > 1) text += ` · batch ${s.job_no + 1} of ${s.job_count}`;
    if (p.eta_relative > 0.5) text += ` · about ${seconds(p.eta_relative)} left`;
    el.progressText.textContent = text;
    if (p.current_image) {
      el.preview.src = `data:image/png;base64,${p.current_image}`;
      el.preview.hidden = false;
    }
  }

  async function pollProgress(taskId) {
    while (state.busy && state.taskId === taskId) {
      try { onProgress(await api("sdapi/v1/progress")); } catch (_) { /* the next poll may do better */ }
      await sleep(POLL_MS);
    }
  }

  async function generate() {
    if (state.busy) return;
    clearError();
    let route, body;
    try {
      [route, body] = buildRequest();
    } catch (e) {
      showError(e);
      return;
    }
    state.taskId = body.force_task_id;
    state.running = false;
    state.started = performance.now();
    setBusy(true);
    announce("Generating…");
    const box = el.progress.getBoundingClientRect();
    if (box.top < 0 || box.bottom > window.innerHeight) el.progress.scrollIntoView({ block: "center" });
    pollProgress(body.force_task_id);
    try {
      const data = await api(route, body);
      let info = {};
      try { info = JSON.parse(data.info); } catch (_) { /* shown without its settings */ }
      addResults(data.images || [], info, body);
      if (body.override_settings) loadNetworks().catch(() => {}); // the model loaded now: its LoRAs, embeddings
      const took = seconds((performance.now() - state.started) / 1000);
      const count = (data.images || []).length;
      const what = `${count} image${count === 1 ? "" : "s"}`;
      el.progress.value = 1;
      el.progressText.textContent = info.interrupted ? `Interrupted: kept ${what} so far (${took}).`
        : `Done: ${what} in ${took}.`;
      announce(el.progressText.textContent);
    } catch (e) {
      el.progress.value = 0;
      if (e.status === 409) {
        el.progressText.textContent = "Cancelled.";
        announce("Cancelled.");
      } else {
        el.progressText.textContent = "Failed.";
        showError(e);
      }
    } finally {
      setBusy(false);
    }
  }

  async function interrupt() {
    if (!state.busy) return;
    el.interrupt.disabled = true;
    el.progressText.textContent = "Stopping…";
    try {
      const p = await api("sdapi/v1/progress?skip_current_image=true");
      if (p.current_task === state.taskId) {
        await api("sdapi/v1/interrupt", {}); // keeps what it has, as A1111 does
      } else {
        await api(`api/v1/jobs/${encodeURIComponent(state.taskId)}/cancel`, {}); // still waiting: not run at all
      }
    } catch (e) {
      showError(e);
      el.interrupt.disabled = !state.busy;
    }
  }

  // --- results -----------------------------------------------------------------------------------------------

  function base64ToBlob(data, type) {
    const bytes = atob(data);
    const array = new Uint8Array(bytes.length);
    for (let i = 0; i < bytes.length; i++) array[i] = bytes.charCodeAt(i);
    return new Blob([array], { type });
  }

  function fileName(info, seed, prompt, index) {
    const slug = (prompt || "image").toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "")
      .slice(0, 48).replace(/-+$/, "") || "image";
    const stamp = info.job_timestamp && info.job_timestamp !== "0" ? info.job_timestamp
      : new Date().toISOString().replace(/\D/g, "").slice(0, 14);
    return `sdengine-${stamp}-${seed ?? index}-${slug}.png`;
  }

  function button(text, onClick, label) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "small";
    b.textContent = text;
    if (label) b.setAttribute("aria-label", label);
    b.addEventListener("click", onClick);
    return b;
  }

  async function copyText(text, b) {
    try {
      await navigator.clipboard.writeText(text);
      b.textContent = "Copied";
    } catch (_) {
      b.textContent = "Copy failed";
    }
    setTimeout(() => { b.textContent = "Copy settings"; }, 1500);
  }

  function addResults(images, info, body) {
    const texts = info.infotexts || [];
    const seeds = info.all_seeds || [];
    const prompt = info.prompt ?? body.prompt;
    const items = document.createDocumentFragment();
    images.forEach((data, i) => {
      const seed = seeds[i];
      const isGrid = i === 0 && body.script_name === "x/y/z plot";
      const url = URL.createObjectURL(base64ToBlob(data, "image/png"));
      state.urls.push(url);
      const item = document.createElement("li");
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = url;
      img.alt = `${isGrid ? "X/Y/Z grid" : "Generated image"}${seed !== undefined ? ` (seed ${seed})` : ""}: ` +
        `${prompt || "no prompt"}`;
      if (info.width && info.height && !isGrid) { img.width = info.width; img.height = info.height; }
      const caption = document.createElement("figcaption");
      if (isGrid) {
        item.classList.add("grid-item");
        const badge = document.createElement("span");
        badge.className = "badge grid-badge";
        badge.textContent = "Grid";
        caption.append(badge);
      }
      if (info.interrupted) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = "Interrupted";
        caption.append(badge);
      }
      const text = document.createElement("p");
      text.className = "infotext";
      text.textContent = texts[i] || prompt || "";
      const actions = document.createElement("div");
      actions.className = "item-actions";
      const link = document.createElement("a");
      link.href = url;
      link.download = fileName(info, seed, prompt, i);
      link.textContent = "Download PNG";
      link.title = "The PNG carries these settings, readable by A1111-compatible tools";
      actions.append(link);
      if (seed !== undefined) {
        actions.append(button("Reuse seed", () => {
          el.seedRandom.checked = false;
          el.seed.value = String(seed);
          syncSeed();
          save();
          el.seed.focus();
        }, `Reuse seed ${seed}`));
      }
      actions.append(button("Use as source", async () => {
        try {
          await loadSource(`data:image/png;base64,${data}`, link.download);
          if (mode() === "txt2img") el.form.elements.mode.value = "img2img";
          applyMode();
          el.sourceSection.scrollIntoView({ block: "start" });
          el.strength.focus();
        } catch (e) { showError(e); }
      }));
      const copy = button("Copy settings", () => copyText(text.textContent, copy));
      actions.append(copy);
      caption.append(text, actions);
      figure.append(img, caption);
      item.append(figure);
      items.append(item);
    });
    el.gallery.prepend(items);
    el.galleryEmpty.hidden = el.gallery.children.length > 0;
    el.galleryClear.hidden = el.gallery.children.length === 0;
  }

  function clearGallery() {
    el.gallery.replaceChildren();
    for (const url of state.urls) URL.revokeObjectURL(url);
    state.urls = [];
    el.galleryEmpty.hidden = false;
    el.galleryClear.hidden = true;
    el.generate.focus();
  }

  // --- wiring ------------------------------------------------------------------------------------------------

  el.form.addEventListener("submit", (event) => { event.preventDefault(); generate(); });
  el.form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      el.form.requestSubmit();
    }
  });
  el.form.addEventListener("change", (event) => {
    if (event.target.name === "mode") applyMode();
    save();
  });
  el.seedRandom.addEventListener("change", syncSeed);
  el.hires.addEventListener("change", applyHires);
  el.sourceFile.addEventListener("change", () => { if (el.sourceFile.files[0]) readFile(el.sourceFile.files[0]); });
  el.strength.addEventListener("input", () => { el.strengthValue.textContent = Number(el.strength.value).toFixed(2); });
  el.brush.addEventListener("input", () => { el.brushValue.textContent = el.brush.value; });
  el.maskClear.addEventListener("click", clearMask);
  el.maskFill.addEventListener("click", fillMask);
  el.maskInvert.addEventListener("click", invertMask);
  el.matchSize.addEventListener("click", matchSize);
  el.interrupt.addEventListener("click", interrupt);
  el.galleryClear.addEventListener("click", clearGallery);
  el.networksRefresh.addEventListener("click", refreshNetworks);
  el.loraAll.addEventListener("change", showLoras);
  el.controlFile.addEventListener("change", () => {
    if (el.controlFile.files[0]) readControlFile(el.controlFile.files[0]);
  });
  el.controlNet.addEventListener("change", () => syncControl(true));
  el.controlModule.addEventListener("change", () => { el.controlDetected.hidden = true; syncControl(false); });
  el.controlDetect.addEventListener("click", detectControl);
  for (const select of el.xyzType) select.addEventListener("change", syncAxes);
  el.xyzFill.forEach((b, i) => b.addEventListener("click", () => {
    el.xyzValues[i].value = (choices(el.xyzType[i].value) || []).join(", ");
    el.xyzValues[i].focus();
  }));
  for (const box of [el.prompt, el.negative]) box.addEventListener("focus", () => { state.lastPrompt = box; });

  restore(saved());
  applyMode();
  Promise.allSettled([loadLists(), loadNetworks(), loadControl(), loadScripts()])
    .finally(() => document.body.setAttribute("data-ready", "true"));
})();
