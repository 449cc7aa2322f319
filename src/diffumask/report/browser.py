"""Open a report in headless Chromium: the DOM after its scripts ran, its errors, a screenshot.

What the report's tests and the README's screenshot use. The page records every error (script
errors, resources that fail to load, ``console.error``) in its ``data-errors`` attribute, and the
gallery's card count in ``data-cards``; Chromium's own console log (``--enable-logging=stderr``)
adds the errors of scripts that ran before the page's recorder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_CONSOLE = re.compile(r':CONSOLE[^\]]*\] "(?P<message>.*)", source: (?P<source>.*)$')
_ATTRIBUTE = re.compile(r'<html[^>]*?\s{name}="(?P<value>[^"]*)"')


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) executable, from ``$CHROMIUM`` or the PATH."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


@dataclass
class PageLoad:
    dom: str
    errors: list[str]  # recorded by the page, then console errors Chromium logged
    cards: int | None  # gallery cards shown (the page's data-cards)
    matching: int | None  # items that pass the gallery's filter
    ready: bool  # the gallery script ran to its end


def _url(url_or_path: str | Path) -> str:
    """A file:// URL for a path; a ``#fragment`` (the gallery's state) is kept."""
    text = str(url_or_path)
    if text.startswith(("file:", "http:", "https:")):
        return text
    path, sep, fragment = text.partition("#")
    return Path(path).resolve().as_uri() + sep + fragment


def _flags(chromium: str) -> list[str]:
    flags = [chromium, "--headless", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files",
             "--no-first-run", "--disable-extensions", "--mute-audio"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--no-sandbox")  # Chromium refuses to start as root with its sandbox (CI containers)
    return flags


def _attribute(dom: str, name: str) -> str | None:
    match = re.search(_ATTRIBUTE.pattern.format(name=re.escape(name)), dom)
    return None if match is None else match["value"].replace("&quot;", '"').replace("&amp;", "&")


def load_page(url_or_path: str | Path, chromium: str | None = None, timeout: float = 60.0) -> PageLoad:
    """Load a page in headless Chromium and read what its scripts left in the DOM."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium, or set $CHROMIUM)")
    url = _url(url_or_path)
    done = subprocess.run([*_flags(chromium), "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
                           "--dump-dom", str(url)], capture_output=True, text=True, timeout=timeout, check=False)
    dom = done.stdout
    errors = json.loads(_attribute(dom, "data-errors") or "[]")
    for line in done.stderr.splitlines():
        match = _CONSOLE.search(line)
        if match and match["message"].startswith(("Uncaught", "Error", "TypeError", "ReferenceError")):
            if match["message"] not in errors:
                errors.append(match["message"])
    if not dom.strip():
        errors.append(f"Chromium printed no DOM (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    cards, matching = _attribute(dom, "data-cards"), _attribute(dom, "data-matching")
    return PageLoad(dom, errors, None if cards is None else int(cards), None if matching is None else int(matching),
                    _attribute(dom, "data-ready") == "1")


def screenshot(url_or_path: str | Path, png: str | Path, width: int = 1280, height: int = 1400,
               chromium: str | None = None, timeout: float = 60.0) -> Path:
    """Save a PNG of the page at ``width`` x ``height`` CSS pixels."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium, or set $CHROMIUM)")
    url = _url(url_or_path)
    png = Path(png).resolve()
    subprocess.run([*_flags(chromium), f"--window-size={width},{height}", "--virtual-time-budget=10000",
                    f"--screenshot={png}", str(url)], capture_output=True, timeout=timeout, check=True)
    if not png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot to {png}")
    return png


__all__ = ["PageLoad", "find_chromium", "load_page", "screenshot"]
