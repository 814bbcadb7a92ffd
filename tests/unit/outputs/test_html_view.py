"""The HTML view without a browser: escaping of hostile ids and paths, page boundaries, stale pages, reruns."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import datus.outputs.html_view
from datus.core.errors import ConfigurationError
from datus.outputs.html_view import page_count, write_html_view
from datus.runfolder.run import Results, Run


class _Links(HTMLParser):
    """Every href and src of a page, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.sources: list[str] = []
        self.figures = 0
        self.rels: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "a" and values.get("href") is not None:
            self.hrefs.append(values["href"] or "")
            if values.get("rel"):
                self.rels.setdefault(values["rel"] or "", values["href"] or "")
        if tag == "img":
            self.sources.append(values.get("src") or "")
        if tag == "figure":
            self.figures += 1


def _parsed(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _results(root: Path, ids: list[str], images: list[str] | None = None, colour: bool = True) -> Results:
    root.mkdir(parents=True, exist_ok=True)
    if colour:
        (root / "overlay").mkdir(exist_ok=True)
        (root / "color").mkdir(exist_ok=True)
    images = images or [f"/data/{image_id}.jpg" for image_id in ids]
    lines = [json.dumps({"image_id": i, "image": p, "mask": f"masks/{i}.png"}, ensure_ascii=False) for i, p in zip(ids, images)]
    (root / "manifest.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return Results(root, root)


def _summary(images: int) -> dict[str, object]:
    return {"images_in_run": images, "segments": 3, "noise_segments": 1, "num_clusters": 2, "skipped": []}


def test_hostile_ids_and_paths_are_escaped_and_quoted(tmp_path: Path) -> None:
    ids = ["x #1", "50% off", "été/ü ñ", "a&b'c", "<script>alert(1)</script>", "../../etc/passwd"]
    images = ['/data/we<ird "#?%.jpg', "/data/50% off.jpg", "/données/été/ü ñ.jpg", "relative.jpg", "/x.jpg", "/y.jpg"]
    results = _results(tmp_path / "run", ids, images)
    write_html_view(results, _summary(len(ids)), page_size=10)
    page = tmp_path / "run" / "view" / "page-000001.html"
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text and "passwd" not in text  # unsafe ids get no link and are not shown
    assert text.count("unreadable or unsafe manifest line") == 2  # '<...>' and '..' are not safe ids
    links = _parsed(page)
    assert links.figures == len(ids)
    relative = {unquote(urlsplit(href).path) for href in links.hrefs if href.startswith("../") and "page-" not in href}
    for image_id in ("x #1", "50% off", "été/ü ñ", "a&b'c"):
        for folder, suffix in (("masks", ".png"), ("color", ".png"), ("overlay", ".jpg")):
            assert f"../{folder}/{image_id}{suffix}" in relative
    for href in links.hrefs:
        assert " " not in href and "#" not in href and "?" not in href and not any(ord(c) > 127 for c in href)
    files = {unquote(urlsplit(href).path) for href in links.hrefs if href.startswith("file://")}
    assert files == {'/data/we<ird "#?%.jpg', "/data/50% off.jpg", "/données/été/ü ñ.jpg"}  # not a relative path
    assert all(source.startswith("../overlay/") for source in links.sources)
    assert 'loading="lazy"' in text


def test_damaged_manifest_lines_become_rows_without_links(tmp_path: Path) -> None:
    results = _results(tmp_path / "run", ["a"])
    with open(tmp_path / "run" / "manifest.jsonl", "a", encoding="utf-8") as stream:
        stream.write("{not json\n[1, 2]\n" + json.dumps({"image_id": 5}) + "\n")
    assert write_html_view(results, _summary(4), page_size=10) == 1
    text = (tmp_path / "run" / "view" / "page-000001.html").read_text(encoding="utf-8")
    assert text.count("unreadable or unsafe manifest line") == 3


@pytest.mark.parametrize("images", [0, 1, 3, 4, 7])
def test_page_count_and_boundaries(tmp_path: Path, images: int) -> None:
    page_size = 3
    ids = [f"img {n}" for n in range(images)]
    results = _results(tmp_path / "run", ids, colour=False)
    pages = write_html_view(results, _summary(images), page_size=page_size)
    assert pages == page_count(images, page_size) == {0: 0, 1: 1, 3: 1, 4: 2, 7: 3}[images]
    assert sorted(results.view_pages()) == list(range(1, pages + 1))
    index = _parsed(tmp_path / "run" / "index.html")
    if pages:
        assert "view/page-000001.html" in index.hrefs and f"view/page-{pages:06d}.html" in index.hrefs
    else:
        assert not any(href.startswith("view/") for href in index.hrefs)
    shown = []
    for number in range(1, pages + 1):
        links = _parsed(results.view_page(number))
        shown.append(links.figures)
        assert links.rels["index"] == "../index.html"
        assert ("prev" in links.rels) == (number > 1) and ("next" in links.rels) == (number < pages)
        if number < pages:
            assert links.rels["next"] == f"page-{number + 1:06d}.html" and links.rels["last"] == f"page-{pages:06d}.html"
        assert all(source.startswith("../masks/") for source in links.sources)  # no colour outputs: the mask
    assert sum(shown) == images and all(count == page_size for count in shown[:-1])


def test_pages_of_a_longer_earlier_run_are_removed_and_nothing_else(tmp_path: Path) -> None:
    results = _results(tmp_path / "run", [f"i{n}" for n in range(7)])
    assert write_html_view(results, _summary(7), page_size=2) == 4
    view = tmp_path / "run" / "view"
    (view / "notes.html").write_text("the user's")
    (view / "page-1.html").write_text("not ours: another name pattern")
    results = _results(tmp_path / "run", [f"i{n}" for n in range(3)])
    assert write_html_view(results, _summary(3), page_size=2) == 2
    assert sorted(path.name for path in view.iterdir()) == ["notes.html", "page-000001.html", "page-000002.html", "page-1.html"]


def test_a_rerun_with_nothing_changed_keeps_complete_pages_without_reading_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = _results(tmp_path / "run", [f"i{n}" for n in range(5)])
    write_html_view(results, _summary(5), page_size=2)
    (tmp_path / "run" / "index.html").unlink()

    def refuse(*args: object) -> None:
        raise AssertionError("the manifest was read on a rerun with complete pages")

    with monkeypatch.context() as patch:
        patch.setattr(datus.outputs.html_view, "_manifest_lines", refuse)
        write_html_view(results, _summary(5), page_size=2, images_changed=False)
    assert (tmp_path / "run" / "index.html").is_file()
    results.view_page(2).unlink()  # a missing page: written again
    write_html_view(results, _summary(5), page_size=2, images_changed=False)
    assert sorted(results.view_pages()) == [1, 2, 3]


def test_index_says_not_scored_and_links_run_files_from_a_cluster_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    results = Results(run / "clusters" / "k2", run)
    _results(results.root, ["a"])
    (results.root / "gallery").mkdir()
    (results.root / "gallery" / "cluster_0.png").write_bytes(b"")
    summary = {**_summary(1), "diagnostics": {"noise_pixel_fraction": 0.25, "clusters": {
        "segments": [2, 1], "segment_share": [0.6, 0.4], "pixel_share": [0.7, 0.3]}}}  # fmt: skip
    write_html_view(results, summary, page_size=2)
    text = (results.root / "index.html").read_text(encoding="utf-8")
    assert "Not scored" in text and "25.00%" in text
    links = _parsed(results.root / "index.html").hrefs
    assert "../../skipped.json" in links and "../../index.html" in links and "gallery/cluster_0.png" in links


def test_a_symbolic_link_for_the_view_folder_is_refused(tmp_path: Path) -> None:
    results = _results(tmp_path / "run", ["a"])
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run" / "view").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigurationError, match="symbolic link"):
        write_html_view(results, _summary(1))
    with pytest.raises(ConfigurationError, match="symbolic link"):
        Run(tmp_path / "run").check_links()
    assert not list((tmp_path / "elsewhere").iterdir())


def test_datus_cluster_adds_its_folder_to_the_run_page(finished_run: Path, tmp_path: Path) -> None:
    import shutil

    from datus.commands.cli import main

    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    assert "clusters/k2/index.html" not in (run / "index.html").read_text()
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "2", "--cluster.colour", "false", "--cluster.gallery", "false"])
    assert "clusters/k2/index.html" in (run / "index.html").read_text()


