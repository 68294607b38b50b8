// A small line chart drawn as inline SVG: one series (and, optionally, its low edge), time on
// x, a fixed or fitted y range.

const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function clockLabel(ms, spanMs) {
  const date = new Date(ms);
  const options = spanMs > 36 * 3600_000
    ? { month: "short", day: "numeric" }
    : { hour: "2-digit", minute: "2-digit" };
  return date.toLocaleString([], options);
}

/**
 * Draw `points` ([{t, v, lo}], v may be null for a gap) into a new <svg>. Where points carry
 * `lo` (the lowest value of their bucket, as RF's weakest reading), it is drawn as a thinner
 * line under the series, so a short dip inside a bucket stays visible.
 * @param {object} options title, unit, yMin, yMax (fitted when absent), fromMs, toMs, cssClass
 */
export function lineChart(points, options) {
  const width = 640;
  const height = 180;
  const pad = { left: 44, right: 12, top: 24, bottom: 24 };
  const root = svg("svg", {
    viewBox: `0 0 ${width} ${height}`,
    class: `chart ${options.cssClass ?? ""}`,
    role: "img",
    "aria-label": options.title,
  });
  const values = points.map((p) => p.v).filter((v) => v !== null && v !== undefined);
  let yMin = options.yMin ?? (values.length ? Math.min(...values) : 0);
  let yMax = options.yMax ?? (values.length ? Math.max(...values) : 1);
  if (yMax - yMin < 1e-9) {
    yMin -= 1;
    yMax += 1;
  }
  const fromMs = options.fromMs;
  const toMs = Math.max(options.toMs, fromMs + 1);
  const x = (t) => pad.left + ((t - fromMs) / (toMs - fromMs)) * (width - pad.left - pad.right);
  // Values beyond a fixed range are drawn at its edge (an RF dropout at the noise floor).
  const y = (v) => pad.top
    + (1 - (Math.min(yMax, Math.max(yMin, v)) - yMin) / (yMax - yMin)) * (height - pad.top - pad.bottom);

  root.append(svg("text", { x: pad.left, y: 15, class: "chart-title" }, options.title));
  // Four horizontal grid lines with their values.
  for (let i = 0; i <= 4; i += 1) {
    const value = yMin + ((yMax - yMin) * i) / 4;
    const yy = y(value);
    root.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: yy, y2: yy, class: "grid" }));
    root.append(svg("text", { x: pad.left - 6, y: yy + 4, class: "axis", "text-anchor": "end" },
      `${Math.round(value)}${options.unit ?? ""}`));
  }
  for (let i = 0; i <= 4; i += 1) {
    const t = fromMs + ((toMs - fromMs) * i) / 4;
    root.append(svg("text", {
      x: x(t), y: height - 6, class: "axis",
      "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle",
    }, clockLabel(t, toMs - fromMs)));
  }
  if (!values.length) {
    root.append(svg("text", { x: width / 2, y: height / 2, class: "chart-empty", "text-anchor": "middle" },
      "no readings in this period"));
    return root;
  }
  // Gaps (null values) break the line into segments, so a switched-off transmitter shows as a gap.
  const line = (key) => {
    let path = "";
    let pen = false;
    for (const point of points) {
      const value = point[key];
      if (value === null || value === undefined) {
        pen = false;
        continue;
      }
      path += `${pen ? "L" : "M"}${x(point.t).toFixed(1)},${y(value).toFixed(1)}`;
      pen = true;
    }
    return path;
  };
  const low = line("lo");
  if (low) root.append(svg("path", { d: low, class: "series-low" }));
  root.append(svg("path", { d: line("v"), class: "series" }));
  const last = [...points].reverse().find((p) => p.v !== null && p.v !== undefined);
  if (last) root.append(svg("circle", { cx: x(last.t), cy: y(last.v), r: 3, class: "series-dot" }));
  return root;
}
