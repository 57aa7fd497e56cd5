"""``tzk report``: a self-contained page that shows the run, rendered by headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path

import pytest

from tzkcli.errors import BadInputError
from tzkcli.report import write_report
from tzkcli.report.history import read_history

PNG = b"\x89PNG\r\n\x1a\n"
IMG = re.compile(r'<img src="([^"]*)"')

# Written into a copy of the page: records errors and, on load, every image's state.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push("error: " + (e.message || (e.target && e.target.alt) || "?"));
}, true);
["error", "warn"].forEach(function (level) {
  var original = console[level];
  console[level] = function () {
    window.__errors.push(level + ": " + Array.prototype.join.call(arguments, " "));
    original.apply(console, arguments);
  };
});
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var out = document.createElement("pre");
  out.id = "tzk-probe";
  out.textContent = JSON.stringify({images: images.length, errors: window.__errors,
    broken: broken.map(function (i) { return i.alt; })});
  document.body.appendChild(out);
});
</script>"""

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


def _page(run: Path) -> str:
    return (run / "report.html").read_text(encoding="utf-8")


def test_the_page_is_self_contained(report_run):
    page = _page(report_run)
    sources = IMG.findall(page)
    assert len(sources) >= 20
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(PNG)
    assert "<script" not in page and "<link" not in page
    assert not re.search(r'(src|href)="(https?:)?//', page)


def test_the_page_shows_data_training_results_samples_and_configuration(report_run):
    page = _page(report_run)
    for key in ("data", "training", "results", "classification", "samples", "configuration"):
        assert f'<section id="{key}">' in page
    # counts per dataset and split of the shipped sample, and real images of each dataset
    assert "<td>mnist</td><td class=\"n\">3,000</td><td class=\"n\">500</td>" in page
    for name in ("mnist", "omniglot-atlas", "omniglot"):
        assert f'alt="images of {name}"' in page
    assert 'alt="training curves"' in page
    # the knowledge-gain table of both evaluations, the OOD table, three confusion matrices
    assert "<td>alphabet=omniglot/Greek</td>" in page
    assert "<td>label=mnist/7</td>" in page
    assert "AUROC by knowledge score" in page
    for kind in ("dataset", "label", "alphabet"):
        assert f'alt="confusion matrix of {kind}"' in page
    # grids from the joint, each dataset, each class, at two temperatures
    for temperature in ("0.7", "1"):
        for title in ("joint p_0", "one row per dataset", "one row per label",
                      "one row per alphabet"):
            assert f'alt="samples: {title} at {temperature}"' in page
    assert "<td>flow_steps</td><td>2</td>" in page


def test_chromium_renders_every_image_without_console_errors(report_run, chromium, tmp_path):
    page = _page(report_run).replace("<head>", "<head>\n" + PROBE, 1)
    probed = tmp_path / "probed.html"
    probed.write_text(page, encoding="utf-8")
    state = _render(chromium, probed, tmp_path / "profile-1")
    assert state["images"] == len(IMG.findall(_page(report_run)))
    assert state["broken"] == [] and state["errors"] == []

    shot = tmp_path / "report.png"
    done = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile-2'}",
                           "--window-size=1280,4000", f"--screenshot={shot}", probed.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.read_bytes().startswith(PNG)


def test_the_probe_reports_a_broken_image(chromium, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text(f"<!DOCTYPE html><html><head>{PROBE}</head><body>"
                      '<img src="data:image/png;base64,AAAA" alt="bad"></body></html>')
    state = _render(chromium, broken, tmp_path / "profile")
    assert state["broken"] == ["bad"]


def _render(chromium: str, page: Path, profile: Path) -> dict:
    done = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}",
                           "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE(" in line]
    assert console == []
    found = re.search(r'<pre id="tzk-probe">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stdout[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def test_tzk_report_writes_the_page_and_names_it(report_run, tzk, tmp_path):
    target = tmp_path / "page.html"
    result = tzk("report", report_run, "--out", target, "--no-samples", "--json")
    assert result.code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["report"] == str(target) and answer["images"] >= 20
    assert "Samples" in answer["sections"]
    assert target.read_text().startswith("<!DOCTYPE html>")


def test_not_a_run_is_one_error_line(tzk, tmp_path):
    result = tzk("report", tmp_path / "nothing")
    assert result.code == 3
    assert result.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'nothing'}: no such run directory; expected a run made by "
        "tzk train"]
    with pytest.raises(BadInputError, match="no run.json"):
        write_report(tmp_path)


def test_training_time_is_rebuilt_from_the_throughput_records(tmp_path):
    records = [
        {"type": "config", "config": {"batch_size": 10, "n_bits": 8}, "store": {}},
        {"type": "start", "step": 0},
        {"type": "train", "step": 1, "bpd_base": 7.0, "images_per_s": 5.0},    # 2 s
        {"type": "train", "step": 5, "bpd_base": 6.0, "images_per_s": 20.0},   # 4 x 0.5 s
        {"type": "val", "step": 5, "bpd_base": 5.5,
         "datasets": {"mnist": {"bpd_base": 5.0, "bpd_dataset": 4.5}}},
        {"type": "resume", "step": 5},
        {"type": "train", "step": 7, "bpd_base": 5.0, "images_per_s": 10.0},   # 2 x 1 s
        {"type": "end", "step": 7, "reason": "steps"},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n{torn")
    history = read_history(tmp_path)
    assert history.train.steps == [1, 5, 7]
    assert history.train.seconds == [2.0, 4.0, 6.0]
    assert history.val.seconds == [4.0]
    assert history.val_own["mnist"].bpd == [4.5]
    assert history.end["reason"] == "steps" and history.train_seconds == 6.0
