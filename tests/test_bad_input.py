"""Bad input through the real command: one short line on stderr, status 2, nothing written.

Each test runs ``mxfp8.cli.main.main`` in-process, as the ``mxfp8`` script does. Every one of
them fails before a training step, so the tiny settings below only bound the cost of a test
that would (wrongly) start training. The messages asserted here are the ones quoted in
docs/reliability.md.
"""

from __future__ import annotations

import random
import sys
import types

import pytest

from mxfp8.cli import main as cli_main
from mxfp8.cli.main import main
from mxfp8.config.fields import ConfigError
from mxfp8.data.sources import DataError
from mxfp8.errors import USER_ERRORS, UserError, is_user_error, user_message

TINY = [
    "--steps", "1", "--run.batch_size", "2", "--run.seq_len", "16", "--model.n_layers", "1",
    "--model.d_model", "64", "--model.n_heads", "2", "--model.n_kv_heads", "1",
    "--model.ffn_hidden", "128", "--data.vocab_size", "300", "--run.eval_batches", "1",
    "--run.compile_quantize", "false", "--run.progress", "false", "--no-report",
]  # fmt: skip


@pytest.fixture
def run_dir(tmp_path):
    """An existing --out directory with one file in it: a failed command must leave it as is."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return out


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def train(capsys, out, cache, *argv):
    """(exit status, stderr) of ``mxfp8 train`` with the tiny settings and ``argv``."""
    args = ["train", *TINY, "--out", str(out), "--data.cache_dir", str(cache), *argv]
    code = main(args)
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mxfp8 train: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


def assert_untouched(out, cache) -> None:
    """The run directory holds only what it held before; the data cache holds no data."""
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


def words_corpus(path, n_lines: int):
    rng = random.Random(0)
    words = ["the", "king", "queen", "sword", "night", "love", "death", "crown", "lord", "fair"]
    path.write_text(
        "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(n_lines))
    )
    return path


# --- config mistakes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--recipe", "nope"], ["unknown recipe 'nope'", "mxfp8-floor"]),
        (["--model", "huge"], ["unknown model preset 'huge'", "tiny"]),
        (["--run.stepz", "3"], ["unknown option --run.stepz", "did you mean --run.steps?",
                                "valid keys in [run]: steps, batch_size, seq_len"]),
        (["--run.steps", "abc"], ["invalid value 'abc' for run.steps (expected int)"]),
        (["--optim.lr", "x"], ["invalid value 'x' for optim.lr (expected float)"]),
        (["--run.compile", "maybe"],
         ["invalid value 'maybe' for run.compile (expected {none|block|model})"]),
        (["--steps", "0"], ["run.steps must be >= 1, got 0"]),
        (["--steps"], ["argument --steps: expected one argument", "--help"]),
    ],
)  # fmt: skip
def test_config_mistakes(argv, words, capsys, run_dir, cache):
    code, err = train(capsys, run_dir, cache, *argv)
    assert code == 2
    assert_one_line_error(err, *words)
    assert_untouched(run_dir, cache)


def test_a_config_mistake_writes_no_run_directory(capsys, tmp_path, cache):
    code, err = train(capsys, tmp_path / "new", cache, "--optim.lr", "x")
    assert code == 2 and not (tmp_path / "new").exists()


# --- data mistakes -------------------------------------------------------------------------


def test_empty_corpus_file(capsys, tmp_path, run_dir, cache):
    (tmp_path / "empty.txt").write_text("")
    code, err = train(capsys, run_dir, cache, "--data", str(tmp_path / "empty.txt"))
    assert code == 2
    assert_one_line_error(err, "no text in data source", "empty.txt")
    assert_untouched(run_dir, cache)


def test_jsonl_with_no_document(capsys, tmp_path, run_dir, cache):
    (tmp_path / "blank.jsonl").write_text("\n\n")
    code, err = train(capsys, run_dir, cache, "--data", str(tmp_path / "blank.jsonl"))
    assert code == 2
    assert_one_line_error(err, "no text in data source", "blank.jsonl")
    assert_untouched(run_dir, cache)


def test_empty_directory(capsys, tmp_path, run_dir, cache):
    (tmp_path / "docs").mkdir()
    code, err = train(capsys, run_dir, cache, "--data", str(tmp_path / "docs"))
    assert code == 2
    assert_one_line_error(err, "holds no .txt file", "(it is empty)")
    assert_untouched(run_dir, cache)


def test_corpus_too_small_for_a_validation_split(capsys, tmp_path, run_dir, cache):
    (tmp_path / "small.txt").write_text("short text\n")
    code, err = train(capsys, run_dir, cache, "--data", str(tmp_path / "small.txt"))
    assert code == 2
    assert_one_line_error(err, "the val split of", "is empty", "1 document(s)", "tokens",
                          "at least 2000 characters")  # fmt: skip
    assert_untouched(run_dir, cache)


def test_corpus_with_fewer_tokens_than_one_window(capsys, tmp_path, run_dir, cache):
    corpus = words_corpus(tmp_path / "mid.txt", 60)
    code, err = train(capsys, run_dir, cache, "--data", str(corpus), "--run.seq_len", "128")
    assert code == 2
    assert_one_line_error(err, "split of", "tokens, fewer than seq_len + 1 = 129",
                          "--run.seq_len")  # fmt: skip
    assert sorted(p.name for p in run_dir.iterdir()) == ["keep.txt"]
    # the corpus itself was fine: its prepared cache stays, complete, for the next try
    assert not list(cache.rglob(".tmp-*"))


def test_non_utf8_file(capsys, tmp_path, run_dir, cache):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 200)
    code, err = train(capsys, run_dir, cache, "--data", str(tmp_path / "latin1.txt"))
    assert code == 2
    assert_one_line_error(err, "latin1.txt: not UTF-8 text: byte 0xe9 at byte offset 3")
    assert_untouched(run_dir, cache)


def test_jsonl_without_the_text_field(capsys, tmp_path, run_dir, cache):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"body": "some text", "id": 1}\n')
    code, err = train(capsys, run_dir, cache, "--data", str(path))
    assert code == 2
    assert_one_line_error(err, "rows.jsonl:1: no field 'text'", "its keys: 'body', 'id'",
                          "--data.text_field")  # fmt: skip
    assert_untouched(run_dir, cache)


def test_jsonl_line_that_is_not_json(capsys, tmp_path, run_dir, cache):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    code, err = train(capsys, run_dir, cache, "--data", str(path))
    assert code == 2
    assert_one_line_error(err, "rows.jsonl:2: invalid JSON")
    assert_untouched(run_dir, cache)


def test_missing_data_path(capsys, tmp_path, run_dir, cache):
    code, err = train(capsys, run_dir, cache, "--data", str(tmp_path / "nope.txt"))
    assert code == 2
    assert_one_line_error(err, "nope.txt' is neither a built-in corpus (shakespeare, kjv)")
    assert_untouched(run_dir, cache)


def test_unsupported_suffix(capsys, tmp_path, run_dir, cache):
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    code, err = train(capsys, run_dir, cache, "--data", str(tmp_path / "table.csv"))
    assert code == 2
    assert_one_line_error(err, "unsupported data file", "expected .txt, .jsonl or .parquet")
    assert_untouched(run_dir, cache)


def test_a_fixed_input_works_after_a_failure(capsys, tmp_path, cache):
    corpus = tmp_path / "c.txt"
    corpus.write_text("")
    code, _ = train(capsys, tmp_path / "r1", cache, "--data", str(corpus))
    assert code == 2
    words_corpus(corpus, 400)
    argv = ["train", *TINY, "--out", str(tmp_path / "r2"), "--data.cache_dir", str(cache),
            "--data", str(corpus)]  # fmt: skip
    assert main(argv) == 0
    assert "final validation loss" in capsys.readouterr().out


def test_compare_refuses_bad_data_before_any_run(capsys, tmp_path, cache):
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "cmp"
    argv = ["compare", *TINY[:-1], "--out", str(out), "--data.cache_dir", str(cache),
            "--data", str(tmp_path / "empty.txt")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mxfp8 compare: error: no text in data source") and "Traceback" not in err
    assert not out.exists()


# --- --debug, and what is not a user error -------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, capsys, tmp_path, run_dir, cache):
    (tmp_path / "empty.txt").write_text("")
    argv = ["train", *TINY, "--out", str(run_dir), "--data.cache_dir", str(cache),
            "--data", str(tmp_path / "empty.txt")]  # fmt: skip
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "DataError" in err
    assert err.strip().splitlines()[-1].startswith("mxfp8 train: error: no text in data source")


@pytest.fixture
def fake_command(monkeypatch):
    """Install ``mxfp8 boom``, whose run() raises the exception given to the returned setter."""
    module = types.ModuleType("mxfp8_test_boom")
    module.add_parser = lambda sub: sub.add_parser("boom")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli_main.COMMANDS, "boom", (module.__name__, "raises"))

    def raising(exc: BaseException) -> None:
        def run(args):
            raise exc

        module.run = run

    return raising


def test_a_bug_keeps_its_traceback(fake_command):
    fake_command(ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        main(["boom"])
    fake_command(ValueError("a ValueError that is not a UserError is a bug too"))
    with pytest.raises(ValueError):
        main(["boom"])


def test_ctrl_c_exits_130_without_a_traceback(fake_command, capsys):
    fake_command(KeyboardInterrupt())
    assert main(["boom"]) == 130
    err = capsys.readouterr().err
    assert "mxfp8 boom: interrupted" in err and "Traceback" not in err


def test_os_errors_are_worded_without_errno(fake_command, capsys):
    fake_command(FileNotFoundError(2, "No such file or directory", "/no/such.toml"))
    assert main(["boom"]) == 2
    assert (
        capsys.readouterr().err == "mxfp8 boom: error: No such file or directory: /no/such.toml\n"
    )


def test_the_user_error_types():
    for exc in (ConfigError("x"), DataError("x"), UserError("x"), FileNotFoundError("x"),
                PermissionError("x"), IsADirectoryError("x"), NotADirectoryError("x")):  # fmt: skip
        assert is_user_error(exc), exc
    assert not is_user_error(ValueError("x")) and not is_user_error(RuntimeError("x"))
    assert issubclass(DataError, ValueError) and UserError in USER_ERRORS
    assert user_message(UserError("two\nlines")) == "two lines"


def test_mx_recipe_with_dims_not_multiple_of_the_block_warns(tmp_path, capsys):
    from mxfp8.data.prepare import DataConfig, prepare_data

    cache = tmp_path / "cache"
    prepare_data(DataConfig(source="shakespeare", vocab_size=300, cache_dir=str(cache)))
    args = [*TINY, "--recipe", "mxfp8", "--model.d_model", "48", "--model.ffn_hidden", "96"]
    code, err = train(capsys, tmp_path / "run", cache, *args)
    assert code == 0
    assert "warning: 7 linear layer(s) stay in high precision" in err
    assert "in_features=48 is not a multiple of block_size 32" in err
