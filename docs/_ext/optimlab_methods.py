"""Generate one page per registered method, and the methods index, from the optimlab registry.

Hooked to ``builder-inited``: before Sphinx looks for source files, this writes ``docs/methods/<name>.rst``
for every entry of :data:`optimlab.registry.REGISTRY` and ``docs/methods/index.rst`` with a table of them
all. ``docs/methods/`` is generated (and git-ignored); a file is rewritten only when its text changes, so
incremental builds stay incremental, and pages of methods that left the registry are removed.

It also connects to ``autodoc-process-docstring``: optimlab classes reuse their module docstring as the
class docstring (``__doc__ = __doc__``), and a method page shows the module docstring already, so the
class entry gets a short pointer instead of the same text twice.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

OUTPUT_DIR = "methods"

# what each capability flag means, in the words of a user
CAPABILITY_TEXT = {
    "needs_closure": "``step()`` needs a closure that re-evaluates the loss",
    "needs_create_graph": "needs ``loss.backward(create_graph=True)`` (uses second-order information)",
    "global_state": "the update couples tensors (e.g. a norm over all parameters, a per-matrix SVD)",
    "stochastic": "draws random numbers from its own ``torch.Generator`` (saved in ``state_dict``)",
    "sparse_grads": "accepts sparse gradients",
    "complex_params": "accepts complex parameters",
    "fast_path": "has a fused / multi-tensor fast path",
    "compilable": "a training step with it runs under ``torch.compile``",
}


# -- reStructuredText helpers -----------------------------------------------------------------------------
def _escape(text: str) -> str:
    """Plain text made safe to place inside reStructuredText prose."""
    for ch in ("\\", "*", "`", "|", "_", "<", ">"):
        text = text.replace(ch, "\\" + ch)
    return text


def _link(text: str, url: str) -> str:
    # anonymous reference (``__``), so two links with the same text never clash
    return f"`{_escape(text)} <{url}>`__"


def _number(x: Any) -> str:
    """A value as Python source, floats the way people write them (``1e-8``, not ``1e-08``)."""
    if isinstance(x, float):
        text = repr(x)
        if "e" in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        return text
    if isinstance(x, tuple):
        inner = ", ".join(_number(v) for v in x)
        return f"({inner},)" if len(x) == 1 else f"({inner})"
    return repr(x)


def _literal(value: Any) -> str:
    return f"``{_number(value)}``"


def _strip_scheme(url: str) -> str:
    return url.split("://", 1)[-1]


def _title(text: str, char: str) -> list[str]:
    return [text, char * len(text), ""]


def _list_table(header: list[str], rows: list[list[str]], widths: str | None = None) -> list[str]:
    out = [".. list-table::", "   :header-rows: 1"]
    if widths:
        out.append(f"   :widths: {widths}")
    out.append("")
    for row in [header, *rows]:
        for i, cell in enumerate(row):
            out.append(("   * - " if i == 0 else "     - ") + (cell or "\u2014"))
    out.append("")
    return out


# -- what to document --------------------------------------------------------------------------------------
def _public_class_path(cls: type) -> str:
    """``optimlab.Name`` when the package exports the class, else its defining module path."""
    import optimlab

    if getattr(optimlab, cls.__name__, None) is cls:
        return f"optimlab.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


ENTRY_POINTS = {  # the methods a user calls, by kind
    "optimizer": ["step"],
    "wrapper": ["step"],
    "solver": ["run", "update", "init_state", "optimality_fun"],
    "loss": ["forward"],
    "layer": ["forward"],
    "function": [],
    "communication": [],
    "aggregator": ["__call__"],
}


def _class_members(info: Any) -> list[str]:
    """The kind's entry points plus the public methods a user calls on this class (ones it defines,
    ``generator`` if random)."""
    members = list(ENTRY_POINTS.get(info.kind, []))
    for klass in info.cls.__mro__:
        if not klass.__module__.startswith("optimlab") or klass.__module__.startswith("optimlab._core"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name in members or name == "info":
                continue
            function = value.__func__ if isinstance(value, classmethod | staticmethod) else value
            if inspect.isfunction(function) and function.__doc__:
                members.append(name)
    if info.capabilities.stochastic and hasattr(info.cls, "generator"):
        members.append("generator")
    return members


def _functional_cores(info: Any) -> list[str]:
    """The module's public functions (the functional core the class calls)."""
    module = sys.modules[info.cls.__module__]
    names = getattr(module, "__all__", [])
    return [
        f"{module.__name__}.{n}"
        for n in names
        if inspect.isfunction(getattr(module, n, None))
        and getattr(module, n).__module__ == module.__name__
        and getattr(module, n) is not info.cls  # a function's own entry documents it under API
    ]


