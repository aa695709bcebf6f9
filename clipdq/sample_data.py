"""Seeded synthetic retail catalog with product images and planted data-quality errors.

``generate(out_dir)`` writes:

- ``images/<product_id>.jpg``: a drawn top (apparel) or pot (cookware) per product,
  varied in background, position, scale and lighting;
- ``spec.yaml``: the attribute spec the audit runs against;
- ``labeled.parquet``: clean products (true values) for training;
- ``catalog.parquet``: other products with planted conflicts, gaps, invalid values,
  harmless respellings (synonyms, case, whitespace), broken images and titles of other products;
- ``ground_truth.parquet``: per catalog product and applicable attribute, the true
  value and what was planted (none, conflict, gap, invalid_value, image_error), and per product
  its true title (attribute ``title``: none, mismatch or image_error).

Output is byte-identical for a given seed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import yaml
from PIL import Image, ImageDraw, ImageFilter

SPEC_YAML = """\
id_column: product_id
image_column: image
target_precision: 0.9
text_column: title          # is the image the product its title names?
text_category: product_type
attributes:
  color:
    values: [red, blue, green, yellow, black, white]
    synonyms: {red: [rood, crimson], blue: [blauw, navy], green: [groen], yellow: [geel], black: [zwart], white: [wit]}
  sleeve_length:
    values: [sleeveless, shortsleeved, longsleeved]
    applies_to: {product_type: [apparel]}
  neckline:
    values: [crew neck, v-neck]
    applies_to: {product_type: [apparel]}
  has_lid:
    values: [lid, no lid]
    applies_to: {product_type: [cookware]}
  has_handle:
    values: [handle, no handle]
    applies_to: {product_type: [cookware]}
