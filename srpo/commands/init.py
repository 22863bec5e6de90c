"""srpo init FAMILY --reward NAME --output FILE.yaml [--lora | --full] [--force]: a commented
starter config.

FAMILY is a registered family or a dotted path to a :class:`~srpo.models.base.FlowModel`
subclass. Everything srpo init knows of a family is the family's own: its class attributes
(``title``, ``components``, ``pipeline_class``, ``guidance_mode``, ``default_guidance``, the
defaults of its load options) and its starting recipe: the file the class's ``recipe`` attribute
names (a name in ``srpo/configs/recipes/``, or a path ending in ``.yaml``, relative to the folder
of the family's module), else ``recipes/<family>.yaml`` of the nearest class in its lineage that
has one, else the generic ``default.yaml``. The recipe also names the flagship's folder and where
users get it (``flagship:``). This module only interprets the recipe and writes the text, one template per
section so every line carries its comment. Before anything is written the text is parsed back
and validated with :func:`srpo.config.load_config`.

The recipe format
-----------------

A recipe file is YAML with up to four keys::

    extends: default          # optional: a recipe merged under this one (a name, or a .yaml path)
    flagship: {folder: NAME, source: TEXT}   # optional: the placeholder path's folder, where to get it
    legend: [line, ...]       # optional: the header lines that explain the provenance words
    sections:                 # in the order the file writes them
      <section>:              # a config section, or top-level for the keys outside any section
        about: text           # the "# <section>: text" line
        after: <section>      # or before: where a section the extended recipe lacks goes
        from: reward          # built from the reward's table below instead of from lines
        lines:
          <key>: <entry>      # in the order written; <key>: null drops the extended recipe's

An entry is one *case* or ``cases: [case, ...]`` (tried in order; the first whose ``when`` holds
gives the line, none gives no line), with optional ``when`` (ANDed into every case) and
``after`` / ``before`` (where a key the extended recipe lacks goes; default: the section's end).
A case has an optional ``when: {reward: NAME | [NAMES], lora: BOOL, guidance: embedded | cfg |
none (the class's guidance_mode), text_conditioned: BOOL (the reward's)}`` and exactly one of

- ``value: V`` -- the value as written (a string may use ``${field}``, ``$$`` for a dollar);
- ``from: config`` (srpo.config's default of this key), ``from: default_guidance`` (the family
  class's, as a float), ``from: option`` (for ``options.<name>``: the default of the family's
  load option; none: no line) or ``from: <section>.<key>`` (a value written above);
- ``note: text`` -- a comment line of its own (the key is then only a label);
- ``omit: true`` -- no line;

and the comment: ``why`` (what the value is), then its provenance, ``ref: text`` (written
``reference (text)``: the SRPO authors' trainers) or ``ours: text`` (``srpo's starting value
(text)``: srpo's documented start); ``ref: true`` / ``ours: true`` write the bare words. ``above``
adds a comment line above the key. ``options.<name>`` keys together write the ``options``
mapping, at the first one's place. A recipe that extends another tries its own cases of a key
before the extended recipe's, so it overrides a value under the conditions it names and keeps
the rest. Every key that takes a value must be a field of srpo.config (checked on reading).

The ``${field}`` names: family, title, cls, families, flagship, source, layout, reward,
reward_title, rewards, ``config.<section>.<key>`` (srpo.config's default) and
``reward_path.<reward>`` (the reward's placeholder path).

A family recipe, e.g. for a model whose reference trainer used 30 rollout steps::

    extends: default
    sections:
      rollout:
        lines:
          steps: {value: 30, ref: "the trainer's --sampling_steps 30"}
      train:
        lines:
          lr:
            cases:
              - {when: {lora: false, reward: pickscore}, value: 2.0e-6, ref: "PickScore run"}
"""

from __future__ import annotations

import inspect
import string
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError

REF = "reference"
OURS = "srpo's starting value"
PLACEHOLDER = "/path/to/"  # every path the user must edit starts with this
COLUMN = 43  # comments start here, as in the example configs
RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes"  # one recipe file per family
DEFAULT_RECIPE = "default"
TOP = "top-level"  # the recipe's section of the keys outside any config section


# ------------------------------------------------------------------ what the code cannot say

