// The picture of where an adapter acts: one bar per layer, its rotation's distance from the
// identity (‖B − I‖_F / √n), grouped by model block, drawn on a <canvas>. With the node's strengths
// and block_weights, each bar is coloured by its layer's effective strength (strength × its block's
// weight): full colour at 1, paler towards 0, a grey outline at 0. No extension here.

const COLORS = {
  "text encoder": "#b07cd8", "text encoder 2": "#8f6bd0", in: "#7a8793", down: "#4f9be8",
  mid: "#f0b43c", up: "#e8664f", out: "#7a8793", joint: "#4fc1a6", double: "#4f9be8", single: "#e8664f",
};
const SHORT = { "text encoder": "te", "text encoder 2": "te2" };
const OTHER = ["#6fbf73", "#d06fa8", "#c9a25d", "#5db7c9"];
const OFF = "#8a8a8a"; // a layer at effective strength 0

/** A layer's effective strength: the node's strength for its part × its block's weight. */
export function effectiveStrength(row, info, strengths) {
  const weight = info.block_weights?.layers?.[row.name] ?? 1;
  const te = row.section.startsWith("text encoder");
  const strength = strengths ? (te ? strengths.clip : strengths.model) : 1;
  return (strength ?? 1) * weight;
}

const fmt = (v) => String(Number(v.toPrecision(3)));

function colorOf(section, others) {
  if (COLORS[section]) return COLORS[section];
  if (!others.has(section)) others.set(section, OTHER[others.size % OTHER.length]);
  return others.get(section);
}

/** Draw `info.layer_stats` into `canvas` at its CSS size; returns a hit test (x, y) -> row|null.
 *  Layers a run did not apply (lastRun.not_applied) are drawn hollow; `strengths` ({model, clip})
 *  and info.block_weights colour each bar by its effective strength. */
export function drawPicture(canvas, info, lastRun, strengths) {
  const rows = info.layer_stats ?? [];
  const groups = info.groups ?? [];
  const width = canvas.clientWidth || 300;
  const height = canvas.clientHeight || 100;
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const style = getComputedStyle(canvas);
  const text = style.color || "#ddd";
  ctx.font = `11px ${style.fontFamily || "sans-serif"}`;
  if (!rows.length) return () => null;

  const left = 4, right = 4, top = 14, bottom = 28;
  const gap = 8;
  const plotW = Math.max(10, width - left - right - gap * (groups.length - 1));
  const plotH = Math.max(10, height - top - bottom);
  const barW = plotW / rows.length;
  const max = Math.max(...rows.map((r) => r.distance), 1e-12);
  const skipped = new Set(lastRun?.not_applied ?? []);
  const effective = new Map(rows.map((r) => [r.name, effectiveStrength(r, info, strengths)]));
  const strongest = Math.max(1, ...Array.from(effective.values(), Math.abs));
  const others = new Map();
  const hits = [];

  ctx.fillStyle = text;
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  ctx.fillText(`max ‖B−I‖/√n = ${max.toPrecision(3)}`, left, 0);
  ctx.globalAlpha = 0.25;
  ctx.fillRect(left, top + plotH, width - left - right, 1);
  ctx.globalAlpha = 1;

  let x = left;
  for (const group of groups) {
    const color = colorOf(group.section, others);
    const members = rows.filter((r) => r.section === group.section);
    const start = x;
    let level = members[0]?.level;
    for (const row of members) {
      if (row.level !== level) { // a thin tick between blocks of one section
        ctx.globalAlpha = 0.35;
        ctx.fillStyle = text;
        ctx.fillRect(x, top + plotH + 2, 1, 4);
        ctx.globalAlpha = 1;
        level = row.level;
      }
      const h = Math.max(1, (row.distance / max) * plotH);
      const w = Math.max(1, barW - (barW > 4 ? 1 : 0));
      const e = effective.get(row.name);
      if (skipped.has(row.name) || e === 0) {
        ctx.strokeStyle = e === 0 ? OFF : color;
        ctx.strokeRect(x + 0.5, top + plotH - h + 0.5, Math.max(1, w - 1), h - 1);
      } else {
        ctx.fillStyle = color;
        ctx.globalAlpha = 0.2 + 0.8 * Math.abs(e) / strongest;
        ctx.fillRect(x, top + plotH - h, w, h);
        ctx.globalAlpha = 1;
      }
      hits.push({ x0: x, x1: x + barW, row });
      x += barW;
    }
    const label = `${group.section} ${Math.round(group.share * 100)}%`;
    ctx.fillStyle = color;
    ctx.textAlign = "center";
    const mid = (start + x) / 2;
    const room = x - start + gap;
    const short = SHORT[group.section] ?? group.section;
    const weights = members.map((r) => info.block_weights?.layers?.[r.name] ?? 1);
    const [lo, hi] = [Math.min(...weights), Math.max(...weights)];
    const times = lo === hi ? (lo === 1 ? "" : ` ×${fmt(lo)}`) : ` ×${fmt(lo)}–${fmt(hi)}`;
    const shown = [label + times, group.section + times, short + times, label, group.section, short]
      .find((t) => ctx.measureText(t).width <= room) ?? "";
    ctx.fillText(shown, Math.min(Math.max(mid, 20), width - 20), top + plotH + 8);
    x += gap;
  }
  return (px) => hits.find((h) => px >= h.x0 && px < h.x1)?.row ?? null;
}

/** Keep `canvas` drawn at its size and give it a hover title (text only) per bar. */
export function livePicture(canvas, getState) {
  let hit = () => null;
  const redraw = () => {
    const { info, lastRun, strengths } = getState();
    if (info) hit = drawPicture(canvas, info, lastRun, strengths);
  };
  const onMove = (event) => {
    const row = hit(event.offsetX);
    const { info, strengths } = getState();
    const weight = info?.block_weights?.layers?.[row?.name];
    const strength = row && info ? ` · block weight ${fmt(weight ?? 1)} → strength ${
      fmt(effectiveStrength(row, info, strengths))}` : "";
    canvas.title = row ? `${row.name}\n${row.section}: ‖B−I‖/√n = ${row.distance.toPrecision(3)}${strength}` : "";
  };
  canvas.addEventListener("pointermove", onMove);
  const observer = new ResizeObserver(redraw);
  observer.observe(canvas);
  // Draw now too: a ResizeObserver reports nothing for a canvas not laid out yet (0 x 0), so a
  // panel re-rendered while hidden would otherwise keep a blank picture until its next resize.
  redraw();
  return {
    redraw,
    dispose() {
      observer.disconnect();
      canvas.removeEventListener("pointermove", onMove);
    },
  };
}
