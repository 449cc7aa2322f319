"""How ``diffumask report`` scales: build time, size on disk and page load in headless Chromium at N items.

    python bench/bench_report.py --items 10000 [--size 64] [--keep DIR]

Builds an N-item dataset of shapes-world scenes with soft maps shaped like ``generate``'s (fused map,
per-resolution grids, self-attention; a few seconds per thousand items), then times ``build_report``,
sums the size of the page and its thumbnails, loads the page in headless Chromium (when installed)
and checks that it shows one page of cards without errors. ``--size`` sets the image side: thumbnails
are 128 px whatever it is, so the report's size barely depends on it; its build time does (decoding).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dataset_factory import make_dataset  # noqa: E402

from diffumask.report import PAGE_SIZE, build_report  # noqa: E402
from diffumask.report.browser import find_chromium, load_page  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--keep", help="build the dataset and report in this folder and keep them")
    args = parser.parse_args()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_report."))
    start = time.perf_counter()
    dataset_root = folder / "data"
    if not (dataset_root / "manifest.jsonl").is_file():
        make_dataset(dataset_root, n=args.items, size=args.size, noise=True)
    made = time.perf_counter() - start
    result = build_report(dataset_root, folder / "report.html", progress=True)
    html_kib = result.html.stat().st_size / 1024
    items_kib = (result.assets / "items.js").stat().st_size / 1024
    files = sum(1 for p in result.assets.rglob("*") if p.is_file())
    print(f"items {result.items} ({args.size} px, dataset made in {made:.0f} s)")
    print(f"build {result.seconds:.1f} s ({1000 * result.seconds / result.items:.1f} ms per item)")
    print(f"size {result.size_bytes / 2**20:.1f} MiB in {files} files: page {html_kib:.0f} KiB, items.js {items_kib:.0f} KiB")
    if find_chromium() is None:
        print("browser: no Chromium installed, page load not measured")
        return
    tick = time.perf_counter()
    page = load_page(result.html)
    print(f"browser: loaded in {time.perf_counter() - tick:.1f} s (Chromium start included), {page.cards} cards of "
          f"{page.matching} items (page size {PAGE_SIZE}), errors: {page.errors or 'none'}")


if __name__ == "__main__":
    main()
