"""Tests for flows.cli: ``info`` / ``neuron`` output on a small atlas, and error exits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from flows.cli import SPARK, main, sparkline
from tests.storage.test_atlas import (
    INCOMPLETE,
    MASK,
    MODEL,
    SOURCE_NAMES,
    STATS,
    build_atlas,
)


@pytest.fixture(scope="module")
def atlas_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("cli") / "atlas.zarr"
    build_atlas(path)
    return str(path)


def tree_hash(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------- info


def test_info_json(atlas_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", atlas_path, "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    info = json.loads(out)
    assert info["path"] == atlas_path
    assert info["schema_version"] == 1
    assert info["tokenizer"] == "toy-tok"
    assert info["corpus"]["n_sequences"] == 6
    assert info["corpus"]["seq_len"] == 8
    assert info["corpus"]["n_tokens"] == int(MASK.sum())
    assert info["corpus"]["shards"] == 2
    assert info["corpus"]["sources"] == SOURCE_NAMES
    assert sorted(info["models"]) == [INCOMPLETE, MODEL]
    m = info["models"][MODEL]
    assert m["complete"] is True
    assert m["d_mlp"] == 3 and m["n_layers"] == 2
    assert sorted(m["layers"]) == ["0", "1"]  # JSON object keys
    for layer in (0, 1):
        s = m["layers"][str(layer)]
        assert s["dead_frac"] == pytest.approx(STATS[layer]["dead"].mean())
        assert s["massive"] == int(STATS[layer]["massive"].sum())
        assert s["mean_frac_active"] == pytest.approx(STATS[layer]["frac_active"].mean())
    assert info["models"][INCOMPLETE]["layers"] == {}


def test_info_text(atlas_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", atlas_path]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"atlas {atlas_path}  (schema 1, updated ")
    assert f"corpus: {int(MASK.sum())} tokens in 6 x 8 sequences, 2 shards, " in out
    assert "sources wiki_en, shakespeare" in out
    assert (
        f"model {MODEL}: GPT2LMHeadModel from toy-src, 2 layers x 3 neurons at mlp.c_proj, "
        "float32: complete"
    ) in lines
    assert any(ln.startswith(f"model {INCOMPLETE}:") and "INCOMPLETE" in ln for ln in lines)
    l0 = next(ln for ln in lines if ln.startswith("  L  0"))
    assert "dead  33.3%" in l0
    assert "█" * 13 + " " in l0  # 40 * 1/3 blocks
    assert "massive    1" in l0
    assert "mean freq>0 0.500" in l0
    l1 = next(ln for ln in lines if ln.startswith("  L  1"))
    assert "dead  66.7%" in l1 and "massive    0" in l1


def test_info_missing_atlas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nonexistent")
    assert main(["info", missing]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("neuronmap: error: ")
    assert missing in err
    assert err.count("\n") == 1  # one line


def test_info_nonexistent_root(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "/nonexistent", "--json"]) == 2
    err = capsys.readouterr().err
    assert "neuronmap: error:" in err and "/nonexistent" in err


# ---------------------------------------------------------------------------- neuron


def test_neuron_json(atlas_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["neuron", atlas_path, MODEL, "0", "1", "--k", "2", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert (rec["model"], rec["layer"], rec["index"]) == (MODEL, 0, 1)
    assert rec["stats"]["mean"] == -0.25
    assert rec["stats"]["count"] == 41
    assert rec["stats"]["massive"] is True
    assert rec["stats"]["hist"] == STATS[0]["hist"][1].tolist()
    ex = rec["examples"]
    assert len(ex) == 2
    assert [e["value"] for e in ex] == [5.0, 3.5]
    assert [e["position"] for e in ex] == [13, 2]
    assert [e["rank"] for e in ex] == [0, 1]
    assert ex[0]["text"] == " the café[[.]]"
    assert ex[1]["text"] == " the[[ cat]] sat on the cat"
    assert ex[0]["source"] == "shakespeare"


def test_neuron_json_all_examples(atlas_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["neuron", atlas_path, MODEL, "0", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["examples"]) == 3


def test_neuron_text(atlas_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["neuron", atlas_path, MODEL, "0", "1", "--k", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"{MODEL} L0 N1  [massive]"
    assert "mean -0.2500  std 2.0000" in lines[1]
    assert "min -2.000  max +5.000" in lines[1]
    assert "n 41" in lines[1]
    hist_line = next(ln for ln in lines if "histogram" in ln)
    spark = sparkline(STATS[0]["hist"][1].tolist())
    assert spark and hist_line.endswith(spark)
    assert "top examples:" in out
    ex_lines = [ln for ln in lines if "[[" in ln]
    assert len(ex_lines) == 2
    assert ex_lines[0].split()[:3] == ["1.", "+5.000", "[shakespeare]"]
    assert ex_lines[0].endswith(" the café[[.]]")
    assert ex_lines[1].endswith(" the[[ cat]] sat on the cat")


def test_neuron_text_dead_flag(atlas_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["neuron", atlas_path, MODEL, "0", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{MODEL} L0 N0  [dead]"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["gpt9", "0", "0"], ["'gpt9'", MODEL, INCOMPLETE]),
        ([MODEL, "5", "0"], ["layer 5", "recorded layers: [0, 1]"]),
        ([MODEL, "0", "3"], ["neuron index 3 out of range"]),
        ([INCOMPLETE, "0", "0"], [repr(INCOMPLETE), "not complete", "--resume"]),
    ],
)
def test_neuron_errors(
    atlas_path: str, capsys: pytest.CaptureFixture[str], args: list[str], words: list[str]
) -> None:
    assert main(["neuron", atlas_path, *args, "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("neuronmap: error: ")
    for w in words:
        assert w in err


def test_bad_arguments_exit_2(atlas_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["neuron", atlas_path, MODEL, "zero", "1"])
    assert ei.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


# ---------------------------------------------------------------------------- run


def test_run_bad_job_writes_nothing(
    atlas_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a private copy of a real atlas, passed via --atlas
    target = tmp_path / "existing.zarr"
    build_atlas(target)
    (target / "notes.txt").write_text("mine")
    before = tree_hash(target)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "atlas": str(tmp_path / "from_file.zarr"),
                "corpus": {"seq_len": 1},
                "models": [{"name": "m", "source": "smollm2"}],
            }
        )
    )
    assert main(["run", str(bad), "--atlas", str(target), "--overwrite"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("neuronmap: error: ")
    assert "field 'corpus.seq_len'" in err
    assert str(bad) in err
    assert "atlas:" not in out
    assert tree_hash(target) == before
    assert not (tmp_path / "from_file.zarr").exists()


def test_run_unknown_key_and_bad_model_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text(
        "atlas: " + str(tmp_path / "a.zarr") + "\n"
        "models: [{name: org/model, source: smollm2}]\n"
        "record: {top_k: 4}\n"
    )
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "field 'models.0.name'" in err
    assert "field 'record.top_k'" in err
    assert not (tmp_path / "a.zarr").exists()


def test_run_missing_job_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.yaml"
    assert main(["run", str(missing), "--atlas", str(tmp_path / "x.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neuronmap: error: job file not found")
    assert str(missing) in err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- sparkline


def test_sparkline() -> None:
    assert sparkline([0, 0, 0]) == ""
    assert sparkline([0, 5, 0]) == SPARK[-1]
    s = sparkline([0, 0, 1, 0, 100, 0])
    assert len(s) == 3  # leading/trailing empty bins are trimmed, inner ones kept
    assert s[0] != SPARK[0] and s[1] == SPARK[0] and s[2] == SPARK[-1]
    assert len(sparkline(list(range(1, 200)), width=16)) == 16


def test_run_refuses_resume_with_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:  # fmt: skip
    assert main(["run", "--atlas", str(tmp_path / "a.zarr"), "--resume", "--overwrite"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert not (tmp_path / "a.zarr").exists()


def test_corpus_text_cannot_drive_the_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """ESC sequences, BEL, NUL and bidi overrides in corpus text are printed escaped; --json
    keeps the text as it is."""
    import tests.storage.test_atlas as ta
    from flows.cli import shown

    assert shown("a\x1b[2Jb\x07\x00\u202ec\nd\u200dé") == "a\\x1b[2Jb\\x07\\x00\\u202ec⏎d\u200dé"
    hostile = [b" c\x1b[2J\x07at\xe2\x80\xae" if v == b" cat" else v for v in ta.VOCAB]
    monkeypatch.setattr(ta, "VOCAB", hostile)
    path = tmp_path / "hostile.zarr"
    build_atlas(path)
    found = False
    for layer, index in ((0, 0), (0, 1), (1, 0), (1, 1), (1, 2)):
        assert main(["neuron", str(path), MODEL, str(layer), str(index)]) == 0
        out = capsys.readouterr().out
        assert not {"\x1b", "\x07", "\u202e"} & set(out)
        found |= "\\x1b[2J\\x07at\\u202e" in out
        assert main(["neuron", str(path), MODEL, str(layer), str(index), "--json"]) == 0
        raw = json.loads(capsys.readouterr().out)
        found_raw = any("\x1b[2J" in e["text"] for e in raw["examples"])
        assert found_raw == ("\\x1b[2J" in out)
    assert found  # some top example shows the hostile token, escaped


def test_help_explains_every_argument_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    """Every positional and option of every command has a help line; no reST markup leaks
    into --help; --version prints the package version."""
    import argparse

    import flows
    from flows.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, cmd in sub.choices.items():
        for action in cmd._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"`neuronmap {name}`: {action.dest} has no help"
        text = cmd.format_help()
        assert "``" not in text and ":func:" not in text, name
    top = parser.format_help()
    assert "examples:" in top and "``" not in top
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"neuronmap {flows.__version__}"


def test_json_output_is_strict() -> None:
    """NaN and infinities (a dead neuron's correlation, an empty layer's mean) become null."""
    from flows.cli import dumps

    text = dumps({"r": float("nan"), "x": [1.0, float("inf")], "n": {"m": -float("inf")}})
    assert json.loads(text) == {"r": None, "x": [1.0, None], "n": {"m": None}}
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
