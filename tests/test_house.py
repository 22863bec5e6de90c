"""The house rules that keep a family one file: no module pair imports each other (deferred
imports included), no family is named in code outside srpo/models/ and srpo/lab/, and a
registry refuses a second registration of a name."""

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from srpo.errors import UserError
from srpo.registry import Registry

PACKAGE = Path(__file__).resolve().parents[1] / "srpo"


def _module_name(file: Path, root: Path) -> tuple[str, list[str]]:
    parts = list(file.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (top level or deferred)."""
    files = {(name := _module_name(f, root))[0]: (f, name[1]) for f in root.rglob("*.py")}
    graph = {}
    for name, (file, package) in files.items():
        targets = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                parent = package[: len(package) - node.level + 1] if node.level else []
                base = ".".join(parent + ([node.module] if node.module else []))
                targets |= {base} | {f"{base}.{a.name}" for a in node.names}
        resolved = set()
        for t in targets:
            while t and t not in files:
                t = t.rpartition(".")[0]
            if t and t != name:
                resolved.add(t)
        graph[name] = resolved
    return graph


def test_no_module_pair_imports_each_other():
    graph = import_graph()
    assert "srpo.plan" in graph["srpo.commands.plan"] and "srpo.parallel" in graph["srpo.plan"]  # deferred ones seen
    pairs = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph.get(b, ())})
    assert not pairs, pairs


def test_the_graph_sees_a_circle_when_there_is_one(tmp_path):
    pkg = tmp_path / "srpo"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import x\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from . import y\n")
    graph = import_graph(pkg)
    assert "srpo.sub" in graph["srpo.sub.a"] and "srpo.sub.a" in graph["srpo.sub"]


def _family_words() -> re.Pattern:
    from srpo.models import MODELS

    names = set(MODELS.names()) - {"tiny"}
    classes = {MODELS.get(n).__name__ for n in names} | {c for n in names for c in
                                                         (MODELS.get(n).pipeline_class, MODELS.get(n).transformer_class) if c}
    return re.compile(r"\b(" + "|".join(sorted(map(re.escape, names | classes), key=len, reverse=True)) + r")\b")


def family_mentions(root: Path = PACKAGE) -> list[tuple[str, int, str]]:
    """Family registry names, adapter classes and their diffusers classes in code (identifiers
    and string literals that are not docstrings) outside srpo/models/ and srpo/lab/."""
    pattern, hits = _family_words(), []
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root.parent).as_posix()
        if rel.startswith(("srpo/models/", "srpo/lab/")):
            continue
        previous = None
        for tok in tokenize.generate_tokens(io.StringIO(file.read_text()).readline):
            if tok.type == tokenize.NAME and pattern.fullmatch(tok.string):
                hits.append((rel, tok.start[0], tok.string))
            elif tok.type == tokenize.STRING and not (previous is None or previous.type in (
                    tokenize.INDENT, tokenize.DEDENT, tokenize.NEWLINE)):  # a docstring stands alone
                hits += [(rel, tok.start[0], m.group(0)) for m in pattern.finditer(tok.string)]
            if tok.type not in (tokenize.COMMENT, tokenize.NL):
                previous = tok
    return hits


def test_no_family_is_named_in_code_outside_models_and_lab():
    assert not family_mentions(), family_mentions()


def test_the_family_check_finds_a_named_family(tmp_path):
    (tmp_path / "srpo" / "bench").mkdir(parents=True)
    (tmp_path / "srpo" / "bench" / "x.py").write_text('"""sd3 in a docstring is prose."""\n'
                                                     'def f():\n    return load("tiny_sd3")\n')
    assert family_mentions(tmp_path / "srpo") == [("srpo/bench/x.py", 3, "tiny_sd3")]


def test_registry_refuses_a_second_registration_of_a_name():
    reg = Registry("thing")
    first = reg.register("a")(type("A", (), {}))
    assert reg.register("a")(first) is first  # the same object again (a module re-imported) is harmless
    with pytest.raises(UserError) as e:
        reg.register("a")(type("B", (), {}))
    assert "thing 'a' is registered already" in str(e.value) and "\n" not in str(e.value)
    assert reg.get("a") is first


def test_a_dotted_path_family_that_shadows_a_builtin_is_a_one_line_error(tmp_path, monkeypatch):
    from srpo.models import MODELS, family

    builtin = MODELS.names()[0]
    (tmp_path / "shadow_pkg.py").write_text(
        "from srpo.models import MODELS\nfrom srpo.models.base import FlowModel\n\n"
        f"@MODELS.register({builtin!r})\nclass Shadow(FlowModel):\n    @classmethod\n    def load(cls, **kw):\n"
        "        return cls()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as e:
        family("shadow_pkg.Shadow")
    assert f"model '{builtin}' is registered already" in str(e.value) and "\n" not in str(e.value)
    assert MODELS.get(builtin).__name__ != "Shadow"