@dataclass(frozen=True)
class RewardInfo:
    title: str
    path: str | None  # placeholder (None: the reward takes no path)
    needs: str  # what the path must hold, and where users get it (docs/rewards.md)
    options: dict = field(default_factory=dict)
    options_note: str = ""
    text_conditioned: bool = True  # False: image-only, SRP does not apply


REWARDS_INFO = {
    "hps": RewardInfo("HPSv2.1", PLACEHOLDER + "HPS_v2.1_compressed.pt",
                      "the HPSv2.1 checkpoint file (a dict with a state_dict) over open_clip ViT-H-14: "
                      "HPS_v2.1_compressed.pt of the hub repo xswu/HPSv2"),
    "pickscore": RewardInfo("PickScore", PLACEHOLDER + "PickScore_v1",
                            "the PickScore_v1 model folder (transformers CLIPModel: config.json + weights): "
                            "yuvalkirstain/PickScore_v1",
                            {"processor_path": PLACEHOLDER + "CLIP-ViT-H-14-laion2B-s32B-b79K"},
                            "processor_path: the CLIP-H processor folder, laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "clip": RewardInfo("CLIP score", PLACEHOLDER + "clip-vit-large-patch14",
                       "a transformers CLIPModel folder (e.g. openai/clip-vit-large-patch14), or an open_clip "
                       "checkpoint file (then also set options.arch, e.g. ViT-L-14)"),
    "aesthetic": RewardInfo("LAION aesthetic predictor", PLACEHOLDER + "sac+logos+ava1-l14-linearMSE.pth",
                            "the improved-aesthetic-predictor head sac+logos+ava1-l14-linearMSE.pth "
                            "(christophschuhmann's repository)",
                            {"clip_path": PLACEHOLDER + "clip-vit-large-patch14"},
                            "clip_path: CLIP ViT-L/14, openai/clip-vit-large-patch14 (transformers folder) or an "
                            "open_clip file", text_conditioned=False),
    "tiny_clip": RewardInfo("tiny random CLIP", None,
                            "random weights built in code for smoke tests: no files", {"seed": 0},
                            "seed of the weights"),
}


def reward_info(name: str) -> RewardInfo:
    from ..rewards import REWARDS

    if name in REWARDS_INFO:
        return REWARDS_INFO[name]
    own = getattr(REWARDS.get(name), "starter", None) if name in REWARDS.names() else None
    if own is not None:  # declared beside the reward (srpo.rewards.base.starter)
        return RewardInfo(own["title"], None if own["file"] is None else PLACEHOLDER + own["file"], own["needs"],
                          {k: PLACEHOLDER + v for k, v in own["options"].items()}, own["options_note"])
    return RewardInfo(name, PLACEHOLDER + f"{name}-checkpoint",
                                                "the reward's checkpoint file or folder (docs/rewards.md)")


# ------------------------------------------------------------------ values from code

def _default(section, key: str) -> Any:
    """The default of ``section.key`` in srpo.config (lists for tuples, as YAML writes them)."""
    f = section.model_fields[key]
    value = f.default_factory() if f.default_factory else f.default
    return list(value) if isinstance(value, tuple) else value


def _option_default(cls, name: str) -> Any:
    """The default of a load option, from the family's load() or __init__ signature."""
    for fn in (cls.load, cls.__init__):
        p = inspect.signature(fn).parameters.get(name)
        if p is not None and p.default is not inspect.Parameter.empty:
            return p.default
    return None


def _is_twin(name: str, cls) -> bool:
    """A tiny random-weight twin (built in code for tests), not a family of real folders."""
    return name.startswith("tiny") or bool(getattr(cls, "is_twin", lambda: False)())


def families() -> list[str]:
    from ..models import MODELS

    return [n for n in MODELS.names() if not _is_twin(n, MODELS.get(n))]


def rewards() -> list[str]:
    from ..rewards import REWARDS

    return list(REWARDS.names())