# -- pages -------------------------------------------------------------------------------------------------
def method_page(info: Any, index_module: bool) -> str:
    """The reStructuredText of one method's page."""
    cls_path = _public_class_path(info.cls)
    lines = [f".. _method-{info.name}:", ""]
    lines += _title(f"{info.cls.__name__} (``{info.name}``)", "=")
    lines += [_escape(info.summary[:1].upper() + info.summary[1:]) + ".", ""]

    fields = [
        (":Registry name:", f"``{info.name}``"),
        (":Kind:", info.kind),
        (":Class:", f":class:`{cls_path}`"),
        (":Paper:", f"{_link(info.paper, info.arxiv_url)} (arXiv:{info.arxiv})"),
        (":Official code:", _link(_strip_scheme(info.code_url), info.code_url) if info.code_url else "none published"),
    ]
    if info.lr_range is not None:
        low, high = info.lr_range
        fields.append(
            (
                ":Tuning range for lr:",
                f"``{_number(low)}`` to ``{_number(high)}``, log-uniform (what the benchmark's tuner searches)",
            )
        )
    elif info.kind == "wrapper":
        fields.append((":Tuning range for lr:", "the inner optimizer's"))
    lines += [f"{k} {v}" for k, v in fields] + [""]

    lines += _title("Usage", "-")
    lines += [".. code-block:: python", ""]
    if info.usage:
        lines += ["    " + line if line else "" for line in info.usage.strip("\n").splitlines()] + [""]
    elif info.kind == "wrapper":
        lines += [
            "    import torch",
            "    import optimlab",
            "",
            f"    # by name: the wrapper's own arguments go to {info.cls.__name__}, the rest to the inner optimizer",
            f'    opt = optimlab.create("{info.name}", model, inner="adamw", lr=1e-3)',
            "    # or around any torch.optim.Optimizer",
            f"    opt = {cls_path}(torch.optim.AdamW(model.parameters(), lr=1e-3))",
            "",
        ]
    elif info.kind == "solver":
        lines += [
            "    import torch",
            "",
            f"    solver = {cls_path}(features, labels)",
            "    x, state = solver.run(torch.zeros(features.shape[1], dtype=features.dtype))",
            "",
        ]
    elif info.kind in ("loss", "layer"):
        lines += [
            f"    criterion = {cls_path}()",
            "    loss = criterion(model(x), y)",
            "",
        ]
    elif info.capabilities.needs_closure:
        lr = _number(info.defaults.get("lr", 1e-3))
        lines += [
            f"    opt = {cls_path}(model.parameters(), lr={lr})",
            "    # the closure returns the model's outputs on the batch and the loss as a function of them",
            "    opt.step(lambda: (model(x), lambda out: torch.nn.functional.mse_loss(out, y, reduction='sum')))",
            "",
        ]
    else:
        lr = _number(info.defaults.get("lr", 1e-3))
        lines += [
            "    import optimlab",
            "",
            f'    opt = optimlab.create("{info.name}", model, lr={lr})',
            "    # or, equivalently",
            f"    opt = {cls_path}(model.parameters(), lr={lr})",
            "",
        ]

    lines += _title("The method", "-")
    lines += [f".. automodule:: {info.cls.__module__}"]
    if not index_module:
        lines += ["   :no-index:"]
    lines += [""]

    if info.advice:
        lines += _title("Coming from AdamW", "-")
        lines += [_escape(info.advice), ""]

    lines += _title("Hyperparameters", "-")
    rules = info.hyperparameters
    rows = []
    for arg, default in info.defaults.items():
        rule = rules.get(arg)
        rows.append([f"``{arg}``", _literal(default), _escape(rule.describe(arg)) if rule else ""])
    checked = (
        "when the wrapper is built; the learning rate, weight decay and the other step settings are the inner "
        "optimizer's"
        if info.kind == "wrapper"
        else "when it is built"
        if info.kind in ("communication", "aggregator", "layer", "loss", "function", "solver")
        else "for every param group, including groups added later"
    )
    lines += [
        (
            "Defaults are read from the class signature. The allowed values are the registry's rules, checked "
            f"{checked}; a violation raises ``ValueError`` naming the argument and the allowed range."
        ),
        "",
    ]
    if rows:
        lines += _list_table(["Argument", "Default", "Allowed values"], rows, widths="20 20 60")
    else:
        lines += ["It takes no arguments.", ""]

    lines += _title("Capabilities", "-")
    caps = dataclasses.asdict(info.capabilities)
    lines += _list_table(
        ["Flag", "Value", "Meaning"],
        [[f"``{k}``", "yes" if v else "no", CAPABILITY_TEXT.get(k, "")] for k, v in caps.items()],
        widths="25 10 65",
    )
    if info.exemptions:
        lines += _title("Conformance exemptions", "-")
        lines += ["The conformance battery does not hold the method to these checks, for the reasons given:", ""]
        lines += [f"- ``{check}``: {_escape(reason)}" for check, reason in info.exemptions.items()]
        lines += [""]

    lines += _title("API", "-")
    if info.kind == "function":
        lines += [f".. autofunction:: {cls_path}", ""]
    else:
        lines += [f".. autoclass:: {cls_path}", f"   :members: {', '.join(_class_members(info))}"]
        lines += ["   :show-inheritance:", ""]
    cores = _functional_cores(info)
    if cores:
        lines += _title("Functional core", "~")
        for func in cores:
            lines += [f".. autofunction:: {func}"]
            if not index_module:
                lines += ["   :no-index:"]
            lines += [""]
    return "\n".join(lines)


