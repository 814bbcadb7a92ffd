"""A static HTML view of a results folder: ``index.html`` and the images, page by page, in ``view/``.

People would rather look than read, and 100,000 PNG files cannot be browsed in a file manager.
Every results folder (the run folder, ``clusters/k<K>/``) gets an ``index.html`` that opens from
disk in any browser: no server, no network, no JavaScript, no resource from elsewhere. It shows
the report, the legend, the metrics (or says the run was not scored), the label-free diagnostics,
the cluster galleries and links to the files; the images are listed in ``view/page-<n>.html``,
:data:`PAGE_SIZE` to a page, in manifest (shard) order, each with its overlay thumbnail (loaded
lazily) and links to the image, its mask, colour mask and overlay. No page lists every image.

Pages are written by streaming ``manifest.jsonl`` (two passes: one counts the lines, one writes
the pages; memory holds one page), so the cost is linear in the images and bounded in memory.

Everything on a page comes from files that may have been edited (the manifest, summary and
metrics are untrusted): text is HTML-escaped, links are URL-quoted, ids that are not safe
relative names get no link, and links to outputs are relative, so the folder can be moved. The
input image is linked by a ``file://`` URL of its absolute path (the manifest's path joined to the
``image_root`` of ``dataset.json``):
the results folder is meant to move while the input images stay where they are (a relative
link would break as soon as the results folder moves alone).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from datus.core.errors import ConfigurationError
from datus.core.io import UnreadableFile, read_json, write_text
from datus.outputs.manifest import image_root_of, manifest_lines
from datus.stages.metrics import PROTOCOLS, format_table
from datus.runfolder.run import (
    CLASSES_FILE,
    CLUSTERS_DIR,
    COLOUR,
    CONFUSION_FILE,
    GALLERY_DIR,
    HTML_INDEX,
    IMAGE_FOLDERS,
    LEGEND_FILE,
    MANIFEST_FILE,
    MASKS,
    METRICS_FILE,
    METRICS_TABLE,
    OVERLAY,
    REPORT_FILE,
    SKIPPED_FILE,
    SUMMARY_FILE,
    VIEW_DIR,
    Results,
    Run,
    check_image_id,
    view_page_name,
)
from datus.stages.score import read_metrics

PAGE_SIZE = 50
"""Images per page of ``view/``: a page of overlay thumbnails a browser shows at once."""

_NEARBY = 4
"""Pages linked on either side of the current one, besides first, previous, next and last."""

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}
img.wide{max-width:100%;height:auto;border:1px solid #ccc}
pre{background:#fff;border:1px solid #ccc;padding:.5em;overflow-x:auto;font-size:.8em}
nav{margin:.6em 0;padding:.4em;background:#eee}nav a,nav span{margin:0 .25em}
.grid{display:flex;flex-wrap:wrap;gap:.6em}
figure{margin:0;width:232px;background:#fff;border:1px solid #ccc;padding:4px}
figure img{width:232px;height:170px;object-fit:contain;background:#ddd;display:block}
figcaption{font-size:.8em;overflow-wrap:anywhere}
.bad{color:#a00}.off{color:#999}
"""


def write_html_view(results: Results, summary: dict[str, Any], page_size: int = PAGE_SIZE, images_changed: bool = True) -> int:
    """Write ``index.html`` and the image pages of ``results`` (rank 0 only); returns the number of pages.

    Args:
        results: the results folder; its ``manifest.jsonl`` lists the images.
        summary: the folder's summary (``summary.json``'s content): counts and diagnostics.
        page_size: images per page.
        images_changed: False on a rerun that changed nothing: the pages are then kept when every
            page the summary's image count needs is there (nothing else is read); index.html,
            a few small files, is always written again.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")
    folder = results.root / VIEW_DIR
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ConfigurationError(f"{folder} is a symbolic link or a file; datus writes its pages there. Remove it")
    images = summary.get("images_in_run")
    pages = page_count(images, page_size) if isinstance(images, int) and images >= 0 else -1
    present = set(results.view_pages())  # pages on disk: their count bounds the check, not the (untrusted) summary
    if images_changed or len(present) != pages or any(not 1 <= number <= pages for number in present):
        images, pages = write_pages(results, page_size)
    write_text(results.file(HTML_INDEX), index_html(results, summary, images, pages, page_size))
    return pages


def refresh_run_index(run: Run) -> None:
    """Rewrite the run folder's ``index.html`` (after ``datus cluster`` added a ``clusters/k<K>/``); pages stay."""
    try:
        summary = read_json(run.results.file(SUMMARY_FILE))
    except (FileNotFoundError, UnreadableFile):
        return  # the run folder was never painted: it has no page to refresh
    if isinstance(summary, dict) and run.results.file(HTML_INDEX).is_file():
        write_html_view(run.results, summary, images_changed=False)


