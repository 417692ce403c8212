// Drag and drop: a BOFT .safetensors dropped on the canvas becomes a "Load BOFT" node with that
// file; dropped on a BOFT node, it switches that node's file. The server checks the file first.
import { app } from "../../../scripts/app.js";
import { addDroppedFiles, draggingFiles, isBoftNode, safetensorsFiles, selectFile } from "./boft_common.js";

function nodeAt(event) {
  const [x, y] = app.canvas.convertEventToCanvasOffset(event);
  return { node: app.canvas.graph?.getNodeOnPos(x, y), pos: [x, y] };
}

function onCanvasDrop(event) {
  const files = safetensorsFiles(event);
  if (!files.length) return; // not ours: ComfyUI loads workflows, images, ...
  const { node, pos } = nodeAt(event);
  if (isBoftNode(node)) return; // the node's own onDragDrop (below) takes it
  event.preventDefault();
  event.stopPropagation(); // keep ComfyUI from looking for a workflow in the file
  addDroppedFiles(files, (name, i) => {
    const graph = app.canvas.graph ?? app.graph;
    const created = LiteGraph.createNode("BOFTLoader");
    created.pos = [pos[0] + 30 * i, pos[1] + 30 * i];
    graph.add(created);
    selectFile(created, name);
    app.canvas.selectNode?.(created);
  });
}

app.registerExtension({
  name: "comfyui-boft.drop",

  setup() {
    app.canvasEl?.addEventListener("drop", onCanvasDrop);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isBoftNode({ comfyClass: nodeData.name })) return;
    const { onDragOver, onDragDrop } = nodeType.prototype;
    nodeType.prototype.onDragOver = function (event) {
      return draggingFiles(event) || (onDragOver?.apply(this, arguments) ?? false);
    };
    nodeType.prototype.onDragDrop = async function (event) {
      const files = safetensorsFiles(event);
      if (!files.length) return (await onDragDrop?.apply(this, arguments)) ?? false;
      await addDroppedFiles(files.slice(0, 1), (name) => selectFile(this, name));
      return true;
    };
  },
});