def index_page(infos: list[Any]) -> str:
    lines = [".. _methods:", ""]
    lines += _title("Methods", "=")
    lines += [
        (
            "Every method below is an entry of the registry (:mod:`optimlab.registry`); this page and the pages "
            "it links to are generated from those entries when the documentation is built, so they always match "
            "the installed code. Build any of them by name with ``optimlab.create(name, model, ...)``."
        ),
        "",
    ]
    rows = []
    for info in infos:
        rows.append(
            [
                f":doc:`{info.name} <{info.name}>`",
                info.kind,
                f":class:`~{_public_class_path(info.cls)}`",
                _escape(info.summary),
                _link(f"arXiv:{info.arxiv}", info.arxiv_url),
            ]
        )
    lines += _list_table(["Name", "Kind", "Class", "Summary", "Paper"], rows, widths="12 10 12 48 18")
    lines += [".. toctree::", "   :hidden:", ""] + [f"   {info.name}" for info in infos] + [""]
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def generate(app: Sphinx) -> None:
    import optimlab

    out = Path(app.srcdir) / OUTPUT_DIR
    out.mkdir(exist_ok=True)
    infos = [optimlab.get(name) for name in optimlab.available()]
    seen_modules: set[str] = set()
    wanted = {"index.rst"}
    for info in infos:
        module = info.cls.__module__
        _write(out / f"{info.name}.rst", method_page(info, index_module=module not in seen_modules))
        seen_modules.add(module)
        wanted.add(f"{info.name}.rst")
    _write(out / "index.rst", index_page(infos))
    for stale in out.glob("*.rst"):
        if stale.name not in wanted:
            stale.unlink()
    logger.info("optimlab_methods: wrote pages for %d methods", len(infos))


def skip_repeated_module_docstring(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    if what != "class" or not isinstance(obj, type):
        return
    module = sys.modules.get(obj.__module__)
    if module is not None and obj.__doc__ and obj.__doc__ is module.__doc__:
        lines[:] = [
            (
                "The update rule and the references are under *The method* above; the constructor's arguments "
                "under *Hyperparameters*."
            ),
            "",
        ]


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("builder-inited", generate)
    app.connect("autodoc-process-docstring", skip_repeated_module_docstring)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