def page_count(images: int, page_size: int) -> int:
    """Pages needed for ``images`` images: none for none."""
    return math.ceil(images / page_size)


def write_pages(results: Results, page_size: int = PAGE_SIZE) -> tuple[int, int]:
    """``view/page-<n>.html`` from the manifest, one page in memory; pages beyond the last are removed.

    Returns (images, pages).
    """
    manifest = results.file(MANIFEST_FILE)
    images = sum(1 for _ in _manifest_lines(results))
    pages = page_count(images, page_size)
    folders = _picture_folders(results)
    try:
        image_root = image_root_of(results.root)
    except ValueError:
        image_root = None  # a damaged dataset.json: relative image paths get no link
    rows: list[str] = []
    written = 0
    for index, line in enumerate(_manifest_lines(results)):
        rows.append(_card(index, line, folders, manifest, image_root))
        if len(rows) == page_size:
            written += 1
            write_text(results.view_page(written), _page_html(results, written, pages, images, rows), durable=False)
            rows = []
    if rows:
        written += 1
        write_text(results.view_page(written), _page_html(results, written, pages, images, rows), durable=False)
    for number, path in results.view_pages().items():
        if number > written and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
    return images, written


def _manifest_lines(results: Results) -> Iterator[bytes]:
    """:func:`datus.outputs.manifest.manifest_lines`, or none when the manifest is missing or not a regular file."""
    try:
        for _, line in manifest_lines(results.root):
            yield line
    except OSError:
        return


def _picture_folders(results: Results) -> list[str]:
    """The per-image folders to link, in order; the first is the thumbnail (overlay, else colour, else mask)."""
    present = [folder for folder in (OVERLAY, COLOUR) if (results.root / folder).is_dir()]
    return [*present, MASKS]


def _url(*parts: str) -> str:
    """A relative URL, each character that is not plain quoted (``#``, ``?``, ``%``, spaces, non-ASCII)."""
    return quote("/".join(parts), safe="/", errors="surrogateescape")


def _text(value: Any) -> str:
    """``value`` as HTML text: escaped, with undecodable file-name bytes shown as escapes."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return html.escape(text, quote=True)


def _link(url: str, label: str, **attributes: str) -> str:
    extra = "".join(f' {name}="{html.escape(value)}"' for name, value in attributes.items())
    return f'<a href="{html.escape(url)}"{extra}>{label}</a>'


_LABELS = {OVERLAY: "overlay", COLOUR: "colour mask", MASKS: "mask"}


def _card(index: int, line: bytes, folders: Sequence[str], manifest: Path, image_root: Path | None = None) -> str:
    """One image of a page: thumbnail and links, or why it has none."""
    try:
        entry = json.loads(line.decode("utf-8"))
        image_id = entry["image_id"]
        if not isinstance(image_id, str):
            raise TypeError("image_id is not a string")
        check_image_id(image_id, manifest)
    except (ValueError, KeyError, TypeError, RecursionError, ConfigurationError):
        return (
            f'<figure><figcaption>#{index + 1} <span class="bad">unreadable or unsafe manifest line</span></figcaption></figure>'
        )
    quoted = quote(image_id, safe="/", errors="surrogateescape")  # letters, digits, "_.-~/%" only: safe in an attribute
    urls = [f"../{folder}/{quoted}{IMAGE_FOLDERS[folder]}" for folder in folders]
    shown = _text(image_id)
    image = entry.get("image")
    if isinstance(image, str) and image_root is not None and not image.startswith("/"):
        image = str(image_root / image)  # manifest paths are relative to the input root (dataset.json)
    links = " · ".join([_image_link(image)] + [f'<a href="{url}">{_LABELS[f]}</a>' for f, url in zip(folders, urls)])
    return (
        f'<figure><a href="{urls[0]}"><img src="{urls[0]}" loading="lazy" alt="{_LABELS[folders[0]]} of {shown}"></a>'
        f"<figcaption>#{index + 1} <b>{shown}</b><br>{links}</figcaption></figure>"
    )


def _image_link(path: Any) -> str:
    """The input image as a ``file://`` URL of its absolute path (it stays where it was read)."""
    if isinstance(path, str) and path.startswith("/"):
        try:
            return f'<a href="file://{quote(path, safe="/", errors="surrogateescape")}">image</a>'
        except UnicodeError:
            pass
    return '<span class="off">image</span>'


