"""Small inline SVG charts for the HTML report: no JavaScript, no dependencies."""

from __future__ import annotations

from html import escape

COLORS = {
    "match": "#4a7fb5",
    "conflict": "#b00020",
    "gap": "#0b6e4f",
    "uncertain": "#b9b9b9",
    "invalid_value": "#e69500",
    "image_error": "#555555",
    "parent_conflict": "#e8a0aa",
}


def status_bars(by_attribute: list[dict], statuses: tuple[str, ...], *, width: int = 640) -> str:
    """One horizontal bar per attribute, split into the shares of each status."""
    label, bar_h, gap = 150, 18, 6
    height = len(by_attribute) * (bar_h + gap) + 24
    parts = []
    for i, row in enumerate(by_attribute):
        y, x, total = i * (bar_h + gap), float(label), sum(row[s] for s in statuses) or 1
        parts.append(f'<text x="{label - 6}" y="{y + 13}" text-anchor="end">{escape(row["attribute"])}</text>')
        for status in statuses:
            w = (width - label) * row[status] / total
            if w > 0:
                parts.append(
                    f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{COLORS[status]}">'
                    f"<title>{escape(row['attribute'])}: {row[status]} {status}</title></rect>"
                )
                x += w
    shown = [s for s in statuses if any(row[s] for row in by_attribute)] or list(statuses)  # legend of what occurs
    step = width / len(shown)
    legend = "".join(
        f'<rect x="{step * i:.0f}" y="{height - 14}" width="10" height="10" fill="{COLORS[s]}"/>'
        f'<text x="{step * i + 14:.0f}" y="{height - 5}">{s}</text>'
        for i, s in enumerate(shown)
    )
    return (
        f'<svg class="chart" width="{width}" height="{height}" role="img" aria-label="statuses per attribute">'
        f"{''.join(parts)}{legend}</svg>"
    )


def histogram(
    bins: dict[str, list[int]], thresholds: dict[str, float | None], *, title: str, width: int = 300, height: int = 120
) -> str:
    """Stacked counts per confidence bin (0 to 1) for each status, with the thresholds drawn as lines."""
    n_bins = len(next(iter(bins.values()), []))
    if not n_bins:
        return ""
    tallest = max(sum(counts[b] for counts in bins.values()) for b in range(n_bins)) or 1
    plot_h, bar_w = height - 30, width / n_bins
    parts = [f'<text x="0" y="11">{escape(title)}</text>']
    for b in range(n_bins):
        y = float(height - 16)
        for status, counts in bins.items():
            h = plot_h * counts[b] / tallest
            if h > 0:
                y -= h
                parts.append(
                    f'<rect x="{b * bar_w:.1f}" y="{y:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
                    f'fill="{COLORS[status]}"><title>{counts[b]} {status}, confidence '
                    f"{b / n_bins:.2f} to {(b + 1) / n_bins:.2f}</title></rect>"
                )
    for name, value in thresholds.items():
        if value is not None:
            x = width * value
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="14" y2="{height - 16}" stroke="#000" '
                f'stroke-dasharray="3 2"><title>{escape(name)} threshold {value:.3f}</title></line>'
            )
    parts.append(
        f'<text x="0" y="{height - 2}">0</text><text x="{width}" y="{height - 2}" text-anchor="end">confidence 1</text>'
    )
    return (
        f'<svg class="chart" width="{width}" height="{height}" role="img" aria-label="{escape(title)}">'
        f"{''.join(parts)}</svg>"
    )
