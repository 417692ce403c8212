// Shared helpers of the comfyui-boft front end (no extension registered here).
// Everything that comes from a file is put in the page as text (textContent), never as HTML.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

export const NODE_TYPES = new Set(["BOFTLoader", "BOFTLoaderModelOnly"]);
export const FILE_WIDGET = "boft_name";
export const BLOCK_WIDGET = "block_weights";
const HEADER_LIMIT = 100_000_000;  // safetensors' own header limit, the server's too (boft_core MAX_HEADER)

export function isBoftNode(node) {
  return NODE_TYPES.has(node?.comfyClass ?? node?.type);
}

/** A DOM element; string children become text nodes, so metadata can never become markup. */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function formatBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function toast(severity, summary, detail, life = 6000) {
  const t = app.extensionManager?.toast;
  if (t?.add) t.add({ severity, summary, detail, life: severity === "error" ? undefined : life });
  else console[severity === "error" ? "error" : "log"](`[comfyui-boft] ${summary}: ${detail}`);
}

/** Copy text; navigator.clipboard needs a secure context, the textarea fallback does not. */
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = el("textarea", { style: "position:fixed;opacity:0" }, text);
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}

async function jsonOf(response) {
  try {
    return await response.json();
  } catch {
    return { error: `${response.status} ${response.statusText}` };
  }
}

/** The ids the server runs `node` under (its UNIQUE_ID): the node's id at the top level; inside a
 *  subgraph, the path of subgraph-node ids down to it ("11:10"), one per instance of that subgraph. */
export function executionIds(node) {
  const graph = node?.graph;
  if (!graph || node.id === undefined || node.id === null || node.id === -1) return [];
  const root = graph.rootGraph ?? graph;
  if (graph === root) return [String(node.id)];
  const ids = [];
  const walk = (parent, path) => {
    for (const outer of parent.nodes ?? []) {
      if (!outer.isSubgraphNode?.() || !outer.subgraph || path.length > 32) continue;
      if (outer.subgraph === graph) ids.push([...path, outer.id, node.id].join(":"));
      else walk(outer.subgraph, [...path, outer.id]);
    }
  };
  walk(root, []);
  return ids;
}

/** GET /boft/info: {ok: true, info} or {ok: false, error}; `nodeIds` (execution ids) pick the
 *  run the panel shows: the latest of them on this file; `blockWeights` is the node's block_weights
 *  string (the server says what it gives each layer: info.block_weights). */
export async function fetchInfo(name, nodeIds, signal, blockWeights = "") {
  const query = new URLSearchParams({ name });
  for (const id of nodeIds ?? []) query.append("node", id);
  if (blockWeights) query.set("block_weights", blockWeights);
  const response = await api.fetchApi(`/boft/info?${query}`, { signal });
  const body = await jsonOf(response);
  return response.ok ? { ok: true, info: body } : { ok: false, error: body.error };
}

/** Ask the server about the file's header, then upload it. Returns {name, format, existed} or
 *  {fallback: true} for a non-BOFT file that carries a ComfyUI workflow; throws with the reason. */
export async function uploadBoft(file) {
  const lengthBytes = await file.slice(0, 8).arrayBuffer();
  let headerEnd = 8;
  if (lengthBytes.byteLength === 8) {
    const n = Number(new DataView(lengthBytes).getBigUint64(0, true));
    headerEnd = 8 + Math.min(n, HEADER_LIMIT);
  }
  const query = new URLSearchParams({ name: file.name, size: String(file.size) });
  let response = await api.fetchApi(`/boft/check?${query}`, {
    method: "POST", body: file.slice(0, headerEnd), headers: { "Content-Type": "application/octet-stream" },
  });
  const check = await jsonOf(response);
  if (!response.ok) throw new Error(check.error);
  if (!check.ok) {
    if (check.workflow) return { fallback: true };
    throw new Error(check.error);
  }
  response = await api.fetchApi(`/boft/upload?${new URLSearchParams({ name: file.name })}`, {
    method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" },
  });
  const stored = await jsonOf(response);
  if (!response.ok) throw new Error(stored.error);
  return stored;
}

/** Select `name` in a BOFT node's file widget, adding it to the widget's list if it is new. */
export function selectFile(node, name) {
  for (const other of app.graph?.nodes ?? []) {
    const values = isBoftNode(other) && other.widgets?.find((w) => w.name === FILE_WIDGET)?.options?.values;
    if (Array.isArray(values) && !values.includes(name)) {
      values.push(name);
      values.sort();
    }
  }
  const widget = node.widgets?.find((w) => w.name === FILE_WIDGET);
  if (!widget) return;
  widget.value = name;
  widget.callback?.(name, app.canvas, node);
  node.setDirtyCanvas?.(true, true);
}

/** A widget's value by name (undefined if the node has no such widget). */
export function widgetValue(node, name) {
  return node.widgets?.find((w) => w.name === name)?.value;
}

/** Set a widget's value as a person's edit does (its callback runs), e.g. block_weights from a preset. */
export function setWidget(node, name, value) {
  const widget = node.widgets?.find((w) => w.name === name);
  if (!widget) return;
  widget.value = value;
  widget.callback?.(value, app.canvas, node);
  node.setDirtyCanvas?.(true, true);
}

/** True if a drag carries files (names are unknown until the drop). */
export function draggingFiles(event) {
  return Array.from(event?.dataTransfer?.types ?? []).includes("Files");
}

export function safetensorsFiles(event) {
  const files = Array.from(event?.dataTransfer?.files ?? []);
  return files.length && files.every((f) => f.name.toLowerCase().endsWith(".safetensors")) ? files : [];
}

/** Upload dropped files; for each stored one call onStored(name, index). Messages go to toasts. */
export async function addDroppedFiles(files, onStored) {
  let index = 0;
  for (const file of files) {
    try {
      const stored = await uploadBoft(file);
      if (stored.fallback) {
        await app.handleFile(file, "file_drop"); // a workflow inside: ComfyUI's own behaviour
        continue;
      }
      onStored(stored.name, index++);
      toast("success", stored.existed ? "BOFT file already there" : "BOFT file added",
            `${stored.name} (${stored.format}) is in the loras folder.`);
    } catch (error) {
      toast("error", `Not added: ${file.name}`, `${error.message} Nothing was written.`);
    }
  }
}
