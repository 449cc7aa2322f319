"""``diffumask report``: what the page holds, the figures it draws from refine/train/evaluate, and the
page itself loaded in headless Chromium (skipped, saying why, where no Chromium is installed)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from dataset_factory import MIXED_NAMES, make_dataset
from PIL import Image

from diffumask.cli import main
from diffumask.dataset import IGNORE_INDEX, Dataset
from diffumask.report import build_report
from diffumask.report.browser import find_chromium, load_page, screenshot

N_ITEMS = 14


@pytest.fixture(scope="module")
def refined(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """Items refined by the adaptive γ per class (a 3-step AffinityNet, no CRF), then given noise scores as
    filter records them (refine drops the scores of the masks it replaces)."""
    from diffumask.masks.affinity import AffinityConfig
    from diffumask.refine import RefineConfig, refine_dataset

    dataset = make_dataset(tmp_path_factory.mktemp("report") / "data", n=N_ITEMS)
    refine_dataset(dataset.root, RefineConfig(method="adaptive", per_class=True, crf=False,
                                              affinity=AffinityConfig(train_steps=3, seed_crf=False)), progress=False)
    rng = np.random.default_rng(1)
    dataset.update_records({r["id"]: {"noise": {"score": round(float(rng.random()), 4)}} for r in dataset.records()})
    return dataset


@pytest.fixture(scope="module")
def run_and_evaluation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run folder with a training log, and an evaluation JSON, in the formats train and evaluate write."""
    from diffumask.segment.evaluate import Evaluation
    from diffumask.segment.run import RunFolder

    folder = tmp_path_factory.mktemp("runs")
    run = RunFolder.create(folder / "synthetic", ["background", *MIXED_NAMES],
                           {"data": ["data/synthetic"], "split": "train", "preset": {"family": "segformer"}})
    for step, loss in ((10, 2.5), (20, 1.25), (30, 0.75)):
        run.append_log({"step": step, "loss": loss, "lr": 1e-3, "seconds_per_step": 0.1, "elapsed": step * 0.1})
    evaluation = Evaluation(["background", *MIXED_NAMES], [0.9, 0.5, 0.25, float("nan"), 0.75, 0.125, 0.0], 0.42, 5)
    path = folder / "eval.json"
    path.write_text(json.dumps({"run": str(run.root), "data": "shapes-real", "split": "test", "protocol": None,
                                **evaluation.as_dict()}))
    return run.root, path


def _items_js(report: Path) -> dict:
    text = (report.parent / f"{report.stem}_files" / "items.js").read_text()
    return json.loads(text.removeprefix("window.DIFFUMASK = ").removesuffix(";\n"))


def test_report_files_and_statistics(tmp_path):
    refined = make_dataset(tmp_path / "data", n=N_ITEMS, noise=True)  # unrefined: its masks keep their 255 bands
    out = tmp_path / "report.html"
    assert main(["report", str(refined.root), "--out", str(out), "--quiet"]) == 0
    html = out.read_text()
    assets = tmp_path / "report_files"
    data = _items_js(out)
    assert len(data["items"]) == N_ITEMS and data["meta"]["names"] == ["background", *MIXED_NAMES]
    assert "data:image" not in html and len(html) < 200_000  # thumbnails are files, never inlined
    masks = {r["id"]: refined.read_mask(r["id"]) for r in refined.records()}
    for entry in data["items"]:
        mask = masks[entry["i"]]
        present = sorted(int(k) for k in set(np.unique(mask)) - {0, IGNORE_INDEX})
        assert set(present) <= set(entry["c"])
        assert entry["u"] == pytest.approx((mask == IGNORE_INDEX).mean(), abs=1e-4)
        assert entry["a"] == pytest.approx(((mask != 0) & (mask != IGNORE_INDEX)).mean(), abs=1e-4)
        assert entry["z"] == refined.records()[[r["id"] for r in refined.records()].index(entry["i"])]["noise"]["score"]
        assert entry["v"] == ["image", "mask", *present]  # every item has soft maps here
        with Image.open(assets / f"{entry['f']}.jpg") as strip:  # 96 px panels, 2 px apart
            assert strip.size == (len(entry["v"]) * 98 - 2, 96)
    for k, name in enumerate(MIXED_NAMES, start=1):  # the class table: items whose mask has it, their 255 share
        having = [m for m in masks.values() if (m == k).any()]
        share = 100 * sum(int((m == IGNORE_INDEX).sum()) for m in having) / sum(m.size for m in having)
        assert share > 1
        assert re.search(rf"</span>{k} {name}</td>\s*<td>\d+</td><td>{len(having)}</td>(?:(?!</tr>).)*<td>{share:.1f} %</td></tr>",
                         html, re.S), name
    assert 'value="noise-asc"' in html  # items carry record["noise"]["score"]: the gallery sorts by it
    # filter's score is an IoU and it prunes the lowest: ascending order shows the noisiest items first
    assert re.search(r'value="noise-asc">[^<]*noisiest', html) and "higher = cleaner" in html


