"""The Triton templates: read from the installed package, one jinja environment for all of them.

Templates live in `attncc.backends.triton.templates` and are read with importlib.resources, so
an installed (non-editable) attncc finds them. Undefined template variables are errors
(`StrictUndefined`): every value a template prints is prepared in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING

from attncc.backends.keys import sources_hash

if TYPE_CHECKING:
    import jinja2

PACKAGE = "attncc.backends.triton.templates"


def template_source(name: str) -> str:
    """The text of the template file `name` (e.g. "attn_fwd.py.j2")."""
    return resources.files(PACKAGE).joinpath(name).read_text()


def template_hash(names: Sequence[str]) -> str:
    """sha256 over the templates `names` (every file a source depends on, includes too)."""
    return sources_hash(template_source(n) for n in names)


def environment() -> jinja2.Environment:
    """The jinja environment every Triton renderer uses. jinja2 is imported here, at the first
    render, not with attncc: a call whose source is in the disk cache never renders."""
    import jinja2

    return jinja2.Environment(loader=jinja2.FunctionLoader(template_source),
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True, keep_trailing_newline=True)