def _navigation(number: int, pages: int) -> str:
    """First, previous, nearby pages, next, last, and the way back to index.html."""

    def to(target: int, label: str, rel: str | None = None) -> str:
        if target < 1 or target > pages or target == number:
            return f'<span class="off">{label}</span>'
        return _link(view_page_name(target), label, **({"rel": rel} if rel else {}))

    nearby = range(max(1, number - _NEARBY), min(pages, number + _NEARBY) + 1)
    numbers = " ".join(f"<b>{n}</b>" if n == number else to(n, str(n)) for n in nearby)
    return (
        f"<nav>{_link('../' + HTML_INDEX, 'index', rel='index')} | {to(1, 'first', 'first')} "
        f"{to(number - 1, 'previous', 'prev')} | {numbers} | {to(number + 1, 'next', 'next')} "
        f"{to(pages, 'last', 'last')} | page {number} of {pages}</nav>"
    )


def _page_html(results: Results, number: int, pages: int, images: int, rows: Sequence[str]) -> str:
    nav = _navigation(number, pages)
    title = f"{_text(results.root.name)}: page {number} of {pages}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_STYLE}</style></head><body>\n<h1>{title} ({images} images)</h1>\n{nav}\n"
        f'<div class="grid">\n' + "\n".join(rows) + f"\n</div>\n{nav}\n</body></html>\n"
    )


