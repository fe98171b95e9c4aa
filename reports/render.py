"""The report document (sections of text, tables and figures) rendered to HTML and Markdown.

Both renderings come from the same `Document`, through Jinja2 templates in `templates/`. The
HTML is self-contained: figures are embedded as base64 PNG data URIs and the stylesheet is
inline, so the file opens offline and can be mailed around on its own.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

from mpts.models.extras import import_extra

from .tables import Table

jinja2 = import_extra("jinja2", "reports")


@dataclasses.dataclass(frozen=True)
class FigureBlock:
    name: str  # file name under figures/
    caption: str


@dataclasses.dataclass(frozen=True)
class TextBlock:
    text: str


Block = FigureBlock | Table | TextBlock


@dataclasses.dataclass(frozen=True)
class Section:
    anchor: str
    title: str
    blocks: list[Block]


@dataclasses.dataclass(frozen=True)
class Document:
    title: str
    facts: list[tuple[str, str]]  # shown under the title
    sections: list[Section]
    warnings: list[str]


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mpts.reports", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=False),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )
    env.tests["figure"] = lambda block: isinstance(block, FigureBlock)
    env.tests["table"] = lambda block: isinstance(block, Table)
    env.tests["text"] = lambda block: isinstance(block, TextBlock)
    env.filters["md_cell"] = lambda text: str(text).replace("|", "\\|").replace("\n", " ")
    return env


def render_html(document: Document, figures_dir: Path) -> str:
    images = {}
    for section in document.sections:
        for block in section.blocks:
            if isinstance(block, FigureBlock):
                data = base64.b64encode((figures_dir / block.name).read_bytes()).decode("ascii")
                images[block.name] = f"data:image/png;base64,{data}"
    return _environment().get_template("report.html.j2").render(doc=document, images=images)


def render_markdown(document: Document, figures_folder: str) -> str:
    return _environment().get_template("report.md.j2").render(doc=document, figures=figures_folder)