"""
SPEC: dict[str, Any] = yaml.safe_load(SPEC_YAML)
ATTRIBUTES: list[str] = list(SPEC["attributes"])
PRODUCT_TYPES = ("apparel", "cookware")
COLUMNS = ["product_id", "title", "product_type", "image", *ATTRIBUTES]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30),
    "blue": (30, 60, 200),
    "green": (30, 150, 50),
    "yellow": (235, 210, 40),
    "black": (25, 25, 25),
    "white": (240, 240, 240),
}
INVALID_VALUES: dict[str, list[str]] = {
    "color": ["purple-ish", "n/a", "multi"],
    "sleeve_length": ["maybe", "n/a", "three-quarter"],
    "neckline": ["turtleneck", "n/a"],
    "has_lid": ["maybe", "n/a"],
    "has_handle": ["maybe", "n/a"],
}

CONFLICT_RATE = 0.10
GAP_RATE = 0.10
N_INVALID = 6
RESPELL_RATE = 0.2
N_IMAGE_ERRORS = 6  # two each of: missing file, garbage bytes, truncated JPEG
TITLE_MISMATCH_RATE = 0.10  # catalog products listed under another product's title

Point = tuple[float, float]
RGB = tuple[int, int, int]


def applicable(product_type: str) -> list[str]:
    """Attributes that apply to a product type according to the spec."""
    return [
        name
        for name, attr in SPEC["attributes"].items()
        if product_type in attr.get("applies_to", {}).get("product_type", PRODUCT_TYPES)
    ]


# --------------------------------------------------------------------------- products


def _products(rng: random.Random, n: int, prefix: str) -> list[dict[str, Any]]:
    """Half apparel, half cookware (shuffled), with uniformly drawn true values."""
    types = [PRODUCT_TYPES[i % 2] for i in range(n)]
    rng.shuffle(types)
    products = []
    for i, ptype in enumerate(types, start=1):
        pid = f"{prefix}{i:05d}"
        values = {a: None for a in ATTRIBUTES}
        for attr in applicable(ptype):
            values[attr] = rng.choice(SPEC["attributes"][attr]["values"])
        products.append({"product_id": pid, "product_type": ptype, "image": f"images/{pid}.jpg", **values})
    for p in products:
        p["title"] = _title(p)
    return products


def _title(p: dict[str, Any]) -> str:
    """Human-readable title built from the true values."""
    if p["product_type"] == "apparel":
        return f"{p['color'].capitalize()} {p['neckline']} {p['sleeve_length']} top"
    parts = [x for x in ("lid", "handle") if p[f"has_{x}"] == x]
    return f"{p['color'].capitalize()} pot" + (" with " + " and ".join(parts) if parts else "")


def _frame(products: list[dict[str, Any]]) -> pl.DataFrame:
    """Products as a frame with the public column order, all strings."""
    schema = {c: pl.String for c in COLUMNS}
    return pl.DataFrame([{c: p[c] for c in COLUMNS} for p in products], schema=schema)


# --------------------------------------------------------------------------- drawing


def _shade(rgb: RGB, f: float) -> RGB:
    """Darker shade; near-black colours are lightened instead so details stay visible."""
    if max(rgb) < 60:
        return tuple(int(c + (1 - f) * 140) for c in rgb)  # type: ignore[return-value]
    return tuple(int(c * f) for c in rgb)  # type: ignore[return-value]


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation background colour (grey with a slight tint)."""
    return np.clip(rng.uniform(95, 225) + rng.integers(-12, 13, 3), 0, 255)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Plain, vertical gradient, or soft patches/stripes of muted colours."""
    kind = rng.integers(3)
    if kind == 0:
        arr = np.broadcast_to(_muted(rng), (size, size, 3))
    elif kind == 1:
        t = np.linspace(0, 1, size)[:, None, None]
        arr = np.broadcast_to((1 - t) * _muted(rng) + t * _muted(rng), (size, size, 3))
    else:
        return _patches(rng, size)
    return Image.fromarray(arr.astype(np.uint8))


def _patches(rng: np.random.Generator, size: int) -> Image.Image:
    """Blurred stripes or overlapping rectangles on a plain muted base."""
    img = Image.new("RGB", (size, size), tuple(int(c) for c in _muted(rng)))
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.5:  # stripes
        width, vertical = int(rng.integers(size // 8, size // 3)), rng.random() < 0.5
        for i in range(0, size, 2 * width):
            box = (i, 0, i + width, size) if vertical else (0, i, size, i + width)
            draw.rectangle(box, fill=tuple(int(c) for c in _muted(rng)))
    else:  # soft rectangles
        for _ in range(rng.integers(2, 5)):
            x0, y0 = rng.integers(0, size, 2)
            w, h = rng.integers(size // 5, size // 2, 2)
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=tuple(int(c) for c in _muted(rng)))
    return img.filter(ImageFilter.GaussianBlur(size / 40))


class _Canvas:
    """Draws product parts in unit coordinates ([-0.5, 0.5]^2 = the product box) onto a
    colour layer plus a coverage mask; ``cut_*`` punches holes showing the background."""

    def __init__(self, size: int, cx: float, cy: float, s: float) -> None:
        self.layer = Image.new("RGB", (size, size))
        self.mask = Image.new("L", (size, size), 0)
        self._layer, self._mask = ImageDraw.Draw(self.layer), ImageDraw.Draw(self.mask)
        self.cx, self.cy, self.s = cx, cy, s

    def _xy(self, pts: list[Point]) -> list[Point]:
        return [(self.cx + u * self.s, self.cy + v * self.s) for u, v in pts]

    def _box(self, u0: float, v0: float, u1: float, v1: float) -> list[Point]:
        return self._xy([(u0, v0), (u1, v1)])

    def polygon(self, pts: list[Point], fill: RGB) -> None:
        self._layer.polygon(self._xy(pts), fill=fill)
        self._mask.polygon(self._xy(pts), fill=255)

    def ellipse(self, box: tuple[float, float, float, float], fill: RGB) -> None:
        self._layer.ellipse(self._box(*box), fill=fill)
        self._mask.ellipse(self._box(*box), fill=255)

    def pieslice(self, box: tuple[float, float, float, float], start: float, end: float, fill: RGB) -> None:
        self._layer.pieslice(self._box(*box), start, end, fill=fill)
        self._mask.pieslice(self._box(*box), start, end, fill=255)

    def rounded(self, box: tuple[float, float, float, float], r: float, fill: RGB, **kw: Any) -> None:
        args = {"radius": r * self.s, "fill": fill, **kw}
        self._layer.rounded_rectangle(self._box(*box), **args)
        self._mask.rounded_rectangle(self._box(*box), **{**args, "fill": 255})

    def line(self, a: Point, b: Point, width: float, fill: RGB) -> None:
        self._layer.line(self._xy([a, b]), fill=fill, width=max(1, round(width * self.s)))

    def cut_polygon(self, pts: list[Point]) -> None:
        self._mask.polygon(self._xy(pts), fill=0)

    def cut_ellipse(self, box: tuple[float, float, float, float]) -> None:
        self._mask.ellipse(self._box(*box), fill=0)

    def composite(self, bg: Image.Image, outline: RGB, outline_px: int) -> Image.Image:
        """Paste the product on bg with a thin outline around its silhouette."""
        ring = self.mask.filter(ImageFilter.MaxFilter(2 * outline_px + 1))
        out = Image.composite(Image.new("RGB", bg.size, outline), bg, ring)
        return Image.composite(self.layer, out, self.mask)


def _sleeve(side: int, long: bool) -> list[Point]:
    """Quad from the shoulder outward: short = angled out, long = reaching the hem."""
    (ux, uy), length, t = ((0.31, 0.95), 0.74, 0.075) if long else ((0.87, 0.5), 0.26, 0.085)
    mx, my = side * 0.15, -0.29
    ex, ey = mx + side * ux * length, my + uy * length
    nx, ny = -uy * t, side * ux * t
    return [(mx + nx, my + ny), (mx - nx, my - ny), (ex - nx, ey - ny), (ex + nx, ey + ny)]


def _draw_apparel(c: _Canvas, p: dict[str, Any], rgb: RGB) -> None:
    if p["sleeve_length"] != "sleeveless":
        for side in (-1, 1):
            c.polygon(_sleeve(side, p["sleeve_length"] == "longsleeved"), rgb)
    c.polygon([(-0.13, -0.42), (0.13, -0.42), (0.19, -0.37), (0.18, 0.45), (-0.18, 0.45), (-0.19, -0.37)], rgb)
    if p["neckline"] == "crew neck":
        c.cut_ellipse((-0.13, -0.56, 0.13, -0.3))
    else:  # deep V: ~40% of torso height
        c.cut_polygon([(-0.12, -0.43), (0.12, -0.43), (0.0, -0.05)])


def _draw_cookware(c: _Canvas, p: dict[str, Any], rgb: RGB, side: int) -> None:
    dark = _shade(rgb, 0.45)
    if p["has_handle"] == "handle":  # pan-style, sticks out ~50% of body width
        u0, u1 = sorted((side * 0.2, side * 0.6))
        c.rounded((u0, -0.02, u1, 0.12), 0.05, rgb)
    c.rounded((-0.26, -0.08, 0.26, 0.42), 0.12, rgb, corners=(False, False, True, True))
    if p["has_lid"] == "lid":
        lid = _shade(rgb, 0.78)
        c.pieslice((-0.28, -0.3, 0.28, 0.0), 180, 360, lid)
        c.ellipse((-0.28, -0.19, 0.28, -0.09), lid)
        c.rounded((-0.05, -0.38, 0.05, -0.27), 0.02, lid)
        c.line((-0.26, -0.1), (0.26, -0.1), 0.025, dark)  # gap between lid and pot
    else:  # open top: rim with a dark inside
        c.ellipse((-0.26, -0.15, 0.26, -0.01), rgb)
        c.ellipse((-0.22, -0.13, 0.22, -0.03), _shade(rgb, 0.3))


def render(p: dict[str, Any], rng: np.random.Generator, image_size: int) -> Image.Image:
    """Draw one product at 2x, downsample, then apply lighting and noise."""
    size = 2 * image_size
    # ±15 per channel, mostly shared so black/white do not drift towards a hue
    shift = rng.integers(-10, 11) + rng.integers(-5, 6, 3)
    rgb: RGB = tuple(int(x) for x in np.clip(np.array(COLORS[p["color"]]) + shift, 0, 255))  # type: ignore[assignment]
    bg = _background(rng, size)
    scale = rng.uniform(0.62, 0.88)
    max_offset = min(0.12, 0.48 - scale / 2)  # keep the product fully in frame
    cx, cy = (size * (0.5 + rng.uniform(-max_offset, max_offset)) for _ in range(2))
    canvas = _Canvas(size, cx, cy, scale * size)
    if p["product_type"] == "apparel":
        _draw_apparel(canvas, p, rgb)
    else:
        _draw_cookware(canvas, p, rgb, side=1 if rng.random() < 0.5 else -1)
    img = canvas.composite(bg, _shade(rgb, 0.45), outline_px=2)
    img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float64) * rng.uniform(0.8, 1.15) + rng.integers(-6, 7, 3)
    arr += rng.normal(0, 2.5, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


# --------------------------------------------------------------------------- planting


def _respell(rng: random.Random, attr: str, value: str) -> str:
    """The same value written differently: a synonym, other case, or padding."""
    synonyms = SPEC["attributes"][attr].get("synonyms", {}).get(value, [])
    options = [value.upper(), value.capitalize(), f" {value}", f"{value} "]
    options += [s for syn in synonyms for s in (syn, syn.capitalize())]
    return rng.choice(options)


def _plant(
    rng: random.Random, products: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, str]], dict[str, str]]:
    """Return (catalog rows, ground-truth rows, {product_id: image error kind})."""
    broken = rng.sample([p["product_id"] for p in products], min(N_IMAGE_ERRORS, len(products)))
    image_errors = dict(zip(broken, ["missing", "missing", "garbage", "garbage", "truncated", "truncated"]))
    cells = [
        (i, attr)
        for i, p in enumerate(products)
        if p["product_id"] not in image_errors
        for attr in applicable(p["product_type"])
    ]
    rng.shuffle(cells)
    n_conf, n_gap = round(CONFLICT_RATE * len(cells)), round(GAP_RATE * len(cells))
    status = {cell: "conflict" for cell in cells[:n_conf]}
    status |= {cell: "gap" for cell in cells[n_conf : n_conf + n_gap]}
    status |= {cell: "invalid_value" for cell in cells[n_conf + n_gap : n_conf + n_gap + N_INVALID]}

    rows, truth = [dict(p) for p in products], []
    for i, p in enumerate(products):
        for attr in applicable(p["product_type"]):
            planted = "image_error" if p["product_id"] in image_errors else status.get((i, attr), "none")
            rows[i][attr] = _planted_value(rng, attr, p[attr], planted)
            truth.append({"product_id": p["product_id"], "attribute": attr, "true_value": p[attr], "planted": planted})
    return rows, truth, image_errors


def _plant_titles(rng: random.Random, rows: list[dict[str, Any]], image_errors: dict[str, str]) -> list[dict[str, str]]:
    """Give a share TITLE_MISMATCH_RATE of the rows with a good image another row's (different)
    title, in place; returns a ground-truth row per product for its title."""
    titles = [row["title"] for row in rows]
    good = [i for i, row in enumerate(rows) if row["product_id"] not in image_errors]
    mismatched = set(rng.sample(good, round(TITLE_MISMATCH_RATE * len(rows))))
    truth = []
    for i, row in enumerate(rows):
        planted = "image_error" if row["product_id"] in image_errors else "mismatch" if i in mismatched else "none"
        if planted == "mismatch":
            row["title"] = rng.choice([t for t in titles if t != titles[i]])
        truth.append(
            {"product_id": row["product_id"], "attribute": "title", "true_value": titles[i], "planted": planted}
        )
    return truth


def _planted_value(rng: random.Random, attr: str, true: str, planted: str) -> str | None:
    """The catalog value for a cell given what is planted in it."""
    if planted == "conflict":
        return rng.choice([v for v in SPEC["attributes"][attr]["values"] if v != true])
    if planted == "gap":
        return None
    if planted == "invalid_value":
        return rng.choice(INVALID_VALUES[attr])
    if planted == "none" and rng.random() < RESPELL_RATE:
        return _respell(rng, attr, true)
    return true


def _break_image(kind: str, path: Path, rng: np.random.Generator) -> None:
    """Replace a good JPEG by a broken one (or remove it)."""
    if kind == "missing":
        path.unlink()
    elif kind == "garbage":
        path.write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
    else:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * 0.4)])


# --------------------------------------------------------------------------- entry point


def _write_images(products: list[dict[str, Any]], root: Path, seed: int, split: int, image_size: int) -> None:
    for i, p in enumerate(products):
        rng = np.random.default_rng([seed, split, i])
        render(p, rng, image_size).save(root / p["image"], format="JPEG", quality=90)


def generate(
    out_dir: str | Path, *, seed: int = 0, n_labeled: int = 2400, n_catalog: int = 320, image_size: int = 128
) -> Path:
    """Write the sample dataset into out_dir; returns out_dir. Deterministic for a seed."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    labeled = _products(rng, n_labeled, "L")
    catalog = _products(rng, n_catalog, "C")
    catalog_rows, truth, image_errors = _plant(rng, catalog)
    truth += _plant_titles(random.Random(f"{seed}-titles"), catalog_rows, image_errors)

    _write_images(labeled, out, seed, 0, image_size)
    _write_images(catalog, out, seed, 1, image_size)
    for j, (pid, kind) in enumerate(sorted(image_errors.items())):
        _break_image(kind, out / "images" / f"{pid}.jpg", np.random.default_rng([seed, 2, j]))

    (out / "spec.yaml").write_text(SPEC_YAML)
    _frame(labeled).write_parquet(out / "labeled.parquet")
    _frame(catalog_rows).write_parquet(out / "catalog.parquet")
    truth_schema = {c: pl.String for c in ("product_id", "attribute", "true_value", "planted")}
    pl.DataFrame(truth, schema=truth_schema).write_parquet(out / "ground_truth.parquet")
    return out
