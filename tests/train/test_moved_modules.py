"""The module paths of 0.1.0 that moved to their own floors still import for one release, warn
that they moved, and give the very objects of the new modules (CHANGELOG.md)."""

from __future__ import annotations

import importlib
import sys

import pytest

import mxfp8.checkpoint
import mxfp8.config.train_config
import mxfp8.data.batches
import mxfp8.data.prepare
import mxfp8.data.tokenizer
import mxfp8.model.config
import mxfp8.model.transformer

ALIASES = {
    "mxfp8.train.model": {"Transformer": mxfp8.model.transformer.Transformer,
                          "ModelConfig": mxfp8.model.config.ModelConfig,
                          "inference_forward": mxfp8.model.transformer.inference_forward},
    "mxfp8.train.data": {"prepare_data": mxfp8.data.prepare.prepare_data,
                         "get_batch": mxfp8.data.batches.get_batch,
                         "DataConfig": mxfp8.data.prepare.DataConfig},
    "mxfp8.train.config": {"TrainConfig": mxfp8.config.train_config.TrainConfig,
                           "load_config": mxfp8.config.train_config.load_config},
    "mxfp8.train.checkpoint": {"save_checkpoint": mxfp8.checkpoint.save_checkpoint,
                               "find_checkpoint": mxfp8.checkpoint.find_checkpoint,
                               "CHECKPOINT_DIR": mxfp8.checkpoint.CHECKPOINT_DIR},
    "mxfp8.train.tokenizer": {"train_tokenizer": mxfp8.data.tokenizer.train_tokenizer},
}  # fmt: skip


@pytest.mark.parametrize("old", list(ALIASES))
def test_an_old_path_warns_and_gives_the_new_objects(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to"):
        module = importlib.import_module(old)
    for name, obj in ALIASES[old].items():
        assert getattr(module, name) is obj, name


def test_nothing_of_the_package_imports_an_alias():
    """The aliases are for users: the package and its tests import the new paths (a
    DeprecationWarning raised as an error here would show one)."""
    import subprocess

    code = ("import warnings; warnings.filterwarnings('error', r'mxfp8\\.train\\.\\w+ moved', "
            "DeprecationWarning); "
            "import mxfp8.cli.main, mxfp8.compare, mxfp8.interop.source, mxfp8.report.html, "
            "mxfp8.train.loop, mxfp8.train.golden")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