def test_report_figures_and_results(refined, run_and_evaluation, tmp_path):
    run, evaluation = run_and_evaluation
    out = tmp_path / "r.html"
    result = build_report(refined.root, out, runs=[run], evaluations=[evaluation], fig2_items=3)
    html = out.read_text()
    fig3 = html[html.index('id="fig3"'):html.index('id="fig2"')]
    classes = {n for r in refined.records() for n in r["classes"]}
    assert len(re.findall(r"<polyline", fig3)) == len(classes)  # one IoU-vs-γ curve per class
    chosen = {name: gamma for r in refined.records() for k, gamma in r["refine"]["class_gammas"].items()
              for name in [MIXED_NAMES[int(k) - 1]]}
    for name, gamma in chosen.items():  # the γ marked is the one refine used for that class
        assert re.search(rf"</span>{name}</td>\s*<td>{gamma:.2f}</td>", fig3), name
    fig2 = html[html.index('id="fig2"'):html.index('id="results"')]
    assert fig2.count('class="fig2"') == 3 and fig2.count(">8×8<") == 3 and fig2.count(">fused<") == 3
    for name in ("fig2_0_image.jpg", "fig2_0_8.jpg", "fig2_0_16.jpg", "fig2_2_fused.jpg"):
        assert (result.assets / name).is_file()
    results = html[html.index('id="results"'):]
    assert f"{N_ITEMS} items refined: adaptive ({N_ITEMS})" in results
    assert "train: synthetic" in results and "0.7500" in results  # last loss of the run's log
    assert "<td>50.0 %</td>" in results and "<th>42.0 %</th>" in results  # person's IoU, the mIoU
    assert results.count("<rect") >= 7  # the IoU bar chart (sky: n/a, no bar)


def test_report_replaces_an_older_one_whole(refined, tmp_path):
    out = tmp_path / "r.html"
    build_report(refined.root, out, page_size=5)
    (tmp_path / "r_files" / "stale.jpg").write_bytes(b"x")
    build_report(refined.root, out, page_size=7)
    assert not (tmp_path / "r_files" / "stale.jpg").exists()
    assert _items_js(out)["meta"]["pageSize"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r_files"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "r_files").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's owner-only 0700
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_report_named_with_a_urls_characters_links_its_files(refined, tmp_path):
    """'#' and '%' in a page's name are a URL's fragment and escapes: "r #1.html" linked "r #1_files/items.js", which
    a browser reads as the file "r " and the fragment "1_files/…", so the page loaded no script and no image."""
    import urllib.parse

    out = tmp_path / "r #%1 é.html"
    build_report(refined.root, out, page_size=5)
    data = _items_js(out)
    urls = re.findall(r'src="([^"]+)"', out.read_text()) + [f"{data['meta']['assets']}/{item['f']}.jpg"
                                                             for item in data["items"]]
    assert len(urls) > N_ITEMS and not [url for url in urls if "#" in url]
    assert not [url for url in urls if not (tmp_path / urllib.parse.unquote(url)).is_file()]
    if find_chromium() is not None:
        page = load_page(out.resolve().as_uri())
        assert page.errors == [] and page.ready and page.cards == 5


def test_report_bad_input_is_a_one_line_error(refined, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    cases = [([str(tmp_path), "--out", str(tmp_path / "a.html")], "not a diffumask dataset"),
             ([str(refined.root), "--out", str(tmp_path / "folder")], "must name an .html file"),
             ([str(refined.root), "--out", str(tmp_path / "b.html"), "--evaluation", str(bad)], "diffumask evaluate --json"),
             ([str(refined.root), "--out", str(tmp_path / "c.html"), "--run", str(tmp_path)], "not a training run"),
             ([str(refined.root), "--out", str(tmp_path / "d.html"), "--fig2-items", "-1"], "--fig2-items is a count")]
    for args, message in cases:
        assert main(["report", *args, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("diffumask: error:") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]  # nothing half-written


chromium = pytest.mark.skipif(find_chromium() is None, reason="no Chromium on this machine (Debian: apt-get install "
                              "chromium; or set $CHROMIUM): the report's browser test cannot run")


@chromium
def test_report_in_headless_chromium(refined, run_and_evaluation, tmp_path):
    run, evaluation = run_and_evaluation
    out = tmp_path / "report.html"
    build_report(refined.root, out, runs=[run], evaluations=[evaluation], page_size=6)
    page = load_page(out)
    assert page.errors == [] and page.ready
    assert page.cards == 6 and page.matching == N_ITEMS and page.dom.count('class="card"') == 6
    last = load_page(f"{out}#page=3")  # 14 items, 6 per page: 2 on the last
    assert last.errors == [] and last.cards == 2
    records = refined.records()
    k = MIXED_NAMES.index(records[0]["classes"][0]) + 1
    expected = sum(bool((refined.read_mask(r["id"]) == k).any()) or MIXED_NAMES[k - 1] in r["classes"]
                   for r in records)
    filtered = load_page(f"{out}#class={k}&sort=noise-asc")
    assert filtered.errors == [] and filtered.matching == expected and filtered.cards == min(6, expected)
    ids = re.findall(r'class="card" data-id="([^"]+)"', filtered.dom)
    scores = {r["id"]: r["noise"]["score"] for r in records}
    assert [scores[i] for i in ids] == sorted(scores[i] for i in ids)
    png = screenshot(out, tmp_path / "report.png", width=1200, height=900)
    with Image.open(png) as image:
        assert image.size == (1200, 900) and len(np.unique(np.array(image.convert("L")))) > 50  # a drawn page


@chromium
def test_the_browser_check_catches_a_broken_page(refined, tmp_path):
    out = tmp_path / "report.html"
    build_report(refined.root, out)
    next((tmp_path / "report_files").glob("*/000000.jpg")).unlink()  # the thumbnails the first card shows
    page = load_page(out)
    assert any("000000.jpg" in e for e in page.errors)
    (tmp_path / "report_files" / "items.js").unlink()
    page = load_page(out)
    assert not page.ready and any("items.js did not load" in e for e in page.errors)
