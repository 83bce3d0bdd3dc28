// Canvas drawing for the playground: the attention heatmap and the candidate points.
// Pure functions of (canvas, data); coordinates are pixels of the original image, which is
// also the canvases' backing-store size, so CSS scaling never changes what is drawn where.

/** Resize a canvas's backing store (clears it) and return its 2D context. */
export function sizeCanvas(canvas, width, height) {
  canvas.width = width;
  canvas.height = height;
  return canvas.getContext("2d");
}

// Diverging ramp (blue -> yellow -> red); the alpha rises with attention so cold areas stay clear.
const RAMP = [[0, 49, 54, 149], [0.35, 69, 117, 180], [0.55, 254, 224, 144], [0.8, 244, 109, 67], [1, 165, 0, 38]];

function ramp(v) {
  for (let i = 1; i < RAMP.length; i++) {
    const [t1, ...c1] = RAMP[i];
    const [t0, ...c0] = RAMP[i - 1];
    if (v <= t1) {
      const f = (v - t0) / (t1 - t0);
      return c0.map((c, k) => Math.round(c + f * (c1[k] - c)));
    }
  }
  return RAMP[RAMP.length - 1].slice(1);
}

/**
 * Draw `attention` (flat, row-major, grid = [n_h, n_w]) stretched over the whole canvas.
 * Returns false (canvas cleared) when the map is missing or does not match the grid.
 */
export function drawHeatmap(canvas, attention, grid) {
  const ctx = sizeCanvas(canvas, canvas.width, canvas.height);
  const [nh, nw] = grid || [];
  if (!Array.isArray(attention) || !nh || !nw || attention.length !== nh * nw) return false;
  let lo = Infinity, hi = -Infinity;
  for (const a of attention) { lo = Math.min(lo, a); hi = Math.max(hi, a); }
  const span = hi - lo || 1;
  const off = document.createElement("canvas");
  const octx = sizeCanvas(off, nw, nh);
  const img = octx.createImageData(nw, nh);
  attention.forEach((a, i) => {
    const v = (a - lo) / span;
    const [r, g, b] = ramp(v);
    img.data.set([r, g, b, Math.round(255 * Math.pow(v, 0.6))], i * 4);
  });
  octx.putImageData(img, 0, 0);
  // The patch grid covers the whole resized image, which is the original scaled, so stretching is exact.
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(off, 0, 0, canvas.width, canvas.height);
  return true;
}

/** Scores in [0, 1] with `digits` significant figures below 0.01 (an untrained model's are tiny). */
export const fmtScore = (s, digits = 2) => (s >= 0.01 || s === 0 ? s.toFixed(digits) : s.toPrecision(digits));

const overlaps = (a, b) => a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;

/**
 * Draw `points` ({x, y, score}, best first) with rank and score labels; the best is red with a
 * crosshair. `unit` is the marker size in canvas pixels (the caller keeps it constant on screen).
 */
export function drawPoints(canvas, points, { unit = 6, highlight = -1 } = {}) {
  const ctx = sizeCanvas(canvas, canvas.width, canvas.height);
  const u = unit;
  ctx.font = `600 ${Math.round(3.3 * u)}px system-ui, sans-serif`;
  ctx.textBaseline = "middle";
  const rings = points.map((p, i) => ({ p, i, r: (i === 0 ? 3.2 : 2.2) * u * (i === highlight ? 1.35 : 1) }));
  // Markers first, best last so it sits on top; labels after, placed where they hit no other label.
  for (const { p, i, r } of [...rings].reverse()) {
    const color = i === 0 ? "#e11d48" : "#2563eb";
    ctx.lineWidth = Math.max(1.5, 0.7 * u);
    ctx.strokeStyle = "rgba(255,255,255,0.95)";
    ctx.beginPath(); ctx.arc(p.x, p.y, r + ctx.lineWidth, 0, 2 * Math.PI); ctx.stroke();
    ctx.strokeStyle = color;
    ctx.beginPath(); ctx.arc(p.x, p.y, r, 0, 2 * Math.PI); ctx.stroke();
    if (i === 0) {
      ctx.beginPath();
      for (const [dx, dy] of [[1, 0], [-1, 0], [0, 1], [0, -1]]) {
        ctx.moveTo(p.x + dx * r * 0.45, p.y + dy * r * 0.45);
        ctx.lineTo(p.x + dx * r * 1.7, p.y + dy * r * 1.7);
      }
      ctx.stroke();
    }
    ctx.fillStyle = color;
    ctx.beginPath(); ctx.arc(p.x, p.y, Math.max(1.5, 0.6 * u), 0, 2 * Math.PI); ctx.fill();
  }
  const placed = [];
  for (const { p, i, r } of rings) {
    const label = `${i + 1} · ${fmtScore(p.score)}`;
    const w = ctx.measureText(label).width + 2.4 * u;
    const h = 5 * u;
    const gap = r * (i === 0 ? 1.9 : 1.4);
    const tries = [[p.x + gap, p.y - h / 2], [p.x - gap - w, p.y - h / 2],
      [p.x - w / 2, p.y - gap - h], [p.x - w / 2, p.y + gap]];
    const fit = (x, y) => ({ x: Math.min(Math.max(x, 0), canvas.width - w), y: Math.min(Math.max(y, 0), canvas.height - h), w, h });
    const box = tries.map(([x, y]) => fit(x, y)).find((b) => !placed.some((o) => overlaps(b, o))) || fit(...tries[0]);
    placed.push(box);
    ctx.fillStyle = i === 0 ? "#e11d48" : "#2563eb";
    ctx.beginPath(); ctx.roundRect(box.x, box.y, w, h, 1.5 * u); ctx.fill();
    ctx.fillStyle = "#fff";
    ctx.fillText(label, box.x + 1.2 * u, box.y + h / 2);
  }
}