def index_html(results: Results, summary: dict[str, Any], images: int, pages: int, page_size: int = PAGE_SIZE) -> str:
    """``index.html``: what the folder holds, with the report, metrics, diagnostics, galleries and links."""
    root = results.root
    run_root = _url(*([".."] * len(root.relative_to(results.boundary).parts))) if not results.is_run_folder else ""
    num_clusters = summary.get("num_clusters")
    title = f"datus results: {_text(root.name)}"
    facts = [f"{images} images", f"K = {_text(num_clusters)}"]
    if isinstance(summary.get("segments"), int) and isinstance(summary.get("noise_segments"), int):
        facts.append(f"{summary['segments']} valid + {summary['noise_segments']} noise segments")
    skipped = summary.get("skipped")
    skipped_url = _url(run_root, SKIPPED_FILE) if run_root else SKIPPED_FILE
    if isinstance(skipped, list):
        facts.append(_link(skipped_url, f"{len(skipped)} input files skipped"))
    body = [f"<h1>{title}</h1>", f"<p>{', '.join(facts)}</p>", _verdict_html(summary.get("verdict"))]

    body.append('<h2 id="images">Images</h2>')
    if pages:
        body.append(
            f"<p>{_link(VIEW_DIR + '/' + view_page_name(1), 'Browse the images', id='browse')}: {pages} page{'s' if pages > 1 else ''} of "
            f"{page_size} in manifest order, each with its overlay, mask and colour mask "
            f"({_link(VIEW_DIR + '/' + view_page_name(pages), 'last page')}).</p>"
        )
    else:
        body.append(f'<p class="off">No images: {MANIFEST_FILE} is missing or empty.</p>')

    body.append("<h2>Report</h2>")
    for name, label in ((REPORT_FILE, "report"), (LEGEND_FILE, "legend")):
        if results.file(name).is_file():
            body.append(_link(name, f'<img class="wide" src="{name}" alt="{label}">') + "<br>")
    if not results.file(REPORT_FILE).is_file():
        body.append(f'<p class="off">No {REPORT_FILE}.</p>')

    body.append('<h2 id="metrics">Metrics</h2>')
    body.append(_metrics_html(results, num_clusters if isinstance(num_clusters, int) else None))

    body.append('<h2 id="diagnostics">Diagnostics (label-free)</h2>')
    body.append(_diagnostics_html(results, summary.get("diagnostics")))

    body.append('<h2 id="galleries">Cluster galleries</h2>')
    sheets = results.gallery_sheets()
    if results.gallery_index().is_file():
        index_url = _url(GALLERY_DIR, results.gallery_index().name)
        body.append(_link(index_url, f'<img class="wide" src="{index_url}" loading="lazy" alt="gallery index">'))
    if sheets:
        links = (_link(_url(GALLERY_DIR, sheets[k].name), f"cluster {k}") for k in sorted(sheets))
        body.append("<p>" + " · ".join(links) + "</p>")
    else:
        body.append('<p class="off">No galleries.</p>')

    body.append("<h2>Other results</h2>")
    body.append(_sweep_html(results, run_root))

    body.append("<h2>Files</h2>")
    files = [MANIFEST_FILE, CLASSES_FILE, SUMMARY_FILE, METRICS_FILE, METRICS_TABLE, CONFUSION_FILE]
    links = [_link(_url(name), name) for name in files if results.file(name).is_file()]
    links += [_link(_url(folder) + "/", folder + "/") for folder in IMAGE_FOLDERS if (root / folder).is_dir()]
    body.append("<p>" + " · ".join(links) + "</p>")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _verdict_html(verdict: Any) -> str:
    """The run's verdict from the label-free diagnostics, in words, at the top of the page (summary.json is untrusted)."""
    if not isinstance(verdict, dict) or verdict.get("status") not in ("healthy", "suspicious"):
        return '<p class="off">No verdict in summary.json.</p>'
    reasons = [reason for reason in verdict.get("reasons", []) if isinstance(reason, str)] if isinstance(verdict.get("reasons"), list) else []
    colour = "#0a6a0a" if verdict["status"] == "healthy" else "#a40000"
    said = "the label-free diagnostics are in their usual ranges" if not reasons else "; ".join(_text(reason) for reason in reasons)
    return f'<p id="verdict" style="color:{colour}"><strong>Verdict: {verdict["status"]}</strong>: {said}.</p>'


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _number(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _metrics_html(results: Results, num_clusters: int | None) -> str:
    metrics = read_metrics(results.file(METRICS_FILE), num_clusters)
    if metrics is None:
        return '<p class="off">Not scored (no ground truth for these images).</p>'
    columns = (("mIoU", "miou"), ("pixel acc", "pixel_accuracy"), ("mean F1", "mean_f1"), ("mean acc", "mean_accuracy"))
    rows = [
        "<table><tr><th class=l>protocol</th>"
        + "".join(f"<th>{label}</th>" for label, _ in columns)
        + "<th>NMI</th><th>ARI</th></tr>"
    ]
    for name in PROTOCOLS:
        protocol = metrics["protocols"][name]
        cells = "".join(f"<td>{_percent(protocol.get(key))}</td>" for _, key in columns)
        cells += f"<td>{_percent(protocol.get('nmi'))}</td><td>{_percent(protocol.get('ari'))}</td>"
        rows.append(f"<tr><td class=l>{name}</td>{cells}</tr>")
    rows.append("</table>")
    crf = metrics.get("crf") or {}
    rows.append(
        f"<p>{metrics['num_images']} images scored; dense CRF {'applied' if crf.get('applied') else 'not applied'}.</p>"
        if isinstance(metrics.get("num_images"), int)
        else ""
    )
    try:
        names = metrics.get("class_names")
        rows.append(f"<pre>{_text(format_table(metrics, names if isinstance(names, list) else None))}</pre>")
    except (ValueError, KeyError, TypeError, IndexError):
        pass
    if results.file(CONFUSION_FILE).is_file():
        rows.append(f"<p>{_link(CONFUSION_FILE, 'The confusion matrix')} (also in the report).</p>")
    return "\n".join(rows)


def _get(value: Any, *keys: str) -> Any:
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _diagnostics_html(results: Results, diagnostics: Any) -> str:
    if not isinstance(diagnostics, dict):
        return '<p class="off">No diagnostics in summary.json.</p>'
    rows = [
        ("share of pixels in noise segments", _percent(diagnostics.get("noise_pixel_fraction"))),
        ("images without a valid segment", _number(diagnostics.get("images_without_valid_segments"))),
    ]
    for kind in ("valid", "noise"):
        counts = _get(diagnostics, "segments_per_image", kind)
        rows.append(
            (
                f"{kind} segments per image (mean, median, range)",
                (
                    f"{_number(_get(counts, 'mean'), 2)}, {_number(_get(counts, 'median'), 1)}, "
                    f"{_number(_get(counts, 'min'))}-{_number(_get(counts, 'max'))}"
                ),
            )
        )
    modularity = diagnostics.get("modularity")
    rows.append(
        (
            "modularity (mean, min, max)",
            ", ".join(_number(_get(modularity, key)) for key in ("mean", "min", "max")),
        )
    )
    rows.append(("stability ARI", _number(_get(diagnostics, "stability", "ari"))))
    rows.append(("largest cluster, share of pixels", _percent(_get(diagnostics, "clusters", "largest_pixel_share"))))
    table = ["<table>"] + [f"<tr><th class=l>{label}</th><td>{value}</td></tr>" for label, value in rows] + ["</table>"]

    clusters = diagnostics.get("clusters") if isinstance(diagnostics.get("clusters"), dict) else {}
    segments, segment_share, pixel_share = (clusters.get(key) for key in ("segments", "segment_share", "pixel_share"))
    if all(isinstance(column, list) for column in (segments, segment_share, pixel_share)):
        names = _get(_optional_json(results.file(CLASSES_FILE)), "classes")
        sheets = results.gallery_sheets()
        table.append(
            "<p></p><table><tr><th>cluster</th><th class=l>name</th><th>valid segments</th><th>share of segments</th>"
            "<th>share of pixels</th><th class=l>gallery</th></tr>"
        )
        for k, (count, by_segment, by_pixel) in enumerate(zip(segments, segment_share, pixel_share)):
            name = names[k] if isinstance(names, list) and k < len(names) else ""
            sheet = _link(_url(GALLERY_DIR, sheets[k].name), f"cluster_{k}.png") if k in sheets else ""
            table.append(
                f"<tr><td>{k}</td><td class=l>{_text(name)}</td><td>{_number(count)}</td><td>{_percent(by_segment)}</td>"
                f"<td>{_percent(by_pixel)}</td><td class=l>{sheet}</td></tr>"
            )
        table.append("</table>")
    table.append(
        f'<p>How to read them: the README\'s section "Diagnostics and cluster galleries"; all of them in '
        f"{_link(SUMMARY_FILE, SUMMARY_FILE)}.</p>"
    )
    return "\n".join(table)


def _optional_json(path: Path) -> Any:
    try:
        return read_json(path) if path.is_file() else None
    except UnreadableFile:
        return None


def _sweep_html(results: Results, run_root: str) -> str:
    """The sweep table over K and the other results folders of the run."""
    if not results.is_run_folder:
        return (
            f"<p>{_link(_url(run_root, HTML_INDEX), 'The run folder')} · "
            f"{_link(_url('..', 'summary.txt'), 'the sweep over K')} (clusters/summary.txt, written once the sweep ends)</p>"
        )
    clusters = results.root / CLUSTERS_DIR
    links = []
    if (clusters / "summary.txt").is_file():
        links.append(_link(_url(CLUSTERS_DIR, "summary.txt"), "the sweep over K"))
    if clusters.is_dir() and not clusters.is_symlink():
        for entry in sorted(clusters.iterdir(), key=lambda path: (len(path.name), path.name)):
            if entry.name[:1] == "k" and entry.name[1:].isdigit() and (entry / HTML_INDEX).is_file():
                links.append(_link(_url(CLUSTERS_DIR, entry.name, HTML_INDEX), f"K = {entry.name[1:]}"))
    return "<p>" + " · ".join(links) + "</p>" if links else '<p class="off">No datus cluster results.</p>'
