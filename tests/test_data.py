"""load_prompts: every prompt-file form, read from real files made with the real libraries, and
every bad input as a one-line UserError that names the file and what to do."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from srpo.data import load_prompts
from srpo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red apple on a table", "a cat, sleeping", 'a "quoted" sign', "naïve café at night"]


def error(spec, what="prompts", column="prompt") -> str:
    with pytest.raises(UserError) as e:
        load_prompts(spec, what, column)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(what), msg
    return msg


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    import pandas as pd

    pd.DataFrame(columns).to_parquet(path)
    return path


def save_dataset(path: Path, columns: dict) -> Path:
    import datasets

    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return path


# --- the forms -----------------------------------------------------------------------------------

def test_none_and_inline_list():
    assert load_prompts(None) == []
    assert load_prompts([" a ", "", "b", "  "]) == ["a", "b"]
    assert "inline list is empty" in error(["", " "])


def test_text_file_unchanged(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\n  a red apple  \n\n   # indented comment\nb blue\n", encoding="utf-8")
    assert load_prompts(f) == ["a red apple", "b blue"]
    assert load_prompts(str(f), "eval prompts", column="ignored") == ["a red apple", "b blue"]
    other = tmp_path / "prompts.list"  # any suffix but .jsonl/.csv/.parquet is text
    other.write_text('{"prompt": "x"}\n', encoding="utf-8")
    assert load_prompts(other) == ['{"prompt": "x"}']


def test_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)])
    f.write_text(f.read_text(encoding="utf-8") + "\n  \n", encoding="utf-8")  # trailing blank lines
    assert load_prompts(f) == PROMPTS


def test_jsonl_other_column_and_upper_suffix(tmp_path):
    f = write_jsonl(tmp_path / "P.JSONL", [{"caption": f"  {p} ", "prompt": 1} for p in PROMPTS])
    assert load_prompts(f, "eval prompts", column="caption") == PROMPTS


def test_csv(tmp_path):
    import pandas as pd

    f = tmp_path / "p.csv"
    pd.DataFrame({"id": range(4), "prompt": PROMPTS, "caption": ["c0", "c1", "c2", "c3"]}).to_csv(f, index=False)
    assert load_prompts(f) == PROMPTS
    assert load_prompts(f, column="caption") == ["c0", "c1", "c2", "c3"]


def test_csv_by_hand_bom_and_blank_lines(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('\ufeffprompt,n\n"a, b",1\n\n"line one\nline two",2\n', encoding="utf-8")
    assert load_prompts(f) == ["a, b", "line one\nline two"]


def test_parquet(tmp_path):
    f = write_parquet(tmp_path / "p.parquet", {"prompt": PROMPTS, "text": list("wxyz")})
    assert load_prompts(f) == PROMPTS
    assert load_prompts(f, column="text") == list("wxyz")


def test_datasets_folder(tmp_path):
    d = save_dataset(tmp_path / "ds", {"prompt": PROMPTS, "caption": list("abcd")})
    assert load_prompts(d) == PROMPTS
    assert load_prompts(str(d), "eval prompts", "caption") == list("abcd")


def test_dataset_dict_folder_gives_train_and_a_split_folder_gives_that_split(tmp_path):
    import datasets

    d = tmp_path / "dd"
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"caption": PROMPTS}),
        validation=datasets.Dataset.from_dict({"caption": ["held out one", "held out two"]}),
    ).save_to_disk(str(d))
    assert load_prompts(d, column="caption") == PROMPTS
    assert load_prompts(d, "eval prompts", column="caption") == PROMPTS  # the same rule for every caller
    assert load_prompts(d / "validation", "eval prompts", column="caption") == ["held out one", "held out two"]


def test_dataset_dict_with_only_one_split(tmp_path):
    import datasets

    d = tmp_path / "dd"
    datasets.DatasetDict(test=datasets.Dataset.from_dict({"prompt": ["only"]})).save_to_disk(str(d))
    assert load_prompts(d) == ["only"]


# --- the errors ----------------------------------------------------------------------------------

def test_not_found(tmp_path):
    for name in ("nope.txt", "nope.jsonl", "nope.csv", "nope.parquet"):
        msg = error(str(tmp_path / name), "eval prompts")
        assert msg == f"eval prompts file not found: {tmp_path / name}"


def test_empty_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# only a comment\n\n")
    assert error(txt) == f"prompts file {txt} has no prompts: write one prompt per line"
    jl = tmp_path / "p.jsonl"
    jl.write_text("\n \n")
    assert f"prompts file {jl} has no prompts: write one JSON object per line" in error(jl)
    csv_empty = tmp_path / "e.csv"
    csv_empty.write_text("")
    assert f"prompts file {csv_empty} is empty: write a header row" in error(csv_empty)
    header_only = tmp_path / "h.csv"
    header_only.write_text("prompt,id\n")
    assert f"prompts file {header_only} has a header but no rows" in error(header_only)
    pq = write_parquet(tmp_path / "p.parquet", {"prompt": []})
    assert f"prompts file {pq} has no rows" in error(pq)
    ds = save_dataset(tmp_path / "ds", {"prompt": []})
    assert error(ds) == f"prompts datasets folder {ds} has no rows: give at least one prompt"
    import datasets

    dd = tmp_path / "dd"
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"prompt": []})).save_to_disk(str(dd))
    assert error(dd) == f"prompts datasets folder {dd} split 'train' has no rows: give at least one prompt"


def test_missing_column_names_the_columns_there(tmp_path):
    jl = write_jsonl(tmp_path / "p.jsonl", [{"caption": "a", "id": 1}])
    cs = tmp_path / "p.csv"
    cs.write_text("caption,id\na,1\n")
    pq = write_parquet(tmp_path / "p.parquet", {"caption": ["a"], "id": [1]})
    ds = save_dataset(tmp_path / "ds", {"caption": ["a"], "id": [1]})
    for spec, where in [(jl, f"file {jl} line 1"), (cs, f"file {cs}"), (pq, f"file {pq}"),
                        (ds, f"datasets folder {ds}")]:
        msg = error(spec, "eval prompts", "prompt")
        assert msg == (f"eval prompts {where} has no column 'prompt' (its columns: 'caption', 'id'): "
                       f"set data.prompt_column to the column holding the prompts"), msg


def test_missing_column_in_a_later_jsonl_line(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"text": "c"}])
    assert f"file {f} line 3 has no column 'prompt' (its columns: 'text')" in error(f)


def test_dataset_dict_missing_column_names_the_split(tmp_path):
    import datasets

    d = tmp_path / "dd"
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["a"]})).save_to_disk(str(d))
    assert f"datasets folder {d} split 'train' has no column 'prompt' (its columns: 'text')" in error(d)


def test_dataset_dict_without_train_and_several_splits(tmp_path):
    import datasets

    d = tmp_path / "dd"
    one = datasets.Dataset.from_dict({"prompt": ["a"]})
    datasets.DatasetDict(validation=one, test=one).save_to_disk(str(d))
    msg = error(d)
    assert "without a 'train' split (its splits: 'validation', 'test')" in msg
    assert f"point at one split's folder, e.g. {d / 'validation'}" in msg


def test_bad_json_names_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n')
    msg = error(f)
    assert msg.startswith(f"prompts file {f} line 3 is not valid JSON (") and "one JSON object per line" in msg
    g = tmp_path / "q.jsonl"
    g.write_text('{"prompt": "a"}\n["not", "an", "object"]\n')
    assert f"prompts file {g} line 2 is a JSON list, not an object" in error(g)


def test_not_utf8(tmp_path):
    for name in ("p.txt", "p.jsonl", "p.csv"):
        f = tmp_path / name
        f.write_bytes(b"prompt\n\xff\xfe\xfa bad bytes\n")
        assert error(f) == f"prompts file {f} is not readable UTF-8 text: UnicodeDecodeError"


def test_malformed_csv(tmp_path):
    ragged = tmp_path / "r.csv"
    ragged.write_text("prompt,id\na,1\nb,2,extra\n")
    assert (f"prompts file {ragged} line 3 has 3 fields but the header has 2: quote values that hold commas"
            == error(ragged))
    unclosed = tmp_path / "u.csv"
    unclosed.write_text('prompt,id\na,1\n"b,2\nc,3\n')  # an unclosed quote would swallow the rest
    assert error(unclosed) == (f"prompts file {unclosed} is not a readable CSV file "
                               f"(line 4: unexpected end of data): put values holding commas, quotes or line breaks "
                               f"in double quotes, inner quotes doubled")
    badquote = tmp_path / "q.csv"
    badquote.write_text('prompt\n"a"b\n')
    assert error(badquote).startswith(f"prompts file {badquote} is not a readable CSV file (line 2: ',' expected after '\"'): ")


def test_corrupt_parquet(tmp_path):
    f = tmp_path / "p.parquet"
    f.write_bytes(b"PAR1 this is not parquet at all")
    msg = error(f)
    assert msg.startswith(f"prompts file {f} is not a readable parquet file (ArrowInvalid: ") and "write it again" in msg


def test_folder_that_is_not_a_datasets_folder(tmp_path):
    (tmp_path / "some.txt").write_text("a\n")
    msg = error(tmp_path)
    assert msg.startswith(f"prompts: {tmp_path} is a folder but not a Hugging Face datasets folder")
    assert "Dataset.save_to_disk" in msg


def test_damaged_datasets_folder(tmp_path):
    d = save_dataset(tmp_path / "ds", {"prompt": PROMPTS})
    for arrow in d.glob("*.arrow"):
        arrow.write_bytes(b"xx")
    msg = error(d)
    assert msg.startswith(f"prompts: datasets folder {d} could not be read (") and "save_to_disk" in msg
    (d / "state.json").write_text("{")
    assert f"datasets folder {d} could not be read (JSONDecodeError" in error(d)


def test_non_string_and_empty_values_name_the_row(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a"}\n{"prompt": 7}\n')
    assert error(jl) == (f"prompts file {jl} line 2: the 'prompt' value is int, not text: "
                         f"give every row a non-empty string prompt")
    jl.write_text('{"prompt": "a"}\n{"prompt": null}\n')
    assert f"file {jl} line 2: the 'prompt' value is null, not text" in error(jl)
    jl.write_text('{"prompt": "a"}\n\n{"prompt": "   "}\n')
    assert error(jl) == (f"prompts file {jl} line 3: the 'prompt' value is empty: "
                         f"give every row a non-empty prompt (or drop the row)")
    cs = tmp_path / "p.csv"
    cs.write_text("id,prompt\n1,a\n2,\n")
    assert f"prompts file {cs} line 3: the 'prompt' value is empty" in error(cs)
    pq = write_parquet(tmp_path / "n.parquet", {"prompt": [1, 2, 3]})
    assert f"prompts file {pq} row 0 (0-based): the 'prompt' value is int, not text" in error(pq)
    pq = write_parquet(tmp_path / "e.parquet", {"prompt": ["a", "b", None]})
    assert f"prompts file {pq} row 2 (0-based): the 'prompt' value is null, not text" in error(pq)
    ds = save_dataset(tmp_path / "ds", {"caption": ["a", " "]})
    assert f"datasets folder {ds} row 1 (0-based): the 'caption' value is empty" in error(ds, column="caption")


def test_missing_optional_dependency_names_the_extra(tmp_path, monkeypatch):
    pq = write_parquet(tmp_path / "p.parquet", {"prompt": ["a"]})
    ds = save_dataset(tmp_path / "ds", {"prompt": ["a"]})
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow...` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert error(pq) == f"prompts file {pq} is a .parquet file, which needs pyarrow: pip install 'srpo[data]'"
    assert error(ds) == (f"prompts: {ds} is a Hugging Face datasets folder, which needs the datasets package: "
                         f"pip install 'srpo[data]'")


def test_text_and_jsonl_and_csv_need_no_optional_package(tmp_path):
    """Plain forms are read without importing pandas, pyarrow or datasets (a fresh interpreter)."""
    txt, jl, cs = tmp_path / "p.txt", tmp_path / "p.jsonl", tmp_path / "p.csv"
    txt.write_text("a\n")
    write_jsonl(jl, [{"prompt": "b"}])
    cs.write_text("prompt\nc\n")
    code = ("import sys; from srpo.data import load_prompts; "
            f"r = [load_prompts(p) for p in {[str(txt), str(jl), str(cs)]!r}]; "
            "assert r == [['a'], ['b'], ['c']], r; "
            "print(sorted(m for m in ('pandas', 'pyarrow', 'datasets') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


# --- end to end through the CLI ------------------------------------------------------------------

def srpo(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "srpo", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


TRAIN_SETS = ["--set", "train.max_steps=2", "--set", "log.progress=false", "--set", "guard.enabled=false",
              "--set", "data.eval_prompts=null"]


def test_cli_missing_column_is_one_line_exit_2(tmp_path):
    f = write_jsonl(tmp_path / "captions.jsonl", [{"caption": p} for p in PROMPTS])
    res = srpo("train", ROOT / "configs" / "tiny.yaml", "--output", tmp_path / "out",
               "--set", f"data.prompts={f}", *TRAIN_SETS)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr == (f"srpo: error: prompts file {f} line 1 has no column 'prompt' (its columns: 'caption'): "
                          f"set data.prompt_column to the column holding the prompts\n")


def test_cli_trains_on_jsonl_with_prompt_column(tmp_path):
    f = write_jsonl(tmp_path / "captions.jsonl", [{"caption": p, "id": i} for i, p in enumerate(PROMPTS)])
    out = tmp_path / "out"
    res = srpo("train", ROOT / "configs" / "tiny.yaml", "--output", out, "--set", f"data.prompts={f}",
               "--set", "data.prompt_column=caption", *TRAIN_SETS)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
