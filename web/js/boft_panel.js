// The info panel on "Load BOFT" nodes: what the selected file is, where it acts (a picture of
// per-layer rotation distance by model block), its trigger words (click to copy), its training
// metadata, and after a run what was applied. "Open" shows the same, larger, in a dialog.
// The node's block_weights string stays the only source of what each block gets: the preset picker
// writes it, the server says what it gives each layer, the picture shows that.
import { app } from "../../../scripts/app.js";
import {
  addDroppedFiles, BLOCK_WIDGET, copyText, draggingFiles, el, executionIds, fetchInfo, FILE_WIDGET, formatBytes,
  isBoftNode, safetensorsFiles, selectFile, setWidget, toast, widgetValue,
} from "./boft_common.js";
import { livePicture } from "./boft_picture.js";

const KEY_FIELDS = [
  "ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_network_module", "ss_network_dim",
  "ss_network_alpha", "ss_network_args", "ss_num_train_images", "ss_num_epochs", "ss_steps",
  "ss_learning_rate", "ss_resolution", "ss_training_started_at",
];
const PEFT_FIELDS = ["peft_type", "boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "target_modules"];
const LONG = 600;
const PANEL_HEIGHT = 420;
const MIN_HEIGHT = 330;
const REMOVED = new WeakSet(); // panel elements of removed nodes

const counts = (pairs, fmt = String) => pairs.map(([v, n]) => (pairs.length > 1 ? `${fmt(v)} ×${n}` : fmt(v))).join(" · ");
const clip = (text, n) => (text.length > n ? `${text.slice(0, n)}…` : text);

function row(label, field, value, kind = "") {
  return el("div", { class: `boft-row ${kind}` }, el("span", { class: "boft-key" }, label),
            el("span", { class: "boft-value", dataset: { field } }, value));
}

function coverage(info, lastRun) {
  if (!lastRun) return `${info.layers}`;
  if (lastRun.total === null) return `${info.layers} · last run: ${lastRun.report}`;
  return `${info.layers} · last run applied ${lastRun.applied} of ${lastRun.total}`;
}

const APPLIED_AS = { merge: "merged into the weights", bypass: "bypass (weights untouched)" };

/** How the last run applied the file: merge or bypass (the loader's `apply` input; auto picks). */
function appliedAs(lastRun) {
  if (!lastRun?.apply) return null;
  const how = lastRun.apply.split("/").map((a) => APPLIED_AS[a] ?? a).join(" + ");
  return lastRun.apply_asked === "auto" ? `${how} (auto)` : how;
}

/** A mixed file's other adapter kinds (LoRA, full diffs, ...): ComfyUI's own adapters apply them. */
function otherAdapters(info, lastRun) {
  const others = info.other_layers ?? [];
  if (!others.length) return null;
  const kinds = {};
  for (const o of others) kinds[o.kind] = (kinds[o.kind] ?? 0) + 1;
  const text = `${others.length} layers by ComfyUI's own adapters (${Object.entries(kinds).sort()
    .map(([k, n]) => `${k} ${n}`).join(", ")})`;
  const host = lastRun?.host;
  return row("Other adapters", "other-layers",
             host ? `${text} · last run applied ${Object.keys(host).length}` : text);
}

function triggerChips(info, limit) {
  const words = info.trigger_words ?? [];
  if (!words.length) return el("div", { class: "boft-muted" }, "No trigger words (no ss_tag_frequency).");
  const chip = ([word, count]) => el("button", {
    class: "boft-chip", title: `Copy “${word}”`, dataset: { word },
    onclick: async (event) => {
      event.stopPropagation();
      const ok = await copyText(word);
      toast(ok ? "info" : "warn", ok ? "Copied" : "Copy failed", word, 1500);
    },
  }, word, el("span", { class: "boft-count" }, String(count)));
  const shown = words.slice(0, limit).map(chip);
  if (words.length > limit) shown.push(el("span", { class: "boft-muted" }, `+${words.length - limit} more`));
  return el("div", { class: "boft-chips" }, shown);
}

const EVERY_BLOCK = "every block at 1";
const fmtWeight = (v) => String(Number(Number(v).toPrecision(3)));

/** Each block's weight as text, the parse error, and the preset picker (which fills block_weights). */
function blockRows(info, setBlockWeights) {
  const bw = info.block_weights;
  if (!bw) return [];
  const choices = [["", "Preset…"], ["", EVERY_BLOCK], ...Object.keys(bw.presets ?? {}).map((n) => [n, n]),
                   [bw.example, bw.example]];
  const picker = el("select", {
    class: "boft-preset", dataset: { field: "preset" }, title: "Fill block_weights with a preset",
    onchange: (event) => {
      const option = event.target.selectedOptions[0];
      if (option?.dataset.choice) setBlockWeights(option.value);
      event.target.selectedIndex = 0;
    },
  }, choices.map(([value, label], i) => el("option", { value, dataset: i ? { choice: "1" } : {} }, label)));
  const text = bw.error ? "—" : bw.kind === "all" ? EVERY_BLOCK
    : bw.blocks.map((b) => `${b.block} ${fmtWeight(b.weight)}`).join(" · ");
  return [
    el("div", { class: "boft-row" }, el("span", { class: "boft-key" }, "Per block"),
       el("span", { class: "boft-value", dataset: { field: "block-weights" } }, text), picker),
    bw.error ? el("div", { class: "boft-error", dataset: { field: "block-weights-error" } }, bw.error) : null,
  ];
}

function metadataRows(info, large) {
  const meta = info.metadata ?? {};
  const keys = large ? Object.keys(meta).filter((k) => k !== "ss_tag_frequency").sort()
    : KEY_FIELDS.filter((k) => k in meta);
  const rows = keys.map((k) => row(k, `meta:${k}`, clip(meta[k], large ? LONG * 4 : LONG), "boft-meta"));
  const config = info.peft_config;
  if (config) {
    const shown = large ? Object.keys(config).sort() : PEFT_FIELDS.filter((k) => k in config);
    for (const k of shown) rows.push(row(`peft ${k}`, `peft:${k}`, clip(JSON.stringify(config[k]), LONG), "boft-meta"));
  }
  return rows.length ? rows : [el("div", { class: "boft-muted" }, "No training metadata in this file.")];
}

/** The panel's content for `info` (and the node's last run) into `root`; returns the picture canvas. */
function render(root, state, large, setBlockWeights) {
  const { info, lastRun, error } = state;
  if (error) {
    root.replaceChildren(el("div", { class: "boft-error", dataset: { field: "error" } }, error));
    return null;
  }
  if (!info) {
    root.replaceChildren(el("div", { class: "boft-muted" }, state.name ? "Reading…" : "No file selected."));
    return null;
  }
  const canvas = el("canvas", { class: "boft-picture", dataset: { field: "picture" } });
  const notApplied = lastRun?.not_applied ?? [];
  root.replaceChildren(...[
    el("div", { class: "boft-title" },
       el("span", { dataset: { field: "format" } }, info.format),
       el("span", { class: "boft-muted", dataset: { field: "family" } }, ` · ${info.family}`)),
    row("Layers", "layers", coverage(info, lastRun)),
    appliedAs(lastRun) ? row("Applied as", "apply", appliedAs(lastRun)) : null,
    otherAdapters(info, lastRun),
    notApplied.length ? row("Not applied", "not-applied", large ? notApplied.join(", ")
      : `${notApplied.slice(0, 3).join(", ")}${notApplied.length > 3 ? ` and ${notApplied.length - 3} more` : ""}`)
      : null,
    row("Block size", "block-sizes", counts(info.block_sizes)),
    row("Depth", "depths", counts(info.depths)),
    row("Constraint", "constraints", counts(info.constraints, (v) => (v ? String(Number(v.toPrecision(3))) : "none"))),
    row("Constraint rule", "constraint-rule", lastRun?.constraint_rule ?? info.constraint_rule),
    row("Rescaled", "rescaled", `${info.rescaled} of ${info.layers}`),
    el("div", { class: "boft-row" }, el("span", { class: "boft-key" }, "File"),
       el("span", { class: "boft-value" }, el("span", { dataset: { field: "dtype" } }, info.dtype), " · ",
          el("span", { dataset: { field: "size" } },
             `${formatBytes(info.size)} · ${info.parameters.toLocaleString("en-US")} parameters`))),
    el("div", { class: "boft-section" }, "Where it acts (‖B − I‖ per layer, by block)"),
    canvas,
    ...blockRows(info, setBlockWeights),
    el("div", { class: "boft-section" }, "Trigger words ",
       el("button", {
         class: "boft-link", dataset: { field: "copy-all" }, title: "Copy the trigger_words output",
         onclick: async (event) => {
           event.stopPropagation();
           if (await copyText(info.trigger_text)) toast("info", "Copied", info.trigger_text, 1500);
         },
       }, "copy all")),
    triggerChips(info, large ? 200 : 12),
    el("div", { class: "boft-section" }, "Training"),
    ...metadataRows(info, large),
  ].filter(Boolean));
  return canvas;
}

class BoftPanel {
  constructor(node) {
    this.node = node;
    this.state = { name: null, info: null, lastRun: null, error: null };
    this.body = el("div", { class: "boft-body" });
    this.element = el("div", { class: "boft-panel" },
      el("button", { class: "boft-open", title: "Open larger", onclick: () => this.openDialog() }, "⤢ Open"),
      this.body);
    // Nodes 2.0 lays the panel out in a flex box that ignores getMinHeight; boft.css gives it this
    // height there (more if the node is resized taller).
    this.element.style.setProperty("--boft-panel-height", `${PANEL_HEIGHT}px`);
    this.picture = null;
    this.dialog = null;
    // Drops on the panel never reach the canvas: take BOFT files here, like the node does.
    this.onDragOver = (event) => { if (draggingFiles(event)) event.preventDefault(); };
    this.onDrop = (event) => {
      const files = safetensorsFiles(event);
      if (!files.length) return;
      event.preventDefault();
      event.stopPropagation();
      addDroppedFiles(files.slice(0, 1), (name) => selectFile(this.node, name));
    };
    this.element.addEventListener("dragover", this.onDragOver);
    this.element.addEventListener("drop", this.onDrop);
  }

  /** The node's strengths, for the picture's effective strength per layer (no CLIP part: 0). */
  strengths() {
    const model = Number(widgetValue(this.node, "strength_model") ?? 1);
    const clip = widgetValue(this.node, "strength_clip");
    return { model, clip: clip === undefined ? 0 : Number(clip) };
  }

  setBlockWeights(value) {
    setWidget(this.node, BLOCK_WIDGET, value);
    this.load();
  }

  async load() {
    const name = this.node.widgets?.find((w) => w.name === FILE_WIDGET)?.value ?? null;
    this.abort?.abort();
    const abort = (this.abort = new AbortController());
    if (name !== this.state.name) this.state = { name, info: null, lastRun: null, error: null };
    if (!name) return this.show();
    try {
      const answer = await fetchInfo(name, executionIds(this.node), abort.signal,
                                     String(widgetValue(this.node, BLOCK_WIDGET) ?? ""));
      if (abort.signal.aborted) return;
      this.state = answer.ok
        ? { name, info: answer.info, lastRun: answer.info.last_run, error: null }
        : { name, info: null, lastRun: null, error: answer.error };
    } catch (error) {
      if (error.name === "AbortError") return;
      this.state = { name, info: null, lastRun: null, error: String(error.message ?? error) };
    }
    this.show();
  }

  /** Nodes 2.0 mounts a DOM widget's element when a node id first renders and keeps it there: a
   *  node recreated under an id that existed before (undo, a graph cleared and refilled) would show
   *  the removed node's panel, and never this one. Take the removed panel's place. */
  takeSlot() {
    if (this.element.isConnected || app.canvas?.graph?.getNodeById?.(this.node.id) !== this.node) return;
    const host = document.querySelector(`.lg-node[data-node-id="${CSS.escape(String(this.node.id))}"]`);
    const stale = host?.querySelector(".boft-panel");
    if (stale && REMOVED.has(stale)) stale.replaceWith(this.element);
  }

  show() {
    this.takeSlot();
    this.element.dataset.state = this.state.error ? "error" : this.state.info ? "ready" : "loading";
    this.picture?.dispose();
    const canvas = render(this.body, this.state, false, (v) => this.setBlockWeights(v));
    this.picture = canvas ? livePicture(canvas, () => ({ ...this.state, strengths: this.strengths() })) : null;
    if (this.dialog) this.renderDialog();
    this.node.setDirtyCanvas?.(true, true);
  }

  redraw() {
    this.picture?.redraw();
    this.dialogPicture?.redraw();
  }

  openDialog() {
    if (!this.dialog) {
      const body = el("div", { class: "boft-body boft-large" });
      const title = el("h3", { class: "boft-dialog-title" });
      const dialog = el("dialog", { class: "boft-panel boft-dialog" },
        el("button", { class: "boft-open", onclick: () => dialog.close() }, "Close"), title, body);
      dialog.addEventListener("close", () => {
        this.dialogPicture?.dispose();
        dialog.remove();
        this.dialog = null;
      });
      document.body.append(dialog);
      this.dialog = { dialog, body, title };
      dialog.showModal();
    }
    this.renderDialog();
  }

  renderDialog() {
    const { body, title } = this.dialog;
    title.textContent = this.state.name ?? "";
    this.dialogPicture?.dispose();
    const canvas = render(body, this.state, true, (v) => this.setBlockWeights(v));
    this.dialogPicture = canvas ? livePicture(canvas, () => ({ ...this.state, strengths: this.strengths() })) : null;
  }

  dispose() {
    REMOVED.add(this.element);
    this.abort?.abort();
    this.picture?.dispose();
    this.dialog?.dialog.close();
    this.element.removeEventListener("dragover", this.onDragOver);
    this.element.removeEventListener("drop", this.onDrop);
  }
}

/** Room for the numbers, the picture and the trigger words; resize the node to see more or less.
 *  ComfyUI shares a node's free height equally among its growable widgets: ours and, after a run,
 *  its run report. */
function fitPanel(node) {
  const growable = node.widgets?.filter((w) => w.computeLayoutSize && !w.computeSize).length || 1;
  const want = node.computeSize()[1] + (PANEL_HEIGHT - MIN_HEIGHT) * growable;
  if (node.size[1] < want) node.setSize([node.size[0], want]);
  node.setDirtyCanvas?.(true, true);
}

function chain(proto, name, after) {
  const original = proto[name];
  proto[name] = function () {
    const result = original?.apply(this, arguments);
    after.apply(this, arguments);
    return result;
  };
}

app.registerExtension({
  name: "comfyui-boft.panel",

  setup() {
    const href = new URL("../css/boft.css", import.meta.url).href;
    if (!document.querySelector(`link[href="${href}"]`)) {
      document.head.append(el("link", { rel: "stylesheet", href }));
    }
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isBoftNode({ comfyClass: nodeData.name })) return;
    const proto = nodeType.prototype;
    chain(proto, "onNodeCreated", function () {
      const panel = (this.boftPanel = new BoftPanel(this));
      const info = this.addDOMWidget("boft_info", "boft_info", panel.element, {
        serialize: false, hideOnZoom: false, getMinHeight: () => MIN_HEIGHT,
      });
      info.serialize = false; // not part of widgets_values: saved workflows stay as they were
      // A new file or block_weights string: ask the server again (typing is debounced); new
      // strengths: only redraw.
      let typing = null;
      const follow = { [FILE_WIDGET]: () => panel.load(),
                       [BLOCK_WIDGET]: () => { clearTimeout(typing); typing = setTimeout(() => panel.load(), 250); },
                       strength_model: () => panel.redraw(), strength_clip: () => panel.redraw() };
      for (const widget of this.widgets ?? []) {
        const after = follow[widget.name];
        if (!after) continue;
        const callback = widget.callback;
        widget.callback = function () {
          const result = callback?.apply(this, arguments);
          after();
          return result;
        };
      }
      this.setSize([Math.max(this.size[0], 360), this.size[1]]);
      fitPanel(this);
      queueMicrotask(() => panel.load());
      requestAnimationFrame(() => panel.takeSlot());
    });
    chain(proto, "onConfigure", function () {
      this.boftPanel?.load();
      requestAnimationFrame(() => this.boftPanel?.takeSlot());
    });
    chain(proto, "onExecuted", function (output) {
      if (!output?.boft_report) return;
      this.boftPanel?.load();
      requestAnimationFrame(() => fitPanel(this)); // ComfyUI's run report was added below the panel
    });
    chain(proto, "onRemoved", function () { this.boftPanel?.dispose(); });
    const getExtraMenuOptions = proto.getExtraMenuOptions;
    proto.getExtraMenuOptions = function (canvas, options) {
      const result = getExtraMenuOptions?.apply(this, arguments);
      options.unshift({ content: "BOFT info (large)", callback: () => this.boftPanel?.openDialog() }, null);
      return result;
    };
  },
});