def test_the_page_states_the_verdict_in_words(tmp_path: Path) -> None:
    from datus.outputs.html_view import index_html
    from datus.runfolder.run import Results

    results = Results(tmp_path, tmp_path)
    said = {"status": "suspicious", "reasons": ["random weights <b>", "47% of pixels in noise segments"]}
    page = index_html(results, {"images_in_run": 1, "num_clusters": 2, "verdict": said}, 1, 1)
    assert "Verdict: suspicious</strong>: random weights &lt;b&gt;; 47% of pixels in noise segments." in page
    healthy = index_html(results, {"images_in_run": 1, "num_clusters": 2, "verdict": {"status": "healthy", "reasons": []}}, 1, 1)
    assert "Verdict: healthy</strong>: the label-free diagnostics are in their usual ranges." in healthy
    assert "No verdict" in index_html(results, {"verdict": {"status": "<script>"}}, 0, 0)


def test_a_summary_claiming_a_trillion_images_costs_nothing(finished_run: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from datus.outputs.html_view import write_html_view
    from datus.runfolder.run import Run

    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    summary = json.loads((run / "summary.json").read_text())
    summary["images_in_run"] = 10**12
    assert write_html_view(Run(run).results, summary, images_changed=False) >= 1  # pages rewritten from the manifest