def family_class(name: str):
    """The FlowModel class of a registered family or of a dotted path; one-line errors otherwise."""
    from ..models import family
    from ..models.base import FlowModel

    valid = families()
    if name not in valid and "." not in name:
        raise UserError(f"unknown model family '{name}': use one of {', '.join(valid)} "
                        f"or a dotted path to a FlowModel subclass (my_pkg.module.MyFamily)")
    try:
        cls = family(name)
    except UserError as e:
        raise UserError(f"model family '{name}' is not one of {', '.join(valid)} and not an importable "
                        f"FlowModel subclass: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, FlowModel)) or _is_twin(name, cls):
        raise UserError(f"model family '{name}' is not a FlowModel family of real folders: use one of "
                        f"{', '.join(valid)} or a dotted path to a subclass of srpo.models.base.FlowModel")
    return cls


@dataclass(frozen=True)
class FamilyFacts:
    """What the starter config says of a family: its class attributes and its recipe's ``flagship``."""

    name: str
    cls: type
    book: "Recipe"

    @property
    def title(self) -> str:
        return self.cls.title or self.name

    @property
    def flagship(self) -> str:
        return self.book.flagship.get("folder") or f"{self.cls.pipeline_class or self.name}-folder"

    @property
    def source(self) -> str:
        return self.book.flagship.get("source") or "docs/models.md"

    @property
    def layout(self) -> str:
        parts = tuple(self.cls.components)
        return f"the {self.cls.pipeline_class} layout" + (f" (model_index.json, {'/, '.join(parts)}/)"
                                                          if parts else "")


# ------------------------------------------------------------------ the recipe file

CONDITIONS = ("reward", "lora", "guidance", "text_conditioned")
KINDS = ("value", "from", "note", "omit")  # what a case writes: exactly one
CASE_FIELDS = ("when", *KINDS, "why", "ref", "ours", "above")
ENTRY_FIELDS = (*CASE_FIELDS, "cases", "after", "before")
SECTION_FIELDS = ("about", "after", "before", "from", "lines")
FROM = ("config", "default_guidance", "option")  # or <section>.<key>


@dataclass
class RecipeSection:
    name: str
    about: str = ""
    source: str | None = None  # "reward": built from REWARDS_INFO
    lines: list = field(default_factory=list)  # [key, [case, ...]], each case with its "_file"


@dataclass
class Recipe:
    files: list = field(default_factory=list)  # the files read, the family's first
    flagship: dict = field(default_factory=dict)  # folder (srpo init's placeholder path), source (where to get it)
    legend: list = field(default_factory=list)
    sections: list = field(default_factory=list)  # RecipeSection

    def section(self, name: str) -> RecipeSection | None:
        return next((s for s in self.sections if s.name == name), None)


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_path(ref: str, where: Path | None = None) -> Path:
    """The file of a recipe name (srpo/configs/recipes/<name>.yaml) or path (relative to ``where``)."""
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        path = Path(ref).expanduser()
        path = path if path.is_absolute() else (where or Path.cwd()) / path
    else:
        path = RECIPES / f"{ref}.yaml"
    if not path.is_file():
        raise UserError(f"srpo init recipe '{ref}' not found: {path} is not a file; the built-in recipes: "
                        f"{', '.join(recipe_names())} (or a path ending in .yaml)")
    return path


def family_recipe_path(cls) -> Path:
    """The recipe file a family class names (its ``recipe`` attribute), else ``recipes/<family>.yaml``
    of the nearest class in its lineage that has one (a tiny twin or a user's subclass starts from its
    family's), else the generic one."""
    ref = getattr(cls, "recipe", "")
    if not ref:
        own = (vars(k).get("family") for k in getattr(cls, "__mro__", (cls,)))
        ref = next((f for f in own if f and (RECIPES / f"{f}.yaml").is_file()), DEFAULT_RECIPE)
    try:
        where = Path(inspect.getfile(cls)).parent
    except (TypeError, OSError):
        where = None
    return recipe_path(ref, where)


def load_recipe(path: Path, _seen: tuple = ()) -> Recipe:
    """A recipe file merged over the ones it extends; a malformed file is a one-line error."""
    path = Path(path).resolve()
    if path in _seen:
        raise UserError(f"recipe {path}: extends itself (through {', '.join(p.name for p in _seen)})")
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read recipe {path}: {' '.join(str(e).split())}") from None
    spec = {} if spec is None else spec
    where = path.name if path.parent == RECIPES else str(path)  # a built-in one, or the user's file
    _fields(spec, ("extends", "flagship", "legend", "sections"), where)
    base = Recipe()
    if spec.get("extends"):
        try:
            parent = recipe_path(str(spec["extends"]), path.parent)
        except UserError as e:
            raise UserError(f"recipe {where}: extends: {e}") from None
        base = load_recipe(parent, _seen + (path,))
    base.files.insert(0, path)
    flagship = spec.get("flagship") or {}
    _fields(flagship, ("folder", "source"), f"{where}: flagship")
    base.flagship.update({k: str(v) for k, v in flagship.items()})
    legend = spec.get("legend")
    if legend is not None:
        if not isinstance(legend, list) or not all(isinstance(x, str) for x in legend):
            raise UserError(f"recipe {where}: legend must be a list of lines")
        base.legend = list(legend)
    sections = spec.get("sections") or {}
    if not isinstance(sections, dict):
        raise UserError(f"recipe {where}: sections must be a mapping of section name -> section")
    for name, sec in sections.items():
        _merge_section(base, str(name), sec, where)
    return base


def _fields(spec, allowed, where: str) -> None:
    if not isinstance(spec, dict):
        raise UserError(f"recipe {where}: expected a mapping with {', '.join(allowed)}, got {spec!r}")
    bad = [k for k in spec if k not in allowed]
    if bad:
        raise UserError(f"recipe {where}: unknown field '{bad[0]}': use {', '.join(allowed)}")


def _config_section(name: str):
    """The srpo.config model of a section name (TOP: Config itself); None: not a section."""
    from pydantic import BaseModel

    from .. import config as C

    if name == TOP:
        return C.Config
    f = C.Config.model_fields.get(name)
    if f is None:
        return None
    for t in (f.annotation, *typing.get_args(f.annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _insert(items: list, item, spec: dict, names: list, where: str) -> None:
    """Insert ``item`` after / before the named neighbour (default: at the end)."""
    for side in ("after", "before"):
        if side in spec:
            other = str(spec[side])
            if other not in names:
                raise UserError(f"recipe {where}: {side}: {other} names nothing written before it "
                                f"(there: {', '.join(names) or 'nothing'})")
            i = names.index(other)
            items.insert(i + 1 if side == "after" else i, item)
            return
    items.append(item)


def _merge_section(recipe: Recipe, name: str, spec, where: str) -> None:
    model = _config_section(name)
    if model is None:
        raise UserError(f"recipe {where}: '{name}' is not a config section (docs/config.md), nor {TOP}")
    sec = recipe.section(name)
    if spec is None:
        if sec is not None:
            recipe.sections.remove(sec)
        return
    _fields(spec, SECTION_FIELDS, f"{where}: {name}")
    if sec is None:
        sec = RecipeSection(name)
        _insert(recipe.sections, sec, spec, [s.name for s in recipe.sections], f"{where}: {name}")
    if "about" in spec:
        sec.about = str(spec["about"])
    if "from" in spec:
        if spec["from"] != "reward":
            raise UserError(f"recipe {where}: {name}.from: '{spec['from']}' is not a section source: use reward")
        sec.source = "reward"
    lines = spec.get("lines") or {}
    if not isinstance(lines, dict):
        raise UserError(f"recipe {where}: {name}.lines must be a mapping of key -> entry")
    for key, entry in lines.items():
        _merge_line(sec, model, str(key), entry, f"{where}: {name}.{key}")


def _merge_line(sec: RecipeSection, model, key: str, entry, where: str) -> None:
    keys = [k for k, _ in sec.lines]
    if entry is None:
        if key not in keys:
            raise UserError(f"recipe {where}: null drops a key, but the recipe it extends writes no {key}")
        del sec.lines[keys.index(key)]
        return
    _fields(entry, ENTRY_FIELDS, where)
    if "cases" in entry:
        stray = [k for k in entry if k in CASE_FIELDS and k != "when"]
        if stray:
            raise UserError(f"recipe {where}: an entry with cases takes no {stray[0]} of its own "
                            f"(only when, after, before): move it into the cases")
        if not isinstance(entry["cases"], list) or not entry["cases"]:
            raise UserError(f"recipe {where}: cases must be a list of cases (each with when, value, why, ...)")
        cases = entry["cases"]
    else:
        cases = [{k: v for k, v in entry.items() if k in CASE_FIELDS}]
    shared = entry.get("when") if "cases" in entry else None
    checked = [_check_case(model, key, case, shared, where) for case in cases]
    if key in keys:
        sec.lines[keys.index(key)][1][:0] = checked  # ours first, then the extended recipe's
    else:
        _insert(sec.lines, [key, checked], entry, keys, where)


def _check_case(model, key: str, case, shared, where: str) -> dict:
    from ..models.base import GUIDANCE_MODES

    _fields(case, CASE_FIELDS, where)
    kinds = [k for k in KINDS if k in case]
    if len(kinds) != 1:
        raise UserError(f"recipe {where}: a case needs exactly one of {', '.join(KINDS)} (got "
                        f"{', '.join(kinds) or 'none'})")
    if "omit" in case and case["omit"] is not True:
        raise UserError(f"recipe {where}: omit: true is the only omit (leave it out to write the line)")
    if "ref" in case and "ours" in case:
        raise UserError(f"recipe {where}: ref and ours are two provenances: keep one")
    when = {}
    for part in (shared, case.get("when")):
        if part is None:
            continue
        if not isinstance(part, dict):
            raise UserError(f"recipe {where}: when must be a mapping such as {{reward: pickscore, lora: true}}")
        for cond, want in part.items():
            if cond not in CONDITIONS:
                raise UserError(f"recipe {where}: unknown condition '{cond}': use {', '.join(CONDITIONS)}")
            wants = want if isinstance(want, list) else [want]
            if cond in ("lora", "text_conditioned") and not all(isinstance(w, bool) for w in wants):
                raise UserError(f"recipe {where}: when.{cond} is true or false, not {want!r}")
            if cond == "guidance" and not set(wants) <= set(GUIDANCE_MODES):
                raise UserError(f"recipe {where}: when.guidance is one of {', '.join(GUIDANCE_MODES)}, not {want!r}")
            if cond in when and when[cond] != want:
                raise UserError(f"recipe {where}: when.{cond} is set twice")
            when[cond] = want
    kind = kinds[0]
    if kind in ("value", "from"):  # a config key, not a label
        head, _, sub = key.partition(".")
        top_section = model is _config_section(TOP) and _config_section(head) is not None
        if head not in model.model_fields or top_section:  # (a section is no top-level key)
            raise UserError(f"recipe {where}: '{key}' is not a config key of this section (docs/config.md)")
        if sub and not isinstance(_default(model, head), dict):
            raise UserError(f"recipe {where}: '{head}' is not a mapping, so '{key}' is not a key")
    if kind == "from":
        src = case["from"]
        ok = (src in ("config", "default_guidance") and "." not in key
              or src == "option" and key.startswith("options.")
              or isinstance(src, str) and src not in FROM and src.count(".") == 1)
        if not ok:
            raise UserError(f"recipe {where}: from: {src!r} does not apply here: use config or default_guidance "
                            f"(a plain key), option (an options.<name> key) or <section>.<key> written above")
    return {**case, "when": when, "_file": where}


# ------------------------------------------------------------------ interpreting it

@dataclass
class Section:
    """One section's lines: (key, value, comment); key None: a comment line of its own."""

    name: str
    comment: str
    lines: list = field(default_factory=list)

    def add(self, key: str, value: Any, comment: str = "", above: str = "") -> None:
        if above:
            self.note(above)
        self.lines.append((key, value, comment))

    def note(self, text: str) -> None:
        self.lines.append((None, None, text))


class _Fields:
    """The ``${field}`` names of recipe strings."""

    def __init__(self, values: dict, where: str):
        self.values = values
        self.where = where

    def __getitem__(self, name: str) -> str:
        from .. import config as C

        head, _, rest = name.partition(".")
        if head == "config" and rest.count(".") == 1:
            section, key = rest.split(".")
            model = C.Config if section == TOP else _config_section(section)
            if model is not None and key in model.model_fields:
                return str(_default(model, key))
        elif head == "reward_path" and rest:
            return str(reward_info(rest).path)
        elif name in self.values:
            return str(self.values[name])
        raise UserError(f"recipe {self.where}: unknown field ${{{name}}}: use {', '.join(self.values)}, "
                        f"config.<section>.<key> or reward_path.<reward>")


class _Template(string.Template):
    braceidpattern = r"[a-z_][a-z0-9_.]*"


def _sub(text, fields: _Fields, where: str) -> str:
    fields.where = where
    try:
        return _Template(str(text)).substitute(fields)
    except ValueError as e:
        raise UserError(f"recipe {where}: {e} in '{text}' (write $$ for a dollar)") from None


def _holds(when: dict, facts: dict) -> bool:
    return all(facts[k] in want if isinstance(want, list) else facts[k] == want for k, want in when.items())


def _comment(case: dict, fields: _Fields, where: str) -> str:
    parts = [_sub(case["why"], fields, where)] if case.get("why") else []
    for word, key in ((REF, "ref"), (OURS, "ours")):
        if key in case:
            what = case[key]
            parts.append(word if what is True or what in ("", None) else f"{word} ({_sub(what, fields, where)})")
    return "; ".join(parts)


def recipe(family: str, reward: str, lora: bool, cls=None, book: Recipe | None = None) -> list[Section]:
    """The sections of the starter config: the family's recipe file (``book``), interpreted."""
    from .. import config as C

    cls = cls or family_class(family)
    book = book or load_recipe(family_recipe_path(cls))
    fam = FamilyFacts(family, cls, book)
    rew = reward_info(reward)
    facts = {"reward": reward, "lora": bool(lora), "guidance": cls.guidance_mode,
             "text_conditioned": rew.text_conditioned}
    fields = _Fields({"family": family, "title": fam.title, "cls": cls.__name__, "families": ", ".join(families()),
                      "flagship": fam.flagship, "source": fam.source, "layout": fam.layout, "reward": reward,
                      "reward_title": rew.title, "rewards": ", ".join(rewards())}, str(book.files[0]))
    written: dict = {}
    out = []
    for rs in book.sections:
        if rs.source == "reward":
            out.append(reward_section(reward, rs.about))
            continue
        model = C.Config if rs.name == TOP else _config_section(rs.name)
        s = Section("" if rs.name == TOP else rs.name, rs.about)
        groups: dict = {}  # options.<name> keys: the mapping's line index
        for key, cases in rs.lines:
            case = next((c for c in cases if _holds(c["when"], facts)), None)
            if case is None or case.get("omit"):
                continue
            where = case["_file"]
            if "note" in case:
                s.note(_sub(case["note"], fields, where))
                continue
            if "value" in case:
                value = case["value"]
                value = _sub(value, fields, where) if isinstance(value, str) else value
            elif case["from"] == "config":
                value = _default(model, key)
            elif case["from"] == "default_guidance":
                value = float(cls.default_guidance)
            elif case["from"] == "option":
                value = _option_default(cls, key.partition(".")[2])
                if value is None:
                    continue
            else:
                if tuple(case["from"].split(".")) not in written:
                    raise UserError(f"recipe {where}: from: {case['from']} is not written above this key")
                value = written[tuple(case["from"].split("."))]
            comment = _comment(case, fields, where)
            above = _sub(case["above"], fields, where) if case.get("above") else ""
            written[(rs.name, key)] = value
            head, _, sub = key.partition(".")
            if sub and head in groups:  # one more key of a mapping already written
                i = groups[head]
                k, mapping, note = s.lines[i]
                s.lines[i] = (k, {**mapping, sub: value}, "; ".join(x for x in (note, comment) if x))
            else:
                if sub:
                    groups[head] = len(s.lines) + bool(above)
                    value = {sub: value}
                s.add(head, value, comment, above=above)
        if any(k is not None for k, _, _ in s.lines):
            out.append(s)
    return out


def reward_section(reward: str, about: str) -> Section:
    """The reward section, from the reward's table (placeholders, what the files are)."""
    rew = reward_info(reward)
    r = Section("reward", about)
    r.add("name", reward, f"{rew.title}; the rewards: {', '.join(rewards())}")
    if rew.path is not None:
        r.add("path", rew.path, "EDIT", above=rew.needs)
    else:
        r.note(f"no path: {rew.needs}")
    if rew.options:
        edit = any(str(v).startswith(PLACEHOLDER) for v in rew.options.values())
        r.add("options", dict(rew.options), "EDIT" if edit else rew.options_note,
              above=rew.options_note if edit else "")
    return r


# ------------------------------------------------------------------ text

def _y(value: Any) -> str:
    """One YAML value on one line (flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    if text.endswith("..."):
        text = text[:-3].strip()
    if "\n" in text or yaml.safe_load(text) != value:
        raise RuntimeError(f"srpo init cannot write {value!r} on one line")  # a bug, not user input
    return text


def _pad(text: str, comment: str) -> str:
    if not comment:
        return text
    return f"{text:<{COLUMN - 1}} # {comment}" if len(text) < COLUMN - 1 else f"{text}  # {comment}"


def render(sections: list[Section], header: list[str]) -> tuple[str, dict, list[str]]:
    """The file's text, the tree it must parse to and the dotted keys the user must edit."""
    lines = [f"# {h}" if h else "#" for h in header]
    tree: dict = {}
    edits: list[str] = []
    for s in sections:
        lines.append("")
        if not s.name:  # top-level keys, not a section
            for key, value, comment in s.lines:
                lines.append(_pad(f"{key}: {_y(value)}", comment))
                tree[key] = value
            continue
        lines.append(f"# {s.name}: {s.comment}")
        lines.append(f"{s.name}:")
        node = tree.setdefault(s.name, {})
        for key, value, comment in s.lines:
            if key is None:
                lines.append(f"  # {comment}")
                continue
            lines.append(_pad(f"  {key}: {_y(value)}", comment))
            node[key] = value
            if comment.startswith("EDIT"):
                edits.append(f"{s.name}.{key}")
    return "\n".join(lines) + "\n", tree, edits


def build(family: str, reward: str, lora: bool, output: str = "config.yaml") -> tuple[str, list[str]]:
    """The starter config's text (checked: it parses to the intended values and validates) and
    the dotted keys whose placeholders the user must edit."""
    from ..config import load_config

    cls = family_class(family)
    if reward not in rewards():
        raise UserError(f"unknown reward '{reward}': use one of {', '.join(rewards())}")
    book = load_recipe(family_recipe_path(cls))
    sections = recipe(family, reward, lora, cls, book)
    _, tree, _ = render(sections, [])
    rank = (tree.get("lora") or {}).get("rank")
    mode = (f"LoRA ({f'rank {rank}, ' if rank else ''}one GPU)" if lora
            else "full fine-tune (FSDP2, several GPUs)")
    launch = (f"srpo train {output} --output runs/{Path(output).stem}" if lora else
              f"torchrun --nproc_per_node N -m srpo train {output} --output runs/{Path(output).stem}")
    header = [
        f"srpo starter config: {FamilyFacts(family, cls, book).title} "
        f"({family}) + {reward_info(reward).title} ({reward}), {mode}.",
        f"Written by: srpo init {family} --reward {reward} {'--lora' if lora else '--full'} --output {output}",
        "",
        f"1. Replace every {PLACEHOLDER}... (the lines marked EDIT) with your local files.",
        f"2. srpo plan {output} --gpus N      per-GPU memory before launching",
        f"3. {launch}",
        "",
        *book.legend,
    ]
    text, tree, edits = render(sections, header)
    if yaml.safe_load(text) != tree:
        raise RuntimeError("srpo init wrote text that does not parse to its values")  # a bug
    load_config(tree)  # raises the same one-line error srpo train would
    return text, edits


# ------------------------------------------------------------------ command

def add_parser(sub) -> None:
    p = sub.add_parser("init", help="write a commented starter config for a model family and a reward")
    p.add_argument("family", help="model family: a registered family (an unknown name lists them) or a dotted path to a "
                   "FlowModel subclass (my_pkg.module.MyFamily)")
    p.add_argument("--reward", required=True, help="reward: hps, pickscore, clip, aesthetic, tiny_clip")
    p.add_argument("--output", "-o", required=True, help="the YAML file to write")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="lora", action="store_true", default=True,
                      help="LoRA fine-tune on one GPU (the default)")
    mode.add_argument("--full", dest="lora", action="store_false",
                      help="full fine-tune under FSDP2 on several GPUs")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")


def run(args) -> int:
    output = Path(args.output)
    text, edits = build(args.family, args.reward, args.lora, str(output))
    if output.is_dir():
        raise UserError(f"--output {output} is a folder: give a file name such as {output / 'config.yaml'}")
    if output.exists() and not args.force:
        raise UserError(f"{output} exists: pass --force to overwrite it or choose another --output")
    above = next((d for d in output.parents if d.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"cannot write {output}: {above} is a file, not a folder")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}") from None
    train = f"srpo train {output}" if args.lora else f"torchrun --nproc_per_node N -m srpo train {output}"
    print(f"wrote {output}: edit {', '.join(edits)} (every {PLACEHOLDER}...); srpo plan {output} --gpus N shows "
          f"the memory; once the paths exist: {train}")
    return 0
